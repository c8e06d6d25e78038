//! Connections: the Unix listener, the Hello handshake and pipelined serving.
//!
//! The handshake (peer credentials, Hello, tenant lookup, ACL) is separate from serving a
//! greeted connection, so that the handshake can move to a supervisor and serving to a
//! tenant's own process without changing either.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use kekd_proto::{
    encode_response, pb, Code, ErrorStatus, FrameError, FrameReader, Op, Reply, Request, Response, TenantName,
};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, Semaphore};
use zeroize::{Zeroize, Zeroizing};

use crate::service::{Peer, Role, TenantService};

/// Requests one connection may have in flight; further frames wait to be read.
const MAX_IN_FLIGHT: usize = 256;
/// Responses ready at the same time are sent in one write of up to this size.
const WRITE_BATCH_BYTES: usize = 256 * 1024;

/// The tenants this process serves, by name.
pub type Tenants = Arc<BTreeMap<TenantName, Arc<TenantService>>>;

/// Binds the socket, replacing a stale socket file but never a live one.
pub fn bind(path: &Path, mode: u32) -> std::io::Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by another kekd", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// Accepts connections until the task is dropped.
pub async fn accept_loop(listener: UnixListener, tenants: Tenants, max_frame: usize) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let tenants = Arc::clone(&tenants);
                tokio::spawn(async move { connection(stream, tenants, max_frame).await });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(stream: UnixStream, tenants: Tenants, max_frame: usize) {
    let peer = match stream.peer_cred() {
        Ok(c) => Peer { uid: c.uid(), gid: c.gid(), pid: c.pid().unwrap_or(0) },
        Err(e) => {
            tracing::warn!(error = %e, "cannot read peer credentials; closing");
            return;
        }
    };
    let (read, mut write) = stream.into_split();
    let mut reader = FrameReader::new(read, max_frame);
    match handshake(&mut reader, &tenants, &peer).await {
        Ok((service, role, hello)) => {
            if send(&mut write, Response { id: hello, result: Ok(Reply::Hello(service.hello(role))) })
                .await
                .is_ok()
            {
                serve(service, role, peer, reader, write).await;
            }
        }
        Err(Some(resp)) => {
            let _ = send(&mut write, resp).await;
        }
        Err(None) => {}
    }
}

/// Reads the Hello and decides the tenant and role. On failure, the response to send
/// before closing (None when the peer went away).
async fn handshake(
    reader: &mut FrameReader<OwnedReadHalf>,
    tenants: &Tenants,
    peer: &Peer,
) -> Result<(Arc<TenantService>, Role, u64), Option<Response>> {
    let fail = |id, code, msg: String| Some(Response { id, result: Err(ErrorStatus::new(code, msg)) });
    let req = match read_request(reader).await {
        Ok(Some(Ok(req))) => req,
        Ok(Some(Err(resp))) => return Err(Some(resp)),
        Ok(None) => return Err(None),
        Err(resp) => return Err(resp),
    };
    let Op::Hello(hello) = req.op else {
        return Err(fail(
            req.id,
            Code::InvalidArgument,
            "the first request on a connection must be hello".into(),
        ));
    };
    if hello.protocol_version != kekd_proto::PROTOCOL_VERSION {
        return Err(fail(
            req.id,
            Code::FailedPrecondition,
            format!(
                "protocol version {} is not supported (kekd speaks {})",
                hello.protocol_version,
                kekd_proto::PROTOCOL_VERSION
            ),
        ));
    }
    let Some(service) = tenants.get(&hello.tenant) else {
        tracing::info!(tenant = %hello.tenant, uid = peer.uid, pid = peer.pid, "hello for an unknown tenant");
        return Err(fail(
            req.id,
            Code::NotFound,
            format!("tenant {:?} does not exist", hello.tenant.as_str()),
        ));
    };
    let Some(role) = service.role(peer) else {
        tracing::warn!(tenant = %hello.tenant, uid = peer.uid, gid = peer.gid, pid = peer.pid, "caller not allowed");
        return Err(fail(
            req.id,
            Code::PermissionDenied,
            format!("uid {} gid {} may not use tenant {:?}", peer.uid, peer.gid, hello.tenant.as_str()),
        ));
    };
    tracing::debug!(tenant = %hello.tenant, uid = peer.uid, pid = peer.pid, client = %hello.client_name, "connection greeted");
    Ok((Arc::clone(service), role, req.id))
}

/// Next request: `Ok(None)` at a clean close; `Ok(Some(Err))` for a request that was framed
/// fine but is invalid (answer it, keep serving); `Err` for a broken stream (answer if
/// there is something to say, then close).
async fn read_request(
    reader: &mut FrameReader<OwnedReadHalf>,
) -> Result<Option<Result<Request, Response>>, Option<Response>> {
    let close_with = |code, msg: String| Some(Response { id: 0, result: Err(ErrorStatus::new(code, msg)) });
    match reader.read::<pb::Request>().await {
        Ok(None) => Ok(None),
        Ok(Some(msg)) => Ok(Some(
            Request::try_from(msg).map_err(|rej| Response { id: rej.id, result: Err(rej.error.into()) }),
        )),
        Err(e @ FrameError::TooLarge { .. }) => Err(close_with(Code::ResourceExhausted, e.to_string())),
        Err(e @ FrameError::Decode(_)) => Err(close_with(Code::InvalidArgument, e.to_string())),
        Err(FrameError::Truncated | FrameError::Io(_)) => Err(None),
    }
}

/// Serves a greeted connection: each request runs as its own task (so a slow root-key
/// call does not hold up the requests behind it) and answers in completion order.
pub async fn serve(
    service: Arc<TenantService>,
    role: Role,
    peer: Peer,
    mut reader: FrameReader<OwnedReadHalf>,
    write: OwnedWriteHalf,
) {
    let (tx, rx) = mpsc::channel::<Response>(MAX_IN_FLIGHT);
    let writer = tokio::spawn(write_responses(write, rx));
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    loop {
        match read_request(&mut reader).await {
            Ok(None) => break,
            Ok(Some(Err(resp))) => {
                if tx.send(resp).await.is_err() {
                    break;
                }
            }
            Ok(Some(Ok(req))) => {
                let permit = Arc::clone(&in_flight).acquire_owned().await.expect("semaphore is never closed");
                let (service, tx) = (Arc::clone(&service), tx.clone());
                tokio::spawn(async move {
                    let resp = service.handle(role, &peer, req).await;
                    let _ = tx.send(resp).await;
                    drop(permit);
                });
            }
            Err(resp) => {
                if let Some(resp) = resp {
                    tracing::info!(tenant = %service.tenant(), uid = peer.uid, pid = peer.pid, "closing connection after a bad frame");
                    let _ = tx.send(resp).await;
                }
                break;
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// Writes responses, coalescing whatever is ready into one write. Frames carry plaintext
/// keys, so every buffer is wiped after use, and the batch buffer never grows: a
/// reallocation would free a copy of its contents unwiped (a frame that does not fit is
/// written on its own).
async fn write_responses(mut write: OwnedWriteHalf, mut rx: mpsc::Receiver<Response>) {
    let mut batch = Zeroizing::new(Vec::with_capacity(WRITE_BATCH_BYTES));
    let mut frame = Zeroizing::new(Vec::new());
    let result = async {
        while let Some(mut resp) = rx.recv().await {
            loop {
                // Into an empty buffer, encode_response allocates the exact frame size.
                frame.zeroize();
                encode_response(resp, &mut frame);
                if frame.len() > batch.capacity() - batch.len() {
                    flush(&mut write, &mut batch).await?;
                }
                if frame.len() > batch.capacity() {
                    write.write_all(&frame).await?;
                } else {
                    batch.extend_from_slice(&frame);
                }
                match rx.try_recv() {
                    Ok(next) => resp = next,
                    Err(_) => break,
                }
            }
            flush(&mut write, &mut batch).await?;
        }
        write.shutdown().await
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "writing responses failed; closing the connection");
    }
}

async fn flush(write: &mut OwnedWriteHalf, batch: &mut Vec<u8>) -> std::io::Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let res = write.write_all(batch).await;
    batch.as_mut_slice().zeroize();
    batch.clear();
    res
}

async fn send(write: &mut OwnedWriteHalf, resp: Response) -> std::io::Result<()> {
    kekd_proto::frame::write_frame(write, &pb::Response::from(resp)).await
}
