//! Continuous sync of a tracked source to a destination — the engine behind
//! S3 sync.
//!
//! ```text
//!  application ──► DirtyTrackerLocal ──► device
//!                                          ▲
//!  Syncer ──dirty_blocks(sel)── DirtyTrackerRemote ──read──► hash ──write──► destination
//! ```
//!
//! Every [`SyncerConfig::check_period`] the syncer takes up to
//! [`SyncerConfig::limit`] dirty blocks from the tracker — blocks that have
//! settled (last write older than [`SyncerConfig::max_age`]) first, then
//! blocks written at least [`SyncerConfig::min_changed`] times — reads each
//! through the tracker (which starts tracking it again), hashes it (SHA-256)
//! and writes it to the destination, `concurrency` at a time.
//!
//! No lock is needed around a pass (Go silo locks the device on every poll):
//! the tracker's snapshot is race-free (see [`crate::dirty`]).
//!
//! # Safe blocks
//!
//! [`Syncer::safe_blocks`] lists the blocks whose current content is at the
//! destination, with its SHA-256. A block is listed only if its last upload
//! succeeded and it has not been written since that upload read it: a write
//! during an upload marks the block dirty (the upload's read had already
//! started tracking it), and dirty blocks are excluded. A failed upload
//! marks the block dirty again, so it is retried on the next pass and never
//! listed with a stale hash. Taking a pass's blocks and dropping them from
//! the safe map happen under one lock, so a query never sees a block that is
//! neither dirty nor up to date.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use crate::block::BlockLayout;
use crate::dirty::{DirtySelect, DirtyTrackerRemote};
use crate::error::{Error, Result};
use crate::migrator::CancelToken;
use crate::provider::{DynProvider, Provider};

/// Configuration of a [`Syncer`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SyncerConfig {
    /// Time between two dirty checks.
    pub check_period: Duration,
    /// Blocks not written for this long are uploaded first.
    pub max_age: Duration,
    /// Younger blocks are uploaded only after this many writes.
    pub min_changed: u32,
    /// At most this many blocks per pass.
    pub limit: usize,
    /// Uploads in flight at once.
    pub concurrency: usize,
}

impl Default for SyncerConfig {
    fn default() -> Self {
        SyncerConfig {
            check_period: Duration::from_secs(1),
            max_age: Duration::from_secs(1),
            min_changed: 4,
            limit: 1024,
            concurrency: 16,
        }
    }
}

impl SyncerConfig {
    /// Sets the check period.
    pub fn with_check_period(mut self, d: Duration) -> Self {
        self.check_period = d;
        self
    }
    /// Sets the max-age and min-changed thresholds.
    pub fn with_thresholds(mut self, max_age: Duration, min_changed: u32) -> Self {
        self.max_age = max_age;
        self.min_changed = min_changed;
        self
    }
    /// Sets the per-pass limit and the concurrency.
    pub fn with_limits(mut self, limit: usize, concurrency: usize) -> Self {
        self.limit = limit;
        self.concurrency = concurrency;
        self
    }
}

/// Outcome of one pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SyncPass {
    /// Blocks taken from the tracker.
    pub blocks: u64,
    /// Blocks uploaded successfully.
    pub uploaded: u64,
    /// Blocks whose upload failed (marked dirty again).
    pub failed: u64,
}

/// Counters of a syncer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SyncerMetrics {
    /// Passes run.
    pub passes: u64,
    /// Blocks uploaded.
    pub uploaded_blocks: u64,
    /// Bytes uploaded.
    pub uploaded_bytes: u64,
    /// Failed uploads.
    pub failed_uploads: u64,
}

struct Inner {
    tracker: DirtyTrackerRemote,
    dest: DynProvider,
    layout: BlockLayout,
    cfg: SyncerConfig,
    safe: Mutex<HashMap<u64, [u8; 32]>>,
    /// Serialises passes (background loop and explicit calls).
    pass_lock: tokio::sync::Mutex<()>,
    passes: AtomicU64,
    uploaded: AtomicU64,
    bytes: AtomicU64,
    failed: AtomicU64,
}

/// The background loop: its stop signal and task.
type Running = (CancelToken, tokio::task::JoinHandle<()>);

/// Continuous one-way sync of a tracked device. Cheap to clone (shared).
#[derive(Clone)]
pub struct Syncer {
    inner: Arc<Inner>,
    task: Arc<Mutex<Option<Running>>>,
}

impl std::fmt::Debug for Syncer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Syncer")
            .field("layout", &self.inner.layout)
            .field("running", &self.is_running())
            .finish()
    }
}

impl Syncer {
    /// A syncer reading `tracker` (the remote side of the device's dirty
    /// tracker) and writing `dest` (same size). The tracker keeps write
    /// statistics from now on ([`DirtyTrackerRemote::keep_write_stats`]),
    /// for the `max_age` and `min_changed` rules; call that when the
    /// tracker is built if the syncer comes later and earlier writes should
    /// count.
    pub fn new(tracker: DirtyTrackerRemote, dest: DynProvider, cfg: SyncerConfig) -> Result<Self> {
        let layout = tracker.layout();
        if dest.size() != layout.size() {
            return Err(Error::Invalid(format!(
                "source has {} bytes but destination {}",
                layout.size(),
                dest.size()
            )));
        }
        if cfg.concurrency == 0 || cfg.limit == 0 {
            return Err(Error::Invalid(
                "syncer concurrency and limit must be at least 1".into(),
            ));
        }
        tracker.keep_write_stats();
        Ok(Syncer {
            inner: Arc::new(Inner {
                tracker,
                dest,
                layout,
                cfg,
                safe: Mutex::new(HashMap::new()),
                pass_lock: tokio::sync::Mutex::new(()),
                passes: AtomicU64::new(0),
                uploaded: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
                failed: AtomicU64::new(0),
            }),
            task: Arc::new(Mutex::new(None)),
        })
    }

    /// Schedules every block for upload (sync everything first).
    pub fn mark_all_dirty(&self) {
        self.inner.tracker.mark_dirty(0, self.inner.layout.size());
    }

    /// Treats the destination as already equal to the source (only later
    /// writes are uploaded): tracks every block. No hashes are known for
    /// these blocks, so they are not listed by `safe_blocks` until uploaded.
    pub fn assume_synced(&self) {
        self.inner.tracker.track_at(0, self.inner.layout.size());
    }

    /// Runs one pass with the configured selection rules.
    pub async fn sync_pass(&self) -> Result<SyncPass> {
        let c = &self.inner.cfg;
        self.pass(DirtySelect {
            max_age: c.max_age,
            limit: c.limit,
            min_changed: c.min_changed,
        })
        .await
    }

    /// Runs passes taking every dirty block until none is left or
    /// `max_passes` ran; returns the number of dirty blocks left. With the
    /// writers paused, 0 means the destination equals the source.
    pub async fn sync_all(&self, max_passes: usize) -> Result<u64> {
        for _ in 0..max_passes {
            if self.inner.tracker.dirty_count() == 0 {
                break;
            }
            self.pass(DirtySelect {
                max_age: Duration::ZERO,
                limit: usize::MAX,
                min_changed: 0,
            })
            .await?;
        }
        Ok(self.inner.tracker.dirty_count())
    }

    async fn pass(&self, sel: DirtySelect) -> Result<SyncPass> {
        let _g = self.inner.pass_lock.lock().await;
        let inner = &self.inner;
        inner.passes.fetch_add(1, Ordering::Relaxed);
        let blocks = {
            let mut safe = inner.safe.lock();
            let blocks = inner.tracker.dirty_blocks(sel);
            for b in &blocks {
                safe.remove(b);
            }
            blocks
        };
        let mut out = SyncPass {
            blocks: blocks.len() as u64,
            ..SyncPass::default()
        };
        if blocks.is_empty() {
            return Ok(out);
        }
        tracing::debug!(blocks = blocks.len(), "syncer pass");
        // If this future is dropped mid-pass (stop), blocks not uploaded yet
        // must not be forgotten: the guard marks them dirty again.
        let pending = PendingGuard {
            tracker: &inner.tracker,
            left: Mutex::new(blocks.iter().copied().collect()),
        };
        let mut results = futures::stream::iter(blocks.iter().copied())
            .map(|b| async move { (b, inner.upload(b).await) })
            .buffer_unordered(inner.cfg.concurrency);
        while let Some((b, r)) = results.next().await {
            pending.left.lock().remove(&b);
            match r {
                Ok(()) => out.uploaded += 1,
                Err(e) => {
                    tracing::debug!(block = b, error = %e, "syncer: upload failed");
                    inner.failed.fetch_add(1, Ordering::Relaxed);
                    inner.tracker.mark_block_dirty(b);
                    out.failed += 1;
                }
            }
        }
        Ok(out)
    }

    /// Starts the background loop (one pass per check period). Fails if it
    /// is already running; `stop` then `start` restarts it.
    pub fn start(&self) -> Result<()> {
        let mut t = self.task.lock();
        if t.as_ref().is_some_and(|(_, h)| !h.is_finished()) {
            return Err(Error::Invalid("syncer already running".into()));
        }
        let cancel = CancelToken::new();
        let me = self.clone();
        let c2 = cancel.clone();
        let period = self.inner.cfg.check_period;
        let h = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = c2.cancelled() => return,
                    _ = tokio::time::sleep(period) => {}
                }
                tokio::select! {
                    _ = c2.cancelled() => return,
                    r = me.sync_pass() => {
                        if let Err(e) = r {
                            tracing::warn!(error = %e, "syncer pass failed");
                        }
                    }
                }
            }
        });
        *t = Some((cancel, h));
        Ok(())
    }

    /// Stops the background loop (an interrupted pass re-marks its blocks
    /// dirty) and waits for it to end.
    pub async fn stop(&self) {
        let t = self.task.lock().take();
        if let Some((c, h)) = t {
            c.cancel();
            let _ = h.await;
        }
    }

    /// Whether the background loop runs.
    pub fn is_running(&self) -> bool {
        self.task
            .lock()
            .as_ref()
            .is_some_and(|(_, h)| !h.is_finished())
    }

    /// Blocks whose current content is safely at the destination, with its
    /// SHA-256, ascending.
    pub fn safe_blocks(&self) -> Vec<(u64, [u8; 32])> {
        let safe = self.inner.safe.lock();
        let mut v: Vec<_> = safe
            .iter()
            .filter(|(b, _)| !self.inner.tracker.is_dirty(**b))
            .map(|(b, h)| (*b, *h))
            .collect();
        v.sort_unstable_by_key(|x| x.0);
        v
    }

    /// Current counters.
    pub fn metrics(&self) -> SyncerMetrics {
        SyncerMetrics {
            passes: self.inner.passes.load(Ordering::Relaxed),
            uploaded_blocks: self.inner.uploaded.load(Ordering::Relaxed),
            uploaded_bytes: self.inner.bytes.load(Ordering::Relaxed),
            failed_uploads: self.inner.failed.load(Ordering::Relaxed),
        }
    }
}

struct PendingGuard<'a> {
    tracker: &'a DirtyTrackerRemote,
    left: Mutex<std::collections::HashSet<u64>>,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        for &b in self.left.lock().iter() {
            self.tracker.mark_block_dirty(b);
        }
    }
}

impl Inner {
    async fn upload(&self, b: u64) -> Result<()> {
        let r = self.layout.block_range(b);
        let len = (r.end - r.start) as usize;
        let data = self
            .tracker
            .read_at(r.start, bytes::BytesMut::zeroed(len))
            .await?
            .freeze();
        let hash: [u8; 32] = Sha256::digest(&data).into();
        self.dest.write_at(r.start, data).await?;
        self.uploaded.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(len as u64, Ordering::Relaxed);
        let mut safe = self.safe.lock();
        if !self.tracker.is_dirty(b) {
            safe.insert(b, hash);
        }
        Ok(())
    }
}
