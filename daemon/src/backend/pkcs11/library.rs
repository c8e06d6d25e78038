//! Process-wide PKCS#11 module handles, token lookup and the cross-process token lock.
//!
//! # Starting over
//!
//! A token can go away and come back (a pulled USB token, an HSM that restarts, a SoftHSM2
//! token directory moved away and back), and a module can lose its state. Reopening a
//! session is not enough to recover from all of that: SoftHSM2 does not see a token again
//! until it is re-initialised, and a module that forgot its initialisation answers
//! nothing else. So after such a failure the backend *starts over*: [`Module::start_over`]
//! calls `C_Finalize` and `C_Initialize` on the module, after which every user logs in again
//! on fresh sessions. Retried with backoff while it keeps failing.
//!
//! Session and object handles from before a restart must never be used, nor closed: the
//! module hands out the same numbers again (SoftHSM2 restarts at 1), so closing a stale
//! session could close someone else's. Every user of a handle therefore holds the module's
//! gate ([`Module::enter`]) while it uses one, and tags what it keeps with the
//! [generation](Gate::generation) it got it in; a restart takes the gate exclusively (no
//! handle is in use) and starts a new generation. What is tagged with an older one is
//! forgotten, not closed: `C_Finalize` closed it.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::slot::Slot;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::backend::BackendError;

/// A module loaded and initialised in this process, with the SoftHSM2 configuration it was
/// initialised under (SoftHSM2 reads `SOFTHSM2_CONF` in `C_Initialize`; the variable stays
/// set for a restart).
pub(crate) struct Module {
    path: PathBuf,
    pkcs11: Pkcs11,
    softhsm2_conf: Option<PathBuf>,
    /// Shared by whoever uses a session or object handle of this module, exclusive for a
    /// restart (module documentation, "Starting over").
    gate: RwLock<()>,
    /// Restarts so far: a handle got in another generation is stale.
    generation: AtomicU64,
    recovery: Mutex<Recovery>,
    /// Whether a restart has not been followed by a success yet: the fast path of
    /// [`Module::succeeded`].
    troubled: AtomicBool,
}

/// The backoff of restarts that do not bring the token back.
#[derive(Debug, Default)]
struct Recovery {
    /// Restarts since the module last worked.
    restarts: u32,
    /// No restart before this.
    next: Option<Instant>,
    /// When the first of those restarts happened.
    since: Option<Instant>,
}

/// The first restart after a failure is immediate; while the token stays away, the next ones
/// wait 250 ms, 500 ms, 1 s, then 2 s each: a token that comes back is used again within 2 s
/// of the next request or revocation poll, and a dead HSM is asked at most every 2 s.
fn restart_backoff(restarts: u32) -> Duration {
    Duration::from_millis(250 << restarts.saturating_sub(1).min(3))
}

/// Held while a session or object handle of the module is in use: no restart meanwhile.
pub(crate) struct Gate<'a> {
    _shared: RwLockReadGuard<'a, ()>,
    generation: u64,
}

impl Gate<'_> {
    /// The generation the handles got under this gate belong to.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }
}

impl Module {
    pub(crate) fn pkcs11(&self) -> &Pkcs11 {
        &self.pkcs11
    }

    /// The current generation (see [`Gate::generation`]), without holding the gate: what a
    /// handle got now would belong to, at best.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Holds off restarts while the caller uses sessions or handles. Not reentrant: a thread
    /// must not enter twice (a waiting restart would block the second entry).
    pub(crate) fn enter(&self) -> Gate<'_> {
        let shared = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        Gate { _shared: shared, generation: self.generation() }
    }

    /// Starts over after a failure (`cause`, for messages) seen in generation `seen`:
    /// `C_Finalize` then `C_Initialize`, under the token lock (SoftHSM2 reads every token's
    /// files when it initialises). Waits until no handle is in use. Does nothing if someone
    /// already started over since `seen`; refuses (unreachable, naming `cause`) while the
    /// backoff of restarts that did not help runs.
    pub(crate) fn start_over(
        &self,
        seen: u64,
        cause: &str,
        token_lock: &TokenLock,
    ) -> Result<(), BackendError> {
        let _exclusive = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        if self.generation() != seen {
            return Ok(());
        }
        let mut recovery = self.recovery.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if let Some(next) = recovery.next.filter(|&next| next > now) {
            return Err(BackendError::Unreachable(format!(
                "{cause} (module {} is initialised again in {} ms)",
                self.path.display(),
                (next - now).as_millis()
            )));
        }
        let _lock = token_lock.acquire()?;
        // Every session and handle of the module dies here, whatever C_Finalize answers (a
        // module that lost its initialisation says CKR_CRYPTOKI_NOT_INITIALIZED).
        let finalized = self.pkcs11.clone().finalize();
        self.generation.fetch_add(1, Ordering::SeqCst);
        let initialized = match self.pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        {
            Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
            other => other,
        };
        recovery.restarts += 1;
        recovery.next = Some(now + restart_backoff(recovery.restarts));
        let since = *recovery.since.get_or_insert(now);
        self.troubled.store(true, Ordering::SeqCst);
        let finalize = finalized.err().map(|e| super::errors::describe(&e));
        match initialized {
            Ok(()) => {
                if recovery.restarts == 1 {
                    tracing::warn!(module = %self.path.display(), %cause, ?finalize,
                        "PKCS#11 module failed: initialised it again, logging in on new sessions");
                } else {
                    limited_info!(module = %self.path.display(), %cause, restarts = recovery.restarts,
                        down_s = since.elapsed().as_secs(), "PKCS#11 module initialised again");
                }
                Ok(())
            }
            Err(e) => {
                let e = super::errors::describe(&e);
                limited_warn!(module = %self.path.display(), %cause, error = %e, restarts = recovery.restarts,
                    "cannot initialise the PKCS#11 module again; retrying with backoff");
                Err(BackendError::Unreachable(format!(
                    "{cause}; initialising module {} again failed: {e}",
                    self.path.display()
                )))
            }
        }
    }

    /// A call succeeded: ends the backoff of restarts, if any.
    pub(crate) fn succeeded(&self) {
        if !self.troubled.load(Ordering::Relaxed) {
            return;
        }
        let mut recovery = self.recovery.lock().unwrap_or_else(PoisonError::into_inner);
        if self.troubled.swap(false, Ordering::SeqCst) {
            let restarts = std::mem::take(&mut recovery.restarts);
            let down = recovery.since.take().map_or(0, |s| s.elapsed().as_secs());
            recovery.next = None;
            tracing::info!(module = %self.path.display(), restarts, down_s = down,
                "the PKCS#11 token works again");
        }
    }
}

/// One handle per module per process: a second `C_Initialize` of the same module fails
/// (CKR_CRYPTOKI_ALREADY_INITIALIZED), and a `C_Finalize` outside [`Module::start_over`]
/// would pull the library out from under every other user sharing it.
static LIBRARIES: OnceLock<Mutex<HashMap<PathBuf, Arc<Module>>>> = OnceLock::new();

/// How long to wait for another process to finish its login before calling the token
/// unreachable. A login takes milliseconds; a peer holding the lock this long is stuck,
/// and failing lets the supervisor restart us with backoff instead of hanging forever.
const LOCK_TIMEOUT: Duration = Duration::from_secs(30);

/// The registry key and the lock-file identity of a module. Canonical so that a symlinked
/// path to the same library shares one handle (the dynamic loader would share the library
/// anyway, and the second `C_Initialize` would fail).
pub(crate) fn module_id(module: &Path) -> PathBuf {
    std::fs::canonicalize(module).unwrap_or_else(|_| module.to_owned())
}

/// Returns this process's handle on `module`, loading and initialising it (with OS locking:
/// tenants and the executor's blocking threads call in concurrently) on first use.
///
/// `softhsm2_conf` is exported as `SOFTHSM2_CONF` just before the first load; callers load
/// backends before starting threads. Asking for the same module under another SoftHSM2
/// configuration is an error, since the first one is what the library actually uses.
pub(crate) fn library(module: &Path, softhsm2_conf: Option<&Path>) -> Result<Pkcs11, BackendError> {
    shared_module(module, softhsm2_conf).map(|m| m.pkcs11.clone())
}

/// [`library`], with what it takes to start the module over ([`Module::start_over`]).
pub(crate) fn shared_module(
    module: &Path,
    softhsm2_conf: Option<&Path>,
) -> Result<Arc<Module>, BackendError> {
    let id = module_id(module);
    // Compared by file, not spelling: `/etc/./x.conf` and `/etc/x.conf` are one configuration.
    let conf_id = softhsm2_conf.map(|c| std::fs::canonicalize(c).unwrap_or_else(|_| c.to_owned()));
    let mut libs = LIBRARIES.get_or_init(Default::default).lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(loaded) = libs.get(&id) {
        if loaded.softhsm2_conf != conf_id {
            return Err(BackendError::Config(format!(
                "PKCS#11 module {} is already loaded with SOFTHSM2_CONF={}; it cannot be used with {} too",
                module.display(),
                show_conf(loaded.softhsm2_conf.as_deref()),
                show_conf(softhsm2_conf),
            )));
        }
        return Ok(Arc::clone(loaded));
    }
    if let Some(conf) = softhsm2_conf {
        std::env::set_var("SOFTHSM2_CONF", conf);
    }
    let pkcs11 = Pkcs11::new(module)
        .map_err(|e| BackendError::Config(format!("cannot load PKCS#11 module {}: {e}", module.display())))?;
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => {}
        // Someone else in this process (another library) initialised it: usable as is.
        Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {
            tracing::warn!(module = %module.display(), "PKCS#11 module was already initialised in this process");
        }
        Err(e) => {
            return Err(BackendError::Config(format!(
                "cannot initialise PKCS#11 module {}: {}",
                module.display(),
                super::errors::describe(&e)
            )))
        }
    }
    let loaded = Arc::new(Module {
        path: module.to_owned(),
        pkcs11,
        softhsm2_conf: conf_id,
        gate: RwLock::new(()),
        generation: AtomicU64::new(0),
        recovery: Mutex::new(Recovery::default()),
        troubled: AtomicBool::new(false),
    });
    libs.insert(id, Arc::clone(&loaded));
    Ok(loaded)
}

fn show_conf(conf: Option<&Path>) -> String {
    conf.map_or_else(|| "(unset)".to_owned(), |c| c.display().to_string())
}

/// The slots holding an initialised token labelled `label`. Slot ids are not stable across
/// processes (SoftHSM2 derives them from token serials), so tokens are always found by label.
pub(crate) fn find_tokens(pkcs11: &Pkcs11, label: &str) -> Result<Vec<Slot>, CkError> {
    let label = label.trim_end_matches(' '); // labels are blank-padded on the token
    let mut found = Vec::new();
    for slot in pkcs11.get_slots_with_token()? {
        match pkcs11.get_token_info(slot) {
            Ok(info) if info.token_initialized() && info.label() == label => found.push(slot),
            Ok(_) => {}
            // Removed between the two calls: not the token we want, whatever it was.
            Err(CkError::Pkcs11(RvError::TokenNotPresent | RvError::SlotIdInvalid, _)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(found)
}

/// The cross-process lock of one token: an exclusive `flock` on a file, held while logging
/// in, creating keys and searching objects. SoftHSM2 rewrites its token files on login, and
/// processes logging in to one token at the same moment fail at random.
///
/// The file is opened once, while the worker is still root (the lock directory is root's),
/// and each [`acquire`](Self::acquire) locks a duplicate of that descriptor: the worker can
/// re-lock after it has dropped privileges. A `flock` belongs to the open file, shared by
/// every duplicate, so threads of this process exclude each other with a mutex first.
pub(crate) struct TokenLock {
    path: PathBuf,
    file: File,
    local: Mutex<()>,
}

/// Held while the token is locked; unlocks (file, then mutex) on drop.
pub(crate) struct TokenLockGuard<'a> {
    _flock: Flock<File>,
    _local: std::sync::MutexGuard<'a, ()>,
}

impl TokenLock {
    /// The lock file of a token store under `lock_dir`: the SoftHSM2 configuration when
    /// there is one, else the module. Per store rather than per token: SoftHSM2 keeps every
    /// token of a configuration in one directory and reads all of them when listing
    /// tokens, and a listing while another process writes a different token's files fails
    /// with CKR_GENERAL_ERROR. Keyed by the configuration alone, so that two modules over
    /// one store (a wrapper module in front of SoftHSM2, say) share the lock too. Logins are
    /// rare, so a wider lock costs nothing. Hashed, so that any path gives a safe, bounded
    /// file name.
    pub(crate) fn path(lock_dir: &Path, module: &Path, softhsm2_conf: Option<&Path>) -> PathBuf {
        let id = match softhsm2_conf {
            Some(conf) => {
                let conf = std::fs::canonicalize(conf).unwrap_or_else(|_| conf.to_owned());
                let mut id = b"softhsm2_conf\0".to_vec();
                id.extend_from_slice(conf.as_os_str().as_encoded_bytes());
                id
            }
            None => {
                let mut id = b"module\0".to_vec();
                id.extend_from_slice(&module_id(module).into_os_string().into_vec());
                id
            }
        };
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &id);
        let hex = hex::encode(digest.as_ref());
        lock_dir.join(format!("pkcs11-{}.lock", &hex[..16]))
    }

    /// Opens (creating) the lock file, without locking it. Its directory must be root's
    /// (or kekd's user's) alone, and the file is opened without following a link.
    pub(crate) fn open(path: &Path) -> Result<Self, BackendError> {
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(lock_error(path, "open", std::io::ErrorKind::InvalidInput.into()));
        };
        let file = crate::dirfd::Dir::open_configured(dir, 0o700)
            .and_then(|d| d.open_or_create(name, 0o600))
            .map_err(|e| lock_error(path, "open", e.into()))?;
        Ok(Self { path: path.to_owned(), file, local: Mutex::new(()) })
    }

    /// Locks, waiting up to [`LOCK_TIMEOUT`] for another process to let go.
    pub(crate) fn acquire(&self) -> Result<TokenLockGuard<'_>, BackendError> {
        let local = self.local.lock().unwrap_or_else(PoisonError::into_inner);
        let mut file = self.file.try_clone().map_err(|e| lock_error(&self.path, "duplicate", e))?;
        let deadline = Instant::now() + LOCK_TIMEOUT;
        let mut pause = Duration::from_millis(1);
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(flock) => return Ok(TokenLockGuard { _flock: flock, _local: local }),
                Err((f, Errno::EINTR)) => file = f,
                Err((f, Errno::EWOULDBLOCK)) => {
                    if Instant::now() >= deadline {
                        return Err(BackendError::Unreachable(format!(
                            "token lock {} held by another process for more than {}s",
                            self.path.display(),
                            LOCK_TIMEOUT.as_secs()
                        )));
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(50));
                    file = f;
                }
                Err((_, e)) => return Err(lock_error(&self.path, "lock", e.into())),
            }
        }
    }
}

fn lock_error(path: &Path, what: &str, e: std::io::Error) -> BackendError {
    BackendError::Internal(format!("token lock {}: cannot {what}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_up_to_two_seconds() {
        let waits: Vec<u64> = (1..=6).map(|n| restart_backoff(n).as_millis() as u64).collect();
        assert_eq!(waits, [250, 500, 1000, 2000, 2000, 2000]);
    }

    #[test]
    fn one_lock_per_token_store() {
        let dir = Path::new("/run/kekd/locks");
        let (a, b) = (Path::new("/usr/lib/softhsm/libsofthsm2.so"), Path::new("/opt/wrapper/pkcs11.so"));
        let conf = Some(Path::new("/etc/softhsm2-a.conf"));
        // Two modules over one SoftHSM2 store take turns...
        assert_eq!(TokenLock::path(dir, a, conf), TokenLock::path(dir, b, conf));
        // ...two stores do not...
        assert_ne!(
            TokenLock::path(dir, a, conf),
            TokenLock::path(dir, a, Some(Path::new("/etc/softhsm2-b.conf")))
        );
        // ...and without a SoftHSM2 configuration, the module is the store.
        assert_ne!(TokenLock::path(dir, a, None), TokenLock::path(dir, b, None));
        assert!(TokenLock::path(dir, a, None).starts_with(dir));
    }
}
