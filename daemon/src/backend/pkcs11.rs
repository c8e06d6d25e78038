//! PKCS#11 root key: an AES-256 secret key that never leaves its token (SoftHSM2 in
//! development and CI, a network HSM or smart card in production). KEKs are sealed under it
//! with `C_Encrypt`/`C_Decrypt` and `CKM_AES_GCM`.
//!
//! # Sealed KEK format
//!
//! Part of the published KEK record format, so that a customer holding only the token and
//! the key store can recover their KEKs without kekd:
//!
//! ```text
//! iv (12 bytes) ‖ ciphertext (32 bytes) ‖ GCM tag (16 bytes)            = 60 bytes
//! ```
//!
//! It is AES-256-GCM under the root key, with a random 96-bit IV and a 128-bit tag; the AAD is
//! `"kekd/kek/v1" ‖ tenant ‖ key name ‖ version` (DESIGN §1), rebuilt from the record rather
//! than stored. To recover a KEK, call `C_Decrypt` with `CKM_AES_GCM` (that IV, that AAD,
//! `ulTagBits = 128`) over `ciphertext ‖ tag`: PKCS#11 appends and expects the tag after the
//! ciphertext.
//!
//! # Sessions, logins and handles
//!
//! One module handle per process is shared by every tenant (see `library`); a tenant's root
//! keys share a pool of logged-in read-only sessions of at most `max_sessions` (see
//! `sessions`), because a `Session` must not be used by two threads at once and HSMs limit
//! sessions. Nothing is trusted to live for the life of the process: a stale key handle is
//! found again by key label and a lost login is redone, each once per operation; after a
//! failure of the session, the token or the module (a token pulled out, an HSM restarted, a
//! module that lost its initialisation) the backend starts over by itself, re-initialising
//! the module and logging in again (`library`, "Starting over"), and retries once. While
//! that does not bring the token back the root key is *unreachable*, never refused: a key is
//! reported gone only by a token that answers for itself.

pub mod adopt;
mod errors;
pub mod import;
mod library;
mod sessions;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use cryptoki::context::Pkcs11;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::{AuthPin, Ulong};
use zeroize::Zeroizing;

pub(crate) use self::errors::describe as describe_ck_error;
use self::errors::{classify, describe, starts_over, Class};
pub(crate) use self::library::{find_tokens, library, TokenLock};
use self::library::{shared_module, Gate, Module};
use self::sessions::{NoSession, Pooled, SessionPool, Take};
use super::{BackendError, RootKey, KEK_LEN};
use crate::config::Pkcs11Config;

/// Length of the random GCM IV at the start of a sealed KEK.
pub const IV_LEN: usize = 12;
/// Length of the GCM tag at the end of a sealed KEK.
pub const TAG_LEN: usize = 16;
/// Length of a sealed KEK: `iv ‖ ciphertext ‖ tag`.
pub const SEALED_LEN: usize = IV_LEN + KEK_LEN + TAG_LEN;

const TAG_BITS: Ulong = Ulong::new((TAG_LEN * 8) as _);

/// AAD of the canary, distinct from every KEK's AAD (those start with "kekd/kek/").
const CANARY_AAD: &[u8] = b"kekd/canary/v1";

/// How long a request waits for one of the tenant's sessions while all `max_sessions` are in
/// use (or the token has none to spare) before it is told the token is unavailable.
const SESSION_WAIT: Duration = Duration::from_secs(10);

/// A tenant's root key on a PKCS#11 token.
pub struct Pkcs11RootKey {
    tenant: String,
    module: PathBuf,
    token_label: String,
    key_label: String,
    pkcs11: Pkcs11,
    /// The module, shared in the process, to start it over after a failure.
    lib: Arc<Module>,
    /// Where the token was last seen, and in which generation of the module; found again by
    /// label after a restart or when the slot goes away.
    slot: Mutex<Option<(Slot, u64)>>,
    /// Kept (in a zeroize-on-drop box) to log in again after every session was lost, e.g.
    /// when the token was re-plugged; otherwise a token hiccup would need a restart.
    pin: AuthPin,
    /// Set once the token rejected the PIN: every further try would count towards locking
    /// the user PIN, so the backend stops logging in until an operator restarts it.
    pin_rejected: AtomicBool,
    token_lock: TokenLock,
    /// What opened it, to open siblings (root key rotation) the same way.
    cfg: Pkcs11Config,
    lock_dir: PathBuf,
    /// The root key's handle and the module generation it is valid in; found again by label
    /// when stale.
    key: Mutex<Option<(ObjectHandle, u64)>>,
    /// What `allow_exportable_root` excused in this key (see `adopt`); empty for a key that
    /// stays in its HSM.
    exceptions: Vec<adopt::Shortfall>,
    /// Shared with the sibling root keys this one opens (root key rotation).
    pool: Arc<SessionPool>,
}

/// How an attempt at an operation failed.
enum Failure {
    /// The session, token or module failed: start over and retry (the text names the call).
    StartOver(String),
    /// The token has no session to spare (CKR_SESSION_COUNT).
    Busy,
    /// The answer.
    Final(BackendError),
}

impl From<BackendError> for Failure {
    fn from(e: BackendError) -> Self {
        Failure::Final(e)
    }
}

impl Pkcs11RootKey {
    /// Logs in to the token labelled `cfg.token_label` and finds (or, with
    /// `cfg.create_root_key`, creates) the AES key labelled `cfg.key_label`.
    ///
    /// Holds the module's lock file under `lock_dir` throughout: SoftHSM2 rewrites its token
    /// files on login, and two kekd workers creating the same root key at once would leave
    /// two keys with one label. With `files_as` (a worker's `run_as` user, while the worker
    /// is still root), everything after taking that lock runs with the user's file rights:
    /// the module reads and rewrites the token's files as that user would.
    pub fn open(
        tenant: &str,
        cfg: &Pkcs11Config,
        pin: Zeroizing<String>,
        lock_dir: &Path,
        files_as: Option<&crate::sandbox::RunAs>,
    ) -> Result<Self, BackendError> {
        let (module, token, label) = (&cfg.module, &cfg.token_label, &cfg.key_label);
        // Read by the module in C_Initialize; the worker's environment was cleared, and one
        // worker serves one tenant, so nothing else in this process reads these.
        for (name, value) in &cfg.module_env {
            std::env::set_var(name, value);
        }
        let token_lock = TokenLock::open(&TokenLock::path(lock_dir, module, cfg.softhsm2_conf.as_deref()))?;
        let guard = token_lock.acquire()?;
        // From here the module works on its files (a SoftHSM2 token may be in a directory
        // the tenant's user owns) with that user's rights only; the lock above is root's.
        let _files = match files_as {
            Some(user) => Some(user.files_as().map_err(|e| {
                BackendError::Internal(format!("cannot open the token as user {:?}: {e}", user.name))
            })?),
            None => None,
        };
        let lib = shared_module(module, cfg.softhsm2_conf.as_deref())?;
        // Read before any handle is got: they belong to this generation at best.
        let generation = lib.generation();
        let pkcs11 = lib.pkcs11().clone();
        let failed = |what: &str, e: &CkError| match classify(e) {
            Class::Unreachable | Class::DeadSession | Class::Busy => {
                BackendError::Unreachable(format!("token {token:?}: cannot {what}: {}", describe(e)))
            }
            _ => BackendError::Config(format!(
                "token {token:?} (module {}): cannot {what}: {}",
                module.display(),
                describe(e)
            )),
        };

        let slot = match find_tokens(&pkcs11, token).map_err(|e| failed("list tokens", &e))?[..] {
            [slot] => slot,
            [] => {
                return Err(BackendError::Config(format!(
                    "no token labelled {token:?} in PKCS#11 module {}",
                    module.display()
                )))
            }
            _ => {
                return Err(BackendError::Config(format!(
                    "several tokens are labelled {token:?} in PKCS#11 module {}: labels must be unique",
                    module.display()
                )))
            }
        };
        let pin = AuthPin::from(pin.as_str());
        // One session, whatever happens here, so that `max_sessions` holds from the first
        // (a pool of one included): read-write when it may have to create the root key.
        let session = if cfg.create_root_key {
            pkcs11.open_rw_session(slot).map_err(|e| failed("open a read-write session", &e))?
        } else {
            pkcs11.open_ro_session(slot).map_err(|e| failed("open a session", &e))?
        };
        login(&session, &pin).map_err(|e| failed("log in with the configured user PIN", &e))?;

        let key = match find_keys(&session, label).map_err(|e| failed("search for the root key", &e))?[..] {
            [key] => key,
            [] if cfg.create_root_key => {
                let key = session
                    .generate_key(&Mechanism::AesKeyGen, &root_key_template(label))
                    .map_err(|e| failed(&format!("create root key {label:?}"), &e))?;
                tracing::info!(tenant, token = %token, key = %label, "created root key (AES-256, non-extractable)");
                key
            }
            [] => {
                return Err(BackendError::Config(format!(
                    "root key {label:?} not found on token {token:?} \
                     (set create_root_key = true to create it on first start)"
                )))
            }
            _ => {
                return Err(BackendError::Config(format!(
                    "several AES keys are labelled {label:?} on token {token:?}: refusing to guess which is the root key"
                )))
            }
        };
        let shortfalls =
            adopt::assess(&session, key).map_err(|e| failed("read the root key's attributes", &e))?;
        let exceptions = adopt::decide(tenant, label, token, shortfalls, cfg.allow_exportable_root)?;
        if !exceptions.is_empty() {
            // At every start, not once: the exception lasts as long as the setting does.
            let list: Vec<String> = exceptions.iter().map(ToString::to_string).collect();
            tracing::warn!(
                tenant, token = %token, key = %label,
                "root key adopted by exception (allow_exportable_root = true): {}",
                list.join("; ")
            );
        }

        drop(guard);
        Ok(Self {
            tenant: tenant.to_owned(),
            module: module.clone(),
            token_label: token.clone(),
            key_label: label.clone(),
            pkcs11,
            lib,
            slot: Mutex::new(Some((slot, generation))),
            pin,
            pin_rejected: AtomicBool::new(false),
            token_lock,
            cfg: cfg.clone(),
            lock_dir: lock_dir.to_owned(),
            key: Mutex::new(Some((key, generation))),
            exceptions,
            pool: Arc::new(SessionPool::new(cfg.max_sessions, session, generation)),
        })
    }

    /// Room for one more session in the pool, for an operation that opens a session of its
    /// own (a rotation's sibling, a BYOK import), so that `max_sessions` holds for those too:
    /// an idle session is closed to make it if need be. Returns the generation the room is
    /// counted in; give it back with `pool.unopened` (or fill it with `pool.opened`).
    fn make_room(&self, what: &str) -> Result<u64, BackendError> {
        // Under the gate, as every use of a session: a session of a generation gone must not
        // be closed (its handle may be another's now), and the pool only gives this one's.
        let gate = self.lib.enter();
        let generation = gate.generation();
        match self.pool.take(generation, Instant::now() + SESSION_WAIT) {
            // Closed here; its place in the count is the room.
            Ok(Take::Idle(idle)) => {
                let _ = idle.session.close();
            }
            Ok(Take::Room) => {}
            Err(_) => {
                return Err(BackendError::Unreachable(format!(
                    "token {:?}: no session to spare to {what} within {}s (pkcs11.max_sessions = {})",
                    self.token_label,
                    SESSION_WAIT.as_secs(),
                    self.pool.max()
                )))
            }
        }
        Ok(generation)
    }

    /// Runs `op`, which opens and closes a session of its own, in room made in the pool.
    fn in_room<T>(
        &self,
        what: &str,
        op: impl FnOnce() -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let generation = self.make_room(what)?;
        let result = op();
        self.pool.unopened(generation);
        result
    }

    fn importer(&self) -> Result<import::Importer, BackendError> {
        use secrecy::ExposeSecret as _;
        let pin = Zeroizing::new(self.pin.expose_secret().to_owned());
        import::Importer::open(&self.tenant, &self.cfg, pin, &self.lock_dir)
    }

    /// The label of this root key on its token.
    pub fn key_label(&self) -> &str {
        &self.key_label
    }

    /// Runs `op` with a logged-in session and the root key's handle. What may have gone stale
    /// since the last call is repaired at most once each: the login, the key handle; after a
    /// failure of the session, token or module the backend starts over (module documentation)
    /// and tries once more.
    fn with_key<T>(
        &self,
        what: &str,
        mut op: impl FnMut(&Session, ObjectHandle) -> Result<T, CkError>,
    ) -> Result<T, BackendError> {
        let mut started_over = false;
        loop {
            let gate = self.lib.enter();
            let failure = match self.attempt(&gate, what, &mut op) {
                Ok(v) => {
                    drop(gate);
                    self.lib.succeeded();
                    return Ok(v);
                }
                Err(f) => f,
            };
            let seen = gate.generation();
            drop(gate);
            match failure {
                Failure::StartOver(cause) if !started_over => {
                    started_over = true;
                    limited_debug!(tenant = %self.tenant, %cause, "PKCS#11 failure: starting over");
                    self.lib.start_over(seen, &cause, &self.token_lock)?;
                }
                Failure::StartOver(cause) => return Err(BackendError::Unreachable(cause)),
                Failure::Busy => {
                    return Err(BackendError::Unreachable(format!(
                        "{what} on token {:?}: CKR_SESSION_COUNT (the token has no session to spare)",
                        self.token_label
                    )))
                }
                Failure::Final(e) => return Err(e),
            }
        }
    }

    /// One try of [`with_key`](Self::with_key) within one generation of the module.
    fn attempt<T>(
        &self,
        gate: &Gate<'_>,
        what: &str,
        op: &mut impl FnMut(&Session, ObjectHandle) -> Result<T, CkError>,
    ) -> Result<T, Failure> {
        let (mut relogged, mut refound) = (false, false);
        let session = self.take_session(gate)?;
        let cached = *lock(&self.key);
        let mut key = match cached {
            Some((key, generation)) if generation == gate.generation() => key,
            _ => {
                refound = true;
                match self.refind_key(gate, &session.session) {
                    Ok(key) => key,
                    Err(f) => return Err(self.dispose(session, f)),
                }
            }
        };
        loop {
            let err = match op(&session.session, key) {
                Ok(v) => {
                    self.pool.put(session);
                    return Ok(v);
                }
                Err(e) => e,
            };
            let repaired = match classify(&err) {
                Class::NotLoggedIn if !relogged => {
                    relogged = true;
                    self.token_lock
                        .acquire()
                        .map_err(Failure::from)
                        .and_then(|_lock| self.login(&session.session))
                }
                Class::StaleKey if !refound => {
                    refound = true;
                    self.refind_key(gate, &session.session).map(|k| key = k)
                }
                _ => Err(self.failure(what, &err)),
            };
            if let Err(f) = repaired {
                return Err(self.dispose(session, f));
            }
        }
    }

    /// Gives back the session an attempt used, according to how it failed.
    fn dispose(&self, session: Pooled, failure: Failure) -> Failure {
        match failure {
            Failure::StartOver(_) => self.pool.lose(session),
            _ => self.pool.put(session),
        }
        failure
    }

    /// A session of this generation: an idle one, a new one, or, while `max_sessions` are in
    /// use or the token has none to spare, the first one given back within [`SESSION_WAIT`].
    fn take_session(&self, gate: &Gate<'_>) -> Result<Pooled, Failure> {
        let generation = gate.generation();
        let deadline = Instant::now() + SESSION_WAIT;
        loop {
            match self.pool.take(generation, deadline) {
                Ok(Take::Idle(session)) => return Ok(session),
                Ok(Take::Room) => match self.new_session(gate) {
                    Ok(session) => return Ok(self.pool.opened(session, generation)),
                    Err(Failure::Busy) => {
                        limited_debug!(tenant = %self.tenant, "the token has no session to spare: waiting for one");
                        self.pool.token_full(generation);
                        // Nothing of ours to wait for: let the other application finish.
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(f) => {
                        self.pool.unopened(generation);
                        return Err(f);
                    }
                },
                Err(NoSession::Lost) => {
                    return Err(Failure::StartOver(format!(
                        "a session of token {:?} failed under another request",
                        self.token_label
                    )))
                }
                Err(NoSession::Timeout) => return Err(Failure::Final(self.no_session())),
            }
        }
    }

    fn no_session(&self) -> BackendError {
        BackendError::Unreachable(format!(
            "no session of token {:?} became free within {}s (pkcs11.max_sessions = {})",
            self.token_label,
            SESSION_WAIT.as_secs(),
            self.pool.max()
        ))
    }

    /// Opens and logs in a session, on the slot where the token was last seen in this
    /// generation, or found again by label.
    fn new_session(&self, gate: &Gate<'_>) -> Result<Session, Failure> {
        if self.pin_rejected.load(Ordering::Relaxed) {
            return Err(Failure::Final(BackendError::Refused(format!(
                "token {:?} rejected the user PIN earlier; not logging in again until restarted",
                self.token_label
            ))));
        }
        let _lock = self.token_lock.acquire()?;
        let cached = *lock(&self.slot);
        let slot = match cached {
            Some((slot, generation)) if generation == gate.generation() => slot,
            _ => self.find_slot(gate)?,
        };
        let session = match self.pkcs11.open_ro_session_no_drop(slot) {
            Ok(s) => s,
            // The token may be back in another slot (re-plugged, HSM failover).
            Err(e) if classify(&e) == Class::Unreachable => {
                let slot = self.find_slot(gate)?;
                self.pkcs11.open_ro_session_no_drop(slot).map_err(|e| self.failure("open a session", &e))?
            }
            Err(e) => return Err(self.failure("open a session", &e)),
        };
        match self.login(&session) {
            Ok(()) => Ok(session),
            Err(f) => {
                // A fresh session of this generation is ours to close, unless the module
                // failed meanwhile (then C_Finalize will).
                if !matches!(f, Failure::StartOver(_)) {
                    let _ = session.close();
                }
                Err(f)
            }
        }
    }

    /// Finds the token by label; the caller holds the token lock.
    fn find_slot(&self, gate: &Gate<'_>) -> Result<Slot, Failure> {
        let slots = find_tokens(&self.pkcs11, &self.token_label)
            .map_err(|e| self.failure("look for the token", &e))?;
        match slots[..] {
            [slot] => {
                *lock(&self.slot) = Some((slot, gate.generation()));
                Ok(slot)
            }
            // SoftHSM2 sees a token that came back only once it is initialised again.
            [] => Err(Failure::StartOver(format!("token {:?} is not present", self.token_label))),
            _ => Err(Failure::Final(BackendError::Unreachable(format!(
                "several tokens are labelled {:?}: labels must be unique",
                self.token_label
            )))),
        }
    }

    /// Logs in; the caller holds the token lock.
    fn login(&self, session: &Session) -> Result<(), Failure> {
        login(session, &self.pin).map_err(|e| {
            use RvError as R;
            if let CkError::Pkcs11(
                R::PinIncorrect | R::PinInvalid | R::PinLenRange | R::PinLocked | R::PinExpired,
                _,
            ) = e
            {
                self.pin_rejected.store(true, Ordering::Relaxed);
                tracing::error!(tenant = %self.tenant, token = %self.token_label, error = %describe(&e),
                    "the token rejected the user PIN; not retrying, to avoid locking it");
            }
            self.failure("log in", &e)
        })
    }

    fn refind_key(&self, gate: &Gate<'_>, session: &Session) -> Result<ObjectHandle, Failure> {
        // Under the lock, like every object search of kekd: SoftHSM 2.6.1 fails a key
        // generation that runs while another thread of the process searches objects.
        let _lock = self.token_lock.acquire()?;
        // Private objects are invisible to a session that is not logged in (another
        // application may have called C_Logout): log in again rather than report the key gone.
        let state = session
            .get_session_info()
            .map_err(|e| self.failure("read the session state", &e))?
            .session_state();
        if !matches!(state, SessionState::RoUser | SessionState::RwUser) {
            self.login(session)?;
        }
        let keys =
            find_keys(session, &self.key_label).map_err(|e| self.failure("search for the root key", &e))?;
        match keys[..] {
            [key] => {
                *lock(&self.key) = Some((key, gate.generation()));
                Ok(key)
            }
            [] => {
                // Only a token that answers for itself says a key is gone: SoftHSM2 finds no
                // objects on a token whose directory went away, and fails C_GetTokenInfo.
                let slot = *lock(&self.slot);
                if let Some((slot, _)) = slot {
                    if let Err(e) = self.pkcs11.get_token_info(slot) {
                        return Err(self.failure("read the token's information", &e));
                    }
                }
                Err(Failure::Final(self.key_gone()))
            }
            _ => Err(Failure::Final(BackendError::Refused(format!(
                "several AES keys are now labelled {:?} on token {:?}",
                self.key_label, self.token_label
            )))),
        }
    }

    /// What a failed call means: start over, wait, or this answer.
    fn failure(&self, what: &str, e: &CkError) -> Failure {
        if starts_over(e) {
            return Failure::StartOver(format!("{what} on token {:?}: {}", self.token_label, describe(e)));
        }
        match classify(e) {
            Class::Busy => Failure::Busy,
            _ => Failure::Final(self.error(what, e)),
        }
    }

    fn key_gone(&self) -> BackendError {
        BackendError::Refused(format!(
            "root key {:?} no longer exists on token {:?}",
            self.key_label, self.token_label
        ))
    }

    fn error(&self, what: &str, e: &CkError) -> BackendError {
        let detail = || format!("{what} on token {:?}: {}", self.token_label, describe(e));
        match classify(e) {
            Class::DeadSession | Class::Unreachable | Class::Busy => BackendError::Unreachable(detail()),
            Class::NotLoggedIn | Class::Refused => BackendError::Refused(detail()),
            Class::StaleKey => self.key_gone(),
            Class::DataInvalid => {
                limited_debug!(tenant = %self.tenant, error = %describe(e), "sealed KEK did not decrypt");
                BackendError::DataInvalid
            }
            Class::Other => BackendError::Internal(detail()),
        }
    }

    fn gcm_encrypt(&self, what: &str, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, BackendError> {
        let mut iv = [0u8; IV_LEN];
        aws_lc_rs::rand::fill(&mut iv)
            .map_err(|_| BackendError::Internal("the system random generator failed".into()))?;
        // A retry (fresh session, key found again) reuses this IV with the same plaintext and
        // AAD: under the same key that can only reproduce the same ciphertext, and under a
        // recreated key it is a first use. Never two messages under one key and IV.
        let sealed = self.with_key(what, |session, key| {
            let mut iv = iv;
            let params = GcmParams::new(&mut iv, aad, TAG_BITS)?;
            session.encrypt(&Mechanism::AesGcm(params), key, plaintext)
        })?;
        if sealed.len() != plaintext.len() + TAG_LEN {
            return Err(BackendError::Internal(format!(
                "{what}: token {:?} returned {} bytes of AES-GCM output for {} bytes of input",
                self.token_label,
                sealed.len(),
                plaintext.len()
            )));
        }
        let mut out = Vec::with_capacity(IV_LEN + sealed.len());
        out.extend_from_slice(&iv);
        out.extend_from_slice(&sealed);
        Ok(out)
    }
}

impl RootKey for Pkcs11RootKey {
    /// Returns `iv ‖ ciphertext ‖ tag` (see the module documentation: a published format).
    fn seal(&self, aad: &[u8], kek: &[u8; KEK_LEN]) -> Result<Vec<u8>, BackendError> {
        self.gcm_encrypt("seal", aad, kek)
    }

    fn unseal(&self, aad: &[u8], sealed: &[u8], out: &mut [u8; KEK_LEN]) -> Result<(), BackendError> {
        // Refused before it reaches the token: a short blob would not even be a valid
        // C_Decrypt input, and a long one cannot hold a KEK.
        if sealed.len() != SEALED_LEN {
            return Err(BackendError::DataInvalid);
        }
        let (iv, ciphertext) = sealed.split_at(IV_LEN);
        let plain = self.with_key("unseal", |session, key| {
            let mut iv: [u8; IV_LEN] = iv.try_into().expect("split at IV_LEN");
            let params = GcmParams::new(&mut iv, aad, TAG_BITS)?;
            // cryptoki hands back a plain Vec: wipe it (its whole capacity) when dropped.
            session.decrypt(&Mechanism::AesGcm(params), key, ciphertext).map(Zeroizing::new)
        })?;
        if plain.len() != KEK_LEN {
            return Err(BackendError::Internal(format!(
                "unseal: token {:?} returned {} bytes for a {KEK_LEN}-byte KEK",
                self.token_label,
                plain.len()
            )));
        }
        out.copy_from_slice(&plain);
        Ok(())
    }

    /// Encrypts one block with the root key. Finding the key object would not do: a key
    /// whose usage was revoked, or a token that lost the login, still lists it.
    fn canary(&self) -> Result<(), BackendError> {
        self.gcm_encrypt("canary", CANARY_AAD, &[0u8; 16]).map(drop)
    }

    fn sibling(&self, label: &str) -> Result<std::sync::Arc<dyn RootKey>, BackendError> {
        use secrecy::ExposeSecret as _;
        if label.is_empty() || label == self.key_label {
            return Err(BackendError::Config(format!("{label:?} is not another root key label")));
        }
        let mut cfg = self.cfg.clone();
        cfg.key_label = label.to_owned();
        cfg.create_root_key = true;
        let pin = Zeroizing::new(self.pin.expose_secret().to_owned());
        // One tenant, one token, one budget of sessions: the sibling opens in room made in
        // this root key's pool (an idle session is closed for it if need be), and the session
        // it opened with then joins that pool, which the sibling uses from then on.
        let generation = self.make_room(&format!("open root key {label:?}"))?;
        let mut sibling = match Pkcs11RootKey::open(&self.tenant, &cfg, pin, &self.lock_dir, None) {
            Ok(sibling) => sibling,
            Err(e) => {
                self.pool.unopened(generation);
                return Err(e);
            }
        };
        let own = std::mem::replace(&mut sibling.pool, Arc::clone(&self.pool));
        let gate = self.lib.enter();
        let mut opened = own.drain(gate.generation()).into_iter();
        match opened.next() {
            Some(session) if gate.generation() == generation => {
                self.pool.put(self.pool.opened(session, generation))
            }
            Some(session) => {
                // The module started over meanwhile: the room was of a generation gone.
                let _ = session.close();
            }
            None => self.pool.unopened(generation),
        }
        for session in opened {
            let _ = session.close();
        }
        drop(gate);
        Ok(Arc::new(sibling))
    }

    fn transport_key(&self, label: &str) -> Result<super::TransportKey, BackendError> {
        self.in_room("make a transport key", || {
            // The importer's sessions must not outlive a generation of the module either.
            let _gate = self.lib.enter();
            self.importer()?.transport_key(label)
        })
    }

    fn import_root_key(
        &self,
        label: &str,
        algorithm: super::WrappingAlgorithm,
        wrapped: &[u8],
    ) -> Result<(), BackendError> {
        self.in_room("import a root key", || {
            let _gate = self.lib.enter();
            self.importer()?.import_root_key(label, algorithm, wrapped)
        })
    }

    fn exceptions(&self) -> Vec<String> {
        self.exceptions.iter().map(ToString::to_string).collect()
    }

    fn describe(&self) -> String {
        format!(
            "pkcs11 module={} token={:?} key={:?}",
            self.module.display(),
            self.token_label,
            self.key_label
        )
    }
}

impl Drop for Pkcs11RootKey {
    /// Closes this root key's sessions and nothing more. The module stays initialised:
    /// other tenants in this process may share it, and even share the login (a login is per
    /// application and token, and ends only when the token's last session closes).
    fn drop(&mut self) {
        let gate = self.lib.enter();
        // A sibling shares the pool: its sessions are closed with the last of them.
        let idle = match Arc::get_mut(&mut self.pool) {
            Some(pool) => pool.drain(gate.generation()),
            None => Vec::new(),
        };
        for session in idle {
            if let Err(e) = session.close() {
                tracing::debug!(tenant = %self.tenant, error = %describe(&e), "closing a PKCS#11 session failed");
            }
        }
    }
}

/// Logs in as the user. The login belongs to the application, not the session, so a second
/// tenant on the same token (or a new session of this one) finds it already done.
fn login(session: &Session, pin: &AuthPin) -> Result<(), CkError> {
    match session.login(UserType::User, Some(pin)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(e) => Err(e),
    }
}

fn find_keys(session: &Session, label: &str) -> Result<Vec<ObjectHandle>, CkError> {
    session.find_objects(&[
        Attribute::Token(true),
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Label(label.as_bytes().to_vec()),
    ])
}

/// Every usage attribute is explicit: token defaults differ (SoftHSM2 allows wrap and
/// derive unless told otherwise), and the root key must do exactly two things.
fn root_key_template(label: &str) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(Ulong::new(KEK_LEN as _)),
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
    ]
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values (sessions, handles) stay valid if a holder panicked.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
