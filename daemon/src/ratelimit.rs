//! Rate limits for the log lines a client can cause (DESIGN, STYLE §12).
//!
//! A hostile or broken client must not be able to flood the journal: every log line that a
//! connection, a frame or a request can trigger goes through one of the `limited_*!` macros
//! instead of `tracing::*!`. Each call site has its own token bucket: [`BURST`] lines at
//! once, then one per [`INTERVAL`]. Lines over the limit are counted, not written; the next
//! line that call site writes carries the count as its `suppressed` field, e.g.
//!
//! ```text
//! INFO kekd::supervisor::handshake: hello for an unknown tenant suppressed=4812 tenant=ghost uid=1000 pid=4321
//! ```
//!
//! so that every event is either in the log or counted in the line after it. A call site
//! whose level the log filter disables takes no token and counts nothing.
//!
//! The bucket is a GCRA (generic cell rate algorithm): one atomic word holding the time at
//! which the bucket will be full again, updated by compare-and-swap, so a call site costs
//! a clock read and one or two atomic operations, and no lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

/// Lines a call site may write at once.
pub const BURST: u32 = 10;
/// After a burst, one more line per call site per interval.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// One call site's bucket. Lives in a `static` inside each macro expansion.
#[derive(Debug)]
pub struct RateLimit {
    /// Nanoseconds after [`EPOCH`] at which the next line would be refused if the bucket
    /// held no more than one token: the GCRA "theoretical arrival time". 0: never used.
    tat: AtomicU64,
    /// Lines refused since the last one written.
    suppressed: AtomicU64,
    interval_ns: u64,
    /// How far ahead of now `tat` may run: (burst - 1) intervals.
    tolerance_ns: u64,
}

/// The origin of the limiter's clock: the first use in this process.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

impl RateLimit {
    /// `burst` lines at once (at least 1), then one per `interval`.
    pub const fn new(burst: u32, interval: Duration) -> Self {
        let interval_ns = interval.as_nanos() as u64;
        let burst = if burst == 0 { 1 } else { burst };
        RateLimit {
            tat: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            interval_ns,
            tolerance_ns: interval_ns * (burst as u64 - 1),
        }
    }

    /// The limit of every `limited_*!` call site.
    pub const fn standard() -> Self {
        Self::new(BURST, INTERVAL)
    }

    /// Whether a line may be written now: `Some(n)` with the number of lines suppressed
    /// since the last one written, or `None` (counted as suppressed).
    pub fn check(&self) -> Option<u64> {
        self.check_at(EPOCH.elapsed().as_nanos() as u64)
    }

    /// [`Self::check`] at `now`, in nanoseconds on a monotonic clock.
    pub fn check_at(&self, now: u64) -> Option<u64> {
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let start = tat.max(now);
            if start - now > self.tolerance_ns {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            match self.tat.compare_exchange_weak(
                tat,
                start + self.interval_ns,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(self.suppressed.swap(0, Ordering::Relaxed)),
                Err(current) => tat = current,
            }
        }
    }
}

/// A `tracing` event at `$level`, rate-limited per call site (see the module doc).
/// Everything after the level is what `tracing::event!` takes: fields, then the message.
macro_rules! limited_event {
    ($level:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::standard();
        if ::tracing::enabled!($level) {
            if let Some(suppressed) = LIMIT.check() {
                if suppressed == 0 {
                    ::tracing::event!($level, $($arg)+);
                } else {
                    ::tracing::event!($level, suppressed, $($arg)+);
                }
            }
        }
    }};
}

/// `tracing::error!`, rate-limited per call site.
macro_rules! limited_error {
    ($($arg:tt)+) => { limited_event!(::tracing::Level::ERROR, $($arg)+) };
}

/// `tracing::warn!`, rate-limited per call site.
macro_rules! limited_warn {
    ($($arg:tt)+) => { limited_event!(::tracing::Level::WARN, $($arg)+) };
}

/// `tracing::info!`, rate-limited per call site.
macro_rules! limited_info {
    ($($arg:tt)+) => { limited_event!(::tracing::Level::INFO, $($arg)+) };
}

/// `tracing::debug!`, rate-limited per call site.
macro_rules! limited_debug {
    ($($arg:tt)+) => { limited_event!(::tracing::Level::DEBUG, $($arg)+) };
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn a_burst_then_one_per_interval_and_the_count_of_the_rest() {
        let l = RateLimit::new(3, Duration::from_secs(1));
        let t0 = 5 * SEC;
        // The burst: three at once.
        assert_eq!(l.check_at(t0), Some(0));
        assert_eq!(l.check_at(t0), Some(0));
        assert_eq!(l.check_at(t0 + 1), Some(0));
        // Then nothing within the interval, each refusal counted.
        for i in 0..100 {
            assert_eq!(l.check_at(t0 + 2 + i), None);
        }
        assert_eq!(l.check_at(t0 + SEC - 1), None);
        // One interval later, one line, carrying the count.
        assert_eq!(l.check_at(t0 + SEC), Some(101));
        assert_eq!(l.check_at(t0 + SEC + 1), None);
        assert_eq!(l.check_at(t0 + 2 * SEC), Some(1));
        // Quiet for long enough, the whole burst is back, and no more than that.
        let later = t0 + 60 * SEC;
        assert_eq!(
            (0..5).map(|_| l.check_at(later)).collect::<Vec<_>>(),
            [Some(0), Some(0), Some(0), None, None]
        );
    }

    #[test]
    fn over_any_span_at_most_burst_plus_rate() {
        // A steady flood of one event per millisecond for 10 s.
        let l = RateLimit::new(10, Duration::from_secs(1));
        let (mut written, mut reported) = (0, 0);
        for ms in 0..10_000u64 {
            if let Some(n) = l.check_at(ms * 1_000_000) {
                written += 1;
                reported += n;
            }
        }
        assert_eq!(written, 10 + 9, "the burst, then one per second after the first");
        // Nothing is lost: the lines written plus the counts they carried, plus what the
        // next line will report, are every event.
        let pending = l.suppressed.load(Ordering::Relaxed);
        assert_eq!(written + reported + pending, 10_000);
    }

    #[test]
    fn a_burst_of_one_and_a_zero_burst_are_the_same() {
        for burst in [0, 1] {
            let l = RateLimit::new(burst, Duration::from_millis(100));
            assert_eq!(l.check_at(0), Some(0));
            assert_eq!(l.check_at(99_999_999), None);
            assert_eq!(l.check_at(100_000_000), Some(1));
        }
    }

    #[test]
    fn concurrent_callers_neither_lose_nor_double_count() {
        let l = Arc::new(RateLimit::new(50, Duration::from_secs(3600)));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let l = Arc::clone(&l);
                std::thread::spawn(move || (0..10_000).filter(|_| l.check_at(SEC).is_some()).count())
            })
            .collect();
        let written: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(written, 50, "exactly the burst, however the threads interleave");
        assert_eq!(l.suppressed.load(Ordering::Relaxed), 40_000 - 50);
    }

    /// What a subscriber receives from a `limited_*!` call site flooded in a loop: the
    /// burst, with the count in the first line after it. The clock is real here, but the
    /// loop runs far within one interval.
    #[test]
    fn the_macros_write_the_burst_and_carry_the_count() {
        let buf = crate::logging::LogBuf::default();
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_max_level(tracing::Level::INFO)
            .without_time()
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..1000 {
                limited_warn!(attempt = i, "bad hello");
                // Disabled by the filter: takes no token, counts nothing.
                limited_debug!(attempt = i, "a debug line");
            }
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), BURST as usize, "{text}");
        assert!(lines.iter().all(|l| l.contains("WARN") && l.contains("bad hello")), "{text}");
        assert!(!text.contains("suppressed"), "nothing suppressed was written yet: {text}");
        assert!(!text.contains("debug line"), "{text}");
    }

    #[test]
    fn the_next_line_after_a_flood_names_the_count() {
        let l = RateLimit::standard();
        let now = 1000 * SEC;
        let written = (0..500).filter(|_| l.check_at(now).is_some()).count();
        assert_eq!(written, BURST as usize);
        assert_eq!(l.check_at(now + INTERVAL.as_nanos() as u64), Some(500 - BURST as u64));
    }
}
