//! The KEK cache: unsealed KEKs in locked memory, for a bounded time.
//!
//! Two clocks on CLOCK_BOOTTIME (see [`crate::clock`]): `kek_ttl` bounds how long a KEK is
//! used before it is unsealed again from the root key, `idle_ttl` flushes KEKs nobody uses.
//! Concurrent misses on one KEK version wait for a single root-key call (single flight):
//! an HSM should see one unseal per KEK per TTL, not one per waiting request.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use kekd_proto::KeyName;

use crate::clock::BootInstant;
use crate::secret::{KeySlot, LockedArena, MemoryError};

/// A cached KEK, shared by the requests using it. The bytes are wiped when the cache has
/// evicted it and the last request holding it is done.
pub type Kek = Arc<KeySlot>;

/// Where a KEK came from, for audit and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Cache,
    Root,
}

pub type Clock = Arc<dyn Fn() -> BootInstant + Send + Sync>;

struct Loaded {
    kek: Kek,
    fetched: BootInstant,
}

struct Entry {
    loaded: RwLock<Option<Loaded>>,
    /// Held while a root-key call for this entry is in flight.
    loading: tokio::sync::Mutex<()>,
    last_used_ms: AtomicU64,
}

pub struct KekCache {
    arena: Arc<LockedArena>,
    kek_ttl: Duration,
    idle_ttl: Duration,
    clock: Clock,
    entries: Mutex<HashMap<KeyName, BTreeMap<u32, Arc<Entry>>>>,
    root_calls: AtomicU64,
}

/// Why a KEK could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum LoadError<E> {
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Load(E),
}

impl KekCache {
    pub fn new(arena: Arc<LockedArena>, kek_ttl: Duration, idle_ttl: Duration) -> Self {
        Self::with_clock(arena, kek_ttl, idle_ttl, Arc::new(BootInstant::now))
    }

    pub fn with_clock(arena: Arc<LockedArena>, kek_ttl: Duration, idle_ttl: Duration, clock: Clock) -> Self {
        Self {
            arena,
            kek_ttl,
            idle_ttl,
            clock,
            entries: Mutex::new(HashMap::new()),
            root_calls: AtomicU64::new(0),
        }
    }

    /// Returns the KEK for `(key, version)`, calling `load` (on a blocking thread) to
    /// unseal it into locked memory when it is not cached or its `kek_ttl` has passed.
    pub async fn get<E, F>(&self, key: &KeyName, version: u32, load: F) -> Result<(Kek, Source), LoadError<E>>
    where
        E: Send + 'static,
        F: FnOnce(&mut KeySlot) -> Result<(), E> + Send + 'static,
    {
        let now = (self.clock)();
        let entry = self.entry(key, version);
        entry.last_used_ms.store(now.as_millis(), Ordering::Relaxed);
        if let Some(kek) = self.fresh(&entry, now) {
            return Ok((kek, Source::Cache));
        }
        let _loading = entry.loading.lock().await;
        // Someone else may have loaded it while we waited: that is the single flight.
        if let Some(kek) = self.fresh(&entry, (self.clock)()) {
            return Ok((kek, Source::Cache));
        }
        let mut slot = self.arena.alloc()?;
        self.root_calls.fetch_add(1, Ordering::Relaxed);
        let slot = tokio::task::spawn_blocking(move || load(&mut slot).map(|()| slot))
            .await
            .expect("KEK loader does not panic")
            .map_err(LoadError::Load)?;
        let kek = Arc::new(slot);
        *entry.loaded.write().expect("cache entry lock") =
            Some(Loaded { kek: Arc::clone(&kek), fetched: (self.clock)() });
        Ok((kek, Source::Root))
    }

    fn entry(&self, key: &KeyName, version: u32) -> Arc<Entry> {
        let mut entries = self.entries.lock().expect("cache lock");
        if let Some(e) = entries.get(key).and_then(|m| m.get(&version)) {
            return Arc::clone(e);
        }
        let e = Arc::new(Entry {
            loaded: RwLock::new(None),
            loading: tokio::sync::Mutex::new(()),
            last_used_ms: AtomicU64::new(0),
        });
        entries.entry(key.clone()).or_default().insert(version, Arc::clone(&e));
        e
    }

    fn fresh(&self, entry: &Entry, now: BootInstant) -> Option<Kek> {
        let loaded = entry.loaded.read().expect("cache entry lock");
        loaded.as_ref().filter(|l| now.since(l.fetched) < self.kek_ttl).map(|l| Arc::clone(&l.kek))
    }

    /// Evicts KEKs past `kek_ttl` or idle for `idle_ttl`. Run periodically.
    pub fn sweep(&self) {
        let now = (self.clock)();
        self.evict_where(|e| {
            let loaded = e.loaded.read().expect("cache entry lock");
            let idle = now.since(BootInstant::from_millis(e.last_used_ms.load(Ordering::Relaxed)));
            match loaded.as_ref() {
                Some(l) => now.since(l.fetched) >= self.kek_ttl || idle >= self.idle_ttl,
                None => idle >= self.idle_ttl,
            }
        });
    }

    /// Evicts every KEK of one key version, e.g. after it was disabled or destroyed.
    pub fn evict(&self, key: &KeyName, version: u32) {
        let mut entries = self.entries.lock().expect("cache lock");
        if let Some(m) = entries.get_mut(key) {
            if let Some(e) = m.remove(&version) {
                e.loaded.write().expect("cache entry lock").take();
            }
            if m.is_empty() {
                entries.remove(key);
            }
        }
    }

    /// Evicts everything (shutdown, revocation).
    pub fn flush(&self) {
        self.evict_where(|_| true);
    }

    fn evict_where(&self, mut pred: impl FnMut(&Entry) -> bool) {
        let mut entries = self.entries.lock().expect("cache lock");
        for versions in entries.values_mut() {
            versions.retain(|_, e| {
                if !pred(e) {
                    return true;
                }
                e.loaded.write().expect("cache entry lock").take();
                // Keep an entry a loader is working on, so its waiters share the result.
                e.loading.try_lock().is_err()
            });
        }
        entries.retain(|_, v| !v.is_empty());
    }

    /// KEK versions currently held in memory.
    pub fn len(&self) -> usize {
        let entries = self.entries.lock().expect("cache lock");
        entries.values().flat_map(|m| m.values()).filter(|e| e.loaded.read().expect("lock").is_some()).count()
    }

    #[cfg(test)]
    /// Root-key unseal calls made so far.
    pub fn root_calls(&self) -> u64 {
        self.root_calls.load(Ordering::Relaxed)
    }

    pub fn memory_locked(&self) -> bool {
        self.arena.is_locked()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    fn manual_clock() -> (Clock, Arc<AtomicU64>) {
        let t = Arc::new(AtomicU64::new(1_000_000));
        let t2 = Arc::clone(&t);
        (Arc::new(move || BootInstant::from_millis(t2.load(Ordering::Relaxed))), t)
    }

    fn cache(clock: Clock) -> KekCache {
        KekCache::with_clock(
            LockedArena::new(false).unwrap(),
            Duration::from_secs(60),
            Duration::from_secs(10),
            clock,
        )
    }

    fn name() -> KeyName {
        KeyName::parse("default").unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_misses_make_one_root_call() {
        let (clock, _) = manual_clock();
        let c = Arc::new(cache(clock));
        let calls = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..32)
            .map(|_| {
                let (c, calls) = (Arc::clone(&c), Arc::clone(&calls));
                tokio::spawn(async move {
                    c.get(&name(), 1, move |slot| {
                        calls.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(50));
                        slot.bytes_mut().fill(7);
                        Ok::<_, ()>(())
                    })
                    .await
                    .ok()
                    .unwrap()
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().0.bytes(), &[7; 32]);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(c.root_calls(), 1);
    }

    #[tokio::test]
    async fn ttls_follow_the_clock() {
        let (clock, t) = manual_clock();
        let c = cache(clock);
        let load = |slot: &mut KeySlot| {
            slot.bytes_mut().fill(1);
            Ok::<_, ()>(())
        };
        assert_eq!(c.get(&name(), 1, load).await.ok().unwrap().1, Source::Root);
        assert_eq!(c.get(&name(), 1, load).await.ok().unwrap().1, Source::Cache);
        // Idle for idle_ttl: flushed by the sweeper.
        t.fetch_add(10_000, Ordering::Relaxed);
        c.sweep();
        assert_eq!(c.len(), 0);
        assert_eq!(c.get(&name(), 1, load).await.ok().unwrap().1, Source::Root);
        // Used every 5 s, it is still re-derived once kek_ttl has passed.
        for _ in 0..12 {
            t.fetch_add(5_000, Ordering::Relaxed);
            c.get(&name(), 1, load).await.ok().unwrap();
            c.sweep();
        }
        assert_eq!(c.root_calls(), 3);
    }

    #[tokio::test]
    async fn evicted_keks_are_wiped_once_unused() {
        let (clock, _) = manual_clock();
        let c = cache(clock);
        let (kek, _) = c
            .get(&name(), 1, |slot: &mut KeySlot| {
                slot.bytes_mut().fill(9);
                Ok::<_, ()>(())
            })
            .await
            .ok()
            .unwrap();
        let ptr = kek.bytes().as_ptr();
        c.evict(&name(), 1);
        assert_eq!(c.len(), 0);
        // Still usable by the request that holds it...
        assert_eq!(kek.bytes(), &[9; 32]);
        drop(kek);
        // ...and wiped once released: the next slot handed out is the same memory, zeroed.
        let (next, _) = c.get(&name(), 2, |_: &mut KeySlot| Ok::<_, ()>(())).await.ok().unwrap();
        assert_eq!(next.bytes().as_ptr(), ptr);
        assert_eq!(next.bytes(), &[0; 32]);
    }

    #[tokio::test]
    async fn a_failed_load_is_not_cached() {
        let (clock, _) = manual_clock();
        let c = cache(clock);
        assert!(matches!(
            c.get(&name(), 1, |_: &mut KeySlot| Err::<(), _>("down")).await,
            Err(LoadError::Load("down"))
        ));
        assert_eq!(c.len(), 0);
        assert!(c.get(&name(), 1, |_: &mut KeySlot| Ok::<_, ()>(())).await.is_ok());
    }
}
