//! Which records of a tenant's audit trail name one EDEK: what a data owner asks of the
//! trail ("who opened this data key, and when?"). Written from docs/FORMATS.md §5, like
//! the verifier: an EDEK is named by its id, the 12-byte nonce at offset `8+n` of its
//! layout (§3), as 16 characters of unpadded base64url; format 2 records name it in each
//! item of `items` (`edek`, or `from` and `to` on `rewrap`). Format 1 records name no
//! EDEK, so they never match.
//!
//! This does not verify the chain: run `kekctl audit verify` on the same files first.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use base64::Engine;
use serde_json::{Map, Value};

/// An EDEK's id, as the trail writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdekId(String);

/// Why a text or a file does not name an EDEK.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadEdek {
    #[error("{0:?} is not an EDEK id (16 characters of unpadded base64url, as the audit trail writes them)")]
    Id(String),
    #[error("{0}: not an EDEK (raw, or standard base64 as `kekctl --json generate` prints it): {1}")]
    File(PathBuf, &'static str),
}

const NONCE_LEN: usize = 12;
/// format, algorithm, name length; then the name, the version (4) and the nonce.
const FIXED_HEADER: usize = 4;

impl EdekId {
    pub fn parse(text: &str) -> Result<EdekId, BadEdek> {
        let bad = || BadEdek::Id(text.to_owned());
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text).map_err(|_| bad())?;
        (bytes.len() == NONCE_LEN).then(|| EdekId(text.to_owned())).ok_or_else(bad)
    }

    /// The id of an EDEK in its raw layout (§3).
    pub fn of_edek(edek: &[u8]) -> Option<EdekId> {
        let name_len = u16::from_be_bytes([*edek.get(2)?, *edek.get(3)?]) as usize;
        let at = FIXED_HEADER + name_len + 4;
        let nonce = edek.get(at..at + NONCE_LEN)?;
        Some(EdekId(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(nonce)))
    }

    /// The id of the EDEK in `path`: raw (as `kekctl wrap` writes it), or standard base64
    /// text (the `edek` of `kekctl --json generate`).
    pub fn of_file(path: &Path) -> io::Result<Result<EdekId, BadEdek>> {
        let bytes = std::fs::read(path)?;
        let bad = |why| Err(BadEdek::File(path.to_owned(), why));
        // A raw EDEK starts with its format byte, 1, which no base64 text does.
        let edek = if bytes.first() == Some(&1) {
            bytes
        } else {
            let text = String::from_utf8_lossy(&bytes);
            match base64::engine::general_purpose::STANDARD.decode(text.trim()) {
                Ok(b) => b,
                Err(_) => return Ok(bad("neither raw nor base64")),
            }
        };
        if edek.first() != Some(&1) {
            return Ok(bad("not EDEK format 1"));
        }
        Ok(EdekId::of_edek(&edek).map_or_else(|| bad("too short"), Ok))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One item of one record that names the EDEK.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    pub file: PathBuf,
    /// 1-based.
    pub line: usize,
    /// The record's members but `items`, and the matching item's members, with `item` its
    /// index in `items` and `as` how it names the EDEK (`edek`, `from` or `to`).
    pub record: Map<String, Value>,
}

/// The files to search: each path given, a directory standing for its day files in date
/// order (the verifier's [`crate::audit::day_files`]: a link among them is refused).
pub fn files_of(paths: &[PathBuf]) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            files.extend(crate::audit::day_files(p)?);
        } else {
            files.push(p.clone());
        }
    }
    Ok(files)
}

/// Every item, in every record of `files`, that names `id`, in trail order.
pub fn find(files: &[PathBuf], id: &EdekId) -> Result<Vec<Found>, (PathBuf, io::Error)> {
    let mut found = Vec::new();
    for path in files {
        let err = |e| (path.clone(), e);
        let reader = BufReader::new(File::open(path).map_err(err)?);
        for (i, line) in reader.lines().enumerate() {
            let line = line.map_err(err)?;
            // Most records do not name it: look before parsing.
            if !line.contains(id.as_str()) {
                continue;
            }
            let Ok(Value::Object(mut record)) = serde_json::from_str::<Value>(&line) else { continue };
            let Some(Value::Array(items)) = record.remove("items") else { continue };
            for (n, item) in items.into_iter().enumerate() {
                let Value::Object(item) = item else { continue };
                let named = ["edek", "from", "to"]
                    .into_iter()
                    .find(|m| item.get(*m).and_then(Value::as_str) == Some(id.as_str()));
                if let Some(member) = named {
                    let mut r = record.clone();
                    r.insert("item".into(), n.into());
                    r.insert("as".into(), member.into());
                    r.extend(item);
                    found.push(Found { file: path.clone(), line: i + 1, record: r });
                }
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_edek_is_named_by_its_nonce() {
        let mut edek = vec![1, 1, 0, 3];
        edek.extend_from_slice(b"abc\0\0\0\x01");
        edek.extend_from_slice(&[0xfb; 12]);
        edek.extend_from_slice(&[0; 48]);
        let id = EdekId::of_edek(&edek).unwrap();
        assert_eq!(id.as_str(), "-_v7-_v7-_v7-_v7");
        assert_eq!(EdekId::parse("-_v7-_v7-_v7-_v7"), Ok(id.clone()));
        assert!(EdekId::parse("-_v7-_v7-_v7-_v").is_err(), "11 bytes");
        assert!(EdekId::parse("+/v7-_v7-_v7-_v7").is_err(), "standard base64 is not the trail's");
        assert_eq!(EdekId::of_edek(&edek[..20]), None);

        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw");
        std::fs::write(&raw, &edek).unwrap();
        assert_eq!(EdekId::of_file(&raw).unwrap(), Ok(id.clone()));
        let text = dir.path().join("b64");
        let b64 = base64::engine::general_purpose::STANDARD.encode(&edek);
        std::fs::write(&text, format!("{b64}\n")).unwrap();
        assert_eq!(EdekId::of_file(&text).unwrap(), Ok(id.clone()));
        std::fs::write(&text, "hello").unwrap();
        assert!(EdekId::of_file(&text).unwrap().is_err());

        let trail = dir.path().join("2026-12-06.jsonl");
        let lines = [
            r#"{"time":"t0","event":"unwrap","item":0,"outcome":"ok"}"#.to_owned(),
            format!(
                r#"{{"v":2,"event":"generate","peer":{{"uid":7}},"items":[{{"edek":"AAAAAAAAAAAAAAAA"}},{{"outcome":"ok","edek":"{}"}}]}}"#,
                id.as_str()
            ),
            format!(
                r#"{{"v":2,"event":"rewrap","items":[{{"from":"{}","to":"AAAAAAAAAAAAAAAA"}}]}}"#,
                id.as_str()
            ),
        ];
        std::fs::write(&trail, lines.join("\n") + "\n").unwrap();
        let found = find(&files_of(&[dir.path().to_owned()]).unwrap(), &id).unwrap();
        assert_eq!(found.len(), 2);
        assert_eq!(
            (found[0].line, &found[0].record["item"], &found[0].record["as"]),
            (2, &1.into(), &"edek".into())
        );
        assert_eq!(found[0].record["peer"]["uid"], 7, "the request's members come along");
        assert!(!found[0].record.contains_key("items"));
        assert_eq!((found[1].line, &found[1].record["as"]), (3, &"from".into()));
    }
}
