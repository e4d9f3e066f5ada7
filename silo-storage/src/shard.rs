//! Per-thread shards for counters that every operation updates, so threads
//! working on the same provider do not bounce one cache line between cores.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Number of shards (threads beyond this share them round-robin).
pub(crate) const SHARDS: usize = 8;

/// A value on a cache line of its own.
#[derive(Debug, Default)]
#[repr(align(64))]
pub(crate) struct Padded<T>(pub(crate) T);

/// This thread's shard (threads take shards round-robin as they first ask).
pub(crate) fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}
