//! A kekd without keys: the framing and task layout of kekd's worker (`server::serve`),
//! answering `Hello`, `Generate` and `Unwrap` with well-formed replies of the real sizes
//! but no crypto, no KEK cache, no audit trail and no supervisor hand-off. `kekctl bench`
//! runs against it unchanged, so the figures it gives are what kekd's layout and kekctl's
//! client cost on their own:
//!
//! - one reader task per connection reading frames with `kekd_proto::FrameReader` (one
//!   `read` on the socket brings a frame, or several pipelined ones);
//! - one spawned task per request, holding a slot reserved in a bounded channel;
//! - one writer task coalescing whatever answers are ready into one write, wiping its
//!   buffers as kekd does.

use std::path::Path;

use kekd_proto::{pb, FrameReader};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use zeroize::{Zeroize, Zeroizing};

use crate::edek::{edek_len, unwrap_response, DEK_LEN, KEY, VERSION};
use crate::Context as _;

/// kekd's `server::MAX_IN_FLIGHT` and `WRITE_BATCH_BYTES`.
const MAX_IN_FLIGHT: usize = 256;
const WRITE_BATCH_BYTES: usize = 256 * 1024;
const MAX_FRAME: usize = 1 << 20;

pub fn serve(socket: &Path, threads: usize) -> crate::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .context(|| "start the runtime".into())?;
    rt.block_on(async {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket).context(|| format!("bind {}", socket.display()))?;
        eprintln!("null-kekd ready socket={}", socket.display());
        loop {
            let (stream, _) = listener.accept().await.context(|| "accept".into())?;
            tokio::spawn(connection(stream));
        }
    })
}

async fn connection(stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut reader = FrameReader::new(read, MAX_FRAME);
    // The Hello: kekd's supervisor reads it and the worker answers it.
    let Ok(Some(hello)) = reader.read::<pb::Request>().await else { return };
    let Some(pb::request::Op::Hello(h)) = hello.op else { return };
    let ok = pb::Response {
        request_id: hello.request_id,
        status: Some(pb::Status { code: pb::Code::Ok as i32, message: String::new() }),
        result: Some(pb::response::Result::Hello(pb::HelloOk {
            protocol_version: h.protocol_version,
            tenant: h.tenant,
            admin: false,
        })),
    };
    if kekd_proto::frame::write_frame(&mut write, &ok).await.is_err() {
        return;
    }
    serve_connection(reader, write).await;
}

/// kekd's `server::serve`, with `answer` in place of the tenant service.
async fn serve_connection<R, W>(mut reader: FrameReader<R>, write: W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<pb::Response>(MAX_IN_FLIGHT);
    let writer = tokio::spawn(write_responses(write, rx));
    while let Ok(Some(req)) = reader.read::<pb::Request>().await {
        let Ok(slot) = tx.clone().reserve_owned().await else { break };
        tokio::spawn(async move { slot.send(answer(req)) });
    }
    drop(tx);
    let _ = writer.await;
}

fn answer(req: pb::Request) -> pb::Response {
    use pb::request::Op;
    let ok = || Some(pb::Status { code: pb::Code::Ok as i32, message: String::new() });
    match req.op {
        Some(Op::Unwrap(u)) => unwrap_response(u.items.len(), req.request_id),
        Some(Op::Generate(g)) => {
            let item = pb::ItemResult {
                status: ok(),
                plaintext: if g.edek_only { Vec::new() } else { vec![0x5A; DEK_LEN] },
                edek: vec![0xA5; edek_len()],
                key_name: KEY.to_owned(),
                key_version: VERSION,
            };
            pb::Response {
                request_id: req.request_id,
                status: ok(),
                result: Some(pb::response::Result::Batch(pb::BatchResponse {
                    items: vec![item; g.items.len()],
                })),
            }
        }
        _ => pb::Response {
            request_id: req.request_id,
            status: Some(pb::Status {
                code: pb::Code::InvalidArgument as i32,
                message: "null-kekd answers generate and unwrap only".into(),
            }),
            result: None,
        },
    }
}

/// kekd's `server::write_responses`: coalesce ready answers, wipe every buffer.
async fn write_responses<W: AsyncWrite + Unpin>(mut write: W, mut rx: mpsc::Receiver<pb::Response>) {
    let mut batch = Zeroizing::new(Vec::with_capacity(WRITE_BATCH_BYTES));
    let mut frame = Zeroizing::new(Vec::new());
    let result: std::io::Result<()> = async {
        while let Some(mut resp) = rx.recv().await {
            loop {
                frame.zeroize();
                kekd_proto::frame::encode_frame(&resp, &mut frame);
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
    drop(result);
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
