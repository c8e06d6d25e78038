//! Connections: the Unix listener (the supervisor's) and pipelined serving of a greeted
//! connection (a worker's).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use kekd_proto::{encode_response, pb, Code, ErrorStatus, FrameError, FrameReader, Request, Response};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tracing::Instrument as _;
use zeroize::{Zeroize, Zeroizing};

use crate::audit::Caller;
use crate::service::TenantService;

/// Requests one connection may have in flight; further frames wait to be read.
const MAX_IN_FLIGHT: usize = 256;
/// Responses ready at the same time are sent in one write of up to this size.
const WRITE_BATCH_BYTES: usize = 256 * 1024;

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

/// Next request: `Ok(None)` at a clean close; `Ok(Some(Err))` for a request that was framed
/// fine but is invalid (answer it, keep serving); `Err` for a broken stream (answer if
/// there is something to say, then close).
async fn read_request<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
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
///
/// Once `stop` turns true no further request is read; the requests already read are
/// answered, then the connection closes.
/// Any transport: the read and write halves of a Unix or a vsock stream.
pub async fn serve<R, W>(
    service: Arc<TenantService>,
    caller: Arc<Caller>,
    mut reader: FrameReader<R>,
    write: W,
    mut stop: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Response>(MAX_IN_FLIGHT);
    let writer = tokio::spawn(write_responses(write, rx).in_current_span());
    loop {
        let next = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            next = read_request(&mut reader) => next,
        };
        match next {
            Ok(None) => break,
            Ok(Some(Err(resp))) => {
                service.audit_refusal(&caller, "invalid_request", None, &resp).await;
                if tx.send(resp).await.is_err() {
                    break;
                }
            }
            Ok(Some(Ok(req))) => {
                // A slot in the answer channel, reserved before the request starts: at most
                // MAX_IN_FLIGHT requests run or wait to be written out per connection, and
                // an answer can always be sent without waiting, from any task or thread.
                let Ok(slot) = tx.clone().reserve_owned().await else { break };
                let (service, caller) = (Arc::clone(&service), Arc::clone(&caller));
                tokio::spawn(
                    async move {
                        // The answer goes out as soon as its audit record is written, from
                        // whichever request wrote it.
                        service.handle_then(&caller, req, move |resp| drop(slot.send(resp))).await;
                    }
                    .in_current_span(),
                );
            }
            Err(resp) => {
                if let Some(resp) = resp {
                    limited_info!(tenant = %service.tenant(), peer = %caller.peer, "closing connection after a bad frame");
                    service.audit_refusal(&caller, "invalid_frame", None, &resp).await;
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
async fn write_responses<W: AsyncWrite + Unpin>(mut write: W, mut rx: mpsc::Receiver<Response>) {
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
        limited_debug!(error = %e, "writing responses failed; closing the connection");
    }
}

async fn flush<W: AsyncWrite + Unpin>(write: &mut W, batch: &mut Vec<u8>) -> std::io::Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let res = write.write_all(batch).await;
    batch.as_mut_slice().zeroize();
    batch.clear();
    res
}

/// Sends one response on its own (handshake answers, the worker's HelloOk).
pub async fn send<W: AsyncWrite + Unpin>(write: &mut W, resp: Response) -> std::io::Result<()> {
    kekd_proto::frame::write_frame(write, &pb::Response::from(resp)).await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use kekd_proto::{encode_request, KeyName, Metadata, Op};
    use tokio::io::AsyncWriteExt;
    use tokio::net::UnixStream;

    use super::*;
    use crate::service::testing::{service, user};

    fn generate(id: u64) -> Vec<u8> {
        let op = Op::Generate {
            key: KeyName::parse("default").unwrap(),
            edek_only: true,
            contexts: vec![kekd_proto::Context::default()],
        };
        let mut frame = Vec::new();
        encode_request(Request { id, metadata: Metadata::default(), op }, &mut frame);
        frame
    }

    /// The drain contract of SIGTERM, shown with a root key held slow on purpose: a request
    /// already read is answered after the stop, one sent after it is not read, and then
    /// the connection closes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_answers_requests_in_flight_then_closes() {
        let dir = tempfile::tempdir().unwrap();
        let (svc, root) = service(dir.path(), "acme");
        svc.flush();
        root.hold.store(true, Ordering::SeqCst);
        let (client, server) = UnixStream::pair().unwrap();
        let (read, write) = server.into_split();
        let (stop_tx, stop) = watch::channel(false);
        let served = tokio::spawn(serve(
            Arc::new(svc),
            Arc::new(user()),
            FrameReader::new(read, 1 << 20),
            write,
            stop,
        ));

        let (client_read, mut client_write) = client.into_split();
        client_write.write_all(&generate(7)).await.unwrap();
        // In flight: read, and waiting on the (cold, held) root key.
        tokio::time::timeout(Duration::from_secs(5), async {
            while root.entered.load(Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the generate reaches the root key");
        stop_tx.send(true).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = client_write.write_all(&generate(8)).await;
        root.hold.store(false, Ordering::SeqCst);

        let mut responses = FrameReader::new(client_read, 1 << 20);
        let first = tokio::time::timeout(Duration::from_secs(5), responses.read::<pb::Response>())
            .await
            .expect("the request in flight is answered")
            .unwrap()
            .expect("a response, not a close");
        assert_eq!(first.request_id, 7);
        assert_eq!(first.status.map_or(0, |s| s.code), Code::Ok as i32);
        let next =
            tokio::time::timeout(Duration::from_secs(5), responses.read::<pb::Response>()).await.unwrap();
        // Closed without serving it: EOF, or a reset since the unread request was discarded.
        assert!(
            matches!(next, Ok(None) | Err(FrameError::Io(_))),
            "the request sent after the stop was served: {next:?}"
        );
        tokio::time::timeout(Duration::from_secs(5), served).await.unwrap().unwrap();
    }
}
