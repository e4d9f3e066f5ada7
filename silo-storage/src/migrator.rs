//! The migrator: moves blocks from a (tracked) source to a destination.
//!
//! ```text
//!   order (Priority → Volatility | Any) ──next()──► dispatcher
//!                                                     │ per-kind semaphores
//!   source (DirtyTrackerRemote) ──read──► block task ──write──► destination
//!                                        (BytesMut → freeze → Bytes, no copy)
//! ```
//!
//! * **Bulk pass**: [`Migrator::migrate`]`(n)` dispatches up to `n` blocks from
//!   the order; [`Migrator::migrate_all`] dispatches until the order is empty
//!   and waits for the transfers. Each kind ([`BlockKind`]) has its own
//!   concurrency limit; prioritised blocks ([`Migrator::prioritise`], from a
//!   destination's *need*) are dispatched as soon as a priority slot is free,
//!   even while the standard pool is busy.
//! * **Dirty rounds**: [`Migrator::get_latest_dirty`] takes the dirty set of
//!   the source (with the optional lock handler held around the snapshot);
//!   an empty set leaves the source **locked** — that is the final,
//!   consistent state. [`Migrator::migrate_dirty`] re-sends blocks; a block
//!   already queued for a re-send that has not started reading is skipped
//!   (the queued send will read the newer data), and the rest of the list is
//!   still sent. The classic cut-over loop:
//!
//!   ```text
//!   m.migrate_all().await?;
//!   loop {
//!       m.wait_for_completion().await?;
//!       match m.get_latest_dirty().await? {
//!           None => break,                       // source locked, dest equal
//!           Some(blocks) => { m.migrate_dirty(&blocks).await?; }
//!       }
//!   }
//!   ```
//! * **Errors**: a failed block is retried (fresh read, bounded by
//!   [`MigratorConfig::max_retries`], with backoff); the error handler sees
//!   every failure. When the retries are exhausted the error is latched: no
//!   new blocks are dispatched and `wait_for_completion`/`migrate_all` return
//!   it.
//! * **Cancellation**: [`Migrator::cancel`] stops the dispatcher and aborts
//!   in-flight block transfers at their next await point (providers own
//!   their buffers, so dropping an operation is sound).
//! * **Memory** is bounded by (sum of the concurrency limits) × block size:
//!   one buffer per in-flight block, recycled through a small pool when the
//!   destination has released it.
//!
//! # Example: a source stack, a lazily filled destination, a cut-over
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use silo_storage::dirty::dirty_tracker;
//! use silo_storage::migrator::{Migrator, MigratorConfig};
//! use silo_storage::order::{BlockOrder, PriorityOrder};
//! use silo_storage::volatility::VolatilityMonitor;
//! use silo_storage::waiting::{waiting_cache, WaitingConfig};
//! use silo_storage::{DynProvider, MemoryStorage, ProviderExt};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! const BS: u64 = 64 * 1024;
//! let size = 4 << 20;
//! // Source: application → volatility monitor → dirty tracker → memory.
//! let (local, remote) = dirty_tracker(Arc::new(MemoryStorage::new(size)), BS)?;
//! let vol = Arc::new(VolatilityMonitor::new(Arc::new(local), BS, Duration::from_secs(60))?);
//! let app: DynProvider = vol.clone();
//! app.write_slice(12345, b"hello").await?;
//!
//! // Destination: users read through the waiting cache while blocks arrive.
//! let (dest_local, dest_remote) =
//!     waiting_cache(Arc::new(MemoryStorage::new(size)), BS, WaitingConfig::default())?;
//!
//! let order = Arc::new(PriorityOrder::new(vol.clone()));
//! order.add_all();
//! let m = Migrator::new(Arc::new(remote.clone()), Arc::new(dest_remote), order, MigratorConfig::new(BS))?;
//! m.set_dirty_source(Arc::new(remote));
//! // "need" from the destination → priority at the source (over the wire in real use).
//! let m2 = m.clone();
//! dest_local.set_need_handler(Arc::new(move |off, len| m2.need_at(off, len)));
//!
//! m.migrate_all().await?;
//! app.write_slice(0, b"late write").await?;
//! loop {
//!     m.wait_for_completion().await?;
//!     match m.get_latest_dirty().await? {
//!         None => break,
//!         Some(blocks) => { m.migrate_dirty(&blocks).await?; }
//!     }
//! }
//! assert_eq!(&dest_local.read_bytes(0, 10).await?[..], b"late write");
//! assert_eq!(&dest_local.read_bytes(12345, 5).await?[..], b"hello");
//! # Ok::<(), silo_storage::Error>(())
//! # }).unwrap();
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures::future::BoxFuture;
use parking_lot::{Mutex, RwLock};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::bitfield::Bitfield;
use crate::block::BlockLayout;
use crate::dirty::DirtySource;
use crate::error::{Error, Op, Result};
use crate::order::{BlockInfo, BlockKind, BlockOrder};
use crate::provider::DynProvider;

/// A cloneable cancellation signal.
#[derive(Clone, Default)]
pub struct CancelToken {
    inner: Arc<(AtomicBool, Notify)>,
}

impl std::fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CancelToken")
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        Self::default()
    }
    /// Cancels: every current and future [`CancelToken::cancelled`] returns.
    pub fn cancel(&self) {
        self.inner.0.store(true, Ordering::SeqCst);
        self.inner.1.notify_waiters();
    }
    /// Whether [`CancelToken::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.inner.0.load(Ordering::SeqCst)
    }
    /// Completes once cancelled.
    pub async fn cancelled(&self) {
        loop {
            let n = self.inner.1.notified();
            if self.is_cancelled() {
                return;
            }
            n.await;
        }
    }
}

/// Concurrency limits per block kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Concurrency {
    /// Blocks of the bulk pass in flight at once.
    pub standard: usize,
    /// Dirty re-sends in flight at once.
    pub dirty: usize,
    /// Prioritised blocks in flight at once (beside the standard ones).
    pub priority: usize,
}

impl Default for Concurrency {
    fn default() -> Self {
        Concurrency {
            standard: 32,
            dirty: 32,
            priority: 16,
        }
    }
}

/// Configuration of a [`Migrator`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MigratorConfig {
    /// Block size in bytes (a power of two).
    pub block_size: u64,
    /// Concurrency limits per kind (each at least 1).
    pub concurrency: Concurrency,
    /// Retries of a failed block before its error is latched.
    pub max_retries: u32,
    /// Wait before retry `n` is `n ×` this.
    pub retry_backoff: Duration,
    /// Minimum time between two progress callbacks.
    pub progress_interval: Duration,
}

impl MigratorConfig {
    /// Defaults for `block_size`: concurrency 32/32/16, 3 retries with
    /// 20 ms backoff, progress every 100 ms.
    pub fn new(block_size: u64) -> Self {
        MigratorConfig {
            block_size,
            concurrency: Concurrency::default(),
            max_retries: 3,
            retry_backoff: Duration::from_millis(20),
            progress_interval: Duration::from_millis(100),
        }
    }
    /// Sets the concurrency limits.
    pub fn with_concurrency(mut self, c: Concurrency) -> Self {
        self.concurrency = c;
        self
    }
    /// Sets the retry count and backoff.
    pub fn with_retries(mut self, max_retries: u32, backoff: Duration) -> Self {
        self.max_retries = max_retries;
        self.retry_backoff = backoff;
        self
    }
    /// Sets the progress interval.
    pub fn with_progress_interval(mut self, d: Duration) -> Self {
        self.progress_interval = d;
        self
    }
}

/// A snapshot of migration progress.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[non_exhaustive]
pub struct Progress {
    /// Blocks of the device.
    pub total_blocks: u64,
    /// Blocks sent at least once (or marked migrated).
    pub migrated_blocks: u64,
    /// Blocks whose latest known version is at the destination.
    pub ready_blocks: u64,
    /// Blocks in flight now.
    pub active_blocks: u64,
    /// Migrated blocks that were written since and await a re-send.
    pub dirty_blocks: u64,
    /// Blocks skipped because the destination does not need them.
    pub skipped_blocks: u64,
    /// Block transfers completed (including re-sends).
    pub blocks_sent: u64,
    /// Bytes written to the destination.
    pub bytes_sent: u64,
    /// Failed attempts that were retried.
    pub retries: u64,
    /// Failed attempts in total.
    pub errors: u64,
    /// Time since the first dispatch.
    pub elapsed: Duration,
    /// `bytes_sent / elapsed` (0 before anything was sent).
    pub bytes_per_sec: f64,
}

/// One block transfer attempt, for timelines and tracing.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct BlockEvent {
    /// Block index.
    pub block: u64,
    /// Why it was sent.
    pub kind: BlockKind,
    /// When the attempt started (after its concurrency slot was granted).
    pub started: Instant,
    /// When it ended.
    pub finished: Instant,
    /// Bytes transferred (0 on failure).
    pub bytes: u64,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// Whether the attempt succeeded.
    pub ok: bool,
}

/// An async callback without arguments (lock / unlock).
pub type LockHandler = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;
/// Progress callback.
pub type ProgressHandler = Arc<dyn Fn(&Progress) + Send + Sync>;
/// Per-block observer.
pub type BlockObserver = Arc<dyn Fn(&BlockEvent) + Send + Sync>;
/// Error callback: block, error of one failed attempt.
pub type ErrorHandler = Arc<dyn Fn(u64, &Error) + Send + Sync>;

#[derive(Default)]
struct Handlers {
    progress: Option<ProgressHandler>,
    observer: Option<BlockObserver>,
    error: Option<ErrorHandler>,
    lock: Option<LockHandler>,
    unlock: Option<LockHandler>,
    dirty: Option<Arc<dyn DirtySource>>,
}

struct Inner {
    source: DynProvider,
    dest: DynProvider,
    order: Arc<dyn BlockOrder>,
    layout: BlockLayout,
    cfg: MigratorConfig,
    std_sem: Arc<Semaphore>,
    dirty_sem: Arc<Semaphore>,
    prio_sem: Arc<Semaphore>,
    prio_notify: Notify,
    migrated: Bitfield,
    clean: Bitfield,
    queued: Bitfield,
    not_needed: Bitfield,
    active: AtomicU64,
    idle: Notify,
    cancel: CancelToken,
    fatal: Mutex<Option<Error>>,
    handlers: RwLock<Handlers>,
    pool: Mutex<Vec<BytesMut>>,
    started: Mutex<Option<Instant>>,
    last_progress: Mutex<Option<Instant>>,
    locked: AtomicBool,
    blocks_sent: AtomicU64,
    bytes_sent: AtomicU64,
    retries: AtomicU64,
    errors: AtomicU64,
    skipped: AtomicU64,
}

/// Moves blocks from a source to a destination. Cheap to clone (shared).
#[derive(Clone)]
pub struct Migrator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Migrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migrator")
            .field("layout", &self.inner.layout)
            .field("progress", &self.progress())
            .finish()
    }
}

impl Migrator {
    /// A migrator from `source` to `dest` (same size) visiting blocks in
    /// `order` (which must cover the same number of blocks). Nothing is
    /// pending in the order unless the caller added it (e.g. `add_all`).
    pub fn new(
        source: DynProvider,
        dest: DynProvider,
        order: Arc<dyn BlockOrder>,
        cfg: MigratorConfig,
    ) -> Result<Self> {
        let layout = BlockLayout::new(source.size(), cfg.block_size)?;
        if dest.size() != source.size() {
            return Err(Error::Invalid(format!(
                "source has {} bytes but destination {}",
                source.size(),
                dest.size()
            )));
        }
        if order.num_blocks() != layout.num_blocks() {
            return Err(Error::Invalid(format!(
                "order covers {} blocks, device has {}",
                order.num_blocks(),
                layout.num_blocks()
            )));
        }
        let c = cfg.concurrency;
        if c.standard == 0 || c.dirty == 0 || c.priority == 0 {
            return Err(Error::Invalid(
                "concurrency limits must be at least 1".into(),
            ));
        }
        let n = layout.num_blocks();
        Ok(Migrator {
            inner: Arc::new(Inner {
                source,
                dest,
                order,
                layout,
                std_sem: Arc::new(Semaphore::new(c.standard)),
                dirty_sem: Arc::new(Semaphore::new(c.dirty)),
                prio_sem: Arc::new(Semaphore::new(c.priority)),
                cfg,
                prio_notify: Notify::new(),
                migrated: Bitfield::new(n),
                clean: Bitfield::new(n),
                queued: Bitfield::new(n),
                not_needed: Bitfield::new(n),
                active: AtomicU64::new(0),
                idle: Notify::new(),
                cancel: CancelToken::new(),
                fatal: Mutex::new(None),
                handlers: RwLock::new(Handlers::default()),
                pool: Mutex::new(Vec::new()),
                started: Mutex::new(None),
                last_progress: Mutex::new(None),
                locked: AtomicBool::new(false),
                blocks_sent: AtomicU64::new(0),
                bytes_sent: AtomicU64::new(0),
                retries: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                skipped: AtomicU64::new(0),
            }),
        })
    }

    /// The block layout.
    pub fn layout(&self) -> BlockLayout {
        self.inner.layout
    }

    /// The order blocks are taken from.
    pub fn order(&self) -> &Arc<dyn BlockOrder> {
        &self.inner.order
    }

    /// Sets where [`Migrator::get_latest_dirty`] takes dirty blocks from
    /// (normally the [`crate::dirty::DirtyTrackerRemote`] the source reads
    /// through).
    pub fn set_dirty_source(&self, d: Arc<dyn DirtySource>) {
        self.inner.handlers.write().dirty = Some(d);
    }

    /// Sets the progress callback (rate limited, plus one at each
    /// `wait_for_completion`).
    pub fn set_progress_handler(&self, h: ProgressHandler) {
        self.inner.handlers.write().progress = Some(h);
    }

    /// Sets the per-block observer, called after every attempt.
    pub fn set_block_observer(&self, h: BlockObserver) {
        self.inner.handlers.write().observer = Some(h);
    }

    /// Sets the error callback, called for every failed attempt.
    pub fn set_error_handler(&self, h: ErrorHandler) {
        self.inner.handlers.write().error = Some(h);
    }

    /// Sets the handlers that lock / unlock the source's writers around the
    /// dirty snapshot in [`Migrator::get_latest_dirty`].
    pub fn set_lock_handlers(&self, lock: LockHandler, unlock: LockHandler) {
        let mut h = self.inner.handlers.write();
        h.lock = Some(lock);
        h.unlock = Some(unlock);
    }

    /// The cancellation token (cancel it, or wait on it).
    pub fn cancel_token(&self) -> CancelToken {
        self.inner.cancel.clone()
    }

    /// Cancels the migration: dispatching stops and in-flight transfers are
    /// abandoned; waits return [`Error::Cancelled`].
    pub fn cancel(&self) {
        tracing::debug!("migrator cancelled");
        self.inner.cancel.cancel();
        self.inner.idle.notify_waiters();
    }

    /// Requests `block` ahead of the others (the destination needs it).
    /// Returns `false` if it is not pending (already sent or removed).
    pub fn prioritise(&self, block: u64) -> bool {
        let ok = self.inner.order.prioritise(block);
        if ok {
            self.inner.prio_notify.notify_one();
        }
        ok
    }

    /// [`Migrator::prioritise`] for every block touched by a byte range (a
    /// destination's *need*).
    pub fn need_at(&self, offset: u64, len: u64) {
        for b in self.inner.layout.blocks_touching(offset, len) {
            self.prioritise(b);
        }
    }

    /// The destination no longer needs `block` (it wrote it itself): it is
    /// dropped from the order and from later dirty re-sends.
    pub fn dont_need(&self, block: u64) {
        if block < self.inner.layout.num_blocks() && self.inner.not_needed.set_if_clear(block) {
            self.inner.skipped.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.order.remove(block);
    }

    /// [`Migrator::dont_need`] for every block *covered* by a byte range.
    pub fn dont_need_at(&self, offset: u64, len: u64) {
        for b in self.inner.layout.blocks_covered(offset, len) {
            self.dont_need(b);
        }
    }

    /// Records `block` as already at the destination (e.g. synced to S3):
    /// it is dropped from the order and counted as migrated and clean. The
    /// caller must make sure later writes to it are tracked (e.g.
    /// `DirtyTrackerRemote::track_at` on its range *before* the content
    /// the destination has was read), or they will not be re-sent.
    pub fn set_migrated(&self, block: u64) {
        self.inner.order.remove(block);
        self.inner.migrated.set(block);
        self.inner.clean.set(block);
    }

    /// Whether the source is held locked by the last `get_latest_dirty`.
    pub fn is_locked(&self) -> bool {
        self.inner.locked.load(Ordering::SeqCst)
    }

    /// Current progress.
    pub fn progress(&self) -> Progress {
        self.inner.progress()
    }

    fn check_running(&self) -> Result<()> {
        if self.inner.cancel.is_cancelled() {
            return Err(cancelled());
        }
        if let Some(e) = self.inner.fatal.lock().as_ref() {
            return Err(e.duplicate());
        }
        Ok(())
    }

    fn mark_started(&self) {
        self.inner.started.lock().get_or_insert_with(Instant::now);
    }

    /// Dispatches up to `n` blocks from the order (waiting for concurrency
    /// slots as needed) and returns how many were dispatched; fewer than `n`
    /// means the order ran empty. Does not wait for the transfers.
    pub async fn migrate(&self, n: u64) -> Result<u64> {
        self.mark_started();
        let inner = &self.inner;
        let mut done = 0u64;
        while done < n {
            self.check_running()?;
            tokio::select! {
                biased;
                _ = inner.cancel.cancelled() => return Err(cancelled()),
                _ = inner.prio_notify.notified() => {
                    done += self.dispatch_priorities(n - done);
                }
                permit = inner.std_sem.clone().acquire_owned() => {
                    let permit = permit.expect("semaphore never closed");
                    // A fatal error may have been latched while we waited.
                    self.check_running()?;
                    let Some(info) = inner.order.next() else { break };
                    let permit = if info.kind == BlockKind::Priority {
                        match inner.prio_sem.clone().try_acquire_owned() {
                            Ok(p) => p,
                            Err(_) => permit,
                        }
                    } else {
                        permit
                    };
                    self.spawn_block(info, permit);
                    done += 1;
                }
            }
        }
        Ok(done)
    }

    /// Dispatches queued priority blocks while priority slots are free.
    fn dispatch_priorities(&self, max: u64) -> u64 {
        let mut n = 0;
        while n < max {
            let Ok(p) = self.inner.prio_sem.clone().try_acquire_owned() else {
                break;
            };
            match self.inner.order.next_priority() {
                Some(info) => {
                    self.spawn_block(info, p);
                    n += 1;
                }
                None => break,
            }
        }
        n
    }

    /// Migrates every pending block of the order and waits for the
    /// transfers (including blocks added to the order meanwhile).
    pub async fn migrate_all(&self) -> Result<()> {
        let t = Instant::now();
        let r = self.migrate_all_inner().await;
        let p = self.progress();
        tracing::info!(
            elapsed_ms = t.elapsed().as_millis() as u64,
            blocks = p.blocks_sent,
            bytes = p.bytes_sent,
            ok = r.is_ok(),
            "migrator: bulk pass done"
        );
        r
    }

    async fn migrate_all_inner(&self) -> Result<()> {
        loop {
            if let Err(e) = self.migrate(u64::MAX).await {
                // Let in-flight transfers wind down (they stop promptly on
                // cancel) so nothing touches the destination afterwards.
                self.wait_idle().await;
                return Err(e);
            }
            self.wait_for_completion().await?;
            if self.inner.order.pending() == 0 {
                return Ok(());
            }
        }
    }

    /// Waits until no transfer is in flight. Returns the latched error if a
    /// block failed for good, [`Error::Cancelled`] after `cancel`.
    pub async fn wait_for_completion(&self) -> Result<()> {
        self.wait_idle().await;
        self.inner.report_progress(true);
        self.check_running()
    }

    async fn wait_idle(&self) {
        loop {
            let idle = self.inner.idle.notified();
            if self.inner.active.load(Ordering::SeqCst) == 0 {
                break;
            }
            idle.await;
        }
    }

    /// Takes the source's dirty set, with the lock handler held around the
    /// snapshot. Returns `Some(blocks)` (source unlocked again) or `None`
    /// when nothing is dirty — then the source **stays locked** and the
    /// destination is up to date, provided every earlier transfer completed
    /// (call [`Migrator::wait_for_completion`] first). [`Migrator::unlock`]
    /// releases it.
    pub async fn get_latest_dirty(&self) -> Result<Option<Vec<u64>>> {
        self.check_running()?;
        let (src, lock) = {
            let h = self.inner.handlers.read();
            (h.dirty.clone(), h.lock.clone())
        };
        let src = src.ok_or_else(|| {
            Error::Invalid("get_latest_dirty needs a dirty source (set_dirty_source)".into())
        })?;
        if !self.inner.locked.swap(true, Ordering::SeqCst) {
            if let Some(lock) = lock {
                lock().await;
            }
        }
        let blocks = src.take_dirty();
        for &b in &blocks {
            self.inner.clean.clear(b);
        }
        tracing::info!(dirty = blocks.len(), "migrator: dirty snapshot");
        if blocks.is_empty() {
            return Ok(None);
        }
        self.unlock().await;
        Ok(Some(blocks))
    }

    /// Gives blocks returned by [`Migrator::get_latest_dirty`] back to the
    /// dirty source without sending them (e.g. a hook decided to wait for
    /// the next round); they come back in the next snapshot.
    pub fn requeue_dirty(&self, blocks: &[u64]) -> Result<()> {
        let src = self.inner.handlers.read().dirty.clone().ok_or_else(|| {
            Error::Invalid("requeue_dirty needs a dirty source (set_dirty_source)".into())
        })?;
        src.restore_dirty(blocks);
        Ok(())
    }

    /// Releases the lock taken by [`Migrator::get_latest_dirty`] (no-op if
    /// not locked).
    pub async fn unlock(&self) {
        if self.inner.locked.swap(false, Ordering::SeqCst) {
            let unlock = self.inner.handlers.read().unlock.clone();
            if let Some(u) = unlock {
                u().await;
            }
        }
    }

    /// Re-sends `blocks` as [`BlockKind::Dirty`] (waiting for dirty slots as
    /// needed; does not wait for the transfers). Blocks the destination does
    /// not need, and blocks already queued for a re-send that has not
    /// started reading, are skipped — the rest of the list is still sent.
    /// Returns how many were dispatched.
    pub async fn migrate_dirty(&self, blocks: &[u64]) -> Result<u64> {
        self.mark_started();
        let mut n = 0;
        for &b in blocks {
            self.check_running()?;
            if b >= self.inner.layout.num_blocks() {
                return Err(Error::Invalid(format!(
                    "dirty block {b} is outside a device of {} blocks",
                    self.inner.layout.num_blocks()
                )));
            }
            self.inner.clean.clear(b);
            if self.inner.not_needed.test(b) || !self.inner.queued.set_if_clear(b) {
                continue;
            }
            let permit = tokio::select! {
                _ = self.inner.cancel.cancelled() => {
                    self.inner.queued.clear(b);
                    return Err(cancelled());
                }
                p = self.inner.dirty_sem.clone().acquire_owned() => p.expect("semaphore never closed"),
            };
            self.spawn_block(
                BlockInfo {
                    block: b,
                    kind: BlockKind::Dirty,
                },
                permit,
            );
            n += 1;
        }
        Ok(n)
    }

    fn spawn_block(&self, info: BlockInfo, permit: OwnedSemaphorePermit) {
        self.inner.active.fetch_add(1, Ordering::SeqCst);
        // The guard releases the slot and the active count even if a user
        // callback panics inside the task, so waits never hang.
        let guard = ActiveGuard {
            inner: self.inner.clone(),
            _permit: permit,
        };
        tokio::spawn(async move {
            guard.inner.run_block(info).await;
            drop(guard);
        });
    }
}

struct ActiveGuard {
    inner: Arc<Inner>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if self.inner.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.inner.idle.notify_waiters();
        }
        if !std::thread::panicking() {
            self.inner.report_progress(false);
        }
    }
}

fn cancelled() -> Error {
    Error::Cancelled {
        op: Op::Write,
        offset: 0,
        len: 0,
    }
}

impl Inner {
    async fn run_block(&self, info: BlockInfo) {
        let b = info.block;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            // From here on a new dirty request must queue a new send: this
            // attempt's read may already miss the newer data.
            self.queued.clear(b);
            if self.not_needed.test(b) {
                return;
            }
            let started = Instant::now();
            let r = tokio::select! {
                _ = self.cancel.cancelled() => Err(cancelled()),
                r = self.copy_block(b) => r,
            };
            let ok = r.is_ok();
            let bytes = r.as_ref().copied().unwrap_or(0);
            let (observer, on_error) = {
                let h = self.handlers.read();
                (h.observer.clone(), h.error.clone())
            };
            if let Some(o) = observer {
                o(&BlockEvent {
                    block: b,
                    kind: info.kind,
                    started,
                    finished: Instant::now(),
                    bytes,
                    attempt,
                    ok,
                });
            }
            match r {
                Ok(n) => {
                    self.migrated.set(b);
                    self.clean.set(b);
                    self.blocks_sent.fetch_add(1, Ordering::Relaxed);
                    self.bytes_sent.fetch_add(n, Ordering::Relaxed);
                    return;
                }
                Err(_) if self.cancel.is_cancelled() => return,
                Err(e) => {
                    self.errors.fetch_add(1, Ordering::Relaxed);
                    if let Some(h) = on_error {
                        h(b, &e);
                    }
                    if attempt > self.cfg.max_retries {
                        tracing::warn!(block = b, error = %e, "migrator: block failed for good");
                        self.fatal.lock().get_or_insert(e);
                        // Wake a dispatcher blocked on a slot so it sees it.
                        self.prio_notify.notify_one();
                        return;
                    }
                    tracing::debug!(block = b, attempt, error = %e, "migrator: retrying block");
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        _ = tokio::time::sleep(self.cfg.retry_backoff * attempt) => {}
                    }
                }
            }
        }
    }

    /// Reads block `b` from the source and writes it to the destination,
    /// without copying: the read buffer is frozen and handed over.
    async fn copy_block(&self, b: u64) -> Result<u64> {
        let r = self.layout.block_range(b);
        let len = (r.end - r.start) as usize;
        let mut buf = self.pool.lock().pop().unwrap_or_default();
        buf.resize(len, 0);
        let buf = self.source.read_at(r.start, buf).await?;
        let data = buf.freeze();
        self.dest.write_at(r.start, data.clone()).await?;
        // Recycle the buffer if the destination kept no reference.
        if let Ok(m) = data.try_into_mut() {
            let mut pool = self.pool.lock();
            let c = self.cfg.concurrency;
            if pool.len() < c.standard + c.dirty + c.priority {
                pool.push(m);
            }
        }
        Ok(len as u64)
    }

    fn progress(&self) -> Progress {
        let elapsed = self.started.lock().map(|s| s.elapsed()).unwrap_or_default();
        let bytes = self.bytes_sent.load(Ordering::Relaxed);
        let migrated = self.migrated.count();
        let clean = self.clean.count();
        Progress {
            total_blocks: self.layout.num_blocks(),
            migrated_blocks: migrated,
            ready_blocks: clean,
            active_blocks: self.active.load(Ordering::SeqCst),
            dirty_blocks: migrated.saturating_sub(clean),
            skipped_blocks: self.skipped.load(Ordering::Relaxed),
            blocks_sent: self.blocks_sent.load(Ordering::Relaxed),
            bytes_sent: bytes,
            retries: self.retries.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            elapsed,
            bytes_per_sec: if elapsed.is_zero() {
                0.0
            } else {
                bytes as f64 / elapsed.as_secs_f64()
            },
        }
    }

    fn report_progress(&self, force: bool) {
        let Some(h) = self.handlers.read().progress.clone() else {
            return;
        };
        {
            let mut last = self.last_progress.lock();
            let now = Instant::now();
            if !force {
                if let Some(l) = *last {
                    if now.duration_since(l) < self.cfg.progress_interval {
                        return;
                    }
                }
            }
            *last = Some(now);
        }
        h(&self.progress());
    }
}
