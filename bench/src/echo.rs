//! (d) The transport floor: a raw echo over a Unix socket of frames the size of a `kekctl
//! bench` unwrap request and of kekd's answer, between two processes with the threading
//! of kekctl bench (client: a multi-thread runtime, one worker per core) and of kekd's
//! worker (server: the same). Nothing is parsed beyond the length prefix and nothing is
//! computed: each side reads what the socket has in one buffered read and writes its
//! answer in one write, so a round trip is one `write` and one `read` per side plus the
//! wake-ups between them.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::edek::{response_len, unwrap_request_frame, unwrap_response_frame};
use crate::measure::{histogram, record, Report};
use crate::{fail, Context as _, Timing};

#[derive(Debug, Clone)]
pub struct Options {
    pub connections: usize,
    pub batch: usize,
    pub client_threads: usize,
    pub server_threads: usize,
    pub socket: Option<PathBuf>,
}

const READ_BUF: usize = 64 * 1024;

/// The client: starts the server process, then measures.
pub fn run(opts: Options, timing: Timing) -> crate::Result<Report> {
    let temp = std::env::temp_dir().join(format!("kekd-bench-echo-{}", std::process::id()));
    let socket = match &opts.socket {
        Some(s) => s.clone(),
        None => {
            std::fs::create_dir_all(&temp).context(|| format!("create {}", temp.display()))?;
            temp.join("echo.sock")
        }
    };
    let _ = std::fs::remove_file(&socket);
    let exe = std::env::current_exe().context(|| "find my own binary".into())?;
    // The server exits when its stdin closes: when this process ends, however it ends.
    let mut server = Command::new(exe)
        .arg("echo-server")
        .arg("--socket")
        .arg(&socket)
        .args(["--batch", &opts.batch.to_string(), "--threads", &opts.server_threads.to_string()])
        .stdin(Stdio::piped())
        .spawn()
        .context(|| "start the echo server".into())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.client_threads.max(1))
        .enable_all()
        .build()
        .context(|| "start the runtime".into())?;
    let result = rt.block_on(measure(&socket, &opts, timing));
    drop(server.stdin.take());
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_dir(&temp);
    let report = result?;
    Ok(report
        .with("request_frame_bytes", unwrap_request_frame(opts.batch).len())
        .with("response_frame_bytes", response_len(opts.batch))
        .with("client_threads", opts.client_threads)
        .with("server_threads", opts.server_threads))
}

async fn measure(socket: &Path, opts: &Options, timing: Timing) -> crate::Result<Report> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut streams = Vec::with_capacity(opts.connections);
    while streams.len() < opts.connections.max(1) {
        match UnixStream::connect(socket).await {
            Ok(s) => streams.push(s),
            Err(_) if streams.is_empty() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => fail!("connect to {}: {e}", socket.display()),
        }
    }
    let request = unwrap_request_frame(opts.batch);
    let answer_len = response_len(opts.batch);
    let start = tokio::time::Instant::now();
    let (from, end) = (start + timing.warmup, start + timing.warmup + timing.duration);
    let mut tasks = tokio::task::JoinSet::new();
    for stream in streams {
        let request = request.clone();
        tasks.spawn(connection(stream, request, answer_len, from, end));
    }
    let mut per_conn = Vec::new();
    let mut latency = histogram();
    while let Some(done) = tasks.join_next().await {
        let (n, took, h) = done.context(|| "a connection task".into())?.context(|| "echo".into())?;
        per_conn.push((n, took));
        latency.add(&h).expect("same bounds");
    }
    Ok(Report::new("echo", opts.batch, &per_conn, Some(&latency), 0))
}

/// One connection, one request at a time: write it, read the whole answer, again.
async fn connection(
    mut stream: UnixStream,
    request: Vec<u8>,
    answer_len: usize,
    from: tokio::time::Instant,
    end: tokio::time::Instant,
) -> std::io::Result<(u64, Duration, hdrhistogram::Histogram<u64>)> {
    let mut buf = vec![0u8; READ_BUF.max(answer_len)];
    let mut h = histogram();
    let mut n = 0u64;
    let mut first = None;
    let mut now = tokio::time::Instant::now();
    while now < end {
        let sent = now;
        stream.write_all(&request).await?;
        let mut got = 0;
        while got < answer_len {
            match stream.read(&mut buf[got..]).await? {
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                k => got += k,
            }
        }
        now = tokio::time::Instant::now();
        if sent >= from {
            first.get_or_insert(sent);
            record(&mut h, now - sent);
            n += 1;
        }
    }
    Ok((n, first.map_or(Duration::ZERO, |f| now - f), h))
}

/// The server: answers every complete frame it has read with the answer frame, all the
/// answers to one read in one write. Exits when stdin closes.
pub fn serve(socket: &Path, batch: usize, threads: usize) -> crate::Result<()> {
    std::thread::spawn(|| {
        let mut sink = [0u8; 64];
        while !matches!(std::io::stdin().read(&mut sink), Ok(0) | Err(_)) {}
        std::process::exit(0);
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .context(|| "start the runtime".into())?;
    let answer = unwrap_response_frame(batch, 100_000);
    rt.block_on(async move {
        let listener = UnixListener::bind(socket).context(|| format!("bind {}", socket.display()))?;
        loop {
            let (stream, _) = listener.accept().await.context(|| "accept".into())?;
            tokio::spawn(echo(stream, answer.clone()));
        }
    })
}

async fn echo(mut stream: UnixStream, answer: Vec<u8>) -> std::io::Result<()> {
    let mut buf = vec![0u8; READ_BUF];
    let mut filled = 0;
    let mut out = Vec::with_capacity(READ_BUF);
    loop {
        if filled == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        match stream.read(&mut buf[filled..]).await? {
            0 => return Ok(()),
            k => filled += k,
        }
        let mut pos = 0;
        out.clear();
        while filled - pos >= 4 {
            let len = u32::from_be_bytes(buf[pos..pos + 4].try_into().expect("4 bytes")) as usize;
            if filled - pos - 4 < len {
                break;
            }
            pos += 4 + len;
            out.extend_from_slice(&answer);
        }
        buf.copy_within(pos..filled, 0);
        filled -= pos;
        if !out.is_empty() {
            stream.write_all(&out).await?;
        }
    }
}
