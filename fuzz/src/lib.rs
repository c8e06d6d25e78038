//! The checks behind kekd's fuzz targets (`fuzz_targets/*.rs`, one line each), kept in a
//! library so that `cargo test` can run the seed corpus through them on a stable compiler,
//! and so that a crash found by the fuzzer can be replayed here (see [`tests`]).
//!
//! Each check takes the fuzzer's bytes and panics when a property fails:
//!
//! - [`frame`]: the frame reader against a model of the framing, in chunks of every size,
//!   never allocating more than one frame at the limit;
//! - [`request`]: prost decoding and the conversion into validated native types, and back;
//! - [`edek`]: the daemon's EDEK parser and its writer ([`kekd::fuzzing::parse_edek`]);
//! - [`connection`]: a worker's connection handler over an in-memory stream
//!   ([`kekd::fuzzing::serve_in_memory`]).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::{pin, Pin};
use std::sync::LazyLock;
use std::task::{Context, Poll, Waker};

use kekd_proto::{encode_request, encode_response, pb, FrameError, FrameReader, Request, Response};
use prost::Message;
use tokio::io::{AsyncRead, ReadBuf};

pub mod seeds;

// ---------------------------------------------------------------------------------------
// frame

/// The frame limit of the `frame` target: small, so that inputs reach it.
pub const FRAME_MAX: usize = 1024;

/// One outcome of reading a frame, as the model of the framing predicts it.
#[derive(Debug)]
enum Expected<'a> {
    Frame(&'a [u8]),
    TooLarge,
    Truncated,
    Eof,
}

/// The framing, written plainly: `u32` big-endian length ‖ that many bytes.
fn model(mut rest: &[u8], max: usize) -> Vec<Expected<'_>> {
    let mut out = Vec::new();
    loop {
        if rest.is_empty() {
            out.push(Expected::Eof);
            return out;
        }
        if rest.len() < 4 {
            out.push(Expected::Truncated);
            return out;
        }
        let len = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        if len > max {
            out.push(Expected::TooLarge);
            return out;
        }
        if rest.len() - 4 < len {
            out.push(Expected::Truncated);
            return out;
        }
        out.push(Expected::Frame(&rest[4..4 + len]));
        rest = &rest[4 + len..];
    }
}

/// A stream that hands out its bytes at most `chunk` at a time and, if `stall`, answers
/// every other read with `Pending` first: the partial reads of a real socket.
struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
    stall: bool,
    stalled: bool,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.stall {
            self.stalled = !self.stalled;
            if self.stalled {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
        let n = self.chunk.min(self.data.len()).min(buf.remaining());
        buf.put_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(()))
    }
}

/// Polls `fut` to completion on this thread. Enough for in-memory streams, which are never
/// pending for long (see [`Chunked`]).
fn block_on<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return out;
        }
    }
}

/// First byte: the read size (low 7 bits, 0 = unlimited) and whether reads stall (high
/// bit); the rest: what the peer sends. Checks that the reader yields exactly the frames,
/// refusals and ends of the model, decodes as prost does, and never makes an allocation
/// larger than one frame at the limit with its length prefix (the frame buffer) — a frame
/// announced over the limit costs nothing but its length prefix.
pub fn frame(data: &[u8]) {
    let Some((&how, stream)) = data.split_first() else { return };
    let chunked = || Chunked {
        data: stream,
        chunk: match how & 0x7f {
            0 => usize::MAX,
            n => n as usize,
        },
        stall: how & 0x80 != 0,
        stalled: false,
    };

    // As the server reads: requests, going on after a frame that does not decode.
    let mut reader = FrameReader::new(chunked(), FRAME_MAX);
    for expected in model(stream, FRAME_MAX) {
        let got = block_on(reader.read::<pb::Request>());
        match (expected, got) {
            (Expected::Frame(body), Ok(Some(msg))) => {
                assert_eq!(Ok(msg), pb::Request::decode(body), "the frame decodes as its bytes do")
            }
            (Expected::Frame(body), Err(FrameError::Decode(_))) => {
                assert!(pb::Request::decode(body).is_err(), "a frame that decodes was refused")
            }
            (Expected::TooLarge, Err(FrameError::TooLarge { len, max })) => {
                assert!(len > max && max == FRAME_MAX, "refused {len} bytes against a limit of {max}")
            }
            (Expected::Truncated, Err(FrameError::Truncated)) | (Expected::Eof, Ok(None)) => {}
            (expected, got) => panic!("expected {expected:?}, the reader gave {got:?}"),
        }
    }

    // Again, decoding nothing (prost's `()` skips every field): the only allocation that
    // grows with the input is then the frame buffer.
    let mut reader = FrameReader::new(chunked(), FRAME_MAX);
    let largest = tracking_allocations(|| {
        while let Ok(Some(())) | Err(FrameError::Decode(_)) = block_on(reader.read::<()>()) {}
    });
    assert!(largest <= 4 + FRAME_MAX, "an allocation of {largest} bytes under a frame limit of {FRAME_MAX}");
}

/// The global allocator of the fuzz targets: the system's, noting the largest allocation
/// of a thread while it runs [`tracking_allocations`].
struct Tracking;

thread_local! {
    // Constant initialisers: no allocation, no destructor, so usable inside the allocator.
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    if TRACKING.try_with(Cell::get).unwrap_or(false) {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
    }
}

// SAFETY: every call goes to the system allocator unchanged; `note` only reads the size.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract for `alloc`, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract for `alloc_zeroed`, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: the caller's contract for `realloc`, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc`, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// Runs `f` and returns the largest single allocation it made on this thread.
fn tracking_allocations(f: impl FnOnce()) -> usize {
    LARGEST.set(0);
    TRACKING.set(true);
    f();
    TRACKING.set(false);
    LARGEST.get()
}

// ---------------------------------------------------------------------------------------
// request

/// The bytes as a request, then as a response (the client's side of the conversion).
///
/// A request that converts is encoded again as a client sends it, and that frame decodes
/// to the very message that was converted (nothing is lost or added, except that a missing
/// metadata field is sent empty) and converts again. A response that converts is encoded
/// as the daemon sends it, converts again, and encodes to the same bytes.
pub fn request(data: &[u8]) {
    if let Ok(msg) = pb::Request::decode(data) {
        let mut sent = msg.clone();
        sent.metadata.get_or_insert_with(Default::default);
        if let Ok(req) = Request::try_from(msg) {
            let mut frame = Vec::new();
            encode_request(req, &mut frame);
            let body = unframe(&frame);
            let again = pb::Request::decode(body).expect("an encoded request decodes");
            assert_eq!(again, sent, "the request changed on its way through the native types");
            let req = Request::try_from(again).expect("an encoded request converts again");
            let mut frame2 = Vec::new();
            encode_request(req, &mut frame2);
            assert_eq!(frame, frame2);
        }
    }
    if let Ok(msg) = pb::Response::decode(data) {
        if let Ok(resp) = Response::try_from(msg) {
            let mut frame = Vec::new();
            encode_response(resp, &mut frame);
            let again = pb::Response::decode(unframe(&frame)).expect("an encoded response decodes");
            let resp = Response::try_from(again).expect("an encoded response converts again");
            let mut frame2 = Vec::new();
            encode_response(resp, &mut frame2);
            assert_eq!(frame, frame2, "a response changed on a second way through the native types");
        }
    }
}

/// The message of one frame, checking its length prefix.
fn unframe(frame: &[u8]) -> &[u8] {
    let (len, body) = frame.split_at(4);
    assert_eq!(u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize, body.len());
    body
}

// ---------------------------------------------------------------------------------------
// edek, connection

/// The daemon's EDEK parser, with the properties [`kekd::fuzzing::parse_edek`] checks.
pub fn edek(data: &[u8]) {
    kekd::fuzzing::parse_edek(data);
}

/// This process's scratch directory for the services [`connection`] builds: on tmpfs when
/// there is one (their key stores fsync), removed at exit.
static SCRATCH: LazyLock<tempfile::TempDir> = LazyLock::new(|| {
    let shm = Path::new("/dev/shm");
    let builder = tempfile::Builder::new().prefix("kekd-fuzz-").tempdir_in(shm);
    let dir = builder.or_else(|_| tempfile::Builder::new().prefix("kekd-fuzz-").tempdir());
    let dir = dir.expect("a scratch directory");
    extern "C" fn remove_scratch() {
        let _ = std::fs::remove_dir_all(SCRATCH.path());
    }
    // SAFETY: registers a plain function with no arguments, as atexit expects. A static is
    // never dropped, so this is how the directory goes when libFuzzer exits.
    unsafe { libc::atexit(remove_scratch) };
    dir
});

/// First byte: who the supervisor handed over (bit 0 admin, bit 1 vsock); the rest: the
/// client's bytes after its Hello, served by a fresh tenant ([`kekd::fuzzing::serve_in_memory`]).
pub fn connection(data: &[u8]) {
    kekd::fuzzing::serve_in_memory(SCRATCH.path(), data);
}

/// How many bytes of responses [`connection`] read: for the tests, which check that the
/// seeds reach the service.
#[cfg(test)]
fn connection_answered(data: &[u8]) -> usize {
    kekd::fuzzing::serve_in_memory(SCRATCH.path(), data)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    /// Every file of the committed seed corpus through its target's check.
    #[test]
    fn the_seed_corpus_passes_every_check() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
        type Check = fn(&[u8]);
        let checks: [(&str, Check); 4] = [
            ("frame", super::frame),
            ("request", super::request),
            ("edek", super::edek),
            ("connection", super::connection),
        ];
        for (target, check) in checks {
            let dir = root.join(target);
            let mut n = 0;
            for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
                let path = entry.unwrap().path();
                check(&std::fs::read(&path).unwrap());
                n += 1;
            }
            assert!(n > 0, "no seeds for {target}");
        }
    }

    /// The connection target serves: a generate is answered beyond the HelloOk, and each
    /// of 300 pipelined requests is answered, past the limit of requests in flight.
    #[test]
    fn the_connection_target_reaches_the_service() {
        let seeds = crate::seeds::all();
        let seed = |name: &str| &seeds.iter().find(|(t, n, _)| *t == "connection" && n == name).unwrap().2;
        let hello_only = super::connection_answered(seed("close-at-once"));
        assert!(hello_only > 0, "the HelloOk is sent");
        let one = super::connection_answered(seed("user-generate")) - hello_only;
        assert!(one > 64, "a generate answered with a key and an EDEK: {one} bytes");
        let status = super::connection_answered(seed("many-in-flight"));
        assert!(status > hello_only + 300 * 20, "300 status answers: {status} bytes");
    }

    /// Replays one input: `KEKD_FUZZ_TARGET=edek KEKD_FUZZ_INPUT=artifacts/edek/crash-…
    /// cargo test --manifest-path fuzz/Cargo.toml replay -- --nocapture`.
    #[test]
    fn replay() {
        let (Ok(target), Ok(input)) = (std::env::var("KEKD_FUZZ_TARGET"), std::env::var("KEKD_FUZZ_INPUT"))
        else {
            return;
        };
        let data = std::fs::read(&input).unwrap();
        match target.as_str() {
            "frame" => super::frame(&data),
            "request" => super::request(&data),
            "edek" => super::edek(&data),
            "connection" => super::connection(&data),
            other => panic!("no target {other}"),
        }
    }
}
