//! (a) The limit: AES-256-GCM open of a 32-byte DEK with aws-lc-rs, in process, with the
//! AAD of a kekd EDEK, one loop per thread. No sockets, no parsing, no audit: what the
//! cipher alone does on these cores.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

use crate::edek::{aad, DEK_LEN, NONCE_LEN, TAG_LEN};
use crate::measure::{run_threads, Clocking, Report};
use crate::{Context as _, Timing};

/// Operations between two clock reads: an open takes about 0.1 µs, a clock read tens of ns.
const CHUNK: u32 = 1024;

struct Opener {
    key: LessSafeKey,
    nonce: [u8; NONCE_LEN],
    aad: Vec<u8>,
    sealed: [u8; DEK_LEN + TAG_LEN],
    buf: [u8; DEK_LEN + TAG_LEN],
}

pub fn run(threads: usize, timing: Timing) -> crate::Result<Report> {
    let mut kek = [0u8; 32];
    let mut nonce = [0u8; NONCE_LEN];
    let mut dek = [0u8; DEK_LEN];
    for b in [&mut kek[..], &mut nonce[..], &mut dek[..]] {
        aws_lc_rs::rand::fill(b).context(|| "random bytes".into())?;
    }
    let aad = aad();
    let key = |kek: &[u8; 32]| LessSafeKey::new(UnboundKey::new(&AES_256_GCM, kek).expect("32-byte key"));
    let mut sealed = [0u8; DEK_LEN + TAG_LEN];
    sealed[..DEK_LEN].copy_from_slice(&dek);
    let tag = key(&kek)
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&aad),
            &mut sealed[..DEK_LEN],
        )
        .context(|| "seal".into())?;
    sealed[DEK_LEN..].copy_from_slice(tag.as_ref());

    let report = run_threads(
        "aes",
        threads,
        timing,
        Clocking::Every(CHUNK),
        // Each thread its own expanded key, as each kekd request builds its own.
        |_| Ok(Opener { key: key(&kek), nonce, aad: aad.clone(), sealed, buf: [0; DEK_LEN + TAG_LEN] }),
        |o: &mut Opener| {
            // open_in_place decrypts over its input: start each time from the sealed bytes.
            o.buf = o.sealed;
            let plain = o
                .key
                .open_in_place(Nonce::assume_unique_for_key(o.nonce), Aad::from(&o.aad[..]), &mut o.buf)
                .map_err(|_| "AES-GCM open failed")?;
            std::hint::black_box(plain);
            Ok::<(), &str>(())
        },
    )?;
    Ok(report.with("aad_bytes", aad.len()).with("chunk", CHUNK))
}
