//! Verifier of kekd's audit log hash chain, written from the contract in
//! `docs/FORMATS.md`, section 5 ("Audit records"), and not from the daemon's writer, so
//! that the two check each other.
//!
//! A line is `{…,"seq":N,"prev":"<64 hex>","hash":"<64 hex>"}` followed by `\n`; `hash` is
//! SHA-256 over the line without its 75-byte `,"hash":"…"}` suffix, followed by `}`. Builds
//! before 2026-11-24 put `seq` and `prev` first instead (`{"seq":N,"prev":…,…,"hash":…}`),
//! and a trail that spans an upgrade mixes the two layouts, so both are accepted. The
//! records of a tenant form one chain across its files, given oldest first.
//!
//! What a pass proves: the files hold one unbroken chain from the tenant's first record
//! (seq 1), or from the [`Start`] given, to [`Summary::head`]. The hash is unkeyed, so
//! whoever can write the files can also rewrite the chain from some record on, or cut
//! records off its end; only comparing `head` (or a later record's `prev`) with a copy kept
//! elsewhere detects that.
//!
//! Checkpoints (FORMATS.md §5, "Checkpoints") anchor the chain in the tenant's root key: a
//! `checkpoint` record names the record right before it (`detail.seq`, `detail.hash`) with
//! an HMAC-SHA256 under a key only the root key unseals. Given [`Anchors`], a verify checks
//! each checkpoint's MAC and that it names the record before it, so a chain rewritten before
//! a checkpoint fails there; without, checkpoints are only counted. Records after the last
//! checkpoint ([`Summary::unanchored`]) are anchored by nothing: they could have been cut or
//! rewritten. This module builds the MAC input ([`checkpoint_mac_input`]) but computes no MAC:
//! the caller does, with the key ([`MacCheck`]).

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// `prev` of the tenant's first record (seq 1).
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

const HASH_HEX_LEN: usize = 64;
const SUFFIX_START: &[u8] = b",\"hash\":\"";
const SUFFIX_END: &[u8] = b"\"}";
/// `,"hash":"` + 64 hex digits + `"}`.
const SUFFIX_LEN: usize = SUFFIX_START.len() + HASH_HEX_LEN + SUFFIX_END.len();
/// How a line of the old layout begins.
const OLD_START: &[u8] = b"{\"seq\":";
/// What precedes `seq`'s digits in the new layout.
const NEW_SEQ: &[u8] = b",\"seq\":";
/// What follows `seq`'s digits in both layouts.
const PREV_START: &[u8] = b",\"prev\":\"";
/// The problem of a record whose `seq` and `prev` are in neither layout's place.
const LAYOUTS: &str = "malformed: seq and prev are neither the first two members \
                       ({\"seq\":N,\"prev\":\"<64 lowercase hex>\",…}, before 2026-11-24) \
                       nor the two before hash ({…,\"seq\":N,\"prev\":\"<64 lowercase hex>\",\"hash\":…})";

/// Where the chain must start.
///
/// By default at the tenant's first record ever (seq 1, `prev` all zeros): otherwise
/// removing the oldest records, or a whole first day, would leave a trail that verifies.
/// An operator who archives old days verifies the rest from the last record the archived
/// files verified to, as printed by that verify: `SEQ:HASH`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Start {
    /// seq 1, with `prev` [`GENESIS_PREV`].
    #[default]
    Genesis,
    /// Right after the record `seq` whose hash is `hash` (lowercase hex).
    After { seq: u64, hash: String },
}

/// A `SEQ:HASH` that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not SEQ:HASH (a record's seq, a colon and its hash as 64 lowercase hex digits)")]
pub struct BadStart(String);

impl std::str::FromStr for Start {
    type Err = BadStart;

    fn from_str(text: &str) -> Result<Start, BadStart> {
        let bad = || BadStart(text.to_owned());
        let (seq, hash) = text.split_once(':').ok_or_else(bad)?;
        let seq = seq.parse::<u64>().ok().filter(|&s| s > 0).ok_or_else(bad)?;
        let hash = lower_hex(hash.as_bytes()).ok_or_else(bad)?;
        Ok(Start::After { seq, hash: hash.to_owned() })
    }
}

/// What a checkpoint's MAC is over: `"kekd/audit-checkpoint/v1" ‖ str16(tenant) ‖ u64 seq
/// ‖ the 32 bytes of hash` (big-endian; `str16` is the UTF-8 bytes prefixed by their length
/// as a u16), for the record `seq` whose hash is `hash`.
pub fn checkpoint_mac_input(tenant: &str, seq: u64, hash: &[u8; 32]) -> Vec<u8> {
    let mut input = Vec::with_capacity(CHECKPOINT_LABEL.len() + 2 + tenant.len() + 8 + 32);
    input.extend_from_slice(CHECKPOINT_LABEL);
    let len = u16::try_from(tenant.len()).unwrap_or(u16::MAX);
    input.extend_from_slice(&len.to_be_bytes());
    input.extend_from_slice(tenant.as_bytes());
    input.extend_from_slice(&seq.to_be_bytes());
    input.extend_from_slice(hash);
    input
}

/// What a checkpoint's MAC input begins with.
const CHECKPOINT_LABEL: &[u8] = b"kekd/audit-checkpoint/v1";
/// The `event` of a checkpoint record.
const CHECKPOINT_EVENT: &str = "checkpoint";

/// Checks checkpoint MACs with the tenant's checkpoint key: whether `mac` is
/// HMAC-SHA256(key, `input`). Kept outside this module, which holds no key.
pub trait MacCheck {
    fn matches(&self, input: &[u8], mac: &[u8; 32]) -> bool;
}

/// What checkpoints are checked with: the tenant whose trail it is (part of the MAC input)
/// and its key.
pub struct Anchors<'a> {
    pub tenant: &'a str,
    pub mac: &'a dyn MacCheck,
}

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
    /// Checkpoint records found.
    pub checkpoints: u64,
    /// Whether each checkpoint's MAC, and the record it names, were checked (with
    /// [`Anchors`]); if not, they were only counted.
    pub checkpoints_checked: bool,
    /// Records after the last checkpoint (all of them when there is none): no checkpoint
    /// anchors them, so they could have been cut off or rewritten unnoticed.
    pub unanchored: u64,
}

impl Summary {
    /// Where a verify of the files after these starts, once these are archived: the last
    /// record's `SEQ:HASH`, as [`Start`] parses it.
    pub fn last(&self) -> Option<String> {
        Some(format!("{}:{}", self.last_seq?, self.head.as_ref()?))
    }
}

/// The first record that breaks the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    pub file: PathBuf,
    /// 1-based line number in `file`.
    pub line: u64,
    /// The `seq` the line states, when it can be read off it: at its start in the old
    /// layout, before `prev` near its end in the new one (for a record that failed its hash
    /// check this is what the line says, not something verified).
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

/// Verifies the chain across `paths`, in the order given (oldest first), from `start`,
/// stopping at the first broken record. Checkpoints are counted, not checked.
pub fn verify_files(paths: &[PathBuf], start: &Start) -> Result<Summary, VerifyError> {
    verify_files_anchored(paths, start, None)
}

/// [`verify_files`], checking each checkpoint with `anchors` when given: the first whose
/// MAC does not match, or that does not name the record right before it, breaks the chain
/// there.
pub fn verify_files_anchored(
    paths: &[PathBuf],
    start: &Start,
    anchors: Option<&Anchors<'_>>,
) -> Result<Summary, VerifyError> {
    let mut chain = Chain { start: start.clone(), anchors, ..Chain::default() };
    for path in paths {
        verify_file(&mut chain, path)?;
    }
    Ok(Summary {
        records: chain.records,
        files: paths.len(),
        first_seq: chain.first_seq,
        last_seq: chain.last.as_ref().map(|(seq, _)| *seq),
        head: chain.last.map(|(_, hash)| hash),
        checkpoints: chain.checkpoints,
        checkpoints_checked: anchors.is_some(),
        unanchored: chain.records - chain.anchored,
    })
}

/// The day files of a tenant's trail in `dir` (`<audit.dir>/<tenant>`), oldest first: the
/// names `YYYY-MM-DD.jsonl`, which sort by date. Anything else is passed over; a link or
/// other non-file under such a name is an error (`InvalidData`), never followed.
pub fn day_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(date) = name.to_str().and_then(|n| n.strip_suffix(".jsonl")) else { continue };
        let is_date = date.len() == 10
            && date
                .bytes()
                .enumerate()
                .all(|(i, b)| if i == 4 || i == 7 { b == b'-' } else { b.is_ascii_digit() });
        if !is_date {
            continue;
        }
        if !entry.file_type()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a regular file (a link?): not read", entry.path().display()),
            ));
        }
        out.push(entry.path());
    }
    out.sort();
    Ok(out)
}

fn verify_file(chain: &mut Chain<'_>, path: &Path) -> Result<(), VerifyError> {
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
struct Chain<'a> {
    /// What the first record must follow.
    start: Start,
    /// What checkpoints are checked with, if they are.
    anchors: Option<&'a Anchors<'a>>,
    records: u64,
    first_seq: Option<u64>,
    /// `seq` and `hash` of the last record.
    last: Option<(u64, String)>,
    checkpoints: u64,
    /// Records up to and including the last checkpoint.
    anchored: u64,
}

impl Chain<'_> {
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
        let members = match serde_json::from_slice::<Members>(&body) {
            Ok(Members(members)) => members,
            Err(e) => return fail(format!("malformed: not a JSON object: {e}")),
        };
        if let Some(name) = duplicate(&members) {
            return fail(format!("malformed: duplicate top-level member {name:?}"));
        }
        let Some((seq, prev)) = chain_members(&members) else {
            return fail(LAYOUTS.into());
        };
        let Some(seq) = seq.as_u64() else {
            return fail(format!("malformed: seq {seq} is not a non-negative integer"));
        };
        let Some(prev) = prev.as_str().and_then(|p| lower_hex(p.as_bytes())) else {
            return fail(format!("malformed: prev {prev} is not {HASH_HEX_LEN} lowercase hex digits"));
        };
        if !compact(body_text, seq, prev) {
            return fail(format!(
                "malformed: seq and prev are not written as compact JSON (\"seq\":{seq},\"prev\":\"{prev}\")"
            ));
        }
        if seq == 0 {
            return fail("malformed: seq 0 (the first record is seq 1)".into());
        }
        match (&self.last, &self.start) {
            (None, Start::Genesis) if seq != 1 => {
                return fail(format!(
                    "expected seq 1, found {seq}: the trail's first records are missing (seq 1 to {}). \
                     If older days were archived, verify the rest with --from SEQ:HASH, the last record \
                     a verify of the archived files printed",
                    seq - 1
                ));
            }
            (None, Start::Genesis) if prev != GENESIS_PREV => {
                return fail(format!("seq 1 has prev {prev}, not {HASH_HEX_LEN} zeros"));
            }
            (None, Start::Genesis) => {}
            (None, Start::After { seq: after, hash }) => {
                let expected = after.saturating_add(1);
                if seq != expected {
                    let what = if seq > expected { "missing" } else { "duplicated or reordered" };
                    return fail(format!(
                        "expected seq {expected} (the record after --from {after}:…), found {seq}: records are {what}"
                    ));
                }
                if prev != hash {
                    return fail(format!(
                        "does not chain to --from: prev {prev}, but --from gives seq {after} the hash {hash}"
                    ));
                }
            }
            (Some((last_seq, last_hash)), _) => {
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
        let is_checkpoint = members.iter().any(|(n, v)| n == "event" && v == CHECKPOINT_EVENT);
        if is_checkpoint {
            if let Some(anchors) = self.anchors {
                self.check_checkpoint(anchors, &members).map_err(|text| Problem { seq: stated, text })?;
            }
        }
        self.records += 1;
        self.first_seq.get_or_insert(seq);
        self.last = Some((seq, hash.to_owned()));
        if is_checkpoint {
            self.checkpoints += 1;
            self.anchored = self.records;
        }
        Ok(())
    }

    /// A checkpoint (already chained): its `detail` must name the record right before it
    /// and carry that record's MAC under the tenant's checkpoint key.
    fn check_checkpoint(&self, anchors: &Anchors<'_>, members: &[(String, Value)]) -> Result<(), String> {
        let detail = members.iter().find(|(n, _)| n == "detail").map(|(_, v)| v);
        let field = |name: &str| detail.and_then(|d| d.get(name));
        let named_seq = field("seq").and_then(Value::as_u64);
        let hex_of = |name: &str| field(name).and_then(Value::as_str).and_then(|h| lower_hex(h.as_bytes()));
        let (Some(named_seq), Some(named_hash), Some(mac)) = (named_seq, hex_of("hash"), hex_of("mac"))
        else {
            return Err(format!(
                "checkpoint: malformed: its detail is not {{\"seq\":N,\"hash\":\"<{HASH_HEX_LEN} lowercase hex>\",\
                 \"mac\":\"<{HASH_HEX_LEN} lowercase hex>\"}}"
            ));
        };
        let before = match (&self.last, &self.start) {
            (Some((seq, hash)), _) => Some((*seq, hash.as_str())),
            (None, Start::After { seq, hash }) => Some((*seq, hash.as_str())),
            (None, Start::Genesis) => None,
        };
        match before {
            Some((seq, hash)) if (seq, hash) == (named_seq, named_hash) => {}
            Some((seq, hash)) => {
                return Err(format!(
                    "checkpoint: names seq {named_seq} with hash {named_hash}, but the record before it is \
                     seq {seq} with hash {hash}: the records before it were rewritten, or the checkpoint was moved"
                ))
            }
            None => return Err(format!("checkpoint: names seq {named_seq}, but no record comes before it")),
        }
        let input = checkpoint_mac_input(anchors.tenant, named_seq, &unhex(named_hash));
        if !anchors.mac.matches(&input, &unhex(mac)) {
            return Err(format!(
                "checkpoint: its MAC does not match under tenant {}'s checkpoint key: the chain up to seq \
                 {named_seq} was rewritten, or the checkpoint was not made with this tenant's key",
                anchors.tenant
            ));
        }
        Ok(())
    }
}

/// The 32 bytes of 64 lowercase hex digits (checked by [`lower_hex`]).
fn unhex(hex: &str) -> [u8; 32] {
    let digit = |b: u8| if b.is_ascii_digit() { b - b'0' } else { b - b'a' + 10 };
    let mut out = [0u8; 32];
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        out[i] = digit(pair[0]) << 4 | digit(pair[1]);
    }
    out
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

/// A JSON object's top-level members, in order and with duplicates kept (serde_json's
/// `Map` would silently keep one of two, and the contract makes a duplicate malformed).
struct Members(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;

        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }

        deserializer.deserialize_map(MembersVisitor)
    }
}

/// The first top-level member name that occurs twice. The body has no `hash` (it was cut
/// off as the line's suffix), so one named `hash` in it is a second one.
fn duplicate(members: &[(String, Value)]) -> Option<&str> {
    let mut seen = HashSet::from(["hash"]);
    members.iter().map(|(name, _)| name.as_str()).find(|name| !seen.insert(name))
}

/// The values of `seq` and `prev` if they are the first two members (old layout) or the
/// last two of the body, right before `hash` (new layout). Read from the parsed members,
/// so that a nested `seq` (say in `meta.fields`) does not count.
fn chain_members(members: &[(String, Value)]) -> Option<(&Value, &Value)> {
    fn pair(two: &[(String, Value)]) -> Option<(&Value, &Value)> {
        match two {
            [(s, seq), (p, prev)] if s == "seq" && p == "prev" => Some((seq, prev)),
            _ => None,
        }
    }
    let last_two = members.len().checked_sub(2).map(|start| &members[start..]);
    members.get(..2).and_then(pair).or_else(|| last_two.and_then(pair))
}

/// Whether `"seq":N,"prev":"…"` stands in the body as the writer emits it, compact and
/// unescaped, at its start (then `,` or `}`) or end (after `,` or `{`). The parsed members
/// already put them there, and the hash covers the bytes anyway; this keeps one spelling
/// per record, the one [`stated_seq`] reads.
fn compact(body: &str, seq: u64, prev: &str) -> bool {
    let chain = format!("\"seq\":{seq},\"prev\":\"{prev}\"");
    let first = body.strip_prefix('{').and_then(|rest| rest.strip_prefix(&chain));
    let last = body.strip_suffix('}').and_then(|rest| rest.strip_suffix(&chain));
    first.is_some_and(|rest| rest.starts_with([',', '}']))
        || last.is_some_and(|rest| rest.ends_with([',', '{']))
}

/// The `seq` a line states, read leniently, to name a record that is broken in other ways
/// (truncated, edited, malformed further on): the digits after its start `{"seq":` (old
/// layout), else those of the last `,"seq":N,"prev":"` (new layout; searched from the end,
/// where the chain members are, so that a nested `seq` earlier on is passed over).
fn stated_seq(line: &[u8]) -> Option<u64> {
    if let Some(rest) = line.strip_prefix(OLD_START) {
        return leading_number(rest).map(|(seq, _)| seq);
    }
    (0..line.len()).rev().find_map(|at| {
        let (seq, rest) = leading_number(line[at..].strip_prefix(NEW_SEQ)?)?;
        rest.starts_with(PREV_START).then_some(seq)
    })
}

/// The decimal number `bytes` begin with, and the bytes after it.
fn leading_number(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let n = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    let number = std::str::from_utf8(&bytes[..n]).ok()?.parse().ok()?;
    Some((number, &bytes[n..]))
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

    /// Builds a record's line and hash from its seq, prev and extra members.
    type Layout = fn(u64, &str, &str) -> (String, String);

    /// The other members of a test record, `extra` appended.
    fn members(seq: u64, extra: &str) -> String {
        format!(
            "\"time\":\"2026-11-23T15:48:55.{:03}Z\",\"tenant\":\"acme\",\"event\":\"wrap\",\
             \"key\":\"billing\",\"version\":1,\"outcome\":\"ok\"{extra}",
            seq % 1000
        )
    }

    /// A record as the spec describes it now, built independently of the verifier's
    /// parsing: `seq` and `prev` last in the body, an object without `hash`, and the line
    /// the body with `hash` appended.
    fn record(seq: u64, prev: &str, extra: &str) -> (String, String) {
        line(&format!("{{{},\"seq\":{seq},\"prev\":\"{prev}\"}}", members(seq, extra)))
    }

    /// A record as builds before 2026-11-24 wrote it: `seq` and `prev` first.
    fn old_record(seq: u64, prev: &str, extra: &str) -> (String, String) {
        line(&format!("{{\"seq\":{seq},\"prev\":\"{prev}\",{}}}", members(seq, extra)))
    }

    /// The line (with its `\n`) and hash of a body.
    fn line(body: &str) -> (String, String) {
        let hash = hex(&Sha256::digest(body.as_bytes()));
        (format!("{},\"hash\":\"{hash}\"}}\n", &body[..body.len() - 1]), hash)
    }

    /// Lines for seqs `first..first + n` in the layout of `make`, chained after `prev`
    /// (`None`: zeros when `first` is 1, else an arbitrary, unverifiable hash).
    fn chain_of(make: Layout, first: u64, n: u64, prev: Option<&str>) -> Vec<String> {
        let genesis = if first == 1 { GENESIS_PREV.to_owned() } else { "ab".repeat(32) };
        let mut prev = prev.map_or(genesis, str::to_owned);
        (first..first + n)
            .map(|seq| {
                let (line, hash) = make(seq, &prev, "");
                prev = hash;
                line
            })
            .collect()
    }

    /// New-layout lines for seqs `first..first + n`, chained.
    fn chain(first: u64, n: u64) -> Vec<String> {
        chain_of(record, first, n, None)
    }

    /// Seqs 1..=10 across an upgrade: `old` old-layout records, then new-layout ones.
    fn mixed(old: u64) -> Vec<String> {
        let mut lines = chain_of(old_record, 1, old, None);
        let prev = lines.last().map(|line| stated_hash(line));
        lines.extend(chain_of(record, old + 1, 10 - old, prev.as_deref()));
        lines
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

        /// Two days of a new-layout chain: seqs 1..=5 in the first file, 6..=10 in the
        /// second, with `edit` applied to the lines of each (file index 0 or 1) before writing.
        fn two_days(&self, edit: impl Fn(usize, &mut Vec<String>)) -> Vec<PathBuf> {
            self.split(chain(1, 10), edit)
        }

        /// [`Dir::two_days`] of any 10 lines.
        fn split(&self, lines: Vec<String>, edit: impl Fn(usize, &mut Vec<String>)) -> Vec<PathBuf> {
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
        match verify_files_g(paths) {
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
        // The hashes were computed outside this code: printf '%s' BODY | sha256sum.
        let line = format!(
            "{{\"event\":\"hello\",\"outcome\":\"ok\",\"seq\":1,\"prev\":\"{GENESIS_PREV}\",\
             \"hash\":\"57dab98d8dcf744556009d7f8032bf799b6c1595263dea324896ae4094104fd3\"}}\n"
        );
        let dir = Dir::new();
        let path = dir.write("new.jsonl", &line);
        let summary = verify_files_g(&[path]).unwrap();
        assert_eq!(
            summary.head.as_deref(),
            Some("57dab98d8dcf744556009d7f8032bf799b6c1595263dea324896ae4094104fd3")
        );
        // The old layout, seq and prev first.
        let line = format!(
            "{{\"seq\":1,\"prev\":\"{GENESIS_PREV}\",\"event\":\"hello\",\"outcome\":\"ok\",\
             \"hash\":\"341da382c839d70836d5542b26de1971118d2eeb3b9b53ed2dd8f4bb92fd72bc\"}}\n"
        );
        let path = dir.write("a.jsonl", &line);
        let summary = verify_files_g(&[path]).unwrap();
        assert_eq!(
            summary.head.as_deref(),
            Some("341da382c839d70836d5542b26de1971118d2eeb3b9b53ed2dd8f4bb92fd72bc")
        );
        // The test helpers build what the spec describes.
        let (line, _) = record(1, GENESIS_PREV, "");
        assert!(line.starts_with("{\"time\":"), "{line}");
        assert!(
            line.contains(&format!(",\"outcome\":\"ok\",\"seq\":1,\"prev\":\"{GENESIS_PREV}\",\"hash\":"))
        );
        let (line, _) = old_record(1, GENESIS_PREV, "");
        assert!(line.starts_with(&format!("{{\"seq\":1,\"prev\":\"{GENESIS_PREV}\",\"time\":")), "{line}");
        // The minimal record, in both layouts at once: nothing but seq and prev before hash.
        let body = format!("{{\"seq\":1,\"prev\":\"{GENESIS_PREV}\"}}");
        let hash = hex(&Sha256::digest(body.as_bytes()));
        let path = dir.write("b.jsonl", format!("{},\"hash\":\"{hash}\"}}\n", &body[..body.len() - 1]));
        assert_eq!(verify_files_g(&[path]).unwrap().records, 1);
    }

    #[test]
    fn a_valid_chain_across_files_verifies() {
        let dir = Dir::new();
        let paths = dir.two_days(|_, _| {});
        let summary = verify_files_g(&paths).unwrap();
        let expected_head = stated_hash(&chain(1, 10)[9]);
        assert_eq!(
            summary,
            Summary {
                records: 10,
                files: 2,
                first_seq: Some(1),
                last_seq: Some(10),
                head: Some(expected_head),
                checkpoints: 0,
                checkpoints_checked: false,
                unanchored: 10,
            }
        );
    }

    /// Verifies from the genesis record.
    fn verify_files_g(paths: &[PathBuf]) -> Result<Summary, VerifyError> {
        verify_files(paths, &Start::Genesis)
    }

    /// Cutting the first records (or a whole first day) off a trail leaves a chain that is
    /// whole from there on: only requiring the genesis record shows the cut.
    #[test]
    fn a_chain_without_its_first_records_is_refused_unless_told_where_it_starts() {
        let dir = Dir::new();
        let lines = chain(1, 10);
        let days = dir.split(lines.clone(), |_, _| {});
        assert_broken(
            &days[1..],
            0,
            1,
            Some(6),
            "expected seq 1, found 6: the trail's first records are missing (seq 1 to 5)",
        );
        let cut = dir.write("cut.jsonl", lines[2..].concat());
        assert_broken(std::slice::from_ref(&cut), 0, 1, Some(3), "--from SEQ:HASH");

        // The first day verified on its own says where the second starts.
        let first = verify_files_g(&days[..1]).unwrap();
        let from: Start = first.last().unwrap().parse().unwrap();
        assert_eq!(from, Start::After { seq: 5, hash: stated_hash(&lines[4]) });
        let s = verify_files(&days[1..], &from).unwrap();
        assert_eq!((s.records, s.first_seq, s.last_seq), (5, Some(6), Some(10)));
        assert_eq!(s.last(), verify_files_g(&days).unwrap().last());

        // A start that is not the record before: a gap, a repeat, or another hash.
        for (seq, hash, problem) in [
            (
                4,
                stated_hash(&lines[3]),
                "expected seq 5 (the record after --from 4:…), found 6: records are missing",
            ),
            (
                6,
                stated_hash(&lines[5]),
                "expected seq 7 (the record after --from 6:…), found 6: records are duplicated",
            ),
            (5, "ab".repeat(32), "does not chain to --from"),
        ] {
            match verify_files(&days[1..], &Start::After { seq, hash }) {
                Err(VerifyError::Broken(b)) => {
                    assert_eq!((&b.file, b.line, b.seq), (&days[1], 1, Some(6)), "{b}");
                    assert!(b.problem.contains(problem), "expected {problem:?} in {b}");
                }
                other => panic!("expected a broken chain, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_start_is_seq_colon_hash() {
        let hash = "ab".repeat(32);
        assert_eq!(format!("40:{hash}").parse(), Ok(Start::After { seq: 40, hash: hash.clone() }));
        for bad in [
            hash.clone(),
            format!("0:{hash}"),
            format!("x:{hash}"),
            format!("40:{}", "AB".repeat(32)),
            "40:abc".into(),
        ] {
            let e = bad.parse::<Start>().unwrap_err();
            assert!(e.to_string().contains("SEQ:HASH"), "{e}");
        }
    }

    #[test]
    fn empty_files_are_allowed() {
        let dir = Dir::new();
        let empty = dir.write("empty.jsonl", "");
        let s = verify_files_g(&[empty.clone(), empty.clone()]).unwrap();
        let none = Summary {
            records: 0,
            files: 2,
            first_seq: None,
            last_seq: None,
            head: None,
            checkpoints: 0,
            checkpoints_checked: false,
            unanchored: 0,
        };
        assert_eq!(s, none);
        let full = dir.write("full.jsonl", chain(1, 3).concat());
        let s = verify_files_g(&[empty.clone(), full, empty]).unwrap();
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
        // The later file does not start the trail.
        assert_broken(&paths, 0, 1, Some(6), "expected seq 1, found 6");
        // And given where it starts, the earlier one cannot follow it.
        let from = Start::After { seq: 5, hash: stated_hash(&chain(1, 10)[4]) };
        match verify_files(&paths, &from) {
            Err(VerifyError::Broken(b)) => {
                assert_eq!((&b.file, b.line, b.seq), (&paths[1], 1, Some(1)), "{b}");
                assert!(
                    b.problem.contains("expected seq 11, found 1: records are duplicated or reordered"),
                    "{b}"
                );
            }
            other => panic!("expected a broken chain, got {other:?}"),
        }
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
        // Cut inside its hash: seq and prev are still there to name it.
        let paths = dir.two_days(|i, day| {
            if i == 1 {
                let cut = day[4].len() - 20;
                day[4].truncate(cut);
            }
        });
        assert_broken(&paths, 1, 5, Some(10), "truncated: incomplete last record");

        // Cut before seq (near the end in the new layout): the record cannot be named.
        let paths = dir.two_days(|i, day| {
            if i == 1 {
                let cut = day[4].find(",\"seq\":").unwrap();
                day[4].truncate(cut);
            }
        });
        assert_broken(&paths, 1, 5, None, "truncated: incomplete last record");

        // Only the newline missing is a truncation too; so is a cut inside `seq`, whose
        // digits are not taken for the record's (they may be the start of a longer number).
        let paths = dir.two_days(|i, day| {
            if i == 1 {
                day[4].pop();
            }
        });
        assert_broken(&paths, 1, 5, Some(10), "truncated");
        let paths = dir.two_days(|i, day| {
            if i == 1 {
                let cut = day[4].find(",\"seq\":1").unwrap() + 8;
                day[4].truncate(cut);
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
                let cut = day[4].len() - 30;
                day[4].truncate(cut);
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
        assert_broken(&[path], 0, 1, None, LAYOUTS);

        let spaced = format!("{{\"seq\": 1,\"prev\":\"{GENESIS_PREV}\"}}");
        let path = dir.write("s.jsonl", hashed(spaced.as_bytes()));
        assert_broken(&[path], 0, 1, None, "not written as compact JSON");

        let dup = format!("{{\"seq\":1,\"prev\":\"{GENESIS_PREV}\",\"seq\":2}}");
        let path = dir.write("d.jsonl", hashed(dup.as_bytes()));
        assert_broken(&[path], 0, 1, Some(1), "duplicate top-level member \"seq\"");

        let zero = format!("{{\"seq\":0,\"prev\":\"{GENESIS_PREV}\"}}");
        let path = dir.write("z.jsonl", hashed(zero.as_bytes()));
        assert_broken(&[path], 0, 1, Some(0), "seq 0");
    }

    #[test]
    fn an_old_layout_chain_still_verifies() {
        let dir = Dir::new();
        let lines = chain_of(old_record, 1, 10, None);
        let head = stated_hash(&lines[9]);
        let s = verify_files_g(&dir.split(lines, |_, _| {})).unwrap();
        assert_eq!((s.records, s.first_seq, s.last_seq, s.head), (10, Some(1), Some(10), Some(head)));
    }

    #[test]
    fn a_mixed_chain_across_an_upgrade_verifies() {
        let dir = Dir::new();
        // Upgraded between the two days (after seq 5), and within either.
        for old in [5, 1, 3, 7, 9] {
            let lines = mixed(old);
            let at = usize::try_from(old).unwrap();
            assert!(lines[at - 1].starts_with("{\"seq\":") && lines[at].starts_with("{\"time\":"));
            let head = stated_hash(&lines[9]);
            let s = verify_files_g(&dir.split(lines, |_, _| {})).unwrap();
            assert_eq!(
                (s.records, s.last_seq, s.head),
                (10, Some(10), Some(head)),
                "upgraded after seq {old}"
            );
        }
    }

    #[test]
    fn tampering_across_an_upgrade_is_detected() {
        let dir = Dir::new();
        // Seqs 1..=3 in the old layout, 4..=10 in the new; the first day holds 1..=5.
        let tamper = |edit: fn(&mut Vec<String>)| {
            dir.split(mixed(3), |i, day| {
                if i == 0 {
                    edit(day);
                }
            })
        };
        let paths = tamper(|day| day[2] = day[2].replace("billing", "payroll"));
        assert_broken(&paths, 0, 3, Some(3), "edited");
        let paths = tamper(|day| day[3] = day[3].replace("billing", "payroll"));
        assert_broken(&paths, 0, 4, Some(4), "edited");
        let paths = tamper(|day| drop(day.remove(3)));
        assert_broken(&paths, 0, 4, Some(5), "expected seq 4, found 5: records are missing");
        let paths = tamper(|day| day.swap(2, 3));
        assert_broken(&paths, 0, 3, Some(4), "expected seq 3, found 4");
        // The layout is covered by the hash: the same record rewritten in the new layout
        // (and rehashed) no longer chains to the next.
        let paths = tamper(|day| day[2] = record(3, &stated_hash(&day[1]), "").0);
        assert_broken(&paths, 0, 4, Some(4), "does not chain to the record before it");
    }

    #[test]
    fn old_layout_tampering_is_detected() {
        let dir = Dir::new();
        let tamper = |file: usize, edit: fn(&mut Vec<String>)| {
            dir.split(chain_of(old_record, 1, 10, None), |i, day| {
                if i == file {
                    edit(day);
                }
            })
        };
        let paths = tamper(0, |day| day[2] = day[2].replace("billing", "payroll"));
        assert_broken(&paths, 0, 3, Some(3), "edited: its hash does not match its contents");
        let paths = tamper(0, |day| drop(day.remove(2)));
        assert_broken(&paths, 0, 3, Some(4), "expected seq 3, found 4: records are missing");
        let paths = tamper(0, |day| day.swap(1, 2));
        assert_broken(&paths, 0, 2, Some(3), "expected seq 2, found 3");
        // Cut in half: the old layout still states its seq at the start.
        let paths = tamper(1, |day| {
            let cut = day[4].len() / 2;
            day[4].truncate(cut);
        });
        assert_broken(&paths, 1, 5, Some(10), "truncated: incomplete last record");
    }

    /// Members nesting keys named like the chain's: `seq` in `meta.fields`, and deeper a
    /// `,"seq":99,"prev":"…"` that reads like the new layout's chain members.
    fn nested() -> String {
        format!(
            ",\"meta\":{{\"fields\":{{\"seq\":\"x\",\"n\":{{\"a\":1,\"seq\":99,\"prev\":\"{}\"}}}}}}",
            "cd".repeat(32)
        )
    }

    #[test]
    fn a_nested_seq_is_not_a_chain_member() {
        let dir = Dir::new();
        let mut prev = GENESIS_PREV.to_owned();
        let lines: Vec<String> = (1..=4)
            .map(|seq| {
                let make: Layout = if seq <= 2 { old_record } else { record };
                let (line, hash) = make(seq, &prev, &nested());
                prev = hash;
                line
            })
            .collect();
        let path = dir.write("a.jsonl", lines.concat());
        assert_eq!(verify_files_g(&[path]).unwrap().last_seq, Some(4));
        // A broken record is named by its own seq, in either layout, not the nested one.
        for at in [1, 3] {
            let mut edited = lines.clone();
            edited[at] = edited[at].replace("billing", "payroll");
            let path = dir.write("b.jsonl", edited.concat());
            assert_broken(&[path], 0, at as u64 + 1, Some(at as u64 + 1), "edited");
        }
    }

    #[test]
    fn stated_seq_reads_either_layout() {
        assert_eq!(stated_seq(record(42, GENESIS_PREV, &nested()).0.as_bytes()), Some(42));
        assert_eq!(stated_seq(old_record(42, GENESIS_PREV, &nested()).0.as_bytes()), Some(42));
        let new = record(42, GENESIS_PREV, "").0;
        assert_eq!(stated_seq(&new.as_bytes()[..new.len() - 80]), Some(42), "cut inside prev");
        assert_eq!(stated_seq(b"{\"seq\":7"), Some(7));
        assert_eq!(stated_seq(b"{\"time\":\"a\",\"seq\":7"), None);
        assert_eq!(stated_seq(b"{\"time\":\"a\",\"seq\":,\"prev\":\""), None);
        assert_eq!(stated_seq(b""), None);
    }

    #[test]
    fn duplicate_top_level_members_are_malformed() {
        let dir = Dir::new();
        let chain1 = format!("\"seq\":1,\"prev\":\"{GENESIS_PREV}\"");
        let cases = [
            (format!("{{\"seq\":2,\"time\":\"a\",{chain1}}}"), "\"seq\""),
            (format!("{{\"time\":\"a\",\"time\":\"b\",{chain1}}}"), "\"time\""),
            (format!("{{\"time\":\"a\",\"meta\":{{}},\"time\":\"a\",{chain1}}}"), "\"time\""),
            (format!("{{{chain1},\"time\":\"a\",\"time\":\"b\"}}"), "\"time\""),
            (format!("{{{chain1},\"x\":1,\"prev\":\"{GENESIS_PREV}\"}}"), "\"prev\""),
            (format!("{{{chain1},\"time\":\"a\",{chain1}}}"), "\"seq\""),
            // The line's own hash is a member too.
            (format!("{{\"hash\":\"{GENESIS_PREV}\",{chain1}}}"), "\"hash\""),
        ];
        for (body, name) in cases {
            let path = dir.write("d.jsonl", line(&body).0);
            let b = broken(&[path]);
            assert_eq!(b.problem, format!("malformed: duplicate top-level member {name}"), "{body}");
        }
    }

    #[test]
    fn seq_and_prev_elsewhere_are_malformed() {
        let dir = Dir::new();
        let prev = format!("\"prev\":\"{GENESIS_PREV}\"");
        let bodies = [
            format!("{{\"time\":\"a\",\"seq\":1,{prev},\"outcome\":\"ok\"}}"),
            format!("{{\"time\":\"a\",\"seq\":1,\"outcome\":\"ok\",{prev}}}"),
            format!("{{\"seq\":1,\"time\":\"a\",{prev}}}"),
            format!("{{{prev},\"time\":\"a\",\"seq\":1}}"),
            format!("{{\"time\":\"a\",{prev},\"seq\":1}}"),
            "{\"time\":\"a\",\"seq\":1}".to_owned(),
            "{\"time\":\"a\"}".to_owned(),
            "{}".to_owned(),
        ];
        for body in bodies {
            let path = dir.write("p.jsonl", line(&body).0);
            assert_eq!(broken(&[path]).problem, LAYOUTS, "{body}");
        }
        assert!(LAYOUTS.contains("first two members") && LAYOUTS.contains("the two before hash"));
    }

    #[test]
    fn chain_member_values_are_checked() {
        let dir = Dir::new();
        let zeros = GENESIS_PREV;
        let upper = "AB".repeat(32);
        let cases = [
            (
                format!("{{\"time\":\"a\",\"seq\":\"1\",\"prev\":\"{zeros}\"}}"),
                "seq \"1\" is not a non-negative integer",
            ),
            (format!("{{\"time\":\"a\",\"seq\":-1,\"prev\":\"{zeros}\"}}"), "seq -1 is not"),
            (format!("{{\"time\":\"a\",\"seq\":1.0,\"prev\":\"{zeros}\"}}"), "seq 1.0 is not"),
            (format!("{{\"time\":\"a\",\"seq\":1,\"prev\":\"{upper}\"}}"), "is not 64 lowercase hex digits"),
            ("{\"time\":\"a\",\"seq\":1,\"prev\":\"abc\"}".to_owned(), "prev \"abc\" is not 64"),
            ("{\"time\":\"a\",\"seq\":1,\"prev\":0}".to_owned(), "prev 0 is not 64"),
            // Not as the writer spells them: spaces, escapes.
            (format!("{{\"time\":\"a\",\"seq\":1, \"prev\":\"{zeros}\"}}"), "not written as compact JSON"),
            (format!("{{\"time\":\"a\",\"seq\":1,\"prev\":\"{zeros}\" }}"), "not written as compact JSON"),
            (
                format!("{{\"time\":\"a\",\"s\\u0065q\":1,\"prev\":\"{zeros}\"}}"),
                "not written as compact JSON",
            ),
            (
                format!("{{\"time\":\"a\",\"seq\":1,\"prev\":\"\\u0030{}\"}}", &zeros[1..]),
                "not written as compact",
            ),
            (
                format!("{{\"time\":\"a\",\"seq\":0,\"prev\":\"{zeros}\"}}"),
                "seq 0 (the first record is seq 1)",
            ),
        ];
        for (body, problem) in cases {
            let path = dir.write("v.jsonl", line(&body).0);
            let b = broken(&[path]);
            assert!(b.problem.contains(problem), "expected {problem:?} for {body}, got {b}");
        }
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
        match verify_files_g(&[good, missing.clone()]) {
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

    #[test]
    fn day_files_are_the_dated_files_oldest_first() {
        let dir = Dir::new();
        for name in ["2026-11-24.jsonl", "2026-11-23.jsonl", "notes.txt", "2026-11-2x.jsonl", "x.jsonl"] {
            dir.write(name, "");
        }
        let found = day_files(dir.0.path()).unwrap();
        assert_eq!(found, [dir.0.path().join("2026-11-23.jsonl"), dir.0.path().join("2026-11-24.jsonl")]);
        std::os::unix::fs::symlink("/etc/passwd", dir.0.path().join("2026-11-25.jsonl")).unwrap();
        assert_eq!(day_files(dir.0.path()).unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    /// HMAC-SHA256 (RFC 2104) from SHA-256, for the tests: this crate computes no MAC.
    fn hmac_sha256(key: &[u8; 32], message: &[u8]) -> [u8; 32] {
        let mut block = [0u8; 64];
        block[..32].copy_from_slice(key);
        let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
        let inner = Sha256::new().chain_update(pad(0x36)).chain_update(message).finalize();
        Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize().into()
    }

    struct Key([u8; 32]);

    impl MacCheck for Key {
        fn matches(&self, input: &[u8], mac: &[u8; 32]) -> bool {
            hmac_sha256(&self.0, input) == *mac
        }
    }

    /// A checkpoint record at `seq` after `prev`, naming (`named_seq`, `named_hash`) with the
    /// MAC under `key`.
    fn checkpoint(
        seq: u64,
        prev: &str,
        named_seq: u64,
        named_hash: &str,
        key: &[u8; 32],
    ) -> (String, String) {
        let mac = hmac_sha256(key, &checkpoint_mac_input("acme", named_seq, &unhex(named_hash)));
        line(&format!(
            "{{\"time\":\"2026-11-23T15:49:00.000Z\",\"tenant\":\"acme\",\"event\":\"checkpoint\",\
             \"outcome\":\"ok\",\"detail\":{{\"hash\":\"{named_hash}\",\"mac\":\"{}\",\"seq\":{named_seq}}},\
             \"seq\":{seq},\"prev\":\"{prev}\"}}",
            hex(&mac)
        ))
    }

    /// Seqs 1..=6: three records, a checkpoint naming seq 3 under `key`, two records.
    fn anchored_chain(key: &[u8; 32]) -> Vec<String> {
        let mut lines = chain(1, 3);
        let third = stated_hash(&lines[2]);
        let (cp, cp_hash) = checkpoint(4, &third, 3, &third, key);
        lines.push(cp);
        lines.extend(chain_of(record, 5, 2, Some(&cp_hash)));
        lines
    }

    const KEY: [u8; 32] = [7; 32];

    fn anchored(paths: &[PathBuf], key: &[u8; 32]) -> Result<Summary, VerifyError> {
        let key = Key(*key);
        verify_files_anchored(paths, &Start::Genesis, Some(&Anchors { tenant: "acme", mac: &key }))
    }

    /// The worked example of docs/FORMATS.md §5 ("Checkpoints"), computed outside this code
    /// (python3's hmac).
    #[test]
    fn the_checkpoint_mac_input_is_the_documented_one() {
        let input = checkpoint_mac_input("acme", 41, &[0xab; 32]);
        assert_eq!(
            hex(&input),
            format!(
                "6b656b642f61756469742d636865636b706f696e742f7631000461636d650000000000000029{}",
                "ab".repeat(32)
            )
        );
        assert_eq!(
            hex(&hmac_sha256(&KEY, &input)),
            "0208ba88c44305e1e5a9c5d9dbccbf9db36f843475edc96ddf181ff49ce6d273"
        );
    }

    #[test]
    fn checkpoints_are_counted_and_with_the_key_checked() {
        let dir = Dir::new();
        let path = dir.write("a.jsonl", anchored_chain(&KEY).concat());
        let plain = verify_files_g(std::slice::from_ref(&path)).unwrap();
        assert_eq!(
            (plain.records, plain.checkpoints, plain.checkpoints_checked, plain.unanchored),
            (6, 1, false, 2)
        );
        let checked = anchored(std::slice::from_ref(&path), &KEY).unwrap();
        assert_eq!((checked.checkpoints, checked.checkpoints_checked, checked.unanchored), (1, true, 2));
        assert_eq!(checked.head, plain.head);

        // Another tenant's key (or a forged MAC).
        let err = anchored(std::slice::from_ref(&path), &[8; 32]).unwrap_err();
        let VerifyError::Broken(b) = err else { panic!("{err}") };
        assert_eq!((b.line, b.seq), (4, Some(4)), "{b}");
        assert!(b.problem.contains("MAC does not match"), "{b}");
        // Without checking, a bad MAC goes unnoticed: that is what --config is for.
        verify_files_g(std::slice::from_ref(&path)).unwrap();

        // Nothing after the last checkpoint; no checkpoint at all.
        let path = dir.write("b.jsonl", anchored_chain(&KEY)[..4].concat());
        assert_eq!(anchored(&[path], &KEY).unwrap().unanchored, 0);
        let path = dir.write("c.jsonl", chain(1, 3).concat());
        let none = anchored(&[path], &KEY).unwrap();
        assert_eq!((none.checkpoints, none.checkpoints_checked, none.unanchored), (0, true, 3));
    }

    #[test]
    fn a_checkpoint_must_name_the_record_right_before_it() {
        let dir = Dir::new();
        let mut lines = chain(1, 3);
        let (second, third) = (stated_hash(&lines[1]), stated_hash(&lines[2]));
        // The right MAC, of the record before the one before it.
        lines.push(checkpoint(4, &third, 2, &second, &KEY).0);
        let path = dir.write("a.jsonl", lines.concat());
        let b = broken_anchored(&path);
        assert_eq!((b.line, b.seq), (4, Some(4)), "{b}");
        assert!(
            b.problem.contains(&format!("names seq 2 with hash {second}, but the record before it is seq 3")),
            "{b}"
        );

        // A trail verified --from the record a checkpoint names.
        let lines = anchored_chain(&KEY);
        let path = dir.write("b.jsonl", lines[3..].concat());
        let key = Key(KEY);
        let from = Start::After { seq: 3, hash: stated_hash(&lines[2]) };
        let s = verify_files_anchored(&[path], &from, Some(&Anchors { tenant: "acme", mac: &key })).unwrap();
        assert_eq!((s.records, s.checkpoints, s.unanchored), (3, 1, 2));

        // A malformed detail.
        let third = stated_hash(&chain(1, 3)[2]);
        let (bad, _) = line(&format!(
            "{{\"event\":\"checkpoint\",\"detail\":{{\"seq\":3,\"hash\":\"{third}\"}},\"seq\":4,\"prev\":\"{third}\"}}"
        ));
        let path = dir.write("c.jsonl", [chain(1, 3).concat(), bad].concat());
        assert!(broken_anchored(&path).problem.contains("checkpoint: malformed"));
    }

    fn broken_anchored(path: &Path) -> Broken {
        match anchored(&[path.to_owned()], &KEY) {
            Err(VerifyError::Broken(b)) => b,
            other => panic!("expected a failed checkpoint, got {other:?}"),
        }
    }

    /// A forger who can write the files rewrites a record and every hash after it: the
    /// chain verifies, the checkpoint after the edit does not.
    #[test]
    fn a_consistently_rewritten_chain_fails_at_the_checkpoint_after_the_edit() {
        let dir = Dir::new();
        let lines = anchored_chain(&KEY);
        let mut forged = chain(1, 1);
        let (edited, second) = record(2, &stated_hash(&forged[0]), ",\"forged\":true");
        let (third, prev) = record(3, &second, "");
        forged.extend([edited, third]);
        // The checkpoint as it was, chained onto the rewritten record 3; then also made to
        // name it: its MAC fails.
        for rename in [false, true] {
            let cp = &lines[3];
            // Up to `,"prev":"`: the line without its newline, hash suffix and prev value.
            let mut members = cp[..cp.len() - 1 - SUFFIX_LEN - HASH_HEX_LEN - 1].to_owned();
            if rename {
                members = members.replace(&stated_hash(&lines[2]), &prev);
            }
            let (cp, _) = line(&format!("{members}{prev}\"}}"));
            let path = dir.write(&format!("forged-{rename}.jsonl"), [forged.concat(), cp].concat());
            verify_files_g(std::slice::from_ref(&path)).unwrap();
            let b = broken_anchored(&path);
            assert_eq!((b.line, b.seq), (4, Some(4)), "{b}");
            assert!(b.problem.contains(if rename { "MAC" } else { "names seq 3" }), "{b}");
        }
    }
}
