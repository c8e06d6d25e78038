//! One pipelined connection: a writer task, a reader task and a table of pending calls.
//!
//! Callers never touch the socket. A call registers a oneshot under a fresh request id,
//! queues its encoded frame for the writer, and waits; the reader completes the oneshot
//! whose id the response echoes. Whoever notices the connection die (reader or writer)
//! closes the table, failing every pending call and every later one, so nobody waits on a
//! connection that is gone.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use kekd_proto::frame::write_frame;
use kekd_proto::{
    pb, FrameError, FrameReader, Hello, HelloOk, MalformedResponse, Metadata, Op, Reply, Request, Response,
    TenantName, DEFAULT_MAX_FRAME, PROTOCOL_VERSION,
};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use zeroize::{Zeroize, Zeroizing};

use crate::endpoint::{self, Endpoint, ReadHalf, WriteHalf};
use crate::ClientError;

/// Frames waiting for the writer. Bounded, so a caller pipelining faster than the socket
/// drains waits instead of growing memory without limit.
const QUEUE_DEPTH: usize = 256;
/// The writer coalesces queued frames into one write of about this size.
const WRITE_BATCH_BYTES: usize = 64 * 1024;

/// Connection settings; `Default` matches the daemon's defaults.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Largest response frame accepted. A larger one ends the connection, since the
    /// stream cannot be resynchronised without reading it.
    pub max_response_frame: usize,
    /// Largest request frame sent. The daemon drops the connection on an oversized
    /// frame, so such a request is refused here and the connection stays usable.
    pub max_request_frame: usize,
    /// Bound on connecting and the `Hello` exchange, so a stuck daemon cannot hang
    /// `connect`. `None` waits forever.
    pub connect_timeout: Option<Duration>,
    /// Bound on each call, from sending the request to its answer, and on the `Hello`
    /// exchange: past it the call fails with [`ClientError::TimedOut`] (`UNAVAILABLE`), so
    /// a worker that stopped answering cannot hang its callers. The daemon replaces such a
    /// worker by itself (`worker_watchdog`, 10 s by default), which closes its connections
    /// first; this bound is for what that does not cover. `None` waits forever.
    pub request_timeout: Option<Duration>,
}

/// [`ClientOptions::request_timeout`] by default: a root-key call is bounded at 5 s and a
/// silent worker is replaced within 10 s, so an answer later than this is not coming.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            max_response_frame: DEFAULT_MAX_FRAME,
            max_request_frame: DEFAULT_MAX_FRAME,
            connect_timeout: Some(Duration::from_secs(10)),
            request_timeout: Some(DEFAULT_REQUEST_TIMEOUT),
        }
    }
}

type Waiter = oneshot::Sender<Result<Reply, ClientError>>;

enum Table {
    Open(HashMap<u64, Waiter>),
    Closed,
}

/// State shared by the callers and both tasks.
struct Shared {
    table: Mutex<Table>,
    reader: OnceLock<AbortHandle>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // A panic while holding this lock leaves the map consistent (each operation is a
        // single insert or remove), so a poisoned lock is still safe to use.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self, id: u64, waiter: Waiter) -> Result<(), ClientError> {
        match &mut *self.lock() {
            Table::Open(map) => {
                map.insert(id, waiter);
                Ok(())
            }
            Table::Closed => Err(ClientError::Closed),
        }
    }

    fn take(&self, id: u64) -> Option<Waiter> {
        match &mut *self.lock() {
            Table::Open(map) => map.remove(&id),
            Table::Closed => None,
        }
    }

    fn is_closed(&self) -> bool {
        matches!(*self.lock(), Table::Closed)
    }

    /// Marks the connection dead and hands every pending call a copy of `cause`.
    fn close(&self, cause: ClientError) {
        let pending = std::mem::replace(&mut *self.lock(), Table::Closed);
        if let Some(reader) = self.reader.get() {
            reader.abort();
        }
        if let Table::Open(map) = pending {
            for waiter in map.into_values() {
                let _ = waiter.send(Err(cause.replicate()));
            }
        }
    }
}

/// Removes a call's entry if the caller gives up (its future is dropped), so the table
/// does not keep it until a response that may never come.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        drop(self.shared.take(self.id));
    }
}

struct Inner {
    shared: Arc<Shared>,
    queue: mpsc::Sender<Zeroizing<Vec<u8>>>,
    next_id: AtomicU64,
    hello: HelloOk,
    max_request_frame: usize,
    request_timeout: Option<Duration>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The writer ends by itself once the queue's sender is gone; the reader would wait
        // for the daemon to hang up, so it is stopped here.
        self.shared.close(ClientError::Closed);
    }
}

/// A connection to kekd for one tenant.
///
/// Cloning is cheap and clones share the connection; any number of tasks may call
/// concurrently and their requests are pipelined. Must be created inside a Tokio runtime,
/// which runs the connection's two tasks.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("tenant", &self.inner.hello.tenant)
            .field("admin", &self.inner.hello.admin)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Client {
    /// Connects with the default [`ClientOptions`].
    pub async fn connect(
        endpoint: impl Into<Endpoint>,
        tenant: &TenantName,
        client_name: &str,
    ) -> Result<Client, ClientError> {
        Self::connect_with(endpoint, tenant, client_name, ClientOptions::default()).await
    }

    /// Connects and performs the `Hello` exchange; an error status from the daemon (for
    /// instance an unknown tenant) is returned as [`ClientError::Status`].
    pub async fn connect_with(
        endpoint: impl Into<Endpoint>,
        tenant: &TenantName,
        client_name: &str,
        options: ClientOptions,
    ) -> Result<Client, ClientError> {
        let endpoint = endpoint.into();
        let handshake = handshake(&endpoint, tenant, client_name, options.max_response_frame);
        let connecting = async {
            match options.connect_timeout {
                None => handshake.await,
                Some(limit) => tokio::time::timeout(limit, handshake)
                    .await
                    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?,
            }
        };
        let ((read, write), hello) = bounded(options.request_timeout, connecting).await?;
        let shared =
            Arc::new(Shared { table: Mutex::new(Table::Open(HashMap::new())), reader: OnceLock::new() });
        let (queue, rx) = mpsc::channel(QUEUE_DEPTH);
        let reader = tokio::spawn(read_loop(Arc::clone(&shared), read));
        let _ = shared.reader.set(reader.abort_handle());
        tokio::spawn(write_loop(Arc::clone(&shared), rx, write));
        let inner = Inner {
            shared,
            queue,
            next_id: AtomicU64::new(FIRST_CALL_ID),
            hello,
            max_request_frame: options.max_request_frame,
            request_timeout: options.request_timeout,
        };
        Ok(Client { inner: Arc::new(inner) })
    }

    /// The daemon's answer to `Hello`: the tenant it bound this connection to, and whether
    /// the caller may use admin operations.
    pub fn hello(&self) -> &HelloOk {
        &self.inner.hello
    }

    /// True once the connection has died; every call will then fail with
    /// [`ClientError::Closed`].
    pub fn is_closed(&self) -> bool {
        self.inner.shared.is_closed()
    }

    /// Sends any operation and waits for its reply, at most
    /// [`ClientOptions::request_timeout`]. An error status becomes
    /// [`ClientError::Status`]; batch replies still carry per-item errors.
    pub async fn call(&self, op: Op, metadata: Metadata) -> Result<Reply, ClientError> {
        bounded(self.inner.request_timeout, self.call_unbounded(op, metadata)).await
    }

    async fn call_unbounded(&self, op: Op, metadata: Metadata) -> Result<Reply, ClientError> {
        let inner = &*self.inner;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode_request(Request { id, metadata, op });
        let len = frame.len() - 4;
        if len > inner.max_request_frame {
            return Err(FrameError::TooLarge { len, max: inner.max_request_frame }.into());
        }
        let (tx, rx) = oneshot::channel();
        inner.shared.register(id, tx)?;
        let _guard = PendingGuard { shared: &inner.shared, id };
        inner.queue.send(frame).await.map_err(|_| ClientError::Closed)?;
        rx.await.unwrap_or(Err(ClientError::Closed))
    }
}

/// Waits for `fut` at most `limit`; past it, [`ClientError::TimedOut`]. A call given up on
/// leaves the table through its `PendingGuard`.
async fn bounded<T>(
    limit: Option<Duration>,
    fut: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    match limit {
        None => fut.await,
        Some(after) => tokio::time::timeout(after, fut).await.map_err(|_| ClientError::TimedOut { after })?,
    }
}

/// `Hello` goes out before the tasks start, so its answer is simply the first frame back,
/// whatever id a rejecting daemon puts on it.
const HELLO_ID: u64 = 1;
const FIRST_CALL_ID: u64 = 2;

async fn handshake(
    endpoint: &Endpoint,
    tenant: &TenantName,
    client_name: &str,
    max_frame: usize,
) -> Result<((FrameReader<ReadHalf>, WriteHalf), HelloOk), ClientError> {
    let (read, mut write) = endpoint::connect(endpoint).await?;
    let hello =
        Hello { protocol_version: PROTOCOL_VERSION, tenant: tenant.clone(), client_name: client_name.into() };
    let request = Request { id: HELLO_ID, metadata: Metadata::default(), op: Op::Hello(hello) };
    write_frame(&mut write, &pb::Request::from(request)).await?;
    // Kept for the read loop, rather than the bare stream: it may have read past the answer.
    let mut read = FrameReader::new(read, max_frame);
    let answer = read.read::<pb::Response>().await?;
    let answer = Response::try_from(answer.ok_or(ClientError::Closed)?)?;
    match answer.result? {
        Reply::Hello(ok) if answer.id == HELLO_ID && ok.tenant == *tenant => Ok(((read, write), ok)),
        Reply::Hello(ok) if answer.id == HELLO_ID => {
            Err(MalformedResponse(format!("Hello for tenant {} answered for tenant {}", tenant, ok.tenant))
                .into())
        }
        _ => Err(MalformedResponse("unexpected answer to Hello".into()).into()),
    }
}

/// Encodes a request into a zeroizing frame; `encode_request` wipes the plaintexts the
/// wire form held, and into an empty buffer it allocates the exact frame size, so the
/// frame is never reallocated and leaves no stray copies behind.
fn encode_request(request: Request) -> Zeroizing<Vec<u8>> {
    let mut frame = Zeroizing::new(Vec::new());
    kekd_proto::encode_request(request, &mut frame);
    frame
}

/// Closes the table if a task is dropped without closing it itself (its runtime shut
/// down), so callers on another runtime do not wait forever.
struct CloseOnDrop<'a>(&'a Shared);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.close(ClientError::Closed);
    }
}

async fn read_loop(shared: Arc<Shared>, mut reader: FrameReader<ReadHalf>) {
    let _guard = CloseOnDrop(&shared);
    let cause = loop {
        match reader.read::<pb::Response>().await {
            Ok(Some(msg)) => {
                let id = msg.request_id;
                // Converted before the lookup so that an unclaimed plaintext still ends
                // up in a zeroizing `Secret` when it is dropped.
                let result = match Response::try_from(msg) {
                    Ok(response) => response.result.map_err(ClientError::from),
                    Err(malformed) => Err(malformed.into()),
                };
                // A response nobody waits for belongs to a call that was abandoned.
                if let Some(waiter) = shared.take(id) {
                    let _ = waiter.send(result);
                }
            }
            Ok(None) => break ClientError::Closed,
            // Undecodable or oversized frames cannot be matched to a request, so the
            // connection is ended rather than leaving one call waiting forever.
            Err(e) => break ClientError::Frame(e),
        }
    };
    shared.close(cause);
}

/// Coalesces queued frames into few writes. The batch buffer never grows (a frame that
/// does not fit is written on its own) so no reallocation leaves plaintext behind.
async fn write_loop(shared: Arc<Shared>, mut rx: mpsc::Receiver<Zeroizing<Vec<u8>>>, mut w: WriteHalf) {
    let _guard = CloseOnDrop(&shared);
    let mut batch = Zeroizing::new(Vec::with_capacity(WRITE_BATCH_BYTES));
    let result = async {
        while let Some(mut frame) = rx.recv().await {
            loop {
                if frame.len() > batch.capacity() - batch.len() {
                    flush(&mut w, &mut batch).await?;
                }
                if frame.len() > batch.capacity() {
                    w.write_all(&frame).await?;
                } else {
                    batch.extend_from_slice(&frame);
                }
                match rx.try_recv() {
                    Ok(next) => frame = next,
                    Err(_) => break,
                }
            }
            flush(&mut w, &mut batch).await?;
        }
        w.shutdown().await
    }
    .await;
    if let Err(e) = result {
        shared.close(ClientError::Io(e));
    }
}

async fn flush(w: &mut WriteHalf, batch: &mut Vec<u8>) -> std::io::Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let written = w.write_all(batch).await;
    batch.as_mut_slice().zeroize();
    batch.clear();
    written
}
