//! The EDEK v1 format and the AADs that bind keys to their place in the hierarchy.
//!
//! EDEK v1, big-endian (see docs/FORMATS.md, the published recovery contract):
//!
//! ```text
//! u8 format = 1 | u8 alg = 1 (AES-256-GCM) | u16 len ‖ key name | u32 KEK version
//! 12-byte nonce | ciphertext ‖ 16-byte tag
//! ```
//!
//! AAD = `"kekd/edek/v1"` ‖ str16(tenant) ‖ header (format through version, the nonce
//! excluded) ‖ canonical context. The tenant is in the AAD and not in the EDEK, so another
//! tenant's EDEK fails authentication instead of naming a foreign tenant.

pub use aws_lc_rs::aead::NONCE_LEN;
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use kekd_proto::{put_str16, Context, KeyName, Secret, TenantName, MAX_KEY_NAME_LEN};
use zeroize::Zeroizing;

use crate::backend::KEK_LEN;

pub const FORMAT_V1: u8 = 1;
pub const ALG_AES_256_GCM: u8 = 1;
const TAG_LEN: usize = 16;
const EDEK_LABEL: &[u8] = b"kekd/edek/v1";
const KEK_LABEL: &[u8] = b"kekd/kek/v1";

/// The EDEK failed to parse or authenticate. Deliberately carries no detail: which check
/// failed is an oracle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid data")]
pub struct DataInvalid;

/// AAD for sealing a KEK under the root key: `"kekd/kek/v1" ‖ str16(tenant) ‖
/// str16(key name) ‖ u32 version`. A record moved to another tenant, key or version no
/// longer unseals.
pub fn kek_aad(tenant: &TenantName, key: &KeyName, version: u32) -> Vec<u8> {
    kek_aad_of(tenant, key.as_str(), version)
}

/// [`kek_aad`] for a name that need not be a key name: the audit checkpoint key's is
/// `@audit` (crate::keystore::AUDIT_KEY_NAME), which no key can have.
pub fn kek_aad_of(tenant: &TenantName, name: &str, version: u32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(KEK_LABEL.len() + 8 + tenant.as_str().len() + name.len());
    aad.extend_from_slice(KEK_LABEL);
    put_str16(&mut aad, tenant.as_str());
    put_str16(&mut aad, name);
    aad.extend_from_slice(&version.to_be_bytes());
    aad
}

/// Seals a child KEK under its parent KEK (a key chain, DESIGN §1 L3), in software:
/// `nonce (12) ‖ ciphertext (32) ‖ tag (16)`, AES-256-GCM with the child's [`kek_aad`] —
/// the layout of a PKCS#11 root seal, with the parent KEK as the key.
pub fn seal_kek_under(parent: &[u8; KEK_LEN], aad: &[u8], kek: &[u8; KEK_LEN]) -> Vec<u8> {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, parent).expect("a 32-byte key"));
    let mut nonce = [0u8; NONCE_LEN];
    aws_lc_rs::rand::fill(&mut nonce).expect("the system RNG does not fail");
    let mut out = Vec::with_capacity(NONCE_LEN + KEK_LEN + TAG_LEN);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(kek);
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut out[NONCE_LEN..],
        )
        .expect("AES-GCM sealing of 32 bytes cannot fail");
    out.extend_from_slice(tag.as_ref());
    out
}

/// Opens what [`seal_kek_under`] made, straight into `out` (locked memory).
pub fn open_kek_under(
    parent: &[u8; KEK_LEN],
    aad: &[u8],
    sealed: &[u8],
    out: &mut [u8; KEK_LEN],
) -> Result<(), DataInvalid> {
    if sealed.len() != NONCE_LEN + KEK_LEN + TAG_LEN {
        return Err(DataInvalid);
    }
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, parent).expect("a 32-byte key"));
    let nonce = Nonce::try_assume_unique_for_key(&sealed[..NONCE_LEN]).map_err(|_| DataInvalid)?;
    let mut buf = Zeroizing::new(sealed[NONCE_LEN..].to_vec());
    let plain = key.open_in_place(nonce, Aad::from(aad), &mut buf).map_err(|_| DataInvalid)?;
    out.copy_from_slice(plain);
    Ok(())
}

/// A parsed, not yet authenticated, EDEK.
#[derive(Debug)]
pub struct Edek<'a> {
    pub key: KeyName,
    pub version: u32,
    header: &'a [u8],
    nonce: [u8; NONCE_LEN],
    sealed: &'a [u8],
}

impl<'a> Edek<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Self, DataInvalid> {
        let (&[format, alg], rest) = split(bytes, 2)? else { unreachable!() };
        if format != FORMAT_V1 || alg != ALG_AES_256_GCM {
            return Err(DataInvalid);
        }
        let (len, rest) = split(rest, 2)?;
        let len = u16::from_be_bytes([len[0], len[1]]) as usize;
        if len > MAX_KEY_NAME_LEN {
            return Err(DataInvalid);
        }
        let (name, rest) = split(rest, len)?;
        let key = std::str::from_utf8(name).ok().and_then(|s| KeyName::parse(s).ok()).ok_or(DataInvalid)?;
        let (version, rest) = split(rest, 4)?;
        let version = u32::from_be_bytes(version.try_into().expect("4 bytes"));
        let header = &bytes[..bytes.len() - rest.len()];
        let (nonce, sealed) = split(rest, NONCE_LEN)?;
        if sealed.len() <= TAG_LEN {
            return Err(DataInvalid);
        }
        Ok(Edek { key, version, header, nonce: nonce.try_into().expect("12 bytes"), sealed })
    }
}

/// Where an EDEK's nonce lies by the v1 layout (after the name its length gives, and the
/// version), without checking anything else: for naming an EDEK in the audit trail,
/// tampered ones too.
pub fn nonce_of(edek: &[u8]) -> Option<[u8; NONCE_LEN]> {
    let len = u16::from_be_bytes([*edek.get(2)?, *edek.get(3)?]) as usize;
    let at = 8 + len;
    edek.get(at..at + NONCE_LEN).map(|n| n.try_into().expect("NONCE_LEN bytes"))
}

/// Fuzzing only: the parser's output written back in the layout [`Sealer::seal`] writes,
/// header by the same code, so that parse and write can be checked against each other.
#[cfg(feature = "fuzzing")]
impl Edek<'_> {
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.header.len() + NONCE_LEN + self.sealed.len());
        header(&self.key, self.version, &mut out);
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(self.sealed);
        out
    }
}

fn split(b: &[u8], n: usize) -> Result<(&[u8], &[u8]), DataInvalid> {
    (b.len() >= n).then(|| b.split_at(n)).ok_or(DataInvalid)
}

fn header(key: &KeyName, version: u32, out: &mut Vec<u8>) {
    out.push(FORMAT_V1);
    out.push(ALG_AES_256_GCM);
    put_str16(out, key.as_str());
    out.extend_from_slice(&version.to_be_bytes());
}

fn edek_aad(tenant: &TenantName, header: &[u8], context: &Context) -> Vec<u8> {
    let mut aad = Vec::with_capacity(EDEK_LABEL.len() + 2 + tenant.as_str().len() + header.len() + 64);
    aad.extend_from_slice(EDEK_LABEL);
    put_str16(&mut aad, tenant.as_str());
    aad.extend_from_slice(header);
    context.encode_canonical(&mut aad);
    aad
}

/// One KEK version, expanded for AES-GCM for the duration of a batch.
///
/// The expanded key schedule lives in aws-lc's heap (wiped by aws-lc when freed), so a
/// Sealer is built per request from the locked KEK bytes and dropped right after, rather
/// than cached for the KEK's lifetime.
pub struct Sealer<'t> {
    key: LessSafeKey,
    tenant: &'t TenantName,
    name: KeyName,
    version: u32,
}

impl<'t> Sealer<'t> {
    pub fn new(kek: &[u8; KEK_LEN], tenant: &'t TenantName, name: KeyName, version: u32) -> Self {
        let key = UnboundKey::new(&AES_256_GCM, kek).expect("a 32-byte key is valid for AES-256-GCM");
        Self { key: LessSafeKey::new(key), tenant, name, version }
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// Encrypts `plaintext` into a new EDEK bound to `context`.
    pub fn seal(&self, plaintext: &[u8], context: &Context) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(4 + self.name.as_str().len() + 4 + NONCE_LEN + plaintext.len() + TAG_LEN);
        header(&self.name, self.version, &mut out);
        let aad = edek_aad(self.tenant, &out, context);
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).expect("the system RNG does not fail");
        out.extend_from_slice(&nonce);
        let start = out.len();
        out.extend_from_slice(plaintext);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                &mut out[start..],
            )
            .expect("AES-GCM sealing of at most 4 KiB cannot fail");
        out.extend_from_slice(tag.as_ref());
        out
    }

    /// Authenticates and decrypts an EDEK that names this key and version.
    pub fn open(&self, edek: &Edek<'_>, context: &Context) -> Result<Secret, DataInvalid> {
        if edek.key != self.name || edek.version != self.version {
            return Err(DataInvalid);
        }
        let aad = edek_aad(self.tenant, edek.header, context);
        let mut buf = Zeroizing::new(edek.sealed.to_vec());
        let len = self
            .key
            .open_in_place(Nonce::assume_unique_for_key(edek.nonce), Aad::from(&aad), &mut buf)
            .map_err(|_| DataInvalid)?
            .len();
        buf.truncate(len);
        Ok(Secret::new(buf))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn ctx(pairs: &[(&str, &str)]) -> Context {
        Context::new(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>())
            .unwrap()
    }

    fn tenant(s: &str) -> TenantName {
        TenantName::parse(s).unwrap()
    }

    #[test]
    fn layout_is_as_published() {
        let t = tenant("acme");
        let s = Sealer::new(&[7; 32], &t, KeyName::parse("ab").unwrap(), 0x01020304);
        let e = s.seal(b"0123456789abcdef0123456789abcdef", &Context::default());
        assert_eq!(&e[..10], &[1, 1, 0, 2, b'a', b'b', 1, 2, 3, 4]);
        assert_eq!(e.len(), 10 + 12 + 32 + 16);
        let parsed = Edek::parse(&e).unwrap();
        assert_eq!((parsed.key.as_str(), parsed.version), ("ab", 0x01020304));
    }

    /// Recomputes the AAD and decrypts with aws-lc-rs directly, from the documented layout
    /// alone: what a customer recovering data without kekd would do.
    #[test]
    fn edek_decrypts_from_the_documented_layout() {
        let kek = [9u8; 32];
        let t = tenant("acme");
        let s = Sealer::new(&kek, &t, KeyName::parse("default").unwrap(), 3);
        let c = ctx(&[("b", "2"), ("a", "1")]);
        let mut e = s.seal(b"secret", &c);
        let hdr_len = 2 + 2 + 7 + 4;
        let mut aad = b"kekd/edek/v1\x00\x04acme".to_vec();
        aad.extend_from_slice(&e[..hdr_len]);
        aad.extend_from_slice(b"\x00\x02\x00\x01a\x00\x011\x00\x01b\x00\x012");
        let nonce: [u8; 12] = e[hdr_len..hdr_len + 12].try_into().unwrap();
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &kek).unwrap());
        let pt = key
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(&aad), &mut e[hdr_len + 12..])
            .unwrap();
        assert_eq!(pt, b"secret");
    }

    #[test]
    fn any_change_is_data_invalid() {
        let t = tenant("acme");
        let s = Sealer::new(&[1; 32], &t, KeyName::parse("default").unwrap(), 1);
        let c = ctx(&[("purpose", "test")]);
        let e = s.seal(&[42; 32], &c);
        assert_eq!(s.open(&Edek::parse(&e).unwrap(), &c).unwrap().expose(), &[42; 32]);
        for i in 0..e.len() {
            let mut bad = e.clone();
            bad[i] ^= 0x01;
            let res = Edek::parse(&bad).and_then(|p| s.open(&p, &c));
            assert_eq!(res.err(), Some(DataInvalid), "flipping byte {i} must be detected");
        }
        let parsed = Edek::parse(&e).unwrap();
        assert!(s.open(&parsed, &ctx(&[("purpose", "other")])).is_err());
        assert!(s.open(&parsed, &Context::default()).is_err());
        let other = tenant("other");
        let s2 = Sealer::new(&[1; 32], &other, KeyName::parse("default").unwrap(), 1);
        assert!(s2.open(&parsed, &c).is_err(), "another tenant with the same KEK bytes must fail");
        assert!(Edek::parse(&e[..e.len() - 32]).is_err(), "a tag without ciphertext is refused");
        assert!(Edek::parse(&[]).is_err());
    }

    #[test]
    fn kek_aad_binds_tenant_key_and_version() {
        let k = KeyName::parse("default").unwrap();
        let a = kek_aad(&tenant("acme"), &k, 1);
        assert_eq!(a, b"kekd/kek/v1\x00\x04acme\x00\x07default\x00\x00\x00\x01");
        assert_ne!(a, kek_aad(&tenant("acme"), &k, 2));
        assert_ne!(a, kek_aad(&tenant("acmf"), &k, 1));
    }
}
