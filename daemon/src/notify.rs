//! The systemd notification protocol (sd_notify(3)), spoken directly: one datagram of
//! `KEY=VALUE` lines to the Unix socket named by `NOTIFY_SOCKET` (a path, or `@name` for
//! an abstract one). Used by the supervisor of a `Type=notify` service:
//!
//! - `READY=1` once it serves; `RELOADING=1` … `READY=1` around a SIGHUP reload;
//!   `STOPPING=1` when a SIGTERM/SIGINT shutdown starts; `STATUS=` lines for
//!   `systemctl status`.
//! - `WATCHDOG=1` every half of `WATCHDOG_USEC` (`WatchdogSec=`), from a task on the
//!   supervisor's own runtime: a supervisor that stops making progress stops pinging, and
//!   systemd restarts it.
//!
//! Without `NOTIFY_SOCKET` every call is a no-op. Sending is best effort and never
//! blocks: a notification that cannot be sent is logged at debug level, as libsystemd's
//! callers usually ignore the error too.

use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// The variables of the protocol, removed from the environment once read, so that
/// nothing the supervisor starts can notify in its name.
const VARIABLES: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

/// What systemd asked of this process.
#[derive(Debug, Default)]
pub struct Systemd {
    notifier: Option<Notifier>,
    /// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`.
    watchdog: Option<Duration>,
}

#[derive(Debug)]
struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl Systemd {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`, then removes them from the
    /// environment. Call once, before the process starts a thread (the environment is not
    /// thread-safe). A value that makes no sense is logged and ignored.
    pub fn from_env() -> Systemd {
        let vars: Vec<Option<String>> = VARIABLES.iter().map(|v| std::env::var(v).ok()).collect();
        for v in VARIABLES {
            std::env::remove_var(v);
        }
        let notifier = vars[0].as_deref().and_then(|s| match Notifier::new(s) {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(notify_socket = s, error = %e, "cannot use NOTIFY_SOCKET; systemd will not hear from kekd");
                None
            }
        });
        let watchdog = match (notifier.is_some(), vars[1].as_deref(), vars[2].as_deref()) {
            (true, Some(usec), pid) => watchdog_interval(usec, pid, std::process::id()),
            _ => None,
        };
        Systemd { notifier, watchdog }
    }

    /// Sends `state`, e.g. `"READY=1\nSTATUS=serving"`.
    pub fn notify(&self, state: &str) {
        if let Some(n) = &self.notifier {
            if let Err(e) = n.socket.send_to_addr(state.as_bytes(), &n.addr) {
                tracing::debug!(error = %e, "cannot notify systemd");
            }
        }
    }

    /// `READY=1`, with a status line.
    pub fn ready(&self, status: &str) {
        self.notify(&format!("READY=1\nSTATUS={status}"));
    }

    /// `RELOADING=1`, stamped with CLOCK_MONOTONIC as `Type=notify-reload` (systemd 253 and
    /// later) wants it; earlier versions ignore the stamp. Follow with [`Systemd::ready`].
    pub fn reloading(&self) {
        let usec = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| Duration::from(t).as_micros())
            .unwrap_or(0);
        self.notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading the configuration"));
    }

    /// `STOPPING=1`.
    pub fn stopping(&self, status: &str) {
        self.notify(&format!("STOPPING=1\nSTATUS={status}"));
    }

    /// Sends `WATCHDOG=1` half of `WATCHDOG_USEC` until the task is aborted or
    /// the runtime ends. Runs on the caller's runtime: when that runtime stops making
    /// progress, the pings stop. `None` when no watchdog was asked for.
    pub fn spawn_watchdog(self: &std::sync::Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        let every = self.watchdog?;
        let me = std::sync::Arc::clone(self);
        tracing::info!(every_ms = every.as_millis() as u64, "pinging the systemd watchdog");
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                me.notify("WATCHDOG=1");
            }
        }))
    }
}

impl Notifier {
    fn new(path: &str) -> std::io::Result<Notifier> {
        let addr = match path.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
            None if path.starts_with('/') => SocketAddr::from_pathname(path)?,
            None => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "not an absolute path or @abstract name",
                ))
            }
        };
        let socket = UnixDatagram::unbound()?;
        // A full receive queue must not stall the supervisor: drop the ping instead.
        socket.set_nonblocking(true)?;
        Ok(Notifier { socket, addr })
    }
}

/// Half of `WATCHDOG_USEC`, if the watchdog is meant for process `me`.
fn watchdog_interval(usec: &str, pid: Option<&str>, me: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(me) {
            tracing::debug!(watchdog_pid = pid, "WATCHDOG_PID names another process; no watchdog pings");
            return None;
        }
    }
    match usec.trim().parse::<u64>() {
        Ok(u) if u > 0 => Some(Duration::from_micros(u / 2).max(Duration::from_millis(1))),
        _ => {
            tracing::warn!(watchdog_usec = usec, "WATCHDOG_USEC is not a positive number; no watchdog pings");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_interval_is_half_and_only_for_this_process() {
        assert_eq!(watchdog_interval("30000000", None, 7), Some(Duration::from_secs(15)));
        assert_eq!(watchdog_interval("200000", Some("7"), 7), Some(Duration::from_millis(100)));
        assert_eq!(watchdog_interval("200000", Some("8"), 7), None);
        assert_eq!(watchdog_interval("0", None, 7), None);
        assert_eq!(watchdog_interval("soon", None, 7), None);
    }

    fn receive(socket: &UnixDatagram) -> String {
        socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn sends_to_a_path_and_to_an_abstract_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let sd = Systemd { notifier: Some(Notifier::new(path.to_str().unwrap()).unwrap()), watchdog: None };
        sd.ready("serving");
        assert_eq!(receive(&server), "READY=1\nSTATUS=serving");
        sd.reloading();
        assert!(receive(&server).starts_with("RELOADING=1\nMONOTONIC_USEC="));

        let name = format!("kekd-notify-test-{}", std::process::id());
        let server =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        let sd = Systemd { notifier: Some(Notifier::new(&format!("@{name}")).unwrap()), watchdog: None };
        sd.stopping("bye");
        assert_eq!(receive(&server), "STOPPING=1\nSTATUS=bye");
    }

    #[test]
    fn no_socket_means_no_op_and_a_relative_path_is_refused() {
        Systemd::default().ready("nobody listens");
        assert!(Notifier::new("relative/path").is_err());
    }
}
