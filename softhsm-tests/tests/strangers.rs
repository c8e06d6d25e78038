//! Strangers at the front door (issue 19, points 2, 3, 5a and 6): nothing a tenant's user
//! or a uid in no tenant's ACL does reaches another tenant or the service, and the audit
//! trail says what the kernel saw. Each attack runs as real unprivileged users the test
//! makes (`TestUser`), against the real binaries. The attackers are small python3 programs:
//! they must run as those users and do what kekctl never does (hold hundreds of silent
//! connections, exec another program on a connected socket, pass one to another process).

use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use kekd_proto::pb;
use prost::Message as _;
use softhsm_tests::{
    assert_traversable_by_others, code, my_uid, open_fds, req, Code, Kekctl, Kekd, KekdBuilder, RawConn,
    Tenant, TestUser,
};

/// The system's python3 (not a user's shim: the test users must be able to run it).
const PYTHON: &str = "/usr/bin/python3";

/// Prepares `builder`'s daemon with these lines in its `[limits]` table, starts it, and
/// checks that other users can reach its socket.
#[track_caller]
fn start(builder: KekdBuilder, limits: &str) -> Kekd {
    let mut kekd = builder.prepare();
    kekd.write_config_text(&format!("{}\n[limits]\n{limits}\n", kekd.config_text()));
    kekd.start();
    assert_traversable_by_others(kekd.socket());
    kekd
}

/// Runs the python program `script` with `args` as `user` (its uid, primary gid and no
/// other groups), with `stdin` and piped stdout and stderr.
#[track_caller]
fn python_as(user: &TestUser, script: &str, args: &[&str], stdin: Stdio) -> Child {
    assert!(Path::new(PYTHON).exists(), "these tests need {PYTHON} (Debian: python3)");
    Command::new(PYTHON)
        .arg("-c")
        .arg(script)
        .args(args)
        .uid(user.uid)
        .gid(user.gid)
        .current_dir("/")
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {PYTHON} as {}: {e}", user.name))
}

/// The next line the program prints; panics with its stderr if it ends first.
#[track_caller]
fn line_of(child: &mut Child, out: &mut BufReader<ChildStdout>) -> String {
    let mut line = String::new();
    out.read_line(&mut line).expect("read the helper's output");
    if line.is_empty() {
        let status = child.wait().expect("wait for the helper");
        let mut err = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().expect("piped"), &mut err).ok();
        panic!("the helper ended ({status}) without a line:\n{err}");
    }
    line.trim_end().to_owned()
}

/// One request as a frame, hex-encoded for a helper's command line.
fn frame_hex(requests: &[pb::Request]) -> String {
    let mut buf = Vec::new();
    for r in requests {
        kekd_proto::frame::encode_frame(r, &mut buf);
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn response_of_hex(hex: &str) -> pb::Response {
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex from the helper"))
        .collect();
    pb::Response::decode(&bytes[..]).unwrap_or_else(|e| panic!("undecodable response {hex}: {e}"))
}

/// Holds N connections to the socket without ever sending a byte; whenever kekd closes one,
/// opens another (at most 50 every 20 ms, so the churn stays a flood, not a fork bomb).
/// Prints `ready` once all N are open, and `closed K` (how many kekd closed) when stdin
/// closes.
const FLOOD: &str = r#"
import select, socket, sys, time
path, n = sys.argv[1], int(sys.argv[2])
def conn():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.setblocking(False)
    return s
poller = select.poll()
socks = {}
def add():
    s = conn()
    socks[s.fileno()] = s
    poller.register(s.fileno(), select.POLLIN)
for _ in range(n):
    add()
print("ready", flush=True)
stdin = sys.stdin.fileno()
poller.register(stdin, select.POLLIN)
closed = owed = 0
while True:
    for fd, _ in poller.poll(20):
        if fd == stdin:
            print("closed", closed, flush=True)
            sys.exit(0)
        s = socks.get(fd)
        if s is None:
            continue
        try:
            gone = s.recv(4096) == b""
        except BlockingIOError:
            gone = False
        except OSError:
            gone = True
        if gone:
            closed += 1
            owed += 1
            poller.unregister(fd)
            del socks[fd]
            s.close()
    for _ in range(min(owed, 50)):
        add()
        owed -= 1
    time.sleep(0.02)
"#;

/// Point 2: the front door cannot be jammed. A uid in no tenant's ACL and a user of tenant
/// `a` each hold hundreds of connections that never say Hello (more than
/// `limits.max_connections`, which they filled before the fix, so that every tenant was
/// answered RESOURCE_EXHAUSTED); meanwhile a client of tenant `b` opens 1000 connections,
/// one after the other, each with a Hello and a request, and none fails. The stranger's
/// connections are closed at accept (a rate-limited log line says so); the tenant's user
/// has `limits.max_pending_per_uid` of them waiting for a Hello and the rest are refused
/// naming that setting; once the flood stops, the user is served again.
#[test]
fn floods_of_silent_connections_do_not_jam_other_tenants() {
    let stranger = TestUser::create("stranger");
    let alice = TestUser::create("alice");
    let kekd = start(
        Kekd::builder()
            .tenant(Tenant::new("a").allow_uid(alice.uid).admin(my_uid()))
            .tenant(Tenant::owned_by_me("b")),
        // A silent connection would hold its place for the whole test.
        "max_connections = 64\nmax_connections_per_tenant = 32\nframe_read_timeout = \"60s\"",
    );
    let socket = kekd.socket().to_str().expect("a UTF-8 socket path").to_owned();
    let flood = |user: &TestUser| {
        let mut child = python_as(user, FLOOD, &[&socket, "300"], Stdio::piped());
        let mut out = BufReader::new(child.stdout.take().expect("piped"));
        assert_eq!(line_of(&mut child, &mut out), "ready");
        (child, out)
    };
    let started = Instant::now();
    let (mut strangers, mut strangers_out) = flood(&stranger);
    let (mut alices, mut alices_out) = flood(&alice);

    let (mut errors, mut first_error) = (0, None);
    for n in 0..1000u64 {
        let mut c = RawConn::connect(kekd.socket());
        // Not `call`: a refusal before the Hello was read echoes no id.
        c.send(&req::hello(1, "b"));
        let resp = match c.recv() {
            Some(hello) if code(&hello) == Code::Ok => c.call(&req::status(2)),
            Some(refused) => refused,
            None => panic!("kekd closed tenant b's connection {n} without an answer"),
        };
        if code(&resp) != Code::Ok {
            errors += 1;
            first_error.get_or_insert((n, resp));
        }
    }
    assert_eq!(errors, 0, "tenant b failed {errors} of 1000 round trips; the first: {first_error:?}");

    // Alice's silent connections held all the places her uid may have before Hello; the
    // rest were refused, naming the setting.
    kekd.wait_for_log("limits.max_pending_per_uid", Duration::from_secs(5));

    let closed = |child: &mut Child, out: &mut BufReader<ChildStdout>| {
        drop(child.stdin.take());
        let line = line_of(child, out);
        child.wait().expect("wait for the flood");
        line.strip_prefix("closed ").and_then(|n| n.parse::<u64>().ok()).expect("closed N")
    };
    let stranger_closed = closed(&mut strangers, &mut strangers_out);
    let alice_closed = closed(&mut alices, &mut alices_out);
    let secs = started.elapsed().as_secs();
    eprintln!(
        "in {secs} s kekd closed {stranger_closed} of the stranger's connections and \
         {alice_closed} of alice's, and served 1000 of tenant b's"
    );
    assert!(stranger_closed >= 300, "kekd closed only {stranger_closed} of the stranger's 300 connections");

    // One log line for the strangers, rate-limited: a burst of 10, then one a second.
    let log = kekd.stderr();
    let lines = log.lines().filter(|l| l.contains("in no tenant's access list")).count();
    assert!((1..=10 + secs as usize + 1).contains(&lines), "{lines} lines about strangers:\n{log}");

    // With her flood gone, alice is served again.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = kekd.kekctl_for("a").as_user(alice.uid, alice.gid).arg("status").run();
        if out.code == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "alice is still refused: {}", out.stderr);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Connects, sends the Hello given in hex, reads the answer, closes; again and again for
/// the given number of seconds. Checks every answer is the same bytes, and prints the number
/// of attempts and the answer in hex.
const REFUSED_HELLOS: &str = r#"
import socket, sys, time
path, hello, secs = sys.argv[1], bytes.fromhex(sys.argv[2]), float(sys.argv[3])
def read_exact(s, n):
    buf = b""
    while len(buf) < n:
        got = s.recv(n - len(buf))
        if not got:
            sys.exit("connection closed after %d of %d bytes" % (len(buf), n))
        buf += got
    return buf
first, attempts = None, 0
end = time.monotonic() + secs
while time.monotonic() < end:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(hello)
    body = read_exact(s, int.from_bytes(read_exact(s, 4), "big"))
    s.close()
    if first is None:
        first = body
    elif body != first:
        sys.exit("a different answer: " + body.hex())
    attempts += 1
print(attempts, first.hex(), flush=True)
"#;

/// Point 3: denials do not flood the audit trail. A user of tenant `a` asks for tenant `b`,
/// whose ACL does not list it, thousands of times in a few seconds: every attempt is
/// answered PERMISSION_DENIED, but `b`'s trail gets one record at once and then at most one
/// a second, each with the `count` of attempts it stands for; the counts add up to the
/// attempts, and the trail still verifies.
#[test]
fn refused_hellos_fold_into_counted_records() {
    let alice = TestUser::create("alice");
    let kekd = Kekd::builder()
        .tenant(Tenant::new("a").allow_uid(alice.uid).admin(my_uid()))
        .tenant(Tenant::owned_by_me("b"))
        .start();
    assert_traversable_by_others(kekd.socket());
    let socket = kekd.socket().to_str().expect("a UTF-8 socket path").to_owned();
    let denied_alice = |r: &serde_json::Value| {
        r["event"] == "hello" && r["code"] == "PERMISSION_DENIED" && r["peer"]["uid"] == alice.uid
    };

    let started = Instant::now();
    let mut child =
        python_as(&alice, REFUSED_HELLOS, &[&socket, &frame_hex(&[req::hello(7, "b")]), "3"], Stdio::null());
    let mut out = BufReader::new(child.stdout.take().expect("piped"));
    let line = line_of(&mut child, &mut out);
    let elapsed = started.elapsed();
    assert!(child.wait().expect("wait for the helper").success());
    let (attempts, answer) = line.split_once(' ').expect("ATTEMPTS HEX");
    let attempts: u64 = attempts.parse().expect("a count of attempts");
    let answer = response_of_hex(answer);
    assert_eq!(code(&answer), Code::PermissionDenied, "{answer:?}");
    assert_eq!(answer.request_id, 7, "{answer:?}");
    assert!(attempts >= 1000, "only {attempts} attempts in {elapsed:?}: too few to show folding");

    // The last fold is flushed within a second of the flood's end.
    let deadline = Instant::now() + Duration::from_secs(10);
    let records = loop {
        let records: Vec<_> = kekd.audit_records("b").into_iter().filter(|r| denied_alice(r)).collect();
        let counted: u64 =
            records.iter().map(|r| r["count"].as_u64().unwrap_or_else(|| panic!("no count in {r}"))).sum();
        if counted == attempts {
            break records;
        }
        assert!(counted < attempts, "{counted} denials recorded for {attempts} attempts: {records:#?}");
        assert!(Instant::now() < deadline, "{counted} of {attempts} denials recorded after 10 s");
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("{attempts} refused Hellos in {elapsed:?} made {} audit records", records.len());
    assert_eq!(records[0]["count"], 1, "the first denial is recorded by itself: {}", records[0]);
    let most = elapsed.as_secs() + 3;
    assert!(
        records.len() as u64 <= most,
        "{} records for {attempts} denials in {elapsed:?}, more than one a second",
        records.len()
    );
    let r = &records[records.len() - 1];
    assert_eq!(r["peer"]["gid"], alice.gid, "{r}");
    assert!(r.get("role").is_none(), "a refused caller has no role: {r}");
    assert!(r["error"].as_str().is_some_and(|e| e.contains(&format!("uid {}", alice.uid))), "{r}");
    assert!(kekd.audit_records("a").iter().all(|r| r["event"] != "hello" || r["outcome"] == "ok"));

    Kekctl::new().args(["audit", "verify"]).args(kekd.audit_files("b")).run().ok();
}

/// Connects, puts the connection on descriptor 9 (inherited across exec), prints `connected`, waits for a line on
/// stdin, then execs a shell that sends the requests in the given file on descriptor 3
/// and then sleeps: the process that connected now runs other programs.
const CONNECT_THEN_EXEC: &str = r#"
import os, socket, sys
path, requests = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
os.dup2(s.fileno(), 9)
print("connected", flush=True)
sys.stdin.readline()
os.execv("/bin/sh", ["sh", "-c", 'cat "$0" >&9 && exec sleep 60', requests])
"#;

/// Point 5a: the audit trail's `exe` is the program that connected, read when kekd
/// accepted the connection. A user's process connects, and once kekd has accepted the
/// connection execs a shell, which sends the Hello and a request over the same socket: the
/// records name python, not the shell (before, `exe` was read at Hello, and named whatever
/// the process ran by then).
#[test]
fn exe_is_the_program_that_connected_not_one_it_execs_later() {
    let alice = TestUser::create("alice");
    let kekd = Kekd::builder().tenant(Tenant::new("a").allow_uid(alice.uid).admin(my_uid())).start();
    assert_traversable_by_others(kekd.socket());
    let requests = kekd.dir().join("requests.bin");
    let mut frames = Vec::new();
    for r in [req::hello(1, "a"), req::generate(2, "default", 1)] {
        kekd_proto::frame::encode_frame(&r, &mut frames);
    }
    std::fs::write(&requests, frames).expect("write the requests");
    let supervisor = kekd.pid().expect("kekd runs");
    let sockets = || open_fds(supervisor).iter().filter(|l| l.starts_with("socket:")).count();
    let before = sockets();

    let socket = kekd.socket().to_str().expect("a UTF-8 socket path").to_owned();
    let mut child = python_as(
        &alice,
        CONNECT_THEN_EXEC,
        &[&socket, requests.to_str().expect("a UTF-8 path")],
        Stdio::piped(),
    );
    let mut out = BufReader::new(child.stdout.take().expect("piped"));
    assert_eq!(line_of(&mut child, &mut out), "connected");
    // Accepted: the supervisor holds the connection while it waits for the Hello. It read
    // the caller's executable as it accepted it; a moment's grace covers the few
    // instructions between the two.
    let deadline = Instant::now() + Duration::from_secs(5);
    while sockets() <= before {
        assert!(Instant::now() < deadline, "kekd did not accept the connection within 5 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    child.stdin.as_mut().expect("piped").write_all(b"go\n").expect("tell the helper to exec");

    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    let generated = loop {
        let records = kekd.audit_records("a");
        let found = records.iter().find(|r| r["event"] == "generate" && r["peer"]["pid"] == pid);
        if let Some(r) = found {
            break r.clone();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("the helper's output");
            panic!(
                "no generate by pid {pid} in the audit trail within 10 s: {records:#?}\nhelper: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(generated["outcome"], "ok", "{generated}");
    let python = std::fs::canonicalize(PYTHON).expect("resolve python3");
    let python = python.to_str().expect("a UTF-8 path");
    assert_eq!(generated["peer"]["exe"], python, "{generated}");
    assert_eq!(generated["peer"]["uid"], alice.uid, "{generated}");
    let hello =
        kekd.wait_audit("a", Duration::from_secs(5), |r| r["event"] == "hello" && r["peer"]["pid"] == pid);
    assert_eq!(hello["peer"]["exe"], python, "{hello}");
    let _ = child.kill();
    let _ = child.wait();
}

/// Connects (as its user), says Hello with the frame given in hex, prints the answer in
/// hex, then passes the connection (SCM_RIGHTS) over stdin, a Unix socket, and exits.
const CONNECT_AND_PASS: &str = r#"
import socket, sys
path, hello = sys.argv[1], bytes.fromhex(sys.argv[2])
def read_exact(s, n):
    buf = b""
    while len(buf) < n:
        got = s.recv(n - len(buf))
        if not got:
            sys.exit("connection closed")
        buf += got
    return buf
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
s.sendall(hello)
body = read_exact(s, int.from_bytes(read_exact(s, 4), "big"))
socket.send_fds(socket.socket(fileno=0), [b"x"], [s.fileno()])
print(body.hex(), flush=True)
"#;

/// Receives a connection over stdin, sends the request given in hex on it, and prints the
/// answer in hex.
const RECEIVE_AND_USE: &str = r#"
import socket, sys
request = bytes.fromhex(sys.argv[1])
_, fds, _, _ = socket.recv_fds(socket.socket(fileno=0), 1, 1)
s = socket.socket(fileno=fds[0])
def read_exact(n):
    buf = b""
    while len(buf) < n:
        got = s.recv(n - len(buf))
        if not got:
            sys.exit("connection closed")
        buf += got
    return buf
s.sendall(request)
print(read_exact(int.from_bytes(read_exact(4), "big")).hex(), flush=True)
"#;

/// Point 6: identity is per connection. A user of tenant `a` connects and passes the
/// connection to a process of a uid in no tenant's ACL, which uses it: it is served, as
/// the user who connected, and the audit trail names that user. This is the documented
/// behaviour (README, "Access"): a connected socket is a credential.
#[test]
fn a_passed_connection_keeps_the_identity_of_the_one_that_connected() {
    let alice = TestUser::create("alice");
    let stranger = TestUser::create("stranger");
    let kekd = Kekd::builder().tenant(Tenant::new("a").allow_uid(alice.uid).admin(my_uid())).start();
    assert_traversable_by_others(kekd.socket());
    let socket = kekd.socket().to_str().expect("a UTF-8 socket path").to_owned();
    let (theirs, ours) = std::os::unix::net::UnixStream::pair().expect("a socket pair");

    let mut connecting = python_as(
        &alice,
        CONNECT_AND_PASS,
        &[&socket, &frame_hex(&[req::hello(1, "a")])],
        Stdio::from(OwnedFd::from(theirs)),
    );
    let mut using = python_as(
        &stranger,
        RECEIVE_AND_USE,
        &[&frame_hex(&[req::generate(2, "default", 1)])],
        Stdio::from(OwnedFd::from(ours)),
    );
    let mut out = BufReader::new(connecting.stdout.take().expect("piped"));
    let hello = response_of_hex(&line_of(&mut connecting, &mut out));
    assert_eq!(code(&hello), Code::Ok, "{hello:?}");
    let alices_pid = connecting.id();
    assert!(connecting.wait().expect("wait").success());
    let mut out = BufReader::new(using.stdout.take().expect("piped"));
    let generated = response_of_hex(&line_of(&mut using, &mut out));
    assert!(using.wait().expect("wait").success());
    assert_eq!(code(&generated), Code::Ok, "the stranger was served on alice's connection: {generated:?}");

    let record = kekd.wait_audit("a", Duration::from_secs(5), |r| r["event"] == "generate");
    assert_eq!(record["peer"]["uid"], alice.uid, "{record}");
    assert_eq!(record["peer"]["pid"], alices_pid, "{record}");
    assert_ne!(record["peer"]["uid"], stranger.uid, "{record}");
}
