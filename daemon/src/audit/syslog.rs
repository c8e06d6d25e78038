//! Forwarding audit records to syslog (RFC 5424 over a Unix datagram socket), for SIEM
//! shippers that collect from there.
//!
//! The file is the record of truth; syslog is a copy. A forwarded record that is lost
//! (no syslog daemon, a full receive queue) does not fail the operation: the socket is
//! non-blocking so a slow syslog daemon cannot stall the audit writer, and losses are
//! counted and reported once per outage.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

pub struct Syslog {
    path: PathBuf,
    socket: Option<UnixDatagram>,
    facility: u8,
    hostname: String,
    pid: u32,
    /// Records lost since the last one that was delivered.
    lost: u64,
}

/// RFC 5424 severities.
const WARNING: u8 = 4;
const INFO: u8 = 6;

impl Syslog {
    pub fn new(path: &Path, facility: u8) -> Self {
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty() && h.is_ascii() && !h.contains(' '))
            .unwrap_or_else(|| "-".into());
        Syslog { path: path.to_owned(), socket: None, facility, hostname, pid: std::process::id(), lost: 0 }
    }

    /// Sends one record line; `event` becomes the MSGID and an error outcome raises the
    /// severity, so a SIEM can filter without parsing the JSON.
    pub fn send(&mut self, line: &str) {
        let (event, time, failed) = summary(line);
        let severity = if failed { WARNING } else { INFO };
        let pri = u16::from(self.facility) * 8 + u16::from(severity);
        let msg = format!("<{pri}>1 {time} {} kekd {} {event} - {line}", self.hostname, self.pid);
        match self.deliver(msg.as_bytes()) {
            Ok(()) => {
                if self.lost > 0 {
                    tracing::warn!(lost = self.lost, socket = %self.path.display(), "syslog forwarding works again; records were lost meanwhile (they are in the audit files)");
                    self.lost = 0;
                }
            }
            Err(e) => {
                if self.lost == 0 {
                    tracing::warn!(error = %e, socket = %self.path.display(), "cannot forward audit records to syslog; the audit files still have them");
                }
                self.lost += 1;
            }
        }
    }

    fn deliver(&mut self, msg: &[u8]) -> std::io::Result<()> {
        let socket = match &self.socket {
            Some(s) => s,
            None => {
                let s = UnixDatagram::unbound()?;
                s.set_nonblocking(true)?;
                self.socket.insert(s)
            }
        };
        // By path each time: a restarted syslog daemon binds a new socket at the same path.
        socket.send_to(msg, &self.path).map(|_| ())
    }
}

/// The event name, time and outcome of a record, read from its fixed layout.
fn summary(line: &str) -> (&str, &str, bool) {
    let field = |name: &str| {
        let pat = format!("\"{name}\":\"");
        line.find(&pat).and_then(|i| {
            let rest = &line[i + pat.len()..];
            rest.find('"').map(|j| &rest[..j])
        })
    };
    let event = field("event").filter(|e| !e.is_empty() && e.len() <= 32).unwrap_or("-");
    let time = field("time").unwrap_or("-");
    (event, time, line.contains("\"outcome\":\"error\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_arrive_as_rfc5424_messages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let listener = UnixDatagram::bind(&path).unwrap();
        let mut s = Syslog::new(&path, 10);
        let line = r#"{"seq":1,"prev":"00","time":"2026-11-23T10:00:00.000Z","tenant":"acme","event":"unwrap","outcome":"error","hash":"ff"}"#;
        s.send(line);
        let mut buf = vec![0u8; 4096];
        let n = listener.recv(&mut buf).unwrap();
        let msg = std::str::from_utf8(&buf[..n]).unwrap();
        // authpriv (10) * 8 + warning (4)
        let expect = format!("<84>1 2026-11-23T10:00:00.000Z {} kekd {} unwrap - {line}", s.hostname, s.pid);
        assert_eq!(msg, expect);
    }

    #[test]
    fn a_missing_socket_is_counted_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Syslog::new(&dir.path().join("none"), 4);
        s.send(r#"{"time":"t","event":"status","outcome":"ok"}"#);
        s.send(r#"{"time":"t","event":"status","outcome":"ok"}"#);
        assert_eq!(s.lost, 2);
        let listener = UnixDatagram::bind(dir.path().join("none")).unwrap();
        s.send(r#"{"time":"t","event":"status","outcome":"ok"}"#);
        assert_eq!(s.lost, 0);
        let mut buf = [0u8; 512];
        let n = listener.recv(&mut buf).unwrap();
        assert!(std::str::from_utf8(&buf[..n]).unwrap().starts_with("<38>1 t "));
    }
}
