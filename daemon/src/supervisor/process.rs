//! One tenant's worker process, kept running by the supervisor.
//!
//! A task per tenant spawns the worker (fork+exec of this very binary through
//! `/proc/self/exe`, so an upgrade on disk cannot pair a new worker with an old
//! supervisor; for a TPM tenant, of `kekd-tpm-worker` next to it, since only that binary
//! links libtss2), sends its setup, waits for Ready, and publishes the control channel so
//! the handshake can pass connections. When the worker dies the channel is withdrawn at
//! once (its tenant's new clients get UNAVAILABLE rather than waiting) and the worker is
//! restarted: after [`RESTART_DELAY`] the first time, twice as long after each further
//! crash up to [`MAX_RESTART_DELAY`], and back to the short delay once a worker has stayed
//! up for [`STABLE_AFTER`].
//!
//! A serving worker is watched by a heartbeat ([`ToWorker::Ping`], a quarter of
//! `worker_watchdog` apart). One that leaves it unanswered for `worker_watchdog` (stopped,
//! deadlocked, its runtime wedged) is killed with SIGKILL and restarted the same way: its
//! connections close with it, which their clients see as UNAVAILABLE. A worker whose
//! root-key call hung says so ([`FromWorker::Wedged`]): it takes no new connection from
//! then on, and is restarted once it has exited.

use std::os::unix::process::CommandExt as _;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kekd_proto::TenantName;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::Child;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::BackendConfig;
use crate::handoff::{self, Channel, FromWorker, ToWorker};
use crate::worker::{self, WorkerSpec};

pub const RESTART_DELAY: Duration = Duration::from_millis(100);
pub const MAX_RESTART_DELAY: Duration = Duration::from_secs(30);
/// A worker that served this long before dying was not crash-looping: its successor
/// starts after the short delay again. Shorter than a start takes, a loop would be hot.
pub const STABLE_AFTER: Duration = Duration::from_secs(2);
/// A worker that has not said Ready by then is stuck (the token lock alone gives up
/// sooner) and is killed.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Grace beyond the worker's own drain bound before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Heartbeats per `worker_watchdog`: a worker is declared dead only after missing several.
const PINGS_PER_WATCHDOG: u32 = 4;

/// The current way to a tenant's worker: `None` while it is starting or restarting.
pub type Link = Arc<Mutex<Option<Arc<Channel>>>>;

/// A tenant's worker and the task that keeps it running.
pub struct WorkerProcess {
    spec: WorkerSpec,
    link: Link,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl WorkerProcess {
    /// Starts the supervising task. The receiver gets the first start's outcome: `Ok`
    /// once the worker is serving, or why it could not start. With `give_up`, a failed
    /// first start ends the task (daemon start-up: the operator must see the error);
    /// without, it is retried with backoff like a crash (a reload must not leave a tenant
    /// unattended).
    pub fn spawn(
        tenant: TenantName,
        spec: WorkerSpec,
        give_up: bool,
    ) -> (WorkerProcess, oneshot::Receiver<Result<(), String>>) {
        let link: Link = Arc::default();
        let (stop, stop_rx) = watch::channel(false);
        let (first_tx, first_rx) = oneshot::channel();
        let keeper = Keeper { tenant, spec: spec.clone(), link: Arc::clone(&link), stop: stop_rx };
        let task = tokio::spawn(keeper.run(first_tx, give_up));
        (WorkerProcess { spec, link, stop, task }, first_rx)
    }

    pub fn spec(&self) -> &WorkerSpec {
        &self.spec
    }

    /// A worker that is the test's own end of `channel`: the supervisor side of a hand-off
    /// without a process behind it.
    #[cfg(test)]
    pub fn attached(spec: WorkerSpec, channel: Arc<Channel>) -> WorkerProcess {
        let (stop, _) = watch::channel(false);
        let link = Arc::new(Mutex::new(Some(channel)));
        WorkerProcess { spec, link, stop, task: tokio::spawn(async {}) }
    }

    /// The control channel of the serving worker, if one is serving.
    pub fn link(&self) -> Option<Arc<Channel>> {
        self.link.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Stops the worker gracefully (SIGTERM, then SIGKILL past its drain bound) and
    /// ends the supervising task.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

struct Keeper {
    tenant: TenantName,
    spec: WorkerSpec,
    link: Link,
    stop: watch::Receiver<bool>,
}

/// How one run of a worker ended.
enum Ended {
    /// Asked to stop: the task ends.
    Stopped,
    /// Could not start (the message says why): retry, unless this was the first start of
    /// a task told to give up.
    Failed(String),
    /// Served, then died: restart it.
    Exited(std::io::Result<ExitStatus>),
    /// Served, then had to be replaced (it exited, or was killed): restart it.
    Replaced { why: Replaced, status: std::io::Result<ExitStatus> },
}

/// Why a serving worker was replaced.
enum Replaced {
    /// It left the heartbeat unanswered this long.
    Silent(Duration),
    /// One of its root-key calls hung past the setting that bounds it.
    Wedged { call: String, setting: String, after: Duration },
}

impl std::fmt::Display for Replaced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Replaced::Silent(silent) => {
                write!(f, "it did not answer the heartbeat for {} (worker_watchdog)", fmt_duration(*silent))
            }
            Replaced::Wedged { call, setting, after } => {
                write!(
                    f,
                    "its root-key {call} call did not return within {} ({setting})",
                    fmt_duration(*after)
                )
            }
        }
    }
}

fn fmt_duration(d: Duration) -> humantime::FormattedDuration {
    // Milliseconds at most: nobody needs the nanoseconds of a heartbeat.
    humantime::format_duration(Duration::from_millis(d.as_millis() as u64))
}

impl Keeper {
    async fn run(mut self, first: oneshot::Sender<Result<(), String>>, give_up: bool) {
        let mut first = Some(first);
        let mut delay = RESTART_DELAY;
        loop {
            let started = Instant::now();
            match self.run_once(&mut first).await {
                Ended::Stopped => return,
                Ended::Failed(message) => {
                    if let Some(tx) = first.take() {
                        let _ = tx.send(Err(message.clone()));
                        if give_up {
                            return;
                        }
                    }
                    tracing::error!(tenant = %self.tenant, "worker could not start: {message}");
                }
                Ended::Exited(status) if by_seccomp(&status) => {
                    tracing::error!(tenant = %self.tenant, "worker exited: {}", describe(status))
                }
                Ended::Exited(status) => {
                    tracing::warn!(tenant = %self.tenant, "worker exited: {}", describe(status))
                }
                Ended::Replaced { why, status } => {
                    tracing::warn!(tenant = %self.tenant, "worker replaced: {why}; it ended: {}", describe(status))
                }
            }
            if started.elapsed() >= STABLE_AFTER {
                delay = RESTART_DELAY;
            }
            tracing::info!(tenant = %self.tenant, delay_ms = delay.as_millis() as u64, "restarting the worker");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stopped(&mut self.stop) => return,
            }
            delay = (delay * 2).min(MAX_RESTART_DELAY);
        }
    }

    /// One worker process, from spawn to exit.
    async fn run_once(&mut self, first: &mut Option<oneshot::Sender<Result<(), String>>>) -> Ended {
        let (mut child, channel) = match spawn(&self.spec).await {
            Ok(started) => started,
            Err(e) => return Ended::Failed(format!("cannot start a worker process: {e}")),
        };
        let pid = child.id().unwrap_or(0);
        let ready = tokio::select! {
            r = tokio::time::timeout(READY_TIMEOUT, channel.recv::<FromWorker>()) => r,
            _ = stopped(&mut self.stop) => {
                let _ = child.kill().await;
                return Ended::Stopped;
            }
        };
        match ready {
            Ok(Ok(Some((FromWorker::Ready, _)))) => {}
            Ok(Ok(Some((FromWorker::Failed { message }, _)))) => {
                let _ = child.wait().await;
                return Ended::Failed(message);
            }
            Ok(Ok(Some((other, _)))) => {
                let _ = child.kill().await;
                return Ended::Failed(format!("its worker said {other:?} before it was ready"));
            }
            Ok(Ok(None)) | Ok(Err(_)) => {
                let status = describe(child.wait().await);
                return Ended::Failed(format!("its worker exited before it was ready ({status})"));
            }
            Err(_) => {
                let _ = child.kill().await;
                return Ended::Failed(format!("its worker was not ready within {READY_TIMEOUT:?}"));
            }
        }
        // Our own reference keeps the channel open until the worker is gone: a worker that
        // sees it close thinks the supervisor died.
        let channel = Arc::new(channel);
        *self.link.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&channel));
        if let Some(tx) = first.take() {
            let _ = tx.send(Ok(()));
        }
        tracing::info!(tenant = %self.tenant, pid, "worker ready");
        let watched = self.watch(&mut child, &channel, pid).await;
        if let Watched::Stopped = watched {
            // SIGTERM before the channel closes, so the worker stops because it was told
            // to, not because it believes the supervisor died.
            ask_to_stop(&child);
        }
        // No new connection goes to a stopping, silent or dead worker.
        *self.link.lock().unwrap_or_else(PoisonError::into_inner) = None;
        let ended = match watched {
            Watched::Stopped => {
                wait_or_kill(&mut child, self.spec.shutdown_timeout + STOP_GRACE).await;
                Ended::Stopped
            }
            Watched::Exited(status) => Ended::Exited(status),
            Watched::Replaced(why @ Replaced::Silent(_)) => {
                // SIGKILL works on a stopped process too; its connections close with it.
                let _ = child.start_kill();
                Ended::Replaced { why, status: child.wait().await }
            }
            Watched::Replaced(why @ Replaced::Wedged { .. }) => {
                // It drains what it holds (those requests fail fast) and exits by itself;
                // a module stuck in a call may keep it from exiting, hence the bound.
                let grace = self.spec.shutdown_timeout + STOP_GRACE;
                let status = match tokio::time::timeout(grace, child.wait()).await {
                    Ok(status) => status,
                    Err(_) => {
                        tracing::warn!(tenant = %self.tenant, pid, "worker did not exit within {grace:?}; killing it");
                        let _ = child.start_kill();
                        child.wait().await
                    }
                };
                Ended::Replaced { why, status }
            }
        };
        drop(channel);
        ended
    }

    /// Watches a serving worker until it exits, must be replaced, or a stop is asked for:
    /// pings it, reads its answers, and gives up on it after `worker_watchdog` of silence.
    async fn watch(&mut self, child: &mut Child, channel: &Channel, pid: u32) -> Watched {
        let watchdog = self.spec.worker_watchdog;
        let mut ticks = tokio::time::interval(watchdog / PINGS_PER_WATCHDOG);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0u64;
        // When it last answered; Ready counts as an answer.
        let mut heard = tokio::time::Instant::now();
        loop {
            tokio::select! {
                status = child.wait() => return Watched::Exited(status),
                _ = stopped(&mut self.stop) => return Watched::Stopped,
                _ = tokio::time::sleep_until(heard + watchdog) => {
                    let silent = heard.elapsed();
                    tracing::error!(
                        tenant = %self.tenant,
                        pid,
                        silent_ms = silent.as_millis() as u64,
                        "worker did not answer the heartbeat for {} (worker_watchdog = {}): killing it",
                        fmt_duration(silent),
                        fmt_duration(watchdog),
                    );
                    return Watched::Replaced(Replaced::Silent(silent));
                }
                _ = ticks.tick() => {
                    seq += 1;
                    // A worker that does not read its channel fills it; its silence is
                    // what counts, so a ping that does not fit is simply not sent.
                    if let Err(e) = channel.try_send(&ToWorker::Ping { seq }) {
                        if e.kind() != std::io::ErrorKind::WouldBlock {
                            tracing::debug!(tenant = %self.tenant, pid, error = %e, "cannot send a heartbeat");
                        }
                    }
                }
                msg = channel.recv::<FromWorker>() => match msg {
                    Ok(Some((FromWorker::Pong { .. }, _))) => heard = tokio::time::Instant::now(),
                    Ok(Some((FromWorker::Wedged { call, setting, after }, _))) => {
                        tracing::error!(tenant = %self.tenant, pid, call, setting, "worker's root-key {call} call did not return within {}: replacing the worker", fmt_duration(after));
                        return Watched::Replaced(Replaced::Wedged { call, setting, after });
                    }
                    Ok(Some((other, _))) => {
                        tracing::warn!(tenant = %self.tenant, pid, message = ?other, "unexpected message from the worker; ignored");
                    }
                    // The worker closed its end: it is exiting.
                    Ok(None) => return Watched::Exited(child.wait().await),
                    Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                        tracing::warn!(tenant = %self.tenant, pid, error = %e, "bad message from the worker; ignored");
                    }
                    // The channel itself failed: the worker can no longer be watched or
                    // given connections.
                    Err(e) => {
                        tracing::error!(tenant = %self.tenant, pid, error = %e, "control channel failed; killing the worker");
                        let _ = child.start_kill();
                        return Watched::Exited(child.wait().await);
                    }
                },
            }
        }
    }
}

/// How watching a serving worker ended.
enum Watched {
    Stopped,
    Exited(std::io::Result<ExitStatus>),
    Replaced(Replaced),
}

/// Spawns the tenant's worker (`kekd worker`, or `kekd-tpm-worker` for a TPM tenant)
/// with the control channel as its stdin and an environment holding nothing but the PIN
/// variable, if the tenant uses one, and `JOURNAL_STREAM`, if set, and sends it its setup.
async fn spawn(spec: &WorkerSpec) -> std::io::Result<(Child, Channel)> {
    let (ours, theirs) = handoff::pair()?;
    let mut cmd = match spec.tenant_config.backend() {
        Some(BackendConfig::Tpm(_)) => std::process::Command::new(worker::tpm_worker_path()?),
        _ => {
            let mut cmd = std::process::Command::new("/proc/self/exe");
            cmd.arg0("kekd").arg("worker");
            cmd
        }
    };
    cmd.args(["--tenant", &spec.tenant, "--kekd-version", worker::VERSION])
        .env_clear()
        .stdin(Stdio::from(theirs))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(var) = spec.pin_env() {
        if let Some(value) = std::env::var_os(var) {
            cmd.env(var, value);
        }
    }
    // The worker writes to the same stderr: if that is the journal, its lines must say so
    // the same way (crate::logging), and it reads this before it clears its environment.
    if let Some(value) = std::env::var_os(crate::logging::JOURNAL_STREAM) {
        cmd.env(crate::logging::JOURNAL_STREAM, value);
    }
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let child = cmd.spawn()?;
    // Dropping the command closes our copy of the worker's end, so the channel reports
    // end-of-stream once the worker is gone.
    drop(cmd);
    let channel = Channel::new(ours)?;
    channel.send(&ToWorker::Setup(Box::new(spec.clone())), None).await?;
    Ok((child, channel))
}

/// SIGTERM: the worker drains and exits.
fn ask_to_stop(child: &Child) {
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    }
}

/// Up to `grace` for an asked-to-stop worker to exit, then SIGKILL.
async fn wait_or_kill(child: &mut Child, grace: Duration) {
    let pid = child.id().unwrap_or(0);
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => tracing::info!(pid, "worker stopped: {}", describe(status)),
        Err(_) => {
            tracing::warn!(pid, "worker did not stop within {grace:?}; killing it");
            let _ = child.kill().await;
        }
    }
}

/// Resolves once a stop is asked for (or nobody can ask any more).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Whether the worker was killed by its seccomp filter: the kernel kills a process with
/// SIGSYS for a call its filter refuses.
fn by_seccomp(status: &std::io::Result<ExitStatus>) -> bool {
    use std::os::unix::process::ExitStatusExt as _;
    matches!(status, Ok(s) if s.signal() == Some(libc::SIGSYS))
}

fn describe(status: std::io::Result<ExitStatus>) -> String {
    let seccomp = by_seccomp(&status);
    match status {
        Ok(s) if s.code() == Some(worker::EXIT_REPLACE.into()) => {
            format!("{s}: it asked to be replaced, since a root-key call hung")
        }
        Ok(s) if seccomp => format!(
            "{s}: killed by its seccomp filter for a system call the policy does not allow \
             (the kernel's audit log or dmesg names it: type=1326, syscall=N)"
        ),
        Ok(s) => s.to_string(),
        Err(e) => format!("status unknown: {e}"),
    }
}
