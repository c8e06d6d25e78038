//! The workers' seccomp filter (issue 9, point 4): every worker serves under its filter;
//! a PKCS#11 module that makes a system call the policy forbids kills its worker with
//! SIGSYS, the supervisor says so, naming the tenant, and restarts it, and no other tenant
//! notices. The misbehaving module is the outage proxy (`Kekd::make_module_misbehave`),
//! which opens a packet socket inside the worker, as a library sniffing the network would.

use std::path::Path;
use std::time::{Duration, Instant};

use softhsm_tests::{exit, proc_status_field, req, Backend, Code, Kekd, Output, Tenant};

/// How long the supervisor may take to notice the death, and the new worker to serve.
const RESTART: Duration = Duration::from_secs(20);

/// `Seccomp:` of /proc/PID/status: 0 none, 2 a filter.
fn seccomp_of(pid: u32) -> String {
    proc_status_field(pid, "Seccomp")
}

/// The kernel's log (`dmesg`), where it records seccomp kills (audit `type=1326`), if this
/// process may read it.
fn kernel_log() -> Option<String> {
    let out = std::process::Command::new("dmesg").output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `attempt` until it succeeds or `timeout` passes; panics with the last failure.
#[track_caller]
fn until_ok(timeout: Duration, mut attempt: impl FnMut() -> Output) -> Output {
    let start = Instant::now();
    loop {
        let out = attempt();
        if out.code == exit::OK {
            return out;
        }
        assert!(
            start.elapsed() < timeout,
            "`{}` still fails after {timeout:?}: exit code {}; stderr:\n{}",
            out.command,
            out.code,
            out.stderr
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_forbidden_system_call_kills_the_worker_and_the_supervisor_restarts_it() {
    let kekd = Kekd::builder()
        .tenant(Tenant::owned_by_me("acme").behind_outage_switch())
        // On the backend of this run: a PKCS#11 worker, or a TPM worker under KEKD_TEST_BACKEND=tpm.
        .tenant(Tenant::owned_by_me("beta"))
        .start();
    let acme = kekd.worker_pid("acme");
    let beta = kekd.worker_pid("beta");
    for (tenant, pid) in [("acme", acme), ("beta", beta)] {
        assert_eq!(seccomp_of(pid), "2", "{tenant}'s worker serves under a seccomp filter");
        assert_eq!(proc_status_field(pid, "NoNewPrivs"), "1", "{tenant}'s worker");
    }
    let log = kekd.stderr();
    assert!(
        log.lines().filter(|l| l.contains("seccomp filter installed")).count() >= 2,
        "each worker says it installed its filter:\n{log}"
    );
    let beta_edek =
        kekd.kekctl_for("beta").args(["wrap", "--key", "default"]).stdin(&b"beta's"[..]).run().ok().to_vec();

    // Creating a key seals a new KEK under the root key: C_Encrypt, which now misbehaves.
    kekd.make_module_misbehave("acme");
    let mut conn = kekd.raw("acme");
    conn.send(&req::create_key(1, "x"));
    conn.assert_closed();

    // (a) and (b): killed by SIGSYS, and the supervisor says so, naming the tenant.
    let log = kekd.wait_for_log("killed by its seccomp filter", RESTART);
    let line = log.lines().find(|l| l.contains("killed by its seccomp filter")).expect("found above");
    assert!(line.contains("acme") && line.contains("SIGSYS"), "the line names the tenant and SIGSYS: {line}");
    assert!(line.contains("ERROR"), "a seccomp kill is an error: {line}");
    eprintln!("the supervisor's line: {line}");
    assert!(
        log.contains("pkcs11_outage: C_Encrypt opens a packet socket"),
        "the module made the forbidden call:\n{log}"
    );
    assert!(!log.lines().any(|l| l.contains("worker exited") && l.contains("beta")), "{log}");
    // The kernel's audit log names the call: socket(2) is 41 on x86_64.
    match kernel_log() {
        Some(kernel) if cfg!(target_arch = "x86_64") => {
            let record = kernel
                .lines()
                .find(|l| l.contains("type=1326") && l.contains(&format!(" pid={acme} ")))
                .unwrap_or_else(|| panic!("no seccomp record of pid {acme} in the kernel log"));
            assert!(record.contains("sig=31") && record.contains("syscall=41"), "{record}");
        }
        _ => eprintln!("the kernel log is not readable here: not checking its seccomp record"),
    }

    // (d) The other tenant is not affected: same worker, still serving.
    assert_eq!(kekd.kekctl_for("beta").arg("unwrap").stdin(beta_edek.clone()).run().ok(), b"beta's");
    assert_eq!(kekd.worker_pid("beta"), beta, "beta's worker was not restarted");

    // (c) Restarted: once the module behaves again, acme serves from a new worker, under its
    // filter again.
    kekd.restore_token("acme");
    until_ok(RESTART, || kekd.keys(["create", "x"]));
    let new = kekd.worker_pid("acme");
    assert_ne!(new, acme, "acme is served by a new worker");
    assert!(!Path::new(&format!("/proc/{acme}")).exists(), "the old worker is gone");
    assert_eq!(seccomp_of(new), "2");
    let log = kekd.stderr();
    assert!(
        log.lines().any(|l| l.contains("restarting the worker") && l.contains("acme")),
        "the supervisor restarts acme's worker:\n{log}"
    );
    let (plain, edek) = kekd.generate("x", &[]);
    assert_eq!(kekd.unwrap(&edek, &[]).ok(), &plain[..]);
    assert_eq!(kekd.kekctl_for("beta").arg("unwrap").stdin(beta_edek).run().ok(), b"beta's");
}

#[test]
fn log_and_off_let_the_call_through() {
    let kekd = Kekd::builder()
        .tenant(Tenant::owned_by_me("acme").behind_outage_switch().seccomp("log"))
        .tenant(Tenant::owned_by_me("beta").behind_outage_switch().seccomp("off"))
        .start();
    let acme = kekd.worker_pid("acme");
    let beta = kekd.worker_pid("beta");
    assert_eq!(seccomp_of(acme), "2", "log mode installs the filter");
    assert_eq!(seccomp_of(beta), "0", "off installs none");
    let log = kekd.stderr();
    assert!(log.contains("seccomp filter installed in log mode"), "{log}");
    assert!(log.contains("no seccomp filter (seccomp = \"off\")"), "{log}");

    let calls = || kekd.stderr().matches("C_Encrypt opens a packet socket").count();
    for tenant in ["acme", "beta"] {
        kekd.make_module_misbehave(tenant);
        let before = calls();
        let mut conn = kekd.raw(tenant);
        let resp = conn.call(&req::create_key(1, "x"));
        assert_eq!(softhsm_tests::code(&resp), Code::Ok, "{tenant}: {resp:?}");
        assert!(calls() > before, "{tenant}'s module made the call:\n{}", kekd.stderr());
    }
    let log = kekd.stderr();
    assert!(!log.contains("worker exited"), "{log}");
    assert_eq!((kekd.worker_pid("acme"), kekd.worker_pid("beta")), (acme, beta));
}

#[test]
fn the_setting_is_checked() {
    let kekd = Kekd::builder().tenant(Tenant::owned_by_me("acme").backend(Backend::SoftHsm)).prepare();
    let text = kekd.config_text();
    let with = |value: &str| {
        softhsm_tests::config_edit_tenant(&text, "acme", |t| {
            t.replacen("[tenants.acme]\n", &format!("[tenants.acme]\nseccomp = {value}\n"), 1)
        })
    };
    for mode in ["\"enforce\"", "\"log\"", "\"off\""] {
        kekd.write_config_text(&with(mode));
        kekd.check_config().ok();
    }
    kekd.write_config_text(&with("true"));
    let out = kekd.check_config();
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("seccomp"), "the error names the setting: {}", out.stderr);
}
