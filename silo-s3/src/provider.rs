//! [`S3Storage`]: a [`Provider`] whose blocks are S3 objects.
//!
//! * A request is split per block; the blocks of one request run
//!   concurrently (at most `concurrency` S3 requests in flight for the whole
//!   device, so memory stays bounded by concurrency × block size).
//! * Never-written (or trimmed) blocks read as zeroes — also whole middle
//!   blocks: the caller's buffer is always overwritten.
//! * A write covering a whole block is one PUT (or one DELETE when the block
//!   is all zeroes); a partial-block write is GET, merge, PUT under that
//!   block's lock, so two partial writes to one block never lose each other.
//!   The trailing partial block of a device whose size is not a multiple of
//!   the block size is stored at its real length.
//! * `cancel_writes(range)` aborts in-flight uploads overlapping the range;
//!   their `write_at` fails with [`Error::Cancelled`] and the block then
//!   holds either its old or its new content.
//! * `flush` is immediate: a write returns only once S3 acknowledged the PUT.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use parking_lot::Mutex;
use silo_storage::{check_range, BlockLayout, Capabilities, Error, Op, Provider};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::config::S3Config;
use crate::error::{Result as S3Result, S3Error};
use crate::manifest::Manifest;
use crate::metrics::S3Metrics;
use crate::store::BlockStore;

/// Number of lock stripes for read-merge-write (memory is independent of
/// the device size; two blocks sharing a stripe merely serialise).
const LOCK_STRIPES: usize = 1024;

/// Trims and zero writes covering at least this many whole blocks list the
/// existing objects instead of deleting every block.
const SPARSE_ZERO_MIN_BLOCKS: u64 = 4;

/// How [`S3Storage::open_with`] treats the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OpenMode {
    /// Create the manifest; fail if one already exists.
    Create,
    /// The manifest must exist and match the configuration.
    Open,
    /// Open if a manifest exists (it must match), create it otherwise.
    OpenOrCreate,
}

struct InflightWrite {
    start: u64,
    end: u64,
    token: CancellationToken,
}

/// A device stored as one S3 object per block. See the [module docs](self).
pub struct S3Storage {
    store: BlockStore,
    layout: BlockLayout,
    concurrency: usize,
    locks: Box<[tokio::sync::Mutex<()>]>,
    writes: Mutex<Vec<(u64, InflightWrite)>>,
    next_write: AtomicU64,
    closed: AtomicBool,
    gate: tokio::sync::RwLock<()>,
}

impl std::fmt::Debug for S3Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Storage")
            .field("store", &self.store)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

/// Removes a registered in-flight write on drop (also when cancelled).
struct WriteRegistration<'a> {
    owner: &'a S3Storage,
    id: u64,
    token: CancellationToken,
}

impl Drop for WriteRegistration<'_> {
    fn drop(&mut self) {
        self.owner.writes.lock().retain(|(id, _)| *id != self.id);
    }
}

impl S3Storage {
    /// Opens the device described by `config`, creating its manifest if
    /// there is none ([`OpenMode::OpenOrCreate`]). Wrong credentials fail
    /// here with [`S3Error::Authentication`].
    pub async fn open_or_create(config: &S3Config) -> S3Result<Self> {
        Self::open_with(config, OpenMode::OpenOrCreate).await
    }

    /// Opens an existing device; its manifest must match `config`.
    pub async fn open(config: &S3Config) -> S3Result<Self> {
        Self::open_with(config, OpenMode::Open).await
    }

    /// Creates a new device; fails if a manifest already exists.
    pub async fn create(config: &S3Config) -> S3Result<Self> {
        Self::open_with(config, OpenMode::Create).await
    }

    /// Opens or creates according to `mode`.
    pub async fn open_with(config: &S3Config, mode: OpenMode) -> S3Result<Self> {
        let store = BlockStore::from_config(config)?;
        Self::from_store(store, mode).await
    }

    /// Opens or creates on an existing object layer (any `object_store`
    /// backend; the concurrency limit is the store's).
    pub async fn from_store(store: BlockStore, mode: OpenMode) -> S3Result<Self> {
        let layout = store.layout();
        let key = store.keys().manifest().to_string();
        store.probe().await?;
        let existing = store.read_manifest().await?;
        match (existing, mode) {
            (Some(m), OpenMode::Open | OpenMode::OpenOrCreate) => {
                m.check(&key, layout.size(), layout.block_size())?
            }
            (Some(m), OpenMode::Create) => {
                // Refuse to hand out a "new" device over someone else's data.
                m.check(&key, layout.size(), layout.block_size())?;
                return Err(S3Error::Config(format!(
                    "a silo device already exists at `{key}` (use open instead of create)"
                )));
            }
            (None, OpenMode::Open) => return Err(S3Error::ManifestMissing { key }),
            (None, OpenMode::Create | OpenMode::OpenOrCreate) => {
                store
                    .write_manifest(&Manifest::new(layout.size(), layout.block_size()))
                    .await?;
                info!(location = %store.location(), size = layout.size(),
                      block_size = layout.block_size(), "created S3 device");
            }
        }
        let mut locks = Vec::with_capacity(LOCK_STRIPES);
        locks.resize_with(LOCK_STRIPES, || tokio::sync::Mutex::new(()));
        let concurrency = store.concurrency();
        Ok(S3Storage {
            store,
            layout,
            concurrency,
            locks: locks.into_boxed_slice(),
            writes: Mutex::new(Vec::new()),
            next_write: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            gate: tokio::sync::RwLock::new(()),
        })
    }

    /// The object layer (for listing, hash index, grab).
    pub fn block_store(&self) -> &BlockStore {
        &self.store
    }

    /// Request counters.
    pub fn metrics(&self) -> &Arc<S3Metrics> {
        self.store.metrics()
    }

    /// Geometry.
    pub fn layout(&self) -> BlockLayout {
        self.layout
    }

    fn lock_of(&self, b: u64) -> &tokio::sync::Mutex<()> {
        &self.locks[(b % LOCK_STRIPES as u64) as usize]
    }

    async fn enter(&self, op: Op) -> Result<tokio::sync::RwLockReadGuard<'_, ()>, Error> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed { op });
        }
        let g = self.gate.read().await;
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed { op });
        }
        Ok(g)
    }

    fn register_write(&self, offset: u64, len: u64) -> WriteRegistration<'_> {
        let id = self.next_write.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        self.writes.lock().push((
            id,
            InflightWrite {
                start: offset,
                end: offset + len,
                token: token.clone(),
            },
        ));
        WriteRegistration {
            owner: self,
            id,
            token,
        }
    }

    /// Writes `data` into block `b` at `at` (relative to the block start).
    /// `None` data means zeroes.
    async fn write_block(&self, b: u64, at: u64, data: Option<Bytes>, len: u64) -> S3Result<()> {
        let block_len = self.layout.block_len(b);
        let _lock = self.lock_of(b).lock().await;
        if at == 0 && len == block_len {
            return match data {
                Some(d) if !is_zero(&d) => self.store.put_block(b, d).await,
                _ => self.store.delete_block(b).await,
            };
        }
        // Partial block: read, merge, write.
        let old = self.store.get_block_inner(b, true).await?;
        let (at_us, len_us) = (at as usize, len as usize);
        match (&old, &data) {
            // Zeroes into a block that does not exist: nothing to do.
            (None, None) => return Ok(()),
            (Some(o), Some(d)) if o[at_us..at_us + len_us] == d[..] => return Ok(()),
            _ => {}
        }
        let mut merged = match old {
            Some(o) => BytesMut::from(&o[..]),
            None => BytesMut::zeroed(block_len as usize),
        };
        match &data {
            Some(d) => merged[at_us..at_us + len_us].copy_from_slice(d),
            None => merged[at_us..at_us + len_us].fill(0),
        }
        if is_zero(&merged) {
            self.store.delete_block(b).await
        } else {
            self.store.put_block(b, merged.freeze()).await
        }
    }

    /// Runs a write-like operation (`data` `None` = zeroes) block by block,
    /// cancellable through `cancel_writes`.
    async fn write_range(
        &self,
        op: Op,
        offset: u64,
        len: u64,
        data: Option<Bytes>,
    ) -> Result<(), Error> {
        check_range(op, offset, len, self.layout.size())?;
        let _g = self.enter(op).await?;
        if len == 0 {
            return Ok(());
        }
        let reg = self.register_write(offset, len);
        let bs = self.layout.block_size();
        let touching = self.layout.blocks_touching(offset, len);
        let covered = self.layout.blocks_covered(offset, len);
        // Which blocks to visit: all of them, or — when zeroing a large range —
        // the partial edge blocks plus the covered blocks that have an object
        // (missing objects already read as zeroes; one LIST instead of a
        // DELETE per block, which matters for a discard of a whole disk).
        let targets: futures::stream::BoxStream<'_, S3Result<u64>> =
            if data.is_none() && covered.end - covered.start >= SPARSE_ZERO_MIN_BLOCKS {
                let edges = (touching.start..covered.start).chain(covered.end..touching.end);
                futures::stream::iter(edges.map(Ok))
                    .chain(self.store.existing_blocks(covered))
                    .boxed()
            } else {
                futures::stream::iter(touching.map(Ok)).boxed()
            };
        let work = targets
            .map_ok(|b| {
                let bstart = b * bs;
                let s = offset.max(bstart);
                let e = (offset + len).min(bstart + self.layout.block_len(b));
                let piece = data
                    .as_ref()
                    .map(|d| d.slice((s - offset) as usize..(e - offset) as usize));
                self.write_block(b, s - bstart, piece, e - s)
            })
            .try_buffer_unordered(self.concurrency)
            .try_for_each(|()| async { Ok(()) });
        tokio::select! {
            biased;
            _ = reg.token.cancelled() => {
                self.metrics().cancelled();
                debug!(offset, len, "write cancelled");
                Err(Error::Cancelled { op, offset, len })
            }
            r = work => r.map_err(Error::from),
        }
    }
}

/// True if every byte is zero (checked in chunks so the inner loop
/// vectorises; stops at the first non-zero chunk).
pub(crate) fn is_zero(d: &[u8]) -> bool {
    d.chunks(256)
        .all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

#[async_trait]
impl Provider for S3Storage {
    fn size(&self) -> u64 {
        self.layout.size()
    }

    fn capabilities(&self) -> Capabilities {
        // Every acknowledged write is in S3 already: flush and FUA are
        // trivially satisfied; trim and write-zeroes are DELETEs.
        Capabilities::ALL
    }

    async fn read_at(&self, offset: u64, mut buf: BytesMut) -> Result<BytesMut, Error> {
        let len = buf.len() as u64;
        check_range(Op::Read, offset, len, self.layout.size())?;
        let _g = self.enter(Op::Read).await?;
        if len == 0 {
            return Ok(buf);
        }
        let bs = self.layout.block_size();
        // Cut the caller's buffer into per-block pieces (no copies), fill
        // them concurrently, and glue them back in order.
        let mut pieces = Vec::new();
        for b in self.layout.blocks_touching(offset, len) {
            let bstart = b * bs;
            let s = offset.max(bstart);
            let e = (offset + len).min(bstart + self.layout.block_len(b));
            let piece = buf.split_to((e - s) as usize);
            pieces.push((b, s - bstart, e - bstart, piece));
        }
        let filled: Vec<BytesMut> = futures::stream::iter(pieces)
            .map(|(b, s, e, mut piece)| async move {
                match self.store.get_block_range(b, s..e).await? {
                    Some(d) => piece.copy_from_slice(&d),
                    None => piece.fill(0),
                }
                Ok::<_, S3Error>(piece)
            })
            .buffered(self.concurrency)
            .try_collect()
            .await?;
        let mut it = filled.into_iter();
        let mut out = it.next().expect("a non-empty read has at least one block");
        for p in it {
            out.unsplit(p);
        }
        Ok(out)
    }

    async fn write_at(&self, offset: u64, data: Bytes) -> Result<(), Error> {
        let len = data.len() as u64;
        self.write_range(Op::Write, offset, len, Some(data)).await
    }

    async fn flush(&self) -> Result<(), Error> {
        let _g = self.enter(Op::Flush).await?;
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.write_range(Op::Trim, offset, len, None).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.write_range(Op::WriteZeroes, offset, len, None).await
    }

    fn cancel_writes(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        for (_, w) in self.writes.lock().iter() {
            if w.start < end && offset < w.end {
                w.token.cancel();
            }
        }
    }

    async fn close(&self) -> Result<(), Error> {
        self.closed.store(true, Ordering::Release);
        // Waits for every operation that got in before the flag was set.
        let _w = self.gate.write().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Fast model test on `object_store`'s in-memory backend, in addition to
    //! the real-server tests in `tests/provider.rs` (many more cases here).
    use super::*;
    use object_store::memory::InMemory;
    use proptest::prelude::*;
    use silo_storage::ProviderExt;

    const BS: u64 = 512;
    const SIZE: u64 = 9 * BS + 77;

    #[derive(Debug, Clone)]
    enum Step {
        Write(u64, Vec<u8>),
        Read(u64, usize),
        Zero(u64, u64),
    }

    fn step() -> impl Strategy<Value = Step> {
        let off = prop_oneof![
            0..SIZE + 5,
            (0u64..10).prop_map(|b| b * BS),
            Just(SIZE - 77)
        ];
        prop_oneof![
            (off.clone(), proptest::collection::vec(any::<u8>(), 1..1500))
                .prop_map(|(o, d)| Step::Write(o, d)),
            (off.clone(), 1usize..2000).prop_map(|(o, l)| Step::Read(o, l)),
            (off, 1u64..SIZE + 5).prop_map(|(o, l)| Step::Zero(o, l)),
        ]
    }

    fn ok_range(o: u64, l: u64) -> bool {
        o + l <= SIZE
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]
        #[test]
        fn matches_a_vec_model(steps in proptest::collection::vec(step(), 1..40)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let layout = BlockLayout::new(SIZE, BS).unwrap();
                let store = BlockStore::new(Arc::new(InMemory::new()), "p", layout, 4,
                                            "memory".into(), "b".into()).unwrap();
                let dev = S3Storage::from_store(store, OpenMode::Create).await.unwrap();
                let mut model = vec![0u8; SIZE as usize];
                for s in steps {
                    match s {
                        Step::Write(o, d) => {
                            let r = dev.write_slice(o, &d).await;
                            prop_assert_eq!(r.is_ok(), ok_range(o, d.len() as u64));
                            if r.is_ok() {
                                model[o as usize..o as usize + d.len()].copy_from_slice(&d);
                            }
                        }
                        Step::Read(o, l) => match dev.read_at(o, BytesMut::from(&vec![0xEEu8; l][..])).await {
                            Ok(b) => prop_assert!(b[..] == model[o as usize..o as usize + l]),
                            Err(e) => {
                                prop_assert!(!ok_range(o, l as u64));
                                prop_assert_eq!(e.kind(), silo_storage::ErrorKind::OutOfRange);
                            }
                        },
                        Step::Zero(o, l) => {
                            let r = dev.write_zeroes(o, l).await;
                            prop_assert_eq!(r.is_ok(), ok_range(o, l));
                            if r.is_ok() {
                                model[o as usize..(o + l) as usize].fill(0);
                            }
                        }
                    }
                }
                let all = dev.read_bytes(0, SIZE as usize).await.unwrap();
                prop_assert!(all[..] == model[..]);
                // No object holds an all-zero block, and the trailing
                // partial block is stored at its real length.
                for (b, len) in dev.block_store().list_blocks().await.unwrap() {
                    prop_assert_eq!(len, layout.block_len(b));
                    let r = layout.block_range(b);
                    prop_assert!(!is_zero(&model[r.start as usize..r.end as usize]));
                }
                Ok(())
            })?;
        }
    }
}
