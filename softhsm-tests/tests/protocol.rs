//! The wire protocol seen from a misbehaving or impatient client (issue 2, points 4 and 11):
//! malformed frames and oversized length prefixes get an error and a closed connection,
//! while every other connection keeps being served; Hello is checked; requests pipeline.

use std::collections::HashMap;

use kekd_proto::pb;
use softhsm_tests::{batch_items, code, item_code, req, Code, Kekd, RawConn, Tenant};

const MAX_FRAME: usize = 4096;

fn kekd() -> Kekd {
    Kekd::builder()
        .tenant(Tenant::owned_by_me("acme"))
        .tenant(Tenant::new("locked").allow_uid(4242))
        .max_frame_bytes(MAX_FRAME)
        .start()
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

#[track_caller]
fn assert_refused_and_closed(conn: &mut RawConn, allowed: &[Code], what: &str) {
    let resp = conn.recv().unwrap_or_else(|| panic!("{what}: connection closed without an error response"));
    assert!(allowed.contains(&code(&resp)), "{what}: expected one of {allowed:?}, got {resp:?}");
    conn.assert_closed();
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

#[test]
fn garbage_protobuf_is_invalid_argument_and_others_keep_working() {
    let kekd = kekd();
    let mut other = kekd.raw("acme");
    assert_served(&mut other, 100);

    // After Hello.
    let mut bad = kekd.raw("acme");
    bad.send_bytes(&frame(&[0xff; 8])).expect("send garbage");
    assert_refused_and_closed(&mut bad, &[Code::InvalidArgument], "garbage after hello");
    assert_served(&mut other, 200);

    // As the very first frame.
    let mut bad = RawConn::connect(kekd.socket());
    bad.send_bytes(&frame(b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff")).expect("send garbage");
    assert_refused_and_closed(&mut bad, &[Code::InvalidArgument], "garbage instead of hello");
    assert_served(&mut other, 300);

    // A well-formed frame holding a request without an operation.
    let mut bad = kekd.raw("acme");
    bad.send(&pb::Request { request_id: 5, metadata: None, op: None });
    let resp = bad.recv().expect("an answer to a request without an operation");
    assert_eq!(code(&resp), Code::InvalidArgument, "{resp:?}");

    assert_served(&mut kekd.raw("acme"), 400);
    assert_served(&mut other, 500);
}

#[test]
fn oversized_length_prefix_is_refused_and_others_keep_working() {
    let kekd = kekd();
    let mut other = kekd.raw("acme");
    assert_served(&mut other, 100);
    let refused = [Code::ResourceExhausted, Code::InvalidArgument];

    // 1 GiB announced, nothing sent after it: the daemon must answer without waiting for it.
    let mut big = kekd.raw("acme");
    big.send_bytes(&(1u32 << 30).to_be_bytes()).expect("send a length prefix");
    assert_refused_and_closed(&mut big, &refused, "1 GiB length prefix");
    assert_served(&mut other, 200);

    // One byte over the configured limit.
    let mut over = kekd.raw("acme");
    over.send_bytes(&(MAX_FRAME as u32 + 1).to_be_bytes()).expect("send a length prefix");
    assert_refused_and_closed(&mut over, &refused, "limit + 1");

    // u32::MAX before Hello.
    let mut first = RawConn::connect(kekd.socket());
    first.send_bytes(&u32::MAX.to_be_bytes()).expect("send a length prefix");
    assert_refused_and_closed(&mut first, &refused, "u32::MAX as the first frame");

    assert_served(&mut other, 300);
    assert_served(&mut kekd.raw("acme"), 400);

    // A request that fits in the limit is fine (a 2 KiB secret).
    let mut conn = kekd.raw("acme");
    let edek = batch_items(conn.call(&req::wrap(1, "default", &[vec![7; 2048]], &[]))).remove(0).edek;
    assert_eq!(batch_items(conn.call(&req::unwrap(2, &[edek], &[]))).remove(0).plaintext, vec![7; 2048]);
}

#[test]
fn truncated_frames_and_abrupt_closes_do_not_disturb_others() {
    let kekd = kekd();
    let mut other = kekd.raw("acme");
    for (i, bytes) in [&[0u8, 0][..], &frame(&[1, 2, 3, 4, 5, 6, 7, 8])[..6], &[][..]].iter().enumerate() {
        let mut c = kekd.raw("acme");
        c.send_bytes(bytes).expect("send a partial frame");
        drop(c);
        assert_served(&mut other, 100 * (i as u64 + 1));
    }
}

#[test]
fn hello_is_checked_first() {
    let kekd = kekd();
    let mut other = kekd.raw("acme");

    let mut c = RawConn::connect(kekd.socket());
    c.send(&req::status(1));
    let resp = c.recv().expect("an error answer to a request before hello");
    assert_ne!(code(&resp), Code::Ok, "a request before hello must be refused: {resp:?}");
    c.assert_closed();

    let mut c = RawConn::connect(kekd.socket());
    let resp = c.call(&req::hello(1, "ghost"));
    assert_eq!(code(&resp), Code::NotFound, "unknown tenant: {resp:?}");
    c.assert_closed();

    let mut c = RawConn::connect(kekd.socket());
    let resp = c.call(&req::hello(1, "locked"));
    assert_eq!(code(&resp), Code::PermissionDenied, "tenant whose ACL does not name us: {resp:?}");
    c.assert_closed();

    let mut c = RawConn::connect(kekd.socket());
    let resp = c.call(&req::hello(7, "acme"));
    assert_eq!(code(&resp), Code::Ok);
    match resp.result {
        Some(pb::response::Result::Hello(h)) => {
            assert_eq!(h.tenant, "acme");
            assert_eq!(h.protocol_version, kekd_proto::PROTOCOL_VERSION);
            assert!(h.admin, "we are acme's admin");
        }
        other => panic!("expected HelloOk, got {other:?}"),
    }
    assert_served(&mut other, 10);
}

/// Many requests written back to back before reading anything: every one is answered once,
/// with its own request id and its own result.
#[test]
fn requests_pipeline_on_one_connection() {
    let kekd = kekd();
    let mut conn = kekd.raw("acme");
    let secrets: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 20 + i as usize]).collect();
    let edeks: Vec<Vec<u8>> = batch_items(conn.call(&req::wrap(1, "default", &secrets, &[])))
        .into_iter()
        .map(|it| it.edek)
        .collect();

    #[derive(Debug)]
    enum Want {
        Plaintext(Vec<u8>),
        Status,
        TwoKeys,
    }
    let mut expected: HashMap<u64, Want> = HashMap::new();
    for (i, edek) in edeks.iter().enumerate() {
        let id = 1000 + i as u64 * 3;
        conn.send(&req::unwrap(id, std::slice::from_ref(edek), &[]));
        expected.insert(id, Want::Plaintext(secrets[i].clone()));
        conn.send(&req::status(id + 1));
        expected.insert(id + 1, Want::Status);
        conn.send(&req::generate(id + 2, "default", 2));
        expected.insert(id + 2, Want::TwoKeys);
    }
    let total = expected.len();
    for _ in 0..total {
        let resp = conn.recv().expect("an answer for every pipelined request");
        assert_eq!(code(&resp), Code::Ok, "{resp:?}");
        let id = resp.request_id;
        let want = expected.remove(&id).unwrap_or_else(|| panic!("unexpected or repeated request id {id}"));
        match (want, resp.result) {
            (Want::Plaintext(secret), Some(pb::response::Result::Batch(b))) => {
                assert_eq!(b.items.len(), 1);
                assert_eq!(item_code(&b.items[0]), Code::Ok);
                assert_eq!(b.items[0].plaintext, secret, "request {id} got another request's answer");
            }
            (Want::Status, Some(pb::response::Result::StatusInfo(s))) => assert_eq!(s.tenant, "acme"),
            (Want::TwoKeys, Some(pb::response::Result::Batch(b))) => {
                assert_eq!(b.items.len(), 2, "generate of 2");
                assert!(b.items.iter().all(|it| it.plaintext.len() == 32 && !it.edek.is_empty()));
            }
            (want, got) => panic!("request {id}: expected {want:?}, got {got:?}"),
        }
    }
    assert!(expected.is_empty());
}
