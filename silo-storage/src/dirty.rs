//! Dirty tracking, split into a local side (the application writes through
//! [`DirtyTrackerLocal`]) and a remote side (the migrator reads through
//! [`DirtyTrackerRemote`]).
//!
//! ```text
//!  application ──► DirtyTrackerLocal ──┐
//!                                      ├──► inner provider
//!  migrator    ──► DirtyTrackerRemote ─┘
//! ```
//!
//! A block becomes *tracked* only once the remote side has read it (or
//! [`DirtyTrackerRemote::track_at`] said so): before that the migrator has not
//! copied it and will read fresh data anyway. A write to a tracked block marks
//! it *dirty*. [`DirtyTrackerRemote::take_dirty`] snapshots and clears the
//! dirty set and stops tracking the returned blocks until they are read
//! again.
//!
//! # Why no write is lost
//!
//! * A remote read **sets the tracking bits first, then reads** the inner
//!   provider.
//! * A local write **writes the inner provider first, then tests the tracking
//!   bits** and marks tracked blocks dirty (whether the write succeeded or
//!   not: a failed write may have changed part of the block).
//!
//! Each side has a barrier between its data access and its bit access, so
//! for a write `W` and a read `R` of the same block exactly one of these
//! holds:
//!
//! 1. `W`'s test of the tracking bit comes after `R` set it → `W` marks the
//!    block dirty (perhaps spuriously, if `R` saw `W`'s data anyway);
//! 2. `W`'s test comes before `R` set the bit → `W`'s data was in the inner
//!    provider before `R` started reading, so `R` sees it.
//!
//! A snapshot (`take_dirty`) clears the dirty and tracking bits of the blocks
//! it returns; the caller re-reads each of them afterwards, and the same
//! argument applies to that re-read. A write racing the snapshot either lands
//! in this snapshot, or in the next one, or completed before the re-read —
//! it never slips through. (`tests::write_racing_read_is_never_lost` hammers
//! exactly this interleaving.)
//!
//! The barrier is asymmetric (see `crate::barrier`): writes, the hot path,
//! pass a compiler fence only, and each remote read asks the kernel
//! (`membarrier`) to run a full barrier on every thread of the process, a
//! few microseconds per block read. A full fence on every write would cost
//! ~100 ns per 4 KiB write, because it waits for the copy to reach the
//! cache. Without `membarrier`, both sides use full fences.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use crate::barrier;
use crate::bitfield::Bitfield;
use crate::block::BlockLayout;
use crate::clock::Clock;
use crate::error::Result;
use crate::provider::{
    now_or, BoxFut, Capabilities, DynProvider, FileRange, NotShared, Now, Provider,
};
use crate::shard::Sharded;

/// Something the migrator can take the dirty set from.
pub trait DirtySource: Send + Sync {
    /// Snapshots and clears the dirty set; returns the dirty blocks
    /// ascending. Each returned block must be re-read by the caller.
    fn take_dirty(&self) -> Vec<u64>;

    /// Puts blocks back into the dirty set (a caller that took them but
    /// decided not to send them now must not lose them).
    fn restore_dirty(&self, blocks: &[u64]);
}

/// Counters of a dirty tracker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DirtyMetrics {
    /// Blocks currently tracked.
    pub tracked_blocks: u64,
    /// Blocks currently dirty.
    pub dirty_blocks: u64,
    /// Local writes (including trims and zero writes) seen.
    pub local_writes: u64,
    /// Local writes that marked at least one block dirty.
    pub local_writes_dirtying: u64,
    /// Remote reads seen.
    pub remote_reads: u64,
    /// Snapshots taken (`take_dirty` and `dirty_blocks`).
    pub snapshots: u64,
}

/// Selection rules for [`DirtyTrackerRemote::dirty_blocks`] (used by the
/// syncer to upload blocks that have settled, or changed a lot, first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtySelect {
    /// Blocks whose last write is at least this old come first.
    pub max_age: Duration,
    /// At most this many blocks are returned.
    pub limit: usize,
    /// Younger blocks are returned only if written at least this many
    /// times since they became dirty (0: every dirty block qualifies;
    /// counts saturate at 65 535, so larger values act as 65 535).
    pub min_changed: u32,
}

/// Per-block write bookkeeping, one 64-bit word a block so that a write
/// touches one cache line of it (the table of a large device competes with
/// its data for the cache, and each line missed is a wait):
///
/// * high 32 bits: the time of the last write while tracked, in
///   milliseconds since the tracker's epoch, wrapping (ages are exact below
///   49 days; 0 means never written);
/// * low 16 bits: writes since the block last became clean, saturating at
///   `u16::MAX`.
struct BlockMeta {
    words: Box<[AtomicU64]>,
}

impl BlockMeta {
    fn new(n: u64) -> Self {
        BlockMeta {
            words: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// (last write time, changes) of block `b`.
    fn get(&self, b: u64) -> (u32, u32) {
        let w = self.words[b as usize].load(Ordering::Relaxed);
        ((w >> 32) as u32, (w & 0xffff) as u32)
    }

    /// Records a write at time `at` (only the writing side calls it; a
    /// lost increment under racing writers costs one count, never a block).
    fn record(&self, b: u64, at: u32) {
        let w = &self.words[b as usize];
        let changes = ((w.load(Ordering::Relaxed) & 0xffff) + 1).min(0xffff);
        w.store(u64::from(at) << 32 | changes, Ordering::Relaxed);
    }

    /// Loads block `b`'s word, so that the cache miss it likely is overlaps
    /// the data write that follows instead of waiting for it (the write ends
    /// with the inner provider's locks, which order every later load after
    /// the write's stores have drained).
    #[inline]
    fn touch(&self, b: u64) {
        if let Some(w) = self.words.get(b as usize) {
            std::hint::black_box(w.load(Ordering::Relaxed));
        }
    }

    fn clear(&self, b: u64) {
        self.words[b as usize].store(0, Ordering::Relaxed);
    }
}

/// State shared by both sides.
struct Shared {
    inner: DynProvider,
    /// `inner.may_complete_now()`, asked once.
    fast: bool,
    layout: BlockLayout,
    tracking: Bitfield,
    dirty: Bitfield,
    /// Per-block last write time and change count, kept once someone asks
    /// for them (see [`DirtyTrackerRemote::keep_write_stats`]).
    meta: std::sync::OnceLock<BlockMeta>,
    clock: Clock,
    local_writes: Sharded,
    local_writes_dirtying: Sharded,
    remote_reads: AtomicU64,
    snapshots: AtomicU64,
}

impl Shared {
    fn after_write(&self, offset: u64, len: u64) {
        let sh = crate::shard::shard();
        self.local_writes.add_in(sh, 1);
        // Order the data write before the tracking test (see module docs).
        barrier::fast();
        let meta = self.meta.get();
        let mut now = None;
        let mut any = false;
        for b in self.layout.blocks_touching(offset, len) {
            if self.tracking.test(b) {
                if let Some(meta) = meta {
                    let t = *now.get_or_insert_with(|| self.now_ms());
                    meta.record(b, t);
                }
                if !self.dirty.test(b) {
                    self.dirty.set(b);
                }
                any = true;
            }
        }
        if any {
            self.local_writes_dirtying.add_in(sh, 1);
        }
    }

    /// The write statistics, kept from now on.
    fn write_stats(&self) -> &BlockMeta {
        self.meta
            .get_or_init(|| BlockMeta::new(self.layout.num_blocks()))
    }

    /// Milliseconds since the epoch, wrapping, never 0 (the unit of
    /// [`BlockMeta`]'s times).
    fn now_ms(&self) -> u32 {
        (self.clock.elapsed_ms() as u32).max(1)
    }

    fn write_now(&self, offset: u64, data: Bytes) -> Now<(), Bytes> {
        if !self.fast {
            return Err(data);
        }
        let len = data.len() as u64;
        if let Some(meta) = self.meta.get() {
            meta.touch(self.layout.first_block(offset));
        }
        // Returned as it came (no `?` and re-wrap), so the inner provider
        // builds the result in our caller's slot.
        let r = (*self.inner).write_now(offset, data);
        if let Ok(res) = &r {
            self.after_mutation(res, offset, len);
        }
        r
    }

    fn write_at(&self, offset: u64, data: Bytes) -> BoxFut<'_, Result<()>> {
        now_or(self.write_now(offset, data), move |data| async move {
            let len = data.len() as u64;
            let r = (*self.inner).write_at(offset, data).await;
            self.after_mutation(&r, offset, len);
            r
        })
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        let r = (*self.inner).trim(offset, len).await;
        self.after_mutation(&r, offset, len);
        r
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let r = (*self.inner).write_zeroes(offset, len).await;
        self.after_mutation(&r, offset, len);
        r
    }

    /// Marks after any mutation that may have changed data (a failed write
    /// may have changed part of the range; a rejected range changed nothing).
    fn after_mutation(&self, r: &Result<()>, offset: u64, len: u64) {
        if !matches!(r, Err(crate::Error::OutOfRange { .. })) {
            self.after_write(offset, len);
        }
    }

    fn forget(&self, b: u64) {
        self.tracking.clear(b);
        if let Some(meta) = self.meta.get() {
            meta.clear(b);
        }
    }
}

/// The application side: a provider whose writes mark tracked blocks dirty.
#[derive(Clone)]
pub struct DirtyTrackerLocal {
    s: Arc<Shared>,
}

/// The migrator side: a provider whose reads start tracking, plus the dirty
/// set queries.
#[derive(Clone)]
pub struct DirtyTrackerRemote {
    s: Arc<Shared>,
}

impl std::fmt::Debug for DirtyTrackerLocal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyTrackerLocal")
            .field("layout", &self.s.layout)
            .finish()
    }
}

impl std::fmt::Debug for DirtyTrackerRemote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyTrackerRemote")
            .field("layout", &self.s.layout)
            .finish()
    }
}

/// Builds the two sides of a dirty tracker over `inner`.
pub fn dirty_tracker(
    inner: DynProvider,
    block_size: u64,
) -> Result<(DirtyTrackerLocal, DirtyTrackerRemote)> {
    let layout = BlockLayout::new(inner.size(), block_size)?;
    let n = layout.num_blocks();
    barrier::init();
    let s = Arc::new(Shared {
        fast: inner.may_complete_now(),
        inner,
        layout,
        tracking: Bitfield::new(n),
        dirty: Bitfield::new(n),
        meta: std::sync::OnceLock::new(),
        clock: Clock::new(),
        local_writes: Sharded::new(),
        local_writes_dirtying: Sharded::new(),
        remote_reads: AtomicU64::new(0),
        snapshots: AtomicU64::new(0),
    });
    Ok((DirtyTrackerLocal { s: s.clone() }, DirtyTrackerRemote { s }))
}

impl DirtyTrackerLocal {
    /// The block layout.
    pub fn layout(&self) -> BlockLayout {
        self.s.layout
    }
}

#[async_trait]
impl Provider for DirtyTrackerLocal {
    fn size(&self) -> u64 {
        self.s.layout.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.s.inner.capabilities()
    }
    fn read_at<'s, 'f>(&'s self, offset: u64, buf: BytesMut) -> BoxFut<'f, Result<BytesMut>>
    where
        's: 'f,
        Self: 'f,
    {
        // Local reads change nothing here: the inner provider's future.
        (*self.s.inner).read_at(offset, buf)
    }
    fn write_at<'s, 'f>(&'s self, offset: u64, data: Bytes) -> BoxFut<'f, Result<()>>
    where
        's: 'f,
        Self: 'f,
    {
        self.s.write_at(offset, data)
    }
    fn may_complete_now(&self) -> bool {
        self.s.fast
    }
    fn adopt_size(&self) -> Option<usize> {
        self.s.inner.adopt_size()
    }
    fn adopt_buffer(&self) -> BytesMut {
        self.s.inner.adopt_buffer()
    }
    fn write_now(&self, offset: u64, data: Bytes) -> Now<(), Bytes> {
        self.s.write_now(offset, data)
    }
    fn read_now(&self, offset: u64, buf: BytesMut) -> Now<BytesMut, BytesMut> {
        (*self.s.inner).read_now(offset, buf)
    }
    fn read_shared(&self, offset: u64, len: usize) -> Now<Vec<Bytes>, NotShared> {
        (*self.s.inner).read_shared(offset, len)
    }
    fn read_file(&self, offset: u64, len: usize) -> Now<FileRange, NotShared> {
        (*self.s.inner).read_file(offset, len)
    }
    async fn flush(&self) -> Result<()> {
        (*self.s.inner).flush().await
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.s.trim(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.s.write_zeroes(offset, len).await
    }
    fn cancel_writes(&self, offset: u64, len: u64) {
        self.s.inner.cancel_writes(offset, len)
    }
    async fn close(&self) -> Result<()> {
        (*self.s.inner).close().await
    }
}

impl DirtyTrackerRemote {
    /// The block layout.
    pub fn layout(&self) -> BlockLayout {
        self.s.layout
    }

    /// Keeps per-block write statistics from now on: the time of each
    /// block's last write and its writes since it last became clean, which
    /// [`DirtyTrackerRemote::dirty_blocks`]' `max_age` and `min_changed`
    /// rules use (the [`Syncer`](crate::syncer::Syncer) asks for them when
    /// it is built). Until then writes skip that bookkeeping (8 bytes a
    /// block, one likely cache miss a write on a large device), which a
    /// migration, taking whole dirty sets, does not need. A write racing
    /// this call may go uncounted.
    pub fn keep_write_stats(&self) {
        self.s.write_stats();
    }

    /// Whether write statistics are kept.
    pub fn keeps_write_stats(&self) -> bool {
        self.s.meta.get().is_some()
    }

    /// Starts tracking the blocks touched by `[offset, offset + len)` as if
    /// they had been read (e.g. blocks the destination already has).
    pub fn track_at(&self, offset: u64, len: u64) {
        for b in self.s.layout.blocks_touching(offset, len) {
            self.s.tracking.set(b);
        }
    }

    /// Marks the blocks touched by `[offset, offset + len)` dirty (e.g. a
    /// failed upload that must be redone).
    pub fn mark_dirty(&self, offset: u64, len: u64) {
        for b in self.s.layout.blocks_touching(offset, len) {
            self.s.dirty.set(b);
        }
    }

    /// Marks one block dirty.
    pub fn mark_block_dirty(&self, block: u64) {
        self.s.dirty.set(block);
    }

    /// Whether `block` is dirty right now.
    pub fn is_dirty(&self, block: u64) -> bool {
        self.s.dirty.test(block)
    }

    /// Whether `block` is tracked right now.
    pub fn is_tracked(&self, block: u64) -> bool {
        self.s.tracking.test(block)
    }

    /// A copy of the tracking bits.
    pub fn tracked_blocks(&self) -> Bitfield {
        self.s.tracking.clone()
    }

    /// Number of dirty blocks right now (without clearing them).
    pub fn dirty_count(&self) -> u64 {
        self.s.dirty.count()
    }

    /// Snapshots and clears the dirty set (see [`DirtySource::take_dirty`]).
    pub fn sync(&self) -> Vec<u64> {
        self.take_dirty()
    }

    /// Selects and clears up to `sel.limit` dirty blocks: first those whose
    /// last write is at least `sel.max_age` old (settled, oldest first), then
    /// the others written at least `sel.min_changed` times (most changed
    /// first). The rest stay dirty. Each returned block must be re-read.
    ///
    /// The first call starts keeping write statistics if
    /// [`DirtyTrackerRemote::keep_write_stats`] has not; blocks dirtied
    /// before that have no recorded write and count as settled.
    pub fn dirty_blocks(&self, sel: DirtySelect) -> Vec<u64> {
        self.s.snapshots.fetch_add(1, Ordering::Relaxed);
        let meta = self.s.write_stats();
        let now = self.s.now_ms();
        let age_ms = sel.max_age.as_millis().min(u128::from(u64::MAX)) as u64;
        let mut settled = Vec::new();
        let mut busy = Vec::new();
        for b in self.s.dirty.iter_set() {
            let (t, c) = meta.get(b);
            // t == 0: no recorded write (mark_dirty, or dirtied before the
            // statistics started).
            if t == 0 || u64::from(now.wrapping_sub(t)) >= age_ms {
                settled.push((t, b));
            } else if c >= sel.min_changed.min(u32::from(u16::MAX)) {
                busy.push((c, b));
            }
        }
        settled.sort_unstable();
        busy.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut out = Vec::with_capacity(sel.limit.min(settled.len() + busy.len()));
        for b in settled
            .into_iter()
            .map(|x| x.1)
            .chain(busy.into_iter().map(|x| x.1))
        {
            if out.len() >= sel.limit {
                break;
            }
            if self.s.dirty.clear_if_set(b) {
                self.s.forget(b);
                out.push(b);
            }
        }
        out
    }

    /// Current counters.
    pub fn metrics(&self) -> DirtyMetrics {
        DirtyMetrics {
            tracked_blocks: self.s.tracking.count(),
            dirty_blocks: self.s.dirty.count(),
            local_writes: self.s.local_writes.get(),
            local_writes_dirtying: self.s.local_writes_dirtying.get(),
            remote_reads: self.s.remote_reads.load(Ordering::Relaxed),
            snapshots: self.s.snapshots.load(Ordering::Relaxed),
        }
    }
}

impl DirtySource for DirtyTrackerRemote {
    fn take_dirty(&self) -> Vec<u64> {
        self.s.snapshots.fetch_add(1, Ordering::Relaxed);
        let snap = self.s.dirty.take();
        let blocks = snap.collect();
        for &b in &blocks {
            self.s.forget(b);
        }
        blocks
    }

    fn restore_dirty(&self, blocks: &[u64]) {
        for &b in blocks {
            self.s.dirty.set(b);
        }
    }
}

#[async_trait]
impl Provider for DirtyTrackerRemote {
    fn size(&self) -> u64 {
        self.s.layout.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.s.inner.capabilities()
    }
    /// Starts tracking the touched blocks, then reads.
    async fn read_at(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        crate::error::check_range(
            crate::Op::Read,
            offset,
            buf.len() as u64,
            self.s.layout.size(),
        )?;
        self.s.remote_reads.fetch_add(1, Ordering::Relaxed);
        self.track_at(offset, buf.len() as u64);
        // Order the tracking bits before the data read (see module docs).
        barrier::slow();
        (*self.s.inner).read_at(offset, buf).await
    }
    /// Writes through the remote side are treated like local writes.
    /// (No `read_now`: a remote read must start tracking before it reads,
    /// which only `read_at` does.)
    async fn write_at(&self, offset: u64, data: Bytes) -> Result<()> {
        self.s.write_at(offset, data).await
    }
    async fn flush(&self) -> Result<()> {
        (*self.s.inner).flush().await
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.s.trim(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.s.write_zeroes(offset, len).await
    }
    fn cancel_writes(&self, offset: u64, len: u64) {
        self.s.inner.cancel_writes(offset, len)
    }
    async fn close(&self) -> Result<()> {
        (*self.s.inner).close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::ProviderExt;
    use crate::sources::MemoryStorage;

    #[tokio::test]
    async fn track_after_read() {
        let mem: DynProvider = Arc::new(MemoryStorage::new(2 * 1024 * 1024));
        let (local, remote) = dirty_tracker(mem, 65536).unwrap();
        // Read 1,234,567 bytes at 10 → blocks 0..=18 tracked.
        remote.read_bytes(10, 1_234_567).await.unwrap();
        for off in [0u64, 600_000, 700_000] {
            local.write_slice(off, &[1u8; 9000]).await.unwrap();
        }
        // Beyond the read range: not tracked.
        local.write_slice(1_900_000, &[1u8; 10]).await.unwrap();
        assert_eq!(remote.take_dirty(), vec![0, 9, 10]);
        assert!(remote.take_dirty().is_empty());
        // Snapshotted blocks are no longer tracked until re-read.
        local.write_slice(0, &[2u8; 10]).await.unwrap();
        assert!(remote.take_dirty().is_empty());
        assert!(remote.is_tracked(1));
    }

    #[tokio::test(start_paused = true)]
    async fn selective_dirty_blocks() {
        let mem: DynProvider = Arc::new(MemoryStorage::new(16 * 4096));
        let (local, remote) = dirty_tracker(mem, 4096).unwrap();
        remote.keep_write_stats();
        remote.track_at(0, 16 * 4096);
        local.write_slice(0, &[1u8; 4096]).await.unwrap();
        tokio::time::advance(Duration::from_millis(200)).await;
        for _ in 0..3 {
            local.write_slice(5 * 4096, &[1u8; 10]).await.unwrap();
        }
        local.write_slice(7 * 4096, &[1u8; 10]).await.unwrap();
        let sel = DirtySelect {
            max_age: Duration::from_millis(100),
            limit: 10,
            min_changed: 2,
        };
        // 0 has settled; 5 changed 3 times; 7 only once → stays dirty.
        assert_eq!(remote.dirty_blocks(sel), vec![0, 5]);
        assert!(remote.is_dirty(7));
        tokio::time::advance(Duration::from_millis(200)).await;
        assert_eq!(remote.dirty_blocks(sel), vec![7]);
        assert_eq!(remote.dirty_count(), 0);
    }

    /// A provider whose reads copy the data, then pause until released —
    /// the widest possible window for a write to land "during" a read.
    struct PausingReads {
        inner: MemoryStorage,
        armed: std::sync::atomic::AtomicBool,
        entered: tokio::sync::Notify,
        release: tokio::sync::Notify,
    }

    #[async_trait]
    impl Provider for PausingReads {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn capabilities(&self) -> Capabilities {
            self.inner.capabilities()
        }
        async fn read_at(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
            let r = self.inner.read_at(offset, buf).await;
            if self.armed.swap(false, Ordering::SeqCst) {
                let go = self.release.notified();
                self.entered.notify_one();
                go.await;
            }
            r
        }
        async fn write_at(&self, offset: u64, data: Bytes) -> Result<()> {
            self.inner.write_at(offset, data).await
        }
        async fn flush(&self) -> Result<()> {
            Ok(())
        }
        async fn trim(&self, offset: u64, len: u64) -> Result<()> {
            self.inner.trim(offset, len).await
        }
        async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
            self.inner.write_zeroes(offset, len).await
        }
        fn cancel_writes(&self, _offset: u64, _len: u64) {}
        async fn close(&self) -> Result<()> {
            Ok(())
        }
    }

    /// A write that completes while the migrator's read of the same block
    /// is in progress (after the data was copied) must be reported dirty.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn write_during_read_is_marked_dirty() {
        let p = Arc::new(PausingReads {
            inner: MemoryStorage::new(8192),
            armed: std::sync::atomic::AtomicBool::new(true),
            entered: tokio::sync::Notify::new(),
            release: tokio::sync::Notify::new(),
        });
        let (local, remote) = dirty_tracker(p.clone(), 4096).unwrap();
        let r2 = remote.clone();
        let read = tokio::spawn(async move { r2.read_bytes(0, 4096).await.unwrap() });
        p.entered.notified().await;
        assert!(remote.is_tracked(0), "tracked before the read completes");
        local.write_slice(100, &[9u8; 10]).await.unwrap();
        p.release.notify_one();
        let old = read.await.unwrap();
        assert_eq!(old[100], 0, "the read copied the data before the write");
        assert_eq!(remote.take_dirty(), vec![0], "the racing write was lost");
    }

    /// A writer and a migrator-like reader hammer the same block; after a
    /// final quiet round the last read must equal the last written value.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn write_racing_read_is_never_lost() {
        for round in 0..200u32 {
            let mem: DynProvider = Arc::new(MemoryStorage::new(4096));
            let (local, remote) = dirty_tracker(mem, 4096).unwrap();
            let l2 = local.clone();
            let writer = tokio::spawn(async move {
                for v in 1..=20u8 {
                    l2.write_slice(0, &[v; 4096]).await.unwrap();
                    tokio::task::yield_now().await;
                }
            });
            // Migrator: read, then keep re-reading while dirty.
            let mut seen = remote.read_bytes(0, 4096).await.unwrap()[0];
            loop {
                let done = writer.is_finished();
                if !remote.take_dirty().is_empty() {
                    seen = remote.read_bytes(0, 4096).await.unwrap()[0];
                } else if done {
                    break;
                }
                tokio::task::yield_now().await;
            }
            writer.await.unwrap();
            assert_eq!(seen, 20, "round {round}: final write was lost");
        }
    }

    /// A selection in which no block written in the last hour has settled.
    fn young(min_changed: u32) -> DirtySelect {
        DirtySelect {
            max_age: Duration::from_secs(3600),
            limit: 10,
            min_changed,
        }
    }

    /// Writes from many threads at once (more than there are shards) all
    /// count towards `min_changed`, per block.
    #[test]
    fn concurrent_writes_all_count_towards_min_changed() {
        let threads = crate::shard::SHARDS as u64 + 4;
        let mem: DynProvider = Arc::new(MemoryStorage::new(threads * 4096));
        let (local, remote) = dirty_tracker(mem, 4096).unwrap();
        remote.keep_write_stats();
        remote.track_at(0, threads * 4096);
        // Thread t writes its own block 1 + 9 t times.
        let writes = |t: u64| 1 + 9 * t;
        let start = Arc::new(std::sync::Barrier::new(threads as usize));
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (local, start) = (local.clone(), start.clone());
                std::thread::spawn(move || {
                    let data = Bytes::from(vec![t as u8; 512]);
                    start.wait();
                    for _ in 0..writes(t) {
                        local
                            .write_now(t * 4096, data.clone())
                            .expect("memory completes now")
                            .unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let min = 150;
        let sel = DirtySelect {
            max_age: Duration::from_secs(3600),
            limit: usize::MAX,
            min_changed: min,
        };
        // Most changed first; the others stay dirty.
        let want: Vec<u64> = (0..threads).rev().filter(|&t| writes(t) >= 150).collect();
        assert!(!want.is_empty() && want.len() < threads as usize);
        assert_eq!(remote.dirty_blocks(sel), want);
        assert_eq!(remote.dirty_count(), threads - want.len() as u64);
    }

    /// A snapshot forgets the change count of the blocks it takes: the
    /// block's next round counts from zero.
    #[tokio::test]
    async fn snapshot_resets_change_counts() {
        let mem: DynProvider = Arc::new(MemoryStorage::new(8 * 4096));
        let (local, remote) = dirty_tracker(mem, 4096).unwrap();
        remote.keep_write_stats();
        remote.track_at(0, 8 * 4096);
        for _ in 0..5 {
            local.write_slice(3 * 4096, &[1; 10]).await.unwrap();
        }
        assert_eq!(remote.take_dirty(), vec![3]);
        remote.track_at(3 * 4096, 1);
        for _ in 0..2 {
            local.write_slice(3 * 4096, &[2; 10]).await.unwrap();
        }
        assert!(
            remote.dirty_blocks(young(3)).is_empty(),
            "counted the old round"
        );
        assert_eq!(remote.dirty_blocks(young(2)), vec![3]);
    }

    /// Without `keep_write_stats` writes keep no statistics (no table is
    /// even allocated); the first `dirty_blocks` starts them, and blocks
    /// dirtied before count as settled.
    #[tokio::test(start_paused = true)]
    async fn write_stats_start_when_asked() {
        let mem: DynProvider = Arc::new(MemoryStorage::new(8 * 4096));
        let (local, remote) = dirty_tracker(mem, 4096).unwrap();
        remote.track_at(0, 8 * 4096);
        for _ in 0..5 {
            local.write_slice(2 * 4096, &[1; 10]).await.unwrap();
        }
        assert_eq!(remote.take_dirty(), vec![2]);
        assert!(!remote.keeps_write_stats());
        remote.track_at(0, 8 * 4096);
        for _ in 0..5 {
            local.write_slice(3 * 4096, &[1; 10]).await.unwrap();
        }
        // Young and changed 5 times, but unrecorded: settled.
        assert_eq!(remote.dirty_blocks(young(100)), vec![3]);
        assert!(remote.keeps_write_stats());
        // From now on writes are recorded: young and changed twice.
        for _ in 0..2 {
            local.write_slice(4 * 4096, &[1; 10]).await.unwrap();
        }
        assert!(remote.dirty_blocks(young(3)).is_empty());
        assert_eq!(remote.dirty_blocks(young(2)), vec![4]);
    }
}
