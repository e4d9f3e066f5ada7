//! [`Metrics`]: counts operations, bytes, errors, in-flight operations and
//! latency (log2 histogram) for reads, writes, flushes, trims and
//! write-zeroes. Only relaxed atomics on the hot path; no locks.
//!
//! The counters live in an `Arc<`[`ProviderMetrics`]`>` that can be cloned
//! out with [`Metrics::metrics`] and read later (for example by a Prometheus
//! exporter) while the provider is owned by a stack.
//!
//! Latency bucket `i` counts operations that took less than `2^i`
//! microseconds (bucket 0: under 1 µs); the last bucket also holds everything
//! slower.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use crate::error::Result;
use crate::provider::{now_or, BoxFut, DynProvider, FileRange, NotShared, Now, Provider};
use crate::shard::{shard, Counter, Padded, Shard, SLOTS};

/// Number of latency buckets (the last one ends above 2^31 µs ≈ 36 min).
pub const LATENCY_BUCKETS: usize = 32;

/// Live counters of one operation kind.
///
/// Every operation costs three additions (started, completed, and bytes or
/// errors) on counters sharded per thread, so cores do not contend for
/// them, and made with plain stores where the thread owns its shard (no
/// locked instruction to wait for the data just written); one operation in
/// [`Metrics::timing_every`] is also timed (two clock reads and two more
/// additions), so the layer stays cheap on a hot path while the latency
/// figures remain a fair sample. The in-flight count is
/// `started - completed - abandoned` (an operation whose future is dropped
/// before it finishes counts as abandoned).
#[derive(Debug)]
pub struct OpCounters {
    hot: [Padded<Hot>; SLOTS],
    /// What the hot counters (and `abandoned`) read at the last reset:
    /// they are never written by other threads, so a reset subtracts.
    base: Base,
    abandoned: AtomicU64,
    errors: AtomicU64,
    total_ns: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS],
}

/// The counters every operation updates (one set per shard).
#[derive(Debug, Default)]
struct Hot {
    started: Counter,
    completed: Counter,
    bytes: Counter,
}

/// Counter values at the last reset.
#[derive(Debug, Default)]
struct Base {
    completed: AtomicU64,
    bytes: AtomicU64,
    abandoned: AtomicU64,
}

impl Default for OpCounters {
    fn default() -> Self {
        OpCounters {
            hot: std::array::from_fn(|_| Padded::default()),
            base: Base::default(),
            abandoned: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            total_ns: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// Index of the latency bucket for `d`.
pub fn latency_bucket(d: Duration) -> usize {
    let us = d.as_micros().min(u64::MAX as u128) as u64;
    if us == 0 {
        0
    } else {
        ((64 - us.leading_zeros()) as usize).min(LATENCY_BUCKETS - 1)
    }
}

/// Whether the operation with started count `n` is timed: one in `every`
/// (a mask instead of a division when `every` is a power of two, as the
/// default is).
#[inline]
fn due(n: u64, every: u64) -> bool {
    if every.is_power_of_two() {
        n & (every - 1) == 0
    } else {
        n % every == 0
    }
}

/// An operation in progress; counts as abandoned if dropped unfinished.
struct Running<'a> {
    c: &'a OpCounters,
    /// Set for the operations that are timed.
    started: Option<Instant>,
    done: bool,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.c.abandoned.fetch_add(1, Relaxed);
        }
    }
}

impl Running<'_> {
    fn finish<T>(mut self, bytes: u64, r: &Result<T>) {
        self.done = true;
        self.c.finished(shard(), bytes, r.is_ok(), self.started);
    }
}

impl OpCounters {
    /// Starts an operation; it is timed if it is the first of each `every`.
    fn start(&self, every: u64) -> Running<'_> {
        let sh = shard();
        let started = &self.hot[sh.index()].0.started;
        let n = started.get();
        started.add(sh, 1);
        Running {
            c: self,
            started: due(n, every).then(Instant::now),
            done: false,
        }
    }

    /// Runs `op` synchronously as one operation if it completes (`Ok`);
    /// counts nothing if it hands its buffer back (`Err`).
    fn now<T, B>(&self, every: u64, bytes: u64, op: impl FnOnce() -> Now<T, B>) -> Now<T, B> {
        // The same counting as `start` + `Running::finish`, without the
        // drop guard and with one shard lookup (the synchronous path of
        // every write of a memory-backed stack).
        let sh = shard();
        let started = &self.hot[sh.index()].0.started;
        // The same rule as `start`: the operation that would take a started
        // count divisible by `every` is timed.
        let t = due(started.get(), every).then(Instant::now);
        // Looked at in place and returned as it came (no `?` and re-wrap):
        // the inner layer then builds the result straight in our caller's
        // slot instead of one the result is copied out of.
        let r = op();
        let Ok(res) = &r else {
            return r;
        };
        started.add(sh, 1);
        self.finished(sh, bytes, res.is_ok(), t);
        r
    }

    /// Counts a finished operation in shard `sh` (the calling thread's):
    /// its bytes or its error, its latency if it was timed (started at
    /// `t`), and its completion.
    #[inline]
    fn finished(&self, sh: Shard, bytes: u64, ok: bool, t: Option<Instant>) {
        let hot = &self.hot[sh.index()].0;
        if !ok {
            self.errors.fetch_add(1, Relaxed);
        } else if bytes > 0 {
            hot.bytes.add(sh, bytes);
        }
        if let Some(t) = t {
            let d = t.elapsed();
            self.total_ns
                .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
            self.latency[latency_bucket(d)].fetch_add(1, Relaxed);
        }
        hot.completed.add(sh, 1);
    }

    /// A plain copy of the counters (not an atomic snapshot: counters
    /// updated concurrently may be off by the operations in progress).
    pub fn snapshot(&self) -> OpSnapshot {
        let latency_us_log2: [u64; LATENCY_BUCKETS] =
            std::array::from_fn(|i| self.latency[i].load(Relaxed));
        let timed: u64 = latency_us_log2.iter().sum();
        let sum = |f: fn(&Hot) -> &Counter| {
            self.hot
                .iter()
                .fold(0u64, |n, h| n.wrapping_add(f(&h.0).get()))
        };
        // In flight from the raw counts (never reset), the rest since the
        // last reset.
        let completed = sum(|h| &h.completed);
        let started = sum(|h| &h.started);
        let abandoned_raw = self.abandoned.load(Relaxed);
        let in_flight = started.saturating_sub(completed.wrapping_add(abandoned_raw));
        let ops = completed.wrapping_sub(self.base.completed.load(Relaxed));
        let abandoned = abandoned_raw.wrapping_sub(self.base.abandoned.load(Relaxed));
        let timed_ns = self.total_ns.load(Relaxed);
        // Extrapolate the timed sample to every completed operation.
        let total_ns = if timed == 0 {
            0
        } else {
            (u128::from(timed_ns) * u128::from(ops) / u128::from(timed)).min(u64::MAX as u128)
                as u64
        };
        OpSnapshot {
            ops,
            bytes: sum(|h| &h.bytes).wrapping_sub(self.base.bytes.load(Relaxed)),
            errors: self.errors.load(Relaxed),
            in_flight,
            abandoned,
            timed,
            total_time: Duration::from_nanos(total_ns),
            latency_us_log2,
        }
    }

    fn reset(&self) {
        // The hot counters belong to the threads that add to them: record
        // where they stand instead of zeroing them under their feet.
        let sum = |f: fn(&Hot) -> &Counter| {
            self.hot
                .iter()
                .fold(0u64, |n, h| n.wrapping_add(f(&h.0).get()))
        };
        self.base.completed.store(sum(|h| &h.completed), Relaxed);
        self.base.bytes.store(sum(|h| &h.bytes), Relaxed);
        self.base
            .abandoned
            .store(self.abandoned.load(Relaxed), Relaxed);
        self.errors.store(0, Relaxed);
        self.total_ns.store(0, Relaxed);
        for b in &self.latency {
            b.store(0, Relaxed);
        }
    }
}

/// A copy of one operation kind's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpSnapshot {
    /// Completed operations (successful or not).
    pub ops: u64,
    /// Bytes moved by successful operations (trim / write-zeroes: range length).
    pub bytes: u64,
    /// Failed operations.
    pub errors: u64,
    /// Operations currently in progress.
    pub in_flight: u64,
    /// Operations whose future was dropped before they finished.
    pub abandoned: u64,
    /// Operations that were timed (one in [`Metrics::timing_every`]).
    pub timed: u64,
    /// Sum of all operation durations, extrapolated from the timed ones
    /// (exact when every operation is timed).
    pub total_time: Duration,
    /// Latency histogram of the timed operations: entry `i` counts those
    /// under `2^i` µs.
    pub latency_us_log2: [u64; LATENCY_BUCKETS],
}

impl OpSnapshot {
    /// Mean latency of completed operations.
    pub fn mean_latency(&self) -> Duration {
        if self.ops == 0 {
            Duration::ZERO
        } else {
            self.total_time / self.ops.min(u32::MAX as u64) as u32
        }
    }
}

/// A plain copy of all counters of a [`Metrics`] layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MetricsSnapshot {
    /// Reads.
    pub read: OpSnapshot,
    /// Writes.
    pub write: OpSnapshot,
    /// Flushes.
    pub flush: OpSnapshot,
    /// Trims.
    pub trim: OpSnapshot,
    /// Write-zeroes.
    pub write_zeroes: OpSnapshot,
}

/// The live counters of a [`Metrics`] layer (shareable).
#[derive(Debug, Default)]
pub struct ProviderMetrics {
    /// Reads.
    pub read: OpCounters,
    /// Writes.
    pub write: OpCounters,
    /// Flushes.
    pub flush: OpCounters,
    /// Trims.
    pub trim: OpCounters,
    /// Write-zeroes.
    pub write_zeroes: OpCounters,
}

impl ProviderMetrics {
    /// A plain copy of every counter.
    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            read: self.read.snapshot(),
            write: self.write.snapshot(),
            flush: self.flush.snapshot(),
            trim: self.trim.snapshot(),
            write_zeroes: self.write_zeroes.snapshot(),
        }
    }

    /// Zeroes the cumulative counters (in-flight counts are kept).
    pub fn reset(&self) {
        self.read.reset();
        self.write.reset();
        self.flush.reset();
        self.trim.reset();
        self.write_zeroes.reset();
    }
}

/// A pass-through provider that measures every operation.
pub struct Metrics<P = DynProvider> {
    inner: P,
    m: Arc<ProviderMetrics>,
    every: u64,
    /// `inner.may_complete_now()`, asked once.
    fast: bool,
}

/// By default one operation in this many is timed (a power of two, so the
/// choice is a mask). Timing one write in 8 cost ~35 ns per write on
/// average over a memory device (two precise clock reads and two shared
/// additions per timed write); one in 64 keeps the latency histogram a fair
/// sample at any rate where latency matters, for a few nanoseconds.
pub const DEFAULT_TIMING_EVERY: u64 = 64;

impl<P: Provider> Metrics<P> {
    /// Wraps `inner` with fresh counters, timing one operation in
    /// [`DEFAULT_TIMING_EVERY`].
    pub fn new(inner: P) -> Self {
        Self::with_timing_every(inner, DEFAULT_TIMING_EVERY)
    }

    /// Wraps `inner`, timing one operation in `every` (1: all of them; 0 is
    /// taken as 1). Counts of operations, bytes and errors are always exact.
    pub fn with_timing_every(inner: P, every: u64) -> Self {
        Metrics {
            fast: inner.may_complete_now(),
            inner,
            m: Arc::default(),
            every: every.max(1),
        }
    }

    /// One operation in this many is timed.
    pub fn timing_every(&self) -> u64 {
        self.every
    }

    /// The wrapped provider.
    pub fn inner(&self) -> &P {
        &self.inner
    }

    /// The live counters (keep a clone to read them later).
    pub fn metrics(&self) -> Arc<ProviderMetrics> {
        self.m.clone()
    }

    /// A plain copy of the counters.
    pub fn snapshot(&self) -> MetricsSnapshot {
        self.m.snapshot()
    }

    /// Zeroes the cumulative counters.
    pub fn reset(&self) {
        self.m.reset()
    }
}

#[async_trait]
impl<P: Provider> Provider for Metrics<P> {
    forward!(inner; size, capabilities, cancel_writes, close);

    fn may_complete_now(&self) -> bool {
        self.fast
    }
    fn adopt_size(&self) -> Option<usize> {
        self.inner.adopt_size()
    }
    fn adopt_buffer(&self) -> BytesMut {
        self.inner.adopt_buffer()
    }

    fn read_now(&self, offset: u64, buf: BytesMut) -> Now<BytesMut, BytesMut> {
        if !self.fast {
            return Err(buf);
        }
        let n = buf.len() as u64;
        self.m
            .read
            .now(self.every, n, || self.inner.read_now(offset, buf))
    }

    fn read_shared(&self, offset: u64, len: usize) -> Now<Vec<Bytes>, NotShared> {
        if !self.fast {
            return Err(NotShared);
        }
        self.m.read.now(self.every, len as u64, || {
            self.inner.read_shared(offset, len)
        })
    }

    fn read_file(&self, offset: u64, len: usize) -> Now<FileRange, NotShared> {
        if !self.fast {
            return Err(NotShared);
        }
        self.m
            .read
            .now(self.every, len as u64, || self.inner.read_file(offset, len))
    }

    fn write_now(&self, offset: u64, data: Bytes) -> Now<(), Bytes> {
        if !self.fast {
            return Err(data);
        }
        let n = data.len() as u64;
        self.m
            .write
            .now(self.every, n, || self.inner.write_now(offset, data))
    }

    fn read_at<'s, 'f>(&'s self, offset: u64, buf: BytesMut) -> BoxFut<'f, Result<BytesMut>>
    where
        's: 'f,
        Self: 'f,
    {
        now_or(self.read_now(offset, buf), move |buf| async move {
            let (run, n) = (self.m.read.start(self.every), buf.len() as u64);
            let r = self.inner.read_at(offset, buf).await;
            run.finish(n, &r);
            r
        })
    }
    fn write_at<'s, 'f>(&'s self, offset: u64, data: Bytes) -> BoxFut<'f, Result<()>>
    where
        's: 'f,
        Self: 'f,
    {
        now_or(self.write_now(offset, data), move |data| async move {
            let (run, n) = (self.m.write.start(self.every), data.len() as u64);
            let r = self.inner.write_at(offset, data).await;
            run.finish(n, &r);
            r
        })
    }
    async fn flush(&self) -> Result<()> {
        let run = self.m.flush.start(self.every);
        let r = self.inner.flush().await;
        run.finish(0, &r);
        r
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        let run = self.m.trim.start(self.every);
        let r = self.inner.trim(offset, len).await;
        run.finish(len, &r);
        r
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let run = self.m.write_zeroes.start(self.every);
        let r = self.inner.write_zeroes(offset, len).await;
        run.finish(len, &r);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::ProviderExt;
    use crate::sources::MemoryStorage;

    #[test]
    fn buckets() {
        assert_eq!(latency_bucket(Duration::from_nanos(500)), 0);
        assert_eq!(latency_bucket(Duration::from_micros(1)), 1);
        assert_eq!(latency_bucket(Duration::from_micros(3)), 2);
        assert_eq!(latency_bucket(Duration::from_micros(4)), 3);
        assert_eq!(latency_bucket(Duration::from_secs(1_000_000)), 31);
    }

    #[tokio::test]
    async fn counts_ops_bytes_errors() {
        let m = Metrics::with_timing_every(MemoryStorage::new(1000), 1);
        m.write_slice(0, &[1; 100]).await.unwrap();
        m.read_bytes(0, 50).await.unwrap();
        assert!(m.read_bytes(990, 50).await.is_err());
        m.flush().await.unwrap();
        m.trim(0, 10).await.unwrap();
        let s = m.snapshot();
        assert_eq!((s.write.ops, s.write.bytes, s.write.errors), (1, 100, 0));
        assert_eq!((s.read.ops, s.read.bytes, s.read.errors), (2, 50, 1));
        assert_eq!((s.flush.ops, s.trim.bytes), (1, 10));
        assert_eq!(s.read.latency_us_log2.iter().sum::<u64>(), 2);
        assert_eq!((s.read.in_flight, s.read.abandoned), (0, 0));
        m.reset();
        assert_eq!(m.snapshot().read.ops, 0);
    }

    #[tokio::test]
    async fn timing_is_sampled_and_extrapolated() {
        use crate::modules::{ArtificialLatency, LatencyConfig};
        let m = Metrics::with_timing_every(
            ArtificialLatency::new(
                MemoryStorage::new(1000),
                LatencyConfig {
                    write: Duration::from_millis(3),
                    ..LatencyConfig::default()
                },
            ),
            4,
        );
        assert_eq!(m.timing_every(), 4);
        for _ in 0..10 {
            m.write_slice(0, &[1; 10]).await.unwrap();
        }
        let s = m.snapshot().write;
        // Operations 0, 4 and 8 are timed; counts stay exact.
        assert_eq!((s.ops, s.bytes, s.timed), (10, 100, 3));
        assert_eq!(s.latency_us_log2.iter().sum::<u64>(), 3);
        let at_least_3ms: u64 = s.latency_us_log2[latency_bucket(Duration::from_millis(3))..]
            .iter()
            .sum();
        assert_eq!(at_least_3ms, 3);
        // At least 3 ms per write, extrapolated to all ten.
        assert!(s.total_time >= Duration::from_millis(30), "{s:?}");
        assert!(s.mean_latency() >= Duration::from_millis(3), "{s:?}");
        assert!(s.mean_latency() < Duration::from_secs(5), "{s:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_and_abandoned() {
        use crate::modules::{ArtificialLatency, LatencyConfig};
        let m = std::sync::Arc::new(Metrics::new(ArtificialLatency::new(
            MemoryStorage::new(1000),
            LatencyConfig {
                write: Duration::from_secs(1),
                ..LatencyConfig::default()
            },
        )));
        let t = tokio::spawn({
            let m = m.clone();
            async move { m.write_slice(0, &[1; 10]).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(m.snapshot().write.in_flight, 1);
        m.reset();
        assert_eq!(m.snapshot().write.in_flight, 1);
        t.await.unwrap().unwrap();
        let s = m.snapshot().write;
        assert_eq!((s.in_flight, s.ops, s.bytes), (0, 1, 10));
        // A dropped future is abandoned, not in flight forever.
        let r = tokio::time::timeout(Duration::from_millis(10), m.write_slice(0, &[1; 10])).await;
        assert!(r.is_err());
        let s = m.snapshot().write;
        assert_eq!((s.in_flight, s.abandoned, s.ops), (0, 1, 1));
    }
}
