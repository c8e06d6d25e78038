//! A private swtpm (software TPM 2.0) for `kekd dev --backend tpm` and the TPM backend's
//! tests: its own state directory, two free loopback ports, killed on drop.
//!
//! swtpm is a separate program talking TCP on 127.0.0.1 only; the supervisor starts it
//! but never links a TPM library. The TCTI that reaches it is
//! `swtpm:host=127.0.0.1,port=P` (the control channel is P+1).

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long swtpm may take to listen.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
const SETPRIV: &str = "/usr/bin/setpriv";
/// Attempts with fresh ports when another process took ours between the check and
/// swtpm's bind.
const ATTEMPTS: u32 = 5;

/// A running swtpm. Dropping it kills it; its state directory stays (it is the TPM's
/// non-volatile memory: seeds, persistent objects).
pub struct Swtpm {
    child: Child,
    port: u16,
    state_dir: PathBuf,
}

impl Swtpm {
    /// Starts swtpm on `state_dir` (created if missing) and waits until it listens.
    pub fn start(state_dir: &Path) -> io::Result<Swtpm> {
        std::fs::create_dir_all(state_dir)?;
        let mut last = None;
        for _ in 0..ATTEMPTS {
            let port = free_port_pair()?;
            match Self::start_on(state_dir, port) {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("swtpm did not start")))
    }

    fn start_on(state_dir: &Path, port: u16) -> io::Result<Swtpm> {
        // setpriv's PR_SET_PDEATHSIG: a kekd killed outright does not leave swtpm
        // holding its ports and state.
        let mut cmd = if Path::new(SETPRIV).exists() {
            let mut c = Command::new(SETPRIV);
            c.args(["--pdeathsig", "KILL", "--", "swtpm"]);
            c
        } else {
            Command::new("swtpm")
        };
        cmd.arg("socket")
            .arg("--tpm2")
            .arg("--server")
            .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
            .arg("--tpmstate")
            .arg(format!("dir={}", state_dir.display()))
            .args(["--flags", "startup-clear"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().map_err(|e| {
            io::Error::new(e.kind(), format!("cannot run swtpm ({e}): install the swtpm package"))
        })?;
        let mut s = Swtpm { child, port, state_dir: state_dir.to_owned() };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = s.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "swtpm exited at start ({status}); port {port} taken?"
                )));
            }
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                return Err(io::Error::other(format!("swtpm did not listen on 127.0.0.1:{port}")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The TCTI string that reaches this TPM.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Kills swtpm and starts it again on the same state and port: the TPM keeps its
    /// seeds and persistent objects and loses everything volatile (a TPM reset).
    #[cfg(test)]
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match Self::start_on(&self.state_dir.clone(), self.port) {
                Ok(s) => {
                    *self = s;
                    return Ok(());
                }
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Kills swtpm, leaving its state: the TPM is unreachable until [`Swtpm::restart`].
    #[cfg(test)]
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where free-port candidates are drawn from: below Linux's default ephemeral range
/// (32768–60999), so a port is never held by the TIME_WAIT of some outgoing connection
/// (the swtpm TCTI opens two connections per TPM command: thousands a second).
const PORTS: std::ops::Range<u16> = 20000..32000;

/// A port P such that P and P+1 were both free on 127.0.0.1 a moment ago.
pub(crate) fn free_port_pair() -> io::Result<u16> {
    for _ in 0..256 {
        let mut r = [0u8; 2];
        aws_lc_rs::rand::fill(&mut r).expect("the system RNG does not fail");
        let port = PORTS.start + u16::from_le_bytes(r) % (PORTS.end - PORTS.start);
        let free = |p: u16| TcpListener::bind((Ipv4Addr::LOCALHOST, p)).is_ok();
        if free(port) && free(port + 1) {
            return Ok(port);
        }
    }
    Err(io::Error::other(format!("no two consecutive free ports in {PORTS:?} on 127.0.0.1")))
}
