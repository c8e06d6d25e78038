//! What a TSS error means for the service: the TPM is out of reach (retry, keep cached
//! KEKs), busy (retry), or answered definitively.

use tss_esapi::constants::response_code::{Tss2ResponseCode, Tss2ResponseCodeKind as Kind};
use tss_esapi::Error as TssError;

/// TSS2 layers (bits 16–23 of a TSS2_RC): 0 is the TPM itself; the rest are software
/// between kekd and the TPM (ESAPI, SAPI, marshalling, TCTI, resource manager).
const LAYER_TPM: u32 = 0;
const LAYER_TCTI: u32 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The link to the TPM failed (device gone, swtpm down). The connection is rebuilt
    /// on the next call.
    Link,
    /// The TPM is temporarily unable (out of object or session slots, retry, self-test,
    /// dictionary-attack lockout).
    Busy,
    /// A policy session did not satisfy the object's policy.
    Policy,
    /// The handle does not refer to a loaded or persistent object.
    Handle,
    /// The blob did not load or unseal: integrity, binding or size checks failed.
    Integrity,
    /// Anything else; reported with the TPM's message.
    Other,
}

fn raw(rc: Tss2ResponseCode) -> u32 {
    match rc {
        Tss2ResponseCode::Success => 0,
        Tss2ResponseCode::FormatZero(rc) => rc.0,
        Tss2ResponseCode::FormatOne(rc) => rc.0,
    }
}

pub fn classify(e: &TssError) -> Class {
    let TssError::Tss2Error(rc) = *e else { return Class::Other };
    let layer = raw(rc) >> 16 & 0xff;
    if layer == LAYER_TCTI {
        return Class::Link;
    }
    if layer != LAYER_TPM {
        // ESAPI and below report their own failures to talk to the TPM (a short or
        // malformed response, a bad sequence after one): rebuilding the context is the
        // remedy for all of them.
        return Class::Link;
    }
    match rc.kind() {
        Some(
            Kind::ObjectMemory
            | Kind::SessionMemory
            | Kind::Memory
            | Kind::ObjectHandles
            | Kind::SessionHandles
            | Kind::Retry
            | Kind::Yielded
            | Kind::Canceled
            | Kind::Testing
            | Kind::Lockout
            | Kind::NvRate
            | Kind::NvUnavailable
            | Kind::Initialize,
        ) => Class::Busy,
        Some(Kind::PolicyFail | Kind::Expired | Kind::PcrChanged) => Class::Policy,
        Some(
            Kind::Handle
            | Kind::ReferenceH0
            | Kind::ReferenceH1
            | Kind::ReferenceH2
            | Kind::ReferenceS0
            | Kind::ReferenceS1
            | Kind::ReferenceS2,
        ) => Class::Handle,
        // libtpms answers TPM_RC_FAILURE when the private area does not decrypt.
        Some(Kind::Integrity | Kind::Binding | Kind::Size | Kind::Value | Kind::Failure | Kind::Key) => {
            Class::Integrity
        }
        _ => Class::Other,
    }
}

/// The TPM's own words plus the raw code, for logs and error messages.
pub fn describe(e: &TssError) -> String {
    match e {
        TssError::Tss2Error(rc) => format!("{rc} (0x{:x})", raw(*rc)),
        TssError::WrapperError(w) => w.to_string(),
    }
}
