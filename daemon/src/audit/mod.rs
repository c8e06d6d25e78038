//! The audit trail: one hash-chained JSON line per request (its items, each named by its
//! EDEK, inside), admin action, denial and lease event (docs/FORMATS.md §5).
//!
//! Requests build their records on their own tasks and answer only after the records
//! were written: in `fail_closed` mode a record that cannot be written turns the answer
//! into UNAVAILABLE, and no key material leaves. How they are written depends on the fsync
//! policy (see [`Sink`]): under a lock by the request itself when a write is only a copy
//! into the page cache, or by one writer thread that groups the records of every request
//! waiting at that moment when each write ends in an fsync.
//!
//! Every `checkpoint_interval`, and at a clean shutdown, a checkpoint anchors the chain in
//! the tenant's root key ([`anchor`]): an anchor thread gets the key (the one root-key
//! call, off the writers' lock), then the checkpoint is made where records are written.

mod anchor;
mod combine;
pub mod offline;
mod record;
mod syslog;
mod writer;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use anchor::Anchor;
pub use anchor::KeySource;
pub use record::{Access, Caller, EdekId, Entry, Item, KekFrom, Keks, Records, RequestPart, Stamp};
use tokio::sync::oneshot;

use crate::config::{AuditConfig, AuditMode, FsyncPolicy};
use crate::dirfd::Dir;
use crate::sandbox::RunAs;

/// Most records written in one go by the writer thread; more wait for the next write.
const MAX_GROUP: usize = 8192;

type Done = oneshot::Sender<Written>;
pub use combine::Then;

enum Msg {
    /// Boxed: records carry their SHA-256 states, which would make every message as large.
    Write(Box<Records>, Option<Then>),
    /// Write what is queued, then a checkpoint if records were written since the last one
    /// and the key is held.
    Checkpoint,
    /// Write what is queued, fsync, and stop.
    Close(Done),
}

/// How records reach the file, by fsync policy.
enum Sink {
    /// `fsync = "interval"`: a write is a copy into the page cache, a few microseconds, so
    /// the requests' own tasks write their groups ([`combine`]), with no hand-off to
    /// another thread and back on the way to the answer. A thread of its own fsyncs every
    /// interval, outside the writers' lock.
    Inline {
        core: Arc<Mutex<Core>>,
        groups: combine::Combiner,
        stop: Arc<AtomicBool>,
        syncer: Option<std::thread::Thread>,
    },
    /// `fsync = "record" | "batch"`: an fsync takes milliseconds, so one writer thread takes
    /// the records of every request waiting at that moment and writes and fsyncs them
    /// together (group commit).
    Thread(mpsc::Sender<Msg>),
}

/// A tenant's audit trail, shared by its requests.
pub struct Audit {
    sink: Sink,
    mode: AuditMode,
    /// Checkpoints: the key, shared with the writer and the anchor thread.
    anchor: Arc<Anchor>,
    /// Stops the anchor thread.
    anchoring: Stopper,
}

/// A thread that runs until told to stop.
struct Stopper {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::Thread>,
}

impl Stopper {
    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.unpark();
        }
    }
}

/// Why records were not written: told to every request of the group.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// The trail cannot be written; the message, with its cause, is for the log, not the
    /// client.
    #[error("{0}")]
    Failed(String),
    /// The tenant's records of the day reached `audit.max_bytes_per_day`: its operations
    /// fail, whatever `audit.mode` says, until the day (UTC) ends. Nothing was written.
    #[error("the tenant's audit records of {date} (UTC) reached audit.max_bytes_per_day ({cap} bytes)")]
    DailyCap { cap: u64, date: String },
}

/// Whether a group of records was written.
pub type Written = Result<(), WriteError>;

impl Audit {
    /// Opens `<dir>/<tenant>/`, continuing the chain from its newest record, and starts the
    /// writer. Run as root before the worker drops privileges: it may create the directory
    /// and repair a record a crash left incomplete.
    ///
    /// With `owner` (the worker's `run_as` user), the tenant's directory and its files are
    /// given to that user (by descriptor: a link planted there is refused, not followed),
    /// and so is every file the writer creates later.
    pub fn open(cfg: &AuditConfig, tenant: &str, owner: Option<&RunAs>) -> Result<Audit, String> {
        let path = cfg.dir.join(tenant);
        let root = Dir::open_configured(&cfg.dir, 0o711).map_err(|e| format!("audit.dir: {e}"))?;
        let mut dir = root.create_lent_dir(tenant, 0o750).map_err(|e| format!("audit.dir: {e}"))?;
        if let Some(user) = owner {
            dir = dir
                .give_tree(user.uid, user.gid)
                .map_err(|e| format!("cannot hand {} to user {:?}: {e}", path.display(), user.name))?;
        }
        let (mut w, recovered) = writer::Writer::open(dir, cfg.fsync)
            .map_err(|e| format!("cannot continue the audit trail in {}: {e}", path.display()))?;
        w.set_max_bytes_per_day(cfg.max_bytes_per_day);
        let mut opened = serde_json::json!({ "opened": { "pid": std::process::id(), "seq": w.head().seq } });
        if recovered.dropped_bytes > 0 {
            let file = recovered.file.as_ref().map(|f| f.display().to_string());
            tracing::warn!(
                bytes = recovered.dropped_bytes,
                file,
                "cut an incomplete audit record (a crash mid-write) off the trail"
            );
            opened["dropped_incomplete_record_bytes"] = recovered.dropped_bytes.into();
        }
        let syslog = syslog::Syslog::start(cfg, tenant)?;
        let anchor = Arc::new(Anchor::new(tenant));
        let core = Core {
            w,
            tenant: tenant.to_owned(),
            mode: cfg.mode,
            syslog,
            outage: None,
            capped: None,
            anchor: Arc::clone(&anchor),
            anchored: 0,
            closed: false,
        };
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(|e| format!("cannot start the audit writer: {e}"))
        };
        // Where a checkpoint is made: under the writers' lock, or by the writer thread.
        let checkpoint: Box<dyn Fn() + Send>;
        let sink = if cfg.fsync == FsyncPolicy::Interval {
            let core = Arc::new(Mutex::new(core));
            let stop = Arc::new(AtomicBool::new(false));
            let (c, s, every) = (Arc::clone(&core), Arc::clone(&stop), cfg.fsync_interval);
            let syncer = spawn("kekd-audit-sync", Box::new(move || sync_every(&c, &s, every)))?;
            let c = Arc::clone(&core);
            checkpoint = Box::new(move || lock(&c).checkpoint());
            Sink::Inline { core, groups: Default::default(), stop, syncer: Some(syncer.thread().clone()) }
        } else {
            let (tx, rx) = mpsc::channel();
            spawn("kekd-audit", Box::new(move || group_commit(core, rx)))?;
            let t = tx.clone();
            checkpoint = Box::new(move || {
                let _ = t.send(Msg::Checkpoint);
            });
            Sink::Thread(tx)
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s, every) = (Arc::clone(&anchor), Arc::clone(&stop), cfg.checkpoint_interval);
        // Its log lines name the worker's tenant, like the others of the worker.
        let span = tracing::Span::current();
        let anchorer = spawn(
            "kekd-audit-anchor",
            Box::new(move || span.in_scope(|| anchor_every(&a, &s, every, checkpoint))),
        )?;
        let anchoring = Stopper { stop, thread: Some(anchorer.thread().clone()) };
        let audit = Audit { sink, mode: cfg.mode, anchor, anchoring };
        audit.event(Records::event(tenant, "audit", Ok(()), opened));
        Ok(audit)
    }

    pub fn mode(&self) -> AuditMode {
        self.mode
    }

    /// Where the checkpoint key comes from, once the root key is open (the trail is opened
    /// before it): checkpoints are made from the next `checkpoint_interval` on.
    pub fn anchor_with(&self, source: Weak<dyn KeySource>) {
        self.anchor.set_source(source);
    }

    /// Writes `records`; `then` runs once they are written (by policy, on disk), or could
    /// not be: on whichever task or thread wrote them, so it must be quick (send an answer).
    pub async fn commit_then(&self, records: Records, then: Then) {
        match &self.sink {
            Sink::Inline { core, groups, .. } => {
                groups.commit_then(records, then, |group| lock(core).write_and_forward(group)).await
            }
            Sink::Thread(tx) => {
                if let Err(mpsc::SendError(Msg::Write(_, Some(then)))) =
                    tx.send(Msg::Write(Box::new(records), Some(then)))
                {
                    then(Err(WriteError::Failed("the audit writer has stopped".into())));
                }
            }
        }
    }

    /// Writes `records` and waits until they are written (by policy, on disk).
    pub async fn commit(&self, records: Records) -> Written {
        let (done, wait) = oneshot::channel();
        let then: Then = Box::new(move |r| {
            let _ = done.send(r);
        });
        self.commit_then(records, then).await;
        wait.await.map_err(|_| WriteError::Failed("the audit writer has stopped".into()))?
    }

    /// Writes an event nobody waits on (a lease change).
    pub fn event(&self, record: Records) {
        match &self.sink {
            Sink::Inline { core, .. } => {
                let _ = lock(core).write_and_forward(vec![record]);
            }
            Sink::Thread(tx) => {
                let _ = tx.send(Msg::Write(Box::new(record), None));
            }
        }
    }

    /// Writes what is queued and a last checkpoint, fsyncs, and stops the writer (shutdown).
    pub async fn close(&self) {
        self.anchoring.stop.store(true, Ordering::SeqCst);
        if let Some(t) = &self.anchoring.thread {
            t.unpark();
        }
        // The key, if it was never got: one root-key call, on a thread that may block.
        let anchored = if self.anchor.has_source() {
            let (anchor, span) = (Arc::clone(&self.anchor), tracing::Span::current());
            tokio::task::spawn_blocking(move || span.in_scope(|| anchor.ensure_key())).await.unwrap_or(false)
        } else {
            false
        };
        match &self.sink {
            Sink::Inline { core, groups, stop, syncer } => {
                stop.store(true, Ordering::SeqCst);
                if let Some(t) = syncer {
                    t.unpark();
                }
                groups.flush(|group| lock(core).write_and_forward(group));
                let mut core = lock(core);
                if anchored {
                    core.checkpoint();
                }
                // Nothing after the last fsync, the anchor thread's checkpoints included.
                core.closed = true;
                core.sync();
            }
            Sink::Thread(tx) => {
                if anchored {
                    let _ = tx.send(Msg::Checkpoint);
                }
                let (done, wait) = oneshot::channel();
                if tx.send(Msg::Close(done)).is_ok() {
                    let _ = wait.await;
                }
            }
        }
    }
}

impl Drop for Audit {
    fn drop(&mut self) {
        self.anchoring.stop();
        if let Sink::Inline { stop, syncer, .. } = &mut self.sink {
            stop.store(true, Ordering::SeqCst);
            if let Some(t) = syncer.take() {
                t.unpark();
            }
        }
    }
}

fn lock(core: &Mutex<Core>) -> std::sync::MutexGuard<'_, Core> {
    // A panic mid-write leaves the chain at its last whole record: usable.
    core.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The fsync of `fsync = "interval"`, outside the writers' lock: an fsync of one
/// descriptor flushes what every descriptor of the file wrote.
fn sync_every(core: &Mutex<Core>, stop: &AtomicBool, every: Duration) {
    while !stop.load(Ordering::SeqCst) {
        std::thread::park_timeout(every);
        let file = lock(core).w.take_dirty();
        match file {
            Some(f) => match f.sync_data() {
                Ok(()) => writer::release_cache(&f),
                Err(e) => tracing::error!(error = %e, "cannot fsync the audit trail"),
            },
            // Nothing written for an interval: a burst's buffer goes back.
            None => lock(core).w.release_buffer(),
        }
    }
}

/// The anchor thread: every `every`, gets the checkpoint key if it is not held yet (a
/// root-key call, here and not on the writers' path), then has a checkpoint made.
fn anchor_every(anchor: &Anchor, stop: &AtomicBool, every: Duration, checkpoint: Box<dyn Fn() + Send>) {
    loop {
        let due = Instant::now() + every;
        while !stop.load(Ordering::SeqCst) && Instant::now() < due {
            std::thread::park_timeout(due.saturating_duration_since(Instant::now()));
        }
        if stop.load(Ordering::SeqCst) {
            return;
        }
        if anchor.ensure_key() {
            checkpoint();
        }
    }
}

/// The writer thread of `fsync = "record" | "batch"`.
fn group_commit(mut core: Core, rx: mpsc::Receiver<Msg>) {
    while let Ok(first) = rx.recv() {
        let mut group = Vec::new();
        let mut waiting = Vec::new();
        let mut close = None;
        let mut checkpoint = false;
        let mut next = Some(first);
        while let Some(m) = next.take() {
            match m {
                Msg::Write(records, done) => {
                    group.push(*records);
                    waiting.extend(done);
                }
                // After the records queued before it, before those queued after it.
                Msg::Checkpoint => {
                    checkpoint = true;
                    break;
                }
                Msg::Close(done) => {
                    close = Some(done);
                    break;
                }
            }
            if group.len() < MAX_GROUP {
                next = rx.try_recv().ok();
            }
        }
        let result = core.write(group);
        for then in waiting {
            then(result.clone());
        }
        // The copy for syslog goes after the answers: it is no part of their latency.
        if result.is_ok() {
            core.forward();
        }
        if checkpoint {
            core.checkpoint();
        }
        core.w.release_buffer();
        if let Some(done) = close {
            core.sync();
            let _ = done.send(Ok(()));
            return;
        }
    }
    core.sync();
}

/// Records that could not be written, reported in the trail once it works again.
struct Outage {
    since: String,
    unwritten: u64,
    error: String,
}

/// The trail and what to do when writing it fails.
struct Core {
    w: writer::Writer,
    tenant: String,
    mode: AuditMode,
    syslog: Option<syslog::Syslog>,
    outage: Option<Outage>,
    /// The day whose records reached `audit.max_bytes_per_day`, once the trail says so.
    capped: Option<String>,
    anchor: Arc<Anchor>,
    /// `seq` of the last checkpoint written: records after it are not anchored yet.
    anchored: u64,
    /// Shut down: nothing more is written (`fsync = "interval"`, whose writers' lock the
    /// anchor thread may still take).
    closed: bool,
}

impl Core {
    fn write_and_forward(&mut self, group: Vec<Records>) -> Written {
        let result = self.write(group);
        if result.is_ok() {
            self.forward();
        }
        result
    }

    /// Appends a checkpoint naming the chain's head, when records were written since the
    /// last one and the key is held. The MAC is computed and the record appended here,
    /// under the writers' lock (or on the writer thread): the head cannot move in between.
    /// Not while records are going unwritten: the record saying so would come between the
    /// head and its checkpoint; the next interval makes it once writing works again.
    fn checkpoint(&mut self) {
        let head = self.w.head();
        if self.closed || head.seq == 0 || head.seq == self.anchored || self.outage.is_some() {
            return;
        }
        let Some(detail) = self.anchor.detail(&head) else { return };
        let record = Records::event(&self.tenant, anchor::EVENT, Ok(()), detail);
        // A failure is the trail's (logged, and counted like any record's): the next
        // interval tries again.
        if self.write_and_forward(vec![record]).is_ok() {
            self.anchored = self.w.head().seq;
        }
    }

    fn forward(&mut self) {
        if let Some(s) = &self.syslog {
            s.send(self.w.written());
        }
    }

    fn write(&mut self, mut group: Vec<Records>) -> Written {
        let count = group.len() as u64;
        if count == 0 {
            return Ok(());
        }
        if let Some(o) = &self.outage {
            let detail = serde_json::json!({
                "unwritten_records": o.unwritten, "since": o.since, "mode": self.mode,
            });
            let error = kekd_proto::ErrorStatus::new(kekd_proto::Code::Unavailable, o.error.clone());
            group.insert(0, Records::event(&self.tenant, "audit", Err(&error), detail));
        }
        match self.w.append(&group) {
            Ok(()) => {
                if let Some(o) = self.outage.take() {
                    tracing::warn!(
                        unwritten = o.unwritten,
                        "audit records are written again; the gap is recorded in the trail"
                    );
                }
                Ok(())
            }
            Err(writer::AppendError::DailyCap { cap, date }) => {
                let error = WriteError::DailyCap { cap, date };
                self.note_cap(&error);
                Err(error)
            }
            Err(writer::AppendError::Io(e)) => {
                let error = e.to_string();
                match &mut self.outage {
                    Some(o) => o.unwritten += count,
                    None => {
                        match self.mode {
                            AuditMode::FailClosed => {
                                tracing::error!(error = %e, "cannot write audit records: operations fail with UNAVAILABLE until it works again")
                            }
                            AuditMode::BestEffort => {
                                tracing::error!(error = %e, "cannot write audit records: serving without them (audit.mode = \"best_effort\")")
                            }
                        }
                        self.outage = Some(Outage {
                            since: Stamp::now().as_str().to_owned(),
                            unwritten: count,
                            error: error.clone(),
                        });
                    }
                }
                Err(WriteError::Failed(error))
            }
        }
    }

    /// Once a day, when its records first reach `audit.max_bytes_per_day`: one record past
    /// the limit says so (the trail tells why it stops), and the log says it once.
    fn note_cap(&mut self, error: &WriteError) {
        let WriteError::DailyCap { cap, date } = error else { return };
        if self.capped.as_ref() == Some(date) {
            return;
        }
        self.capped = Some(date.clone());
        tracing::error!(
            max_bytes_per_day = cap,
            date,
            "this tenant's audit records reached audit.max_bytes_per_day: its operations fail with RESOURCE_EXHAUSTED until the day (UTC) ends"
        );
        let status = kekd_proto::ErrorStatus::new(kekd_proto::Code::ResourceExhausted, error.to_string());
        let detail = serde_json::json!({ "max_bytes_per_day": cap, "date": date });
        let note = Records::event(&self.tenant, "audit", Err(&status), detail);
        if let Err(e) = self.w.append_past_cap(&[note]) {
            tracing::error!(error = %e, "cannot record that the daily audit limit was reached");
        }
    }

    fn sync(&mut self) {
        if let Err(e) = self.w.sync() {
            tracing::error!(error = %e, "cannot fsync the audit trail");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::secret::{KeySlot, LockedArena};

    /// A checkpoint key of 07 × 32, as a root key would give it.
    struct Fixed(Arc<LockedArena>);

    impl KeySource for Fixed {
        fn checkpoint_key(&self) -> Result<KeySlot, crate::error::Error> {
            let mut slot = self.0.alloc()?;
            slot.bytes_mut().copy_from_slice(&[7; 32]);
            Ok(slot)
        }
    }

    fn records(dir: &Path) -> Vec<serde_json::Value> {
        let mut files: Vec<_> =
            std::fs::read_dir(dir.join("acme")).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        files
            .iter()
            .flat_map(|f| std::fs::read_to_string(f).unwrap().lines().map(String::from).collect::<Vec<_>>())
            .map(|l| serde_json::from_str(&l).unwrap())
            .collect()
    }

    /// Each checkpoint names the record right before it, with the MAC of the document.
    fn check(records: &[serde_json::Value]) -> usize {
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &[7; 32]);
        let mut n = 0;
        for (i, r) in records.iter().enumerate().filter(|(_, r)| r["event"] == "checkpoint") {
            let before = &records[i - 1];
            let d = &r["detail"];
            assert_eq!((&d["seq"], &d["hash"]), (&before["seq"], &before["hash"]), "{r}");
            let hash: [u8; 32] = hex::decode(d["hash"].as_str().unwrap()).unwrap().try_into().unwrap();
            let input = anchor::mac_input("acme", &writer::Head { seq: d["seq"].as_u64().unwrap(), hash });
            let mac = hex::decode(d["mac"].as_str().unwrap()).unwrap();
            aws_lc_rs::hmac::verify(&key, &input, &mac).expect("the MAC of the checkpoint key");
            n += 1;
        }
        n
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn checkpoints_follow_the_interval_and_the_close_with_either_sink() {
        for fsync in [FsyncPolicy::Interval, FsyncPolicy::Batch, FsyncPolicy::Record] {
            let dir = tempfile::tempdir().unwrap();
            let cfg = AuditConfig {
                dir: dir.path().to_owned(),
                fsync,
                checkpoint_interval: Duration::from_millis(50),
                ..Default::default()
            };
            let audit = Audit::open(&cfg, "acme", None).unwrap();
            let source = Arc::new(Fixed(LockedArena::new(false).unwrap()));
            audit.anchor_with(Arc::downgrade(&source) as Weak<Fixed>);
            let event = || Records::event("acme", "lease", Ok(()), serde_json::json!({ "lease": "grace" }));
            audit.commit(event()).await.unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while check(&records(dir.path())) == 0 {
                assert!(Instant::now() < deadline, "{fsync:?}: no checkpoint within 10 s");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // Nothing new: no more checkpoints.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let quiet = records(dir.path());
            assert_eq!(check(&quiet), 1, "{fsync:?}: {quiet:#?}");
            assert_eq!(quiet.last().unwrap()["event"], "checkpoint");
            // Records, then a close: the trail ends with a checkpoint, and the chain holds.
            audit.commit(event()).await.unwrap();
            audit.event(event());
            audit.close().await;
            let all = records(dir.path());
            assert!(check(&all) >= 2, "{fsync:?}: {all:#?}");
            assert_eq!(all.last().unwrap()["event"], "checkpoint", "{fsync:?}: {all:#?}");
            let seqs: Vec<u64> = all.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
            assert_eq!(seqs, (1..=all.len() as u64).collect::<Vec<_>>());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_a_key_no_checkpoint_is_made_and_requests_are_served() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = AuditConfig {
            dir: dir.path().to_owned(),
            checkpoint_interval: Duration::from_millis(20),
            ..Default::default()
        };
        let audit = Audit::open(&cfg, "acme", None).unwrap();
        // The source is gone (or was never set): the worker serves without checkpoints.
        let gone = Arc::new(Fixed(LockedArena::new(false).unwrap()));
        audit.anchor_with(Arc::downgrade(&gone) as Weak<Fixed>);
        drop(gone);
        for _ in 0..5 {
            audit.commit(Records::event("acme", "lease", Ok(()), serde_json::json!({}))).await.unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        audit.close().await;
        let all = records(dir.path());
        assert_eq!(check(&all), 0, "{all:#?}");
        assert_eq!(all.len(), 6);
    }
}
