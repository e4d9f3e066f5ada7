//! Small helpers shared by the modules: per-block pieces of a byte range,
//! striped locks, and a compact atomic bitset.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;

use crate::block::BlockLayout;

/// The part of a request that falls into one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    /// Block index.
    pub block: u64,
    /// Device offset of the piece.
    pub offset: u64,
    /// Offset of the piece inside the caller's buffer.
    pub buf_off: usize,
    /// Length of the piece.
    pub len: usize,
    /// Offset of the piece inside its block.
    pub in_block: usize,
    /// The piece covers its whole block (including a trailing partial block).
    pub full: bool,
}

/// Splits `[offset, offset + len)` (already range-checked) into per-block pieces.
pub(crate) fn pieces(layout: &BlockLayout, offset: u64, len: u64) -> impl Iterator<Item = Piece> {
    let layout = *layout;
    let bs = layout.block_size();
    let end = offset + len;
    layout.blocks_touching(offset, len).map(move |b| {
        let r = layout.block_range(b);
        let start = r.start.max(offset);
        let stop = r.end.min(end);
        Piece {
            block: b,
            offset: start,
            buf_off: (start - offset) as usize,
            len: (stop - start) as usize,
            in_block: (start - b * bs) as usize,
            full: start == r.start && stop == r.end,
        }
    })
}

/// Splits `buf` into consecutive pieces of the given lengths (no copy).
pub(crate) fn split_buf(mut buf: BytesMut, lens: impl Iterator<Item = usize>) -> Vec<BytesMut> {
    let mut out = Vec::new();
    for n in lens {
        out.push(buf.split_to(n));
    }
    out
}

/// Joins buffers produced by [`split_buf`] back together (no copy when they
/// are still contiguous, which they are unless a provider swapped a buffer).
pub(crate) fn join_bufs(parts: Vec<BytesMut>) -> BytesMut {
    let mut it = parts.into_iter();
    let mut first = it.next().unwrap_or_default();
    for p in it {
        first.unsplit(p);
    }
    first
}

/// A fixed set of async locks indexed by block number, so per-block mutual
/// exclusion costs a bounded amount of memory whatever the device size.
pub(crate) struct Stripes<L> {
    locks: Box<[L]>,
}

impl<L: Default> Stripes<L> {
    /// `n` is rounded up to a power of two.
    pub(crate) fn new(n: usize) -> Self {
        let n = n.max(1).next_power_of_two();
        Stripes {
            locks: (0..n).map(|_| L::default()).collect(),
        }
    }
}

impl<L> Stripes<L> {
    pub(crate) fn index(&self, block: u64) -> usize {
        (block as usize) & (self.locks.len() - 1)
    }

    pub(crate) fn get(&self, block: u64) -> &L {
        &self.locks[self.index(block)]
    }

    pub(crate) fn at(&self, index: usize) -> &L {
        &self.locks[index]
    }

    /// Stripe indices of `blocks`, sorted and deduplicated: locking in this
    /// order cannot deadlock against another caller doing the same.
    pub(crate) fn ordered(&self, blocks: impl Iterator<Item = u64>) -> Vec<usize> {
        let mut v: Vec<usize> = blocks.map(|b| self.index(b)).collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// A fixed-size bitset of atomics (one bit per block).
#[derive(Debug)]
pub(crate) struct AtomicBits {
    words: Box<[AtomicU64]>,
    len: u64,
}

impl AtomicBits {
    pub(crate) fn new(len: u64) -> Self {
        AtomicBits {
            words: (0..len.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            len,
        }
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    pub(crate) fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    /// Sets bit `i`; returns whether it was clear before.
    pub(crate) fn set(&self, i: u64) -> bool {
        let mask = 1u64 << (i % 64);
        self.words[(i / 64) as usize].fetch_or(mask, Ordering::AcqRel) & mask == 0
    }

    pub(crate) fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Acquire).count_ones() as u64)
            .sum()
    }

    /// Bit `i` as stored in a little-endian, LSB-first byte map.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len.div_ceil(8) as usize);
        for w in self.words.iter() {
            out.extend_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
        }
        out.truncate(self.len.div_ceil(8) as usize);
        out
    }

    pub(crate) fn load_bytes(&self, bytes: &[u8]) {
        for (i, w) in self.words.iter().enumerate() {
            let mut b = [0u8; 8];
            let start = i * 8;
            let end = (start + 8).min(bytes.len());
            if start < end {
                b[..end - start].copy_from_slice(&bytes[start..end]);
            }
            w.store(u64::from_le_bytes(b), Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_range() {
        let l = BlockLayout::new(10_000, 4096).unwrap();
        let p: Vec<_> = pieces(&l, 4000, 6000).collect();
        assert_eq!(p.len(), 3);
        assert_eq!(
            (p[0].block, p[0].len, p[0].in_block, p[0].full),
            (0, 96, 4000, false)
        );
        assert_eq!(
            (p[1].block, p[1].len, p[1].buf_off, p[1].full),
            (1, 4096, 96, true)
        );
        assert_eq!((p[2].block, p[2].len, p[2].full), (2, 10_000 - 8192, true));
        assert_eq!(pieces(&l, 5, 0).count(), 0);
    }

    #[test]
    fn bits_roundtrip() {
        let b = AtomicBits::new(130);
        assert!(b.set(0));
        assert!(!b.set(0));
        b.set(129);
        b.set(64);
        assert_eq!(b.count(), 3);
        let bytes = b.to_bytes();
        assert_eq!(bytes.len(), 17);
        let c = AtomicBits::new(130);
        c.load_bytes(&bytes);
        assert!(c.get(0) && c.get(64) && c.get(129) && !c.get(1) && !c.get(500));
    }
}
