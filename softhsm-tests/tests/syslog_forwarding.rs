//! Forwarding the audit trail to syslog end to end (issue 21, point 5): a record larger
//! than one syslog message arrives as several RFC 5424 messages, each naming the record's
//! tenant, `seq` and part (`[kekd@32473 tenant="…" seq="N" part="P" parts="Q"]`), and a
//! receiver that concatenates the parts of each record in order gets the trail's lines
//! back byte for byte: a hash chain the client's verifier accepts.
//!
//! The receiver here is a Unix datagram socket of the test's own, read by a thread while
//! kekd serves a batch of 4096 items and a few small requests.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kekd_client::audit::{verify_files, Start};
use kekd_client::{Client, Context, EdekItem, KeyName, Metadata, TenantName};
use nix::sys::socket::{setsockopt, sockopt};
use serde_json::Value;
use softhsm_tests::{exit, is_root, Kekd, Tenant};

/// The items of the large request: the most one request may carry.
const BATCH: usize = kekd_proto::MAX_BATCH;

/// A syslog daemon: a Unix datagram socket a thread reads every message from.
struct Receiver {
    messages: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Receiver {
    fn bind(path: &Path) -> Receiver {
        let socket = UnixDatagram::bind(path).expect("bind the syslog socket");
        // Room for bursts (the forwarder waits for a full queue anyway); past
        // net.core.rmem_max only as root.
        let size = 32 << 20;
        if is_root() {
            setsockopt(&socket, sockopt::RcvBufForce, &size).expect("SO_RCVBUFFORCE");
        } else {
            setsockopt(&socket, sockopt::RcvBuf, &size).expect("SO_RCVBUF");
        }
        socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (got, done) = (Arc::clone(&messages), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 17];
            while !done.load(Ordering::SeqCst) {
                match socket.recv(&mut buf) {
                    Ok(n) => {
                        let msg = String::from_utf8(buf[..n].to_vec()).expect("a syslog message in UTF-8");
                        got.lock().unwrap().push(msg);
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => panic!("receiving syslog messages: {e}"),
                }
            }
        });
        Receiver { messages, stop, thread: Some(thread) }
    }

    fn messages(&self) -> Vec<String> {
        self.messages.lock().unwrap().clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One RFC 5424 message as kekd sends them.
#[derive(Debug, Clone)]
struct Message {
    /// `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID `: the same in every part.
    header: String,
    pri: String,
    time: String,
    app: String,
    msgid: String,
    tenant: String,
    seq: u64,
    part: usize,
    parts: usize,
    text: String,
    len: usize,
}

#[track_caller]
fn parse(msg: &str) -> Message {
    // <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [SD] MSG
    let fields: Vec<&str> = msg.splitn(7, ' ').collect();
    assert_eq!(fields.len(), 7, "{msg}");
    let header = fields[..6].iter().map(|f| format!("{f} ")).collect::<String>();
    let (sd, text) = fields[6]
        .strip_prefix('[')
        .and_then(|r| r.split_once("] "))
        .unwrap_or_else(|| panic!("no SD element: {msg}"));
    let mut params = sd.split(' ');
    assert_eq!(params.next(), Some("kekd@32473"), "{msg}");
    let params: BTreeMap<&str, &str> = params
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or_else(|| panic!("SD-PARAM {p:?}: {msg}"));
            (
                k,
                v.strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or_else(|| panic!("{p:?}: {msg}")),
            )
        })
        .collect();
    assert_eq!(params.keys().copied().collect::<Vec<_>>(), ["part", "parts", "seq", "tenant"], "{msg}");
    let num = |k: &str| params[k].parse::<u64>().unwrap_or_else(|e| panic!("{k}: {e}: {msg}"));
    Message {
        header,
        pri: fields[0].to_owned(),
        time: fields[1].to_owned(),
        app: fields[3].to_owned(),
        msgid: fields[5].to_owned(),
        tenant: params["tenant"].to_owned(),
        seq: num("seq"),
        part: num("part") as usize,
        parts: num("parts") as usize,
        text: text.to_owned(),
        len: msg.len(),
    }
}

/// The records the messages make whole, by seq, and the seqs still missing parts. Panics
/// on a part received twice or parts that disagree on their record's header or count.
fn reassemble(messages: &[Message]) -> (BTreeMap<u64, String>, Vec<u64>) {
    let mut by_seq: BTreeMap<u64, Vec<&Message>> = BTreeMap::new();
    for m in messages {
        by_seq.entry(m.seq).or_default().push(m);
    }
    let mut whole = BTreeMap::new();
    let mut partial = Vec::new();
    for (seq, mut parts) in by_seq {
        parts.sort_by_key(|m| m.part);
        let first = parts[0];
        for (i, m) in parts.iter().enumerate() {
            assert!(m.part >= 1 && m.part <= m.parts, "seq {seq}: part {} of {}", m.part, m.parts);
            assert_eq!(m.parts, first.parts, "seq {seq}: parts disagree on their count");
            assert_eq!(m.header, first.header, "seq {seq}: parts disagree on the header");
            assert!(i == 0 || parts[i - 1].part != m.part, "seq {seq}: part {} received twice", m.part);
        }
        if parts.len() == first.parts {
            whole.insert(seq, parts.iter().map(|m| m.text.as_str()).collect::<String>());
        } else {
            partial.push(seq);
        }
    }
    (whole, partial)
}

fn trail_lines(kekd: &Kekd) -> Vec<String> {
    kekd.audit_files("acme")
        .iter()
        .flat_map(|f| fs::read_to_string(f).unwrap().lines().map(str::to_owned).collect::<Vec<_>>())
        .collect()
}

/// What came out of a run.
struct Forwarded {
    /// The trail's lines, from its files.
    lines: Vec<String>,
    /// Every message received.
    messages: Vec<Message>,
    /// The records the messages make whole, by seq.
    records: BTreeMap<u64, String>,
    /// The test's directory, the syslog socket's: removed with it.
    dir: tempfile::TempDir,
    _kekd: Kekd,
}

/// The metadata of the unwraps, which every record of their items carries (until the
/// format change, one record per item): a `data_label` of 240 bytes of multi-byte
/// characters and of text JSON escapes (`"`, `\`, a tab), so that a small limit cuts these
/// records, after a `principal` of `n` bytes, which moves the cuts along the label.
fn metadata(n: usize) -> Metadata {
    Metadata { principal: "p".repeat(n), data_label: "é€😀\"\\\t".repeat(20), ..Metadata::default() }
}

/// Starts kekd forwarding to a socket of the test's (with `audit.syslog_max_message` =
/// `max` when given), sends small requests and an unwrap batch of [`BATCH`] items,
/// and collects the messages until they make every record of the trail whole.
fn forward(max: Option<usize>) -> Forwarded {
    let dir = softhsm_tests::test_dir();
    let socket = dir.path().join("syslog.sock");
    let receiver = Receiver::bind(&socket);
    let mut builder = Kekd::builder()
        .tenant(Tenant::owned_by_me("acme"))
        .audit(&format!("syslog = {:?}", socket.display().to_string()))
        .audit("syslog_facility = \"local3\"");
    if let Some(max) = max {
        builder = builder.audit(&format!("syslog_max_message = {max}"));
    }
    let kekd = builder.start();

    // A few small requests, one of them failing.
    let (_, edek) = kekd.generate("default", &[]);
    let mut tampered = edek.clone();
    tampered[20] ^= 1;
    kekd.unwrap(&tampered, &[]).assert_error(exit::DATA_INVALID, "DATA_INVALID");
    kekd.kekctl().arg("status").run().ok();

    // The large one: an unwrap of BATCH items.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let tenant = TenantName::parse("acme").unwrap();
        let client =
            Client::connect(kekd.socket(), &tenant, "syslog-forwarding-test").await.expect("connect");
        let key = KeyName::parse("default").unwrap();
        let ctx = Context::new(BTreeMap::new()).unwrap();
        let generated = client
            .generate(&key, vec![ctx.clone(); BATCH], true, Metadata::default())
            .await
            .expect("generate");
        let items: Vec<EdekItem> = generated
            .into_iter()
            .map(|r| EdekItem { edek: r.expect("generated").edek.expect("an EDEK"), context: ctx.clone() })
            .collect();
        let one = items[..1].to_vec();
        let unwrapped = client.unwrap(items, metadata(16)).await.expect("unwrap");
        assert_eq!(unwrapped.len(), BATCH);
        assert!(unwrapped.iter().all(Result::is_ok), "every item unwrapped");
        // Small ones, the label a byte further on in each: the label's pattern is 15 bytes
        // escaped, so of cuts at the same place in these records, some fall inside a
        // character.
        for n in 1..=15 {
            let r = client.unwrap(one.clone(), metadata(n)).await.expect("unwrap");
            assert!(r[0].is_ok());
        }
    });
    kekd.unwrap(&edek, &[]).ok();

    // Until every record of the trail is whole (the trail may grow meanwhile: read again).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let lines = trail_lines(&kekd);
        let messages: Vec<Message> = receiver.messages().iter().map(|m| parse(m)).collect();
        let (records, partial) = reassemble(&messages);
        if records.len() == lines.len() && partial.is_empty() {
            drop(receiver);
            return Forwarded { lines, messages, records, dir, _kekd: kekd };
        }
        assert!(
            Instant::now() < deadline,
            "after 60 s, {} of {} records whole ({} messages; seqs missing parts: {:?})",
            records.len(),
            lines.len(),
            messages.len(),
            &partial[..partial.len().min(20)]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What holds whatever the limit: the records reassemble into the trail's lines, byte for
/// byte, a chain the verifier accepts, from messages within the limit whose headers say
/// what the record says.
fn check(f: &Forwarded, max: usize) {
    // The trail: the genesis record on, each line's seq its place.
    assert!(f.lines.len() >= 6, "{}", f.lines.len());
    let seqs: Vec<u64> = f.records.keys().copied().collect();
    assert_eq!(seqs, (1..=f.lines.len() as u64).collect::<Vec<_>>());
    for (line, (seq, record)) in f.lines.iter().zip(&f.records) {
        assert!(line == record, "seq {seq}: the reassembled record differs from the file's line");
    }
    let path = f.dir.path().join("forwarded.jsonl");
    let text: String = f.records.values().map(|r| format!("{r}\n")).collect();
    fs::write(&path, text).unwrap();
    let summary = verify_files(std::slice::from_ref(&path), &Start::Genesis)
        .unwrap_or_else(|e| panic!("the forwarded records do not verify as a chain: {e}"));
    assert_eq!(summary.records, f.lines.len() as u64);
    assert_eq!(summary.first_seq, Some(1));

    let by_seq: BTreeMap<u64, Value> =
        f.records.iter().map(|(s, r)| (*s, serde_json::from_str(r).unwrap())).collect();
    for m in &f.messages {
        assert!(m.len <= max, "a message of {} bytes, over the limit of {max}: {}", m.len, m.header);
        let record = &by_seq[&m.seq];
        let failed = f.records[&m.seq].contains("\"outcome\":\"error\"");
        // local3 (19) * 8 + warning (4) or informational (6)
        assert_eq!(m.pri, if failed { "<156>1" } else { "<158>1" }, "seq {}", m.seq);
        assert_eq!(m.time, record["time"].as_str().unwrap());
        assert_eq!(m.app, "kekd");
        assert_eq!(m.msgid, record["event"].as_str().unwrap());
        assert_eq!(m.tenant, "acme");
    }
    assert!(f.messages.iter().any(|m| m.pri == "<156>1"), "the failed unwrap went out as a warning");
    assert_eq!(f.messages.len(), f.records.len() + f.messages.iter().filter(|m| m.part > 1).count());
}

fn split_records(f: &Forwarded) -> usize {
    f.messages.iter().filter(|m| m.part == 1 && m.parts > 1).count()
}

/// At the default limit (8192 bytes). Its last assertion WAITS FOR THE AUDIT FORMAT CHANGE
/// to one record per request: until then a batch of 4096 items writes 4096 small records,
/// none larger than a message, and it fails.
#[test]
fn a_batch_of_4096_items_arrives_in_parts_that_reassemble_into_the_trail() {
    let f = forward(None);
    check(&f, 8192);
    let largest = f.lines.iter().map(String::len).max().unwrap();
    assert!(
        split_records(&f) >= 1,
        "no record came in more than one part (the largest line is {largest} bytes): this \
         test needs the audit format of one record per request, whose batch record of 4096 \
         items is some 400 KB"
    );
}

/// At a limit small enough that ordinary records are split too.
#[test]
fn at_a_small_message_limit_ordinary_records_arrive_in_parts_that_reassemble_into_the_trail() {
    let f = forward(Some(600));
    check(&f, 600);
    // At least the 15 small unwraps and the batch's (whatever the format: one record per
    // item, or per request).
    assert!(split_records(&f) >= 16, "{} records split", split_records(&f));
    // A record that fits goes whole, as part 1 of 1, with the same SD element.
    assert!(f.messages.iter().any(|m| m.parts == 1), "some record fits in 600 bytes");
    // Some cut fell inside a character: its part stopped short of the limit, and the next
    // one begins with the whole character.
    let part: BTreeMap<(u64, usize), &Message> = f.messages.iter().map(|m| ((m.seq, m.part), m)).collect();
    let moved = part.values().filter(|m| {
        m.part < m.parts
            && m.len < 600
            && !part[&(m.seq, m.part + 1)].text.starts_with(|c: char| c.is_ascii())
    });
    assert!(moved.count() > 0, "no cut fell inside a multi-byte character");
}
