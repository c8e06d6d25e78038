//! Every root-key call bounded in time (DESIGN §9).
//!
//! A network HSM can stop answering without closing its link, and a PKCS#11 call then
//! blocks inside the module for as long as the module likes: nothing in PKCS#11 cancels a
//! call in flight. [`Bounded`] wraps any [`RootKey`] and runs each of its calls on a helper
//! thread, waiting at most the tenant's `call_timeout`. Past it the caller gets
//! [`BackendError::Unreachable`] (UNAVAILABLE for the client, retryable) naming the setting,
//! and the thread is abandoned where it is stuck.
//!
//! A module stuck in a call cannot be trusted again in this process (it may hold its own
//! locks, a session, a slot), so a timed-out call *wedges* the wrapper: every later call of
//! it, and of its siblings, fails at once without entering the module, and the wedge is
//! announced to the worker's control loop ([`wedged`]), which asks the supervisor to
//! replace the worker. The replacement loads the module afresh.
//!
//! The bound lives here, outside the backends, so that it holds for any backend and for any
//! of its calls (seal, unseal, canary, and those of a root key rotation or import) whatever
//! the backend does inside.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::{BackendError, RootKey, TransportKey, WrappingAlgorithm, KEK_LEN};
use crate::secret::{KeySlot, LockedArena};

/// A root-key call that did not return in time: what was called, and the setting that
/// bounded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stuck {
    /// The [`RootKey`] method, e.g. `unseal`.
    pub call: &'static str,
    /// The bound it overran.
    pub after: Duration,
    /// The setting that bounds it, e.g. `tenants.acme.pkcs11.call_timeout`.
    pub setting: Arc<str>,
}

/// Why a bounded call failed without an answer from the backend.
#[derive(Debug, thiserror::Error)]
pub enum BoundError {
    /// The call did not return within its bound.
    #[error("the root key's {} call did not return within {} ({}); this worker is replaced", .0.call, humantime::format_duration(.0.after), .0.setting)]
    TimedOut(Stuck),
    /// An earlier call is still stuck in the backend, which is not entered again.
    #[error("an earlier {} call of the root key is stuck past {} ({}); this worker is being replaced", .0.call, humantime::format_duration(.0.after), .0.setting)]
    Wedged(Stuck),
    /// No thread could be started for the call.
    #[error("cannot start a thread for a root-key call: {0}")]
    Thread(#[source] std::io::Error),
    /// The backend panicked in the call.
    #[error("the root key's {0} call panicked")]
    Panicked(&'static str),
}

impl From<BoundError> for BackendError {
    fn from(e: BoundError) -> Self {
        match e {
            BoundError::TimedOut(_) | BoundError::Wedged(_) => BackendError::Unreachable(e.to_string()),
            BoundError::Thread(_) | BoundError::Panicked(_) => BackendError::Internal(e.to_string()),
        }
    }
}

/// The wedge shared by a root key and its siblings: one module, one fate.
#[derive(Debug)]
struct Guard {
    timeout: Duration,
    setting: Arc<str>,
    stuck: OnceLock<Stuck>,
}

impl Guard {
    fn wedge(&self, call: &'static str) -> Stuck {
        let stuck = Stuck { call, after: self.timeout, setting: Arc::clone(&self.setting) };
        if self.stuck.set(stuck.clone()).is_ok() {
            announce(stuck.clone());
        }
        stuck
    }
}

/// A [`RootKey`] whose every call returns within `timeout` (or fails as unreachable).
pub struct Bounded {
    inner: Arc<dyn RootKey>,
    guard: Arc<Guard>,
    helpers: Arc<Helpers>,
    /// Where a KEK on its way to or from a call's thread waits: locked memory, like every
    /// KEK of the worker, and a slot of its own, since a call abandoned past the bound may
    /// still write into it after the caller has moved on.
    arena: Arc<LockedArena>,
}

impl Bounded {
    /// Wraps `inner`; `setting` names the bound in errors and logs.
    pub fn wrap(
        inner: Arc<dyn RootKey>,
        timeout: Duration,
        setting: impl Into<Arc<str>>,
        arena: Arc<LockedArena>,
    ) -> Arc<dyn RootKey> {
        let guard = Guard { timeout, setting: setting.into(), stuck: OnceLock::new() };
        Arc::new(Bounded { inner, guard: Arc::new(guard), helpers: Arc::default(), arena })
    }

    fn slot(&self) -> Result<KeySlot, BackendError> {
        self.arena.alloc().map_err(|e| BackendError::Internal(format!("no locked memory for a KEK: {e}")))
    }

    /// Runs `f` on a helper thread and waits for it at most the bound.
    fn call<T, F>(&self, call: &'static str, f: F) -> Result<T, BackendError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn RootKey) -> Result<T, BackendError> + Send + 'static,
    {
        if let Some(stuck) = self.guard.stuck.get() {
            return Err(BoundError::Wedged(stuck.clone()).into());
        }
        let inner = Arc::clone(&self.inner);
        // Room for the one answer, so the thread never blocks on a caller that gave up.
        let (tx, rx) = mpsc::sync_channel(1);
        self.helpers
            .run(Box::new(move || {
                let _ = tx.send(f(&*inner));
            }))
            .map_err(BoundError::Thread)?;
        let started = Instant::now();
        match rx.recv_timeout(self.guard.timeout) {
            Ok(answer) => answer,
            Err(RecvTimeoutError::Timeout) => {
                let stuck = self.guard.wedge(call);
                limited_error!(call, waited_ms = started.elapsed().as_millis() as u64, setting = %stuck.setting, "a root-key call hangs; the worker is replaced");
                Err(BoundError::TimedOut(stuck).into())
            }
            Err(RecvTimeoutError::Disconnected) => Err(BoundError::Panicked(call).into()),
        }
    }
}

impl RootKey for Bounded {
    fn seal(&self, aad: &[u8], kek: &[u8; KEK_LEN]) -> Result<Vec<u8>, BackendError> {
        let aad = aad.to_vec();
        // A locked slot of the call's own: moving it to the call's thread moves a handle,
        // not the key.
        let mut slot = self.slot()?;
        slot.bytes_mut().copy_from_slice(kek);
        self.call("seal", move |root| root.seal(&aad, slot.bytes()))
    }

    /// The call's thread unseals into a locked slot of its own, wiped when dropped: `out`
    /// may not outlive a call that is abandoned, the slot may.
    fn unseal(&self, aad: &[u8], sealed: &[u8], out: &mut [u8; KEK_LEN]) -> Result<(), BackendError> {
        let (aad, sealed) = (aad.to_vec(), sealed.to_vec());
        let mut slot = self.slot()?;
        let slot = self.call("unseal", move |root| {
            root.unseal(&aad, &sealed, slot.bytes_mut())?;
            Ok(slot)
        })?;
        out.copy_from_slice(slot.bytes());
        Ok(())
    }

    fn canary(&self) -> Result<(), BackendError> {
        self.call("canary", |root| root.canary())
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    /// Kept from the open, not asked of the module: no call to bound.
    fn exceptions(&self) -> Vec<String> {
        self.inner.exceptions()
    }

    /// The sibling shares this key's bound and wedge: it lives in the same module.
    fn sibling(&self, label: &str) -> Result<Arc<dyn RootKey>, BackendError> {
        let label = label.to_owned();
        let inner = self.call("sibling", move |root| root.sibling(&label))?;
        Ok(Arc::new(Bounded {
            inner,
            guard: Arc::clone(&self.guard),
            helpers: Arc::clone(&self.helpers),
            arena: Arc::clone(&self.arena),
        }))
    }

    fn transport_key(&self, label: &str) -> Result<TransportKey, BackendError> {
        let label = label.to_owned();
        self.call("transport_key", move |root| root.transport_key(&label))
    }

    fn import_root_key(
        &self,
        label: &str,
        algorithm: WrappingAlgorithm,
        wrapped: &[u8],
    ) -> Result<(), BackendError> {
        let (label, wrapped) = (label.to_owned(), wrapped.to_vec());
        self.call("import_root_key", move |root| root.import_root_key(&label, algorithm, &wrapped))
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// How long a helper thread waits for its next call before it ends.
const HELPER_IDLE: Duration = Duration::from_secs(30);

/// The threads that run the calls. One that finished a call waits for the next, so that a
/// call costs a hand-over (7–9 µs measured on the project's 2-core machines) rather than a
/// thread start (100–220 µs, more than a SoftHSM2 unseal); one stuck in a call is simply
/// never reused.
#[derive(Default)]
struct Helpers {
    /// Helpers waiting for a call: an id and the way to hand it one.
    idle: Mutex<Vec<(u64, mpsc::Sender<Job>)>>,
    next_id: AtomicU64,
}

impl Helpers {
    fn idle(&self) -> MutexGuard<'_, Vec<(u64, mpsc::Sender<Job>)>> {
        // Every change is one push or one removal: a poisoned list is still consistent.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hands `job` to an idle helper, or to a new one.
    fn run(self: &Arc<Self>, job: Job) -> std::io::Result<()> {
        let idle = self.idle().pop();
        match idle {
            // A helper taken off the list waits for exactly this job (see `serve`), so the
            // send cannot fail; if it did, the job's answer channel closes with it and the
            // caller reports the call as failed.
            Some((_, helper)) => {
                let _ = helper.send(job);
                Ok(())
            }
            None => {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let helpers = Arc::downgrade(self);
                std::thread::Builder::new()
                    .name("kekd-root-call".into())
                    .spawn(move || serve(helpers, id, job))
                    .map(drop)
            }
        }
    }
}

/// A helper thread: runs `job`, then offers itself for the next one until it has been idle
/// for [`HELPER_IDLE`] (or the root key is gone).
fn serve(helpers: Weak<Helpers>, id: u64, mut job: Job) {
    let (tx, rx) = mpsc::channel::<Job>();
    loop {
        job();
        let Some(pool) = helpers.upgrade() else { return };
        pool.idle().push((id, tx.clone()));
        drop(pool);
        job = match rx.recv_timeout(HELPER_IDLE) {
            Ok(next) => next,
            Err(_) => {
                let Some(pool) = helpers.upgrade() else { return };
                let mut idle = pool.idle();
                match idle.iter().position(|(i, _)| *i == id) {
                    // Still on the list: nobody can hand it a job any more once it is off.
                    Some(at) => {
                        idle.swap_remove(at);
                        return;
                    }
                    // Taken off the list just now: its job is on the way.
                    None => {
                        drop(idle);
                        match rx.recv() {
                            Ok(next) => next,
                            Err(_) => return,
                        }
                    }
                }
            }
        };
    }
}

/// The process's wedge announcements: `Some` once any bounded call of this process hung.
/// Per process, because what hung is a library loaded into the whole process.
fn announcements() -> &'static watch::Sender<Option<Stuck>> {
    static SENDER: OnceLock<watch::Sender<Option<Stuck>>> = OnceLock::new();
    SENDER.get_or_init(|| watch::Sender::new(None))
}

fn announce(stuck: Stuck) {
    announcements().send_replace(Some(stuck));
}

/// Resolves once a bounded call of this process has hung (at once if one already did),
/// with what hung. The worker's control loop waits on it to ask for its replacement.
pub async fn wedged() -> Stuck {
    let mut rx = announcements().subscribe();
    let stuck = rx.wait_for(Option::is_some).await.ok().and_then(|stuck| stuck.clone());
    match stuck {
        Some(stuck) => stuck,
        // The sender is a static and never dropped.
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;

    /// A root key whose calls block while `hang` is set, and count how often they ran.
    #[derive(Default)]
    struct Slow {
        hang: AtomicBool,
        calls: AtomicUsize,
        panic: AtomicBool,
    }

    impl Slow {
        fn enter(&self) {
            self.calls.fetch_add(1, Ordering::SeqCst);
            assert!(!self.panic.load(Ordering::SeqCst), "the backend panics");
            let until = Instant::now() + Duration::from_secs(30);
            while self.hang.load(Ordering::SeqCst) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    impl RootKey for Arc<Slow> {
        fn seal(&self, aad: &[u8], kek: &[u8; KEK_LEN]) -> Result<Vec<u8>, BackendError> {
            self.enter();
            Ok([aad, &kek[..]].concat())
        }
        fn unseal(&self, aad: &[u8], sealed: &[u8], out: &mut [u8; KEK_LEN]) -> Result<(), BackendError> {
            self.enter();
            let kek = sealed.strip_prefix(aad).ok_or(BackendError::DataInvalid)?;
            out.copy_from_slice(kek);
            Ok(())
        }
        fn canary(&self) -> Result<(), BackendError> {
            self.enter();
            Ok(())
        }
        fn describe(&self) -> String {
            "slow".into()
        }
        fn sibling(&self, _label: &str) -> Result<Arc<dyn RootKey>, BackendError> {
            self.enter();
            Ok(Arc::new(Arc::clone(self)))
        }
        fn transport_key(&self, _label: &str) -> Result<TransportKey, BackendError> {
            Err(BackendError::Config("imports nothing".into()))
        }
        fn import_root_key(&self, _: &str, _: WrappingAlgorithm, _: &[u8]) -> Result<(), BackendError> {
            Err(BackendError::Config("imports nothing".into()))
        }
    }

    const SETTING: &str = "tenants.acme.pkcs11.call_timeout";

    fn bounded(slow: &Arc<Slow>, timeout: Duration) -> Arc<dyn RootKey> {
        Bounded::wrap(Arc::new(Arc::clone(slow)), timeout, SETTING, LockedArena::new(true).unwrap())
    }

    #[test]
    fn answers_pass_through_within_the_bound() {
        let slow = Arc::new(Slow::default());
        let root = bounded(&slow, Duration::from_secs(10));
        let kek = [7u8; KEK_LEN];
        let sealed = root.seal(b"aad", &kek).unwrap();
        let mut out = [0u8; KEK_LEN];
        root.unseal(b"aad", &sealed, &mut out).unwrap();
        assert_eq!(out, kek);
        assert!(matches!(root.unseal(b"other", &sealed, &mut out), Err(BackendError::DataInvalid)));
        root.canary().unwrap();
        assert_eq!(root.describe(), "slow");
        assert!(matches!(root.transport_key("x"), Err(BackendError::Config(_))));
        assert_eq!(slow.calls.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn a_hanging_call_is_unreachable_after_the_bound_and_wedges_the_key_and_its_siblings() {
        let slow = Arc::new(Slow::default());
        let root = bounded(&slow, Duration::from_millis(200));
        let sibling = root.sibling("next").unwrap();
        slow.hang.store(true, Ordering::SeqCst);

        let started = Instant::now();
        let mut out = [0u8; KEK_LEN];
        let err = root.unseal(b"aad", b"aad-sealed", &mut out).unwrap_err();
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_secs(5),
            "answered after {took:?}"
        );
        let BackendError::Unreachable(message) = &err else { panic!("not unreachable: {err:?}") };
        assert!(message.contains(SETTING) && message.contains("unseal"), "{message}");
        assert_eq!(out, [0u8; KEK_LEN], "nothing is written to the caller's buffer");

        // The module is not entered again, not even once it answers.
        slow.hang.store(false, Ordering::SeqCst);
        let calls = slow.calls.load(Ordering::SeqCst);
        for err in [root.canary().unwrap_err(), sibling.canary().unwrap_err()] {
            let BackendError::Unreachable(message) = &err else { panic!("not unreachable: {err:?}") };
            assert!(message.contains("stuck") && message.contains(SETTING), "{message}");
        }
        assert_eq!(slow.calls.load(Ordering::SeqCst), calls, "a wedged key calls nothing");

        // And the worker's control loop hears of it.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let stuck =
            rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), wedged()).await }).unwrap();
        assert_eq!(stuck.setting.as_ref(), SETTING);
    }

    #[test]
    fn calls_reuse_their_threads() {
        let slow = Arc::new(Slow::default());
        let root = Bounded::wrap(
            Arc::new(Arc::clone(&slow)),
            Duration::from_secs(10),
            SETTING,
            LockedArena::new(true).unwrap(),
        );
        let threads = || {
            std::fs::read_dir("/proc/self/task")
                .unwrap()
                .filter(|t| {
                    let comm = std::fs::read_to_string(t.as_ref().unwrap().path().join("comm")).unwrap();
                    comm.trim() == "kekd-root-call"
                })
                .count()
        };
        let before = threads();
        for _ in 0..50 {
            root.canary().unwrap();
        }
        // Other tests of this process may run calls at the same time: a few threads, not 50.
        assert!(threads() <= before + 4, "{} root-call threads for 50 calls in a row", threads() - before);
    }

    #[test]
    fn a_panicking_backend_is_an_internal_error() {
        let slow = Arc::new(Slow::default());
        slow.panic.store(true, Ordering::SeqCst);
        let root = bounded(&slow, Duration::from_secs(10));
        assert!(matches!(root.canary(), Err(BackendError::Internal(m)) if m.contains("canary")));
        slow.panic.store(false, Ordering::SeqCst);
        root.canary().expect("a panic does not wedge the key");
    }
}
