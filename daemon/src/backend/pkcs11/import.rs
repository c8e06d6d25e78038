//! Bring your own key (BYOK): a tenant's root key made from key material the customer
//! generated outside the token, imported so that it never exists in clear outside the
//! customer's premises and the token, kekd's memory included.
//!
//! 1. [`Importer::transport_key`] generates (or finds again) an RSA-3072 *transport* key pair
//!    on the tenant's token, labelled `<root key label>-transport`, and returns its public
//!    half as PEM. The private half is non-extractable and may only unwrap.
//! 2. The customer wraps 32 bytes of AES-256 key material under that public key, with one of
//!    the [`WrappingAlgorithm`]s, e.g. with `openssl pkeyutl -encrypt -pubin -inkey pub.pem
//!    -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256 -pkeyopt rsa_mgf1_md:sha256`.
//! 3. [`Importer::import_root_key`] unwraps it *on the token* (`C_UnwrapKey`) into a new
//!    AES-256 token object with exactly the attributes of a root key that kekd generates
//!    (see `root_key_template`), under a label that must not exist yet. `Pkcs11RootKey` then
//!    opens it like any other root key.
//!
//! # The two layouts
//!
//! - `RSAES_OAEP_*`: RSA-OAEP (MGF1 with the same hash, empty label) of the 32 key bytes;
//!   exactly one modulus long (384 bytes). One `C_UnwrapKey` with `CKM_RSA_PKCS_OAEP`.
//! - `RSA_AES_KEY_WRAP_*`: the layout of `CKM_RSA_AES_KEY_WRAP` (PKCS#11 3.0; also
//!   AWS KMS's `RSA_AES_KEY_WRAP_SHA_*`): RSA-OAEP of an ephemeral AES key (16, 24 or 32
//!   bytes), one modulus long, followed by the key bytes wrapped under that AES key with AES
//!   key wrap with padding (RFC 5649, KWP): 40 bytes for a 32-byte key.
//!
//! A token that lists `CKM_RSA_AES_KEY_WRAP` for unwrapping does it in one `C_UnwrapKey`
//! (`ulAESKeyBits` = 256: by the standard's unwrap steps the ephemeral key's length comes
//! from the RSA part). Neither SoftHSM 2.6.1 nor kryoptic 1.5.4 implements it, so the layout
//! is otherwise unwrapped in the same two steps on the token, with `CKM_RSA_PKCS_OAEP` and
//! an AES-KWP mechanism: the ephemeral key is unwrapped with RSA-OAEP as a session object that
//! may only unwrap, the target key is unwrapped under it with AES-KWP, and the ephemeral key
//! is destroyed on every path (it would go with the session anyway). Neither key is ever in
//! kekd's memory. The AES-KWP mechanism is `CKM_AES_KEY_WRAP_KWP` (0x210B, RFC 5649 in
//! PKCS#11 3.0; kryoptic has it), else `CKM_AES_KEY_WRAP_PAD` (0x210A), which SoftHSM2
//! implements as RFC 5649 and lacks 0x210B (PKCS#11 3.0 defines 0x210A as RFC 3394 with
//! PKCS#7 padding instead, hence the order). cryptoki 0.12 can name neither 0x210B nor
//! `CKM_RSA_AES_KEY_WRAP` (no `Mechanism` variant, and `MechanismType` takes no raw value
//! below `CKM_VENDOR_DEFINED`): see `unnamed_mechanism`.
//!
//! # SHA-256 and SHA-1
//!
//! The SHA-256 algorithms are the ones to use, on a token that does them (kryoptic does).
//! SoftHSM 2.6.1 implements RSA-OAEP with SHA-1 only (any other hash or MGF:
//! `CKR_ARGUMENTS_BAD`), so the SHA-1 ones exist too, as in AWS KMS (OAEP does not rely on
//! the collision resistance that SHA-1 lacks). The token is asked
//! rather than assumed: [`TransportKey::algorithms`] lists what it accepts, and importing
//! with an algorithm it does not accept fails with an error that names the alternative.
//! Unwrapping the OAEP encoding in kekd (raw RSA on the token, OAEP in software) would work on
//! SoftHSM 2.6.1 but would put the customer's key in kekd's memory: not done.
//!
//! # Checking the new key
//!
//! The new object must hold exactly 32 bytes. A token that records `CKA_VALUE_LEN` on unwrap
//! is taken at its word. SoftHSM 2.6.1 does not (it sets `CKA_VALUE` only; the length reads
//! 0), and refuses `CKA_VALUE_LEN` in an unwrap template (`CKR_ATTRIBUTE_READ_ONLY`), so the
//! length is then bounded to the 8-byte AES-KWP block: by the input length in the RSA-AES
//! layout (40 bytes of KWP hold 25 to 32), and in the plain layout by measuring it on the
//! token (`measure_oaep_payload`: the payload is unwrapped once more as an extractable
//! *session* key that may do nothing, wrapped with KWP under a session key made for this, and
//! only the length of the result is kept). An encryption with the new key, as the canary
//! does, then proves it an AES key: of 25 to 32 bytes, only 32 are. Anything else is
//! destroyed before the call returns.
//!
//! # Errors
//!
//! Everything the caller can fix (no transport key, wrong length, label taken, material that
//! does not unwrap, an algorithm the token refuses) is [`BackendError::Config`] with a
//! message naming the problem, the token and the labels, never key material. A token that is
//! absent or not answering is [`BackendError::Unreachable`]; anything unexpected is
//! [`BackendError::Internal`] with the failing call and its `CKR_*`. `Refused` and
//! `DataInvalid` are not used: they speak of the serving root key (and `Refused` makes the
//! service flush its cached KEKs). Whether material failed its RSA-OAEP or its KWP check is said; which
//! `CKR_*` the token gave for it is only logged (at debug), to offer no padding oracle beyond
//! what the token itself exposes. kryoptic 1.5.4 answers `CKR_DEVICE_ERROR` to material that
//! fails either check (it so reports every OpenSSL failure): after a `C_UnwrapKey`, that is
//! taken for the material's failure if the session still answers (`rejected_by_device`).
//!
//! # Locking
//!
//! Every operation holds the token lock from login to the end, like `Pkcs11RootKey::open`:
//! SoftHSM2 rewrites token files on login, fails key generation that runs while another
//! thread searches objects, and the label check and the unwrap must not be split by another
//! kekd process importing or creating the same label.

#[cfg(test)]
mod tests;

use std::fmt;
use std::marker::PhantomData;
use std::os::raw::c_ulong;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::Engine as _;
use cryptoki::context::{Function, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::vendor_defined::VendorDefinedMechanism;
use cryptoki::mechanism::{Mechanism, MechanismInfo, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use cryptoki::types::{AuthPin, Ulong};
use zeroize::Zeroizing;

use super::library::TokenLockGuard;
use super::{
    classify, describe, find_tokens, library, login, root_key_template, Class, TokenLock, IV_LEN, TAG_BITS,
};
use crate::backend::{BackendError, KEK_LEN};
use crate::config::Pkcs11Config;

/// Size of a transport key that kekd generates, and the least it accepts.
pub const TRANSPORT_KEY_BITS: usize = 3072;
/// Appended to the root key label to name its transport key pair.
pub const TRANSPORT_LABEL_SUFFIX: &str = "-transport";
const PUBLIC_EXPONENT: [u8; 3] = [0x01, 0x00, 0x01];
/// RFC 5649 output for a `KEK_LEN`-byte key: the key (a multiple of 8) plus the 8-byte AIV.
const KWP_LEN: usize = KEK_LEN + 8;
/// Ephemeral AES key sizes of the RSA-AES layout.
const EPHEMERAL_LENS: [usize; 3] = [16, 24, 32];
/// AAD of the encryption that proves an imported key works; distinct from every KEK's AAD.
const CHECK_AAD: &[u8] = b"kekd/import-check/v1";
/// `CKM_RSA_AES_KEY_WRAP` (PKCS#11 3.0).
const CKM_RSA_AES_KEY_WRAP: c_ulong = 0x1054;
/// `CKM_AES_KEY_WRAP_KWP` (PKCS#11 3.0): AES key wrap with padding, RFC 5649.
const CKM_AES_KEY_WRAP_KWP: c_ulong = 0x210B;
/// `ulAESKeyBits` of `CKM_RSA_AES_KEY_WRAP` (module documentation).
const RSA_AES_KEY_BITS: c_ulong = 256;

/// The label of the transport key pair of the root key labelled `key_label`.
pub fn transport_label(key_label: &str) -> String {
    format!("{key_label}{TRANSPORT_LABEL_SUFFIX}")
}

/// How the customer wrapped the key material. Named as in AWS KMS, so that a customer's
/// tooling for one works for the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WrappingAlgorithm {
    /// RSA-OAEP with SHA-256 and MGF1-SHA-256, empty label, of the 32 key bytes.
    RsaesOaepSha256,
    /// RSA-OAEP (SHA-256) of an ephemeral AES key ‖ AES-KWP (RFC 5649) of the key bytes.
    RsaAesKeyWrapSha256,
    /// As [`Self::RsaesOaepSha256`] with SHA-1, for tokens without SHA-256 OAEP.
    RsaesOaepSha1,
    /// As [`Self::RsaAesKeyWrapSha256`] with SHA-1, for tokens without SHA-256 OAEP.
    RsaAesKeyWrapSha1,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OaepHash {
    Sha256,
    Sha1,
}

impl WrappingAlgorithm {
    /// Every algorithm, preferred first.
    pub const ALL: [Self; 4] =
        [Self::RsaesOaepSha256, Self::RsaAesKeyWrapSha256, Self::RsaesOaepSha1, Self::RsaAesKeyWrapSha1];

    pub fn name(self) -> &'static str {
        match self {
            Self::RsaesOaepSha256 => "RSAES_OAEP_SHA_256",
            Self::RsaAesKeyWrapSha256 => "RSA_AES_KEY_WRAP_SHA_256",
            Self::RsaesOaepSha1 => "RSAES_OAEP_SHA_1",
            Self::RsaAesKeyWrapSha1 => "RSA_AES_KEY_WRAP_SHA_1",
        }
    }

    /// Whether this is the two-part layout of `CKM_RSA_AES_KEY_WRAP`.
    pub fn is_rsa_aes(self) -> bool {
        matches!(self, Self::RsaAesKeyWrapSha256 | Self::RsaAesKeyWrapSha1)
    }

    /// Length of 32 bytes of key material wrapped this way under a key of `modulus_len` bytes.
    pub fn wrapped_len(self, modulus_len: usize) -> usize {
        if self.is_rsa_aes() {
            modulus_len + KWP_LEN
        } else {
            modulus_len
        }
    }

    fn hash(self) -> OaepHash {
        match self {
            Self::RsaesOaepSha256 | Self::RsaAesKeyWrapSha256 => OaepHash::Sha256,
            Self::RsaesOaepSha1 | Self::RsaAesKeyWrapSha1 => OaepHash::Sha1,
        }
    }

    /// The plain layout with the same hash: what to suggest when the token cannot unwrap the
    /// RSA-AES layout.
    fn plain(self) -> Self {
        match self.hash() {
            OaepHash::Sha256 => Self::RsaesOaepSha256,
            OaepHash::Sha1 => Self::RsaesOaepSha1,
        }
    }

    /// The same layout with SHA-1: what to suggest when the token refuses SHA-256.
    fn with_sha1(self) -> Self {
        if self.is_rsa_aes() {
            Self::RsaAesKeyWrapSha1
        } else {
            Self::RsaesOaepSha1
        }
    }
}

impl fmt::Display for WrappingAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not one of [`WrappingAlgorithm::ALL`].
#[derive(Debug, thiserror::Error)]
#[error(
    "unknown wrapping algorithm {0:?} (expected RSAES_OAEP_SHA_256, RSA_AES_KEY_WRAP_SHA_256, \
     RSAES_OAEP_SHA_1 or RSA_AES_KEY_WRAP_SHA_1)"
)]
pub struct UnknownAlgorithm(pub String);

impl FromStr for WrappingAlgorithm {
    type Err = UnknownAlgorithm;

    /// Case-insensitive, `-` or `_`: `rsa-aes-key-wrap-sha-256` works on a command line.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.replace('-', "_");
        Self::ALL
            .into_iter()
            .find(|a| a.name().eq_ignore_ascii_case(&wanted))
            .ok_or_else(|| UnknownAlgorithm(s.to_owned()))
    }
}

/// The public half of a transport key pair, to give to the customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportKey {
    /// Label of both halves on the token: `<root key label>-transport`.
    pub label: String,
    /// SubjectPublicKeyInfo in PEM (`-----BEGIN PUBLIC KEY-----`), as `openssl pkey -pubout`
    /// writes it.
    pub pem: String,
    /// SHA-256 of the DER SubjectPublicKeyInfo, lowercase hex, for checking the PEM out of
    /// band: `openssl pkey -pubin -in pub.pem -outform DER | sha256sum`.
    pub sha256: String,
    /// Modulus size.
    pub bits: usize,
    /// Whether this call generated the pair; `false` when it was found on the token.
    pub created: bool,
    /// What this token accepts for [`Importer::import_root_key`] with this key, preferred
    /// first (asked of the token, see the module documentation).
    pub algorithms: Vec<WrappingAlgorithm>,
}

/// Imports customer key material as root keys on one token. Holds no session: every call
/// finds the token by label, logs in and holds the token lock for its whole length.
pub struct Importer {
    tenant: String,
    module: PathBuf,
    token_label: String,
    pkcs11: Pkcs11,
    /// In a zeroize-on-drop box, as in `Pkcs11RootKey`.
    pin: AuthPin,
    token_lock: TokenLock,
}

/// A logged-in read-write session under the token lock. Fields drop in order: the session
/// closes before the lock is released.
struct Admin<'a> {
    session: Session,
    slot: Slot,
    _lock: TokenLockGuard<'a>,
}

/// The transport private key, checked.
struct Transport {
    key: ObjectHandle,
    label: String,
    modulus: Vec<u8>,
    exponent: Vec<u8>,
    bits: usize,
}

impl Transport {
    /// Length of an RSA ciphertext under this key.
    fn modulus_len(&self) -> usize {
        self.modulus.len()
    }
}

impl Importer {
    /// Loads the token's module (or takes this process's handle on it); touches no token.
    /// `cfg.key_label` is not used: each call names the root key label it is about.
    pub fn open(
        tenant: &str,
        cfg: &Pkcs11Config,
        pin: Zeroizing<String>,
        lock_dir: &Path,
    ) -> Result<Self, BackendError> {
        // As in `Pkcs11RootKey::open`: read by the module in C_Initialize.
        for (name, value) in &cfg.module_env {
            std::env::set_var(name, value);
        }
        let token_lock =
            TokenLock::open(&TokenLock::path(lock_dir, &cfg.module, cfg.softhsm2_conf.as_deref()))?;
        let pkcs11 = library(&cfg.module, cfg.softhsm2_conf.as_deref())?;
        Ok(Self {
            tenant: tenant.to_owned(),
            module: cfg.module.clone(),
            token_label: cfg.token_label.clone(),
            pkcs11,
            pin: AuthPin::from(pin.as_str()),
            token_lock,
        })
    }

    /// Returns the transport public key of the root key labelled `key_label`, generating the
    /// pair on first use: RSA-3072, e = 65537, both halves token objects labelled
    /// `<key_label>-transport`; the private half private, sensitive, never extractable, and
    /// allowed to unwrap and nothing else. Calling again returns the same key.
    ///
    /// Refuses a transport key found on the token that is smaller than 3072 bits, may leave
    /// the token or may not unwrap, and a public half found without its private half.
    pub fn transport_key(&self, key_label: &str) -> Result<TransportKey, BackendError> {
        let label = transport_label(key_label);
        let admin = self.admin()?;
        let s = &admin.session;
        let privates = self.find(s, ObjectClass::PRIVATE_KEY, &label)?;
        let (key, created) = match privates[..] {
            [key] => (key, false),
            [] => {
                if !self.find(s, ObjectClass::PUBLIC_KEY, &label)?.is_empty() {
                    return Err(BackendError::Config(format!(
                        "token {:?} holds a public key labelled {label:?} but not its private key: \
                         delete it, or import under another root key label",
                        self.token_label
                    )));
                }
                let (_, private) = s
                    .generate_key_pair(
                        &Mechanism::RsaPkcsKeyPairGen,
                        &transport_public_template(&label),
                        &transport_private_template(&label),
                    )
                    .map_err(|e| self.failed(&format!("generate transport key pair {label:?}"), &e))?;
                tracing::info!(tenant = %self.tenant, token = %self.token_label, key = %label,
                    "created transport key pair (RSA-{TRANSPORT_KEY_BITS}, unwrap only, non-extractable)");
                (private, true)
            }
            _ => return Err(self.several("RSA private keys", &label)),
        };
        let transport = self.check_transport(s, key, &label)?;
        let algorithms = self.accepted_algorithms(&admin, &transport)?;
        let der = spki_der(&transport.modulus, &transport.exponent);
        Ok(TransportKey {
            label,
            pem: pem("PUBLIC KEY", &der),
            sha256: hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &der)),
            bits: transport.bits,
            created,
            algorithms,
        })
    }

    /// Unwraps `wrapped` (see [`WrappingAlgorithm`]) with the transport key of `key_label`
    /// into a new AES-256 root key labelled `key_label`: a token object, private, sensitive,
    /// not extractable, allowed to encrypt and decrypt and nothing else. The key material is
    /// never in this process's memory.
    ///
    /// Refuses, creating nothing: a missing transport key, a length that does not match the
    /// algorithm, a label that any object on the token already has (a root key is never
    /// replaced), material that does not unwrap (RSA-OAEP padding, KWP integrity), key
    /// material that is not 32 bytes, and an algorithm the token does not implement.
    pub fn import_root_key(
        &self,
        key_label: &str,
        algorithm: WrappingAlgorithm,
        wrapped: &[u8],
    ) -> Result<(), BackendError> {
        let label = transport_label(key_label);
        let token = &self.token_label;
        let admin = self.admin()?;
        let s = &admin.session;
        let key = match self.find(s, ObjectClass::PRIVATE_KEY, &label)?[..] {
            [key] => key,
            [] => {
                return Err(BackendError::Config(format!(
                    "no transport key {label:?} on token {token:?}: get the transport public key first \
                     (kekctl root import-key) and wrap the key material under it"
                )))
            }
            _ => return Err(self.several("RSA private keys", &label)),
        };
        let transport = self.check_transport(s, key, &label)?;

        let expected = algorithm.wrapped_len(transport.modulus_len());
        if wrapped.len() != expected {
            let hint = WrappingAlgorithm::ALL
                .into_iter()
                .find(|a| a.is_rsa_aes() != algorithm.is_rsa_aes() && a.hash() == algorithm.hash())
                .filter(|a| a.wrapped_len(transport.modulus_len()) == wrapped.len())
                .map(|a| format!(" (that is the length of the other layout, {a}: is the algorithm right?)"))
                .unwrap_or_default();
            return Err(BackendError::Config(format!(
                "wrapped key material is {} bytes, but {algorithm} of a {KEK_LEN}-byte key under the \
                 {}-bit transport key {label:?} is {expected} bytes{hint}",
                wrapped.len(),
                transport.bits,
            )));
        }

        let taken = s
            .find_objects(&[Attribute::Token(true), Attribute::Label(key_label.as_bytes().to_vec())])
            .map_err(|e| self.failed("search for objects with the new root key label", &e))?;
        if !taken.is_empty() {
            return Err(BackendError::Config(format!(
                "token {token:?} already has an object labelled {key_label:?}: a root key is never \
                 replaced; import under a new label"
            )));
        }

        let rsa_aes = if algorithm.is_rsa_aes() {
            match self.rsa_aes_unwrap(admin.slot)? {
                Some(how) => Some(how),
                None => {
                    return Err(BackendError::Config(format!(
                        "token {token:?} implements neither CKM_RSA_AES_KEY_WRAP nor AES key wrap with \
                         padding (CKM_AES_KEY_WRAP_KWP, CKM_AES_KEY_WRAP_PAD), which {algorithm} needs: \
                         use {} instead",
                        algorithm.plain()
                    )))
                }
            }
        } else {
            None
        };

        let oaep = oaep(algorithm.hash());
        let template = imported_root_key_template(key_label);
        let (rsa_part, kwp_part) = wrapped.split_at(transport.modulus_len());
        let created = if rsa_aes == Some(RsaAesUnwrap::Native) {
            let oaep_params = oaep_params(algorithm.hash());
            let params = RsaAesKeyWrapParams::new(&oaep_params);
            let mechanism = Mechanism::VendorDefined(VendorDefinedMechanism::new(
                unnamed_mechanism(CKM_RSA_AES_KEY_WRAP),
                Some(&params),
            ));
            s.unwrap_key(&mechanism, transport.key, wrapped, &template)
                .map_err(|e| self.unwrap_failed(s, algorithm, Step::RsaAes, &label, &e))?
        } else if let Some(RsaAesUnwrap::TwoStep(kwp)) = rsa_aes {
            let ephemeral = s
                .unwrap_key(&oaep, transport.key, rsa_part, &ephemeral_template())
                .map_err(|e| self.unwrap_failed(s, algorithm, Step::Oaep, &label, &e))?;
            let ephemeral = Destroy::new(s, ephemeral, "the ephemeral AES key (a session object)");
            // Tokens that leave CKA_VALUE_LEN at 0 on unwrap (SoftHSM 2.6.1) fail the KWP step
            // below instead if this is not an AES key.
            let len = self.value_len(s, ephemeral.handle(), "the ephemeral AES key")?;
            if len != 0 && !EPHEMERAL_LENS.contains(&len) {
                return Err(BackendError::Config(format!(
                    "the RSA-OAEP part of the {algorithm} material holds {len} bytes, \
                     not an AES key (16, 24 or 32 bytes)"
                )));
            }
            let created = s
                .unwrap_key(&kwp.mechanism(), ephemeral.handle(), kwp_part, &template)
                .map_err(|e| self.unwrap_failed(s, algorithm, Step::Kwp(kwp), &label, &e))?;
            drop(ephemeral);
            created
        } else {
            s.unwrap_key(&oaep, transport.key, rsa_part, &template)
                .map_err(|e| self.unwrap_failed(s, algorithm, Step::Oaep, &label, &e))?
        };
        // Until it is known to be a whole AES-256 key, the new object goes again on any exit.
        let created = Destroy::new(s, created, key_label);
        let len = match self.value_len(s, created.handle(), "the imported key")? {
            // SoftHSM 2.6.1 sets CKA_VALUE but leaves CKA_VALUE_LEN at 0 on unwrap. The
            // length is then known to the AES-KWP block (8 bytes): from the input length in
            // the RSA-AES layout (40 bytes of KWP hold 25 to 32), by measuring otherwise.
            0 if algorithm.is_rsa_aes() => KeyLen::UpTo(kwp_part.len() - 8),
            0 => KeyLen::UpTo(self.measure_oaep_payload(s, admin.slot, &transport, algorithm, rsa_part)?),
            n => KeyLen::Exact(n),
        };
        if !len.may_be(KEK_LEN) {
            return Err(BackendError::Config(format!(
                "the {algorithm} material holds {len}; a root key is AES-256 ({KEK_LEN} bytes): \
                 nothing was imported"
            )));
        }
        // Also proves an AES key length where only an 8-byte range is known: of 25 to 32
        // bytes, only 32 make an AES key.
        self.check_encrypts(s, created.handle(), algorithm)?;
        created.keep();
        tracing::info!(tenant = %self.tenant, token = %token, key = %key_label, transport = %label,
            algorithm = %algorithm, "imported root key (AES-256, non-extractable)");
        Ok(())
    }

    fn admin(&self) -> Result<Admin<'_>, BackendError> {
        let lock = self.token_lock.acquire()?;
        let token = &self.token_label;
        let slot = match find_tokens(&self.pkcs11, token).map_err(|e| self.failed("list tokens", &e))?[..] {
            [slot] => slot,
            [] => {
                return Err(BackendError::Config(format!(
                    "no token labelled {token:?} in PKCS#11 module {}",
                    self.module.display()
                )))
            }
            _ => {
                return Err(BackendError::Config(format!(
                    "several tokens are labelled {token:?} in PKCS#11 module {}: labels must be unique",
                    self.module.display()
                )))
            }
        };
        let session =
            self.pkcs11.open_rw_session(slot).map_err(|e| self.failed("open a read-write session", &e))?;
        login(&session, &self.pin).map_err(|e| self.failed("log in with the configured user PIN", &e))?;
        Ok(Admin { session, slot, _lock: lock })
    }

    fn find(&self, s: &Session, class: ObjectClass, label: &str) -> Result<Vec<ObjectHandle>, BackendError> {
        s.find_objects(&[
            Attribute::Token(true),
            Attribute::Class(class),
            Attribute::KeyType(KeyType::RSA),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .map_err(|e| self.failed(&format!("search for transport key {label:?}"), &e))
    }

    /// Reads the transport private key's public numbers, refusing one unfit for its job.
    fn check_transport(
        &self,
        s: &Session,
        key: ObjectHandle,
        label: &str,
    ) -> Result<Transport, BackendError> {
        use AttributeType as A;
        let attrs = s
            .get_attributes(key, &[A::Unwrap, A::Sensitive, A::Extractable, A::Modulus, A::PublicExponent])
            .map_err(|e| self.failed(&format!("read the attributes of transport key {label:?}"), &e))?;
        let (mut unwrap, mut sensitive, mut extractable) = (false, false, true);
        let (mut modulus, mut exponent) = (Vec::new(), Vec::new());
        for attr in attrs {
            match attr {
                Attribute::Unwrap(b) => unwrap = b,
                Attribute::Sensitive(b) => sensitive = b,
                Attribute::Extractable(b) => extractable = b,
                Attribute::Modulus(m) => modulus = strip_zeros(&m).to_vec(),
                Attribute::PublicExponent(e) => exponent = strip_zeros(&e).to_vec(),
                _ => {}
            }
        }
        let token = &self.token_label;
        if modulus.is_empty() || exponent.is_empty() {
            return Err(BackendError::Internal(format!(
                "token {token:?} returned no modulus or public exponent for transport key {label:?}"
            )));
        }
        let bits = modulus.len() * 8 - modulus[0].leading_zeros() as usize;
        let problem = if bits < TRANSPORT_KEY_BITS {
            Some(format!("is RSA-{bits}, smaller than RSA-{TRANSPORT_KEY_BITS}"))
        } else if extractable || !sensitive {
            Some("could leave the token (CKA_EXTRACTABLE true or CKA_SENSITIVE false)".to_owned())
        } else if !unwrap {
            Some("may not unwrap (CKA_UNWRAP false)".to_owned())
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(BackendError::Config(format!(
                "transport key {label:?} on token {token:?} {problem}: refusing to use it for import; \
                 delete the pair and ask for a new transport key"
            )));
        }
        Ok(Transport { key, label: label.to_owned(), modulus, exponent, bits })
    }

    /// Asks the token which algorithms it accepts with this key. What unwraps the RSA-AES
    /// layout is listed in the mechanism info (`rsa_aes_unwrap`); the OAEP hashes are not
    /// (PKCS#11 has no way to list mechanism parameters), so each is tried on a dummy
    /// ciphertext: a token that rejects the parameters answers `CKR_ARGUMENTS_BAD` or
    /// `CKR_MECHANISM_PARAM_INVALID`, one that accepts them gets as far as the padding check
    /// and fails there.
    fn accepted_algorithms(
        &self,
        admin: &Admin<'_>,
        transport: &Transport,
    ) -> Result<Vec<WrappingAlgorithm>, BackendError> {
        let kwp = self.rsa_aes_unwrap(admin.slot)?.is_some();
        // Below the modulus (its top byte is at least 0x80) and not a valid OAEP encoding:
        // RSA of it decodes to bytes whose label hash matches only by chance (2^-160 at most).
        let mut dummy = vec![0x01; transport.modulus_len()];
        dummy[0] = 0;
        let mut algorithms = Vec::new();
        for hash in [OaepHash::Sha256, OaepHash::Sha1] {
            let accepted =
                match admin.session.unwrap_key(&oaep(hash), transport.key, &dummy, &ephemeral_template()) {
                    Ok(handle) => {
                        drop(Destroy::new(&admin.session, handle, "a probe key (a session object)"));
                        true
                    }
                    Err(CkError::Pkcs11(
                        RvError::ArgumentsBad | RvError::MechanismParamInvalid | RvError::MechanismInvalid,
                        _,
                    )) => false,
                    Err(e)
                        if matches!(classify(&e), Class::Unreachable | Class::DeadSession)
                            && !rejected_by_device(&admin.session, &e) =>
                    {
                        return Err(self.failed("probe RSA-OAEP on the transport key", &e))
                    }
                    Err(_) => true,
                };
            if accepted {
                algorithms.extend(
                    WrappingAlgorithm::ALL
                        .into_iter()
                        .filter(|a| a.hash() == hash && (kwp || !a.is_rsa_aes())),
                );
            }
        }
        Ok(algorithms)
    }

    /// How this token unwraps the RSA-AES layout, if it can: `CKM_RSA_AES_KEY_WRAP`, else the
    /// two steps with its AES-KWP mechanism (module documentation).
    fn rsa_aes_unwrap(&self, slot: Slot) -> Result<Option<RsaAesUnwrap>, BackendError> {
        let native = unnamed_mechanism(CKM_RSA_AES_KEY_WRAP);
        if self.mechanism_info(slot, native, "CKM_RSA_AES_KEY_WRAP")?.is_some_and(|i| i.unwrap()) {
            return Ok(Some(RsaAesUnwrap::Native));
        }
        Ok(self.kwp(slot, |i| i.unwrap())?.map(RsaAesUnwrap::TwoStep))
    }

    /// The first AES-KWP mechanism of `Kwp::PREFERENCE` whose info satisfies `usable`.
    fn kwp(&self, slot: Slot, usable: fn(&MechanismInfo) -> bool) -> Result<Option<Kwp>, BackendError> {
        for kwp in Kwp::PREFERENCE {
            if self.mechanism_info(slot, kwp.mechanism_type(), kwp.name())?.as_ref().is_some_and(usable) {
                return Ok(Some(kwp));
            }
        }
        Ok(None)
    }

    /// `None` when the token does not implement `mechanism`.
    fn mechanism_info(
        &self,
        slot: Slot,
        mechanism: MechanismType,
        name: &str,
    ) -> Result<Option<MechanismInfo>, BackendError> {
        match self.pkcs11.get_mechanism_info(slot, mechanism) {
            Ok(info) => Ok(Some(info)),
            Err(CkError::Pkcs11(RvError::MechanismInvalid, _)) => Ok(None),
            Err(e) => Err(self.failed(&format!("read the mechanism info of {name}"), &e)),
        }
    }

    /// The length of the plain RSA-OAEP payload rounded up to a multiple of 8, for tokens
    /// that do not report the CKA_VALUE_LEN of an unwrapped key. The payload is unwrapped once
    /// more, as an extractable session key that may do nothing else, wrapped with AES-KWP
    /// under a session key generated for this, and the length read off the wrapped form.
    /// Both session keys are destroyed at once and the wrapped bytes wiped: no key value,
    /// only a ciphertext under a key that no longer exists, ever enters this process.
    fn measure_oaep_payload(
        &self,
        s: &Session,
        slot: Slot,
        transport: &Transport,
        algorithm: WrappingAlgorithm,
        rsa_part: &[u8],
    ) -> Result<usize, BackendError> {
        let Some(kwp) = self.kwp(slot, |i| i.wrap())? else {
            return Err(BackendError::Config(format!(
                "token {:?} does not report the length of an unwrapped key (CKA_VALUE_LEN), and has no \
                 AES key wrap with padding (CKM_AES_KEY_WRAP_KWP, CKM_AES_KEY_WRAP_PAD) to measure it \
                 with: cannot check that the {algorithm} material is a {KEK_LEN}-byte key; nothing was \
                 imported",
                self.token_label
            )));
        };
        let payload = s
            .unwrap_key(&oaep(algorithm.hash()), transport.key, rsa_part, &measured_template())
            .map_err(|e| self.unwrap_failed(s, algorithm, Step::Oaep, &transport.label, &e))?;
        let payload = Destroy::new(s, payload, "the measured key material (a session object)");
        let kek = s
            .generate_key(&Mechanism::AesKeyGen, &measuring_key_template())
            .map_err(|e| self.failed("generate a session key to measure the key material", &e))?;
        let kek = Destroy::new(s, kek, "the measuring key (a session object)");
        let wrapped = s
            .wrap_key(&kwp.mechanism(), kek.handle(), payload.handle())
            .map(Zeroizing::new)
            .map_err(|e| self.failed(&format!("measure the key material (C_WrapKey, {})", kwp.name()), &e))?;
        Ok(wrapped.len().saturating_sub(8))
    }

    /// Encrypts a block with the new key, as the canary does: a token that took a value of
    /// another length than 16, 24 or 32 bytes for an AES key fails here.
    fn check_encrypts(
        &self,
        s: &Session,
        key: ObjectHandle,
        algorithm: WrappingAlgorithm,
    ) -> Result<(), BackendError> {
        let mut iv = [0u8; IV_LEN];
        aws_lc_rs::rand::fill(&mut iv)
            .map_err(|_| BackendError::Internal("the system random generator failed".into()))?;
        let result = GcmParams::new(&mut iv, CHECK_AAD, TAG_BITS)
            .and_then(|params| s.encrypt(&Mechanism::AesGcm(params), key, &[0u8; 16]));
        match result {
            Ok(_) => Ok(()),
            Err(e) if matches!(classify(&e), Class::Unreachable | Class::DeadSession) => {
                Err(self.failed("try the imported key", &e))
            }
            Err(e) => Err(BackendError::Config(format!(
                "the {algorithm} material does not make a working AES key ({}): nothing was imported",
                describe(&e)
            ))),
        }
    }

    fn value_len(&self, s: &Session, key: ObjectHandle, what: &str) -> Result<usize, BackendError> {
        let attrs = s
            .get_attributes(key, &[AttributeType::ValueLen])
            .map_err(|e| self.failed(&format!("read the length of {what}"), &e))?;
        match attrs[..] {
            [Attribute::ValueLen(n)] => Ok(usize::from(n)),
            _ => Err(BackendError::Internal(format!(
                "token {:?} returned no CKA_VALUE_LEN for {what}",
                self.token_label
            ))),
        }
    }

    /// `s`: the session `C_UnwrapKey` failed on, to tell the material's failures from the
    /// device's (`rejected_by_device`).
    fn unwrap_failed(
        &self,
        s: &Session,
        algorithm: WrappingAlgorithm,
        step: Step,
        label: &str,
        e: &CkError,
    ) -> BackendError {
        use RvError as R;
        let token = &self.token_label;
        let CkError::Pkcs11(rv, _) = e else {
            return self.failed(&format!("unwrap the {algorithm} material"), e);
        };
        let rv = match rv {
            // Read as the token's verdict on the material, like the codes below.
            R::DeviceError if rejected_by_device(s, e) => &R::EncryptedDataInvalid,
            rv => rv,
        };
        match (step, rv) {
            (Step::Oaep, R::ArgumentsBad | R::MechanismParamInvalid | R::MechanismInvalid) => {
                let instead = match algorithm.hash() {
                    OaepHash::Sha256 => format!(
                        " (SoftHSM 2.6.1 implements RSA-OAEP with SHA-1 only): wrap the key material \
                         with {} instead",
                        algorithm.with_sha1()
                    ),
                    OaepHash::Sha1 => String::new(),
                };
                BackendError::Config(format!(
                    "token {token:?} does not accept the RSA-OAEP parameters of {algorithm} ({}){instead}",
                    describe(e)
                ))
            }
            (Step::Kwp(kwp), R::MechanismInvalid | R::MechanismParamInvalid) => {
                BackendError::Config(format!(
                    "token {token:?} refuses {} ({}), which {algorithm} needs: use {} instead",
                    kwp.name(),
                    describe(e),
                    algorithm.plain()
                ))
            }
            (Step::RsaAes, R::ArgumentsBad | R::MechanismParamInvalid | R::MechanismInvalid) => {
                BackendError::Config(format!(
                    "token {token:?} does not accept CKM_RSA_AES_KEY_WRAP with the RSA-OAEP parameters of \
                     {algorithm} ({}): use {} instead",
                    describe(e),
                    algorithm.plain()
                ))
            }
            (
                _,
                R::GeneralError
                | R::EncryptedDataInvalid
                | R::EncryptedDataLenRange
                | R::WrappedKeyInvalid
                | R::WrappedKeyLenRange
                | R::DataInvalid
                | R::DataLenRange,
            ) => {
                limited_debug!(tenant = %self.tenant, token = %token, error = %describe(e), ?step,
                    "key material did not unwrap");
                let what = match step {
                    Step::Oaep => format!(
                        "its RSA-OAEP decryption under transport key {label:?} failed (damaged, wrapped \
                         under another key, or with another algorithm than {algorithm})"
                    ),
                    Step::Kwp(_) => "its AES key wrap (RFC 5649) integrity check failed (damaged, or not \
                                     wrapped under the ephemeral key of its RSA-OAEP part)"
                        .to_owned(),
                    Step::RsaAes => format!(
                        "its RSA-OAEP decryption under transport key {label:?} or its AES key wrap \
                         (RFC 5649) integrity check failed (damaged, wrapped under another key, or with \
                         another algorithm than {algorithm})"
                    ),
                };
                BackendError::Config(format!("the {algorithm} key material does not unwrap: {what}"))
            }
            _ => self.failed(&format!("unwrap the {algorithm} material"), e),
        }
    }

    fn several(&self, what: &str, label: &str) -> BackendError {
        BackendError::Config(format!(
            "several {what} are labelled {label:?} on token {:?}: refusing to guess which is the transport key",
            self.token_label
        ))
    }

    /// As `Pkcs11RootKey::open` maps failures, except that nothing here is `Refused` (which
    /// would flush the service's cached KEKs): an unexpected answer is `Internal`.
    fn failed(&self, what: &str, e: &CkError) -> BackendError {
        let detail = format!("token {:?}: cannot {what}: {}", self.token_label, describe(e));
        match classify(e) {
            Class::Unreachable | Class::DeadSession | Class::Busy => BackendError::Unreachable(detail),
            Class::Other => BackendError::Internal(detail),
            Class::NotLoggedIn | Class::StaleKey | Class::Refused | Class::DataInvalid => {
                BackendError::Config(detail)
            }
        }
    }
}

/// What is known of the length of unwrapped key material.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyLen {
    Exact(usize),
    /// Rounded up to the AES-KWP block: from `n - 7` to `n` bytes.
    UpTo(usize),
}

impl KeyLen {
    fn may_be(self, len: usize) -> bool {
        match self {
            Self::Exact(n) => n == len,
            Self::UpTo(n) => n.saturating_sub(7) <= len && len <= n,
        }
    }
}

impl fmt::Display for KeyLen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Exact(n) => write!(f, "a {n}-byte key"),
            Self::UpTo(n) => write!(f, "a key of {} to {n} bytes", n.saturating_sub(7).max(1)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// RSA-OAEP with the transport key.
    Oaep,
    /// AES-KWP with the ephemeral key.
    Kwp(Kwp),
    /// Both at once: `CKM_RSA_AES_KEY_WRAP` with the transport key.
    RsaAes,
}

/// How a token unwraps the RSA-AES layout (module documentation, "The two layouts").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RsaAesUnwrap {
    /// `CKM_RSA_AES_KEY_WRAP`, in one call.
    Native,
    /// RSA-OAEP into a session key, then this AES-KWP mechanism under it.
    TwoStep(Kwp),
}

/// An AES key wrap with padding (RFC 5649) mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kwp {
    /// `CKM_AES_KEY_WRAP_KWP` (0x210B): RFC 5649 in PKCS#11 3.0 (kryoptic).
    Kwp,
    /// `CKM_AES_KEY_WRAP_PAD` (0x210A): RFC 5649 in SoftHSM2, which has no 0x210B.
    Pad,
}

impl Kwp {
    /// Tried in this order: 0x210B is RFC 5649 wherever it exists, 0x210A only in SoftHSM2.
    const PREFERENCE: [Self; 2] = [Self::Kwp, Self::Pad];

    fn name(self) -> &'static str {
        match self {
            Self::Kwp => "CKM_AES_KEY_WRAP_KWP",
            Self::Pad => "CKM_AES_KEY_WRAP_PAD",
        }
    }

    fn mechanism_type(self) -> MechanismType {
        match self {
            Self::Kwp => unnamed_mechanism(CKM_AES_KEY_WRAP_KWP),
            Self::Pad => MechanismType::AES_KEY_WRAP_PAD,
        }
    }

    /// Without parameters: the default initial value of RFC 5649 (A65959A6).
    fn mechanism(self) -> Mechanism<'static> {
        match self {
            Self::Kwp => {
                Mechanism::VendorDefined(VendorDefinedMechanism::new::<()>(self.mechanism_type(), None))
            }
            Self::Pad => Mechanism::AesKeyWrapPad,
        }
    }
}

/// Whether `e`, from `C_UnwrapKey` on `s`, is the token refusing the material although it
/// says `CKR_DEVICE_ERROR`: kryoptic (1.5.4) reports every failure of OpenSSL so, RSA-OAEP
/// decoding and AES-KWP integrity failures included. The session is then asked something
/// cheap: a token that answers is not broken, and the failure was the material's. A token
/// that is really down (or cut, in the tests' outage proxy) fails that too.
fn rejected_by_device(s: &Session, e: &CkError) -> bool {
    matches!(e, CkError::Pkcs11(RvError::DeviceError, Function::UnwrapKey)) && s.get_session_info().is_ok()
}

/// A mechanism that cryptoki 0.12 has no name for, by its `CKM_*` value.
#[allow(unsafe_code)]
fn unnamed_mechanism(value: c_ulong) -> MechanismType {
    // SAFETY: `MechanismType` is `#[repr(transparent)]` over its one field, a
    // `CK_MECHANISM_TYPE` (`c_ulong`): cryptoki declares it so that a vector of
    // `CK_MECHANISM_TYPE` reads as one of `MechanismType`. Any value is a valid
    // `CK_MECHANISM_TYPE` (a token answers `CKR_MECHANISM_INVALID` to one it does not know);
    // the `CKM_VENDOR_DEFINED` floor of `MechanismType::new_vendor_defined` is a policy of the
    // constructor, not an invariant of the type.
    unsafe { std::mem::transmute::<c_ulong, MechanismType>(value) }
}

/// `CK_RSA_AES_KEY_WRAP_PARAMS`, borrowing the OAEP parameters it points to.
#[repr(C)]
struct RsaAesKeyWrapParams<'a> {
    // Read by the token, through the pointer cryptoki passes it.
    #[allow(dead_code)]
    aes_key_bits: c_ulong,
    #[allow(dead_code)]
    oaep: *const PkcsOaepParams<'static>,
    _oaep: PhantomData<&'a PkcsOaepParams<'static>>,
}

impl<'a> RsaAesKeyWrapParams<'a> {
    fn new(oaep: &'a PkcsOaepParams<'static>) -> Self {
        Self { aes_key_bits: RSA_AES_KEY_BITS, oaep, _oaep: PhantomData }
    }
}

/// Destroys an object on drop unless kept: the ephemeral key always, the imported key on
/// every early return.
struct Destroy<'s> {
    session: &'s Session,
    handle: Option<ObjectHandle>,
    /// For the log, should destroying fail: a label, or what the object was.
    what: &'s str,
}

impl<'s> Destroy<'s> {
    fn new(session: &'s Session, handle: ObjectHandle, what: &'s str) -> Self {
        Self { session, handle: Some(handle), what }
    }

    fn handle(&self) -> ObjectHandle {
        self.handle.expect("only `keep` takes the handle, and it consumes self")
    }

    fn keep(mut self) -> ObjectHandle {
        self.handle.take().expect("only `keep` takes the handle, and it consumes self")
    }
}

impl Drop for Destroy<'_> {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            if let Err(e) = self.session.destroy_object(handle) {
                tracing::error!(object = self.what, error = %describe(&e),
                    "cannot destroy an object that import created: delete it from the token by hand");
            }
        }
    }
}

fn oaep(hash: OaepHash) -> Mechanism<'static> {
    Mechanism::RsaPkcsOaep(oaep_params(hash))
}

/// RSA-OAEP with `hash`, MGF1 with the same hash, and an empty label.
fn oaep_params(hash: OaepHash) -> PkcsOaepParams<'static> {
    let (hash, mgf) = match hash {
        OaepHash::Sha256 => (MechanismType::SHA256, PkcsMgfType::MGF1_SHA256),
        OaepHash::Sha1 => (MechanismType::SHA1, PkcsMgfType::MGF1_SHA1),
    };
    PkcsOaepParams::new(hash, mgf, PkcsOaepSource::empty())
}

/// Every usage attribute explicit (token defaults differ): the public half may encrypt and
/// wrap (what a customer's PKCS#11 tooling would do with it), nothing else.
fn transport_public_template(label: &str) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::KeyType(KeyType::RSA),
        Attribute::ModulusBits(Ulong::new(TRANSPORT_KEY_BITS as _)),
        Attribute::PublicExponent(PUBLIC_EXPONENT.to_vec()),
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Encrypt(true),
        Attribute::Wrap(true),
        Attribute::Verify(false),
        Attribute::VerifyRecover(false),
        Attribute::Derive(false),
        Attribute::Modifiable(false),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(label.as_bytes().to_vec()),
    ]
}

/// The private half unwraps and does nothing else: no decrypt (which would hand unwrapped
/// material to the caller), no signing.
fn transport_private_template(label: &str) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(KeyType::RSA),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Unwrap(true),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::SignRecover(false),
        Attribute::Derive(false),
        Attribute::Modifiable(false),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(label.as_bytes().to_vec()),
    ]
}

/// The template of a generated root key, less `CKA_VALUE_LEN`: the length comes from the
/// unwrapped material (SoftHSM 2.6.1 answers `CKR_ATTRIBUTE_READ_ONLY` to it in an unwrap
/// template) and is checked afterwards. `CKA_MODIFIABLE` goes last: SoftHSM 2.6.1 applies an
/// unwrap template in order to the new object, and refuses every attribute after
/// `CKA_MODIFIABLE = false` (CKA_LABEL, say) with `CKR_ATTRIBUTE_READ_ONLY`.
fn imported_root_key_template(label: &str) -> Vec<Attribute> {
    let mut template = root_key_template(label);
    template.retain(|a| !matches!(a, Attribute::ValueLen(_) | Attribute::Modifiable(_)));
    template.push(Attribute::Modifiable(false));
    template
}

/// The ephemeral AES key of the RSA-AES layout: a session object that may only unwrap.
fn ephemeral_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Unwrap(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
    ]
}

/// The payload measured by `measure_oaep_payload`: may be wrapped, nothing else.
fn measured_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
    ]
}

/// The session key that wraps the measured payload: wraps, nothing else.
fn measuring_key_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(Ulong::new(KEK_LEN as _)),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(true),
        Attribute::Unwrap(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
    ]
}

fn strip_zeros(bytes: &[u8]) -> &[u8] {
    let first = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    &bytes[first..]
}

/// DER of `SubjectPublicKeyInfo { rsaEncryption, RSAPublicKey { n, e } }` (RFC 8017 A.1.1,
/// RFC 5280 4.1), from big-endian unsigned `modulus` and `exponent`.
fn spki_der(modulus: &[u8], exponent: &[u8]) -> Vec<u8> {
    /// AlgorithmIdentifier { rsaEncryption (1.2.840.113549.1.1.1), NULL }.
    const RSA_ENCRYPTION: [u8; 15] =
        [0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00];
    let rsa_public_key = der(0x30, &[der_uint(modulus), der_uint(exponent)].concat());
    let bit_string = der(0x03, &[&[0u8][..], &rsa_public_key].concat()); // 0 unused bits
    der(0x30, &[&RSA_ENCRYPTION[..], &bit_string].concat())
}

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let significant = strip_zeros(&bytes);
        out.push(0x80 | significant.len() as u8);
        out.extend_from_slice(significant);
    }
    out.extend_from_slice(content);
    out
}

/// A non-negative INTEGER: minimal, with a leading zero byte when the top bit is set.
fn der_uint(value: &[u8]) -> Vec<u8> {
    let value = strip_zeros(value);
    let mut content = Vec::with_capacity(value.len() + 1);
    if value.first().is_none_or(|&b| b & 0x80 != 0) {
        content.push(0);
    }
    content.extend_from_slice(value);
    der(0x02, &content)
}

fn pem(kind: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {kind}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {kind}-----\n"));
    out
}
