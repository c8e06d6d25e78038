//! The session cap (issue 20, point 3): `pkcs11.max_sessions` is never exceeded, a burst
//! waits for a session, and a token that has no session to spare (`CKR_SESSION_COUNT`) is
//! waited for rather than failed. The outage proxy caps and counts the sessions of the
//! worker (`Kekd::cap_sessions`, `Kekd::session_report`).

use std::time::Duration;

use softhsm_tests::{code, req, Code, Kekd, RawConn, SessionReport, Tenant};

/// Requests in the burst, each for a key of its own whose KEK is not cached.
const BURST: usize = 64;
/// Connections the burst comes over; each pipelines BURST / CONNECTIONS requests.
const CONNECTIONS: usize = 8;
/// What each C_Decrypt takes on the capped token: SoftHSM2 alone answers in microseconds,
/// too fast for the requests of a burst to overlap.
const ROUND_TRIP: Duration = Duration::from_millis(20);

fn key(i: usize) -> String {
    format!("k{i:02}")
}

/// A daemon with `BURST` keys whose KEKs were sealed and are not cached (the daemon was
/// restarted after creating them).
fn daemon(tenant: Tenant) -> Kekd {
    let mut kekd = Kekd::builder().tenant(tenant.behind_outage_switch()).start();
    let mut admin = kekd.raw("acme");
    for i in 0..BURST {
        admin.send(&req::create_key(i as u64 + 1, &key(i)));
    }
    for _ in 0..BURST {
        let resp = admin.recv().expect("an answer to each create");
        assert_eq!(code(&resp), Code::Ok, "{resp:?}");
    }
    drop(admin);
    kekd.restart_after_kill();
    kekd
}

/// `BURST` concurrent requests that each need the root key; panics on any error.
fn burst(kekd: &Kekd) {
    std::thread::scope(|s| {
        for c in 0..CONNECTIONS {
            let socket = kekd.socket().to_owned();
            s.spawn(move || {
                let mut conn = RawConn::open(&socket, "acme");
                let mine: Vec<usize> = (c..BURST).step_by(CONNECTIONS).collect();
                for &i in &mine {
                    conn.send(&req::generate(i as u64 + 1, &key(i), 1));
                }
                for _ in &mine {
                    let resp = conn.recv().expect("an answer to each request");
                    assert_eq!(code(&resp), Code::Ok, "a request of the burst failed: {resp:?}");
                }
            });
        }
    });
}

fn report(kekd: &Kekd) -> SessionReport {
    let report = kekd.session_report("acme").expect("the proxy counted the worker's sessions");
    eprintln!("sessions: {report:?}");
    report
}

#[test]
fn a_burst_waits_for_a_token_that_has_no_session_to_spare() {
    // The token allows 4 sessions, kekd would open 16 (the default): it must wait.
    let kekd = daemon(Tenant::owned_by_me("acme"));
    kekd.cap_sessions("acme", 4, ROUND_TRIP);
    burst(&kekd);
    let r = report(&kekd);
    assert!(r.peak <= 4, "{r:?}");
    assert!(r.refused >= 1, "the burst met the token's limit (else this proves nothing): {r:?}");
    // And it still serves afterwards.
    assert_eq!(kekd.kekctl().json().arg("status").run().json()["backend_healthy"], true);
}

#[test]
fn max_sessions_is_never_exceeded() {
    let kekd = daemon(Tenant::owned_by_me("acme").max_sessions(3));
    // A cap far above kekd's: the proxy only counts.
    kekd.cap_sessions("acme", 1000, ROUND_TRIP);
    burst(&kekd);
    let r = report(&kekd);
    assert!(r.peak <= 3, "kekd had more than max_sessions = 3 sessions open: {r:?}");
    assert!(r.peak >= 2, "the burst ran concurrently on the token (else this proves nothing): {r:?}");
    assert_eq!(r.refused, 0, "{r:?}");
}

#[test]
fn check_config_names_max_sessions() {
    let kekd = Kekd::builder().tenant(Tenant::owned_by_me("acme").max_sessions(4)).prepare();
    kekd.check_config().ok();
    for bad in ["0", "100000"] {
        let text = kekd.config_text().replace("max_sessions = 4", &format!("max_sessions = {bad}"));
        kekd.write_config_text(&text);
        let out = kekd.check_config();
        assert_ne!(out.code, 0, "max_sessions = {bad} was accepted");
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), out.stderr);
        assert!(said.contains("tenants.acme.pkcs11.max_sessions"), "the error names the field: {said}");
    }
}

/// What kekd does besides serving opens sessions too: creating the root key at the first
/// start, and a root key rotation's new key. With a token that grants one session and
/// `max_sessions = 1`, both fit: kekd never asks for a second session.
#[test]
fn creating_and_rotating_the_root_key_stay_within_max_sessions() {
    let mut kekd =
        Kekd::builder().tenant(Tenant::owned_by_me("acme").max_sessions(1).behind_outage_switch()).prepare();
    kekd.cap_sessions("acme", 1, Duration::ZERO);
    // The first start creates the root key.
    kekd.start();
    let (plain, edek) = kekd.generate("default", &[]);
    kekd.kekctl().args(["root", "rotate", "--label", "acme-root-1"]).run().ok();
    kekd.keys(["create", "after"]).ok();
    let after = kekd.wrap("after", b"sealed by the new root key", &[]);
    // Cold: a new worker unseals both under their root keys.
    kekd.restart_after_kill();
    assert_eq!(kekd.unwrap(&edek, &[]).ok(), &plain[..]);
    assert_eq!(kekd.unwrap(&after, &[]).ok(), b"sealed by the new root key");
    let report = report(&kekd);
    assert_eq!((report.peak, report.refused), (1, 0), "{report:?}");
}
