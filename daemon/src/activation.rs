//! systemd socket activation: the listening sockets `kekd.socket` hands to the supervisor,
//! as sd_listen_fds(3) describes them, read without libsystemd.
//!
//! systemd starts the service with the sockets at descriptors 3, 4, … and sets
//! `LISTEN_FDS` (how many), `LISTEN_PID` (the process they are meant for: a child that
//! inherited the environment must not take them too) and, optionally, `LISTEN_FDNAMES`
//! (their `FileDescriptorName=`s, colon-separated). [`take`] checks each descriptor is a
//! listening stream socket, marks it close-on-exec (workers are fork+exec'd and must not
//! inherit a listener) and removes the three variables from the environment, so that
//! nothing the supervisor runs sees them.
//!
//! The supervisor serves an activated Unix socket instead of binding `socket` (and leaves
//! its file alone at exit: it is systemd's). Activated vsock sockets are for the vsock
//! listener: [`take_vsock`].
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{
    getsockname, getsockopt, sockopt, AddressFamily, SockType, SockaddrLike, SockaddrStorage,
};

/// The first passed descriptor (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// More than this many passed descriptors is a broken environment, not a configuration.
const MAX_LISTEN_FDS: usize = 1024;

/// The environment variables of the protocol, removed once read.
const VARIABLES: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];

/// The address family of an activated socket: the two kekd serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Unix,
    Vsock,
}

/// One listening socket systemd passed.
#[derive(Debug)]
pub struct Activated {
    /// Close-on-exec; still in blocking mode, as systemd passed it.
    pub fd: OwnedFd,
    pub family: Family,
    /// Its `FileDescriptorName=` from `LISTEN_FDNAMES`, when systemd gave names.
    pub name: Option<String>,
    /// Where it listens: the path of a Unix socket (`@name` for an abstract one), or
    /// `vsock port P` (`ListenStream=vsock::P`). For logs and the ready line.
    pub address: String,
    /// The port of a vsock socket.
    pub vsock_port: Option<u32>,
}

/// Passed descriptors that kekd cannot serve. The service must not start half-listening.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("{0}")]
    Environment(String),
    #[error("descriptor {fd}: {problem}")]
    Descriptor { fd: RawFd, problem: String },
}

/// Takes the sockets passed by systemd, or none when the process was not socket-activated
/// (`LISTEN_PID` unset or naming another process). Removes the `LISTEN_*` variables either
/// way.
///
/// Call once, before the process starts a thread: it changes the environment, and the
/// descriptors it adopts must not be owned by anything else.
pub fn take() -> Result<Vec<Activated>, ActivationError> {
    let vars: Vec<Option<String>> = VARIABLES.iter().map(|v| std::env::var(v).ok()).collect();
    for v in VARIABLES {
        std::env::remove_var(v);
    }
    let (pid, fds, names) = (&vars[0], &vars[1], &vars[2]);
    let (Some(pid), Some(fds)) = (pid, fds) else { return Ok(Vec::new()) };
    let pid: u32 = pid
        .trim()
        .parse()
        .map_err(|_| ActivationError::Environment(format!("LISTEN_PID={pid:?} is not a process id")))?;
    if pid != std::process::id() {
        tracing::debug!(listen_pid = pid, "LISTEN_FDS is meant for another process; binding instead");
        return Ok(Vec::new());
    }
    let count: usize = fds.trim().parse().ok().filter(|n| *n <= MAX_LISTEN_FDS).ok_or_else(|| {
        ActivationError::Environment(format!("LISTEN_FDS={fds:?} is not a descriptor count"))
    })?;
    let mut names: Vec<Option<String>> = match names {
        Some(n) if n.split(':').count() == count => {
            n.split(':').map(|s| (!s.is_empty()).then(|| s.to_owned())).collect()
        }
        Some(n) => {
            tracing::warn!(names = %n, count, "LISTEN_FDNAMES does not name LISTEN_FDS descriptors; ignoring the names");
            vec![None; count]
        }
        None => vec![None; count],
    };
    let mut taken = Vec::with_capacity(count);
    for (i, name) in names.drain(..).enumerate() {
        let fd = LISTEN_FDS_START + i as RawFd;
        taken.push(adopt(fd, name)?);
    }
    Ok(taken)
}

/// Moves the activated sockets of `family` out of `all`, in the order systemd passed them.
pub fn take_family(all: &mut Vec<Activated>, family: Family) -> Vec<Activated> {
    let (wanted, rest) = std::mem::take(all).into_iter().partition(|a| a.family == family);
    *all = rest;
    wanted
}

/// For the vsock listener: the activated vsock sockets (`ListenStream=vsock::PORT` in
/// `kekd.socket`), each with its port, moved out of `all`. Their descriptors are listening
/// already: serve them instead of binding `vsock_port`, e.g. with
/// `tokio_vsock::VsockListener::from(fd)` (which makes the descriptor non-blocking).
pub fn take_vsock(all: &mut Vec<Activated>) -> Vec<(OwnedFd, u32)> {
    take_family(all, Family::Vsock).into_iter().map(|a| (a.fd, a.vsock_port.unwrap_or(u32::MAX))).collect()
}

impl Activated {
    /// A Unix socket as a tokio listener (non-blocking from here on).
    pub fn into_unix_listener(self) -> std::io::Result<tokio::net::UnixListener> {
        debug_assert_eq!(self.family, Family::Unix);
        let std = std::os::unix::net::UnixListener::from(self.fd);
        std.set_nonblocking(true)?;
        tokio::net::UnixListener::from_std(std)
    }

    /// The socket file of a Unix socket bound to a path.
    pub fn path(&self) -> Option<PathBuf> {
        (self.family == Family::Unix && self.address.starts_with('/')).then(|| PathBuf::from(&self.address))
    }
}

/// Takes ownership of passed descriptor `fd` after checking what it is.
fn adopt(fd: RawFd, name: Option<String>) -> Result<Activated, ActivationError> {
    let bad = |problem: String| ActivationError::Descriptor { fd, problem };
    // SAFETY: F_GETFD only reads the descriptor's flags; on a descriptor that is not open
    // it fails with EBADF and touches nothing.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
        return Err(bad(format!("not open ({})", std::io::Error::last_os_error())));
    }
    // SAFETY: systemd passed this descriptor to this process (LISTEN_PID is ours) and it is
    // open. Nothing else in the process owns it: take() runs once, at start-up, before any
    // other code could have adopted descriptors from 3 up, and clears LISTEN_FDS so it is
    // never taken twice.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let raw = fd.as_raw_fd();
    fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map_err(|e| bad(format!("cannot set FD_CLOEXEC: {e}")))?;
    let ty = getsockopt(&fd, sockopt::SockType).map_err(|e| bad(format!("not a socket ({e})")))?;
    if ty != SockType::Stream {
        return Err(bad(format!("a {ty:?} socket; kekd serves stream sockets (ListenStream=)")));
    }
    if !getsockopt(&fd, sockopt::AcceptConn).map_err(|e| bad(format!("cannot read SO_ACCEPTCONN: {e}")))? {
        return Err(bad("a stream socket that is not listening".into()));
    }
    let addr: SockaddrStorage = getsockname(raw).map_err(|e| bad(format!("cannot read its address: {e}")))?;
    let (family, address, vsock_port) = match addr.family() {
        Some(AddressFamily::Unix) => {
            let unix =
                addr.as_unix_addr().ok_or_else(|| bad("a Unix socket without a Unix address".into()))?;
            let address = match (unix.path(), unix.as_abstract()) {
                (Some(p), _) => p.display().to_string(),
                (None, Some(a)) => format!("@{}", String::from_utf8_lossy(a)),
                (None, None) => "(unnamed)".to_owned(),
            };
            (Family::Unix, address, None)
        }
        Some(AddressFamily::Vsock) => {
            let v =
                addr.as_vsock_addr().ok_or_else(|| bad("a vsock socket without a vsock address".into()))?;
            (Family::Vsock, format!("vsock port {}", v.port()), Some(v.port()))
        }
        other => {
            return Err(bad(format!(
                "a socket of address family {other:?}; kekd listens on Unix and vsock sockets only"
            )))
        }
    };
    Ok(Activated { fd, family, name, address, vsock_port })
}

#[cfg(test)]
mod tests {
    use std::os::fd::IntoRawFd;

    use nix::sys::socket::{bind, listen, socket, Backlog, SockFlag, UnixAddr, VsockAddr};

    use super::*;

    #[test]
    fn a_listening_unix_socket_is_adopted_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kekd.sock");
        let raw = std::os::unix::net::UnixListener::bind(&path).unwrap().into_raw_fd();
        let a = adopt(raw, Some("kekd".into())).unwrap();
        assert_eq!((a.family, a.name.as_deref(), a.vsock_port), (Family::Unix, Some("kekd"), None));
        assert_eq!(a.path(), Some(path));
        let flags = fcntl(&a.fd, FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & libc::FD_CLOEXEC, 0, "close-on-exec");
    }

    #[test]
    fn refuses_what_is_not_a_listening_stream_socket() {
        let dir = tempfile::tempdir().unwrap();
        let dgram = std::os::unix::net::UnixDatagram::bind(dir.path().join("d")).unwrap();
        let e = adopt(dgram.into_raw_fd(), None).unwrap_err().to_string();
        assert!(e.contains("Datagram"), "{e}");

        let stream = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
        bind(stream.as_raw_fd(), &UnixAddr::new(&dir.path().join("s")).unwrap()).unwrap();
        let e = adopt(stream.into_raw_fd(), None).unwrap_err().to_string();
        assert!(e.contains("not listening"), "{e}");

        let file = std::fs::File::open("/dev/null").unwrap();
        let e = adopt(file.into_raw_fd(), None).unwrap_err().to_string();
        assert!(e.contains("not a socket"), "{e}");
    }

    #[test]
    fn a_listening_vsock_socket_reports_its_port() {
        let Ok(fd) = socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None) else {
            eprintln!("SKIPPED: no vsock support in this kernel");
            return;
        };
        // Port "any": the kernel picks a free one, so parallel tests do not collide.
        let any = VsockAddr::new(libc::VMADDR_CID_ANY, libc::VMADDR_PORT_ANY);
        if bind(fd.as_raw_fd(), &any).is_err() || listen(&fd, Backlog::new(1).unwrap()).is_err() {
            eprintln!("SKIPPED: cannot listen on vsock here");
            return;
        }
        let mut all = vec![adopt(fd.into_raw_fd(), None).unwrap()];
        assert_eq!(all[0].family, Family::Vsock);
        assert!(all[0].address.starts_with("vsock port "), "{}", all[0].address);
        assert!(take_family(&mut all, Family::Unix).is_empty());
        let vsock = take_vsock(&mut all);
        assert!(all.is_empty());
        assert_eq!(vsock.len(), 1);
        assert_ne!(vsock[0].1, libc::VMADDR_PORT_ANY);
    }
}
