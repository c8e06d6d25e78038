//! The supervisor's part of a connection: who is calling (SO_PEERCRED), which tenant they
//! ask for (Hello), whether they may (the tenant's ACL), and the hand-off of the socket to
//! that tenant's worker. The supervisor reads exactly the Hello frame and not a byte more:
//! whatever the client pipelined behind it stays in the socket for the worker, and no
//! request or response ever passes through here.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use kekd_proto::{pb, Code, ErrorStatus, FrameError, Hello, Op, Request, Response};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::UnixStream;
use zeroize::Zeroizing;

use super::State;
use crate::audit::Caller;
use crate::config::TenantConfig;
use crate::handoff::{Channel, Handoff, Refusal, ToWorker};
use crate::server;
use crate::service::{Peer, Role};

/// A client that has not sent its Hello by then is dropped, so idle sockets cannot pile
/// up in the supervisor.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// A worker whose control channel stays full this long is stuck; its callers get
/// UNAVAILABLE instead of waiting on it.
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(5);

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
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, read_hello(&mut stream, state.max_frame())).await {
        Ok(Ok(hello)) => hello,
        Ok(Err(Some(resp))) => return answer(stream, resp).await,
        Ok(Err(None)) => return,
        Err(_) => {
            limited_info!(%peer, "no hello within {HELLO_TIMEOUT:?}; closing");
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
    let handoff = ToWorker::Connection(Handoff { caller: Caller { peer, exe, role }, hello_id: id });
    let tenant = hello.tenant.as_str();
    let refused = match tokio::time::timeout(HANDOFF_TIMEOUT, link.send(&handoff, Some(stream.as_fd()))).await
    {
        // Our copy of the socket closes here; the worker's copy carries on.
        Ok(Ok(())) => {
            limited_debug!(tenant, %peer, client = %hello.client_name, "connection handed over");
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
    use std::sync::atomic::AtomicUsize;
    use std::sync::RwLock;

    use kekd_proto::{Metadata, TenantName};
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
        let text = "[tenants.acme]\nallow_uids = [1000]\nallow_cids = [5]\n[tenants.acme.tpm]\ntcti = \"device:/dev/null\"\n";
        let cfg = Config::parse(text).unwrap();
        let tenant = &cfg.tenants()[0];
        let (ours, theirs) = handoff::pair().unwrap();
        let worker =
            WorkerProcess::attached(WorkerSpec::new(&cfg, tenant), Arc::new(Channel::new(ours).unwrap()));
        let tenants = BTreeMap::from([(tenant.name.clone(), (Acl::from_config(&tenant.config), worker))]);
        let state = State { tenants: RwLock::new(tenants), max_frame: AtomicUsize::new(1 << 20) };
        (state, Channel::new(theirs).unwrap())
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
        let (msg, fd) = worker.recv::<ToWorker>().await.unwrap().unwrap();
        let ToWorker::Connection(handoff) = msg else { panic!("expected a connection, got {msg:?}") };
        assert_eq!(handoff.caller.peer, Peer::Vsock { cid: 5, port: 1024 });
        assert_eq!(handoff.caller.role, Role::User);
        assert_eq!(handoff.caller.exe, None, "a guest has no local executable");
        assert_eq!(handoff.hello_id, 9);
        // The descriptor is the guest's own connection: what the worker writes, it reads.
        let mut passed = std::os::unix::net::UnixStream::from(fd.expect("the socket is passed"));
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
        let (msg, _) = worker.recv::<ToWorker>().await.unwrap().unwrap();
        let local = Peer::Unix { uid: 1000, gid: 1000, pid: 1 };
        assert!(
            matches!(msg, ToWorker::Connection(h) if h.caller.peer == local && h.caller.role == Role::User)
        );
    }
}
