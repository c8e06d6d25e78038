//! The KEK cache: unsealed KEKs in locked memory, for a bounded time (DESIGN §5).
//!
//! Three clocks, all on CLOCK_BOOTTIME (see [`crate::clock`]):
//!
//! - `kek_ttl` bounds how long a KEK is used before it is unsealed again from the root key.
//!   A KEK in use is refreshed in the background once three quarters of it have passed
//!   ([`KekCache::due_for_refresh`]), so requests do not wait for the root key.
//! - `idle_ttl` flushes KEKs nobody uses.
//! - `offline_grace`: while the root key is *unreachable* (an outage, not a refusal), a KEK
//!   past `kek_ttl` keeps serving up to this long after the last successful root-key
//!   operation; 0 fails closed at `kek_ttl`. A definitive refusal is the caller's to act on:
//!   it flushes everything ([`KekCache::flush`]).
//!
//! Concurrent misses on one KEK version wait for a single root-key call (single flight):
//! an HSM should see one unseal per KEK per TTL, not one per waiting request. While the
//! root key is known to be down, requests within the grace do not call it at all: the
//! background refresh probes it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use kekd_proto::KeyName;

use crate::backend::BackendError;
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
    /// Past `kek_ttl`, served within `offline_grace` because the root key is unreachable.
    Grace,
}

pub type Clock = Arc<dyn Fn() -> BootInstant + Send + Sync>;

/// The three lease clocks of a tenant's KEKs.
#[derive(Debug, Clone, Copy)]
pub struct Lease {
    pub kek_ttl: Duration,
    pub idle_ttl: Duration,
    pub offline_grace: Duration,
}

/// What the cache needs to know of a failed root-key call: was it an outage (the grace
/// applies) or an answer?
pub trait Outage {
    fn is_outage(&self) -> bool;
}

impl Outage for BackendError {
    fn is_outage(&self) -> bool {
        matches!(self, BackendError::Unreachable(_))
    }
}

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
    lease: Lease,
    clock: Clock,
    entries: Mutex<HashMap<KeyName, BTreeMap<u32, Arc<Entry>>>>,
    root_calls: AtomicU64,
    /// When a root-key operation last succeeded (any KEK, or the canary).
    root_ok_ms: AtomicU64,
    /// Set by a root-key call that found the root key unreachable; cleared by a success.
    root_down: AtomicBool,
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
    pub fn new(arena: Arc<LockedArena>, lease: Lease) -> Self {
        Self::with_clock(arena, lease, Arc::new(BootInstant::now))
    }

    /// The root key was just opened, so the grace counts from construction.
    pub fn with_clock(arena: Arc<LockedArena>, lease: Lease, clock: Clock) -> Self {
        let now = clock();
        Self {
            arena,
            lease,
            clock,
            entries: Mutex::new(HashMap::new()),
            root_calls: AtomicU64::new(0),
            root_ok_ms: AtomicU64::new(now.as_millis()),
            root_down: AtomicBool::new(false),
        }
    }

    /// Returns the KEK for `(key, version)`, calling `load` (on a blocking thread) to
    /// unseal it into locked memory when it is not cached or its `kek_ttl` has passed.
    /// When `load` reports an outage, a KEK still within `offline_grace` is served instead.
    pub async fn get<E, F>(&self, key: &KeyName, version: u32, load: F) -> Result<(Kek, Source), LoadError<E>>
    where
        E: Outage + Send + 'static,
        F: FnOnce(&mut KeySlot) -> Result<(), E> + Send + 'static,
    {
        let now = (self.clock)();
        let entry = self.entry(key, version);
        entry.last_used_ms.store(now.as_millis(), Ordering::Relaxed);
        if let Some(hit) = self.lookup(&entry, now) {
            return Ok(hit);
        }
        let _loading = entry.loading.lock().await;
        // Someone else may have loaded it while we waited (the single flight), or found the
        // root key down.
        if let Some(hit) = self.lookup(&entry, (self.clock)()) {
            return Ok(hit);
        }
        match self.load_into(&entry, load).await {
            Ok(kek) => Ok((kek, Source::Root)),
            Err(LoadError::Load(e)) if e.is_outage() => match self.in_grace(&entry, (self.clock)()) {
                Some(kek) => Ok((kek, Source::Grace)),
                None => Err(LoadError::Load(e)),
            },
            Err(e) => Err(e),
        }
    }

    /// Unseals again a KEK due for refresh (see [`KekCache::due_for_refresh`]), unless a
    /// request is loading it right now. Requests keep using the old KEK meanwhile.
    pub async fn refresh<E, F>(&self, key: &KeyName, version: u32, load: F) -> Result<(), LoadError<E>>
    where
        E: Outage + Send + 'static,
        F: FnOnce(&mut KeySlot) -> Result<(), E> + Send + 'static,
    {
        let entry = {
            let entries = self.entries.lock().expect("cache lock");
            match entries.get(key).and_then(|m| m.get(&version)) {
                Some(e) => Arc::clone(e),
                None => return Ok(()),
            }
        };
        let Ok(_loading) = entry.loading.try_lock() else { return Ok(()) };
        self.load_into(&entry, load).await.map(drop)
    }

    /// One root-key call into a fresh slot, recorded in the lease state.
    async fn load_into<E, F>(&self, entry: &Entry, load: F) -> Result<Kek, LoadError<E>>
    where
        E: Outage + Send + 'static,
        F: FnOnce(&mut KeySlot) -> Result<(), E> + Send + 'static,
    {
        let mut slot = self.arena.alloc()?;
        self.root_calls.fetch_add(1, Ordering::Relaxed);
        let loaded = tokio::task::spawn_blocking(move || load(&mut slot).map(|()| slot))
            .await
            .expect("KEK loader does not panic");
        match loaded {
            Ok(slot) => {
                let kek = Arc::new(slot);
                let now = (self.clock)();
                *entry.loaded.write().expect("cache entry lock") =
                    Some(Loaded { kek: Arc::clone(&kek), fetched: now });
                self.root_ok_at(now);
                Ok(kek)
            }
            Err(e) => {
                if e.is_outage() {
                    self.root_down.store(true, Ordering::Relaxed);
                }
                Err(LoadError::Load(e))
            }
        }
    }

    /// A KEK to serve without calling the root key: within `kek_ttl`, or within the grace
    /// while the root key is known to be down.
    fn lookup(&self, entry: &Entry, now: BootInstant) -> Option<(Kek, Source)> {
        let loaded = entry.loaded.read().expect("cache entry lock");
        let l = loaded.as_ref()?;
        if now.since(l.fetched) < self.lease.kek_ttl {
            return Some((Arc::clone(&l.kek), Source::Cache));
        }
        drop(loaded);
        if self.root_down.load(Ordering::Relaxed) {
            return self.in_grace(entry, now).map(|k| (k, Source::Grace));
        }
        None
    }

    /// The entry's KEK, if the last successful root-key operation is less than
    /// `offline_grace` ago.
    fn in_grace(&self, entry: &Entry, now: BootInstant) -> Option<Kek> {
        if !self.grace_holds(now) {
            return None;
        }
        entry.loaded.read().expect("cache entry lock").as_ref().map(|l| Arc::clone(&l.kek))
    }

    fn grace_holds(&self, now: BootInstant) -> bool {
        now.since(BootInstant::from_millis(self.root_ok_ms.load(Ordering::Relaxed)))
            < self.lease.offline_grace
    }

    /// A root-key operation succeeded (a canary, say): the root key is reachable.
    pub fn root_ok(&self) {
        self.root_ok_at((self.clock)());
    }

    fn root_ok_at(&self, now: BootInstant) {
        self.root_ok_ms.fetch_max(now.as_millis(), Ordering::Relaxed);
        self.root_down.store(false, Ordering::Relaxed);
    }

    /// A root-key operation found the root key unreachable.
    pub fn root_unreachable(&self) {
        self.root_down.store(true, Ordering::Relaxed);
    }

    /// Whether the root key is known to be unreachable, and if so whether cached KEKs are
    /// still within their grace.
    pub fn lease_state(&self) -> LeaseState {
        if !self.root_down.load(Ordering::Relaxed) {
            LeaseState::Online
        } else if self.grace_holds((self.clock)()) {
            LeaseState::Grace
        } else {
            LeaseState::Expired
        }
    }

    /// KEK versions used since they were unsealed and past three quarters of `kek_ttl`:
    /// what the background refresh unseals again. While the root key is down, just one, as
    /// a probe.
    pub fn due_for_refresh(&self) -> Vec<(KeyName, u32)> {
        let now = (self.clock)();
        let refresh_after = self.lease.kek_ttl * 3 / 4;
        let entries = self.entries.lock().expect("cache lock");
        let mut due = Vec::new();
        for (key, versions) in entries.iter() {
            for (&version, e) in versions {
                let loaded = e.loaded.read().expect("cache entry lock");
                let Some(l) = loaded.as_ref() else { continue };
                let used = BootInstant::from_millis(e.last_used_ms.load(Ordering::Relaxed));
                if now.since(l.fetched) >= refresh_after && used > l.fetched {
                    due.push((key.clone(), version));
                }
            }
        }
        if self.root_down.load(Ordering::Relaxed) {
            due.truncate(1);
        }
        due
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

    /// Evicts KEKs idle for `idle_ttl`, and KEKs past `kek_ttl` once `offline_grace` has
    /// run out since the last successful root-key operation. Until then an expired KEK
    /// stays, unused: a request calls the root key first and serves it only if that call
    /// finds the root key unreachable. Run periodically.
    pub fn sweep(&self) {
        let now = (self.clock)();
        let graced = self.grace_holds(now);
        self.evict_where(|e| {
            let loaded = e.loaded.read().expect("cache entry lock");
            let idle = now.since(BootInstant::from_millis(e.last_used_ms.load(Ordering::Relaxed)));
            match loaded.as_ref() {
                Some(l) => {
                    (now.since(l.fetched) >= self.lease.kek_ttl && !graced) || idle >= self.lease.idle_ttl
                }
                None => idle >= self.lease.idle_ttl,
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

    /// A slot of locked memory outside the cache, for a KEK that passes through without
    /// being cached (a root key rotation rewraps it). Wiped when dropped.
    pub fn scratch(&self) -> Result<KeySlot, MemoryError> {
        self.arena.alloc()
    }

    /// Evicts every KEK of the keys below `key` in a key chain (`key/…`).
    pub fn evict_descendants(&self, key: &KeyName) {
        let prefix = format!("{key}/");
        let mut entries = self.entries.lock().expect("cache lock");
        entries.retain(|name, versions| {
            if !name.as_str().starts_with(&prefix) {
                return true;
            }
            for e in versions.values() {
                e.loaded.write().expect("cache entry lock").take();
            }
            false
        });
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

/// The root key's state as the cache sees it, for status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// The last root-key call succeeded.
    Online,
    /// The root key is unreachable; cached KEKs serve within `offline_grace`.
    Grace,
    /// The root key is unreachable and the grace has run out: only fresh KEKs serve.
    Expired,
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

    impl Outage for () {
        fn is_outage(&self) -> bool {
            false
        }
    }

    /// "down" is an outage, anything else a refusal.
    impl Outage for &'static str {
        fn is_outage(&self) -> bool {
            *self == "down"
        }
    }

    fn lease(offline_grace: u64) -> Lease {
        Lease {
            kek_ttl: Duration::from_secs(60),
            idle_ttl: Duration::from_secs(10),
            offline_grace: Duration::from_secs(offline_grace),
        }
    }

    fn cache(clock: Clock) -> KekCache {
        KekCache::with_clock(LockedArena::new(false).unwrap(), lease(3600), clock)
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

    fn fill(v: u8) -> impl FnOnce(&mut KeySlot) -> Result<(), &'static str> {
        move |slot: &mut KeySlot| {
            slot.bytes_mut().fill(v);
            Ok(())
        }
    }

    fn fail(e: &'static str) -> impl FnOnce(&mut KeySlot) -> Result<(), &'static str> {
        move |_: &mut KeySlot| Err(e)
    }

    #[tokio::test]
    async fn an_outage_serves_cached_keks_for_the_grace_then_fails() {
        let (clock, t) = manual_clock();
        let c = KekCache::with_clock(LockedArena::new(false).unwrap(), lease(100), clock);
        c.get(&name(), 1, fill(4)).await.unwrap();
        assert_eq!(c.lease_state(), LeaseState::Online);
        // Past kek_ttl with the root key down: the old KEK serves, marked as grace.
        t.fetch_add(61_000, Ordering::Relaxed);
        let (kek, source) = c.get(&name(), 1, fail("down")).await.unwrap();
        assert_eq!((kek.bytes(), source), (&[4u8; 32], Source::Grace));
        assert_eq!(c.lease_state(), LeaseState::Grace);
        // Known to be down: requests in the grace do not call the root key at all.
        let calls = c.root_calls();
        let (_, source) = c.get(&name(), 1, fail("down")).await.unwrap();
        assert_eq!((source, c.root_calls()), (Source::Grace, calls));
        c.sweep();
        assert_eq!(c.len(), 1, "the sweeper keeps KEKs in their grace");
        // 100 s after the last success, the grace is over: fail, and evict.
        t.fetch_add(39_000, Ordering::Relaxed);
        assert!(matches!(c.get(&name(), 1, fail("down")).await, Err(LoadError::Load("down"))));
        assert_eq!(c.lease_state(), LeaseState::Expired);
        c.sweep();
        assert_eq!(c.len(), 0);
        // The root key is back: served again at once.
        assert_eq!(c.get(&name(), 1, fill(4)).await.unwrap().1, Source::Root);
        assert_eq!(c.lease_state(), LeaseState::Online);
    }

    #[tokio::test]
    async fn a_zero_grace_fails_closed_at_kek_ttl() {
        let (clock, t) = manual_clock();
        let c = KekCache::with_clock(LockedArena::new(false).unwrap(), lease(0), clock);
        c.get(&name(), 1, fill(4)).await.unwrap();
        t.fetch_add(59_000, Ordering::Relaxed);
        assert_eq!(c.get(&name(), 1, fail("down")).await.unwrap().1, Source::Cache);
        t.fetch_add(1_000, Ordering::Relaxed);
        assert!(matches!(c.get(&name(), 1, fail("down")).await, Err(LoadError::Load("down"))));
        c.sweep();
        assert_eq!(c.len(), 0);
    }

    #[tokio::test]
    async fn a_refusal_gets_no_grace() {
        let (clock, t) = manual_clock();
        let c = cache(clock);
        c.get(&name(), 1, fill(4)).await.unwrap();
        t.fetch_add(61_000, Ordering::Relaxed);
        assert!(matches!(c.get(&name(), 1, fail("refused")).await, Err(LoadError::Load("refused"))));
        assert_eq!(c.lease_state(), LeaseState::Online, "a refusal is an answer, not an outage");
    }

    #[tokio::test]
    async fn keks_in_use_are_refreshed_before_kek_ttl() {
        let (clock, t) = manual_clock();
        let c = cache(clock);
        c.get(&name(), 1, fill(1)).await.unwrap();
        c.get(&name(), 2, fill(2)).await.unwrap();
        t.fetch_add(10_000, Ordering::Relaxed);
        c.get(&name(), 1, fill(9)).await.unwrap(); // used; version 2 is not
        t.fetch_add(34_000, Ordering::Relaxed);
        assert!(c.due_for_refresh().is_empty(), "not yet at three quarters of kek_ttl");
        t.fetch_add(1_000, Ordering::Relaxed);
        assert_eq!(c.due_for_refresh(), vec![(name(), 1)], "only the KEK used since it was unsealed");
        c.refresh(&name(), 1, fill(5)).await.unwrap();
        assert!(c.due_for_refresh().is_empty());
        // Past the original kek_ttl, the refreshed KEK serves from the cache.
        t.fetch_add(20_000, Ordering::Relaxed);
        let (kek, source) = c.get(&name(), 1, fail("down")).await.unwrap();
        assert_eq!((kek.bytes(), source), (&[5u8; 32], Source::Cache));
        // A refresh that finds the root key down keeps the old KEK and marks the outage;
        // then only one KEK is probed per round.
        t.fetch_add(50_000, Ordering::Relaxed);
        c.get(&name(), 2, fill(2)).await.unwrap();
        t.fetch_add(46_000, Ordering::Relaxed);
        c.get(&name(), 2, fill(2)).await.unwrap();
        assert_eq!(c.due_for_refresh().len(), 2);
        assert!(c.refresh(&name(), 1, fail("down")).await.is_err());
        assert_eq!(c.lease_state(), LeaseState::Grace);
        assert_eq!(c.due_for_refresh().len(), 1);
    }
}
