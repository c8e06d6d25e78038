//! Every HSM call is bounded, and a worker that stops answering is replaced (issue 20,
//! point 2; DESIGN §9), through the real binaries:
//!
//! - a PKCS#11 call that hangs (the outage proxy's `hang` mode) is answered UNAVAILABLE
//!   after `pkcs11.call_timeout`, and the worker is replaced;
//! - a worker that stops answering (SIGSTOP) is found by the supervisor's heartbeat within
//!   `worker_watchdog`, killed and restarted, and the connections waiting on it are closed;
//! - `kekctl --timeout` bounds a request to a worker that never answers.
//!
//! Timing bounds are generous (seconds of margin): the machines are small and shared.

use std::path::Path;
use std::time::{Duration, Instant};

use kekd_proto::{pb, Code};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use softhsm_tests::{batch_items, code, exit, item_code, req, Backend, Kekd, Output, Tenant};

/// Slack on top of every bound, for a loaded 2-core machine.
const MARGIN: Duration = Duration::from_secs(6);
/// How long a replaced worker's successor may take to serve.
const RESTART: Duration = Duration::from_secs(30);

/// The daemon of `builder`, with `top` lines at the head of its config file and `pkcs11`
/// lines in `tenant`'s `[tenants.NAME.pkcs11]` table, started.
#[track_caller]
fn start_with(builder: softhsm_tests::KekdBuilder, top: &str, pkcs11: Option<(&str, &str)>) -> Kekd {
    let mut kekd = builder.prepare();
    let mut text = format!("{top}\n{}", kekd.config_text());
    if let Some((tenant, lines)) = pkcs11 {
        let table = format!("[tenants.{tenant}.pkcs11]\n");
        assert!(text.contains(&table), "no {table:?} in\n{text}");
        text = text.replace(&table, &format!("{table}{lines}\n"));
    }
    kekd.write_config_text(&text);
    kekd.start();
    kekd
}

/// The status code and message of a one-item request, whether the request failed as a
/// whole or its item did.
fn outcome(resp: pb::Response) -> (Code, String) {
    let whole = code(&resp);
    if whole != Code::Ok {
        return (whole, resp.status.map(|s| s.message).unwrap_or_default());
    }
    let items = batch_items(resp);
    assert_eq!(items.len(), 1, "{items:?}");
    (item_code(&items[0]), items[0].status.as_ref().map(|s| s.message.clone()).unwrap_or_default())
}

fn alive(pid: u32) -> bool {
    // A zombie still has its /proc entry: look at its state.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[track_caller]
fn wait_gone(pid: u32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while alive(pid) {
        assert!(Instant::now() < deadline, "worker {pid} still runs {timeout:?} later");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `attempt` until it succeeds, or panics with its last failure after `timeout`.
#[track_caller]
fn until_ok(timeout: Duration, mut attempt: impl FnMut() -> Output) -> Output {
    let deadline = Instant::now() + timeout;
    loop {
        let out = attempt();
        if out.code == exit::OK {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "`{}` still fails after {timeout:?}: exit {}; stderr:\n{}",
            out.command,
            out.code,
            out.stderr
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn signal(pid: u32, signal: Signal) {
    kill(Pid::from_raw(pid as i32), signal).unwrap_or_else(|e| panic!("{signal} to worker {pid}: {e}"));
}

/// SIGSTOP, and waits until every thread of `pid` has stopped: the signal is only queued
/// when kill(2) returns, and a request sent before a thread stops may still be served.
#[track_caller]
fn stop(pid: u32) {
    signal(pid, Signal::SIGSTOP);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("list the worker's threads");
        let running = tasks.filter_map(Result::ok).any(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            // The state follows the command name, which is in parentheses.
            !stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('T'))
        });
        if !running {
            return;
        }
        assert!(Instant::now() < deadline, "worker {pid} has not stopped 10s after SIGSTOP");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A tenant on the real SoftHSM2 beside the one under test, which must keep serving.
fn bystander() -> Tenant {
    Tenant::owned_by_me("beta").backend(Backend::SoftHsm)
}

#[track_caller]
fn bystander_serves(kekd: &Kekd) {
    let out = kekd.kekctl_for("beta").args(["--timeout", "10s", "generate", "--key", "default"]).run();
    assert_eq!(out.code, exit::OK, "tenant beta must keep serving: {}", out.stderr);
}

#[test]
fn a_hanging_hsm_call_is_unavailable_after_call_timeout_and_the_worker_is_replaced() {
    let kekd = start_with(
        Kekd::builder()
            .tenant(Tenant::owned_by_me("acme").behind_outage_switch().idle_ttl("1s"))
            .tenant(bystander()),
        "",
        Some(("acme", "call_timeout = \"1s\"")),
    );
    let context = [("app", "hangs")];
    let (plain, edek) = kekd.generate("default", &context);
    let old = kekd.worker_pid("acme");
    // Cold: once idle_ttl has flushed the KEK, the unwrap must unseal it in the token.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = kekd.kekctl_for("acme").json().arg("status").run().json();
        if status["cached_keks"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the KEK is still cached: {status}");
        std::thread::sleep(Duration::from_millis(200));
    }

    kekd.hang_token("acme");
    let mut conn = kekd.raw("acme");
    let started = Instant::now();
    let (code, message) = outcome(conn.call(&req::unwrap(2, std::slice::from_ref(&edek), &context)));
    let took = started.elapsed();
    eprintln!("answered {code:?} after {took:?}: {message}");
    assert_eq!(code, Code::Unavailable, "{message}");
    assert!(message.contains("tenants.acme.pkcs11.call_timeout"), "the message names the setting: {message}");
    // Not answered before the bound (the call really hung), nor long after it.
    assert!(took >= Duration::from_secs(1), "answered after {took:?}, before the call timed out");
    assert!(took < Duration::from_secs(1) + MARGIN, "answered only after {took:?}");
    assert!(kekd.stderr().contains("pkcs11_outage: C_"), "the proxy hung a call:\n{}", kekd.stderr());

    // The worker, whose module is stuck in a call, goes away and is replaced.
    wait_gone(old, Duration::from_secs(20));
    let log = kekd.wait_for_log("worker replaced: its root-key unseal call did not return within 1s", MARGIN);
    assert!(log.contains("tenants.acme.pkcs11.call_timeout"), "{log}");
    bystander_serves(&kekd);

    kekd.restore_token("acme");
    let out = until_ok(RESTART, || kekd.unwrap(&edek, &context));
    assert_eq!(out.ok(), &plain[..], "the tenant serves again once the token answers");
    let new = kekd.worker_pid("acme");
    assert_ne!(new, old, "a new worker serves");
}

#[test]
fn a_worker_that_stops_answering_is_killed_within_the_watchdog_and_replaced() {
    let kekd = start_with(
        Kekd::builder().tenant(Tenant::owned_by_me("acme")).tenant(bystander()),
        "worker_watchdog = \"2s\"",
        None,
    );
    let context = [("app", "stopped")];
    let (plain, edek) = kekd.generate("default", &context);
    let old = kekd.worker_pid("acme");
    let mut conn = kekd.raw("acme");

    stop(old);
    let stopped = Instant::now();
    conn.send(&req::unwrap(2, std::slice::from_ref(&edek), &context));
    // Another tenant is served while this one's worker is stopped.
    bystander_serves(&kekd);
    // The request in flight is never answered: its connection closes when the worker is
    // killed, which a client sees as UNAVAILABLE (`ClientError::Closed`).
    let answer = conn.recv();
    let took = stopped.elapsed();
    eprintln!("connection closed {took:?} after SIGSTOP");
    assert!(answer.is_none(), "a stopped worker answered: {answer:?}");
    // Silence counts from the last answered heartbeat, up to half a second before SIGSTOP.
    assert!(took >= Duration::from_secs(1), "closed after {took:?}, before the watchdog could fire");
    assert!(took < Duration::from_secs(2) + MARGIN, "closed only after {took:?}");
    wait_gone(old, MARGIN);
    let log = kekd.wait_for_log("did not answer the heartbeat", MARGIN);
    assert!(log.contains(&format!("pid={old}")) && log.contains("worker_watchdog = 2s"), "{log}");

    // A client that arrives meanwhile is not left hanging either.
    let out = until_ok(RESTART, || kekd.unwrap(&edek, &context));
    assert_eq!(out.ok(), &plain[..]);
    assert_ne!(kekd.worker_pid("acme"), old, "a new worker serves");
    bystander_serves(&kekd);
}

#[test]
fn kekctl_timeout_bounds_a_request_to_a_worker_that_never_answers() {
    // The watchdog is long: only the client's own timeout ends the wait.
    let kekd =
        start_with(Kekd::builder().tenant(Tenant::owned_by_me("acme")), "worker_watchdog = \"60s\"", None);
    let pid = kekd.worker_pid("acme");
    stop(pid);

    let started = Instant::now();
    let out = kekd.kekctl_for("acme").args(["--timeout", "1s", "generate", "--key", "default"]).run();
    let took = started.elapsed();
    eprintln!("kekctl gave up after {took:?}: {}", out.stderr.trim());
    out.assert_error(exit::UNAVAILABLE, "UNAVAILABLE");
    assert!(out.stderr.contains("within 1s") && out.stderr.contains("--timeout"), "{}", out.stderr);
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(1) + MARGIN, "took {took:?}");

    // The same bound from the environment, with a duration that shows in the message.
    let started = Instant::now();
    let out = kekd.kekctl_for("acme").env("KEKD_TIMEOUT", "1500ms").arg("status").run();
    let took = started.elapsed();
    out.assert_error(exit::UNAVAILABLE, "UNAVAILABLE");
    assert!(out.stderr.contains("within 1s 500ms"), "{}", out.stderr);
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_millis(1500) + MARGIN,
        "took {took:?}"
    );

    signal(pid, Signal::SIGCONT);
    until_ok(Duration::from_secs(10), || kekd.kekctl_for("acme").arg("status").run());
    assert_eq!(kekd.worker_pid("acme"), pid, "nothing replaced the worker: the watchdog is a minute");
    assert!(Path::new(&format!("/proc/{pid}")).exists());
}
