//! Forwarding audit records to syslog (RFC 5424 over a Unix datagram socket), for SIEM
//! shippers that collect from there.
//!
//! The files are the record of truth; syslog is a copy. A forwarded record that is lost
//! does not fail the operation: losses are counted and the log says so once per outage.
//!
//! # Messages
//!
//! A record goes out as one or more RFC 5424 messages:
//!
//! ```text
//! <PRI>1 TIMESTAMP HOSTNAME kekd PROCID MSGID [kekd@32473 tenant="T" seq="N" part="P" parts="Q"] MSG
//! ```
//!
//! - PRI: `audit.syslog_facility`, and severity warning when the record holds an error
//!   outcome (`"outcome":"error"` anywhere in it: any of its items failed), informational
//!   otherwise; TIMESTAMP is the record's `time` and MSGID its `event`, so that a SIEM can
//!   filter without parsing the JSON. Every part of a record has the same header.
//! - MSG is a contiguous byte slice of the record's line (without its newline), cut on
//!   UTF-8 character boundaries, as long as `audit.syslog_max_message` (the whole message,
//!   header included; 8192 by default, rsyslog's default `MaxMessageSize`) allows.
//!   Concatenating parts 1 to Q of one record in order gives its line back byte for byte.
//! - The structured data names the record: its tenant, its `seq` (read from the line,
//!   docs/FORMATS.md §5) and the part. Every message carries it, a record that fits in one
//!   message too (`part="1" parts="1"`), so that a receiver follows one rule: group by
//!   HOSTNAME, `tenant` and `seq`, and concatenate the parts in order once all Q are there.
//! - The SD-ID: RFC 5424 §6.3.2 reserves names without `@` for SD-IDs registered with
//!   IANA; any other must be `name@<private enterprise number>`. kekd has no enterprise
//!   number of its own, so it uses 32473, the one IANA set aside for documentation and
//!   examples (RFC 5612): `kekd@32473`. Match the SD-ID as a whole.
//!
//! # Delivery
//!
//! Neither the audit writer nor the answers wait for syslog. [`Syslog::send`], called
//! from `Core::forward` after each write, copies the write's lines into a queue and
//! returns. A thread of the trail's own (`kekd-syslog`) takes them from there and sends
//! them, message by message, over a blocking socket with a send timeout ([`SEND_TIMEOUT`]):
//! a receiver that needs a moment (its receive queue full) makes the thread wait instead
//! of losing a part of a record; a message not taken within the timeout loses its record
//! (its later parts are not sent, and a receiver drops a record whose parts do not all
//! arrive). The socket is unbound and sends to the path each time, so a restarted syslog
//! daemon, which binds a new socket there, gets the next record.
//!
//! The queue holds at most [`QUEUE_BYTES`] of lines (besides the write the thread is
//! sending). When it is full, lines are dropped (counted) until it has drained to half,
//! so that a receiver slower than the trail costs the log two lines per outage, not one
//! per record. When the trail closes, the thread sends what is queued and ends; a process
//! that exits first loses what was still queued, which the files have.

use std::collections::VecDeque;
use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::config::AuditConfig;

/// The SD-ID of the element that names a message's record and part.
pub const SD_ID: &str = "kekd@32473";

/// Bytes of lines waiting to be forwarded, at most.
pub const QUEUE_BYTES: usize = 8 << 20;

/// How long one message may wait for the receiver to take it.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// The most bytes of one UTF-8 character: a message takes at least that much of its line,
/// whatever the header leaves.
const MIN_SLICE: usize = 4;

/// RFC 5424 severities.
const WARNING: u8 = 4;
const INFO: u8 = 6;

/// A tenant's forwarding: the queue its writes go into, and the thread that sends it.
pub struct Syslog {
    shared: Arc<Shared>,
    path: PathBuf,
    capacity: usize,
}

impl Syslog {
    /// Starts forwarding `tenant`'s records to `audit.syslog`; `None` when it is unset.
    pub fn start(cfg: &AuditConfig, tenant: &str) -> Result<Option<Syslog>, String> {
        let Some(path) = cfg.syslog.as_deref() else { return Ok(None) };
        let format = Format::new(cfg.facility().unwrap_or(10), tenant, cfg.syslog_max_message);
        Syslog::with(path, format, QUEUE_BYTES)
            .map(Some)
            .map_err(|e| format!("cannot start the syslog forwarder: {e}"))
    }

    fn with(path: &Path, format: Format, capacity: usize) -> io::Result<Syslog> {
        let shared = Arc::new(Shared::default());
        let mut forwarder = Forwarder::new(path, format);
        let queue = Arc::clone(&shared);
        std::thread::Builder::new().name("kekd-syslog".into()).spawn(move || {
            while let Some(chunk) = queue.next() {
                for line in chunk.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                    // Whole lines of `&str`s, cut at their newlines.
                    if let Ok(line) = std::str::from_utf8(line) {
                        forwarder.send(line);
                    }
                }
            }
        })?;
        Ok(Syslog { shared, path: path.to_owned(), capacity })
    }

    /// Queues the lines of one write (a copy and a lock): the forwarder thread sends them.
    pub fn send<'a>(&self, lines: impl IntoIterator<Item = &'a str>) {
        let mut chunk = Vec::new();
        for line in lines {
            chunk.extend_from_slice(line.as_bytes());
            chunk.push(b'\n');
        }
        if chunk.is_empty() {
            return;
        }
        let note = lock(&self.shared.queue).push(chunk, self.capacity);
        self.shared.ready.notify_one();
        if let Some(dropped) = note.resumed {
            tracing::warn!(dropped, socket = %self.path.display(), "the syslog forwarding queue drained; the records dropped meanwhile were not forwarded (they are in the audit files)");
        }
        if note.full {
            tracing::warn!(queue_bytes = self.capacity, socket = %self.path.display(), "the syslog forwarding queue is full (the receiver is slower than the trail): records are not forwarded until it drains to half (they are in the audit files)");
        }
    }
}

impl Drop for Syslog {
    fn drop(&mut self) {
        lock(&self.shared.queue).closed = true;
        self.shared.ready.notify_one();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the trail and the forwarder thread share.
#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when a write is queued, or the trail closed.
    ready: Condvar,
}

impl Shared {
    /// The next write's lines, waiting for one; `None` once the trail closed and all was
    /// taken.
    fn next(&self) -> Option<Vec<u8>> {
        let mut q = lock(&self.queue);
        loop {
            if let Some(chunk) = q.chunks.pop_front() {
                q.bytes -= chunk.len();
                return Some(chunk);
            }
            if q.closed {
                return None;
            }
            q = self.ready.wait(q).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Lines waiting to be sent: each write's lines, each line followed by `\n`.
#[derive(Default)]
struct Queue {
    chunks: VecDeque<Vec<u8>>,
    bytes: usize,
    /// While lines are dropped (since the queue was full, until it drains to half): how
    /// many.
    dropped: Option<u64>,
    closed: bool,
}

/// What [`Queue::push`] has to tell the log.
#[derive(Debug, Default, PartialEq, Eq)]
struct Note {
    /// The queue drained after dropping lines: how many it dropped.
    resumed: Option<u64>,
    /// The queue is full: lines are dropped from now on.
    full: bool,
}

impl Queue {
    fn push(&mut self, mut chunk: Vec<u8>, capacity: usize) -> Note {
        let mut note = Note::default();
        if let Some(dropped) = self.dropped {
            if self.bytes > capacity / 2 {
                self.dropped = Some(dropped + lines(&chunk));
                return note;
            }
            self.dropped = None;
            note.resumed = Some(dropped);
        }
        let room = capacity.saturating_sub(self.bytes);
        if chunk.len() > room {
            // Whole lines only: those that fit go, the rest are dropped.
            let keep = chunk[..room].iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            self.dropped = Some(lines(&chunk[keep..]));
            chunk.truncate(keep);
            note.full = true;
        }
        if !chunk.is_empty() {
            self.bytes += chunk.len();
            self.chunks.push_back(chunk);
        }
        note
    }
}

fn lines(chunk: &[u8]) -> u64 {
    chunk.iter().filter(|&&b| b == b'\n').count() as u64
}

/// Sends records, on the forwarder thread.
struct Forwarder {
    format: Format,
    path: PathBuf,
    socket: Option<UnixDatagram>,
    /// Records lost since the last one that was delivered.
    lost: u64,
}

impl Forwarder {
    fn new(path: &Path, format: Format) -> Forwarder {
        Forwarder { format, path: path.to_owned(), socket: None, lost: 0 }
    }

    /// Sends one record line, in as many messages as it takes; a part that cannot be
    /// delivered loses the record, and its other parts are not sent.
    fn send(&mut self, line: &str) {
        let messages = self.format.messages(line);
        match messages.iter().try_for_each(|m| self.deliver(m.as_bytes())) {
            Ok(()) => {
                if self.lost > 0 {
                    tracing::warn!(lost = self.lost, socket = %self.path.display(), "syslog forwarding works again; records were lost meanwhile (they are in the audit files)");
                    self.lost = 0;
                }
            }
            Err(e) => {
                if self.lost == 0 {
                    tracing::warn!(error = %e, socket = %self.path.display(), "cannot forward audit records to syslog; the audit files still have them");
                }
                self.lost += 1;
            }
        }
    }

    fn deliver(&mut self, msg: &[u8]) -> io::Result<()> {
        let socket = match &self.socket {
            Some(s) => s,
            None => {
                let s = UnixDatagram::unbound()?;
                s.set_write_timeout(Some(SEND_TIMEOUT))?;
                self.socket.insert(s)
            }
        };
        loop {
            // By path each time: a restarted syslog daemon binds a new socket at the same path.
            match socket.send_to(msg, &self.path) {
                // A signal handled on this thread; with a timeout set, the kernel does not
                // restart the call.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r.map(|_| ()),
            }
        }
    }
}

/// How a record becomes messages.
struct Format {
    facility: u8,
    hostname: String,
    pid: u32,
    /// The `tenant` SD-PARAM, escaped.
    tenant: String,
    /// `audit.syslog_max_message`.
    max: usize,
}

impl Format {
    fn new(facility: u8, tenant: &str, max: usize) -> Format {
        // HOSTNAME is at most 255 printable US-ASCII characters (RFC 5424 §6.2.4).
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty() && h.len() <= 255 && h.bytes().all(|b| b.is_ascii_graphic()))
            .unwrap_or_else(|| "-".into());
        Format {
            facility,
            hostname,
            pid: std::process::id(),
            tenant: format!("tenant=\"{}\"", sd_escape(tenant)),
            max,
        }
    }

    /// The messages of one record line, in part order.
    fn messages(&self, line: &str) -> Vec<String> {
        let (event, time, failed) = summary(line);
        let severity = if failed { WARNING } else { INFO };
        let pri = u16::from(self.facility) * 8 + u16::from(severity);
        let head = format!("<{pri}>1 {time} {} kekd {} {event} ", self.hostname, self.pid);
        let seq = seq(line).map(|n| format!(" seq=\"{n}\"")).unwrap_or_default();
        let sd = |part: usize, parts: usize| {
            format!("[{SD_ID} {}{seq} part=\"{part}\" parts=\"{parts}\"]", self.tenant)
        };
        let whole = sd(1, 1);
        if head.len() + whole.len() + 1 + line.len() <= self.max {
            return vec![format!("{head}{whole} {line}")];
        }
        // The room for MSG depends on how many digits the part numbers take, and the count
        // of parts on the room: try 1 digit, then 2, ...
        let mut widest = 9;
        loop {
            let room = self.max.saturating_sub(head.len() + sd(widest, widest).len() + 1).max(MIN_SLICE);
            let slices = split(line, room);
            if slices.len() <= widest {
                let parts = slices.len();
                return slices
                    .iter()
                    .enumerate()
                    .map(|(i, slice)| format!("{head}{} {slice}", sd(i + 1, parts)))
                    .collect();
            }
            widest = widest * 10 + 9;
        }
    }
}

/// `line` cut into slices of at most `room` bytes (at least [`MIN_SLICE`]), each ending on
/// a character boundary.
fn split(line: &str, room: usize) -> Vec<&str> {
    let room = room.max(MIN_SLICE);
    let mut slices = Vec::with_capacity(line.len() / room + 1);
    let mut rest = line;
    while rest.len() > room {
        let mut cut = room;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (slice, tail) = rest.split_at(cut);
        slices.push(slice);
        rest = tail;
    }
    slices.push(rest);
    slices
}

/// An SD-PARAM value: `"`, `\` and `]` escaped (RFC 5424 §6.3.3).
fn sd_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The record's `seq`: before `prev` at the end of its line (docs/FORMATS.md §5), or, in
/// the layout of builds before 2026-11-24, first.
fn seq(line: &str) -> Option<u64> {
    const HEX: usize = 64;
    const PREV: &[u8] = b",\"prev\":\"";
    // `,"prev":"<64 hex>","hash":"<64 hex>"}`
    const TAIL: usize = PREV.len() + HEX + b"\",\"hash\":\"".len() + HEX + b"\"}".len();
    let digits = |b: &[u8]| -> Option<u64> {
        if b.is_empty() || b.len() > 20 || !b.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(b).ok()?.parse().ok()
    };
    let b = line.as_bytes();
    if let Some(body) = b.len().checked_sub(TAIL).map(|end| &b[..end]) {
        if b[body.len()..].starts_with(PREV) {
            let start = body.iter().rposition(|c| !c.is_ascii_digit()).map_or(0, |i| i + 1);
            if body[..start].ends_with(b",\"seq\":") {
                if let Some(n) = digits(&body[start..]) {
                    return Some(n);
                }
            }
        }
    }
    let rest = b.strip_prefix(b"{\"seq\":")?;
    let end = rest.iter().position(|c| !c.is_ascii_digit())?;
    rest[end..].starts_with(PREV).then_some(())?;
    digits(&rest[..end])
}

/// The event name, time and outcome of a record, read from its fixed layout.
fn summary(line: &str) -> (&str, &str, bool) {
    let field = |name: &str| {
        let pat = format!("\"{name}\":\"");
        line.find(&pat).and_then(|i| {
            let rest = &line[i + pat.len()..];
            rest.find('"').map(|j| &rest[..j])
        })
    };
    // Bounded, printable and without spaces, as the header fields must be.
    let token =
        |s: &&str, max: usize| !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_graphic());
    let event = field("event").filter(|e| token(e, 32)).unwrap_or("-");
    let time = field("time").filter(|t| token(t, 32)).unwrap_or("-");
    (event, time, line.contains("\"outcome\":\"error\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "ab01ab01ab01ab01ab01ab01ab01ab01ab01ab01ab01ab01ab01ab01ab01ab01";

    fn record(seq: u64, middle: &str) -> String {
        format!(
            "{{\"time\":\"2026-11-23T10:00:00.000Z\",\"tenant\":\"acme\",\"event\":\"unwrap\",{middle},\"seq\":{seq},\"prev\":\"{HASH}\",\"hash\":\"{HASH}\"}}"
        )
    }

    fn format(max: usize) -> Format {
        Format { facility: 10, hostname: "host".into(), pid: 42, tenant: "tenant=\"acme\"".into(), max }
    }

    /// (header up to the SD, the SD element, MSG) of a message.
    fn fields(msg: &str) -> (&str, &str, &str) {
        let sd = msg.find('[').expect("an SD element");
        let end = sd + msg[sd..].find(']').expect("the SD element's end");
        (&msg[..sd], &msg[sd..=end], msg[end + 1..].strip_prefix(' ').expect("a space before MSG"))
    }

    fn reassemble(msgs: &[String]) -> String {
        msgs.iter().map(|m| fields(m).2).collect()
    }

    #[test]
    fn seq_is_read_from_either_layout() {
        assert_eq!(seq(&record(123, "\"outcome\":\"ok\"")), Some(123));
        assert_eq!(seq(&record(1, "\"x\":\"\\\"seq\\\":9\"")), Some(1));
        let old = format!("{{\"seq\":77,\"prev\":\"{HASH}\",\"time\":\"t\",\"hash\":\"{HASH}\"}}");
        assert_eq!(seq(&old), Some(77));
        assert_eq!(seq("{\"time\":\"t\"}"), None);
        assert_eq!(seq(""), None);
        let no_digits = record(5, "\"a\":1").replace(",\"seq\":5", ",\"seq\":");
        assert_eq!(seq(&no_digits), None);
    }

    #[test]
    fn a_record_that_fits_is_one_message_with_part_1_of_1() {
        let line = record(7, "\"outcome\":\"error\",\"code\":\"DATA_INVALID\"");
        let msgs = format(8192).messages(&line);
        // authpriv (10) * 8 + warning (4)
        let expect = format!(
            "<84>1 2026-11-23T10:00:00.000Z host kekd 42 unwrap [kekd@32473 tenant=\"acme\" seq=\"7\" part=\"1\" parts=\"1\"] {line}"
        );
        assert_eq!(msgs, [expect]);
    }

    #[test]
    fn a_record_exactly_at_the_limit_is_one_message_and_one_byte_more_is_two() {
        let line = record(7, "\"outcome\":\"ok\"");
        let one = format(8192).messages(&line).remove(0);
        let exact = format(one.len()).messages(&line);
        assert_eq!(exact, std::slice::from_ref(&one));
        let parts = format(one.len() - 1).messages(&line);
        assert_eq!(parts.len(), 2, "{parts:#?}");
        assert!(parts.iter().all(|m| m.len() < one.len()));
        assert_eq!(reassemble(&parts), line);
        assert!(parts[0].starts_with("<86>1 2026-11-23T10:00:00.000Z host kekd 42 unwrap "), "{}", parts[0]);
        assert_eq!(fields(&parts[0]).1, "[kekd@32473 tenant=\"acme\" seq=\"7\" part=\"1\" parts=\"2\"]");
        assert_eq!(fields(&parts[1]).1, "[kekd@32473 tenant=\"acme\" seq=\"7\" part=\"2\" parts=\"2\"]");
    }

    #[test]
    fn a_long_record_is_cut_on_character_boundaries_and_reassembles_exactly() {
        // Multi-byte characters (2, 3 and 4 bytes) and JSON escapes throughout, so that
        // cuts land inside characters at one limit or another.
        let text = "é€😀\\\"x\\u0001".repeat(300);
        let line = record(123, &format!("\"error\":\"{text}\",\"outcome\":\"error\""));
        for max in [480, 481, 482, 483, 600, 1000, 1001, 1002, 1003] {
            let msgs = format(max).messages(&line);
            assert!(msgs.len() > 1, "{max}");
            let (head, _, _) = fields(&msgs[0]);
            let total = msgs.len();
            for (i, m) in msgs.iter().enumerate() {
                assert!(m.len() <= max, "{max}: part {} is {} bytes", i + 1, m.len());
                let (h, sd, slice) = fields(m);
                assert_eq!(h, head, "every part has the record's header");
                assert!(h.starts_with("<84>1 2026-11-23T10:00:00.000Z host kekd 42 unwrap "), "{h}");
                let expect =
                    format!("[kekd@32473 tenant=\"acme\" seq=\"123\" part=\"{}\" parts=\"{total}\"]", i + 1);
                assert_eq!(sd, expect);
                assert!(!slice.is_empty());
                // As long as the limit allows: short by at most 3 bytes (a character not cut)
                // and a digit (a part number shorter than the widest).
                if i + 1 < total {
                    assert!(m.len() + 4 >= max, "{max}: part {} is only {} bytes", i + 1, m.len());
                }
            }
            assert_eq!(reassemble(&msgs), line, "{max}");
        }
    }

    #[test]
    fn a_multi_byte_character_at_the_cut_goes_whole_into_the_next_part() {
        let line = record(5, "\"x\":\"aaaa\"");
        let fits = format(8192).messages(&line)[0].len();
        // A limit that cuts right after the first byte of the 4-byte character.
        let with = line.replacen("aaaa", "a😀aa", 1);
        let head = fields(&format(8192).messages(&with)[0]).0.len();
        let sd = "[kekd@32473 tenant=\"acme\" seq=\"5\" part=\"1\" parts=\"2\"]".len();
        let at = with.find('😀').unwrap();
        let max = head + sd + 1 + at + 1;
        assert!(max < fits);
        let msgs = format(max).messages(&with);
        let slices: Vec<&str> = msgs.iter().map(|m| fields(m).2).collect();
        assert!(slices[0].ends_with("\"x\":\"a"), "{}", slices[0]);
        assert!(slices[1].starts_with("😀aa\""), "{}", slices[1]);
        assert_eq!(slices.concat(), with);
        assert_eq!(split("😀😀", 5), ["😀", "😀"]);
        assert_eq!(split("ab😀", 3), ["ab", "😀"]);
        assert_eq!(split("", 4), [""]);
    }

    #[test]
    fn part_numbers_with_more_digits_still_fit() {
        let line = record(9, &format!("\"x\":\"{}\"", "z".repeat(100_000)));
        let msgs = format(480).messages(&line);
        assert!(msgs.len() >= 100, "{}", msgs.len());
        assert!(msgs.iter().all(|m| m.len() <= 480));
        assert!(msgs.last().unwrap().contains(&format!("part=\"{0}\" parts=\"{0}\"]", msgs.len())));
        assert_eq!(reassemble(&msgs), line);
    }

    #[test]
    fn sd_values_are_escaped() {
        assert_eq!(sd_escape("a\"b\\c]d"), "a\\\"b\\\\c\\]d");
        assert_eq!(sd_escape("acme-1_x"), "acme-1_x");
    }

    #[test]
    fn a_full_queue_drops_whole_lines_until_it_drained_to_half() {
        let mut q = Queue::default();
        assert_eq!(q.push(b"aaaa\nbbbb\n".to_vec(), 20), Note::default());
        // 10 bytes of room: "cccc\n" fits, "dddd\n" too, "eeee\n" not.
        let note = q.push(b"cccc\ndddd\neeee\n".to_vec(), 20);
        assert_eq!(note, Note { resumed: None, full: true });
        assert_eq!(q.bytes, 20);
        assert_eq!(q.dropped, Some(1));
        // Still more than half full: dropped.
        q.chunks.pop_front();
        q.bytes -= 10;
        q.bytes += 1; // 11 of 20
        assert_eq!(q.push(b"ffff\ngggg\n".to_vec(), 20), Note::default());
        assert_eq!(q.dropped, Some(3));
        q.bytes -= 1; // half
        assert_eq!(q.push(b"hhhh\n".to_vec(), 20), Note { resumed: Some(3), full: false });
        assert_eq!(q.dropped, None);
        assert_eq!(q.chunks.back().unwrap(), b"hhhh\n");
        // A line larger than the whole queue is dropped.
        let mut q = Queue::default();
        assert!(q.push(vec![b'x'; 30].into_iter().chain([b'\n']).collect(), 20).full);
        assert!(q.chunks.is_empty());
        assert_eq!(q.dropped, Some(1));
    }

    fn receiver(dir: &Path) -> (PathBuf, UnixDatagram) {
        let path = dir.join("log");
        let listener = UnixDatagram::bind(&path).unwrap();
        listener.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        (path, listener)
    }

    fn recv(listener: &UnixDatagram) -> String {
        let mut buf = vec![0u8; 65536];
        let n = listener.recv(&mut buf).expect("a message");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn records_arrive_as_rfc5424_messages_from_the_forwarder_thread() {
        let dir = tempfile::tempdir().unwrap();
        let (path, listener) = receiver(dir.path());
        let s = Syslog::with(&path, format(600), QUEUE_BYTES).unwrap();
        let small = record(1, "\"outcome\":\"ok\"");
        let large = record(2, &format!("\"x\":\"{}\",\"outcome\":\"ok\"", "é".repeat(500)));
        s.send([small.as_str(), large.as_str()]);
        let first = recv(&listener);
        assert_eq!(
            first,
            format!("<86>1 2026-11-23T10:00:00.000Z host kekd 42 unwrap [kekd@32473 tenant=\"acme\" seq=\"1\" part=\"1\" parts=\"1\"] {small}")
        );
        let mut parts = vec![recv(&listener)];
        let total = parts[0].split("parts=\"").nth(1).unwrap().split('"').next().unwrap().parse().unwrap();
        assert!(total > 1);
        while parts.len() < total {
            parts.push(recv(&listener));
        }
        assert!(parts.iter().all(|m| m.len() <= 600));
        assert_eq!(reassemble(&parts), large);
    }

    #[test]
    fn a_receiver_that_needs_a_moment_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (path, listener) = receiver(dir.path());
        let s = Syslog::with(&path, format(600), QUEUE_BYTES).unwrap();
        // More messages than a Unix datagram socket queues (net.unix.max_dgram_qlen, 10 to
        // 512): the forwarder waits for the receiver, which reads only after a while.
        let lines: Vec<String> = (1..=600).map(|i| record(i, "\"outcome\":\"ok\"")).collect();
        s.send(lines.iter().map(String::as_str));
        std::thread::sleep(Duration::from_millis(300));
        for l in &lines {
            assert_eq!(fields(&recv(&listener)).2, l);
        }
    }

    #[test]
    fn a_missing_socket_is_counted_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("none");
        let mut f = Forwarder::new(&path, format(8192));
        f.send(r#"{"time":"t","event":"status","outcome":"ok"}"#);
        f.send(r#"{"time":"t","event":"status","outcome":"ok"}"#);
        assert_eq!(f.lost, 2);
        let listener = UnixDatagram::bind(&path).unwrap();
        f.send(r#"{"time":"t","event":"status","outcome":"ok"}"#);
        assert_eq!(f.lost, 0);
        let mut buf = [0u8; 512];
        let n = listener.recv(&mut buf).unwrap();
        // No seq in this line: the SD element says so by leaving it out.
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            "<86>1 t host kekd 42 status [kekd@32473 tenant=\"acme\" part=\"1\" parts=\"1\"] {\"time\":\"t\",\"event\":\"status\",\"outcome\":\"ok\"}"
        );
    }

    #[test]
    fn a_message_the_receiver_does_not_take_within_the_timeout_loses_its_record() {
        let dir = tempfile::tempdir().unwrap();
        let (path, listener) = receiver(dir.path());
        let mut f = Forwarder::new(&path, format(8192));
        // Fill the receive queue.
        let line = record(1, "\"outcome\":\"ok\"");
        while f.lost == 0 {
            f.send(&line);
        }
        assert_eq!(f.lost, 1, "a message that waited out the timeout loses its record");
        drop(listener);
    }
}
