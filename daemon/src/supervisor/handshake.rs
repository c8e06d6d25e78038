//! The supervisor's part of a connection: who is calling (SO_PEERCRED), which tenant they
//! ask for (Hello), whether they may (the tenant's ACL), whether there is room for it (the
//! connection limits), and the hand-off of the socket to that tenant's worker. The
//! supervisor reads exactly the Hello frame and not a byte more: whatever the client
//! pipelined behind it stays in the socket for the worker, and no request or response
//! ever passes through here.
//!
//! The front door comes first, as a connection is accepted and before a byte of it is read
//! ([`accepted_local`], [`accepted_guest`]): a peer that no tenant's ACL lists (by uid and
//! primary gid; over vsock, by CID) is closed there, so that strangers never count against
//! anything the tenants share. The caller's executable is read there too
//! ([`super::identity`]), from the process that connected. Then a listed caller may have at
//! most `max_pending_per_uid` connections counted that have not sent their Hello yet, so
//! that no one user can hold the shared places with silent ones; one more is not counted,
//! but waits briefly for its Hello (with at most [`REFUSING_AT_ONCE`] others, all callers
//! together) and is refused if none comes, so that a burst of connections that do say
//! Hello at once, such as a client opening many, is not refused for being a burst.
//!
//! Connection limits: a connection counts against `max_connections` from its accept, and
//! against its tenant's `max_connections_per_tenant` from its admission, until the worker
//! serving it closes it. The supervisor no longer holds a handed-over socket, so it passes
//! a *lease* with it: one end of a socket pair, which the worker keeps as long as the
//! connection and closes with it (the kernel closes it if the worker dies). The
//! supervisor's end reads EOF then, and the connection stops counting.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use kekd_proto::{pb, Code, ErrorStatus, FrameError, Hello, Op, Request, Response, TenantName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::UnixStream;
use zeroize::Zeroizing;

use super::denials::{Denials, FoldKey, WINDOW};
use super::{identity, State};
use crate::audit::Caller;
use crate::config::{LimitsConfig, TenantConfig};
use crate::handoff::{Channel, Handoff, Refusal, ToWorker};
use crate::server;
use crate::service::{Peer, Role};

/// A worker whose control channel stays full this long is stuck; its callers get
/// UNAVAILABLE instead of waiting on it.
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections over `max_connections` or `max_pending_per_uid` whose Hello is awaited
/// (so that the refusal echoes its id and reaches a client still writing it, or, over
/// `max_pending_per_uid`, so that a caller's burst of connections saying Hello is served)
/// at most at once, all callers together; any more are refused without waiting.
const REFUSING_AT_ONCE: usize = 64;
/// How long a connection over `max_connections` or `max_pending_per_uid` may take to send
/// its Hello.
const REFUSAL_HELLO_WAIT: Duration = Duration::from_secs(1);
/// Descriptors a process needs besides its connections' (listeners, control channels,
/// the key store, the audit trail, the PKCS#11 module's own).
const SPARE_DESCRIPTORS: u64 = 64;

/// A count of open connections held to a limit: [`Gauge::try_take`] counts one more while
/// fewer than the limit are open, until the [`Slot`] it returns is dropped. The limit is
/// given at each take, so a reload that lowers it refuses new connections until enough
/// old ones have closed, and closes none.
#[derive(Debug, Default)]
pub struct Gauge(AtomicUsize);

impl Gauge {
    pub fn try_take(self: &Arc<Self>, limit: usize) -> Option<Slot> {
        self.0.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1)).ok()?;
        Some(Slot(Arc::clone(self)))
    }

    /// Connections counted now.
    #[cfg(test)]
    pub fn open(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

/// One connection counted by a [`Gauge`], until dropped.
#[derive(Debug)]
pub struct Slot(Arc<Gauge>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The supervisor's counts of open connections: all of them, each tenant's, and those
/// being refused.
#[derive(Debug, Default)]
pub struct Admission {
    all: Arc<Gauge>,
    refusing: Arc<Gauge>,
    /// Only configured tenants that admitted a caller get an entry: no client can make it
    /// grow. Kept across reloads and worker restarts, since a draining worker's
    /// connections still count.
    tenants: Mutex<HashMap<TenantName, Arc<Gauge>>>,
    /// Connections not yet past their Hello, per uid (per CID over vsock).
    pending: Arc<Pending>,
    /// Refused Hellos on their way to the tenants' audit trails.
    denials: Arc<Denials>,
}

impl Admission {
    fn tenant(&self, name: &TenantName) -> Arc<Gauge> {
        let mut tenants = self.tenants.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(tenants.entry(name.clone()).or_default())
    }
}

/// Whom `max_pending_per_uid` counts: a local uid, or a guest's CID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Pender {
    Uid(u32),
    Cid(u32),
}

impl Pender {
    fn of(peer: &Peer) -> Self {
        match *peer {
            Peer::Unix { uid, .. } => Pender::Uid(uid),
            Peer::Vsock { cid, .. } => Pender::Cid(cid),
        }
    }
}

impl std::fmt::Display for Pender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pender::Uid(uid) => write!(f, "uid {uid}"),
            Pender::Cid(cid) => write!(f, "vsock cid {cid}"),
        }
    }
}

/// Connections accepted whose Hello has not been read yet, per uid or CID. Only callers
/// some tenant's ACL lists are counted (strangers are closed first), so the map holds at
/// most one entry per such caller, and drops it when its count is back to 0.
#[derive(Debug, Default)]
pub struct Pending(Mutex<HashMap<Pender, usize>>);

impl Pending {
    fn try_take(self: &Arc<Self>, who: Pender, limit: usize) -> Option<PendingSlot> {
        let mut counts = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let n = counts.entry(who).or_default();
        if *n >= limit {
            if *n == 0 {
                counts.remove(&who);
            }
            return None;
        }
        *n += 1;
        Some(PendingSlot { who, of: Arc::clone(self) })
    }

    /// Connections of `who` counted now.
    #[cfg(test)]
    fn of(&self, who: Pender) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).get(&who).copied().unwrap_or(0)
    }
}

/// One connection waiting for its Hello, counted until dropped.
#[derive(Debug)]
pub struct PendingSlot {
    who: Pender,
    of: Arc<Pending>,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut counts = self.of.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&self.who) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.who);
            }
        }
    }
}

/// Warns when the descriptor limit (RLIMIT_NOFILE, systemd's `LimitNOFILE=`) is too low
/// for the connection limits: the supervisor holds one descriptor per connection (the
/// socket while greeting it, then its lease) and a worker two (the socket and the lease).
pub fn check_descriptor_limit(limits: &LimitsConfig) {
    use nix::sys::resource::{getrlimit, Resource};
    let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE) else { return };
    let need =
        (limits.max_connections as u64).max(2 * limits.max_connections_per_tenant as u64) + SPARE_DESCRIPTORS;
    if soft < need {
        tracing::warn!(
            rlimit_nofile = soft,
            needed = need,
            "the descriptor limit is lower than limits.max_connections and \
             limits.max_connections_per_tenant need: raise it (LimitNOFILE=) or lower them, \
             or connections fail with \"too many open files\" before the limits apply"
        );
    }
}

/// Who may use a tenant, and who may administer it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    allow_uids: Vec<u32>,
    allow_gids: Vec<u32>,
    admin_uids: Vec<u32>,
    allow_cids: Vec<u32>,
}

impl Acl {
    pub fn from_config(c: &TenantConfig) -> Self {
        Acl {
            allow_uids: c.allow_uids.clone(),
            allow_gids: c.allow_gids.clone(),
            admin_uids: c.admin_uids.clone(),
            allow_cids: c.allow_cids.clone(),
        }
    }

    /// None: the peer may not use this tenant at all.
    /// A guest over vsock is never an admin: administration is for the host's own users.
    pub fn role(&self, peer: &Peer) -> Option<Role> {
        match *peer {
            Peer::Unix { uid, .. } if self.admin_uids.contains(&uid) => Some(Role::Admin),
            Peer::Unix { uid, gid, .. }
                if self.allow_uids.contains(&uid) || self.allow_gids.contains(&gid) =>
            {
                Some(Role::User)
            }
            Peer::Vsock { cid, .. } if self.allow_cids.contains(&cid) => Some(Role::User),
            _ => None,
        }
    }
}

/// A connection the Unix listener accepted just now: the peer is who the kernel says
/// (SO_PEERCRED), and its executable is read now, from the process that connected.
pub fn accepted_local(stream: UnixStream, state: &Arc<State>) {
    let (peer, pid) = match stream.peer_cred() {
        Ok(c) => {
            let pid = c.pid().unwrap_or(0);
            (Peer::Unix { uid: c.uid(), gid: c.gid(), pid }, pid)
        }
        Err(e) => {
            limited_warn!(error = %e, "cannot read peer credentials; closing");
            return;
        }
    };
    let Some(stream) = front_door(stream, &peer, state) else { return };
    let exe = identity::exe_at_accept(&stream, pid);
    let state = Arc::clone(state);
    tokio::spawn(async move { greet(stream, peer, exe, &state).await });
}

/// A connection a vsock listener accepted just now, from a guest named by its CID.
pub fn accepted_guest<S>(stream: S, peer: Peer, state: &Arc<State>)
where
    S: AsyncRead + AsyncWrite + AsFd + Unpin + Send + 'static,
{
    let Some(stream) = front_door(stream, &peer, state) else { return };
    let state = Arc::clone(state);
    tokio::spawn(async move { greet(stream, peer, None, &state).await });
}

/// The front door, before anything is read: closes a stranger (a peer no tenant's ACL
/// lists), with a rate-limited log line, and lets anyone else in.
fn front_door<S: AsFd>(stream: S, peer: &Peer, state: &State) -> Option<S> {
    if listed(state, peer) {
        return Some(stream);
    }
    limited_warn!(%peer, "connection closed at accept: the caller is in no tenant's access list");
    tell_stranger(&stream, peer);
    None
}

/// Whether any tenant's ACL lets `peer` in.
fn listed(state: &State, peer: &Peer) -> bool {
    let tenants = state.tenants.read().unwrap_or_else(PoisonError::into_inner);
    tenants.values().any(|(acl, _)| acl.role(peer).is_some())
}

/// Tells a stranger why it is closed, if its socket takes the answer at once: nothing is
/// awaited for a stranger, and its Hello is not read, so the answer carries no id. A
/// client that writes its Hello after the close sees the connection reset instead.
fn tell_stranger<S: AsFd>(stream: &S, peer: &Peer) {
    use nix::sys::socket::{send, MsgFlags};
    let who = match *peer {
        Peer::Unix { uid, gid, .. } => format!("uid {uid} gid {gid}"),
        Peer::Vsock { cid, .. } => format!("vsock cid {cid}"),
    };
    let msg = format!("{who} is in no tenant's access list");
    let mut frame = Vec::new();
    kekd_proto::encode_response(
        Response { id: 0, result: Err(ErrorStatus::new(Code::PermissionDenied, msg)) },
        &mut frame,
    );
    let _ = send(stream.as_fd().as_raw_fd(), &frame, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL);
}

/// Greets one connection past the front door, of either transport, and hands it to its
/// tenant's worker, or answers why not and closes it. `exe` is the caller's executable,
/// read at accept.
pub async fn greet<S>(mut stream: S, peer: Peer, exe: Option<String>, state: &Arc<State>)
where
    S: AsyncRead + AsyncWrite + AsFd + Unpin,
{
    let limits = state.limits();
    let max_pending = limits.max_pending_per_uid;
    let (counted, hello) = match state.admission.pending.try_take(Pender::of(&peer), max_pending) {
        Some(_pending) => {
            // Counted from here, before the Hello: a client that never sends one holds a
            // connection too, for up to frame_read_timeout.
            let Some(counted) = state.admission.all.try_take(limits.max_connections) else {
                return refuse_over_limit(stream, peer, state, &limits).await;
            };
            let wait = limits.frame_read_timeout;
            match tokio::time::timeout(wait, read_hello(&mut stream, state.max_frame())).await {
                Ok(Ok(hello)) => (counted, hello),
                Ok(Err(Some(resp))) => return answer(stream, resp).await,
                Ok(Err(None)) => return,
                Err(_) => {
                    limited_info!(%peer, "no hello within {wait:?} (limits.frame_read_timeout); closing");
                    return;
                }
            }
        }
        None => {
            // Over max_pending_per_uid: not counted, but given a moment to say Hello.
            let hello = match hello_in_passing(&mut stream, state, &limits).await {
                Some(Ok(hello)) => hello,
                Some(Err(Some(resp))) => return answer(stream, resp).await,
                Some(Err(None)) => return,
                None => {
                    limited_warn!(%peer, limit = max_pending, "connection refused: the caller has limits.max_pending_per_uid connections waiting for their Hello");
                    let who = Pender::of(&peer);
                    let msg = format!(
                        "{who} has {max_pending} connections open that have not sent their Hello \
                         (limits.max_pending_per_uid); retry once they have"
                    );
                    let resp =
                        Response { id: 0, result: Err(ErrorStatus::new(Code::ResourceExhausted, msg)) };
                    return answer(stream, resp).await;
                }
            };
            let Some(counted) = state.admission.all.try_take(limits.max_connections) else {
                let max = limits.max_connections;
                limited_warn!(%peer, limit = max, "connection refused: max_connections are open");
                let msg = format!(
                    "kekd has its limit of {max} connections open (limits.max_connections); retry later"
                );
                let resp =
                    Response { id: hello.0, result: Err(ErrorStatus::new(Code::ResourceExhausted, msg)) };
                return answer(stream, resp).await;
            };
            (counted, hello)
        }
    };
    let (id, hello) = hello;
    let fail = |code, msg: String| Response { id, result: Err(ErrorStatus::new(code, msg)) };
    let (role, link) = match admit(state, &hello, &peer) {
        Ok(admitted) => admitted,
        Err((code, msg)) => {
            if code == Code::PermissionDenied {
                // The denial goes into the tenant's own audit trail, through its worker,
                // folded with the caller's other refusals by this tenant.
                let refusal = Refusal {
                    peer,
                    exe,
                    hello_id: id,
                    code: code.as_str_name().to_owned(),
                    message: msg.clone(),
                    count: 1,
                };
                if let Some((first, fold)) = state.admission.denials.note(&hello.tenant, refusal) {
                    pass_refusal(state, &hello.tenant, first).await;
                    tokio::spawn(flush_folded(Arc::clone(state), fold));
                }
            }
            return answer(stream, fail(code, msg)).await;
        }
    };
    let Some(link) = link else {
        let msg = format!("tenant {:?} is restarting; retry shortly", hello.tenant.as_str());
        return answer(stream, fail(Code::Unavailable, msg)).await;
    };
    let tenant = hello.tenant.as_str();
    let per_tenant = limits.max_connections_per_tenant;
    let Some(tenant_counted) = state.admission.tenant(&hello.tenant).try_take(per_tenant) else {
        limited_warn!(tenant, %peer, limit = per_tenant, "connection refused: the tenant has max_connections_per_tenant open");
        let msg = format!(
            "tenant {tenant:?} has its limit of {per_tenant} connections open \
             (limits.max_connections_per_tenant); retry later"
        );
        return answer(stream, fail(Code::ResourceExhausted, msg)).await;
    };
    let (lease, workers_lease) = match UnixStream::pair() {
        Ok(pair) => pair,
        Err(e) => {
            limited_warn!(tenant, error = %e, "cannot make a connection lease");
            let msg = "kekd cannot take the connection now; retry shortly".to_owned();
            return answer(stream, fail(Code::Unavailable, msg)).await;
        }
    };
    let handoff = ToWorker::Connection(Handoff { caller: Caller { peer, exe, role }, hello_id: id });
    let fds = [stream.as_fd(), workers_lease.as_fd()];
    let refused = match tokio::time::timeout(HANDOFF_TIMEOUT, link.send_fds(&handoff, &fds)).await {
        // Our copies of the socket and of the worker's lease close here; the worker's
        // carry on, and the connection counts until the worker closes its lease.
        Ok(Ok(())) => {
            limited_debug!(tenant, %peer, client = %hello.client_name, "connection handed over");
            tokio::spawn(count_until_closed(lease, (counted, tenant_counted)));
            return;
        }
        Ok(Err(e)) => {
            limited_warn!(tenant, error = %e, "cannot hand a connection to the worker");
            format!("tenant {tenant:?} is restarting; retry shortly")
        }
        Err(_) => {
            limited_warn!(tenant, "the worker took no connection for {HANDOFF_TIMEOUT:?}");
            format!("tenant {tenant:?} is not taking connections; retry shortly")
        }
    };
    answer(stream, fail(Code::Unavailable, refused)).await
}

/// Passes a refusal to its tenant's worker, for the tenant's audit trail.
async fn pass_refusal(state: &State, tenant: &TenantName, refusal: Refusal) {
    let Some(link) = state.with_tenant(tenant, |t| t.and_then(|(_, w)| w.link())) else {
        limited_warn!(%tenant, count = refusal.count, "no worker serves the tenant now (restarting or removed): denials not audited");
        return;
    };
    let (peer, count) = (refusal.peer, refusal.count);
    let msg = ToWorker::Refused(refusal);
    if tokio::time::timeout(HANDOFF_TIMEOUT, link.send(&msg, None)).await.map_or(true, |r| r.is_err()) {
        limited_warn!(%tenant, %peer, count, "cannot pass a denial to the worker for its audit trail");
    }
}

/// Passes on the refusals folded into `fold`, once a window, until a window passes
/// without any ([`super::denials`]).
async fn flush_folded(state: Arc<State>, fold: FoldKey) {
    loop {
        tokio::time::sleep(WINDOW).await;
        let Some(folded) = state.admission.denials.take(&fold) else { return };
        pass_refusal(&state, &fold.tenant, folded).await;
    }
}

/// Keeps a handed-over connection counted until its worker closes the lease.
async fn count_until_closed(mut lease: UnixStream, slots: (Slot, Slot)) {
    // The worker never writes: a read ends at EOF (or an error) once its end is closed.
    let mut byte = [0u8; 1];
    while matches!(lease.read(&mut byte).await, Ok(1..)) {}
    drop(slots);
}

/// The Hello of a connection over `max_pending_per_uid`, if it comes within
/// [`REFUSAL_HELLO_WAIT`] (or `frame_read_timeout`, if shorter) and there are fewer than
/// [`REFUSING_AT_ONCE`] connections waiting like it; `None` if not. The inner result is
/// [`read_hello`]'s.
async fn hello_in_passing<S: AsyncRead + Unpin>(
    stream: &mut S,
    state: &State,
    limits: &LimitsConfig,
) -> Option<Result<(u64, Hello), Option<Response>>> {
    let _waiting = state.admission.refusing.try_take(REFUSING_AT_ONCE)?;
    let wait = limits.frame_read_timeout.min(REFUSAL_HELLO_WAIT);
    tokio::time::timeout(wait, read_hello(stream, state.max_frame())).await.ok()
}

/// Answers a connection over `max_connections` with RESOURCE_EXHAUSTED and closes it. Its
/// Hello is awaited briefly first (by at most [`REFUSING_AT_ONCE`] connections at a time),
/// so that the answer echoes its id and reaches a client that is still writing it.
async fn refuse_over_limit<S>(mut stream: S, peer: Peer, state: &State, limits: &LimitsConfig)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let max = limits.max_connections;
    limited_warn!(%peer, limit = max, "connection refused: max_connections are open");
    let mut id = 0;
    if let Some(_waiting) = state.admission.refusing.try_take(REFUSING_AT_ONCE) {
        let wait = limits.frame_read_timeout.min(REFUSAL_HELLO_WAIT);
        if let Ok(Ok((hello_id, _))) =
            tokio::time::timeout(wait, read_hello(&mut stream, state.max_frame())).await
        {
            id = hello_id;
        }
    }
    let msg = format!("kekd has its limit of {max} connections open (limits.max_connections); retry later");
    answer(stream, Response { id, result: Err(ErrorStatus::new(Code::ResourceExhausted, msg)) }).await
}

type Admitted = (Role, Option<Arc<Channel>>);

/// The tenant's ACL decides; its worker's current channel (None while restarting) comes
/// with the decision, read under the same lock.
fn admit(state: &State, hello: &Hello, peer: &Peer) -> Result<Admitted, (Code, String)> {
    if hello.protocol_version != kekd_proto::PROTOCOL_VERSION {
        return Err((
            Code::FailedPrecondition,
            format!(
                "protocol version {} is not supported (kekd speaks {})",
                hello.protocol_version,
                kekd_proto::PROTOCOL_VERSION
            ),
        ));
    }
    state.with_tenant(&hello.tenant, |tenant| {
        let Some((acl, worker)) = tenant else {
            limited_info!(tenant = %hello.tenant, %peer, "hello for an unknown tenant");
            return Err((Code::NotFound, format!("tenant {:?} does not exist", hello.tenant.as_str())));
        };
        let Some(role) = acl.role(peer) else {
            limited_warn!(tenant = %hello.tenant, %peer, "caller not allowed");
            let who = match *peer {
                Peer::Unix { uid, gid, .. } => format!("uid {uid} gid {gid}"),
                Peer::Vsock { cid, .. } => format!("vsock cid {cid}"),
            };
            return Err((
                Code::PermissionDenied,
                format!("{who} may not use tenant {:?}", hello.tenant.as_str()),
            ));
        };
        Ok((role, worker.link()))
    })
}

/// Reads the first frame exactly (length, then that many bytes) and requires a Hello.
/// `Err(None)`: the peer went away; `Err(Some)`: answer this, then close.
async fn read_hello<S: AsyncRead + Unpin>(
    stream: &mut S,
    max: usize,
) -> Result<(u64, Hello), Option<Response>> {
    let close_with = |id, code, msg: String| Some(Response { id, result: Err(ErrorStatus::new(code, msg)) });
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await.map_err(|_| None)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        let e = FrameError::TooLarge { len, max };
        return Err(close_with(0, Code::ResourceExhausted, e.to_string()));
    }
    let mut body = Zeroizing::new(vec![0u8; len]);
    stream.read_exact(&mut body).await.map_err(|_| None)?;
    let msg = <pb::Request as prost::Message>::decode(&body[..])
        .map_err(|e| close_with(0, Code::InvalidArgument, FrameError::Decode(e).to_string()))?;
    let req =
        Request::try_from(msg).map_err(|rej| Some(Response { id: rej.id, result: Err(rej.error.into()) }))?;
    match req.op {
        Op::Hello(hello) => Ok((req.id, hello)),
        _ => Err(close_with(
            req.id,
            Code::InvalidArgument,
            "the first request on a connection must be hello".into(),
        )),
    }
}

async fn answer<S: AsyncWrite + Unpin>(mut stream: S, resp: Response) {
    let _ = server::send(&mut stream, resp).await;
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::Write as _;
    use std::os::fd::OwnedFd;

    use kekd_proto::Metadata;
    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::config::Config;
    use crate::handoff;
    use crate::supervisor::process::WorkerProcess;
    use crate::worker::WorkerSpec;

    #[test]
    fn acl_roles() {
        let acl =
            Acl { allow_uids: vec![1000], allow_gids: vec![50], admin_uids: vec![0], allow_cids: vec![5] };
        assert_eq!(acl.role(&Peer::Unix { uid: 0, gid: 0, pid: 1 }), Some(Role::Admin));
        assert_eq!(acl.role(&Peer::Unix { uid: 1000, gid: 1000, pid: 1 }), Some(Role::User));
        assert_eq!(acl.role(&Peer::Unix { uid: 7, gid: 50, pid: 1 }), Some(Role::User));
        assert_eq!(acl.role(&Peer::Unix { uid: 7, gid: 7, pid: 1 }), None);
        assert_eq!(acl.role(&Peer::Vsock { cid: 5, port: 1024 }), Some(Role::User));
        // A CID is not a uid: CID 0 or 1000 must not pass as root or as user 1000.
        assert_eq!(acl.role(&Peer::Vsock { cid: 1000, port: 1 }), None);
        assert_eq!(acl.role(&Peer::Vsock { cid: 0, port: 1 }), None);
        // Nor is a uid a CID.
        assert_eq!(acl.role(&Peer::Unix { uid: 5, gid: 5, pid: 1 }), None);
    }

    /// The supervisor of two tenants: `acme`, that admits guest CID 5 and local uid 1000,
    /// and `other`, that admits guest CID 6 and local uid 5 (so that they are no strangers,
    /// only not acme's); and the worker's end of acme's control channel.
    fn supervisor() -> (Arc<State>, Channel) {
        supervisor_with("")
    }

    /// [`supervisor`] with these lines in its `[limits]` table.
    fn supervisor_with(limits: &str) -> (Arc<State>, Channel) {
        let text = format!(
            "[limits]\n{limits}\n[tenants.acme]\nallow_uids = [1000]\nallow_cids = [5]\n\
             [tenants.acme.tpm]\ntcti = \"device:/dev/null\"\n\
             [tenants.other]\nallow_uids = [5]\nallow_cids = [6]\n\
             [tenants.other.tpm]\ntcti = \"device:/dev/null\"\n"
        );
        let cfg = Config::parse(&text).unwrap();
        let mut tenants = BTreeMap::new();
        let mut acme = None;
        for tenant in cfg.tenants() {
            let (ours, theirs) = handoff::pair().unwrap();
            let worker = WorkerProcess::attached(
                WorkerSpec::new(&cfg, &tenant),
                Arc::new(Channel::new(ours).unwrap()),
            );
            if tenant.name.as_str() == "acme" {
                acme = Some(Channel::new(theirs).unwrap());
            }
            tenants.insert(tenant.name.clone(), (Acl::from_config(&tenant.config), worker));
        }
        (Arc::new(State::new(tenants, &cfg)), acme.expect("acme is configured"))
    }

    /// What the accept loop does with a connection of `peer`, awaited: the front door,
    /// then the greeting.
    async fn arrive(stream: UnixStream, peer: Peer, state: &Arc<State>) {
        if let Some(stream) = front_door(stream, &peer, state) {
            greet(stream, peer, None, state).await
        }
    }

    /// Whether the worker got a control message within a moment.
    async fn worker_got_anything(worker: &Channel) -> bool {
        tokio::time::timeout(Duration::from_millis(200), worker.recv_fds::<ToWorker>()).await.is_ok()
    }

    /// A client that has sent its Hello for `acme`, and the supervisor's end of it.
    async fn client() -> (UnixStream, UnixStream) {
        let (mut client, accepted) = UnixStream::pair().unwrap();
        let hello = Hello {
            protocol_version: kekd_proto::PROTOCOL_VERSION,
            tenant: TenantName::parse("acme").unwrap(),
            client_name: "guest".into(),
        };
        let mut frame = Vec::new();
        kekd_proto::encode_request(
            Request { id: 9, metadata: Metadata::default(), op: Op::Hello(hello) },
            &mut frame,
        );
        client.write_all(&frame).await.unwrap();
        (client, accepted)
    }

    async fn answer_to(client: &mut UnixStream) -> Response {
        let msg =
            kekd_proto::FrameReader::new(client, 1 << 20).read::<pb::Response>().await.unwrap().unwrap();
        Response::try_from(msg).unwrap()
    }

    /// The transport-independent half of vsock, over a Unix socket: a guest is admitted by
    /// its CID alone and its very socket reaches the worker with the guest's identity; an
    /// unlisted CID is refused by name and the refusal goes to the tenant's audit trail.
    #[tokio::test]
    async fn guests_are_admitted_by_cid_and_handed_over_like_local_callers() {
        let (state, worker) = supervisor();

        let (mut guest, accepted) = client().await;
        arrive(accepted, Peer::Vsock { cid: 5, port: 1024 }, &state).await;
        let (msg, fds) = worker.recv_fds::<ToWorker>().await.unwrap().unwrap();
        let ToWorker::Connection(handoff) = msg else { panic!("expected a connection, got {msg:?}") };
        let [fd, _lease]: [OwnedFd; 2] = fds.try_into().expect("the socket and its lease");
        assert_eq!(handoff.caller.peer, Peer::Vsock { cid: 5, port: 1024 });
        assert_eq!(handoff.caller.role, Role::User);
        assert_eq!(handoff.caller.exe, None, "a guest has no local executable");
        assert_eq!(handoff.hello_id, 9);
        // The descriptor is the guest's own connection: what the worker writes, it reads.
        let mut passed = std::os::unix::net::UnixStream::from(fd);
        passed.write_all(b"from the worker").unwrap();
        let mut got = [0u8; 15];
        guest.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"from the worker");

        for (peer, who) in [
            (Peer::Vsock { cid: 6, port: 1024 }, "vsock cid 6"),
            // A uid that happens to equal an allowed CID is no guest.
            (Peer::Unix { uid: 5, gid: 5, pid: 1 }, "uid 5 gid 5"),
        ] {
            let (mut stranger, accepted) = client().await;
            arrive(accepted, peer, &state).await;
            let resp = answer_to(&mut stranger).await;
            let e = resp.result.expect_err("refused");
            assert_eq!(e.code, Code::PermissionDenied);
            assert!(e.message.contains(who) && e.message.contains("acme"), "{}", e.message);
            let (msg, fd) = worker.recv::<ToWorker>().await.unwrap().unwrap();
            let ToWorker::Refused(refusal) = msg else { panic!("expected a refusal, got {msg:?}") };
            assert_eq!(refusal.peer, peer, "the denial is audited with the caller's identity");
            assert_eq!(refusal.count, 1, "the first denial passes on by itself");
            assert!(fd.is_none(), "a refused socket stays with the supervisor");
        }

        // The local caller the same tenant allows is still handed over as before.
        let (_local, accepted) = client().await;
        arrive(accepted, Peer::Unix { uid: 1000, gid: 1000, pid: 1 }, &state).await;
        let (msg, _) = worker.recv_fds::<ToWorker>().await.unwrap().unwrap();
        let local = Peer::Unix { uid: 1000, gid: 1000, pid: 1 };
        assert!(
            matches!(msg, ToWorker::Connection(h) if h.caller.peer == local && h.caller.role == Role::User)
        );
    }

    #[test]
    fn a_gauge_counts_up_to_its_limit_and_frees_on_drop() {
        let g = Arc::new(Gauge::default());
        let a = g.try_take(2).expect("first");
        let b = g.try_take(2).expect("second");
        assert!(g.try_take(2).is_none(), "a third over a limit of 2");
        assert_eq!(g.open(), 2, "a refusal counts nothing");
        drop(a);
        let c = g.try_take(2).expect("room again once one closed");
        // A limit lowered below what is open closes nothing and admits nothing new.
        assert!(g.try_take(1).is_none());
        assert_eq!(g.open(), 2);
        drop((b, c));
        assert_eq!(g.open(), 0);
        assert!(g.try_take(1).is_some());
    }

    /// Waits (up to 5 s) until `f` holds: counts drop on the supervisor's own tasks.
    async fn eventually(what: &str, f: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while !f() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("not within 5 s: {what}"));
    }

    /// Both connection limits, through the handshake: a connection over the tenant's limit
    /// and one over the overall limit (where a silent, unauthenticated one counts too) are
    /// answered RESOURCE_EXHAUSTED naming their setting and echoing the Hello's id; the
    /// silent one is dropped after frame_read_timeout, and a handed-over one counts until
    /// the worker closes its lease.
    #[tokio::test]
    async fn connections_count_until_the_worker_closes_the_lease() {
        let (state, worker) = supervisor_with(
            "max_connections = 2\nmax_connections_per_tenant = 1\nframe_read_timeout = \"200ms\"",
        );
        let local = Peer::Unix { uid: 1000, gid: 1000, pid: 1 };

        let (_first, accepted) = client().await;
        arrive(accepted, local, &state).await;
        let (_, fds) = worker.recv_fds::<ToWorker>().await.unwrap().unwrap();
        let [_conn, lease]: [OwnedFd; 2] = fds.try_into().expect("the socket and its lease");
        assert_eq!(state.admission.all.open(), 1, "handed over, and still counted");

        let (mut second, accepted) = client().await;
        arrive(accepted, local, &state).await;
        let resp = answer_to(&mut second).await;
        assert_eq!(resp.id, 9);
        let e = resp.result.expect_err("over the tenant's limit");
        assert_eq!(e.code, Code::ResourceExhausted);
        assert!(
            e.message.contains("max_connections_per_tenant") && e.message.contains("acme"),
            "{}",
            e.message
        );

        // A connection that says nothing holds the second place overall while it waits.
        let (_silent, accepted) = UnixStream::pair().unwrap();
        let waiting = tokio::spawn({
            let state = Arc::clone(&state);
            async move { arrive(accepted, local, &state).await }
        });
        eventually("the silent connection is counted", || state.admission.all.open() == 2).await;
        let (mut third, accepted) = client().await;
        arrive(accepted, local, &state).await;
        let resp = answer_to(&mut third).await;
        assert_eq!(resp.id, 9, "the refusal echoes the Hello it read");
        let e = resp.result.expect_err("over the overall limit");
        assert_eq!(e.code, Code::ResourceExhausted);
        assert!(e.message.contains("limits.max_connections)"), "{}", e.message);
        tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("dropped after 200ms").unwrap();
        assert_eq!(state.admission.all.open(), 1);

        // The worker closes the connection and its lease: there is room for another.
        drop(lease);
        eventually("the lease frees its connection", || state.admission.all.open() == 0).await;
        let (_again, accepted) = client().await;
        arrive(accepted, local, &state).await;
        let (msg, _) = worker.recv_fds::<ToWorker>().await.unwrap().unwrap();
        assert!(matches!(msg, ToWorker::Connection(_)), "admitted again: {msg:?}");
    }

    /// A peer in no tenant's ACL is closed at once, before it counts against anything and
    /// before its Hello is read: it is told so (without an id), and no worker hears of it.
    #[tokio::test]
    async fn strangers_are_closed_at_accept_and_count_nowhere() {
        let (state, worker) = supervisor_with("max_connections = 1\nmax_connections_per_tenant = 1");
        for (peer, who) in [
            (Peer::Unix { uid: 7, gid: 7, pid: 1 }, "uid 7 gid 7"),
            (Peer::Vsock { cid: 7, port: 1024 }, "vsock cid 7"),
        ] {
            let (mut stranger, accepted) = UnixStream::pair().unwrap();
            assert!(front_door(accepted, &peer, &state).is_none(), "{peer} is a stranger");
            let resp = answer_to(&mut stranger).await;
            let e = resp.result.expect_err("closed");
            assert_eq!((resp.id, e.code), (0, Code::PermissionDenied));
            assert!(
                e.message.contains(who) && e.message.contains("no tenant's access list"),
                "{}",
                e.message
            );
            let mut rest = Vec::new();
            stranger.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty(), "closed after the answer");
            assert_eq!(state.admission.all.open(), 0);
            assert_eq!(state.admission.pending.of(Pender::of(&peer)), 0);
        }
        assert!(!worker_got_anything(&worker).await, "a stranger is nobody's audit record");
        // The one place of max_connections is still free for a caller acme lists.
        let (_local, accepted) = client().await;
        arrive(accepted, Peer::Unix { uid: 1000, gid: 1000, pid: 1 }, &state).await;
        let (msg, _) = worker.recv_fds::<ToWorker>().await.unwrap().unwrap();
        assert!(matches!(msg, ToWorker::Connection(_)), "admitted: {msg:?}");
    }

    /// A listed caller may have `max_pending_per_uid` connections counted while they wait
    /// for their Hello. One more silent one is not counted, and is refused naming the
    /// setting once its moment to say Hello has passed; one more that does say Hello is
    /// served (a burst is no flood). Other callers are greeted as before, and a Hello frees
    /// its place.
    #[tokio::test]
    async fn a_caller_may_keep_only_so_many_connections_waiting_for_hello() {
        let (state, worker) = supervisor_with("max_pending_per_uid = 2\nframe_read_timeout = \"1h\"");
        let local = Peer::Unix { uid: 1000, gid: 1000, pid: 1 };
        let mut silent = Vec::new();
        for _ in 0..2 {
            let (client, accepted) = UnixStream::pair().unwrap();
            let state = Arc::clone(&state);
            silent.push((client, tokio::spawn(async move { arrive(accepted, local, &state).await })));
        }
        eventually("two connections wait", || state.admission.pending.of(Pender::Uid(1000)) == 2).await;
        assert_eq!(state.admission.all.open(), 2, "waiting connections count against max_connections");

        let (mut third, accepted) = UnixStream::pair().unwrap();
        arrive(accepted, local, &state).await;
        let resp = answer_to(&mut third).await;
        let e = resp.result.expect_err("over max_pending_per_uid");
        assert_eq!(e.code, Code::ResourceExhausted);
        assert!(
            e.message.contains("uid 1000") && e.message.contains("limits.max_pending_per_uid"),
            "{}",
            e.message
        );
        assert!(!worker_got_anything(&worker).await);
        assert_eq!(state.admission.all.open(), 2, "the one over the cap was never counted");

        let (_burst, accepted) = client().await;
        arrive(accepted, local, &state).await;
        let (msg, _fds) = worker.recv_fds::<ToWorker>().await.unwrap().unwrap();
        assert!(matches!(msg, ToWorker::Connection(_)), "over the cap but saying Hello: {msg:?}");

        // Another uid is not held back by this one's.
        let (mut other, accepted) = client().await;
        arrive(accepted, Peer::Unix { uid: 5, gid: 5, pid: 1 }, &state).await;
        assert_eq!(answer_to(&mut other).await.result.expect_err("not acme's").code, Code::PermissionDenied);
        let (msg, _) = worker.recv_fds::<ToWorker>().await.unwrap().unwrap();
        assert!(matches!(msg, ToWorker::Refused(_)), "{msg:?}");

        // One of the silent ones says Hello: it is handed over, and its place is free.
        let (mut late, task) = silent.pop().unwrap();
        let mut frame = Vec::new();
        let hello = Hello {
            protocol_version: kekd_proto::PROTOCOL_VERSION,
            tenant: TenantName::parse("acme").unwrap(),
            client_name: "late".into(),
        };
        kekd_proto::encode_request(
            Request { id: 3, metadata: Metadata::default(), op: Op::Hello(hello) },
            &mut frame,
        );
        late.write_all(&frame).await.unwrap();
        task.await.unwrap();
        let (msg, _fds) = worker.recv_fds::<ToWorker>().await.unwrap().unwrap();
        assert!(matches!(msg, ToWorker::Connection(_)), "{msg:?}");
        assert_eq!(state.admission.pending.of(Pender::Uid(1000)), 1);
        let (_silent_again, accepted) = UnixStream::pair().unwrap();
        let waiting = tokio::spawn({
            let state = Arc::clone(&state);
            async move { arrive(accepted, local, &state).await }
        });
        eventually("room to wait again", || state.admission.pending.of(Pender::Uid(1000)) == 2).await;
        waiting.abort();
    }

    /// Refused Hellos of one caller reach the tenant's worker folded: the first at once,
    /// the others as one refusal with their count at the end of the window, and the counts
    /// add up to the attempts.
    #[tokio::test]
    async fn refusals_reach_the_worker_folded_and_counted() {
        let (state, worker) = supervisor();
        let attempts = 50;
        for pid in 0..attempts {
            let (mut caller, accepted) = client().await;
            arrive(accepted, Peer::Unix { uid: 5, gid: 5, pid }, &state).await;
            assert_eq!(
                answer_to(&mut caller).await.result.expect_err("refused").code,
                Code::PermissionDenied
            );
        }
        let mut counted = 0;
        let mut messages = 0;
        while counted < attempts as u64 {
            let next = tokio::time::timeout(Duration::from_secs(5), worker.recv::<ToWorker>()).await;
            let (msg, _) = next.expect("the fold is flushed within its window").unwrap().unwrap();
            let ToWorker::Refused(r) = msg else { panic!("expected a refusal, got {msg:?}") };
            if messages == 0 {
                assert_eq!((r.count, r.peer), (1, Peer::Unix { uid: 5, gid: 5, pid: 0 }), "the first");
            }
            counted += r.count;
            messages += 1;
        }
        assert_eq!(counted, attempts as u64, "the counts add up to the attempts");
        assert!(messages < 5, "{messages} messages for {attempts} refusals");
        eventually("the fold ends after a quiet window", || state.admission.denials.open() == 0).await;
    }
}
