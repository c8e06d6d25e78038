//! Bring your own key (issue 5, point 6): the token generates an RSA-3072 transport key,
//! the customer wraps their key to it outside kekd (here with the openssl command line),
//! kekd imports it as a non-extractable root key and serves with it.

use std::fs;
use std::process::Command;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use softhsm_tests::{exit, random_bytes, Backend, Kekd, Tenant};

fn openssl(args: &[&str]) {
    let out = Command::new("openssl").args(args).output().expect("run openssl (./scripts/install-deps)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// `"kekd/kek/v1" ‖ str16(tenant) ‖ str16(key) ‖ u32 version` (docs/FORMATS.md §2).
fn kek_aad(tenant: &str, key: &str, version: u32) -> Vec<u8> {
    let mut aad = b"kekd/kek/v1".to_vec();
    for s in [tenant, key] {
        aad.extend_from_slice(&(s.len() as u16).to_be_bytes());
        aad.extend_from_slice(s.as_bytes());
    }
    aad.extend_from_slice(&version.to_be_bytes());
    aad
}

#[test]
fn a_key_wrapped_with_openssl_becomes_the_root_key() {
    let kekd = Kekd::builder().tenant(Tenant::owned_by_me("acme").backend(Backend::SoftHsm)).start();
    let before = kekd.wrap("default", b"sealed by the generated root key", &[]);
    let dir = kekd.dir().join("byok");
    fs::create_dir_all(&dir).unwrap();
    let path = |n: &str| dir.join(n).to_str().unwrap().to_owned();

    // Step 1: the transport public key, as PEM that openssl reads.
    let out = kekd.kekctl().args(["root", "import-key", "--label", "acme-byok"]).run();
    fs::write(path("transport.pem"), out.ok()).unwrap();
    assert!(out.ok_str().starts_with("-----BEGIN PUBLIC KEY-----"), "{}", out.ok_str());
    assert!(out.stderr.contains("RSA-3072"), "{}", out.stderr);
    let info = kekd.kekctl().json().args(["root", "import-key", "--label", "acme-byok"]).run().json();
    assert_eq!(info["pem"].as_str().unwrap(), out.ok_str(), "asked again, the same key");
    let accepted: Vec<String> =
        info["algorithms"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_owned()).collect();

    // The customer's key, wrapped outside kekd with RSA-OAEP.
    let customer_key = random_bytes(32);
    fs::write(path("key.bin"), &customer_key).unwrap();
    let wrap = |md: &str, out: &str| {
        openssl(&[
            "pkeyutl",
            "-encrypt",
            "-pubin",
            "-inkey",
            &path("transport.pem"),
            "-in",
            &path("key.bin"),
            "-out",
            &path(out),
            "-pkeyopt",
            "rsa_padding_mode:oaep",
            "-pkeyopt",
            &format!("rsa_oaep_md:{md}"),
            "-pkeyopt",
            &format!("rsa_mgf1_md:{md}"),
        ])
    };
    wrap("sha256", "wrapped-sha256.bin");
    wrap("sha1", "wrapped-sha1.bin");

    // RSA-OAEP with SHA-256 where the token does it; SoftHSM 2.6.1 does SHA-1 only, and
    // then the refusal names what it accepts and creates nothing.
    let (algorithm, file) = if accepted.iter().any(|a| a == "RSAES_OAEP_SHA_256") {
        ("RSAES_OAEP_SHA_256", "wrapped-sha256.bin")
    } else {
        let out = kekd
            .kekctl()
            .args(["root", "import", "--label", "acme-byok", "--algorithm", "RSAES_OAEP_SHA_256"])
            .stdin(fs::read(path("wrapped-sha256.bin")).unwrap())
            .run();
        out.assert_error(exit::FAILED_PRECONDITION, "FAILED_PRECONDITION");
        assert!(out.stderr.contains("RSAES_OAEP_SHA_1"), "{}", out.stderr);
        ("RSAES_OAEP_SHA_1", "wrapped-sha1.bin")
    };
    // Step 2: import; the tenant's root key rotates to it.
    let out = kekd
        .kekctl()
        .args(["root", "import", "--label", "acme-byok", "--algorithm", algorithm])
        .stdin(fs::read(path(file)).unwrap())
        .run();
    assert!(out.ok_str().contains("imported root key \"acme-byok\" is active"), "{}", out.ok_str());

    // It serves: old EDEKs, new ones, after a restart too.
    assert_eq!(kekd.unwrap(&before, &[]).ok(), b"sealed by the generated root key");
    let after = kekd.wrap("default", b"sealed by the customer's key", &[]);
    assert_eq!(kekd.unwrap(&after, &[]).ok(), b"sealed by the customer's key");
    let s = kekd.kekctl().json().arg("status").run().json();
    assert!(s["backend"].as_str().unwrap().contains("acme-byok"), "{s}");

    // And it is the customer's key: the KEK record opens under it, outside kekd.
    let rec_path = kekd.dir().join("state/tenants/acme/keys/64656661756c74/v0000000001.kek");
    let rec: serde_json::Value = serde_json::from_slice(&fs::read(&rec_path).unwrap()).unwrap();
    assert_eq!(rec["root_key"], "acme-byok");
    use base64::Engine as _;
    let mut sealed =
        base64::engine::general_purpose::STANDARD.decode(rec["sealed"].as_str().unwrap()).unwrap();
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &customer_key).unwrap());
    let nonce = Nonce::try_assume_unique_for_key(&sealed[..12]).unwrap();
    let kek = key
        .open_in_place(nonce, Aad::from(kek_aad("acme", "default", 1)), &mut sealed[12..])
        .expect("the KEK record decrypts under the imported key");
    assert_eq!(kek.len(), 32);
}
