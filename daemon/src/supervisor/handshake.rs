//! The supervisor's part of a connection: who is calling (SO_PEERCRED), which tenant they
//! ask for (Hello), whether they may (the tenant's ACL), whether there is room for it (the
//! connection limits), and the hand-off of the socket to that tenant's worker. The
//! supervisor reads exactly the Hello frame and not a byte more: whatever the client
//! pipelined behind it stays in the socket for the worker, and no request or response
//! ever passes through here.
//!
//! Connection limits: a connection counts against `max_connections` from its accept, and
//! against its tenant's `max_connections_per_tenant` from its admission, until the worker
//! serving it closes it. The supervisor no longer holds a handed-over socket, so it passes
//! a *lease* with it: one end of a socket pair, which the worker keeps as long as the
//! connection and closes with it (the kernel closes it if the worker dies). The
//! supervisor's end reads EOF then, and the connection stops counting.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use kekd_proto::{pb, Code, ErrorStatus, FrameError, Hello, Op, Request, Response, TenantName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::UnixStream;
use zeroize::Zeroizing;

use super::State;
use crate::audit::Caller;
use crate::config::{LimitsConfig, TenantConfig};
use crate::handoff::{Channel, Handoff, Refusal, ToWorker};
use crate::server;
use crate::service::{Peer, Role};

/// A worker whose control channel stays full this long is stuck; its callers get
/// UNAVAILABLE instead of waiting on it.
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections over `max_connections` whose Hello is awaited (so that the refusal echoes
/// its id and reaches a client still writing it) at most at once; any more are refused
/// without waiting.
const REFUSING_AT_ONCE: usize = 64;
/// How long a connection over `max_connections` may take to send its Hello.
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
}

impl Admission {
    fn tenant(&self, name: &TenantName) -> Arc<Gauge> {
        let mut tenants = self.tenants.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(tenants.entry(name.clone()).or_default())
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

/// A connection on the Unix socket: the peer is who the kernel says (SO_PEERCRED).
pub async fn connection(stream: UnixStream, state: &State) {
    let peer = match stream.peer_cred() {
        Ok(c) => Peer::Unix { uid: c.uid(), gid: c.gid(), pid: c.pid().unwrap_or(0) },
        Err(e) => {
            limited_warn!(error = %e, "cannot read peer credentials; closing");
            return;
        }
    };
    greet(stream, peer, state).await
}

/// Greets one accepted connection, of either transport, and hands it to its tenant's
/// worker, or answers why not and closes it.
pub async fn greet<S>(mut stream: S, peer: Peer, state: &State)
where
    S: AsyncRead + AsyncWrite + AsFd + Unpin,
{
    let limits = state.limits();
    // Counted from here, before the Hello: a client that never sends one holds a
    // connection too, for up to frame_read_timeout.
    let Some(counted) = state.admission.all.try_take(limits.max_connections) else {
        return refuse_over_limit(stream, peer, state, &limits).await;
    };
    let wait = limits.frame_read_timeout;
    let hello = match tokio::time::timeout(wait, read_hello(&mut stream, state.max_frame())).await {
        Ok(Ok(hello)) => hello,
        Ok(Err(Some(resp))) => return answer(stream, resp).await,
        Ok(Err(None)) => return,
        Err(_) => {
            limited_info!(%peer, "no hello within {wait:?} (limits.frame_read_timeout); closing");
            return;
        }
    };
    let (id, hello) = hello;
    let exe = peer_exe(&peer);
    let fail = |code, msg: String| Response { id, result: Err(ErrorStatus::new(code, msg)) };
    let (role, link) = match admit(state, &hello, &peer) {
        Ok(admitted) => admitted,
        Err((code, msg)) => {
            if code == Code::PermissionDenied {
                // The denial goes into the tenant's own audit trail, through its worker.
                let refusal = Refusal {
                    peer,
                    exe,
                    hello_id: id,
                    code: code.as_str_name().to_owned(),
                    message: msg.clone(),
                };
                let link = state.with_tenant(&hello.tenant, |t| t.and_then(|(_, w)| w.link()));
                if let Some(link) = link {
                    let msg = ToWorker::Refused(refusal);
                    if tokio::time::timeout(HANDOFF_TIMEOUT, link.send(&msg, None))
                        .await
                        .map_or(true, |r| r.is_err())
                    {
                        limited_warn!(tenant = %hello.tenant, %peer, "cannot pass a denial to the worker for its audit trail");
                    }
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

/// Keeps a handed-over connection counted until its worker closes the lease.
async fn count_until_closed(mut lease: UnixStream, slots: (Slot, Slot)) {
    // The worker never writes: a read ends at EOF (or an error) once its end is closed.
    let mut byte = [0u8; 1];
    while matches!(lease.read(&mut byte).await, Ok(1..)) {}
    drop(slots);
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

/// The caller's executable, for the audit trail. Read at connect time by the supervisor
/// (root), since a worker that dropped privileges cannot read other users' `/proc`.
fn peer_exe(peer: &Peer) -> Option<String> {
    let pid = peer.pid()?;
    std::fs::read_link(format!("/proc/{pid}/exe")).ok().map(|p| p.to_string_lossy().into_owned())
}

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

    /// The supervisor of one tenant, `acme`, that admits guest CID 5 and local uid 1000,
    /// and the worker's end of its control channel.
    fn supervisor() -> (State, Channel) {
        supervisor_with("")
    }

    /// [`supervisor`] with these lines in its `[limits]` table.
    fn supervisor_with(limits: &str) -> (State, Channel) {
        let text = format!(
            "[limits]\n{limits}\n[tenants.acme]\nallow_uids = [1000]\nallow_cids = [5]\n\
             [tenants.acme.tpm]\ntcti = \"device:/dev/null\"\n"
        );
        let cfg = Config::parse(&text).unwrap();
        let tenant = &cfg.tenants()[0];
        let (ours, theirs) = handoff::pair().unwrap();
        let worker =
            WorkerProcess::attached(WorkerSpec::new(&cfg, tenant), Arc::new(Channel::new(ours).unwrap()));
        let tenants = BTreeMap::from([(tenant.name.clone(), (Acl::from_config(&tenant.config), worker))]);
        (State::new(tenants, &cfg), Channel::new(theirs).unwrap())
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
        greet(accepted, Peer::Vsock { cid: 5, port: 1024 }, &state).await;
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
            greet(accepted, peer, &state).await;
            let resp = answer_to(&mut stranger).await;
            let e = resp.result.expect_err("refused");
            assert_eq!(e.code, Code::PermissionDenied);
            assert!(e.message.contains(who) && e.message.contains("acme"), "{}", e.message);
            let (msg, fd) = worker.recv::<ToWorker>().await.unwrap().unwrap();
            let ToWorker::Refused(refusal) = msg else { panic!("expected a refusal, got {msg:?}") };
            assert_eq!(refusal.peer, peer, "the denial is audited with the caller's identity");
            assert!(fd.is_none(), "a refused socket stays with the supervisor");
        }

        // The local caller the same tenant allows is still handed over as before.
        let (_local, accepted) = client().await;
        greet(accepted, Peer::Unix { uid: 1000, gid: 1000, pid: 1 }, &state).await;
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
        let state = Arc::new(state);
        let local = Peer::Unix { uid: 1000, gid: 1000, pid: 1 };

        let (_first, accepted) = client().await;
        greet(accepted, local, &state).await;
        let (_, fds) = worker.recv_fds::<ToWorker>().await.unwrap().unwrap();
        let [_conn, lease]: [OwnedFd; 2] = fds.try_into().expect("the socket and its lease");
        assert_eq!(state.admission.all.open(), 1, "handed over, and still counted");

        let (mut second, accepted) = client().await;
        greet(accepted, local, &state).await;
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
            async move { greet(accepted, local, &state).await }
        });
        eventually("the silent connection is counted", || state.admission.all.open() == 2).await;
        let (mut third, accepted) = client().await;
        greet(accepted, local, &state).await;
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
        greet(accepted, local, &state).await;
        let (msg, _) = worker.recv_fds::<ToWorker>().await.unwrap().unwrap();
        assert!(matches!(msg, ToWorker::Connection(_)), "admitted again: {msg:?}");
    }
}
