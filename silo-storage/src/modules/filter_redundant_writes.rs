//! [`FilterRedundantWrites`]: before a write, reads the same range from a
//! reference provider (usually the current content of the device, or the
//! content the destination already has) and writes only the runs that
//! changed. Two changed runs separated by at most `allowance` unchanged bytes
//! are merged into one write (fewer, larger writes). If the reference read
//! fails the write is passed through whole, so the filter never loses data.
//!
//! [`changed_runs`] is the pure core; it is property-tested against a model
//! (applying the runs to the old content must always give the new content —
//! the Go version lost the byte after each run).
//!
//! Concurrent overlapping writes through this layer have no defined order
//! (as on any block device); writes to disjoint ranges are independent.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::future::try_join_all;

use crate::error::{check_range, Op, Result};
use crate::provider::{DynProvider, Provider};

/// The ranges of `new` that differ from `old` (same length), merging runs
/// separated by at most `allowance` equal bytes. Every returned range starts
/// and ends with a differing byte; ranges are ascending and disjoint.
pub fn changed_runs(old: &[u8], new: &[u8], allowance: usize) -> Vec<Range<usize>> {
    assert_eq!(old.len(), new.len(), "changed_runs needs equal lengths");
    let mut runs: Vec<Range<usize>> = Vec::new();
    let mut i = 0;
    let n = new.len();
    while i < n {
        // Skip equal bytes quickly, 8 at a time.
        while i + 8 <= n && old[i..i + 8] == new[i..i + 8] {
            i += 8;
        }
        while i < n && old[i] == new[i] {
            i += 1;
        }
        if i == n {
            break;
        }
        let start = i;
        while i < n && old[i] != new[i] {
            i += 1;
        }
        // `i` is one past the last differing byte of this run.
        match runs.last_mut() {
            Some(last) if start - last.end <= allowance => last.end = i,
            _ => runs.push(start..i),
        }
    }
    runs
}

/// Counters of a [`FilterRedundantWrites`] layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FilterStats {
    /// Writes received.
    pub writes: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// Bytes actually written below.
    pub bytes_written: u64,
    /// Writes passed through whole because the reference read failed.
    pub passthrough: u64,
}

/// A provider that skips bytes that would not change.
pub struct FilterRedundantWrites<P = DynProvider, R = DynProvider> {
    inner: P,
    reference: R,
    allowance: usize,
    writes: AtomicU64,
    bytes_in: AtomicU64,
    bytes_written: AtomicU64,
    passthrough: AtomicU64,
}

impl<P: Provider, R: Provider> FilterRedundantWrites<P, R> {
    /// Writes to `inner` only what differs from `reference` (same size).
    pub fn new(inner: P, reference: R, allowance: usize) -> Result<Self> {
        if reference.size() < inner.size() {
            return Err(crate::Error::Invalid(format!(
                "reference has {} bytes, device has {}",
                reference.size(),
                inner.size()
            )));
        }
        Ok(FilterRedundantWrites {
            inner,
            reference,
            allowance,
            writes: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            passthrough: AtomicU64::new(0),
        })
    }

    /// The wrapped provider.
    pub fn inner(&self) -> &P {
        &self.inner
    }

    /// Counters.
    pub fn stats(&self) -> FilterStats {
        FilterStats {
            writes: self.writes.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_written: self.bytes_written.load(Relaxed),
            passthrough: self.passthrough.load(Relaxed),
        }
    }
}

#[async_trait]
impl<P: Provider, R: Provider> Provider for FilterRedundantWrites<P, R> {
    forward!(inner; size, capabilities, flush, trim, write_zeroes, cancel_writes, close, read_at);

    async fn write_at(&self, offset: u64, data: Bytes) -> Result<()> {
        check_range(Op::Write, offset, data.len() as u64, self.inner.size())?;
        self.writes.fetch_add(1, Relaxed);
        self.bytes_in.fetch_add(data.len() as u64, Relaxed);
        let old = match self
            .reference
            .read_at(offset, BytesMut::zeroed(data.len()))
            .await
        {
            Ok(old) => old,
            Err(e) => {
                tracing::debug!(offset, len = data.len(), error = %e, "reference read failed; writing through");
                self.passthrough.fetch_add(1, Relaxed);
                self.bytes_written.fetch_add(data.len() as u64, Relaxed);
                return self.inner.write_at(offset, data).await;
            }
        };
        let runs = changed_runs(&old, &data, self.allowance);
        let written: usize = runs.iter().map(|r| r.len()).sum();
        self.bytes_written.fetch_add(written as u64, Relaxed);
        try_join_all(
            runs.into_iter()
                .map(|r| self.inner.write_at(offset + r.start as u64, data.slice(r))),
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn go_bug_byte_after_run_is_kept() {
        // changed, unchanged, changed: allowance 0 must give two runs.
        let old = [0u8, 0, 0, 0];
        let new = [1u8, 0, 1, 0];
        assert_eq!(changed_runs(&old, &new, 0), vec![0..1, 2..3]);
        assert_eq!(changed_runs(&old, &new, 1), vec![0..3]);
        assert_eq!(changed_runs(&old, &old, 5), vec![]);
        assert_eq!(changed_runs(&[0, 0], &[0, 1], 0), vec![1..2]);
    }

    proptest! {
        #[test]
        fn runs_reproduce_the_new_content(
            pairs in proptest::collection::vec((0u8..3, 0u8..3), 0..300),
            allowance in 0usize..6,
        ) {
            let old: Vec<u8> = pairs.iter().map(|p| p.0).collect();
            let new: Vec<u8> = pairs.iter().map(|p| p.1).collect();
            let runs = changed_runs(&old, &new, allowance);
            let mut result = old.clone();
            let mut prev_end: Option<usize> = None;
            for r in &runs {
                prop_assert!(r.start < r.end);
                prop_assert!(old[r.start] != new[r.start] && old[r.end - 1] != new[r.end - 1]);
                if let Some(e) = prev_end {
                    prop_assert!(r.start > e + allowance, "runs {runs:?} should have merged");
                }
                prev_end = Some(r.end);
                result[r.clone()].copy_from_slice(&new[r.clone()]);
            }
            prop_assert_eq!(result, new);
        }
    }
}
