//! Against real SoftHSM2. Every test uses the process's shared token (see
//! `softhsm::test_token`) and its own key label, so they run in parallel in one process
//! (`cargo test`) as well as one process each (cargo-nextest).

use std::sync::Arc;

use cryptoki::context::{CInitializeArgs, CInitializeFlags};
use cryptoki::object::AttributeType;
use cryptoki::session::Session;

use super::*;
use crate::softhsm::test_token::shared;

fn config(key_label: &str, create_root_key: bool) -> Pkcs11Config {
    let t = &shared().token;
    Pkcs11Config {
        module: t.module.clone(),
        token_label: t.token_label.clone(),
        key_label: key_label.to_owned(),
        pin_file: Some(t.pin_file.clone()),
        pin_env: None,
        create_root_key,
        softhsm2_conf: Some(t.conf.clone()),
        module_env: Default::default(),
        allow_exportable_root: false,
        max_sessions: crate::config::DEFAULT_MAX_SESSIONS,
        call_timeout: std::time::Duration::from_secs(5),
    }
}

fn open_with(cfg: &Pkcs11Config) -> Result<Pkcs11RootKey, BackendError> {
    let pin = cfg.read_pin("test").unwrap();
    Pkcs11RootKey::open("test", cfg, pin, &shared().lock_dir(), None)
}

fn open(key_label: &str, create_root_key: bool) -> Result<Pkcs11RootKey, BackendError> {
    open_with(&config(key_label, create_root_key))
}

/// Runs `f` in a read-write session of "another application" on the shared token, logged in
/// as the user, holding the token lock as kekd does around its own object searches: SoftHSM
/// 2.6.1 fails `C_GenerateKey` with CKR_GENERAL_ERROR when another thread of the process
/// searches objects or reads attributes at the same moment (seen in this suite). The lock
/// must be released before calling the backend, which takes it itself.
pub(super) fn with_admin<T>(f: impl FnOnce(&Session) -> T) -> T {
    let t = shared();
    let lock =
        TokenLock::open(&TokenLock::path(&t.lock_dir(), &t.token.module, Some(&t.token.conf))).unwrap();
    let _guard = lock.acquire().unwrap();
    let pkcs11 = library(&t.token.module, Some(&t.token.conf)).unwrap();
    let slot = find_tokens(&pkcs11, &t.token.token_label).unwrap()[0];
    let session = pkcs11.open_rw_session(slot).unwrap();
    let pin = AuthPin::from(config("", false).read_pin("test").unwrap().as_str());
    login(&session, &pin).unwrap();
    f(&session)
}

fn kek() -> [u8; KEK_LEN] {
    let mut k = [0u8; KEK_LEN];
    aws_lc_rs::rand::fill(&mut k).unwrap();
    k
}

const AAD: &[u8] = b"kekd/kek/v1 acme payments 1";

#[test]
fn pkcs11_seal_unseal_round_trip() {
    let root = open("t-round-trip", true).unwrap();
    let k = kek();
    let sealed = root.seal(AAD, &k).unwrap();
    assert_eq!(sealed.len(), SEALED_LEN);
    assert_ne!(&sealed[IV_LEN..IV_LEN + KEK_LEN], &k[..], "ciphertext is not the plaintext");
    let mut out = [0u8; KEK_LEN];
    root.unseal(AAD, &sealed, &mut out).unwrap();
    assert_eq!(out, k);
    let again = root.seal(AAD, &k).unwrap();
    assert_ne!(again[..IV_LEN], sealed[..IV_LEN], "every seal draws a fresh IV");
}

#[test]
fn pkcs11_wrong_aad_is_data_invalid() {
    let root = open("t-wrong-aad", true).unwrap();
    let sealed = root.seal(AAD, &kek()).unwrap();
    let mut out = [0u8; KEK_LEN];
    let err = root.unseal(b"kekd/kek/v1 acme payments 2", &sealed, &mut out).unwrap_err();
    assert!(matches!(err, BackendError::DataInvalid), "{err:?}");
    assert_eq!(out, [0u8; KEK_LEN], "nothing is written on failure");
    // The session that saw the failure is still good.
    root.unseal(AAD, &sealed, &mut out).unwrap();
}

#[test]
fn pkcs11_tampered_blob_is_data_invalid() {
    let root = open("t-tampered", true).unwrap();
    let sealed = root.seal(AAD, &kek()).unwrap();
    let mut out = [0u8; KEK_LEN];
    for (what, at) in [("iv", 0), ("ciphertext", IV_LEN + 5), ("tag", SEALED_LEN - 1)] {
        let mut bad = sealed.clone();
        bad[at] ^= 0x01;
        let err = root.unseal(AAD, &bad, &mut out).unwrap_err();
        assert!(matches!(err, BackendError::DataInvalid), "flipped {what}: {err:?}");
    }
    for len in [0, IV_LEN, SEALED_LEN - 1, SEALED_LEN + 1] {
        let mut bad = sealed.clone();
        bad.resize(len, 0);
        let err = root.unseal(AAD, &bad, &mut out).unwrap_err();
        assert!(matches!(err, BackendError::DataInvalid), "length {len}: {err:?}");
    }
}

#[test]
fn pkcs11_missing_root_key_is_a_config_error() {
    let err = open("t-never-created", false).err().unwrap();
    let BackendError::Config(msg) = &err else { panic!("{err:?}") };
    assert!(msg.contains("\"t-never-created\"") && msg.contains("create_root_key"), "{msg}");
    // And it was not created behind our back.
    assert!(with_admin(|s| find_keys(s, "t-never-created")).unwrap().is_empty());
}

#[test]
fn pkcs11_missing_token_is_a_config_error() {
    let mut cfg = config("t-no-token", true);
    cfg.token_label = "no-such-token".into();
    let err = open_with(&cfg).err().unwrap();
    let BackendError::Config(msg) = &err else { panic!("{err:?}") };
    assert!(msg.contains("\"no-such-token\"") && msg.contains("libsofthsm2"), "{msg}");
}

#[test]
fn pkcs11_created_root_key_is_sensitive_and_not_extractable() {
    let _root = open("t-attributes", true).unwrap();
    with_admin(|admin| check_attributes(admin, "t-attributes"));
}

fn check_attributes(admin: &Session, label: &str) {
    let [key] = find_keys(admin, label).unwrap()[..] else { panic!("exactly one key") };
    let attrs = admin
        .get_attributes(
            key,
            &[
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::Token,
                AttributeType::Private,
                AttributeType::Encrypt,
                AttributeType::Decrypt,
                AttributeType::Wrap,
                AttributeType::Unwrap,
                AttributeType::Sign,
                AttributeType::Verify,
                AttributeType::Derive,
                AttributeType::Modifiable,
                AttributeType::ValueLen,
            ],
        )
        .unwrap();
    assert_eq!(attrs.len(), 13, "{attrs:?}");
    for attr in &attrs {
        match attr {
            Attribute::Sensitive(b)
            | Attribute::Token(b)
            | Attribute::Private(b)
            | Attribute::Encrypt(b)
            | Attribute::Decrypt(b) => assert!(*b, "{attr:?}"),
            Attribute::Extractable(b)
            | Attribute::Wrap(b)
            | Attribute::Unwrap(b)
            | Attribute::Sign(b)
            | Attribute::Verify(b)
            | Attribute::Derive(b)
            | Attribute::Modifiable(b) => assert!(!*b, "{attr:?}"),
            Attribute::ValueLen(n) => assert_eq!(usize::from(*n), KEK_LEN),
            other => panic!("unexpected {other:?}"),
        }
    }
    // The key value itself cannot be read (cryptoki returns no attribute, not an error).
    let value = admin.get_attributes(key, &[AttributeType::Value]).unwrap();
    assert!(value.is_empty(), "{value:?}");
}

#[test]
fn pkcs11_reopen_finds_the_same_key() {
    let k = kek();
    let sealed = open("t-reopen", true).unwrap().seal(AAD, &k).unwrap();
    for create in [true, false] {
        let root = open("t-reopen", create).unwrap();
        let mut out = [0u8; KEK_LEN];
        root.unseal(AAD, &sealed, &mut out).unwrap();
        assert_eq!(out, k);
    }
    assert_eq!(with_admin(|s| find_keys(s, "t-reopen")).unwrap().len(), 1, "no second key was created");
}

#[test]
fn pkcs11_canary_succeeds() {
    let root = open("t-canary", true).unwrap();
    root.canary().unwrap();
    root.canary().unwrap();
}

#[test]
fn pkcs11_describe_names_module_token_and_key() {
    let root = open("t-describe", true).unwrap();
    let d = root.describe();
    assert!(d.starts_with("pkcs11 module=") && d.contains("libsofthsm2"), "{d}");
    assert!(d.ends_with(" token=\"kekd-dev\" key=\"t-describe\""), "{d}");
}

#[test]
fn pkcs11_destroyed_root_key_is_refused() {
    let root = open("t-destroyed", true).unwrap();
    let sealed = root.seal(AAD, &kek()).unwrap();
    with_admin(|admin| {
        for key in find_keys(admin, "t-destroyed").unwrap() {
            admin.destroy_object(key).unwrap();
        }
    });
    let mut out = [0u8; KEK_LEN];
    let err = root.unseal(AAD, &sealed, &mut out).unwrap_err();
    let BackendError::Refused(msg) = &err else { panic!("{err:?}") };
    assert!(msg.contains("\"t-destroyed\"") && msg.contains("no longer exists"), "{msg}");
    assert!(matches!(root.canary(), Err(BackendError::Refused(_))));
    assert!(matches!(root.seal(AAD, &kek()), Err(BackendError::Refused(_))));
}

#[test]
fn pkcs11_recreated_root_key_is_found_again_by_label() {
    let root = open("t-recreated", true).unwrap();
    let old = root.seal(AAD, &kek()).unwrap();
    with_admin(|admin| {
        for key in find_keys(admin, "t-recreated").unwrap() {
            admin.destroy_object(key).unwrap();
        }
        admin.generate_key(&Mechanism::AesKeyGen, &root_key_template("t-recreated")).unwrap();
    });
    // The stale handle is replaced; the new key is another key.
    root.canary().unwrap();
    let mut out = [0u8; KEK_LEN];
    assert!(matches!(root.unseal(AAD, &old, &mut out), Err(BackendError::DataInvalid)));
    let k = kek();
    root.unseal(AAD, &root.seal(AAD, &k).unwrap(), &mut out).unwrap();
    assert_eq!(out, k);
}

#[test]
fn pkcs11_duplicate_root_keys_are_a_config_error() {
    with_admin(|admin| {
        for _ in 0..2 {
            admin.generate_key(&Mechanism::AesKeyGen, &root_key_template("t-duplicate")).unwrap();
        }
    });
    let err = open("t-duplicate", true).err().unwrap();
    let BackendError::Config(msg) = &err else { panic!("{err:?}") };
    assert!(msg.contains("several") && msg.contains("\"t-duplicate\""), "{msg}");
}

#[test]
fn pkcs11_unusable_root_key_is_a_config_error() {
    let mut template = root_key_template("t-no-decrypt");
    for attr in &mut template {
        if let Attribute::Decrypt(b) = attr {
            *b = false;
        }
    }
    with_admin(|admin| admin.generate_key(&Mechanism::AesKeyGen, &template)).unwrap();
    let err = open("t-no-decrypt", false).err().unwrap();
    let BackendError::Rejected(rejected) = &err else { panic!("{err:?}") };
    assert_eq!(rejected.shortfalls, [adopt::Shortfall::NoDecrypt]);
    assert!(err.to_string().contains("CKA_DECRYPT is false"), "{err}");
    let mut cfg = config("t-no-decrypt", false);
    cfg.allow_exportable_root = true;
    assert!(matches!(open_with(&cfg), Err(BackendError::Rejected(_))), "escrow does not make it work");
}

#[test]
fn pkcs11_extractable_root_key_is_refused_unless_escrow_is_allowed() {
    let mut template = root_key_template("t-extractable");
    for attr in &mut template {
        if let Attribute::Extractable(b) = attr {
            *b = true;
        }
    }
    with_admin(|admin| admin.generate_key(&Mechanism::AesKeyGen, &template)).unwrap();
    let err = open("t-extractable", false).err().unwrap();
    let BackendError::Rejected(rejected) = &err else { panic!("{err:?}") };
    assert_eq!(rejected.shortfalls, [adopt::Shortfall::Extractable]);
    let mut cfg = config("t-extractable", false);
    cfg.allow_exportable_root = true;
    let root = open_with(&cfg).unwrap();
    assert_eq!(root.exceptions(), [adopt::Shortfall::Extractable.to_string()]);
    root.canary().unwrap();
    assert!(open("t-round-trip-escrow", true).unwrap().exceptions().is_empty(), "a key kekd makes has none");
}

#[test]
fn pkcs11_concurrent_callers_and_tenants_share_the_token() {
    // Two tenants on one token, four threads each: logins, pool growth, shared library.
    let roots =
        [Arc::new(open("t-concurrent-a", true).unwrap()), Arc::new(open("t-concurrent-b", true).unwrap())];
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let root = Arc::clone(&roots[i % 2]);
            std::thread::spawn(move || {
                for _ in 0..25 {
                    let k = kek();
                    let mut out = [0u8; KEK_LEN];
                    root.unseal(AAD, &root.seal(AAD, &k).unwrap(), &mut out).unwrap();
                    assert_eq!(out, k);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for root in &roots {
        assert!(root.pool.open() <= root.pool.max(), "{} > {}", root.pool.open(), root.pool.max());
    }
    // A blob of one tenant's root key does not open under the other's.
    let sealed = roots[0].seal(AAD, &kek()).unwrap();
    let mut out = [0u8; KEK_LEN];
    assert!(matches!(roots[1].unseal(AAD, &sealed, &mut out), Err(BackendError::DataInvalid)));
}

/// `cargo test -p kekd pkcs11_latency -- --ignored --nocapture`
#[test]
#[ignore = "timing, not a check"]
fn pkcs11_latency() {
    let root = open("t-latency", true).unwrap();
    let k = kek();
    let n = 2000;
    let start = std::time::Instant::now();
    let mut sealed = Vec::new();
    for _ in 0..n {
        sealed = root.seal(AAD, &k).unwrap();
    }
    let seal = start.elapsed() / n;
    let start = std::time::Instant::now();
    let mut out = [0u8; KEK_LEN];
    for _ in 0..n {
        root.unseal(AAD, &sealed, &mut out).unwrap();
    }
    let unseal = start.elapsed() / n;
    let start = std::time::Instant::now();
    for _ in 0..n {
        root.canary().unwrap();
    }
    eprintln!("seal {seal:?}/call, unseal {unseal:?}/call, canary {:?}/call", start.elapsed() / n);
}

/// Runs `name`, an ignored test of this module, alone in a fresh process with a token of its
/// own: for scenarios that disturb every user of the token in the process (a logout, a
/// library reset). Works the same under `cargo test` and cargo-nextest.
fn run_isolated(name: &str) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", &format!("backend::pkcs11::tests::{name}"), "--ignored", "--test-threads=1"])
        .env(ISOLATED, "1")
        .output()
        .unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && report.contains("1 passed"), "{report}");
}

const ISOLATED: &str = "KEKD_ISOLATED_TEST";

#[test]
fn pkcs11_recovers_from_a_logout_by_another_application() {
    run_isolated("isolated_logout");
}

#[test]
#[ignore = "run by pkcs11_recovers_from_a_logout_by_another_application"]
fn isolated_logout() {
    if std::env::var_os(ISOLATED).is_none() {
        return;
    }
    let root = open("t-logout", true).unwrap();
    let k = kek();
    let sealed = root.seal(AAD, &k).unwrap();
    // The login is the application's: this logs out the backend's sessions too.
    with_admin(|admin| admin.logout()).unwrap();
    let mut out = [0u8; KEK_LEN];
    root.unseal(AAD, &sealed, &mut out).unwrap();
    assert_eq!(out, k);
    root.canary().unwrap();
}

/// The session cap holds under a burst, and every caller is served.
#[test]
fn pkcs11_a_burst_waits_for_a_session() {
    let mut cfg = config("t-session-cap", true);
    cfg.max_sessions = 2;
    let root = Arc::new(open_with(&cfg).unwrap());
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let root = Arc::clone(&root);
            std::thread::spawn(move || {
                for _ in 0..20 {
                    let k = kek();
                    let mut out = [0u8; KEK_LEN];
                    root.unseal(AAD, &root.seal(AAD, &k).unwrap(), &mut out).unwrap();
                    assert_eq!(out, k);
                    assert!(root.pool.open() <= 2, "{} sessions open", root.pool.open());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn pkcs11_recovers_from_a_library_reset() {
    run_isolated("isolated_library_reset");
}

#[test]
#[ignore = "run by pkcs11_recovers_from_a_library_reset"]
fn isolated_library_reset() {
    if std::env::var_os(ISOLATED).is_none() {
        return;
    }
    let t = &shared().token;
    let root = open("t-reset", true).unwrap();
    let k = kek();
    let sealed = root.seal(AAD, &k).unwrap();
    // What a module that lost its state looks like: every session and handle dies, and
    // every call answers CKR_CRYPTOKI_NOT_INITIALIZED. The backend starts over by itself.
    let pkcs11 = library(&t.module, Some(&t.conf)).unwrap();
    pkcs11.clone().finalize().unwrap();
    root.canary().unwrap();
    let mut out = [0u8; KEK_LEN];
    root.unseal(AAD, &sealed, &mut out).unwrap();
    assert_eq!(out, k);
    // And again, the module initialised by someone else meanwhile: handles are stale still.
    pkcs11.clone().finalize().unwrap();
    pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).unwrap();
    root.unseal(AAD, &sealed, &mut out).unwrap();
    assert_eq!(out, k);
    root.canary().unwrap();
}
