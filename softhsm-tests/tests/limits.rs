//! Resource limits (issue 9 "[hardening]", point 2), through the real daemon and socket:
//! connections per tenant and overall, requests in flight per connection, the read timeout
//! of a partly received frame (slowloris), the write timeout of a client that stops reading
//! and the batch size. Each limit answers
//! RESOURCE_EXHAUSTED (a batch: INVALID_ARGUMENT, like the protocol's own batch limit) or
//! holds the client back, and every other client keeps being served, during and after.
//! Each test configures small limits and short timeouts of its own.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use kekd_proto::pb;
use prost::Message as _;
use softhsm_tests::{batch_items, code, exit, req, Code, Kekd, RawConn, Tenant, IO_TIMEOUT};

/// Starts a daemon serving `tenants`, all usable by the user running the tests, with these
/// lines in its `[limits]` table.
#[track_caller]
fn kekd_with_limits(tenants: &[&str], limits: &str) -> Kekd {
    let mut builder = Kekd::builder();
    for t in tenants {
        builder = builder.tenant(Tenant::owned_by_me(t));
    }
    let mut kekd = builder.prepare();
    kekd.write_config_text(&format!("{}\n[limits]\n{limits}\n", kekd.config_text()));
    kekd.start();
    kekd
}

/// A connection that has done Hello is still served: status, and a wrap/unwrap round trip.
#[track_caller]
fn assert_served(conn: &mut RawConn, id: u64) {
    let resp = conn.call(&req::status(id));
    assert_eq!(code(&resp), Code::Ok, "{resp:?}");
    let edek =
        batch_items(conn.call(&req::wrap(id + 1, "default", &[b"still here".to_vec()], &[]))).remove(0).edek;
    let back = batch_items(conn.call(&req::unwrap(id + 2, &[edek], &[]))).remove(0);
    assert_eq!(back.plaintext, b"still here");
}

/// Connects and sends a Hello for `tenant`; returns the connection and the answer.
#[track_caller]
fn hello(kekd: &Kekd, tenant: &str) -> (RawConn, pb::Response) {
    let mut conn = RawConn::connect(kekd.socket());
    let resp = conn.call(&req::hello(3, tenant));
    (conn, resp)
}

/// Asserts that a Hello for `tenant` is refused with RESOURCE_EXHAUSTED naming `setting`,
/// and that the connection is closed after it.
#[track_caller]
fn assert_refused(kekd: &Kekd, tenant: &str, setting: &str) {
    let (mut conn, resp) = hello(kekd, tenant);
    assert_eq!(code(&resp), Code::ResourceExhausted, "{resp:?}");
    let message = resp.status.map(|s| s.message).unwrap_or_default();
    assert!(message.contains(setting), "the refusal should name {setting}: {message:?}");
    conn.assert_closed();
}

/// Opens a connection for `tenant` as soon as there is room again (the daemon frees a
/// place once the worker has closed the connection that held it), within 5 s.
#[track_caller]
fn admitted_again(kekd: &Kekd, tenant: &str) -> RawConn {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (conn, resp) = hello(kekd, tenant);
        match code(&resp) {
            Code::Ok => return conn,
            Code::ResourceExhausted if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            _ => panic!("a closed connection should have made room for {tenant}: {resp:?}"),
        }
    }
}

#[test]
fn connections_over_the_tenant_limit_are_refused_and_other_tenants_are_served() {
    let kekd = kekd_with_limits(&["acme", "globex"], "max_connections = 10\nmax_connections_per_tenant = 2");
    let mut first = kekd.raw("acme");
    let mut second = kekd.raw("acme");

    assert_refused(&kekd, "acme", "limits.max_connections_per_tenant");
    kekd.kekctl_for("acme").arg("status").run().assert_error(exit::RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED");
    // Another tenant, and acme's open connections, are served all along.
    let mut globex = kekd.raw("globex");
    assert_served(&mut globex, 10);
    let mut globex_too = kekd.raw("globex");
    assert_served(&mut globex_too, 20);
    assert_served(&mut first, 30);
    assert_served(&mut second, 40);

    // A connection that closes makes room for one more, and no more.
    drop(first);
    let mut third = admitted_again(&kekd, "acme");
    assert_served(&mut third, 50);
    assert_refused(&kekd, "acme", "limits.max_connections_per_tenant");
    assert_served(&mut second, 60);
    kekd.wait_for_log("max_connections_per_tenant", Duration::from_secs(5));
}

#[test]
fn connections_over_the_overall_limit_are_refused_and_the_open_ones_are_served() {
    let kekd = kekd_with_limits(
        &["acme", "globex"],
        "max_connections = 3\nmax_connections_per_tenant = 3\nframe_read_timeout = \"5s\"",
    );
    let mut acme = kekd.raw("acme");
    let mut globex = kekd.raw("globex");
    // A connection that has not said Hello (yet) holds a place too.
    let silent = RawConn::connect(kekd.socket());
    std::thread::sleep(Duration::from_millis(300));

    for tenant in ["acme", "globex", "no-such-tenant"] {
        assert_refused(&kekd, tenant, "limits.max_connections");
    }
    let out = kekd.kekctl_for("globex").arg("status").run();
    out.assert_error(exit::RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED");
    assert!(out.stderr.contains("max_connections"), "{}", out.stderr);
    assert_served(&mut acme, 10);
    assert_served(&mut globex, 20);

    // The silent one goes: its place is free at once, for any tenant.
    drop(silent);
    let mut again = admitted_again(&kekd, "globex");
    assert_served(&mut again, 30);
    assert_refused(&kekd, "acme", "limits.max_connections");
    // And a served connection that closes frees its place once its worker let it go.
    drop(acme);
    let mut acme = admitted_again(&kekd, "acme");
    assert_served(&mut acme, 40);
    assert_served(&mut globex, 50);
    kekd.wait_for_log("max_connections are open", Duration::from_secs(5));
}

#[test]
fn a_frame_not_finished_in_time_closes_its_connection_while_idle_ones_stay() {
    let timeout = Duration::from_millis(500);
    let kekd = kekd_with_limits(&["acme"], "frame_read_timeout = \"500ms\"");
    let mut idle = kekd.raw("acme");
    let mut other = kekd.raw("acme");
    let started = Instant::now();

    let mut request = Vec::new();
    kekd_proto::frame::encode_frame(&req::status(1), &mut request);
    // Two bytes of a length prefix; a prefix and half a body; a whole frame, a byte every
    // 150 ms (each byte in time, the frame not).
    let cases: [(&str, &[u8], Option<Duration>); 3] = [
        ("half a length prefix", &request[..2], None),
        ("half a frame", &request[..4 + (request.len() - 4) / 2], None),
        ("a frame trickled in", &request, Some(Duration::from_millis(150))),
    ];
    for (what, bytes, pace) in cases {
        let mut slow = kekd.raw("acme");
        let sent = Instant::now();
        match pace {
            None => slow.send_bytes(bytes).expect("send part of a frame"),
            Some(pace) => {
                for b in bytes {
                    // Refused once the daemon has closed the connection.
                    if slow.send_bytes(&[*b]).is_err() {
                        break;
                    }
                    std::thread::sleep(pace);
                }
            }
        }
        if pace.is_none() {
            // Still waiting for the rest: the others are served meanwhile.
            assert_served(&mut other, 100);
        }
        match slow.recv() {
            Some(resp) => {
                assert_eq!(code(&resp), Code::ResourceExhausted, "{what}: {resp:?}");
                let message = resp.status.map(|s| s.message).unwrap_or_default();
                assert!(message.contains("limits.frame_read_timeout"), "{what}: {message:?}");
                slow.assert_closed();
            }
            None => panic!("{what}: closed without saying why"),
        }
        let took = sent.elapsed();
        assert!(took >= timeout - Duration::from_millis(50), "{what}: cut after {took:?}");
        assert!(took < timeout + Duration::from_secs(3), "{what}: cut only after {took:?}");
        assert_served(&mut other, 200);
    }

    // A connection that never says Hello is dropped after the same time.
    let mut mute = RawConn::connect(kekd.socket());
    let sent = Instant::now();
    mute.assert_closed();
    assert!(sent.elapsed() >= timeout - Duration::from_millis(50), "{:?}", sent.elapsed());

    // Idle between frames for far longer than the timeout is fine.
    assert!(started.elapsed() > 3 * timeout);
    assert_served(&mut idle, 300);
    assert_served(&mut kekd.raw("acme"), 400);
    kekd.wait_for_log("not completed within frame_read_timeout", Duration::from_secs(5));
}

/// A plain connection whose halves can be used from two threads.
fn open_split(kekd: &Kekd, tenant: &str) -> (UnixStream, UnixStream) {
    let mut stream = UnixStream::connect(kekd.socket()).expect("connect");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut frame = Vec::new();
    kekd_proto::frame::encode_frame(&req::hello(0, tenant), &mut frame);
    stream.write_all(&frame).unwrap();
    assert_eq!(code(&read_response(&mut stream)), Code::Ok);
    let writer = stream.try_clone().unwrap();
    (stream, writer)
}

fn read_response(stream: &mut UnixStream) -> pb::Response {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).expect("a response");
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    stream.read_exact(&mut body).expect("a whole response");
    pb::Response::decode(&body[..]).expect("a response frame")
}

/// `kekctl status --json`'s count of wrap requests served: over another connection, so
/// every call also shows that others are served.
fn wraps_served(kekd: &Kekd) -> u64 {
    let s = kekd.kekctl_for("acme").json().arg("status").run().json();
    s["operations"]["wrap"]["requests"].as_u64().unwrap_or(0)
}

#[test]
fn requests_in_flight_are_bounded_by_not_reading_further_frames() {
    const IN_FLIGHT: u64 = 2;
    const REQUESTS: u64 = 16;
    const ITEMS: usize = 96;
    let kekd = kekd_with_limits(&["acme"], &format!("max_in_flight_per_connection = {IN_FLIGHT}"));
    // Each answer (96 EDEKs of 4 KiB secrets, about 400 KB) is more than the socket takes
    // in one go, so a client that does not read its answers holds the first one back in
    // the daemon, and with it every slot behind it.
    let secrets = vec![vec![0x5a; 4096]; ITEMS];
    let (mut reader, mut writer) = open_split(&kekd, "acme");
    let sender = std::thread::spawn(move || {
        for id in 1..=REQUESTS {
            let mut frame = Vec::new();
            kekd_proto::frame::encode_frame(&req::wrap(id, "default", &secrets, &[]), &mut frame);
            writer.write_all(&frame).expect("the daemon reads on once answers are read");
        }
    });

    // What the socket holds beyond the answer being written, in answers.
    let wmem: u64 = std::fs::read_to_string("/proc/sys/net/core/wmem_default")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(212_992);
    let buffered = (2 * wmem).div_ceil(400_000);
    let bound = IN_FLIGHT + 1 + buffered;
    assert!(bound < REQUESTS, "the test needs answers larger than the socket buffer");
    // Served so far, until it stops growing.
    let (mut served, mut steady_since) = (wraps_served(&kekd), Instant::now());
    while steady_since.elapsed() < Duration::from_millis(800) {
        std::thread::sleep(Duration::from_millis(100));
        let now = wraps_served(&kekd);
        assert!(now <= bound, "{now} requests served while the client read no answer (bound {bound})");
        if now != served {
            (served, steady_since) = (now, Instant::now());
        }
    }
    assert!(served >= 1, "the connection was served at all");
    assert!(!sender.is_finished(), "the client could send all its requests: nothing held it back");
    // Another connection of the same tenant is served meanwhile.
    assert_served(&mut kekd.raw("acme"), 1000);

    // Reading the answers lets the rest through: every request is answered.
    let mut ids = Vec::new();
    for _ in 0..REQUESTS {
        let resp = read_response(&mut reader);
        assert_eq!(code(&resp), Code::Ok, "{:?}", resp.status);
        ids.push(resp.request_id);
    }
    sender.join().unwrap();
    ids.sort_unstable();
    assert_eq!(ids, (1..=REQUESTS).collect::<Vec<_>>());
    assert_eq!(wraps_served(&kekd), REQUESTS + 1, "with the other connection's wrap");
}

#[test]
fn a_client_that_stops_reading_is_cut_off_after_write_timeout_and_others_are_served() {
    let kekd = kekd_with_limits(&["acme"], "write_timeout = \"500ms\"");
    let secrets = vec![vec![0x5a; 4096]; 96];
    let (mut reader, mut writer) = open_split(&kekd, "acme");
    // Answers of some 400 KB each, more than the socket holds, never read.
    let sender = std::thread::spawn(move || {
        for id in 1.. {
            let mut frame = Vec::new();
            kekd_proto::frame::encode_frame(&req::wrap(id, "default", &secrets, &[]), &mut frame);
            if writer.write_all(&frame).is_err() {
                return id;
            }
        }
        unreachable!()
    });
    kekd.wait_for_log("did not take its answers within limits.write_timeout", Duration::from_secs(10));
    // The connection is closed: what the socket still held, then the end.
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).expect("the daemon closes the connection, not just stops writing");
    let sent = sender.join().unwrap();
    assert!(sent > 1, "the client got some requests in before it was cut off");
    assert_served(&mut kekd.raw("acme"), 1000);
}

#[test]
fn a_batch_over_max_batch_items_is_refused_and_the_connection_serves_on() {
    let kekd = kekd_with_limits(&["acme"], "max_batch_items = 8");
    let mut conn = kekd.raw("acme");
    let resp = conn.call(&req::generate(1, "default", 9));
    assert_eq!(code(&resp), Code::InvalidArgument, "{resp:?}");
    let message = resp.status.map(|s| s.message).unwrap_or_default();
    assert!(message.contains("9 items exceed the limit of 8 (limits.max_batch_items)"), "{message:?}");

    // The same connection, at the limit.
    let items = batch_items(conn.call(&req::generate(2, "default", 8)));
    assert_eq!(items.len(), 8);
    let edeks: Vec<Vec<u8>> = items.into_iter().map(|i| i.edek).collect();
    assert_eq!(batch_items(conn.call(&req::unwrap(3, &edeks, &[]))).len(), 8);
    let nine: Vec<Vec<u8>> = edeks.iter().chain(&edeks[..1]).cloned().collect();
    for over in [
        req::unwrap(4, &nine, &[]),
        req::rewrap(5, &nine, &[]),
        req::wrap(6, "default", &vec![vec![1]; 9], &[]),
    ] {
        let resp = conn.call(&over);
        assert_eq!(code(&resp), Code::InvalidArgument, "{resp:?}");
    }
    assert_served(&mut conn, 10);
    kekd.kekctl()
        .args(["generate", "--key", "default", "--count", "9"])
        .run()
        .assert_error(exit::INVALID_ARGUMENT, "INVALID_ARGUMENT");
    kekd.kekctl().args(["generate", "--key", "default", "--count", "8", "--edek-only"]).run().ok();
}
