//! An asymmetric memory barrier: a free *fast side* for the hot path and an
//! expensive *slow side* for the rare one, that together order a store
//! before a later load on each side (the Dekker pattern the dirty tracker
//! needs between application writes and migrator reads).
//!
//! The slow side is Linux's `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`:
//! the kernel makes every running thread of this process execute a full
//! barrier before the call returns, so the fast side needs only a compiler
//! fence. Where the syscall is missing or refused (old kernel, seccomp),
//! both sides fall back to a full `SeqCst` fence. Why it pays: on x86 a
//! full fence after copying a block to uncached memory waits for the whole
//! copy to reach the cache (about 100 ns per 4 KiB write).

use std::sync::atomic::{compiler_fence, fence, AtomicU8, Ordering};

const UNKNOWN: u8 = 0;
const MEMBARRIER: u8 = 1;
const FENCE: u8 = 2;

static MODE: AtomicU8 = AtomicU8::new(UNKNOWN);

/// Decides the mode once per process (registering for expedited
/// membarrier). Call before any thread uses [`fast`] or [`slow`] for the
/// structure being protected; later calls are cheap.
pub(crate) fn init() {
    if MODE.load(Ordering::Acquire) != UNKNOWN {
        return;
    }
    let mode = if std::env::var_os("SILO_MEMBARRIER").is_some_and(|v| v == "off") {
        FENCE
    } else if sys::register() {
        MEMBARRIER
    } else {
        FENCE
    };
    // Racing initialisers compute the same answer; the first one wins.
    let _ = MODE.compare_exchange(UNKNOWN, mode, Ordering::AcqRel, Ordering::Acquire);
    tracing::debug!(
        membarrier = MODE.load(Ordering::Acquire) == MEMBARRIER,
        "asymmetric barrier mode chosen"
    );
}

/// The hot side: orders this thread's earlier stores before its later
/// loads, as seen by a thread that calls [`slow`].
#[inline]
pub(crate) fn fast() {
    if MODE.load(Ordering::Relaxed) == MEMBARRIER {
        compiler_fence(Ordering::SeqCst);
    } else {
        fence(Ordering::SeqCst);
    }
}

/// The rare side: a full barrier on this thread and on every other running
/// thread of the process.
pub(crate) fn slow() {
    if MODE.load(Ordering::Relaxed) == MEMBARRIER {
        fence(Ordering::SeqCst);
        if sys::expedited() {
            return;
        }
        // Cannot happen after a successful registration; if it does, no
        // fast side may skip its fence from now on — but some may be
        // between their store and load already, so this is a bug report,
        // not a recovery.
        tracing::error!("membarrier failed after registration");
    }
    fence(Ordering::SeqCst);
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod sys {
    const CMD_QUERY: libc::c_long = 0;
    const CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
    const CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

    fn membarrier(cmd: libc::c_long) -> libc::c_long {
        // SAFETY: membarrier(2) takes two integers (command, flags) and a
        // CPU id, reads and writes no memory of ours, and reports failure
        // as -1 with errno; every command used here is side-effect free
        // apart from the barrier and the registration itself.
        unsafe {
            libc::syscall(
                libc::SYS_membarrier,
                cmd,
                0 as libc::c_long,
                0 as libc::c_long,
            )
        }
    }

    /// Registers the process for private expedited barriers.
    pub(super) fn register() -> bool {
        let supported = membarrier(CMD_QUERY);
        supported >= 0
            && supported & CMD_PRIVATE_EXPEDITED != 0
            && membarrier(CMD_REGISTER_PRIVATE_EXPEDITED) == 0
            && membarrier(CMD_PRIVATE_EXPEDITED) == 0
    }

    /// One expedited barrier across the process.
    pub(super) fn expedited() -> bool {
        membarrier(CMD_PRIVATE_EXPEDITED) == 0
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    pub(super) fn register() -> bool {
        false
    }
    pub(super) fn expedited() -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64};
    use std::sync::Arc;

    /// The Dekker test: each side stores its flag, passes its barrier, and
    /// loads the other's flag. Without a barrier both may read 0 (store
    /// buffering, observable on x86); with it, never both.
    #[test]
    fn store_load_is_ordered_across_sides() {
        init();
        let a = Arc::new(AtomicU64::new(0));
        let b = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let round = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(AtomicU64::new(u64::MAX));
        let (a2, b2, stop2, round2, seen2) = (
            a.clone(),
            b.clone(),
            stop.clone(),
            round.clone(),
            seen.clone(),
        );
        // The fast side loops on its own: store its round into `a`, then
        // read `b` and publish what it saw.
        let fast_thread = std::thread::spawn(move || {
            let mut last = 0;
            while !stop2.load(Ordering::Relaxed) {
                let r = round2.load(Ordering::Acquire);
                if r == last {
                    std::hint::spin_loop();
                    continue;
                }
                last = r;
                a2.store(r, Ordering::Relaxed);
                fast();
                let other = b2.load(Ordering::Relaxed);
                seen2.store(other, Ordering::Release);
            }
        });
        for r in 1..=2000u64 {
            seen.store(u64::MAX, Ordering::Relaxed);
            round.store(r, Ordering::Release);
            b.store(r, Ordering::Relaxed);
            slow();
            let mine = a.load(Ordering::Relaxed);
            let other = loop {
                let s = seen.load(Ordering::Acquire);
                if s != u64::MAX {
                    break s;
                }
                std::hint::spin_loop();
            };
            assert!(
                mine == r || other == r,
                "round {r}: both sides missed the other's store"
            );
        }
        stop.store(true, Ordering::Relaxed);
        fast_thread.join().unwrap();
    }
}
