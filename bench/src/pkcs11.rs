//! (b) What a naive hold-your-own-key integration does: one `C_Decrypt` (`CKM_AES_GCM`) of
//! a 32-byte DEK per DEK, against the same SoftHSM2 token kekd's root key is on, in
//! process, one logged-in session per thread (kekd's threading: one module handle, one
//! session per thread).
//!
//! The key is the benchmark's own: a non-extractable, sensitive AES-256 token key with a
//! label of its own (`kekd-bench-baseline`), made once and found again by label, with
//! every usage attribute set as kekd sets its root key's. The DEK is sealed under it once
//! with a random IV and the AAD of a kekd EDEK; each operation decrypts it again.
//!
//! SoftHSM2 must not see two processes log in at once (DESIGN §8), so initialising,
//! logging in and finding or creating the key happen under kekd's own lock file for this
//! token store (`DIR/state/locks/pkcs11-….lock`, the path kekd's workers use).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::{AuthPin, Ulong};
use nix::fcntl::{Flock, FlockArg};

use crate::edek::{aad, DEK_LEN, NONCE_LEN, TAG_LEN};
use crate::measure::{run_threads, Clocking, Report};
use crate::{fail, Context as _, Timing};

/// Where Debian installs SoftHSM2; `KEKD_SOFTHSM2_MODULE` overrides it, as for kekd.
const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// The token `kekd dev` makes.
const TOKEN_LABEL: &str = "kekd-dev";
const TAG_BITS: u64 = (TAG_LEN * 8) as u64;

pub fn run(dir: &Path, threads: usize, label: &str, timing: Timing) -> crate::Result<Report> {
    let dir = dir.canonicalize().context(|| format!("{}", dir.display()))?;
    let conf = dir.join("softhsm/softhsm2.conf");
    let pin_file = dir.join("softhsm/user.pin");
    let pin = std::fs::read_to_string(&pin_file).context(|| format!("PIN file {}", pin_file.display()))?;
    let pin = AuthPin::from(pin.trim_end_matches(['\n', '\r']));
    let module: PathBuf = std::env::var_os("KEKD_SOFTHSM2_MODULE")
        .filter(|v| !v.is_empty())
        .map_or(MODULE.into(), PathBuf::from);

    let lock = token_lock(&dir.join("state/locks"), &conf)?;
    let locked = Instant::now();
    // The module reads SOFTHSM2_CONF once, in C_Initialize; no other thread runs yet.
    std::env::set_var("SOFTHSM2_CONF", &conf);
    let pkcs11 = Pkcs11::new(&module).context(|| format!("load {}", module.display()))?;
    pkcs11
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .context(|| "C_Initialize".into())?;
    let slot = find_token(&pkcs11)?;
    let session = pkcs11.open_rw_session(slot).context(|| "open a session".into())?;
    match session.login(UserType::User, Some(&pin)) {
        Ok(()) | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => fail!("log in to token {TOKEN_LABEL:?}: {e}"),
    }
    let key = find_or_create_key(&session, label)?;
    // One session per thread, opened now (under the lock) and handed to each thread.
    let mut sessions = vec![session];
    while sessions.len() < threads.max(1) {
        sessions.push(pkcs11.open_ro_session(slot).context(|| "open a session".into())?);
    }
    drop(lock);
    let setup_ms = locked.elapsed().as_secs_f64() * 1e3;

    let aad = aad();
    let mut dek = [0u8; DEK_LEN];
    let mut iv = [0u8; NONCE_LEN];
    aws_lc_rs::rand::fill(&mut dek).context(|| "random bytes".into())?;
    aws_lc_rs::rand::fill(&mut iv).context(|| "random bytes".into())?;
    let sealed = {
        let mut iv = iv;
        let params =
            GcmParams::new(&mut iv, &aad, Ulong::new(TAG_BITS)).context(|| "GCM parameters".into())?;
        sessions[0].encrypt(&Mechanism::AesGcm(params), key, &dek).context(|| "C_Encrypt".into())?
    };
    if sealed.len() != DEK_LEN + TAG_LEN {
        fail!("C_Encrypt returned {} bytes for a {DEK_LEN}-byte DEK", sealed.len());
    }

    let sessions: Vec<std::sync::Mutex<Option<Session>>> =
        sessions.into_iter().map(|s| std::sync::Mutex::new(Some(s))).collect();
    let report = run_threads(
        "pkcs11",
        threads,
        timing,
        Clocking::PerOp,
        |i| Ok(sessions[i].lock().expect("not poisoned").take().expect("one session per thread")),
        |session: &mut Session| {
            let mut iv = iv;
            let params = GcmParams::new(&mut iv, &aad, Ulong::new(TAG_BITS))?;
            let plain = session.decrypt(&Mechanism::AesGcm(params), key, &sealed)?;
            if plain[..] != dek[..] {
                return Err(cryptoki::error::Error::InvalidValue);
            }
            Ok(())
        },
    )?;
    Ok(report
        .with("token", TOKEN_LABEL)
        .with("key_label", label)
        .with("module", module.display().to_string())
        .with("setup_ms", (setup_ms * 10.0).round() / 10.0))
}

fn find_token(pkcs11: &Pkcs11) -> crate::Result<cryptoki::slot::Slot> {
    for slot in pkcs11.get_slots_with_token().context(|| "list slots".into())? {
        let info = pkcs11.get_token_info(slot).context(|| "read token info".into())?;
        if info.token_initialized() && info.label().trim_end() == TOKEN_LABEL {
            return Ok(slot);
        }
    }
    fail!("no token labelled {TOKEN_LABEL:?}: run `kekd dev --dir DIR` once first")
}

/// The benchmark's key: found by label, else created with kekd's root-key attributes.
fn find_or_create_key(session: &Session, label: &str) -> crate::Result<ObjectHandle> {
    let found = session
        .find_objects(&[
            Attribute::Token(true),
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .context(|| "search for the key".into())?;
    match found[..] {
        [key] => Ok(key),
        [] => session
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::ValueLen(Ulong::new(32)),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                    Attribute::Wrap(false),
                    Attribute::Unwrap(false),
                    Attribute::Sign(false),
                    Attribute::Verify(false),
                    Attribute::Derive(false),
                    Attribute::Modifiable(false),
                    Attribute::Label(label.as_bytes().to_vec()),
                ],
            )
            .context(|| format!("create AES key {label:?}")),
        _ => fail!("several AES keys are labelled {label:?} on token {TOKEN_LABEL:?}"),
    }
}

/// kekd's lock of a SoftHSM2 store: `pkcs11-<16 hex of SHA-256("softhsm2_conf\0" ‖
/// canonical conf path)>.lock` under the state directory's `locks/` (see kekd's
/// `TokenLock::path`), locked exclusively, waiting up to 30 s.
fn token_lock(lock_dir: &Path, conf: &Path) -> crate::Result<Flock<File>> {
    let conf = conf.canonicalize().context(|| format!("{}", conf.display()))?;
    let mut id = b"softhsm2_conf\0".to_vec();
    id.extend_from_slice(conf.as_os_str().as_encoded_bytes());
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &id);
    let path = lock_dir.join(format!("pkcs11-{}.lock", &hex::encode(digest.as_ref())[..16]));
    std::fs::create_dir_all(lock_dir).context(|| format!("create {}", lock_dir.display()))?;
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .context(|| format!("open {}", path.display()))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((f, nix::errno::Errno::EWOULDBLOCK | nix::errno::Errno::EINTR))
                if Instant::now() < deadline =>
            {
                file = f;
                std::thread::sleep(Duration::from_millis(2));
            }
            Err((_, e)) => fail!("lock {}: {e}", path.display()),
        }
    }
}
