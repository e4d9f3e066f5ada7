//! An in-memory source: the device is split into fixed chunks, each behind
//! its own lock and allocated on first write, so concurrent I/O to different
//! chunks never contends and a large, mostly empty device costs little memory.

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use parking_lot::RwLock;

use crate::error::{check_range, Op, Result};
use crate::provider::{Capabilities, Provider};

/// Default chunk size: 64 KiB.
pub const DEFAULT_CHUNK: usize = 64 * 1024;

/// A memory-backed provider with per-chunk locks and lazy allocation.
pub struct MemoryStorage {
    size: u64,
    chunk: usize,
    chunks: Vec<RwLock<Option<Box<[u8]>>>>,
}

impl std::fmt::Debug for MemoryStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStorage")
            .field("size", &self.size)
            .field("chunk", &self.chunk)
            .finish()
    }
}

impl MemoryStorage {
    /// A zero-filled device of `size` bytes with the default chunk size.
    pub fn new(size: u64) -> Self {
        Self::with_chunk_size(size, DEFAULT_CHUNK)
    }

    /// A zero-filled device with a given chunk size (rounded up to a power
    /// of two, at least 512 bytes).
    pub fn with_chunk_size(size: u64, chunk: usize) -> Self {
        let chunk = chunk.max(512).next_power_of_two();
        let n = size.div_ceil(chunk as u64) as usize;
        let mut chunks = Vec::with_capacity(n);
        chunks.resize_with(n, || RwLock::new(None));
        MemoryStorage {
            size,
            chunk,
            chunks,
        }
    }

    /// Bytes of memory currently allocated for data.
    pub fn allocated_bytes(&self) -> u64 {
        self.chunks.iter().filter(|c| c.read().is_some()).count() as u64 * self.chunk as u64
    }

    fn chunk_len(&self, idx: usize) -> usize {
        let start = idx as u64 * self.chunk as u64;
        (self.size - start).min(self.chunk as u64) as usize
    }

    /// Calls `f(chunk index, offset in chunk, range in caller buffer)` for
    /// each chunk that `[offset, offset+len)` touches.
    fn for_each_chunk(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(usize, usize, std::ops::Range<usize>),
    ) {
        let mut done = 0usize;
        while done < len {
            let pos = offset + done as u64;
            let idx = (pos / self.chunk as u64) as usize;
            let in_chunk = (pos % self.chunk as u64) as usize;
            let n = (self.chunk - in_chunk).min(len - done);
            f(idx, in_chunk, done..done + n);
            done += n;
        }
    }

    fn zero_range(&self, offset: u64, len: u64) {
        self.for_each_chunk(offset, len as usize, |idx, at, r| {
            let mut guard = self.chunks[idx].write();
            if at == 0 && r.len() == self.chunk_len(idx) {
                *guard = None;
            } else if let Some(data) = guard.as_mut() {
                data[at..at + r.len()].fill(0);
            }
        });
    }
}

#[async_trait]
impl Provider for MemoryStorage {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }

    async fn read_at(&self, offset: u64, mut buf: BytesMut) -> Result<BytesMut> {
        check_range(Op::Read, offset, buf.len() as u64, self.size)?;
        let len = buf.len();
        self.for_each_chunk(offset, len, |idx, at, r| {
            let guard = self.chunks[idx].read();
            match guard.as_ref() {
                Some(data) => buf[r.clone()].copy_from_slice(&data[at..at + r.len()]),
                None => buf[r].fill(0),
            }
        });
        Ok(buf)
    }

    async fn write_at(&self, offset: u64, data: Bytes) -> Result<()> {
        check_range(Op::Write, offset, data.len() as u64, self.size)?;
        self.for_each_chunk(offset, data.len(), |idx, at, r| {
            let src = &data[r.clone()];
            {
                let guard = self.chunks[idx].read();
                // Writing zeroes into an unallocated chunk changes nothing.
                if guard.is_none() && src.iter().all(|&b| b == 0) {
                    return;
                }
            }
            let mut guard = self.chunks[idx].write();
            let chunk_len = self.chunk_len(idx);
            match guard.as_mut() {
                Some(slot) => slot[at..at + r.len()].copy_from_slice(src),
                // A write covering a whole new chunk becomes its memory in
                // one pass (allocate + copy): zero-filling it first would
                // write every byte twice (bulk copies into a fresh device).
                None if src.len() == chunk_len => *guard = Some(Box::from(src)),
                None => {
                    let mut slot = vec![0u8; chunk_len].into_boxed_slice();
                    slot[at..at + r.len()].copy_from_slice(src);
                    *guard = Some(slot);
                }
            }
        });
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        check_range(Op::Trim, offset, len, self.size)?;
        self.zero_range(offset, len);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        check_range(Op::WriteZeroes, offset, len, self.size)?;
        self.zero_range(offset, len);
        Ok(())
    }

    fn cancel_writes(&self, _offset: u64, _len: u64) {}

    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::ProviderExt;

    #[tokio::test]
    async fn read_write_across_chunks() {
        let m = MemoryStorage::with_chunk_size(10_000, 1024);
        let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8 + 1).collect();
        m.write_slice(1000, &data).await.unwrap();
        let back = m.read_bytes(1000, 3000).await.unwrap();
        assert_eq!(&back[..], &data[..]);
        let z = m.read_bytes(0, 1000).await.unwrap();
        assert!(z.iter().all(|&b| b == 0));
        // last partial chunk
        m.write_slice(9_990, &[7u8; 10]).await.unwrap();
        assert_eq!(&m.read_bytes(9_990, 10).await.unwrap()[..], &[7u8; 10]);
        assert!(m.write_slice(9_991, &[7u8; 10]).await.is_err());
        assert!(m.read_bytes(10_000, 1).await.is_err());
        m.trim(0, 10_000).await.unwrap();
        assert_eq!(m.allocated_bytes(), 0);
    }

    #[tokio::test]
    async fn whole_and_partial_chunk_writes_into_new_chunks() {
        let m = MemoryStorage::with_chunk_size(4096 * 3 + 100, 4096);
        let data: Vec<u8> = (0..(4096 * 3 + 100) as u32)
            .map(|i| (i % 249) as u8 + 1)
            .collect();
        // Whole chunks, then the short last chunk whole.
        m.write_slice(4096, &data[..4096]).await.unwrap();
        m.write_slice(4096 * 3, &data[..100]).await.unwrap();
        // A partial write into a new chunk leaves the rest zero.
        m.write_slice(10, &data[..20]).await.unwrap();
        let back = m.read_bytes(0, 4096 * 3 + 100).await.unwrap();
        assert!(back[..10].iter().all(|&b| b == 0));
        assert_eq!(&back[10..30], &data[..20]);
        assert!(back[30..4096].iter().all(|&b| b == 0));
        assert_eq!(&back[4096..8192], &data[..4096]);
        assert!(back[8192..12288].iter().all(|&b| b == 0));
        assert_eq!(&back[12288..], &data[..100]);
        assert_eq!(m.allocated_bytes(), 3 * 4096);
    }
}
