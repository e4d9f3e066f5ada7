//! [`AllocationTracker`]: a provider wrapper that remembers which blocks
//! were ever written, so an export can answer `base:allocation` block status
//! (`nbdinfo --map`, `qemu-img map`, sparse-aware `nbdcopy`) for providers
//! that cannot say themselves.

use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use silo_storage::{Capabilities, DynProvider, Provider, Result};

use crate::export::{Allocation, Extent};

/// Wraps a provider; blocks of `granule` bytes become "data" when written
/// and "hole" (reads as zeroes) when trimmed or zeroed as a whole.
/// Initially everything is a hole, which is right for a fresh, zeroed
/// device (e.g. a new `MemoryStorage`).
pub struct AllocationTracker {
    inner: DynProvider,
    granule: u64,
    bits: Vec<AtomicU64>,
}

impl std::fmt::Debug for AllocationTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AllocationTracker")
            .field("granule", &self.granule)
            .field("size", &self.inner.size())
            .finish()
    }
}

impl AllocationTracker {
    /// Tracks `inner` in blocks of `granule` bytes (rounded up to a power of
    /// two, at least 512).
    pub fn new(inner: DynProvider, granule: u64) -> AllocationTracker {
        let granule = granule.max(512).next_power_of_two();
        let blocks = inner.size().div_ceil(granule);
        let words = blocks.div_ceil(64) as usize;
        let mut bits = Vec::with_capacity(words);
        bits.resize_with(words, || AtomicU64::new(0));
        AllocationTracker {
            inner,
            granule,
            bits,
        }
    }

    /// Like [`new`](Self::new) but starts with every block marked as data:
    /// for a provider that already holds data (an existing file, a
    /// migration destination), so only later trims and zeroes show holes.
    pub fn with_all_data(inner: DynProvider, granule: u64) -> AllocationTracker {
        let t = AllocationTracker::new(inner, granule);
        let blocks = t.inner.size().div_ceil(t.granule);
        for b in 0..blocks {
            t.set(b, true);
        }
        t
    }

    fn get(&self, block: u64) -> bool {
        self.bits[(block / 64) as usize].load(Ordering::Acquire) & (1 << (block % 64)) != 0
    }

    fn set(&self, block: u64, on: bool) {
        let w = &self.bits[(block / 64) as usize];
        if on {
            w.fetch_or(1 << (block % 64), Ordering::AcqRel);
        } else {
            w.fetch_and(!(1 << (block % 64)), Ordering::AcqRel);
        }
    }

    /// Marks every block touched by the range as data.
    fn mark_data(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        for b in offset / self.granule..(offset + len).div_ceil(self.granule) {
            self.set(b, true);
        }
    }

    /// Marks blocks entirely inside the range (or ending at the device end)
    /// as holes.
    fn mark_hole(&self, offset: u64, len: u64) {
        let end = offset + len;
        let first = offset.div_ceil(self.granule);
        let last = if end == self.inner.size() {
            end.div_ceil(self.granule)
        } else {
            end / self.granule
        };
        for b in first..last {
            self.set(b, false);
        }
    }
}

impl Allocation for AllocationTracker {
    fn extents(&self, offset: u64, len: u64, max: usize, out: &mut Vec<Extent>) {
        let end = (offset + len).min(self.inner.size());
        let mut pos = offset;
        while pos < end && out.len() < max {
            let block = pos / self.granule;
            let data = self.get(block);
            let mut b = block + 1;
            while b * self.granule < end && self.get(b) == data {
                b += 1;
            }
            let stop = (b * self.granule).min(end);
            out.push(if data {
                Extent::data(stop - pos)
            } else {
                Extent::hole(stop - pos)
            });
            pos = stop;
        }
    }
}

#[async_trait]
impl Provider for AllocationTracker {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn read_at(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        self.inner.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: Bytes) -> Result<()> {
        let len = data.len() as u64;
        self.inner.write_at(offset, data).await?;
        self.mark_data(offset, len);
        Ok(())
    }
    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.trim(offset, len).await?;
        self.mark_hole(offset, len);
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.write_zeroes(offset, len).await?;
        self.mark_hole(offset, len);
        Ok(())
    }
    fn cancel_writes(&self, offset: u64, len: u64) {
        self.inner.cancel_writes(offset, len)
    }
    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use silo_storage::MemoryStorage;
    use std::sync::Arc;

    #[tokio::test]
    async fn tracks_writes_and_trims() {
        let t = AllocationTracker::new(Arc::new(MemoryStorage::new(10 * 4096)), 4096);
        let map = |t: &AllocationTracker| {
            let mut v = Vec::new();
            t.extents(0, 10 * 4096, 100, &mut v);
            v
        };
        assert_eq!(map(&t), vec![Extent::hole(40960)]);
        t.write_at(4096 + 10, Bytes::from_static(b"x"))
            .await
            .unwrap();
        t.write_at(3 * 4096 - 1, Bytes::from_static(b"yy"))
            .await
            .unwrap();
        assert_eq!(
            map(&t),
            vec![
                Extent::hole(4096),
                Extent::data(3 * 4096),
                Extent::hole(6 * 4096)
            ]
        );
        t.trim(4096, 4096 + 100).await.unwrap();
        assert_eq!(
            map(&t),
            vec![
                Extent::hole(2 * 4096),
                Extent::data(2 * 4096),
                Extent::hole(6 * 4096)
            ]
        );
        let mut v = Vec::new();
        t.extents(100, 3 * 4096, 1, &mut v);
        assert_eq!(v, vec![Extent::hole(2 * 4096 - 100)]);

        let full = AllocationTracker::with_all_data(Arc::new(MemoryStorage::new(10_000)), 4096);
        let mut v = Vec::new();
        full.extents(0, 10_000, 10, &mut v);
        assert_eq!(v, vec![Extent::data(10_000)]);
        full.trim(4096, 10_000 - 4096).await.unwrap();
        v.clear();
        full.extents(0, 10_000, 10, &mut v);
        assert_eq!(v, vec![Extent::data(4096), Extent::hole(10_000 - 4096)]);
    }
}
