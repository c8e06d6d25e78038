//! The sealed-KEK blob of the TPM backend: what the key record's `sealed` field holds.
//!
//! Part of the published record format, so a customer holding the TPM and the key store
//! can recover a KEK with tpm2-tools alone. Big-endian, every structure in its TPM wire
//! form:
//!
//! ```text
//! u8   format = 1
//! u32  PCR mask: bit n set = PCR n of the sha256 bank is in the policy (0: no policy)
//! TPM2B_NAME     name of the storage primary it was sealed under
//! TPM2B_PUBLIC   the sealed data object's public area (authPolicy = the PolicyPCR digest)
//! TPM2B_PRIVATE  its private area, encrypted by the primary
//! ```
//!
//! To recover: recreate the primary (`tpm2_createprimary -C o -g sha256 -G ecc256:aes128cfb`
//! gives kekd's template) or use the configured persistent handle, `tpm2_load` the public
//! and private parts, and `tpm2_unseal` (through a PolicyPCR session over the masked PCRs
//! when the mask is not 0). The 64 unsealed bytes are `KEK ‖ SHA-256(AAD)`, the AAD being
//! the one of DESIGN §1, which binds the blob to its tenant, key name and version.

use super::KEK_LEN;

pub const FORMAT: u8 = 1;
/// Length of the data inside the sealed object: the KEK and the digest of its AAD.
pub const SEALED_DATA_LEN: usize = KEK_LEN + 32;

/// A parsed blob; parts are borrowed from the record.
#[derive(Debug, PartialEq, Eq)]
pub struct Sealed<'a> {
    pub pcr_mask: u32,
    pub parent_name: &'a [u8],
    /// TPMT_PUBLIC (the TPM2B's contents).
    pub public: &'a [u8],
    /// TPM2B_PRIVATE's contents.
    pub private: &'a [u8],
}

impl<'a> Sealed<'a> {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(1 + 4 + 6 + self.parent_name.len() + self.public.len() + self.private.len());
        out.push(FORMAT);
        out.extend_from_slice(&self.pcr_mask.to_be_bytes());
        for part in [self.parent_name, self.public, self.private] {
            let len = u16::try_from(part.len()).expect("TPM2B sizes fit in u16");
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    /// Parses a blob; `None` for anything that is not exactly one well-formed blob.
    pub fn parse(bytes: &'a [u8]) -> Option<Sealed<'a>> {
        let (&format, rest) = bytes.split_first()?;
        if format != FORMAT || rest.len() < 4 {
            return None;
        }
        let (mask, mut rest) = rest.split_at(4);
        let pcr_mask = u32::from_be_bytes(mask.try_into().ok()?);
        if pcr_mask >> 24 != 0 {
            return None;
        }
        let mut parts = [&[][..]; 3];
        for part in &mut parts {
            if rest.len() < 2 {
                return None;
            }
            let len = u16::from_be_bytes([rest[0], rest[1]]) as usize;
            rest = &rest[2..];
            if rest.len() < len || len == 0 {
                return None;
            }
            (*part, rest) = rest.split_at(len);
        }
        if !rest.is_empty() {
            return None;
        }
        let [parent_name, public, private] = parts;
        Some(Sealed { pcr_mask, parent_name, public, private })
    }
}

/// The PCR mask of a list of PCR indexes (each at most 23: checked by the config).
pub fn pcr_mask(pcrs: &[u8]) -> u32 {
    pcrs.iter().fold(0, |m, &p| m | 1 << p)
}

/// The PCR indexes of a mask, ascending, as `sha256:0,7,16` for messages.
pub fn describe_mask(mask: u32) -> String {
    let list: Vec<String> = (0..24).filter(|i| mask & 1 << i != 0).map(|i: u32| i.to_string()).collect();
    format!("sha256:{}", list.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        Sealed { pcr_mask: pcr_mask(&[0, 7, 16]), parent_name: b"name", public: b"pub", private: b"priv" }
            .to_bytes()
    }

    #[test]
    fn round_trip() {
        let bytes = sample();
        let s = Sealed::parse(&bytes).unwrap();
        assert_eq!(s.pcr_mask, 1 | 1 << 7 | 1 << 16);
        assert_eq!((s.parent_name, s.public, s.private), (&b"name"[..], &b"pub"[..], &b"priv"[..]));
        assert_eq!(describe_mask(s.pcr_mask), "sha256:0,7,16");
    }

    #[test]
    fn anything_else_does_not_parse() {
        let bytes = sample();
        for cut in 0..bytes.len() {
            assert!(Sealed::parse(&bytes[..cut]).is_none(), "a blob cut at {cut} parsed");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Sealed::parse(&longer).is_none());
        let mut other_format = bytes.clone();
        other_format[0] = 2;
        assert!(Sealed::parse(&other_format).is_none());
        let mut pcr_25 = bytes;
        pcr_25[1] = 0x02;
        assert!(Sealed::parse(&pcr_25).is_none());
    }
}
