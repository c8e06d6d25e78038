//! Verifier of kekd's audit log hash chain, written from the contract in
//! `docs/FORMATS.md`, section 5 ("Audit records"), and not from the daemon's writer, so
//! that the two check each other.
//!
//! A line is `{"seq":N,"prev":"<64 hex>",…,"hash":"<64 hex>"}` followed by `\n`; `hash` is
//! SHA-256 over the line without its 75-byte `,"hash":"…"}` suffix, followed by `}`. The
//! records of a tenant form one chain across its files, given oldest first.
//!
//! What a pass proves: the files hold one unbroken chain from their first record to
//! [`Summary::head`]. The hash is unkeyed, so whoever can write the files can also rewrite
//! the chain from some record on, or cut records off its end; only comparing `head` (or a
//! later record's `prev`) with a copy kept elsewhere detects that.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// `prev` of the tenant's first record (seq 1).
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

const HASH_HEX_LEN: usize = 64;
const SUFFIX_START: &[u8] = b",\"hash\":\"";
const SUFFIX_END: &[u8] = b"\"}";
/// `,"hash":"` + 64 hex digits + `"}`.
const SUFFIX_LEN: usize = SUFFIX_START.len() + HASH_HEX_LEN + SUFFIX_END.len();
const BODY_START: &[u8] = b"{\"seq\":";
const PREV_START: &[u8] = b",\"prev\":\"";

/// A chain that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Records in all files.
    pub records: u64,
    /// Files read, empty ones included.
    pub files: usize,
    /// `seq` of the first record; `None` when there are no records.
    pub first_seq: Option<u64>,
    /// `seq` of the last record; `None` when there are no records.
    pub last_seq: Option<u64>,
    /// `hash` of the last record (lowercase hex); `None` when there are no records.
    pub head: Option<String>,
}

/// The first record that breaks the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    pub file: PathBuf,
    /// 1-based line number in `file`.
    pub line: u64,
    /// The `seq` the line states, when it can be read off its start (for a record that
    /// failed its hash check this is what the line says, not something verified).
    pub seq: Option<u64>,
    /// What is wrong, e.g. `edited: its hash does not match its contents`.
    pub problem: String,
}

impl fmt::Display for Broken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: record", self.file.display(), self.line)?;
        if let Some(seq) = self.seq {
            write!(f, " seq {seq}")?;
        }
        write!(f, ": {}", self.problem)
    }
}

/// Why verification did not succeed: the chain is broken, or a file could not be read
/// (which says nothing about the chain).
#[derive(Debug)]
pub enum VerifyError {
    Broken(Broken),
    Io { path: PathBuf, error: io::Error },
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VerifyError::Broken(b) => b.fmt(f),
            VerifyError::Io { path, error } => write!(f, "cannot read {}: {error}", path.display()),
        }
    }
}

impl std::error::Error for VerifyError {}

/// Verifies the chain across `paths`, in the order given (oldest first), stopping at the
/// first broken record.
pub fn verify_files(paths: &[PathBuf]) -> Result<Summary, VerifyError> {
    let mut chain = Chain::default();
    for path in paths {
        verify_file(&mut chain, path)?;
    }
    Ok(Summary {
        records: chain.records,
        files: paths.len(),
        first_seq: chain.first_seq,
        last_seq: chain.last.as_ref().map(|(seq, _)| *seq),
        head: chain.last.map(|(_, hash)| hash),
    })
}

fn verify_file(chain: &mut Chain, path: &Path) -> Result<(), VerifyError> {
    let io_error = |error| VerifyError::Io { path: path.to_owned(), error };
    let mut reader = BufReader::new(File::open(path).map_err(io_error)?);
    let mut buf = Vec::new();
    let mut line_no = 0u64;
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf).map_err(io_error)? == 0 {
            return Ok(());
        }
        line_no += 1;
        let result = match buf.strip_suffix(b"\n") {
            Some(line) => chain.push(line),
            None => Err(Problem {
                seq: stated_seq(&buf),
                text: "truncated: incomplete last record (the file does not end with a newline)".into(),
            }),
        };
        result.map_err(|p| {
            VerifyError::Broken(Broken { file: path.to_owned(), line: line_no, seq: p.seq, problem: p.text })
        })?;
    }
}

struct Problem {
    seq: Option<u64>,
    text: String,
}

/// The chain so far.
#[derive(Default)]
struct Chain {
    records: u64,
    first_seq: Option<u64>,
    /// `seq` and `hash` of the last record.
    last: Option<(u64, String)>,
}

impl Chain {
    /// Checks one line (without its `\n`) and appends it to the chain.
    fn push(&mut self, line: &[u8]) -> Result<(), Problem> {
        let stated = stated_seq(line);
        let fail = |text: String| Err(Problem { seq: stated, text });
        if line.is_empty() {
            return fail("empty line".into());
        }
        let Some((body, hash)) = split_hash(line) else {
            return fail(format!(
                "malformed: the line does not end with ,\"hash\":\"<{HASH_HEX_LEN} lowercase hex>\"}}"
            ));
        };
        if hex(&Sha256::digest(&body)) != hash {
            return fail("edited: its hash does not match its contents".into());
        }
        // The hash matched, so from here on the record is as written: a problem below is
        // one of the writer, or of a forger who recomputed the hash.
        let Ok(body_text) = std::str::from_utf8(&body) else {
            return fail("malformed: not valid UTF-8".into());
        };
        let object = match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(serde_json::Value::Object(object)) => object,
            Ok(_) => return fail("malformed: not a JSON object".into()),
            Err(e) => return fail(format!("malformed: not a JSON object: {e}")),
        };
        let Some((seq, prev)) = seq_and_prev(body_text) else {
            return fail(format!(
                "malformed: it does not begin with {{\"seq\":N,\"prev\":\"<{HASH_HEX_LEN} lowercase hex>\""
            ));
        };
        // The prefix was read as text; the parsed object must agree (no duplicate members).
        if object.get("seq").and_then(|v| v.as_u64()) != Some(seq)
            || object.get("prev").and_then(|v| v.as_str()) != Some(prev)
            || object.contains_key("hash")
        {
            return fail("malformed: duplicate seq, prev or hash member".into());
        }
        if seq == 0 {
            return fail("malformed: seq 0 (the first record is seq 1)".into());
        }
        match &self.last {
            None if seq == 1 && prev != GENESIS_PREV => {
                return fail(format!("seq 1 has prev {prev}, not {HASH_HEX_LEN} zeros"));
            }
            // A chain that starts later is checked from its first record on.
            None => {}
            Some((last_seq, last_hash)) => {
                let Some(expected) = last_seq.checked_add(1) else {
                    return fail(format!("seq overflow after {last_seq}"));
                };
                if seq > expected {
                    return fail(format!(
                        "expected seq {expected}, found {seq}: records are missing (or reordered)"
                    ));
                }
                if seq < expected {
                    return fail(format!(
                        "expected seq {expected}, found {seq}: records are duplicated or reordered"
                    ));
                }
                if prev != last_hash {
                    return fail(format!(
                        "does not chain to the record before it: prev {prev}, but seq {last_seq} has hash {last_hash}"
                    ));
                }
            }
        }
        self.records += 1;
        self.first_seq.get_or_insert(seq);
        self.last = Some((seq, hash.to_owned()));
        Ok(())
    }
}

/// Splits a line into its body (the line without the hash suffix, followed by `}`) and the
/// stated hash, if the line ends with a well-formed `,"hash":"<64 lowercase hex>"}`.
fn split_hash(line: &[u8]) -> Option<(Vec<u8>, &str)> {
    let start = line.len().checked_sub(SUFFIX_LEN)?;
    let suffix = line[start..].strip_prefix(SUFFIX_START)?.strip_suffix(SUFFIX_END)?;
    let hash = lower_hex(suffix)?;
    let mut body = Vec::with_capacity(start + 1);
    body.extend_from_slice(&line[..start]);
    body.push(b'}');
    Some((body, hash))
}

/// `bytes` as a string if they are exactly 64 lowercase hex digits.
fn lower_hex(bytes: &[u8]) -> Option<&str> {
    let ok = bytes.len() == HASH_HEX_LEN && bytes.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    ok.then(|| std::str::from_utf8(bytes).ok()).flatten()
}

/// Reads `{"seq":N,"prev":"<64 hex>"` off the start of a body, followed by `,` or the
/// closing `}`. Strict: the writer emits compact JSON, members in this order.
fn seq_and_prev(body: &str) -> Option<(u64, &str)> {
    let rest = body.strip_prefix(std::str::from_utf8(BODY_START).ok()?)?;
    let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let (number, rest) = rest.split_at(digits);
    if number.is_empty() || (number.len() > 1 && number.starts_with('0')) {
        return None;
    }
    let seq = number.parse().ok()?;
    let rest = rest.strip_prefix(std::str::from_utf8(PREV_START).ok()?)?;
    let prev = lower_hex(rest.as_bytes().get(..HASH_HEX_LEN)?)?;
    match rest[HASH_HEX_LEN..].strip_prefix('"')?.chars().next()? {
        ',' | '}' => Some((seq, prev)),
        _ => None,
    }
}

/// The `seq` a line states at its start, read leniently, to name a record that is broken
/// in other ways (truncated, edited, malformed further on).
fn stated_seq(line: &[u8]) -> Option<u64> {
    let rest = line.strip_prefix(BODY_START)?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    /// A record as the spec describes it, built independently of the verifier's parsing:
    /// the body is an object without `hash`, and the line is the body with `hash` appended.
    fn record(seq: u64, prev: &str, extra: &str) -> (String, String) {
        let body = format!(
            "{{\"seq\":{seq},\"prev\":\"{prev}\",\"time\":\"2026-11-23T15:48:55.{:03}Z\",\
             \"tenant\":\"acme\",\"event\":\"wrap\",\"key\":\"billing\",\"version\":1,\
             \"outcome\":\"ok\"{extra}}}",
            seq % 1000
        );
        let hash = hex(&Sha256::digest(body.as_bytes()));
        let line = format!("{},\"hash\":\"{hash}\"}}\n", &body[..body.len() - 1]);
        (line, hash)
    }

    /// Lines for seqs `first..first + n`, chained; the first has `prev` of zeros when it
    /// is seq 1, else an arbitrary (unverifiable) hash.
    fn chain(first: u64, n: u64) -> Vec<String> {
        let mut prev = if first == 1 { GENESIS_PREV.to_owned() } else { "ab".repeat(32) };
        (first..first + n)
            .map(|seq| {
                let (line, hash) = record(seq, &prev, "");
                prev = hash;
                line
            })
            .collect()
    }

    struct Dir(tempfile::TempDir);

    impl Dir {
        fn new() -> Dir {
            Dir(tempfile::tempdir().unwrap())
        }

        fn write(&self, name: &str, content: impl AsRef<[u8]>) -> PathBuf {
            let path = self.0.path().join(name);
            fs::write(&path, content).unwrap();
            path
        }

        /// Two days of a chain: seqs 1..=5 in the first file, 6..=10 in the second, with
        /// `edit` applied to the lines of each (file index 0 or 1) before writing.
        fn two_days(&self, edit: impl Fn(usize, &mut Vec<String>)) -> Vec<PathBuf> {
            let lines = chain(1, 10);
            let mut days = [lines[..5].to_vec(), lines[5..].to_vec()];
            for (i, day) in days.iter_mut().enumerate() {
                edit(i, day);
            }
            days.iter()
                .enumerate()
                .map(|(i, day)| self.write(&format!("2026-11-2{}.jsonl", i + 3), day.concat()))
                .collect()
        }
    }

    /// The hash a line states.
    fn stated_hash(line: &str) -> String {
        let line = line.trim_end_matches('\n');
        line[line.len() - 66..line.len() - 2].to_owned()
    }

    fn broken(paths: &[PathBuf]) -> Broken {
        match verify_files(paths) {
            Err(VerifyError::Broken(b)) => b,
            other => panic!("expected a broken chain, got {other:?}"),
        }
    }

    #[track_caller]
    fn assert_broken(paths: &[PathBuf], file: usize, line: u64, seq: Option<u64>, problem: &str) {
        let b = broken(paths);
        assert_eq!((&b.file, b.line, b.seq), (&paths[file], line, seq), "{b}");
        assert!(b.problem.contains(problem), "expected {problem:?} in {b}");
    }

    #[test]
    fn a_known_line_verifies() {
        // The hash was computed outside this code: printf '%s' BODY | sha256sum.
        let line = format!(
            "{{\"seq\":1,\"prev\":\"{GENESIS_PREV}\",\"event\":\"hello\",\"outcome\":\"ok\",\
             \"hash\":\"341da382c839d70836d5542b26de1971118d2eeb3b9b53ed2dd8f4bb92fd72bc\"}}\n"
        );
        let dir = Dir::new();
        let path = dir.write("a.jsonl", &line);
        let summary = verify_files(&[path]).unwrap();
        assert_eq!(
            summary.head.as_deref(),
            Some("341da382c839d70836d5542b26de1971118d2eeb3b9b53ed2dd8f4bb92fd72bc")
        );
        // The minimal record: nothing between prev and hash.
        let (line, _) = record(1, GENESIS_PREV, "");
        assert!(line.starts_with("{\"seq\":1,\"prev\":\"0000"));
        let body = format!("{{\"seq\":1,\"prev\":\"{GENESIS_PREV}\"}}");
        let hash = hex(&Sha256::digest(body.as_bytes()));
        let path = dir.write("b.jsonl", format!("{},\"hash\":\"{hash}\"}}\n", &body[..body.len() - 1]));
        assert_eq!(verify_files(&[path]).unwrap().records, 1);
    }

    #[test]
    fn a_valid_chain_across_files_verifies() {
        let dir = Dir::new();
        let paths = dir.two_days(|_, _| {});
        let summary = verify_files(&paths).unwrap();
        let expected_head = stated_hash(&chain(1, 10)[9]);
        assert_eq!(
            summary,
            Summary {
                records: 10,
                files: 2,
                first_seq: Some(1),
                last_seq: Some(10),
                head: Some(expected_head),
            }
        );
    }

    #[test]
    fn a_chain_may_start_after_seq_1() {
        let dir = Dir::new();
        let path = dir.write("a.jsonl", chain(41, 3).concat());
        let s = verify_files(&[path]).unwrap();
        assert_eq!((s.records, s.first_seq, s.last_seq), (3, Some(41), Some(43)));
    }

    #[test]
    fn empty_files_are_allowed() {
        let dir = Dir::new();
        let empty = dir.write("empty.jsonl", "");
        let s = verify_files(&[empty.clone(), empty.clone()]).unwrap();
        assert_eq!(s, Summary { records: 0, files: 2, first_seq: None, last_seq: None, head: None });
        let full = dir.write("full.jsonl", chain(1, 3).concat());
        let s = verify_files(&[empty.clone(), full, empty]).unwrap();
        assert_eq!((s.records, s.files, s.first_seq, s.last_seq), (3, 3, Some(1), Some(3)));
    }

    #[test]
    fn an_edited_middle_record_is_detected() {
        let dir = Dir::new();
        let paths = dir.two_days(|i, day| {
            if i == 0 {
                day[2] = day[2].replace("\"outcome\":\"ok\"", "\"outcome\":\"error\"");
            }
        });
        assert_broken(&paths, 0, 3, Some(3), "edited: its hash does not match its contents");
    }

    #[test]
    fn an_edited_last_record_is_detected() {
        let dir = Dir::new();
        let paths = dir.two_days(|i, day| {
            if i == 1 {
                day[4] = day[4].replace("billing", "payroll");
            }
        });
        assert_broken(&paths, 1, 5, Some(10), "edited");
    }

    #[test]
    fn an_edited_and_rehashed_record_breaks_the_next_link() {
        let dir = Dir::new();
        let lines = chain(1, 5);
        let mut forged = lines.clone();
        forged[2] = record(3, &stated_hash(&lines[1]), ",\"detail\":{\"forged\":true}").0;
        let path = dir.write("a.jsonl", forged.concat());
        assert_broken(&[path], 0, 4, Some(4), "does not chain to the record before it");
    }

    #[test]
    fn a_deleted_middle_record_is_detected() {
        let dir = Dir::new();
        let paths = dir.two_days(|i, day| {
            if i == 0 {
                day.remove(2);
            }
        });
        assert_broken(&paths, 0, 3, Some(4), "expected seq 3, found 4: records are missing");
    }

    #[test]
    fn a_deleted_first_record_of_the_second_file_is_detected() {
        let dir = Dir::new();
        let paths = dir.two_days(|i, day| {
            if i == 1 {
                day.remove(0);
            }
        });
        assert_broken(&paths, 1, 1, Some(7), "expected seq 6, found 7: records are missing");
    }

    #[test]
    fn swapped_records_are_detected() {
        let dir = Dir::new();
        let paths = dir.two_days(|i, day| {
            if i == 0 {
                day.swap(1, 2);
            }
        });
        assert_broken(&paths, 0, 2, Some(3), "expected seq 2, found 3");
    }

    #[test]
    fn files_out_of_order_are_detected() {
        let dir = Dir::new();
        let mut paths = dir.two_days(|_, _| {});
        paths.reverse();
        // The later file alone is a chain starting at 6; the earlier one cannot follow it.
        assert_broken(&paths, 1, 1, Some(1), "expected seq 11, found 1: records are duplicated or reordered");
    }

    #[test]
    fn a_duplicated_record_is_detected() {
        let dir = Dir::new();
        let paths = dir.two_days(|i, day| {
            if i == 0 {
                let copy = day[2].clone();
                day.insert(3, copy);
            }
        });
        assert_broken(&paths, 0, 4, Some(3), "expected seq 4, found 3: records are duplicated");
    }

    #[test]
    fn a_file_truncated_mid_record_is_detected() {
        let dir = Dir::new();
        let paths = dir.two_days(|i, day| {
            if i == 1 {
                let cut = day[4].len() / 2;
                day[4].truncate(cut);
            }
        });
        assert_broken(&paths, 1, 5, Some(10), "truncated: incomplete last record");

        // Only the newline missing is a truncation too; so is a cut inside `seq`.
        let paths = dir.two_days(|i, day| {
            if i == 1 {
                day[4].pop();
            }
        });
        assert_broken(&paths, 1, 5, Some(10), "truncated");
        let paths = dir.two_days(|i, day| {
            if i == 1 {
                day[4].truncate(4);
            }
        });
        assert_broken(&paths, 1, 5, None, "truncated");
    }

    #[test]
    fn a_truncated_first_file_is_detected_before_the_second() {
        let dir = Dir::new();
        // Its last whole record cut off: the gap shows at the start of the next file.
        let paths = dir.two_days(|i, day| {
            if i == 0 {
                day.pop();
            }
        });
        assert_broken(&paths, 1, 1, Some(6), "expected seq 5, found 6: records are missing");
        // Cut inside its last record: that record is named, not the next file.
        let paths = dir.two_days(|i, day| {
            if i == 0 {
                day[4].truncate(30);
            }
        });
        assert_broken(&paths, 0, 5, Some(5), "truncated: incomplete last record");
    }

    #[test]
    fn malformed_lines_are_detected() {
        let dir = Dir::new();
        let lines = chain(1, 3);
        let with = |i: usize, line: &str| {
            let mut l = lines.clone();
            l.insert(i, line.to_owned());
            dir.write("m.jsonl", l.concat())
        };
        assert_broken(&[with(1, "\n")], 0, 2, None, "empty line");
        assert_broken(&[with(3, "{\"seq\":4}\n")], 0, 4, Some(4), "malformed: the line does not end with");

        // Uppercase hex is not the format.
        let upper = lines[1].replace(&stated_hash(&lines[1]), &stated_hash(&lines[1]).to_uppercase());
        assert_broken(&[with(1, &upper)], 0, 2, Some(2), "does not end with");

        // Well-hashed lines that are not what the spec allows.
        let hashed = |body: &[u8]| {
            let mut line = body[..body.len() - 1].to_vec();
            line.extend_from_slice(format!(",\"hash\":\"{}\"}}\n", hex(&Sha256::digest(body))).as_bytes());
            line
        };
        let mut bad_utf8 = format!("{{\"seq\":1,\"prev\":\"{GENESIS_PREV}\",\"x\":\"").into_bytes();
        bad_utf8.extend_from_slice(b"\xff\"}");
        let bad_utf8 = hashed(&bad_utf8);
        let path = dir.write("u.jsonl", &bad_utf8);
        assert_broken(&[path], 0, 1, Some(1), "not valid UTF-8");

        let path = dir.write("j.jsonl", hashed(b"{\"seq\":1,\"prev\":,}"));
        assert_broken(&[path], 0, 1, Some(1), "not a JSON object");

        let reordered = format!("{{\"prev\":\"{GENESIS_PREV}\",\"seq\":1}}");
        let path = dir.write("o.jsonl", hashed(reordered.as_bytes()));
        assert_broken(&[path], 0, 1, None, "does not begin with {\"seq\":N,\"prev\":");

        let spaced = format!("{{\"seq\": 1,\"prev\":\"{GENESIS_PREV}\"}}");
        let path = dir.write("s.jsonl", hashed(spaced.as_bytes()));
        assert_broken(&[path], 0, 1, None, "does not begin with");

        let dup = format!("{{\"seq\":1,\"prev\":\"{GENESIS_PREV}\",\"seq\":2}}");
        let path = dir.write("d.jsonl", hashed(dup.as_bytes()));
        assert_broken(&[path], 0, 1, Some(1), "duplicate");

        let zero = format!("{{\"seq\":0,\"prev\":\"{GENESIS_PREV}\"}}");
        let path = dir.write("z.jsonl", hashed(zero.as_bytes()));
        assert_broken(&[path], 0, 1, Some(0), "seq 0");
    }

    #[test]
    fn seq_1_must_start_from_zeros() {
        let dir = Dir::new();
        let (line, _) = record(1, &"ab".repeat(32), "");
        let path = dir.write("a.jsonl", line);
        assert_broken(&[path], 0, 1, Some(1), "seq 1 has prev abab");
    }

    #[test]
    fn an_unreadable_file_is_an_io_error_not_a_broken_chain() {
        let dir = Dir::new();
        let good = dir.write("a.jsonl", chain(1, 2).concat());
        let missing = dir.0.path().join("missing.jsonl");
        match verify_files(&[good, missing.clone()]) {
            Err(VerifyError::Io { path, error }) => {
                assert_eq!(path, missing);
                assert_eq!(error.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("expected an I/O error, got {other:?}"),
        }
    }

    #[test]
    fn broken_names_file_line_and_seq() {
        let b =
            Broken { file: "x/2026-11-23.jsonl".into(), line: 7, seq: Some(42), problem: "edited".into() };
        assert_eq!(b.to_string(), "x/2026-11-23.jsonl:7: record seq 42: edited");
        let b = Broken { seq: None, problem: "empty line".into(), ..b };
        assert_eq!(b.to_string(), "x/2026-11-23.jsonl:7: record: empty line");
    }
}
