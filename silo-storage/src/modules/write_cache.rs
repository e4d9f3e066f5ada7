//! [`WriteCache`]: a write-back cache that coalesces writes in memory and
//! writes them to the inner provider later.
//!
//! * **Writes** are copied and kept per block as a list of pieces; a newer
//!   piece drops the older pieces it covers completely. (Copies, so that the
//!   memory held is exactly the bytes counted: a slice of the caller's
//!   buffer would keep that whole buffer alive.) When the cached bytes would exceed `max_data`, the
//!   writer first flushes the largest blocks until at most `min_data` bytes
//!   remain (backpressure), so memory stays bounded by `max_data` plus one
//!   write.
//! * **Reads** read the inner provider and lay the cached pieces over the
//!   result, so every acknowledged write is visible immediately.
//! * **Flushing**: every `flush_period` a background tokio task writes all
//!   cached blocks down; `flush()` does the same and then flushes the inner
//!   provider; `close()` flushes, stops the task and closes the inner
//!   provider. One flush pass runs at a time; blocks of a pass are written
//!   concurrently (at most 16 at once). A block with several pieces is
//!   written as its merged extents.
//! * **Errors are never swallowed.** If writing a block down fails, its
//!   pieces go back into the cache (nothing is lost, the next pass retries)
//!   and the error is returned: directly to the caller of `flush()` / a
//!   writer doing backpressure, or — for the background task — kept and
//!   returned once by the next `write_at`, `trim`, `write_zeroes` or
//!   `flush()` (a write that returns such an error has not been performed).
//! * **Trim / write-zeroes** wait for any flush pass, apply the operation to
//!   the inner provider, then drop the cached bytes of that range.
//! * **Write-through mode** ([`WriteCache::set_write_through`]) writes
//!   everything cached down and sends later writes straight below (the Go
//!   cache disables itself the same way when CoW blocks are queried, so
//!   the overlay sees every write during a migration).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::stream::{self, StreamExt};
use parking_lot::Mutex;
use tokio::sync::RwLock as AsyncRwLock;
use tokio::task::JoinHandle;

use super::util::pieces;
use crate::block::BlockLayout;
use crate::error::{check_range, Error, Op, Result};
use crate::provider::{Capabilities, DynProvider, Provider};

const FLUSH_CONCURRENCY: usize = 16;

/// Configuration of a [`WriteCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteCacheConfig {
    /// Cache granularity (a power of two).
    pub block_size: u64,
    /// After an eviction, at most this many bytes stay cached.
    pub min_data: u64,
    /// A write that would take the cache above this flushes first.
    pub max_data: u64,
    /// Period of the background flush (`None`: only explicit/backpressure flushes).
    pub flush_period: Option<Duration>,
}

impl WriteCacheConfig {
    /// 4 KiB blocks, 16–64 MiB, flushed every second.
    pub fn new() -> Self {
        WriteCacheConfig {
            block_size: 4096,
            min_data: 16 << 20,
            max_data: 64 << 20,
            flush_period: Some(Duration::from_secs(1)),
        }
    }
}

impl Default for WriteCacheConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// Counters of a [`WriteCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriteCacheStats {
    /// Bytes cached now.
    pub cached_bytes: u64,
    /// Blocks with cached bytes now.
    pub cached_blocks: u64,
    /// Flush passes run (background, backpressure, explicit).
    pub passes: u64,
    /// Blocks written down successfully.
    pub blocks_written: u64,
    /// Blocks whose write-down failed (kept for retry).
    pub block_errors: u64,
    /// Writes that went straight below in write-through mode.
    pub write_through_writes: u64,
}

#[derive(Clone)]
struct CachedPiece {
    offset: u64,
    data: Bytes,
}

#[derive(Default)]
struct Entry {
    pieces: Vec<CachedPiece>,
    bytes: u64,
}

#[derive(Default)]
struct State {
    dirty: BTreeMap<u64, Entry>,
    /// Entries being written down by the current pass (still visible to reads).
    flushing: BTreeMap<u64, Entry>,
    bytes: u64,
    error: Option<Error>,
    closed: bool,
    passes: u64,
    blocks_written: u64,
    block_errors: u64,
    write_through_writes: u64,
}

struct Shared<P> {
    inner: P,
    layout: BlockLayout,
    cfg: WriteCacheConfig,
    state: Mutex<State>,
    /// Exclusive for a flush pass and for switching modes; shared for
    /// writes, trims and write-zeroes.
    flush_lock: AsyncRwLock<()>,
    write_through: AtomicBool,
}

/// A write-back cache in front of a provider.
pub struct WriteCache<P = DynProvider> {
    shared: Arc<Shared<P>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

enum Select {
    All,
    DownTo(u64),
}

impl<P: Provider> Shared<P> {
    fn check_open(&self, op: Op) -> Result<()> {
        let mut s = self.state.lock();
        if s.closed {
            return Err(Error::Closed { op });
        }
        if op != Op::Read {
            if let Some(e) = s.error.take() {
                return Err(e);
            }
        }
        Ok(())
    }

    fn insert(&self, offset: u64, data: &Bytes) {
        let mut s = self.state.lock();
        for p in pieces(&self.layout, offset, data.len() as u64) {
            // A copy, not a slice: a slice would keep the caller's whole
            // buffer (possibly a large network buffer) alive for as long as
            // any piece of it stays cached, breaking the memory bound.
            let new = CachedPiece {
                offset: p.offset,
                data: Bytes::copy_from_slice(&data[p.buf_off..p.buf_off + p.len]),
            };
            let (a, b) = (p.offset, p.offset + p.len as u64);
            let e = s.dirty.entry(p.block).or_default();
            let before = e.bytes;
            e.pieces
                .retain(|q| !(q.offset >= a && q.offset + q.data.len() as u64 <= b));
            e.pieces.push(new);
            e.bytes = e.pieces.iter().map(|q| q.data.len() as u64).sum();
            let after = e.bytes;
            s.bytes = s.bytes + after - before;
        }
    }

    /// Drops cached bytes in `[a, b)` (caller holds the flush lock).
    fn clip(&self, a: u64, b: u64) {
        let mut s = self.state.lock();
        let blocks = self.layout.blocks_touching(a, b - a);
        let mut freed = 0u64;
        for blk in blocks {
            let Some(e) = s.dirty.get_mut(&blk) else {
                continue;
            };
            let mut kept = Vec::with_capacity(e.pieces.len());
            for q in e.pieces.drain(..) {
                let (qa, qb) = (q.offset, q.offset + q.data.len() as u64);
                if qb <= a || qa >= b {
                    kept.push(q);
                    continue;
                }
                if qa < a {
                    kept.push(CachedPiece {
                        offset: qa,
                        data: Bytes::copy_from_slice(&q.data[..(a - qa) as usize]),
                    });
                }
                if qb > b {
                    kept.push(CachedPiece {
                        offset: b,
                        data: Bytes::copy_from_slice(&q.data[(b - qa) as usize..]),
                    });
                }
            }
            e.pieces = kept;
            let before = e.bytes;
            e.bytes = e.pieces.iter().map(|q| q.data.len() as u64).sum();
            freed += before - e.bytes;
            if e.pieces.is_empty() {
                s.dirty.remove(&blk);
            }
        }
        s.bytes -= freed;
    }

    /// Writes one block's pieces down.
    async fn write_entry(&self, pieces: Vec<CachedPiece>) -> Result<()> {
        if let [only] = &pieces[..] {
            return self.inner.write_at(only.offset, only.data.clone()).await;
        }
        let mut extents: Vec<(u64, u64)> = pieces
            .iter()
            .map(|q| (q.offset, q.offset + q.data.len() as u64))
            .collect();
        extents.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (a, b) in extents {
            match merged.last_mut() {
                Some(m) if a <= m.1 => m.1 = m.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        for (a, b) in merged {
            let mut buf = BytesMut::zeroed((b - a) as usize);
            for q in &pieces {
                let (qa, qb) = (q.offset, q.offset + q.data.len() as u64);
                if qb <= a || qa >= b {
                    continue;
                }
                let (s, e) = (qa.max(a), qb.min(b));
                buf[(s - a) as usize..(e - a) as usize]
                    .copy_from_slice(&q.data[(s - qa) as usize..(e - qa) as usize]);
            }
            self.inner.write_at(a, buf.freeze()).await?;
        }
        Ok(())
    }

    /// One flush pass. Failed blocks go back into the cache.
    async fn pass(&self, select: Select) -> Result<()> {
        let _g = self.flush_lock.write().await;
        self.pass_locked(select).await
    }

    /// A flush pass; the caller holds the flush lock exclusively.
    async fn pass_locked(&self, select: Select) -> Result<()> {
        let jobs: Vec<(u64, Vec<CachedPiece>)> = {
            let mut s = self.state.lock();
            let chosen: Vec<u64> = match select {
                Select::All => s.dirty.keys().copied().collect(),
                Select::DownTo(min) => {
                    let mut by_size: Vec<(u64, u64)> =
                        s.dirty.iter().map(|(&b, e)| (e.bytes, b)).collect();
                    by_size.sort_unstable_by(|x, y| y.cmp(x));
                    let mut left = s.bytes;
                    let mut out = Vec::new();
                    for (bytes, b) in by_size {
                        if left <= min {
                            break;
                        }
                        left -= bytes;
                        out.push(b);
                    }
                    out
                }
            };
            chosen
                .into_iter()
                .filter_map(|b| {
                    let e = s.dirty.remove(&b)?;
                    let pieces = e.pieces.clone();
                    s.flushing.insert(b, e);
                    Some((b, pieces))
                })
                .collect()
        };
        if jobs.is_empty() {
            return Ok(());
        }
        let results: Vec<(u64, Result<()>)> = stream::iter(jobs)
            .map(|(b, pieces)| async move { (b, self.write_entry(pieces).await) })
            .buffer_unordered(FLUSH_CONCURRENCY)
            .collect()
            .await;
        let mut first_err = None;
        let mut s = self.state.lock();
        s.passes += 1;
        for (b, r) in results {
            let e = s.flushing.remove(&b).expect("entry being flushed");
            match r {
                Ok(()) => {
                    s.bytes -= e.bytes;
                    s.blocks_written += 1;
                }
                Err(err) => {
                    s.block_errors += 1;
                    // Put the pieces back, older than anything written since.
                    let newer = s.dirty.remove(&b).unwrap_or_default();
                    let mut pieces = e.pieces;
                    pieces.extend(newer.pieces);
                    let bytes = pieces.iter().map(|q| q.data.len() as u64).sum::<u64>();
                    s.bytes = s.bytes - e.bytes - newer.bytes + bytes;
                    s.dirty.insert(b, Entry { pieces, bytes });
                    first_err.get_or_insert(err);
                }
            }
        }
        match first_err {
            Some(e) => {
                tracing::warn!(error = %e, "write cache flush failed; data kept for retry");
                Err(e)
            }
            None => Ok(()),
        }
    }

    /// Cached pieces overlapping `[a, b)`, oldest first.
    fn overlay(&self, a: u64, b: u64) -> Vec<CachedPiece> {
        let s = self.state.lock();
        if s.bytes == 0 {
            return Vec::new();
        }
        let blocks = self.layout.blocks_touching(a, b - a);
        let mut out = Vec::new();
        for map in [&s.flushing, &s.dirty] {
            for (_, e) in map.range(blocks.clone()) {
                for q in &e.pieces {
                    let (qa, qb) = (q.offset, q.offset + q.data.len() as u64);
                    if qb > a && qa < b {
                        out.push(q.clone());
                    }
                }
            }
        }
        out
    }
}

async fn periodic<P: Provider>(weak: Weak<Shared<P>>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(shared) = weak.upgrade() else { return };
        if shared.state.lock().closed {
            return;
        }
        if let Err(e) = shared.pass(Select::All).await {
            let mut s = shared.state.lock();
            s.error.get_or_insert(e);
        }
    }
}

impl<P: Provider> WriteCache<P> {
    /// A cache in front of `inner`. With a flush period, must be called
    /// inside a tokio runtime (it spawns the flush task).
    pub fn new(inner: P, cfg: WriteCacheConfig) -> Result<Self> {
        let layout = BlockLayout::new(inner.size(), cfg.block_size)?;
        if cfg.min_data > cfg.max_data {
            return Err(Error::Invalid(format!(
                "write cache min_data {} > max_data {}",
                cfg.min_data, cfg.max_data
            )));
        }
        let shared = Arc::new(Shared {
            inner,
            layout,
            cfg,
            state: Mutex::default(),
            flush_lock: AsyncRwLock::new(()),
            write_through: AtomicBool::new(false),
        });
        let task = cfg
            .flush_period
            .filter(|p| !p.is_zero())
            .map(|p| tokio::spawn(periodic(Arc::downgrade(&shared), p)));
        Ok(WriteCache {
            shared,
            task: Mutex::new(task),
        })
    }

    /// The wrapped provider.
    pub fn inner(&self) -> &P {
        &self.shared.inner
    }

    /// Bytes currently cached (not yet written down).
    pub fn cached_bytes(&self) -> u64 {
        self.shared.state.lock().bytes
    }

    /// Counters.
    pub fn stats(&self) -> WriteCacheStats {
        let s = self.shared.state.lock();
        WriteCacheStats {
            cached_bytes: s.bytes,
            cached_blocks: (s.dirty.len() + s.flushing.len()) as u64,
            passes: s.passes,
            blocks_written: s.blocks_written,
            block_errors: s.block_errors,
            write_through_writes: s.write_through_writes,
        }
    }

    /// The configuration.
    pub fn config(&self) -> WriteCacheConfig {
        self.shared.cfg
    }

    /// Switches write-through mode on (writes go straight to the inner
    /// provider, and everything cached is written down before this returns)
    /// or off (back to write-back). Use it before asking a lower layer which
    /// blocks were written, e.g. [`CopyOnWrite::unrequired_blocks`](super::CopyOnWrite::unrequired_blocks)
    /// when a migration starts. A flush error is returned; the mode is
    /// switched anyway and the data stays cached for the next flush.
    pub async fn set_write_through(&self, on: bool) -> Result<()> {
        let s = &self.shared;
        let _g = s.flush_lock.write().await;
        s.write_through.store(on, Ordering::Release);
        if on {
            s.pass_locked(Select::All).await
        } else {
            Ok(())
        }
    }

    /// Whether write-through mode is on.
    pub fn is_write_through(&self) -> bool {
        self.shared.write_through.load(Ordering::Acquire)
    }
}

impl<P> Drop for WriteCache<P> {
    fn drop(&mut self) {
        if let Some(t) = self.task.lock().take() {
            t.abort();
        }
    }
}

#[async_trait]
impl<P: Provider> Provider for WriteCache<P> {
    fn size(&self) -> u64 {
        self.shared.layout.size()
    }

    fn capabilities(&self) -> Capabilities {
        self.shared.inner.capabilities()
    }

    async fn read_at(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        let s = &self.shared;
        check_range(Op::Read, offset, buf.len() as u64, s.layout.size())?;
        s.check_open(Op::Read)?;
        let end = offset + buf.len() as u64;
        // Snapshot before reading below: a piece written down meanwhile is in
        // both places with the same bytes, so the result is still right.
        let over = s.overlay(offset, end);
        let mut buf = s.inner.read_at(offset, buf).await?;
        for q in over {
            let (qa, qb) = (q.offset, q.offset + q.data.len() as u64);
            let (a, b) = (qa.max(offset), qb.min(end));
            buf[(a - offset) as usize..(b - offset) as usize]
                .copy_from_slice(&q.data[(a - qa) as usize..(b - qa) as usize]);
        }
        Ok(buf)
    }

    async fn write_at(&self, offset: u64, data: Bytes) -> Result<()> {
        let s = &self.shared;
        check_range(Op::Write, offset, data.len() as u64, s.layout.size())?;
        s.check_open(Op::Write)?;
        if data.is_empty() {
            return Ok(());
        }
        let over = {
            let st = s.state.lock();
            st.bytes > 0 && st.bytes + data.len() as u64 > s.cfg.max_data
        };
        if over && !s.write_through.load(Ordering::Acquire) {
            s.pass(Select::DownTo(s.cfg.min_data)).await?;
        }
        let _g = s.flush_lock.read().await;
        // Re-check under the lock: close() sets `closed` before its final
        // pass, so a write that gets here later must not be cached (it would
        // never be written down).
        if s.state.lock().closed {
            return Err(Error::Closed { op: Op::Write });
        }
        if s.write_through.load(Ordering::Acquire) {
            // Write below first, then drop older cached bytes of the range:
            // a concurrent read sees either the old or the new data.
            let len = data.len() as u64;
            s.inner.write_at(offset, data).await?;
            s.clip(offset, offset + len);
            s.state.lock().write_through_writes += 1;
        } else {
            s.insert(offset, &data);
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        let s = &self.shared;
        let pending = {
            let mut st = s.state.lock();
            if st.closed {
                return Err(Error::Closed { op: Op::Flush });
            }
            st.error.take()
        };
        s.pass(Select::All).await?;
        s.inner.flush().await?;
        pending.map_or(Ok(()), Err)
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        let s = &self.shared;
        check_range(Op::Trim, offset, len, s.layout.size())?;
        s.check_open(Op::Trim)?;
        let _g = s.flush_lock.read().await;
        s.inner.trim(offset, len).await?;
        s.clip(offset, offset + len);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let s = &self.shared;
        check_range(Op::WriteZeroes, offset, len, s.layout.size())?;
        s.check_open(Op::WriteZeroes)?;
        let _g = s.flush_lock.read().await;
        s.inner.write_zeroes(offset, len).await?;
        s.clip(offset, offset + len);
        Ok(())
    }

    fn cancel_writes(&self, offset: u64, len: u64) {
        self.shared.inner.cancel_writes(offset, len)
    }

    async fn close(&self) -> Result<()> {
        let s = &self.shared;
        let pending = {
            let mut st = s.state.lock();
            if st.closed {
                return Ok(());
            }
            st.closed = true;
            st.error.take()
        };
        if let Some(t) = self.task.lock().take() {
            t.abort();
        }
        let flushed = s.pass(Select::All).await;
        let closed = s.inner.close().await;
        flushed.and(closed)?;
        pending.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::ProviderExt;
    use crate::sources::MemoryStorage;

    fn cfg(min: u64, max: u64) -> WriteCacheConfig {
        WriteCacheConfig {
            block_size: 512,
            min_data: min,
            max_data: max,
            flush_period: None,
        }
    }

    #[tokio::test]
    async fn caches_until_flush_and_reads_see_it() {
        let c = WriteCache::new(Arc::new(MemoryStorage::new(8192)), cfg(0, 1 << 20)).unwrap();
        c.write_slice(100, &[1; 1000]).await.unwrap();
        c.write_slice(600, &[2; 10]).await.unwrap();
        assert_eq!(c.cached_bytes(), 1010);
        assert_eq!(&c.inner().read_bytes(100, 4).await.unwrap()[..], &[0; 4]);
        let r = c.read_bytes(0, 2000).await.unwrap();
        assert_eq!(&r[100..600], &[1; 500][..]);
        assert_eq!(&r[600..610], &[2; 10][..]);
        assert_eq!(&r[610..1100], &[1; 490][..]);
        assert_eq!(c.stats().cached_blocks, 3);
        c.flush().await.unwrap();
        assert_eq!(c.cached_bytes(), 0);
        let st = c.stats();
        assert_eq!((st.passes, st.blocks_written, st.block_errors), (1, 3, 0));
        assert_eq!(&c.inner().read_bytes(0, 2000).await.unwrap()[..], &r[..]);
    }

    #[tokio::test]
    async fn backpressure_bounds_memory() {
        let c = WriteCache::new(Arc::new(MemoryStorage::new(1 << 20)), cfg(2048, 8192)).unwrap();
        for i in 0..100u64 {
            c.write_slice(i * 1000, &[i as u8; 1000]).await.unwrap();
            assert!(c.cached_bytes() <= 8192 + 1000);
        }
        for i in 0..100u64 {
            assert_eq!(
                &c.read_bytes(i * 1000, 1000).await.unwrap()[..],
                &[i as u8; 1000][..]
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn periodic_flush_writes_down() {
        let mut cf = cfg(0, 1 << 20);
        cf.flush_period = Some(Duration::from_millis(100));
        let c = WriteCache::new(Arc::new(MemoryStorage::new(4096)), cf).unwrap();
        c.write_slice(0, &[5; 700]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(c.cached_bytes(), 0);
        assert_eq!(
            &c.inner().read_bytes(0, 700).await.unwrap()[..],
            &[5; 700][..]
        );
    }

    #[tokio::test]
    async fn write_through_mode_flushes_and_bypasses() {
        let c = WriteCache::new(Arc::new(MemoryStorage::new(4096)), cfg(0, 1 << 20)).unwrap();
        c.write_slice(0, &[1; 1000]).await.unwrap();
        c.set_write_through(true).await.unwrap();
        assert!(c.is_write_through());
        assert_eq!(c.cached_bytes(), 0);
        assert_eq!(
            &c.inner().read_bytes(0, 1000).await.unwrap()[..],
            &[1; 1000][..]
        );
        c.write_slice(500, &[2; 10]).await.unwrap();
        assert_eq!(c.cached_bytes(), 0);
        assert_eq!(
            &c.inner().read_bytes(500, 10).await.unwrap()[..],
            &[2; 10][..]
        );
        c.set_write_through(false).await.unwrap();
        c.write_slice(0, &[3; 10]).await.unwrap();
        assert_eq!(c.cached_bytes(), 10);
    }

    #[tokio::test]
    async fn trim_drops_cached_bytes() {
        let c = WriteCache::new(Arc::new(MemoryStorage::new(4096)), cfg(0, 1 << 20)).unwrap();
        c.write_slice(0, &[5; 2000]).await.unwrap();
        c.trim(100, 1000).await.unwrap();
        assert_eq!(c.cached_bytes(), 1000);
        let r = c.read_bytes(0, 2000).await.unwrap();
        assert_eq!(&r[..100], &[5; 100][..]);
        assert_eq!(&r[100..1100], &[0; 1000][..]);
        assert_eq!(&r[1100..], &[5; 900][..]);
        c.close().await.unwrap();
        assert_eq!(&c.inner().read_bytes(0, 2000).await.unwrap()[..], &r[..]);
        assert!(c.write_slice(0, &[1]).await.is_err());
    }
}
