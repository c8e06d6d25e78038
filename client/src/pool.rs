//! One shared connection per tenant, connected lazily, replaced when it breaks, with calls
//! retried across a worker restart.
//!
//! The daemon binds each connection to one tenant's worker process and restarts a worker
//! that dies within about a second. Meanwhile that tenant's connections see EOF and new
//! ones are refused with `UNAVAILABLE`. A long-lived client therefore keeps one connection
//! per tenant (pipelining makes one enough) and rides over the restart by reconnecting and
//! retrying, as far as that is safe for the operation.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kekd_proto::{Code, HelloOk, Metadata, Op, Reply, Secret, TenantName, WrapItem};

use crate::{Client, ClientError, ClientOptions, Endpoint};

/// How often and how patiently a pooled call is retried after an `UNAVAILABLE` failure.
///
/// The wait before retry `n` is `initial_backoff` doubled `n - 1` times, capped at
/// `max_backoff`, plus up to half of that again at random, so that clients which lost
/// their connections together do not come back in lockstep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries in all, the first one included; 0 counts as 1 (no retries).
    pub attempts: u32,
    /// Wait before the first retry.
    pub initial_backoff: Duration,
    /// Cap on the doubled wait (before jitter).
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    /// 6 attempts, waiting 50, 100, 200, 400 and 800 ms (plus jitter) between them: 1.55 s
    /// or more in all, longer than the supervisor takes to restart a worker.
    fn default() -> Self {
        Self { attempts: 6, initial_backoff: Duration::from_millis(50), max_backoff: Duration::from_secs(1) }
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (1 for the first retry).
    pub(crate) fn backoff(&self, retry: u32) -> Duration {
        let doublings = 2u32.saturating_pow(retry.saturating_sub(1));
        let base = self.initial_backoff.saturating_mul(doublings).min(self.max_backoff);
        // Only spreads retries out, so a per-process random hash is plenty.
        let jitter = RandomState::new().hash_one(retry) as f64 / u64::MAX as f64;
        base + base.mul_f64(jitter / 2.0)
    }
}

/// Connections to one daemon, one per tenant, shared by every clone of the pool.
///
/// [`Pool::tenant`] hands out a [`PooledClient`] for a tenant; all handles for one tenant
/// share its single pipelined connection. Nothing connects until the first call, and a
/// connection found closed is replaced by the next call that needs it. A tenant's slot is
/// kept for the life of the pool (a client serves a handful of tenants, not an open set).
/// Must be used inside a Tokio runtime.
#[derive(Debug, Clone)]
pub struct Pool {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    endpoint: Endpoint,
    client_name: String,
    options: ClientOptions,
    retry: RetryPolicy,
    slots: Mutex<HashMap<TenantName, Arc<Slot>>>,
}

/// A tenant's connection. The async mutex is held while connecting, so concurrent callers
/// wait for that one connection instead of each opening their own.
#[derive(Debug)]
struct Slot {
    tenant: TenantName,
    conn: tokio::sync::Mutex<Option<Client>>,
}

impl Pool {
    /// A pool for the daemon at `endpoint` (a socket path, or vsock); `client_name` goes
    /// into each `Hello`. Connects nothing yet.
    pub fn new(
        endpoint: impl Into<Endpoint>,
        client_name: impl Into<String>,
        options: ClientOptions,
        retry: RetryPolicy,
    ) -> Pool {
        let shared = Shared {
            endpoint: endpoint.into(),
            client_name: client_name.into(),
            options,
            retry,
            slots: Mutex::new(HashMap::new()),
        };
        Pool { shared: Arc::new(shared) }
    }

    /// The handle for one tenant's connection; cheap, and connects nothing yet.
    pub fn tenant(&self, tenant: &TenantName) -> PooledClient {
        // Every operation on the map is a single lookup or insert, so a poisoned lock
        // still guards a consistent map.
        let mut slots = self.shared.slots.lock().unwrap_or_else(|p| p.into_inner());
        let slot = slots
            .entry(tenant.clone())
            .or_insert_with(|| Arc::new(Slot { tenant: tenant.clone(), conn: Default::default() }));
        PooledClient { pool: Arc::clone(&self.shared), slot: Arc::clone(slot) }
    }
}

/// One tenant's share of a [`Pool`]: the same typed operations as [`Client`], over the
/// tenant's pooled connection, retried as [`PooledClient::call`] describes. Cloning is
/// cheap.
#[derive(Debug, Clone)]
pub struct PooledClient {
    pool: Arc<Shared>,
    slot: Arc<Slot>,
}

/// A failed attempt, and whether the daemon may have acted on the request anyway.
struct Failure {
    error: ClientError,
    in_doubt: bool,
}

impl Failure {
    /// No connection, so no request went out.
    fn unsent(error: ClientError) -> Failure {
        Failure { error, in_doubt: false }
    }
}

impl PooledClient {
    pub fn tenant(&self) -> &TenantName {
        &self.slot.tenant
    }

    /// Connects if needed (retrying as a call would) and returns the daemon's answer to
    /// `Hello`, so a caller can check early that the tenant is reachable and whether it
    /// may use admin operations.
    pub async fn hello(&self) -> Result<HelloOk, ClientError> {
        self.retry(false, || async { Ok(self.connection().await.map_err(Failure::unsent)?.hello().clone()) })
            .await
    }

    /// Sends any operation over the tenant's connection and waits for its reply, retrying
    /// what a worker restart may have broken.
    ///
    /// A failure with code `UNAVAILABLE` is retried, with [`RetryPolicy`] backoff and at
    /// most its number of attempts in all, then the last error is returned. A connection
    /// found closed is replaced first; one that is still open is kept, since the daemon
    /// closes the connections of a worker that goes away. Every other error, including a
    /// `Hello` refused with `NOT_FOUND` or `PERMISSION_DENIED`, is returned at once, and so
    /// is [`ClientError::TimedOut`]: each attempt may take the whole
    /// [`ClientOptions::request_timeout`], and retrying would multiply it.
    ///
    /// Retrying is safe for the data operations (`Generate`, `Wrap`, `Unwrap`, `Rewrap`,
    /// `Status`, `ListKeys`): they leave no persistent effect. The operations that change
    /// keys (`CreateKey`, `RotateKey`, `SetVersionState`) are retried only when the failure
    /// certainly came before the daemon acted: connecting failed, `Hello` was refused with
    /// `UNAVAILABLE`, or the daemon itself answered the request with `UNAVAILABLE`. If the
    /// connection dies while such a request is pending, the daemon may or may not have
    /// applied it, so the error is returned for the caller to check (for instance with
    /// `ListKeys`) rather than risk rotating a key twice.
    pub async fn call(&self, op: Op, metadata: Metadata) -> Result<Reply, ClientError> {
        // Each attempt consumes its request (encoding wipes the plaintexts), so it gets a
        // copy; the original is wiped when this call returns.
        self.retry(changes_state(&op), || self.attempt(copy_op(&op), metadata.clone())).await
    }

    async fn retry<T, F, Fut>(&self, changes_state: bool, mut attempt: F) -> Result<T, ClientError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let policy = &self.pool.retry;
        let mut tries = 1;
        loop {
            let failure = match attempt().await {
                Ok(value) => return Ok(value),
                Err(failure) => failure,
            };
            // A timeout spent the caller's time budget: trying again would overrun it.
            let timed_out = matches!(failure.error, ClientError::TimedOut { .. });
            let retryable = failure.error.code() == Code::Unavailable
                && !(changes_state && failure.in_doubt)
                && !timed_out;
            if !retryable || tries >= policy.attempts {
                return Err(failure.error);
            }
            tokio::time::sleep(policy.backoff(tries)).await;
            tries += 1;
        }
    }

    async fn attempt(&self, op: Op, metadata: Metadata) -> Result<Reply, Failure> {
        let conn = self.connection().await.map_err(Failure::unsent)?;
        conn.call(op, metadata).await.map_err(|error| {
            // A status is the daemon's own answer to this request; any other failure broke
            // the connection, possibly after the request was delivered.
            let in_doubt = !matches!(error, ClientError::Status(_));
            Failure { error, in_doubt }
        })
    }

    /// The tenant's open connection, connecting one if there is none.
    async fn connection(&self) -> Result<Client, ClientError> {
        let mut slot = self.slot.conn.lock().await;
        if let Some(conn) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(conn.clone());
        }
        *slot = None;
        let pool = &*self.pool;
        let conn =
            Client::connect_with(&pool.endpoint, &self.slot.tenant, &pool.client_name, pool.options.clone())
                .await?;
        Ok(slot.insert(conn).clone())
    }
}

/// Whether an operation changes persistent state, which decides how it may be retried.
/// Exhaustive, so that a new operation cannot be added without deciding.
fn changes_state(op: &Op) -> bool {
    match op {
        Op::CreateKey(_)
        | Op::RotateKey(_)
        | Op::SetVersionState { .. }
        | Op::SetKeyPolicy { .. }
        | Op::DestroyTenant { .. }
        | Op::RotateRoot { .. }
        | Op::RootImport { .. } => true,
        Op::Hello(_)
        | Op::Generate { .. }
        | Op::Wrap { .. }
        | Op::Unwrap(_)
        | Op::Rewrap(_)
        | Op::Status
        | Op::ListKeys
        | Op::RootImportKey { .. } => false,
    }
}

/// `Op` is deliberately not `Clone` (it may hold plaintexts), but a retry needs the request
/// again. The copied plaintexts are `Secret`s too, wiped when dropped.
fn copy_op(op: &Op) -> Op {
    match op {
        Op::Hello(hello) => Op::Hello(hello.clone()),
        Op::Generate { key, edek_only, contexts } => {
            Op::Generate { key: key.clone(), edek_only: *edek_only, contexts: contexts.clone() }
        }
        Op::Wrap { key, items } => Op::Wrap {
            key: key.clone(),
            items: items
                .iter()
                .map(|item| WrapItem {
                    plaintext: Secret::from_vec(item.plaintext.expose().to_vec()),
                    context: item.context.clone(),
                })
                .collect(),
        },
        Op::Unwrap(items) => Op::Unwrap(items.clone()),
        Op::Rewrap(items) => Op::Rewrap(items.clone()),
        Op::Status => Op::Status,
        Op::CreateKey(key) => Op::CreateKey(key.clone()),
        Op::RotateKey(key) => Op::RotateKey(key.clone()),
        Op::SetVersionState { key, version, state } => {
            Op::SetVersionState { key: key.clone(), version: *version, state: *state }
        }
        Op::ListKeys => Op::ListKeys,
        Op::SetKeyPolicy { key, min_decrypt_version, keep_versions } => Op::SetKeyPolicy {
            key: key.clone(),
            min_decrypt_version: *min_decrypt_version,
            keep_versions: *keep_versions,
        },
        Op::DestroyTenant { confirm } => Op::DestroyTenant { confirm: confirm.clone() },
        Op::RotateRoot { label } => Op::RotateRoot { label: label.clone() },
        Op::RootImportKey { label } => Op::RootImportKey { label: label.clone() },
        Op::RootImport { label, algorithm, wrapped } => {
            Op::RootImport { label: label.clone(), algorithm: algorithm.clone(), wrapped: wrapped.clone() }
        }
    }
}
