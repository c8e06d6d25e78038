//! Which program a local caller runs, read when its connection is accepted.
//!
//! The audit trail's `exe` names the program the connecting process ran when kekd accepted
//! the connection. Read later (at its Hello, say), it would name whatever the process had
//! exec'd by then: a caller could connect, exec any binary it likes and let that speak.
//! It names, it does not prove: a process can still exec another program once accepted,
//! and keeps the connection (and its identity) across the exec.
//!
//! The process is pinned with a pidfd (SO_PEERPIDFD, Linux 6.5+): its pid is read from the
//! pidfd itself, and once `/proc/PID/exe` has been read the pidfd must still show the
//! process alive, so that a pid the kernel reused for another process is never blamed.
//! Older kernels fall back to SO_PEERCRED's pid, with the small window of reuse that has.

use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{getsockopt, sockopt};

/// The executable of the process at the other end of `stream`, a connection accepted just
/// now whose SO_PEERCRED pid is `pid`; `None` if it cannot be told (the process is gone, or
/// lives in another pid namespace).
pub fn exe_at_accept<F: AsFd>(stream: &F, pid: i32) -> Option<String> {
    match getsockopt(stream, sockopt::PeerPidfd) {
        Ok(pidfd) => pinned_exe(&pidfd),
        // Before Linux 6.5 there is no SO_PEERPIDFD: trust the pid.
        Err(Errno::ENOPROTOOPT | Errno::EINVAL) if pid > 0 => read_exe(pid),
        // ESRCH: the process has already exited.
        Err(e) => {
            if e != Errno::ESRCH {
                limited_debug!(error = %e, "cannot pin the caller's process (SO_PEERPIDFD)");
            }
            None
        }
    }
}

/// `/proc/PID/exe` of the process `pidfd` refers to, if it still runs once read.
fn pinned_exe(pidfd: &OwnedFd) -> Option<String> {
    let pid = pid_of(pidfd)?;
    let exe = read_exe(pid)?;
    // A pidfd polls readable once its process has exited: its pid may since belong to
    // another process, whose executable was just read.
    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(0) => Some(exe),
        _ => None,
    }
}

/// The pid a pidfd refers to, from its `Pid:` line in fdinfo: -1 once the process has
/// exited, 0 if it is in a pid namespace this process cannot see.
fn pid_of(pidfd: &OwnedFd) -> Option<i32> {
    let info = std::fs::File::open(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd())).ok()?;
    BufReader::new(info)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("Pid:").and_then(|p| p.trim().parse().ok()))
        .filter(|&pid: &i32| pid > 0)
}

fn read_exe(pid: i32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok().map(|p| p.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each end of a socket pair has this process as its peer: pinned by its pidfd, it is
    /// alive, and its executable is the test binary.
    #[test]
    fn the_peer_of_a_socket_pair_is_this_program() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let me = std::fs::read_link("/proc/self/exe").unwrap();
        let exe = exe_at_accept(&a, std::process::id() as i32).expect("our own executable");
        assert_eq!(exe, me.to_string_lossy());
        match getsockopt(&a, sockopt::PeerPidfd) {
            Ok(pidfd) => assert_eq!(pid_of(&pidfd), Some(std::process::id() as i32)),
            Err(e) => eprintln!("no SO_PEERPIDFD on this kernel ({e}): the SO_PEERCRED fallback was used"),
        }
    }
}
