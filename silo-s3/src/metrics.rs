//! Counters of one S3-backed device (requests, bytes, errors, in-flight).
//!
//! ```
//! # use silo_s3::S3Metrics;
//! let m = S3Metrics::default();
//! let snap = m.snapshot();
//! assert_eq!(snap.puts, 0);
//! ```

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Live counters; cheap to update from many tasks.
#[derive(Debug, Default)]
pub struct S3Metrics {
    gets: AtomicU64,
    get_bytes: AtomicU64,
    get_missing: AtomicU64,
    get_nanos: AtomicU64,
    merge_gets: AtomicU64,
    puts: AtomicU64,
    put_bytes: AtomicU64,
    put_nanos: AtomicU64,
    deletes: AtomicU64,
    errors: AtomicU64,
    cancelled: AtomicU64,
    inflight_reads: AtomicU64,
    inflight_writes: AtomicU64,
}

/// A point-in-time copy of [`S3Metrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct S3MetricsSnapshot {
    /// Successful GET requests (including the GETs of read-merge-writes).
    pub gets: u64,
    /// Bytes received by GETs.
    pub get_bytes: u64,
    /// GETs of objects that did not exist (read as zeroes).
    pub get_missing: u64,
    /// Total time spent in GETs.
    pub get_time: Duration,
    /// GETs done to merge a partial-block write.
    pub merge_gets: u64,
    /// Successful PUT requests.
    pub puts: u64,
    /// Bytes sent by PUTs.
    pub put_bytes: u64,
    /// Total time spent in PUTs.
    pub put_time: Duration,
    /// DELETE requests (trim, zero blocks).
    pub deletes: u64,
    /// Requests that failed (after retries).
    pub errors: u64,
    /// Uploads abandoned by `cancel_writes` or close.
    pub cancelled: u64,
    /// GETs in flight now.
    pub inflight_reads: u64,
    /// PUTs/DELETEs in flight now.
    pub inflight_writes: u64,
}

impl S3Metrics {
    /// Copies the counters.
    pub fn snapshot(&self) -> S3MetricsSnapshot {
        S3MetricsSnapshot {
            gets: self.gets.load(Relaxed),
            get_bytes: self.get_bytes.load(Relaxed),
            get_missing: self.get_missing.load(Relaxed),
            get_time: Duration::from_nanos(self.get_nanos.load(Relaxed)),
            merge_gets: self.merge_gets.load(Relaxed),
            puts: self.puts.load(Relaxed),
            put_bytes: self.put_bytes.load(Relaxed),
            put_time: Duration::from_nanos(self.put_nanos.load(Relaxed)),
            deletes: self.deletes.load(Relaxed),
            errors: self.errors.load(Relaxed),
            cancelled: self.cancelled.load(Relaxed),
            inflight_reads: self.inflight_reads.load(Relaxed),
            inflight_writes: self.inflight_writes.load(Relaxed),
        }
    }

    pub(crate) fn get_done(&self, bytes: u64, missing: bool, merge: bool, took: Duration) {
        self.gets.fetch_add(1, Relaxed);
        self.get_bytes.fetch_add(bytes, Relaxed);
        if missing {
            self.get_missing.fetch_add(1, Relaxed);
        }
        if merge {
            self.merge_gets.fetch_add(1, Relaxed);
        }
        self.get_nanos.fetch_add(took.as_nanos() as u64, Relaxed);
    }

    pub(crate) fn put_done(&self, bytes: u64, took: Duration) {
        self.puts.fetch_add(1, Relaxed);
        self.put_bytes.fetch_add(bytes, Relaxed);
        self.put_nanos.fetch_add(took.as_nanos() as u64, Relaxed);
    }

    pub(crate) fn delete_done(&self) {
        self.deletes.fetch_add(1, Relaxed);
    }

    pub(crate) fn error(&self) {
        self.errors.fetch_add(1, Relaxed);
    }

    pub(crate) fn cancelled(&self) {
        self.cancelled.fetch_add(1, Relaxed);
    }

    pub(crate) fn inflight(&self, write: bool) -> InflightGuard<'_> {
        let c = if write {
            &self.inflight_writes
        } else {
            &self.inflight_reads
        };
        c.fetch_add(1, Relaxed);
        InflightGuard(c)
    }
}

/// Decrements an in-flight gauge on drop (also when the future is dropped).
pub(crate) struct InflightGuard<'a>(&'a AtomicU64);

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}
