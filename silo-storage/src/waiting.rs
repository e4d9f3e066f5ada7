//! The waiting cache: the destination side of a live migration.
//!
//! ```text
//!  destination users ──► WaitingCacheLocal ──┐   need(offset, len) ──► source
//!  (NBD, VM)                                 ├──► inner provider
//!  migration stream  ──► WaitingCacheRemote ─┘   dont_need(offset, len) ──► source
//! ```
//!
//! A block is *present* once it arrived complete from the remote side, or
//! was written locally. The rules:
//!
//! * **Local read** of a block that is not present waits for it. The first
//!   waiter of a block (per absence) calls the *need* handler once, so the
//!   source can send it with priority. All blocks of a multi-block read are
//!   requested at once, before waiting.
//! * **Local write** covering a whole block (or the device's last partial
//!   block up to the end) makes it *local* and calls the *don't need*
//!   handler for the newly local blocks (one call per contiguous run). A
//!   partial write to a block that is not present waits for the block first
//!   (read-modify-write needs the data). Partially written present blocks
//!   become local too: their content is now the destination's.
//! * **Remote write** (the migration stream) writes each block that is not
//!   local, marks blocks it covers completely as present and wakes their
//!   waiters. **A block the local side wrote is never overwritten by a
//!   remote write** — the destination owns it. Local and remote writes to
//!   the same block are serialised by a striped lock (remote writes hold it
//!   exclusively, local writes shared), so the check "is it local?" and the
//!   remote data write are one step (Go silo's cache races here).
//! * [`WaitingCacheRemote::dirty`] marks remote-present blocks absent again
//!   (a newer version is on its way); locally written blocks stay present.
//! * Waits never hang forever: [`WaitingCacheLocal::fail_all`] (called when
//!   the connection drops, or by `close`) wakes every waiter with an error,
//!   and an optional timeout bounds each wait. After a timeout the block's
//!   request is forgotten, so the next reader emits *need* again. Dropping
//!   a read's future cancels its wait.
//!
//! The need / don't-need handlers are called synchronously on the I/O path
//! and must not block (push to a channel or spawn).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use parking_lot::{Mutex, RwLock};
use tokio::sync::{Notify, OwnedRwLockReadGuard};
use tokio::time::Instant;

use crate::bitfield::Bitfield;
use crate::block::BlockLayout;
use crate::error::{check_range, Error, Op, Result};
use crate::provider::{Capabilities, DynProvider, Provider};

/// A callback receiving a byte range `(offset, len)`.
pub type RangeHandler = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Number of lock stripes serialising local and remote writes per block.
const STRIPES: u64 = 1024;

/// Configuration of a waiting cache.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct WaitingConfig {
    /// A wait for a block fails with [`Error::Timeout`] after this long
    /// (`None`: wait until the block arrives or `fail_all`).
    pub timeout: Option<Duration>,
}

impl WaitingConfig {
    /// Sets the wait timeout.
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }
}

/// Counters of a waiting cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WaitingMetrics {
    /// Local operations that had to wait for at least one block.
    pub waits: u64,
    /// Total time spent waiting.
    pub wait_time: Duration,
    /// Need notifications emitted (one per block per absence).
    pub needs: u64,
    /// Don't-need notifications emitted (one per contiguous run).
    pub dont_needs: u64,
    /// Waits that ended in an error (failure or timeout).
    pub failed_waits: u64,
    /// Blocks present from the remote side.
    pub remote_present: u64,
    /// Blocks written locally.
    pub local_present: u64,
}

struct Waiters {
    map: HashMap<u64, Arc<Notify>>,
    failed: Option<Error>,
}

struct Shared {
    inner: DynProvider,
    layout: BlockLayout,
    cfg: WaitingConfig,
    remote: Bitfield,
    local: Bitfield,
    waiters: Mutex<Waiters>,
    stripes: Box<[Arc<tokio::sync::RwLock<()>>]>,
    need: RwLock<Option<RangeHandler>>,
    dont_need: RwLock<Option<RangeHandler>>,
    waits: AtomicU64,
    wait_ns: AtomicU64,
    needs: AtomicU64,
    dont_needs: AtomicU64,
    failed_waits: AtomicU64,
}

/// The destination users' side: reads wait for missing blocks.
#[derive(Clone)]
pub struct WaitingCacheLocal {
    s: Arc<Shared>,
}

/// The migration stream's side: writes make blocks present.
#[derive(Clone)]
pub struct WaitingCacheRemote {
    s: Arc<Shared>,
}

impl std::fmt::Debug for WaitingCacheLocal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WaitingCacheLocal")
            .field("layout", &self.s.layout)
            .finish()
    }
}

impl std::fmt::Debug for WaitingCacheRemote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WaitingCacheRemote")
            .field("layout", &self.s.layout)
            .finish()
    }
}

/// Builds the two sides of a waiting cache over `inner`. No block is
/// present at first.
pub fn waiting_cache(
    inner: DynProvider,
    block_size: u64,
    cfg: WaitingConfig,
) -> Result<(WaitingCacheLocal, WaitingCacheRemote)> {
    let layout = BlockLayout::new(inner.size(), block_size)?;
    let n = layout.num_blocks();
    let stripes = (0..STRIPES.min(n.max(1)))
        .map(|_| Arc::new(tokio::sync::RwLock::new(())))
        .collect();
    let s = Arc::new(Shared {
        inner,
        layout,
        cfg,
        remote: Bitfield::new(n),
        local: Bitfield::new(n),
        waiters: Mutex::new(Waiters {
            map: HashMap::new(),
            failed: None,
        }),
        stripes,
        need: RwLock::new(None),
        dont_need: RwLock::new(None),
        waits: AtomicU64::new(0),
        wait_ns: AtomicU64::new(0),
        needs: AtomicU64::new(0),
        dont_needs: AtomicU64::new(0),
        failed_waits: AtomicU64::new(0),
    });
    Ok((WaitingCacheLocal { s: s.clone() }, WaitingCacheRemote { s }))
}

/// Calls `f(start, end)` for each run of consecutive values in `sorted`.
fn runs(sorted: &[u64], mut f: impl FnMut(u64, u64)) {
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j + 1 < sorted.len() && sorted[j + 1] == sorted[j] + 1 {
            j += 1;
        }
        f(sorted[i], sorted[j] + 1);
        i = j + 1;
    }
}

impl Shared {
    fn present(&self, b: u64) -> bool {
        self.remote.test(b) || self.local.test(b)
    }

    fn stripe(&self, b: u64) -> usize {
        (b % self.stripes.len() as u64) as usize
    }

    /// Wakes the waiters of block `b` (after it became present).
    fn wake(&self, b: u64) {
        let n = self.waiters.lock().map.remove(&b);
        if let Some(n) = n {
            n.notify_waiters();
        }
    }

    /// Waits until every block in `blocks` is present; emits `need` once
    /// per missing block per absence.
    async fn wait_blocks(&self, blocks: &[u64]) -> Result<()> {
        if blocks.iter().all(|&b| self.present(b)) {
            return Ok(());
        }
        let start = Instant::now();
        self.waits.fetch_add(1, Ordering::Relaxed);
        let r = self.wait_blocks_slow(blocks, start).await;
        self.wait_ns
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if r.is_err() {
            self.failed_waits.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    async fn wait_blocks_slow(&self, blocks: &[u64], start: Instant) -> Result<()> {
        loop {
            let mut waits = Vec::new();
            let mut new = Vec::new();
            {
                let mut w = self.waiters.lock();
                if let Some(e) = &w.failed {
                    return Err(e.duplicate());
                }
                for &b in blocks {
                    // Checked under the lock: `wake` removes the entry under
                    // the same lock after setting the bit, so no wake-up is
                    // lost between this check and the registration.
                    if self.present(b) {
                        continue;
                    }
                    let n = w.map.entry(b).or_insert_with(|| {
                        new.push(b);
                        Arc::new(Notify::new())
                    });
                    waits.push(n.clone().notified_owned());
                }
            }
            if waits.is_empty() {
                return Ok(());
            }
            if !new.is_empty() {
                let h = self.need.read().clone();
                for &b in &new {
                    self.needs.fetch_add(1, Ordering::Relaxed);
                    tracing::trace!(block = b, "waiting cache: need");
                    if let Some(h) = &h {
                        let r = self.layout.block_range(b);
                        h(r.start, r.end - r.start);
                    }
                }
            }
            let all = futures::future::join_all(waits);
            match self.cfg.timeout {
                Some(t) => {
                    let left = t.saturating_sub(start.elapsed());
                    if tokio::time::timeout(left, all).await.is_err() {
                        // Forget the requests of the blocks still missing,
                        // so the next reader asks the source again (the
                        // need may have been lost) instead of waiting on a
                        // request nobody serves.
                        let stale: Vec<Arc<Notify>> = {
                            let mut w = self.waiters.lock();
                            blocks
                                .iter()
                                .filter(|&&b| !self.present(b))
                                .filter_map(|b| w.map.remove(b))
                                .collect()
                        };
                        for n in stale {
                            n.notify_waiters();
                        }
                        return Err(Error::Timeout {
                            what: format!("blocks {:?} from the migration source", blocks),
                            after: t,
                        });
                    }
                }
                None => {
                    all.await;
                }
            }
            // Loop: re-check (a block may have been dirtied again, or the
            // wake-up may be a failure).
        }
    }

    /// Waits for the partial edge blocks of a local mutation and takes the
    /// shared stripe locks of every touched block that is not yet local.
    async fn begin_local(&self, offset: u64, len: u64) -> Result<Vec<OwnedRwLockReadGuard<()>>> {
        let touching = self.layout.blocks_touching(offset, len);
        let covered = self.layout.blocks_covered(offset, len);
        let edges: Vec<u64> = touching.clone().filter(|b| !covered.contains(b)).collect();
        loop {
            self.wait_blocks(&edges).await?;
            let mut idx: Vec<usize> = touching
                .clone()
                .filter(|&b| !self.local.test(b))
                .map(|b| self.stripe(b))
                .collect();
            idx.sort_unstable();
            idx.dedup();
            let mut guards = Vec::with_capacity(idx.len());
            for i in idx {
                guards.push(self.stripes[i].clone().read_owned().await);
            }
            // Re-check under the locks: an edge may have been dirtied again.
            if edges.iter().all(|&b| self.present(b)) {
                return Ok(guards);
            }
        }
    }

    /// After a local mutation: touched blocks become local, waiters wake,
    /// newly local whole blocks are reported as not needed.
    fn end_local(&self, offset: u64, len: u64) {
        let covered = self.layout.blocks_covered(offset, len);
        let mut newly = Vec::new();
        for b in self.layout.blocks_touching(offset, len) {
            if self.local.set_if_clear(b) && covered.contains(&b) {
                newly.push(b);
            }
            if covered.contains(&b) {
                self.wake(b);
            }
        }
        if newly.is_empty() {
            return;
        }
        let h = self.dont_need.read().clone();
        runs(&newly, |s, e| {
            self.dont_needs.fetch_add(1, Ordering::Relaxed);
            if let Some(h) = &h {
                let off = self.layout.block_offset(s);
                let end = self.layout.block_range(e - 1).end;
                h(off, end - off);
            }
        });
    }

    async fn local_op(&self, op: Op, offset: u64, len: u64, data: Option<Bytes>) -> Result<()> {
        check_range(op, offset, len, self.layout.size())?;
        if len == 0 {
            return Ok(());
        }
        let guards = self.begin_local(offset, len).await?;
        let r = match (op, data) {
            (Op::Write, Some(d)) => self.inner.write_at(offset, d).await,
            (Op::Trim, _) => self.inner.trim(offset, len).await,
            _ => self.inner.write_zeroes(offset, len).await,
        };
        if r.is_ok() {
            self.end_local(offset, len);
        }
        drop(guards);
        r
    }

    async fn remote_op(&self, op: Op, offset: u64, len: u64, data: Option<Bytes>) -> Result<()> {
        check_range(op, offset, len, self.layout.size())?;
        for b in self.layout.blocks_touching(offset, len) {
            let br = self.layout.block_range(b);
            let s = br.start.max(offset);
            let e = br.end.min(offset + len);
            let _g = self.stripes[self.stripe(b)].write().await;
            if !self.local.test(b) {
                match (op, &data) {
                    (Op::Write, Some(d)) => {
                        let piece = d.slice((s - offset) as usize..(e - offset) as usize);
                        self.inner.write_at(s, piece).await?
                    }
                    (Op::Trim, _) => self.inner.trim(s, e - s).await?,
                    _ => self.inner.write_zeroes(s, e - s).await?,
                }
            }
            if s == br.start && e == br.end {
                self.remote.set(b);
                self.wake(b);
            }
        }
        Ok(())
    }

    fn fail_all(&self, err: Error) {
        tracing::debug!(error = %err, "waiting cache: failing all waiters");
        let map = {
            let mut w = self.waiters.lock();
            w.failed = Some(err);
            std::mem::take(&mut w.map)
        };
        for n in map.into_values() {
            n.notify_waiters();
        }
    }

    fn metrics(&self) -> WaitingMetrics {
        WaitingMetrics {
            waits: self.waits.load(Ordering::Relaxed),
            wait_time: Duration::from_nanos(self.wait_ns.load(Ordering::Relaxed)),
            needs: self.needs.load(Ordering::Relaxed),
            dont_needs: self.dont_needs.load(Ordering::Relaxed),
            failed_waits: self.failed_waits.load(Ordering::Relaxed),
            remote_present: self.remote.count(),
            local_present: self.local.count(),
        }
    }

    fn availability(&self) -> Bitfield {
        let b = self.remote.clone();
        b.union_with(&self.local);
        b
    }
}

macro_rules! common_methods {
    () => {
        /// The block layout.
        pub fn layout(&self) -> BlockLayout {
            self.s.layout
        }

        /// Wakes every waiter with `err`, and makes later waits fail with it
        /// until [`Self::clear_failure`]. Use when the migration connection
        /// drops.
        pub fn fail_all(&self, err: Error) {
            self.s.fail_all(err)
        }

        /// Lets waits proceed again after [`Self::fail_all`] (e.g. a
        /// reconnected source resumes).
        pub fn clear_failure(&self) {
            self.s.waiters.lock().failed = None;
        }

        /// Whether block `b` is present (arrived or written locally).
        pub fn is_present(&self, b: u64) -> bool {
            self.s.present(b)
        }

        /// Whether every block is present.
        pub fn is_complete(&self) -> bool {
            self.s.availability().count() == self.s.layout.num_blocks()
        }

        /// The present blocks (remote or local) as a bitfield.
        pub fn availability(&self) -> Bitfield {
            self.s.availability()
        }

        /// Current counters.
        pub fn metrics(&self) -> WaitingMetrics {
            self.s.metrics()
        }
    };
}

impl WaitingCacheLocal {
    common_methods!();

    /// Sets the handler called once per missing block a reader waits for,
    /// with the block's byte range.
    pub fn set_need_handler(&self, h: RangeHandler) {
        *self.s.need.write() = Some(h);
    }

    /// Sets the handler called with each run of blocks that became local
    /// through a local write.
    pub fn set_dont_need_handler(&self, h: RangeHandler) {
        *self.s.dont_need.write() = Some(h);
    }
}

impl WaitingCacheRemote {
    common_methods!();

    /// Marks blocks `[blocks.start, blocks.end)` present without data (the
    /// destination already has them, e.g. a shared base image or S3).
    pub fn mark_present(&self, blocks: std::ops::Range<u64>) {
        let end = blocks.end.min(self.s.layout.num_blocks());
        for b in blocks.start..end {
            self.s.remote.set(b);
            self.s.wake(b);
        }
    }

    /// Marks every block present (the migration completed).
    pub fn mark_all_present(&self) {
        self.mark_present(0..self.s.layout.num_blocks());
    }

    /// Marks blocks absent again: a newer version is on its way. Locally
    /// written blocks stay present.
    pub fn dirty(&self, blocks: &[u64]) {
        for &b in blocks {
            self.s.remote.clear(b);
        }
    }
}

#[async_trait]
impl Provider for WaitingCacheLocal {
    fn size(&self) -> u64 {
        self.s.layout.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.s.inner.capabilities()
    }
    async fn read_at(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        check_range(Op::Read, offset, buf.len() as u64, self.s.layout.size())?;
        let blocks: Vec<u64> = self
            .s
            .layout
            .blocks_touching(offset, buf.len() as u64)
            .collect();
        self.s.wait_blocks(&blocks).await?;
        self.s.inner.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: Bytes) -> Result<()> {
        let len = data.len() as u64;
        self.s.local_op(Op::Write, offset, len, Some(data)).await
    }
    async fn flush(&self) -> Result<()> {
        self.s.inner.flush().await
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.s.local_op(Op::Trim, offset, len, None).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.s.local_op(Op::WriteZeroes, offset, len, None).await
    }
    fn cancel_writes(&self, offset: u64, len: u64) {
        self.s.inner.cancel_writes(offset, len)
    }
    /// Fails every waiter with [`Error::Closed`], then closes the inner
    /// provider.
    async fn close(&self) -> Result<()> {
        self.s.fail_all(Error::Closed { op: Op::Read });
        self.s.inner.close().await
    }
}

#[async_trait]
impl Provider for WaitingCacheRemote {
    fn size(&self) -> u64 {
        self.s.layout.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.s.inner.capabilities()
    }
    /// Reads the inner provider directly, without waiting.
    async fn read_at(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        self.s.inner.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: Bytes) -> Result<()> {
        let len = data.len() as u64;
        self.s.remote_op(Op::Write, offset, len, Some(data)).await
    }
    async fn flush(&self) -> Result<()> {
        self.s.inner.flush().await
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.s.remote_op(Op::Trim, offset, len, None).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.s.remote_op(Op::WriteZeroes, offset, len, None).await
    }
    fn cancel_writes(&self, offset: u64, len: u64) {
        self.s.inner.cancel_writes(offset, len)
    }
    async fn close(&self) -> Result<()> {
        self.s.fail_all(Error::Closed { op: Op::Read });
        self.s.inner.close().await
    }
}
