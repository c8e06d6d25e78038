//! `kekd worker`: one tenant's process.
//!
//! Started by the supervisor (fork+exec of the kekd binary, never a bare fork: PKCS#11
//! modules are not fork-safe) with the control channel as stdin. It sandboxes itself in
//! the order of DESIGN §3, opens its tenant (its own `C_Initialize`), says Ready, and then
//! serves the connections the supervisor hands over. Requests and responses flow between
//! the client and this process only.
//!
//! It stops on SIGTERM, or when the supervisor's end of the channel closes (the supervisor
//! died): it stops taking connections and reading requests, lets the requests it is
//! serving finish within `shutdown_timeout`, wipes its KEK cache and exits 0. SIGINT is
//! ignored: a Ctrl-C on a terminal reaches the whole process group, and the supervisor
//! decides when its workers stop.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use kekd_proto::{Reply, Response, TenantName};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument as _;
use zeroize::Zeroizing;

use crate::audit::{Audit, Caller};
use crate::backend::bounded::{self, Bounded};
use crate::backend::pkcs11::Pkcs11RootKey;
use crate::backend::{BackendError, RootKey};
use crate::cache::{KekCache, Lease};
use crate::config::{
    AuditConfig, BackendConfig, Config, ConnectionLimits, SeccompMode, Tenant, TenantConfig, TpmConfig,
};
use crate::dirfd::Dir;
use crate::error::Error;
use crate::handoff::{BlockingChannel, Channel, FromWorker, Handoff, ToWorker};
use crate::keystore::KeyStore;
use crate::sandbox::{self, RunAs, WorkerKind};
use crate::secret::LockedArena;
use crate::server;
use crate::service::{Peer, TenantService};

mod start_check;

/// Everything a worker needs to open and serve its tenant, sent as its first control
/// message. Two equal specs mean a running worker can keep running across a config
/// reload; access rules are not part of it, since the supervisor alone applies them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub tenant: String,
    pub tenant_config: TenantConfig,
    pub state_dir: PathBuf,
    /// `max_frame_bytes` and the worker's part of `[limits]`; the connection counts are
    /// the supervisor's alone, so changing them restarts no worker.
    pub limits: ConnectionLimits,
    pub allow_unlocked_memory: bool,
    pub log_level: String,
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// How long the worker may leave the supervisor's heartbeat unanswered; the
    /// supervisor's alone, but a change restarts the worker like any of its settings.
    #[serde(with = "humantime_serde")]
    pub worker_watchdog: Duration,
    pub audit: AuditConfig,
}

impl WorkerSpec {
    pub fn new(cfg: &Config, tenant: &Tenant) -> Self {
        let mut tenant_config = tenant.config.clone();
        tenant_config.allow_uids.clear();
        tenant_config.allow_gids.clear();
        tenant_config.admin_uids.clear();
        tenant_config.allow_cids.clear();
        Self {
            tenant: tenant.name.to_string(),
            tenant_config,
            state_dir: cfg.state_dir.clone(),
            limits: cfg.connection_limits(),
            allow_unlocked_memory: cfg.allow_unlocked_memory,
            log_level: cfg.log_level.clone(),
            shutdown_timeout: cfg.shutdown_timeout,
            worker_watchdog: cfg.worker_watchdog,
            audit: cfg.audit.clone(),
        }
    }

    /// The environment variable the PIN comes from, if any: the supervisor passes exactly
    /// this variable to the worker, which reads it and then clears its environment.
    pub fn pin_env(&self) -> Option<&str> {
        self.tenant_config.pkcs11.as_ref().and_then(|p| p.pin_env.as_deref())
    }
}

/// Opens a TPM root key; a function pointer so that only the binary that names it links
/// libtss2.
pub type OpenTpm = fn(&TenantName, &TpmConfig) -> Result<Arc<dyn RootKey>, BackendError>;

/// The root-key backends a worker binary carries. PKCS#11 modules are loaded at run time
/// (dlopen), so every worker has that backend; the TPM backend is linked, so only
/// `kekd-tpm-worker` has it.
#[derive(Clone, Copy)]
pub struct Backends {
    pub tpm: Option<OpenTpm>,
}

impl Backends {
    /// `kekd worker`.
    pub const PKCS11_ONLY: Backends = Backends { tpm: None };
    /// `kekd-tpm-worker`.
    pub const ALL: Backends = Backends { tpm: Some(crate::backend::tpm::open) };
}

/// File name of the TPM worker binary.
pub const TPM_WORKER: &str = "kekd-tpm-worker";

/// The TPM worker next to the running kekd binary; an error that says where it was
/// looked for when it is not there.
pub fn tpm_worker_path() -> std::io::Result<PathBuf> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let path = exe.with_file_name(TPM_WORKER);
    if path.is_file() {
        Ok(path)
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{} is missing: TPM tenants are served by it, installed next to kekd", path.display()),
        ))
    }
}

/// The command line of a worker: `kekd worker ARGS` or `kekd-tpm-worker ARGS`.
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// Shown in `ps`; the tenant actually served comes from the control channel.
    #[arg(long)]
    pub tenant: String,
    /// The supervisor's version. `kekd-tpm-worker` is a file of its own: after an upgrade
    /// on disk, a supervisor still running the old kekd must not talk to a new worker.
    #[arg(long)]
    pub kekd_version: Option<String>,
}

/// This build's version, which the supervisor passes to its workers.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The worker's entry point; never returns to a caller that could serve anything else.
pub fn main(backends: Backends, args: WorkerArgs) -> ExitCode {
    if let Err(e) = sandbox::close_inherited_fds() {
        eprintln!("kekd worker: cannot close inherited descriptors: {e}");
        return ExitCode::FAILURE;
    }
    if let Some(theirs) = args.kekd_version.as_deref().filter(|v| *v != VERSION) {
        eprintln!(
            "kekd worker: this is version {VERSION} but the supervisor runs kekd {theirs}: \
             restart kekd after an upgrade"
        );
        return ExitCode::FAILURE;
    }
    let control = match std::io::stdin().as_fd().try_clone_to_owned() {
        Ok(fd) => BlockingChannel::new(fd),
        Err(e) => {
            eprintln!("kekd worker: no control channel on stdin: {e}");
            return ExitCode::FAILURE;
        }
    };
    let spec = match control.recv::<ToWorker>() {
        Ok(ToWorker::Setup(spec)) => spec,
        Ok(other) => {
            eprintln!("kekd worker: expected a setup message first, got {other:?}");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("kekd worker: cannot read its setup: {e}");
            return ExitCode::FAILURE;
        }
    };
    crate::init_logging(&spec.log_level);
    let span = tracing::info_span!("worker", tenant = %spec.tenant);
    let _entered = span.enter();

    let service = match start(&spec, backends) {
        Ok(service) => service,
        Err(message) => {
            tracing::error!("cannot start: {message}");
            let _ = control.send(&FromWorker::Failed { message });
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = control.send(&FromWorker::Ready) {
        tracing::error!(error = %e, "cannot report readiness; exiting");
        return ExitCode::FAILURE;
    }
    tracing::info!(pid = std::process::id(), "serving");
    if cfg!(feature = "bench-no-audit") {
        tracing::error!("this build writes no audit records (feature bench-no-audit): for benchmarks only");
    }
    if cfg!(feature = "bench-audit-no-write") {
        tracing::error!(
            "this build writes no audit records to disk (feature bench-audit-no-write): for benchmarks only"
        );
    }

    sandbox::bound_malloc();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("kekd-worker").build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    let shutdown_timeout = spec.shutdown_timeout;
    let poll = spec.tenant_config.revocation_poll;
    let code = rt.block_on(serve(service, control.into_inner(), spec.limits, shutdown_timeout, poll));
    // In-flight tasks past the bound are abandoned here; nothing of theirs is written.
    rt.shutdown_timeout(Duration::from_millis(100));
    code
}

/// Steps 2–7 of the sandbox, with the tenant opened between no_dumps and the user switch.
fn start(spec: &WorkerSpec, backends: Backends) -> Result<Arc<TenantService>, String> {
    let name = TenantName::parse(&spec.tenant).map_err(|e| format!("bad tenant name: {e}"))?;
    let backend = spec.tenant_config.backend().ok_or("no root-key backend is configured")?;
    // The PIN is read before the environment goes: it may come from there.
    let opening = match backend {
        BackendConfig::Pkcs11(p11) => {
            let pin = p11.read_pin(&format!("tenants.{name}.pkcs11")).map_err(|e| e.to_string())?;
            Opening::Pkcs11(p11, pin)
        }
        BackendConfig::Tpm(tpm) => Opening::Tpm(tpm),
    };
    sandbox::clear_environment();
    if let Opening::Tpm(_) = opening {
        // libtss2 logs every TPM error response as a warning on stderr, including the ones
        // kekd expects and reports itself (a failed policy, a tampered blob).
        std::env::set_var("TSS2_LOG", "all+none");
    }
    sandbox::no_dumps().map_err(|e| format!("cannot disable core dumps: {e}"))?;
    let run_as = match &spec.tenant_config.run_as {
        Some(user) => Some(RunAs::resolve(user).map_err(|e| format!("tenants.{name}.run_as: {e}"))?),
        None => None,
    };
    // The tenant's directory, held by descriptor from here on and handed to its user
    // first: everything root does in it (reading root.json, opening the key store and
    // finishing what a crash left) goes through checked descriptors (crate::dirfd), since
    // that user can write there.
    let [state_dir, tenants_dir, tenant_dir] =
        crate::keystore::open_tenant_dir(&spec.state_dir, &name).map_err(|e| e.to_string())?;
    let tenant_dir = match &run_as {
        Some(user) => give_state_to([&state_dir, &tenants_dir], tenant_dir, user)?,
        None => tenant_dir,
    };
    drop((state_dir, tenants_dir));
    // After a root key rotation the active root key is the one the key store names, not
    // the configured key_label (which may even be gone from the token).
    let rotated = crate::keystore::read_root_state(&tenant_dir).map_err(|e| e.to_string())?;
    let mut labels = (None, None);
    let root = match opening {
        Opening::Pkcs11(p11, pin) => {
            labels.0 = Some(p11.key_label.clone());
            labels.1 = rotated.as_ref().map(|st| st.active.clone());
            open_pkcs11(&name, p11, pin, labels.1.as_deref(), &spec.state_dir, run_as.as_ref())
                .map(|k| Arc::new(k) as Arc<dyn RootKey>)
                .map_err(|e| {
                    // The module's errors say nothing of files ("no token labelled ..."):
                    // when the user cannot read the token's, say that instead.
                    let problem =
                        run_as.as_ref().and_then(|user| token_files_problem(p11, user, Rights::StillRoot));
                    problem.map_or_else(|| e.to_string(), |p| p.to_string())
                })?
        }
        Opening::Tpm(tpm) => match backends.tpm {
            Some(open) => open(&name, tpm).map_err(|e| e.to_string())?,
            None => {
                return Err(format!(
                    "tenants.{name}.tpm: TPM tenants are served by {TPM_WORKER}, not `kekd worker`"
                ))
            }
        },
    };
    let service = open_tenant(spec, Arc::clone(&root), tenant_dir, &name, run_as.as_ref())
        .map_err(|e| e.to_string())?
        .with_root_labels(labels.0, labels.1);
    if let Some(user) = &run_as {
        user.enter().map_err(|e| format!("cannot switch to user {:?}: {e}", user.name))?;
    } else if nix::unistd::geteuid().is_root() {
        tracing::warn!("runs as root: set run_as to give this tenant's worker its own user");
    }
    sandbox::no_new_privs().map_err(|e| format!("cannot set no_new_privs: {e}"))?;
    let kind = match backend {
        BackendConfig::Pkcs11(_) => WorkerKind::Pkcs11,
        BackendConfig::Tpm(_) => WorkerKind::Tpm,
    };
    let mode = spec.tenant_config.seccomp;
    let allowed =
        sandbox::seccomp(kind, mode).map_err(|e| format!("cannot install the seccomp filter: {e}"))?;
    match mode {
        SeccompMode::Enforce => tracing::info!(syscalls = allowed, "seccomp filter installed"),
        SeccompMode::Log => tracing::warn!(
            syscalls = allowed,
            "seccomp filter installed in log mode: calls outside the policy are logged by the kernel, not refused"
        ),
        SeccompMode::Off => tracing::warn!("no seccomp filter (seccomp = \"off\")"),
    }
    // Last, with every right the worker will serve with and none more: what the root key
    // needs beyond them shows now, not at the first request.
    if let Err(source) = start_check::first_use(&*root) {
        let pkcs11 = match backend {
            BackendConfig::Pkcs11(p11) => Some(p11),
            BackendConfig::Tpm(_) => None,
        };
        if let Some(problem) = pkcs11
            .zip(run_as.as_ref())
            .and_then(|(p11, user)| token_files_problem(p11, user, Rights::AlreadyTheUsers))
        {
            return Err(problem.to_string());
        }
        let who = match &run_as {
            Some(user) => format!("user {:?}", user.name),
            None => format!("the worker (uid {})", nix::unistd::geteuid()),
        };
        let token = pkcs11.map_or_else(|| root.describe(), |p11| p11.token_location().to_string());
        return Err(start_check::StartCheckError::FirstUse { who, token, source }.to_string());
    }
    // The audit trail was opened before the root key: its checkpoints get their key now.
    let service = Arc::new(service);
    service.anchor_audit();
    Ok(service)
}

/// Opens a tenant's PKCS#11 root key: the configured `key_label`, or `label` (after a root key
/// rotation, the active one), which is never created.
fn open_pkcs11(
    name: &TenantName,
    p11: &crate::config::Pkcs11Config,
    pin: Zeroizing<String>,
    label: Option<&str>,
    state_dir: &Path,
    run_as: Option<&RunAs>,
) -> Result<Pkcs11RootKey, BackendError> {
    let mut cfg = p11.clone();
    if let Some(label) = label {
        cfg.key_label = label.to_owned();
        cfg.create_root_key = false;
    }
    Pkcs11RootKey::open(name.as_str(), &cfg, pin, &state_dir.join("locks"), run_as)
}

/// Opens a tenant's root key as its worker does, for a tool that reads what the worker
/// sealed (`kekctl audit verify --config`, crate::audit::offline): its TPM, or its PKCS#11
/// key labelled `label` (a record's `root_key`; `None`: the configured `key_label`). Never
/// creates a key, whatever `create_root_key` says. Reads the PIN from its configured source.
pub fn open_root_key(
    state_dir: &Path,
    name: &TenantName,
    config: &TenantConfig,
    label: Option<&str>,
    backends: Backends,
) -> Result<Arc<dyn RootKey>, BackendError> {
    match config.backend().ok_or_else(|| BackendError::Config("no root-key backend is configured".into()))? {
        BackendConfig::Pkcs11(p11) => {
            let pin = p11
                .read_pin(&format!("tenants.{name}.pkcs11"))
                .map_err(|e| BackendError::Config(e.to_string()))?;
            let label = label.unwrap_or(&p11.key_label);
            Ok(Arc::new(open_pkcs11(name, p11, pin, Some(label), state_dir, None)?))
        }
        BackendConfig::Tpm(tpm) => match backends.tpm {
            Some(open) => open(name, tpm),
            None => Err(BackendError::Config(format!("tenants.{name}.tpm: this program has no TPM backend"))),
        },
    }
}

/// Whose rights the worker has when it looks at the token's files.
#[derive(Clone, Copy)]
enum Rights {
    /// Root's: look with the user's file rights (`RunAs::files_as`).
    StillRoot,
    /// Dropped to the user already.
    AlreadyTheUsers,
}

/// The SoftHSM2 token file `user` cannot read, when the token is SoftHSM2's (whose files
/// the user must own) and there is one.
fn token_files_problem(
    p11: &crate::config::Pkcs11Config,
    user: &RunAs,
    rights: Rights,
) -> Option<start_check::StartCheckError> {
    let token = p11.token_location();
    let crate::config::TokenLocation::SoftHsm2 { tokendir, .. } = &token else { return None };
    let tokendir = tokendir.clone();
    let (path, source) = match rights {
        Rights::StillRoot => start_check::unreadable_by(user, &tokendir)?,
        Rights::AlreadyTheUsers => start_check::unreadable(&tokendir)?,
    };
    Some(start_check::StartCheckError::TokenFiles { user: user.name.clone(), token, tokendir, path, source })
}

/// A backend about to be opened, with what it needs from the environment.
enum Opening<'a> {
    Pkcs11(&'a crate::config::Pkcs11Config, Zeroizing<String>),
    Tpm(&'a TpmConfig),
}

fn open_tenant(
    spec: &WorkerSpec,
    backend: Arc<dyn RootKey>,
    tenant_dir: Dir,
    name: &TenantName,
    run_as: Option<&RunAs>,
) -> Result<TenantService, Error> {
    let arena = LockedArena::new(spec.allow_unlocked_memory)?;
    let (timeout, setting) = spec.tenant_config.call_timeout(name.as_str());
    let backend = Bounded::wrap(backend, timeout, setting, Arc::clone(&arena));
    let store = KeyStore::open_in(tenant_dir, name, backend.describe())?;
    let audit = Audit::open(&spec.audit, name.as_str(), run_as).map_err(Error::AuditOpen)?;
    let t = &spec.tenant_config;
    let cache = KekCache::new(
        arena,
        Lease { kek_ttl: t.kek_ttl, idle_ttl: t.idle_ttl, offline_grace: t.offline_grace },
    );
    tracing::info!(backend = %backend.describe(), "tenant opened");
    Ok(TenantService::new(name.clone(), backend, store, cache, audit)?
        .with_encryption_budget(t.encryption_budget)
        .with_max_key_depth(t.max_key_depth))
}

/// The tenant's own directory becomes the worker user's, by descriptor (a link or a
/// hard-linked file in it is refused, not followed); the directories above it stay root's
/// but must let that user pass through (0711: enter, not list).
fn give_state_to(above: [&Dir; 2], own: Dir, user: &RunAs) -> Result<Dir, String> {
    let fail = |e: crate::dirfd::DirError| format!("cannot hand the key store to user {:?}: {e}", user.name);
    for dir in above {
        dir.add_mode(0o011).map_err(fail)?;
    }
    own.give_tree(user.uid, user.gid).map_err(fail)
}

/// The exit status of a worker that asks to be replaced because a root-key call hung
/// (EX_TEMPFAIL): the supervisor restarts it, and says why.
pub const EXIT_REPLACE: u8 = 75;

/// Serves handed-over connections until SIGTERM or the supervisor's end closes, then
/// drains. Answers the supervisor's heartbeat from this loop, on the runtime that serves
/// requests: a worker whose serving is wedged must look dead. A root-key call that hangs
/// past its bound ([`bounded`]) ends the loop too: the worker says so, drains and exits
/// with [`EXIT_REPLACE`].
async fn serve(
    service: Arc<TenantService>,
    control: OwnedFd,
    limits: ConnectionLimits,
    bound: Duration,
    revocation_poll: Duration,
) -> ExitCode {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::error!("cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    let control = match Channel::new(control) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot use the control channel");
            return ExitCode::FAILURE;
        }
    };
    let resuming = Arc::clone(&service);
    tokio::spawn(
        async move {
            if let Err(e) = resuming.resume_root_rotation().await {
                tracing::error!(error = %e, "cannot finish the root key rotation; it is retried at the next start");
            }
        }
        .in_current_span(),
    );
    let sweeper = tokio::spawn(sweep(Arc::clone(&service)).in_current_span());
    let poller = tokio::spawn(poll_root(Arc::clone(&service), revocation_poll).in_current_span());
    let (stop_tx, stop) = watch::channel(false);
    let replies = server::ReplyBudget::new(limits.max_pending_reply_bytes);
    let mut connections = JoinSet::new();
    let wedged = bounded::wedged();
    tokio::pin!(wedged);
    let mut code = ExitCode::SUCCESS;
    loop {
        tokio::select! {
            msg = control.recv_fds::<ToWorker>() => match msg {
                Ok(Some((ToWorker::Connection(handoff), fds))) => {
                    // The connection, then its lease: the supervisor counts the connection
                    // open until the lease closes, which it does when this task ends,
                    // however it ends (and with the process, if that dies).
                    let mut fds = fds.into_iter();
                    let (Some(fd), Some(lease), None) = (fds.next(), fds.next(), fds.next()) else {
                        tracing::warn!("a connection came without its lease; dropped");
                        continue;
                    };
                    let (service, replies, stop) = (Arc::clone(&service), Arc::clone(&replies), stop.clone());
                    connections.spawn(
                        async move {
                            connection(service, handoff, fd, limits, replies, stop).await;
                            drop(lease);
                        }
                        .in_current_span(),
                    );
                }
                Ok(Some((ToWorker::Refused(refusal), _))) => {
                    let service = Arc::clone(&service);
                    tokio::spawn(async move { service.audit_supervisor_refusal(refusal).await }.in_current_span());
                }
                Ok(Some((ToWorker::Ping { seq }, _))) => {
                    // Without waiting: a supervisor that stopped reading gets no more.
                    if let Err(e) = control.try_send(&FromWorker::Pong { seq }) {
                        limited_warn!(error = %e, "cannot answer the supervisor's heartbeat");
                    }
                }
                Ok(Some((other, _))) => tracing::warn!(message = ?other, "unexpected control message; ignored"),
                Ok(None) => {
                    tracing::info!("the supervisor is gone; stopping");
                    break;
                }
                Err(e) => {
                    tracing::error!(error = %e, "control channel failed; stopping");
                    break;
                }
            },
            _ = term.recv() => {
                tracing::info!("SIGTERM: finishing the requests in flight");
                break;
            }
            _ = int.recv() => {}
            Some(_) = connections.join_next() => {}
            stuck = &mut wedged => {
                tracing::error!(
                    call = stuck.call,
                    setting = %stuck.setting,
                    "a root-key call did not return within {}: asking to be replaced",
                    humantime::format_duration(stuck.after)
                );
                let said = FromWorker::Wedged {
                    call: stuck.call.into(),
                    setting: stuck.setting.to_string(),
                    after: stuck.after,
                };
                if let Err(e) = control.try_send(&said) {
                    tracing::warn!(error = %e, "cannot tell the supervisor; exiting anyway");
                }
                code = ExitCode::from(EXIT_REPLACE);
                break;
            }
        }
    }
    let _ = stop_tx.send(true);
    let drained =
        tokio::time::timeout(bound, async { while connections.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(left = connections.len(), "requests still running after {bound:?}; abandoning them");
        connections.abort_all();
    }
    sweeper.abort();
    poller.abort();
    service.flush();
    service.close_audit().await;
    tracing::info!("KEK cache wiped, audit trail written; exiting");
    code
}

async fn connection(
    service: Arc<TenantService>,
    handoff: Handoff,
    fd: OwnedFd,
    limits: ConnectionLimits,
    replies: Arc<server::ReplyBudget>,
    stop: watch::Receiver<bool>,
) {
    // The supervisor read the peer from this very socket, so its kind says the transport.
    let caller = Arc::new(handoff.caller);
    let id = handoff.hello_id;
    let taken = match caller.peer {
        Peer::Unix { .. } => {
            let stream = std::os::unix::net::UnixStream::from(fd);
            match stream.set_nonblocking(true).and_then(|()| UnixStream::from_std(stream)) {
                Ok(s) => {
                    let (read, write) = s.into_split();
                    return greet_and_serve(service, caller, id, read, write, limits, replies, stop).await;
                }
                Err(e) => e,
            }
        }
        Peer::Vsock { .. } => match tokio_vsock::VsockStream::new(vsock::VsockStream::from(fd)) {
            Ok(s) => {
                let (read, write) = s.into_split();
                return greet_and_serve(service, caller, id, read, write, limits, replies, stop).await;
            }
            Err(e) => e,
        },
    };
    limited_warn!(error = %taken, peer = %caller.peer, "cannot take over a connection");
}

/// Answers the Hello the supervisor read, then serves the connection. Crate-visible for
/// the fuzz targets (`crate::fuzzing`).
#[allow(clippy::too_many_arguments)] // each is one thing the connection is served with
pub(crate) async fn greet_and_serve<R, W>(
    service: Arc<TenantService>,
    caller: Arc<Caller>,
    hello_id: u64,
    read: R,
    mut write: W,
    limits: ConnectionLimits,
    replies: Arc<server::ReplyBudget>,
    stop: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    service.audit_hello(&caller, hello_id).await;
    let hello = Response { id: hello_id, result: Ok(Reply::Hello(service.hello(caller.role))) };
    if server::send(&mut write, hello).await.is_err() {
        return;
    }
    server::serve(service, caller, read, write, limits, replies, stop).await;
}

async fn sweep(service: Arc<TenantService>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        service.sweep().await;
    }
}

/// The revocation poll (DESIGN §5): a refused canary flushes the cache within one period.
async fn poll_root(service: Arc<TenantService>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the root key was just opened
    loop {
        tick.tick().await;
        service.poll_root().await;
    }
}

#[cfg(test)]
mod tests {
    use kekd_proto::{encode_request, pb, Code, Context, FrameReader, KeyName, Metadata, Op, Request};
    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::service::Role;

    /// The worker's half of a guest's connection. Its socket arrives as a bare descriptor
    /// labelled with the peer the supervisor read; any stream socket works underneath (here
    /// a Unix pair, since these machines cannot make a vsock connection), so this is the
    /// vsock path minus the kernel's transport: greeted, served, audited by CID.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_guest_connection_is_greeted_served_and_audited_by_its_cid() {
        let dir = tempfile::tempdir().unwrap();
        let (svc, _root) = crate::service::testing::service(dir.path(), "acme");
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let caller = Caller { peer: Peer::Vsock { cid: 7, port: 1024 }, exe: None, role: Role::User };
        let (_stop_tx, stop) = watch::channel(false);
        let served = tokio::spawn(connection(
            Arc::new(svc),
            Handoff { caller, hello_id: 1 },
            theirs.into(),
            ConnectionLimits::default(),
            server::ReplyBudget::new(ConnectionLimits::default().max_pending_reply_bytes),
            stop,
        ));

        ours.set_nonblocking(true).unwrap();
        let (read, mut write) = UnixStream::from_std(ours).unwrap().into_split();
        let mut answers = FrameReader::new(read, 1 << 20);
        let hello = answers.read::<pb::Response>().await.unwrap().expect("the Hello is answered");
        assert_eq!((hello.request_id, hello.status.map_or(0, |s| s.code)), (1, Code::Ok as i32));

        let op = Op::Generate {
            key: KeyName::parse("default").unwrap(),
            edek_only: true,
            contexts: vec![Context::default()],
        };
        let mut frame = Vec::new();
        encode_request(Request { id: 2, metadata: Metadata::default(), op }, &mut frame);
        write.write_all(&frame).await.unwrap();
        let generated = answers.read::<pb::Response>().await.unwrap().expect("the request is answered");
        assert_eq!((generated.request_id, generated.status.map_or(0, |s| s.code)), (2, Code::Ok as i32));
        drop(write);
        served.await.unwrap();

        let trail = std::fs::read_dir(dir.path().join("audit/acme")).unwrap();
        let records: Vec<serde_json::Value> = trail
            .flat_map(|f| {
                std::fs::read_to_string(f.unwrap().path())
                    .unwrap()
                    .lines()
                    .map(String::from)
                    .collect::<Vec<_>>()
            })
            .map(|l| serde_json::from_str(&l).unwrap())
            .collect();
        for event in ["hello", "generate"] {
            let r =
                records.iter().find(|r| r["event"] == event).unwrap_or_else(|| panic!("no {event} record"));
            assert_eq!(r["peer"], serde_json::json!({ "cid": 7, "port": 1024 }), "{r}");
        }
    }
}
