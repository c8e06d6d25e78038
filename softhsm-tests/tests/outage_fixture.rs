//! Self-test of the outage switch (`Tenant::behind_outage_switch`, `Kekd::cut_token`,
//! `Kekd::restore_token`): the PKCS#11 proxy `pkcs11_outage.so` makes a SoftHSM2 token
//! unreachable and brings it back while kekd keeps running, through the real daemon.

use std::time::{Duration, Instant};

use softhsm_tests::{exit, outage_module, softhsm_module, Kekd, Output, Tenant};

/// How long the daemon may take to use the token again once the link is back.
const RECOVERY: Duration = Duration::from_secs(5);

fn status(kekd: &Kekd, tenant: &str) -> serde_json::Value {
    kekd.kekctl_for(tenant).json().arg("status").run().json()
}

/// Runs `attempt` until it succeeds or `timeout` passes; returns the successful output and
/// how long it took, or panics with the last failure.
#[track_caller]
fn until_ok(timeout: Duration, mut attempt: impl FnMut() -> Output) -> (Output, Duration) {
    let start = Instant::now();
    loop {
        let out = attempt();
        if out.code == exit::OK {
            return (out, start.elapsed());
        }
        assert!(
            start.elapsed() < timeout,
            "`{}` still fails {timeout:?} after the token came back: exit code {}; stderr:\n{}",
            out.command,
            out.code,
            out.stderr
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_cut_token_is_unavailable_and_comes_back() {
    let kekd = Kekd::builder()
        .tenant(Tenant::owned_by_me("acme").kek_ttl("30s").behind_outage_switch())
        .tenant(Tenant::owned_by_me("beta").backend(softhsm_tests::Backend::SoftHsm))
        .start();

    // Served normally through the proxy.
    let (plain, edek) = kekd.generate("default", &[("app", "outage")]);
    assert_eq!(kekd.unwrap(&edek, &[("app", "outage")]).ok(), &plain[..]);
    let healthy = status(&kekd, "acme");
    assert_eq!(healthy["backend_healthy"], true, "{healthy}");
    assert!(!kekd.token_is_cut("acme"));

    kekd.cut_token("acme");
    assert!(kekd.token_is_cut("acme"));

    // Creating a key seals a new KEK under the root key: the token is needed.
    kekd.keys(["create", "x"]).assert_error(exit::UNAVAILABLE, "UNAVAILABLE");
    let down = status(&kekd, "acme");
    assert_eq!(down["backend_healthy"], false, "status while the token is cut: {down}");
    let error = down["backend_error"].as_str().unwrap_or_else(|| panic!("no backend_error string: {down}"));
    assert!(error.contains("CKR_DEVICE_ERROR"), "backend_error should name CKR_DEVICE_ERROR: {error:?}");
    assert!(
        kekd.stderr().contains("pkcs11_outage: link to"),
        "the proxy reports the cut:\n{}",
        kekd.stderr()
    );

    // Only acme's link is cut: another tenant, on the same SoftHSM2, is untouched.
    kekd.kekctl_for("beta").args(["keys", "create", "y"]).run().ok();
    assert_eq!(status(&kekd, "beta")["backend_healthy"], true);

    kekd.restore_token("acme");
    assert!(!kekd.token_is_cut("acme"));
    let (_, took) = until_ok(RECOVERY, || kekd.keys(["create", "x"]));
    eprintln!("keys create x succeeded {took:?} after restore_token");

    assert_eq!(kekd.unwrap(&edek, &[("app", "outage")]).ok(), &plain[..], "an EDEK from before the cut");
    let x_plain = b"sealed under x".to_vec();
    let x_edek = kekd.wrap("x", &x_plain, &[]);
    assert_eq!(kekd.unwrap(&x_edek, &[]).ok(), &x_plain[..]);
    let up = status(&kekd, "acme");
    assert_eq!(up["backend_healthy"], true, "status after the token came back: {up}");
}

#[test]
fn the_config_names_the_proxy_and_the_real_module() {
    let kekd = Kekd::builder()
        .tenant(Tenant::owned_by_me("acme").behind_outage_switch().offline_grace("0s").revocation_poll("2s"))
        .tenant(Tenant::owned_by_me("beta").backend(softhsm_tests::Backend::SoftHsm))
        .prepare();
    let text = kekd.config_text();
    let acme = softhsm_tests::config_without_tenant(&text, "beta");
    let beta = softhsm_tests::config_without_tenant(&text, "acme");
    let module = |p: &std::path::Path| format!("module = \"{}\"", p.display());
    assert!(acme.contains(&module(&outage_module())), "{acme}");
    assert!(acme.contains(&format!("KEKD_OUTAGE_MODULE = \"{}\"", softhsm_module().display())), "{acme}");
    let flag = kekd.dir().join("outage/acme.down");
    assert!(acme.contains(&format!("KEKD_OUTAGE_FLAG = \"{}\"", flag.display())), "{acme}");
    assert!(
        acme.contains("offline_grace = \"0s\"\n") && acme.contains("revocation_poll = \"2s\"\n"),
        "{acme}"
    );
    assert!(acme.contains("softhsm2_conf = "), "{acme}");
    assert!(beta.contains(&module(&softhsm_module())) && !beta.contains("module_env"), "{beta}");
    assert!(!beta.contains("offline_grace") && !beta.contains("revocation_poll"), "{beta}");
    kekd.check_config().ok();

    kekd.cut_token("acme");
    assert!(flag.exists());
    kekd.restore_token("acme");
    assert!(!flag.exists());
    kekd.restore_token("acme"); // restoring a token that is not cut is a no-op
}

#[test]
#[should_panic(expected = "is not behind the outage switch")]
fn cutting_a_tenant_without_the_switch_panics() {
    let kekd = Kekd::builder()
        .tenant(Tenant::owned_by_me("acme").backend(softhsm_tests::Backend::SoftHsm))
        .prepare();
    kekd.cut_token("acme");
}

#[test]
#[should_panic(expected = "a PKCS#11 setting")]
fn the_switch_on_a_tpm_tenant_panics() {
    let _ = Kekd::builder()
        .tenant(Tenant::owned_by_me("acme").backend(softhsm_tests::Backend::Tpm).behind_outage_switch())
        .prepare();
}
