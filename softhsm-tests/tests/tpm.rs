//! The TPM root-key backend end to end (issue 4): the real kekd, kekd-tpm-worker and
//! kekctl against a real swtpm per tenant. The backend-neutral suite also runs against
//! swtpm (`KEKD_TEST_BACKEND=tpm`, see scripts/test); this file holds what only a TPM has:
//! PCR policies, TPM restarts and resets, and `kekd dev --backend tpm`.

use std::fs;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use softhsm_tests::{exit, proc_file, Backend, Kekd, Tenant};

fn tpm_tenant(name: &str) -> Tenant {
    Tenant::owned_by_me(name).backend(Backend::Tpm)
}

fn status(kekd: &Kekd) -> serde_json::Value {
    kekd.kekctl().json().arg("status").run().json()
}

/// Point 2: PCR 16 extended under a running tenant. A KEK nobody has unsealed yet is
/// refused, naming the policy; the refusal is definitive (DESIGN §5), so the KEKs cached
/// before it are flushed at once and refused as well.
#[test]
fn an_extended_pcr_refuses_cold_unwraps_and_flushes_the_cache() {
    let kekd = Kekd::builder().tenant(tpm_tenant("acme").pcrs(&[16]).parameter_encryption(true)).start();
    let (plain, warm) = kekd.generate("default", &[]);
    kekd.keys(["create", "cold"]).ok();
    let describe = status(&kekd)["backend"].as_str().unwrap().to_owned();
    assert!(
        describe.contains("pcrs=sha256:16") && describe.contains("parameter_encryption=on"),
        "{describe}"
    );
    assert_eq!(status(&kekd)["cached_keks"], 1);

    kekd.swtpm("acme").pcr_extend(16);

    // The cached KEK serves: no root-key call has answered "no" yet.
    assert_eq!(kekd.unwrap(&warm, &[]).ok(), &plain[..]);
    // A cold KEK needs the TPM, which refuses under the policy.
    let out = kekd.kekctl().args(["generate", "--key", "cold"]).run();
    out.assert_error(exit::FAILED_PRECONDITION, "FAILED_PRECONDITION");
    assert!(out.stderr.contains("PCR policy") && out.stderr.contains("sha256:16"), "{}", out.stderr);
    // That answer was definitive: nothing cached outlives it.
    assert_eq!(status(&kekd)["cached_keks"], 0);
    let out = kekd.unwrap(&warm, &[]);
    out.assert_error(exit::FAILED_PRECONDITION, "FAILED_PRECONDITION");
    assert!(out.stderr.contains("PCR policy"), "{}", out.stderr);
    // Status says why, too.
    let s = status(&kekd);
    assert_eq!(s["backend_healthy"], false, "{s}");
    assert!(s["backend_error"].as_str().unwrap().contains("PCR policy"), "{s}");
}

/// A PCR policy without parameter encryption (swtpm's default): the policy session that
/// authorises the unseal has no key to encrypt the response with, and must not ask for it
/// (TPM_RC_SYMMETRIC otherwise).
#[test]
fn a_pcr_policy_without_parameter_encryption_unseals() {
    let mut kekd = Kekd::builder().tenant(tpm_tenant("acme").pcrs(&[16]).parameter_encryption(false)).start();
    let describe = status(&kekd)["backend"].as_str().unwrap().to_owned();
    assert!(
        describe.contains("pcrs=sha256:16") && describe.contains("parameter_encryption=off"),
        "{describe}"
    );
    let edek = kekd.wrap("default", b"a secret under a PCR policy", &[]);
    // A new worker has no KEK cached: the unwrap unseals under the policy.
    kekd.restart_after_kill();
    assert_eq!(status(&kekd)["cached_keks"], 0);
    assert_eq!(kekd.unwrap(&edek, &[]).ok(), b"a secret under a PCR policy");
}

/// Point 5: swtpm killed under load and started again on the same state. Cached KEKs
/// serve throughout; cold unwraps are UNAVAILABLE while it is down and work again within
/// 5 s of its return.
#[test]
fn a_tpm_restart_mid_run_is_ridden_out() {
    let mut kekd = Kekd::builder().tenant(tpm_tenant("acme")).start();
    let (plain, warm) = kekd.generate("default", &[]);
    kekd.keys(["create", "cold"]).ok();

    kekd.swtpm_mut("acme").stop();
    for _ in 0..20 {
        assert_eq!(kekd.unwrap(&warm, &[]).ok(), &plain[..], "a cached KEK stopped serving");
    }
    let out = kekd.kekctl().args(["generate", "--key", "cold"]).run();
    out.assert_error(exit::UNAVAILABLE, "UNAVAILABLE");
    assert!(out.stderr.contains("unreachable"), "{}", out.stderr);

    kekd.swtpm_mut("acme").start_again();
    let back = Instant::now();
    loop {
        let out = kekd.kekctl().args(["generate", "--key", "cold"]).run();
        if out.code == exit::OK {
            break;
        }
        out.assert_error(exit::UNAVAILABLE, "UNAVAILABLE");
        assert!(
            back.elapsed() < Duration::from_secs(5),
            "cold unwraps still fail 5 s after the TPM came back"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("cold unwraps served again {:?} after the TPM came back", back.elapsed());
    assert_eq!(kekd.unwrap(&warm, &[]).ok(), &plain[..]);
    // The worker never restarted: it reconnected.
    assert!(!kekd.stderr().contains("restarting the worker"), "{}", kekd.stderr());
}

/// Point 6: a TPM reset (swtpm restarted on its state) and a kekd restart lose nothing:
/// the key records hold the sealed blobs, not contexts.
#[test]
fn keys_survive_a_tpm_reset_and_a_kekd_restart() {
    let mut kekd = Kekd::builder().tenant(tpm_tenant("acme")).start();
    kekd.keys(["create", "billing"]).ok();
    let mut edeks = Vec::new();
    for key in ["default", "billing"] {
        let secret = format!("secret under {key}").into_bytes();
        edeks.push((secret.clone(), kekd.wrap(key, &secret, &[("k", key)]), key));
    }
    kekd.keys(["rotate", "billing"]).ok();

    kekd.kill();
    kekd.swtpm_mut("acme").restart();
    assert_eq!(kekd.swtpm("acme").transient_handles(), Vec::<u32>::new());
    kekd.start();
    for (secret, edek, key) in &edeks {
        assert_eq!(kekd.unwrap(edek, &[("k", key)]).ok(), &secret[..], "{key}");
    }
    // And a reset under a running kekd: cold unseals recreate the primary.
    kekd.swtpm_mut("acme").restart();
    kekd.keys(["rotate", "default"]).ok();
    let after = kekd.wrap("default", b"after the reset", &[]);
    assert_eq!(kekd.unwrap(&after, &[]).ok(), b"after the reset");
}

/// The TPM library lives in the worker, never in the supervisor (issue 3's rule), and
/// between operations nothing of kekd's stays loaded in the TPM.
#[test]
fn only_the_tpm_worker_loads_libtss2_and_leaves_the_tpm_empty() {
    let kekd = Kekd::builder()
        .tenant(tpm_tenant("acme"))
        .tenant(Tenant::owned_by_me("globex").backend(Backend::SoftHsm))
        .start();
    let (plain, edek) = kekd.generate("default", &[]);
    assert_eq!(kekd.unwrap(&edek, &[]).ok(), &plain[..]);
    let supervisor = kekd.pid().unwrap();
    let maps = proc_file(supervisor, "maps");
    assert!(!maps.contains("libtss2") && !maps.contains("libsofthsm2"), "supervisor maps:\n{maps}");
    let worker = kekd.worker_pid("acme");
    let cmdline = proc_file(worker, "cmdline").replace('\0', " ");
    assert!(cmdline.contains("kekd-tpm-worker --tenant acme"), "{cmdline}");
    assert!(proc_file(worker, "maps").contains("libtss2-esys"), "the TPM worker has no libtss2");
    assert!(
        !proc_file(kekd.worker_pid("globex"), "maps").contains("libtss2"),
        "a PKCS#11 worker loaded libtss2"
    );
    assert_eq!(kekd.swtpm("acme").transient_handles(), Vec::<u32>::new());
}

/// Point 7: `kekd dev --backend tpm` starts its own swtpm under DIR, serves, and stops it.
#[test]
fn dev_mode_serves_from_its_own_swtpm() {
    let mut dev = Kekd::dev_args(&["--backend", "tpm"]);
    dev.start();
    let dir = dev.dev_dir().unwrap().to_path_buf();
    let (plain, edek) = dev.generate("default", &[]);
    let s = status(&dev);
    assert!(s["backend"].as_str().unwrap().starts_with("tpm tcti=\"swtpm:host=127.0.0.1,port="), "{s}");
    assert!(dir.join("swtpm").read_dir().unwrap().next().is_some(), "no TPM state under DIR/swtpm");
    let config = fs::read_to_string(dir.join("kekd.toml")).unwrap();
    assert!(config.contains("[tenants.demo.tpm]"), "{config}");
    let swtpm_pids = swtpm_children(dev.pid().unwrap());
    assert_eq!(swtpm_pids.len(), 1, "one swtpm, a child of kekd dev");

    assert!(dev.stop_with(Signal::SIGTERM).success());
    for pid in swtpm_pids {
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "swtpm {pid} outlived kekd dev");
    }
    // The TPM's state and the keys are kept: the next run unwraps the old EDEK.
    dev.start();
    assert_eq!(dev.unwrap(&edek, &[]).ok(), &plain[..]);
}

fn swtpm_children(parent: u32) -> Vec<u32> {
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit(')').next().map(str::to_owned))
                .and_then(|rest| rest.split_whitespace().nth(1).map(|p| p == parent.to_string()))
                .unwrap_or(false)
                && fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "swtpm")
        })
        .collect()
}

/// kekd-tpm-worker is a file of its own: one from another kekd version refuses to serve.
#[test]
fn a_tpm_worker_of_another_version_refuses_to_serve() {
    let mut cmd = std::process::Command::new(softhsm_tests::bin("kekd-tpm-worker"));
    cmd.args(["--tenant", "acme", "--kekd-version", "0.0.0-older"]);
    let out = softhsm_tests::run_command(cmd, Vec::new());
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("supervisor runs kekd 0.0.0-older") && out.stderr.contains("restart kekd"),
        "{}",
        out.stderr
    );
}
