//! Block arithmetic shared by every layer that works in blocks: the number of
//! blocks of a device, the byte range of a block (the last one may be
//! partial), and the blocks a byte range touches.

use std::ops::Range;

use crate::error::{Error, Result};

/// A device of `size` bytes divided into blocks of `block_size` bytes. The
/// last block is partial when `size` is not a multiple of `block_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockLayout {
    size: u64,
    block_size: u64,
    /// `log2(block_size)`: block arithmetic is on the hot path of every
    /// write through a tracking layer, and a shift costs a cycle where a
    /// 64-bit division costs tens.
    shift: u32,
}

impl BlockLayout {
    /// A layout; `block_size` must be a non-zero power of two.
    pub fn new(size: u64, block_size: u64) -> Result<Self> {
        if block_size == 0 || !block_size.is_power_of_two() {
            return Err(Error::Invalid(format!(
                "block size {block_size} is not a non-zero power of two"
            )));
        }
        Ok(BlockLayout {
            size,
            block_size,
            shift: block_size.trailing_zeros(),
        })
    }

    /// Device size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Number of blocks, counting a trailing partial block.
    pub fn num_blocks(&self) -> u64 {
        self.blocks_up_to(self.size)
    }

    /// `ceil(end / block_size)` without a division.
    #[inline]
    fn blocks_up_to(&self, end: u64) -> u64 {
        (end >> self.shift) + u64::from(end & (self.block_size - 1) != 0)
    }

    /// Byte offset of block `b`.
    pub fn block_offset(&self, b: u64) -> u64 {
        b * self.block_size
    }

    /// Length of block `b` (smaller than the block size for a trailing
    /// partial block, 0 past the end).
    pub fn block_len(&self, b: u64) -> u64 {
        let start = b.saturating_mul(self.block_size);
        self.size.saturating_sub(start).min(self.block_size)
    }

    /// Byte range of block `b`, clipped to the device.
    pub fn block_range(&self, b: u64) -> Range<u64> {
        let start = (b.saturating_mul(self.block_size)).min(self.size);
        start..start + self.block_len(b)
    }

    /// The blocks that `[offset, offset + len)` touches (empty for `len == 0`).
    pub fn blocks_touching(&self, offset: u64, len: u64) -> Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let end = offset.saturating_add(len);
        offset >> self.shift..self.blocks_up_to(end)
    }

    /// The block holding byte `offset`.
    #[inline]
    pub fn first_block(&self, offset: u64) -> u64 {
        offset >> self.shift
    }

    /// The blocks entirely covered by `[offset, offset + len)`, counting a
    /// trailing partial block as covered when the range reaches the device end.
    pub fn blocks_covered(&self, offset: u64, len: u64) -> Range<u64> {
        let end = offset.saturating_add(len);
        let first = self.blocks_up_to(offset);
        let last = if end >= self.size {
            self.num_blocks()
        } else {
            end >> self.shift
        };
        if last <= first {
            first..first
        } else {
            first..last
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_last_block() {
        let l = BlockLayout::new(1_234_567, 4096).unwrap();
        assert_eq!(l.num_blocks(), 302);
        assert_eq!(l.block_len(301), 1_234_567 - 301 * 4096);
        assert_eq!(l.block_range(301).end, 1_234_567);
        assert_eq!(l.block_len(302), 0);
        assert_eq!(l.blocks_touching(4095, 2), 0..2);
        assert_eq!(l.blocks_touching(0, 0), 0..0);
        assert_eq!(l.blocks_covered(1, 8192), 1..2);
        assert_eq!(
            l.blocks_covered(301 * 4096, 1_234_567 - 301 * 4096),
            301..302
        );
        assert_eq!(l.blocks_covered(10, 10), 1..1);
    }

    #[test]
    fn bad_block_sizes() {
        assert!(BlockLayout::new(10, 0).is_err());
        assert!(BlockLayout::new(10, 3000).is_err());
    }
}
