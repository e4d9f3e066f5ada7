//! A sparse file source: only blocks that were written are stored.
//!
//! # On-disk format (version 1, all integers little-endian)
//!
//! ```text
//! file header, 64 bytes
//!   0..8    magic  "SILOSPF1"
//!   8..12   version (1)
//!   12..16  block size in bytes
//!   16..24  device size in bytes
//!   24..32  check: first 8 bytes of SHA-256 over bytes 0..24
//!   32..64  zero
//! record i, at 64 + i * (32 + block_size)
//!   0..4    magic  "SREC"
//!   4..8    kind: 1 = data, 2 = trimmed (payload is a hole / ignored)
//!   8..16   block index
//!   16..24  payload check: first 8 bytes of SHA-256 of the payload (data)
//!   24..32  header check: first 8 bytes of SHA-256 over record bytes 0..24
//!   32..    payload: block_size bytes (a trailing partial device block is
//!           zero-padded to block_size)
//! ```
//!
//! A block gets a record slot the first time it is written and keeps it
//! for the life of the file: later writes overwrite the payload in place
//! (payload first, then the header with its new check), trim turns the
//! record into a "trimmed" record and punches a hole over its payload. A
//! record is written payload-first, so a header only becomes valid once its
//! payload is on disk.
//!
//! # Reopening
//!
//! [`SparseFile::open`] scans every record and verifies both checks. A
//! record whose header or payload check fails (a torn write from a crash: a
//! partially written record at the end of the file, or an interrupted
//! in-place overwrite) is ignored — its block reads as zeroes, its slot is
//! reused — and counted in [`RecoveryStats`]. A trailing fragment shorter
//! than a record is cut off. Every write acknowledged before the process
//! went away (without `close`) is found again, because an acknowledged write
//! has both its payload and its header in the file; durability against
//! power loss additionally needs `flush` (fsync).
//!
//! Limitation: an overwrite of an existing block is in place, so a crash in
//! the middle of *overwriting* a block loses that block (detected, reads as
//! zeroes after reopening, reported in `RecoveryStats::torn`), not only the
//! unacknowledged write.
//!
//! # Concurrency
//!
//! Writes and trims to the same block are serialised by striped locks;
//! reads take no lock. All file I/O runs as positioned I/O on tokio's
//! blocking pool, one closure per request.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use super::gate::Gate;
use super::sys;
use crate::block::BlockLayout;
use crate::error::{check_range, Error, Op, Result};
use crate::provider::{Capabilities, Provider};

const FILE_MAGIC: &[u8; 8] = b"SILOSPF1";
const VERSION: u32 = 1;
const FILE_HEADER: u64 = 64;
const REC_MAGIC: &[u8; 4] = b"SREC";
const REC_HEADER: u64 = 32;
const KIND_DATA: u32 = 1;
const KIND_TRIMMED: u32 = 2;
/// Largest block size accepted (bounds the per-write scratch buffer).
pub const MAX_BLOCK_SIZE: u64 = 16 << 20;
const STRIPES: usize = 64;

/// Index entry: 0 = never written; else (slot + 1) | TRIMMED_BIT if trimmed.
const TRIMMED_BIT: u64 = 1 << 63;

/// What [`SparseFile::open`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecoveryStats {
    /// Records holding data.
    pub data: u64,
    /// Records of trimmed blocks.
    pub trimmed: u64,
    /// Records ignored because a check failed (torn writes) or their block
    /// index was out of range; their slots are reused.
    pub torn: u64,
    /// Bytes of an incomplete trailing record that were cut off.
    pub truncated_bytes: u64,
}

fn check8(parts: &[&[u8]]) -> [u8; 8] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    let d = h.finalize();
    let mut out = [0u8; 8];
    out.copy_from_slice(&d[..8]);
    out
}

/// Payload check of a full-block payload given as a prefix plus implicit
/// zero padding up to `block_size`.
fn payload_check(data: &[u8], block_size: usize) -> [u8; 8] {
    let mut h = Sha256::new();
    h.update(data);
    let mut pad = block_size - data.len();
    const Z: [u8; 4096] = [0; 4096];
    while pad > 0 {
        let n = pad.min(Z.len());
        h.update(&Z[..n]);
        pad -= n;
    }
    let d = h.finalize();
    let mut out = [0u8; 8];
    out.copy_from_slice(&d[..8]);
    out
}

/// Most blocks a sparse file may have (the in-memory index costs 8 bytes
/// per block).
pub const MAX_BLOCKS: u64 = 1 << 32;

/// An all-zero index for `layout`, or a clear error if it is absurdly large
/// (a corrupt or hostile header must not abort the process).
fn zeroed_index(path: &Path, layout: &BlockLayout) -> Result<Vec<u64>> {
    let n = layout.num_blocks();
    if n > MAX_BLOCKS {
        return Err(Error::Invalid(format!(
            "{}: {n} blocks exceed the sparse file limit of {MAX_BLOCKS}",
            path.display()
        )));
    }
    let mut v = Vec::new();
    v.try_reserve_exact(n as usize)
        .map_err(|e| Error::OutOfSpace(format!("{}: index of {n} blocks: {e}", path.display())))?;
    v.resize(n as usize, 0);
    Ok(v)
}

fn record_header(kind: u32, block: u64, payload: [u8; 8]) -> [u8; 32] {
    let mut h = [0u8; 32];
    h[0..4].copy_from_slice(REC_MAGIC);
    h[4..8].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&block.to_le_bytes());
    h[16..24].copy_from_slice(&payload);
    let c = check8(&[&h[..24]]);
    h[24..32].copy_from_slice(&c);
    h
}

struct Inner {
    file: File,
    path: PathBuf,
    layout: BlockLayout,
    index: Vec<AtomicU64>,
    next_slot: AtomicU64,
    free: Mutex<Vec<u64>>,
    stripes: Vec<Mutex<()>>,
    stored: AtomicUsize,
}

/// A provider that stores only written blocks in a record file (format in
/// the [module documentation](self)).
pub struct SparseFile {
    inner: Arc<Inner>,
    gate: Gate,
    recovery: RecoveryStats,
}

impl std::fmt::Debug for SparseFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SparseFile")
            .field("path", &self.inner.path)
            .field("size", &self.inner.layout.size())
            .field("block_size", &self.inner.layout.block_size())
            .finish()
    }
}

fn open_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::io(
        Op::Open,
        0,
        0,
        io::Error::other(format!("{}: {e}", path.display())),
    )
}

impl SparseFile {
    /// Creates (or truncates) a sparse file for a device of `size` bytes
    /// stored in blocks of `block_size` bytes (a power of two, at most
    /// [`MAX_BLOCK_SIZE`]).
    pub fn create(path: impl AsRef<Path>, size: u64, block_size: u64) -> Result<Self> {
        let path = path.as_ref();
        let layout = BlockLayout::new(size, block_size)?;
        if block_size > MAX_BLOCK_SIZE {
            return Err(Error::Invalid(format!(
                "sparse file block size {block_size} exceeds {MAX_BLOCK_SIZE}"
            )));
        }
        zeroed_index(path, &layout)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| open_err(path, e))?;
        let mut h = [0u8; FILE_HEADER as usize];
        h[0..8].copy_from_slice(FILE_MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(block_size as u32).to_le_bytes());
        h[16..24].copy_from_slice(&size.to_le_bytes());
        let c = check8(&[&h[..24]]);
        h[24..32].copy_from_slice(&c);
        file.write_all_at(&h, 0).map_err(|e| open_err(path, e))?;
        Ok(Self::build(
            file,
            path,
            layout,
            0,
            Vec::new(),
            RecoveryStats::default(),
            None,
        ))
    }

    /// Opens an existing sparse file, rebuilding the block index (see the
    /// module docs for how torn records are handled).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| open_err(path, e))?;
        let mut h = [0u8; FILE_HEADER as usize];
        file.read_exact_at(&mut h, 0)
            .map_err(|e| open_err(path, format!("reading the header: {e}")))?;
        if &h[0..8] != FILE_MAGIC || h[24..32] != check8(&[&h[..24]]) {
            return Err(Error::Corrupt(format!(
                "{}: not a silo sparse file (bad magic or header check)",
                path.display()
            )));
        }
        let version = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(Error::Invalid(format!(
                "{}: sparse file version {version} is not supported",
                path.display()
            )));
        }
        let block_size = u32::from_le_bytes(h[12..16].try_into().expect("4 bytes")) as u64;
        let size = u64::from_le_bytes(h[16..24].try_into().expect("8 bytes"));
        if block_size > MAX_BLOCK_SIZE {
            return Err(Error::Corrupt(format!(
                "{}: block size {block_size} too large",
                path.display()
            )));
        }
        let layout = BlockLayout::new(size, block_size)?;
        let len = file.metadata().map_err(|e| open_err(path, e))?.len();
        let rec = REC_HEADER + block_size;
        let slots = len.saturating_sub(FILE_HEADER) / rec;
        let mut stats = RecoveryStats {
            truncated_bytes: len.saturating_sub(FILE_HEADER) % rec,
            ..RecoveryStats::default()
        };
        if stats.truncated_bytes > 0 {
            file.set_len(FILE_HEADER + slots * rec)
                .map_err(|e| open_err(path, e))?;
        }
        let mut index = zeroed_index(path, &layout)?;
        let mut buf = vec![0u8; rec as usize];
        let mut free = Vec::new();
        {
            for slot in 0..slots {
                let off = FILE_HEADER + slot * rec;
                file.read_exact_at(&mut buf, off)
                    .map_err(|e| open_err(path, format!("reading record {slot}: {e}")))?;
                let (hdr, payload) = buf.split_at(REC_HEADER as usize);
                let kind = u32::from_le_bytes(hdr[4..8].try_into().expect("4 bytes"));
                let block = u64::from_le_bytes(hdr[8..16].try_into().expect("8 bytes"));
                let valid_hdr = &hdr[0..4] == REC_MAGIC
                    && hdr[24..32] == check8(&[&hdr[..24]])
                    && block < layout.num_blocks();
                let valid = valid_hdr
                    && match kind {
                        KIND_DATA => hdr[16..24] == check8(&[payload]),
                        KIND_TRIMMED => true,
                        _ => false,
                    };
                if !valid {
                    stats.torn += 1;
                    free.push(slot);
                    continue;
                }
                let prev = index[block as usize];
                if prev != 0 {
                    // Cannot happen with files we write (a block keeps its
                    // slot); keep the later record.
                    tracing::warn!(path = %path.display(), block, slot, "duplicate sparse record; keeping the later one");
                    free.push((prev & !TRIMMED_BIT) - 1);
                }
                if kind == KIND_DATA {
                    stats.data += 1;
                    index[block as usize] = slot + 1;
                } else {
                    stats.trimmed += 1;
                    index[block as usize] = (slot + 1) | TRIMMED_BIT;
                }
            }
            if stats.torn > 0 || stats.truncated_bytes > 0 {
                tracing::warn!(path = %path.display(), torn = stats.torn, truncated = stats.truncated_bytes, "sparse file had torn records; ignored");
            }
        }
        Ok(Self::build(
            file,
            path,
            layout,
            slots,
            free,
            stats,
            Some(index),
        ))
    }

    fn build(
        file: File,
        path: &Path,
        layout: BlockLayout,
        next_slot: u64,
        free: Vec<u64>,
        recovery: RecoveryStats,
        index: Option<Vec<u64>>,
    ) -> Self {
        let n = layout.num_blocks() as usize;
        let index: Vec<AtomicU64> = match index {
            Some(v) => v.into_iter().map(AtomicU64::new).collect(),
            None => (0..n).map(|_| AtomicU64::new(0)).collect(),
        };
        debug_assert_eq!(index.len(), n);
        let stored = index
            .iter()
            .filter(|e| {
                let v = e.load(Ordering::Relaxed);
                v != 0 && v & TRIMMED_BIT == 0
            })
            .count();
        SparseFile {
            inner: Arc::new(Inner {
                file,
                path: path.to_owned(),
                layout,
                index,
                next_slot: AtomicU64::new(next_slot),
                free: Mutex::new(free),
                stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
                stored: AtomicUsize::new(stored),
            }),
            gate: Gate::default(),
            recovery,
        }
    }

    /// The block size records are stored in.
    pub fn block_size(&self) -> u64 {
        self.inner.layout.block_size()
    }

    /// Blocks currently holding data.
    pub fn stored_blocks(&self) -> u64 {
        self.inner.stored.load(Ordering::Relaxed) as u64
    }

    /// Whether block `b` holds data (was written and not trimmed since).
    pub fn has_block(&self, b: u64) -> bool {
        self.inner
            .index
            .get(b as usize)
            .map(|e| {
                let v = e.load(Ordering::Acquire);
                v != 0 && v & TRIMMED_BIT == 0
            })
            .unwrap_or(false)
    }

    /// What opening found (all zero for a created file).
    pub fn recovery(&self) -> RecoveryStats {
        self.recovery
    }

    /// The path of the record file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    async fn blocking<T: Send + 'static>(
        &self,
        op: Op,
        offset: u64,
        len: u64,
        f: impl FnOnce(&Inner) -> io::Result<T> + Send + 'static,
    ) -> Result<T> {
        let pass = self.gate.enter(op)?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let r = f(&inner);
            drop(pass);
            r
        })
        .await
        .map_err(|e| Error::io(op, offset, len, io::Error::other(e)))?
        .map_err(|e| Error::io(op, offset, len, e))
    }
}

impl Inner {
    fn bs(&self) -> u64 {
        self.layout.block_size()
    }

    fn rec_off(&self, slot: u64) -> u64 {
        FILE_HEADER + slot * (REC_HEADER + self.bs())
    }

    /// The slot of block `b` if it holds data.
    fn data_slot(&self, b: u64) -> Option<u64> {
        let v = self.index[b as usize].load(Ordering::Acquire);
        (v != 0 && v & TRIMMED_BIT == 0).then(|| v - 1)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let b = pos / self.bs();
            let in_block = pos % self.bs();
            let n = ((self.bs() - in_block) as usize).min(buf.len() - done);
            let dst = &mut buf[done..done + n];
            match self.data_slot(b) {
                Some(slot) => self
                    .file
                    .read_exact_at(dst, self.rec_off(slot) + REC_HEADER + in_block)?,
                None => dst.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    /// Writes `data` at `offset`; `None` writes zeroes (trim / write-zeroes).
    fn write(&self, offset: u64, len: u64, data: Option<&[u8]>) -> io::Result<()> {
        let bs = self.bs() as usize;
        let mut scratch: Vec<u8> = Vec::new();
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let b = pos / self.bs();
            let in_block = (pos % self.bs()) as usize;
            let block_len = self.layout.block_len(b) as usize;
            let n = (block_len - in_block).min((len - done) as usize);
            let src = data.map(|d| &d[done as usize..done as usize + n]);
            let _stripe = self.stripes[b as usize % STRIPES].lock();
            let slot = self.data_slot(b);
            let whole = in_block == 0 && n == block_len;
            match (src, whole, slot) {
                // Zeroes over a block with no data: nothing to do.
                (None, _, None) => {}
                // Zeroes over a whole stored block: becomes a trimmed record.
                (None, true, Some(slot)) => self.trim_block(b, slot)?,
                // A whole block with data, stored full size.
                (Some(src), true, _) if n == bs => {
                    let check = check8(&[src]);
                    self.put(b, slot, src, check)?;
                }
                // Everything else: read-merge-write of the whole block.
                (src, _, slot) => {
                    scratch.resize(bs, 0);
                    match slot {
                        Some(s) => self.file.read_exact_at(
                            &mut scratch[..block_len],
                            self.rec_off(s) + REC_HEADER,
                        )?,
                        None => scratch[..block_len].fill(0),
                    }
                    scratch[block_len..].fill(0);
                    match src {
                        Some(src) => scratch[in_block..in_block + n].copy_from_slice(src),
                        None => scratch[in_block..in_block + n].fill(0),
                    }
                    let check = payload_check(&scratch[..block_len], bs);
                    self.put(b, slot, &scratch, check)?;
                }
            }
            done += n as u64;
        }
        Ok(())
    }

    /// Stores a full payload for block `b` (caller holds the stripe lock).
    fn put(&self, b: u64, slot: Option<u64>, payload: &[u8], check: [u8; 8]) -> io::Result<()> {
        let slot = match slot {
            Some(s) => s,
            None => {
                let v = self.index[b as usize].load(Ordering::Acquire);
                if v != 0 {
                    (v & !TRIMMED_BIT) - 1
                } else {
                    self.new_slot()
                }
            }
        };
        let off = self.rec_off(slot);
        self.file.write_all_at(payload, off + REC_HEADER)?;
        self.file
            .write_all_at(&record_header(KIND_DATA, b, check), off)?;
        let prev = self.index[b as usize].swap(slot + 1, Ordering::AcqRel);
        if prev == 0 || prev & TRIMMED_BIT != 0 {
            self.stored.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn new_slot(&self) -> u64 {
        if let Some(s) = self.free.lock().pop() {
            return s;
        }
        self.next_slot.fetch_add(1, Ordering::AcqRel)
    }

    /// Marks block `b` trimmed and frees its payload's disk space.
    fn trim_block(&self, b: u64, slot: u64) -> io::Result<()> {
        let off = self.rec_off(slot);
        self.file
            .write_all_at(&record_header(KIND_TRIMMED, b, [0; 8]), off)?;
        self.index[b as usize].store((slot + 1) | TRIMMED_BIT, Ordering::Release);
        self.stored.fetch_sub(1, Ordering::Relaxed);
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match sys::fallocate(&self.file, punch, off + REC_HEADER, self.bs()) {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[async_trait]
impl Provider for SparseFile {
    fn size(&self) -> u64 {
        self.inner.layout.size()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }

    async fn read_at(&self, offset: u64, mut buf: BytesMut) -> Result<BytesMut> {
        let len = buf.len() as u64;
        check_range(Op::Read, offset, len, self.size())?;
        self.gate.enter(Op::Read)?;
        if len == 0 {
            return Ok(buf);
        }
        self.blocking(Op::Read, offset, len, move |inner| {
            inner.read(offset, &mut buf)?;
            Ok(buf)
        })
        .await
    }

    async fn write_at(&self, offset: u64, data: Bytes) -> Result<()> {
        let len = data.len() as u64;
        check_range(Op::Write, offset, len, self.size())?;
        self.gate.enter(Op::Write)?;
        if len == 0 {
            return Ok(());
        }
        self.blocking(Op::Write, offset, len, move |inner| {
            inner.write(offset, len, Some(&data))
        })
        .await
    }

    async fn flush(&self) -> Result<()> {
        self.blocking(Op::Flush, 0, 0, |inner| inner.file.sync_all())
            .await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        check_range(Op::Trim, offset, len, self.size())?;
        self.gate.enter(Op::Trim)?;
        if len == 0 {
            return Ok(());
        }
        self.blocking(Op::Trim, offset, len, move |inner| {
            inner.write(offset, len, None)
        })
        .await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        check_range(Op::WriteZeroes, offset, len, self.size())?;
        self.gate.enter(Op::WriteZeroes)?;
        if len == 0 {
            return Ok(());
        }
        self.blocking(Op::WriteZeroes, offset, len, move |inner| {
            inner.write(offset, len, None)
        })
        .await
    }

    fn cancel_writes(&self, _offset: u64, _len: u64) {}

    async fn close(&self) -> Result<()> {
        self.gate.close().await;
        Ok(())
    }
}
