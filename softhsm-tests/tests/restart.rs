//! Restarts (issue 2, point 11): the key store and the token are the only state, and both
//! survive a SIGKILL. Every key, version, state and earlier EDEK works as before.

use nix::sys::signal::Signal;
use softhsm_tests::{exit, parse_edek, Kekd, Tenant};

#[test]
fn keys_and_edeks_survive_kill_9() {
    let mut kekd =
        Kekd::builder().tenant(Tenant::owned_by_me("acme")).tenant(Tenant::owned_by_me("beta")).start();

    kekd.keys(["create", "alpha"]).ok();
    kekd.keys(["create", "bravo"]).ok();
    let mut edeks = Vec::new(); // (key, version, context value, secret, edek)
    for round in 1..=3u32 {
        for key in ["default", "alpha"] {
            let secret = format!("{key} v{round}").into_bytes();
            let value = format!("round-{round}");
            let edek = kekd.wrap(key, &secret, &[("round", &value)]);
            assert_eq!(parse_edek(&edek).version, round);
            edeks.push((key, round, value, secret, edek));
        }
        if round < 3 {
            kekd.keys(["rotate", "default"]).ok();
            kekd.keys(["rotate", "alpha"]).ok();
        }
    }
    let bravo_v1 = kekd.wrap("bravo", b"to be shredded", &[]);
    kekd.keys(["rotate", "bravo"]).ok();
    kekd.keys(["destroy", "bravo", "--version", "1"]).ok();
    kekd.keys(["disable", "alpha", "--version", "2"]).ok();
    let beta_edek =
        kekd.kekctl_for("beta").args(["wrap", "--key", "default"]).stdin(&b"beta"[..]).run().ok().to_vec();

    let before = kekd.list_keys();
    let destroyed_code = kekd.unwrap(&bravo_v1, &[]).code;
    assert_ne!(destroyed_code, 0);

    kekd.restart_after_kill();

    assert_eq!(kekd.list_keys(), before, "keys, versions, states and creation times survive the restart");
    for (key, version, value, secret, edek) in &edeks {
        let out = kekd.unwrap(edek, &[("round", value)]);
        if *key == "alpha" && *version == 2 {
            out.assert_error(exit::FAILED_PRECONDITION, "FAILED_PRECONDITION");
        } else {
            assert_eq!(out.ok(), &secret[..], "{key} v{version}");
        }
    }
    assert_eq!(kekd.unwrap(&bravo_v1, &[]).code, destroyed_code, "a destroyed version stays destroyed");
    assert_eq!(kekd.kekctl_for("beta").arg("unwrap").stdin(beta_edek).run().ok(), b"beta");

    // The disabled state persisted, and can still be undone.
    kekd.keys(["enable", "alpha", "--version", "2"]).ok();
    let (_, _, value, secret, edek) = edeks.iter().find(|e| e.0 == "alpha" && e.1 == 2).expect("alpha v2");
    assert_eq!(kekd.unwrap(edek, &[("round", value)]).ok(), &secret[..]);

    // New work continues where it left off.
    assert_eq!(parse_edek(&kekd.wrap("alpha", b"after", &[])).version, 3);
    kekd.keys(["rotate", "alpha"]).ok();
    assert_eq!(kekd.key("alpha").active_version, 4);
    kekd.keys(["create", "alpha"]).assert_error(exit::FAILED_PRECONDITION, "FAILED_PRECONDITION");
}

#[test]
fn sigterm_and_sigint_stop_the_daemon_cleanly() {
    let mut kekd = Kekd::start_default();
    let edek = kekd.wrap("default", b"across a clean stop", &[]);

    let status = kekd.stop_with(Signal::SIGTERM);
    assert!(status.success(), "kekd should exit 0 on SIGTERM, got {status}; stderr:\n{}", kekd.stderr());
    kekd.kekctl().arg("status").run().assert_error(exit::UNAVAILABLE, "UNAVAILABLE");

    kekd.start();
    assert_eq!(kekd.unwrap(&edek, &[]).ok(), b"across a clean stop");

    let status = kekd.stop_with(Signal::SIGINT);
    assert!(status.success(), "kekd should exit 0 on SIGINT, got {status}; stderr:\n{}", kekd.stderr());
    kekd.start();
    assert_eq!(kekd.unwrap(&edek, &[]).ok(), b"across a clean stop");
}
