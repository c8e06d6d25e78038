//! The audit trail: one hash-chained JSON line per key access (each batch item), admin
//! action, denial and lease event (docs/FORMATS.md §5).
//!
//! Requests build their records on their own tasks; one writer thread per tenant gives
//! them their place in the chain and writes whatever has queued up meanwhile in one
//! write, so a write (and, by policy, an fsync) is shared by every request waiting on it.
//! A request answers only after its records were written: in `fail_closed` mode a record
//! that cannot be written turns the answer into UNAVAILABLE, and no key material leaves.

mod record;
mod syslog;
mod writer;

use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub use record::{Access, Caller, Entry, Item, KekFrom, RequestPart, Stamp};
use tokio::sync::oneshot;

use crate::config::{AuditConfig, AuditMode, FsyncPolicy};
use crate::sandbox::RunAs;

/// Most records written in one go; more wait for the next write.
const MAX_GROUP: usize = 8192;

type Done = oneshot::Sender<Result<(), String>>;

enum Msg {
    Write(Vec<Entry>, Option<Done>),
    /// Write what is queued, fsync, and stop.
    Close(Done),
}

/// A tenant's audit trail, shared by its requests.
pub struct Audit {
    tx: mpsc::Sender<Msg>,
    mode: AuditMode,
}

/// The record could not be written; the message is for the log, not the client.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AuditError(pub String);

impl Audit {
    /// Opens `<dir>/<tenant>/`, continuing the chain from its newest record, and starts the
    /// writer. Run as root before the worker drops privileges: it may create the directory
    /// and repair a record a crash left incomplete.
    ///
    /// With `owner` (the worker's `run_as` user), the tenant's directory and its files are
    /// given to that user, and so is every file the writer creates later.
    pub fn open(cfg: &AuditConfig, tenant: &str, owner: Option<&RunAs>) -> Result<Audit, String> {
        let dir = cfg.dir.join(tenant);
        create_dir(&cfg.dir, 0o711).map_err(|e| format!("audit.dir {}: {e}", cfg.dir.display()))?;
        create_dir(&dir, 0o750).map_err(|e| format!("audit.dir {}: {e}", dir.display()))?;
        if let Some(user) = owner {
            user.own_tree(&dir)
                .map_err(|e| format!("cannot hand {} to user {:?}: {e}", dir.display(), user.name))?;
        }
        let owner = owner.map(|u| (u.uid.as_raw(), u.gid.as_raw()));
        let (w, recovered) = writer::Writer::open(&dir, cfg.fsync, owner)
            .map_err(|e| format!("cannot continue the audit trail in {}: {e}", dir.display()))?;
        let (tx, rx) = mpsc::channel();
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
        let syslog = cfg.syslog.as_deref().map(|p| syslog::Syslog::new(p, cfg.facility().unwrap_or(10)));
        let run = Run {
            w,
            rx,
            tenant: tenant.to_owned(),
            mode: cfg.mode,
            interval: (cfg.fsync == FsyncPolicy::Interval).then_some(cfg.fsync_interval),
            syslog,
            outage: None,
        };
        std::thread::Builder::new()
            .name("kekd-audit".into())
            .spawn(move || run.run())
            .map_err(|e| format!("cannot start the audit writer: {e}"))?;
        let audit = Audit { tx, mode: cfg.mode };
        audit.event(Entry::event(tenant, "audit", Ok(()), opened));
        Ok(audit)
    }

    pub fn mode(&self) -> AuditMode {
        self.mode
    }

    /// Writes `entries` and waits until they are written (by policy, on disk).
    pub async fn commit(&self, entries: Vec<Entry>) -> Result<(), AuditError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Msg::Write(entries, Some(done)))
            .map_err(|_| AuditError("the audit writer has stopped".into()))?;
        wait.await.map_err(|_| AuditError("the audit writer has stopped".into()))?.map_err(AuditError)
    }

    /// Queues an event nobody waits on (a lease change).
    pub fn event(&self, entry: Entry) {
        let _ = self.tx.send(Msg::Write(vec![entry], None));
    }

    /// Writes what is queued, fsyncs, and stops the writer (shutdown).
    pub async fn close(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Close(done)).is_ok() {
            let _ = wait.await;
        }
    }
}

fn create_dir(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().recursive(true).mode(mode).create(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Records that could not be written, reported in the trail once it works again.
struct Outage {
    since: String,
    unwritten: u64,
    error: String,
}

/// The writer thread.
struct Run {
    w: writer::Writer,
    rx: mpsc::Receiver<Msg>,
    tenant: String,
    mode: AuditMode,
    interval: Option<Duration>,
    syslog: Option<syslog::Syslog>,
    outage: Option<Outage>,
}

impl Run {
    fn run(mut self) {
        let mut sync_at: Option<Instant> = None;
        loop {
            let first = match sync_at {
                Some(at) => match self.rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(m) => m,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.sync();
                        sync_at = None;
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                },
                None => match self.rx.recv() {
                    Ok(m) => m,
                    Err(_) => break,
                },
            };
            let mut entries = Vec::new();
            let mut waiting = Vec::new();
            let mut close = None;
            let mut next = Some(first);
            while let Some(m) = next.take() {
                match m {
                    Msg::Write(e, done) => {
                        entries.extend(e);
                        waiting.extend(done);
                    }
                    Msg::Close(done) => {
                        close = Some(done);
                        break;
                    }
                }
                if entries.len() < MAX_GROUP {
                    next = self.rx.try_recv().ok();
                }
            }
            let result = self.write(entries);
            for done in waiting {
                let _ = done.send(result.clone());
            }
            // The copy for syslog goes after the answers: it is no part of their latency.
            if let (Ok(()), Some(s)) = (&result, &mut self.syslog) {
                for line in &self.w.written {
                    s.send(line);
                }
            }
            if let Some(interval) = self.interval {
                if sync_at.is_none() {
                    sync_at = Some(Instant::now() + interval);
                }
            }
            if let Some(done) = close {
                self.sync();
                let _ = done.send(Ok(()));
                return;
            }
        }
        self.sync();
    }

    fn write(&mut self, mut entries: Vec<Entry>) -> Result<(), String> {
        if entries.is_empty() {
            return Ok(());
        }
        let count = entries.len() as u64;
        if let Some(o) = &self.outage {
            let detail = serde_json::json!({
                "unwritten_records": o.unwritten, "since": o.since, "mode": self.mode,
            });
            let error = kekd_proto::ErrorStatus::new(kekd_proto::Code::Unavailable, o.error.clone());
            entries.insert(0, Entry::event(&self.tenant, "audit", Err(&error), detail));
        }
        match self.w.append(&entries) {
            Ok(()) => {
                if let Some(o) = self.outage.take() {
                    tracing::warn!(
                        unwritten = o.unwritten,
                        "audit records are written again; the gap is recorded in the trail"
                    );
                }
                Ok(())
            }
            Err(e) => {
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
                Err(error)
            }
        }
    }

    fn sync(&mut self) {
        if let Err(e) = self.w.sync() {
            tracing::error!(error = %e, "cannot fsync the audit trail");
        }
    }
}
