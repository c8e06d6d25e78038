//! The supervisor: the root process that owns the listener and one worker per tenant.
//!
//! It never loads a PKCS#11 module or TPM library and never sees key material: it closes
//! strangers at accept, reads peer credentials ([`identity`]) and the Hello frame, applies
//! the tenant's ACL, and passes the socket to the tenant's worker ([`handshake`]), its
//! denials folded for the tenant's audit trail ([`denials`]); it keeps each worker running
//! ([`process`]).
//!
//! Signals: SIGTERM or SIGINT stops accepting, lets every worker drain (bounded by
//! `shutdown_timeout`), removes the socket and exits 0. SIGHUP re-reads the config: ACLs
//! change in place, added tenants get a worker, removed ones are stopped, and a worker
//! whose own settings changed is restarted; all other workers keep running untouched.

mod denials;
mod handshake;
mod identity;
mod process;
mod vsock;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use kekd_proto::TenantName;
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, Signal, SignalKind};

pub use handshake::Acl;
use handshake::Admission;
use process::WorkerProcess;

use crate::activation::{self, Activated, Family};
use crate::config::{Config, LimitsConfig};
use crate::notify::Systemd;
use crate::worker::WorkerSpec;
use crate::StartError;

/// What the handshake needs, shared by every connection task.
pub struct State {
    tenants: RwLock<BTreeMap<TenantName, (Acl, WorkerProcess)>>,
    max_frame: AtomicUsize,
    limits: RwLock<LimitsConfig>,
    admission: Admission,
}

impl State {
    fn new(tenants: BTreeMap<TenantName, (Acl, WorkerProcess)>, cfg: &Config) -> Self {
        State {
            tenants: RwLock::new(tenants),
            max_frame: AtomicUsize::new(cfg.max_frame_bytes),
            limits: RwLock::new(cfg.limits.clone()),
            admission: Admission::default(),
        }
    }

    fn max_frame(&self) -> usize {
        self.max_frame.load(Ordering::Relaxed)
    }

    fn limits(&self) -> LimitsConfig {
        self.limits.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn with_tenant<T>(&self, name: &TenantName, f: impl FnOnce(Option<&(Acl, WorkerProcess)>) -> T) -> T {
        let tenants = self.tenants.read().unwrap_or_else(PoisonError::into_inner);
        f(tenants.get(name))
    }
}

/// Serves `cfg` until SIGTERM or SIGINT. `config_path` is what SIGHUP re-reads.
pub fn run(cfg: Config, config_path: PathBuf) -> Result<(), StartError> {
    crate::init_logging(&cfg.log_level);
    // Both read, and then clear, parts of the environment: before the runtime starts a thread.
    let systemd = Arc::new(Systemd::from_env());
    let activated = activation::take().map_err(|e| StartError::Io {
        what: "socket activation".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    // Light work (handshakes, process bookkeeping): one thread is plenty, and keeps the
    // supervisor's footprint small.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| StartError::Io { what: "cannot start the runtime".into(), source })?;
    let served = rt.block_on(serve(cfg, config_path, Arc::clone(&systemd), activated));
    if let Err(e) = &served {
        systemd.notify(&format!("STATUS=cannot start: {e}"));
    }
    served
}

async fn serve(
    cfg: Config,
    config_path: PathBuf,
    systemd: Arc<Systemd>,
    mut activated: Vec<Activated>,
) -> Result<(), StartError> {
    let io = |what: String| move |source| StartError::Io { what, source };
    let mut term = signal(SignalKind::terminate()).map_err(io("cannot handle SIGTERM".into()))?;
    let mut int = signal(SignalKind::interrupt()).map_err(io("cannot handle SIGINT".into()))?;
    let hup = signal(SignalKind::hangup()).map_err(io("cannot handle SIGHUP".into()))?;
    // Before the Unix socket, so that a failure here leaves no socket file behind.
    let guests = vsock::listeners(cfg.vsock_port, activation::take_vsock(&mut activated)).map_err(
        |(port, source)| StartError::Io { what: format!("cannot listen on vsock port {port}"), source },
    )?;
    let (listener, shown, own_socket) = unix_listener(&cfg, &mut activated)?;
    for a in &activated {
        tracing::warn!(address = %a.address, name = a.name, "systemd passed a socket kekd does not serve; ignoring it");
    }

    let tenants = match start_all(&cfg).await {
        Ok(tenants) => tenants,
        Err(e) => {
            drop(listener);
            if let Some(file) = &own_socket {
                file.remove();
            }
            return Err(e);
        }
    };
    let count = tenants.len();
    let state = Arc::new(State::new(tenants, &cfg));
    handshake::check_descriptor_limit(&cfg.limits);
    let guests: Vec<_> =
        guests.into_iter().map(|l| tokio::spawn(vsock::accept(l, Arc::clone(&state)))).collect();
    tracing::info!(socket = %shown, vsock_port = cfg.vsock_port, tenants = count, "serving");
    println!("kekd ready socket={shown}");
    let _ = std::io::stdout().flush();
    systemd.ready(&serving_status(count, &shown));
    let watchdog = systemd.spawn_watchdog();

    // Reloads run beside the accept loop: stopping a changed tenant's worker may take its
    // whole drain bound, and nobody else's connections should wait for that.
    let reloader = tokio::spawn(reload_on_hangup(
        hup,
        Arc::clone(&state),
        cfg,
        config_path,
        Arc::clone(&systemd),
        shown.clone(),
    ));
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                // The front door and the caller's executable, at once: before the caller
                // can exec another program, and before a stranger is counted anywhere.
                // Then a turn for the connections accepted so far, and for the reactor to
                // see their Hellos, before the next accept: a backlog of connections is
                // greeted as it is taken, not all taken first (and counted as waiting for
                // a Hello they have long sent, against limits.max_pending_per_uid).
                Ok((stream, _)) => {
                    handshake::accepted_local(stream, &state);
                    tokio::task::yield_now().await;
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    limited_warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("shutting down: no new connections; workers finish what they are serving");
    systemd.stopping("stopping: workers finish what they are serving");
    reloader.abort();
    for task in guests {
        task.abort();
    }
    drop(listener);
    // An activated socket's file is systemd's: it keeps listening for the next start.
    if let Some(file) = &own_socket {
        file.remove();
    }
    let workers = std::mem::take(&mut *state.tenants.write().unwrap_or_else(PoisonError::into_inner));
    futures_join(workers.into_values().map(|(_, w)| w.stop())).await;
    if let Some(task) = watchdog {
        task.abort();
    }
    tracing::info!("stopped");
    Ok(())
}

/// The Unix listener: the one systemd passed (`kekd.socket`), or else `socket`, bound
/// here. Returns it, its address for the ready line, and the socket file to remove at exit
/// (none for an activated socket: systemd owns its file).
fn unix_listener(
    cfg: &Config,
    activated: &mut Vec<Activated>,
) -> Result<(UnixListener, String, Option<crate::server::SocketFile>), StartError> {
    let io = |what: String| move |source| StartError::Io { what, source };
    let mut unix = activation::take_family(activated, Family::Unix);
    if unix.len() > 1 {
        let addresses: Vec<_> = unix.iter().map(|a| a.address.as_str()).collect();
        return Err(StartError::Io {
            what: "socket activation".into(),
            source: std::io::Error::other(format!(
                "systemd passed {} Unix sockets ({}); kekd serves one",
                unix.len(),
                addresses.join(", ")
            )),
        });
    }
    match unix.pop() {
        Some(a) => {
            let shown = a.address.clone();
            if a.path().as_deref() == Some(cfg.socket.as_path()) {
                tracing::info!(socket = %shown, name = a.name, "serving the socket systemd passed");
            } else {
                let configured = cfg.socket.display();
                tracing::info!(socket = %shown, name = a.name, %configured, "serving the socket systemd passed instead of the configured one");
            }
            let listener = a.into_unix_listener().map_err(io(format!("cannot listen on {shown}")))?;
            Ok((listener, shown, None))
        }
        None => {
            let (listener, file) = crate::server::bind(&cfg.socket, cfg.socket_mode()?)
                .map_err(|e| io(format!("cannot listen on {}", cfg.socket.display()))(e.into()))?;
            Ok((listener, cfg.socket.display().to_string(), Some(file)))
        }
    }
}

/// The `STATUS=` line of a serving supervisor, for `systemctl status`.
fn serving_status(tenants: usize, socket: &str) -> String {
    format!("serving {tenants} tenant(s) on {socket}")
}

/// Starts every tenant's worker at once and waits until all serve. One failure stops the
/// others and fails the start, naming the tenant.
async fn start_all(cfg: &Config) -> Result<BTreeMap<TenantName, (Acl, WorkerProcess)>, StartError> {
    let mut started = BTreeMap::new();
    let mut waits = Vec::new();
    for tenant in cfg.tenants() {
        let (worker, ready) = WorkerProcess::spawn(tenant.name.clone(), WorkerSpec::new(cfg, &tenant), true);
        waits.push((tenant.name.clone(), ready));
        started.insert(tenant.name.clone(), (Acl::from_config(&tenant.config), worker));
    }
    let mut failure = None;
    for (name, ready) in waits {
        let outcome = ready.await.unwrap_or_else(|_| Err("its supervising task ended".into()));
        if let (Err(message), None) = (outcome, &failure) {
            failure = Some(StartError::Tenant { tenant: name.to_string(), message });
        }
    }
    match failure {
        None => Ok(started),
        Some(e) => {
            futures_join(started.into_values().map(|(_, w)| w.stop())).await;
            Err(e)
        }
    }
}

async fn reload_on_hangup(
    mut hup: Signal,
    state: Arc<State>,
    mut running: Config,
    path: PathBuf,
    systemd: Arc<Systemd>,
    socket: String,
) {
    while hup.recv().await.is_some() {
        systemd.reloading();
        running = reload(&state, running, &path).await;
        let count = state.tenants.read().unwrap_or_else(PoisonError::into_inner).len();
        systemd.ready(&serving_status(count, &socket));
    }
}

/// Applies a changed config file; on any error the running configuration stays.
async fn reload(state: &State, running: Config, path: &Path) -> Config {
    let new = match Config::load(path) {
        Ok(new) => new,
        Err(e) => {
            tracing::error!("SIGHUP: {e}; keeping the running configuration");
            return running;
        }
    };
    if new.socket != running.socket
        || new.socket_mode != running.socket_mode
        || new.vsock_port != running.vsock_port
    {
        tracing::warn!("SIGHUP: socket, socket_mode and vsock_port changes take effect at the next restart");
    }
    state.max_frame.store(new.max_frame_bytes, Ordering::Relaxed);
    if new.limits != running.limits {
        // Connection counts apply to new connections at once; the rest restarts workers.
        tracing::info!("SIGHUP: limits changed");
        handshake::check_descriptor_limit(&new.limits);
        *state.limits.write().unwrap_or_else(PoisonError::into_inner) = new.limits.clone();
    }

    let wanted: BTreeMap<TenantName, _> = new.tenants().into_iter().map(|t| (t.name.clone(), t)).collect();
    // Under one write lock: no handshake sees a half-applied configuration.
    let (mut stopping, mut kept) = (Vec::new(), 0);
    {
        let mut tenants = state.tenants.write().unwrap_or_else(PoisonError::into_inner);
        for (name, (acl, worker)) in std::mem::take(&mut *tenants) {
            match wanted.get(&name) {
                Some(t) if *worker.spec() == WorkerSpec::new(&new, t) => {
                    if acl != Acl::from_config(&t.config) {
                        tracing::info!(tenant = %name, "SIGHUP: access rules changed");
                    }
                    tenants.insert(name, (Acl::from_config(&t.config), worker));
                    kept += 1;
                }
                _ => stopping.push((name, worker)),
            }
        }
    }
    let changed = stopping.iter().filter(|(n, _)| wanted.contains_key(n)).count();
    let removed = stopping.len() - changed;
    let added = wanted.len() - kept - changed;
    futures_join(stopping.into_iter().map(|(_, w)| w.stop())).await;
    {
        let mut tenants = state.tenants.write().unwrap_or_else(PoisonError::into_inner);
        for (name, tenant) in &wanted {
            if tenants.contains_key(name) {
                continue;
            }
            let (worker, ready) = WorkerProcess::spawn(name.clone(), WorkerSpec::new(&new, tenant), false);
            let name = name.clone();
            tokio::spawn(async move {
                if let Ok(Err(message)) = ready.await {
                    tracing::error!(tenant = %name, "SIGHUP: worker could not start: {message}; retrying");
                }
            });
            tenants.insert(tenant.name.clone(), (Acl::from_config(&tenant.config), worker));
        }
    }
    tracing::info!(added, removed, restarted = changed, unchanged = kept, "SIGHUP: configuration reloaded");
    new
}

/// Awaits every future, concurrently.
async fn futures_join<F: std::future::Future<Output = ()> + Send + 'static>(
    futures: impl Iterator<Item = F>,
) {
    let mut set = tokio::task::JoinSet::new();
    for f in futures {
        set.spawn(f);
    }
    while set.join_next().await.is_some() {}
}
