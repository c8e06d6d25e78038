//! Envelope encryption end to end (issue 2, points 4 and 11): round trips, batches with
//! per-item status, and the uniform DATA_INVALID for tampered, foreign, mis-contexted or
//! unknown-version EDEKs. Batches go over a raw connection, so hundreds of cases cost one
//! request each.

use softhsm_tests::{
    batch_items, edek_with_version, exit, item_code, parse_edek, random_bytes, req, Code, Kekd, Tenant,
};

const CTX: &[(&str, &str)] = &[("purpose", "envelope-test"), ("row", "42")];

#[test]
fn every_operation_round_trips_through_kekctl() {
    let kekd = Kekd::start_default();
    kekd.kekctl().arg("status").run().ok();

    let (plaintext, edek) = kekd.generate("default", CTX);
    assert_eq!(kekd.unwrap(&edek, CTX).ok(), &plaintext[..]);

    let secret = random_bytes(100);
    let wrapped = kekd.wrap("default", &secret, CTX);
    assert_eq!(kekd.unwrap(&wrapped, CTX).ok(), &secret[..]);

    let rewrapped = kekd.rewrap(&wrapped, CTX).ok().to_vec();
    assert_eq!(kekd.unwrap(&rewrapped, CTX).ok(), &secret[..]);
}

#[test]
fn batches_of_100_round_trip_in_order() {
    let kekd = Kekd::start_default();
    let mut conn = kekd.raw("acme");

    let items = batch_items(conn.call(&req::generate(1, "default", 100)));
    assert_eq!(items.len(), 100);
    let mut plaintexts = Vec::new();
    let mut edeks = Vec::new();
    for it in items {
        assert_eq!(item_code(&it), Code::Ok, "{it:?}");
        assert_eq!(it.plaintext.len(), 32);
        assert_eq!((it.key_name.as_str(), it.key_version), ("default", 1));
        plaintexts.push(it.plaintext);
        edeks.push(it.edek);
    }
    let mut distinct = plaintexts.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 100, "100 generated keys must all differ");

    let back = batch_items(conn.call(&req::unwrap(2, &edeks, &[])));
    let back: Vec<_> = back.into_iter().map(|it| it.plaintext).collect();
    assert_eq!(back, plaintexts, "unwrap answers item i with the key of EDEK i");

    // Wrap of caller secrets of various sizes, then unwrap with the same context.
    let secrets: Vec<Vec<u8>> = (1..=100).map(|n| random_bytes(n * 40)).collect();
    let wrapped = batch_items(conn.call(&req::wrap(3, "default", &secrets, CTX)));
    let wrapped: Vec<Vec<u8>> = wrapped
        .into_iter()
        .map(|it| {
            assert_eq!(item_code(&it), Code::Ok, "{it:?}");
            assert!(it.plaintext.is_empty(), "wrap must not echo the secret");
            it.edek
        })
        .collect();
    let back = batch_items(conn.call(&req::unwrap(4, &wrapped, CTX)));
    assert_eq!(back.into_iter().map(|it| it.plaintext).collect::<Vec<_>>(), secrets);
}

#[test]
fn one_bad_item_fails_alone() {
    let kekd = Kekd::start_default();
    let mut conn = kekd.raw("acme");
    let secrets: Vec<Vec<u8>> = (0..100u8).map(|i| vec![i; 16]).collect();
    let mut edeks: Vec<Vec<u8>> = batch_items(conn.call(&req::wrap(1, "default", &secrets, &[])))
        .into_iter()
        .map(|it| it.edek)
        .collect();
    let last = edeks[50].len() - 1;
    edeks[50][last] ^= 0x80;

    for (id, request) in [(2, req::unwrap(2, &edeks, &[])), (3, req::rewrap(3, &edeks, &[]))] {
        let items = batch_items(conn.call(&request));
        assert_eq!(items.len(), 100, "request {id}");
        for (i, it) in items.iter().enumerate() {
            if i == 50 {
                assert_eq!(item_code(it), Code::DataInvalid, "request {id}, the damaged item: {it:?}");
                assert!(it.plaintext.is_empty() && it.edek.is_empty(), "a failed item carries no data");
            } else {
                assert_eq!(item_code(it), Code::Ok, "request {id}, item {i}: {it:?}");
            }
        }
        if id == 2 {
            for (i, it) in items.iter().enumerate().filter(|(i, _)| *i != 50) {
                assert_eq!(it.plaintext, secrets[i], "item {i}");
            }
        }
    }
}

/// Every byte of an EDEK flipped in turn (one bit, then all bits), and truncations and
/// extensions: each is DATA_INVALID with one and the same message, while the intact EDEK in
/// the same batch unwraps.
#[test]
fn every_tampered_byte_is_data_invalid() {
    let kekd = Kekd::start_default();
    let mut conn = kekd.raw("acme");
    let item = batch_items(conn.call(&req::wrap(1, "default", &[b"tamper me".to_vec()], CTX))).remove(0);
    let edek = item.edek;

    let mut cases = vec![edek.clone()];
    for mask in [0x01u8, 0xff] {
        for i in 0..edek.len() {
            let mut t = edek.clone();
            t[i] ^= mask;
            cases.push(t);
        }
    }
    for cut in [1, 16, edek.len() - 1] {
        cases.push(edek[..edek.len() - cut].to_vec());
    }
    let mut longer = edek.clone();
    longer.push(0);
    cases.push(longer);

    let items = batch_items(conn.call(&req::unwrap(2, &cases, CTX)));
    assert_eq!(items.len(), cases.len());
    assert_eq!(item_code(&items[0]), Code::Ok, "the intact EDEK: {:?}", items[0]);
    assert_eq!(items[0].plaintext, b"tamper me");

    let first_message = items[1].status.as_ref().map(|s| s.message.clone()).unwrap_or_default();
    for (i, it) in items.iter().enumerate().skip(1) {
        assert_eq!(item_code(it), Code::DataInvalid, "case {i} ({:02x?}) was not rejected: {it:?}", cases[i]);
        assert!(it.plaintext.is_empty(), "case {i} returned a plaintext");
        let message = it.status.as_ref().map(|s| s.message.clone()).unwrap_or_default();
        assert_eq!(message, first_message, "case {i}: DATA_INVALID must not say what was wrong (no oracle)");
    }

    // Rewrap refuses them the same way.
    let items = batch_items(conn.call(&req::rewrap(3, &cases[1..], CTX)));
    assert!(items.iter().all(|it| item_code(it) == Code::DataInvalid && it.edek.is_empty()), "{items:?}");
}

#[test]
fn wrong_context_is_data_invalid() {
    let kekd = Kekd::start_default();
    let mut conn = kekd.raw("acme");
    let edek = batch_items(conn.call(&req::wrap(1, "default", &[b"s".to_vec()], CTX))).remove(0).edek;
    let wrong: &[&[(&str, &str)]] = &[
        &[],
        &[("purpose", "envelope-test")],
        &[("purpose", "envelope-test"), ("row", "43")],
        &[("purpose", "envelope-test"), ("row", "42"), ("more", "")],
        &[("purpose", "envelope-test"), ("row", "42 ")],
        &[("purpose", "envelope-test"), ("rov", "42")],
    ];
    for (i, ctx) in wrong.iter().enumerate() {
        let items = batch_items(conn.call(&req::unwrap(10 + i as u64, std::slice::from_ref(&edek), ctx)));
        assert_eq!(item_code(&items[0]), Code::DataInvalid, "context {ctx:?}: {:?}", items[0]);
    }
    let items = batch_items(conn.call(&req::unwrap(2, &[edek], CTX)));
    assert_eq!(items[0].plaintext, b"s");
}

#[test]
fn another_tenants_edek_is_data_invalid() {
    let kekd =
        Kekd::builder().tenant(Tenant::owned_by_me("acme")).tenant(Tenant::owned_by_me("beta")).start();
    let (a_key, a_edek) = kekd.generate("default", CTX);
    let b_edek =
        kekd.kekctl_for("beta").args(["wrap", "--key", "default"]).stdin(&b"beta"[..]).run().ok().to_vec();

    // Both tenants have key "default" version 1: the headers look alike, the tenants differ.
    assert_eq!(parse_edek(&a_edek).key, parse_edek(&b_edek).key);
    assert_eq!(parse_edek(&a_edek).version, parse_edek(&b_edek).version);

    let beta = |args: &[&str], stdin: &[u8]| {
        let mut k = kekd.kekctl_for("beta");
        for (n, v) in CTX {
            k = k.context(n, v);
        }
        k.args(args).stdin(stdin).run()
    };
    beta(&["unwrap"], &a_edek).assert_error(exit::DATA_INVALID, "DATA_INVALID");
    beta(&["rewrap"], &a_edek).assert_error(exit::DATA_INVALID, "DATA_INVALID");
    kekd.unwrap(&b_edek, &[]).assert_error(exit::DATA_INVALID, "DATA_INVALID");

    // Each still works at home.
    assert_eq!(kekd.unwrap(&a_edek, CTX).ok(), &a_key[..]);
    assert_eq!(kekd.kekctl_for("beta").arg("unwrap").stdin(b_edek).run().ok(), b"beta");
}

#[test]
fn unknown_version_or_key_in_an_edek_is_data_invalid() {
    let kekd = Kekd::start_default();
    kekd.keys(["create", "another"]).ok();
    let edek = kekd.wrap("default", b"versioned", &[]);
    assert_eq!(parse_edek(&edek).version, 1);

    for v in [0, 2, 7, u32::MAX] {
        kekd.unwrap(&edek_with_version(&edek, v), &[]).assert_error(exit::DATA_INVALID, "DATA_INVALID");
        kekd.rewrap(&edek_with_version(&edek, v), &[]).assert_error(exit::DATA_INVALID, "DATA_INVALID");
    }

    // The same EDEK naming a key that does not exist, or another key of the same length
    // that does: never NOT_FOUND, which would tell which keys exist.
    for name in ["defaulx", "another"] {
        let mut renamed = edek.clone();
        renamed[4..11].copy_from_slice(name.as_bytes());
        kekd.unwrap(&renamed, &[]).assert_error(exit::DATA_INVALID, "DATA_INVALID");
    }
    assert_eq!(kekd.unwrap(&edek, &[]).ok(), b"versioned");
}
