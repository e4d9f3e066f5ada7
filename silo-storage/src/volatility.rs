//! Volatility monitor: counts writes per block in a sliding time window and
//! hands out the *least volatile* pending block first, so that a migration's
//! bulk pass does not waste bandwidth on blocks that are about to change
//! again.
//!
//! [`VolatilityMonitor`] is both a [`Provider`] (the application writes
//! through it; every write is counted) and a [`BlockOrder`].
//!
//! # Cost
//!
//! Go silo scans every block on each `GetNext` (O(N) per call, O(N²) per
//! pass). Here:
//!
//! * the window is divided into [`SLOTS`] time slots; each slot keeps a list
//!   of the blocks written during it with their counts (each block once,
//!   found again by index, no hashing). When a slot leaves the window its
//!   counts are subtracted again, so memory is bounded by `SLOTS ×` (blocks
//!   written) and counts are exact to one slot (`window / SLOTS`);
//! * pending blocks with no write in the window sit in a bitfield (popped in
//!   amortised O(1), lowest index first); pending blocks with writes sit in
//!   an ordered set keyed by `(count, block)` (O(log N) per change).
//!
//! So `next()` and each recorded write cost O(log N), whatever the device
//! size; the `engine` benchmark measures `next()` at 1 M blocks.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::Clock;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;

use crate::bitfield::Bitfield;
use crate::block::BlockLayout;
use crate::error::{Error, Result};
use crate::order::{BlockInfo, BlockKind, BlockOrder};
use crate::provider::{
    now_or, BoxFut, Capabilities, DynProvider, FileRange, NotShared, Now, Provider,
};
use crate::shard::{shard, ShardRing, Sharded, SHARDS};

/// Number of time slots the window is divided into.
pub const SLOTS: u64 = 8;

/// Writes per block during one slot: `(block, count)`, each block at most
/// once (found again through [`BlockStat::slot_pos`], no hashing). The
/// count of a block's entry in its latest slot is kept in
/// [`BlockStat::cur`] instead (so a repeated write touches one cache line,
/// not two) and copied into the entry when the block moves on to a newer
/// slot; the entry's own count is only meaningful after that.
type SlotWrites = Vec<(u64, u32)>;

struct State {
    /// Writes per block within the window.
    /// Per block: writes within the window and where its entry is in the
    /// current slot (one cache line holds four blocks' worth).
    stats: Vec<BlockStat>,
    /// (slot index, writes per block during that slot), oldest first.
    slots: VecDeque<(u64, SlotWrites)>,
    /// Pending blocks with a non-zero count.
    busy: BTreeSet<(u32, u64)>,
    /// Writes within the window, device-wide.
    window_total: u64,
    /// Number of bits set in `calm` (every change happens under the lock),
    /// so `next` never scans an empty bitfield.
    calm_count: u64,
    /// Blocks written during slot `log_slot` and not yet counted: a write
    /// appends to this list (one hot cache line) instead of updating its
    /// block's counters (a likely cache miss on a large device); the list
    /// is folded into the counters in a batch, whose independent loads the
    /// CPU overlaps, before anything reads them.
    log: Vec<u64>,
    /// Slot the blocks in `log` were written in.
    log_slot: u64,
}

/// Writes buffered in [`State::log`] before they are folded.
const LOG_MAX: usize = 1024;

/// Entries of a thread's write ring.
const RING: usize = 128;

/// Blocks written by the thread that owns one shard (see `crate::shard`)
/// and not yet counted: that thread appends without taking the state lock
/// or any locked instruction; whoever holds the lock consumes.
type Ring = ShardRing<RingOwner>;

/// The owner's data of a [`Ring`] (on the cache line it appends through).
/// Entries were all written during slot `slot`, which the owner changes
/// only while holding the lock with the ring empty.
#[derive(Default)]
struct RingOwner {
    /// Slot of the entries.
    slot: AtomicU64,
    /// Clock reading (ns) at which `slot` ends (0 until the first write:
    /// compute the slot).
    end: AtomicU64,
    /// Writes this ring's owners recorded (for `total_writes`).
    writes: AtomicU64,
}

/// Per-block counters, kept together so a write touches one cache line
/// (16 bytes: four blocks to a line; the table of a large device competes
/// with its data for the cache).
#[derive(Clone, Copy)]
struct BlockStat {
    /// Writes within the window.
    count: u32,
    /// Writes during slot `last_slot` (the authoritative count of the
    /// block's entry in that slot's list); 0: the block has no entry in
    /// any slot in the window, and `last_slot` means nothing.
    cur: u32,
    /// Position of the block's entry in the list of slot `last_slot`.
    slot_pos: u32,
    /// Low 32 bits of the slot of the block's last write. Enough to tell
    /// slots apart: while `cur > 0` that slot is still in the window, and
    /// the window's slots are fewer than [`SLOTS`] + 1 consecutive ones.
    last_slot: u32,
}

impl BlockStat {
    /// Whether the block's latest entry is in slot `slot` (a slot in the
    /// window).
    #[inline]
    fn last_in(&self, slot: u64) -> bool {
        self.cur > 0 && self.last_slot == slot as u32
    }
}

/// A provider that counts writes per block, and a block order returning the
/// least volatile pending block first.
pub struct VolatilityMonitor {
    inner: DynProvider,
    /// `inner.may_complete_now()`, asked once.
    fast: bool,
    layout: BlockLayout,
    slot_ns: u64,
    clock: Clock,
    /// Blocks pending in the order.
    pending: Bitfield,
    /// Pending blocks with no write in the window.
    calm: Bitfield,
    state: Mutex<State>,
    /// One write ring per ownable shard.
    rings: Box<[Ring]>,
    /// Writes recorded outside the rings.
    total_writes: Sharded,
}

impl std::fmt::Debug for VolatilityMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolatilityMonitor")
            .field("layout", &self.layout)
            .field("slot_ns", &self.slot_ns)
            .finish()
    }
}

impl VolatilityMonitor {
    /// A monitor over `inner` counting writes within `window` per block of
    /// `block_size` bytes. No block is pending until `add`/`add_all`.
    pub fn new(inner: DynProvider, block_size: u64, window: Duration) -> Result<Self> {
        let layout = BlockLayout::new(inner.size(), block_size)?;
        if window.is_zero() {
            return Err(Error::Invalid("volatility window must be non-zero".into()));
        }
        let n = layout.num_blocks();
        Ok(VolatilityMonitor {
            fast: inner.may_complete_now(),
            inner,
            layout,
            slot_ns: (window.as_nanos() as u64 / SLOTS).max(1),
            clock: Clock::new(),
            pending: Bitfield::new(n),
            calm: Bitfield::new(n),
            state: Mutex::new(State {
                stats: vec![
                    BlockStat {
                        count: 0,
                        cur: 0,
                        slot_pos: 0,
                        last_slot: 0,
                    };
                    n as usize
                ],
                slots: VecDeque::new(),
                busy: BTreeSet::new(),
                window_total: 0,
                calm_count: 0,
                log: Vec::with_capacity(LOG_MAX),
                log_slot: 0,
            }),
            rings: (0..SHARDS)
                .map(|_| Ring::new(RING, RingOwner::default()))
                .collect(),
            total_writes: Sharded::new(),
        })
    }

    /// The block layout.
    pub fn layout(&self) -> BlockLayout {
        self.layout
    }

    fn slot_now(&self) -> u64 {
        self.clock.elapsed_ns() / self.slot_ns
    }

    /// Drops slots that left the window and re-buckets their blocks.
    fn advance(&self, st: &mut State, now: u64) {
        while let Some(&(idx, _)) = st.slots.front() {
            if idx + SLOTS > now {
                break;
            }
            let (_, writes) = st.slots.pop_front().expect("front exists");
            for (b, c) in writes {
                let stat = &mut st.stats[b as usize];
                let c = if stat.last_in(idx) {
                    std::mem::take(&mut stat.cur)
                } else {
                    c
                };
                let old = stat.count;
                let new = old.saturating_sub(c);
                stat.count = new;
                st.window_total = st.window_total.saturating_sub(u64::from(c));
                if self.pending.test(b) {
                    st.busy.remove(&(old, b));
                    if new == 0 {
                        self.calm.set(b);
                        st.calm_count += 1;
                    } else {
                        st.busy.insert((new, b));
                    }
                }
            }
        }
    }

    fn record(&self, offset: u64, len: u64) {
        let blocks = self.layout.blocks_touching(offset, len);
        if blocks.is_empty() {
            return;
        }
        let sh = shard();
        let ns = self.clock.elapsed_ns();
        let n = (blocks.end - blocks.start) as usize;
        if sh.owned() && n <= RING / 4 {
            let ring = &self.rings[sh.index()];
            let own = ring.extra();
            // Only this thread writes its ring's owner data.
            own.writes
                .store(own.writes.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            let full = !ring.has_room(n);
            // Still inside the ring's slot (the clock is monotonic and the
            // slot was computed from an earlier reading): no division.
            if ns >= own.end.load(Ordering::Relaxed) || full {
                let now = ns / self.slot_ns;
                if own.slot.load(Ordering::Relaxed) != now {
                    // A new slot (once a slot per thread): count everything
                    // buffered, oldest slot first so that slots open in
                    // order, then start this ring on `now`.
                    let mut st = self.state.lock();
                    self.fold(&mut st);
                    own.slot.store(now, Ordering::Relaxed);
                } else if full {
                    // A full ring within its slot (every `RING` blocks):
                    // count this ring's entries only. The other rings' heads
                    // and tails are other cores' cache lines, or cold, 64 of
                    // them; their entries are from this slot or the one
                    // before, since each owner folds everything when its
                    // slot changes.
                    let mut st = self.state.lock();
                    self.fold_ring(&mut st, now, ring);
                }
                own.end
                    .store((now + 1).saturating_mul(self.slot_ns), Ordering::Relaxed);
            }
            ring.push(blocks);
            return;
        }
        self.total_writes.add_in(sh, 1);
        let now = ns / self.slot_ns;
        let mut st = self.state.lock();
        if st.log_slot != now || st.log.len() + n > LOG_MAX {
            self.fold(&mut st);
        }
        let now = Self::clamp_slot(&st, now);
        if n >= LOG_MAX {
            // A range too large for the log (a big trim): counted at once,
            // so the log stays bounded whatever the device size.
            self.open_slot(&mut st, now);
            for b in blocks {
                self.count_write(&mut st, now, b);
            }
            return;
        }
        st.log_slot = now;
        st.log.extend(blocks);
    }

    /// Counts the buffered writes, then drops slots older than `now`'s
    /// window: what every reader of the counters calls first.
    fn settle(&self, st: &mut State, now: u64) {
        self.fold(st);
        self.advance(st, now);
    }

    /// Counts the writes buffered in the threads' rings and the log.
    fn fold(&self, st: &mut State) {
        // Oldest slot first, so slots open in order; an entry from a slot
        // older than the newest open one counts in the newest.
        let mut order = [(0u64, 0usize); SHARDS + 1];
        let mut n = 0;
        for (i, r) in self.rings.iter().enumerate() {
            if !r.is_empty() {
                order[n] = (r.extra().slot.load(Ordering::Relaxed), i);
                n += 1;
            }
        }
        if !st.log.is_empty() {
            order[n] = (st.log_slot, usize::MAX);
            n += 1;
        }
        let order = &mut order[..n];
        order.sort_unstable();
        for &(slot, i) in order.iter() {
            if i == usize::MAX {
                self.fold_log(st);
            } else {
                self.fold_ring(st, slot, &self.rings[i]);
            }
        }
    }

    /// The slot to count writes of `slot` in: no older than the newest.
    fn clamp_slot(st: &State, slot: u64) -> u64 {
        st.slots.back().map_or(slot, |s| s.0.max(slot))
    }

    /// Counts one ring's entries.
    fn fold_ring(&self, st: &mut State, slot: u64, ring: &Ring) {
        let batch = ring.batch();
        let now = Self::clamp_slot(st, slot);
        self.open_slot(st, now);
        // Touch every counter first (see `fold_log`).
        let mut sum = 0u32;
        for b in batch.iter() {
            sum = sum
                .wrapping_add(st.stats[b as usize].cur)
                .wrapping_add(u32::from(self.pending.test(b)));
        }
        std::hint::black_box(sum);
        for b in batch.iter() {
            self.count_write(st, now, b);
        }
        // Dropping the batch frees the entries for the owner.
    }

    /// Counts the writes buffered in the log (all from slot `log_slot`).
    fn fold_log(&self, st: &mut State) {
        if st.log.is_empty() {
            return;
        }
        let now = Self::clamp_slot(st, st.log_slot);
        self.open_slot(st, now);
        let log = std::mem::take(&mut st.log);
        // Touch every counter first: these loads do not depend on each
        // other, so their cache misses overlap instead of queueing.
        let mut sum = 0u32;
        for &b in &log {
            sum = sum
                .wrapping_add(st.stats[b as usize].cur)
                .wrapping_add(u32::from(self.pending.test(b)));
        }
        std::hint::black_box(sum);
        for &b in &log {
            self.count_write(st, now, b);
        }
        st.log = log;
        st.log.clear();
    }

    /// Drops slots that left `now`'s window and makes `now` the newest slot.
    fn open_slot(&self, st: &mut State, now: u64) {
        self.advance(st, now);
        if st.slots.back().map(|s| s.0) != Some(now) {
            st.slots.push_back((now, Vec::new()));
        }
    }

    /// Counts one write of block `b` during slot `now` (the current slot,
    /// already at the back of `slots`).
    fn count_write(&self, st: &mut State, now: u64, b: u64) {
        let i = b as usize;
        let stat = &mut st.stats[i];
        if stat.last_in(now) {
            stat.cur = stat.cur.saturating_add(1);
        } else {
            if stat.cur > 0 {
                // Settle the count of the block's entry in its older
                // slot (still in the window: `advance` resets `cur` of
                // every block of each slot it drops).
                let last = stat.last_slot;
                if let Some((_, w)) = st.slots.iter_mut().rev().find(|(s, _)| *s as u32 == last) {
                    w[stat.slot_pos as usize].1 = stat.cur;
                }
            }
            let cur = &mut st.slots.back_mut().expect("pushed by fold").1;
            stat.last_slot = now as u32;
            stat.cur = 1;
            stat.slot_pos = cur.len() as u32;
            cur.push((b, 0));
        }
        let old = stat.count;
        let new = old.saturating_add(1);
        stat.count = new;
        st.window_total += 1;
        if self.pending.test(b) {
            if old == 0 {
                self.calm.clear(b);
                st.calm_count -= 1;
            } else {
                st.busy.remove(&(old, b));
            }
            st.busy.insert((new, b));
        }
    }

    /// Writes to `block` within the window.
    pub fn volatility(&self, block: u64) -> u32 {
        let mut st = self.state.lock();
        self.settle(&mut st, self.slot_now());
        st.stats.get(block as usize).map_or(0, |s| s.count)
    }

    /// Block-writes within the window, device-wide.
    pub fn total_volatility(&self) -> u64 {
        let mut st = self.state.lock();
        self.settle(&mut st, self.slot_now());
        st.window_total
    }

    /// Writes seen since creation.
    pub fn total_writes(&self) -> u64 {
        let ringed = self
            .rings
            .iter()
            .map(|r| r.extra().writes.load(Ordering::Relaxed));
        ringed.fold(self.total_writes.get(), u64::wrapping_add)
    }
}

impl BlockOrder for VolatilityMonitor {
    fn num_blocks(&self) -> u64 {
        self.layout.num_blocks()
    }
    fn add(&self, block: u64) {
        if block >= self.layout.num_blocks() {
            return;
        }
        let mut st = self.state.lock();
        self.fold(&mut st);
        if self.pending.set_if_clear(block) {
            let c = st.stats[block as usize].count;
            if c == 0 {
                self.calm.set(block);
                st.calm_count += 1;
            } else {
                st.busy.insert((c, block));
            }
        }
    }
    fn add_all(&self) {
        let mut st = self.state.lock();
        self.fold(&mut st);
        for b in 0..self.layout.num_blocks() {
            if self.pending.set_if_clear(b) {
                let c = st.stats[b as usize].count;
                if c == 0 {
                    self.calm.set(b);
                    st.calm_count += 1;
                } else {
                    st.busy.insert((c, b));
                }
            }
        }
    }
    fn remove(&self, block: u64) -> bool {
        let mut st = self.state.lock();
        self.fold(&mut st);
        if self.pending.clear_if_set(block) {
            if self.calm.clear_if_set(block) {
                st.calm_count -= 1;
            }
            let c = st.stats[block as usize].count;
            st.busy.remove(&(c, block));
            true
        } else {
            false
        }
    }
    fn contains(&self, block: u64) -> bool {
        self.pending.test(block)
    }
    fn pending(&self) -> u64 {
        self.pending.count()
    }
    fn next(&self) -> Option<BlockInfo> {
        let mut st = self.state.lock();
        self.settle(&mut st, self.slot_now());
        let calm = if st.calm_count > 0 {
            self.calm.collect_first_and_clear()
        } else {
            None
        };
        let block = match calm {
            Some(b) => {
                st.calm_count -= 1;
                b
            }
            None => st.busy.pop_first()?.1,
        };
        self.pending.clear(block);
        Some(BlockInfo {
            block,
            kind: BlockKind::Standard,
        })
    }
}

#[async_trait]
impl Provider for VolatilityMonitor {
    fn size(&self) -> u64 {
        self.layout.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn read_at<'s, 'f>(&'s self, offset: u64, buf: BytesMut) -> BoxFut<'f, Result<BytesMut>>
    where
        's: 'f,
        Self: 'f,
    {
        // Reads are not counted: the inner provider's future as it is.
        (*self.inner).read_at(offset, buf)
    }
    fn may_complete_now(&self) -> bool {
        self.fast
    }
    fn adopt_size(&self) -> Option<usize> {
        self.inner.adopt_size()
    }
    fn adopt_buffer(&self) -> BytesMut {
        self.inner.adopt_buffer()
    }
    fn write_now(&self, offset: u64, data: Bytes) -> Now<(), Bytes> {
        if !self.fast {
            return Err(data);
        }
        let len = data.len() as u64;
        // Returned as it came (see `Metrics`' `now`): no copy of the result.
        let r = (*self.inner).write_now(offset, data);
        if let Ok(Ok(())) = r {
            self.record(offset, len);
        }
        r
    }
    fn read_now(&self, offset: u64, buf: BytesMut) -> Now<BytesMut, BytesMut> {
        (*self.inner).read_now(offset, buf)
    }
    fn read_shared(&self, offset: u64, len: usize) -> Now<Vec<Bytes>, NotShared> {
        (*self.inner).read_shared(offset, len)
    }
    fn read_file(&self, offset: u64, len: usize) -> Now<FileRange, NotShared> {
        (*self.inner).read_file(offset, len)
    }
    fn write_at<'s, 'f>(&'s self, offset: u64, data: Bytes) -> BoxFut<'f, Result<()>>
    where
        's: 'f,
        Self: 'f,
    {
        now_or(self.write_now(offset, data), move |data| async move {
            let len = data.len() as u64;
            (*self.inner).write_at(offset, data).await?;
            self.record(offset, len);
            Ok(())
        })
    }
    async fn flush(&self) -> Result<()> {
        (*self.inner).flush().await
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        (*self.inner).trim(offset, len).await?;
        self.record(offset, len);
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        (*self.inner).write_zeroes(offset, len).await?;
        self.record(offset, len);
        Ok(())
    }
    fn cancel_writes(&self, offset: u64, len: u64) {
        self.inner.cancel_writes(offset, len)
    }
    async fn close(&self) -> Result<()> {
        (*self.inner).close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::ProviderExt;
    use crate::sources::MemoryStorage;
    use std::sync::Arc;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn least_volatile_first_and_expiry() {
        let mem: DynProvider = Arc::new(MemoryStorage::new(8 * 4096));
        let v = VolatilityMonitor::new(mem, 4096, Duration::from_millis(80)).unwrap();
        v.add_all();
        // block 0: 3 writes, block 1: 1 write, block 2: 1 write (an 8 KiB
        // write touching 2 and 3), block 3: 2 writes.
        for _ in 0..3 {
            v.write_slice(0, &[1; 10]).await.unwrap();
        }
        v.write_slice(4096, &[1; 10]).await.unwrap();
        v.write_slice(2 * 4096, &[1; 8192]).await.unwrap();
        v.write_slice(3 * 4096, &[1; 10]).await.unwrap();
        assert_eq!(v.volatility(0), 3);
        assert_eq!(v.volatility(3), 2);
        assert_eq!(v.total_volatility(), 3 + 1 + 1 + 2);
        let order: Vec<u64> = std::iter::from_fn(|| v.next()).map(|i| i.block).collect();
        assert_eq!(order, vec![4, 5, 6, 7, 1, 2, 3, 0]);
        // After the window, counts expire.
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(v.volatility(0), 0);
        assert_eq!(v.total_volatility(), 0);
        v.add_all();
        assert_eq!(v.next().unwrap().block, 0);
        assert!(v.remove(5));
        assert!(!v.remove(5));
        assert_eq!(v.pending(), 6);
    }

    /// Counts slide out slot by slot: writes spread over many slots, with
    /// blocks moving between slots, always equal a model that keeps every
    /// write's time.
    #[tokio::test(start_paused = true)]
    async fn counts_slide_out_slot_by_slot() {
        let mem: DynProvider = Arc::new(MemoryStorage::new(4 * 4096));
        let window = Duration::from_millis(80); // slots of 10 ms
        let v = VolatilityMonitor::new(mem, 4096, window).unwrap();
        v.add_all();
        let start = Instant::now();
        // (time of write, block)
        let mut model: Vec<(Duration, u64)> = Vec::new();
        let mut x = 7u64;
        for step in 0..200u64 {
            // 1..3 writes per step to pseudo-random blocks, 3 ms per step.
            for _ in 0..(step % 3 + 1) {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let b = (x >> 33) % 4;
                v.write_slice(b * 4096, &[1; 10]).await.unwrap();
                model.push((start.elapsed(), b));
            }
            tokio::time::advance(Duration::from_millis(3)).await;
            let slot = 10_000_000u128;
            let now_slot = start.elapsed().as_nanos() / slot;
            for b in 0..4 {
                // A write in slot s is counted while s + SLOTS > now.
                let want = model
                    .iter()
                    .filter(|(t, mb)| *mb == b && t.as_nanos() / slot + SLOTS as u128 > now_slot)
                    .count() as u32;
                assert_eq!(v.volatility(b), want, "block {b} at step {step}");
            }
        }
    }

    /// Slot numbers past 2^32 (a block keeps only their low 32 bits): the
    /// counts still equal the model while the slots cross the wrap.
    #[tokio::test(start_paused = true)]
    async fn counts_survive_slot_numbers_past_u32() {
        let mem: DynProvider = Arc::new(MemoryStorage::new(4 * 4096));
        // Slots of 1 µs; start 50 slots before slot 2^32.
        let v = VolatilityMonitor::new(mem, 4096, Duration::from_micros(8)).unwrap();
        v.add_all();
        let slot = 1_000u128;
        tokio::time::advance(Duration::from_nanos(((1u64 << 32) - 50) * 1_000)).await;
        let start = Instant::now();
        let base = v.slot_now() as u128;
        assert!(base < 1 << 32);
        let mut model: Vec<(u128, u64)> = Vec::new();
        for step in 0..120u64 {
            // Blocks 0 and 1 for 20 steps, then 2 and 3 (longer than the
            // window): entries expire both settled and still current.
            let b = if step % 40 < 20 {
                step % 2
            } else {
                2 + step % 2
            };
            v.write_slice(b * 4096, &[1; 10]).await.unwrap();
            model.push((base + start.elapsed().as_nanos() / slot, b));
            tokio::time::advance(Duration::from_nanos(if step % 3 == 0 {
                1_000
            } else {
                400
            }))
            .await;
            let now = base + start.elapsed().as_nanos() / slot;
            for b in 0..4 {
                let want = model
                    .iter()
                    .filter(|(s, mb)| *mb == b && *s + SLOTS as u128 > now)
                    .count() as u32;
                assert_eq!(v.volatility(b), want, "block {b} at step {step}");
            }
        }
        assert!(v.slot_now() > 1 << 32, "the slots crossed 2^32");
    }

    /// Writes buffered across slot changes and beyond the log's capacity,
    /// with no query in between, are counted exactly once and in their own
    /// slot.
    #[tokio::test(start_paused = true)]
    async fn buffered_writes_fold_into_their_slots() {
        let mem: DynProvider = Arc::new(MemoryStorage::new(8 * 4096));
        let window = Duration::from_millis(80); // slots of 10 ms
        let v = VolatilityMonitor::new(mem, 4096, window).unwrap();
        v.add_all();
        let start = Instant::now();
        let mut model: Vec<(Duration, u64)> = Vec::new();
        for step in 0..30u64 {
            // Many more writes per slot than the log holds, on two blocks.
            for i in 0..(LOG_MAX as u64 + 300) {
                let b = if i % 3 == 0 { step % 8 } else { 7 - step % 8 };
                v.write_slice(b * 4096, &[1; 10]).await.unwrap();
                model.push((start.elapsed(), b));
            }
            tokio::time::advance(Duration::from_millis(4)).await;
        }
        let slot = 10_000_000u128;
        let now_slot = start.elapsed().as_nanos() / slot;
        let mut total = 0u64;
        for b in 0..8 {
            let want = model
                .iter()
                .filter(|(t, mb)| *mb == b && t.as_nanos() / slot + SLOTS as u128 > now_slot)
                .count() as u32;
            assert_eq!(v.volatility(b), want, "block {b}");
            total += u64::from(want);
        }
        assert_eq!(v.total_volatility(), total);
        assert_eq!(v.total_writes(), model.len() as u64);
        // The order sees the folded counts: least written first.
        let order: Vec<u64> = std::iter::from_fn(|| v.next()).map(|i| i.block).collect();
        let mut by_count: Vec<u64> = (0..8).collect();
        by_count.sort_by_key(|&b| (v.volatility(b), b));
        assert_eq!(order, by_count);
    }

    /// A range of more blocks than the log holds is counted at once: the log
    /// stays bounded, and the counts are the same as block by block.
    #[tokio::test]
    async fn large_ranges_bypass_the_log() {
        let blocks = (LOG_MAX as u64) * 3 + 5;
        let mem: DynProvider = Arc::new(MemoryStorage::new(blocks * 512));
        let v = VolatilityMonitor::new(mem, 512, Duration::from_secs(60)).unwrap();
        v.write_slice(512, &[1; 10]).await.unwrap();
        v.trim(0, blocks * 512).await.unwrap();
        assert!(v.state.lock().log.len() <= LOG_MAX);
        v.write_slice(512, &[1; 10]).await.unwrap();
        assert_eq!(v.volatility(0), 1);
        assert_eq!(v.volatility(1), 3);
        assert_eq!(v.volatility(blocks - 1), 1);
        assert_eq!(v.total_volatility(), blocks + 2);
    }

    /// Threads that own a shard count through their rings, the others
    /// through the shared log; with more threads than shards writing at
    /// once (and readers folding meanwhile), every write is counted once.
    #[test]
    fn concurrent_writers_through_rings_and_log_are_all_counted() {
        let blocks = 64u64;
        let mem: DynProvider = Arc::new(MemoryStorage::new(blocks * 4096));
        let v = Arc::new(VolatilityMonitor::new(mem, 4096, Duration::from_secs(3600)).unwrap());
        v.add_all();
        let threads = crate::shard::SHARDS + 6;
        let per_thread = 1000u64;
        let start = Arc::new(std::sync::Barrier::new(threads + 1));
        let handles: Vec<_> = (0..threads as u64)
            .map(|t| {
                let (v, start) = (v.clone(), start.clone());
                std::thread::spawn(move || {
                    let data = Bytes::from(vec![t as u8; 4096]);
                    start.wait();
                    for i in 0..per_thread {
                        // Thread t writes block (t + i) % blocks.
                        let b = (t + i) % blocks;
                        v.write_now(b * 4096, data.clone())
                            .expect("memory completes now")
                            .unwrap();
                    }
                })
            })
            .collect();
        start.wait();
        // A reader folding while the writers run.
        for _ in 0..50 {
            let _ = v.total_volatility();
            std::thread::yield_now();
        }
        for h in handles {
            h.join().unwrap();
        }
        let mut model = vec![0u32; blocks as usize];
        for t in 0..threads as u64 {
            for i in 0..per_thread {
                model[((t + i) % blocks) as usize] += 1;
            }
        }
        for b in 0..blocks {
            assert_eq!(v.volatility(b), model[b as usize], "block {b}");
        }
        assert_eq!(v.total_volatility(), threads as u64 * per_thread);
        assert_eq!(v.total_writes(), threads as u64 * per_thread);
        // The order still hands out every block once.
        let mut seen: Vec<u64> = std::iter::from_fn(|| v.next().map(|i| i.block)).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..blocks).collect::<Vec<_>>());
    }
}
