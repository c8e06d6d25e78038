//! The audit files of one tenant and the hash chain through them (docs/FORMATS.md §5).
//!
//! Only this module gives records their `seq` and `prev`, and it advances the chain only
//! for records that were written: a failed write is cut back off the file (a torn line
//! would break the chain for every later record), so the chain on disk never has a gap
//! that the chain in memory does not know about.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::Digest;

use super::record::{Records, Unchained};
use crate::config::FsyncPolicy;
use crate::dirfd::{Dir, DirError, EntryKind, Kind};

/// How often the path is checked to still name the open file (a stat): a trail moved away
/// is continued in a new file within this long.
const RECHECK: Duration = Duration::from_millis(200);

/// Disk space reserved ahead of the trail's end, so that appends find their blocks
/// allocated: at the rates of large batches (some 200 MB of records a second) the
/// filesystem's per-block allocation shows in the write time of every batch. Small, as
/// every tenant's open file holds that much reserved until its day ends.
const PREALLOCATE: u64 = 1 << 20;

/// The write buffer kept while the trail is idle; a larger one (a burst's) is freed.
const KEEP_BUFFER: usize = 1 << 20;

/// `,"hash":"` + 64 hex + `"}`.
pub const HASH_SUFFIX_LEN: usize = 75;
const GENESIS: [u8; 32] = [0; 32];

/// Where the chain stands: the last record written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    pub hash: [u8; 32],
}

impl Head {
    const START: Head = Head { seq: 0, hash: GENESIS };
}

/// What the tail of the trail looked like when it was opened.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Bytes of an incomplete last record (a crash mid-write) cut off the file.
    pub dropped_bytes: u64,
    pub file: Option<PathBuf>,
}

/// The file of one day, open for appending.
struct DayFile {
    date: String,
    /// Its name in the writer's directory.
    name: String,
    /// Shared with the interval fsync, which runs outside the writers' lock.
    file: Arc<File>,
    len: u64,
    /// How far the file's blocks are reserved (beyond `len`, without changing its size).
    reserved: u64,
    /// When the path was last checked to still name this file.
    checked: Instant,
    id: (u64, u64),
}

/// Why records were not appended.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The day's file would grow past `audit.max_bytes_per_day`: nothing was written.
    #[error("the records of {date} (UTC) reached audit.max_bytes_per_day ({cap} bytes)")]
    DailyCap { cap: u64, date: String },
}

/// The bytes written on one day, against `audit.max_bytes_per_day`: one tenant's records
/// must not take the disk the others' need. Counted from the day file's length when it
/// is opened (so a restart does not reset it) and carried over when the file is moved
/// away and continued in a new one the same day (so rotation does not reset it either).
#[derive(Debug)]
struct DayBudget {
    cap: u64,
    date: String,
    bytes: u64,
}

impl Default for DayBudget {
    fn default() -> Self {
        Self { cap: u64::MAX, date: String::new(), bytes: 0 }
    }
}

impl DayBudget {
    /// The bytes written on `day`'s date so far.
    fn spent(&self, day: &DayFile) -> u64 {
        if self.date == day.date {
            self.bytes.max(day.len)
        } else {
            day.len
        }
    }
}

pub struct Writer {
    /// The tenant's audit directory, which its `run_as` user can write: every file in it
    /// is reached by descriptor, never through a link (crate::dirfd).
    dir: Dir,
    /// `audit.max_bytes_per_day`, and what today's records took of it.
    budget: DayBudget,
    head: Head,
    /// `head.hash` in hex: the next record's `prev`.
    head_hex: [u8; 64],
    day: Option<DayFile>,
    policy: FsyncPolicy,
    /// Written but not yet fsynced.
    dirty: bool,
    /// The lines of the last write, newline-terminated, one after the other; reused.
    buf: Vec<u8>,
    /// Where each line of `buf` ends.
    ends: Vec<usize>,
}

impl Writer {
    /// Opens the trail in `dir` (one tenant's), continuing the chain from its newest
    /// record. An incomplete last record is cut off and reported. A day file that is a
    /// link, or has other hard links, is refused by name before anything is read or cut.
    pub fn open(dir: Dir, policy: FsyncPolicy) -> io::Result<(Writer, Recovered)> {
        let mut recovered = Recovered::default();
        let mut head = Head::START;
        let mut days = day_files(&dir)?;
        days.sort();
        for name in days.iter().rev() {
            let path = dir.child_path(name);
            let mut f = dir.open_file_rw(name)?;
            let (last, complete_len) = last_line(&mut f)?;
            let len = f.metadata()?.len();
            if complete_len < len {
                f.set_len(complete_len)?;
                f.sync_data()?;
                recovered.dropped_bytes += len - complete_len;
                recovered.file = Some(path.clone());
            }
            if let Some(line) = last {
                head = parse_head(&line).ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}: the last record is not a kekd audit record", path.display()),
                    )
                })?;
                break;
            }
        }
        let w = Writer {
            dir,
            budget: DayBudget::default(),
            head,
            head_hex: to_hex(&head.hash),
            day: None,
            policy,
            dirty: false,
            buf: Vec::new(),
            ends: Vec::new(),
        };
        Ok((w, recovered))
    }

    pub fn head(&self) -> Head {
        self.head
    }

    /// The lines of the last successful write, without their newlines.
    pub fn written(&self) -> impl Iterator<Item = &str> + '_ {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let line = std::str::from_utf8(&self.buf[start..end - 1]).expect("records are UTF-8");
            start = end;
            line
        })
    }

    /// Frees a write buffer a burst made large. For when the trail is idle: a burst's
    /// largest group must not stay in memory for good, but one freed at every write
    /// would cost fresh pages at every write while groups are large. Forgets the lines of
    /// the last write ([`Self::written`]).
    pub fn release_buffer(&mut self) {
        if self.buf.capacity() > KEEP_BUFFER {
            self.buf = Vec::new();
            self.ends = Vec::new();
        }
    }

    /// Holds each day's records to `cap` bytes (`audit.max_bytes_per_day`).
    pub fn set_max_bytes_per_day(&mut self, cap: u64) {
        self.budget.cap = cap;
    }

    /// Chains and writes `records`, all or nothing. In `Record` mode each record is
    /// fsynced on its own; in `Batch` mode once, after the last. Refused, with nothing
    /// written, when the day's records would grow past `audit.max_bytes_per_day`.
    pub fn append(&mut self, records: &[Records]) -> Result<(), AppendError> {
        self.append_within(records, true)
    }

    /// [`Self::append`] past `audit.max_bytes_per_day`: for the one record that says the
    /// day's limit was reached, so that the trail tells why it stops.
    pub fn append_past_cap(&mut self, records: &[Records]) -> Result<(), AppendError> {
        self.append_within(records, false)
    }

    fn append_within(&mut self, records: &[Records], capped: bool) -> Result<(), AppendError> {
        self.buf.clear();
        self.ends.clear();

        let Some(date) = records.iter().map(|r| r.date).max() else {
            return Ok(());
        };
        let date = std::str::from_utf8(&date).unwrap_or("0000-00-00").to_owned();
        // A record stamped just before midnight and queued behind one stamped after it
        // stays in the newer file: files never go back in time.
        let date = match &self.day {
            Some(d) if d.date > date => d.date.clone(),
            _ => date,
        };
        self.ensure_file(&date)?;
        let (mut head, mut head_hex) = (self.head, self.head_hex);
        for record in records.iter().map(Records::unchained) {
            chain_into(&mut self.buf, &mut head, &mut head_hex, &record);
            self.ends.push(self.buf.len());
        }
        let day = self.day.as_mut().expect("opened above");
        let start = day.len;
        let spent = self.budget.spent(day);
        let after = spent.saturating_add(self.buf.len() as u64);
        if capped && after > self.budget.cap {
            self.ends.clear();
            // The day is over for this tenant, smaller records too: its operations fail
            // from here on, not only those whose records no longer fit.
            self.budget.date.clone_from(&day.date);
            self.budget.bytes = u64::MAX;
            return Err(AppendError::DailyCap { cap: self.budget.cap, date: day.date.clone() });
        }
        reserve_ahead(day, start + self.buf.len() as u64);
        let res = match self.policy {
            _ if cfg!(feature = "bench-audit-no-write") => Ok(()),
            FsyncPolicy::Record => write_each(day, &self.buf, &self.ends),
            FsyncPolicy::Batch => (&*day.file).write_all(&self.buf).and_then(|()| day.file.sync_data()),
            FsyncPolicy::Interval => (&*day.file).write_all(&self.buf),
        };
        if let Err(e) = res {
            // Cut a partial write back off, so the next record chains onto a whole line.
            let _ = day.file.set_len(start);
            self.day = None;
            self.ends.clear();
            return Err(e.into());
        }
        if !cfg!(feature = "bench-audit-no-write") {
            day.len = start + self.buf.len() as u64;
        }
        if self.budget.date != day.date {
            self.budget.date.clone_from(&day.date);
        }
        self.budget.bytes = after;
        self.head = head;
        self.head_hex = head_hex;
        self.dirty = self.policy == FsyncPolicy::Interval;
        Ok(())
    }

    /// The file to fsync, if anything was written since the last fsync; the caller fsyncs
    /// it outside the writers' lock.
    pub fn take_dirty(&mut self) -> Option<Arc<File>> {
        if !std::mem::take(&mut self.dirty) {
            return None;
        }
        self.day.as_ref().map(|d| Arc::clone(&d.file))
    }

    /// The last fsync at shutdown.
    pub fn sync(&mut self) -> io::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        if let Some(d) = &self.day {
            d.file.sync_data()?;
        }
        self.dirty = false;
        Ok(())
    }

    /// Makes sure the open file is today's and is still the file at its path: a trail
    /// moved away (log rotation, an operator) is continued in a new file, and a directory
    /// that cannot take one fails the write instead of writing into a file nobody sees.
    fn ensure_file(&mut self, date: &str) -> io::Result<()> {
        if let Some(d) = &mut self.day {
            if d.date == date && d.checked.elapsed() < RECHECK {
                return Ok(());
            }
            let at_path = self.dir.identity(&d.name) == Some(d.id);
            if at_path && d.date == date {
                d.checked = Instant::now();
                return Ok(());
            }
            if self.dirty {
                let _ = d.file.sync_data();
                self.dirty = false;
            }
            // A finished day gives back the blocks reserved past its end (a truncation to
            // its own size does that). Not a file moved away: whoever moved it owns it now,
            // and may have cut or compressed it.
            if at_path {
                let _ = d.file.set_len(d.len);
            }
        }
        self.day = None;
        let name = format!("{date}.jsonl");
        let (file, created) = self.dir.open_append(&name, 0o640)?;
        let meta = file.metadata()?;
        if created {
            // Given to the tenant's user by the directory lent to it (crate::dirfd).
            // The new name must survive a crash as well as the records in it.
            self.dir.sync()?;
        }
        let (len, id) = (meta.len(), (meta.dev(), meta.ino()));
        self.day = Some(DayFile {
            date: date.to_owned(),
            name,
            len,
            reserved: len,
            id,
            file: Arc::new(file),
            checked: Instant::now(),
        });
        Ok(())
    }
}

/// Reserves blocks past the end of `day` for what is about to be written and more, with
/// `FALLOC_FL_KEEP_SIZE`: the file's size, all a reader or a recovery sees, stays that of
/// its records. Advice only: where it fails (a filesystem without fallocate, a full disk)
/// the write allocates as it goes, and it is tried again a chunk later.
fn reserve_ahead(day: &mut DayFile, end: u64) {
    use nix::fcntl::{fallocate, FallocateFlags};
    if end <= day.reserved {
        return;
    }
    let len = PREALLOCATE.max(end - day.len);
    let _ = fallocate(&*day.file, FallocateFlags::FALLOC_FL_KEEP_SIZE, day.len as i64, len as i64);
    day.reserved = day.len + len;
}

fn write_each(day: &mut DayFile, buf: &[u8], ends: &[usize]) -> io::Result<()> {
    let mut start = 0;
    for &end in ends {
        (&*day.file).write_all(&buf[start..end])?;
        day.file.sync_data()?;
        start = end;
    }
    Ok(())
}

/// Lets the kernel drop the trail's pages from the page cache once they are on disk. The
/// daemon never reads them back, and a trail that keeps growing in the cache makes every
/// append take a page the machine has never used: measured on a 2-core VM, appends run at
/// about 0.4 GB/s into fresh pages and 3.5 GB/s into recycled ones. Advice only: a failure
/// costs speed, never a record.
pub fn release_cache(f: &File) {
    use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
    let _ = posix_fadvise(f, 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
}

/// Appends `record` to `out` as the line after `head`, newline-terminated, and advances
/// `head`: its chain members go last, so only they (and what of the record did not fill
/// a whole SHA-256 block) are hashed here, on top of what the request hashed.
fn chain_into(out: &mut Vec<u8>, head: &mut Head, head_hex: &mut [u8; 64], record: &Unchained<'_>) {
    let seq = head.seq + 1;
    let start = out.len();
    out.extend_from_slice(record.body);
    let chain = out.len();
    out.extend_from_slice(b",\"seq\":");
    out.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
    out.extend_from_slice(b",\"prev\":\"");
    out.extend_from_slice(head_hex);
    out.extend_from_slice(b"\"}");
    let mut hasher = record.hashed.clone();
    hasher.update(&out[chain..]);
    let hash: [u8; 32] = hasher.finalize().into();
    debug_assert_eq!(hash, <[u8; 32]>::from(sha2::Sha256::digest(&out[start..])), "hashed ahead as written");
    *head_hex = to_hex(&hash);
    out.pop();
    out.extend_from_slice(b",\"hash\":\"");
    out.extend_from_slice(head_hex);
    out.extend_from_slice(b"\"}\n");
    *head = Head { seq, hash };
}

/// Lowercase hex, without the allocation and per-character pushes of a `String`.
fn to_hex(bytes: &[u8; 32]) -> [u8; 64] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 64];
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
    }
    out
}

/// `seq` and `hash` of a record line; None when it is not one. Lines of either layout
/// (docs/FORMATS.md §5): the chain members last, as written now, or first, as written by
/// earlier builds whose trail this one continues.
fn parse_head(line: &str) -> Option<Head> {
    let body = line.get(..line.len().checked_sub(HASH_SUFFIX_LEN)?)?;
    let suffix = &line[body.len()..];
    let hex_hash = suffix.strip_prefix(",\"hash\":\"")?.strip_suffix("\"}")?;
    let hash = hex::decode(hex_hash).ok()?.try_into().ok()?;
    let seq = match body.strip_prefix("{\"seq\":") {
        Some(rest) => rest[..rest.find(',')?].parse().ok()?,
        None => {
            let rest = body.strip_suffix('"')?;
            let rest = rest.get(..rest.len().checked_sub(64)?)?.strip_suffix(",\"prev\":\"")?;
            rest[rest.rfind(",\"seq\":")? + 7..].parse().ok()?
        }
    };
    Some(Head { seq, hash })
}

/// The names of the day files in `dir`: `YYYY-MM-DD.jsonl`. A link or anything else
/// under such a name is refused, by name: the trail is regular files only.
fn day_files(dir: &Dir) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in dir.entries()? {
        let Some(name) = entry.name.to_str() else { continue };
        let is_day = name.len() == 16
            && name.ends_with(".jsonl")
            && name[..10].bytes().enumerate().all(|(i, b)| {
                if i == 4 || i == 7 {
                    b == b'-'
                } else {
                    b.is_ascii_digit()
                }
            });
        if !is_day {
            continue;
        }
        let path = dir.child_path(name);
        match entry.kind {
            EntryKind::File => out.push(name.to_owned()),
            EntryKind::Symlink => return Err(DirError::Link { path, expected: Kind::File }.into()),
            EntryKind::Directory | EntryKind::Other => {
                return Err(DirError::WrongType { path, expected: Kind::File }.into())
            }
        }
    }
    Ok(out)
}

/// The last complete line of a file (without its newline), and the length of the file up
/// to and including that line's newline. Reads backwards, so a large day file costs a
/// few reads.
fn last_line(f: &mut File) -> io::Result<(Option<String>, u64)> {
    const CHUNK: u64 = 64 * 1024;
    let len = f.metadata()?.len();
    let mut end = len;
    let mut tail: Vec<u8> = Vec::new();
    // Find the last newline: everything after it is an incomplete record.
    let mut complete = None;
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        let mut chunk = vec![0u8; (end - start) as usize];
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&tail);
        tail = chunk;
        let base = start;
        if complete.is_none() {
            if let Some(i) = tail.iter().rposition(|&b| b == b'\n') {
                complete = Some(base + i as u64 + 1);
            }
        }
        if let Some(c) = complete {
            let upto = (c - base) as usize - 1;
            if let Some(j) = tail[..upto].iter().rposition(|&b| b == b'\n') {
                let line = String::from_utf8_lossy(&tail[j + 1..upto]).into_owned();
                return Ok((Some(line), c));
            }
            if start == 0 {
                let line = String::from_utf8_lossy(&tail[..upto]).into_owned();
                return Ok((Some(line), c));
            }
        }
        end = start;
    }
    Ok((None, complete.unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::path::Path;

    use super::*;
    use crate::audit::record::Records;

    fn held(path: &Path) -> Dir {
        Dir::open_configured(path, 0o700).unwrap()
    }

    fn entry(n: usize) -> Records {
        Records::raw("2026-11-23", &format!("{{\"time\":\"2026-11-23T10:00:00.000Z\",\"n\":{n}}}"))
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path).unwrap().lines().map(str::to_owned).collect()
    }

    #[test]
    fn records_chain_by_the_documented_rule() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, rec) = Writer::open(held(dir.path()), FsyncPolicy::Batch).unwrap();
        assert_eq!(rec, Recovered::default());
        w.append(&[entry(1), entry(2)]).unwrap();
        let path = dir.path().join("2026-11-23.jsonl");
        let l = lines(&path);
        assert_eq!(l.len(), 2);
        // Blocks are reserved ahead, but the file is exactly its records.
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len() as usize, l.iter().map(|l| l.len() + 1).sum::<usize>());
        assert!(meta.blocks() * 512 >= PREALLOCATE, "{} blocks reserved", meta.blocks());
        let mut prev = "0".repeat(64);
        for (i, line) in l.iter().enumerate() {
            // The body is the line without its hash member; its SHA-256 is that member.
            let (body, hash) = line.split_at(line.len() - HASH_SUFFIX_LEN);
            let body = format!("{body}}}");
            let digest = hex::encode(sha2::Sha256::digest(body.as_bytes()));
            assert_eq!(hash, format!(",\"hash\":\"{digest}\"}}"));
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["seq"], i as u64 + 1);
            assert_eq!(v["prev"], prev.as_str());
            assert_eq!(v["n"], i as u64 + 1);
            let chain = format!(",\"seq\":{},\"prev\":\"{prev}\",\"hash\":\"{digest}\"}}", i + 1);
            assert!(line.ends_with(&chain), "the chain members come last: {line}");
            prev = digest;
        }
    }

    #[test]
    fn the_chain_continues_across_reopens_and_days_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = Writer::open(held(dir.path()), FsyncPolicy::Interval).unwrap();
        w.append(&[entry(1)]).unwrap();
        w.sync().unwrap();
        let head = w.head();
        drop(w);
        let day1 = dir.path().join("2026-11-23.jsonl");
        let mut f = OpenOptions::new().append(true).open(&day1).unwrap();
        f.write_all(b"{\"seq\":2,\"prev\":\"ab").unwrap();
        let (mut w, rec) = Writer::open(held(dir.path()), FsyncPolicy::Record).unwrap();
        assert_eq!(rec.dropped_bytes, 19);
        assert_eq!(w.head(), head);
        assert_eq!(lines(&day1).len(), 1);
        let next = Records::raw("2026-11-24", "{\"time\":\"2026-11-24T00:00:00.000Z\",\"n\":2}");
        w.append(&[next]).unwrap();
        let day2 = lines(&dir.path().join("2026-11-24.jsonl"));
        let v: serde_json::Value = serde_json::from_str(&day2[0]).unwrap();
        assert_eq!(v["seq"], 2);
        assert_eq!(v["prev"], hex::encode(head.hash));
        // Once a day has begun, a late record of the day before goes into the new file.
        w.append(&[entry(3)]).unwrap();
        assert_eq!(lines(&dir.path().join("2026-11-24.jsonl")).len(), 2);
        // An empty newest file (created, then a crash): the head is in the one before.
        drop(w);
        File::create(dir.path().join("2026-11-25.jsonl")).unwrap();
        let (w, _) = Writer::open(held(dir.path()), FsyncPolicy::Batch).unwrap();
        assert_eq!(w.head().seq, 3);
    }

    #[test]
    fn a_trail_of_the_earlier_layout_is_continued() {
        let dir = tempfile::tempdir().unwrap();
        // Written by a build that put the chain members first.
        let body =
            format!("{{\"seq\":41,\"prev\":\"{}\",\"time\":\"2026-11-23T10:00:00.000Z\"}}", "ab".repeat(32));
        let hash = hex::encode(sha2::Sha256::digest(body.as_bytes()));
        let old = format!("{},\"hash\":\"{hash}\"}}\n", &body[..body.len() - 1]);
        std::fs::write(dir.path().join("2026-11-23.jsonl"), &old).unwrap();
        let (mut w, _) = Writer::open(held(dir.path()), FsyncPolicy::Batch).unwrap();
        assert_eq!((w.head().seq, hex::encode(w.head().hash)), (41, hash.clone()));
        w.append(&[entry(42)]).unwrap();
        drop(w);
        let (w, _) = Writer::open(held(dir.path()), FsyncPolicy::Batch).unwrap();
        assert_eq!(w.head().seq, 42, "and a trail of the current layout too");
        let l = lines(&dir.path().join("2026-11-23.jsonl"));
        let v: serde_json::Value = serde_json::from_str(&l[1]).unwrap();
        assert_eq!((v["seq"].as_u64(), v["prev"].as_str()), (Some(42), Some(hash.as_str())));
    }

    #[test]
    fn a_finished_day_gives_back_its_reserved_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = Writer::open(held(dir.path()), FsyncPolicy::Batch).unwrap();
        w.append(&[entry(1)]).unwrap();
        let day1 = dir.path().join("2026-11-23.jsonl");
        let reserved = |p: &Path| std::fs::metadata(p).unwrap().blocks() * 512;
        assert!(reserved(&day1) >= PREALLOCATE, "{} bytes reserved", reserved(&day1));
        let next = Records::raw("2026-11-24", "{\"time\":\"2026-11-24T00:00:00.000Z\",\"n\":2}");
        w.append(&[next]).unwrap();
        assert!(reserved(&day1) < PREALLOCATE, "the finished day keeps {} bytes", reserved(&day1));
        assert_eq!(lines(&day1).len(), 1);
    }

    #[test]
    fn a_moved_file_is_continued_in_a_new_one_and_a_failed_write_keeps_the_chain() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = Writer::open(held(dir.path()), FsyncPolicy::Batch).unwrap();
        w.append(&[entry(1)]).unwrap();
        let day = dir.path().join("2026-11-23.jsonl");
        std::fs::rename(&day, dir.path().join("rotated")).unwrap();
        std::thread::sleep(RECHECK);
        w.append(&[entry(2)]).unwrap();
        assert_eq!(lines(&day).len(), 1, "a new file at the path");
        let head = w.head();
        assert_eq!(head.seq, 2);
        // A failed write (here: no file can be created) leaves the chain where it was.
        std::fs::rename(&day, dir.path().join("rotated2")).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o500)).unwrap();
        std::thread::sleep(RECHECK);
        let failed = w.append(&[entry(3)]);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        if nix::unistd::geteuid().is_root() {
            // Root writes anyway; the write-failure path is covered end to end, as a user.
            assert!(failed.is_ok());
            return;
        }
        assert!(failed.is_err());
        assert_eq!(w.head(), head);
        w.append(&[entry(3)]).unwrap();
        assert_eq!(w.head().seq, 3);
    }

    /// `audit.max_bytes_per_day`: a write that would cross it is refused whole, the chain
    /// stays where it was, a restart counts what the day's file holds, and the next day
    /// starts afresh.
    #[test]
    fn a_day_is_held_to_its_byte_budget_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let day = dir.path().join("2026-11-23.jsonl");
        let (mut w, _) = Writer::open(held(dir.path()), FsyncPolicy::Interval).unwrap();
        w.append(&[entry(1)]).unwrap();
        let one = std::fs::metadata(&day).unwrap().len();
        // Room for three records of this size, not four.
        w.set_max_bytes_per_day(3 * one + one / 2);
        w.append(&[entry(2), entry(3)]).unwrap();
        let head = w.head();
        match w.append(&[entry(4)]) {
            Err(AppendError::DailyCap { cap, date }) => {
                assert_eq!((cap, date.as_str()), (3 * one + one / 2, "2026-11-23"));
            }
            other => panic!("expected the daily cap, got {other:?}"),
        }
        assert_eq!(w.head(), head, "nothing was chained");
        assert_eq!(lines(&day).len(), 3, "nothing was written");
        assert_eq!(w.written().count(), 0);
        // Smaller records too, once the day's budget ran out.
        let small = Records::raw("2026-11-23", "{}");
        assert!(matches!(w.append(&[small]), Err(AppendError::DailyCap { .. })));
        // The one record that says the cap was reached goes past it.
        w.append_past_cap(&[entry(4)]).unwrap();
        assert_eq!(lines(&day).len(), 4);
        drop(w);

        let (mut w, _) = Writer::open(held(dir.path()), FsyncPolicy::Interval).unwrap();
        w.set_max_bytes_per_day(4 * one + one / 2);
        assert!(
            matches!(w.append(&[entry(5)]), Err(AppendError::DailyCap { .. })),
            "a restart counts the file"
        );
        let next = Records::raw("2026-11-24", "{\"time\":\"2026-11-24T00:00:00.000Z\",\"n\":5}");
        w.append(&[next]).unwrap();
        assert_eq!(w.head().seq, 5, "the next day has a budget of its own");
    }

    #[test]
    fn the_last_line_is_found_across_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let long = "x".repeat(100_000);
        std::fs::write(&path, format!("a\n{long}\nb")).unwrap();
        let mut f = File::open(&path).unwrap();
        let (line, len) = last_line(&mut f).unwrap();
        assert_eq!(line.as_deref(), Some(long.as_str()));
        assert_eq!(len, 100_003);
        std::fs::write(&path, "only\n").unwrap();
        let (line, len) = last_line(&mut File::open(&path).unwrap()).unwrap();
        assert_eq!((line.as_deref(), len), (Some("only"), 5));
        std::fs::write(&path, "torn").unwrap();
        assert_eq!(last_line(&mut File::open(&path).unwrap()).unwrap(), (None, 0));
    }
}
