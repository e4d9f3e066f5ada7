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
#[derive(Debug)]
pub struct OpCounters {
    ops: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    in_flight: AtomicU64,
    total_ns: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS],
}

impl Default for OpCounters {
    fn default() -> Self {
        OpCounters {
            ops: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
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

struct InFlight<'a>(&'a OpCounters);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

impl OpCounters {
    fn start(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Relaxed);
        InFlight(self)
    }

    fn finish<T>(&self, started: Instant, bytes: u64, r: &Result<T>) {
        let d = started.elapsed();
        self.ops.fetch_add(1, Relaxed);
        match r {
            Ok(_) => {
                self.bytes.fetch_add(bytes, Relaxed);
            }
            Err(_) => {
                self.errors.fetch_add(1, Relaxed);
            }
        }
        self.total_ns
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
        self.latency[latency_bucket(d)].fetch_add(1, Relaxed);
    }

    /// A plain copy of the counters.
    pub fn snapshot(&self) -> OpSnapshot {
        OpSnapshot {
            ops: self.ops.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            errors: self.errors.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed),
            total_time: Duration::from_nanos(self.total_ns.load(Relaxed)),
            latency_us_log2: std::array::from_fn(|i| self.latency[i].load(Relaxed)),
        }
    }

    fn reset(&self) {
        self.ops.store(0, Relaxed);
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
        let c = &self.m.read;
        let (_f, t, n) = (c.start(), Instant::now(), buf.len() as u64);
        let r = self.inner.read_at(offset, buf).await;
        c.finish(t, n, &r);
        r
    }
    async fn write_at(&self, offset: u64, data: Bytes) -> Result<()> {
        let c = &self.m.write;
        let (_f, t, n) = (c.start(), Instant::now(), data.len() as u64);
        let r = self.inner.write_at(offset, data).await;
        c.finish(t, n, &r);
        r
    }
    async fn flush(&self) -> Result<()> {
        let c = &self.m.flush;
        let (_f, t) = (c.start(), Instant::now());
        let r = self.inner.flush().await;
        c.finish(t, 0, &r);
        r
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        let c = &self.m.trim;
        let (_f, t) = (c.start(), Instant::now());
        let r = self.inner.trim(offset, len).await;
        c.finish(t, len, &r);
        r
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let c = &self.m.write_zeroes;
        let (_f, t) = (c.start(), Instant::now());
        let r = self.inner.write_zeroes(offset, len).await;
        c.finish(t, len, &r);
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
        assert_eq!(s.read.in_flight, 0);
        m.reset();
        assert_eq!(m.snapshot().read.ops, 0);
    }
}
