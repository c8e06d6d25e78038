//! A worker fails at start, not at first use (issue 20, point 5).
//!
//! The root key is opened while the worker is still root (with its `run_as` user's file
//! rights), and used afterwards by the user, inside the sandbox. Whatever works for the
//! first and not the second (a token directory the user cannot read, a module that needs
//! something the sandbox forbids) would otherwise pass for a healthy start and then fail
//! every request, with a message about the root key rather than about the user. So the
//! worker seals and unseals a test value once it is fully sandboxed, before it reports
//! ready, and a failure names the token (its SoftHSM2 directory when the configuration
//! tells it) and the user.

use std::io;
use std::path::{Path, PathBuf};

use crate::backend::{BackendError, RootKey, KEK_LEN};
use crate::config::TokenLocation;
use crate::sandbox::RunAs;

/// AAD of the test value, distinct from every KEK's (those start with "kekd/kek/").
const START_CHECK_AAD: &[u8] = b"kekd/start-check/v1";

/// Why a worker refuses to start although its root key opened.
#[derive(Debug, thiserror::Error)]
pub enum StartCheckError {
    /// The user's file rights do not reach the token's files.
    #[error(
        "user {user:?} cannot read the {token}: {}: {source}; hand the token's files to that user \
         (chown -R {user}: {}) or run the tenant as their owner",
        path.display(),
        tokendir.display()
    )]
    TokenFiles { user: String, token: TokenLocation, tokendir: PathBuf, path: PathBuf, source: io::Error },
    /// Sealing and unsealing a test value failed once the worker was sandboxed.
    #[error("{who} cannot use the root key in the {token} once the worker is sandboxed: {source}")]
    FirstUse { who: String, token: String, source: FirstUseError },
}

/// What went wrong with the test value.
#[derive(Debug, thiserror::Error)]
pub enum FirstUseError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("the value unsealed is not the value sealed")]
    Mismatch,
}

/// Seals a random value under the root key and unseals it again: both operations a request
/// needs, through the same sessions and logins it would use.
pub fn first_use(root: &dyn RootKey) -> Result<(), FirstUseError> {
    let mut value = [0u8; KEK_LEN];
    aws_lc_rs::rand::fill(&mut value).map_err(|_| {
        FirstUseError::Backend(BackendError::Internal("the system random generator failed".into()))
    })?;
    let sealed = root.seal(START_CHECK_AAD, &value)?;
    let mut back = [0u8; KEK_LEN];
    root.unseal(START_CHECK_AAD, &sealed, &mut back)?;
    if back == value {
        Ok(())
    } else {
        Err(FirstUseError::Mismatch)
    }
}

/// The first file of the SoftHSM2 token directory `dir` (the directory itself, a token's
/// directory, an object file) that the calling thread cannot open for reading, and why.
/// The thread must have the user's file rights already (its own, or `RunAs::files_as`).
pub fn unreadable(dir: &Path) -> Option<(PathBuf, io::Error)> {
    unreadable_below(dir, 1)
}

/// [`unreadable`], `depth` levels of directories down (SoftHSM2: one, the tokens').
fn unreadable_below(dir: &Path, depth: u32) -> Option<(PathBuf, io::Error)> {
    let denied = |path: &Path, e: io::Error| {
        matches!(e.kind(), io::ErrorKind::PermissionDenied).then(|| (path.to_owned(), e))
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => return denied(dir, e),
    };
    for entry in entries.flatten() {
        let path = entry.path();
        // Not followed: SoftHSM2 makes no links, and a planted one is not ours to read.
        let Ok(kind) = entry.file_type() else { continue };
        let problem = if kind.is_dir() && depth > 0 {
            unreadable_below(&path, depth - 1)
        } else if kind.is_file() {
            std::fs::File::open(&path).err().and_then(|e| denied(&path, e))
        } else {
            None
        };
        if problem.is_some() {
            return problem;
        }
    }
    None
}

/// [`unreadable`] with `user`'s file rights, for a worker that is still root.
pub fn unreadable_by(user: &RunAs, dir: &Path) -> Option<(PathBuf, io::Error)> {
    let _files = user.files_as().ok()?;
    unreadable(dir)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn the_first_token_file_a_user_cannot_read_is_named() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED (needs root): looks with another user's file rights");
            return;
        }
        let nobody = RunAs::resolve("nobody").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mode =
            |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
        mode(dir.path(), 0o755);
        let token = dir.path().join("0a1b-token");
        std::fs::create_dir(&token).unwrap();
        let object = token.join("token.object");
        std::fs::write(&object, b"x").unwrap();
        for (dir_mode, file_mode, expected) in
            [(0o755, 0o644, None), (0o700, 0o644, Some(&token)), (0o755, 0o600, Some(&object))]
        {
            mode(&token, dir_mode);
            mode(&object, file_mode);
            let found = unreadable_by(&nobody, dir.path());
            assert_eq!(found.as_ref().map(|(p, _)| p), expected, "{dir_mode:o}/{file_mode:o}: {found:?}");
            assert!(found.is_none_or(|(_, e)| e.kind() == io::ErrorKind::PermissionDenied));
            assert!(unreadable(dir.path()).is_none(), "root reads everything");
        }
    }
}
