//! The pool against a scripted fake daemon that serves every connection it accepts, can
//! refuse `Hello` or hang up mid-request like a restarting worker, and records what it saw.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::*;

/// What the fake does with a request.
enum Act {
    Answer(Result<Reply, ErrorStatus>),
    /// Answers, then closes the connection while it is idle.
    AnswerAndHangUp(Result<Reply, ErrorStatus>),
    /// Closes the connection without answering, as a SIGKILLed worker does.
    HangUp,
    /// Never answers, as a stopped worker does.
    Ignore,
}

type HelloScript = Box<dyn Fn(usize) -> Option<ErrorStatus> + Send + Sync>;
type RequestScript = Box<dyn Fn(usize, &Request) -> Act + Send + Sync>;

struct Script {
    /// The answer to `Hello` on the n-th connection (from 0); `None` accepts it.
    hello: HelloScript,
    /// What to do with the n-th request (from 0) over all connections.
    request: RequestScript,
    /// How long `Hello` waits for its answer, to widen the window for racing connects.
    hello_delay: Duration,
}

impl Script {
    fn new(request: impl Fn(usize, &Request) -> Act + Send + Sync + 'static) -> Script {
        Script { hello: Box::new(|_| None), request: Box::new(request), hello_delay: Duration::ZERO }
    }

    fn refusing_hello(hello: impl Fn(usize) -> Option<ErrorStatus> + Send + Sync + 'static) -> Script {
        Script { hello: Box::new(hello), ..Script::new(|_, req| Act::Answer(ok(req))) }
    }
}

#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    /// The tenant of every accepted `Hello`.
    tenants: Mutex<Vec<TenantName>>,
    /// (connection number, operation name) of every request.
    requests: Mutex<Vec<(usize, &'static str)>>,
}

impl Seen {
    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn requests(&self) -> Vec<(usize, &'static str)> {
        self.requests.lock().unwrap().clone()
    }
}

/// The fake serves from tasks of the test's runtime, which end with the test.
struct Daemon {
    _dir: tempfile::TempDir,
    path: PathBuf,
    seen: Arc<Seen>,
}

impl Daemon {
    fn spawn(script: Script) -> Daemon {
        let Fake { _dir, path, listener } = Fake::new();
        let seen = Arc::new(Seen::default());
        let script = Arc::new(script);
        let counts = Arc::clone(&seen);
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let n = counts.connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(Conn::new(stream), n, Arc::clone(&script), Arc::clone(&counts)));
            }
        });
        Daemon { _dir, path, seen }
    }

    fn pool(&self, retry: RetryPolicy) -> Pool {
        Pool::new(&self.path, "test", ClientOptions::default(), retry)
    }
}

async fn serve(mut conn: Conn, n: usize, script: Arc<Script>, seen: Arc<Seen>) {
    tokio::time::sleep(script.hello_delay).await;
    let answer = (script.hello)(n);
    let refused = answer.is_some();
    let tenant = conn.hello(answer).await;
    if refused {
        return;
    }
    seen.tenants.lock().unwrap().push(tenant);
    while let Some(req) = conn.next().await {
        let i = {
            let mut requests = seen.requests.lock().unwrap();
            requests.push((n, req.op.name()));
            requests.len() - 1
        };
        match (script.request)(i, &req) {
            Act::Answer(result) => conn.send(Response { id: req.id, result }).await,
            Act::AnswerAndHangUp(result) => return conn.send(Response { id: req.id, result }).await,
            Act::HangUp => return,
            Act::Ignore => {}
        }
    }
}

/// A plausible answer to each operation the tests send. Unwrap "recovers" the EDEK's bytes
/// and Wrap "wraps" to the plaintext's bytes, so a test can see what reached the daemon.
fn ok(req: &Request) -> Result<Reply, ErrorStatus> {
    let item = |plaintext: Option<Secret>, edek: Option<Vec<u8>>| {
        Ok(ItemOk { plaintext, edek, key: key("default"), version: 1 })
    };
    Ok(match &req.op {
        Op::Status => Reply::Status(StatusInfo {
            tenant: tenant(),
            backend: "fake".into(),
            backend_healthy: true,
            backend_error: String::new(),
            cached_keks: 0,
            keys: 0,
            uptime_seconds: 1,
            memory_locked: true,
            worker_pid: 1,
            lease: "online".into(),
            root_key_exceptions: Vec::new(),
            key_versions: Vec::new(),
            operations: Vec::new(),
            errors: Vec::new(),
        }),
        Op::CreateKey(k) | Op::RotateKey(k) => Reply::Key(key_info(k.clone())),
        Op::Unwrap(items) => {
            Reply::Batch(items.iter().map(|i| item(Some(Secret::from_vec(i.edek.clone())), None)).collect())
        }
        Op::Wrap { items, .. } => {
            Reply::Batch(items.iter().map(|i| item(None, Some(i.plaintext.expose().to_vec()))).collect())
        }
        other => panic!("the fake has no answer to {}", other.name()),
    })
}

fn restarting() -> Option<ErrorStatus> {
    Some(ErrorStatus::new(Code::Unavailable, "tenant acme is restarting"))
}

/// Retries with waits short enough to keep the tests quick.
fn quick(attempts: u32) -> RetryPolicy {
    RetryPolicy { attempts, initial_backoff: Duration::from_millis(1), max_backoff: Duration::from_millis(5) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_connection_is_shared_by_concurrent_callers_and_reused() {
    const N: usize = 16;
    // A slow Hello keeps the first connect pending while every caller arrives.
    let daemon = Daemon::spawn(Script {
        hello_delay: Duration::from_millis(50),
        ..Script::new(|_, req| Act::Answer(ok(req)))
    });
    let pool = daemon.pool(RetryPolicy::default());
    timeout(LIMIT, async {
        let calls: Vec<_> = (0..N)
            .map(|_| {
                let client = pool.tenant(&tenant());
                tokio::spawn(async move { client.status(md()).await })
            })
            .collect();
        for call in calls {
            call.await.unwrap().unwrap();
        }
        let client = pool.clone().tenant(&tenant());
        for _ in 0..3 {
            client.status(md()).await.unwrap();
        }
    })
    .await
    .unwrap();
    assert_eq!(daemon.seen.connections(), 1);
    assert_eq!(daemon.seen.requests(), vec![(0, "status"); N + 3]);
}

#[tokio::test]
async fn a_timed_out_call_is_not_retried() {
    let daemon = Daemon::spawn(Script::new(|_, _| Act::Ignore));
    let after = Duration::from_millis(200);
    let options = ClientOptions { request_timeout: Some(after), ..Default::default() };
    let pool = Pool::new(&daemon.path, "test", options, quick(5));
    let started = Instant::now();
    let err = timeout(LIMIT, pool.tenant(&tenant()).status(md())).await.unwrap().unwrap_err();
    assert!(matches!(err, ClientError::TimedOut { .. }), "{err}");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(started.elapsed() < after * 3, "retried: took {:?}", started.elapsed());
    assert_eq!(daemon.seen.requests(), vec![(0, "status")], "one attempt: the time budget is spent");
}

#[tokio::test]
async fn each_tenant_gets_its_own_connection() {
    let daemon = Daemon::spawn(Script::new(|_, req| Act::Answer(ok(req))));
    let pool = daemon.pool(RetryPolicy::default());
    let beta = TenantName::parse("beta").unwrap();
    let (acme, beta) = (pool.tenant(&tenant()), pool.tenant(&beta));
    timeout(LIMIT, async {
        for _ in 0..2 {
            let (a, b) = tokio::join!(acme.hello(), beta.hello());
            assert_eq!(a.unwrap().tenant, *acme.tenant());
            assert_eq!(b.unwrap().tenant, *beta.tenant());
            let (a, b) = tokio::join!(acme.status(md()), beta.status(md()));
            a.unwrap();
            b.unwrap();
        }
    })
    .await
    .unwrap();
    assert_eq!(daemon.seen.connections(), 2);
    let mut tenants = daemon.seen.tenants.lock().unwrap().clone();
    tenants.sort();
    assert_eq!(tenants, [acme.tenant().clone(), beta.tenant().clone()]);
}

#[tokio::test]
async fn a_connection_closed_by_the_daemon_is_replaced_transparently() {
    // The first request is answered, then the worker "dies" with the connection idle.
    let daemon = Daemon::spawn(Script::new(|i, req| match i {
        0 => Act::AnswerAndHangUp(ok(req)),
        _ => Act::Answer(ok(req)),
    }));
    let client = daemon.pool(quick(6)).tenant(&tenant());
    timeout(LIMIT, async {
        client.status(md()).await.unwrap();
        client.status(md()).await.unwrap();
        client.status(md()).await.unwrap();
    })
    .await
    .unwrap();
    assert_eq!(daemon.seen.connections(), 2);
    assert_eq!(daemon.seen.requests(), [(0, "status"), (1, "status"), (1, "status")]);
}

#[tokio::test]
async fn hello_refused_as_unavailable_is_retried_even_for_admin_ops() {
    let daemon = Daemon::spawn(Script::refusing_hello(|n| if n < 3 { restarting() } else { None }));
    let client = daemon.pool(quick(6)).tenant(&tenant());
    let info = timeout(LIMIT, client.create_key(&key("k"), md())).await.unwrap().unwrap();
    assert_eq!(info.name, key("k"));
    assert_eq!(daemon.seen.connections(), 4);
    assert_eq!(daemon.seen.requests(), [(3, "create_key")]);
}

#[tokio::test]
async fn unavailable_beyond_the_attempt_bound_fails_after_backing_off() {
    let daemon = Daemon::spawn(Script::refusing_hello(|_| restarting()));
    let client = daemon.pool(RetryPolicy::default()).tenant(&tenant());
    let start = Instant::now();
    let err = timeout(LIMIT, client.status(md())).await.unwrap().unwrap_err();
    let elapsed = start.elapsed();
    assert!(matches!(&err, ClientError::Status(s) if s.code == Code::Unavailable), "{err}");
    assert!(err.to_string().contains("restarting"), "{err}");
    assert_eq!(daemon.seen.connections(), 6, "the default policy makes 6 attempts");
    // The default waits add up to 50 + 100 + 200 + 400 + 800 ms before jitter.
    assert!(elapsed >= Duration::from_millis(1550), "gave up after {elapsed:?}");
}

#[tokio::test]
async fn admin_op_pending_when_the_connection_dies_is_not_retried() {
    let daemon = Daemon::spawn(Script::new(|_, _| Act::HangUp));
    let client = daemon.pool(quick(6)).tenant(&tenant());
    let err = timeout(LIMIT, client.rotate_key(&key("k"), md())).await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert_eq!(daemon.seen.requests(), [(0, "rotate_key")], "the daemon may have rotated the key");
    assert_eq!(daemon.seen.connections(), 1);
}

#[tokio::test]
async fn admin_op_answered_unavailable_by_the_daemon_is_retried() {
    let daemon = Daemon::spawn(Script::new(|i, req| match i {
        0 => Act::Answer(Err(ErrorStatus::new(Code::Unavailable, "backend unreachable"))),
        _ => Act::Answer(ok(req)),
    }));
    let client = daemon.pool(quick(6)).tenant(&tenant());
    let info = timeout(LIMIT, client.create_key(&key("k"), md())).await.unwrap().unwrap();
    assert_eq!(info.name, key("k"));
    // The connection still works, so the retry goes over it.
    assert_eq!(daemon.seen.requests(), [(0, "create_key"), (0, "create_key")]);
}

#[tokio::test]
async fn data_ops_pending_when_the_connection_dies_are_retried_with_their_secrets_intact() {
    // Every first try dies with the request pending; the retry on a new connection works.
    let daemon =
        Daemon::spawn(Script::new(|i, req| if i % 2 == 0 { Act::HangUp } else { Act::Answer(ok(req)) }));
    let client = daemon.pool(quick(6)).tenant(&tenant());
    timeout(LIMIT, async {
        let edek = EdekItem { edek: vec![5; 40], context: Context::default() };
        let items = client.unwrap(vec![edek], md()).await.unwrap();
        assert_eq!(items[0].as_ref().unwrap().plaintext.as_ref().unwrap().expose(), [5; 40]);
        let item = WrapItem { plaintext: Secret::from_vec(vec![7; 32]), context: Context::default() };
        let items = client.wrap(&key("default"), vec![item], md()).await.unwrap();
        assert_eq!(items[0].as_ref().unwrap().edek.as_deref(), Some(&[7; 32][..]));
    })
    .await
    .unwrap();
    assert_eq!(daemon.seen.requests(), [(0, "unwrap"), (1, "unwrap"), (1, "wrap"), (2, "wrap")]);
}

#[tokio::test]
async fn hello_refused_for_good_is_returned_at_once() {
    for code in [Code::NotFound, Code::PermissionDenied] {
        let daemon = Daemon::spawn(Script::refusing_hello(move |_| Some(ErrorStatus::new(code, "no"))));
        let client = daemon.pool(quick(6)).tenant(&tenant());
        let err = timeout(LIMIT, client.status(md())).await.unwrap().unwrap_err();
        assert!(matches!(&err, ClientError::Status(s) if s.code == code), "{err}");
        assert_eq!(daemon.seen.connections(), 1);
    }
}

#[test]
fn backoff_doubles_up_to_the_cap_with_bounded_jitter() {
    let policy = RetryPolicy::default();
    for (retry, base_ms) in (1..).zip([50, 100, 200, 400, 800, 1000, 1000, 1000]) {
        let base = Duration::from_millis(base_ms);
        let wait = policy.backoff(retry);
        assert!(base <= wait && wait <= base * 3 / 2, "retry {retry}: {wait:?}");
    }
}
