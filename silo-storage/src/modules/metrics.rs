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
use crate::provider::{DynProvider, Provider};

/// Number of latency buckets (the last one ends above 2^31 µs ≈ 36 min).
pub const LATENCY_BUCKETS: usize = 32;

/// Live counters of one operation kind.
///
/// Kept to four atomic additions per operation: the number of completed
/// operations is the sum of the latency histogram, and the in-flight count is
/// `started - completed - abandoned` (an operation whose future is dropped
/// before it finishes counts as abandoned).
#[derive(Debug)]
pub struct OpCounters {
    started: AtomicU64,
    abandoned: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    total_ns: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS],
}

impl Default for OpCounters {
    fn default() -> Self {
        OpCounters {
            started: AtomicU64::new(0),
            abandoned: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
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

/// An operation in progress; counts as abandoned if dropped unfinished.
struct Running<'a> {
    c: &'a OpCounters,
    started: Instant,
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
        let c = self.c;
        let d = self.started.elapsed();
        match r {
            Ok(_) if bytes > 0 => {
                c.bytes.fetch_add(bytes, Relaxed);
            }
            Ok(_) => {}
            Err(_) => {
                c.errors.fetch_add(1, Relaxed);
            }
        }
        c.total_ns
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
        c.latency[latency_bucket(d)].fetch_add(1, Relaxed);
    }
}

impl OpCounters {
    fn start(&self) -> Running<'_> {
        self.started.fetch_add(1, Relaxed);
        Running {
            c: self,
            started: Instant::now(),
            done: false,
        }
    }

    /// A plain copy of the counters (not an atomic snapshot: counters
    /// updated concurrently may be off by the operations in progress).
    pub fn snapshot(&self) -> OpSnapshot {
        let latency_us_log2: [u64; LATENCY_BUCKETS] =
            std::array::from_fn(|i| self.latency[i].load(Relaxed));
        let ops: u64 = latency_us_log2.iter().sum();
        let started = self.started.load(Relaxed);
        let abandoned = self.abandoned.load(Relaxed);
        OpSnapshot {
            ops,
            bytes: self.bytes.load(Relaxed),
            errors: self.errors.load(Relaxed),
            in_flight: started.saturating_sub(ops + abandoned),
            abandoned,
            total_time: Duration::from_nanos(self.total_ns.load(Relaxed)),
            latency_us_log2,
        }
    }

    fn reset(&self) {
        // Keep `started - completed - abandoned` (in flight) unchanged.
        let s = self.snapshot();
        self.started.store(s.in_flight, Relaxed);
        self.abandoned.store(0, Relaxed);
        self.bytes.store(0, Relaxed);
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
    /// Sum of all operation durations.
    pub total_time: Duration,
    /// Latency histogram: entry `i` counts operations under `2^i` µs.
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
}

impl<P: Provider> Metrics<P> {
    /// Wraps `inner` with fresh counters.
    pub fn new(inner: P) -> Self {
        Metrics {
            inner,
            m: Arc::default(),
        }
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

    async fn read_at(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        let (run, n) = (self.m.read.start(), buf.len() as u64);
        let r = self.inner.read_at(offset, buf).await;
        run.finish(n, &r);
        r
    }
    async fn write_at(&self, offset: u64, data: Bytes) -> Result<()> {
        let (run, n) = (self.m.write.start(), data.len() as u64);
        let r = self.inner.write_at(offset, data).await;
        run.finish(n, &r);
        r
    }
    async fn flush(&self) -> Result<()> {
        let run = self.m.flush.start();
        let r = self.inner.flush().await;
        run.finish(0, &r);
        r
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        let run = self.m.trim.start();
        let r = self.inner.trim(offset, len).await;
        run.finish(len, &r);
        r
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let run = self.m.write_zeroes.start();
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
        let m = Metrics::new(MemoryStorage::new(1000));
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
