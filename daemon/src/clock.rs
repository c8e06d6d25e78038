//! CLOCK_BOOTTIME timestamps for KEK leases.
//!
//! `std::time::Instant` is CLOCK_MONOTONIC, which stops while a VM or laptop is suspended:
//! a KEK cached for "5 minutes" would then live for the whole suspension. BOOTTIME keeps
//! counting, so TTLs mean wall-clock time served.

use std::time::Duration;

use nix::time::{clock_gettime, ClockId};

/// Time since boot, suspension included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct BootInstant(Duration);

impl BootInstant {
    pub fn now() -> Self {
        let ts = clock_gettime(ClockId::CLOCK_BOOTTIME).expect("CLOCK_BOOTTIME is always available on Linux");
        Self(Duration::new(ts.tv_sec() as u64, ts.tv_nsec() as u32))
    }

    /// Time elapsed from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: BootInstant) -> Duration {
        self.0.saturating_sub(earlier.0)
    }

    /// Milliseconds since boot, for storing in an atomic.
    pub fn as_millis(self) -> u64 {
        self.0.as_millis() as u64
    }

    pub fn from_millis(ms: u64) -> Self {
        Self(Duration::from_millis(ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boottime_moves_forward() {
        let a = BootInstant::now();
        std::thread::sleep(Duration::from_millis(5));
        let b = BootInstant::now();
        assert!(b.since(a) >= Duration::from_millis(5));
        assert_eq!(a.since(b), Duration::ZERO);
        assert_eq!(BootInstant::from_millis(a.as_millis()).as_millis(), a.as_millis());
    }
}
