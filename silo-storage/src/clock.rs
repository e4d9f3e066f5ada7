//! A cheap monotonic clock for per-write bookkeeping (the dirty tracker's
//! last-write times, the volatility monitor's time slots).
//!
//! Outside unit tests it reads the kernel's coarse monotonic clock
//! (`CLOCK_MONOTONIC_COARSE`: the time of the last timer tick, 1–4 ms
//! resolution, read from the vDSO without touching the TSC), which costs a
//! few nanoseconds where a precise clock read costs 20–25 on a VM — and the
//! hot path reads it on every write. Both users work in milliseconds or
//! coarser, so the resolution is enough. Unit tests use tokio's clock,
//! so that paused time drives them.

/// Nanoseconds elapsed since a fixed point, at the clock's resolution.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    #[cfg(not(test))]
    epoch_ns: u64,
    #[cfg(test)]
    epoch: tokio::time::Instant,
}

impl Clock {
    /// A clock whose zero is now.
    pub(crate) fn new() -> Self {
        Clock {
            #[cfg(not(test))]
            epoch_ns: sys::coarse_ns(),
            #[cfg(test)]
            epoch: tokio::time::Instant::now(),
        }
    }

    /// Nanoseconds since [`Clock::new`].
    #[inline]
    pub(crate) fn elapsed_ns(&self) -> u64 {
        #[cfg(not(test))]
        {
            sys::coarse_ns().saturating_sub(self.epoch_ns)
        }
        #[cfg(test)]
        {
            self.epoch.elapsed().as_nanos() as u64
        }
    }

    /// Milliseconds since [`Clock::new`].
    #[inline]
    pub(crate) fn elapsed_ms(&self) -> u64 {
        self.elapsed_ns() / 1_000_000
    }
}

#[cfg_attr(test, allow(dead_code))]
mod sys {
    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    pub(crate) fn coarse_ns() -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec on our stack for the
        // duration of the call; clock_gettime writes only it.
        let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
        if r != 0 {
            return fallback_ns();
        }
        (ts.tv_sec as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(ts.tv_nsec as u64)
    }

    #[cfg(not(target_os = "linux"))]
    pub(crate) fn coarse_ns() -> u64 {
        fallback_ns()
    }

    /// A precise clock where the coarse one is missing.
    fn fallback_ns() -> u64 {
        use std::sync::OnceLock;
        use std::time::Instant;
        static START: OnceLock<Instant> = OnceLock::new();
        START.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn coarse_clock_is_monotonic_and_advances() {
            let a = super::coarse_ns();
            let mut last = a;
            for _ in 0..1000 {
                let b = super::coarse_ns();
                assert!(b >= last);
                last = b;
            }
            std::thread::sleep(std::time::Duration::from_millis(30));
            let c = super::coarse_ns();
            // 30 ms later, within the coarse resolution (≤ 10 ms).
            assert!(c - a >= 20_000_000, "advanced only {} ns", c - a);
        }
    }
}
