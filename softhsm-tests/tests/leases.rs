//! KEK leases end to end (issue 5, point 1; DESIGN §5): revocation within one poll, an
//! outage ridden out for `offline_grace`, and failing closed when the grace is zero.
//!
//! An unreachable token is SoftHSM2 behind the fixture's outage switch (a PKCS#11 proxy
//! that answers CKR_DEVICE_ERROR while cut, as a network HSM whose link is down).

use std::time::{Duration, Instant};

use softhsm_tests::{exit, Kekd, Tenant};

fn lease(kekd: &Kekd) -> String {
    let s = kekd.kekctl().json().arg("status").run().json();
    s["lease"].as_str().unwrap_or_else(|| panic!("status has no lease: {s}")).to_owned()
}

/// Polls `unwrap` every 100 ms until it stops succeeding; returns when (from `since`) the
/// first failing call started, with its output. kekctl retries UNAVAILABLE for about
/// 1.5 s before it gives up, so the start of the call is the time that counts. Panics if
/// a call started at `deadline` still succeeds.
fn first_failure(
    kekd: &Kekd,
    edek: &[u8],
    since: Instant,
    deadline: Duration,
) -> (Duration, softhsm_tests::Output) {
    loop {
        let at = since.elapsed();
        let out = kekd.unwrap(edek, &[]);
        if out.code != exit::OK {
            return (at, out);
        }
        assert!(at < deadline, "unwrap still served {at:?} after the change (bound {deadline:?})");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// (a) The root key deleted from the token: every unwrap fails within revocation_poll +
/// 1 s, although the KEK is cached for minutes.
#[test]
fn a_deleted_root_key_stops_every_unwrap_within_one_poll() {
    let kekd =
        Kekd::builder().tenant(Tenant::owned_by_me("acme").kek_ttl("5m").revocation_poll("2s")).start();
    let (plain, edek) = kekd.generate("default", &[]);
    assert_eq!(kekd.unwrap(&edek, &[]).ok(), &plain[..]);

    kekd.destroy_root_key("acme");
    let deleted = Instant::now();
    let (at, out) = first_failure(&kekd, &edek, deleted, Duration::from_secs(3));
    out.assert_error(exit::FAILED_PRECONDITION, "FAILED_PRECONDITION");
    eprintln!("first refused unwrap {at:?} after the deletion (revocation_poll = 2s)");
    // And it stays refused: nothing cached survived.
    for _ in 0..5 {
        kekd.unwrap(&edek, &[]).assert_error(exit::FAILED_PRECONDITION, "FAILED_PRECONDITION");
    }
    let s = kekd.kekctl().json().arg("status").run().json();
    assert_eq!(s["cached_keks"], 0, "{s}");
    // The flush is a lease event in the audit trail.
    let revoked = kekd.wait_audit("acme", Duration::from_secs(2), |r| r["detail"]["lease"] == "revoked");
    assert_eq!(revoked["code"], "FAILED_PRECONDITION", "{revoked}");
    assert!(revoked["detail"]["flushed_keks"].as_u64().unwrap() >= 1, "{revoked}");
}

/// (b) The token unreachable: cached KEKs keep serving for offline_grace after the last
/// successful root-key operation, then UNAVAILABLE; service resumes within 5 s of the
/// token coming back.
#[test]
fn an_unreachable_token_is_ridden_out_for_offline_grace() {
    let kekd = Kekd::builder()
        .tenant(
            Tenant::owned_by_me("acme")
                .behind_outage_switch()
                .kek_ttl("2s")
                .offline_grace("6s")
                .revocation_poll("1s"),
        )
        .start();
    let (plain, edek) = kekd.generate("default", &[]);
    assert_eq!(lease(&kekd), "online");

    kekd.cut_token("acme");
    let cut = Instant::now();
    // Well past kek_ttl, within the grace: still served from locked memory.
    while cut.elapsed() < Duration::from_secs(4) {
        assert_eq!(kekd.unwrap(&edek, &[]).ok(), &plain[..], "{:?} into the outage", cut.elapsed());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(lease(&kekd), "grace");
    // The grace counts from the last success (at most one poll, 1 s, before the cut).
    let (at, out) = first_failure(&kekd, &edek, cut, Duration::from_secs(8));
    out.assert_error(exit::UNAVAILABLE, "UNAVAILABLE");
    assert!(at >= Duration::from_secs(4), "served for only {at:?} of a 6 s grace");
    assert_eq!(lease(&kekd), "expired");
    eprintln!("served {at:?} into the outage (offline_grace = 6s)");

    kekd.restore_token("acme");
    let back = Instant::now();
    loop {
        let out = kekd.unwrap(&edek, &[]);
        if out.code == exit::OK {
            assert_eq!(out.ok(), &plain[..]);
            break;
        }
        out.assert_error(exit::UNAVAILABLE, "UNAVAILABLE");
        assert!(back.elapsed() < Duration::from_secs(5), "still unavailable 5 s after the token came back");
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("served again {:?} after the token came back", back.elapsed());
    assert_eq!(lease(&kekd), "online");
    // The outage was polled every second for some 8 s; it is logged as news, not per poll.
    let log = kekd.stderr();
    let warnings = log.lines().filter(|l| l.contains("WARN") && l.contains("failed")).count();
    assert!((1..=3).contains(&warnings), "{warnings} warnings for one outage:\n{log}");

    // Each lease change is one audit record, in order: grace, expired, online again.
    let records = kekd.audit_records("acme");
    let leases: Vec<(&str, &str)> = records
        .iter()
        .filter(|r| r["event"] == "lease")
        .map(|r| (r["detail"]["lease"].as_str().unwrap(), r["outcome"].as_str().unwrap()))
        .collect();
    assert_eq!(leases, [("grace", "error"), ("expired", "error"), ("online", "ok")], "{records:#?}");
    let grace = records.iter().find(|r| r["event"] == "lease").unwrap();
    assert_eq!(grace["code"], "UNAVAILABLE", "{grace}");
    let served: Vec<&serde_json::Value> =
        records.iter().filter(|r| r["event"] == "unwrap" && r["kek"]["grace"].as_u64() > Some(0)).collect();
    assert!(!served.is_empty(), "unwraps served in the grace say so");
}

/// (c) offline_grace = 0 fails closed at kek_ttl.
#[test]
fn a_zero_grace_fails_closed_at_kek_ttl() {
    let kekd = Kekd::builder()
        .tenant(
            Tenant::owned_by_me("acme")
                .behind_outage_switch()
                .kek_ttl("3s")
                .offline_grace("0s")
                .revocation_poll("1h"),
        )
        .start();
    kekd.keys(["create", "other"]).ok(); // sealed, never unsealed
    let edek = kekd.wrap("default", b"fail closed", &[]);
    let unsealed = Instant::now();
    kekd.cut_token("acme");
    assert_eq!(kekd.unwrap(&edek, &[]).ok(), b"fail closed", "within kek_ttl, still served");
    // A KEK never unsealed needs the token at once.
    let out = kekd.kekctl().args(["generate", "--key", "other"]).run();
    out.assert_error(exit::UNAVAILABLE, "UNAVAILABLE");
    let (at, out) = first_failure(&kekd, &edek, unsealed, Duration::from_secs(4));
    out.assert_error(exit::UNAVAILABLE, "UNAVAILABLE");
    assert!(at >= Duration::from_millis(2500), "failed after {at:?}, before kek_ttl (3s)");
    eprintln!("failed closed {at:?} after the unseal (kek_ttl = 3s)");
}
