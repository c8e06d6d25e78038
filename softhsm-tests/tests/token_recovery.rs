//! A token that goes away and comes back (issue 20, point 1): the worker starts over by
//! itself (re-initialises the PKCS#11 module, logs in again) and serves again within
//! `revocation_poll` + 5 s of the token's return, without a restart of the worker (its KEK
//! cache survives); while the token is gone clients get UNAVAILABLE (retryable), never
//! INTERNAL, and KEKs already cached keep serving (offline grace, DESIGN §5).
//!
//! Each case runs its own daemon, so the cases run in parallel: the file takes about as long
//! as its longest case (a token away for 35 s).

use std::time::{Duration, Instant};

use softhsm_tests::{exit, Backend, Kekd, Output, Tenant, TokenFault};

/// `revocation_poll` of every tenant here.
const POLL: Duration = Duration::from_secs(2);
/// What the issue allows after the token is back: the poll period plus 5 s.
const RECOVERY: Duration = Duration::from_secs(2 + 5);
const CONTEXT: &[(&str, &str)] = &[("app", "recovery")];

/// How the token goes away.
#[derive(Debug, Clone, Copy)]
enum Away {
    /// Its SoftHSM2 token directory is moved away and back (no proxy).
    Moved,
    /// The outage proxy pulls the token out and plugs it back in.
    Pulled,
}

fn status(kekd: &Kekd) -> serde_json::Value {
    kekd.kekctl().json().arg("status").run().json()
}

/// A request that needs the root key: the KEK of `cold` was sealed but never unsealed.
fn cold(kekd: &Kekd) -> Output {
    kekd.kekctl().json().args(["generate", "--key", "cold"]).run()
}

/// A daemon whose tenant `acme` has a warm KEK (`default`, cached) and a cold one (`cold`,
/// only sealed), with its worker's pid. Returns an EDEK under the warm KEK and its plaintext.
fn daemon(tenant: Tenant) -> (Kekd, u64, Vec<u8>, Vec<u8>) {
    let kekd = Kekd::builder().tenant(tenant.revocation_poll(&format!("{}s", POLL.as_secs()))).start();
    let (plain, edek) = kekd.generate("default", CONTEXT);
    kekd.keys(["create", "cold"]).ok();
    let before = status(&kekd);
    assert_eq!(before["backend_healthy"], true, "{before}");
    // Not vacuous: `cold` really needs the token.
    assert_eq!(before["cached_keks"], 1, "only the warm KEK is cached: {before}");
    let pid = before["worker_pid"].as_u64().unwrap_or_else(|| panic!("no worker_pid: {before}"));
    (kekd, pid, plain, edek)
}

/// While the token is away for `absence`: a cold request is UNAVAILABLE and the warm KEK
/// serves, checked about once a second.
fn while_away(kekd: &Kekd, absence: Duration, plain: &[u8], edek: &[u8]) {
    let start = Instant::now();
    let mut checks = 0;
    while start.elapsed() < absence {
        cold(kekd).assert_error(exit::UNAVAILABLE, "UNAVAILABLE");
        assert_eq!(kekd.unwrap(edek, CONTEXT).ok(), plain, "the warm KEK serves in its offline grace");
        checks += 1;
        std::thread::sleep(Duration::from_millis(900));
    }
    assert!(checks >= 2, "only {checks} checks while the token was away");
}

/// After the token is back: how long until a cold request succeeds. Every answer meanwhile is
/// OK or UNAVAILABLE, never INTERNAL; panics past [`RECOVERY`].
fn until_served(kekd: &Kekd) -> Duration {
    let back = Instant::now();
    loop {
        let out = cold(kekd);
        if out.code == exit::OK {
            return back.elapsed();
        }
        out.assert_error(exit::UNAVAILABLE, "UNAVAILABLE");
        assert!(
            back.elapsed() < RECOVERY,
            "a cold request still fails {RECOVERY:?} after the token came back; kekd's stderr:\n{}",
            kekd.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The worker that serves after the recovery is the one from before, healthy, its lease
/// online, and it still has the KEKs it cached.
fn assert_recovered_in_place(kekd: &Kekd, pid: u64, plain: &[u8], edek: &[u8]) {
    let after = status(kekd);
    assert_eq!(after["backend_healthy"], true, "{after}");
    assert_eq!(after["lease"], "online", "{after}");
    assert_eq!(after["worker_pid"].as_u64(), Some(pid), "the worker recovered without a restart: {after}");
    assert_eq!(kekd.unwrap(edek, CONTEXT).ok(), plain);
    kekd.keys(["create", "after"]).ok();
}

fn token_away_and_back(away: Away, absence: Duration) {
    let tenant = match away {
        Away::Moved => Tenant::owned_by_me("acme").backend(Backend::SoftHsm),
        Away::Pulled => Tenant::owned_by_me("acme").behind_outage_switch(),
    };
    let (kekd, pid, plain, edek) = daemon(tenant);
    match away {
        Away::Moved => kekd.take_token_away("acme"),
        Away::Pulled => kekd.inject_fault("acme", TokenFault::DeviceRemoved),
    }
    while_away(&kekd, absence, &plain, &edek);
    kekd.keys(["create", "during"]).assert_error(exit::UNAVAILABLE, "UNAVAILABLE");
    match away {
        Away::Moved => kekd.bring_token_back("acme"),
        Away::Pulled => kekd.restore_token("acme"),
    }
    // Nobody asks: the revocation poll alone brings the worker back.
    let back = Instant::now();
    kekd.wait_for_log("the PKCS#11 token works again", RECOVERY);
    let polled = back.elapsed();
    let took = until_served(&kekd);
    eprintln!(
        "{away:?} for {absence:?}: the poll used the token again {polled:?} after it came back, \
         a cold request was served {took:?} later"
    );
    assert_recovered_in_place(&kekd, pid, &plain, &edek);
}

#[test]
fn a_token_moved_away_for_10s_is_unavailable_then_serves_again() {
    token_away_and_back(Away::Moved, Duration::from_secs(10));
}

#[test]
fn a_token_moved_away_for_35s_is_unavailable_then_serves_again() {
    token_away_and_back(Away::Moved, Duration::from_secs(35));
}

#[test]
fn a_pulled_token_is_unavailable_then_serves_again() {
    token_away_and_back(Away::Pulled, Duration::from_secs(6));
}

/// A fault that is over as soon as the worker starts over (sessions closed under it, a
/// module that forgot its initialisation): every request succeeds, the first one after the
/// fault included, or at worst is UNAVAILABLE until the worker has started over.
fn instant_fault(fault: TokenFault) -> Kekd {
    let (kekd, pid, plain, edek) = daemon(Tenant::owned_by_me("acme").behind_outage_switch());
    kekd.inject_fault("acme", fault);
    let took = until_served(&kekd);
    eprintln!("{fault:?}: a cold request was served {took:?} after the fault");
    assert_recovered_in_place(&kekd, pid, &plain, &edek);
    assert!(
        kekd.stderr().contains("pkcs11_outage: injected fault"),
        "the proxy injected it:\n{}",
        kekd.stderr()
    );
    kekd
}

#[test]
fn sessions_closed_under_the_worker_are_replaced() {
    let _ = instant_fault(TokenFault::SessionsClosed);
}

#[test]
fn a_module_that_forgot_its_initialisation_is_initialised_again() {
    let kekd = instant_fault(TokenFault::NotInitialised);
    // It did start over: the proxy saw the application's C_Finalize + C_Initialize.
    let log = kekd.stderr();
    assert!(log.contains("pkcs11_outage: re-initialised by the application"), "{log}");
}
