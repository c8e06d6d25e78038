//! Version controls and crypto-shredding (issue 5, point 5): `min_decrypt_version`,
//! `keep_versions`, `keys destroy` and `tenant destroy`, each checked by scanning the
//! whole state directory afterwards for the sealed KEK bytes that were shredded.

use std::fs;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use softhsm_tests::{exit, Kekd, Tenant};

/// Every file under `dir`.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn state_dir(kekd: &Kekd) -> PathBuf {
    kekd.dir().join("state")
}

/// The sealed bytes of one KEK version, read from its record (docs/FORMATS.md §2).
fn sealed(kekd: &Kekd, key: &str, version: u32) -> Vec<u8> {
    let path =
        state_dir(kekd).join("tenants/acme/keys").join(hex_name(key)).join(format!("v{version:010}.kek"));
    let rec: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    let b64 = rec["sealed"].as_str().unwrap();
    base64::engine::general_purpose::STANDARD.decode(b64).unwrap()
}

fn hex_name(key: &str) -> String {
    key.bytes().map(|b| format!("{b:02x}")).collect()
}

/// Panics if any file under the state directory still holds `bytes`, raw or in base64.
fn assert_gone(kekd: &Kekd, bytes: &[u8], what: &str) {
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    for file in files(&state_dir(kekd)) {
        let content = fs::read(&file).unwrap();
        assert!(
            !content.windows(bytes.len()).any(|w| w == bytes),
            "{what}: raw bytes remain in {}",
            file.display()
        );
        assert!(
            !content.windows(b64.len()).any(|w| w == b64.as_bytes()),
            "{what}: base64 remains in {}",
            file.display()
        );
    }
}

#[test]
fn destroyed_and_pruned_versions_leave_no_trace_and_min_decrypt_version_refuses() {
    let kekd = Kekd::builder().tenant(Tenant::owned_by_me("acme")).start();
    let mut edeks = vec![kekd.wrap("default", b"v1", &[])];
    for v in 2..=4 {
        kekd.keys(["rotate", "default"]).ok();
        edeks.push(kekd.wrap("default", format!("v{v}").as_bytes(), &[]));
    }
    let before: Vec<Vec<u8>> = (1..=4).map(|v| sealed(&kekd, "default", v)).collect();

    // min_decrypt_version: v1 is refused, naming the control; v2 still opens.
    let out = kekd.keys(["set", "default", "--min-decrypt-version", "2"]);
    assert!(out.ok_str().contains("min_decrypt_version=2"), "{}", out.ok_str());
    let out = kekd.unwrap(&edeks[0], &[]);
    out.assert_error(exit::FAILED_PRECONDITION, "FAILED_PRECONDITION");
    assert!(out.stderr.contains("min_decrypt_version 2"), "{}", out.stderr);
    assert_eq!(kekd.unwrap(&edeks[1], &[]).ok(), b"v2");
    // Above the active version it is refused: new data would be unreadable at once.
    let out = kekd.keys(["set", "default", "--min-decrypt-version", "5"]);
    out.assert_error(exit::FAILED_PRECONDITION, "FAILED_PRECONDITION");
    // And back: v1 was only refused, not destroyed.
    kekd.keys(["set", "default", "--min-decrypt-version", "0"]).ok();
    assert_eq!(kekd.unwrap(&edeks[0], &[]).ok(), b"v1");

    // keys destroy crypto-shreds one version.
    kekd.keys(["destroy", "default", "--version", "1"]).ok();
    kekd.unwrap(&edeks[0], &[]).assert_error(exit::DATA_INVALID, "DATA_INVALID");
    assert_gone(&kekd, &before[0], "version 1 after keys destroy");

    // keep_versions = 2 keeps v3 and v4 and destroys v2 at once...
    kekd.keys(["set", "default", "--keep-versions", "2"]).ok();
    assert_eq!(kekd.key("default").state(2), "destroyed");
    assert_gone(&kekd, &before[1], "version 2 after keep_versions = 2");
    // ...and the next rotation destroys v3.
    kekd.keys(["rotate", "default"]).ok();
    let key = kekd.key("default");
    assert_eq!((key.state(3), key.state(4), key.state(5)), ("destroyed", "decrypt-only", "active"));
    assert_gone(&kekd, &before[2], "version 3 after a rotation under keep_versions = 2");
    assert_eq!(kekd.unwrap(&edeks[3], &[]).ok(), b"v4");
    for e in &edeks[..3] {
        kekd.unwrap(e, &[]).assert_error(exit::DATA_INVALID, "DATA_INVALID");
    }
    // The JSON listing carries the controls too.
    let v = kekd.keys(["--json", "list"]).json();
    assert_eq!(v[0]["keep_versions"], 2, "{v}");
}

#[test]
fn tenant_destroy_shreds_every_key_and_stays_destroyed() {
    let mut kekd =
        Kekd::builder().tenant(Tenant::owned_by_me("acme")).tenant(Tenant::owned_by_me("beta")).start();
    kekd.keys(["create", "billing"]).ok();
    kekd.keys(["rotate", "billing"]).ok();
    let edek = kekd.wrap("billing", b"gone for good", &[]);
    let beta = kekd
        .kekctl_for("beta")
        .args(["wrap", "--key", "default"])
        .stdin(&b"beta stays"[..])
        .run()
        .ok()
        .to_vec();
    let doomed: Vec<Vec<u8>> =
        vec![sealed(&kekd, "default", 1), sealed(&kekd, "billing", 1), sealed(&kekd, "billing", 2)];

    // The confirmation must name the tenant.
    let out = kekd.kekctl().args(["tenant", "destroy", "--confirm", "beta"]).run();
    out.assert_error(exit::INVALID_ARGUMENT, "INVALID_ARGUMENT");
    let out = kekd.kekctl().json().args(["tenant", "destroy", "--confirm", "acme"]).run();
    let v = out.json();
    assert_eq!((v["keys"].as_u64(), v["versions_shredded"].as_u64()), (Some(2), Some(3)), "{v}");

    for (i, bytes) in doomed.iter().enumerate() {
        assert_gone(&kekd, bytes, &format!("sealed KEK {i} after tenant destroy"));
    }
    let keys_dir = state_dir(&kekd).join("tenants/acme/keys");
    assert!(!keys_dir.exists(), "{} still exists", keys_dir.display());
    let out = kekd.unwrap(&edek, &[]);
    out.assert_error(exit::FAILED_PRECONDITION, "FAILED_PRECONDITION");
    assert!(out.stderr.contains("destroyed"), "{}", out.stderr);
    // The other tenant is untouched.
    assert_eq!(kekd.kekctl_for("beta").arg("unwrap").stdin(beta.clone()).run().ok(), b"beta stays");

    // After a restart the tenant stays destroyed: no fresh `default` key appears.
    kekd.restart_after_kill();
    let out = kekd.kekctl().args(["generate", "--key", "default"]).run();
    out.assert_error(exit::FAILED_PRECONDITION, "FAILED_PRECONDITION");
    assert!(out.stderr.contains("remove it from the configuration"), "{}", out.stderr);
    assert!(!keys_dir.exists());
    assert_eq!(kekd.kekctl_for("beta").arg("unwrap").stdin(beta).run().ok(), b"beta stays");
}
