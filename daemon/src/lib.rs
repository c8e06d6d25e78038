//! kekd: a hardware-backed key daemon.
//!
//! A library so that two binaries can share it: `kekd` (supervisor, PKCS#11 workers, CLI)
//! and `kekd-tpm-worker` (the workers of TPM tenants). The TPM backend links libtss2,
//! and the supervisor must never load a key library, so only the second binary calls
//! into [`backend::tpm`]; the linker (`--as-needed`) leaves libtss2 out of `kekd`.
#![deny(unsafe_code)]

// First, so that its `limited_*!` macros are in scope in every module below.
#[macro_use]
mod ratelimit;

mod activation;
mod audit;
pub mod backend;
mod cache;
mod clock;
mod config;
mod dev;
mod dirfd;
mod envelope;
mod error;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod handoff;
mod keystore;
mod logging;
mod notify;
mod sandbox;
mod secret;
mod server;
mod service;
mod softhsm;
mod stats;
mod supervisor;
mod swtpm;
pub mod worker;

/// For `kekctl audit verify --config`: a tenant's audit checkpoint key, unsealed by its
/// root key as the configuration says (docs/FORMATS.md §5, "Checkpoints").
pub use audit::offline as anchors;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;

#[derive(Parser)]
#[command(
    name = "kekd",
    version,
    about = "Hardware-backed key daemon: envelope encryption under HSM/TPM root keys"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve, as configured in the config file.
    Run {
        #[arg(long, default_value = "/etc/kekd/kekd.toml")]
        config: PathBuf,
    },
    /// Serve a throwaway SoftHSM2 token and a tenant "demo" for the calling user; everything
    /// it writes stays under DIR (default: a temporary directory removed on exit).
    Dev {
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Where demo's root key lives: a SoftHSM2 token, or a TPM emulated by a swtpm
        /// that kekd starts (state under DIR/swtpm) and stops.
        #[arg(long, value_enum, default_value_t = dev::DevBackend::Softhsm)]
        backend: dev::DevBackend,
    },
    /// Validate a config file; errors name the offending field.
    CheckConfig {
        #[arg(long, default_value = "/etc/kekd/kekd.toml")]
        config: PathBuf,
    },
    /// One tenant's process; started by `kekd run`, with its control channel as stdin.
    #[command(hide = true)]
    Worker(worker::WorkerArgs),
    /// Creates (or finds) the `kekd dev` token under DIR, in a process of its own so the
    /// supervisor never loads the PKCS#11 module.
    #[command(hide = true)]
    DevToken {
        #[arg(long)]
        dir: PathBuf,
    },
}

/// A start-up failure, printed as `kekd: <message>`.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("tenant {tenant}: {message}")]
    Tenant { tenant: String, message: String },
    #[error(transparent)]
    Memory(#[from] secret::MemoryError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error(transparent)]
    Backend(#[from] backend::BackendError),
    #[error(transparent)]
    Store(#[from] keystore::StoreError),
    #[error("the development token could not be prepared ({0})")]
    DevToken(std::process::ExitStatus),
    #[error("kekd dev --backend tpm: {0}")]
    DevTpm(String),
}

/// The `kekd` command line.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.command {
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(cfg) => {
                // On stderr, like errors, so scripts that read stdout see the same line.
                for warning in cfg.warnings() {
                    eprintln!("warning: {warning}");
                }
                println!("config OK: {} tenant(s)", cfg.tenants.len());
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                // Scripts and editors match on the leading field path: no prefix here.
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        },
        Command::Run { config } => {
            Config::load(&config).map_err(StartError::from).and_then(|cfg| supervisor::run(cfg, config))
        }
        Command::Dev { dir, backend } => dev::run(dir, backend),
        Command::Worker(args) => return worker::main(worker::Backends::PKCS11_ONLY, args),
        Command::DevToken { dir } => softhsm::prepare_dev_token(&dir).map(drop).map_err(StartError::from),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kekd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr, as suits where it goes (see [`logging`]). Idempotent: `dev` starts
/// logging early, then `run` calls it again.
pub(crate) fn init_logging(filter: &str) {
    logging::init(filter)
}
