//! The report every baseline prints, and a loop that runs a blocking operation on several
//! threads for a warmup and then a measured window.
//!
//! The JSON carries the fields `kekctl bench --json` has (`requests_per_sec`,
//! `deks_per_sec`, `latency_us{p50,p90,p99,p99_9,max,mean}`), so scripts/bench reads both
//! alike. Latencies are in whole microseconds, in an HDR histogram with the bounds kekctl
//! bench uses.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::Timing;

const LOWEST_US: u64 = 1;
const HIGHEST_US: u64 = 60_000_000;
const SIGFIGS: u8 = 3;

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(LOWEST_US, HIGHEST_US, SIGFIGS).expect("valid bounds")
}

pub fn record(h: &mut Histogram<u64>, took: Duration) {
    let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
    h.saturating_record(us.max(LOWEST_US));
}

/// Latency figures in microseconds, as `kekctl bench` reports them.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p99_9: u64,
    pub max: u64,
    pub mean: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Option<Latency> {
        (!h.is_empty()).then(|| Latency {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p99_9: h.value_at_quantile(0.999),
            max: h.max(),
            mean: (h.mean() * 10.0).round() / 10.0,
        })
    }
}

/// What one run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Which baseline.
    pub figure: &'static str,
    /// Threads (in-process baselines) or connections (echo).
    pub threads: usize,
    /// DEKs per request.
    pub batch: usize,
    pub elapsed_secs: f64,
    pub requests: u64,
    pub deks: u64,
    pub requests_per_sec: f64,
    pub deks_per_sec: f64,
    /// Per request; `null` when the loop did not time single operations.
    pub latency_us: Option<Latency>,
    /// Requests per second of each thread (or connection).
    pub per_thread_per_sec: Vec<f64>,
    pub errors: u64,
    /// Whatever else the baseline wants to say (frame sizes, the key it used, ...).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Report {
    /// From each thread's count and measured time, and the merged latencies.
    pub fn new(
        figure: &'static str,
        batch: usize,
        per_thread: &[(u64, Duration)],
        latency: Option<&Histogram<u64>>,
        errors: u64,
    ) -> Report {
        let requests: u64 = per_thread.iter().map(|(n, _)| n).sum();
        let rates: Vec<f64> = per_thread
            .iter()
            .map(|(n, t)| if t.is_zero() { 0.0 } else { *n as f64 / t.as_secs_f64() })
            .collect();
        let rps: f64 = rates.iter().sum();
        let elapsed = per_thread.iter().map(|(_, t)| t.as_secs_f64()).fold(0.0, f64::max);
        Report {
            figure,
            threads: per_thread.len(),
            batch,
            elapsed_secs: round3(elapsed),
            requests,
            deks: requests * batch as u64,
            requests_per_sec: round1(rps),
            deks_per_sec: round1(rps * batch as f64),
            latency_us: latency.and_then(Latency::of),
            per_thread_per_sec: rates.into_iter().map(round1).collect(),
            errors,
            extra: serde_json::Map::new(),
        }
    }

    pub fn with(mut self, key: &str, value: impl Serialize) -> Report {
        self.extra.insert(key.to_owned(), serde_json::to_value(value).expect("plain data"));
        self
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// How a thread loop reads the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clocking {
    /// Time every operation into the latency histogram (one clock read per operation).
    PerOp,
    /// Read the clock once every `n` operations and keep no latencies: for operations
    /// short enough that a clock read would be a visible part of them.
    Every(u32),
}

/// Runs `op` on `threads` threads, each with the state `setup` made for it, for the warmup
/// and then the measured window. An operation that fails is counted, its first message
/// printed on stderr, and the loop goes on. `setup` runs on the thread itself, before
/// the clock starts; a setup error ends the run.
pub fn run_threads<S, E: std::fmt::Display>(
    figure: &'static str,
    threads: usize,
    timing: Timing,
    clocking: Clocking,
    setup: impl Fn(usize) -> crate::Result<S> + Sync,
    op: impl Fn(&mut S) -> Result<(), E> + Sync,
) -> crate::Result<Report> {
    let threads = threads.max(1);
    let barrier = Barrier::new(threads);
    let errors = AtomicU64::new(0);
    let results = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let (setup, op, barrier, errors) = (&setup, &op, &barrier, &errors);
                scope.spawn(move || {
                    let state = setup(i);
                    // Everyone starts together, also when a setup failed (it then stops at once).
                    barrier.wait();
                    let mut state = state?;
                    Ok(thread_loop(&mut state, op, timing, clocking, errors))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a bench thread panicked")).collect::<Vec<_>>()
    });
    let mut per_thread = Vec::with_capacity(threads);
    let mut latency = histogram();
    for result in results {
        let (n, took, h) = result?;
        per_thread.push((n, took));
        latency.add(&h).expect("same bounds");
    }
    let latency = (clocking == Clocking::PerOp).then_some(&latency);
    Ok(Report::new(figure, 1, &per_thread, latency, errors.load(Ordering::Relaxed)))
}

fn thread_loop<S, E: std::fmt::Display>(
    state: &mut S,
    op: impl Fn(&mut S) -> Result<(), E>,
    timing: Timing,
    clocking: Clocking,
    errors: &AtomicU64,
) -> (u64, Duration, Histogram<u64>) {
    let call = |state: &mut S| match op(state) {
        Ok(()) => true,
        Err(e) => {
            if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                eprintln!("kekd-bench: first failed operation: {e}");
            }
            false
        }
    };
    let start = Instant::now();
    let from = start + timing.warmup;
    let end = from + timing.duration;
    let mut h = histogram();
    let mut n = 0u64;
    match clocking {
        Clocking::PerOp => {
            let mut now = start;
            while now < from {
                call(state);
                now = Instant::now();
            }
            let measured_from = now;
            while now < end {
                let ok = call(state);
                let after = Instant::now();
                if ok {
                    record(&mut h, after - now);
                    n += 1;
                }
                now = after;
            }
            (n, now - measured_from, h)
        }
        Clocking::Every(chunk) => {
            let mut now = start;
            while now < from {
                for _ in 0..chunk {
                    call(state);
                }
                now = Instant::now();
            }
            let measured_from = now;
            while now < end {
                for _ in 0..chunk {
                    n += u64::from(call(state));
                }
                now = Instant::now();
            }
            (n, now - measured_from, h)
        }
    }
}
