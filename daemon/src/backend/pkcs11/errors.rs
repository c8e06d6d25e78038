//! What a PKCS#11 return value means for the service: retry, flush, or give up.

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};

/// The kinds of failure the backend reacts to differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// The session is gone (closed, or invalidated by a token reset), or in a state only
    /// another user of its handle could have put it in: its siblings probably are too. The
    /// backend starts over (see [`Class::starts_over`]) and retries once.
    DeadSession,
    /// The token or device is absent or failing, or the module lost its state (not
    /// initialised, CKR_GENERAL_ERROR). The backend starts over and retries once, then
    /// reports it unreachable: cached KEKs keep serving, clients may retry.
    Unreachable,
    /// The token has no session to spare (CKR_SESSION_COUNT): wait for one of ours to be
    /// returned, not an error.
    Busy,
    /// The login went away under us (another application logged out, token reset).
    NotLoggedIn,
    /// The cached key handle is stale: the key must be found again by label.
    StaleKey,
    /// The token answered no, definitively: cached KEKs must be flushed.
    Refused,
    /// The ciphertext does not authenticate under the key.
    DataInvalid,
    /// Anything else: a bug or an unexpected token. Reported with the function and RV.
    Other,
}

impl Class {
    /// Whether the backend must start over: drop every session and re-initialise the
    /// module (`C_Finalize`, `C_Initialize`), then log in again. Nothing less recovers every
    /// case: SoftHSM2 does not see a token directory that came back, a module that lost its
    /// initialisation answers nothing else, and session handles are reused after a reset.
    pub(crate) fn starts_over(self) -> bool {
        matches!(self, Class::DeadSession | Class::Unreachable)
    }
}

pub(crate) fn classify(e: &CkError) -> Class {
    use RvError as R;
    let CkError::Pkcs11(rv, function) = e else { return Class::Other };
    match rv {
        // kekd runs one operation per session at a time: an operation already active means
        // the handle now names a session someone else opened after a reset.
        R::SessionHandleInvalid | R::SessionClosed | R::OperationActive => Class::DeadSession,
        R::TokenNotPresent
        | R::TokenNotRecognized
        | R::DeviceRemoved
        | R::DeviceError
        | R::DeviceMemory
        | R::SlotIdInvalid
        | R::FunctionCanceled
        | R::CryptokiNotInitialized => Class::Unreachable,
        R::SessionCount => Class::Busy,
        R::UserNotLoggedIn => Class::NotLoggedIn,
        R::KeyHandleInvalid | R::ObjectHandleInvalid => Class::StaleKey,
        R::KeyFunctionNotPermitted
        | R::KeyTypeInconsistent
        | R::KeySizeRange
        | R::ActionProhibited
        | R::PinIncorrect
        | R::PinInvalid
        | R::PinLenRange
        | R::PinExpired
        | R::PinLocked
        | R::UserPinNotInitialized => Class::Refused,
        R::EncryptedDataInvalid | R::EncryptedDataLenRange => Class::DataInvalid,
        // SoftHSM 2.6.1 reports a bad GCM tag as CKR_GENERAL_ERROR.
        R::GeneralError
            if matches!(function, Function::Decrypt | Function::DecryptUpdate | Function::DecryptFinal) =>
        {
            Class::DataInvalid
        }
        _ => Class::Other,
    }
}

/// Whether a root key's call that failed with `e` must start over (see
/// [`Class::starts_over`]). Besides those classes, CKR_GENERAL_ERROR outside decryption: none
/// of the root key's calls (find, log in, token information, encrypt) fails so because of
/// the request, but SoftHSM2 answers so for a token whose directory went away, until the
/// module is initialised again. (The importer's probes do get it for a mechanism SoftHSM2
/// cannot do, so [`classify`] keeps it `Other`.)
pub(crate) fn starts_over(e: &CkError) -> bool {
    match classify(e) {
        Class::Other => matches!(e, CkError::Pkcs11(RvError::GeneralError, _)),
        class => class.starts_over(),
    }
}

/// `C_Decrypt: CKR_GENERAL_ERROR`: the names an operator finds in the HSM vendor's manual.
/// (cryptoki's own Display quotes a paragraph of the specification instead.)
pub(crate) fn describe(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, function) => format!("C_{function:?}: {}", ckr_name(rv)),
        other => other.to_string(),
    }
}

fn ckr_name(rv: &RvError) -> String {
    let camel = format!("{rv:?}");
    if !camel.chars().all(|c| c.is_ascii_alphanumeric()) {
        return camel; // e.g. a vendor-defined value
    }
    let mut name = String::from("CKR");
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_specification() {
        let e = CkError::Pkcs11(RvError::EncryptedDataLenRange, Function::Decrypt);
        assert_eq!(describe(&e), "C_Decrypt: CKR_ENCRYPTED_DATA_LEN_RANGE");
        let e = CkError::Pkcs11(RvError::UserAlreadyLoggedIn, Function::Login);
        assert_eq!(describe(&e), "C_Login: CKR_USER_ALREADY_LOGGED_IN");
    }

    #[test]
    fn a_bad_tag_is_data_invalid_only_on_decrypt() {
        assert_eq!(classify(&CkError::Pkcs11(RvError::GeneralError, Function::Decrypt)), Class::DataInvalid);
        assert_eq!(classify(&CkError::Pkcs11(RvError::GeneralError, Function::Encrypt)), Class::Other);
        // ...and elsewhere, for the root key, the module failing.
        assert!(starts_over(&CkError::Pkcs11(RvError::GeneralError, Function::Login)));
        assert!(!starts_over(&CkError::Pkcs11(RvError::GeneralError, Function::Decrypt)));
    }

    #[test]
    fn a_token_without_a_session_to_spare_is_waited_for() {
        assert_eq!(classify(&CkError::Pkcs11(RvError::SessionCount, Function::OpenSession)), Class::Busy);
        assert!(!Class::Busy.starts_over());
        for rv in [RvError::CryptokiNotInitialized, RvError::DeviceRemoved, RvError::SessionClosed] {
            assert!(classify(&CkError::Pkcs11(rv, Function::Encrypt)).starts_over(), "{rv:?}");
        }
    }
}
