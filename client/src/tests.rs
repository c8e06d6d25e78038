//! The client's own connection logic against a scripted fake server. The fake only knows
//! enough protocol to exercise pipelining and failure handling; the real daemon is tested
//! in softhsm-tests.

use std::path::PathBuf;
use std::time::Duration;

use kekd_proto::frame::write_frame;
use kekd_proto::{pb, FrameReader, ItemOk, Reply, Request, Response, PROTOCOL_VERSION};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::timeout;

use super::*;

mod pool;

/// Every test bounds its waits: a hang is exactly the failure these tests look for.
const LIMIT: Duration = Duration::from_secs(5);

fn tenant() -> TenantName {
    TenantName::parse("acme").unwrap()
}

fn key(name: &str) -> KeyName {
    KeyName::parse(name).unwrap()
}

fn md() -> Metadata {
    Metadata::default()
}

struct Fake {
    _dir: tempfile::TempDir,
    path: PathBuf,
    listener: UnixListener,
}

impl Fake {
    fn new() -> Fake {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kekd.sock");
        let listener = UnixListener::bind(&path).unwrap();
        Fake { _dir: dir, path, listener }
    }

    /// Accepts one connection and answers its `Hello` with `answer` (OK when `None`).
    async fn accept(&self, answer: Option<ErrorStatus>) -> Conn {
        let (stream, _) = self.listener.accept().await.unwrap();
        let mut conn = Conn::new(stream);
        conn.hello(answer).await;
        conn
    }
}

struct Conn {
    r: FrameReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
}

impl Conn {
    fn new(stream: UnixStream) -> Conn {
        let (r, w) = stream.into_split();
        Conn { r: FrameReader::new(r, kekd_proto::DEFAULT_MAX_FRAME), w }
    }

    /// Reads the `Hello` and answers it with `answer` (OK when `None`); returns its tenant.
    async fn hello(&mut self, answer: Option<ErrorStatus>) -> TenantName {
        let hello = self.next().await.expect("a Hello frame");
        let Op::Hello(h) = hello.op else { panic!("first frame must be Hello, got {}", hello.op.name()) };
        assert_eq!(h.protocol_version, PROTOCOL_VERSION);
        let result = match answer {
            None => Ok(Reply::Hello(HelloOk {
                protocol_version: PROTOCOL_VERSION,
                tenant: h.tenant.clone(),
                admin: true,
            })),
            Some(e) => Err(e),
        };
        self.send(Response { id: hello.id, result }).await;
        h.tenant
    }

    async fn next(&mut self) -> Option<Request> {
        let msg = self.r.read::<pb::Request>().await.unwrap()?;
        Some(Request::try_from(msg).unwrap())
    }

    async fn send(&mut self, response: Response) {
        write_frame(&mut self.w, &pb::Response::from(response)).await.unwrap();
    }
}

fn key_info(name: KeyName) -> KeyInfo {
    KeyInfo { name, active_version: 1, versions: vec![], min_decrypt_version: 0, keep_versions: 0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelined_calls_are_matched_by_id_when_answered_out_of_order() {
    const N: usize = 16;
    let fake = Fake::new();
    let server = async {
        let mut conn = fake.accept(None).await;
        // Hold every answer until all N requests are in: only a pipelining client gets
        // here, since a one-at-a-time client would still be waiting for its first answer.
        let mut held = Vec::new();
        while held.len() < N {
            let req = conn.next().await.unwrap();
            let Op::CreateKey(name) = req.op else { panic!("unexpected op") };
            held.push((req.id, name));
        }
        for (id, name) in held.into_iter().rev() {
            conn.send(Response { id, result: Ok(Reply::Key(key_info(name))) }).await;
        }
        conn
    };
    let client = async {
        let client = Client::connect(&fake.path, &tenant(), "test").await.unwrap();
        assert!(client.hello().admin);
        let calls = (0..N).map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let name = key(&format!("key-{i}"));
                (client.create_key(&name, md()).await.unwrap().name, name)
            })
        });
        for call in calls.collect::<Vec<_>>() {
            let (got, asked) = call.await.unwrap();
            assert_eq!(got, asked);
        }
        client
    };
    let (_conn, _client) = timeout(LIMIT, async { tokio::join!(server, client) }).await.unwrap();
}

#[tokio::test]
async fn server_hanging_up_fails_pending_and_later_calls() {
    let fake = Fake::new();
    let server = async {
        let mut conn = fake.accept(None).await;
        assert!(matches!(conn.next().await.unwrap().op, Op::Status));
        // Dropping the connection without an answer.
    };
    let client = async {
        let client = Client::connect(&fake.path, &tenant(), "test").await.unwrap();
        let err = client.status(md()).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err}");
        assert!(client.is_closed());
        let err = client.list_keys(md()).await.unwrap_err();
        assert!(matches!(err, ClientError::Closed), "{err}");
    };
    timeout(LIMIT, async { tokio::join!(server, client) }).await.unwrap();
}

#[tokio::test]
async fn rejected_hello_is_a_status_error() {
    let fake = Fake::new();
    let server = fake.accept(Some(ErrorStatus::new(Code::PermissionDenied, "not your tenant")));
    let tenant = tenant();
    let client = Client::connect(&fake.path, &tenant, "test");
    let (_conn, res) = timeout(LIMIT, async { tokio::join!(server, client) }).await.unwrap();
    let err = res.unwrap_err();
    assert!(matches!(&err, ClientError::Status(s) if s.code == Code::PermissionDenied), "{err}");
}

#[tokio::test]
async fn missing_socket_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let err = Client::connect(dir.path().join("nope.sock"), &tenant(), "test").await.unwrap_err();
    assert!(matches!(err, ClientError::Io(_)));
    assert_eq!(err.code(), Code::Unavailable);
}

#[tokio::test]
async fn silent_daemon_times_out_at_connect() {
    let fake = Fake::new();
    let options = ClientOptions { connect_timeout: Some(Duration::from_millis(100)), ..Default::default() };
    let tenant = tenant();
    let connect = Client::connect_with(&fake.path, &tenant, "test", options);
    // Accepts but never answers Hello.
    let server = async { fake.listener.accept().await.unwrap() };
    let (_stream, res) = timeout(LIMIT, async { tokio::join!(server, connect) }).await.unwrap();
    assert_eq!(res.unwrap_err().code(), Code::Unavailable);
}

#[tokio::test]
async fn a_call_past_the_request_timeout_is_unavailable_and_the_connection_stays_usable() {
    let fake = Fake::new();
    let after = Duration::from_millis(300);
    let options = ClientOptions { request_timeout: Some(after), ..Default::default() };
    let server = async {
        let mut conn = fake.accept(None).await;
        // The first request is never answered; the second is.
        let silent = conn.next().await.unwrap();
        assert!(matches!(silent.op, Op::Status));
        let req = conn.next().await.unwrap();
        let Op::CreateKey(name) = req.op else { panic!("unexpected op") };
        conn.send(Response { id: req.id, result: Ok(Reply::Key(key_info(name))) }).await;
        // A late answer to the first one is dropped quietly.
        conn.send(Response { id: silent.id, result: Err(ErrorStatus::new(Code::Internal, "late")) }).await;
        conn
    };
    let client = async {
        let client = Client::connect_with(&fake.path, &tenant(), "test", options).await.unwrap();
        let started = std::time::Instant::now();
        let err = client.status(md()).await.unwrap_err();
        let took = started.elapsed();
        assert!(matches!(err, ClientError::TimedOut { after: a } if a == after), "{err}");
        assert_eq!(err.code(), Code::Unavailable);
        assert!(took >= after && took < LIMIT, "timed out after {took:?}");
        assert!(!client.is_closed(), "a timeout leaves the connection to other calls");
        assert_eq!(client.create_key(&key("k"), md()).await.unwrap().name, key("k"));
        client
    };
    timeout(LIMIT, async { tokio::join!(server, client) }).await.unwrap();
}

#[tokio::test]
async fn an_unanswered_hello_is_bounded_by_the_request_timeout() {
    let fake = Fake::new();
    let after = Duration::from_millis(200);
    let options = ClientOptions { request_timeout: Some(after), ..Default::default() };
    let tenant = tenant();
    let connect = Client::connect_with(&fake.path, &tenant, "test", options);
    let server = async { fake.listener.accept().await.unwrap() };
    let (_stream, res) = timeout(LIMIT, async { tokio::join!(server, connect) }).await.unwrap();
    let err = res.unwrap_err();
    assert!(matches!(err, ClientError::TimedOut { .. }), "{err}");
    assert_eq!(err.code(), Code::Unavailable);
}

#[tokio::test]
async fn oversized_response_ends_the_connection_without_hanging() {
    let fake = Fake::new();
    let server = async {
        let mut conn = fake.accept(None).await;
        let req = conn.next().await.unwrap();
        let keys = (0..64).map(|i| key_info(key(&format!("a-rather-long-key-name-{i}")))).collect();
        conn.send(Response { id: req.id, result: Ok(Reply::Keys(keys)) }).await;
        conn
    };
    let client = async {
        let options = ClientOptions { max_response_frame: 256, ..Default::default() };
        let client = Client::connect_with(&fake.path, &tenant(), "test", options).await.unwrap();
        let err = client.list_keys(md()).await.unwrap_err();
        assert!(matches!(err, ClientError::Frame(FrameError::TooLarge { max: 256, .. })), "{err}");
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert!(matches!(client.status(md()).await.unwrap_err(), ClientError::Closed));
    };
    timeout(LIMIT, async { tokio::join!(server, client) }).await.unwrap();
}

#[tokio::test]
async fn oversized_request_is_refused_locally_and_the_connection_survives() {
    let fake = Fake::new();
    let server = async {
        let mut conn = fake.accept(None).await;
        let req = conn.next().await.unwrap();
        assert!(matches!(req.op, Op::ListKeys), "the oversized request must not reach the daemon");
        conn.send(Response { id: req.id, result: Ok(Reply::Keys(vec![])) }).await;
        conn
    };
    let client = async {
        let options = ClientOptions { max_request_frame: 1024, ..Default::default() };
        let client = Client::connect_with(&fake.path, &tenant(), "test", options).await.unwrap();
        let items =
            vec![WrapItem { plaintext: Secret::from_vec(vec![7; 2048]), context: Context::default() }];
        let err = client.wrap(&key("default"), items, md()).await.unwrap_err();
        assert!(matches!(err, ClientError::Frame(FrameError::TooLarge { max: 1024, .. })), "{err}");
        assert!(client.list_keys(md()).await.unwrap().is_empty());
    };
    timeout(LIMIT, async { tokio::join!(server, client) }).await.unwrap();
}

#[tokio::test]
async fn abandoned_call_does_not_disturb_the_next_one() {
    let fake = Fake::new();
    let server = async {
        let mut conn = fake.accept(None).await;
        let first = conn.next().await.unwrap();
        let second = conn.next().await.unwrap();
        // The abandoned call's answer arrives late and must be dropped, not mismatched.
        conn.send(Response { id: first.id, result: Ok(Reply::Keys(vec![key_info(key("first"))])) }).await;
        conn.send(Response { id: second.id, result: Ok(Reply::Keys(vec![key_info(key("second"))])) }).await;
        conn
    };
    let client = async {
        let client = Client::connect(&fake.path, &tenant(), "test").await.unwrap();
        assert!(timeout(Duration::from_millis(50), client.list_keys(md())).await.is_err());
        let keys = client.list_keys(md()).await.unwrap();
        assert_eq!(keys[0].name, key("second"));
        assert!(!client.is_closed());
    };
    timeout(LIMIT, async { tokio::join!(server, client) }).await.unwrap();
}

#[tokio::test]
async fn batch_results_and_shape_are_checked() {
    let fake = Fake::new();
    let server = async {
        let mut conn = fake.accept(None).await;
        let req = conn.next().await.unwrap();
        let Op::Generate { key, contexts, .. } = req.op else { panic!("expected generate") };
        let items = contexts
            .iter()
            .map(|_| {
                Ok(ItemOk {
                    plaintext: Some(Secret::from_vec(vec![1; 32])),
                    edek: Some(vec![2; 60]),
                    key: key.clone(),
                    version: 3,
                })
            })
            .chain([Err(ErrorStatus::new(Code::DataInvalid, "invalid data"))])
            .collect();
        conn.send(Response { id: req.id, result: Ok(Reply::Batch(items)) }).await;
        let req = conn.next().await.unwrap();
        let items =
            vec![Ok(ItemOk { plaintext: None, edek: Some(vec![3; 60]), key: key.clone(), version: 3 })];
        conn.send(Response { id: req.id, result: Ok(Reply::Batch(items)) }).await;
        conn
    };
    let client = async {
        let client = Client::connect(&fake.path, &tenant(), "test").await.unwrap();
        // The fake answers one item too many: a count mismatch is a protocol violation.
        let err =
            client.generate(&key("default"), vec![Context::default(); 2], false, md()).await.unwrap_err();
        assert!(matches!(err, ClientError::Malformed(_)), "{err}");
        assert_eq!(err.code(), Code::Internal);
        let edek = EdekItem { edek: vec![9; 60], context: Context::default() };
        let items = client.rewrap(vec![edek], md()).await.unwrap();
        let ok = items[0].as_ref().unwrap();
        assert_eq!((ok.edek.as_deref(), ok.version), (Some(&[3u8; 60][..]), 3));
    };
    timeout(LIMIT, async { tokio::join!(server, client) }).await.unwrap();
}
