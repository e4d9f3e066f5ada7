//! [`BlockSplitter`]: splits every read and write into per-block operations
//! that run concurrently, so the provider below only ever sees block-aligned
//! requests (one block each; the device's last block may be shorter).
//!
//! A write that covers part of a block is a read-modify-write of that block.
//! Per-block striped read/write locks keep it atomic: whole-block writes take
//! the block's lock shared, read-modify-writes take it exclusively, so a
//! concurrent write to the rest of the block is never lost.

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::future::try_join_all;
use tokio::sync::RwLock;

use super::util::{join_bufs, pieces, split_buf, Piece, Stripes};
use crate::block::BlockLayout;
use crate::error::{check_range, Op, Result};
use crate::provider::{DynProvider, Provider};

const STRIPES: usize = 1024;

/// A provider that issues only whole-block operations below it.
pub struct BlockSplitter<P = DynProvider> {
    inner: P,
    layout: BlockLayout,
    stripes: Stripes<RwLock<()>>,
}

enum Src {
    Data(Bytes),
    Zero,
}

impl<P: Provider> BlockSplitter<P> {
    /// Wraps `inner` with blocks of `block_size` bytes (a power of two).
    pub fn new(inner: P, block_size: u64) -> Result<Self> {
        Ok(BlockSplitter {
            layout: BlockLayout::new(inner.size(), block_size)?,
            inner,
            stripes: Stripes::new(STRIPES),
        })
    }

    /// The wrapped provider.
    pub fn inner(&self) -> &P {
        &self.inner
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u64 {
        self.layout.block_size()
    }

    async fn write_piece(&self, p: Piece, src: &Src) -> Result<()> {
        if p.full {
            let _g = self.stripes.get(p.block).read().await;
            return match src {
                Src::Data(d) => {
                    self.inner
                        .write_at(p.offset, d.slice(p.buf_off..p.buf_off + p.len))
                        .await
                }
                Src::Zero => self.inner.write_zeroes(p.offset, p.len as u64).await,
            };
        }
        let _g = self.stripes.get(p.block).write().await;
        let r = self.layout.block_range(p.block);
        let mut block = self
            .inner
            .read_at(r.start, BytesMut::zeroed((r.end - r.start) as usize))
            .await?;
        let dst = &mut block[p.in_block..p.in_block + p.len];
        match src {
            Src::Data(d) => dst.copy_from_slice(&d[p.buf_off..p.buf_off + p.len]),
            Src::Zero => dst.fill(0),
        }
        self.inner.write_at(r.start, block.freeze()).await
    }

    async fn write_impl(&self, offset: u64, len: u64, src: Src) -> Result<()> {
        try_join_all(pieces(&self.layout, offset, len).map(|p| self.write_piece(p, &src))).await?;
        Ok(())
    }
}

#[async_trait]
impl<P: Provider> Provider for BlockSplitter<P> {
    forward!(inner; size, capabilities, flush, cancel_writes, close);

    async fn read_at(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        check_range(Op::Read, offset, buf.len() as u64, self.layout.size())?;
        let ps: Vec<Piece> = pieces(&self.layout, offset, buf.len() as u64).collect();
        if ps.len() == 1 && ps[0].full {
            return self.inner.read_at(offset, buf).await;
        }
        let bufs = split_buf(buf, ps.iter().map(|p| p.len));
        let futs = ps.iter().zip(bufs).map(|(p, mut b)| async move {
            if p.full {
                return self.inner.read_at(p.offset, b).await;
            }
            // Read the whole block so the provider below sees aligned I/O.
            let r = self.layout.block_range(p.block);
            let block = self
                .inner
                .read_at(r.start, BytesMut::zeroed((r.end - r.start) as usize))
                .await?;
            b.copy_from_slice(&block[p.in_block..p.in_block + p.len]);
            Ok(b)
        });
        Ok(join_bufs(try_join_all(futs).await?))
    }

    async fn write_at(&self, offset: u64, data: Bytes) -> Result<()> {
        check_range(Op::Write, offset, data.len() as u64, self.layout.size())?;
        self.write_impl(offset, data.len() as u64, Src::Data(data))
            .await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        check_range(Op::Trim, offset, len, self.layout.size())?;
        // Whole blocks are trimmed below; partial edges are zeroed by
        // read-modify-write so the range reads as zeroes.
        let futs = pieces(&self.layout, offset, len).map(|p| async move {
            if p.full {
                let _g = self.stripes.get(p.block).read().await;
                self.inner.trim(p.offset, p.len as u64).await
            } else {
                self.write_piece(p, &Src::Zero).await
            }
        });
        try_join_all(futs).await?;
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        check_range(Op::WriteZeroes, offset, len, self.layout.size())?;
        self.write_impl(offset, len, Src::Zero).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::modules::hooks::Hooks;
    use crate::provider::ProviderExt;
    use crate::sources::MemoryStorage;
    use crate::Error;

    #[tokio::test]
    async fn inner_sees_only_aligned_blocks() {
        let hooks = Arc::new(Hooks::new(MemoryStorage::new(10_000)));
        let check = |off: u64, len: usize| -> Option<crate::Result<()>> {
            let aligned = off % 1024 == 0 && (len == 1024 || off + len as u64 == 10_000);
            (!aligned).then(|| Err(Error::Invalid(format!("unaligned {off}+{len}"))))
        };
        hooks.set_pre_write(Some(Arc::new(move |o, d: &Bytes| check(o, d.len()))));
        hooks.set_pre_read(Some(Arc::new(move |o, b: &mut BytesMut| check(o, b.len()))));
        let s = BlockSplitter::new(hooks.clone(), 1024).unwrap();
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 241) as u8 + 1).collect();
        s.write_slice(7, &data).await.unwrap();
        assert_eq!(&s.read_bytes(7, 5000).await.unwrap()[..], &data[..]);
        s.write_slice(9_990, &[3; 10]).await.unwrap();
        assert_eq!(&s.read_bytes(9_000, 1000).await.unwrap()[990..], &[3; 10]);
        s.write_zeroes(10, 20).await.unwrap();
        assert_eq!(
            &s.read_bytes(7, 30).await.unwrap()[..],
            &[&data[..3], &[0; 20][..], &data[23..30]].concat()[..]
        );
        assert!(s.write_slice(9_999, &[1, 2]).await.is_err());
    }
}
