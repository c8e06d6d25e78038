//! The `kekctl` scripting contract (issue 2, point 8): raw bytes on stdin and stdout,
//! `--json` shapes with base64 fields, `KEKD_SOCKET` / `KEKD_TENANT`, options anywhere on
//! the line, and one exit code per error class.

use softhsm_tests::{exit, parse_edek, unb64, Kekctl, Kekd, Tenant};

#[test]
fn generate_json_prints_base64_plaintext_and_edek() {
    let kekd = Kekd::start_default();
    let v = kekd.kekctl().json().args(["generate", "--key", "default"]).run().json();
    let obj = v.as_object().unwrap_or_else(|| panic!("generate --json must print one object, got {v}"));
    let plaintext = unb64(obj["plaintext"].as_str().expect("plaintext is a base64 string"));
    let edek = unb64(obj["edek"].as_str().expect("edek is a base64 string"));
    assert_eq!(plaintext.len(), 32, "a data key is 32 bytes");

    let h = parse_edek(&edek);
    assert_eq!((h.format, h.alg, h.key.as_str(), h.version), (1, 1, "default", 1), "{h:?}");
    assert_eq!(h.sealed_len, 32 + 16, "ciphertext of a 32-byte key plus a 16-byte tag");

    // The EDEK, fed raw to unwrap, gives the plaintext back, raw.
    assert_eq!(kekd.unwrap(&edek, &[]).ok(), &plaintext[..]);

    // A second call gives a different key and a different nonce.
    let (p2, e2) = kekd.generate("default", &[]);
    assert_ne!(p2, plaintext);
    assert_ne!(parse_edek(&e2).nonce, h.nonce);
}

#[test]
fn generate_edek_only_returns_no_plaintext() {
    let kekd = Kekd::start_default();
    let v = kekd.kekctl().json().args(["generate", "--key", "default", "--edek-only"]).run().json();
    assert!(v.get("plaintext").is_none_or(|p| p.is_null()), "--edek-only must not print a plaintext: {v}");
    let edek = unb64(v["edek"].as_str().unwrap_or_else(|| panic!("no edek in {v}")));
    // The EDEK is real: it unwraps to a 32-byte key.
    assert_eq!(kekd.unwrap(&edek, &[]).ok().len(), 32);
}

#[test]
fn wrap_and_unwrap_carry_raw_binary_bytes() {
    let kekd = Kekd::start_default();
    // NULs, 0xff, a trailing newline, every byte value, and bytes that are not UTF-8.
    let mut secret = vec![0u8, 0, 0xff, 0xff, b'\n', 0xc3, 0x28];
    secret.extend(0..=255u8);
    secret.extend_from_slice(b"\r\n\0\n");

    let edek = kekd.wrap("default", &secret, &[("file", "a.bin")]);
    let h = parse_edek(&edek);
    assert_eq!((h.key.as_str(), h.version), ("default", 1));
    assert_eq!(h.sealed_len, secret.len() + 16, "the raw EDEK is exactly header ‖ ciphertext ‖ tag");

    let out = kekd.unwrap(&edek, &[("file", "a.bin")]);
    assert_eq!(
        out.ok(),
        &secret[..],
        "unwrap must print exactly the wrapped bytes, nothing added or trimmed"
    );

    // Rewrap: raw EDEK in, raw EDEK out, same secret inside, new nonce.
    let rewrapped = kekd.rewrap(&edek, &[("file", "a.bin")]).ok().to_vec();
    assert_ne!(rewrapped, edek);
    assert_eq!(parse_edek(&rewrapped).sealed_len, secret.len() + 16);
    assert_eq!(kekd.unwrap(&rewrapped, &[("file", "a.bin")]).ok(), &secret[..]);
}

#[test]
fn wrap_accepts_4_kib_and_refuses_more() {
    let kekd = Kekd::start_default();
    let max = vec![0xa5u8; 4096];
    let edek = kekd.wrap("default", &max, &[]);
    assert_eq!(kekd.unwrap(&edek, &[]).ok(), &max[..]);

    let too_big = kekd.kekctl().args(["wrap", "--key", "default"]).stdin(vec![0xa5u8; 4097]).run();
    too_big.assert_error(exit::INVALID_ARGUMENT, "INVALID_ARGUMENT");

    let empty = kekd.kekctl().args(["wrap", "--key", "default"]).run();
    assert_ne!(empty.code, 0, "wrapping an empty secret must fail");
    assert!(empty.stdout.is_empty());
}

#[test]
fn context_must_match_in_any_order() {
    let kekd = Kekd::start_default();
    let secret = b"context-bound secret".to_vec();
    let edek = kekd.wrap("default", &secret, &[("tenant", "t1"), ("purpose", "invoices")]);

    // The same pairs given in another order: the context is a map.
    let out = kekd.unwrap(&edek, &[("purpose", "invoices"), ("tenant", "t1")]);
    assert_eq!(out.ok(), &secret[..]);

    for wrong in [
        &[][..],
        &[("tenant", "t1")][..],
        &[("tenant", "t1"), ("purpose", "payroll")][..],
        &[("tenant", "t1"), ("purpose", "invoices"), ("extra", "x")][..],
        &[("Tenant", "t1"), ("purpose", "invoices")][..],
    ] {
        kekd.unwrap(&edek, wrong).assert_error(exit::DATA_INVALID, "DATA_INVALID");
        kekd.rewrap(&edek, wrong).assert_error(exit::DATA_INVALID, "DATA_INVALID");
    }
}

#[test]
fn socket_and_tenant_come_from_the_environment() {
    let kekd = Kekd::start_default();
    let env = || Kekctl::new().env("KEKD_SOCKET", kekd.socket()).env("KEKD_TENANT", "acme");
    env().arg("status").run().ok();
    let secret = b"from env".to_vec();
    let edek = env().args(["wrap", "--key", "default"]).stdin(secret.clone()).run().ok().to_vec();
    assert_eq!(env().arg("unwrap").stdin(edek).run().ok(), &secret[..]);

    // Flags win over the environment.
    Kekctl::new()
        .env("KEKD_SOCKET", kekd.dir().join("no-such.sock"))
        .env("KEKD_TENANT", "nobody-here")
        .socket(kekd.socket())
        .tenant("acme")
        .arg("status")
        .run()
        .ok();

    // Without a tenant there is nothing to talk to: an error, not a guess.
    let out = Kekctl::new().socket(kekd.socket()).arg("status").run();
    assert_ne!(
        out.code,
        0,
        "kekctl without a tenant must fail; stdout: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn global_options_are_accepted_after_the_command() {
    let kekd = Kekd::start_default();
    let sock = kekd.socket().to_str().unwrap().to_owned();
    let v = Kekctl::new()
        .args(["generate", "--key", "default", "--json", "--socket", &sock, "--tenant", "acme"])
        .args(["--context", "a=1", "--principal", "alice", "--data-label", "invoices"])
        .run()
        .json();
    let edek = unb64(v["edek"].as_str().unwrap_or_else(|| panic!("no edek in {v}")));
    let plaintext = unb64(v["plaintext"].as_str().unwrap_or_else(|| panic!("no plaintext in {v}")));
    assert_eq!(kekd.unwrap(&edek, &[("a", "1")]).ok(), &plaintext[..]);
}

#[test]
fn status_names_the_tenant() {
    let kekd = Kekd::start_default();
    let text = kekd.kekctl().arg("status").run();
    assert!(text.ok_str().contains("acme"), "status should name the tenant:\n{}", text.ok_str());
    let v = kekd.kekctl().json().arg("status").run().json();
    assert!(v.is_object(), "status --json must print an object: {v}");
    assert!(v.to_string().contains("\"acme\""), "status --json should name the tenant: {v}");
}

#[test]
fn each_error_class_has_its_own_exit_code() {
    let mut kekd = Kekd::builder()
        .tenant(Tenant::owned_by_me("acme"))
        .tenant(Tenant::new("locked").allow_uid(4242).admin(4243))
        .start();

    // DATA_INVALID: garbage, and a real EDEK with its tag damaged.
    kekd.kekctl()
        .arg("unwrap")
        .stdin(&b"definitely not an edek"[..])
        .run()
        .assert_error(exit::DATA_INVALID, "DATA_INVALID");
    let mut edek = kekd.wrap("default", b"x", &[]);
    *edek.last_mut().unwrap() ^= 1;
    kekd.unwrap(&edek, &[]).assert_error(exit::DATA_INVALID, "DATA_INVALID");

    // PERMISSION_DENIED: a tenant whose ACL does not name us.
    kekd.kekctl_for("locked")
        .args(["generate", "--key", "default"])
        .run()
        .assert_error(exit::PERMISSION_DENIED, "PERMISSION_DENIED");

    // NOT_FOUND: an unknown tenant, an unknown key.
    kekd.kekctl_for("ghost").arg("status").run().assert_error(exit::NOT_FOUND, "NOT_FOUND");
    kekd.kekctl().args(["generate", "--key", "ghost"]).run().assert_error(exit::NOT_FOUND, "NOT_FOUND");

    // FAILED_PRECONDITION: destroying the active version.
    kekd.keys(["destroy", "default", "--version", "1"])
        .assert_error(exit::FAILED_PRECONDITION, "FAILED_PRECONDITION");

    // Usage errors.
    let out = kekd.kekctl().arg("frobnicate").run();
    assert_eq!(out.code, exit::USAGE, "unknown command: {}", out.stderr);
    let out = kekd.kekctl().arg("wrap").stdin(&b"x"[..]).run();
    assert_eq!(out.code, exit::USAGE, "wrap without --key: {}", out.stderr);
    let out = kekd.kekctl().args(["--context", "novalue", "unwrap"]).stdin(&b"x"[..]).run();
    assert_eq!(out.code, exit::USAGE, "--context without '=': {}", out.stderr);

    // UNAVAILABLE: no socket at all, then a daemon that is gone (stale socket file).
    Kekctl::new()
        .socket(kekd.dir().join("no-such.sock"))
        .tenant("acme")
        .arg("status")
        .run()
        .assert_error(exit::UNAVAILABLE, "UNAVAILABLE");
    kekd.kill();
    kekd.kekctl().args(["generate", "--key", "default"]).run().assert_error(exit::UNAVAILABLE, "UNAVAILABLE");
}

#[test]
fn generate_count_prints_one_object_per_key() {
    let kekd = Kekd::start_default();
    let v = kekd.kekctl().json().args(["generate", "--key", "default", "--count", "3"]).run().json();
    let arr = v.as_array().unwrap_or_else(|| panic!("--count 3 --json should print an array, got {v}"));
    assert_eq!(arr.len(), 3, "{v}");
    let mut plaintexts = Vec::new();
    for o in arr {
        let p = unb64(o["plaintext"].as_str().unwrap_or_else(|| panic!("no plaintext in {o}")));
        let e = unb64(o["edek"].as_str().unwrap_or_else(|| panic!("no edek in {o}")));
        assert_eq!(kekd.unwrap(&e, &[]).ok(), &p[..], "each EDEK holds its own plaintext");
        plaintexts.push(p);
    }
    plaintexts.sort();
    plaintexts.dedup();
    assert_eq!(plaintexts.len(), 3, "three different keys");
}
