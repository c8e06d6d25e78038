//! What a PKCS#11 return value means for the service: retry, flush, or give up.

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};

/// The kinds of failure the backend reacts to differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// The session is gone (closed, or invalidated by a token reset): its siblings probably
    /// are too. Drop them and retry once on a fresh session.
    DeadSession,
    /// The token or device is absent or failing. Drop the session, retry once (the token may
    /// be back under the same label), then report it unreachable: cached KEKs keep serving.
    Unreachable,
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
    /// Whether the session that saw this failure must not go back to the pool.
    pub(crate) fn kills_session(self) -> bool {
        matches!(self, Class::DeadSession | Class::Unreachable)
    }
}

pub(crate) fn classify(e: &CkError) -> Class {
    use RvError as R;
    let CkError::Pkcs11(rv, function) = e else { return Class::Other };
    match rv {
        R::SessionHandleInvalid | R::SessionClosed => Class::DeadSession,
        R::TokenNotPresent
        | R::TokenNotRecognized
        | R::DeviceRemoved
        | R::DeviceError
        | R::DeviceMemory
        | R::SlotIdInvalid
        | R::SessionCount
        | R::FunctionCanceled
        | R::CryptokiNotInitialized => Class::Unreachable,
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
    }
}
