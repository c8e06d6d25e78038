//! Fixtures for kekd's end-to-end tests against real SoftHSM2 and real swtpm.
//!
//! Every test owns its world: a temporary directory with its own `softhsm2.conf` and token
//! directory (or its own swtpm per tenant), its own key store, socket and daemon. Nothing is
//! shared between tests, so they run in parallel (threads under `cargo test`, processes
//! under nextest) and leave nothing behind: the daemon's process group is killed, then its
//! swtpms, and the directory removed on drop.
//!
//! # Which root-key backend
//!
//! The same test files run against both root-key backends, so that a behaviour the README
//! promises is checked on each. The backend is chosen per test process by the environment
//! variable `KEKD_TEST_BACKEND` (see [`backend()`]):
//!
//! - unset or `softhsm`: every tenant's root key is on a SoftHSM2 token (the default);
//! - `tpm`: every tenant gets a swtpm of its own ([`Swtpm`], under `<test dir>/swtpm/<tenant>`)
//!   and a `[tenants.NAME.tpm]` table naming it, instead of a token and a PIN file;
//! - anything else panics, rather than silently testing the default.
//!
//! ```text
//! KEKD_TEST_BACKEND=tpm cargo nextest run -p softhsm-tests
//! ```
//!
//! Tests that are about PKCS#11 itself (tokens, PINs, the module) keep their tenants on
//! SoftHSM2 whatever the variable says, with [`Tenant::backend`]; using a PKCS#11-only
//! setting ([`Tenant::on_token`], [`Tenant::pin`], [`Tenant::create_root_key`],
//! [`Tenant::behind_outage_switch`]) does the same implicitly, and a TPM-only one ([`Tenant::pcrs`], [`Tenant::parameter_encryption`]) puts the
//! tenant on a TPM. Mixing the two on one tenant panics in [`KekdBuilder::prepare`].
//!
//! A tenant can also be put on a second PKCS#11 implementation, kryoptic, with
//! `Tenant::backend(Backend::Kryoptic)` (for what SoftHSM 2.6.1 lacks, e.g. RSA-OAEP with
//! SHA-256): its token is a sqlite file of its own, named to the module by `module_env`, and
//! the module is built from `softhsm-tests/kryoptic/` on first use ([`kryoptic_module`]).
//!
//! # Cutting the link to a token
//!
//! A tenant [`Tenant::behind_outage_switch`] reaches its SoftHSM2 token through
//! `pkcs11_outage.so` ([`outage_module`]), a PKCS#11 proxy built from
//! `softhsm-tests/outage/pkcs11_outage.c` by this crate's build script. Its config names the
//! proxy as `module`, and gives it, in `module_env`, the real SoftHSM2 module
//! (`KEKD_OUTAGE_MODULE`) and a flag file (`KEKD_OUTAGE_FLAG`, `<test dir>/outage/<tenant>.down`).
//! While the flag file exists, every PKCS#11 call other than `C_GetFunctionList`,
//! `C_Initialize`, `C_Finalize` and `C_GetInfo` fails with `CKR_DEVICE_ERROR` without reaching
//! SoftHSM2, like a network HSM whose link is down; the token and its keys are untouched.
//! [`Kekd::cut_token`] creates the flag, [`Kekd::restore_token`] removes it, while kekd keeps
//! running. (Moving SoftHSM2's token directory away instead, [`Kekd::take_token_away`], fails
//! every call on that token, and SoftHSM2 does not see it again until the module is
//! re-initialised: kekd's worker does that by itself.)
//!
//! [`Kekd::inject_fault`] writes the name of a fault into the flag file instead
//! ([`TokenFault`]: a pulled token, sessions closed under kekd, a module that forgot its
//! initialisation), and [`Kekd::cap_sessions`] makes the token refuse sessions beyond a
//! count (`CKR_SESSION_COUNT`) and report the most kekd ever had open
//! ([`Kekd::session_report`]). [`Kekd::restore_token`] ends each of them. Without the proxy,
//! [`Kekd::take_token_away`] moves a tenant's SoftHSM2 token directory away and
//! [`Kekd::bring_token_back`] puts it back.
//!
//! [`Kekd::make_module_misbehave`] writes `syscall` into the same flag file: the proxy then
//! forwards every call again, but each `C_Encrypt` and `C_Decrypt` first opens a packet
//! socket, a system call no PKCS#11 module should make and kekd's seccomp policy forbids
//! (`tests/seccomp.rs`). [`Kekd::restore_token`] ends that too.
//!
//! The programs under test are the real `kekd` and `kekctl`, taken from the target directory
//! the test executable was built into: build them first with `cargo build --workspace --bins`.
//!
//! Waiting is always done on an event with a deadline (a line on a pipe, a process exit, a
//! socket read with a timeout), never by sleeping for a fixed time.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use kekd_proto::pb;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use prost::Message as _;
use tempfile::TempDir;

pub use kekd_proto::Code;
pub use kryoptic::{kryoptic_module, Kryoptic};
pub use swtpm::Swtpm;
pub use users::TestUser;

pub mod activation;
mod kryoptic;
mod swtpm;
mod users;

/// How long a daemon may take to print its ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one `kekctl` or `kekd check-config` run may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a raw-socket read may block.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a daemon may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// The unprivileged user the multi-user tests run `kekctl` as.
pub const NOBODY_UID: u32 = 65534;
/// `nogroup` on Debian.
pub const NOBODY_GID: u32 = 65534;

/// `kekctl` exit codes (README: "Exit codes").
pub mod exit {
    pub const OK: i32 = 0;
    pub const FAILURE: i32 = 1;
    pub const USAGE: i32 = 2;
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const PERMISSION_DENIED: i32 = 4;
    pub const NOT_FOUND: i32 = 5;
    pub const FAILED_PRECONDITION: i32 = 6;
    pub const DATA_INVALID: i32 = 7;
    pub const UNAVAILABLE: i32 = 8;
    pub const RESOURCE_EXHAUSTED: i32 = 9;
    pub const INTERNAL: i32 = 10;
    /// `kekctl audit verify`: the hash chain is broken.
    pub const AUDIT_BROKEN: i32 = 11;
}

// ---------------------------------------------------------------------------------------
// Backends

/// Where a test tenant's root key lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A token in the test's private SoftHSM2 installation, through PKCS#11.
    SoftHsm,
    /// The tenant's own swtpm, through the swtpm TCTI.
    Tpm,
    /// A token of kryoptic, a second PKCS#11 implementation (the one with RSA-OAEP-SHA256),
    /// in a sqlite file of its own under the test's directory ([`Kryoptic`]). Only ever
    /// chosen with [`Tenant::backend`], never by `KEKD_TEST_BACKEND`.
    Kryoptic,
}

/// The backend this test process runs its tenants on, from `KEKD_TEST_BACKEND`: unset or
/// `softhsm` for SoftHSM2, `tpm` for swtpm. Any other value panics: a typo must not quietly
/// run the whole suite against the default backend.
pub fn backend() -> Backend {
    match std::env::var("KEKD_TEST_BACKEND") {
        Err(std::env::VarError::NotPresent) => Backend::SoftHsm,
        Ok(v) if v == "softhsm" => Backend::SoftHsm,
        Ok(v) if v == "tpm" => Backend::Tpm,
        Ok(v) => panic!("KEKD_TEST_BACKEND={v:?}: expected \"softhsm\" (the default when unset) or \"tpm\""),
        Err(e) => panic!("KEKD_TEST_BACKEND: {e}; expected \"softhsm\" (the default when unset) or \"tpm\""),
    }
}

// ---------------------------------------------------------------------------------------
// Binaries and small helpers

/// The directory holding the binaries under test: `target/<profile>`, the parent of the
/// `deps` directory the test executable runs from (or `$KEKD_TEST_BIN_DIR`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KEKD_TEST_BIN_DIR") {
        return dir.into();
    }
    let exe = std::env::current_exe().expect("path of the test executable");
    let mut dir = exe.parent().expect("the test executable has a parent directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of a binary under test; panics with the command to build it when it is missing.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} not found: build the binaries first with `cargo build --workspace --bins` \
         (same profile as the tests), or point KEKD_TEST_BIN_DIR at them",
        path.display()
    );
    path
}

/// The PKCS#11 fault-injection proxy `pkcs11_outage.so`, built by this crate's build script
/// (module documentation, "Cutting the link to a token").
#[track_caller]
pub fn outage_module() -> PathBuf {
    let path = PathBuf::from(env!("KEKD_OUTAGE_SO"));
    assert!(
        path.is_file(),
        "{} (built by softhsm-tests/build.rs) is missing: rebuild the tests",
        path.display()
    );
    path
}

/// The SoftHSM2 PKCS#11 module (`$KEKD_TEST_PKCS11_MODULE` overrides the search).
pub fn softhsm_module() -> PathBuf {
    if let Some(m) = std::env::var_os("KEKD_TEST_PKCS11_MODULE") {
        return m.into();
    }
    let candidates = [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/local/lib/softhsm/libsofthsm2.so",
    ];
    candidates.iter().map(PathBuf::from).find(|p| p.exists()).unwrap_or_else(|| {
        panic!("libsofthsm2.so not found (looked in {candidates:?}): run ./scripts/install-deps")
    })
}

pub fn my_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

pub fn my_gid() -> u32 {
    nix::unistd::getgid().as_raw()
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A fresh temporary directory, mode 0755 so that the multi-user tests' other user can
/// reach the socket inside it.
pub fn test_dir() -> TempDir {
    let dir = tempfile::Builder::new().prefix("kekd-test-").tempdir().expect("create a temporary directory");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
        .expect("chmod 0755 the test directory");
    dir
}

/// Panics, naming the culprit, unless every ancestor of `path` can be traversed by other
/// users (the multi-user tests need that to reach the socket).
pub fn assert_traversable_by_others(path: &Path) {
    for dir in path.ancestors().skip(1) {
        let mode = fs::metadata(dir).map(|m| m.permissions().mode()).unwrap_or(0);
        assert!(
            mode & 0o001 != 0,
            "{} (mode {mode:o}) is not traversable by other users, so uid {NOBODY_UID} cannot reach {}; \
             set TMPDIR to a directory such as /tmp",
            dir.display(),
            path.display()
        );
    }
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn unb64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .unwrap_or_else(|e| panic!("{s:?} is not standard base64: {e}"))
}

/// `n` records of `tenant` in audit format 1 (docs/FORMATS.md §5.1: no `v`, one record
/// per item), from the genesis record on, chained by the rule of §5: what a build before
/// format 2 left behind.
pub fn format1_trail(tenant: &str, n: u64) -> String {
    use sha2::Digest;
    let mut prev = "0".repeat(64);
    let mut out = String::new();
    for seq in 1..=n {
        let body = format!(
            "{{\"time\":\"2026-11-20T10:00:00.{seq:03}Z\",\"tenant\":\"{tenant}\",\"event\":\"unwrap\",\"request_id\":1,\
             \"item\":{},\"key\":\"default\",\"version\":1,\"outcome\":\"ok\",\"kek\":\"cache\",\"seq\":{seq},\"prev\":\"{prev}\"}}",
            seq - 1
        );
        let hash = hex::encode(sha2::Sha256::digest(body.as_bytes()));
        out.push_str(&format!("{},\"hash\":\"{hash}\"}}\n", &body[..body.len() - 1]));
        prev = hash;
    }
    out
}

/// Whether a process of group `pgid` is still running (zombies, dead but not yet reaped by
/// whoever inherited them, do not count).
fn group_alive(pgid: i32) -> bool {
    let Ok(dir) = fs::read_dir("/proc") else { return false };
    dir.filter_map(Result::ok).any(|e| {
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else { return false };
        // pid (comm) state ppid pgrp ...: comm may hold spaces, so split after its ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else { return false };
        let mut f = rest.split_whitespace();
        let state = f.next();
        let pgrp = f.nth(1).and_then(|g| g.parse::<i32>().ok());
        pgrp == Some(pgid) && state != Some("Z") && state != Some("X")
    })
}

/// An EDEK's name in the audit trail (docs/FORMATS.md §5): its 12-byte nonce in unpadded
/// base64url, as `kekctl audit find` computes it from the format (not from kekd's code).
pub fn edek_id(edek: &[u8]) -> String {
    kekd_client::audit_find::EdekId::of_edek(edek)
        .expect("an EDEK long enough to hold a nonce")
        .as_str()
        .to_owned()
}

/// `n` random bytes from the OS.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf)).expect("read /dev/urandom");
    buf
}

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock after 1970").as_secs()
}

fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn toml_path(p: &Path) -> String {
    toml_str(p.to_str().expect("test paths are UTF-8"))
}

fn toml_list(v: &[u32]) -> String {
    format!("[{}]", v.iter().map(u32::to_string).collect::<Vec<_>>().join(", "))
}

/// Waits for a child with a deadline, polling its status. `None` if it is still running.
pub fn wait_deadline(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait for a child process") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Asks the kernel to SIGKILL the child when the thread that spawned it dies, so that a
/// test process killed by a harness timeout leaves no daemon behind.
pub(crate) fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only calls prctl, which
    // is async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

// ---------------------------------------------------------------------------------------
// Running commands

/// A fault of a token, injected by the outage proxy ([`Kekd::inject_fault`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenFault {
    /// The token was pulled out: `CKR_TOKEN_NOT_PRESENT` for slot calls,
    /// `CKR_DEVICE_REMOVED` for session calls; when it is back, the sessions it had answer
    /// `CKR_SESSION_HANDLE_INVALID`.
    DeviceRemoved,
    /// The sessions open now are closed under the application (`CKR_SESSION_CLOSED`); new
    /// ones work.
    SessionsClosed,
    /// The module forgot its initialisation: `CKR_CRYPTOKI_NOT_INITIALIZED` for every call
    /// until the application calls `C_Finalize` and `C_Initialize` again.
    NotInitialised,
}

/// What the outage proxy counted of a tenant's sessions ([`Kekd::session_report`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionReport {
    /// Open when the report was written.
    pub open: usize,
    /// The most ever open at once in the worker's process.
    pub peak: usize,
    /// `C_OpenSession` calls refused with `CKR_SESSION_COUNT`.
    pub refused: usize,
}

/// Replaces the outage proxy's flag file in one step (the proxy reads it on every call, and
/// must never see it empty, which would mean a cut link).
fn write_flag(flag: &Path, word: &str) {
    let tmp = flag.with_extension("tmp");
    fs::write(&tmp, word).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    fs::rename(&tmp, flag).unwrap_or_else(|e| panic!("install the outage flag {}: {e}", flag.display()));
}

/// What a finished command left: exit code, raw stdout, stderr as text.
#[derive(Debug, Clone)]
pub struct Output {
    pub command: String,
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Output {
    /// Asserts success and returns stdout.
    #[track_caller]
    pub fn ok(&self) -> &[u8] {
        assert_eq!(
            self.code, 0,
            "`{}` failed with exit code {}; stderr:\n{}",
            self.command, self.code, self.stderr
        );
        &self.stdout
    }

    /// Asserts success and returns stdout as text.
    #[track_caller]
    pub fn ok_str(&self) -> &str {
        std::str::from_utf8(self.ok()).unwrap_or_else(|e| panic!("`{}` printed non-UTF-8: {e}", self.command))
    }

    /// Asserts success and parses stdout as one JSON value.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        let text = self.ok_str();
        serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("`{}` did not print one JSON value ({e}):\n{text}", self.command))
    }

    /// Asserts a `kekctl` failure: the exit code, `kekctl: NAME: message` on stderr and
    /// nothing on stdout.
    #[track_caller]
    pub fn assert_error(&self, code: i32, name: &str) {
        assert_eq!(
            self.code, code,
            "`{}`: expected exit code {code} ({name}), got {}; stderr:\n{}",
            self.command, self.code, self.stderr
        );
        let prefix = format!("kekctl: {name}:");
        assert!(
            self.stderr.starts_with(&prefix),
            "`{}`: stderr should start with {prefix:?}, got:\n{}",
            self.command,
            self.stderr
        );
        assert!(
            self.stdout.is_empty(),
            "`{}` failed but printed {} bytes on stdout",
            self.command,
            self.stdout.len()
        );
    }
}

/// Runs a command with stdin bytes and a deadline; panics if it does not finish in time.
pub fn run_command(cmd: Command, stdin: Vec<u8>) -> Output {
    let command = command_line(&cmd);
    try_run_command(cmd, stdin).unwrap_or_else(|e| panic!("cannot start `{command}`: {e}"))
}

fn command_line(cmd: &Command) -> String {
    format!(
        "{} {}",
        Path::new(cmd.get_program()).file_name().unwrap_or(cmd.get_program()).to_string_lossy(),
        cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ")
    )
}

/// [`run_command`], returning the error when the command cannot be started at all (so the
/// caller can say which package is missing); still panics if it does not finish in time.
pub(crate) fn try_run_command(mut cmd: Command, stdin: Vec<u8>) -> io::Result<Output> {
    let command = command_line(&cmd);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    let pid = Pid::from_raw(child.id() as i32);
    let mut input = child.stdin.take().expect("stdin is piped");
    // The command may exit without reading everything (an error): a broken pipe is fine.
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(COMMAND_TIMEOUT) {
        Ok(out) => out.unwrap_or_else(|e| panic!("waiting for `{command}`: {e}")),
        Err(_) => {
            let _ = kill(pid, Signal::SIGKILL);
            panic!("`{command}` did not finish within {COMMAND_TIMEOUT:?}");
        }
    };
    let _ = writer.join();
    let code = out.status.code().unwrap_or_else(|| 128 + out.status.signal().unwrap_or(0));
    Ok(Output {
        command,
        code,
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Runs `kekd ARGS` to completion (for `check-config` and other one-shot commands).
pub fn kekd_command<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(bin("kekd"));
    cmd.args(args).env_remove("SOFTHSM2_CONF");
    run_command(cmd, Vec::new())
}

/// A `kekctl` invocation being built.
#[derive(Debug, Clone)]
pub struct Kekctl {
    global: Vec<OsString>,
    args: Vec<OsString>,
    stdin: Vec<u8>,
    envs: Vec<(OsString, OsString)>,
    user: Option<(u32, u32)>,
    /// Where to put a world-executable copy of kekctl for other users.
    private_bin: Option<PathBuf>,
}

impl Default for Kekctl {
    fn default() -> Self {
        Self::new()
    }
}

impl Kekctl {
    /// A bare invocation: no `--socket`, no `--tenant`, and `KEKD_SOCKET` / `KEKD_TENANT`
    /// removed from its environment.
    pub fn new() -> Self {
        Self {
            global: Vec::new(),
            args: Vec::new(),
            stdin: Vec::new(),
            envs: Vec::new(),
            user: None,
            private_bin: None,
        }
    }

    pub fn socket(mut self, path: impl AsRef<Path>) -> Self {
        self.global.push("--socket".into());
        self.global.push(path.as_ref().into());
        self
    }

    pub fn tenant(mut self, tenant: &str) -> Self {
        self.global.push("--tenant".into());
        self.global.push(tenant.into());
        self
    }

    pub fn json(mut self) -> Self {
        self.global.push("--json".into());
        self
    }

    pub fn context(mut self, key: &str, value: &str) -> Self {
        self.global.push("--context".into());
        self.global.push(format!("{key}={value}").into());
        self
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args.extend(args.into_iter().map(|a| a.as_ref().into()));
        self
    }

    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin = bytes.into();
        self
    }

    pub fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> Self {
        self.envs.push((key.into(), value.as_ref().into()));
        self
    }

    /// Runs as another user and primary group (the test must run as root).
    pub fn as_user(mut self, uid: u32, gid: u32) -> Self {
        self.user = Some((uid, gid));
        self
    }

    fn with_private_bin(mut self, dir: PathBuf) -> Self {
        self.private_bin = Some(dir);
        self
    }

    fn binary(&self) -> PathBuf {
        let target = bin("kekctl");
        let (Some(_), Some(dir)) = (self.user, &self.private_bin) else { return target };
        // The target directory may sit under a directory other users cannot enter: run a
        // world-executable copy from the (0755) test directory instead.
        let copy = dir.join("kekctl");
        if !copy.exists() {
            fs::create_dir_all(dir).expect("create the private bin directory");
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
                .expect("chmod the private bin directory");
            let tmp = dir.join(".kekctl.tmp");
            fs::copy(&target, &tmp).expect("copy kekctl");
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).expect("chmod kekctl");
            fs::rename(&tmp, &copy).expect("install the kekctl copy");
        }
        copy
    }

    pub fn run(self) -> Output {
        let mut cmd = Command::new(self.binary());
        cmd.args(&self.global).args(&self.args).env_remove("KEKD_SOCKET").env_remove("KEKD_TENANT");
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        if let Some((uid, gid)) = self.user {
            assert!(is_root(), "running kekctl as uid {uid} needs root");
            cmd.uid(uid).gid(gid).current_dir("/");
        }
        run_command(cmd, self.stdin)
    }
}

// ---------------------------------------------------------------------------------------
// SoftHSM2

/// A private SoftHSM2 installation: a `softhsm2.conf` and the token directory it names.
#[derive(Debug, Clone)]
pub struct SoftHsm {
    conf: PathBuf,
    tokens: PathBuf,
}

impl SoftHsm {
    /// Creates `root/softhsm2.conf` and `root/tokens/`.
    pub fn create(root: &Path) -> Self {
        let tokens = root.join("tokens");
        fs::create_dir_all(&tokens).expect("create the token directory");
        let conf = root.join("softhsm2.conf");
        fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                tokens.display()
            ),
        )
        .expect("write softhsm2.conf");
        Self { conf, tokens }
    }

    pub fn conf(&self) -> &Path {
        &self.conf
    }

    pub fn token_dir(&self) -> &Path {
        &self.tokens
    }

    /// Initialises a token in the first free slot; SOFTHSM2_CONF is set for this child only.
    pub fn init_token(&self, label: &str, so_pin: &str, pin: &str) {
        let out = Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", label, "--so-pin", so_pin, "--pin", pin])
            .env("SOFTHSM2_CONF", &self.conf)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run softhsm2-util ({e}): run ./scripts/install-deps"));
        assert!(
            out.status.success(),
            "softhsm2-util --init-token --label {label} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

// ---------------------------------------------------------------------------------------
// The daemon

/// One tenant of a test daemon. On SoftHSM2 each tenant gets its own token (labelled with
/// its name) in the daemon's private SoftHSM2 token directory; on a TPM, its own swtpm.
/// Which of the two: the module documentation, "Which root-key backend".
#[derive(Debug, Clone)]
pub struct Tenant {
    pub name: String,
    pub allow_uids: Vec<u32>,
    pub allow_gids: Vec<u32>,
    pub admin_uids: Vec<u32>,
    pub kek_ttl: Option<String>,
    pub idle_ttl: Option<String>,
    /// `offline_grace` in the config; `None`: not written.
    pub offline_grace: Option<String>,
    /// `revocation_poll` in the config; `None`: not written.
    pub revocation_poll: Option<String>,
    /// `encryption_budget` in the config; `None`: not written.
    pub encryption_budget: Option<u64>,
    /// `max_key_depth` in the config; `None`: not written.
    pub max_key_depth: Option<u32>,
    pub create_root_key: bool,
    pub pin: String,
    /// The token's label; `None`: a token of its own, labelled with the tenant's name.
    pub token: Option<String>,
    /// `run_as` in the config: the worker's user.
    pub run_as: Option<String>,
    /// The backend set with [`Tenant::backend`]; `None`: the one the tenant's settings
    /// imply, else the process's [`backend()`].
    pub backend: Option<Backend>,
    /// `tpm.pcrs` in the config (TPM only); `None`: not written.
    pub pcrs: Option<Vec<u8>>,
    /// `tpm.parameter_encryption` in the config (TPM only); `None`: not written.
    pub parameter_encryption: Option<bool>,
    /// Whether the tenant reaches its token through the outage proxy
    /// ([`Tenant::behind_outage_switch`]).
    pub outage_switch: bool,
    /// `seccomp` in the config (`enforce`, `log` or `off`); `None`: not written.
    pub seccomp: Option<String>,
    /// `pkcs11.max_sessions` in the config; `None`: not written.
    pub max_sessions: Option<usize>,
    /// The first PKCS#11-only setting used, which puts the tenant on SoftHSM2.
    pkcs11_setting: Option<&'static str>,
}

impl Tenant {
    /// A tenant nobody may use yet, whose root key is created at first start.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            allow_uids: Vec::new(),
            allow_gids: Vec::new(),
            admin_uids: Vec::new(),
            kek_ttl: None,
            idle_ttl: None,
            offline_grace: None,
            revocation_poll: None,
            encryption_budget: None,
            max_key_depth: None,
            create_root_key: true,
            pin: format!("pin-{name}-1234"),
            token: None,
            run_as: None,
            backend: None,
            pcrs: None,
            parameter_encryption: None,
            outage_switch: false,
            seccomp: None,
            max_sessions: None,
            pkcs11_setting: None,
        }
    }

    /// Puts the root key on `backend` whatever `KEKD_TEST_BACKEND` says: for tests that
    /// are about one backend (PKCS#11 tokens and PINs, PCR policies).
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = Some(backend);
        self
    }

    /// Puts the root key on the token labelled `label`, shared with every other tenant on
    /// it. The token's PIN is derived from its label; [`Tenant::pin`] then overrides what
    /// this tenant's PIN file says (to configure a wrong one). Implies SoftHSM2.
    pub fn on_token(mut self, label: &str) -> Self {
        self.token = Some(label.into());
        self.pin = shared_token_pin(label);
        self.pkcs11_setting.get_or_insert("on_token");
        self
    }

    /// What this tenant's PIN file holds. Implies SoftHSM2.
    pub fn pin(mut self, pin: &str) -> Self {
        self.pin = pin.into();
        self.pkcs11_setting.get_or_insert("pin");
        self
    }

    /// Puts the PKCS#11 fault-injection proxy between kekd and the tenant's SoftHSM2 token,
    /// so that [`Kekd::cut_token`] and [`Kekd::restore_token`] can make the token unreachable
    /// and bring it back while kekd runs (module documentation, "Cutting the link to a
    /// token"). Implies SoftHSM2.
    pub fn behind_outage_switch(mut self) -> Self {
        self.outage_switch = true;
        self.pkcs11_setting.get_or_insert("behind_outage_switch");
        self
    }

    /// Seals the tenant's KEKs to these PCRs of the sha256 bank (`tpm.pcrs`). Implies a TPM.
    pub fn pcrs(mut self, pcrs: &[u8]) -> Self {
        self.pcrs = Some(pcrs.to_vec());
        self
    }

    /// `tpm.parameter_encryption`. Implies a TPM.
    pub fn parameter_encryption(mut self, on: bool) -> Self {
        self.parameter_encryption = Some(on);
        self
    }

    /// The backend the tenant's root key will be on: [`Tenant::backend`] if set, else the
    /// one its PKCS#11-only or TPM-only settings imply, else the process's [`backend()`].
    pub fn effective_backend(&self) -> Backend {
        match (self.backend, self.pkcs11_setting, self.tpm_setting()) {
            (Some(b), _, _) => b,
            (None, Some(_), _) => Backend::SoftHsm,
            (None, None, Some(_)) => Backend::Tpm,
            (None, None, None) => backend(),
        }
    }

    fn tpm_setting(&self) -> Option<&'static str> {
        match (&self.pcrs, self.parameter_encryption) {
            (Some(_), _) => Some("pcrs"),
            (None, Some(_)) => Some("parameter_encryption"),
            (None, None) => None,
        }
    }

    /// [`Tenant::effective_backend`], panicking when a setting of the other backend was
    /// used too: it would be silently left out of the config.
    #[track_caller]
    fn checked_backend(&self) -> Backend {
        let backend = self.effective_backend();
        let (other, setting) = match backend {
            Backend::SoftHsm | Backend::Kryoptic => ("TPM", self.tpm_setting()),
            Backend::Tpm => ("PKCS#11", self.pkcs11_setting),
        };
        if let Some(setting) = setting {
            panic!("tenant {:?} is on {backend:?} but sets {setting}, a {other} setting", self.name);
        }
        backend
    }

    /// `seccomp`: what the worker's system-call filter does (`enforce`, `log`, `off`).
    pub fn seccomp(mut self, mode: &str) -> Self {
        self.seccomp = Some(mode.into());
        self
    }

    /// Runs the tenant's worker as `user`.
    pub fn run_as(mut self, user: &str) -> Self {
        self.run_as = Some(user.into());
        self
    }

    fn token_label(&self) -> &str {
        self.token.as_deref().unwrap_or(&self.name)
    }

    /// A tenant whose admin (and so also data user) is the user running the tests.
    pub fn owned_by_me(name: &str) -> Self {
        Self::new(name).admin(my_uid())
    }

    pub fn allow_uid(mut self, uid: u32) -> Self {
        self.allow_uids.push(uid);
        self
    }

    pub fn allow_gid(mut self, gid: u32) -> Self {
        self.allow_gids.push(gid);
        self
    }

    pub fn admin(mut self, uid: u32) -> Self {
        self.admin_uids.push(uid);
        self
    }

    pub fn kek_ttl(mut self, ttl: &str) -> Self {
        self.kek_ttl = Some(ttl.into());
        self
    }

    pub fn idle_ttl(mut self, ttl: &str) -> Self {
        self.idle_ttl = Some(ttl.into());
        self
    }

    /// `offline_grace` (a humantime duration; "0s" fails closed at `kek_ttl`).
    pub fn offline_grace(mut self, grace: &str) -> Self {
        self.offline_grace = Some(grace.into());
        self
    }

    /// `max_key_depth`: levels a key chain may have (root key, KEKs, data key).
    pub fn max_key_depth(mut self, depth: u32) -> Self {
        self.max_key_depth = Some(depth);
        self
    }

    /// `encryption_budget`: encryptions under one KEK version before it rotates.
    pub fn encryption_budget(mut self, budget: u64) -> Self {
        self.encryption_budget = Some(budget);
        self
    }

    /// `revocation_poll` (a humantime duration).
    pub fn revocation_poll(mut self, poll: &str) -> Self {
        self.revocation_poll = Some(poll.into());
        self
    }

    /// `pkcs11.max_sessions`: sessions the worker keeps open on its token at most. Implies
    /// SoftHSM2.
    pub fn max_sessions(mut self, max: usize) -> Self {
        self.max_sessions = Some(max);
        self.pkcs11_setting.get_or_insert("max_sessions");
        self
    }

    /// `pkcs11.create_root_key`. Implies SoftHSM2.
    pub fn create_root_key(mut self, create: bool) -> Self {
        self.create_root_key = create;
        self.pkcs11_setting.get_or_insert("create_root_key");
        self
    }
}

fn shared_token_pin(label: &str) -> String {
    format!("pin-token-{label}-1234")
}

/// The label of a SoftHSM2 tenant's root key (`pkcs11.key_label`).
fn root_key_label(tenant: &str) -> String {
    format!("kekd-root-{tenant}")
}

/// Where one tenant of a test daemon keeps its root key.
#[derive(Debug)]
enum RootKeyHome {
    /// A SoftHSM2 token, or a kryoptic one when `kryoptic` is set: its label and user PIN
    /// (which the tenant's PIN file may get wrong on purpose), the tenant's PIN file, and the
    /// outage proxy's flag file when the tenant is behind one.
    Token {
        label: String,
        pin: String,
        pin_file: PathBuf,
        outage_flag: Option<PathBuf>,
        kryoptic: Option<Kryoptic>,
    },
    /// The tenant's own swtpm.
    Tpm(Swtpm),
}

/// Builds the configuration of a test daemon.
#[derive(Debug, Clone, Default)]
pub struct KekdBuilder {
    tenants: Vec<Tenant>,
    max_frame_bytes: Option<usize>,
    allow_unlocked_memory: bool,
    /// Lines of the `[audit]` table besides `dir` (which is always DIR/audit).
    audit: Vec<String>,
}

impl KekdBuilder {
    pub fn tenant(mut self, tenant: Tenant) -> Self {
        self.tenants.push(tenant);
        self
    }

    pub fn max_frame_bytes(mut self, n: usize) -> Self {
        self.max_frame_bytes = Some(n);
        self
    }

    pub fn allow_unlocked_memory(mut self, allow: bool) -> Self {
        self.allow_unlocked_memory = allow;
        self
    }

    /// A setting of the `[audit]` table, e.g. `mode = "best_effort"`.
    pub fn audit(mut self, line: &str) -> Self {
        self.audit.push(line.to_owned());
        self
    }

    /// Creates the directory, tokens, PIN files (or swtpms) and config file, without
    /// starting kekd. Each TPM tenant's swtpm is started here: the config names its port.
    #[track_caller]
    pub fn prepare(self) -> Kekd {
        assert!(!self.tenants.is_empty(), "a test daemon needs at least one tenant");
        // A loop, not a map: the panic then points at the test's call.
        let mut backends = Vec::new();
        for t in &self.tenants {
            backends.push(t.checked_backend());
        }
        let dir = test_dir();
        let root = dir.path().to_path_buf();
        let on_softhsm = backends.contains(&Backend::SoftHsm);
        let hsm = on_softhsm.then(|| SoftHsm::create(&root.join("softhsm")));
        let pins = root.join("pins");
        if on_softhsm || backends.contains(&Backend::Kryoptic) {
            fs::create_dir_all(&pins).expect("create the PIN directory");
        }
        let socket = root.join("kekd.sock");

        let mut cfg = String::new();
        cfg.push_str(&format!("socket = {}\n", toml_path(&socket)));
        cfg.push_str(&format!("state_dir = {}\n", toml_path(&root.join("state"))));
        cfg.push_str("log_level = \"info\"\n");
        if let Some(n) = self.max_frame_bytes {
            cfg.push_str(&format!("max_frame_bytes = {n}\n"));
        }
        if self.allow_unlocked_memory {
            cfg.push_str("allow_unlocked_memory = true\n");
        }
        cfg.push_str(&format!("[audit]\ndir = {}\n", toml_path(&root.join("audit"))));
        for line in &self.audit {
            cfg.push_str(line);
            cfg.push('\n');
        }
        let mut tokens = std::collections::BTreeSet::new();
        let mut homes = Vec::new();
        for (t, backend) in self.tenants.iter().zip(backends) {
            let home = match backend {
                Backend::SoftHsm | Backend::Kryoptic => {
                    let token_pin = match &t.token {
                        Some(label) => shared_token_pin(label),
                        None => t.pin.clone(),
                    };
                    // One sqlite file per kryoptic token: it holds one token.
                    let kryoptic = (backend == Backend::Kryoptic)
                        .then(|| Kryoptic::at(&root.join("kryoptic"), t.token_label()));
                    if tokens.insert((backend == Backend::Kryoptic, t.token_label().to_owned())) {
                        let so_pin = format!("so-{token_pin}");
                        match &kryoptic {
                            Some(k) => k.init_token(t.token_label(), &so_pin, &token_pin),
                            None => hsm.as_ref().expect("created for SoftHSM2 tenants").init_token(
                                t.token_label(),
                                &so_pin,
                                &token_pin,
                            ),
                        }
                    }
                    let pin_file = pins.join(format!("{}.pin", t.name));
                    fs::write(&pin_file, format!("{}\n", t.pin)).expect("write the PIN file");
                    fs::set_permissions(&pin_file, fs::Permissions::from_mode(0o600))
                        .expect("chmod the PIN file");
                    let outage_flag = t.outage_switch.then(|| {
                        let dir = root.join("outage");
                        fs::create_dir_all(&dir).expect("create the outage flag directory");
                        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
                            .expect("chmod the outage flag directory");
                        dir.join(format!("{}.down", t.name))
                    });
                    RootKeyHome::Token {
                        label: t.token_label().to_owned(),
                        pin: token_pin,
                        pin_file,
                        outage_flag,
                        kryoptic,
                    }
                }
                Backend::Tpm => RootKeyHome::Tpm(Swtpm::start(&root.join("swtpm").join(&t.name))),
            };

            cfg.push_str(&format!("\n[tenants.{}]\n", t.name));
            cfg.push_str(&format!("allow_uids = {}\n", toml_list(&t.allow_uids)));
            cfg.push_str(&format!("allow_gids = {}\n", toml_list(&t.allow_gids)));
            cfg.push_str(&format!("admin_uids = {}\n", toml_list(&t.admin_uids)));
            if let Some(ttl) = &t.kek_ttl {
                cfg.push_str(&format!("kek_ttl = {}\n", toml_str(ttl)));
            }
            if let Some(ttl) = &t.idle_ttl {
                cfg.push_str(&format!("idle_ttl = {}\n", toml_str(ttl)));
            }
            if let Some(grace) = &t.offline_grace {
                cfg.push_str(&format!("offline_grace = {}\n", toml_str(grace)));
            }
            if let Some(depth) = t.max_key_depth {
                cfg.push_str(&format!("max_key_depth = {depth}\n"));
            }
            if let Some(budget) = t.encryption_budget {
                cfg.push_str(&format!("encryption_budget = {budget}\n"));
            }
            if let Some(poll) = &t.revocation_poll {
                cfg.push_str(&format!("revocation_poll = {}\n", toml_str(poll)));
            }
            if let Some(user) = &t.run_as {
                cfg.push_str(&format!("run_as = {}\n", toml_str(user)));
            }
            if let Some(mode) = &t.seccomp {
                cfg.push_str(&format!("seccomp = {}\n", toml_str(mode)));
            }
            match &home {
                RootKeyHome::Token { pin_file, outage_flag, kryoptic, .. } => {
                    cfg.push_str(&format!("\n[tenants.{}.pkcs11]\n", t.name));
                    let token_module = match kryoptic {
                        Some(_) => kryoptic_module(),
                        None => softhsm_module(),
                    };
                    let module = match outage_flag {
                        Some(_) => outage_module(),
                        None => token_module.clone(),
                    };
                    cfg.push_str(&format!("module = {}\n", toml_path(&module)));
                    cfg.push_str(&format!("token_label = {}\n", toml_str(t.token_label())));
                    cfg.push_str(&format!("key_label = {}\n", toml_str(&root_key_label(&t.name))));
                    cfg.push_str(&format!("pin_file = {}\n", toml_path(pin_file)));
                    cfg.push_str(&format!("create_root_key = {}\n", t.create_root_key));
                    if let Some(max) = t.max_sessions {
                        cfg.push_str(&format!("max_sessions = {max}\n"));
                    }
                    let mut env = Vec::new();
                    match kryoptic {
                        Some(k) => env.push(format!("KRYOPTIC_CONF = {}", toml_path(k.conf()))),
                        None => {
                            let hsm = hsm.as_ref().expect("created for SoftHSM2 tenants");
                            cfg.push_str(&format!("softhsm2_conf = {}\n", toml_path(hsm.conf())));
                        }
                    }
                    if let Some(flag) = outage_flag {
                        env.push(format!("KEKD_OUTAGE_MODULE = {}", toml_path(&token_module)));
                        env.push(format!("KEKD_OUTAGE_FLAG = {}", toml_path(flag)));
                    }
                    if !env.is_empty() {
                        cfg.push_str(&format!("module_env = {{ {} }}\n", env.join(", ")));
                    }
                }
                RootKeyHome::Tpm(swtpm) => {
                    cfg.push_str(&format!("\n[tenants.{}.tpm]\n", t.name));
                    cfg.push_str(&format!("tcti = {}\n", toml_str(&swtpm.tcti())));
                    if let Some(pcrs) = &t.pcrs {
                        let pcrs: Vec<u32> = pcrs.iter().map(|&p| p.into()).collect();
                        cfg.push_str(&format!("pcrs = {}\n", toml_list(&pcrs)));
                    }
                    if let Some(on) = t.parameter_encryption {
                        cfg.push_str(&format!("parameter_encryption = {on}\n"));
                    }
                }
            }
            homes.push((t.name.clone(), home));
        }
        let config = root.join("kekd.toml");
        fs::write(&config, cfg).expect("write kekd.toml");

        Kekd {
            launch: Launch::Run { config },
            socket,
            tenants: self.tenants.iter().map(|t| t.name.clone()).collect(),
            hsm,
            child: None,
            starts: 0,
            log: None,
            envs: Vec::new(),
            journal: false,
            wrapper: Vec::new(),
            homes,
            dir,
        }
    }

    /// Prepares and starts the daemon, waiting for its ready line.
    #[track_caller]
    pub fn start(self) -> Kekd {
        let mut kekd = self.prepare();
        kekd.start();
        kekd
    }
}

#[derive(Debug, Clone)]
enum Launch {
    /// `kekd run --config PATH`
    Run { config: PathBuf },
    /// `kekd dev --dir DIR ARGS`, or `kekd dev ARGS` (a temporary directory) without one.
    Dev { dir: Option<PathBuf>, args: Vec<OsString> },
}

/// Why a daemon did not become ready.
#[derive(Debug)]
pub struct StartFailure {
    /// Its exit status, or `None` if it was still running at the deadline (and was killed).
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

impl fmt::Display for StartFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(s) => writeln!(f, "kekd exited before it was ready ({s})")?,
            None => writeln!(f, "kekd printed no ready line within {READY_TIMEOUT:?}")?,
        }
        writeln!(f, "--- stdout ---\n{}", self.stdout)?;
        write!(f, "--- stderr ---\n{}", self.stderr)
    }
}

/// A kekd process owned by one test, with everything it uses inside one temporary
/// directory. Killed (SIGKILL to its process group) on drop.
pub struct Kekd {
    launch: Launch,
    socket: PathBuf,
    tenants: Vec<String>,
    hsm: Option<SoftHsm>,
    child: Option<Child>,
    starts: u32,
    log: Option<PathBuf>,
    envs: Vec<(OsString, OsString)>,
    /// Tell kekd its stderr is the journal (`JOURNAL_STREAM`), as systemd does.
    journal: bool,
    /// A command kekd runs under (e.g. `setpriv ... prlimit ...`), to start it with fewer
    /// privileges or lower limits than the test has.
    wrapper: Vec<OsString>,
    /// Each tenant's root-key home, in run mode. After `child`: a daemon is never left
    /// talking to a swtpm that is gone (drop kills the daemon first anyway).
    homes: Vec<(String, RootKeyHome)>,
    // Last: removed after the daemon and the swtpms are dead.
    dir: TempDir,
}

impl fmt::Debug for Kekd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kekd").field("dir", &self.dir.path()).field("launch", &self.launch).finish()
    }
}

impl Kekd {
    pub fn builder() -> KekdBuilder {
        KekdBuilder::default()
    }

    /// A daemon with one tenant, `acme`, administered by the user running the tests.
    #[track_caller]
    pub fn start_default() -> Kekd {
        Self::builder().tenant(Tenant::owned_by_me("acme")).start()
    }

    /// `kekd dev --dir <test dir>/dev`, not started yet. HOME and TMPDIR point at empty
    /// directories under `<test dir>/outside/`, so a test can check nothing was written
    /// outside DIR.
    pub fn dev() -> Kekd {
        Self::dev_with(true, Vec::new())
    }

    /// [`Kekd::dev`] with more arguments after `--dir DIR` (e.g. `--backend tpm`).
    pub fn dev_args(args: &[&str]) -> Kekd {
        Self::dev_with(true, args.iter().map(OsString::from).collect())
    }

    /// Plain `kekd dev`, without `--dir`: it picks a temporary directory (under the fake
    /// TMPDIR, `<test dir>/outside/tmp`), known from the ready line once started.
    pub fn dev_without_dir() -> Kekd {
        Self::dev_with(false, Vec::new())
    }

    fn dev_with(with_dir: bool, args: Vec<OsString>) -> Kekd {
        let dir = test_dir();
        let dev_dir = dir.path().join("dev");
        let home = dir.path().join("outside/home");
        let tmp = dir.path().join("outside/tmp");
        fs::create_dir_all(&home).expect("create the fake HOME");
        fs::create_dir_all(&tmp).expect("create the fake TMPDIR");
        Kekd {
            launch: Launch::Dev { dir: with_dir.then(|| dev_dir.clone()), args },
            socket: dev_dir.join("kekd.sock"),
            tenants: vec!["demo".into()],
            hsm: None,
            child: None,
            starts: 0,
            log: None,
            envs: vec![("HOME".into(), home.into()), ("TMPDIR".into(), tmp.into())],
            journal: false,
            wrapper: Vec::new(),
            homes: Vec::new(),
            dir,
        }
    }

    /// The test's temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A tenant's audit trail: DIR/audit/TENANT (dev mode: the dev directory's).
    pub fn audit_dir(&self, tenant: &str) -> PathBuf {
        self.dev_dir().unwrap_or(self.dir()).join("audit").join(tenant)
    }

    /// The tenant's audit files, oldest first.
    pub fn audit_files(&self, tenant: &str) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = match fs::read_dir(self.audit_dir(tenant)) {
            Ok(d) => d
                .map(|e| e.expect("read the audit directory").path())
                .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
                .collect(),
            Err(_) => Vec::new(),
        };
        files.sort();
        files
    }

    /// Every audit record of the tenant so far, in order.
    pub fn audit_records(&self, tenant: &str) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        for f in self.audit_files(tenant) {
            let text = fs::read_to_string(&f).expect("read an audit file");
            for line in text.lines() {
                out.push(
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("{}: {e}: {line}", f.display())),
                );
            }
        }
        out
    }

    /// Waits up to `timeout` for an audit record matching `pred` (records nobody waits on,
    /// such as lease events, are written a moment after they happen).
    #[track_caller]
    pub fn wait_audit(
        &self,
        tenant: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.audit_records(tenant).into_iter().find(|r| pred(r)) {
                return r;
            }
            assert!(Instant::now() < deadline, "no such audit record within {timeout:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The directory given to `kekd dev --dir`, in dev mode.
    pub fn dev_dir(&self) -> Option<&Path> {
        match &self.launch {
            Launch::Dev { dir, .. } => dir.as_deref(),
            Launch::Run { .. } => None,
        }
    }

    /// The config file, in `run` mode.
    pub fn config_path(&self) -> Option<&Path> {
        match &self.launch {
            Launch::Run { config } => Some(config),
            Launch::Dev { .. } => None,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The first tenant, the one `kekctl()` talks to.
    pub fn tenant(&self) -> &str {
        &self.tenants[0]
    }

    /// The private SoftHSM2 installation; `None` in dev mode (`kekd dev` makes its own)
    /// and when no tenant is on SoftHSM2.
    pub fn softhsm(&self) -> Option<&SoftHsm> {
        self.hsm.as_ref()
    }

    #[track_caller]
    fn home(&self, tenant: &str) -> &RootKeyHome {
        match self.homes.iter().find(|(name, _)| name == tenant) {
            Some((_, home)) => home,
            None => panic!("{tenant:?} is not a tenant of this run-mode test daemon ({:?})", self.tenants),
        }
    }

    /// Which backend `tenant`'s root key is on.
    #[track_caller]
    pub fn backend_of(&self, tenant: &str) -> Backend {
        match self.home(tenant) {
            RootKeyHome::Token { kryoptic: None, .. } => Backend::SoftHsm,
            RootKeyHome::Token { kryoptic: Some(_), .. } => Backend::Kryoptic,
            RootKeyHome::Tpm(_) => Backend::Tpm,
        }
    }

    /// `tenant`'s swtpm; panics if the tenant is not on a TPM.
    #[track_caller]
    pub fn swtpm(&self, tenant: &str) -> &Swtpm {
        match self.home(tenant) {
            RootKeyHome::Tpm(swtpm) => swtpm,
            RootKeyHome::Token { .. } => panic!("tenant {tenant:?} is on SoftHSM2, not on a swtpm"),
        }
    }

    /// `tenant`'s swtpm, to stop or restart it; panics if the tenant is not on a TPM.
    #[track_caller]
    pub fn swtpm_mut(&mut self, tenant: &str) -> &mut Swtpm {
        match self.homes.iter_mut().find(|(name, _)| name == tenant) {
            Some((_, RootKeyHome::Tpm(swtpm))) => swtpm,
            Some((_, RootKeyHome::Token { .. })) => {
                panic!("tenant {tenant:?} is on SoftHSM2, not on a swtpm")
            }
            None => panic!("{tenant:?} is not a tenant of this run-mode test daemon ({:?})", self.tenants),
        }
    }

    /// Destroys `tenant`'s root key behind the daemon's back, as an operator revoking it
    /// would: on SoftHSM2 the key object is deleted from the token (with pkcs11-tool); on a
    /// TPM the owner hierarchy is cleared, which changes the seed the storage primary is
    /// derived from, so nothing sealed under it can be unsealed again.
    #[track_caller]
    pub fn destroy_root_key(&self, tenant: &str) {
        match self.home(tenant) {
            RootKeyHome::Tpm(swtpm) => swtpm.clear(),
            RootKeyHome::Token { .. } => self.delete_token_key(tenant, &root_key_label(tenant)),
        }
    }

    /// The plaintext KEK of `tenant`'s `key` version `version`, recovered from its record in
    /// the key store with the tenant's SoftHSM2 root key, as a customer holding only the HSM
    /// and the key store would (docs/FORMATS.md §2). Call it while kekd is stopped: SoftHSM2
    /// logins from two processes at once are unreliable.
    #[track_caller]
    pub fn recover_kek(&self, tenant: &str, key: &str, version: u32) -> Vec<u8> {
        use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
        use cryptoki::mechanism::aead::GcmParams;
        use cryptoki::mechanism::Mechanism;
        use cryptoki::object::Attribute;
        use cryptoki::session::UserType;
        use cryptoki::types::AuthPin;

        let RootKeyHome::Token { label, pin, kryoptic: None, .. } = self.home(tenant) else {
            panic!("tenant {tenant:?} is not on SoftHSM2");
        };
        let hex: String = key.bytes().map(|b| format!("{b:02x}")).collect();
        let path = self.dir().join(format!("state/tenants/{tenant}/keys/{hex}/v{version:010}.kek"));
        let record: serde_json::Value =
            serde_json::from_slice(&fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
                .expect("a KEK record is JSON");
        let sealed = unb64(record["sealed"].as_str().expect("a sealed member"));
        let (iv, ciphertext) = sealed.split_at(12);
        let mut aad = b"kekd/kek/v1".to_vec();
        for s in [tenant, key] {
            aad.extend_from_slice(&(s.len() as u16).to_be_bytes());
            aad.extend_from_slice(s.as_bytes());
        }
        aad.extend_from_slice(&version.to_be_bytes());

        // SoftHSM2 reads its configuration from the environment at C_Initialize.
        let hsm = self.hsm.as_ref().expect("a SoftHSM2 tenant has a SoftHSM2 installation");
        std::env::set_var("SOFTHSM2_CONF", hsm.conf());
        let pkcs11 = Pkcs11::new(softhsm_module()).expect("load SoftHSM2");
        pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).expect("C_Initialize");
        let slot = pkcs11
            .get_slots_with_token()
            .unwrap()
            .into_iter()
            .find(|s| pkcs11.get_token_info(*s).is_ok_and(|t| t.label() == label))
            .unwrap_or_else(|| panic!("no token {label:?}"));
        let session = pkcs11.open_ro_session(slot).unwrap();
        session.login(UserType::User, Some(&AuthPin::from(pin.as_str()))).expect("log in");
        let root_label =
            record["root_key"].as_str().map(str::to_owned).unwrap_or_else(|| root_key_label(tenant));
        let found = session.find_objects(&[Attribute::Label(root_label.into_bytes())]).unwrap();
        let mut iv: [u8; 12] = iv.try_into().unwrap();
        let params = GcmParams::new(&mut iv, &aad, 128.into()).unwrap();
        let kek = session
            .decrypt(&Mechanism::AesGcm(params), found[0], ciphertext)
            .expect("C_Decrypt of the KEK record");
        assert_eq!(kek.len(), 32, "a KEK is 32 bytes");
        kek
    }

    /// The label the fixture gives `tenant`'s (first) root key on its token.
    pub fn root_key_label(&self, tenant: &str) -> String {
        root_key_label(tenant)
    }

    /// Deletes the secret key labelled `key_label` from `tenant`'s SoftHSM2 (or kryoptic)
    /// token, as an operator would with pkcs11-tool (e.g. an old root key after a rotation).
    pub fn delete_token_key(&self, tenant: &str, key_label: &str) {
        match self.home(tenant) {
            RootKeyHome::Tpm(_) => panic!("tenant {tenant:?} is on a TPM: it has no token keys"),
            RootKeyHome::Token { label, pin, kryoptic, .. } => {
                let mut cmd = Command::new("pkcs11-tool");
                match kryoptic {
                    Some(k) => {
                        cmd.arg("--module").arg(kryoptic_module()).env("KRYOPTIC_CONF", k.conf());
                    }
                    None => {
                        let hsm = self.hsm.as_ref().expect("a SoftHSM2 tenant has a SoftHSM2 installation");
                        cmd.arg("--module").arg(softhsm_module()).env("SOFTHSM2_CONF", hsm.conf());
                    }
                }
                cmd.args(["--token-label", label, "--login", "--pin", pin]);
                cmd.args(["--delete-object", "--type", "secrkey", "--label", key_label]);
                let out = try_run_command(cmd, Vec::new()).unwrap_or_else(|e| {
                    panic!("cannot run pkcs11-tool (opensc): {e}: run ./scripts/install-deps")
                });
                assert_eq!(
                    out.code, 0,
                    "deleting key {key_label:?} of {tenant} from token {label:?} failed: `{}` exited with {}; stderr:\n{}",
                    out.command, out.code, out.stderr
                );
            }
        }
    }

    /// The outage proxy's flag file for `tenant`; panics if the tenant is not behind one.
    #[track_caller]
    fn outage_flag(&self, tenant: &str) -> &Path {
        match self.home(tenant) {
            RootKeyHome::Token { outage_flag: Some(flag), .. } => flag,
            RootKeyHome::Token { outage_flag: None, .. } => panic!(
                "tenant {tenant:?} is not behind the outage switch: build it with \
                 Tenant::behind_outage_switch() to cut its token"
            ),
            RootKeyHome::Tpm(_) => panic!(
                "tenant {tenant:?} is on a swtpm, not behind the outage switch (a SoftHSM2 tenant \
                 built with Tenant::behind_outage_switch()); stop its swtpm instead"
            ),
        }
    }

    /// Makes `tenant`'s token unreachable, as if the link to a network HSM went down: from
    /// now on every PKCS#11 call of its worker (but loading and unloading the module) fails
    /// with `CKR_DEVICE_ERROR`. The token and its keys are untouched. Panics unless the
    /// tenant is [`Tenant::behind_outage_switch`].
    #[track_caller]
    pub fn cut_token(&self, tenant: &str) {
        let flag = self.outage_flag(tenant);
        fs::write(flag, b"").unwrap_or_else(|e| panic!("create the outage flag {}: {e}", flag.display()));
    }

    /// Makes `tenant`'s PKCS#11 module misbehave instead of failing: from now on each
    /// `C_Encrypt` and `C_Decrypt` of its worker first opens a packet socket
    /// (`socket(AF_PACKET, SOCK_RAW)`, like a library sniffing the network), then goes on as
    /// usual. The seccomp policy forbids that call. [`Kekd::restore_token`] ends it. Panics
    /// unless the tenant is [`Tenant::behind_outage_switch`].
    #[track_caller]
    pub fn make_module_misbehave(&self, tenant: &str) {
        let flag = self.outage_flag(tenant);
        fs::write(flag, b"syscall")
            .unwrap_or_else(|e| panic!("write the outage flag {}: {e}", flag.display()));
    }

    /// Makes `tenant`'s token hang, like a network HSM that stops answering without
    /// closing the link: from now on every PKCS#11 call of its worker that reaches the token
    /// blocks (up to 120 s) until [`Kekd::restore_token`]. Panics unless the tenant is
    /// [`Tenant::behind_outage_switch`].
    #[track_caller]
    pub fn hang_token(&self, tenant: &str) {
        let flag = self.outage_flag(tenant);
        fs::write(flag, b"hang").unwrap_or_else(|e| panic!("write the outage flag {}: {e}", flag.display()));
    }

    /// Brings `tenant`'s token back after [`Kekd::cut_token`] (a no-op when it is not cut).
    /// Panics unless the tenant is [`Tenant::behind_outage_switch`].
    #[track_caller]
    pub fn restore_token(&self, tenant: &str) {
        let flag = self.outage_flag(tenant);
        match fs::remove_file(flag) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => panic!("remove the outage flag {}: {e}", flag.display()),
        }
    }

    /// Whether `tenant`'s token is cut now. Panics unless the tenant is
    /// [`Tenant::behind_outage_switch`].
    #[track_caller]
    pub fn token_is_cut(&self, tenant: &str) -> bool {
        self.outage_flag(tenant).exists()
    }

    /// Makes `tenant`'s token fail the way `fault` says, through the outage proxy (module
    /// documentation, "Cutting the link to a token"), until [`Kekd::restore_token`]. Panics
    /// unless the tenant is [`Tenant::behind_outage_switch`].
    #[track_caller]
    pub fn inject_fault(&self, tenant: &str, fault: TokenFault) {
        let word = match fault {
            TokenFault::DeviceRemoved => "device-removed",
            TokenFault::SessionsClosed => "session-closed",
            TokenFault::NotInitialised => "not-initialised",
        };
        write_flag(self.outage_flag(tenant), word);
    }

    /// Makes `tenant`'s token refuse a session (`CKR_SESSION_COUNT`) while `max` are open,
    /// and take `delay` longer over each `C_Encrypt` and `C_Decrypt` (a network HSM's round
    /// trip: a burst then holds sessions long enough to overlap), through the outage proxy,
    /// until [`Kekd::restore_token`]; [`Kekd::session_report`] then says how many were open
    /// at most. Panics unless the tenant is [`Tenant::behind_outage_switch`].
    #[track_caller]
    pub fn cap_sessions(&self, tenant: &str, max: usize, delay: Duration) {
        write_flag(self.outage_flag(tenant), &format!("max-sessions={max} delay={}", delay.as_millis()));
    }

    /// What the outage proxy counted of `tenant`'s sessions while they were capped
    /// ([`Kekd::cap_sessions`]); `None` before it wrote anything.
    #[track_caller]
    pub fn session_report(&self, tenant: &str) -> Option<SessionReport> {
        let mut path = self.outage_flag(tenant).as_os_str().to_owned();
        path.push(".sessions");
        let text = fs::read_to_string(PathBuf::from(path)).ok()?;
        let field = |name: &str| -> usize {
            text.split_whitespace()
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
                .unwrap_or_else(|| panic!("no {name}= in the proxy's session report {text:?}"))
        };
        Some(SessionReport { open: field("open"), peak: field("peak"), refused: field("refused") })
    }

    /// The directory of `tenant`'s SoftHSM2 token (found by its label in `token.object`).
    #[track_caller]
    fn softhsm_token_dir(&self, tenant: &str) -> PathBuf {
        let RootKeyHome::Token { label, kryoptic: None, .. } = self.home(tenant) else {
            panic!("tenant {tenant:?} is not on SoftHSM2");
        };
        let hsm = self.hsm.as_ref().expect("a SoftHSM2 tenant has a SoftHSM2 installation");
        // Labels are blank-padded to 32 bytes on the token.
        let padded = format!("{label:<32}");
        let found: Vec<PathBuf> = fs::read_dir(hsm.token_dir())
            .expect("list the SoftHSM2 token directory")
            .map(|e| e.expect("read the SoftHSM2 token directory").path())
            .filter(|d| {
                fs::read(d.join("token.object"))
                    .is_ok_and(|b| b.windows(padded.len()).any(|w| w == padded.as_bytes()))
            })
            .collect();
        match &found[..] {
            [dir] => dir.clone(),
            _ => panic!("expected one SoftHSM2 token labelled {label:?}, found {found:?}"),
        }
    }

    /// Moves `tenant`'s SoftHSM2 token directory out of SoftHSM2's token directory, as an
    /// operator unplugging a token would (no proxy needed): SoftHSM2 then fails every call on
    /// it, and does not see it again when it comes back until the module is re-initialised.
    /// [`Kekd::bring_token_back`] undoes it.
    #[track_caller]
    pub fn take_token_away(&self, tenant: &str) {
        let dir = self.softhsm_token_dir(tenant);
        let away = self.dir().join("tokens-away");
        fs::create_dir_all(&away).expect("create the directory for tokens taken away");
        let to = away.join(dir.file_name().expect("a token directory has a name"));
        fs::rename(&dir, &to).unwrap_or_else(|e| panic!("move {} away: {e}", dir.display()));
    }

    /// Puts back the token directory [`Kekd::take_token_away`] moved.
    #[track_caller]
    pub fn bring_token_back(&self, tenant: &str) {
        let away = self.dir().join("tokens-away");
        let hsm = self.hsm.as_ref().expect("a SoftHSM2 tenant has a SoftHSM2 installation");
        let entries: Vec<PathBuf> = fs::read_dir(&away)
            .unwrap_or_else(|e| panic!("no token of {tenant:?} was taken away ({e})"))
            .map(|e| e.expect("read the directory of tokens taken away").path())
            .collect();
        for dir in entries {
            let to = hsm.token_dir().join(dir.file_name().expect("a token directory has a name"));
            fs::rename(&dir, &to).unwrap_or_else(|e| panic!("bring {} back: {e}", dir.display()));
        }
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => c.try_wait().expect("query the daemon's status").is_none(),
            None => false,
        }
    }

    /// The process id of the running daemon.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// What the daemon wrote on stderr since it was last started.
    pub fn stderr(&self) -> String {
        self.log.as_ref().and_then(|p| fs::read_to_string(p).ok()).unwrap_or_default()
    }

    /// Sets an environment variable of kekd from its next start on.
    pub fn env(&mut self, key: &str, value: impl AsRef<OsStr>) {
        self.envs.push((key.into(), value.as_ref().into()));
    }

    /// From the next start on, kekd's stderr (still the log file [`Kekd::stderr`] reads) is
    /// presented as the journal, the way systemd does it: `JOURNAL_STREAM` holds the
    /// device and inode numbers of that file.
    pub fn stderr_as_journal(&mut self) {
        self.journal = true;
    }

    /// Runs kekd under `argv` (the kekd command line is appended to it) from now on.
    pub fn wrap_with<I, S>(&mut self, argv: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.wrapper = argv.into_iter().map(Into::into).collect();
    }

    fn command(&self) -> Command {
        let mut cmd = match self.wrapper.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(bin("kekd"));
                c
            }
            None => Command::new(bin("kekd")),
        };
        match &self.launch {
            Launch::Run { config } => cmd.arg("run").arg("--config").arg(config),
            Launch::Dev { dir: Some(dir), args } => cmd.arg("dev").arg("--dir").arg(dir).args(args),
            Launch::Dev { dir: None, args } => cmd.arg("dev").args(args),
        };
        // Run mode must take SOFTHSM2_CONF from the config, never from the environment.
        cmd.env_remove("SOFTHSM2_CONF").env_remove("KEKD_SOCKET").env_remove("KEKD_TENANT");
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        cmd
    }

    /// Starts the daemon and waits for `kekd ready socket=PATH`, or says why it did not
    /// come up. In `run` mode PATH must be the configured socket.
    pub fn try_start(&mut self) -> Result<(), StartFailure> {
        assert!(self.child.is_none(), "kekd is already running");
        self.starts += 1;
        let logs = self.dir.path().join("logs");
        fs::create_dir_all(&logs).expect("create the log directory");
        let log = logs.join(format!("kekd-{}.stderr", self.starts));
        let stderr = fs::File::create(&log).expect("create the daemon's stderr log");
        self.log = Some(log);

        let mut cmd = self.command();
        if self.journal {
            use std::os::unix::fs::MetadataExt;
            let meta = stderr.metadata().expect("stat the daemon's stderr log");
            cmd.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(stderr).process_group(0);
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().expect("spawn kekd");
        let stdout = child.stdout.take().expect("stdout is piped");
        self.child = Some(child);

        // A reader thread forwards stdout lines and keeps draining the pipe afterwards, so
        // the daemon never blocks on a full pipe.
        let (tx, rx) = mpsc::channel::<Option<String>>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(Some(line));
            }
            let _ = tx.send(None);
        });

        let deadline = Instant::now() + READY_TIMEOUT;
        let mut before = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Some(line)) => {
                    if let Some(path) = line.strip_prefix("kekd ready socket=") {
                        if let Launch::Run { .. } = self.launch {
                            assert_eq!(
                                Path::new(path),
                                self.socket,
                                "the ready line names another socket than the configured one: {line:?}"
                            );
                        }
                        self.socket = PathBuf::from(path);
                        return Ok(());
                    }
                    before.push_str(&line);
                    before.push('\n');
                }
                Ok(None) => {
                    // Stdout closed: the daemon is exiting (or closed stdout, which it must not).
                    let child = self.child.as_mut().expect("child is set");
                    let status = wait_deadline(child, STOP_TIMEOUT);
                    self.kill();
                    return Err(StartFailure { status, stdout: before, stderr: self.stderr() });
                }
                Err(_) => {
                    self.kill();
                    return Err(StartFailure { status: None, stdout: before, stderr: self.stderr() });
                }
            }
        }
    }

    /// Starts the daemon; panics with its output if it does not become ready.
    #[track_caller]
    pub fn start(&mut self) {
        if let Err(e) = self.try_start() {
            panic!("{e}");
        }
    }

    /// SIGKILL to the daemon's process group, and reap it; returns once no process of the
    /// group is left (within 10 s), as a restart after `kill -9` finds it: a worker killed
    /// in the middle of an fsync dies only when the fsync ends, and until then it holds its
    /// SoftHSM2 token files' locks (a new worker would find no token). No-op when not
    /// running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = Pid::from_raw(child.id() as i32);
            let _ = killpg(pid, Signal::SIGKILL);
            let _ = child.kill();
            let _ = child.wait();
            let deadline = Instant::now() + Duration::from_secs(10);
            while group_alive(pid.as_raw()) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// Sends `signal` to the daemon and waits for it to exit; panics (with its stderr) if
    /// it is still running after [`STOP_TIMEOUT`]. Leftover processes of its group are
    /// killed afterwards.
    #[track_caller]
    pub fn stop_with(&mut self, signal: Signal) -> ExitStatus {
        self.signal(signal);
        self.wait_exit(STOP_TIMEOUT)
    }

    /// Waits up to `timeout` for the daemon to exit by itself (after a signal sent with
    /// [`Kekd::signal`]); panics with its stderr if it does not. Leftovers of its process
    /// group are killed afterwards.
    #[track_caller]
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("kekd is not running");
        let pid = Pid::from_raw(child.id() as i32);
        let status = wait_deadline(&mut child, timeout);
        let _ = killpg(pid, Signal::SIGKILL);
        match status {
            Some(s) => s,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("kekd did not exit within {timeout:?}; stderr:\n{}", self.stderr());
            }
        }
    }

    /// SIGKILL, then start again on the same directories.
    #[track_caller]
    pub fn restart_after_kill(&mut self) {
        self.kill();
        self.start();
    }

    /// The config file's text (run mode).
    #[track_caller]
    pub fn config_text(&self) -> String {
        let path = self.config_path().expect("only run mode has a config file");
        fs::read_to_string(path).expect("read kekd.toml")
    }

    /// Starts once with every `run_as` line of the config left out (the workers as root, so
    /// that the root keys and key stores exist), stops, and puts the config back: a SoftHSM2
    /// token is made by root, and an operator hands it to the tenant's user afterwards
    /// ([`Kekd::hand_token_to`]).
    #[track_caller]
    pub fn first_start_as_root(&mut self) {
        let config = self.config_text();
        let as_root: String =
            config.lines().filter(|l| !l.starts_with("run_as = ")).map(|l| format!("{l}\n")).collect();
        self.write_config_text(&as_root);
        self.start();
        assert!(self.stop_with(Signal::SIGTERM).success(), "kekd did not stop cleanly");
        self.write_config_text(&config);
    }

    /// Gives the SoftHSM2 token directory (every token of this daemon) to `user`, as an
    /// operator does for a `run_as` worker.
    #[track_caller]
    pub fn hand_token_to(&self, user: &TestUser) {
        let tokens = self.softhsm().expect("a SoftHSM2 token").token_dir();
        let out = Command::new("chown")
            .arg("-R")
            .arg(format!("{}:{}", user.uid, user.gid))
            .arg(tokens)
            .output()
            .expect("run chown");
        assert!(out.status.success(), "chown {}: {out:?}", tokens.display());
    }

    /// Replaces the config file (run mode).
    #[track_caller]
    pub fn write_config_text(&self, text: &str) {
        let path = self.config_path().expect("only run mode has a config file");
        fs::write(path, text).expect("write kekd.toml");
    }

    /// `kekd check-config --config <config file>`.
    #[track_caller]
    pub fn check_config(&self) -> Output {
        let path = self.config_path().expect("only run mode has a config file");
        kekd_command([OsStr::new("check-config"), OsStr::new("--config"), path.as_os_str()])
    }

    /// `kekctl --socket <socket> --tenant <first tenant>`.
    pub fn kekctl(&self) -> Kekctl {
        self.kekctl_for(self.tenant())
    }

    /// `kekctl --socket <socket> --tenant <tenant>`.
    pub fn kekctl_for(&self, tenant: &str) -> Kekctl {
        Kekctl::new().socket(&self.socket).tenant(tenant).with_private_bin(self.dir.path().join("bin"))
    }

    /// The pid of `tenant`'s worker process, as its `kekctl status` reports it.
    #[track_caller]
    pub fn worker_pid(&self, tenant: &str) -> u32 {
        let status = self.kekctl_for(tenant).json().arg("status").run().json();
        status["worker_pid"].as_u64().unwrap_or_else(|| panic!("no worker_pid in {status}")) as u32
    }

    /// Sends `signal` to the supervisor and returns at once.
    #[track_caller]
    pub fn signal(&self, signal: Signal) {
        let pid = self.pid().expect("kekd is not running");
        kill(Pid::from_raw(pid as i32), signal).expect("signal kekd");
    }

    /// Waits until the daemon's stderr contains `needle`; panics with the log at the deadline.
    #[track_caller]
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.stderr();
            if log.contains(needle) {
                return log;
            }
            assert!(Instant::now() < deadline, "no {needle:?} in kekd's stderr within {timeout:?}:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A raw connection that has completed Hello for `tenant`.
    #[track_caller]
    pub fn raw(&self, tenant: &str) -> RawConn {
        RawConn::open(&self.socket, tenant)
    }
}

impl Drop for Kekd {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------
// kekctl shortcuts

impl Kekd {
    /// `kekctl --json generate --key KEY` → (plaintext, edek).
    #[track_caller]
    pub fn generate(&self, key: &str, context: &[(&str, &str)]) -> (Vec<u8>, Vec<u8>) {
        let mut k = self.kekctl().json();
        for (n, v) in context {
            k = k.context(n, v);
        }
        let v = k.args(["generate", "--key", key]).run().json();
        let field = |name: &str| -> Vec<u8> {
            unb64(
                v[name]
                    .as_str()
                    .unwrap_or_else(|| panic!("generate --json: no string field {name:?} in {v}")),
            )
        };
        (field("plaintext"), field("edek"))
    }

    /// `kekctl wrap --key KEY` with `secret` on stdin → the raw EDEK.
    #[track_caller]
    pub fn wrap(&self, key: &str, secret: &[u8], context: &[(&str, &str)]) -> Vec<u8> {
        let mut k = self.kekctl();
        for (n, v) in context {
            k = k.context(n, v);
        }
        k.args(["wrap", "--key", key]).stdin(secret).run().ok().to_vec()
    }

    /// `kekctl unwrap` with the EDEK on stdin → its output (not asserted).
    pub fn unwrap(&self, edek: &[u8], context: &[(&str, &str)]) -> Output {
        let mut k = self.kekctl();
        for (n, v) in context {
            k = k.context(n, v);
        }
        k.arg("unwrap").stdin(edek).run()
    }

    /// `kekctl rewrap` with the EDEK on stdin → its output (not asserted).
    pub fn rewrap(&self, edek: &[u8], context: &[(&str, &str)]) -> Output {
        let mut k = self.kekctl();
        for (n, v) in context {
            k = k.context(n, v);
        }
        k.arg("rewrap").stdin(edek).run()
    }

    /// `kekctl keys ARGS` as the user running the tests.
    pub fn keys<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.kekctl().arg("keys").args(args).run()
    }

    /// `kekctl --json keys list`, parsed.
    #[track_caller]
    pub fn list_keys(&self) -> Vec<KeyListing> {
        let v = self.kekctl().json().args(["keys", "list"]).run().json();
        KeyListing::parse_all(&v)
    }

    /// The listing of one key; panics if it is not listed.
    #[track_caller]
    pub fn key(&self, name: &str) -> KeyListing {
        let keys = self.list_keys();
        keys.iter()
            .find(|k| k.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("key {name:?} is not in `keys list`: {keys:?}"))
    }
}

/// One key of `kekctl --json keys list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyListing {
    pub name: String,
    pub active_version: u32,
    /// (version, state, created_unix)
    pub versions: Vec<(u32, String, u64)>,
}

impl KeyListing {
    /// Parses the documented shape, panicking with the JSON when it differs.
    #[track_caller]
    pub fn parse_all(v: &serde_json::Value) -> Vec<KeyListing> {
        let arr = v.as_array().unwrap_or_else(|| panic!("keys list --json must print an array, got {v}"));
        arr.iter()
            .map(|k| {
                let name = k["name"].as_str().unwrap_or_else(|| panic!("key without a string name: {k}"));
                let active = k["active_version"].as_u64().unwrap_or_else(|| panic!("no active_version: {k}"));
                let versions = k["versions"]
                    .as_array()
                    .unwrap_or_else(|| panic!("no versions array: {k}"))
                    .iter()
                    .map(|v| {
                        let n = v["version"].as_u64().unwrap_or_else(|| panic!("no version number: {v}"));
                        let s = v["state"].as_str().unwrap_or_else(|| panic!("no state: {v}"));
                        let c = v["created_unix"].as_u64().unwrap_or_else(|| panic!("no created_unix: {v}"));
                        (n as u32, s.to_owned(), c)
                    })
                    .collect();
                KeyListing { name: name.into(), active_version: active as u32, versions }
            })
            .collect()
    }

    /// State of one version; panics if it is not listed.
    #[track_caller]
    pub fn state(&self, version: u32) -> &str {
        self.versions
            .iter()
            .find(|v| v.0 == version)
            .map(|v| v.1.as_str())
            .unwrap_or_else(|| panic!("version {version} is not listed for {:?}: {self:?}", self.name))
    }
}

// ---------------------------------------------------------------------------------------
// EDEK v1 (DESIGN.md §2)

/// The header of an EDEK v1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdekHeader {
    pub format: u8,
    pub alg: u8,
    pub key: String,
    pub version: u32,
    pub nonce: [u8; 12],
    /// Offset of the version field.
    pub version_offset: usize,
    /// Length of ciphertext plus tag.
    pub sealed_len: usize,
}

/// Parses an EDEK header; panics (with the bytes) if it is not a well-formed v1 EDEK.
#[track_caller]
pub fn parse_edek(b: &[u8]) -> EdekHeader {
    let fail = |why: &str| -> ! { panic!("not an EDEK v1 ({why}): {b:02x?}") };
    if b.len() < 4 {
        fail("shorter than 4 bytes");
    }
    let name_len = u16::from_be_bytes([b[2], b[3]]) as usize;
    let version_offset = 4 + name_len;
    let sealed_at = version_offset + 4 + 12;
    if b.len() < sealed_at + 16 {
        fail("too short for its header and a tag");
    }
    let key = std::str::from_utf8(&b[4..version_offset]).unwrap_or_else(|_| fail("key name is not UTF-8"));
    EdekHeader {
        format: b[0],
        alg: b[1],
        key: key.to_owned(),
        version: u32::from_be_bytes(b[version_offset..version_offset + 4].try_into().expect("4 bytes")),
        nonce: b[version_offset + 4..sealed_at].try_into().expect("12 bytes"),
        version_offset,
        sealed_len: b.len() - sealed_at,
    }
}

/// The same EDEK with its version field rewritten.
pub fn edek_with_version(edek: &[u8], version: u32) -> Vec<u8> {
    let off = parse_edek(edek).version_offset;
    let mut out = edek.to_vec();
    out[off..off + 4].copy_from_slice(&version.to_be_bytes());
    out
}

/// The byte range of tenant `name`'s tables (`[tenants.NAME]` and its sub-tables) in a
/// config written by [`KekdBuilder::prepare`].
fn tenant_block(text: &str, name: &str) -> std::ops::Range<usize> {
    let header = format!("\n[tenants.{name}]\n");
    let start = text.find(&header).unwrap_or_else(|| panic!("no {header:?} in the config")) + 1;
    let own = format!("[tenants.{name}.");
    let mut end = text.len();
    let mut at = start + header.len() - 1;
    while let Some(i) = text[at..].find("\n[tenants.") {
        let next = at + i + 1;
        if !text[next..].starts_with(&own) {
            end = next;
            break;
        }
        at = next;
    }
    start..end
}

/// `text` without tenant `name`.
pub fn config_without_tenant(text: &str, name: &str) -> String {
    let mut out = text.to_owned();
    out.replace_range(tenant_block(text, name), "");
    out
}

/// `text` with `edit` applied to tenant `name`'s tables only.
pub fn config_edit_tenant(text: &str, name: &str, edit: impl FnOnce(&str) -> String) -> String {
    let range = tenant_block(text, name);
    let mut out = text.to_owned();
    let edited = edit(&text[range.clone()]);
    out.replace_range(range, &edited);
    out
}

// ---------------------------------------------------------------------------------------
// Looking inside processes (/proc)

/// `/proc/<pid>/<file>` as text.
#[track_caller]
pub fn proc_file(pid: u32, file: &str) -> String {
    fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/{file}: {e}"))
}

/// The value of a `Key:\tvalue` line of `/proc/<pid>/status`, whitespace-normalised.
#[track_caller]
pub fn proc_status_field(pid: u32, key: &str) -> String {
    let status = proc_file(pid, "status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status:\n{status}"))
}

/// What each open descriptor of `pid` points at (`socket:[123]`, `/dev/null`, …).
pub fn open_fds(pid: u32) -> Vec<String> {
    let dir = format!("/proc/{pid}/fd");
    fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("list {dir}: {e}"))
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .collect()
}

/// The inode of the Unix socket listening on `path`, from /proc/net/unix (accepted
/// connections show the same path; the listener has the `__SO_ACCEPTCON` flag).
#[track_caller]
pub fn unix_socket_inode(path: &Path) -> String {
    let table = fs::read_to_string("/proc/net/unix").expect("read /proc/net/unix");
    let path = path.display().to_string();
    table
        .lines()
        .skip(1)
        .find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.len() >= 8 && cols[7] == path && cols[3] == "00010000").then(|| cols[6].to_owned())
        })
        .unwrap_or_else(|| panic!("no socket bound to {path} in /proc/net/unix"))
}

/// Whether `needle` occurs anywhere in the readable memory of `pid` (needs root, or the
/// same user and a dumpable process).
pub fn memory_contains(pid: u32, needle: &[u8]) -> bool {
    use std::os::unix::fs::FileExt;
    let maps = proc_file(pid, "maps");
    let mem =
        fs::File::open(format!("/proc/{pid}/mem")).unwrap_or_else(|e| panic!("open /proc/{pid}/mem: {e}"));
    for line in maps.lines() {
        let mut cols = line.split_whitespace();
        let (Some(range), Some(perms)) = (cols.next(), cols.next()) else { continue };
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else { continue };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16)) else {
            continue;
        };
        let mut buf = vec![0u8; (end - start) as usize];
        // Guard pages and the like fail to read: skip them.
        let Ok(n) = mem.read_at(&mut buf, start) else { continue };
        if buf[..n].windows(needle.len()).any(|w| w == needle) {
            return true;
        }
    }
    false
}

// ---------------------------------------------------------------------------------------
// Raw protocol

/// A plain blocking connection speaking frames by hand, for malformed-input tests.
#[derive(Debug)]
pub struct RawConn {
    stream: UnixStream,
}

impl RawConn {
    #[track_caller]
    pub fn connect(socket: &Path) -> RawConn {
        let stream = UnixStream::connect(socket)
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", socket.display()));
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("set a read timeout");
        stream.set_write_timeout(Some(IO_TIMEOUT)).expect("set a write timeout");
        RawConn { stream }
    }

    /// Connects and completes Hello for `tenant`, asserting OK.
    #[track_caller]
    pub fn open(socket: &Path, tenant: &str) -> RawConn {
        let mut c = Self::connect(socket);
        let resp = c.call(&req::hello(0, tenant));
        assert_eq!(code(&resp), Code::Ok, "hello for tenant {tenant:?} failed: {resp:?}");
        c
    }

    /// Writes bytes as they are. Errors (the daemon may already have closed) are returned.
    pub fn send_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Writes one framed request.
    #[track_caller]
    pub fn send(&mut self, req: &pb::Request) {
        let mut buf = Vec::new();
        kekd_proto::frame::encode_frame(req, &mut buf);
        self.send_bytes(&buf).unwrap_or_else(|e| panic!("cannot send request {}: {e}", req.request_id));
    }

    /// Reads one framed response; `None` when the daemon closed the connection. Panics on a
    /// timeout or a malformed frame.
    #[track_caller]
    pub fn recv(&mut self) -> Option<pb::Response> {
        let mut len = [0u8; 4];
        match self.read_full(&mut len) {
            Ok(0) => return None,
            Ok(4) => {}
            Ok(n) => panic!("connection closed after {n} bytes of a length prefix"),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return None,
            Err(e) => panic!("reading a response: {e}"),
        }
        let len = u32::from_be_bytes(len) as usize;
        assert!(len <= 64 << 20, "response frame of {len} bytes");
        let mut body = vec![0u8; len];
        match self.read_full(&mut body) {
            Ok(n) if n == len => {}
            Ok(n) => panic!("connection closed after {n} of {len} bytes of a response"),
            Err(e) => panic!("reading a response body: {e}"),
        }
        Some(pb::Response::decode(&body[..]).unwrap_or_else(|e| panic!("undecodable response: {e}")))
    }

    fn read_full(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut got = 0;
        while got < buf.len() {
            match self.stream.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(got)
    }

    /// Sends a request and reads one response, which must echo the request id.
    #[track_caller]
    pub fn call(&mut self, req: &pb::Request) -> pb::Response {
        self.send(req);
        let resp = self.recv().unwrap_or_else(|| panic!("connection closed instead of answering {req:?}"));
        assert_eq!(resp.request_id, req.request_id, "response does not echo the request id: {resp:?}");
        resp
    }

    /// Asserts the daemon closes the connection (EOF or reset) before [`IO_TIMEOUT`],
    /// without sending anything else.
    #[track_caller]
    pub fn assert_closed(&mut self) {
        if let Some(resp) = self.recv() {
            panic!("expected the connection to be closed, got another response: {resp:?}");
        }
    }
}

/// The status code of a response as a whole.
pub fn code(resp: &pb::Response) -> Code {
    let raw = resp.status.as_ref().map_or(0, |s| s.code);
    Code::try_from(raw).unwrap_or_else(|_| panic!("unknown status code {raw} in {resp:?}"))
}

/// The per-item results of a batch response; panics if it is not an OK batch.
#[track_caller]
pub fn batch_items(resp: pb::Response) -> Vec<pb::ItemResult> {
    assert_eq!(code(&resp), Code::Ok, "batch failed as a whole: {resp:?}");
    match resp.result {
        Some(pb::response::Result::Batch(b)) => b.items,
        other => panic!("expected a batch response, got {other:?}"),
    }
}

/// The status code of one batch item.
pub fn item_code(item: &pb::ItemResult) -> Code {
    let raw = item.status.as_ref().map_or(0, |s| s.code);
    Code::try_from(raw).unwrap_or_else(|_| panic!("unknown item status code {raw}"))
}

/// Request builders for raw connections.
pub mod req {
    use std::collections::BTreeMap;

    use kekd_proto::pb;
    use pb::request::Op;

    fn request(id: u64, op: Op) -> pb::Request {
        pb::Request { request_id: id, metadata: None, op: Some(op) }
    }

    fn ctx(context: &[(&str, &str)]) -> BTreeMap<String, String> {
        context.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    pub fn hello(id: u64, tenant: &str) -> pb::Request {
        request(
            id,
            Op::Hello(pb::Hello {
                protocol_version: kekd_proto::PROTOCOL_VERSION,
                tenant: tenant.into(),
                client_name: "softhsm-tests".into(),
            }),
        )
    }

    pub fn status(id: u64) -> pb::Request {
        request(id, Op::Status(pb::StatusRequest {}))
    }

    pub fn generate(id: u64, key: &str, count: usize) -> pb::Request {
        let items = (0..count).map(|_| pb::GenerateItem::default()).collect();
        request(
            id,
            Op::Generate(pb::GenerateDataKeyRequest { key_name: key.into(), edek_only: false, items }),
        )
    }

    pub fn wrap(id: u64, key: &str, secrets: &[Vec<u8>], context: &[(&str, &str)]) -> pb::Request {
        let items =
            secrets.iter().map(|s| pb::WrapItem { plaintext: s.clone(), context: ctx(context) }).collect();
        request(id, Op::Wrap(pb::WrapRequest { key_name: key.into(), items }))
    }

    pub fn unwrap(id: u64, edeks: &[Vec<u8>], context: &[(&str, &str)]) -> pb::Request {
        let items = edeks.iter().map(|e| pb::EdekItem { edek: e.clone(), context: ctx(context) }).collect();
        request(id, Op::Unwrap(pb::UnwrapRequest { items }))
    }

    pub fn rewrap(id: u64, edeks: &[Vec<u8>], context: &[(&str, &str)]) -> pb::Request {
        let items = edeks.iter().map(|e| pb::EdekItem { edek: e.clone(), context: ctx(context) }).collect();
        request(id, Op::Rewrap(pb::RewrapRequest { items }))
    }

    pub fn create_key(id: u64, key: &str) -> pb::Request {
        request(id, Op::CreateKey(pb::CreateKeyRequest { key_name: key.into() }))
    }
}
