//! TPM 2.0 root key (tss-esapi over Debian's libtss2): KEKs are sealed data objects under a
//! storage primary key, optionally bound to PCR values with PolicyPCR.
//!
//! The storage primary is recreated from a fixed ECC P-256 template under the owner
//! hierarchy (the same template as `tpm2_createprimary -C o -g sha256 -G ecc256:aes128cfb`,
//! so the same key for as long as the owner seed lasts), or taken from a persistent handle
//! the operator provisioned. Each sealed KEK is stored as its public and private blobs
//! (see [`sealed`]), never as a saved context: a saved context does not survive a TPM
//! reset, the blobs do.
//!
//! # Transient objects
//!
//! A TPM holds very few transient objects (swtpm: 3), and a TPM without a resource
//! manager (swtpm, /dev/tpm0) keeps whatever a killed process left loaded. So nothing
//! stays loaded between operations: the recreated primary is kept as a saved context
//! (cheap to load, unlike re-deriving an ECC key on a hardware TPM) and every operation
//! loads what it needs and flushes it, objects and sessions alike, on every path.
//!
//! # Parameter encryption
//!
//! With `parameter_encryption`, the KEK crosses the bus only encrypted: `TPM2_Create`
//! takes it through a salted HMAC session with `decrypt`, `TPM2_Unseal` returns it through
//! a salted session (the policy session itself under a PCR policy) with `encrypt`. The
//! salt is encrypted to the storage primary, whose name kekd checks against the one each
//! blob was sealed under.

mod errors;
mod sealed;
#[cfg(test)]
mod tests;

use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};

use kekd_proto::TenantName;
use tss_esapi::attributes::{ObjectAttributesBuilder, SessionAttributesBuilder};
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{KeyHandle, ObjectHandle, PersistentTpmHandle, SessionHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Digest, EccPoint, KeyedHashScheme, PcrSelectionList, PcrSelectionListBuilder, PcrSlot, Private, Public,
    PublicBuilder, PublicEccParametersBuilder, PublicKeyedHashParameters, SensitiveData, SymmetricDefinition,
    SymmetricDefinitionObject,
};
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::utils::TpmsContext;
use tss_esapi::{Context, TctiNameConf};
use zeroize::Zeroizing;

use self::errors::{classify, describe, Class};
pub use self::sealed::{describe_mask, pcr_mask, Sealed};
use super::{BackendError, RootKey, KEK_LEN};
use crate::config::TpmConfig;

const NO_BYOK: &str = "a TPM root key cannot be imported: bring-your-own-key needs a PKCS#11 token";

/// Opens a tenant's TPM root key: the worker's entry point into this backend.
pub fn open(tenant: &TenantName, cfg: &TpmConfig) -> Result<Arc<dyn RootKey>, BackendError> {
    let key = TpmRootKey::open(cfg)?;
    tracing::debug!(tenant = %tenant, "TPM root key opened");
    Ok(Arc::new(key))
}

/// Where the storage primary comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Primary {
    /// Recreated from kekd's fixed template under the owner hierarchy.
    Template,
    /// A persistent object the operator provisioned.
    Persistent(u32),
}

pub struct TpmRootKey {
    tcti: String,
    primary: Primary,
    /// PCRs new KEKs are sealed to (sha256 bank), as a mask.
    pcr_mask: u32,
    parameter_encryption: bool,
    /// The PolicyPCR digest of the configured PCRs' values when the worker started: new
    /// KEKs are sealed to it, and the canary checks the PCRs still match it.
    policy: Option<Digest>,
    /// The storage primary's name when the worker started, for the canary.
    primary_name: Vec<u8>,
    conn: Mutex<Option<Conn>>,
}

/// An open ESAPI context and the saved primary. Rebuilt after any failure of the link.
struct Conn {
    ctx: Context,
    saved_primary: Option<TpmsContext>,
}

/// A failed step: what kekd was doing, and the TSS error.
struct Failure {
    step: &'static str,
    error: tss_esapi::Error,
}

fn at(step: &'static str) -> impl FnOnce(tss_esapi::Error) -> Failure {
    move |error| Failure { step, error }
}

/// Result of one operation on an open connection: a TSS failure (classified by the
/// caller) or a verdict already made.
enum OpError {
    Tss(Failure),
    Backend(BackendError),
}

impl From<Failure> for OpError {
    fn from(f: Failure) -> Self {
        OpError::Tss(f)
    }
}

impl From<BackendError> for OpError {
    fn from(e: BackendError) -> Self {
        OpError::Backend(e)
    }
}

/// The storage primary loaded for one operation.
struct LoadedPrimary {
    handle: KeyHandle,
    /// Recreated or context-loaded (flushed after the operation), or persistent (only
    /// its ESAPI resource is closed).
    transient: bool,
    name: Vec<u8>,
}

impl TpmRootKey {
    pub fn open(cfg: &TpmConfig) -> Result<TpmRootKey, BackendError> {
        let primary = match cfg.primary_handle().map_err(BackendError::Config)? {
            Some(h) => Primary::Persistent(h),
            None => Primary::Template,
        };
        let mut key = TpmRootKey {
            tcti: cfg.tcti.clone(),
            primary,
            pcr_mask: pcr_mask(&cfg.pcrs),
            parameter_encryption: cfg.parameter_encryption(),
            policy: None,
            primary_name: Vec::new(),
            conn: Mutex::new(None),
        };
        let mask = key.pcr_mask;
        let (name, policy) = key.with_primary("open the root key", |ctx, primary| {
            let policy = if mask != 0 { Some(pcr_policy_digest(ctx, mask)?) } else { None };
            Ok((primary.name.clone(), policy))
        })?;
        key.primary_name = name;
        key.policy = policy;
        Ok(key)
    }

    /// Runs `op` with the storage primary loaded, on a connection that is opened if
    /// needed and dropped after a link failure. Everything `op` loads it flushes itself;
    /// the primary is flushed (or closed) here, whatever `op` returned.
    fn with_primary<T>(
        &self,
        what: &str,
        op: impl FnOnce(&mut Context, &LoadedPrimary) -> Result<T, OpError>,
    ) -> Result<T, BackendError> {
        let mut guard = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        if guard.is_none() {
            *guard = Some(self.connect()?);
        }
        let conn = guard.as_mut().expect("connected above");
        let result = match self.load_primary(conn) {
            Ok(primary) => {
                let result = op(&mut conn.ctx, &primary);
                let released = release_primary(&mut conn.ctx, primary);
                match (result, released) {
                    (Err(e), _) => Err(e),
                    (Ok(v), Ok(())) => Ok(v),
                    (Ok(_), Err(f)) => Err(OpError::Tss(f)),
                }
            }
            Err(e) => Err(e),
        };
        result.map_err(|e| {
            let (err, link_down) = self.verdict(what, e);
            if link_down {
                // Context's drop flushes what ESAPI still tracks, if the TPM listens.
                *guard = None;
            }
            err
        })
    }

    fn connect(&self) -> Result<Conn, BackendError> {
        let tcti = TctiNameConf::from_str(&self.tcti)
            .map_err(|e| BackendError::Config(format!("bad TCTI {:?}: {}", self.tcti, describe(&e))))?;
        let ctx = Context::new(tcti).map_err(|e| {
            BackendError::Unreachable(format!("cannot open the TPM at {:?}: {}", self.tcti, describe(&e)))
        })?;
        Ok(Conn { ctx, saved_primary: None })
    }

    fn load_primary(&self, conn: &mut Conn) -> Result<LoadedPrimary, OpError> {
        let ctx = &mut conn.ctx;
        let (handle, transient) = match self.primary {
            Primary::Persistent(h) => {
                let tpm_handle = PersistentTpmHandle::new(h).map_err(at("name the persistent primary"))?;
                let obj = ctx.tr_from_tpm_public(TpmHandle::Persistent(tpm_handle)).map_err(|error| {
                    if classify(&error) == Class::Handle {
                        OpError::Backend(BackendError::Refused(format!(
                            "there is no storage primary at persistent handle 0x{h:08x}"
                        )))
                    } else {
                        OpError::Tss(Failure { step: "find the persistent primary", error })
                    }
                })?;
                (KeyHandle::from(obj), false)
            }
            Primary::Template => {
                // A saved context does not survive a TPM reset, nor a context from another
                // boot: any failure to load it just means "create it again".
                let loaded = match conn.saved_primary.clone() {
                    Some(saved) => ctx.context_load(saved).ok(),
                    None => None,
                };
                let handle = match loaded {
                    Some(h) => KeyHandle::from(h),
                    None => {
                        conn.saved_primary = None;
                        let created = ctx
                            .execute_with_session(Some(AuthSession::Password), |ctx| {
                                ctx.create_primary(
                                    Hierarchy::Owner,
                                    primary_template()?,
                                    None,
                                    None,
                                    None,
                                    None,
                                )
                            })
                            .map_err(at("create the storage primary"))?;
                        let h = created.key_handle;
                        match ctx.context_save(h.into()) {
                            Ok(saved) => conn.saved_primary = Some(saved),
                            Err(error) => {
                                let _ = ctx.flush_context(h.into());
                                return Err(Failure { step: "save the storage primary", error }.into());
                            }
                        }
                        h
                    }
                };
                (handle, true)
            }
        };
        match ctx.tr_get_name(handle.into()) {
            Ok(name) => Ok(LoadedPrimary { handle, transient, name: name.value().to_vec() }),
            Err(error) => {
                let _ = release_primary(ctx, LoadedPrimary { handle, transient, name: Vec::new() });
                Err(Failure { step: "read the storage primary's name", error }.into())
            }
        }
    }

    /// Turns a failed operation into what the service needs to know, and whether the
    /// connection must be rebuilt.
    fn verdict(&self, what: &str, e: OpError) -> (BackendError, bool) {
        let f = match e {
            OpError::Backend(e) => return (e, false),
            OpError::Tss(f) => f,
        };
        let detail = format!("{what}: cannot {}: {}", f.step, describe(&f.error));
        match classify(&f.error) {
            Class::Link => {
                (BackendError::Unreachable(format!("TPM at {:?} unreachable: {detail}", self.tcti)), true)
            }
            Class::Busy => (BackendError::Unreachable(format!("TPM busy: {detail}")), false),
            Class::Policy => (BackendError::Refused(format!("PCR policy not satisfied: {detail}")), false),
            Class::Handle | Class::Integrity | Class::Other => {
                (BackendError::Internal(format!("TPM error: {detail}")), false)
            }
        }
    }

    fn describe_primary(&self) -> String {
        match self.primary {
            Primary::Template => "ecc-p256-template".into(),
            Primary::Persistent(h) => format!("0x{h:08x}"),
        }
    }
}

impl RootKey for TpmRootKey {
    fn seal(&self, aad: &[u8], kek: &[u8; KEK_LEN]) -> Result<Vec<u8>, BackendError> {
        let mut data = Zeroizing::new(Vec::with_capacity(sealed::SEALED_DATA_LEN));
        data.extend_from_slice(kek);
        data.extend_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, aad).as_ref());
        let public = sealed_object_template(self.policy.clone())
            .map_err(|e| BackendError::Internal(format!("sealed object template: {}", describe(&e))))?;
        let encrypt = self.parameter_encryption;
        let mask = self.pcr_mask;
        self.with_primary("seal a KEK", move |ctx, primary| {
            let sensitive = SensitiveData::try_from(data.to_vec()).map_err(at("prepare the KEK"))?;
            let session =
                if encrypt { Some(salted_session(ctx, primary.handle, SessionType::Hmac)?) } else { None };
            let created = with_session(ctx, session, Some(Direction::ToTpm), |ctx| {
                let created = ctx.create(primary.handle, public, None, Some(sensitive), None, None);
                Ok(created.map_err(at("create the sealed object"))?)
            })?;
            let public = created.out_public.marshall().map_err(at("marshal the public area"))?;
            Ok(Sealed {
                pcr_mask: mask,
                parent_name: &primary.name,
                public: &public,
                private: created.out_private.value(),
            }
            .to_bytes())
        })
    }

    fn unseal(&self, aad: &[u8], blob: &[u8], out: &mut [u8; KEK_LEN]) -> Result<(), BackendError> {
        let blob = Sealed::parse(blob).ok_or(BackendError::DataInvalid)?;
        let public = Public::unmarshall(blob.public).map_err(|_| BackendError::DataInvalid)?;
        let private = Private::try_from(blob.private.to_vec()).map_err(|_| BackendError::DataInvalid)?;
        let encrypt = self.parameter_encryption;
        let data = self.with_primary("unseal a KEK", |ctx, primary| {
            if primary.name != blob.parent_name {
                return Err(BackendError::Refused(
                    "the storage primary is not the one this KEK was sealed under \
                     (the TPM was cleared, or another TPM or primary handle is configured)"
                        .into(),
                )
                .into());
            }
            // The private area is encrypted by the primary already: no session needed.
            let object = ctx
                .execute_with_session(Some(AuthSession::Password), |ctx| {
                    ctx.load(primary.handle, private, public)
                })
                .map_err(|error| match classify(&error) {
                    Class::Integrity => OpError::Backend(BackendError::DataInvalid),
                    _ => OpError::Tss(Failure { step: "load the sealed object", error }),
                })?;
            let unsealed = unseal_object(ctx, primary.handle, object, blob.pcr_mask, encrypt);
            let flushed = ctx.flush_context(object.into()).map_err(at("flush the sealed object"));
            let data = unsealed?;
            flushed?;
            Ok(data)
        })?;
        let expected = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, aad);
        let data = data.value();
        if data.len() != sealed::SEALED_DATA_LEN
            || aws_lc_rs::constant_time::verify_slices_are_equal(&data[KEK_LEN..], expected.as_ref()).is_err()
        {
            return Err(BackendError::DataInvalid);
        }
        out.copy_from_slice(&data[..KEK_LEN]);
        Ok(())
    }

    fn canary(&self) -> Result<(), BackendError> {
        let expected_name = self.primary_name.clone();
        let (mask, expected_policy) = (self.pcr_mask, self.policy.clone());
        self.with_primary("check the root key", |ctx, primary| {
            if primary.name != expected_name {
                return Err(BackendError::Refused(
                    "the storage primary changed since the worker started (the TPM was cleared?)".into(),
                )
                .into());
            }
            if let Some(expected) = expected_policy {
                if pcr_policy_digest(ctx, mask)? != expected {
                    return Err(BackendError::Refused(format!(
                        "PCR policy not satisfied: PCRs {} changed since the worker started",
                        describe_mask(mask)
                    ))
                    .into());
                }
            }
            Ok(())
        })
    }

    fn sibling(&self, _label: &str) -> Result<Arc<dyn RootKey>, BackendError> {
        Err(BackendError::Config(
            "a TPM root key has no label to rotate to: its storage primary changes with the owner \
             seed (tpm2_clear) or with primary_handle; root key rotation is for PKCS#11 root keys"
                .into(),
        ))
    }

    fn transport_key(&self, _: &str) -> Result<super::TransportKey, BackendError> {
        Err(BackendError::Config(NO_BYOK.into()))
    }

    fn import_root_key(&self, _: &str, _: super::WrappingAlgorithm, _: &[u8]) -> Result<(), BackendError> {
        Err(BackendError::Config(NO_BYOK.into()))
    }

    fn describe(&self) -> String {
        let pcrs = if self.pcr_mask == 0 { "none".to_owned() } else { describe_mask(self.pcr_mask) };
        format!(
            "tpm tcti={:?} primary={} pcrs={pcrs} parameter_encryption={}",
            self.tcti,
            self.describe_primary(),
            if self.parameter_encryption { "on" } else { "off" }
        )
    }
}

/// Unseals a loaded object through the session its policy needs, and flushes that
/// session.
fn unseal_object(
    ctx: &mut Context,
    primary: KeyHandle,
    object: KeyHandle,
    mask: u32,
    encrypt: bool,
) -> Result<SensitiveData, OpError> {
    let session = if mask != 0 {
        let session = if encrypt {
            salted_session(ctx, primary, SessionType::Policy)?
        } else {
            start_session(ctx, None, SessionType::Policy, SymmetricDefinition::Null)?
        };
        let policy = PolicySession::try_from(session).map_err(at("start a policy session"));
        let applied = policy.and_then(|p| {
            pcr_selection(mask)
                .and_then(|selection| ctx.policy_pcr(p, Digest::default(), selection))
                .map_err(at("apply PolicyPCR"))
        });
        if let Err(f) = applied {
            let _ = flush_session(ctx, session);
            return Err(f.into());
        }
        Some(session)
    } else if encrypt {
        Some(salted_session(ctx, primary, SessionType::Hmac)?)
    } else {
        None
    };
    // Only a salted session has a key to encrypt the response with: a plain policy session
    // (parameter encryption off) that asks for it is refused with TPM_RC_SYMMETRIC.
    let direction = encrypt.then_some(Direction::FromTpm);
    with_session(ctx, session, direction, |ctx| {
        ctx.unseal(object.into()).map_err(|error| match classify(&error) {
            Class::Policy => OpError::Backend(BackendError::Refused(format!(
                "PCR policy not satisfied: PCRs {} do not hold the values this KEK was sealed under",
                describe_mask(mask)
            ))),
            _ => OpError::Tss(Failure { step: "unseal", error }),
        })
    })
}

/// Which way the secret travels, for parameter encryption.
#[derive(Clone, Copy)]
enum Direction {
    /// In the command (the KEK given to TPM2_Create): the session's `decrypt`.
    ToTpm,
    /// In the response (TPM2_Unseal's data): the session's `encrypt`.
    FromTpm,
}

/// Runs `f` authorised by `session` (or the empty password when `None`), then flushes
/// the session whatever `f` returned. With a `direction`, the session (a salted one) also
/// encrypts the secret that travels that way.
fn with_session<T>(
    ctx: &mut Context,
    session: Option<AuthSession>,
    direction: Option<Direction>,
    f: impl FnOnce(&mut Context) -> Result<T, OpError>,
) -> Result<T, OpError> {
    let Some(session) = session else {
        return ctx.execute_with_session(Some(AuthSession::Password), f);
    };
    let attrs = SessionAttributesBuilder::new().with_continue_session(true);
    let (attrs, mask) = match direction {
        Some(Direction::ToTpm) => attrs.with_decrypt(true),
        Some(Direction::FromTpm) => attrs.with_encrypt(true),
        None => attrs,
    }
    .build();
    let result = ctx
        .tr_sess_set_attributes(session, attrs, mask)
        .map_err(|error| OpError::Tss(Failure { step: "set the session's attributes", error }))
        .and_then(|()| ctx.execute_with_session(Some(session), f));
    let flushed = flush_session(ctx, session);
    let value = result?;
    flushed?;
    Ok(value)
}

/// A session salted with the storage primary: its key is known only to kekd and the TPM.
fn salted_session(ctx: &mut Context, primary: KeyHandle, kind: SessionType) -> Result<AuthSession, Failure> {
    start_session(ctx, Some(primary), kind, SymmetricDefinition::AES_128_CFB)
}

fn start_session(
    ctx: &mut Context,
    salt_key: Option<KeyHandle>,
    kind: SessionType,
    symmetric: SymmetricDefinition,
) -> Result<AuthSession, Failure> {
    ctx.execute_without_session(|ctx| {
        ctx.start_auth_session(salt_key, None, None, kind, symmetric, HashingAlgorithm::Sha256)
    })
    .map_err(at("start a session"))?
    .ok_or(Failure {
        step: "start a session",
        error: tss_esapi::Error::WrapperError(tss_esapi::WrapperErrorKind::WrongValueFromTpm),
    })
}

fn flush_session(ctx: &mut Context, session: AuthSession) -> Result<(), Failure> {
    let handle = SessionHandle::from(session);
    ctx.flush_context(ObjectHandle::from(handle)).map_err(at("flush a session"))
}

/// Flushes a transient primary, or closes the ESAPI resource of a persistent one.
fn release_primary(ctx: &mut Context, primary: LoadedPrimary) -> Result<(), Failure> {
    let mut handle = ObjectHandle::from(primary.handle);
    if primary.transient {
        ctx.flush_context(handle).map_err(at("flush the storage primary"))
    } else {
        ctx.tr_close(&mut handle).map_err(at("close the storage primary"))
    }
}

/// The PolicyPCR digest of the masked PCRs' current values, from a trial session.
fn pcr_policy_digest(ctx: &mut Context, mask: u32) -> Result<Digest, OpError> {
    let session = start_session(ctx, None, SessionType::Trial, SymmetricDefinition::Null)?;
    let digest = PolicySession::try_from(session).map_err(at("start a trial session")).and_then(|p| {
        ctx.execute_without_session(|ctx| {
            ctx.policy_pcr(p, Digest::default(), pcr_selection(mask)?)?;
            ctx.policy_get_digest(p)
        })
        .map_err(at("compute the PCR policy"))
    });
    let flushed = flush_session(ctx, session);
    let digest = digest?;
    flushed?;
    Ok(digest)
}

fn pcr_selection(mask: u32) -> Result<PcrSelectionList, tss_esapi::Error> {
    let slots = (0..24)
        .filter(|i| mask & 1 << i != 0)
        .map(|i| PcrSlot::try_from(1u32 << i))
        .collect::<Result<Vec<_>, _>>()?;
    PcrSelectionListBuilder::new().with_selection(HashingAlgorithm::Sha256, &slots).build()
}

/// kekd's storage primary: the defaults of `tpm2_createprimary -C o -g sha256 -G
/// ecc256:aes128cfb` (a restricted decryption key, NIST P-256, AES-128-CFB for its
/// children, empty unique), so that it can be recreated without kekd.
fn primary_template() -> Result<Public, tss_esapi::Error> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}

/// A sealed data object: usable only by this TPM under this parent, with no
/// dictionary-attack counting (no password is ever tried), and, under a PCR policy, only
/// through that policy.
fn sealed_object_template(policy: Option<Digest>) -> Result<Public, tss_esapi::Error> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_no_da(true)
        .with_user_with_auth(policy.is_none())
        .with_admin_with_policy(policy.is_some())
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::KeyedHash)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_auth_policy(policy.unwrap_or_default())
        .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
        .with_keyed_hash_unique_identifier(Digest::default())
        .build()
}
