//! Bring your own key (issue 5, point 6): the token generates an RSA-3072 transport key,
//! the customer wraps their key to it outside kekd (here with the openssl command line),
//! kekd imports it as a non-extractable root key and serves with it.
//!
//! On SoftHSM2, whose RSA-OAEP is SHA-1 only, and on kryoptic (a second PKCS#11 token, built
//! by the fixture; see `softhsm_tests::kryoptic_module`), which does the SHA-256 algorithms,
//! in both layouts. That the imported key is the customer's is shown as the customer would
//! recover their data without kekd (docs/FORMATS.md §2-§3): the KEK record opens under the
//! customer's key, and an EDEK opens under that KEK.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use base64::Engine as _;
use softhsm_tests::{exit, kryoptic_module, random_bytes, Backend, Kekd, Kryoptic, Tenant};

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

/// Opens `sealed` (`nonce ‖ ciphertext ‖ tag`) under the AES-256 `key`, or `None`.
fn open_gcm(key: &[u8], sealed: &[u8], aad: Vec<u8>) -> Option<Vec<u8>> {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).unwrap());
    let nonce = Nonce::try_assume_unique_for_key(&sealed[..12]).unwrap();
    let mut buf = sealed[12..].to_vec();
    let plain = key.open_in_place(nonce, Aad::from(aad), &mut buf).ok()?;
    Some(plain.to_vec())
}

/// What the customer holding the root key and the key store does to recover an EDEK without
/// kekd (docs/FORMATS.md §2-§3), with an empty context: reads the KEK record the EDEK names,
/// checks that `root_label` sealed it, opens it under `root_key`, and opens the EDEK under
/// the KEK. `None` if the record does not open under `root_key`.
fn recover_without_kekd(kekd: &Kekd, root_label: &str, root_key: &[u8], edek: &[u8]) -> Option<Vec<u8>> {
    let tenant = kekd.tenant();
    assert_eq!(edek[..2], [1, 1], "EDEK v1, AES-256-GCM");
    let n = usize::from(u16::from_be_bytes([edek[2], edek[3]]));
    let name = std::str::from_utf8(&edek[4..4 + n]).unwrap();
    let version = u32::from_be_bytes(edek[4 + n..8 + n].try_into().unwrap());
    let rec_path =
        kekd.dir().join(format!("state/tenants/{tenant}/keys/{}/v{version:010}.kek", hex(name.as_bytes())));
    let rec: serde_json::Value = serde_json::from_slice(&fs::read(&rec_path).unwrap()).unwrap();
    assert_eq!(rec["root_key"], root_label, "{}: {rec}", rec_path.display());
    let sealed = base64::engine::general_purpose::STANDARD.decode(rec["sealed"].as_str().unwrap()).unwrap();
    let kek = open_gcm(root_key, &sealed, kek_aad(tenant, name, version))?;
    assert_eq!(kek.len(), 32);
    let mut aad = b"kekd/edek/v1".to_vec();
    aad.extend_from_slice(&(tenant.len() as u16).to_be_bytes());
    aad.extend_from_slice(tenant.as_bytes());
    aad.extend_from_slice(&edek[..8 + n]);
    aad.extend_from_slice(&0u16.to_be_bytes()); // no context pairs
    Some(open_gcm(&kek, &edek[8 + n..], aad).expect("the EDEK opens under the recovered KEK"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Encrypts the file `input` to the PEM public key `pem` with RSA-OAEP, MGF1 and OAEP hash
/// `md` (`sha256`, `sha1`), into `output`.
fn rsa_oaep_encrypt(pem: &Path, md: &str, input: &Path, output: &Path) {
    openssl(&[
        "pkeyutl",
        "-encrypt",
        "-pubin",
        "-inkey",
        pem.to_str().unwrap(),
        "-in",
        input.to_str().unwrap(),
        "-out",
        output.to_str().unwrap(),
        "-pkeyopt",
        "rsa_padding_mode:oaep",
        "-pkeyopt",
        &format!("rsa_oaep_md:{md}"),
        "-pkeyopt",
        &format!("rsa_mgf1_md:{md}"),
    ]);
}

/// A tenant `acme` on its own kryoptic token, its transport public key for the root key
/// label `label` as a PEM file in `<test dir>/byok/` (that directory is returned), checked
/// to be RSA-3072 by openssl, with every algorithm offered (kryoptic does RSA-OAEP with
/// SHA-256 and SHA-1, and AES-KWP), SHA-256 first.
fn kryoptic_tenant_with_transport_key(label: &str) -> (Kekd, PathBuf) {
    let kekd = Kekd::builder().tenant(Tenant::owned_by_me("acme").backend(Backend::Kryoptic)).start();
    assert_eq!(kekd.backend_of("acme"), Backend::Kryoptic);
    assert!(kekd.config_text().contains("KRYOPTIC_CONF"), "{}", kekd.config_text());
    let dir = kekd.dir().join("byok");
    fs::create_dir_all(&dir).unwrap();
    let out = kekd.kekctl().args(["root", "import-key", "--label", label]).run();
    assert!(out.ok_str().starts_with("-----BEGIN PUBLIC KEY-----"), "{}", out.ok_str());
    assert!(out.stderr.contains("RSA-3072"), "{}", out.stderr);
    let pem = dir.join("transport.pem");
    fs::write(&pem, out.ok()).unwrap();
    let text = Command::new("openssl")
        .args(["pkey", "-pubin", "-noout", "-text", "-in"])
        .arg(&pem)
        .output()
        .expect("run openssl");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("Public-Key: (3072 bit)"), "{text}");
    let info = kekd.kekctl().json().args(["root", "import-key", "--label", label]).run().json();
    assert_eq!(info["pem"].as_str().unwrap(), out.ok_str(), "asked again, the same key");
    let accepted: Vec<&str> =
        info["algorithms"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert_eq!(
        accepted,
        ["RSAES_OAEP_SHA_256", "RSA_AES_KEY_WRAP_SHA_256", "RSAES_OAEP_SHA_1", "RSA_AES_KEY_WRAP_SHA_1"],
        "{info}"
    );
    (kekd, dir)
}

/// `kekctl root import` of the file `wrapped`.
fn import(kekd: &Kekd, label: &str, algorithm: &str, wrapped: &Path) -> softhsm_tests::Output {
    kekd.kekctl()
        .args(["root", "import", "--label", label, "--algorithm", algorithm])
        .stdin(fs::read(wrapped).unwrap())
        .run()
}

/// Runs pkcs11-tool on `kekd`'s tenant `acme`'s kryoptic token, logged in.
fn pkcs11_tool_on_acme_token(kekd: &Kekd, args: &[&str]) -> std::process::Output {
    let token = Kryoptic::at(&kekd.dir().join("kryoptic"), "acme");
    let mut cmd = token.command("pkcs11-tool");
    cmd.arg("--module").arg(kryoptic_module());
    cmd.args(["--token-label", "acme", "--login", "--pin", "pin-acme-1234"]).args(args);
    cmd.output().expect("run pkcs11-tool")
}

/// After the import of `customer_key` as `label` (the tenant's root key now): old EDEKs
/// unwrap (`before`: sealed under the generated root key), generate/wrap/unwrap serve, after
/// a restart too, the key store opens under the customer's key, and the key cannot be read
/// off the token.
fn serves_with_the_customer_key(kekd: &mut Kekd, label: &str, customer_key: &[u8], before: &[u8]) {
    assert_eq!(kekd.unwrap(before, &[]).ok(), b"sealed by the generated root key");
    let s = kekd.kekctl().json().arg("status").run().json();
    assert!(s["backend"].as_str().unwrap().contains(label), "{s}");
    let (plain, edek) = kekd.generate("default", &[]);
    assert_eq!(kekd.unwrap(&edek, &[]).ok(), plain);
    // A KEK made after the import, an EDEK under it: both open with the customer's key alone.
    kekd.keys(["create", "byok-new"]).ok();
    let after = kekd.wrap("byok-new", b"sealed by the customer's key", &[]);
    let recover = |key: &[u8], edek: &[u8]| recover_without_kekd(kekd, label, key, edek);
    assert_eq!(recover(customer_key, &after).as_deref(), Some(&b"sealed by the customer's key"[..]));
    // And the old KEK, rewrapped under the imported key by the rotation.
    assert_eq!(recover(customer_key, before).as_deref(), Some(&b"sealed by the generated root key"[..]));
    assert_eq!(recover(customer_key, &edek), Some(plain));
    // Another key opens nothing: the check can fail.
    assert_eq!(recover(&random_bytes(32), &after), None);

    kekd.restart_after_kill();
    assert_eq!(kekd.unwrap(&after, &[]).ok(), b"sealed by the customer's key");
    assert_eq!(kekd.unwrap(before, &[]).ok(), b"sealed by the generated root key");

    // On the token, neither the imported key nor the transport private key can be read or
    // leave: sensitive, not extractable (pkcs11-tool lists "extractable" in Access when
    // CKA_EXTRACTABLE is true); the imported key is AES-256 for encrypt and decrypt only, the
    // transport key may only unwrap.
    let out = pkcs11_tool_on_acme_token(kekd, &["--read-object", "--type", "secrkey", "--label", label]);
    assert!(!out.status.success(), "read the imported key's value: {}", String::from_utf8_lossy(&out.stdout));
    let transport = format!("{label}-transport");
    for (kind, object_label, heading, kind_line, usage) in [
        ("secrkey", label, "Secret Key Object", "AES length 32", "encrypt, decrypt"),
        ("privkey", transport.as_str(), "Private Key Object", "; RSA", "unwrap"),
    ] {
        let out = pkcs11_tool_on_acme_token(kekd, &["--list-objects", "--type", kind]);
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{listing}{}", String::from_utf8_lossy(&out.stderr));
        let object = listing
            .split(heading)
            .find(|o| o.lines().any(|l| l.trim() == format!("label:      {object_label}")))
            .unwrap_or_else(|| panic!("no {kind} {object_label:?} on the token:\n{listing}"));
        let line = |name: &str| {
            object
                .lines()
                .find_map(|l| l.trim().strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} line for {object_label:?}:{object}"))
                .trim()
                .to_owned()
        };
        assert!(object.contains(kind_line), "{object}");
        assert_eq!(line("Usage:"), usage, "{object}");
        let access = line("Access:");
        assert!(access.contains("sensitive"), "{object}");
        assert!(!access.replace("never extractable", "").contains("extractable"), "{object}");
    }
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

#[test]
fn kryoptic_imports_rsaes_oaep_sha_256_wrapped_with_openssl() {
    let label = "acme-byok";
    let (mut kekd, dir) = kryoptic_tenant_with_transport_key(label);
    let before = kekd.wrap("default", b"sealed by the generated root key", &[]);

    let customer_key = random_bytes(32);
    let key_file = dir.join("key.bin");
    fs::write(&key_file, &customer_key).unwrap();
    let pem = dir.join("transport.pem");
    rsa_oaep_encrypt(&pem, "sha256", &key_file, &dir.join("wrapped-sha256.bin"));
    rsa_oaep_encrypt(&pem, "sha1", &key_file, &dir.join("wrapped-sha1.bin"));
    assert_eq!(fs::metadata(dir.join("wrapped-sha256.bin")).unwrap().len(), 384);

    // Material wrapped with another hash than the one named does not unwrap, and creates
    // nothing: the label is still free for the right import below.
    let out = import(&kekd, label, "RSAES_OAEP_SHA_256", &dir.join("wrapped-sha1.bin"));
    out.assert_error(exit::FAILED_PRECONDITION, "FAILED_PRECONDITION");
    assert!(out.stderr.contains("RSA-OAEP decryption"), "{}", out.stderr);

    let out = import(&kekd, label, "RSAES_OAEP_SHA_256", &dir.join("wrapped-sha256.bin"));
    assert!(out.ok_str().contains(&format!("imported root key \"{label}\" is active")), "{}", out.ok_str());
    serves_with_the_customer_key(&mut kekd, label, &customer_key, &before);

    // A root key is never replaced.
    let out = import(&kekd, label, "RSAES_OAEP_SHA_256", &dir.join("wrapped-sha256.bin"));
    out.assert_error(exit::FAILED_PRECONDITION, "FAILED_PRECONDITION");
    assert!(out.stderr.contains("already has an object labelled"), "{}", out.stderr);
}

#[test]
fn kryoptic_imports_rsa_aes_key_wrap_sha_256_wrapped_with_openssl() {
    let label = "acme-byok-kwp";
    let (mut kekd, dir) = kryoptic_tenant_with_transport_key(label);
    let before = kekd.wrap("default", b"sealed by the generated root key", &[]);

    // The layout of CKM_RSA_AES_KEY_WRAP, as a customer makes it with openssl: RSA-OAEP
    // (SHA-256) of an ephemeral AES-256 key ‖ AES key wrap with padding (RFC 5649) of the
    // key under it.
    let customer_key = random_bytes(32);
    let ephemeral = random_bytes(32);
    let p = |name: &str| dir.join(name);
    fs::write(p("key.bin"), &customer_key).unwrap();
    fs::write(p("ephemeral.bin"), &ephemeral).unwrap();
    rsa_oaep_encrypt(&p("transport.pem"), "sha256", &p("ephemeral.bin"), &p("ephemeral.wrapped"));
    openssl(&[
        "enc",
        "-id-aes256-wrap-pad",
        "-K",
        &hex(&ephemeral),
        "-iv",
        "A65959A6",
        "-in",
        p("key.bin").to_str().unwrap(),
        "-out",
        p("key.kwp").to_str().unwrap(),
    ]);
    let mut wrapped = fs::read(p("ephemeral.wrapped")).unwrap();
    let kwp = fs::read(p("key.kwp")).unwrap();
    assert_eq!((wrapped.len(), kwp.len()), (384, 40));
    wrapped.extend_from_slice(&kwp);
    fs::write(p("wrapped.bin"), &wrapped).unwrap();

    // One bit flipped in the KWP part: its integrity check fails on the token, and nothing
    // is created.
    let mut tampered = wrapped.clone();
    tampered[384 + 20] ^= 0x01;
    fs::write(p("tampered.bin"), &tampered).unwrap();
    let out = import(&kekd, label, "RSA_AES_KEY_WRAP_SHA_256", &p("tampered.bin"));
    out.assert_error(exit::FAILED_PRECONDITION, "FAILED_PRECONDITION");
    assert!(out.stderr.contains("AES key wrap (RFC 5649) integrity check failed"), "{}", out.stderr);
    // The right length of the other layout is named.
    let out = import(&kekd, label, "RSAES_OAEP_SHA_256", &p("wrapped.bin"));
    out.assert_error(exit::FAILED_PRECONDITION, "FAILED_PRECONDITION");
    assert!(out.stderr.contains("RSA_AES_KEY_WRAP_SHA_256"), "{}", out.stderr);

    let out = import(&kekd, label, "RSA_AES_KEY_WRAP_SHA_256", &p("wrapped.bin"));
    assert!(out.ok_str().contains(&format!("imported root key \"{label}\" is active")), "{}", out.ok_str());
    serves_with_the_customer_key(&mut kekd, label, &customer_key, &before);
}
