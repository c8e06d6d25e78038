//! Root-key backends: where a tenant's root key lives and how KEKs are sealed under it.
//!
//! The trait is deliberately narrow (seal, unseal, canary, describe): every backend can do
//! all four, so nothing answers "not supported". Calls block (HSM and TPM round trips);
//! callers run them off the async executor.

pub mod bounded;
pub mod pkcs11;
pub mod tpm;

use std::fmt;

/// Length of a KEK in bytes (AES-256).
pub const KEK_LEN: usize = 32;

/// A tenant's root key.
pub trait RootKey: Send + Sync {
    /// Encrypts `kek` under the root key. `aad` binds the tenant, key name and version
    /// (see [`crate::envelope::kek_aad`]); the result is opaque and stored in the key record.
    fn seal(&self, aad: &[u8], kek: &[u8; KEK_LEN]) -> Result<Vec<u8>, BackendError>;

    /// Decrypts a sealed KEK straight into `out`, which the caller provides in locked
    /// memory. Any intermediate buffer the backend needs is wiped before returning.
    fn unseal(&self, aad: &[u8], sealed: &[u8], out: &mut [u8; KEK_LEN]) -> Result<(), BackendError>;

    /// A cheap operation with the root key that proves it is still reachable and usable.
    fn canary(&self) -> Result<(), BackendError>;

    /// For status and logs, e.g. `pkcs11 token="kekd" key="acme-root"`. No secrets.
    fn describe(&self) -> String;

    /// Why this root key falls short of one that stays in its HSM, each as the tenant's
    /// configuration allowed it (an escrowed PKCS#11 key, `allow_exportable_root`): shown
    /// by status, so that an exception is never silent. Empty for a key that cannot leave,
    /// which a TPM's sealing parent never can.
    fn exceptions(&self) -> Vec<String> {
        Vec::new()
    }

    /// Another root key of the same tenant in the same place, found by `label` or created
    /// under it: the target of a root key rotation. A backend whose root key has no label
    /// to choose (a TPM's storage primary follows its owner seed) answers with a
    /// configuration error that says so.
    fn sibling(&self, label: &str) -> Result<std::sync::Arc<dyn RootKey>, BackendError>;

    /// BYOK, step 1: the public half of the RSA transport key for a root key to be imported
    /// as `label`, generated in the token on first use. A backend that cannot import keys
    /// says so (a configuration error).
    fn transport_key(&self, label: &str) -> Result<TransportKey, BackendError>;

    /// BYOK, step 2: unwraps customer key material (wrapped to `label`'s transport key with
    /// `algorithm`) in the token into a new non-extractable root key labelled `label`; the
    /// material never enters kekd's memory.
    fn import_root_key(
        &self,
        label: &str,
        algorithm: WrappingAlgorithm,
        wrapped: &[u8],
    ) -> Result<(), BackendError>;
}

pub use self::pkcs11::import::{TransportKey, WrappingAlgorithm};

/// Backend failures, split by what the service must do about them.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The root key cannot be reached right now (token absent, HSM down, TPM busy).
    /// Retryable; cached KEKs may keep serving.
    #[error("root key unreachable: {0}")]
    Unreachable(String),
    /// The root key answered definitively no: it was deleted, disabled or a policy
    /// refused. Cached KEKs must be flushed.
    #[error("root key refused: {0}")]
    Refused(String),
    /// The sealed blob did not decrypt under this root key (damaged record or another
    /// root key). Never says which.
    #[error("sealed KEK does not decrypt under the root key")]
    DataInvalid,
    /// The backend is misconfigured (module cannot load, token or key not found, bad PIN).
    #[error("{0}")]
    Config(String),
    /// The key found is not one kekd adopts as a root key (it could leave the HSM, or
    /// cannot seal with AES-GCM); names each attribute at fault.
    #[error(transparent)]
    Rejected(#[from] pkcs11::adopt::Rejected),
    #[error("root-key backend error: {0}")]
    Internal(String),
}

impl fmt::Debug for dyn RootKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}
