//! The seed corpus: a few real inputs per target, built with the protocol crate's own
//! encoders. `cargo run --manifest-path fuzz/Cargo.toml --example seed_corpus` writes them
//! to `fuzz/corpus/<target>/`.

use std::collections::BTreeMap;

use kekd_proto::{
    encode_request, pb, Context, EdekItem, Hello, HelloOk, KeyName, Metadata, Op, Reply, Request, Response,
    Secret, TargetState, TenantName, WrapItem,
};
use prost::Message;

/// The tenant `kekd::fuzzing::serve_in_memory` serves.
const TENANT: &str = "fuzz";

/// Every seed: (target, file name, bytes).
pub fn all() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut add = |target, name: &str, bytes| out.push((target, name.to_string(), bytes));
    for (name, bytes) in frame() {
        add("frame", name, bytes);
    }
    for (name, bytes) in request() {
        add("request", name, bytes);
    }
    for (name, bytes) in edek() {
        add("edek", name, bytes);
    }
    for (name, bytes) in connection() {
        add("connection", name, bytes);
    }
    out
}

fn key(s: &str) -> KeyName {
    KeyName::parse(s).expect("a valid key name")
}

fn ctx(pairs: &[(&str, &str)]) -> Context {
    let map: BTreeMap<_, _> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Context::new(map).expect("a valid context")
}

/// An EDEK of the published v1 layout, with made-up nonce, ciphertext and tag.
pub fn edek_shape(name: &str, version: u32, secret_len: usize) -> Vec<u8> {
    let mut out = vec![1, 1];
    out.extend_from_slice(&(name.len() as u16).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&version.to_be_bytes());
    out.extend((0..12 + secret_len + 16).map(|i| (i * 7 + 3) as u8));
    out
}

/// One operation of each kind, valid, as a client would send it.
fn ops() -> Vec<(&'static str, Op)> {
    let edeks = || {
        vec![
            EdekItem { edek: edek_shape("default", 1, 32), context: ctx(&[("purpose", "test")]) },
            EdekItem { edek: edek_shape("billing/invoices", 2, 16), context: Context::default() },
        ]
    };
    vec![
        (
            "hello",
            Op::Hello(Hello {
                protocol_version: 1,
                tenant: TenantName::parse(TENANT).expect("valid"),
                client_name: "kekctl".into(),
            }),
        ),
        (
            "generate",
            Op::Generate { key: key("default"), edek_only: false, contexts: vec![Context::default()] },
        ),
        (
            "generate-batch",
            Op::Generate {
                key: key("default"),
                edek_only: true,
                contexts: vec![ctx(&[("a", "1")]), ctx(&[("a", "2"), ("b", "")]), Context::default()],
            },
        ),
        (
            "wrap",
            Op::Wrap {
                key: key("default"),
                items: vec![
                    WrapItem {
                        plaintext: Secret::from_vec(vec![0x42; 32]),
                        context: ctx(&[("purpose", "test")]),
                    },
                    WrapItem {
                        plaintext: Secret::from_vec(b"a small secret".to_vec()),
                        context: Context::default(),
                    },
                ],
            },
        ),
        ("unwrap", Op::Unwrap(edeks())),
        ("rewrap", Op::Rewrap(edeks())),
        ("status", Op::Status),
        ("create-key", Op::CreateKey(key("billing/invoices"))),
        ("rotate-key", Op::RotateKey(key("default"))),
        (
            "set-version-state",
            Op::SetVersionState { key: key("default"), version: 1, state: TargetState::Disabled },
        ),
        ("list-keys", Op::ListKeys),
        (
            "set-key-policy",
            Op::SetKeyPolicy { key: key("default"), min_decrypt_version: Some(2), keep_versions: Some(3) },
        ),
        ("destroy-tenant", Op::DestroyTenant { confirm: TenantName::parse(TENANT).expect("valid") }),
        ("rotate-root", Op::RotateRoot { label: Some("root-2".into()) }),
        ("root-import-key", Op::RootImportKey { label: "byok-1".into() }),
        (
            "root-import",
            Op::RootImport {
                label: "byok-1".into(),
                algorithm: "rsa-oaep-sha256-aes-kwp".into(),
                wrapped: vec![0xa5; 64],
            },
        ),
    ]
}

fn op(name: &str) -> Op {
    ops().into_iter().find(|(n, _)| *n == name).map(|(_, op)| op).expect("a known operation")
}

/// One request as a frame: length prefix and message.
fn framed(id: u64, op: Op) -> Vec<u8> {
    let mut out = Vec::new();
    encode_request(Request { id, metadata: Metadata::default(), op }, &mut out);
    out
}

fn frames(names: &[&str]) -> Vec<u8> {
    names.iter().enumerate().flat_map(|(i, n)| framed(i as u64 + 2, op(n))).collect()
}

fn with_first(first: u8, rest: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    out.extend_from_slice(rest);
    out
}

/// The first byte says how the stream is read (see `crate::frame`).
fn frame() -> Vec<(&'static str, Vec<u8>)> {
    let pipelined = frames(&["generate", "wrap", "unwrap", "status"]);
    let generate = framed(7, op("generate"));
    let mut bad_then_good = vec![0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff];
    bad_then_good.extend_from_slice(&generate);
    let mut at_limit = (crate::FRAME_MAX as u32).to_be_bytes().to_vec();
    at_limit.extend(std::iter::repeat_n(0x0a, crate::FRAME_MAX));
    vec![
        ("hello", with_first(0, &framed(1, op("hello")))),
        ("pipelined", with_first(0, &pipelined)),
        ("pipelined-1-byte-reads", with_first(1, &pipelined)),
        ("pipelined-3-byte-stalling-reads", with_first(0x83, &pipelined)),
        ("truncated-body", with_first(0, &generate[..generate.len() - 3])),
        ("truncated-length", with_first(0, &generate[..2])),
        ("length-u32-max", with_first(0, &[0xff; 4])),
        ("length-over-limit", with_first(0, &(crate::FRAME_MAX as u32 + 1).to_be_bytes())),
        ("length-at-limit", with_first(0, &at_limit)),
        ("undecodable-then-valid", with_first(0, &bad_then_good)),
        ("empty-message", with_first(0, &[0, 0, 0, 0])),
    ]
}

/// Protobuf messages without a frame: each request kind, a few invalid ones, and responses.
fn request() -> Vec<(&'static str, Vec<u8>)> {
    let mut out: Vec<_> = ops().into_iter().map(|(n, op)| (n, framed(1, op)[4..].to_vec())).collect();
    let metadata = Metadata {
        principal: "svc-billing".into(),
        data_label: "invoices-2026".into(),
        caller_request_id: "req-1".into(),
        source_address: "10.0.0.1".into(),
        fields: BTreeMap::from([("team".to_string(), "payments".to_string())]),
    };
    let mut with_metadata = Vec::new();
    encode_request(Request { id: 9, metadata, op: op("generate") }, &mut with_metadata);
    out.push(("generate-with-metadata", with_metadata[4..].to_vec()));

    let no_op = pb::Request { request_id: 3, metadata: None, op: None };
    out.push(("invalid-no-op", no_op.encode_to_vec()));
    let empty_batch = pb::Request {
        request_id: 4,
        metadata: None,
        op: Some(pb::request::Op::Generate(pb::GenerateDataKeyRequest {
            key_name: "default".into(),
            edek_only: false,
            items: vec![],
        })),
    };
    out.push(("invalid-empty-batch", empty_batch.encode_to_vec()));
    let bad_name = pb::Request {
        request_id: 5,
        metadata: None,
        op: Some(pb::request::Op::CreateKey(pb::CreateKeyRequest { key_name: "a//b".into() })),
    };
    out.push(("invalid-key-name", bad_name.encode_to_vec()));

    let hello_ok = Response {
        id: 1,
        result: Ok(Reply::Hello(HelloOk {
            protocol_version: 1,
            tenant: TenantName::parse(TENANT).expect("valid"),
            admin: false,
        })),
    };
    out.push(("response-hello-ok", pb::Response::from(hello_ok).encode_to_vec()));
    let batch = Response {
        id: 2,
        result: Ok(Reply::Batch(vec![
            Ok(kekd_proto::ItemOk {
                plaintext: Some(Secret::from_vec(vec![7; 32])),
                edek: Some(edek_shape("default", 1, 32)),
                key: key("default"),
                version: 1,
            }),
            Err(kekd_proto::ErrorStatus::new(pb::Code::DataInvalid, "invalid data")),
        ])),
    };
    out.push(("response-batch", pb::Response::from(batch).encode_to_vec()));
    out
}

/// EDEKs of the v1 layout, and broken ones.
fn edek() -> Vec<(&'static str, Vec<u8>)> {
    let good = edek_shape("default", 1, 32);
    let header = 2 + 2 + 7 + 4;
    let mut bad_format = good.clone();
    bad_format[0] = 2;
    let mut bad_alg = good.clone();
    bad_alg[1] = 2;
    let mut not_utf8 = good.clone();
    not_utf8[4] = 0xc3;
    vec![
        ("default-v1", good.clone()),
        ("chained-name", edek_shape("billing/invoices", 7, 1)),
        ("largest-secret", edek_shape("a", u32::MAX, 4096)),
        ("longest-name", edek_shape(&"n".repeat(128), 3, 32)),
        ("name-too-long", edek_shape(&"n".repeat(129), 3, 32)),
        ("invalid-name", edek_shape("a//b", 1, 32)),
        ("bad-format", bad_format),
        ("bad-algorithm", bad_alg),
        ("name-not-utf8", not_utf8),
        ("header-only", good[..header].to_vec()),
        ("no-ciphertext", good[..header + 12 + 16].to_vec()),
        ("one-byte-secret", good[..header + 12 + 17].to_vec()),
    ]
}

/// The first byte says who is connected (see `kekd::fuzzing::serve_in_memory`): 0 a user,
/// 1 an admin, 2 a user over vsock.
fn connection() -> Vec<(&'static str, Vec<u8>)> {
    let generate = framed(2, op("generate"));
    let mut invalid_then_valid = Vec::new();
    kekd_proto::frame::encode_frame(
        &pb::Request { request_id: 2, metadata: None, op: None },
        &mut invalid_then_valid,
    );
    invalid_then_valid.extend_from_slice(&framed(3, op("generate")));
    let mut undecodable = generate.clone();
    undecodable.extend_from_slice(&[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff]);
    undecodable.extend_from_slice(&framed(3, op("status")));
    let mut oversized = generate.clone();
    oversized.extend_from_slice(&[0x7f, 0xff, 0xff, 0xff]);
    // More requests than one connection may have in flight (256).
    let many: Vec<u8> = (0..300).flat_map(|i| framed(i + 2, op("status"))).collect();
    let user = frames(&["generate-batch", "wrap", "unwrap", "rewrap", "status"]);
    let admin =
        frames(&["create-key", "rotate-key", "list-keys", "set-version-state", "set-key-policy", "status"]);
    vec![
        ("user-generate", with_first(0, &generate)),
        ("user-pipelined", with_first(0, &user)),
        ("vsock-user-pipelined", with_first(2, &user)),
        ("admin-keys", with_first(1, &admin)),
        ("user-admin-ops-denied", with_first(0, &admin)),
        ("admin-root", with_first(1, &frames(&["rotate-root", "root-import-key", "root-import", "status"]))),
        ("admin-destroy-tenant", with_first(1, &frames(&["destroy-tenant", "generate", "status"]))),
        ("second-hello", with_first(0, &frames(&["hello", "generate"]))),
        ("invalid-then-valid", with_first(0, &invalid_then_valid)),
        ("undecodable-frame", with_first(0, &undecodable)),
        ("oversized-frame", with_first(0, &oversized)),
        ("truncated-frame", with_first(0, &generate[..generate.len() - 1])),
        ("many-in-flight", with_first(0, &many)),
        ("close-at-once", vec![0]),
    ]
}
