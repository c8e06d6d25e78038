//! A tenant's whole service: its root key, key store, KEK cache and access rules.
//!
//! Everything one tenant needs lives in one [`TenantService`], and nothing in it refers to
//! another tenant, so a tenant can run in its own process by building just its service
//! there. Requests arrive already validated (`kekd_proto::Request`); answers leave as
//! native replies, converted to the wire at the connection.

use std::collections::HashMap;
use std::sync::Arc;

use kekd_proto::{
    Code, Context, EdekItem, ErrorStatus, HelloOk, ItemOk, KeyInfo, KeyName, Metadata, Op, Reply, Request,
    Response, Secret, StatusInfo, TargetState, TenantName, VersionState, WrapItem, DEK_LEN, PROTOCOL_VERSION,
};
use zeroize::Zeroizing;

use crate::audit::{
    Access, Audit, Caller, EdekId, Entry, Item, KekFrom, Keks, KeySource, Records, RequestPart, Stamp,
    WriteError,
};
use crate::backend::{BackendError, RootKey, WrappingAlgorithm};
use crate::cache::{Kek, KekCache, LeaseState, LoadError, Source};
use crate::clock::BootInstant;
use crate::config::AuditMode;
use crate::envelope::{kek_aad, kek_aad_of, open_kek_under, seal_kek_under, Edek, Sealer};
use crate::error::Error;
use crate::handoff::Refusal;
use crate::keystore::{
    unix_now, KeyStore, RootState, SealedBy, StoredState, VersionView, AUDIT_KEY_NAME, AUDIT_KEY_VERSION,
};
use crate::secret::KeySlot;
use crate::stats::{Served, Stats};

/// A boxed future, for the recursion through a key chain.
type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// One root-key (or parent-KEK) call that unseals a KEK into its slot.
type Loader = Box<dyn FnOnce(&mut KeySlot) -> Result<(), BackendError> + Send>;

/// The key every new tenant gets, so a client can start without an admin step.
pub const DEFAULT_KEY: &str = "default";

/// Who is calling, from the kernel, never from the client's own word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "transport", rename_all = "snake_case")]
pub enum Peer {
    /// A local process: SO_PEERCRED at connect.
    Unix { uid: u32, gid: u32, pid: i32 },
    /// A virtual machine or enclave: the context id the hypervisor gives the connection,
    /// which the guest cannot choose, and the guest's port.
    Vsock { cid: u32, port: u32 },
}

/// For logs and error messages: `uid 1000 gid 1000 pid 42`, `vsock cid 5 port 1024`.
impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Unix { uid, gid, pid } => write!(f, "uid {uid} gid {gid} pid {pid}"),
            Peer::Vsock { cid, port } => write!(f, "vsock cid {cid} port {port}"),
        }
    }
}

/// What a connection may do, decided once at Hello (by the supervisor).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    User,
    Admin,
}

/// The tenant's root keys: the active one seals new KEKs; the others are opened (found by
/// label) only for records a rotation has not rewrapped yet.
struct Roots {
    active: Arc<dyn RootKey>,
    /// The active root key's label once the root was rotated; `None`: the configured one.
    active_label: Option<String>,
    /// The configured root key's label (PKCS#11 `key_label`), for records from before any
    /// rotation; `None` for a backend without labels.
    configured_label: Option<String>,
    opened: HashMap<String, Arc<dyn RootKey>>,
}

pub struct TenantService {
    tenant: TenantName,
    roots: std::sync::RwLock<Roots>,
    store: KeyStore,
    cache: KekCache,
    /// Serialises admin operations: version numbers are chosen before sealing.
    admin: tokio::sync::Mutex<()>,
    started: BootInstant,
    /// Encryptions allowed under one KEK version (DESIGN §1).
    encryption_budget: u64,
    /// Encryptions counted under each KEK version used since the start, against the budget.
    counters: tokio::sync::Mutex<HashMap<(KeyName, u32), Counter>>,
    /// Levels a key chain may have: root key, KEKs, data key.
    max_key_depth: u32,
    audit: Audit,
    /// Serialises the making and the rewrapping of the audit checkpoint key (`audit.kek`):
    /// the anchor thread may make it while a root key rotation rewraps records.
    audit_key: std::sync::Mutex<()>,
    /// The lease state last written to the audit trail, so each change is recorded once.
    lease_recorded: std::sync::Mutex<LeaseState>,
    /// What was served since the start, for `status`.
    stats: Arc<Stats>,
}

/// The status a lease past its offline grace gives every cold request.
static LEASE_EXPIRED: std::sync::LazyLock<ErrorStatus> = std::sync::LazyLock::new(|| {
    ErrorStatus::new(Code::Unavailable, "the root key is unreachable and the offline grace is over")
});

/// Default levels of a key chain: customer root, tenant KEK, service KEK, data key.
pub const DEFAULT_MAX_KEY_DEPTH: u32 = 4;

/// The default encryption budget of a KEK version: 2^30, far below the 2^32 random-nonce
/// limit of NIST SP 800-38D.
pub const DEFAULT_ENCRYPTION_BUDGET: u64 = 1 << 30;
/// The most encryptions reserved on disk at once: what a crash can waste of a budget.
const MAX_RESERVATION: u64 = 1 << 16;

/// One KEK version's encryption count: `used` in memory, `reserved` on disk ahead of it.
struct Counter {
    used: u64,
    reserved: u64,
}

impl TenantService {
    /// Builds the service over an opened backend and store, creating the `default` key
    /// for a new tenant. Blocks (root-key call); run before serving.
    pub fn new(
        tenant: TenantName,
        backend: Arc<dyn RootKey>,
        store: KeyStore,
        cache: KekCache,
        audit: Audit,
    ) -> Result<Self, Error> {
        let svc = Self {
            tenant,
            roots: std::sync::RwLock::new(Roots {
                active: backend,
                active_label: None,
                configured_label: None,
                opened: HashMap::new(),
            }),
            store,
            cache,
            admin: tokio::sync::Mutex::new(()),
            started: BootInstant::now(),
            encryption_budget: DEFAULT_ENCRYPTION_BUDGET,
            counters: tokio::sync::Mutex::new(HashMap::new()),
            max_key_depth: DEFAULT_MAX_KEY_DEPTH,
            audit,
            audit_key: std::sync::Mutex::new(()),
            lease_recorded: std::sync::Mutex::new(LeaseState::Online),
            stats: Arc::default(),
        };
        let default = KeyName::parse(DEFAULT_KEY).expect("valid name");
        if let Some(when) = svc.store.destroyed() {
            tracing::warn!(
                tenant = %svc.tenant, destroyed_unix = when,
                "tenant was destroyed: serving nothing but status; remove it from the configuration"
            );
        } else if svc.store.len() == 0 {
            let sealed = svc.seal_new_kek(&default, 1)?;
            svc.store.create_key(&default, sealed)?;
            tracing::info!(tenant = %svc.tenant, "created key \"default\" for a new tenant");
        }
        Ok(svc)
    }

    /// Sets the encryption budget of each KEK version (at least 1).
    pub fn with_encryption_budget(mut self, budget: u64) -> Self {
        self.encryption_budget = budget.max(1);
        self
    }

    /// Names the root keys: `configured` is the configuration's label, `active` the label
    /// of the root key the worker opened when the root was rotated (see
    /// [`crate::keystore::RootState`]).
    pub fn with_root_labels(self, configured: Option<String>, active: Option<String>) -> Self {
        {
            let mut roots = self.roots.write().expect("roots lock");
            roots.configured_label = configured;
            roots.active_label = active;
        }
        self
    }

    /// The root key new KEKs are sealed by.
    fn active_root(&self) -> Arc<dyn RootKey> {
        Arc::clone(&self.roots.read().expect("roots lock").active)
    }

    /// The root key that sealed a record: the active one, or another found by label.
    fn root_for(&self, label: &Option<String>) -> Result<Arc<dyn RootKey>, Error> {
        let (active, wanted) = {
            let roots = self.roots.read().expect("roots lock");
            let wanted = match label {
                Some(l) => Some(l.clone()),
                None => roots.configured_label.clone(),
            };
            if wanted == roots.active_label || (label.is_none() && roots.active_label.is_none()) {
                return Ok(Arc::clone(&roots.active));
            }
            let Some(wanted) = wanted else { return Ok(Arc::clone(&roots.active)) };
            if let Some(r) = roots.opened.get(&wanted) {
                return Ok(Arc::clone(r));
            }
            (Arc::clone(&roots.active), wanted)
        };
        let root = tokio::task::block_in_place(|| active.sibling(&wanted))?;
        self.roots.write().expect("roots lock").opened.insert(wanted, Arc::clone(&root));
        Ok(root)
    }

    /// Sets how many levels a key chain may have (root key, KEKs, data key; at least 3).
    pub fn with_max_key_depth(mut self, depth: u32) -> Self {
        self.max_key_depth = depth.max(3);
        self
    }

    pub fn tenant(&self) -> &TenantName {
        &self.tenant
    }

    pub fn hello(&self, role: Role) -> HelloOk {
        HelloOk {
            protocol_version: PROTOCOL_VERSION,
            tenant: self.tenant.clone(),
            admin: role == Role::Admin,
        }
    }

    /// Periodic upkeep: evict expired and idle KEKs, and unseal again, in the background,
    /// the KEKs in use that near `kek_ttl`, so requests do not wait for the root key.
    pub async fn sweep(&self) {
        self.cache.sweep();
        // The offline grace runs out by the clock alone.
        self.record_lease(None);
        for (key, version) in self.cache.due_for_refresh() {
            let Ok(view) = self.store.version(&key, version) else {
                self.cache.evict(&key, version);
                continue;
            };
            let load = match self.loader(&key, version, view).await {
                Ok((load, _)) => load,
                Err(e) => {
                    tracing::warn!(tenant = %self.tenant, key = %key, version, error = %e, "background KEK refresh failed");
                    continue;
                }
            };
            let res = self.cache.refresh(&key, version, load).await;
            match res {
                Ok(()) => self.record_lease(None),
                Err(LoadError::Load(e)) => {
                    // During an outage the refresh probes every second: say it once.
                    if self.root_failed(&e) {
                        tracing::warn!(tenant = %self.tenant, key = %key, version, error = %e, "background KEK refresh failed");
                    } else {
                        tracing::debug!(tenant = %self.tenant, key = %key, version, error = %e, "background KEK refresh failed");
                    }
                }
                Err(LoadError::Memory(e)) => {
                    tracing::warn!(tenant = %self.tenant, error = %e, "background KEK refresh failed")
                }
            }
        }
    }

    /// The revocation poll: a canary operation with the root key. A refusal flushes every
    /// cached KEK at once, so a revoked root key stops all service within one poll.
    pub async fn poll_root(&self) {
        let backend = self.active_root();
        let health =
            tokio::task::spawn_blocking(move || backend.canary()).await.expect("canary does not panic");
        let was_online = self.cache.lease_state() == LeaseState::Online;
        match health {
            Ok(()) => {
                self.cache.root_ok();
                if !was_online {
                    tracing::info!(tenant = %self.tenant, "the root key is reachable again");
                }
                self.record_lease(None);
            }
            Err(e) => {
                if self.root_failed(&e) {
                    tracing::warn!(tenant = %self.tenant, error = %e, "root-key check failed");
                } else {
                    tracing::debug!(tenant = %self.tenant, error = %e, "root-key check failed");
                }
            }
        }
    }

    /// What every failed root-key call teaches the cache: an outage starts the grace, a
    /// definitive refusal flushes everything (DESIGN §5). Returns whether this failure is
    /// news worth a warning: anything but an outage already known.
    fn root_failed(&self, e: &BackendError) -> bool {
        let was_online = self.cache.lease_state() == LeaseState::Online;
        match e {
            BackendError::Unreachable(_) => {
                self.cache.root_unreachable();
                self.record_lease(Some(e));
                return was_online;
            }
            BackendError::Refused(_) => {
                let n = self.cache.len();
                self.cache.flush();
                if n > 0 {
                    tracing::error!(tenant = %self.tenant, flushed = n, "the root key refused: cached KEKs flushed");
                    let error = crate::error::backend_status(e);
                    let detail = serde_json::json!({ "lease": "revoked", "flushed_keks": n });
                    self.audit.event(Records::event(self.tenant.as_str(), "lease", Err(&error), detail));
                }
            }
            _ => {}
        }
        true
    }

    /// Writes a lease change (online, grace, expired) to the audit trail, once per change.
    fn record_lease(&self, cause: Option<&BackendError>) {
        let now = self.cache.lease_state();
        let mut recorded = self.lease_recorded.lock().expect("lease lock");
        if *recorded == now {
            return;
        }
        *recorded = now;
        drop(recorded);
        let name = match now {
            LeaseState::Online => "online",
            LeaseState::Grace => "grace",
            LeaseState::Expired => "expired",
        };
        let error = cause.map(crate::error::backend_status);
        let outcome = match (&error, now) {
            (_, LeaseState::Online) => Ok(()),
            (Some(e), _) => Err(e),
            (None, _) => Err(&*LEASE_EXPIRED),
        };
        let detail = serde_json::json!({ "lease": name });
        self.audit.event(Records::event(self.tenant.as_str(), "lease", outcome, detail));
    }

    /// Wipes every cached KEK (shutdown).
    pub fn flush(&self) {
        self.cache.flush();
    }

    /// Serves one request and writes its audit record (its items inside); `deliver`
    /// gets the answer once they are written, on whichever task wrote them. In
    /// `fail_closed` mode an answer whose records could not be written becomes
    /// UNAVAILABLE, and the key material in it is wiped unsent.
    pub async fn handle_then(
        &self,
        caller: &Caller,
        req: Request,
        deliver: impl FnOnce(Response) + Send + 'static,
    ) {
        let id = req.id;
        let served = Served::of(&req.op);
        if cfg!(feature = "bench-no-audit") {
            let (result, _) = self.dispatch(caller, req.op).await;
            self.stats.served(served, &result);
            return deliver(Response { id, result });
        }
        let time = Stamp::now();
        let event = req.op.name();
        let shared = RequestPart::new(Some(caller), Some(id), Some(&req.metadata));
        let (result, audited) = self.dispatch(caller, req.op).await;
        if let Err(e) = &result {
            limited_debug!(tenant = %self.tenant, op = event, peer = %caller.peer, code = e.code.as_str_name(), "request failed");
        }
        let records = self.records(&time, event, &result, audited, &shared);
        let fail_closed = self.audit.mode() == AuditMode::FailClosed;
        let tenant = self.tenant.clone();
        let stats = Arc::clone(&self.stats);
        // Counted as answered: a withheld answer is the UNAVAILABLE the client gets.
        let then: crate::audit::Then = Box::new(move |written| match written {
            // A tenant past its daily audit budget is not served, whatever the mode: the
            // budget is what keeps it from filling the disk.
            Err(WriteError::DailyCap { cap, .. }) => {
                limited_debug!(%tenant, op = event, "answer withheld: the tenant reached audit.max_bytes_per_day");
                drop(result);
                let result = Err(Error::AuditDailyCap(cap).status());
                stats.served(served, &result);
                deliver(Response { id, result })
            }
            Err(e) if fail_closed => {
                limited_debug!(%tenant, op = event, error = %e, "answer withheld: its audit record was not written");
                drop(result);
                let result = Err(Error::AuditUnavailable.status());
                stats.served(served, &result);
                deliver(Response { id, result })
            }
            _ => {
                stats.served(served, &result);
                deliver(Response { id, result })
            }
        });
        self.audit.commit_then(records, then).await;
    }

    /// [`Self::handle_then`], waiting for the answer.
    #[cfg(test)]
    pub async fn handle(&self, caller: &Caller, req: Request) -> Response {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.handle_then(caller, req, move |resp| {
            let _ = tx.send(resp);
        })
        .await;
        rx.await.expect("every request is answered, by its writer if not by itself")
    }

    /// Records a request that was refused before it could be served: a frame that does not
    /// parse, or a Hello the supervisor turned away.
    pub async fn audit_refusal(
        &self,
        caller: &Caller,
        event: &str,
        meta: Option<&Metadata>,
        resp: &Response,
    ) {
        if let Err(e) = &resp.result {
            self.stats.refused(e.code);
        }
        let shared = RequestPart::new(Some(caller), Some(resp.id), meta);
        let outcome = resp.result.as_ref().map(|_| ());
        let access = Access::default();
        let it = Item { access: &access, outcome, detail: None };
        let record = Records::one(&Stamp::now(), self.tenant.as_str(), event, it, &shared);
        // Nothing is withheld: the answer is an error either way.
        let _ = self.audit.commit(record).await;
    }

    /// Records Hellos for this tenant that the supervisor's ACL turned away: one record for
    /// `r.count` of them, folded by the supervisor so that a caller looping on a refused
    /// Hello cannot flood this trail (docs/FORMATS.md §5, `count`).
    pub async fn audit_supervisor_refusal(&self, r: Refusal) {
        let shared = RequestPart::refused(&r.peer, r.exe.as_deref(), r.hello_id, r.count);
        let code = Code::from_str_name(&r.code).unwrap_or(Code::PermissionDenied);
        self.stats.refused_many(code, r.count);
        let error = ErrorStatus::new(code, r.message);
        let access = Access::default();
        let it = Item { access: &access, outcome: Err(&error), detail: None };
        let record = Records::one(&Stamp::now(), self.tenant.as_str(), "hello", it, &shared);
        let _ = self.audit.commit(record).await;
    }

    /// Records a connection the supervisor handed over (its Hello was accepted).
    pub async fn audit_hello(&self, caller: &Caller, hello_id: u64) {
        let resp = Response { id: hello_id, result: Ok(Reply::Hello(self.hello(caller.role))) };
        self.audit_refusal(caller, "hello", None, &resp).await;
    }

    /// Anchors the audit trail in the root key from now on: the trail was opened before the
    /// root key, and checkpoints take their key from this service ([`KeySource`]).
    pub fn anchor_audit(self: &Arc<Self>) {
        let source: std::sync::Weak<dyn KeySource> = Arc::downgrade(self) as std::sync::Weak<Self>;
        self.audit.anchor_with(source);
    }

    /// Writes what is queued in the audit trail and stops its writer (shutdown).
    pub async fn close_audit(&self) {
        self.audit.close().await;
    }

    /// The audit record of a request: with its items (each named by its EDEK) for the
    /// operations on data keys, a record of one thing for anything else.
    fn records(
        &self,
        time: &Stamp,
        event: &str,
        result: &Result<Reply, ErrorStatus>,
        audited: Audited,
        shared: &RequestPart,
    ) -> Records {
        let tenant = self.tenant.as_str();
        let request = |outcome, target, keks, n| {
            Records::request(time, tenant, event, shared, outcome, target, keks, n)
        };
        match (result, audited) {
            (Ok(Reply::Batch(items)), Audited::Items(accesses)) => {
                let mut r = request(Ok(()), None, Keks::count(&accesses), items.len());
                for (res, access) in items.iter().zip(accesses.iter()) {
                    let made = res.as_ref().ok().and_then(|ok| ok.edek.as_deref()).and_then(EdekId::of);
                    r.push(Entry { access, outcome: res.as_ref().map(|_| ()), made });
                }
                r.finish()
            }
            // Refused as a whole: each EDEK it presented is still named, with the refusal.
            (Err(e), Audited::Items(accesses)) => {
                let mut r = request(Err(e), None, Keks::default(), accesses.len());
                for access in &accesses {
                    r.push(Entry { access, outcome: Err(e), made: None });
                }
                r.finish()
            }
            (result, audited) => {
                let (access, detail) = match audited {
                    Audited::Whole(a, d) => (a, d),
                    Audited::Items(_) => (Access::default(), None),
                };
                let outcome = result.as_ref().map(|_| ());
                if has_items(event) {
                    // Failed before it had items (an unknown key, a budget): none to name.
                    return request(outcome, Some(&access), Keks::count([&access]), 0).finish();
                }
                let it = Item { access: &access, outcome, detail: detail.as_ref() };
                Records::one(time, tenant, event, it, shared)
            }
        }
    }

    async fn dispatch(&self, caller: &Caller, op: Op) -> (Result<Reply, ErrorStatus>, Audited) {
        let whole = |key: Option<&KeyName>, detail: Option<serde_json::Value>| {
            Audited::Whole(Access { key: key.cloned(), ..Access::default() }, detail)
        };
        let target = match &op {
            Op::Generate { key, .. } | Op::Wrap { key, .. } | Op::CreateKey(key) | Op::RotateKey(key) => {
                whole(Some(key), None)
            }
            Op::SetVersionState { key, version, state } => Audited::Whole(
                Access { key: Some(key.clone()), version: Some(*version), ..Access::default() },
                Some(serde_json::json!({ "state": format!("{state:?}") })),
            ),
            Op::SetKeyPolicy { key, min_decrypt_version, keep_versions } => whole(
                Some(key),
                Some(serde_json::json!({
                    "min_decrypt_version": min_decrypt_version, "keep_versions": keep_versions,
                })),
            ),
            Op::RotateRoot { label } => whole(None, Some(serde_json::json!({ "label": label }))),
            Op::RootImportKey { label } => whole(None, Some(serde_json::json!({ "label": label }))),
            Op::RootImport { label, algorithm, .. } => {
                whole(None, Some(serde_json::json!({ "label": label, "algorithm": algorithm })))
            }
            _ => whole(None, None),
        };
        if op.is_admin() && caller.role != Role::Admin {
            let e = Error::NotAdmin { tenant: self.tenant.to_string(), peer: caller.peer.to_string() };
            return (Err(e.status()), presented(&op).unwrap_or(target));
        }
        if self.store.destroyed().is_some() && !matches!(op, Op::Status) {
            let e = Error::TenantDestroyed(self.tenant.to_string());
            return (Err(e.status()), presented(&op).unwrap_or(target));
        }
        let status = |r: Result<KeyInfo, Error>| r.map(Reply::Key).map_err(|e| e.status());
        let result = match op {
            Op::Hello(_) => {
                Err(ErrorStatus::new(Code::InvalidArgument, "hello was already sent on this connection"))
            }
            Op::Generate { key, edek_only, contexts } => {
                return self.generate(&key, edek_only, contexts).await
            }
            Op::Wrap { key, items } => return self.wrap(&key, items).await,
            Op::Unwrap(items) => return self.unwrap_batch(items).await,
            Op::Rewrap(items) => return self.rewrap_batch(items).await,
            Op::Status => Ok(Reply::Status(self.status(caller.role).await)),
            Op::CreateKey(key) => status(self.create_key(&key).await),
            Op::RotateKey(key) => status(self.rotate_key(&key).await),
            Op::SetVersionState { key, version, state } => status(self.set_state(&key, version, state).await),
            Op::ListKeys => Ok(Reply::Keys(self.store.list())),
            Op::SetKeyPolicy { key, min_decrypt_version, keep_versions } => {
                status(self.set_policy(&key, min_decrypt_version, keep_versions).await)
            }
            Op::DestroyTenant { confirm } => self.destroy_tenant(&confirm).await.map_err(|e| e.status()),
            Op::RotateRoot { label } => self.rotate_root(label).await.map_err(|e| e.status()),
            Op::RootImportKey { label } => self.root_import_key(&label).await.map_err(|e| e.status()),
            Op::RootImport { label, algorithm, wrapped } => {
                self.root_import(label, &algorithm, &wrapped).await.map_err(|e| e.status())
            }
        };
        // A new key or version: the record names the version it made.
        let target = match (target, &result) {
            (Audited::Whole(mut a, d), Ok(Reply::Key(info))) if a.version.is_none() => {
                a.version = Some(info.active_version);
                Audited::Whole(a, d)
            }
            (Audited::Whole(a, _), Ok(Reply::RootRotated { active, rewrapped })) => {
                Audited::Whole(a, Some(serde_json::json!({ "label": active, "rewrapped": rewrapped })))
            }
            (t, _) => t,
        };
        (result, target)
    }

    async fn generate(
        &self,
        key: &KeyName,
        edek_only: bool,
        contexts: Vec<Context>,
    ) -> (Result<Reply, ErrorStatus>, Audited) {
        let (sealer, from) = match self.reserve_sealer(key, contexts.len() as u64).await {
            Ok(s) => s,
            Err((e, access)) => return (Err(e.status()), Audited::Whole(access, None)),
        };
        let items = contexts
            .iter()
            .map(|ctx| {
                let mut dek = Zeroizing::new(vec![0u8; DEK_LEN]);
                aws_lc_rs::rand::fill(&mut dek).expect("the system RNG does not fail");
                let edek = sealer.seal(&dek, ctx);
                Ok(ItemOk {
                    plaintext: (!edek_only).then(|| Secret::new(dek)),
                    edek: Some(edek),
                    key: key.clone(),
                    version: sealer.version(),
                })
            })
            .collect();
        (Ok(Reply::Batch(items)), Audited::Items(batch_accesses(key, sealer.version(), from, contexts.len())))
    }

    async fn wrap(&self, key: &KeyName, items: Vec<WrapItem>) -> (Result<Reply, ErrorStatus>, Audited) {
        let (sealer, from) = match self.reserve_sealer(key, items.len() as u64).await {
            Ok(s) => s,
            Err((e, access)) => return (Err(e.status()), Audited::Whole(access, None)),
        };
        let out = items
            .iter()
            .map(|it| {
                Ok(ItemOk {
                    plaintext: None,
                    edek: Some(sealer.seal(it.plaintext.expose(), &it.context)),
                    key: key.clone(),
                    version: sealer.version(),
                })
            })
            .collect();
        (Ok(Reply::Batch(out)), Audited::Items(batch_accesses(key, sealer.version(), from, items.len())))
    }

    /// Counts `n` encryptions against the active version of `key` and gets its sealer.
    async fn reserve_sealer(&self, key: &KeyName, n: u64) -> Result<(Sealer<'_>, KekFrom), (Error, Access)> {
        let no_version = |e| (e, Access { key: Some(key.clone()), ..Access::default() });
        let version = self.reserve(key, n).await.map_err(no_version)?;
        self.sealer(key, version).await.map_err(|e| (e, Access::of(key, version, None)))
    }

    async fn unwrap_batch(&self, items: Vec<EdekItem>) -> (Result<Reply, ErrorStatus>, Audited) {
        let mut sealers = SealerSet::default();
        let mut out = Vec::with_capacity(items.len());
        let mut accesses = Vec::with_capacity(items.len());
        for it in &items {
            let (res, access) = self.open(&mut sealers, it).await;
            out.push(res.map(|(pt, key, version)| ItemOk { plaintext: Some(pt), edek: None, key, version }));
            accesses.push(access);
        }
        (Ok(Reply::Batch(out)), Audited::Items(accesses))
    }

    /// Decrypts each EDEK and seals it again under its key's active version; the plaintext
    /// never leaves this function. The record names the version the item was sealed to.
    async fn rewrap_batch(&self, items: Vec<EdekItem>) -> (Result<Reply, ErrorStatus>, Audited) {
        let mut sealers = SealerSet::default();
        let mut active = SealerSet::default();
        let mut out = Vec::with_capacity(items.len());
        let mut accesses = Vec::with_capacity(items.len());
        for it in &items {
            let (opened, mut access) = self.open(&mut sealers, it).await;
            let res = match opened {
                Err(e) => Err(e),
                Ok((pt, key, _)) => match self.reserve(&key, 1).await {
                    Err(e) => Err(e.status()),
                    Ok(version) => {
                        let (sealer, from) = active.get(self, &key, version).await;
                        access.from_version = access.version.replace(version);
                        access.kek = worse(access.kek, from);
                        sealer.map(|s| ItemOk {
                            plaintext: None,
                            edek: Some(s.seal(pt.expose(), &it.context)),
                            key,
                            version,
                        })
                    }
                },
            };
            out.push(res);
            accesses.push(access);
        }
        (Ok(Reply::Batch(out)), Audited::Items(accesses))
    }

    /// Parses and opens one EDEK, reusing sealers across a batch.
    async fn open<'s>(
        &'s self,
        sealers: &mut SealerSet<'s>,
        it: &EdekItem,
    ) -> (Result<(Secret, KeyName, u32), ErrorStatus>, Access) {
        let opened = EdekId::of(&it.edek);
        let Ok(edek) = Edek::parse(&it.edek) else {
            return (Err(Error::DataInvalid.status()), Access { opened, ..Access::default() });
        };
        let (sealer, from) = sealers.get(self, &edek.key, edek.version).await;
        let access = Access { opened, ..Access::of(&edek.key, edek.version, from) };
        let res = match sealer {
            Ok(s) => s
                .open(&edek, &it.context)
                .map(|pt| (pt, edek.key.clone(), edek.version))
                .map_err(|_| Error::DataInvalid.status()),
            Err(e) => Err(e),
        };
        (res, access)
    }

    /// Counts `n` encryptions against the active version of `key` and returns that
    /// version. The count is reserved on disk ahead of use; when the budget of the active
    /// version cannot take `n` more, the key is rotated first.
    async fn reserve(&self, key: &KeyName, n: u64) -> Result<u32, Error> {
        let budget = self.encryption_budget;
        if n > budget {
            return Err(Error::OverBudget { n, budget });
        }
        let mut counters = self.counters.lock().await;
        loop {
            let version = self.store.active_version(key)?;
            let id = (key.clone(), version);
            if !counters.contains_key(&id) {
                // After a restart every reservation counts as used: never under-count.
                let reserved = self.store.reserved(key, version)?;
                counters.insert(id.clone(), Counter { used: reserved, reserved });
            }
            let c = counters.get_mut(&id).expect("inserted above");
            if c.used + n <= budget {
                if c.used + n > c.reserved {
                    let step = (budget / 16).clamp(1, MAX_RESERVATION);
                    let upto = (c.used + n).max(c.reserved + step).min(budget);
                    tokio::task::block_in_place(|| self.store.reserve(key, version, upto))?;
                    c.reserved = upto;
                }
                c.used += n;
                return Ok(version);
            }
            counters.remove(&id);
            self.rotate_over_budget(key, version).await?;
        }
    }

    /// Rotates `key` because `version` spent its encryption budget, unless an admin rotated
    /// it meanwhile.
    async fn rotate_over_budget(&self, key: &KeyName, version: u32) -> Result<(), Error> {
        let _admin = self.admin.lock().await;
        if self.store.active_version(key)? != version {
            return Ok(());
        }
        let next = self.store.next_version(key);
        let (sealed, by) = self.seal_new(key, next).await?;
        tokio::task::block_in_place(|| self.store.add_version_under(key, next, sealed, by))?;
        self.prune(key)?;
        limited_info!(
            tenant = %self.tenant, key = %key, version, next,
            budget = self.encryption_budget,
            "encryption budget of the active version reached: rotated"
        );
        Ok(())
    }

    /// A sealer for one version, its KEK from the cache, the root key, or its parent KEK.
    async fn sealer(&self, key: &KeyName, version: u32) -> Result<(Sealer<'_>, KekFrom), Error> {
        let (kek, from) = self.usable_kek(key, version).await?;
        Ok((Sealer::new(kek.bytes(), &self.tenant, key.clone(), version), from))
    }

    /// The KEK of one version, once the checks that make a version usable have passed: its
    /// state and the key's `min_decrypt_version` and, in a key chain, the same for every
    /// ancestor, so that disabling or destroying a parent makes its whole subtree unusable.
    fn usable_kek<'a>(
        &'a self,
        key: &'a KeyName,
        version: u32,
    ) -> BoxFuture<'a, Result<(Kek, KekFrom), Error>> {
        Box::pin(async move {
            let view = self.store.version(key, version)?;
            if version < view.min_decrypt_version {
                return Err(Error::BelowMinDecrypt {
                    key: key.clone(),
                    version,
                    min: view.min_decrypt_version,
                });
            }
            match view.state {
                VersionState::Disabled => return Err(Error::VersionDisabled { key: key.clone(), version }),
                VersionState::Destroyed => return Err(Error::DataInvalid),
                VersionState::Active | VersionState::DecryptOnly => {}
            }
            let (load, from) = self.loader(key, version, view).await?;
            self.kek(key, version, load, from).await
        })
    }

    /// How to unseal one version: with the root key, or in software with its parent KEK
    /// (which is fetched, and checked, first).
    async fn loader(
        &self,
        key: &KeyName,
        version: u32,
        view: VersionView,
    ) -> Result<(Loader, KekFrom), Error> {
        let aad = kek_aad(&self.tenant, key, version);
        let sealed = view.sealed;
        match view.by {
            SealedBy::Root(label) => {
                let backend = self.root_for(&label)?;
                let load: Loader =
                    Box::new(move |slot: &mut KeySlot| backend.unseal(&aad, &sealed, slot.bytes_mut()));
                Ok((load, KekFrom::Root))
            }
            SealedBy::Parent(parent, pv) => {
                let (pk, _) = self.usable_kek(&parent, pv).await.map_err(|e| match e {
                    Error::Store(_) | Error::DataInvalid => Error::ParentUnusable {
                        key: key.clone(),
                        version,
                        why: format!("version {pv} of its parent key \"{parent}\" was destroyed"),
                    },
                    Error::VersionDisabled { .. }
                    | Error::BelowMinDecrypt { .. }
                    | Error::ParentUnusable { .. } => {
                        Error::ParentUnusable { key: key.clone(), version, why: e.to_string() }
                    }
                    other => other,
                })?;
                let load: Loader = Box::new(move |slot: &mut KeySlot| {
                    open_kek_under(pk.bytes(), &aad, &sealed, slot.bytes_mut())
                        .map_err(|_| BackendError::DataInvalid)
                });
                Ok((load, KekFrom::Parent))
            }
        }
    }

    async fn kek(
        &self,
        key: &KeyName,
        version: u32,
        load: Loader,
        loads_from: KekFrom,
    ) -> Result<(Kek, KekFrom), Error> {
        let res = self.cache.get(key, version, load).await;
        match res {
            Ok((kek, source)) => {
                let from = match source {
                    Source::Root => {
                        limited_debug!(tenant = %self.tenant, key = %key, version, "unsealed KEK");
                        // A root-key call that worked ends an outage.
                        self.record_lease(None);
                        loads_from
                    }
                    Source::Grace => {
                        limited_debug!(tenant = %self.tenant, key = %key, version, "root key unreachable: KEK served in its offline grace");
                        KekFrom::Grace
                    }
                    Source::Cache => KekFrom::Cache,
                };
                Ok((kek, from))
            }
            Err(LoadError::Memory(e)) => Err(e.into()),
            Err(LoadError::Load(BackendError::DataInvalid)) => {
                limited_error!(tenant = %self.tenant, key = %key, version, "KEK record does not unseal under the root key");
                Err(Error::KekRecordInvalid { key: key.clone(), version })
            }
            Err(LoadError::Load(e)) => {
                // A definitive refusal from the root key: nothing cached may outlive it. An
                // outage already known is not logged again for every request.
                if self.root_failed(&e) {
                    limited_warn!(tenant = %self.tenant, error = %e, "root-key unseal failed");
                } else {
                    limited_debug!(tenant = %self.tenant, error = %e, "root-key unseal failed");
                }
                Err(e.into())
            }
        }
    }

    /// The tenant's health and what it served; its keys and their versions only for an
    /// admin, who may list them anyway.
    async fn status(&self, role: Role) -> StatusInfo {
        let backend = self.active_root();
        let describe = backend.describe();
        let root_key_exceptions = backend.exceptions();
        let health =
            tokio::task::spawn_blocking(move || backend.canary()).await.expect("canary does not panic");
        match &health {
            Ok(()) => {
                self.cache.root_ok();
                self.record_lease(None);
            }
            Err(e) => {
                self.root_failed(e);
            }
        }
        StatusInfo {
            tenant: self.tenant.clone(),
            backend: describe,
            backend_healthy: health.is_ok(),
            backend_error: health.err().map(|e| e.to_string()).unwrap_or_default(),
            cached_keks: self.cache.len() as u32,
            keys: self.store.len() as u32,
            uptime_seconds: BootInstant::now().since(self.started).as_secs(),
            memory_locked: self.cache.memory_locked(),
            worker_pid: std::process::id(),
            root_key_exceptions,
            lease: match self.cache.lease_state() {
                LeaseState::Online => "online",
                LeaseState::Grace => "grace",
                LeaseState::Expired => "expired",
            }
            .to_owned(),
            key_versions: if role == Role::Admin { self.store.list() } else { Vec::new() },
            operations: self.stats.operations(),
            errors: self.stats.errors(),
        }
    }

    /// Generates a KEK in locked memory and seals it for `(key, version)`.
    fn seal_new_kek(&self, key: &KeyName, version: u32) -> Result<Vec<u8>, Error> {
        let kek = self.new_kek()?;
        Ok(self.active_root().seal(&kek_aad(&self.tenant, key, version), kek.bytes())?)
    }

    /// A fresh random KEK in a slot of the locked arena (wiped when dropped), never on the
    /// stack.
    fn new_kek(&self) -> Result<KeySlot, Error> {
        let mut kek = self.cache.scratch()?;
        aws_lc_rs::rand::fill(kek.bytes_mut()).expect("the system RNG does not fail");
        Ok(kek)
    }

    /// Generates and seals a new KEK for `(key, version)`: under the active version of its
    /// parent key when there is one (`billing` for `billing/invoices`), else under the
    /// root key. Returns the sealed bytes and the parent version used.
    ///
    /// Admin operations are rare and hold the admin lock across their root-key call and
    /// fsyncs; block_in_place keeps them off the async workers without moving `self`
    /// into a 'static task. Needs the multi-threaded runtime.
    async fn seal_new(&self, key: &KeyName, version: u32) -> Result<(Vec<u8>, SealedBy), Error> {
        let level = self.level(key);
        if level > self.max_key_depth {
            return Err(Error::TooDeep { key: key.clone(), level, max: self.max_key_depth });
        }
        let Some(parent) = self.parent_of(key) else {
            let label = self.roots.read().expect("roots lock").active_label.clone();
            return Ok((
                tokio::task::block_in_place(|| self.seal_new_kek(key, version))?,
                SealedBy::Root(label),
            ));
        };
        let pv = self.store.active_version(&parent)?;
        let (pk, _) = self.usable_kek(&parent, pv).await?;
        let kek = self.new_kek()?;
        let sealed = seal_kek_under(pk.bytes(), &kek_aad(&self.tenant, key, version), kek.bytes());
        Ok((sealed, SealedBy::Parent(parent, pv)))
    }

    /// The parent of `a/b` is `a`, when such a key exists.
    fn parent_of(&self, key: &KeyName) -> Option<KeyName> {
        let (prefix, _) = key.as_str().rsplit_once('/')?;
        let parent = KeyName::parse(prefix).ok()?;
        self.store.exists(&parent).then_some(parent)
    }

    /// The level of a key's data keys in the hierarchy: root key (1), then one per KEK on
    /// the chain, then the data key. A key sealed by the root key gives level 3.
    fn level(&self, key: &KeyName) -> u32 {
        let mut level = 3;
        let mut k = key.clone();
        while let Some(p) = self.parent_of(&k) {
            level += 1;
            k = p;
        }
        level
    }

    async fn create_key(&self, key: &KeyName) -> Result<KeyInfo, Error> {
        let _admin = self.admin.lock().await;
        if self.store.exists(key) {
            return Err(crate::keystore::StoreError::KeyExists(key.clone()).into());
        }
        let (sealed, by) = self.seal_new(key, 1).await?;
        let under = match &by {
            SealedBy::Parent(p, v) => Some(format!("{p} v{v}")),
            SealedBy::Root(_) => None,
        };
        let info = tokio::task::block_in_place(|| self.store.create_key_under(key, sealed, by))?;
        limited_info!(tenant = %self.tenant, key = %key, parent = ?under, "created key");
        Ok(info)
    }

    async fn rotate_key(&self, key: &KeyName) -> Result<KeyInfo, Error> {
        let _admin = self.admin.lock().await;
        if !self.store.exists(key) {
            return Err(crate::keystore::StoreError::NoSuchKey(key.clone()).into());
        }
        let version = self.store.next_version(key);
        let (sealed, by) = self.seal_new(key, version).await?;
        tokio::task::block_in_place(|| self.store.add_version_under(key, version, sealed, by))?;
        limited_info!(tenant = %self.tenant, key = %key, version, "rotated key");
        self.prune(key)?;
        Ok(self.store.info(key)?)
    }

    /// Applies `keep_versions` after a rotation or a policy change. Admin lock held.
    fn prune(&self, key: &KeyName) -> Result<(), Error> {
        let destroyed = tokio::task::block_in_place(|| self.store.prune(key))?;
        for &v in &destroyed {
            self.cache.evict(key, v);
        }
        if !destroyed.is_empty() {
            limited_info!(tenant = %self.tenant, key = %key, versions = ?destroyed, "keep_versions: destroyed old versions");
        }
        Ok(())
    }

    async fn set_policy(&self, key: &KeyName, min: Option<u32>, keep: Option<u32>) -> Result<KeyInfo, Error> {
        let _admin = self.admin.lock().await;
        tokio::task::block_in_place(|| self.store.set_policy(key, min, keep))?;
        limited_info!(tenant = %self.tenant, key = %key, min_decrypt_version = ?min, keep_versions = ?keep, "changed key policy");
        self.prune(key)?;
        Ok(self.store.info(key)?)
    }

    /// Root key rotation: creates (or adopts) the root key `label`, makes it active, and
    /// rewraps every KEK record sealed by another root key under it, one record at a time,
    /// each atomically. The new state is written first, so new KEKs are sealed by the new
    /// root key at once and a crash at any point leaves every record sealed by one root
    /// key or the other, both still on the token: [`TenantService::resume_root_rotation`]
    /// finishes the job at the next start.
    async fn rotate_root(&self, label: Option<String>) -> Result<Reply, Error> {
        let _admin = self.admin.lock().await;
        let (active, active_label, configured) = {
            let r = self.roots.read().expect("roots lock");
            (Arc::clone(&r.active), r.active_label.clone(), r.configured_label.clone())
        };
        let current = active_label.clone().or(configured.clone());
        let label = label.unwrap_or_else(|| {
            let base = current.clone().unwrap_or_else(|| "kekd-root".into());
            let base = base.split("~r").next().unwrap_or(&base).to_owned();
            format!("{base}~r{}", unix_now())
        });
        if Some(&label) == current.as_ref() {
            return Err(crate::keystore::StoreError::Precondition(format!(
                "root key {label:?} is already the active root key"
            ))
            .into());
        }
        let new = tokio::task::block_in_place(|| active.sibling(&label))?;
        let mut previous = read_previous(&self.store)?;
        if let Some(c) = current {
            if !previous.contains(&c) {
                previous.push(c.clone());
            }
            self.roots.write().expect("roots lock").opened.insert(c, Arc::clone(&active));
        }
        // Back to an earlier key: it is the active one again, never one that may be deleted.
        previous.retain(|p| p != &label);
        let mut state = RootState { format: 1, active: label.clone(), previous, rotating: true };
        tokio::task::block_in_place(|| self.store.set_root_state(&state, new.describe()))?;
        {
            let mut r = self.roots.write().expect("roots lock");
            r.active = Arc::clone(&new);
            r.active_label = Some(label.clone());
        }
        limited_info!(tenant = %self.tenant, root = %label, "root key rotation started");
        let rewrapped = self.rewrap_under(&label, &new).await?;
        state.rotating = false;
        tokio::task::block_in_place(|| self.store.set_root_state(&state, new.describe()))?;
        limited_info!(tenant = %self.tenant, root = %label, rewrapped, "root key rotation complete: earlier root keys are no longer needed");
        Ok(Reply::RootRotated { active: label, rewrapped })
    }

    /// BYOK step 1: the transport public key the token holds for a root key to be imported
    /// as `label`, generated there on first use.
    async fn root_import_key(&self, label: &str) -> Result<Reply, Error> {
        let _admin = self.admin.lock().await;
        let root = self.active_root();
        let t = tokio::task::block_in_place(|| root.transport_key(label))?;
        limited_info!(tenant = %self.tenant, root = %label, transport = %t.label, created = t.created, sha256 = %t.sha256, "transport key handed out");
        Ok(Reply::TransportKey {
            label: t.label,
            pem: t.pem,
            sha256: t.sha256,
            bits: t.bits as u32,
            algorithms: t.algorithms.iter().map(|a| a.name().to_owned()).collect(),
        })
    }

    /// BYOK step 2: the customer's key material, wrapped to `label`'s transport key,
    /// becomes the root key `label` in the token, and the tenant's root key rotates to it.
    async fn root_import(&self, label: String, algorithm: &str, wrapped: &[u8]) -> Result<Reply, Error> {
        let algorithm: WrappingAlgorithm =
            algorithm.parse().map_err(|e: crate::backend::pkcs11::import::UnknownAlgorithm| {
                Error::BadRequest(e.to_string())
            })?;
        {
            let _admin = self.admin.lock().await;
            let root = self.active_root();
            tokio::task::block_in_place(|| root.import_root_key(&label, algorithm, wrapped))?;
            limited_info!(tenant = %self.tenant, root = %label, %algorithm, "imported a root key");
        }
        self.rotate_root(Some(label)).await
    }

    /// Finishes a root key rotation a crash cut short. Run once at start, beside serving.
    pub async fn resume_root_rotation(&self) -> Result<(), Error> {
        let _admin = self.admin.lock().await;
        let Some(mut state) = crate::keystore::read_root_state_of(&self.store)? else { return Ok(()) };
        if !state.rotating {
            return Ok(());
        }
        let new = self.active_root();
        tracing::info!(tenant = %self.tenant, root = %state.active, "resuming a root key rotation");
        let rewrapped = self.rewrap_under(&state.active, &new).await?;
        state.rotating = false;
        tokio::task::block_in_place(|| self.store.set_root_state(&state, new.describe()))?;
        tracing::info!(tenant = %self.tenant, root = %state.active, rewrapped, "root key rotation complete");
        Ok(())
    }

    /// Rewraps, under the root key `label`, every record another root key sealed. The KEK
    /// passes through locked memory only.
    async fn rewrap_under(&self, label: &str, new: &Arc<dyn RootKey>) -> Result<u32, Error> {
        let mut n = 0;
        for (key, version, by) in self.store.sealed_by_other_roots(label) {
            let old = self.root_for(&by)?;
            let view = self.store.version(&key, version)?;
            let aad = kek_aad(&self.tenant, &key, version);
            let mut slot = self.cache.scratch()?;
            let sealed = tokio::task::block_in_place(|| {
                old.unseal(&aad, &view.sealed, slot.bytes_mut())?;
                new.seal(&aad, slot.bytes())
            })?;
            tokio::task::block_in_place(|| self.store.rewrap_root(&key, version, sealed, label))?;
            n += 1;
        }
        // And the audit checkpoint key, so that old checkpoints stay verifiable once the old
        // root keys are gone (not counted: it seals no data).
        if tokio::task::block_in_place(|| self.rewrap_audit_key(label, new))? {
            limited_info!(tenant = %self.tenant, root = %label, "audit checkpoint key rewrapped");
        }
        Ok(n)
    }

    /// Rewraps the audit checkpoint key under the root key `label` if another sealed it;
    /// whether it did. Blocks.
    fn rewrap_audit_key(&self, label: &str, new: &Arc<dyn RootKey>) -> Result<bool, Error> {
        let _writing = self.audit_key.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(record) = self.store.audit_key()? else { return Ok(false) };
        if record.root_key.as_deref() == Some(label) {
            return Ok(false);
        }
        let old = self.root_for(&record.root_key)?;
        let aad = kek_aad_of(&self.tenant, AUDIT_KEY_NAME, AUDIT_KEY_VERSION);
        let mut slot = self.cache.scratch()?;
        old.unseal(&aad, &record.sealed, slot.bytes_mut())?;
        let sealed = new.seal(&aad, slot.bytes())?;
        self.store.write_audit_key(&sealed, Some(label.to_owned()))?;
        Ok(true)
    }

    /// Crypto-shreds every key of the tenant and stops serving it.
    async fn destroy_tenant(&self, confirm: &TenantName) -> Result<Reply, Error> {
        if confirm != &self.tenant {
            return Err(Error::WrongConfirmation(self.tenant.to_string()));
        }
        let _admin = self.admin.lock().await;
        let (keys, versions_shredded) = tokio::task::block_in_place(|| self.store.destroy_tenant())?;
        self.cache.flush();
        limited_warn!(tenant = %self.tenant, keys, versions_shredded, "tenant destroyed: every KEK record shredded");
        Ok(Reply::TenantDestroyed { keys, versions_shredded })
    }

    async fn set_state(&self, key: &KeyName, version: u32, state: TargetState) -> Result<KeyInfo, Error> {
        let _admin = self.admin.lock().await;
        let stored = match state {
            TargetState::DecryptOnly => StoredState::Enabled,
            TargetState::Disabled => StoredState::Disabled,
            TargetState::Destroyed => StoredState::Destroyed,
        };
        let info = tokio::task::block_in_place(|| self.store.set_state(key, version, stored))?;
        if stored != StoredState::Enabled {
            self.cache.evict(key, version);
            // KEKs chained under it were unsealed with it: none may outlive it.
            self.cache.evict_descendants(key);
        }
        limited_info!(tenant = %self.tenant, key = %key, version, state = ?state, "changed key version state");
        Ok(info)
    }
}

/// The audit checkpoint key (crate::audit::anchor), sealed by the root key like a KEK record,
/// under the name `@audit`, version 1: the one the record names (a rotation may not have
/// rewrapped it yet), or the active one when it is made.
impl KeySource for TenantService {
    fn checkpoint_key(&self) -> Result<KeySlot, Error> {
        let _writing = self.audit_key.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let aad = kek_aad_of(&self.tenant, AUDIT_KEY_NAME, AUDIT_KEY_VERSION);
        let mut slot = self.cache.scratch()?;
        if let Some(record) = self.store.audit_key()? {
            self.root_for(&record.root_key)?.unseal(&aad, &record.sealed, slot.bytes_mut())?;
            return Ok(slot);
        }
        aws_lc_rs::rand::fill(slot.bytes_mut()).expect("the system RNG does not fail");
        let (root, label) = {
            let roots = self.roots.read().expect("roots lock");
            (Arc::clone(&roots.active), roots.active_label.clone())
        };
        let sealed = root.seal(&aad, slot.bytes())?;
        self.store.write_audit_key(&sealed, label)?;
        tracing::info!(tenant = %self.tenant, "made the audit checkpoint key (audit.kek), sealed by the root key");
        Ok(slot)
    }
}

/// The root keys earlier rotations left behind, oldest first.
fn read_previous(store: &KeyStore) -> Result<Vec<String>, Error> {
    Ok(crate::keystore::read_root_state_of(store)?.map(|s| s.previous).unwrap_or_default())
}

/// What the audit records of a request name: per item of a batch answer, or one for the
/// request as a whole (with what an admin action changed).
enum Audited {
    Items(Vec<Access>),
    Whole(Access, Option<serde_json::Value>),
}

/// The operations whose records list their items, each named by its EDEK.
fn has_items(event: &str) -> bool {
    matches!(event, "generate" | "wrap" | "unwrap" | "rewrap")
}

/// The EDEKs a request presented, for the record of a request refused as a whole.
fn presented(op: &Op) -> Option<Audited> {
    let (Op::Unwrap(items) | Op::Rewrap(items)) = op else { return None };
    let named = |it: &EdekItem| Access { opened: EdekId::of(&it.edek), ..Access::default() };
    Some(Audited::Items(items.iter().map(named).collect()))
}

/// The accesses of a batch served with one KEK: the first item fetched it (from wherever
/// it came), the others reused it.
fn batch_accesses(key: &KeyName, version: u32, from: KekFrom, n: usize) -> Vec<Access> {
    (0..n).map(|i| Access::of(key, version, Some(if i == 0 { from } else { KekFrom::Cache }))).collect()
}

/// Of two KEK fetches, the one to record: a root-key call outranks a cache hit.
fn worse(a: Option<KekFrom>, b: Option<KekFrom>) -> Option<KekFrom> {
    let rank = |k: Option<KekFrom>| match k {
        None => 0,
        Some(KekFrom::Cache) => 1,
        Some(KekFrom::Grace) => 2,
        Some(KekFrom::Parent) => 3,
        Some(KekFrom::Root) => 4,
    };
    if rank(b) > rank(a) {
        b
    } else {
        a
    }
}

/// Sealers built during one batch, by key version, failures included, so a batch of
/// 256 EDEKs under one KEK costs one cache lookup and one key expansion.
#[derive(Default)]
struct SealerSet<'s>(HashMap<(KeyName, u32), Result<Sealer<'s>, ErrorStatus>>);

impl<'s> SealerSet<'s> {
    /// The sealer of one version and where its KEK came from: fetched now, or reused
    /// from an earlier item (`Cache`).
    async fn get(
        &mut self,
        svc: &'s TenantService,
        key: &KeyName,
        version: u32,
    ) -> (Result<&Sealer<'s>, ErrorStatus>, Option<KekFrom>) {
        let mut from = Some(KekFrom::Cache);
        // One hash per item: the common case is every item under one version.
        let slot = match self.0.entry((key.clone(), version)) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let s = match svc.sealer(key, version).await {
                    Ok((s, f)) => {
                        from = Some(f);
                        Ok(s)
                    }
                    Err(e) => {
                        // An unknown key or version is indistinguishable from tampering.
                        Err(match e {
                            Error::Store(_) => Error::DataInvalid.status(),
                            other => other.status(),
                        })
                    }
                };
                v.insert(s)
            }
        };
        match slot {
            Ok(s) => (Ok(&*s), from),
            Err(e) => (Err(e.clone()), None),
        }
    }
}

/// A service over an in-memory root key, for unit tests of this module and of the
/// connection code, and for the fuzz targets (feature `fuzzing`). Never built otherwise.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod testing {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

    use super::*;
    use crate::backend::KEK_LEN;
    use crate::secret::LockedArena;

    /// An in-memory root key for unit tests only: AES-GCM under a fixed key. The real
    /// backends are tested against SoftHSM2 and swtpm.
    pub(crate) struct TestRoot {
        key: LessSafeKey,
        pub unseals: AtomicUsize,
        pub down: AtomicBool,
        /// While set, the root key answers no (as if deleted): unseals and the canary fail.
        pub refused: AtomicBool,
        /// While set, unseals wait: a root-key call that is slow on purpose.
        pub hold: AtomicBool,
        /// Unseal calls begun, held or not.
        pub entered: AtomicUsize,
    }

    impl RootKey for TestRoot {
        fn seal(&self, aad: &[u8], kek: &[u8; KEK_LEN]) -> Result<Vec<u8>, BackendError> {
            let mut out = kek.to_vec();
            self.key
                .seal_in_place_append_tag(Nonce::assume_unique_for_key([0; 12]), Aad::from(aad), &mut out)
                .unwrap();
            Ok(out)
        }
        fn unseal(&self, aad: &[u8], sealed: &[u8], out: &mut [u8; KEK_LEN]) -> Result<(), BackendError> {
            self.entered.fetch_add(1, Ordering::SeqCst);
            while self.hold.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            self.check()?;
            self.unseals.fetch_add(1, Ordering::SeqCst);
            let mut buf = sealed.to_vec();
            let pt = self
                .key
                .open_in_place(Nonce::assume_unique_for_key([0; 12]), Aad::from(aad), &mut buf)
                .map_err(|_| BackendError::DataInvalid)?;
            out.copy_from_slice(pt);
            Ok(())
        }
        fn canary(&self) -> Result<(), BackendError> {
            self.check()
        }
        fn describe(&self) -> String {
            "test".into()
        }
        fn sibling(&self, _label: &str) -> Result<Arc<dyn RootKey>, BackendError> {
            Err(BackendError::Config("the test root key has no siblings".into()))
        }
        fn transport_key(&self, _: &str) -> Result<crate::backend::TransportKey, BackendError> {
            Err(BackendError::Config("the test root key imports nothing".into()))
        }
        fn import_root_key(
            &self,
            _: &str,
            _: crate::backend::WrappingAlgorithm,
            _: &[u8],
        ) -> Result<(), BackendError> {
            Err(BackendError::Config("the test root key imports nothing".into()))
        }
    }

    impl TestRoot {
        fn check(&self) -> Result<(), BackendError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(BackendError::Unreachable("test root is down".into()));
            }
            if self.refused.load(Ordering::SeqCst) {
                return Err(BackendError::Refused("test root key was deleted".into()));
            }
            Ok(())
        }
    }

    pub(crate) fn service(dir: &std::path::Path, tenant: &str) -> (TenantService, Arc<TestRoot>) {
        let lease = crate::cache::Lease {
            kek_ttl: Duration::from_secs(60),
            idle_ttl: Duration::from_secs(60),
            offline_grace: Duration::from_secs(3600),
        };
        service_with(dir, tenant, lease, Arc::new(crate::clock::BootInstant::now))
    }

    /// A service whose KEK cache runs on `clock`.
    pub(crate) fn service_with(
        dir: &std::path::Path,
        tenant: &str,
        lease: crate::cache::Lease,
        clock: crate::cache::Clock,
    ) -> (TenantService, Arc<TestRoot>) {
        let root = Arc::new(TestRoot {
            key: LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[3; 32]).unwrap()),
            unseals: AtomicUsize::new(0),
            down: AtomicBool::new(false),
            refused: AtomicBool::new(false),
            hold: AtomicBool::new(false),
            entered: AtomicUsize::new(0),
        });
        let t = TenantName::parse(tenant).unwrap();
        let store = KeyStore::open(dir, &t, "test".into()).unwrap();
        let cache = KekCache::with_clock(LockedArena::new(false).unwrap(), lease, clock);
        let audit_cfg = crate::config::AuditConfig { dir: dir.join("audit"), ..Default::default() };
        let audit = Audit::open(&audit_cfg, tenant, None).unwrap();
        (TenantService::new(t, root.clone(), store, cache, audit).unwrap(), root)
    }

    /// A caller with the user role.
    pub(crate) fn user() -> Caller {
        Caller { peer: Peer::Unix { uid: 1000, gid: 1000, pid: 1 }, exe: None, role: Role::User }
    }

    /// A caller with the admin role.
    pub(crate) fn admin() -> Caller {
        Caller {
            peer: Peer::Unix { uid: 0, gid: 0, pid: 1 },
            exe: Some("/usr/bin/kekctl".into()),
            role: Role::Admin,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::Ordering;

    use super::testing::{self, service};
    use super::*;
    use kekd_proto::ItemResult;

    async fn call(s: &TenantService, op: Op) -> Result<Reply, ErrorStatus> {
        s.handle(&testing::admin(), Request { id: 1, metadata: Default::default(), op }).await.result
    }

    fn items(r: Result<Reply, ErrorStatus>) -> Vec<ItemResult> {
        match r {
            Ok(Reply::Batch(items)) => items,
            other => panic!("expected a batch, got {other:?}"),
        }
    }

    fn key(s: &str) -> KeyName {
        KeyName::parse(s).unwrap()
    }

    fn ctx(k: &str, v: &str) -> Context {
        Context::new(BTreeMap::from([(k.to_string(), v.to_string())])).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn generate_unwrap_rewrap_with_one_unseal_per_version() {
        let dir = tempfile::tempdir().unwrap();
        let (s, root) = service(dir.path(), "acme");
        let got = items(
            call(
                &s,
                Op::Generate { key: key("default"), edek_only: false, contexts: vec![ctx("a", "1"); 3] },
            )
            .await,
        );
        let edeks: Vec<_> = got.iter().map(|r| r.as_ref().unwrap().edek.clone().unwrap()).collect();
        let unwrap_items =
            |c: Context| edeks.iter().map(|e| EdekItem { edek: e.clone(), context: c.clone() }).collect();
        let back = items(call(&s, Op::Unwrap(unwrap_items(ctx("a", "1")))).await);
        for (g, b) in got.iter().zip(&back) {
            assert_eq!(
                g.as_ref().unwrap().plaintext.as_ref().unwrap().expose(),
                b.as_ref().unwrap().plaintext.as_ref().unwrap().expose()
            );
        }
        let wrong = items(call(&s, Op::Unwrap(unwrap_items(ctx("a", "2")))).await);
        assert!(wrong.iter().all(|r| r.as_ref().unwrap_err().code == Code::DataInvalid));
        assert_eq!(root.unseals.load(Ordering::SeqCst), 1, "one unseal serves every request while cached");

        call(&s, Op::RotateKey(key("default"))).await.unwrap();
        let re = items(call(&s, Op::Rewrap(unwrap_items(ctx("a", "1")))).await);
        let re0 = re[0].as_ref().unwrap();
        assert_eq!(re0.version, 2);
        assert!(re0.plaintext.is_none(), "rewrap returns no plaintext");
        let again = items(
            call(&s, Op::Unwrap(vec![EdekItem { edek: re0.edek.clone().unwrap(), context: ctx("a", "1") }]))
                .await,
        );
        assert_eq!(
            again[0].as_ref().unwrap().plaintext.as_ref().unwrap().expose(),
            got[0].as_ref().unwrap().plaintext.as_ref().unwrap().expose()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn version_states_and_admin_checks() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = service(dir.path(), "acme");
        let wrap = |k: &str| Op::Wrap {
            key: key(k),
            items: vec![WrapItem {
                plaintext: Secret::from_vec(b"hello".to_vec()),
                context: Context::default(),
            }],
        };
        let edek = items(call(&s, wrap("default")).await)[0].as_ref().unwrap().edek.clone().unwrap();
        let unwrap = || Op::Unwrap(vec![EdekItem { edek: edek.clone(), context: Context::default() }]);
        call(&s, Op::RotateKey(key("default"))).await.unwrap();
        let disable = Op::SetVersionState { key: key("default"), version: 1, state: TargetState::Disabled };
        call(&s, disable).await.unwrap();
        assert_eq!(items(call(&s, unwrap()).await)[0].as_ref().unwrap_err().code, Code::FailedPrecondition);
        let enable = Op::SetVersionState { key: key("default"), version: 1, state: TargetState::DecryptOnly };
        call(&s, enable).await.unwrap();
        assert_eq!(
            items(call(&s, unwrap()).await)[0].as_ref().unwrap().plaintext.as_ref().unwrap().expose(),
            b"hello"
        );
        let destroy = Op::SetVersionState { key: key("default"), version: 1, state: TargetState::Destroyed };
        call(&s, destroy).await.unwrap();
        assert_eq!(items(call(&s, unwrap()).await)[0].as_ref().unwrap_err().code, Code::DataInvalid);

        assert_eq!(call(&s, wrap("nope")).await.unwrap_err().code, Code::NotFound);
        let r = s
            .handle(
                &testing::user(),
                Request { id: 5, metadata: Default::default(), op: Op::CreateKey(key("x")) },
            )
            .await;
        assert_eq!(r.result.unwrap_err().code, Code::PermissionDenied);
        call(&s, Op::CreateKey(key("billing/invoices"))).await.unwrap();
        assert_eq!(
            call(&s, Op::CreateKey(key("billing/invoices"))).await.unwrap_err().code,
            Code::FailedPrecondition
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn another_tenants_edek_is_data_invalid() {
        let dir = tempfile::tempdir().unwrap();
        let (a, _) = service(dir.path(), "alpha");
        let (b, _) = service(dir.path(), "beta");
        let gen = Op::Generate { key: key("default"), edek_only: true, contexts: vec![Context::default()] };
        let got = items(call(&a, gen).await);
        assert!(got[0].as_ref().unwrap().plaintext.is_none(), "edek_only returns no plaintext");
        let edek = got[0].as_ref().unwrap().edek.clone().unwrap();
        let r = items(call(&b, Op::Unwrap(vec![EdekItem { edek, context: Context::default() }])).await);
        assert_eq!(r[0].as_ref().unwrap_err().code, Code::DataInvalid);
    }

    fn audit_records(dir: &std::path::Path, tenant: &str) -> Vec<serde_json::Value> {
        let mut files: Vec<_> =
            std::fs::read_dir(dir.join("audit").join(tenant)).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        files
            .iter()
            .flat_map(|f| std::fs::read_to_string(f).unwrap().lines().map(str::to_owned).collect::<Vec<_>>())
            .map(|l| serde_json::from_str(&l).unwrap())
            .collect()
    }

    /// The `kek` member says where each item's KEK came from, through a key chain and a
    /// rewrap too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn audit_records_name_the_kek_source_of_each_item() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = service(dir.path(), "acme");
        call(&s, Op::CreateKey(key("billing"))).await.unwrap();
        call(&s, Op::CreateKey(key("billing/invoices"))).await.unwrap();
        s.flush();
        let gen =
            |k: &str| Op::Generate { key: key(k), edek_only: true, contexts: vec![Context::default(); 2] };
        let got = items(call(&s, gen("billing/invoices")).await);
        let edek = got[0].as_ref().unwrap().edek.clone().unwrap();
        call(&s, Op::RotateKey(key("billing/invoices"))).await.unwrap();
        let item = |e: &[u8]| EdekItem { edek: e.to_vec(), context: Context::default() };
        let mut bad = edek.clone();
        bad[3] ^= 1;
        items(call(&s, Op::Rewrap(vec![item(&edek), item(&bad)])).await);

        let records = audit_records(dir.path(), "acme");
        let of = |event: &str| -> Vec<&serde_json::Value> {
            records.iter().filter(|r| r["event"] == event).collect()
        };
        let id = |e: &[u8]| {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(crate::envelope::nonce_of(e).unwrap())
        };
        let generated = of("generate");
        assert_eq!(generated.len(), 1, "one record per request");
        let made = &generated[0]["items"];
        assert_eq!(made[0]["kek"], "parent", "unsealed under billing's KEK: {made:?}");
        assert_eq!(made[1]["kek"], "cache");
        assert_eq!(generated[0]["kek"], serde_json::json!({ "cache": 1, "parent": 1 }));
        for (i, e) in got.iter().enumerate() {
            assert_eq!(
                made[i]["edek"],
                id(e.as_ref().unwrap().edek.as_deref().unwrap()),
                "named by its nonce"
            );
        }
        let rotated = of("rotate_key");
        assert_eq!((&rotated[0]["key"], &rotated[0]["version"]), (&"billing/invoices".into(), &2.into()));
        let rewrapped = &of("rewrap")[0]["items"];
        // Opened under version 1 (cached), sealed under the new version 2 (a fresh unseal).
        assert_eq!((&rewrapped[0]["from_version"], &rewrapped[0]["version"]), (&1.into(), &2.into()));
        assert_eq!(rewrapped[0]["kek"], "parent");
        assert_eq!(rewrapped[0]["outcome"], "ok");
        assert_eq!(rewrapped[0]["from"], id(&edek));
        assert_eq!(rewrapped[0]["to"].as_str().map(str::len), Some(16));
        assert_eq!(
            (&rewrapped[1]["outcome"], &rewrapped[1]["code"]),
            (&"error".into(), &"DATA_INVALID".into())
        );
        assert!(rewrapped[1].get("to").is_none());
        let seqs: Vec<u64> = records.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, (1..=records.len() as u64).collect::<Vec<_>>());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_root_key_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let (s, root) = service(dir.path(), "acme");
        root.down.store(true, Ordering::SeqCst);
        let gen = Op::Generate { key: key("default"), edek_only: true, contexts: vec![Context::default()] };
        assert_eq!(call(&s, gen).await.unwrap_err().code, Code::Unavailable);
    }

    fn lease(kek_ttl: u64, offline_grace: u64) -> crate::cache::Lease {
        crate::cache::Lease {
            kek_ttl: std::time::Duration::from_secs(kek_ttl),
            idle_ttl: std::time::Duration::from_secs(3600),
            offline_grace: std::time::Duration::from_secs(offline_grace),
        }
    }

    fn manual_clock() -> (crate::cache::Clock, Arc<std::sync::atomic::AtomicU64>) {
        let t = Arc::new(std::sync::atomic::AtomicU64::new(1_000_000));
        let t2 = Arc::clone(&t);
        (Arc::new(move || BootInstant::from_millis(t2.load(Ordering::Relaxed))), t)
    }

    fn unwrap_one(edek: &[u8]) -> Op {
        Op::Unwrap(vec![EdekItem { edek: edek.to_vec(), context: Context::default() }])
    }

    async fn wrap_one(s: &TenantService) -> Vec<u8> {
        let op = Op::Wrap {
            key: key("default"),
            items: vec![WrapItem { plaintext: Secret::from_vec(b"x".to_vec()), context: Context::default() }],
        };
        items(call(s, op).await)[0].as_ref().unwrap().edek.clone().unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_poll_flushes_every_cached_kek() {
        let dir = tempfile::tempdir().unwrap();
        let (s, root) = service(dir.path(), "acme");
        let edek = wrap_one(&s).await;
        s.poll_root().await;
        assert_eq!(s.cache.len(), 1, "a healthy poll keeps the cache");
        root.refused.store(true, Ordering::SeqCst);
        s.poll_root().await;
        assert_eq!(s.cache.len(), 0, "a refused poll flushes it");
        let r = items(call(&s, unwrap_one(&edek)).await);
        assert_eq!(r[0].as_ref().unwrap_err().code, Code::FailedPrecondition);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_sweeper_refreshes_keks_in_use_and_rides_out_an_outage() {
        let dir = tempfile::tempdir().unwrap();
        let (clock, t) = manual_clock();
        let (s, root) = super::testing::service_with(dir.path(), "acme", lease(60, 100), clock);
        let edek = wrap_one(&s).await;
        assert_eq!(root.unseals.load(Ordering::SeqCst), 1);
        // Used at 40 s; at 46 s (past three quarters of kek_ttl) the sweeper unseals again.
        t.fetch_add(40_000, Ordering::Relaxed);
        items(call(&s, unwrap_one(&edek)).await)[0].as_ref().unwrap();
        t.fetch_add(6_000, Ordering::Relaxed);
        s.sweep().await;
        assert_eq!(root.unseals.load(Ordering::SeqCst), 2, "refreshed in the background");
        // The root key goes down: past kek_ttl the KEK serves within offline_grace
        // (100 s after the last success, the refresh at 46 s)...
        root.down.store(true, Ordering::SeqCst);
        t.fetch_add(61_000, Ordering::Relaxed); // 107 s: the refreshed KEK expired at 106 s
        s.sweep().await;
        assert_eq!(s.cache.len(), 1, "expired, but kept for the grace");
        let r = items(call(&s, unwrap_one(&edek)).await);
        assert!(r[0].is_ok(), "served within the grace: {:?}", r[0]);
        let st = call(&s, Op::Status).await.unwrap();
        assert!(matches!(st, Reply::Status(ref i) if i.lease == "grace" && !i.backend_healthy), "{st:?}");
        // ...then UNAVAILABLE once the grace is over (146 s), and served again when it is back.
        t.fetch_add(40_000, Ordering::Relaxed);
        let r = items(call(&s, unwrap_one(&edek)).await);
        assert_eq!(r[0].as_ref().unwrap_err().code, Code::Unavailable);
        root.down.store(false, Ordering::SeqCst);
        assert!(items(call(&s, unwrap_one(&edek)).await)[0].is_ok());
    }

    fn generate(n: usize) -> Op {
        Op::Generate { key: key("default"), edek_only: true, contexts: vec![Context::default(); n] }
    }

    fn versions(r: Result<Reply, ErrorStatus>) -> Vec<u32> {
        items(r).into_iter().map(|i| i.unwrap().version).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_spent_budget_rotates_the_key_and_old_edeks_still_open() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = service(dir.path(), "acme");
        let s = s.with_encryption_budget(1000);
        let first = items(call(&s, generate(1)).await)[0].as_ref().unwrap().edek.clone().unwrap();
        for _ in 0..9 {
            assert!(versions(call(&s, generate(111)).await).iter().all(|&v| v == 1));
        }
        // 1 + 999 = 1000: the budget of version 1 is spent exactly; the next one rotates.
        assert_eq!(versions(call(&s, generate(1)).await), [2]);
        let info = s.store.info(&key("default")).unwrap();
        assert_eq!(info.active_version, 2);
        // A batch that does not fit in what is left moves to a new version whole.
        assert!(versions(call(&s, generate(998)).await).iter().all(|&v| v == 2));
        assert!(versions(call(&s, generate(2)).await).iter().all(|&v| v == 3));
        // Rewrap counts too, and moves the old EDEK to the active version.
        let re = items(
            call(&s, Op::Rewrap(vec![EdekItem { edek: first.clone(), context: Context::default() }])).await,
        );
        assert_eq!(re[0].as_ref().unwrap().version, 3);
        assert!(items(call(&s, unwrap_one(&first)).await)[0].is_ok(), "version 1 still decrypts");
        // Nothing can be bigger than the budget itself.
        let e = call(&s, generate(1001)).await.unwrap_err();
        assert_eq!(e.code, Code::ResourceExhausted);
        assert!(e.message.contains("1001") && e.message.contains("1000"), "{}", e.message);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reservations_survive_a_restart_so_the_budget_is_never_undercounted() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (s, _) = service(dir.path(), "acme");
            let s = s.with_encryption_budget(1000);
            versions(call(&s, generate(10)).await);
            // Reserved ahead: one step of budget / 16.
            assert_eq!(s.store.reserved(&key("default"), 1).unwrap(), 62);
        } // a crash: 52 reserved encryptions were never used
        let (s, _) = service(dir.path(), "acme");
        let s = s.with_encryption_budget(1000);
        for _ in 0..2 {
            assert!(versions(call(&s, generate(469)).await).iter().all(|&v| v == 1));
        }
        // 62 + 938 = 1000: counted from the reservation, not from what was used.
        assert_eq!(versions(call(&s, generate(1)).await), [2]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn status_counts_what_was_served_and_shows_keys_to_admins() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = service(dir.path(), "acme");
        versions(call(&s, generate(4)).await);
        let nope = Op::Wrap { key: key("nope"), items: Vec::new() };
        assert_eq!(call(&s, nope).await.unwrap_err().code, Code::NotFound);
        let r = items(
            call(&s, Op::Unwrap(vec![EdekItem { edek: b"garbage".to_vec(), context: Context::default() }]))
                .await,
        );
        assert_eq!(r[0].as_ref().unwrap_err().code, Code::DataInvalid);
        let refused = Response { id: 3, result: Err(ErrorStatus::new(Code::InvalidArgument, "bad")) };
        s.audit_refusal(&testing::user(), "invalid_request", None, &refused).await;

        let status = |caller: Caller| {
            let s = &s;
            async move {
                match s
                    .handle(&caller, Request { id: 9, metadata: Default::default(), op: Op::Status })
                    .await
                    .result
                {
                    Ok(Reply::Status(info)) => info,
                    other => panic!("expected a status, got {other:?}"),
                }
            }
        };
        let seen = status(testing::admin()).await;
        let ops: Vec<(&str, u64, u64)> =
            seen.operations.iter().map(|o| (o.operation.as_str(), o.requests, o.items)).collect();
        assert_eq!(ops, [("generate", 1, 4), ("wrap", 1, 0), ("unwrap", 1, 1)]);
        let errors: Vec<(Code, u64, u64)> =
            seen.errors.iter().map(|e| (e.code, e.requests, e.items)).collect();
        assert_eq!(
            errors,
            [(Code::InvalidArgument, 1, 0), (Code::NotFound, 1, 0), (Code::DataInvalid, 0, 1)]
        );
        assert_eq!(seen.key_versions.len(), 1);
        assert_eq!((seen.key_versions[0].name.as_str(), seen.key_versions[0].active_version), ("default", 1));

        let seen = status(testing::user()).await;
        assert!(seen.key_versions.is_empty(), "key versions are for admins, like list_keys");
        assert_eq!(seen.keys, 1);
        assert!(
            seen.operations.iter().any(|o| o.operation == "status" && o.requests == 1),
            "{:?}",
            seen.operations
        );
    }

    /// The checkpoint key is made on first need, sealed by the root key like a KEK under
    /// `@audit` v1, and the close's checkpoint carries its MAC of the head before it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_close_anchors_the_trail_under_a_key_the_root_key_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let (s, root) = service(dir.path(), "acme");
        let s = Arc::new(s);
        s.anchor_audit();
        call(&s, generate(2)).await.unwrap();
        s.close_audit().await;

        let records = audit_records(dir.path(), "acme");
        let (last, before) = (&records[records.len() - 1], &records[records.len() - 2]);
        assert_eq!(last["event"], "checkpoint", "{records:#?}");
        assert_eq!((&last["detail"]["seq"], &last["detail"]["hash"]), (&before["seq"], &before["hash"]));
        let sealed = s.store.audit_key().unwrap().expect("made on first need");
        assert_eq!(sealed.root_key, None);
        let mut key = [0u8; 32];
        root.unseal(&kek_aad_of(s.tenant(), "@audit", 1), &sealed.sealed, &mut key).unwrap();
        let hash: [u8; 32] = hex::decode(before["hash"].as_str().unwrap()).unwrap().try_into().unwrap();
        let mut input = b"kekd/audit-checkpoint/v1\x00\x04acme".to_vec();
        input.extend_from_slice(&before["seq"].as_u64().unwrap().to_be_bytes());
        input.extend_from_slice(&hash);
        let mac = hex::decode(last["detail"]["mac"].as_str().unwrap()).unwrap();
        let hmac_key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &key);
        aws_lc_rs::hmac::verify(&hmac_key, &input, &mac).expect("the MAC under the sealed key");
        // A second close has nothing new to anchor.
        s.close_audit().await;
        assert_eq!(audit_records(dir.path(), "acme").len(), records.len());
    }
}
