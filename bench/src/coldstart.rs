//! Tenant cold start with SoftHSM2: from the moment a tenant's worker is to be spawned
//! until the first unwrap for that tenant is answered. Each trial polls every 0.5 ms,
//! with a fresh connection each time (`Hello`, then one unwrap of an EDEK made earlier),
//! so the figure includes everything a client waits for: the supervisor's spawn
//! (fork+exec), the worker's sandboxing, its `C_Initialize`, login and key search on the
//! token (under the token lock), the hand-off of the connection, and the first KEK unseal
//! (`C_Decrypt`), since a new worker's KEK cache is empty. Three ways:
//!
//! - `sighup_add` (the headline): a tenant whose key store exists is added to the
//!   configuration, then SIGHUP; timed from the signal. The tenant, `cold`, shares the
//!   dev token with `demo` under a root key of its own.
//! - `worker_restart`: the tenant's worker is killed with SIGKILL; timed from the kill,
//!   minus the supervisor's fixed 100 ms restart delay (trials 2.2 s apart, so that the
//!   delay does not grow).
//! - `daemon_start`: `kekd run` itself is started (supervisor and one tenant); timed from
//!   the spawn.
//!
//! Each way also reports when the first `HelloOk` came (the worker serves) besides the
//! first unwrap.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kekd_client::{Client, ClientOptions, Context as EncContext, EdekItem, KeyName, Metadata, TenantName};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;

use crate::{fail, Context as _};

const POLL: Duration = Duration::from_micros(500);
const GIVE_UP: Duration = Duration::from_secs(20);
/// kekd's supervisor: `RESTART_DELAY`, and how long a worker must run for the delay to
/// return to it (`STABLE_AFTER`).
const RESTART_DELAY: Duration = Duration::from_millis(100);
const STABLE_AFTER: Duration = Duration::from_secs(2);
const COLD: &str = "cold";
const SETPRIV: &str = "/usr/bin/setpriv";
const DEMO: &str = "demo";

#[derive(Debug, Serialize)]
pub struct Way {
    /// Milliseconds to the first answered unwrap, per trial.
    pub unwrap_ms: Vec<f64>,
    /// Milliseconds to the first `HelloOk`, per trial.
    pub hello_ms: Vec<f64>,
    pub median_unwrap_ms: f64,
    pub median_hello_ms: f64,
    pub max_unwrap_ms: f64,
}

impl Way {
    fn new(trials: Vec<(f64, f64)>) -> Way {
        let hello_ms: Vec<f64> = trials.iter().map(|t| round2(t.0)).collect();
        let unwrap_ms: Vec<f64> = trials.iter().map(|t| round2(t.1)).collect();
        Way {
            median_unwrap_ms: median(&unwrap_ms),
            median_hello_ms: median(&hello_ms),
            max_unwrap_ms: unwrap_ms.iter().copied().fold(0.0, f64::max),
            unwrap_ms,
            hello_ms,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub figure: &'static str,
    pub sighup_add: Way,
    pub worker_restart: Way,
    pub daemon_start: Way,
}

pub fn run(kekd: &Path, dir: &Path, trials: usize) -> crate::Result<Report> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context(|| "start the runtime".into())?;
    let dir = dir.canonicalize().context(|| format!("{}", dir.display()))?;
    rt.block_on(Bench::new(kekd, &dir)?.all(trials.max(1)))
}

struct Bench {
    kekd: PathBuf,
    config: PathBuf,
    log: PathBuf,
    socket: PathBuf,
    /// The dev config as `kekd dev` wrote it (tenant demo), and with tenant cold added.
    base: String,
    with_cold: String,
}

impl Bench {
    fn new(kekd: &Path, dir: &Path) -> crate::Result<Bench> {
        let dev = dir.join("kekd.toml");
        let text = std::fs::read_to_string(&dev).context(|| format!("read {}", dev.display()))?;
        let mut cfg: toml::Table = text.parse().context(|| format!("parse {}", dev.display()))?;
        let socket = cfg.get("socket").and_then(|s| s.as_str()).map(PathBuf::from);
        let Some(socket) = socket else { fail!("{}: no socket", dev.display()) };
        let base = toml::to_string(&cfg).context(|| "write the config".into())?;
        let tenants = cfg.get_mut("tenants").and_then(|t| t.as_table_mut());
        let Some(tenants) = tenants else { fail!("{}: no tenants", dev.display()) };
        let Some(mut cold) = tenants.get(DEMO).cloned() else { fail!("{}: no tenant demo", dev.display()) };
        let p11 = cold.get_mut("pkcs11").and_then(|p| p.as_table_mut());
        let Some(p11) = p11 else { fail!("{}: tenant demo has no pkcs11 root key", dev.display()) };
        p11.insert("key_label".into(), "cold-root".into());
        p11.insert("create_root_key".into(), true.into());
        tenants.insert(COLD.into(), cold);
        let with_cold = toml::to_string(&cfg).context(|| "write the config".into())?;
        Ok(Bench {
            kekd: kekd.to_owned(),
            config: dir.join("coldstart.toml"),
            log: dir.join("coldstart.log"),
            socket,
            base,
            with_cold,
        })
    }

    fn write_config(&self, text: &str) -> crate::Result<()> {
        let tmp = self.config.with_extension("toml.tmp");
        std::fs::write(&tmp, text).context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.config).context(|| format!("write {}", self.config.display()))
    }

    fn start(&self) -> crate::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .context(|| format!("open {}", self.log.display()))?;
        // setpriv's PR_SET_PDEATHSIG: a kekd-bench killed outright does not leave kekd
        // running (the timed `daemon_start` then includes setpriv's exec, ~0.5 ms).
        let mut cmd = if Path::new(SETPRIV).exists() {
            let mut c = Command::new(SETPRIV);
            c.args(["--pdeathsig", "TERM", "--"]).arg(&self.kekd);
            c
        } else {
            Command::new(&self.kekd)
        };
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context(|| format!("run {}", self.kekd.display()))
    }

    async fn all(&self, trials: usize) -> crate::Result<Report> {
        // First start with both tenants: creates cold's root key and default key.
        self.write_config(&self.with_cold)?;
        let daemon = Daemon(self.start()?);
        let start = Instant::now();
        let demo_edek = self.wait_edek(DEMO, start).await?;
        let cold_edek = self.wait_edek(COLD, start).await?;

        let mut sighup = Vec::new();
        for _ in 0..trials {
            // Remove cold and wait until its worker is gone, then add it back: timed.
            let pid = self.worker_pid(COLD).await?;
            self.write_config(&self.base)?;
            daemon.signal(Signal::SIGHUP)?;
            wait_gone(pid).await?;
            tokio::time::sleep(Duration::from_millis(100)).await;
            self.write_config(&self.with_cold)?;
            let t0 = Instant::now();
            daemon.signal(Signal::SIGHUP)?;
            sighup.push(self.first_unwrap(COLD, &cold_edek, t0).await?);
        }

        let mut restart = Vec::new();
        for _ in 0..trials.min(5) {
            tokio::time::sleep(STABLE_AFTER + Duration::from_millis(200)).await;
            let pid = self.worker_pid(DEMO).await?;
            let t0 = Instant::now();
            kill(Pid::from_raw(pid as i32), Signal::SIGKILL).context(|| format!("kill worker {pid}"))?;
            let (hello, unwrap) = self.first_unwrap(DEMO, &demo_edek, t0).await?;
            let delay = RESTART_DELAY.as_secs_f64() * 1e3;
            restart.push((hello - delay, unwrap - delay));
        }
        daemon.stop().await?;

        let mut daemon_start = Vec::new();
        self.write_config(&self.base)?;
        for _ in 0..trials {
            let t0 = Instant::now();
            let daemon = Daemon(self.start()?);
            daemon_start.push(self.first_unwrap(DEMO, &demo_edek, t0).await?);
            daemon.stop().await?;
        }
        Ok(Report {
            figure: "coldstart",
            sighup_add: Way::new(sighup),
            worker_restart: Way::new(restart),
            daemon_start: Way::new(daemon_start),
        })
    }

    async fn connect(&self, tenant: &str) -> Result<Client, kekd_client::ClientError> {
        let tenant = TenantName::parse(tenant).expect("a valid tenant name");
        let opts =
            ClientOptions { connect_timeout: Some(Duration::from_secs(5)), ..ClientOptions::default() };
        Client::connect_with(self.socket.as_path(), &tenant, "kekd-bench-coldstart", opts).await
    }

    /// An EDEK of `tenant`'s default key, once the tenant serves.
    async fn wait_edek(&self, tenant: &str, since: Instant) -> crate::Result<Vec<u8>> {
        let key = KeyName::parse("default").expect("valid");
        loop {
            if let Ok(client) = self.connect(tenant).await {
                let items =
                    client.generate(&key, vec![EncContext::default()], true, Metadata::default()).await;
                match items.map(|mut v| v.pop()) {
                    Ok(Some(Ok(item))) => return item.edek.context(|| "generate without an EDEK".into()),
                    Ok(other) => fail!("generate for {tenant}: {other:?}"),
                    Err(e) => fail!("generate for {tenant}: {e}"),
                }
            }
            if since.elapsed() > GIVE_UP {
                fail!("tenant {tenant} did not serve within {GIVE_UP:?}; see {}", self.log.display());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn worker_pid(&self, tenant: &str) -> crate::Result<u32> {
        let client = self.connect(tenant).await.context(|| format!("connect as {tenant}"))?;
        Ok(client.status(Metadata::default()).await.context(|| format!("status of {tenant}"))?.worker_pid)
    }

    /// Milliseconds from `t0` to the first `HelloOk` and to the first answered unwrap.
    async fn first_unwrap(&self, tenant: &str, edek: &[u8], t0: Instant) -> crate::Result<(f64, f64)> {
        let mut hello = None;
        loop {
            if let Ok(client) = self.connect(tenant).await {
                let at = t0.elapsed();
                let hello = *hello.get_or_insert(at);
                let item = EdekItem { edek: edek.to_vec(), context: EncContext::default() };
                if let Ok(mut items) = client.unwrap(vec![item], Metadata::default()).await {
                    if let Some(Ok(_)) = items.pop() {
                        let at = t0.elapsed();
                        return Ok((hello.as_secs_f64() * 1e3, at.as_secs_f64() * 1e3));
                    }
                }
            }
            if t0.elapsed() > GIVE_UP {
                fail!(
                    "tenant {tenant} did not answer an unwrap within {GIVE_UP:?}; see {}",
                    self.log.display()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// A `kekd run` that is stopped (SIGTERM, then SIGKILL) when dropped.
struct Daemon(Child);

impl Daemon {
    fn signal(&self, signal: Signal) -> crate::Result<()> {
        kill(Pid::from_raw(self.0.id() as i32), signal).context(|| format!("signal kekd {}", self.0.id()))
    }

    async fn stop(mut self) -> crate::Result<()> {
        self.signal(Signal::SIGTERM)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.0.try_wait().context(|| "wait for kekd".into())?.is_none() {
            if Instant::now() > deadline {
                fail!("kekd did not stop within 10 s of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.signal(Signal::SIGTERM);
            std::thread::sleep(Duration::from_millis(500));
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Waits until process `pid` has exited (and been reaped).
async fn wait_gone(pid: u32) -> crate::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() {
        if Instant::now() > deadline {
            fail!("worker {pid} did not stop within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => round2((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
