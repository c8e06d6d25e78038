//! The daemon's error type and its one mapping to wire status codes.
//!
//! Internally errors keep their context (which file, which PKCS#11 call); what reaches the
//! client is a code and a message that names the problem without key material, and
//! without an oracle: everything about an EDEK that does not authenticate is DATA_INVALID.

use kekd_proto::{Code, ErrorStatus, KeyName};

use crate::backend::BackendError;
use crate::keystore::StoreError;
use crate::secret::MemoryError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// An EDEK that does not parse, authenticate, or name a usable version of this tenant.
    #[error("invalid data")]
    DataInvalid,
    #[error("version {version} of key \"{key}\" is disabled")]
    VersionDisabled { key: KeyName, version: u32 },
    #[error("the KEK record of version {version} of key \"{key}\" does not unseal under the root key")]
    KekRecordInvalid { key: KeyName, version: u32 },
    #[error("this operation needs an admin of tenant {tenant:?} (caller {peer})")]
    NotAdmin { tenant: String, peer: String },
    #[error("version {version} of key \"{key}\" is unusable: {why}")]
    ParentUnusable { key: KeyName, version: u32, why: String },
    #[error(
        "key chains are limited to {max} levels (root key, KEKs, data key): \"{key}\" would be level {level}"
    )]
    TooDeep { key: KeyName, level: u32, max: u32 },
    #[error("version {version} of key \"{key}\" is below its min_decrypt_version {min}")]
    BelowMinDecrypt { key: KeyName, version: u32, min: u32 },
    #[error("tenant {0:?} was destroyed (kekctl tenant destroy): its keys are gone; remove it from the configuration")]
    TenantDestroyed(String),
    /// A request field the daemon can only check itself (e.g. a wrapping algorithm name).
    #[error("{0}")]
    BadRequest(String),
    #[error("confirm_tenant must name this connection's tenant ({0:?})")]
    WrongConfirmation(String),
    #[error(
        "a batch of {n} encryptions exceeds the encryption budget of a KEK version ({budget}): split it"
    )]
    OverBudget { n: u64, budget: u64 },
    /// The audit trail could not be opened at start.
    #[error("{0}")]
    AuditOpen(String),
    /// `audit.mode = "fail_closed"` and the operation's audit record was not written.
    #[error("the audit record of this operation could not be written, so its result is withheld (see the kekd log)")]
    AuditUnavailable,
    /// The tenant's audit records of the day reached `audit.max_bytes_per_day`.
    #[error(
        "this tenant's audit records reached their daily limit of {0} bytes (audit.max_bytes_per_day): \
         operations fail until the day ends (UTC) or the limit is raised"
    )]
    AuditDailyCap(u64),
}

fn backend_code(e: &BackendError) -> Code {
    match e {
        BackendError::Unreachable(_) => Code::Unavailable,
        BackendError::Refused(_) | BackendError::Config(_) | BackendError::Rejected(_) => {
            Code::FailedPrecondition
        }
        BackendError::DataInvalid | BackendError::Internal(_) => Code::Internal,
    }
}

/// What a client is told of a root-key failure (the same as `Error::Backend(e).status()`).
pub fn backend_status(e: &BackendError) -> ErrorStatus {
    ErrorStatus::new(backend_code(e), e.to_string())
}

impl Error {
    /// The one mapping from internal errors to what a client sees.
    pub fn status(&self) -> ErrorStatus {
        let code = match self {
            Error::Store(e) => match e {
                StoreError::NoSuchKey(_) | StoreError::NoSuchVersion(..) => Code::NotFound,
                StoreError::KeyExists(_) | StoreError::Precondition(_) => Code::FailedPrecondition,
                StoreError::File(_) | StoreError::Corrupt { .. } => Code::Internal,
            },
            Error::Backend(e) => backend_code(e),
            Error::Memory(_) => Code::ResourceExhausted,
            Error::DataInvalid => Code::DataInvalid,
            Error::VersionDisabled { .. } | Error::KekRecordInvalid { .. } => Code::FailedPrecondition,
            Error::NotAdmin { .. } => Code::PermissionDenied,
            Error::OverBudget { .. } => Code::ResourceExhausted,
            Error::AuditUnavailable => Code::Unavailable,
            Error::AuditDailyCap(_) => Code::ResourceExhausted,
            Error::AuditOpen(_) => Code::Internal,
            Error::BelowMinDecrypt { .. }
            | Error::TenantDestroyed(_)
            | Error::ParentUnusable { .. }
            | Error::TooDeep { .. } => Code::FailedPrecondition,
            Error::WrongConfirmation(_) | Error::BadRequest(_) => Code::InvalidArgument,
        };
        // Store i/o and corruption details (paths) stay in the log.
        let message = match self {
            Error::Store(StoreError::File(_) | StoreError::Corrupt { .. }) => "key store error".to_owned(),
            other => other.to_string(),
        };
        ErrorStatus::new(code, message)
    }
}
