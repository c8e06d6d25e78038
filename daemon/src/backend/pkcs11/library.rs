//! Process-wide PKCS#11 module handles, token lookup and the cross-process token lock.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::slot::Slot;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::backend::BackendError;

/// A module loaded and initialised in this process, with the SoftHSM2 configuration it was
/// initialised under (SoftHSM2 reads `SOFTHSM2_CONF` once, in `C_Initialize`).
struct Loaded {
    pkcs11: Pkcs11,
    softhsm2_conf: Option<PathBuf>,
}

/// One handle per module per process: a second `C_Initialize` of the same module fails
/// (CKR_CRYPTOKI_ALREADY_INITIALIZED) and a `C_Finalize` by one user would pull the library
/// out from under every other tenant sharing it. So modules are never finalised.
static LIBRARIES: OnceLock<Mutex<HashMap<PathBuf, Loaded>>> = OnceLock::new();

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
        return Ok(loaded.pkcs11.clone());
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
    libs.insert(id, Loaded { pkcs11: pkcs11.clone(), softhsm2_conf: conf_id });
    Ok(pkcs11)
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
