//! A throwaway SoftHSM2 token for `kekd dev` and for tests.
//!
//! Everything lives under `DIR/softhsm/`: the SoftHSM2 configuration, the token files and the
//! user PIN, so that deleting DIR deletes the token and `kekd dev --dir DIR` run again finds
//! the same token (and so the same root key, and the KEKs sealed under it). The SO PIN is
//! random and forgotten: nobody administers a throwaway token.

use std::fs::{DirBuilder, File, Permissions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cryptoki::context::Pkcs11;
use cryptoki::error::Error as CkError;
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use crate::backend::pkcs11::{describe_ck_error as describe, find_tokens, library, TokenLock};
use crate::backend::BackendError;

/// Where Debian and Ubuntu install the SoftHSM2 module.
pub const SOFTHSM2_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// Overrides [`SOFTHSM2_MODULE`] on distributions that install it elsewhere
/// (e.g. `/usr/lib64/pkcs11/libsofthsm2.so`).
pub const SOFTHSM2_MODULE_ENV: &str = "KEKD_SOFTHSM2_MODULE";
/// Label of the development token.
pub const DEV_TOKEN_LABEL: &str = "kekd-dev";

/// A SoftHSM2 token ready for a `Pkcs11Config`: `module`, `token_label`, `pin_file` and
/// `softhsm2_conf = conf`.
#[derive(Debug, Clone)]
pub struct DevToken {
    pub conf: PathBuf,
    pub pin_file: PathBuf,
    pub token_label: String,
    pub module: PathBuf,
}

/// The SoftHSM2 module to load: `$KEKD_SOFTHSM2_MODULE`, else [`SOFTHSM2_MODULE`].
pub fn softhsm2_module() -> PathBuf {
    std::env::var_os(SOFTHSM2_MODULE_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| SOFTHSM2_MODULE.into(), PathBuf::from)
}

/// Where [`prepare_dev_token`] puts the token of `dir`: known without loading the module,
/// so the supervisor can write the config while a child process prepares the token.
pub fn dev_token(dir: &Path) -> DevToken {
    let base = dir.join("softhsm");
    DevToken {
        conf: base.join("softhsm2.conf"),
        pin_file: base.join("user.pin"),
        token_label: DEV_TOKEN_LABEL.to_owned(),
        module: softhsm2_module(),
    }
}

/// Creates (or finds again) the token labelled [`DEV_TOKEN_LABEL`] under `dir/softhsm/`.
///
/// Loads the module through the backend's per-process registry with this token's
/// `SOFTHSM2_CONF`, so a backend opened afterwards reuses the initialised library: SoftHSM2
/// reads its configuration once, and a second `C_Initialize` in one process fails. For the
/// same reason, a process can serve only one such directory.
pub fn prepare_dev_token(dir: &Path) -> Result<DevToken, BackendError> {
    let dir = std::path::absolute(dir).map_err(|e| io_error("resolve", dir, e))?;
    let base = dir.join("softhsm");
    let tokens = base.join("tokens");
    for d in [&base, &tokens] {
        DirBuilder::new().recursive(true).mode(0o700).create(d).map_err(|e| io_error("create", d, e))?;
        // DirBuilder's mode does not apply to a directory that already existed.
        std::fs::set_permissions(d, Permissions::from_mode(0o700)).map_err(|e| io_error("chmod", d, e))?;
    }
    // Two `kekd dev --dir DIR` starting together would each initialise a token.
    let init_lock = TokenLock::open(&base.join("init.lock"))?;
    let _guard = init_lock.acquire()?;

    let tokendir = tokens.to_str().filter(|s| !s.contains(['\n', '\r', '#'])).ok_or_else(|| {
        BackendError::Config(format!("{}: SoftHSM2 cannot be configured with this path", tokens.display()))
    })?;
    let DevToken { conf, pin_file, module, .. } = dev_token(&dir);
    let text = format!(
        "# Written by kekd: a throwaway token for development and tests.\n\
         directories.tokendir = {tokendir}\n\
         objectstore.backend = file\n\
         log.level = ERROR\n\
         slots.removable = false\n"
    );
    write_atomic(&conf, text.as_bytes())?;

    let pkcs11 = library(&module, Some(&conf))?;
    let found = find_tokens(&pkcs11, DEV_TOKEN_LABEL).map_err(|e| {
        BackendError::Config(format!(
            "SoftHSM2 token in {}: cannot list tokens: {}",
            tokens.display(),
            describe(&e)
        ))
    })?;
    match found.len() {
        0 => init_token(&pkcs11, &tokens, &pin_file)?,
        1 if pin_file.is_file() => tracing::debug!(dir = %base.display(), "reusing the development token"),
        1 => {
            return Err(BackendError::Config(format!(
                "token {DEV_TOKEN_LABEL:?} in {} has no PIN file {}: remove {} to start over",
                tokens.display(),
                pin_file.display(),
                base.display()
            )))
        }
        _ => {
            return Err(BackendError::Config(format!(
                "several tokens are labelled {DEV_TOKEN_LABEL:?} in {}: remove {} to start over",
                tokens.display(),
                base.display()
            )))
        }
    }
    Ok(DevToken { conf, pin_file, token_label: DEV_TOKEN_LABEL.to_owned(), module })
}

/// Initialises SoftHSM2's free slot as the development token. The PIN file is written first:
/// a crash after it leaves a PIN with no token, which the next run simply replaces, whereas a
/// token with no PIN file could never be logged in to.
fn init_token(pkcs11: &Pkcs11, tokens: &Path, pin_file: &Path) -> Result<(), BackendError> {
    let failed = |what: &str| {
        let what = what.to_owned();
        move |e: CkError| {
            BackendError::Config(format!(
                "SoftHSM2 token in {}: cannot {what}: {}",
                tokens.display(),
                describe(&e)
            ))
        }
    };
    let free = pkcs11
        .get_slots_with_token()
        .map_err(failed("list slots"))?
        .into_iter()
        .find(|&s| pkcs11.get_token_info(s).is_ok_and(|t| !t.token_initialized()))
        .ok_or_else(|| {
            BackendError::Config(format!("SoftHSM2 offers no free slot in {}", tokens.display()))
        })?;
    let so_pin = AuthPin::from(random_pin().as_str());
    let user_pin = random_pin();
    let mut line = Zeroizing::new(user_pin.as_bytes().to_vec());
    line.push(b'\n');
    write_atomic(pin_file, &line)?;

    pkcs11.init_token(free, &so_pin, DEV_TOKEN_LABEL).map_err(failed("initialise the token"))?;
    // SoftHSM2 gives the new token a slot id derived from its serial: find it by label.
    let slot =
        *find_tokens(pkcs11, DEV_TOKEN_LABEL).map_err(failed("list tokens"))?.first().ok_or_else(|| {
            BackendError::Config(format!(
                "SoftHSM2 lost the token it just initialised in {}",
                tokens.display()
            ))
        })?;
    let session = pkcs11.open_rw_session(slot).map_err(failed("open a session"))?;
    session.login(UserType::So, Some(&so_pin)).map_err(failed("log in as SO"))?;
    session.init_pin(&AuthPin::from(user_pin.as_str())).map_err(failed("set the user PIN"))?;
    // The SO login is the application's, not the session's: end it so the backend can log
    // in as the user.
    session.logout().map_err(failed("log out"))?;
    tracing::info!(token = DEV_TOKEN_LABEL, pin_file = %pin_file.display(), "initialised a SoftHSM2 development token");
    Ok(())
}

/// 16 random bytes as 32 hex digits (SoftHSM2 accepts PINs of 4 to 255 characters).
fn random_pin() -> Zeroizing<String> {
    let mut raw = Zeroizing::new([0u8; 16]);
    aws_lc_rs::rand::fill(&mut *raw).expect("the system random generator failed");
    Zeroizing::new(hex::encode(*raw))
}

/// Temp file (created 0600), fsync, rename, fsync of the directory: readers see the old
/// file or the new one, never a torn one, even across a crash.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), BackendError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".kekd-tmp")
        .tempfile_in(dir)
        .map_err(|e| io_error("create a temporary file in", dir, e))?;
    tmp.write_all(bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|e| io_error("write", tmp.path(), e))?;
    tmp.persist(path).map_err(|e| io_error("write", path, e.error))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_error("sync", dir, e))
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> BackendError {
    BackendError::Config(format!("cannot {what} {}: {e}", path.display()))
}

/// The one development token of a test process, shared by every test that needs SoftHSM2.
///
/// SoftHSM2 reads `SOFTHSM2_CONF` once per process, in `C_Initialize`, so the tests of one
/// process cannot each have their own token: they share this one and use distinct key labels.
/// Under `cargo test` (one process, many threads) that is one token for all; under
/// cargo-nextest (one process per test) it is one token per test.
#[cfg(test)]
pub(crate) mod test_token {
    use std::path::{Path, PathBuf};
    use std::sync::OnceLock;

    use super::{prepare_dev_token, DevToken};

    const PREFIX: &str = "kekd-softhsm-test.";

    pub(crate) struct TestToken {
        pub dir: PathBuf,
        pub token: DevToken,
    }

    impl TestToken {
        /// Lock files of the backends under test, shared by all of them as in production.
        pub(crate) fn lock_dir(&self) -> PathBuf {
            self.dir.join("locks")
        }
    }

    /// The process's token, created on first use.
    pub(crate) fn shared() -> &'static TestToken {
        static TOKEN: OnceLock<TestToken> = OnceLock::new();
        TOKEN.get_or_init(|| {
            // Statics are never dropped, so the directory outlives the process: sweep those
            // of earlier test processes that have exited.
            sweep(&std::env::temp_dir());
            let dir = tempfile::Builder::new()
                .prefix(&format!("{PREFIX}{}.", std::process::id()))
                .tempdir()
                .expect("create the test token directory")
                .keep();
            let token = prepare_dev_token(&dir).expect("prepare the SoftHSM2 test token");
            TestToken { dir, token }
        })
    }

    fn sweep(tmp: &Path) {
        let Ok(entries) = std::fs::read_dir(tmp) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) =
                name.to_str().and_then(|n| n.strip_prefix(PREFIX)).and_then(|r| r.split('.').next())
            else {
                continue;
            };
            if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::test_token::shared;
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn softhsm_dev_token_is_private_and_reused() {
        let t = shared();
        let pin = std::fs::read_to_string(&t.token.pin_file).unwrap();
        assert_eq!(pin.trim_end().len(), 32, "hex of 16 random bytes");
        assert_eq!(mode(&t.token.pin_file), 0o600);
        assert_eq!(mode(&t.dir.join("softhsm/tokens")), 0o700);
        assert_eq!(mode(&t.dir.join("softhsm")), 0o700);

        // What `kekd dev --dir DIR` does when run again: same token, same PIN.
        let again = prepare_dev_token(&t.dir).unwrap();
        assert_eq!(again.conf, t.token.conf);
        assert_eq!(std::fs::read_to_string(&again.pin_file).unwrap(), pin);
        let pkcs11 = library(&again.module, Some(&again.conf)).unwrap();
        assert_eq!(find_tokens(&pkcs11, DEV_TOKEN_LABEL).unwrap().len(), 1);
    }

    #[test]
    fn softhsm_second_directory_in_one_process_is_refused() {
        let _ = shared(); // the library is loaded with the shared token's configuration
        let other = tempfile::tempdir().unwrap();
        let err = prepare_dev_token(other.path()).unwrap_err();
        assert!(matches!(err, BackendError::Config(_)), "{err:?}");
        assert!(err.to_string().contains("already loaded"), "{err}");
        assert_eq!(std::env::var_os("SOFTHSM2_CONF").unwrap(), shared().token.conf.as_os_str());
    }
}
