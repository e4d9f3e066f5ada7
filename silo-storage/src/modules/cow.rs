//! [`CopyOnWrite`]: a read-only base with a writable overlay.
//!
//! The device is divided into blocks. A block is **local** once it has been
//! written through this layer: its current content lives in the overlay.
//! Other blocks read from the base, which is never written.
//!
//! * **Reads** are split into runs of local / non-local blocks; each run is
//!   read from the overlay or the base (concurrently).
//! * **Writes** of whole blocks go straight to the overlay; a partial write
//!   to a block that is not yet local reads the block from the base, merges
//!   the new bytes and writes the whole block to the overlay. Per-block
//!   (striped) locks make the first write of a block atomic with respect to
//!   other writes of the same block. Trim and write-zeroes are applied as
//!   zero writes to the overlay (the base is never touched), so a trimmed
//!   range reads as zeroes.
//! * **Persistence**: with a `state_path`, the set of local blocks is stored
//!   in a state file (format below) and reloaded by [`CopyOnWrite::open`].
//!   With [`CowPersist::OnFlush`] (default) the map is written on `flush()`
//!   and `close()`: the bitmap is snapshotted, the overlay flushed, then the
//!   snapshot written to a temporary file, `fsync`ed and renamed over the
//!   state file (and the directory `fsync`ed). So every write acknowledged
//!   before an acknowledged `flush()` survives a crash, and a block is never
//!   marked local before its data is durable. [`CowPersist::EveryWrite`] does
//!   the same after every write that adds blocks (no flush needed, slower).
//! * **Shared base**: when the destination of a migration has the same base
//!   image, [`CopyOnWrite::unrequired_blocks`] lists the blocks that are still
//!   identical to the base and need not be sent.
//! * `close()` persists, then closes the **overlay only**: the base may be
//!   shared by several overlays and belongs to the caller.
//!
//! ## State file format (version 1, all integers little-endian)
//!
//! | bytes | content |
//! |---|---|
//! | 0..8 | magic `SILOCOW1` |
//! | 8..16 | device size (u64) |
//! | 16..24 | block size (u64) |
//! | 24..32 | number of blocks `n` (u64) |
//! | 32..32+⌈n/8⌉ | bitmap, bit `i` = byte `i/8`, bit `i%8` (LSB first): block `i` is local |
//! | last 32 | SHA-256 of all preceding bytes |

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::future::try_join_all;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex as AsyncMutex;

use super::gate::Gate;
use super::util::{join_bufs, pieces, split_buf, AtomicBits, Piece, Stripes};
use crate::block::BlockLayout;
use crate::error::{check_range, Error, Op, Result};
use crate::provider::{Capabilities, DynProvider, Provider};

const MAGIC: &[u8; 8] = b"SILOCOW1";
const HEADER: usize = 32;
const STRIPES: usize = 1024;

/// When the overlay map is written to the state file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CowPersist {
    /// On `flush()` and `close()` (a crash forgets only unflushed writes).
    #[default]
    OnFlush,
    /// After every write that makes new blocks local (overlay flushed first).
    EveryWrite,
}

/// Configuration of a [`CopyOnWrite`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CowConfig {
    /// Block size (a power of two).
    pub block_size: u64,
    /// The destination of a migration has the same base image, so blocks
    /// still equal to the base need not be sent.
    pub shared_base: bool,
    /// Where the overlay map is persisted; `None` keeps it in memory only.
    pub state_path: Option<PathBuf>,
    /// When the map is persisted.
    pub persist: CowPersist,
}

impl CowConfig {
    /// A configuration without persistence and without a shared base.
    pub fn new(block_size: u64) -> Self {
        CowConfig {
            block_size,
            shared_base: false,
            state_path: None,
            persist: CowPersist::OnFlush,
        }
    }

    /// Sets the state file.
    pub fn with_state_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.state_path = Some(path.into());
        self
    }

    /// Marks the base as shared with the migration destination.
    pub fn with_shared_base(mut self, shared: bool) -> Self {
        self.shared_base = shared;
        self
    }

    /// Sets the persistence policy.
    pub fn with_persist(mut self, persist: CowPersist) -> Self {
        self.persist = persist;
        self
    }
}

/// Counters of a [`CopyOnWrite`] layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CowStats {
    /// Blocks living in the overlay.
    pub local_blocks: u64,
    /// Bytes read from the base.
    pub base_read_bytes: u64,
    /// Bytes read from the overlay.
    pub overlay_read_bytes: u64,
    /// Partial first writes of a block (base block read, merged, written).
    pub merges: u64,
    /// Times the overlay map was written to the state file.
    pub state_writes: u64,
}

#[derive(Debug, Default)]
struct Counters {
    base_read_bytes: AtomicU64,
    overlay_read_bytes: AtomicU64,
    merges: AtomicU64,
    state_writes: AtomicU64,
}

/// What a write puts into the overlay.
#[derive(Clone)]
enum Src {
    Data(Bytes),
    Zero,
}

impl Src {
    fn slice(&self, at: usize, len: usize) -> Src {
        match self {
            Src::Data(d) => Src::Data(d.slice(at..at + len)),
            Src::Zero => Src::Zero,
        }
    }
}

/// Copy-on-write overlay over a read-only base.
pub struct CopyOnWrite<B = DynProvider, O = DynProvider> {
    base: B,
    overlay: O,
    layout: BlockLayout,
    cfg: CowConfig,
    local: AtomicBits,
    stripes: Stripes<AsyncMutex<()>>,
    /// Bumped after new blocks become local.
    generation: AtomicU64,
    /// Generation last written to the state file (also the persist lock).
    persisted: AsyncMutex<Option<u64>>,
    gate: Gate,
    counters: Counters,
}

impl<B: Provider, O: Provider> CopyOnWrite<B, O> {
    /// Opens an overlay: `base` and `overlay` must have the same size. If the
    /// state file exists it is loaded (its size and block size must match);
    /// otherwise no block is local yet.
    pub async fn open(base: B, overlay: O, cfg: CowConfig) -> Result<Self> {
        let layout = BlockLayout::new(base.size(), cfg.block_size)?;
        if overlay.size() != base.size() {
            return Err(Error::Invalid(format!(
                "overlay size {} differs from base size {}",
                overlay.size(),
                base.size()
            )));
        }
        let local = AtomicBits::new(layout.num_blocks());
        let mut persisted = None;
        if let Some(path) = &cfg.state_path {
            if let Some(bitmap) = load_state(path, &layout).await? {
                local.load_bytes(&bitmap);
                persisted = Some(0);
            }
        }
        tracing::debug!(
            size = layout.size(),
            block_size = layout.block_size(),
            local = local.count(),
            "copy-on-write overlay opened"
        );
        Ok(CopyOnWrite {
            base,
            overlay,
            layout,
            cfg,
            local,
            stripes: Stripes::new(STRIPES),
            generation: AtomicU64::new(0),
            persisted: AsyncMutex::new(persisted),
            gate: Gate::default(),
            counters: Counters::default(),
        })
    }

    /// The base provider.
    pub fn base(&self) -> &B {
        &self.base
    }

    /// The overlay provider.
    pub fn overlay(&self) -> &O {
        &self.overlay
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u64 {
        self.layout.block_size()
    }

    /// Whether block `b` lives in the overlay.
    pub fn is_local(&self, b: u64) -> bool {
        self.local.get(b)
    }

    /// Number of local blocks.
    pub fn local_count(&self) -> u64 {
        self.local.count()
    }

    /// Counters.
    pub fn stats(&self) -> CowStats {
        let c = &self.counters;
        CowStats {
            local_blocks: self.local.count(),
            base_read_bytes: c.base_read_bytes.load(Ordering::Relaxed),
            overlay_read_bytes: c.overlay_read_bytes.load(Ordering::Relaxed),
            merges: c.merges.load(Ordering::Relaxed),
            state_writes: c.state_writes.load(Ordering::Relaxed),
        }
    }

    fn count_read(&self, local: bool, n: usize) {
        let c = if local {
            &self.counters.overlay_read_bytes
        } else {
            &self.counters.base_read_bytes
        };
        c.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// The local blocks, ascending.
    pub fn local_blocks(&self) -> Vec<u64> {
        (0..self.local.len())
            .filter(|&b| self.local.get(b))
            .collect()
    }

    /// With a shared base: the blocks still identical to the base (not
    /// local), which a destination with the same base does not need. Without
    /// a shared base: empty (every block must be sent).
    pub fn unrequired_blocks(&self) -> Vec<u64> {
        if !self.cfg.shared_base {
            return Vec::new();
        }
        (0..self.local.len())
            .filter(|&b| !self.local.get(b))
            .collect()
    }

    /// Flushes the overlay and writes the overlay map if it changed.
    async fn sync_state(&self) -> Result<()> {
        let mut persisted = self.persisted.lock().await;
        let generation = self.generation.load(Ordering::Acquire);
        let Some(path) = &self.cfg.state_path else {
            return self.overlay.flush().await;
        };
        if *persisted == Some(generation) {
            return self.overlay.flush().await;
        }
        // Snapshot first: every bit in it belongs to a completed overlay
        // write, which the flush below makes durable.
        let snapshot = self.local.to_bytes();
        self.overlay.flush().await?;
        store_state(path, &self.layout, snapshot).await?;
        self.counters.state_writes.fetch_add(1, Ordering::Relaxed);
        *persisted = Some(generation);
        Ok(())
    }

    fn mark_local(&self, blocks: impl Iterator<Item = u64>) -> bool {
        let mut added = false;
        for b in blocks {
            added |= self.local.set(b);
        }
        if added {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        added
    }

    async fn overlay_put(&self, offset: u64, len: u64, src: Src) -> Result<()> {
        match src {
            Src::Data(d) => self.overlay.write_at(offset, d).await,
            Src::Zero => self.overlay.write_zeroes(offset, len).await,
        }
    }

    /// A write covering part of one block. Returns whether the block became local.
    async fn write_partial(&self, p: Piece, src: Src) -> Result<bool> {
        if self.local.get(p.block) {
            return self
                .overlay_put(p.offset, p.len as u64, src)
                .await
                .map(|_| false);
        }
        let _g = self.stripes.get(p.block).lock().await;
        if self.local.get(p.block) {
            return self
                .overlay_put(p.offset, p.len as u64, src)
                .await
                .map(|_| false);
        }
        self.counters.merges.fetch_add(1, Ordering::Relaxed);
        let range = self.layout.block_range(p.block);
        let mut block = self
            .base
            .read_at(
                range.start,
                BytesMut::zeroed((range.end - range.start) as usize),
            )
            .await?;
        let dst = &mut block[p.in_block..p.in_block + p.len];
        match &src {
            Src::Data(d) => dst.copy_from_slice(d),
            Src::Zero => dst.fill(0),
        }
        self.overlay.write_at(range.start, block.freeze()).await?;
        Ok(self.mark_local(std::iter::once(p.block)))
    }

    /// A write covering whole blocks `blocks`, at `offset` for `len` bytes.
    async fn write_full(
        &self,
        blocks: std::ops::Range<u64>,
        offset: u64,
        len: u64,
        src: Src,
    ) -> Result<bool> {
        let missing: Vec<u64> = blocks.clone().filter(|&b| !self.local.get(b)).collect();
        if missing.is_empty() {
            return self.overlay_put(offset, len, src).await.map(|_| false);
        }
        let order = self.stripes.ordered(missing.iter().copied());
        let mut guards = Vec::with_capacity(order.len());
        for i in order {
            guards.push(self.stripes.at(i).lock().await);
        }
        self.overlay_put(offset, len, src).await?;
        Ok(self.mark_local(missing.into_iter()))
    }

    async fn write_impl(&self, offset: u64, len: u64, src: Src) -> Result<()> {
        let all: Vec<Piece> = pieces(&self.layout, offset, len).collect();
        let mut full_start: Option<usize> = None;
        let mut full_end = 0usize;
        for (i, p) in all.iter().enumerate() {
            if p.full {
                full_start.get_or_insert(i);
                full_end = i + 1;
            }
        }
        let mut jobs: Vec<futures::future::BoxFuture<'_, Result<bool>>> = Vec::new();
        for (i, p) in all.iter().enumerate() {
            if !p.full {
                let s = src.slice(p.buf_off, p.len);
                jobs.push(Box::pin(self.write_partial(*p, s)));
            } else if Some(i) == full_start {
                let first = &all[i];
                let last = &all[full_end - 1];
                let bytes = (last.offset + last.len as u64) - first.offset;
                let s = src.slice(first.buf_off, bytes as usize);
                jobs.push(Box::pin(self.write_full(
                    first.block..last.block + 1,
                    first.offset,
                    bytes,
                    s,
                )));
            }
        }
        let added = try_join_all(jobs).await?.into_iter().any(|a| a);
        if added && self.cfg.persist == CowPersist::EveryWrite {
            self.sync_state().await?;
        }
        Ok(())
    }
}

#[async_trait]
impl<B: Provider, O: Provider> Provider for CopyOnWrite<B, O> {
    fn size(&self) -> u64 {
        self.layout.size()
    }

    fn capabilities(&self) -> Capabilities {
        let o = self.overlay.capabilities();
        let b = self.base.capabilities();
        Capabilities {
            trim: true,
            concurrent: o.concurrent && b.concurrent,
            ..o
        }
    }

    async fn read_at(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        check_range(Op::Read, offset, buf.len() as u64, self.layout.size())?;
        let _pass = self.gate.enter(Op::Read).await?;
        // Runs of consecutive blocks with the same placement.
        let mut runs: Vec<(u64, usize, bool)> = Vec::new();
        for p in pieces(&self.layout, offset, buf.len() as u64) {
            let local = self.local.get(p.block);
            match runs.last_mut() {
                Some(r) if r.2 == local => r.1 += p.len,
                _ => runs.push((p.offset, p.len, local)),
            }
        }
        for r in &runs {
            self.count_read(r.2, r.1);
        }
        if runs.len() <= 1 {
            let local = runs.first().is_some_and(|r| r.2);
            return if local {
                self.overlay.read_at(offset, buf).await
            } else {
                self.base.read_at(offset, buf).await
            };
        }
        let bufs = split_buf(buf, runs.iter().map(|r| r.1));
        let futs = runs.iter().zip(bufs).map(|(r, b)| {
            let f: futures::future::BoxFuture<'_, Result<BytesMut>> = if r.2 {
                self.overlay.read_at(r.0, b)
            } else {
                self.base.read_at(r.0, b)
            };
            f
        });
        Ok(join_bufs(try_join_all(futs).await?))
    }

    async fn write_at(&self, offset: u64, data: Bytes) -> Result<()> {
        check_range(Op::Write, offset, data.len() as u64, self.layout.size())?;
        let _pass = self.gate.enter(Op::Write).await?;
        self.write_impl(offset, data.len() as u64, Src::Data(data))
            .await
    }

    async fn flush(&self) -> Result<()> {
        let _pass = self.gate.enter(Op::Flush).await?;
        self.sync_state().await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        check_range(Op::Trim, offset, len, self.layout.size())?;
        let _pass = self.gate.enter(Op::Trim).await?;
        self.write_impl(offset, len, Src::Zero).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        check_range(Op::WriteZeroes, offset, len, self.layout.size())?;
        let _pass = self.gate.enter(Op::WriteZeroes).await?;
        self.write_impl(offset, len, Src::Zero).await
    }

    fn cancel_writes(&self, offset: u64, len: u64) {
        self.overlay.cancel_writes(offset, len)
    }

    async fn close(&self) -> Result<()> {
        {
            // Persist while operations can still complete normally.
            let _pass = match self.gate.enter(Op::Close).await {
                Ok(p) => p,
                Err(_) => return Ok(()), // already closed
            };
            self.gate.close();
        }
        self.gate.drain().await;
        let synced = self.sync_state().await;
        let closed = self.overlay.close().await;
        synced.and(closed)
    }
}

fn encode_state(layout: &BlockLayout, bitmap: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + bitmap.len() + 32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&layout.size().to_le_bytes());
    out.extend_from_slice(&layout.block_size().to_le_bytes());
    out.extend_from_slice(&layout.num_blocks().to_le_bytes());
    out.extend_from_slice(bitmap);
    let sum = Sha256::digest(&out);
    out.extend_from_slice(&sum);
    out
}

fn decode_state(path: &Path, layout: &BlockLayout, data: &[u8]) -> Result<Vec<u8>> {
    let bad = |why: &str| Error::Corrupt(format!("CoW state file {}: {why}", path.display()));
    let map_len = layout.num_blocks().div_ceil(8) as usize;
    if data.len() < HEADER + 32 || &data[..8] != MAGIC {
        return Err(bad("not a silo CoW state file"));
    }
    let (body, sum) = data.split_at(data.len() - 32);
    if Sha256::digest(body).as_slice() != sum {
        return Err(bad("checksum mismatch"));
    }
    let word = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().expect("8 bytes"));
    if word(8) != layout.size() || word(16) != layout.block_size() {
        return Err(Error::Invalid(format!(
            "CoW state file {} is for a device of {} bytes in blocks of {}, not {} in blocks of {}",
            path.display(),
            word(8),
            word(16),
            layout.size(),
            layout.block_size()
        )));
    }
    if word(24) != layout.num_blocks() || body.len() != HEADER + map_len {
        return Err(bad("bitmap length does not match the header"));
    }
    Ok(body[HEADER..].to_vec())
}

async fn load_state(path: &Path, layout: &BlockLayout) -> Result<Option<Vec<u8>>> {
    match tokio::fs::read(path).await {
        Ok(data) => decode_state(path, layout, &data).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(Op::Open, 0, 0, e)),
    }
}

async fn store_state(path: &Path, layout: &BlockLayout, bitmap: Vec<u8>) -> Result<()> {
    let bytes = encode_state(layout, &bitmap);
    let path = path.to_path_buf();
    let len = bytes.len() as u64;
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        use std::io::Write;
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &path)?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::File::open(dir)?.sync_all()
    })
    .await
    .map_err(|e| Error::io(Op::Flush, 0, len, std::io::Error::other(e)))?
    .map_err(|e| Error::io(Op::Flush, 0, len, e))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::provider::ProviderExt;
    use crate::sources::MemoryStorage;

    async fn base_with_pattern(size: u64) -> Arc<MemoryStorage> {
        let base = Arc::new(MemoryStorage::new(size));
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8 + 1).collect();
        base.write_slice(0, &data).await.unwrap();
        base
    }

    #[tokio::test]
    async fn partial_writes_merge_with_base() {
        let base = base_with_pattern(10_000).await;
        let overlay = Arc::new(MemoryStorage::new(10_000));
        let cow = CopyOnWrite::open(base.clone(), overlay.clone(), CowConfig::new(4096))
            .await
            .unwrap();
        cow.write_slice(100, &[0xAA; 10]).await.unwrap();
        assert!(cow.is_local(0) && !cow.is_local(1));
        let mut want = base.read_bytes(0, 10_000).await.unwrap().to_vec();
        want[100..110].fill(0xAA);
        assert_eq!(&cow.read_bytes(0, 10_000).await.unwrap()[..], &want[..]);
        // base untouched
        assert_ne!(&base.read_bytes(100, 10).await.unwrap()[..], &[0xAA; 10]);
        // trim of the last partial block reads zeroes, base intact
        let st = cow.stats();
        assert_eq!((st.local_blocks, st.merges), (1, 1));
        assert_eq!(st.base_read_bytes + st.overlay_read_bytes, 10_000);
        cow.trim(8192, 10_000 - 8192).await.unwrap();
        want[8192..].fill(0);
        assert_eq!(&cow.read_bytes(0, 10_000).await.unwrap()[..], &want[..]);
        assert_eq!(cow.local_blocks(), vec![0, 2]);
        assert!(cow.unrequired_blocks().is_empty());
    }

    #[tokio::test]
    async fn shared_base_lists_unrequired() {
        let base = Arc::new(MemoryStorage::new(4 * 512));
        let cow = CopyOnWrite::open(
            base,
            Arc::new(MemoryStorage::new(4 * 512)),
            CowConfig::new(512).with_shared_base(true),
        )
        .await
        .unwrap();
        cow.write_slice(512, &[1; 600]).await.unwrap();
        assert_eq!(cow.unrequired_blocks(), vec![0, 3]);
    }

    #[tokio::test]
    async fn state_file_rejects_mismatch_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cow.state");
        let cfg = CowConfig::new(512).with_state_path(&path);
        let cow = CopyOnWrite::open(
            Arc::new(MemoryStorage::new(4096)),
            Arc::new(MemoryStorage::new(4096)),
            cfg.clone(),
        )
        .await
        .unwrap();
        cow.write_slice(0, &[1; 10]).await.unwrap();
        cow.flush().await.unwrap();
        let other = CowConfig::new(1024).with_state_path(&path);
        let e = CopyOnWrite::open(
            Arc::new(MemoryStorage::new(4096)),
            Arc::new(MemoryStorage::new(4096)),
            other,
        )
        .await
        .err()
        .unwrap();
        assert_eq!(e.kind(), crate::ErrorKind::Invalid);
        let mut raw = std::fs::read(&path).unwrap();
        raw[32] ^= 0xFF;
        std::fs::write(&path, raw).unwrap();
        let e = CopyOnWrite::open(
            Arc::new(MemoryStorage::new(4096)),
            Arc::new(MemoryStorage::new(4096)),
            cfg,
        )
        .await
        .err()
        .unwrap();
        assert_eq!(e.kind(), crate::ErrorKind::Corrupt);
    }
}
