//! The supervisor's part of a connection: who is calling (SO_PEERCRED), which tenant they
//! ask for (Hello), whether they may (the tenant's ACL), and the hand-off of the socket to
//! that tenant's worker. The supervisor reads exactly the Hello frame and not a byte more:
//! whatever the client pipelined behind it stays in the socket for the worker, and no
//! request or response ever passes through here.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use kekd_proto::{pb, Code, ErrorStatus, FrameError, Hello, Op, Request, Response};
use tokio::io::AsyncReadExt;
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
}

impl Acl {
    pub fn from_config(c: &TenantConfig) -> Self {
        Acl {
            allow_uids: c.allow_uids.clone(),
            allow_gids: c.allow_gids.clone(),
            admin_uids: c.admin_uids.clone(),
        }
    }

    /// None: the peer may not use this tenant at all.
    pub fn role(&self, peer: &Peer) -> Option<Role> {
        if self.admin_uids.contains(&peer.uid) {
            Some(Role::Admin)
        } else if self.allow_uids.contains(&peer.uid) || self.allow_gids.contains(&peer.gid) {
            Some(Role::User)
        } else {
            None
        }
    }
}

/// Greets one accepted connection and hands it to its tenant's worker, or answers why not
/// and closes it.
pub async fn connection(mut stream: UnixStream, state: &State) {
    let peer = match stream.peer_cred() {
        Ok(c) => Peer { uid: c.uid(), gid: c.gid(), pid: c.pid().unwrap_or(0) },
        Err(e) => {
            tracing::warn!(error = %e, "cannot read peer credentials; closing");
            return;
        }
    };
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, read_hello(&mut stream, state.max_frame())).await {
        Ok(Ok(hello)) => hello,
        Ok(Err(Some(resp))) => return answer(stream, resp).await,
        Ok(Err(None)) => return,
        Err(_) => {
            tracing::info!(uid = peer.uid, pid = peer.pid, "no hello within {HELLO_TIMEOUT:?}; closing");
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
                        tracing::warn!(tenant = %hello.tenant, uid = peer.uid, "cannot pass a denial to the worker for its audit trail");
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
            tracing::debug!(tenant, uid = peer.uid, pid = peer.pid, client = %hello.client_name, "connection handed over");
            return;
        }
        Ok(Err(e)) => {
            tracing::warn!(tenant, error = %e, "cannot hand a connection to the worker");
            format!("tenant {tenant:?} is restarting; retry shortly")
        }
        Err(_) => {
            tracing::warn!(tenant, "the worker took no connection for {HANDOFF_TIMEOUT:?}");
            format!("tenant {tenant:?} is not taking connections; retry shortly")
        }
    };
    answer(stream, fail(Code::Unavailable, refused)).await
}

type Admitted = (Role, Option<Arc<Channel>>);

/// The caller's executable, for the audit trail. Read at connect time by the supervisor
/// (root), since a worker that dropped privileges cannot read other users' `/proc`.
fn peer_exe(peer: &Peer) -> Option<String> {
    if peer.pid <= 0 {
        return None;
    }
    std::fs::read_link(format!("/proc/{}/exe", peer.pid)).ok().map(|p| p.to_string_lossy().into_owned())
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
            tracing::info!(tenant = %hello.tenant, uid = peer.uid, pid = peer.pid, "hello for an unknown tenant");
            return Err((Code::NotFound, format!("tenant {:?} does not exist", hello.tenant.as_str())));
        };
        let Some(role) = acl.role(peer) else {
            tracing::warn!(tenant = %hello.tenant, uid = peer.uid, gid = peer.gid, pid = peer.pid, "caller not allowed");
            return Err((
                Code::PermissionDenied,
                format!("uid {} gid {} may not use tenant {:?}", peer.uid, peer.gid, hello.tenant.as_str()),
            ));
        };
        Ok((role, worker.link()))
    })
}

/// Reads the first frame exactly (length, then that many bytes) and requires a Hello.
/// `Err(None)`: the peer went away; `Err(Some)`: answer this, then close.
async fn read_hello(stream: &mut UnixStream, max: usize) -> Result<(u64, Hello), Option<Response>> {
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

async fn answer(mut stream: UnixStream, resp: Response) {
    let _ = server::send(&mut stream, resp).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acl_roles() {
        let acl = Acl { allow_uids: vec![1000], allow_gids: vec![50], admin_uids: vec![0] };
        assert_eq!(acl.role(&Peer { uid: 0, gid: 0, pid: 1 }), Some(Role::Admin));
        assert_eq!(acl.role(&Peer { uid: 1000, gid: 1000, pid: 1 }), Some(Role::User));
        assert_eq!(acl.role(&Peer { uid: 7, gid: 50, pid: 1 }), Some(Role::User));
        assert_eq!(acl.role(&Peer { uid: 7, gid: 7, pid: 1 }), None);
    }
}
