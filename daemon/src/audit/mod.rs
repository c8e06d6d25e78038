//! The audit trail: one hash-chained JSON line per request (its items, each named by its
//! EDEK, inside), admin action, denial and lease event (docs/FORMATS.md §5).
//!
//! Requests build their records on their own tasks and answer only after the records
//! were written: in `fail_closed` mode a record that cannot be written turns the answer
//! into UNAVAILABLE, and no key material leaves. How they are written depends on the fsync
//! policy (see [`Sink`]): under a lock by the request itself when a write is only a copy
//! into the page cache, or by one writer thread that groups the records of every request
//! waiting at that moment when each write ends in an fsync.

mod combine;
mod record;
mod syslog;
mod writer;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::Duration;

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
        let core = Core { w, tenant: tenant.to_owned(), mode: cfg.mode, syslog, outage: None, capped: None };
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(|e| format!("cannot start the audit writer: {e}"))
        };
        let sink = if cfg.fsync == FsyncPolicy::Interval {
            let core = Arc::new(Mutex::new(core));
            let stop = Arc::new(AtomicBool::new(false));
            let (c, s, every) = (Arc::clone(&core), Arc::clone(&stop), cfg.fsync_interval);
            let syncer = spawn("kekd-audit-sync", Box::new(move || sync_every(&c, &s, every)))?;
            Sink::Inline { core, groups: Default::default(), stop, syncer: Some(syncer.thread().clone()) }
        } else {
            let (tx, rx) = mpsc::channel();
            spawn("kekd-audit", Box::new(move || group_commit(core, rx)))?;
            Sink::Thread(tx)
        };
        let audit = Audit { sink, mode: cfg.mode };
        audit.event(Records::event(tenant, "audit", Ok(()), opened));
        Ok(audit)
    }

    pub fn mode(&self) -> AuditMode {
        self.mode
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

    /// Writes what is queued, fsyncs, and stops the writer (shutdown).
    pub async fn close(&self) {
        match &self.sink {
            Sink::Inline { core, groups, stop, syncer } => {
                stop.store(true, Ordering::SeqCst);
                if let Some(t) = syncer {
                    t.unpark();
                }
                groups.flush(|group| lock(core).write_and_forward(group));
                lock(core).sync();
            }
            Sink::Thread(tx) => {
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

/// The writer thread of `fsync = "record" | "batch"`.
fn group_commit(mut core: Core, rx: mpsc::Receiver<Msg>) {
    while let Ok(first) = rx.recv() {
        let mut group = Vec::new();
        let mut count = 0;
        let mut waiting = Vec::new();
        let mut close = None;
        let mut next = Some(first);
        while let Some(m) = next.take() {
            match m {
                Msg::Write(records, done) => {
                    count += records.len();
                    group.push(*records);
                    waiting.extend(done);
                }
                Msg::Close(done) => {
                    close = Some(done);
                    break;
                }
            }
            if count < MAX_GROUP {
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
}

impl Core {
    fn write_and_forward(&mut self, group: Vec<Records>) -> Written {
        let result = self.write(group);
        if result.is_ok() {
            self.forward();
        }
        result
    }

    fn forward(&mut self) {
        if let Some(s) = &self.syslog {
            s.send(self.w.written());
        }
    }

    fn write(&mut self, mut group: Vec<Records>) -> Written {
        let count = group.iter().map(Records::len).sum::<usize>() as u64;
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
