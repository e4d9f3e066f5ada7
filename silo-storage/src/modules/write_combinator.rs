//! [`WriteCombinator`]: several prioritised inputs write into one provider.
//!
//! Each input ([`CombinatorInput`], itself a provider) has a priority. Per
//! block, a write from an input is **applied** only if its priority is at
//! least the highest priority that has already written that block; otherwise
//! that block's part of the write is **dropped** (the block already holds
//! newer, higher-priority data). Typical use: a migration stream (low) and a
//! local writer or a priority fetch (high) landing on the same device.
//!
//! Writes need not be block-aligned: a write is split per block and each
//! block's part is decided on its own; a partial write to a block claims the
//! block for its priority like a whole one.
//!
//! **How a caller learns about dropped data.** [`Provider::write_at`] on an
//! input returns `Ok(())` when every block was either applied or dropped
//! (a dropped block is not an error: the device holds higher-priority data
//! there). To know exactly what happened, call
//! [`CombinatorInput::write_reporting`], which returns a [`WriteOutcome`]
//! with the applied and dropped byte counts; every drop is also counted in
//! [`CombinatorInput::stats`] and [`WriteCombinator::stats`]. Trim and
//! write-zeroes follow the same per-block rule.
//!
//! The check and the write of a block happen under a per-block (striped)
//! lock, so a lower-priority write can never overwrite a block after a
//! higher-priority write has claimed it. Reads pass through to the target.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::future::try_join_all;
use tokio::sync::Mutex as AsyncMutex;

use super::util::{pieces, Piece, Stripes};
use crate::block::BlockLayout;
use crate::error::{check_range, Error, Op, Result};
use crate::provider::{Capabilities, DynProvider, Provider};

const STRIPES: usize = 1024;

/// What happened to one write through a [`CombinatorInput`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriteOutcome {
    /// Bytes written to the target.
    pub applied_bytes: u64,
    /// Bytes dropped because a higher priority already wrote their block.
    pub dropped_bytes: u64,
    /// Blocks (parts of blocks) dropped.
    pub dropped_blocks: u64,
}

/// Counters of a combinator or one of its inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CombinatorStats {
    /// Block parts applied.
    pub applied_blocks: u64,
    /// Block parts dropped.
    pub dropped_blocks: u64,
    /// Bytes applied.
    pub applied_bytes: u64,
    /// Bytes dropped.
    pub dropped_bytes: u64,
}

#[derive(Debug, Default)]
struct Counters {
    applied_blocks: AtomicU64,
    dropped_blocks: AtomicU64,
    applied_bytes: AtomicU64,
    dropped_bytes: AtomicU64,
}

impl Counters {
    fn add(&self, applied: bool, bytes: u64) {
        let r = Ordering::Relaxed;
        if applied {
            self.applied_blocks.fetch_add(1, r);
            self.applied_bytes.fetch_add(bytes, r);
        } else {
            self.dropped_blocks.fetch_add(1, r);
            self.dropped_bytes.fetch_add(bytes, r);
        }
    }
    fn get(&self) -> CombinatorStats {
        let r = Ordering::Relaxed;
        CombinatorStats {
            applied_blocks: self.applied_blocks.load(r),
            dropped_blocks: self.dropped_blocks.load(r),
            applied_bytes: self.applied_bytes.load(r),
            dropped_bytes: self.dropped_bytes.load(r),
        }
    }
}

struct Shared<P> {
    target: P,
    layout: BlockLayout,
    /// Per block: highest priority that wrote it, plus one (0 = never written).
    owner: Box<[AtomicU64]>,
    stripes: Stripes<AsyncMutex<()>>,
    counters: Counters,
}

/// Several prioritised inputs writing into one target provider.
pub struct WriteCombinator<P = DynProvider> {
    shared: Arc<Shared<P>>,
}

/// One prioritised input of a [`WriteCombinator`]; a provider over the target.
pub struct CombinatorInput<P = DynProvider> {
    shared: Arc<Shared<P>>,
    priority: u32,
    counters: Counters,
    closed: AtomicBool,
}

enum Src {
    Data(Bytes),
    Zero,
}

impl<P: Provider> WriteCombinator<P> {
    /// A combinator over `target` with blocks of `block_size` bytes.
    pub fn new(target: P, block_size: u64) -> Result<Self> {
        let layout = BlockLayout::new(target.size(), block_size)?;
        Ok(WriteCombinator {
            shared: Arc::new(Shared {
                owner: (0..layout.num_blocks())
                    .map(|_| AtomicU64::new(0))
                    .collect(),
                target,
                layout,
                stripes: Stripes::new(STRIPES),
                counters: Counters::default(),
            }),
        })
    }

    /// A new input writing with `priority` (higher wins).
    pub fn add_input(&self, priority: u32) -> CombinatorInput<P> {
        CombinatorInput {
            shared: self.shared.clone(),
            priority,
            counters: Counters::default(),
            closed: AtomicBool::new(false),
        }
    }

    /// The highest priority that has written block `b`, if any.
    pub fn block_priority(&self, b: u64) -> Option<u32> {
        let v = self.shared.owner.get(b as usize)?.load(Ordering::Acquire);
        (v > 0).then(|| (v - 1) as u32)
    }

    /// Counters over all inputs.
    pub fn stats(&self) -> CombinatorStats {
        self.shared.counters.get()
    }

    /// The target provider.
    pub fn target(&self) -> &P {
        &self.shared.target
    }

    /// Flushes the target.
    pub async fn flush(&self) -> Result<()> {
        self.shared.target.flush().await
    }

    /// Closes the target (inputs fail afterwards with whatever it returns).
    pub async fn close(&self) -> Result<()> {
        self.shared.target.close().await
    }
}

impl<P: Provider> CombinatorInput<P> {
    /// This input's priority.
    pub fn priority(&self) -> u32 {
        self.priority
    }

    /// Counters of this input.
    pub fn stats(&self) -> CombinatorStats {
        self.counters.get()
    }

    /// Writes `data` at `offset` and reports how much was applied and dropped.
    pub async fn write_reporting(&self, offset: u64, data: Bytes) -> Result<WriteOutcome> {
        self.check(Op::Write, offset, data.len() as u64)?;
        self.apply(offset, data.len() as u64, Src::Data(data)).await
    }

    fn check(&self, op: Op, offset: u64, len: u64) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed { op });
        }
        check_range(op, offset, len, self.shared.layout.size())
    }

    async fn apply_piece(&self, p: Piece, src: &Src, op: Op) -> Result<bool> {
        let s = &self.shared;
        let mine = self.priority as u64 + 1;
        let _g = s.stripes.get(p.block).lock().await;
        let owner = &s.owner[p.block as usize];
        if owner.load(Ordering::Acquire) > mine {
            return Ok(false);
        }
        match (src, op) {
            (Src::Data(d), _) => {
                s.target
                    .write_at(p.offset, d.slice(p.buf_off..p.buf_off + p.len))
                    .await?
            }
            (Src::Zero, Op::Trim) => s.target.trim(p.offset, p.len as u64).await?,
            (Src::Zero, _) => s.target.write_zeroes(p.offset, p.len as u64).await?,
        }
        owner.fetch_max(mine, Ordering::AcqRel);
        Ok(true)
    }

    async fn apply(&self, offset: u64, len: u64, src: Src) -> Result<WriteOutcome> {
        let op = match src {
            Src::Data(_) => Op::Write,
            Src::Zero => Op::WriteZeroes,
        };
        self.apply_op(offset, len, src, op).await
    }

    async fn apply_op(&self, offset: u64, len: u64, src: Src, op: Op) -> Result<WriteOutcome> {
        let ps: Vec<Piece> = pieces(&self.shared.layout, offset, len).collect();
        let applied = try_join_all(ps.iter().map(|p| self.apply_piece(*p, &src, op))).await?;
        let mut out = WriteOutcome::default();
        for (p, ok) in ps.iter().zip(applied) {
            self.counters.add(ok, p.len as u64);
            self.shared.counters.add(ok, p.len as u64);
            if ok {
                out.applied_bytes += p.len as u64;
            } else {
                out.dropped_bytes += p.len as u64;
                out.dropped_blocks += 1;
            }
        }
        if out.dropped_bytes > 0 {
            tracing::trace!(
                priority = self.priority,
                offset,
                len,
                dropped = out.dropped_bytes,
                "write partly superseded by higher priority"
            );
        }
        Ok(out)
    }
}

#[async_trait]
impl<P: Provider> Provider for CombinatorInput<P> {
    fn size(&self) -> u64 {
        self.shared.layout.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.shared.target.capabilities()
    }
    async fn read_at(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        self.check(Op::Read, offset, buf.len() as u64)?;
        self.shared.target.read_at(offset, buf).await
    }
    /// Applies the write per block; `Ok` also when some blocks were dropped
    /// in favour of higher-priority data (see the module docs and
    /// [`CombinatorInput::write_reporting`]).
    async fn write_at(&self, offset: u64, data: Bytes) -> Result<()> {
        self.write_reporting(offset, data).await.map(|_| ())
    }
    async fn flush(&self) -> Result<()> {
        self.shared.target.flush().await
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.check(Op::Trim, offset, len)?;
        self.apply_op(offset, len, Src::Zero, Op::Trim)
            .await
            .map(|_| ())
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check(Op::WriteZeroes, offset, len)?;
        self.apply(offset, len, Src::Zero).await.map(|_| ())
    }
    fn cancel_writes(&self, offset: u64, len: u64) {
        self.shared.target.cancel_writes(offset, len)
    }
    /// Closes this input only; the target stays open for the other inputs
    /// (close it with [`WriteCombinator::close`]).
    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::provider::ProviderExt;
    use crate::sources::MemoryStorage;

    #[tokio::test]
    async fn higher_priority_wins_per_block() {
        let c = WriteCombinator::new(Arc::new(MemoryStorage::new(10_000)), 1024).unwrap();
        let low = c.add_input(1);
        let high = c.add_input(5);
        // high writes part of block 1 (unaligned)
        let o = high
            .write_reporting(1500, Bytes::from(vec![9u8; 100]))
            .await
            .unwrap();
        assert_eq!(
            o,
            WriteOutcome {
                applied_bytes: 100,
                dropped_bytes: 0,
                dropped_blocks: 0
            }
        );
        // low writes blocks 0..3 unaligned: block 1 part dropped
        let o = low
            .write_reporting(1000, Bytes::from(vec![1u8; 2000]))
            .await
            .unwrap();
        assert_eq!(o.dropped_bytes, 1024);
        assert_eq!(o.applied_bytes, 2000 - 1024);
        assert_eq!(o.dropped_blocks, 1);
        let all = c.target().read_bytes(0, 4000).await.unwrap();
        assert_eq!(&all[1000..1024], &[1u8; 24][..]);
        assert_eq!(&all[1024..1500], &[0u8; 476][..]);
        assert_eq!(&all[1500..1600], &[9u8; 100][..]);
        assert_eq!(&all[2048..3000], &[1u8; 952][..]);
        assert_eq!(c.block_priority(1), Some(5));
        assert_eq!(c.block_priority(0), Some(1));
        assert_eq!(c.block_priority(5), None);
        assert_eq!(low.stats().dropped_bytes, 1024);
        assert_eq!(c.stats().dropped_blocks, 1);
        // equal priority applies; plain write_at is Ok when dropped
        low.write_slice(0, &[2; 10]).await.unwrap();
        low.write_slice(1024, &[2; 10]).await.unwrap();
        assert_eq!(&c.target().read_bytes(0, 10).await.unwrap()[..], &[2; 10]);
        assert_eq!(
            &c.target().read_bytes(1024, 10).await.unwrap()[..],
            &[0; 10]
        );
        // last partial block
        high.write_slice(9_990, &[4; 10]).await.unwrap();
        assert!(high.write_slice(9_995, &[4; 10]).await.is_err());
        low.close().await.unwrap();
        assert!(low.write_slice(0, &[1]).await.is_err());
        high.write_slice(0, &[1]).await.unwrap();
    }

    #[tokio::test]
    async fn concurrent_priorities_never_lose_to_lower() {
        let c = WriteCombinator::new(Arc::new(MemoryStorage::new(64 * 512)), 512).unwrap();
        let low = Arc::new(c.add_input(0));
        let high = Arc::new(c.add_input(1));
        let mut tasks = Vec::new();
        for round in 0..20u8 {
            let (low, high) = (low.clone(), high.clone());
            tasks.push(tokio::spawn(async move {
                for b in 0..64u64 {
                    low.write_at(b * 512, Bytes::from(vec![round | 0x80; 512]))
                        .await
                        .unwrap();
                }
            }));
            tasks.push(tokio::spawn(async move {
                for b in (0..64u64).rev() {
                    high.write_at(b * 512, Bytes::from(vec![1u8; 512]))
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        // Every block was written by high at least once, so it must hold high's data.
        let all = c.target().read_bytes(0, 64 * 512).await.unwrap();
        assert!(all.iter().all(|&b| b == 1));
    }
}
