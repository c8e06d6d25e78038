//! kekd: a hardware-backed key daemon.
#![deny(unsafe_code)]

mod backend;
mod cache;
mod clock;
mod config;
mod dev;
mod envelope;
mod error;
mod keystore;
mod secret;
mod server;
mod service;
mod softhsm;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::backend::pkcs11::Pkcs11RootKey;
use crate::backend::RootKey;
use crate::cache::KekCache;
use crate::config::{Config, Tenant};
use crate::keystore::KeyStore;
use crate::secret::LockedArena;
use crate::service::{Acl, TenantService};

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
    },
    /// Validate a config file; errors name the offending field.
    CheckConfig {
        #[arg(long, default_value = "/etc/kekd/kekd.toml")]
        config: PathBuf,
    },
}

/// A start-up failure, printed as `kekd: <message>`.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("tenant {tenant}: {source}")]
    Tenant { tenant: String, source: error::Error },
    #[error(transparent)]
    Memory(#[from] secret::MemoryError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error(transparent)]
    Backend(#[from] backend::BackendError),
    #[error(transparent)]
    Store(#[from] keystore::StoreError),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.command {
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(cfg) => {
                println!("config OK: {} tenant(s)", cfg.tenants.len());
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                // Scripts and editors match on the leading field path: no prefix here.
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        },
        Command::Run { config } => Config::load(&config).map_err(StartError::from).and_then(run),
        Command::Dev { dir } => dev::run(dir),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kekd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr, coloured only on a terminal (journald and files get plain text).
/// Idempotent: `dev` starts logging early, then `run` calls it again.
pub(crate) fn init_logging(filter: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Opens every tenant (root key, key store, cache) before any thread starts, then serves
/// until SIGTERM or SIGINT.
fn run(cfg: Config) -> Result<(), StartError> {
    init_logging(&cfg.log_level);
    let arena = LockedArena::new(cfg.allow_unlocked_memory)?;
    let mut tenants = BTreeMap::new();
    for tenant in cfg.tenants() {
        let service = open_tenant(&cfg, &tenant, &arena)
            .map_err(|source| StartError::Tenant { tenant: tenant.name.to_string(), source })?;
        tenants.insert(tenant.name.clone(), Arc::new(service));
    }
    let tenants: server::Tenants = Arc::new(tenants);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kekd")
        .build()
        .map_err(|source| StartError::Io { what: "cannot start the runtime".into(), source })?;
    rt.block_on(async {
        let mode = cfg.socket_mode()?;
        let listener = server::bind(&cfg.socket, mode).map_err(|source| StartError::Io {
            what: format!("cannot listen on {}", cfg.socket.display()),
            source,
        })?;
        let accept = tokio::spawn(server::accept_loop(listener, Arc::clone(&tenants), cfg.max_frame_bytes));
        let sweeper = tokio::spawn(sweep(Arc::clone(&tenants)));
        tracing::info!(socket = %cfg.socket.display(), tenants = tenants.len(), "serving");
        println!("kekd ready socket={}", cfg.socket.display());
        let _ = std::io::stdout().flush();

        wait_for_shutdown().await;
        tracing::info!("shutting down");
        accept.abort();
        sweeper.abort();
        for t in tenants.values() {
            t.flush();
        }
        let _ = std::fs::remove_file(&cfg.socket);
        Ok(())
    })
}

fn open_tenant(
    cfg: &Config,
    tenant: &Tenant,
    arena: &Arc<LockedArena>,
) -> Result<TenantService, error::Error> {
    let p11 = tenant.config.pkcs11.as_ref().expect("validated: every tenant has a backend");
    let field = format!("tenants.{}.pkcs11", tenant.name);
    let pin = p11.read_pin(&field).map_err(|e| error::Error::InvalidArgument(e.to_string()))?;
    let backend: Arc<dyn RootKey> =
        Arc::new(Pkcs11RootKey::open(tenant.name.as_str(), p11, pin, &cfg.state_dir.join("locks"))?);
    let store = KeyStore::open(&cfg.state_dir, &tenant.name, backend.describe())?;
    let cache = KekCache::new(Arc::clone(arena), tenant.config.kek_ttl, tenant.config.idle_ttl);
    tracing::info!(tenant = %tenant.name, backend = %backend.describe(), "tenant opened");
    TenantService::new(tenant.name.clone(), Acl::from_config(&tenant.config), backend, store, cache)
}

async fn sweep(tenants: server::Tenants) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        for t in tenants.values() {
            t.sweep();
        }
    }
}

async fn wait_for_shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
