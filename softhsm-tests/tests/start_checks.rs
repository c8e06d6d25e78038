//! A worker fails at start, not at first use (issue 20, point 5).
//!
//! A tenant's worker opens its token as root (with its `run_as` user's file rights) and
//! then drops to that user. A token the user cannot use must stop the start there, with
//! a message naming the token's directory and the user, instead of a worker that reports
//! ready and then answers every request with a misleading "root key no longer exists".
//! And `check-config` warns of tenants whose different `run_as` users share one SoftHSM2
//! token directory, which at most one of them can own.

use std::path::Path;
use std::process::Command;

use nix::sys::signal::Signal;
use softhsm_tests::*;

/// A tenant `acme` on SoftHSM2 whose worker runs as `user`, with its root key made by a
/// first start as root (so that what fails later is the user's access to the token, not
/// a missing key). The token directory is still root's: not handed to the user.
fn tenant_run_as_on_roots_token(user: &TestUser) -> Kekd {
    let mut kekd = Kekd::builder()
        .tenant(Tenant::owned_by_me("acme").run_as(&user.name).backend(Backend::SoftHsm))
        .prepare();
    kekd.first_start_as_root();
    kekd
}

#[track_caller]
fn chown_tree(path: &Path, owner: &str) {
    let out = Command::new("chown").arg("-R").arg(owner).arg(path).output().unwrap();
    assert!(out.status.success(), "chown {owner} {}: {out:?}", path.display());
}

/// Asserts that kekd did not come up, and that what it said names the token directory and
/// the user (and does not blame a missing root key, which is there).
#[track_caller]
fn assert_refused_naming(kekd: &mut Kekd, tokens: &Path, user: &TestUser) {
    let failure = match kekd.try_start() {
        Ok(()) => {
            let status = kekd.kekctl().arg("status").run();
            let used = kekd.kekctl().arg("generate").args(["--key", "default"]).run();
            panic!(
                "kekd started a worker that cannot use its token.\nstatus:\n{}\n{}\ngenerate: {}\nlog:\n{}",
                String::from_utf8_lossy(&status.stdout),
                status.stderr,
                used.stderr,
                kekd.stderr()
            );
        }
        Err(f) => f,
    };
    assert!(failure.status.is_some_and(|s| !s.success()), "kekd must exit with an error: {failure}");
    let said = failure.stderr.lines().filter(|l| l.contains("kekd: tenant acme")).collect::<Vec<_>>();
    let [said] = said[..] else { panic!("one `kekd: tenant acme: ...` line expected: {failure}") };
    assert!(said.contains(&tokens.display().to_string()), "the token directory is named: {said}");
    assert!(said.contains(&user.name), "the user is named: {said}");
    assert!(!said.contains("no longer exists"), "the root key is there: {said}");
    eprintln!("refused as it should be: {said}");
}

#[test]
fn a_worker_whose_user_cannot_use_its_token_refuses_to_start_naming_the_directory_and_user() {
    if !is_root() {
        eprintln!("SKIPPED (needs root): a worker that starts as root and runs as a user of its own");
        return;
    }
    let user = TestUser::create("unhanded");
    let mut kekd = tenant_run_as_on_roots_token(&user);
    let tokens = kekd.softhsm().unwrap().token_dir().to_path_buf();

    // Root's alone (SoftHSM2 makes its directories 0700 and its files 0600).
    assert_refused_naming(&mut kekd, &tokens, &user);

    // Handed to the user, as the README says: the same configuration starts and serves.
    chown_tree(&tokens, &format!("{}:{}", user.uid, user.gid));
    kekd.start();
    let (plain, edek) = kekd.generate("default", &[]);
    assert_eq!(kekd.unwrap(&edek, &[]).ok(), &plain[..]);
}

/// Two tenants in the fixture's one SoftHSM2 token directory (a token each).
fn two_tenants(a: Tenant, b: Tenant) -> Kekd {
    Kekd::builder().tenant(a.backend(Backend::SoftHsm)).tenant(b.backend(Backend::SoftHsm)).prepare()
}

#[test]
fn check_config_warns_of_run_as_users_that_share_a_token_directory() {
    if !is_root() {
        eprintln!("SKIPPED (needs root): makes users of its own");
        return;
    }
    let (alice, bob) = (TestUser::create("share"), TestUser::create("share"));
    let kekd = two_tenants(
        Tenant::owned_by_me("acme").run_as(&alice.name),
        Tenant::owned_by_me("globex").run_as(&bob.name),
    );
    let tokens = kekd.softhsm().unwrap().token_dir().display().to_string();
    let out = kekd.check_config();
    assert!(out.ok_str().starts_with("config OK"), "a warning is not an error: {}", out.ok_str());
    let warnings: Vec<&str> = out.stderr.lines().filter(|l| l.starts_with("warning: ")).collect();
    let [warning] = warnings[..] else { panic!("one warning expected:\n{}", out.stderr) };
    for part in ["tenants.acme", "tenants.globex", &alice.name, &bob.name, &tokens] {
        assert!(warning.contains(part), "the warning names {part:?}: {warning}");
    }

    // The same user for both, or a token directory each: nothing to warn of.
    let same = two_tenants(
        Tenant::owned_by_me("acme").run_as(&alice.name),
        Tenant::owned_by_me("globex").run_as(&alice.name),
    );
    let out = same.check_config();
    out.ok();
    assert!(!out.stderr.contains("warning"), "{}", out.stderr);
}

#[test]
fn check_config_warns_of_a_root_worker_on_a_run_as_users_token_directory() {
    if !is_root() {
        eprintln!("SKIPPED (needs root): makes users of its own");
        return;
    }
    let alice = TestUser::create("share");
    let kekd = two_tenants(Tenant::owned_by_me("acme").run_as(&alice.name), Tenant::owned_by_me("globex"));
    let out = kekd.check_config();
    out.ok();
    let warnings: Vec<&str> = out.stderr.lines().filter(|l| l.starts_with("warning: ")).collect();
    let [warning] = warnings[..] else { panic!("one warning expected:\n{}", out.stderr) };
    for part in ["tenants.acme", "tenants.globex", &alice.name, "root"] {
        assert!(warning.contains(part), "the warning names {part:?}: {warning}");
    }
}

/// What the worker checks last runs inside its sandbox: a module that needs a system call
/// the seccomp policy forbids (the outage proxy opening a packet socket in C_Encrypt) is
/// found at start, before kekd says it is ready, not by the first request.
#[test]
fn a_module_the_sandbox_stops_at_first_use_fails_the_start() {
    let mut kekd = Kekd::builder().tenant(Tenant::owned_by_me("acme").behind_outage_switch()).start();
    kekd.generate("default", &[]);
    assert!(kekd.stop_with(Signal::SIGTERM).success());

    kekd.make_module_misbehave("acme");
    let failure = match kekd.try_start() {
        Ok(()) => {
            let used = kekd.kekctl().args(["generate", "--key", "default"]).run();
            panic!("kekd started; the first request then got: {}\nlog:\n{}", used.stderr, kekd.stderr());
        }
        Err(f) => f,
    };
    let line = failure
        .stderr
        .lines()
        .find(|l| l.starts_with("kekd: tenant acme:"))
        .unwrap_or_else(|| panic!("{failure}"));
    assert!(line.contains("killed by its seccomp filter"), "{line}");
    assert!(failure.stderr.contains("C_Encrypt opens a packet socket"), "at start: {failure}");

    kekd.restore_token("acme");
    kekd.start();
    let (plain, edek) = kekd.generate("default", &[]);
    assert_eq!(kekd.unwrap(&edek, &[]).ok(), &plain[..]);
}
