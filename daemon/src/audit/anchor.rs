//! Checkpoints: the audit chain anchored in the tenant's root key (docs/FORMATS.md §5,
//! "Checkpoints").
//!
//! The hash chain has no key, so whoever can write the audit files can rewrite it whole,
//! consistently. Every `audit.checkpoint_interval`, and at a clean shutdown, the worker
//! appends a `checkpoint` record naming the chain's head (the `seq` and `hash` of the record
//! right before it) with an HMAC-SHA256 of it under the tenant's checkpoint key: 32 random
//! bytes, sealed by the root key like a KEK (`<state_dir>/tenants/<tenant>/audit.kek`,
//! crate::keystore), never on disk in clear. Rewriting a record before a checkpoint then
//! takes the root key.
//!
//! The key is unsealed once, by the tenant service ([`KeySource`], through the worker's
//! bounded root key), on the anchor thread or at shutdown, never on the async executor and
//! never while the writers' lock is held: requests never wait for the root key on its
//! account. It is held in locked memory for the worker's life, and an `hmac::Key` is built
//! from it only for the moment of a MAC. The MAC is computed and the record appended under
//! the writers' lock (on the writer thread), so the head it names cannot move in between.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, Weak};

use aws_lc_rs::hmac;
use kekd_proto::put_str16;

use super::writer::Head;
use crate::secret::KeySlot;

/// The `event` of a checkpoint record.
pub const EVENT: &str = "checkpoint";
/// What the MAC input begins with.
const MAC_LABEL: &[u8] = b"kekd/audit-checkpoint/v1";

/// Where a worker's checkpoint key comes from: its tenant service, once the root key is
/// open.
pub trait KeySource: Send + Sync {
    /// The tenant's checkpoint key, unsealed by the root key into locked memory; made
    /// first (random, sealed, stored) when the tenant has none. Blocks on the root key,
    /// within its bound: call it off the async executor.
    fn checkpoint_key(&self) -> Result<KeySlot, crate::error::Error>;
}

/// `"kekd/audit-checkpoint/v1" ‖ str16(tenant) ‖ u64 seq ‖ the 32 hash bytes`.
pub fn mac_input(tenant: &str, head: &Head) -> Vec<u8> {
    let mut input = Vec::with_capacity(MAC_LABEL.len() + 2 + tenant.len() + 8 + 32);
    input.extend_from_slice(MAC_LABEL);
    put_str16(&mut input, tenant);
    input.extend_from_slice(&head.seq.to_be_bytes());
    input.extend_from_slice(&head.hash);
    input
}

/// A worker's checkpointing: the key, once unsealed, and where to get it from.
pub struct Anchor {
    tenant: String,
    /// Weak: the tenant service owns the audit trail, which owns this.
    source: Mutex<Option<Weak<dyn KeySource>>>,
    /// The key, once unsealed. Locked only briefly (to MAC, or to put the key in), never
    /// across a root-key call: the writer takes it under the writers' lock.
    key: Mutex<Option<KeySlot>>,
    /// Serialises the unsealing.
    loading: Mutex<()>,
    /// The last attempt to get the key failed and was logged.
    failing: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Anchor {
    pub fn new(tenant: &str) -> Self {
        Anchor {
            tenant: tenant.to_owned(),
            source: Mutex::new(None),
            key: Mutex::new(None),
            loading: Mutex::new(()),
            failing: AtomicBool::new(false),
        }
    }

    /// Where the key comes from, from now on.
    pub fn set_source(&self, source: Weak<dyn KeySource>) {
        *lock(&self.source) = Some(source);
    }

    pub fn has_source(&self) -> bool {
        lock(&self.source).is_some()
    }

    /// Whether the key is held, unsealing it first if need be (a root-key call: not on the
    /// async executor, not under the writers' lock). False without a source yet, or when
    /// the root key did not give it: that is logged once, until it works again.
    pub fn ensure_key(&self) -> bool {
        if lock(&self.key).is_some() {
            return true;
        }
        let _loading = lock(&self.loading);
        if lock(&self.key).is_some() {
            return true;
        }
        let Some(source) = lock(&self.source).as_ref().and_then(Weak::upgrade) else { return false };
        let got = source.checkpoint_key();
        // No lock of ours is held but `loading`, which the service's drop never takes.
        drop(source);
        match got {
            Ok(slot) => {
                *lock(&self.key) = Some(slot);
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("the audit checkpoint key is available again: checkpoints resume");
                }
                true
            }
            Err(e) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        error = %e,
                        "cannot get the audit checkpoint key from the root key: no checkpoint is made \
                         until it answers (tried again every audit.checkpoint_interval); requests are served"
                    );
                }
                false
            }
        }
    }

    /// The `detail` of a checkpoint naming `head`: `{"seq","hash","mac"}`; `None` while the
    /// key is not held.
    pub fn detail(&self, head: &Head) -> Option<serde_json::Value> {
        let held = lock(&self.key);
        let slot = held.as_ref()?;
        // Built from the locked copy for this one MAC, and dropped with it.
        let key = hmac::Key::new(hmac::HMAC_SHA256, slot.bytes());
        let mac = hmac::sign(&key, &mac_input(&self.tenant, head));
        Some(serde_json::json!({
            "seq": head.seq,
            "hash": hex::encode(head.hash),
            "mac": hex::encode(mac.as_ref()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::secret::LockedArena;

    struct Fixed {
        arena: Arc<LockedArena>,
        fail: AtomicBool,
    }

    impl KeySource for Fixed {
        fn checkpoint_key(&self) -> Result<KeySlot, crate::error::Error> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(crate::backend::BackendError::Unreachable("test".into()).into());
            }
            let mut slot = self.arena.alloc()?;
            slot.bytes_mut().copy_from_slice(&[7; 32]);
            Ok(slot)
        }
    }

    /// The MAC input of docs/FORMATS.md §5 ("Checkpoints"), byte by byte, and its worked
    /// example.
    #[test]
    fn the_mac_input_and_mac_are_the_documented_ones() {
        let head = Head { seq: 41, hash: [0xab; 32] };
        let input = mac_input("acme", &head);
        let mut expected = b"kekd/audit-checkpoint/v1".to_vec();
        expected.extend_from_slice(&[0, 4, b'a', b'c', b'm', b'e']);
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 41]);
        expected.extend_from_slice(&[0xab; 32]);
        assert_eq!(input, expected);
        assert_eq!(input.len(), 70);

        let source = Arc::new(Fixed { arena: LockedArena::new(false).unwrap(), fail: AtomicBool::new(true) });
        let anchor = Anchor::new("acme");
        assert!(!anchor.ensure_key(), "no source yet");
        let weak: Weak<dyn KeySource> = Arc::downgrade(&source) as Weak<Fixed>;
        anchor.set_source(weak);
        assert!(!anchor.ensure_key(), "the root key failed");
        assert!(anchor.detail(&head).is_none());
        source.fail.store(false, Ordering::SeqCst);
        assert!(anchor.ensure_key());
        let detail = anchor.detail(&head).unwrap();
        assert_eq!(detail["seq"], 41);
        assert_eq!(detail["hash"], "ab".repeat(32));
        // HMAC-SHA256 with the key 07 × 32 over the 70 bytes above (the worked example).
        assert_eq!(detail["mac"], "0208ba88c44305e1e5a9c5d9dbccbf9db36f843475edc96ddf181ff49ce6d273");
    }
}
