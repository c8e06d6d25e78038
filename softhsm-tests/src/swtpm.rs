//! A private swtpm (software TPM 2.0) owned by one test: its own state directory and its
//! own pair of loopback TCP ports, killed with its process group on drop.
//!
//! swtpm listens on two consecutive ports: P for TPM commands, P + 1 for its control
//! channel. The kernel cannot hand out two consecutive free ports, and tests run in
//! parallel, so [`Swtpm::start`] picks a candidate pair, starts swtpm on it, and only
//! calls it ready once *this* swtpm holds both ports (checked in /proc: another test's
//! swtpm may have taken one in between, and would answer the probe just as well) and
//! answers a command. Otherwise it tries another pair.
//!
//! The TPM2 tools reach it through the swtpm TCTI, which opens a connection per command.
//! swtpm serves one connection at a time, so a helper here waits for the command kekd has
//! in flight, if any, and then runs: the helpers work while kekd is using the same swtpm.
//!
//! swtpm is started with `PR_SET_PDEATHSIG`, which fires when the *thread* that spawned it
//! exits: start (and [`Swtpm::start_again`]) it on the thread that owns it for the test.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::{die_with_parent, random_bytes, try_run_command, Output};

/// How long one swtpm may take to listen on its ports and answer its first command.
pub const SWTPM_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How many port pairs [`Swtpm::start`] tries before giving up.
const START_ATTEMPTS: u32 = 5;
/// How long [`Swtpm::start_again`] keeps trying when its ports are taken.
const SAME_PORTS_TIMEOUT: Duration = Duration::from_secs(5);

/// One swtpm process (when running) and the state directory and ports it keeps across
/// restarts. The state directory belongs to the caller (normally inside the test's
/// temporary directory); swtpm's stderr goes to `swtpm.log` in it.
#[derive(Debug)]
pub struct Swtpm {
    state_dir: PathBuf,
    port: u16,
    child: Option<Child>,
    log: PathBuf,
}

/// Why one attempt to start swtpm failed.
enum Failure {
    /// It exited: on a fresh pair of ports, most likely a port taken in the meantime.
    Exited(String),
    /// Still running at the deadline, but not holding its ports or not answering.
    NotReady(String),
}

impl Failure {
    fn message(&self) -> &str {
        match self {
            Failure::Exited(m) | Failure::NotReady(m) => m,
        }
    }
}

impl Swtpm {
    /// Creates `state_dir` and starts a swtpm on it, on two free consecutive loopback
    /// ports; returns once it answers a command. Panics, with swtpm's stderr, when
    /// [`START_ATTEMPTS`] pairs of ports all failed.
    #[track_caller]
    pub fn start(state_dir: &Path) -> Swtpm {
        fs::create_dir_all(state_dir)
            .unwrap_or_else(|e| panic!("create the swtpm state directory {}: {e}", state_dir.display()));
        let mut swtpm = Swtpm {
            state_dir: state_dir.to_path_buf(),
            port: 0,
            child: None,
            log: state_dir.join("swtpm.log"),
        };
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            swtpm.port = free_port_pair();
            match swtpm.try_start() {
                Ok(()) => return swtpm,
                Err(f) => {
                    failures.push(format!("ports {} and {}: {}", swtpm.port, swtpm.port + 1, f.message()))
                }
            }
        }
        panic!(
            "swtpm for {} did not start on {START_ATTEMPTS} pairs of fresh ports:\n{}",
            state_dir.display(),
            failures.join("\n")
        );
    }

    /// The TSS2 TCTI string that reaches this swtpm (kekd's `tpm.tcti`).
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// The TPM command port; the control channel is the next one.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => c.try_wait().expect("query swtpm's status").is_none(),
            None => false,
        }
    }

    /// SIGKILL to swtpm's process group, and reap it: the TPM loses its volatile state
    /// (loaded objects, sessions, PCRs), as in a power loss. No-op when not running.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts swtpm again on the same state directory and the same ports (kekd's config
    /// names them), so the next start is a TPM reset. A port another process took in the
    /// meantime is waited for up to [`SAME_PORTS_TIMEOUT`]; then this panics with swtpm's
    /// stderr.
    #[track_caller]
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "swtpm on port {} is already running", self.port);
        let deadline = Instant::now() + SAME_PORTS_TIMEOUT;
        loop {
            match self.try_start() {
                Ok(()) => return,
                Err(Failure::Exited(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(f) => panic!(
                    "swtpm could not start again on ports {} and {} (taken by another process?): {}",
                    self.port,
                    self.port + 1,
                    f.message()
                ),
            }
        }
    }

    /// [`Swtpm::stop`], then [`Swtpm::start_again`]: a TPM reset.
    #[track_caller]
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// Extends PCR `pcr` of the sha256 bank with a random digest, changing its value.
    #[track_caller]
    pub fn pcr_extend(&self, pcr: u8) {
        let digest: String = random_bytes(32).iter().map(|b| format!("{b:02x}")).collect();
        self.tool("tpm2_pcrextend", &[&format!("{pcr}:sha256={digest}")]);
    }

    /// The value of PCR `pcr` of the sha256 bank: 64 lowercase hex digits.
    #[track_caller]
    pub fn pcr_read(&self, pcr: u8) -> String {
        let out = self.tool("tpm2_pcrread", &[&format!("sha256:{pcr}")]);
        let text = out.ok_str();
        // "  sha256:\n    16: 0x0000…"
        let value = text
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{pcr}:")))
            .map(|v| v.trim().trim_start_matches("0x").to_ascii_lowercase())
            .unwrap_or_else(|| panic!("no PCR {pcr} in the output of `{}`:\n{text}", out.command));
        assert!(
            value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()),
            "PCR {pcr} is not a sha256 value in the output of `{}`:\n{text}",
            out.command
        );
        value
    }

    /// The handles of the transient objects loaded in the TPM (swtpm holds only three:
    /// whoever loads one must flush it).
    #[track_caller]
    pub fn transient_handles(&self) -> Vec<u32> {
        let out = self.tool("tpm2_getcap", &["handles-transient"]);
        let text = out.ok_str();
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                l.trim()
                    .strip_prefix("- 0x")
                    .and_then(|h| u32::from_str_radix(h, 16).ok())
                    .unwrap_or_else(|| panic!("unexpected line {l:?} from `{}`:\n{text}", out.command))
            })
            .collect()
    }

    /// `tpm2_clear` (the lockout auth of a fresh swtpm is empty): a new owner seed, so
    /// every storage primary, and everything sealed under one, is gone for good.
    #[track_caller]
    pub fn clear(&self) {
        self.tool("tpm2_clear", &[]);
    }

    /// Runs a TPM2 tool against this swtpm; panics with its stderr when it fails.
    #[track_caller]
    fn tool(&self, tool: &str, args: &[&str]) -> Output {
        assert!(
            self.child.is_some(),
            "swtpm on port {} is stopped: `{tool}` needs it running (start_again() it first)",
            self.port
        );
        let out = self.run_tool(tool, args);
        assert_eq!(
            out.code, 0,
            "`{}` against the swtpm on port {} failed with exit code {}; stderr:\n{}",
            out.command, self.port, out.code, out.stderr
        );
        out
    }

    fn run_tool(&self, tool: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new(tool);
        // TSS2_LOG silences the ESYS warnings the tools print even when all goes well.
        cmd.args(args).env("TPM2TOOLS_TCTI", self.tcti()).env("TSS2_LOG", "all+none");
        match try_run_command(cmd, Vec::new()) {
            Ok(out) => out,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                panic!("{tool} not found (tpm2-tools): run ./scripts/install-deps")
            }
            Err(e) => panic!("cannot run {tool}: {e}"),
        }
    }

    /// One attempt on the current ports: spawn swtpm and wait until it is ready. On
    /// failure swtpm is dead and reaped, and the failure carries its stderr.
    fn try_start(&mut self) -> Result<(), Failure> {
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.log.display()));
        let log_from = log.seek(SeekFrom::End(0)).expect("seek swtpm's log");
        let mut cmd = Command::new("swtpm");
        cmd.arg("socket")
            .arg("--tpm2")
            .arg("--server")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", self.port))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", self.port + 1))
            .arg("--tpmstate")
            .arg(format!("dir={}", self.state_dir.display()))
            .arg("--flags")
            .arg("startup-clear")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone swtpm's log"))
            .stderr(log)
            .process_group(0);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().unwrap_or_else(|e| match e.kind() {
            io::ErrorKind::NotFound => panic!("swtpm not found: run ./scripts/install-deps"),
            _ => panic!("cannot start swtpm: {e}"),
        });
        self.child = Some(child);
        match self.wait_ready() {
            Ok(()) => Ok(()),
            Err(failure) => {
                self.stop();
                let stderr = self.log_since(log_from);
                Err(match failure {
                    Failure::Exited(m) => Failure::Exited(format!("{m}; swtpm's stderr:\n{stderr}")),
                    Failure::NotReady(m) => Failure::NotReady(format!("{m}; swtpm's stderr:\n{stderr}")),
                })
            }
        }
    }

    /// Ready: this swtpm process holds both ports, a TCP connect to the command port
    /// succeeds, and `tpm2_getrandom 4` through it succeeds.
    fn wait_ready(&mut self) -> Result<(), Failure> {
        let deadline = Instant::now() + SWTPM_READY_TIMEOUT;
        let ports = [self.port, self.port + 1];
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let mut last = String::from("it never listened on its ports");
        loop {
            let child = self.child.as_mut().expect("swtpm was just spawned");
            if let Some(status) = child.try_wait().expect("query swtpm's status") {
                return Err(Failure::Exited(format!("swtpm exited before it was ready ({status})")));
            }
            let pid = child.id();
            if ports.iter().all(|p| listening_ports(pid).contains(p)) {
                match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                    Err(e) => last = format!("connecting to {addr}: {e}"),
                    Ok(probe) => {
                        drop(probe);
                        let out = self.run_tool("tpm2_getrandom", &["4"]);
                        if out.code == 0 {
                            return Ok(());
                        }
                        last = format!("`{}` failed ({}): {}", out.command, out.code, out.stderr.trim());
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(Failure::NotReady(format!("not ready within {SWTPM_READY_TIMEOUT:?}: {last}")));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What swtpm wrote to its log from byte `from` on.
    fn log_since(&self, from: u64) -> String {
        let mut text = String::new();
        if let Ok(mut f) = fs::File::open(&self.log) {
            let _ = f.seek(SeekFrom::Start(from)).and_then(|_| f.read_to_string(&mut text));
        }
        text
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port P such that P and P + 1 are both free on 127.0.0.1 right now. Both are released
/// again before this returns, so another process may still take one before swtpm binds it:
/// [`Swtpm::start`] checks that.
///
/// The candidates come from outside the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`), not from binding port 0: the swtpm TCTI opens a TCP
/// connection per TPM command, so a TPM test run leaves thousands of TIME_WAIT sockets on
/// ephemeral ports (all of the even ones, measured: `connect` takes even ports, `bind(0)`
/// odd ones), and the neighbour of a port `bind(0)` returns is then nearly always taken.
/// Outgoing connections never use a port outside that range.
fn free_port_pair() -> u16 {
    let ranges = ports_outside_ephemeral_range();
    let pairs: u32 = ranges.iter().map(|r| u32::from(r.1 - r.0) / 2).sum();
    assert!(pairs > 0, "no loopback ports outside net.ipv4.ip_local_port_range for swtpm ({ranges:?})");
    for _ in 0..100 {
        let random = random_bytes(4);
        let mut pick = u32::from_be_bytes(random[..4].try_into().expect("4 bytes")) % pairs;
        let mut port = 0;
        for &(low, high) in &ranges {
            let here = u32::from(high - low) / 2;
            if pick < here {
                port = low + 2 * pick as u16;
                break;
            }
            pick -= here;
        }
        let Ok(_first) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)) else { continue };
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no two consecutive free loopback ports in 100 tries among {ranges:?}");
}

/// The unprivileged port ranges, `(low, high)` with `high` excluded, that the kernel does not
/// hand out to outgoing connections.
fn ports_outside_ephemeral_range() -> Vec<(u16, u16)> {
    const FIRST: u16 = 10_000;
    let text = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut bounds = text.split_whitespace().map(|n| n.parse::<u16>());
    let (low, high) = match (bounds.next(), bounds.next()) {
        (Some(Ok(low)), Some(Ok(high))) => (low, high),
        _ => (32768, 60999),
    };
    let mut ranges = Vec::new();
    if low > FIRST + 1 {
        ranges.push((FIRST, low - 1));
    }
    if high < u16::MAX - 2 {
        ranges.push((high + 1, u16::MAX - 1));
    }
    ranges
}

/// The loopback IPv4 TCP ports process `pid` listens on: the sockets among its open
/// descriptors that /proc/net/tcp lists in state LISTEN.
fn listening_ports(pid: u32) -> HashSet<u16> {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else { return HashSet::new() };
    let inodes: HashSet<String> = fds
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(str::to_owned))
        .collect();
    let table = fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let cols: Vec<&str> = l.split_whitespace().collect();
            if cols.len() < 10 || cols[3] != "0A" || !inodes.contains(cols[9]) {
                return None;
            }
            let (ip, port) = cols[1].split_once(':')?;
            (ip == "0100007F").then(|| u16::from_str_radix(port, 16).ok())?
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::{mpsc, Arc, Barrier};

    use super::*;

    const ZEROS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn a_restart_is_a_tpm_reset_on_the_same_ports() {
        let dir = crate::test_dir();
        let mut tpm = Swtpm::start(&dir.path().join("tpm"));
        assert!(tpm.is_running());
        assert_eq!(tpm.tcti(), format!("swtpm:host=127.0.0.1,port={}", tpm.port()));
        assert_eq!(tpm.pcr_read(16), ZEROS, "PCR 16 of a fresh TPM");
        tpm.pcr_extend(16);
        let extended = tpm.pcr_read(16);
        assert_ne!(extended, ZEROS);
        tpm.pcr_extend(16);
        assert_ne!(tpm.pcr_read(16), extended, "each extend changes the PCR");
        assert_eq!(tpm.transient_handles(), Vec::<u32>::new());

        let port = tpm.port();
        tpm.restart();
        assert!(tpm.is_running());
        assert_eq!(tpm.port(), port, "a restart keeps the ports");
        assert_eq!(tpm.pcr_read(16), ZEROS, "PCR 16 is back to its reset value");
        assert_eq!(tpm.transient_handles(), Vec::<u32>::new());
        tpm.clear();

        tpm.stop();
        assert!(!tpm.is_running());
        assert!(TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err(), "a stopped swtpm still answers");
        tpm.start_again();
        assert_eq!(tpm.pcr_read(16), ZEROS);
    }

    #[test]
    fn swtpms_started_at_once_get_ports_of_their_own() {
        let dir = crate::test_dir();
        // Each thread keeps its swtpm (which dies with the thread that spawned it) until
        // all ports have been compared.
        let n = 4;
        let barrier = Arc::new(Barrier::new(n + 1));
        let (tx, rx) = mpsc::channel();
        let threads: Vec<_> = (0..n)
            .map(|i| {
                let (state, barrier, tx) = (dir.path().join(format!("tpm{i}")), barrier.clone(), tx.clone());
                std::thread::spawn(move || {
                    let tpm = Swtpm::start(&state);
                    tx.send(tpm.port()).unwrap();
                    barrier.wait();
                    assert_eq!(tpm.pcr_read(16), ZEROS);
                })
            })
            .collect();
        let mut ports: Vec<u16> =
            (0..n).map(|_| rx.recv_timeout(Duration::from_secs(60)).expect("a swtpm started")).collect();
        barrier.wait();
        for t in threads {
            t.join().expect("a swtpm thread failed");
        }
        ports.sort();
        assert!(ports.windows(2).all(|w| w[1] >= w[0] + 2), "port pairs overlap: {ports:?}");
    }

    #[test]
    fn start_again_waits_for_a_port_someone_else_holds() {
        let dir = crate::test_dir();
        let mut tpm = Swtpm::start(&dir.path().join("tpm"));
        tpm.stop();
        let squatter =
            TcpListener::bind((Ipv4Addr::LOCALHOST, tpm.port() + 1)).expect("take the control port");
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            drop(squatter);
        });
        tpm.start_again();
        release.join().unwrap();
        assert_eq!(tpm.pcr_read(16), ZEROS);
    }
}
