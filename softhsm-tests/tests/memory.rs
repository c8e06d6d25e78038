//! Locked KEK memory (issue 2, point 5): kekd refuses to start when it cannot mlock its
//! KEK arena, and starts with a loud warning only when the operator opted in.
//!
//! The daemon is started without CAP_IPC_LOCK (dropped from the bounding and inheritable
//! sets, which removes it from root's effective set at exec) and with RLIMIT_MEMLOCK at
//! 16 KiB, below the 64 KiB arena: exactly the situation of a mis-sized
//! `LimitMEMLOCK=` in production.

use softhsm_tests::{is_root, Kekd, Tenant};

fn without_ipc_lock(kekd: &mut Kekd) {
    kekd.wrap_with([
        "setpriv",
        "--bounding-set",
        "-ipc_lock",
        "--inh-caps",
        "-ipc_lock",
        "prlimit",
        "--memlock=16384:16384",
        "--",
    ]);
}

#[test]
fn refuses_to_start_when_kek_memory_cannot_be_locked() {
    if !is_root() {
        eprintln!("SKIPPED: dropping CAP_IPC_LOCK from root needs root");
        return;
    }
    let mut kekd = Kekd::builder().tenant(Tenant::owned_by_me("acme")).prepare();
    without_ipc_lock(&mut kekd);
    let failure = kekd.try_start().expect_err("kekd must not serve with unlocked KEK memory");
    assert!(failure.status.is_some_and(|s| !s.success()), "{failure}");
    assert!(failure.stderr.contains("cannot lock KEK memory"), "{failure}");
    assert!(failure.stderr.contains("allow_unlocked_memory"), "the error should name the way out: {failure}");
}

#[test]
fn allow_unlocked_memory_starts_with_a_warning_and_status_says_so() {
    if !is_root() {
        eprintln!("SKIPPED: dropping CAP_IPC_LOCK from root needs root");
        return;
    }
    let mut kekd = Kekd::builder().tenant(Tenant::owned_by_me("acme")).allow_unlocked_memory(true).prepare();
    without_ipc_lock(&mut kekd);
    kekd.start();
    assert!(kekd.stderr().contains("KEK MEMORY IS NOT LOCKED"), "stderr:\n{}", kekd.stderr());
    let status = kekd.kekctl().json().arg("status").run().json();
    assert_eq!(status["memory_locked"], false, "{status}");
    // And it still serves.
    let edek = kekd.wrap("default", b"still works", &[]);
    assert!(!edek.is_empty());
}

#[test]
fn a_normal_start_reports_locked_memory() {
    let kekd = Kekd::start_default();
    let status = kekd.kekctl().json().arg("status").run().json();
    assert_eq!(status["memory_locked"], true, "{status}");
}
