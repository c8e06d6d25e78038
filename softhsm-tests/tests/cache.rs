//! The KEK cache as a user sees it (issue 2, point 5): an idle KEK is flushed after
//! `idle_ttl`, and a cached KEK is used no longer than `kek_ttl` before the root key is
//! asked again, so a root key deleted from the token (or lost to a TPM clear) stops all
//! service within that bound.

use std::time::{Duration, Instant};

use softhsm_tests::{exit, Kekd, Tenant};

fn cached_keks(kekd: &Kekd) -> u64 {
    let status = kekd.kekctl().json().arg("status").run().json();
    status["cached_keks"].as_u64().unwrap_or_else(|| panic!("status has no cached_keks: {status}"))
}

#[test]
fn an_idle_kek_is_flushed_after_idle_ttl_and_unsealed_again_on_use() {
    let kekd = Kekd::builder().tenant(Tenant::owned_by_me("acme").idle_ttl("1s")).start();
    let (plaintext, edek) = kekd.generate("default", &[]);
    assert_eq!(cached_keks(&kekd), 1);

    let deadline = Instant::now() + Duration::from_secs(10);
    while cached_keks(&kekd) != 0 {
        assert!(Instant::now() < deadline, "the idle KEK was not flushed within 10 s of idle_ttl = 1s");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The next use unseals it again from the root key, transparently.
    assert_eq!(kekd.unwrap(&edek, &[]).ok(), &plaintext[..]);
    assert_eq!(cached_keks(&kekd), 1);
}

#[test]
fn a_deleted_root_key_stops_service_once_kek_ttl_has_passed() {
    let kekd = Kekd::builder().tenant(Tenant::owned_by_me("acme").kek_ttl("2s")).start();
    let edek = kekd.wrap("default", b"cached for at most kek_ttl", &[]);

    kekd.destroy_root_key("acme");
    let deleted = Instant::now();

    // The KEK unsealed before the deletion keeps serving from locked memory...
    assert_eq!(kekd.unwrap(&edek, &[]).ok(), b"cached for at most kek_ttl");
    // ...until kek_ttl runs out; then the root key is asked again and refuses.
    loop {
        let out = kekd.unwrap(&edek, &[]);
        if out.code != 0 {
            out.assert_error(exit::FAILED_PRECONDITION, "FAILED_PRECONDITION");
            assert!(
                out.stderr.contains("root key"),
                "the error should say the root key refused: {}",
                out.stderr
            );
            break;
        }
        assert!(
            deleted.elapsed() < Duration::from_secs(5),
            "unwrap still served 5 s after the root key was deleted (kek_ttl = 2s)"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        deleted.elapsed() >= Duration::from_millis(500),
        "the cached KEK should have kept serving for a while"
    );
}
