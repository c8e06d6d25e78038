//! `kekd-bench`: what `scripts/bench` measures kekd against, and the measurements that need
//! more than `kekctl bench`.
//!
//! The baselines of issue 8, each a subcommand that prints one JSON object on stdout:
//!
//! - `aes`: AES-256-GCM open of a 32-byte DEK in process, with the AAD of a kekd EDEK (the
//!   limit: what the cipher alone does on these cores);
//! - `pkcs11`: `C_Decrypt` (`CKM_AES_GCM`) of a 32-byte DEK per call, against the SoftHSM2
//!   token of a `kekd dev --dir DIR` (what a naive hold-your-own-key integration does);
//! - `tpm`: load + unseal + flush of a sealed 32-byte DEK per call, against a swtpm;
//! - `echo`: length-prefixed frames of the size of a `kekctl bench` unwrap, echoed over a
//!   Unix socket by a server process with kekd's worker threading (the transport floor);
//! - `null-kekd`: a server with kekd's framing and task layout that answers without keys,
//!   crypto or audit, for `kekctl bench` to run against (what the layout costs);
//!
//! and two measurements of kekd itself:
//!
//! - `coldstart`: time from spawning a tenant's worker to its first answered unwrap;
//! - `rss`: resident memory of a worker holding many cached KEK versions.
#![forbid(unsafe_code)]

mod aes;
mod coldstart;
mod echo;
mod edek;
mod measure;
mod null_kekd;
mod pkcs11;
mod rss;
mod tpm;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "kekd-bench", about = "Baselines and measurements for scripts/bench")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How long to run: a warmup that is not counted, then the measured window.
#[derive(Debug, Clone, Copy, clap::Args)]
struct Timing {
    /// How long to measure (e.g. 3s, 500ms)
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    duration: Duration,
    /// How long to run before measuring (0s for none)
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 3s, 500ms)"))
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[derive(Debug, Subcommand)]
enum Command {
    /// (a) AES-256-GCM open of a 32-byte DEK, in process, one loop per thread
    Aes {
        /// Threads (default: one per core, as kekd's worker runtime has)
        #[arg(long)]
        threads: Option<usize>,
        #[command(flatten)]
        timing: Timing,
    },
    /// (b) C_Decrypt per DEK against the SoftHSM2 token of a `kekd dev --dir DIR`
    Pkcs11 {
        /// The directory `kekd dev --dir` wrote (its softhsm/ holds the token and PIN)
        #[arg(long)]
        dir: PathBuf,
        /// Threads, one session each (default: one per core)
        #[arg(long)]
        threads: Option<usize>,
        /// Label of the benchmark's own AES key on the token (created if missing)
        #[arg(long, default_value = "kekd-bench-baseline")]
        label: String,
        #[command(flatten)]
        timing: Timing,
    },
    /// (c) load + unseal + flush per DEK against a TPM (swtpm)
    Tpm {
        /// TSS2 TCTI of the TPM, e.g. swtpm:host=127.0.0.1,port=2321
        #[arg(long)]
        tcti: String,
        #[command(flatten)]
        timing: Timing,
    },
    /// (d) raw Unix-socket echo of unwrap-sized frames; starts its own server process
    Echo {
        /// Connections, each one request at a time
        #[arg(long, default_value = "1")]
        connections: usize,
        /// Size the frames as an unwrap of this many EDEKs and its answer
        #[arg(long, default_value = "1")]
        batch: usize,
        /// Client runtime threads (default: one per core, as `kekctl bench`)
        #[arg(long)]
        client_threads: Option<usize>,
        /// Server runtime threads (default: one per core, as kekd's worker)
        #[arg(long)]
        server_threads: Option<usize>,
        /// Where to put the server's socket (default: a temporary directory)
        #[arg(long)]
        socket: Option<PathBuf>,
        #[command(flatten)]
        timing: Timing,
    },
    /// The echo server `echo` starts (exits when its stdin closes)
    #[command(hide = true)]
    EchoServer {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        batch: usize,
        #[arg(long)]
        threads: usize,
    },
    /// A server with kekd's framing and task layout that answers without crypto or audit;
    /// point `kekctl --socket PATH --tenant demo bench` at it. Runs until killed.
    NullKekd {
        #[arg(long)]
        socket: PathBuf,
        /// Runtime threads (default: one per core, as kekd's worker)
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Tenant cold start: spawn of a worker to its first answered unwrap, three ways
    Coldstart {
        /// The kekd binary
        #[arg(long)]
        kekd: PathBuf,
        /// A directory `kekd dev --dir` prepared (and that no kekd serves now)
        #[arg(long)]
        dir: PathBuf,
        /// Trials of each way
        #[arg(long, default_value = "7")]
        trials: usize,
    },
    /// Resident memory of a worker holding VERSIONS cached KEK versions
    Rss {
        /// kekd's socket (a fresh `kekd dev`, so that nothing else ran in the worker)
        #[arg(long)]
        socket: PathBuf,
        #[arg(long, default_value = "demo")]
        tenant: String,
        /// Key to create and rotate VERSIONS - 1 times
        #[arg(long, default_value = "rss")]
        key: String,
        #[arg(long, default_value = "1000")]
        versions: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Aes { threads, timing } => aes::run(threads.unwrap_or_else(cores), timing).map(print),
        Command::Pkcs11 { dir, threads, label, timing } => {
            pkcs11::run(&dir, threads.unwrap_or_else(cores), &label, timing).map(print)
        }
        Command::Tpm { tcti, timing } => tpm::run(&tcti, timing).map(print),
        Command::Echo { connections, batch, client_threads, server_threads, socket, timing } => echo::run(
            echo::Options {
                connections,
                batch,
                client_threads: client_threads.unwrap_or_else(cores),
                server_threads: server_threads.unwrap_or_else(cores),
                socket,
            },
            timing,
        )
        .map(print),
        Command::EchoServer { socket, batch, threads } => echo::serve(&socket, batch, threads),
        Command::NullKekd { socket, threads } => null_kekd::serve(&socket, threads.unwrap_or_else(cores)),
        Command::Coldstart { kekd, dir, trials } => coldstart::run(&kekd, &dir, trials).map(print),
        Command::Rss { socket, tenant, key, versions } => {
            rss::run(&socket, &tenant, &key, versions).map(print)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kekd-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One JSON object and a newline on stdout.
fn print(value: impl serde::Serialize) {
    println!("{}", serde_json::to_string(&value).expect("plain data serialises"));
}

/// What went wrong, for the one line `main` prints.
#[derive(Debug)]
struct Error(String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

type Result<T, E = Error> = std::result::Result<T, E>;

/// `Err(Error(format!(...)))`.
macro_rules! fail {
    ($($arg:tt)*) => { return Err($crate::Error(format!($($arg)*))) };
}
pub(crate) use fail;

/// Adds what was being done to an error.
trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: std::fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error(format!("{}: {e}", what())))
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.ok_or_else(|| Error(what()))
    }
}
