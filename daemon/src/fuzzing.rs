//! Entry points of the fuzz targets in `fuzz/` (see `scripts/fuzz`).
//!
//! Compiled only with the feature `fuzzing`, which no default or release build enables: it
//! brings in the in-memory test root key of the unit tests (a fixed AES key). The functions
//! here reach the daemon's own parsers and connection handler without making those public;
//! they panic when a property fails, which is what a fuzzer reports.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use kekd_proto::{Context, TenantName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;
use tokio::sync::watch;

use crate::audit::Caller;
use crate::config::ConnectionLimits;
use crate::envelope::{Edek, Sealer};
use crate::service::{testing, Peer};

/// Tenant of every service built here.
const TENANT: &str = "fuzz";
/// A KEK that sealed nothing the fuzzer can have seen.
const KEK: [u8; 32] = [0x5a; 32];

/// Parses `bytes` with the EDEK parser every Unwrap and Rewrap item goes through, and
/// returns whether they parsed. For an EDEK that parses, checks (and panics otherwise):
/// - written back out from its parts, it is byte for byte the input;
/// - it does not open under a KEK that sealed nothing (no forgery);
/// - its ciphertext, sealed as a plaintext under the same key name and version, gives an
///   EDEK that parses back to that name and version and opens to that plaintext.
pub fn parse_edek(bytes: &[u8]) -> bool {
    let Ok(edek) = Edek::parse(bytes) else { return false };
    assert_eq!(edek.to_bytes(), bytes, "a parsed EDEK is written back differently");

    let tenant = TenantName::parse(TENANT).expect("a valid tenant name");
    let context = Context::default();
    let sealer = Sealer::new(&KEK, &tenant, edek.key.clone(), edek.version);
    assert!(sealer.open(&edek, &context).is_err(), "an EDEK opened under a KEK that sealed nothing");

    // Format, algorithm, name length, name, version, nonce; then ciphertext and tag.
    let plaintext = &bytes[2 + 2 + edek.key.as_str().len() + 4 + 12..bytes.len() - 16];
    let sealed = sealer.seal(plaintext, &context);
    let again = Edek::parse(&sealed).expect("what the sealer writes parses");
    assert_eq!((&again.key, again.version), (&edek.key, edek.version));
    assert_eq!(again.to_bytes(), sealed);
    let opened = sealer.open(&again, &context).expect("what the sealer writes opens");
    assert_eq!(opened.expose(), plaintext);
    true
}

/// The runtime every [`serve_in_memory`] runs on, built once per process. Multi-threaded,
/// since the service moves blocking key-store and root-key calls off its workers with
/// `block_in_place`; one worker keeps it small. Each `block_in_place` hands the worker on
/// to a thread of the blocking pool: a few threads, kept, serve them all, where tokio's
/// default (up to 512, gone after 10 s idle) would start hundreds over a fuzzing run, and
/// under AddressSanitizer each new thread costs memory that is not given back.
static RUNTIME: LazyLock<Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(8)
        .thread_keep_alive(Duration::from_secs(3600))
        .thread_name("kekd-fuzz")
        .enable_all()
        .build()
        .expect("a tokio runtime")
});

/// Serves one connection over an in-memory stream, exactly as a worker serves a handed-over
/// one (`worker::greet_and_serve`: the Hello answered, then [`crate::server::serve`]), to a
/// fresh tenant on the in-memory test root key whose key store and audit trail live in a
/// new directory under `scratch`, removed before returning. The connection has the
/// default limits of a configuration that sets none.
///
/// The first byte of `input` says who the supervisor handed over (bit 0: an admin rather
/// than a user; bit 1: a vsock peer rather than a Unix one); the rest is the client's byte
/// stream, written in full and then closed. The responses are read and dropped; returns
/// how many bytes of them there were.
pub fn serve_in_memory(scratch: &Path, input: &[u8]) -> usize {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let Some((&who, stream)) = input.split_first() else { return 0 };
    let mut caller = if who & 1 == 0 { testing::user() } else { testing::admin() };
    if who & 2 != 0 {
        caller = Caller { peer: Peer::Vsock { cid: 3, port: 1024 }, exe: None, ..caller };
    }
    // A directory of its own per call: nothing of one call (a task finishing late) can
    // touch the next one's files.
    let dir = scratch.join(NEXT.fetch_add(1, Ordering::Relaxed).to_string());
    let answered = RUNTIME.block_on(async {
        let (service, _root) = testing::service(&dir, TENANT);
        let service = Arc::new(service);
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (read, write) = tokio::io::split(server);
        let (mut client_read, mut client_write) = tokio::io::split(client);
        // Held until the connection is served: a dropped sender would read as a stop.
        let (_stop_tx, stop) = watch::channel(false);
        let serving = crate::worker::greet_and_serve(
            Arc::clone(&service),
            Arc::new(caller),
            1,
            read,
            write,
            ConnectionLimits::default(),
            crate::server::ReplyBudget::new(ConnectionLimits::default().max_pending_reply_bytes),
            stop,
        );
        let sending = async move {
            // The server may close first (a bad frame): the rest is then refused.
            let _ = client_write.write_all(stream).await;
            let _ = client_write.shutdown().await;
        };
        let draining = async move {
            let (mut buf, mut total) = (vec![0u8; 16 * 1024], 0);
            while let Ok(n @ 1..) = client_read.read(&mut buf).await {
                total += n;
            }
            total
        };
        let ((), (), answered) = tokio::join!(serving, sending, draining);
        // Request tasks may still hold the service for a moment after their answer went.
        while Arc::strong_count(&service) > 1 {
            tokio::task::yield_now().await;
        }
        service.close_audit().await;
        answered
    });
    std::fs::remove_dir_all(&dir).expect("the scratch directory can be removed");
    wait_for_audit_threads();
    answered
}

/// Waits (a second at most) until the fsync thread of the audit trail just dropped has
/// ended, which it does on its own, soon after: so that no thread of one call outlives it
/// and each input runs in the same process state.
fn wait_for_audit_threads() {
    let alive = || {
        std::fs::read_dir("/proc/self/task").is_ok_and(|tasks| {
            tasks.flatten().any(|task| {
                std::fs::read_to_string(task.path().join("comm"))
                    .is_ok_and(|c| c.trim_end() == "kekd-audit-sync")
            })
        })
    };
    for _ in 0..10_000 {
        if !alive() {
            return;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}
