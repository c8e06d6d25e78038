//! `kekctl audit verify --config KEKD_TOML --tenant NAME`: the tenant's audit checkpoints
//! checked with its root key (docs/FORMATS.md §5, "Checkpoints"). The key is had through
//! kekd's own code (its configuration, key store and root-key backends: the `anchors`
//! feature); the MAC input is built by the independent verifier (`kekd_client::audit`),
//! and the MAC computed here.

use std::path::{Path, PathBuf};

use kekd_client::audit::{Start, Summary, VerifyError};
use kekd_client::TenantName;

use crate::exit::CliError;

/// Verifies `files` (none: the tenant's whole trail, from `audit.dir`) checking each
/// checkpoint with the tenant's checkpoint key.
#[cfg(feature = "anchors")]
pub fn verify(
    config: &Path,
    tenant: &TenantName,
    files: &[PathBuf],
    from: &Start,
) -> Result<Result<Summary, VerifyError>, CliError> {
    use kekd_client::audit::{verify_files_anchored, Anchors};

    let anchor = kekd::anchors::open(config, tenant.as_str(), kekd::worker::Backends::ALL).map_err(|e| {
        let message = format!("audit verify --config: {e}");
        match e.code() {
            Some(code) => CliError::Status(kekd_client::ErrorStatus::new(code, message)),
            None => CliError::Setup(message),
        }
    })?;
    let files = if files.is_empty() {
        let dir = &anchor.audit_dir;
        let found = kekd_client::audit::day_files(dir)
            .map_err(|error| CliError::File { path: dir.clone(), error })?;
        if found.is_empty() {
            let message = format!("no audit files (YYYY-MM-DD.jsonl) in {}", dir.display());
            return Err(CliError::Status(kekd_client::ErrorStatus::new(
                kekd_client::Code::NotFound,
                message,
            )));
        }
        found
    } else {
        files.to_vec()
    };
    let key = Key(&anchor);
    Ok(verify_files_anchored(&files, from, Some(&Anchors { tenant: tenant.as_str(), mac: &key })))
}

/// Without the `anchors` feature, kekctl cannot open a root key.
#[cfg(not(feature = "anchors"))]
pub fn verify(
    _config: &Path,
    _tenant: &TenantName,
    _files: &[PathBuf],
    _from: &Start,
) -> Result<Result<Summary, VerifyError>, CliError> {
    Err(CliError::Usage(
        "audit verify --config: this kekctl was built without the `anchors` feature, so it cannot \
         open a root key to check checkpoints"
            .into(),
    ))
}

/// The tenant's checkpoint key, as the verifier's MAC check.
#[cfg(feature = "anchors")]
struct Key<'a>(&'a kekd::anchors::TenantAnchor);

#[cfg(feature = "anchors")]
impl kekd_client::audit::MacCheck for Key<'_> {
    fn matches(&self, input: &[u8], mac: &[u8; 32]) -> bool {
        use aws_lc_rs::hmac;
        // Built for this one MAC and dropped with it, like the worker's.
        let key = hmac::Key::new(hmac::HMAC_SHA256, self.0.key());
        hmac::verify(&key, input, mac).is_ok()
    }
}
