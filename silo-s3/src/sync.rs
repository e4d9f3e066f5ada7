//! [`S3Sync`]: continuous sync of a device to S3 (the `sync { … }` schema
//! block), built on [`silo_storage::syncer::Syncer`].
//!
//! ```text
//!  app ──► DirtyTrackerLocal ──► device
//!                                  ▲ read (starts tracking)
//!  Syncer pass ── DirtyTrackerRemote ──► SyncTarget ──PUT──► S3 blocks/<b>
//!                                           │
//!                                  stored: block → SHA-256 ──► hashes.bin
//! ```
//!
//! # What "safely stored" means
//!
//! `stored` is what the bucket holds: an entry `(b, h)` is added only after
//! the PUT (or DELETE, for an all-zero block) of content with hash `h`
//! succeeded, and removed *before* a new upload of `b` starts. The persisted
//! index (`hashes.bin`) is always a subset of it: entries are added to the
//! object only after their upload, and a block that has an entry in the
//! object is removed from the object (one index PUT per pass, before the
//! pass) before it is overwritten. So neither the live view nor the object
//! ever claims content that is not in the bucket — also after a crash.
//!
//! [`S3Sync::safe_blocks`] = `stored` minus blocks dirty on the device: the
//! blocks whose S3 copy equals the device's current content. It is exact
//! once the sync is stopped ([`S3Sync::stop`] returns it); while a pass runs
//! a block being re-uploaded may still be listed with its previous (stored)
//! hash, so a migration must take the list from `stop` (or check the hash
//! against the device, as the migration source does anyway).
//!
//! # Resume
//!
//! On creation the sync loads `hashes.bin`, reads every block of the device
//! through the dirty tracker (which starts tracking it) and keeps the index
//! entries whose hash equals the device's content: those blocks are not
//! uploaded again. The others are scheduled (or, with `only_dirty`, just
//! dropped from the index).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use parking_lot::Mutex;
use silo_storage::dirty::DirtyTrackerRemote;
use silo_storage::syncer::{SyncPass, Syncer, SyncerConfig};
use silo_storage::{BlockLayout, Capabilities, Error, Provider};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::error::{Result, S3Error};
use crate::grab::SafeBlock;
use crate::hashindex::{sha256, HashIndex};
use crate::metrics::S3MetricsSnapshot;
use crate::provider::{is_zero, S3Storage};

/// Settings of a continuous sync (the `sync { config { … } }` block of a
/// device schema, plus `autostart`).
#[derive(Debug, Clone, PartialEq)]
pub struct SyncSettings {
    /// Treat the bucket as already holding the device: only blocks written
    /// after start are uploaded (no initial full copy). Index entries that
    /// do not match the device are dropped.
    pub only_dirty: bool,
    /// Block grouping: one S3 object holds `2^block_shift` device blocks.
    /// The dirty tracker and the S3 device must use
    /// [`SyncSettings::sync_block_size`] as their block size.
    pub block_shift: u32,
    /// Blocks not written for this long are uploaded first.
    pub max_age: Duration,
    /// Blocks written more recently are uploaded once they have been
    /// written this many times (Go silo counts changed sub-blocks; we count
    /// writes to the object-sized block).
    pub min_changed: u32,
    /// Time between two dirty checks.
    pub check_period: Duration,
    /// At most this many blocks per pass.
    pub limit: usize,
    /// Uploads in flight at once.
    pub concurrency: usize,
    /// Start syncing as soon as the sync is built.
    pub autostart: bool,
    /// The hash index is written at most this often while running (and
    /// always on stop).
    pub index_save_period: Duration,
}

impl Default for SyncSettings {
    fn default() -> Self {
        SyncSettings {
            only_dirty: false,
            block_shift: 0,
            max_age: Duration::from_secs(1),
            min_changed: 4,
            check_period: Duration::from_secs(1),
            limit: 1024,
            concurrency: 16,
            autostart: false,
            index_save_period: Duration::from_secs(10),
        }
    }
}

impl SyncSettings {
    /// Size of one synced block (= S3 object) for a device block size.
    pub fn sync_block_size(&self, device_block_size: u64) -> Result<u64> {
        device_block_size
            .checked_shl(self.block_shift)
            .filter(|s| *s <= (1 << 30) && s >> self.block_shift == device_block_size)
            .ok_or_else(|| {
                S3Error::Config(format!(
                    "block size {device_block_size} << block_shift {} is too large",
                    self.block_shift
                ))
            })
    }

    fn syncer_config(&self) -> SyncerConfig {
        SyncerConfig::default()
            .with_check_period(self.check_period)
            .with_thresholds(self.max_age, self.min_changed)
            .with_limits(self.limit, self.concurrency)
    }
}

/// Counters and gauges of a sync.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct S3SyncMetrics {
    /// Blocks of the device.
    pub total_blocks: u64,
    /// Blocks whose S3 copy equals the device now.
    pub safe_blocks: u64,
    /// Blocks waiting to be uploaded.
    pub dirty_blocks: u64,
    /// Passes run.
    pub passes: u64,
    /// Blocks uploaded.
    pub uploaded_blocks: u64,
    /// Bytes uploaded.
    pub uploaded_bytes: u64,
    /// Failed uploads (retried on a later pass).
    pub failed_uploads: u64,
    /// Blocks found already stored at start (not uploaded again).
    pub resumed_blocks: u64,
    /// Index entries dropped at start because the device differs.
    pub resume_mismatches: u64,
    /// Hash index writes.
    pub index_saves: u64,
    /// Failed hash index writes.
    pub index_save_errors: u64,
    /// How long the device has had un-synced writes (zero when everything
    /// is synced).
    pub lag: Duration,
    /// Requests of the S3 device.
    pub s3: S3MetricsSnapshot,
}

struct State {
    /// What the bucket holds (see module docs).
    stored: HashIndex,
    /// Blocks listed in the `hashes.bin` object as last written.
    persisted: HashIndex,
    /// A write of the object failed: it may hold `persisted` or what we
    /// tried to write, so the next save must not be skipped.
    persisted_unknown: bool,
    last_save: Option<Instant>,
}

struct Shared {
    s3: Arc<S3Storage>,
    tracker: DirtyTrackerRemote,
    layout: BlockLayout,
    state: Mutex<State>,
    /// Serialises index writes.
    save_gate: tokio::sync::Mutex<()>,
    /// Serialises passes of the loop with `sync_now`/`sync_all`: the
    /// engine's `Syncer::sync_all` stops as soon as nothing is dirty, which
    /// is also true while another pass still uploads the blocks it took.
    pass_gate: tokio::sync::Mutex<()>,
    settings: SyncSettings,
    resumed: u64,
    resume_mismatches: u64,
    index_saves: AtomicU64,
    index_save_errors: AtomicU64,
    /// When the device was last seen with nothing dirty.
    clean_at: Mutex<Option<Instant>>,
}

impl Shared {
    /// Writes the hash index as `stored` is now (minus `exclude`), if it
    /// differs from the persisted one.
    async fn save_index(&self, exclude: &[u64]) -> Result<()> {
        let _g = self.save_gate.lock().await;
        let snapshot = {
            let st = self.state.lock();
            let mut snap = st.stored.clone();
            for b in exclude {
                snap.remove(*b);
            }
            if snap == st.persisted && !st.persisted_unknown {
                return Ok(());
            }
            snap
        };
        match snapshot.save(self.s3.block_store()).await {
            Ok(()) => {
                self.index_saves.fetch_add(1, Ordering::Relaxed);
                let mut st = self.state.lock();
                st.persisted = snapshot;
                st.persisted_unknown = false;
                st.last_save = Some(Instant::now());
                Ok(())
            }
            Err(e) => {
                self.index_save_errors.fetch_add(1, Ordering::Relaxed);
                // The object is now unknown: assume it lists what we last
                // wrote *and* what we tried to write (overwrites of either
                // go through save-before-overwrite), and save again next time.
                let mut st = self.state.lock();
                for (b, h) in snapshot.iter() {
                    st.persisted.set(b, *h);
                }
                st.persisted_unknown = true;
                Err(e)
            }
        }
    }

    /// Before a pass: drop the dirty blocks from the persisted index in one
    /// write, so the pass can overwrite them.
    async fn invalidate_dirty(&self) -> Result<()> {
        let dirty: Vec<u64> = {
            let st = self.state.lock();
            st.persisted
                .iter()
                .map(|(b, _)| b)
                .filter(|b| self.tracker.is_dirty(*b))
                .collect()
        };
        if dirty.is_empty() {
            return Ok(());
        }
        self.save_index(&dirty).await
    }

    /// Called by [`SyncTarget`] before block `b` is overwritten in S3.
    async fn before_overwrite(&self, b: u64) -> Result<()> {
        let needs_save = {
            let mut st = self.state.lock();
            st.stored.remove(b);
            st.persisted.get(b).is_some()
        };
        if needs_save {
            // `stored` no longer has `b` (nor any other block being
            // uploaded), so the snapshot written here does not either.
            self.save_index(&[]).await?;
            if self.state.lock().persisted.get(b).is_some() {
                return Err(S3Error::Config(format!(
                    "block {b} is still listed in the hash index"
                )));
            }
        }
        Ok(())
    }

    fn safe_blocks(&self) -> Vec<SafeBlock> {
        let st = self.state.lock();
        st.stored
            .iter()
            .filter(|(b, _)| !self.tracker.is_dirty(*b))
            .map(|(block, hash)| SafeBlock { block, hash: *hash })
            .collect()
    }

    fn note_clean(&self) {
        let mut c = self.clean_at.lock();
        if self.tracker.dirty_count() == 0 || c.is_none() {
            *c = Some(Instant::now());
        }
    }
}

/// The syncer's destination: full-block uploads into the S3 device that
/// keep the `stored` bookkeeping exact.
struct SyncTarget {
    shared: Arc<Shared>,
}

impl SyncTarget {
    fn invalidate(&self, offset: u64, len: u64) {
        let mut st = self.shared.state.lock();
        for b in self.shared.layout.blocks_touching(offset, len) {
            st.stored.remove(b);
        }
    }
}

#[async_trait]
impl Provider for SyncTarget {
    fn size(&self) -> u64 {
        self.shared.layout.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.shared.s3.capabilities()
    }
    async fn read_at(&self, offset: u64, buf: BytesMut) -> silo_storage::Result<BytesMut> {
        self.shared.s3.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: Bytes) -> silo_storage::Result<()> {
        let l = self.shared.layout;
        let b = offset / l.block_size();
        let whole_block = offset % l.block_size() == 0 && data.len() as u64 == l.block_len(b);
        if !whole_block {
            // Not what the syncer does; keep the bookkeeping right anyway.
            self.invalidate(offset, data.len() as u64);
            return self.shared.s3.write_at(offset, data).await;
        }
        self.shared.before_overwrite(b).await?;
        let hash = sha256(&data);
        let zero = is_zero(&data);
        self.shared.s3.write_at(offset, data).await?;
        debug!(block = b, zero, "synced block");
        self.shared.state.lock().stored.set(b, hash);
        Ok(())
    }
    async fn flush(&self) -> silo_storage::Result<()> {
        self.shared.s3.flush().await
    }
    async fn trim(&self, offset: u64, len: u64) -> silo_storage::Result<()> {
        self.invalidate(offset, len);
        self.shared.s3.trim(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> silo_storage::Result<()> {
        self.invalidate(offset, len);
        self.shared.s3.write_zeroes(offset, len).await
    }
    fn cancel_writes(&self, offset: u64, len: u64) {
        self.shared.s3.cancel_writes(offset, len)
    }
    async fn close(&self) -> silo_storage::Result<()> {
        Ok(())
    }
}

type Running = (CancellationToken, tokio::task::JoinHandle<()>);

/// Continuous sync of a device to S3. See the [module docs](self).
pub struct S3Sync {
    shared: Arc<Shared>,
    syncer: Syncer,
    task: Mutex<Option<Running>>,
}

impl std::fmt::Debug for S3Sync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Sync")
            .field("s3", &self.shared.s3)
            .field("running", &self.is_running())
            .finish()
    }
}

impl S3Sync {
    /// Builds a sync of the device behind `tracker` (the remote side of its
    /// dirty tracker) into `s3`, resuming from the bucket's hash index. The
    /// tracker's block size must equal the S3 device's (a mismatch is an
    /// error here, not silently useless hashes later). Starts at once if
    /// `settings.autostart`.
    pub async fn new(
        tracker: DirtyTrackerRemote,
        s3: Arc<S3Storage>,
        settings: SyncSettings,
    ) -> Result<Self> {
        let layout = tracker.layout();
        if layout != s3.layout() {
            return Err(S3Error::Config(format!(
                "the device ({} bytes, {}-byte blocks) and its S3 copy ({} bytes, {}-byte blocks) \
                 differ: block sizes of the sync and the device must agree",
                layout.size(),
                layout.block_size(),
                s3.layout().size(),
                s3.layout().block_size()
            )));
        }
        if settings.concurrency == 0 || settings.limit == 0 {
            return Err(S3Error::Config(
                "sync concurrency and limit must be at least 1".into(),
            ));
        }
        let index = HashIndex::load(s3.block_store()).await?;
        let (stored, resumed, mismatches) =
            resume(&tracker, &index, settings.concurrency, settings.only_dirty).await?;
        info!(location = %s3.block_store().location(), resumed, mismatches,
              only_dirty = settings.only_dirty, "S3 sync ready");
        let shared = Arc::new(Shared {
            s3,
            tracker: tracker.clone(),
            layout,
            state: Mutex::new(State {
                stored,
                persisted: index,
                persisted_unknown: false,
                last_save: None,
            }),
            save_gate: tokio::sync::Mutex::new(()),
            pass_gate: tokio::sync::Mutex::new(()),
            settings: settings.clone(),
            resumed,
            resume_mismatches: mismatches,
            index_saves: AtomicU64::new(0),
            index_save_errors: AtomicU64::new(0),
            clean_at: Mutex::new(None),
        });
        let target: silo_storage::DynProvider = Arc::new(SyncTarget {
            shared: shared.clone(),
        });
        let syncer = Syncer::new(tracker, target, settings.syncer_config())?;
        shared.note_clean();
        let sync = S3Sync {
            shared,
            syncer,
            task: Mutex::new(None),
        };
        if settings.autostart {
            sync.start()?;
        }
        Ok(sync)
    }

    /// Starts the background loop (a pass every `check_period`). Fails if it
    /// is already running; after [`S3Sync::stop`] it can be started again.
    pub fn start(&self) -> Result<()> {
        let mut t = self.task.lock();
        if t.as_ref().is_some_and(|(_, h)| !h.is_finished()) {
            return Err(S3Error::Config("the S3 sync is already running".into()));
        }
        let cancel = CancellationToken::new();
        let c2 = cancel.clone();
        let shared = self.shared.clone();
        let syncer = self.syncer.clone();
        let h = tokio::spawn(async move {
            let period = shared.settings.check_period;
            loop {
                tokio::select! {
                    _ = c2.cancelled() => return,
                    _ = tokio::time::sleep(period) => {}
                }
                tokio::select! {
                    _ = c2.cancelled() => return,
                    r = run_pass(&shared, &syncer) => {
                        if let Err(e) = r {
                            warn!(error = %e, "S3 sync pass failed; retrying next period");
                        }
                    }
                }
            }
        });
        *t = Some((cancel, h));
        Ok(())
    }

    /// Stops the loop (an interrupted pass aborts its uploads and leaves
    /// their blocks dirty), writes the hash index and returns the blocks
    /// whose S3 copy equals the device — exact, for a migration's
    /// alternate sources. The list is returned even if the index write
    /// failed (the failure is logged and counted).
    pub async fn stop(&self) -> Vec<SafeBlock> {
        let t = self.task.lock().take();
        if let Some((c, h)) = t {
            c.cancel();
            let _ = h.await;
        }
        if let Err(e) = self.shared.save_index(&[]).await {
            warn!(error = %e, "could not write the hash index at stop");
        }
        self.shared.safe_blocks()
    }

    /// Whether the background loop runs.
    pub fn is_running(&self) -> bool {
        self.task
            .lock()
            .as_ref()
            .is_some_and(|(_, h)| !h.is_finished())
    }

    /// Runs one pass now (with the configured selection rules).
    pub async fn sync_now(&self) -> Result<SyncPass> {
        run_pass(&self.shared, &self.syncer).await
    }

    /// Uploads every dirty block (up to `max_passes` passes) and writes the
    /// index; returns the number of blocks still dirty.
    pub async fn sync_all(&self, max_passes: usize) -> Result<u64> {
        let _pass = self.shared.pass_gate.lock().await;
        self.shared.invalidate_dirty().await?;
        let left = self.syncer.sync_all(max_passes).await?;
        self.shared.note_clean();
        self.shared.save_index(&[]).await?;
        Ok(left)
    }

    /// Blocks whose S3 copy equals the device's content (see the module
    /// docs for the guarantee while running).
    pub fn safe_blocks(&self) -> Vec<SafeBlock> {
        self.shared.safe_blocks()
    }

    /// Writes the hash index now.
    pub async fn save_index(&self) -> Result<()> {
        self.shared.save_index(&[]).await
    }

    /// The S3 device.
    pub fn storage(&self) -> &Arc<S3Storage> {
        &self.shared.s3
    }

    /// The engine's syncer (for its own counters).
    pub fn syncer(&self) -> &Syncer {
        &self.syncer
    }

    /// Progress and lag.
    pub fn metrics(&self) -> S3SyncMetrics {
        let s = &self.shared;
        let m = self.syncer.metrics();
        let dirty = s.tracker.dirty_count();
        let lag = if dirty == 0 {
            Duration::ZERO
        } else {
            s.clean_at.lock().map(|t| t.elapsed()).unwrap_or_default()
        };
        S3SyncMetrics {
            total_blocks: s.layout.num_blocks(),
            safe_blocks: s.safe_blocks().len() as u64,
            dirty_blocks: dirty,
            passes: m.passes,
            uploaded_blocks: m.uploaded_blocks,
            uploaded_bytes: m.uploaded_bytes,
            failed_uploads: m.failed_uploads,
            resumed_blocks: s.resumed,
            resume_mismatches: s.resume_mismatches,
            index_saves: s.index_saves.load(Ordering::Relaxed),
            index_save_errors: s.index_save_errors.load(Ordering::Relaxed),
            lag,
            s3: s.s3.metrics().snapshot(),
        }
    }
}

impl Drop for S3Sync {
    fn drop(&mut self) {
        if let Some((c, h)) = self.task.lock().take() {
            c.cancel();
            h.abort();
        }
    }
}

async fn run_pass(shared: &Arc<Shared>, syncer: &Syncer) -> Result<SyncPass> {
    let _pass = shared.pass_gate.lock().await;
    // Save-before-overwrite, batched: one index write for all dirty blocks
    // that the object lists. If it fails, uploads of listed blocks fail in
    // `before_overwrite` and stay dirty.
    if let Err(e) = shared.invalidate_dirty().await {
        warn!(error = %e, "could not update the hash index before a pass");
    }
    let pass = syncer.sync_pass().await?;
    shared.note_clean();
    let due = shared
        .state
        .lock()
        .last_save
        .map_or(true, |t| t.elapsed() >= shared.settings.index_save_period);
    if due {
        shared.save_index(&[]).await?;
    }
    if pass.failed > 0 {
        return Err(S3Error::SyncIncomplete {
            failed: pass.failed,
            blocks: pass.blocks,
        });
    }
    Ok(pass)
}

/// Reads every block that the index lists through the tracker (which
/// starts tracking it: a later write marks it dirty) and keeps the entries
/// that match the device. Then every other block is scheduled for upload
/// (initial copy), or, with `only_dirty`, just tracked. Returns the
/// `stored` index and the counts of kept and dropped entries.
async fn resume(
    tracker: &DirtyTrackerRemote,
    index: &HashIndex,
    concurrency: usize,
    only_dirty: bool,
) -> Result<(HashIndex, u64, u64)> {
    let layout = tracker.layout();
    let mut stored = HashIndex::new(layout);
    let mut dropped = 0u64;
    // Owned entries: a stream over a borrowing iterator with a closure makes
    // this future's `Send` unprovable for callers (higher-ranked lifetimes).
    let entries: Vec<(u64, [u8; 32])> = index.iter().map(|(b, h)| (b, *h)).collect();
    let mut hashes = futures::stream::iter(entries)
        .map(|(b, want)| async move {
            let r = layout.block_range(b);
            let data = tracker
                .read_at(r.start, BytesMut::zeroed((r.end - r.start) as usize))
                .await?;
            Ok::<_, Error>((b, want, sha256(&data)))
        })
        .buffer_unordered(concurrency);
    while let Some(r) = hashes.next().await {
        let (b, want, local) = r?;
        if want == local {
            stored.set(b, local);
        } else {
            dropped += 1;
        }
    }
    drop(hashes);
    if only_dirty {
        // Everything counts as synced: track it all, so writes mark dirty.
        tracker.track_at(0, layout.size());
    } else {
        for b in 0..layout.num_blocks() {
            if stored.get(b).is_none() {
                tracker.mark_block_dirty(b);
            }
        }
    }
    Ok((stored.clone(), stored.len() as u64, dropped))
}
