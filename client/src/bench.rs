//! The load generator behind `kekctl bench`.
//!
//! Closed loop: every connection runs `pipeline` tasks that share it, each sending one
//! request, waiting for its answer and sending the next, so at most
//! `connections × pipeline` requests are in flight. Connections are spread round-robin
//! over the tenants. A warmup runs first and is not counted; then, for the measured
//! window, each successful request's latency goes into an HDR histogram (microseconds,
//! 1 µs to 60 s, 3 significant digits) and each failed one is counted under its status
//! code. An error never stops the run: a request that failed is counted and the next one
//! is sent, except on a connection that died, whose tasks stop (the report counts the
//! connections lost).
//!
//! Unwrap and rewrap need EDEKs: setup generates a pool of them per tenant (with
//! `edek_only`) and the tasks cycle through it. Wrap sends fresh random 32-byte secrets.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use kekd_proto::{
    code_name, Code, Context, EdekItem, ErrorStatus, ItemResult, KeyName, MalformedResponse, Metadata,
    Secret, TenantName, WrapItem, MAX_BATCH,
};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::{Client, ClientError, ClientOptions, Endpoint};

/// Upper bounds on the command line, far above what one machine can use, so a typo
/// cannot open a million sockets.
pub const MAX_CONNECTIONS: u32 = 4096;
pub const MAX_PIPELINE: u32 = 4096;
/// EDEKs generated per tenant for unwrap and rewrap.
pub const EDEK_POOL: usize = 256;
/// Latency histogram bounds, in microseconds.
const LOWEST_US: u64 = 1;
const HIGHEST_US: u64 = 60_000_000;
const SIGFIGS: u8 = 3;
/// How long requests still in flight at the end may take before they count as timed out,
/// so that a stalled daemon cannot hang the bench.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);
/// Bound on each setup call (generating the EDEK pool).
const SETUP_CALL_LIMIT: Duration = Duration::from_secs(30);
/// The live progress line is redrawn this often.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// The operation a bench sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchOp {
    /// Fresh data keys (plaintext and EDEK)
    Generate,
    /// Random 32-byte secrets wrapped under the key
    Wrap,
    /// EDEKs from a pool made at setup
    Unwrap,
    /// EDEKs from a pool made at setup, re-encrypted under the active version
    Rewrap,
}

impl BenchOp {
    pub fn as_str(self) -> &'static str {
        match self {
            BenchOp::Generate => "generate",
            BenchOp::Wrap => "wrap",
            BenchOp::Unwrap => "unwrap",
            BenchOp::Rewrap => "rewrap",
        }
    }

    fn needs_pool(self) -> bool {
        matches!(self, BenchOp::Unwrap | BenchOp::Rewrap)
    }
}

/// The arguments of `kekctl bench`. The socket, the default tenant, the encryption
/// context and the audit metadata come from kekctl's global options.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Operation to send
    #[arg(long, value_enum, default_value = "unwrap")]
    pub op: BenchOp,
    /// Connections to open, spread round-robin over the tenants
    #[arg(long, value_name = "N", default_value = "1",
          value_parser = clap::value_parser!(u32).range(1..=MAX_CONNECTIONS as i64))]
    pub connections: u32,
    /// Requests in flight per connection
    #[arg(long, value_name = "N", default_value = "1",
          value_parser = clap::value_parser!(u32).range(1..=MAX_PIPELINE as i64))]
    pub pipeline: u32,
    /// Items (data keys) per request
    #[arg(long, value_name = "N", default_value = "1",
          value_parser = clap::value_parser!(u32).range(1..=MAX_BATCH as i64))]
    pub batch: u32,
    /// How long to measure, after the warmup (e.g. 10s, 500ms, 1m30s)
    #[arg(long, value_name = "TIME", default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// How long to run before measuring; not counted (0s for none)
    #[arg(long, value_name = "TIME", default_value = "1s", value_parser = parse_warmup)]
    pub warmup: Duration,
    /// Tenants to spread the connections over, comma-separated (default: --tenant)
    #[arg(long, value_name = "NAME,...", value_delimiter = ',', value_parser = parse_tenant)]
    pub tenants: Vec<TenantName>,
    /// KEK for generate and wrap, and for the EDEKs that unwrap and rewrap use
    #[arg(long, value_name = "NAME", default_value = "default", value_parser = parse_key)]
    pub key: KeyName,
}

/// A measured duration: humantime syntax, more than zero.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    match parse_warmup(s)? {
        d if d.is_zero() => Err("must be more than 0".into()),
        d => Ok(d),
    }
}

/// A warmup: humantime syntax (`500ms`, `2s`, `1m30s`), zero allowed.
pub fn parse_warmup(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 10s, 500ms, 1m30s)"))
}

fn parse_tenant(s: &str) -> Result<TenantName, String> {
    TenantName::parse(s)
}

fn parse_key(s: &str) -> Result<KeyName, String> {
    KeyName::parse(s)
}

impl BenchArgs {
    /// Checks what the options say together and completes them into a [`BenchConfig`]
    /// (without a progress line). `tenant` is the global one, used when `--tenants` is not
    /// given. The error is a usage message naming the option.
    pub fn config(
        self,
        socket: Endpoint,
        tenant: Option<&TenantName>,
        context: Context,
        metadata: Metadata,
    ) -> Result<BenchConfig, String> {
        let tenants = match (self.tenants.is_empty(), tenant) {
            (false, _) => self.tenants,
            (true, Some(t)) => vec![t.clone()],
            (true, None) => return Err("--tenants or --tenant (or KEKD_TENANT) is required".into()),
        };
        for (i, t) in tenants.iter().enumerate() {
            if tenants[..i].contains(t) {
                return Err(format!("--tenants: {t} given twice"));
            }
        }
        if (self.connections as usize) < tenants.len() {
            return Err(format!(
                "--connections {} is fewer than the {} tenants: every tenant needs one",
                self.connections,
                tenants.len()
            ));
        }
        Ok(BenchConfig {
            socket,
            tenants,
            op: self.op,
            connections: self.connections as usize,
            pipeline: self.pipeline as usize,
            batch: self.batch as usize,
            duration: self.duration,
            warmup: self.warmup,
            key: self.key,
            context,
            metadata,
            pool_size: EDEK_POOL,
            grace: DEFAULT_GRACE,
            progress: false,
            client_name: "kekctl-bench".into(),
        })
    }
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The daemon's socket, or its vsock address.
    pub socket: Endpoint,
    /// Distinct, at most `connections` of them.
    pub tenants: Vec<TenantName>,
    pub op: BenchOp,
    pub connections: usize,
    pub pipeline: usize,
    pub batch: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub key: KeyName,
    /// Encryption context of every item (and of the pooled EDEKs).
    pub context: Context,
    pub metadata: Metadata,
    /// EDEKs generated per tenant for unwrap and rewrap.
    pub pool_size: usize,
    /// How long requests in flight at the end may still take.
    pub grace: Duration,
    /// Draw a live progress line on stderr (meant for a terminal).
    pub progress: bool,
    pub client_name: String,
}

/// The tenant (an index into the tenant list) of connection number `conn`: round-robin.
pub fn tenant_of(conn: usize, tenants: usize) -> usize {
    conn % tenants
}

/// Why a request failed: a status code, or no answer before the run's hard deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Failure {
    Status(Code),
    Timeout,
}

impl Failure {
    pub fn name(self) -> &'static str {
        match self {
            Failure::Status(code) => code_name(code),
            Failure::Timeout => "TIMEOUT",
        }
    }

    /// The wire code for the exit status: a request that got no answer is `UNAVAILABLE`.
    pub fn code(self) -> Code {
        match self {
            Failure::Status(code) => code,
            Failure::Timeout => Code::Unavailable,
        }
    }
}

/// What one task measured; tallies merge.
#[derive(Debug, Clone)]
pub struct Tally {
    /// Latency of each successful request, µs.
    pub latency: Histogram<u64>,
    /// Successful requests: answered, and every item OK.
    pub ok: u64,
    /// Failed requests by the first failure in each (the request's own status, or else its
    /// first failed item).
    pub failed: BTreeMap<Failure, u64>,
}

impl Default for Tally {
    fn default() -> Self {
        let latency = Histogram::new_with_bounds(LOWEST_US, HIGHEST_US, SIGFIGS).expect("valid bounds");
        Tally { latency, ok: 0, failed: BTreeMap::new() }
    }
}

impl Tally {
    pub fn record_ok(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency.saturating_record(us.max(LOWEST_US));
        self.ok += 1;
    }

    pub fn record_failure(&mut self, failure: Failure) {
        *self.failed.entry(failure).or_default() += 1;
    }

    pub fn merge(&mut self, other: &Tally) {
        self.latency.add(&other.latency).expect("histograms with the same bounds");
        self.ok += other.ok;
        for (failure, n) in &other.failed {
            *self.failed.entry(*failure).or_default() += n;
        }
    }

    pub fn failed_total(&self) -> u64 {
        self.failed.values().sum()
    }
}

/// Latency figures in microseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p99_9: u64,
    pub max: u64,
    pub mean: f64,
}

/// The result of a run; `--json` prints it as it serialises.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub op: &'static str,
    pub key: String,
    pub tenants: Vec<String>,
    pub connections: usize,
    pub pipeline: usize,
    pub batch: usize,
    /// As asked for.
    pub duration_secs: f64,
    pub warmup_secs: f64,
    /// The measured window as it was: from the warmup's end until the last counted
    /// request finished (shorter if interrupted).
    pub elapsed_secs: f64,
    /// Stopped early (Ctrl-C).
    pub interrupted: bool,
    /// Successful requests in the measured window.
    pub requests: u64,
    /// Data keys those requests handled: `requests × batch`.
    pub deks: u64,
    pub failed_requests: u64,
    pub requests_per_sec: f64,
    pub deks_per_sec: f64,
    /// `null` when no request succeeded.
    pub latency_us: Option<Latency>,
    /// Failed requests by status code name (`TIMEOUT`: no answer in time).
    pub errors: BTreeMap<&'static str, u64>,
    /// Connections that died during the run (their tasks stopped).
    pub connections_lost: usize,
}

impl Report {
    /// Figures from a merged tally over `elapsed` of measured time.
    pub fn new(
        config: &BenchConfig,
        tally: &Tally,
        elapsed: Duration,
        interrupted: bool,
        lost: usize,
    ) -> Report {
        let secs = elapsed.as_secs_f64();
        let rate = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        let deks = tally.ok * config.batch as u64;
        let h = &tally.latency;
        let latency = (!h.is_empty()).then(|| Latency {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p99_9: h.value_at_quantile(0.999),
            max: h.max(),
            mean: (h.mean() * 10.0).round() / 10.0,
        });
        Report {
            op: config.op.as_str(),
            key: config.key.to_string(),
            tenants: config.tenants.iter().map(|t| t.to_string()).collect(),
            connections: config.connections,
            pipeline: config.pipeline,
            batch: config.batch,
            duration_secs: config.duration.as_secs_f64(),
            warmup_secs: config.warmup.as_secs_f64(),
            elapsed_secs: round3(secs),
            interrupted,
            requests: tally.ok,
            deks,
            failed_requests: tally.failed_total(),
            requests_per_sec: round1(rate(tally.ok)),
            deks_per_sec: round1(rate(deks)),
            latency_us: latency,
            errors: tally.failed.iter().map(|(f, n)| (f.name(), *n)).collect(),
            connections_lost: lost,
        }
    }

    /// Why the run as a whole failed: no request succeeded. The code is the most frequent
    /// failure's (the first by name on a tie; `TIMEOUT` is `UNAVAILABLE`); `None` when at
    /// least one request succeeded.
    pub fn failure(&self) -> Option<ErrorStatus> {
        if self.requests > 0 {
            return None;
        }
        let Some((name, _)) = self.errors.iter().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0))) else {
            let msg = "bench: no request completed in the measured window";
            return Some(ErrorStatus::new(Code::Unavailable, msg));
        };
        let code = Code::from_str_name(name).unwrap_or(Code::Unavailable);
        let counts: Vec<String> = self.errors.iter().map(|(name, n)| format!("{name} {n}")).collect();
        let msg = format!("bench: every request failed ({})", counts.join(", "));
        Some(ErrorStatus::new(code, msg))
    }

    /// One JSON object and a newline.
    pub fn json(&self) -> String {
        let mut s = serde_json::to_string(self).expect("plain data always serialises");
        s.push('\n');
        s
    }

    /// The summary block.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let mut line = |label: &str, value: String| out.push_str(&format!("{label:<13}{value}\n"));
        line("op:", format!("{} (key {}, batch {})", self.op, self.key, self.batch));
        line("tenants:", self.tenants.join(", "));
        line("connections:", format!("{} × pipeline {}", self.connections, self.pipeline));
        let interrupted = if self.interrupted { ", interrupted" } else { "" };
        line(
            "duration:",
            format!(
                "{:.2}s measured (asked {}, after {} warmup{interrupted})",
                self.elapsed_secs,
                secs(self.duration_secs),
                secs(self.warmup_secs)
            ),
        );
        line("requests:", format!("{} ({:.1}/s)", self.requests, self.requests_per_sec));
        line("DEKs:", format!("{} ({:.1}/s)", self.deks, self.deks_per_sec));
        match &self.latency_us {
            Some(l) => line(
                "latency:",
                format!(
                    "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  mean {}",
                    fmt_us(l.p50),
                    fmt_us(l.p90),
                    fmt_us(l.p99),
                    fmt_us(l.p99_9),
                    fmt_us(l.max),
                    fmt_us(l.mean.round() as u64)
                ),
            ),
            None => line("latency:", "none (no request succeeded)".into()),
        }
        let errors = if self.errors.is_empty() {
            "none".to_string()
        } else {
            let counts: Vec<String> = self.errors.iter().map(|(name, n)| format!("{name} {n}")).collect();
            format!("{} ({})", self.failed_requests, counts.join(", "))
        };
        line("errors:", errors);
        if self.connections_lost > 0 {
            line("lost:", format!("{} connections died during the run", self.connections_lost));
        }
        out
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn secs(s: f64) -> String {
    humantime::format_duration(Duration::from_secs_f64(s)).to_string()
}

/// Microseconds for people: `850µs`, `1.25ms`, `12.3ms`, `1.50s`.
pub fn fmt_us(us: u64) -> String {
    match us {
        0..=999 => format!("{us}µs"),
        1_000..=9_999 => format!("{:.2}ms", us as f64 / 1e3),
        10_000..=999_999 => format!("{:.1}ms", us as f64 / 1e3),
        _ => format!("{:.2}s", us as f64 / 1e6),
    }
}

/// The live line: time since start, phase, and rates over the last interval.
pub fn progress_line(
    elapsed: Duration,
    warmup: bool,
    interval: Duration,
    requests: u64,
    batch: usize,
    errors: u64,
) -> String {
    let secs = interval.as_secs_f64();
    let rate = if secs > 0.0 { requests as f64 / secs } else { 0.0 };
    let phase = if warmup { "warmup" } else { "run" };
    format!(
        "{:>7.1}s {phase:<6} {rate:>10.0} req/s {:>11.0} DEKs/s  {errors} errors",
        elapsed.as_secs_f64(),
        rate * batch as f64
    )
}

/// Counters every task bumps, read by the progress line.
#[derive(Default)]
struct Live {
    ok: AtomicU64,
    failed: AtomicU64,
    stop: AtomicBool,
}

/// Runs the bench: setup (connect everything, generate the EDEK pools), warmup, the
/// measured window, then waits for the requests still in flight (at most `grace`).
/// `interrupt` ends the run early, as a completed one. An error is a setup failure;
/// failed requests during the run are counted instead.
pub async fn run(config: &BenchConfig, interrupt: impl Future<Output = ()>) -> Result<Report, ClientError> {
    check(config).map_err(|msg| ErrorStatus::new(Code::InvalidArgument, msg))?;
    let clients = connect_all(config).await?;
    let pools = if config.op.needs_pool() {
        let mut pools = Vec::with_capacity(config.tenants.len());
        // The first `tenants.len()` connections cover every tenant once.
        for client in &clients[..config.tenants.len()] {
            pools.push(Arc::new(edek_pool(client, config).await?));
        }
        pools
    } else {
        Vec::new()
    };

    let live = Arc::new(Live::default());
    let start = Instant::now();
    let window = Window {
        from: start + config.warmup,
        deadline: start + config.warmup + config.duration + config.grace,
    };
    let end = start + config.warmup + config.duration;
    let mut tasks = JoinSet::new();
    let seeds = RandomState::new();
    for (c, client) in clients.into_iter().enumerate() {
        let t = tenant_of(c, config.tenants.len());
        for p in 0..config.pipeline {
            let job = Job {
                op: config.op,
                key: config.key.clone(),
                context: config.context.clone(),
                metadata: config.metadata.clone(),
                batch: config.batch,
                pool: pools.get(t).cloned().unwrap_or_default(),
            };
            let seed = seeds.hash_one((c, p));
            tasks.spawn(task(c, client.clone(), job, Arc::clone(&live), window, seed));
        }
    }
    let progress = config.progress.then(|| tokio::spawn(progress(Arc::clone(&live), start, config.clone())));

    let mut tally = Tally::default();
    let mut lost = BTreeSet::new();
    let mut interrupted = false;
    tokio::pin!(interrupt);
    let sleep = tokio::time::sleep_until(end);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            () = &mut sleep => break,
            () = &mut interrupt => {
                interrupted = true;
                break;
            }
            done = tasks.join_next() => match done {
                Some(result) => collect(result, &mut tally, &mut lost),
                None => break,
            },
        }
    }
    live.stop.store(true, Ordering::Relaxed);
    while let Some(result) = tasks.join_next().await {
        collect(result, &mut tally, &mut lost);
    }
    let finished = Instant::now();
    if let Some(progress) = progress {
        progress.abort();
        let _ = progress.await;
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(b"\r\x1b[K").and_then(|()| err.flush());
    }
    let elapsed = finished.saturating_duration_since(window.from);
    Ok(Report::new(config, &tally, elapsed, interrupted, lost.len()))
}

/// What [`BenchArgs::config`] guarantees, for a config made some other way.
fn check(config: &BenchConfig) -> Result<(), String> {
    let n = config.tenants.len();
    if n == 0 || config.connections < n {
        return Err(format!("bench: {} connections for {n} tenants", config.connections));
    }
    if config.pipeline == 0 || !(1..=MAX_BATCH).contains(&config.batch) {
        return Err(format!("bench: pipeline {} and batch {} out of range", config.pipeline, config.batch));
    }
    if config.op.needs_pool() && config.pool_size == 0 {
        return Err("bench: unwrap and rewrap need an EDEK pool".into());
    }
    Ok(())
}

/// A task's result: its connection, its tally, and whether it saw the connection die.
type TaskResult = (usize, Tally, bool);

fn collect(
    result: Result<TaskResult, tokio::task::JoinError>,
    tally: &mut Tally,
    lost: &mut BTreeSet<usize>,
) {
    match result {
        Ok((conn, t, died)) => {
            tally.merge(&t);
            if died {
                lost.insert(conn);
            }
        }
        // Tasks are never aborted, so only a panic lands here; re-raise it.
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Opens every connection at once; connection `c` goes to tenant `tenant_of(c)`.
async fn connect_all(config: &BenchConfig) -> Result<Vec<Client>, ClientError> {
    let mut set = JoinSet::new();
    for c in 0..config.connections {
        let tenant = config.tenants[tenant_of(c, config.tenants.len())].clone();
        let (socket, name) = (config.socket.clone(), config.client_name.clone());
        set.spawn(async move {
            let client = Client::connect_with(&socket, &tenant, &name, ClientOptions::default()).await;
            (c, client)
        });
    }
    let mut clients: Vec<Option<Client>> = vec![None; config.connections];
    while let Some(joined) = set.join_next().await {
        let (c, client) = joined.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        clients[c] = Some(client?);
    }
    Ok(clients.into_iter().map(|c| c.expect("every connection answered")).collect())
}

/// `config.pool_size` EDEKs for the client's tenant, in batches of at most `MAX_BATCH`.
async fn edek_pool(client: &Client, config: &BenchConfig) -> Result<Vec<Vec<u8>>, ClientError> {
    let mut pool = Vec::with_capacity(config.pool_size);
    while pool.len() < config.pool_size {
        let n = (config.pool_size - pool.len()).min(MAX_BATCH);
        let call =
            client.generate(&config.key, vec![config.context.clone(); n], true, config.metadata.clone());
        let items = tokio::time::timeout(SETUP_CALL_LIMIT, call)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "generating the EDEK pool"))??;
        for item in items {
            let edek = item?.edek.ok_or_else(|| MalformedResponse("generate reply without edek".into()))?;
            pool.push(edek);
        }
    }
    Ok(pool)
}

#[derive(Clone, Copy)]
struct Window {
    /// Requests sent from here on are counted.
    from: Instant,
    /// Requests unanswered by here count as timed out.
    deadline: Instant,
}

/// What one task sends.
struct Job {
    op: BenchOp,
    key: KeyName,
    context: Context,
    metadata: Metadata,
    batch: usize,
    pool: Arc<Vec<Vec<u8>>>,
}

impl Job {
    /// Sends one request; `cursor` walks the EDEK pool, `rng` feeds wrap's secrets.
    async fn send(
        &self,
        client: &Client,
        cursor: &mut usize,
        rng: &mut u64,
    ) -> Result<Vec<ItemResult>, ClientError> {
        let md = self.metadata.clone();
        match self.op {
            BenchOp::Generate => {
                client.generate(&self.key, vec![self.context.clone(); self.batch], false, md).await
            }
            BenchOp::Wrap => {
                let items = (0..self.batch)
                    .map(|_| WrapItem {
                        plaintext: Secret::from_vec(random_secret(rng)),
                        context: self.context.clone(),
                    })
                    .collect();
                client.wrap(&self.key, items, md).await
            }
            BenchOp::Unwrap => client.unwrap(self.edeks(cursor), md).await,
            BenchOp::Rewrap => client.rewrap(self.edeks(cursor), md).await,
        }
    }

    fn edeks(&self, cursor: &mut usize) -> Vec<EdekItem> {
        (0..self.batch)
            .map(|_| {
                *cursor = (*cursor + 1) % self.pool.len();
                EdekItem { edek: self.pool[*cursor].clone(), context: self.context.clone() }
            })
            .collect()
    }
}

/// splitmix64: varied secrets, cheaply; they protect nothing.
fn random_secret(state: &mut u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    for _ in 0..4 {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out
}

/// One in-flight slot of a connection: request, answer, next request, until told to stop.
/// Returns its tally and whether it stopped because the connection died.
async fn task(
    conn: usize,
    client: Client,
    job: Job,
    live: Arc<Live>,
    window: Window,
    seed: u64,
) -> TaskResult {
    let mut tally = Tally::default();
    let mut cursor = if job.pool.is_empty() { 0 } else { seed as usize % job.pool.len() };
    let mut rng = seed;
    while !live.stop.load(Ordering::Relaxed) {
        let sent = Instant::now();
        let answer = tokio::time::timeout_at(window.deadline, job.send(&client, &mut cursor, &mut rng)).await;
        let took = sent.elapsed();
        let result = match answer {
            Err(_) => Err(Failure::Timeout),
            Ok(Err(e)) => Err(Failure::Status(e.code())),
            Ok(Ok(items)) => match items.iter().find_map(|item| item.as_ref().err()) {
                Some(status) => Err(Failure::Status(status.code)),
                None => Ok(()),
            },
        };
        let counted = sent >= window.from;
        match result {
            Ok(()) => {
                live.ok.fetch_add(1, Ordering::Relaxed);
                if counted {
                    tally.record_ok(took);
                }
            }
            Err(failure) => {
                live.failed.fetch_add(1, Ordering::Relaxed);
                if counted {
                    tally.record_failure(failure);
                }
                if failure == Failure::Timeout {
                    break;
                }
                if client.is_closed() {
                    return (conn, tally, true);
                }
            }
        }
    }
    (conn, tally, false)
}

/// Redraws the progress line on stderr until aborted.
async fn progress(live: Arc<Live>, start: Instant, config: BenchConfig) {
    let warmup_end = start + config.warmup;
    let mut ticks = tokio::time::interval_at(start + PROGRESS_EVERY, PROGRESS_EVERY);
    let (mut last_at, mut last_ok) = (start, 0);
    loop {
        let now = ticks.tick().await;
        let ok = live.ok.load(Ordering::Relaxed);
        let failed = live.failed.load(Ordering::Relaxed);
        let line =
            progress_line(now - start, now < warmup_end, now - last_at, ok - last_ok, config.batch, failed);
        (last_at, last_ok) = (now, ok);
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{line}\x1b[K").and_then(|()| err.flush());
    }
}

#[cfg(test)]
mod tests;
