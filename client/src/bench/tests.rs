//! Option checks and figures, and short runs against an in-process fake daemon.

use std::sync::Mutex;

use clap::Parser;
use kekd_proto::frame::write_frame;
use kekd_proto::{pb, FrameReader, HelloOk, ItemOk, Op, Reply, Request, Response, PROTOCOL_VERSION};
use tokio::net::UnixListener;

use super::*;

#[derive(Parser)]
struct Cmd {
    #[command(flatten)]
    args: BenchArgs,
}

fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
    Cmd::try_parse_from(std::iter::once("bench").chain(args.iter().copied())).map(|c| c.args)
}

fn tenant(s: &str) -> TenantName {
    TenantName::parse(s).unwrap()
}

fn config_for(args: &[&str], global: Option<&str>) -> Result<BenchConfig, String> {
    let global = global.map(tenant);
    parse(args).unwrap().config(
        std::path::PathBuf::from("/nope").into(),
        global.as_ref(),
        Context::default(),
        Metadata::default(),
    )
}

#[test]
fn defaults() {
    let c = config_for(&[], Some("acme")).unwrap();
    assert_eq!(c.op, BenchOp::Unwrap);
    assert_eq!((c.connections, c.pipeline, c.batch), (1, 1, 1));
    assert_eq!(c.duration, Duration::from_secs(10));
    assert_eq!(c.warmup, Duration::from_secs(1));
    assert_eq!(c.tenants, [tenant("acme")]);
    assert_eq!(c.key.as_str(), "default");
    assert_eq!(c.pool_size, EDEK_POOL);
    assert!(!c.progress);
}

#[test]
fn options_parse() {
    let a = parse(&[
        "--op",
        "rewrap",
        "--connections",
        "8",
        "--pipeline",
        "16",
        "--batch",
        "32",
        "--duration",
        "1m30s",
        "--warmup",
        "0s",
        "--tenants",
        "a,b",
        "--key",
        "billing/x",
    ])
    .unwrap();
    assert_eq!(a.op, BenchOp::Rewrap);
    assert_eq!((a.connections, a.pipeline, a.batch), (8, 16, 32));
    assert_eq!(a.duration, Duration::from_secs(90));
    assert_eq!(a.warmup, Duration::ZERO);
    assert_eq!(a.tenants, [tenant("a"), tenant("b")]);
    assert_eq!(a.key.as_str(), "billing/x");
    for op in ["generate", "wrap", "unwrap", "rewrap"] {
        assert_eq!(parse(&["--op", op]).unwrap().op.as_str(), op);
    }
    assert!(parse(&["--op", "status"]).is_err());
}

#[test]
fn batch_and_counts_are_bounded() {
    assert_eq!(parse(&["--batch", &MAX_BATCH.to_string()]).unwrap().batch as usize, MAX_BATCH);
    for bad in ["0".to_string(), (MAX_BATCH + 1).to_string(), "-1".into(), "x".into()] {
        let err =
            parse(&[&format!("--batch={bad}")]).err().unwrap_or_else(|| panic!("--batch {bad} accepted"));
        assert!(err.to_string().contains("--batch"), "{err}");
    }
    assert!(parse(&["--connections", "0"]).is_err());
    assert!(parse(&["--connections", &(MAX_CONNECTIONS + 1).to_string()]).is_err());
    assert!(parse(&["--pipeline", "0"]).is_err());
    assert!(parse(&["--pipeline", &MAX_PIPELINE.to_string()]).is_ok());
}

#[test]
fn durations_use_humantime() {
    assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
    assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
    assert_eq!(parse_duration("1h 2s").unwrap(), Duration::from_secs(3602));
    assert!(parse_duration("0s").unwrap_err().contains("more than 0"));
    assert!(parse_duration("10").is_err(), "a bare number has no unit");
    assert!(parse_duration("soon").is_err());
    assert_eq!(parse_warmup("0s").unwrap(), Duration::ZERO);
    let err = parse(&["--duration", "0ms"]).err().unwrap();
    assert!(err.to_string().contains("--duration"), "{err}");
    assert!(parse(&["--warmup", "-1s"]).is_err());
}

#[test]
fn tenants_are_checked_together() {
    let c = config_for(&["--tenants", "a,b,c", "--connections", "3"], Some("g")).unwrap();
    assert_eq!(c.tenants, [tenant("a"), tenant("b"), tenant("c")], "--tenants wins over --tenant");
    assert!(config_for(&[], None).unwrap_err().contains("--tenant"));
    let err = config_for(&["--tenants", "a,b,a", "--connections", "3"], None).unwrap_err();
    assert!(err.contains("a given twice"), "{err}");
    let err = config_for(&["--tenants", "a,b,c", "--connections", "2"], None).unwrap_err();
    assert!(err.contains("--connections 2"), "{err}");
    assert!(parse(&["--tenants", "a,,b"]).is_err(), "an empty tenant name");
}

#[test]
fn connections_spread_round_robin() {
    let spread: Vec<usize> = (0..7).map(|c| tenant_of(c, 3)).collect();
    assert_eq!(spread, [0, 1, 2, 0, 1, 2, 0]);
    assert!((0..5).all(|c| tenant_of(c, 1) == 0));
}

fn tally_1_to_1000() -> Tally {
    let mut t = Tally::default();
    for us in 1..=1000 {
        t.record_ok(Duration::from_micros(us));
    }
    t
}

fn report_of(tally: &Tally, batch: &str, elapsed: Duration) -> Report {
    let c = config_for(&["--batch", batch, "--tenants", "a,b", "--connections", "4"], None).unwrap();
    Report::new(&c, tally, elapsed, false, 0)
}

#[test]
fn percentiles_and_rates() {
    let r = report_of(&tally_1_to_1000(), "4", Duration::from_secs(2));
    let l = r.latency_us.clone().unwrap();
    assert_eq!((l.p50, l.p90, l.p99, l.p99_9, l.max), (500, 900, 990, 999, 1000));
    assert_eq!(l.mean, 500.5);
    assert_eq!((r.requests, r.deks, r.failed_requests), (1000, 4000, 0));
    assert_eq!((r.requests_per_sec, r.deks_per_sec), (500.0, 2000.0));
    assert_eq!(r.elapsed_secs, 2.0);

    // Large values keep 3 significant digits; a sub-microsecond answer counts as 1 µs.
    let mut t = Tally::default();
    t.record_ok(Duration::from_nanos(300));
    t.record_ok(Duration::from_millis(123_456));
    let l = report_of(&t, "1", Duration::from_secs(1)).latency_us.unwrap();
    assert_eq!(l.p50, 1);
    assert!(l.max.abs_diff(60_000_000) < 60_000, "saturates at 60 s: {}", l.max);

    let none = report_of(&Tally::default(), "1", Duration::ZERO);
    assert!(none.latency_us.is_none());
    assert_eq!(none.requests_per_sec, 0.0, "no division by a zero window");
}

#[test]
fn tallies_merge() {
    let mut a = tally_1_to_1000();
    a.record_failure(Failure::Status(Code::Unavailable));
    let mut b = Tally::default();
    b.record_ok(Duration::from_micros(2000));
    b.record_failure(Failure::Status(Code::Unavailable));
    b.record_failure(Failure::Timeout);
    a.merge(&b);
    assert_eq!(a.ok, 1001);
    assert_eq!(a.latency.len(), 1001);
    assert_eq!(a.latency.max(), 2000);
    assert_eq!(a.failed_total(), 3);
    assert_eq!(a.failed[&Failure::Status(Code::Unavailable)], 2);
    assert_eq!(a.failed[&Failure::Timeout], 1);
}

#[test]
fn json_shape() {
    let mut t = tally_1_to_1000();
    t.record_failure(Failure::Status(Code::DataInvalid));
    t.record_failure(Failure::Timeout);
    let json = report_of(&t, "2", Duration::from_millis(500)).json();
    assert!(json.ends_with("}\n") && json.matches('\n').count() == 1, "one line: {json}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "batch",
            "connections",
            "connections_lost",
            "deks",
            "deks_per_sec",
            "duration_secs",
            "elapsed_secs",
            "errors",
            "failed_requests",
            "interrupted",
            "key",
            "latency_us",
            "op",
            "pipeline",
            "requests",
            "requests_per_sec",
            "tenants",
            "warmup_secs",
        ]
    );
    assert_eq!(
        v["latency_us"],
        serde_json::json!({"p50": 500, "p90": 900, "p99": 990, "p99_9": 999, "max": 1000, "mean": 500.5})
    );
    assert_eq!(v["errors"], serde_json::json!({"DATA_INVALID": 1, "TIMEOUT": 1}));
    assert_eq!(v["tenants"], serde_json::json!(["a", "b"]));
    assert_eq!(v["op"], "unwrap");
    assert_eq!(v["requests_per_sec"], 2000.0);
    assert_eq!(v["deks_per_sec"], 4000.0);
    assert_eq!(v["failed_requests"], 2);
    assert_eq!(v["duration_secs"], 10.0);
    let empty = report_of(&Tally::default(), "1", Duration::ZERO).json();
    assert!(empty.contains("\"latency_us\":null"), "{empty}");
}

#[test]
fn text_summary() {
    let mut t = tally_1_to_1000();
    t.record_failure(Failure::Status(Code::Unavailable));
    let text = report_of(&t, "4", Duration::from_secs(2)).text();
    for line in [
        "op:          unwrap (key default, batch 4)\n",
        "tenants:     a, b\n",
        "connections: 4 × pipeline 1\n",
        "duration:    2.00s measured (asked 10s, after 1s warmup)\n",
        "requests:    1000 (500.0/s)\n",
        "DEKs:        4000 (2000.0/s)\n",
        "latency:     p50 500µs  p90 900µs  p99 990µs  p99.9 999µs  max 1.00ms  mean 501µs\n",
        "errors:      1 (UNAVAILABLE 1)\n",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    assert!(report_of(&tally_1_to_1000(), "1", Duration::from_secs(1))
        .text()
        .contains("errors:      none\n"));
}

#[test]
fn human_latencies_and_progress_line() {
    assert_eq!(fmt_us(850), "850µs");
    assert_eq!(fmt_us(1250), "1.25ms");
    assert_eq!(fmt_us(12_345), "12.3ms");
    assert_eq!(fmt_us(1_500_000), "1.50s");
    let line = progress_line(Duration::from_millis(3250), false, Duration::from_millis(250), 500, 4, 7);
    assert!(line.contains("3.2s") || line.contains("3.3s"), "{line}");
    assert!(
        line.contains(" 2000 req/s") && line.contains(" 8000 DEKs/s") && line.ends_with("7 errors"),
        "{line}"
    );
    assert!(progress_line(Duration::ZERO, true, Duration::ZERO, 0, 1, 0).contains("warmup"));
}

#[test]
fn failure_only_when_no_request_succeeded() {
    let mut t = Tally::default();
    for _ in 0..3 {
        t.record_failure(Failure::Status(Code::Unavailable));
    }
    for _ in 0..5 {
        t.record_failure(Failure::Status(Code::NotFound));
    }
    let r = report_of(&t, "1", Duration::from_secs(1));
    let status = r.failure().expect("every request failed");
    assert_eq!(status.code, Code::NotFound, "the most frequent failure");
    assert!(status.message.contains("NOT_FOUND 5, UNAVAILABLE 3"), "{}", status.message);

    let mut t = Tally::default();
    t.record_failure(Failure::Timeout);
    assert_eq!(report_of(&t, "1", Duration::from_secs(1)).failure().unwrap().code, Code::Unavailable);
    let nothing = report_of(&Tally::default(), "1", Duration::from_secs(1)).failure().unwrap();
    assert_eq!(nothing.code, Code::Unavailable);

    t.record_ok(Duration::from_micros(10));
    assert!(report_of(&t, "1", Duration::from_secs(1)).failure().is_none(), "partial errors are not fatal");
}

// --- Against a fake daemon -------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Answers; every 5th request of a connection fails as a whole (RESOURCE_EXHAUSTED),
    /// of the others every 7th has a failed last item (DATA_INVALID).
    Serve,
    /// Refuses every request with PERMISSION_DENIED.
    Deny,
    /// Refuses `Hello` with NOT_FOUND.
    RejectHello,
    /// As `Serve`, but the first connection hangs up after 20 requests.
    HangUpFirst,
}

#[derive(Default)]
struct Stats {
    /// Tenant of each accepted connection.
    tenants: Vec<String>,
    /// EDEKs generated with `edek_only` (the pool), per tenant.
    pooled: BTreeMap<String, usize>,
    /// Bench requests seen (not Hello, not pool generation).
    requests: u64,
    /// Unwrap/rewrap items carrying an EDEK of another tenant.
    misrouted: u64,
}

struct Fake {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    stats: Arc<Mutex<Stats>>,
}

impl Fake {
    fn start(mode: Mode) -> Fake {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kekd.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let stats = Arc::new(Mutex::new(Stats::default()));
        let shared = Arc::clone(&stats);
        tokio::spawn(async move {
            for n in 0.. {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(serve(stream, mode, n == 0, Arc::clone(&shared)));
            }
        });
        Fake { _dir: dir, path, stats }
    }

    fn config(&self, op: BenchOp, tenants: &[&str], connections: usize) -> BenchConfig {
        BenchConfig {
            socket: self.path.clone().into(),
            tenants: tenants.iter().map(|t| tenant(t)).collect(),
            op,
            connections,
            pipeline: 4,
            batch: 3,
            duration: Duration::from_millis(300),
            warmup: Duration::from_millis(50),
            key: KeyName::parse("default").unwrap(),
            context: Context::default(),
            metadata: Metadata::default(),
            pool_size: 10,
            grace: Duration::from_secs(2),
            progress: false,
            client_name: "bench-test".into(),
        }
    }
}

fn ok_item(key: &KeyName, plaintext: bool, edek: Vec<u8>) -> ItemResult {
    let plaintext = plaintext.then(|| Secret::from_vec(vec![7; 32]));
    Ok(ItemOk { plaintext, edek: Some(edek), key: key.clone(), version: 1 })
}

async fn serve(stream: tokio::net::UnixStream, mode: Mode, first: bool, stats: Arc<Mutex<Stats>>) {
    let (r, mut w) = stream.into_split();
    let mut r = FrameReader::new(r, kekd_proto::DEFAULT_MAX_FRAME);
    let mut next = async || Some(Request::try_from(r.read::<pb::Request>().await.ok()??).unwrap());
    let hello = next().await.unwrap();
    let Op::Hello(h) = hello.op else { panic!("Hello first") };
    let t = h.tenant.to_string();
    stats.lock().unwrap().tenants.push(t.clone());
    let result = match mode {
        Mode::RejectHello => Err(ErrorStatus::new(Code::NotFound, "no such tenant")),
        _ => Ok(Reply::Hello(HelloOk { protocol_version: PROTOCOL_VERSION, tenant: h.tenant, admin: false })),
    };
    write_frame(&mut w, &pb::Response::from(Response { id: hello.id, result })).await.unwrap();
    let mut n = 0u64;
    while let Some(req) = next().await {
        let key = KeyName::parse("default").unwrap();
        let mine = |edek: &[u8]| edek.starts_with(t.as_bytes());
        let items: Vec<ItemResult> = match req.op {
            Op::Generate { edek_only: true, contexts, .. } => {
                *stats.lock().unwrap().pooled.entry(t.clone()).or_default() += contexts.len();
                let items = contexts.iter().map(|_| ok_item(&key, false, t.as_bytes().to_vec())).collect();
                let response = Response { id: req.id, result: Ok(Reply::Batch(items)) };
                write_frame(&mut w, &pb::Response::from(response)).await.unwrap();
                continue;
            }
            Op::Generate { contexts, .. } => {
                contexts.iter().map(|_| ok_item(&key, true, vec![1; 40])).collect()
            }
            Op::Wrap { items, .. } => {
                assert!(items.iter().all(|i| i.plaintext.len() == 32));
                items.iter().map(|_| ok_item(&key, false, vec![2; 40])).collect()
            }
            Op::Unwrap(items) | Op::Rewrap(items) => {
                let wrong = items.iter().filter(|i| !mine(&i.edek)).count() as u64;
                stats.lock().unwrap().misrouted += wrong;
                items.iter().map(|_| ok_item(&key, true, t.as_bytes().to_vec())).collect()
            }
            other => panic!("unexpected {}", other.name()),
        };
        n += 1;
        stats.lock().unwrap().requests += 1;
        if mode == Mode::HangUpFirst && first && n > 20 {
            return;
        }
        let result = if mode == Mode::Deny {
            Err(ErrorStatus::new(Code::PermissionDenied, "not for you"))
        } else if n % 5 == 0 {
            Err(ErrorStatus::new(Code::ResourceExhausted, "busy"))
        } else if n % 7 == 0 {
            let mut items = items;
            *items.last_mut().unwrap() = Err(ErrorStatus::new(Code::DataInvalid, "bad"));
            Ok(Reply::Batch(items))
        } else {
            Ok(Reply::Batch(items))
        };
        write_frame(&mut w, &pb::Response::from(Response { id: req.id, result })).await.unwrap();
    }
}

const LIMIT: Duration = Duration::from_secs(10);

async fn bench(config: &BenchConfig) -> Result<Report, ClientError> {
    tokio::time::timeout(LIMIT, run(config, std::future::pending())).await.expect("the bench ends by itself")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_unwrap_bench_counts_add_up() {
    let fake = Fake::start(Mode::Serve);
    let config = fake.config(BenchOp::Unwrap, &["a", "b"], 3);
    let r = bench(&config).await.unwrap();
    let stats = fake.stats.lock().unwrap();

    let mut tenants = stats.tenants.clone();
    tenants.sort();
    assert_eq!(tenants, ["a", "a", "b"], "3 connections round-robin over 2 tenants");
    assert_eq!(stats.pooled, BTreeMap::from([("a".into(), 10), ("b".into(), 10)]), "one pool per tenant");
    assert_eq!(stats.misrouted, 0, "each connection unwraps its own tenant's EDEKs");

    assert!(r.requests > 20, "{r:?}");
    assert_eq!(r.deks, r.requests * 3);
    assert_eq!(r.failed_requests, r.errors.values().sum::<u64>());
    assert_eq!(r.errors.keys().copied().collect::<Vec<_>>(), ["DATA_INVALID", "RESOURCE_EXHAUSTED"], "{r:?}");
    // Warmup requests reach the daemon but are not counted.
    let counted = r.requests + r.failed_requests;
    assert!(counted < stats.requests, "{counted} counted of {} sent", stats.requests);
    // 1 in 5 fails whole, and 1 in 7 of the rest on an item: 11/35 of all requests.
    let share = r.failed_requests as f64 / counted as f64;
    assert!((0.2..0.45).contains(&share), "failed share {share}");
    assert!(r.elapsed_secs >= 0.3 && r.elapsed_secs < 1.5, "{}", r.elapsed_secs);
    let l = r.latency_us.as_ref().unwrap();
    assert!(l.p50 <= l.p90 && l.p90 <= l.p99 && l.p99 <= l.p99_9 && l.p99_9 <= l.max);
    assert_eq!(r.connections_lost, 0);
    assert!(r.failure().is_none());
    assert!(!r.interrupted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_op_runs() {
    for op in [BenchOp::Generate, BenchOp::Wrap, BenchOp::Rewrap] {
        let fake = Fake::start(Mode::Serve);
        let mut config = fake.config(op, &["a"], 1);
        config.duration = Duration::from_millis(100);
        let r = bench(&config).await.unwrap();
        assert!(r.requests > 0, "{op:?}: {r:?}");
        assert_eq!(r.op, op.as_str());
        let pooled = fake.stats.lock().unwrap().pooled.clone();
        assert_eq!(pooled.is_empty(), op != BenchOp::Rewrap, "{op:?}: only unwrap and rewrap need a pool");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_failing_fails_the_run() {
    let fake = Fake::start(Mode::Deny);
    let r = bench(&fake.config(BenchOp::Wrap, &["a"], 2)).await.unwrap();
    assert_eq!(r.requests, 0);
    assert!(r.failed_requests > 0);
    assert_eq!(r.errors.keys().copied().collect::<Vec<_>>(), ["PERMISSION_DENIED"]);
    assert_eq!(r.failure().unwrap().code, Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_failure_is_an_error() {
    let fake = Fake::start(Mode::RejectHello);
    let err = bench(&fake.config(BenchOp::Wrap, &["a"], 2)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
    let dir = tempfile::tempdir().unwrap();
    let mut config = fake.config(BenchOp::Wrap, &["a"], 1);
    config.socket = dir.path().join("absent.sock").into();
    assert_eq!(bench(&config).await.unwrap_err().code(), Code::Unavailable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_is_counted_and_the_rest_go_on() {
    let fake = Fake::start(Mode::HangUpFirst);
    let mut config = fake.config(BenchOp::Generate, &["a"], 2);
    config.warmup = Duration::ZERO;
    let r = bench(&config).await.unwrap();
    assert_eq!(r.connections_lost, 1, "{r:?}");
    assert!(r.errors.get("UNAVAILABLE").is_some_and(|n| *n >= 1 && *n <= 4), "{r:?}");
    assert!(r.requests > 20, "the other connection kept going: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupt_ends_the_run_early() {
    let fake = Fake::start(Mode::Serve);
    let mut config = fake.config(BenchOp::Wrap, &["a"], 1);
    config.duration = Duration::from_secs(60);
    config.warmup = Duration::ZERO;
    let stop = tokio::time::sleep(Duration::from_millis(150));
    let r = tokio::time::timeout(LIMIT, run(&config, stop)).await.unwrap().unwrap();
    assert!(r.interrupted);
    assert!(r.elapsed_secs < 5.0, "{}", r.elapsed_secs);
    assert!(r.requests > 0);
}
