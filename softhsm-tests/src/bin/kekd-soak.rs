//! The soak run (issue 9, point 5; not in CI: `scripts/soak`). kekd with four SoftHSM2
//! tenants, each behind the fault-injecting PKCS#11 proxy, under mixed load (generate,
//! wrap, unwrap, rewrap; single items and batches) from several client tasks, while a
//! random tenant's worker is SIGKILLed every `--kill-every` and a random tenant's token is
//! cut for `--outage-for` every `--outage-every`.
//!
//! Every data key the daemon hands out is remembered with its EDEK and context and checked
//! again later, and all of them once more at the end. It passes when no EDEK ever stops
//! opening (a lost key), no unwrap returns other bytes than were wrapped (a wrong
//! plaintext), and the supervisor's descriptors and memory do not grow (a leak). Errors
//! the faults explain (UNAVAILABLE while a worker restarts or a cold KEK waits for a cut
//! token) are counted by class, not failures.
//!
//! Usage: kekd-soak [--duration 30m] [--kill-every 30s] [--outage-every 5m]
//!                  [--outage-for 20s] [--clients 8]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kekd_client::{
    ClientError, ClientOptions, Context, EdekItem, KeyName, Metadata, Pool, PooledClient, RetryPolicy,
    Secret, TenantName, WrapItem,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use softhsm_tests::{open_fds, proc_status_field, Backend, Kekd, Tenant};

const TENANTS: [&str; 4] = ["alpha", "bravo", "charlie", "delta"];
/// Remembered data keys per tenant; beyond this a random one is replaced.
const KEEP: usize = 5000;
/// The audit trail grows by gigabytes under this load: its files are removed this often,
/// as log rotation would move them (kekd continues the chain in a new file).
const ROTATE_EVERY: Duration = Duration::from_secs(20);

/// The worker serving `tenant` now, if one is (it may be restarting).
fn worker_pid(kekd: &Kekd, tenant: &str) -> Option<u32> {
    let out = kekd.kekctl_for(tenant).json().arg("status").run();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok().filter(|_| out.code == 0)?;
    status["worker_pid"].as_u64().map(|p| p as u32)
}

/// Removes every tenant's audit files (see [`ROTATE_EVERY`]).
fn rotate_audit(kekd: &Kekd) {
    for t in TENANTS {
        if let Ok(files) = std::fs::read_dir(kekd.audit_dir(t)) {
            for f in files.flatten() {
                let _ = std::fs::remove_file(f.path());
            }
        }
    }
}

struct Args {
    duration: Duration,
    kill_every: Duration,
    outage_every: Duration,
    outage_for: Duration,
    clients: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        duration: Duration::from_secs(30 * 60),
        kill_every: Duration::from_secs(30),
        outage_every: Duration::from_secs(5 * 60),
        outage_for: Duration::from_secs(20),
        clients: 8,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        let dur = || humantime::parse_duration(&value).unwrap_or_else(|e| usage(&format!("{flag}: {e}")));
        match flag.as_str() {
            "--duration" => a.duration = dur(),
            "--kill-every" => a.kill_every = dur(),
            "--outage-every" => a.outage_every = dur(),
            "--outage-for" => a.outage_for = dur(),
            "--clients" => a.clients = value.parse().unwrap_or_else(|_| usage("--clients: a number")),
            _ => usage(&format!("unknown option {flag}")),
        }
    }
    a
}

fn usage(msg: &str) -> ! {
    eprintln!("kekd-soak: {msg}\nusage: kekd-soak [--duration 30m] [--kill-every 30s] [--outage-every 5m] [--outage-for 20s] [--clients 8]");
    std::process::exit(2)
}

/// A small PRNG (xorshift64*): the run needs variety, not cryptographic randomness.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A data key the daemon handed out, to be checked again.
#[derive(Clone)]
struct Known {
    edek: Vec<u8>,
    plaintext: Vec<u8>,
    context: Context,
}

#[derive(Default)]
struct Tally {
    ok_items: AtomicU64,
    /// Errors by class: the wire code, or `lost key` / `wrong plaintext` (failures).
    errors: Mutex<BTreeMap<String, u64>>,
    failures: Mutex<Vec<String>>,
}

impl Tally {
    fn error(&self, class: &str) {
        *self.errors.lock().unwrap().entry(class.to_owned()).or_default() += 1;
    }
    fn fail(&self, what: String) {
        self.error(what.split(':').next().unwrap_or("failure"));
        let mut f = self.failures.lock().unwrap();
        if f.len() < 20 {
            f.push(what);
        }
    }
}

fn context(rng: &mut Rng) -> Context {
    let mut m = BTreeMap::new();
    m.insert("soak".to_owned(), format!("{}", rng.below(1000)));
    Context::new(m).expect("a valid context")
}

fn remember(store: &Mutex<Vec<Known>>, k: Known, rng: &mut Rng) {
    let mut s = store.lock().unwrap();
    if s.len() < KEEP {
        s.push(k);
    } else {
        let i = rng.below(s.len());
        s[i] = k;
    }
}

fn sample(store: &Mutex<Vec<Known>>, rng: &mut Rng, n: usize) -> Vec<Known> {
    let s = store.lock().unwrap();
    if s.is_empty() {
        return Vec::new();
    }
    (0..n).map(|_| s[rng.below(s.len())].clone()).collect()
}

/// The unwrap (or rewrap) items of remembered data keys.
fn edek_items(known: &[Known]) -> Vec<EdekItem> {
    known.iter().map(|k| EdekItem { edek: k.edek.clone(), context: k.context.clone() }).collect()
}

/// An unwrap result checked against what was wrapped.
fn check(
    tally: &Tally,
    tenant: &str,
    k: &Known,
    got: &Result<kekd_client::ItemOk, kekd_client::ErrorStatus>,
) {
    match got {
        Ok(item) => match &item.plaintext {
            Some(p) if p.expose() == k.plaintext => {
                tally.ok_items.fetch_add(1, Ordering::Relaxed);
            }
            _ => tally.fail(format!("wrong plaintext: tenant {tenant}")),
        },
        Err(e) if matches!(e.code, kekd_client::Code::DataInvalid | kekd_client::Code::NotFound) => {
            tally.fail(format!("lost key: tenant {tenant}: {} {}", e.code.as_str_name(), e.message));
        }
        Err(e) => tally.error(e.code.as_str_name()),
    }
}

fn call_error(tally: &Tally, e: &ClientError) {
    tally.error(e.code().as_str_name());
}

/// One client task: a mixed stream of operations on random tenants.
async fn client(
    clients: Vec<(String, PooledClient)>,
    stores: Arc<Vec<Mutex<Vec<Known>>>>,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    seed: u64,
) {
    let key = KeyName::parse("default").unwrap();
    let mut rng = Rng::new(seed);
    while !stop.load(Ordering::Relaxed) {
        let t = rng.below(clients.len());
        let (tenant, c) = (&clients[t].0, &clients[t].1);
        let store = &stores[t];
        let batch = if rng.below(4) == 0 { 1 + rng.below(64) } else { 1 };
        match rng.below(4) {
            0 => {
                let ctxs: Vec<Context> = (0..batch).map(|_| context(&mut rng)).collect();
                match c.generate(&key, ctxs.clone(), false, Metadata::default()).await {
                    Ok(items) => {
                        for (item, ctx) in items.into_iter().zip(ctxs) {
                            match item {
                                Ok(ok) => {
                                    let (Some(edek), Some(p)) = (ok.edek, ok.plaintext) else {
                                        tally.fail(format!(
                                            "wrong plaintext: tenant {tenant}: generate without a key"
                                        ));
                                        continue;
                                    };
                                    tally.ok_items.fetch_add(1, Ordering::Relaxed);
                                    let known = Known { edek, plaintext: p.expose().to_vec(), context: ctx };
                                    remember(store, known, &mut rng);
                                }
                                Err(e) => tally.error(e.code.as_str_name()),
                            }
                        }
                    }
                    Err(e) => call_error(&tally, &e),
                }
            }
            1 => {
                let secrets: Vec<(Vec<u8>, Context)> =
                    (0..batch).map(|_| (rng.bytes(32), context(&mut rng))).collect();
                let items = secrets
                    .iter()
                    .map(|(s, ctx)| WrapItem { plaintext: Secret::from_vec(s.clone()), context: ctx.clone() })
                    .collect();
                match c.wrap(&key, items, Metadata::default()).await {
                    Ok(items) => {
                        for (item, (secret, ctx)) in items.into_iter().zip(secrets) {
                            match item.map(|ok| ok.edek) {
                                Ok(Some(edek)) => {
                                    tally.ok_items.fetch_add(1, Ordering::Relaxed);
                                    remember(
                                        store,
                                        Known { edek, plaintext: secret, context: ctx },
                                        &mut rng,
                                    );
                                }
                                Ok(None) => tally
                                    .fail(format!("wrong plaintext: tenant {tenant}: wrap without an EDEK")),
                                Err(e) => tally.error(e.code.as_str_name()),
                            }
                        }
                    }
                    Err(e) => call_error(&tally, &e),
                }
            }
            2 => {
                let known = sample(store, &mut rng, batch);
                if known.is_empty() {
                    continue;
                }
                let items = edek_items(&known);
                match c.unwrap(items, Metadata::default()).await {
                    Ok(items) => {
                        for (got, k) in items.iter().zip(&known) {
                            check(&tally, tenant, k, got);
                        }
                    }
                    Err(e) => call_error(&tally, &e),
                }
            }
            _ => {
                let known = sample(store, &mut rng, batch);
                if known.is_empty() {
                    continue;
                }
                let items = edek_items(&known);
                match c.rewrap(items, Metadata::default()).await {
                    Ok(items) => {
                        for (item, k) in items.into_iter().zip(known) {
                            match item {
                                Ok(ok) => match ok.edek {
                                    Some(edek) => {
                                        tally.ok_items.fetch_add(1, Ordering::Relaxed);
                                        // The rewrapped EDEK must open to the same key: checked later.
                                        remember(store, Known { edek, ..k }, &mut rng);
                                    }
                                    None => tally.fail(format!(
                                        "wrong plaintext: tenant {tenant}: rewrap without an EDEK"
                                    )),
                                },
                                Err(e)
                                    if matches!(
                                        e.code,
                                        kekd_client::Code::DataInvalid | kekd_client::Code::NotFound
                                    ) =>
                                {
                                    tally.fail(format!(
                                        "lost key: tenant {tenant}: rewrap {}",
                                        e.code.as_str_name()
                                    ))
                                }
                                Err(e) => tally.error(e.code.as_str_name()),
                            }
                        }
                    }
                    Err(e) => call_error(&tally, &e),
                }
            }
        }
    }
}

/// What leaks would show: resident memory (kB) and open descriptors of a process.
fn footprint(pid: u32) -> (u64, usize) {
    let rss = proc_status_field(pid, "VmRSS").trim_end_matches(" kB").parse().unwrap_or(0);
    (rss, open_fds(pid).len())
}

fn main() {
    let args = parse_args();
    let started = Instant::now();
    let mut builder = Kekd::builder();
    for t in TENANTS {
        builder = builder.tenant(
            Tenant::owned_by_me(t)
                .backend(Backend::SoftHsm)
                .behind_outage_switch()
                .kek_ttl("30s")
                .idle_ttl("1m"),
        );
    }
    let kekd = Arc::new(builder.start());
    let supervisor = kekd.pid().expect("running");
    eprintln!(
        "kekd-soak: {} tenants, {} clients, for {:?} (kill every {:?}, outage of {:?} every {:?})",
        TENANTS.len(),
        args.clients,
        args.duration,
        args.kill_every,
        args.outage_for,
        args.outage_every
    );

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let retry = RetryPolicy {
        attempts: 8,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_secs(2),
    };
    let pool = Pool::new(kekd.socket(), "kekd-soak", ClientOptions::default(), retry);
    let clients: Vec<(String, PooledClient)> =
        TENANTS.iter().map(|t| (t.to_string(), pool.tenant(&TenantName::parse(t).unwrap()))).collect();
    let stores: Arc<Vec<Mutex<Vec<Known>>>> = Arc::new(TENANTS.iter().map(|_| Mutex::default()).collect());
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));

    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let mut tasks = Vec::new();
    for i in 0..args.clients {
        let (c, s, t, st) = (clients.clone(), Arc::clone(&stores), Arc::clone(&tally), Arc::clone(&stop));
        tasks.push(rt.spawn(client(c, s, t, st, seed.wrapping_add(i as u64 * 7919))));
    }

    // Warm up, then take the baseline footprint of the supervisor.
    std::thread::sleep(Duration::from_secs(10));
    let base = footprint(supervisor);
    let mut rng = Rng::new(seed ^ 0xdead_beef);
    let (mut kills, mut outages) = (0u32, 0u32);
    let (mut next_kill, mut next_outage) =
        (Instant::now() + args.kill_every, Instant::now() + args.outage_every);
    let mut cut: Option<(usize, Instant)> = None;
    let mut next_rotation = Instant::now() + ROTATE_EVERY;
    let mut failures_early: Vec<String> = Vec::new();
    let mut peak = base;
    let end = started + args.duration;
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
        let now = Instant::now();
        if now >= next_kill {
            next_kill += args.kill_every;
            let t = TENANTS[rng.below(TENANTS.len())];
            match worker_pid(&kekd, t) {
                Some(pid) if kill(Pid::from_raw(pid as i32), Signal::SIGKILL).is_ok() => {
                    kills += 1;
                    eprintln!("[{:>5}s] SIGKILL worker of {t} (pid {pid})", started.elapsed().as_secs());
                }
                _ => eprintln!("[{:>5}s] no worker of {t} to kill (restarting)", started.elapsed().as_secs()),
            }
        }
        if now >= next_rotation {
            next_rotation += ROTATE_EVERY;
            rotate_audit(&kekd);
        }
        if kekd.pid().is_some_and(|p| kill(Pid::from_raw(p as i32), None).is_err()) {
            failures_early.push("the supervisor is gone".to_owned());
            break;
        }
        if cut.is_none() && now >= next_outage {
            next_outage += args.outage_every;
            let t = rng.below(TENANTS.len());
            kekd.cut_token(TENANTS[t]);
            outages += 1;
            eprintln!("[{:>5}s] token of {} cut", started.elapsed().as_secs(), TENANTS[t]);
            cut = Some((t, now + args.outage_for));
        }
        if let Some((t, until)) = cut {
            if now >= until {
                kekd.restore_token(TENANTS[t]);
                eprintln!("[{:>5}s] token of {} back", started.elapsed().as_secs(), TENANTS[t]);
                cut = None;
            }
        }
        let f = footprint(supervisor);
        peak = (peak.0.max(f.0), peak.1.max(f.1));
    }
    if let Some((t, _)) = cut {
        kekd.restore_token(TENANTS[t]);
    }
    stop.store(true, Ordering::SeqCst);
    rt.block_on(async {
        for t in tasks {
            let _ = t.await;
        }
    });
    let after_load = footprint(supervisor);

    // Every remembered data key, once more, with the faults over.
    let final_check = Arc::new(Tally::default());
    let mut checked = 0usize;
    for (i, (tenant, c)) in clients.iter().enumerate() {
        let known: Vec<Known> = stores[i].lock().unwrap().clone();
        for chunk in known.chunks(256) {
            let items = edek_items(chunk);
            match rt.block_on(c.unwrap(items, Metadata::default())) {
                Ok(items) => {
                    for (got, k) in items.iter().zip(chunk) {
                        check(&final_check, tenant, k, got);
                    }
                }
                Err(e) => final_check.fail(format!("lost key: tenant {tenant}: final unwrap failed: {e}")),
            }
            checked += chunk.len();
        }
    }
    let workers: Vec<(String, (u64, usize))> = TENANTS
        .iter()
        .map(|t| (t.to_string(), worker_pid(&kekd, t).map(footprint).unwrap_or_default()))
        .collect();

    let errors = tally.errors.lock().unwrap().clone();
    let mut failures = failures_early;
    failures.extend(tally.failures.lock().unwrap().iter().cloned());
    failures.extend(final_check.failures.lock().unwrap().iter().cloned());
    let final_bad = final_check.errors.lock().unwrap().clone();
    // A leak: descriptors that stay open, or memory that keeps growing, in the process
    // that lives through every fault.
    let fd_leak = after_load.1 > base.1 + 2;
    let rss_growth_kb = after_load.0.saturating_sub(base.0);
    let rss_leak = rss_growth_kb > 8 * 1024;
    let pass = failures.is_empty() && final_bad.is_empty() && !fd_leak && !rss_leak;

    let report = serde_json::json!({
        "duration_secs": started.elapsed().as_secs(),
        "tenants": TENANTS, "clients": args.clients,
        "worker_kills": kills, "token_outages": outages,
        "items_ok": tally.ok_items.load(Ordering::Relaxed),
        "errors_by_class": errors,
        "final_check": { "edeks": checked, "ok": final_check.ok_items.load(Ordering::Relaxed), "bad": final_bad },
        "supervisor": {
            "rss_kb": { "start": base.0, "peak": peak.0, "end": after_load.0, "growth": rss_growth_kb },
            "fds": { "start": base.1, "peak": peak.1, "end": after_load.1 },
        },
        "workers_at_end": workers.iter().map(|(t, (rss, fds))| serde_json::json!({"tenant": t, "rss_kb": rss, "fds": fds})).collect::<Vec<_>>(),
        "failures": failures,
        "verdict": if pass { "PASS" } else { "FAIL" },
    });
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
    if !pass {
        let log = kekd.stderr();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        eprintln!("kekd's last log lines:");
        for l in tail.iter().rev() {
            eprintln!("  {l}");
        }
    }
    std::process::exit(if pass { 0 } else { 1 });
}
