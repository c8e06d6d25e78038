//! What a tool beside kekd needs to check a tenant's audit checkpoints
//! (`kekctl audit verify --config`, docs/FORMATS.md §5 "Checkpoints"): the tenant's
//! checkpoint key, unsealed by its root key opened as its worker opens it, and where its
//! trail is. Reads kekd's configuration and key store, and writes nothing but the token lock
//! file a PKCS#11 login takes (as a worker's). The MACs are the tool's to compute.

use std::path::{Path, PathBuf};

use kekd_proto::{Code, TenantName};

use crate::backend::BackendError;
use crate::config::{Config, ConfigError};
use crate::dirfd::Dir;
use crate::envelope::kek_aad_of;
use crate::keystore::{self, StoreError, AUDIT_KEY_FILE, AUDIT_KEY_NAME, AUDIT_KEY_VERSION};
use crate::secret::{KeySlot, LockedArena, MemoryError};
use crate::worker::Backends;

/// A tenant's audit checkpoint key, unsealed in locked memory (where the process may lock
/// it), and where the tenant's trail is. Not `Clone`, not `Debug`; wiped when dropped.
pub struct TenantAnchor {
    /// `<audit.dir>/<tenant>`.
    pub audit_dir: PathBuf,
    /// The root key that unsealed it, described.
    pub root: String,
    key: KeySlot,
}

impl TenantAnchor {
    /// The 32 bytes of the checkpoint key.
    pub fn key(&self) -> &[u8; 32] {
        self.key.bytes()
    }
}

/// Why the checkpoint key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{path}: {source}")]
    Config { path: PathBuf, source: ConfigError },
    #[error("tenant {0:?} is not in the configuration")]
    NoTenant(String),
    #[error("tenant {tenant} has no audit checkpoint key ({path} does not exist): its worker has made no checkpoint yet")]
    NoKey { tenant: String, path: PathBuf },
    #[error("the key store: {0}")]
    Store(#[from] StoreError),
    #[error("cannot open tenant {tenant}'s root key: {source}")]
    RootKey { tenant: String, source: Box<BackendError> },
    #[error("cannot unseal {path} with {root}: {source}")]
    Unseal { path: PathBuf, root: String, source: Box<BackendError> },
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

impl OpenError {
    /// The status code it stands for, as kekd would answer it; `None` for a local failure
    /// (the configuration, a file).
    pub fn code(&self) -> Option<Code> {
        match self {
            OpenError::Config { .. } | OpenError::Store(StoreError::File(_)) => None,
            OpenError::NoTenant(_) | OpenError::NoKey { .. } => Some(Code::NotFound),
            OpenError::Store(_) => Some(Code::DataInvalid),
            OpenError::Unseal { source, .. } if matches!(**source, BackendError::DataInvalid) => {
                Some(Code::DataInvalid)
            }
            OpenError::RootKey { source, .. } | OpenError::Unseal { source, .. } => {
                Some(crate::error::backend_status(source).code)
            }
            OpenError::Memory(_) => Some(Code::ResourceExhausted),
        }
    }
}

/// Reads `config`, opens `tenant`'s root key as configured (the one `audit.kek` names, after
/// a root key rotation) and unseals the tenant's checkpoint key with it. Run it as root (or
/// kekd's user); with a TPM without a resource manager (swtpm), while kekd is stopped.
pub fn open(config: &Path, tenant: &str, backends: Backends) -> Result<TenantAnchor, OpenError> {
    let cfg = Config::load(config).map_err(|source| OpenError::Config { path: config.to_owned(), source })?;
    let tenant_config = cfg.tenants.get(tenant).ok_or_else(|| OpenError::NoTenant(tenant.to_owned()))?;
    let name = TenantName::parse(tenant).map_err(|_| OpenError::NoTenant(tenant.to_owned()))?;
    let path = cfg.state_dir.join("tenants").join(tenant).join(AUDIT_KEY_FILE);
    let no_key = || OpenError::NoKey { tenant: tenant.to_owned(), path: path.clone() };
    // Read by descriptor, without following a link the tenant's user may have planted;
    // nothing is created on the way.
    if !cfg.state_dir.is_dir() {
        return Err(no_key());
    }
    let state = Dir::open_configured(&cfg.state_dir, 0o700).map_err(StoreError::from)?;
    let found =
        |e: crate::dirfd::DirError| if e.is_not_found() { Ok(None) } else { Err(StoreError::from(e)) };
    let tenant_dir = match state.open_dir("tenants").and_then(|t| t.open_lent_dir(tenant)) {
        Ok(dir) => Some(dir),
        Err(e) => found(e)?,
    };
    let sealed = match tenant_dir {
        Some(dir) => keystore::read_audit_key(&dir, &name)?,
        None => None,
    }
    .ok_or_else(no_key)?;
    let root = crate::worker::open_root_key(
        &cfg.state_dir,
        &name,
        tenant_config,
        sealed.root_key.as_deref(),
        backends,
    )
    .map_err(|source| OpenError::RootKey { tenant: tenant.to_owned(), source: Box::new(source) })?;
    let mut key = LockedArena::new(true)?.alloc()?;
    let aad = kek_aad_of(&name, AUDIT_KEY_NAME, AUDIT_KEY_VERSION);
    root.unseal(&aad, &sealed.sealed, key.bytes_mut()).map_err(|source| OpenError::Unseal {
        path,
        root: root.describe(),
        source: Box::new(source),
    })?;
    Ok(TenantAnchor { audit_dir: cfg.audit.dir.join(tenant), root: root.describe(), key })
}
