//! kekd started the way systemd's socket activation starts it: a listening socket as
//! descriptor 3, `LISTEN_FDS=1` and `LISTEN_PID` set to kekd's own pid.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use crate::{bin, wait_deadline};

/// `kekd run --config CONFIG` as systemd starts it: `socket` as descriptor 3,
/// `LISTEN_FDS=1`, and `LISTEN_PID` set to the child's own pid (by a shell that then
/// execs kekd, which keeps its pid).
pub fn activated_command(socket: RawFd, config: &Path) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\"")
        .arg(bin("kekd"))
        .args(["run", "--config"])
        .arg(config)
        .env_remove("LISTEN_FDNAMES");
    // SAFETY: runs in the forked child before exec; dup2, fcntl and prctl are
    // async-signal-safe and touch no memory of the parent. Descriptor 3 ends up without
    // close-on-exec, so kekd inherits it.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself would keep close-on-exec: clear it instead.
            let placed = if socket == 3 { libc::fcntl(3, libc::F_SETFD, 0) } else { libc::dup2(socket, 3) };
            if placed == -1 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// A kekd started by the test itself with a listening socket as descriptor 3, as
/// systemd starts it. Killed (with its process group) on drop.
pub struct ActivatedKekd {
    child: Child,
    /// The socket its ready line names.
    pub ready: String,
    stderr: PathBuf,
}

impl ActivatedKekd {
    /// [`activated_command`], waiting for its ready line.
    pub fn start(listener: &impl AsRawFd, config: &Path, log: &Path) -> ActivatedKekd {
        let mut cmd = activated_command(listener.as_raw_fd(), config);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(log).unwrap())
            .process_group(0);
        let mut child = cmd.spawn().expect("spawn kekd");
        let ready = wait_ready(&mut child, log);
        ActivatedKekd { child, ready, stderr: log.to_owned() }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn stop(mut self) -> ExitStatus {
        kill(Pid::from_raw(self.pid()), Signal::SIGTERM).unwrap();
        let status = wait_deadline(&mut self.child, Duration::from_secs(30));
        status.unwrap_or_else(|| panic!("kekd did not stop:\n{}", self.stderr()))
    }
}

impl Drop for ActivatedKekd {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.pid()), Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads the child's stdout until `kekd ready socket=PATH` and returns PATH; keeps
/// draining it afterwards.
fn wait_ready(child: &mut Child, log: &Path) -> String {
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                if let Some(path) = line.strip_prefix("kekd ready socket=") {
                    return path.to_owned();
                }
            }
            Err(_) => {
                let _ = child.kill();
                panic!("kekd did not become ready:\n{}", fs::read_to_string(log).unwrap_or_default())
            }
        }
    }
}
