//! Root key rotation (issue 5, point 2): `kekctl root rotate` creates (or adopts) a new
//! root key and rewraps every KEK record under it, each atomically; a kill -9 at any
//! point loses no EDEK, the rotation resumes at the next start, and afterwards the old
//! root keys can be deleted from the token.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use softhsm_tests::{bin, exit, random_bytes, Backend, Kekd, Tenant};

/// `<state>/tenants/acme/root.json`, if a rotation was ever recorded.
fn root_state(kekd: &Kekd) -> Option<serde_json::Value> {
    let path = kekd.dir().join("state/tenants/acme/root.json");
    fs::read(&path).ok().map(|b| serde_json::from_slice(&b).unwrap())
}

/// The `root_key` of every sealed KEK record sealed by a root key (not a parent KEK).
fn record_roots(dir: &Path) -> Vec<Option<String>> {
    let mut out = Vec::new();
    for key in fs::read_dir(dir).unwrap() {
        for f in fs::read_dir(key.unwrap().path()).unwrap() {
            let path = f.unwrap().path();
            if path.extension().is_some_and(|e| e == "kek") {
                let rec: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
                if rec.get("parent").is_none() {
                    out.push(rec["root_key"].as_str().map(str::to_owned));
                }
            }
        }
    }
    out
}

fn wait_rotation_done(kekd: &Kekd) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while root_state(kekd).is_some_and(|s| s["rotating"] == true) {
        assert!(Instant::now() < deadline, "the rotation was not finished 20 s after the restart");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_rotation_killed_at_random_points_loses_no_edek() {
    let mut kekd = Kekd::builder().tenant(Tenant::owned_by_me("acme").backend(Backend::SoftHsm)).start();
    // Some 20 root-sealed records, a chain, and states other than active.
    let mut edeks = Vec::new();
    for k in ["alpha", "bravo", "charlie", "delta", "echo"] {
        kekd.keys(["create", k]).ok();
        for v in 1..=3 {
            let secret = format!("{k} v{v}").into_bytes();
            edeks.push((secret.clone(), kekd.wrap(k, &secret, &[])));
            kekd.keys(["rotate", k]).ok();
        }
    }
    kekd.keys(["create", "alpha/child"]).ok();
    edeks.push((b"chained".to_vec(), kekd.wrap("alpha/child", b"chained", &[])));
    kekd.keys(["disable", "bravo", "--version", "1"]).ok();
    let check_all = |kekd: &Kekd| {
        kekd.keys(["enable", "bravo", "--version", "1"]).ok();
        for (secret, edek) in &edeks {
            assert_eq!(kekd.unwrap(edek, &[]).ok(), &secret[..], "{}", String::from_utf8_lossy(secret));
        }
        kekd.keys(["disable", "bravo", "--version", "1"]).ok();
    };

    // A first, uninterrupted rotation measures how long one takes (kekctl's own start
    // included), so the kills below can be spread over that window.
    let started = Instant::now();
    kekd.kekctl().args(["root", "rotate", "--label", "acme-root-0"]).run().ok();
    let window = started.elapsed().as_millis() as u64;
    eprintln!("one rotation through kekctl: {window} ms");
    let mut labels = vec![kekd.root_key_label("acme"), "acme-root-0".to_owned()];
    let mut resumed = 0;
    for run in 1..=20 {
        let label = format!("acme-root-{run}");
        labels.push(label.clone());
        let mut rotate = Command::new(bin("kekctl"))
            .arg("--socket")
            .arg(kekd.socket())
            .args(["--tenant", "acme", "root", "rotate", "--label", &label])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn kekctl");
        let r = random_bytes(2);
        let delay = u64::from(u16::from_le_bytes([r[0], r[1]])) % window.max(1);
        std::thread::sleep(Duration::from_millis(delay));
        kekd.kill();
        let _ = rotate.wait();
        kekd.start();
        wait_rotation_done(&kekd);
        if kekd.stderr().contains("resuming a root key rotation") {
            resumed += 1;
        }
        check_all(&kekd);
    }
    // The delays are spread so that some kills land in the middle of the rewrapping.
    eprintln!("{resumed} of 20 rotations were cut short and resumed at the next start");
    assert!(resumed > 0, "no kill landed during a rotation: the test shows nothing");

    // Whatever the kills interrupted, a last rotation finishes cleanly...
    let out = kekd.kekctl().json().args(["root", "rotate", "--label", "acme-root-final"]).run();
    assert_eq!(out.json()["active_key_label"], "acme-root-final");
    let state = root_state(&kekd).unwrap();
    assert_eq!(state["rotating"], false, "{state}");
    // ...every root-sealed record names the new root key...
    let roots = record_roots(&kekd.dir().join("state/tenants/acme/keys"));
    assert!(roots.len() >= 20, "{roots:?}");
    assert!(roots.iter().all(|r| r.as_deref() == Some("acme-root-final")), "{roots:?}");
    // ...so every earlier root key can go, and every EDEK still unwraps, cold.
    let prev = state["previous"].as_array().unwrap().clone();
    for old in &labels {
        if prev.iter().any(|p| p == old.as_str()) {
            kekd.delete_token_key("acme", old);
        }
    }
    kekd.restart_after_kill();
    check_all(&kekd);
    let s = kekd.kekctl().json().arg("status").run().json();
    assert!(s["backend"].as_str().unwrap().contains("acme-root-final"), "{s}");
    assert_eq!(s["backend_healthy"], true, "{s}");
}

#[test]
fn a_rotation_adopts_an_existing_key_and_refuses_a_tpm() {
    let kekd = Kekd::builder()
        .tenant(Tenant::owned_by_me("acme").backend(Backend::SoftHsm))
        .tenant(Tenant::owned_by_me("tpm").backend(Backend::Tpm))
        .start();
    let edek = kekd.wrap("default", b"before", &[]);
    let out = kekd.kekctl().args(["root", "rotate", "--label", "acme-root-2"]).run();
    assert!(out.ok_str().contains("\"acme-root-2\" is active"), "{}", out.ok_str());
    // Back to the first key: it is on the token already, so it is adopted, not created.
    let first = kekd.root_key_label("acme");
    kekd.kekctl().args(["root", "rotate", "--label", &first]).run().ok();
    let out = kekd.kekctl().args(["root", "rotate", "--label", &first]).run();
    out.assert_error(exit::FAILED_PRECONDITION, "FAILED_PRECONDITION");
    // The key active again is not among the earlier ones an operator may delete.
    let state = root_state(&kekd).unwrap();
    assert_eq!(state["active"], first.as_str());
    assert_eq!(state["previous"], serde_json::json!(["acme-root-2"]), "{state}");
    assert_eq!(kekd.unwrap(&edek, &[]).ok(), b"before");

    let out = kekd.kekctl_for("tpm").args(["root", "rotate"]).run();
    out.assert_error(exit::FAILED_PRECONDITION, "FAILED_PRECONDITION");
    assert!(out.stderr.contains("root key rotation is for PKCS#11 root keys"), "{}", out.stderr);
}
