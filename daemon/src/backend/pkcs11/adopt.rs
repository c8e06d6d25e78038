//! Which key on a token kekd adopts as a tenant's root key (DESIGN §9).
//!
//! A root key must stay in its HSM: a private object (usable only after login with the
//! PIN), sensitive (its value never read out), not extractable (never wrapped out) and
//! AES-256. A key that falls short is refused at start, with an error naming each
//! attribute that is wrong, unless the tenant set `allow_exportable_root` for a key it
//! escrows on purpose; the exception is then kept, logged at each start and shown by
//! `kekctl status`. A key that cannot do what a root key does (encrypt and decrypt with
//! `CKM_AES_GCM`) is refused either way, and said so, rather than left to fail its first
//! `C_EncryptInit` with `CKR_MECHANISM_INVALID`.
//!
//! Attributes a token does not report count against the key (a key whose CKA_PRIVATE is
//! unknown is not known to be private), except CKA_VALUE_LEN: SoftHSM 2.6.1 leaves it unset
//! on unwrapped keys, BYOK imports included, whose length `import` checks itself.

use cryptoki::error::Error as CkError;
use cryptoki::mechanism::MechanismType;
use cryptoki::object::{Attribute, AttributeType, ObjectHandle};
use cryptoki::session::Session;

use super::super::KEK_LEN;

/// One way a key falls short of a root key; the message names the attribute.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Shortfall {
    #[error("CKA_PRIVATE is false: a public object, usable without the PIN by whoever can open the token")]
    NotPrivate,
    #[error("CKA_EXTRACTABLE is true: the key can be wrapped and taken out of the token")]
    Extractable,
    #[error("CKA_SENSITIVE is false: the key's value can be read out of the token")]
    NotSensitive,
    #[error("CKA_VALUE_LEN is {bytes}: an AES-{} key, not AES-256", bytes * 8)]
    NotAes256 { bytes: usize },
    #[error("CKA_ENCRYPT is false: the key may not encrypt, and kekd seals KEKs with C_Encrypt")]
    NoEncrypt,
    #[error("CKA_DECRYPT is false: the key may not decrypt, and kekd unseals KEKs with C_Decrypt")]
    NoDecrypt,
    #[error("CKA_ALLOWED_MECHANISMS does not list CKM_AES_GCM, the mechanism kekd seals KEKs with")]
    NoAesGcm,
}

impl Shortfall {
    /// Whether `allow_exportable_root` excuses it: the key works, but can leave the HSM
    /// (or, AES-128, is weaker than promised). The others make the key unusable.
    pub fn escrowable(&self) -> bool {
        matches!(self, Self::NotPrivate | Self::Extractable | Self::NotSensitive | Self::NotAes256 { .. })
    }
}

/// A key kekd will not adopt as a root key.
#[derive(Debug, thiserror::Error)]
#[error("root key {key:?} on token {token:?} is refused: {}{}", list(shortfalls), advice(tenant, shortfalls))]
pub struct Rejected {
    pub tenant: String,
    pub key: String,
    pub token: String,
    /// Every shortfall found, escrowable or not, in the order of [`assess`].
    pub shortfalls: Vec<Shortfall>,
}

fn list(shortfalls: &[Shortfall]) -> String {
    shortfalls.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

fn advice(tenant: &str, shortfalls: &[Shortfall]) -> String {
    if shortfalls.iter().all(Shortfall::escrowable) {
        format!(
            ". A root key must stay in its HSM (CKA_PRIVATE and CKA_SENSITIVE true, CKA_EXTRACTABLE \
             false, AES-256): make one that does, or, for a key escrowed on purpose, set \
             tenants.{tenant}.pkcs11.allow_exportable_root = true"
        )
    } else {
        ". kekd seals KEKs with CKM_AES_GCM (C_Encrypt) and unseals them with C_Decrypt: make a key \
         that may do both"
            .to_owned()
    }
}

/// Reads the attributes that decide, and lists what falls short, in a fixed order.
pub fn assess(session: &Session, key: ObjectHandle) -> Result<Vec<Shortfall>, CkError> {
    use AttributeType as A;
    let attrs = session.get_attributes(
        key,
        &[
            A::Private,
            A::Extractable,
            A::Sensitive,
            A::ValueLen,
            A::Encrypt,
            A::Decrypt,
            A::AllowedMechanisms,
        ],
    )?;
    Ok(shortfalls(&attrs))
}

/// [`assess`] on attributes already read; what is missing counts against the key (module
/// documentation).
pub fn shortfalls(attrs: &[Attribute]) -> Vec<Shortfall> {
    let (mut private, mut extractable, mut sensitive, mut len) = (false, true, false, 0);
    let (mut encrypt, mut decrypt, mut gcm) = (false, false, true);
    for attr in attrs {
        match attr {
            Attribute::Private(b) => private = *b,
            Attribute::Extractable(b) => extractable = *b,
            Attribute::Sensitive(b) => sensitive = *b,
            Attribute::ValueLen(n) => len = usize::from(*n),
            Attribute::Encrypt(b) => encrypt = *b,
            Attribute::Decrypt(b) => decrypt = *b,
            // Tokens (SoftHSM2 among them) read an empty list as no restriction.
            Attribute::AllowedMechanisms(m) => gcm = m.is_empty() || m.contains(&MechanismType::AES_GCM),
            _ => {}
        }
    }
    let mut found = Vec::new();
    if !private {
        found.push(Shortfall::NotPrivate);
    }
    if extractable {
        found.push(Shortfall::Extractable);
    }
    if !sensitive {
        found.push(Shortfall::NotSensitive);
    }
    // 0: not reported (see the module documentation).
    if len != KEK_LEN && len != 0 {
        found.push(Shortfall::NotAes256 { bytes: len });
    }
    if !encrypt {
        found.push(Shortfall::NoEncrypt);
    }
    if !decrypt {
        found.push(Shortfall::NoDecrypt);
    }
    if !gcm {
        found.push(Shortfall::NoAesGcm);
    }
    found
}

/// What kekd does with a key: adopt it, with the exceptions the tenant allowed (empty for
/// a key that stays in its HSM), or refuse it.
pub fn decide(
    tenant: &str,
    key: &str,
    token: &str,
    shortfalls: Vec<Shortfall>,
    allow_exportable_root: bool,
) -> Result<Vec<Shortfall>, Rejected> {
    let excused = allow_exportable_root && shortfalls.iter().all(Shortfall::escrowable);
    if shortfalls.is_empty() || excused {
        Ok(shortfalls)
    } else {
        Err(Rejected { tenant: tenant.to_owned(), key: key.to_owned(), token: token.to_owned(), shortfalls })
    }
}

#[cfg(test)]
mod tests {
    use cryptoki::types::Ulong;

    use super::*;

    fn good() -> Vec<Attribute> {
        vec![
            Attribute::Private(true),
            Attribute::Extractable(false),
            Attribute::Sensitive(true),
            Attribute::ValueLen(Ulong::new(32)),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::AllowedMechanisms(vec![]),
        ]
    }

    fn with(change: Attribute) -> Vec<Shortfall> {
        let attrs: Vec<_> = good()
            .into_iter()
            .map(|a| if a.attribute_type() == change.attribute_type() { change.clone() } else { a })
            .collect();
        shortfalls(&attrs)
    }

    #[test]
    fn each_attribute_is_named_on_its_own() {
        assert_eq!(shortfalls(&good()), []);
        assert_eq!(with(Attribute::Private(false)), [Shortfall::NotPrivate]);
        assert_eq!(with(Attribute::Extractable(true)), [Shortfall::Extractable]);
        assert_eq!(with(Attribute::Sensitive(false)), [Shortfall::NotSensitive]);
        assert_eq!(with(Attribute::ValueLen(Ulong::new(16))), [Shortfall::NotAes256 { bytes: 16 }]);
        assert_eq!(with(Attribute::ValueLen(Ulong::new(0))), [], "not reported on unwrapped keys");
        assert_eq!(with(Attribute::Encrypt(false)), [Shortfall::NoEncrypt]);
        assert_eq!(with(Attribute::Decrypt(false)), [Shortfall::NoDecrypt]);
        let cbc = Attribute::AllowedMechanisms(vec![MechanismType::AES_CBC]);
        assert_eq!(with(cbc), [Shortfall::NoAesGcm]);
        let also_gcm = Attribute::AllowedMechanisms(vec![MechanismType::AES_CBC, MechanismType::AES_GCM]);
        assert_eq!(with(also_gcm), []);
        assert_eq!(
            shortfalls(&[]),
            [
                Shortfall::NotPrivate,
                Shortfall::Extractable,
                Shortfall::NotSensitive,
                Shortfall::NoEncrypt,
                Shortfall::NoDecrypt
            ],
            "what a token does not report counts against the key"
        );
        let texts: Vec<String> =
            [Shortfall::NoEncrypt, Shortfall::NoDecrypt].iter().map(ToString::to_string).collect();
        assert!(texts[0].contains("CKA_ENCRYPT") && texts[1].contains("CKA_DECRYPT"), "{texts:?}");
    }

    #[test]
    fn escrow_excuses_a_key_that_can_leave_but_not_one_that_cannot_work() {
        let leaves = vec![Shortfall::Extractable, Shortfall::NotSensitive];
        let e = decide("acme", "root", "tok", leaves.clone(), false).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("CKA_EXTRACTABLE") && msg.contains("CKA_SENSITIVE is false"), "{msg}");
        assert!(msg.contains("tenants.acme.pkcs11.allow_exportable_root = true"), "{msg}");
        assert_eq!(decide("acme", "root", "tok", leaves.clone(), true).unwrap(), leaves);

        let broken = vec![Shortfall::Extractable, Shortfall::NoDecrypt];
        let e = decide("acme", "root", "tok", broken, true).unwrap_err();
        assert!(!e.to_string().contains("allow_exportable_root"), "no use suggesting it: {e}");
        assert_eq!(decide("acme", "root", "tok", vec![], false).unwrap(), []);
    }
}
