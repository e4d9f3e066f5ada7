//! [`Binlog`]: a pass-through provider that records every write (and
//! optionally every read) with its timing to a file, for replay with
//! [`BinlogReplay`](super::BinlogReplay). Plus
//! [`create_binlog_from_device`], which turns a device image into a binlog.
//!
//! ## File format (version 1, all integers little-endian)
//!
//! Header, 16 bytes: magic `SILOBLG1` (8 bytes), device size (u64).
//!
//! Then one record per operation:
//!
//! | bytes | content |
//! |---|---|
//! | 0 | kind: 1 read, 2 write, 3 flush, 4 trim, 5 write-zeroes |
//! | 1..9 | time the operation started, in nanoseconds since the binlog was created (u64) |
//! | 9..17 | offset (u64) |
//! | 17..25 | length (u64) |
//! | 25.. | for writes only: `length` bytes of data |
//!
//! Only operations that succeeded on the device are recorded, in the order
//! they completed. Writes that overlap and are in flight at the same time
//! have no defined order on any block device; for all others the log order
//! is the order of effect, so replaying reproduces the device content.
//!
//! A failure to write the log is returned as an error from the operation
//! (the operation itself reached the device; the recording is incomplete).
//! It never panics.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::sync::Mutex as AsyncMutex;

use crate::error::{Error, Op, Result};
use crate::provider::{DynProvider, Provider};

/// File magic of a binlog.
pub const MAGIC: &[u8; 8] = b"SILOBLG1";
/// Size of the file header.
pub const HEADER_LEN: usize = 16;
/// Size of a record header.
pub const RECORD_HEADER_LEN: usize = 25;

/// What a [`Binlog`] records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BinlogOptions {
    /// Record reads (without data).
    pub log_reads: bool,
    /// Record writes, trims, write-zeroes and flushes.
    pub log_writes: bool,
}

impl Default for BinlogOptions {
    fn default() -> Self {
        BinlogOptions {
            log_reads: false,
            log_writes: true,
        }
    }
}

pub(crate) const KIND_READ: u8 = 1;
pub(crate) const KIND_WRITE: u8 = 2;
pub(crate) const KIND_FLUSH: u8 = 3;
pub(crate) const KIND_TRIM: u8 = 4;
pub(crate) const KIND_ZEROES: u8 = 5;

/// A provider that records its operations to a file.
pub struct Binlog<P = DynProvider> {
    inner: P,
    path: PathBuf,
    out: AsyncMutex<Option<BufWriter<tokio::fs::File>>>,
    start: Instant,
    log_reads: AtomicBool,
    log_writes: AtomicBool,
}

fn log_err(op: Op, offset: u64, len: u64, e: std::io::Error) -> Error {
    Error::io(
        op,
        offset,
        len,
        std::io::Error::new(e.kind(), format!("binlog: {e}")),
    )
}

impl<P: Provider> Binlog<P> {
    /// Wraps `inner`, creating (truncating) the log at `path`.
    pub async fn create(inner: P, path: impl AsRef<Path>, opts: BinlogOptions) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| log_err(Op::Open, 0, 0, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(MAGIC);
        header[8..].copy_from_slice(&inner.size().to_le_bytes());
        out.write_all(&header)
            .await
            .map_err(|e| log_err(Op::Open, 0, 0, e))?;
        Ok(Binlog {
            inner,
            path,
            out: AsyncMutex::new(Some(out)),
            start: Instant::now(),
            log_reads: AtomicBool::new(opts.log_reads),
            log_writes: AtomicBool::new(opts.log_writes),
        })
    }

    /// Chooses what is recorded from now on.
    pub fn set_logging(&self, reads: bool, writes: bool) {
        self.log_reads.store(reads, Ordering::Relaxed);
        self.log_writes.store(writes, Ordering::Relaxed);
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The wrapped provider.
    pub fn inner(&self) -> &P {
        &self.inner
    }

    async fn record(
        &self,
        op: Op,
        kind: u8,
        started: Instant,
        offset: u64,
        len: u64,
        data: Option<&Bytes>,
    ) -> Result<()> {
        let t = started.saturating_duration_since(self.start).as_nanos() as u64;
        let mut h = [0u8; RECORD_HEADER_LEN];
        h[0] = kind;
        h[1..9].copy_from_slice(&t.to_le_bytes());
        h[9..17].copy_from_slice(&offset.to_le_bytes());
        h[17..25].copy_from_slice(&len.to_le_bytes());
        let mut out = self.out.lock().await;
        let Some(w) = out.as_mut() else {
            return Err(Error::Closed { op });
        };
        let r = async {
            w.write_all(&h).await?;
            if let Some(d) = data {
                w.write_all(d).await?;
            }
            Ok(())
        }
        .await;
        r.map_err(|e| log_err(op, offset, len, e))
    }

    async fn sync_log(&self, op: Op) -> Result<()> {
        let mut out = self.out.lock().await;
        if let Some(w) = out.as_mut() {
            w.flush().await.map_err(|e| log_err(op, 0, 0, e))?;
            w.get_ref()
                .sync_data()
                .await
                .map_err(|e| log_err(op, 0, 0, e))?;
        }
        Ok(())
    }

    fn writes(&self) -> bool {
        self.log_writes.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl<P: Provider> Provider for Binlog<P> {
    forward!(inner; size, capabilities, cancel_writes);

    async fn read_at(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        let (t, n) = (Instant::now(), buf.len() as u64);
        let buf = self.inner.read_at(offset, buf).await?;
        if self.log_reads.load(Ordering::Relaxed) {
            self.record(Op::Read, KIND_READ, t, offset, n, None).await?;
        }
        Ok(buf)
    }
    async fn write_at(&self, offset: u64, data: Bytes) -> Result<()> {
        let t = Instant::now();
        self.inner.write_at(offset, data.clone()).await?;
        if self.writes() {
            self.record(
                Op::Write,
                KIND_WRITE,
                t,
                offset,
                data.len() as u64,
                Some(&data),
            )
            .await?;
        }
        Ok(())
    }
    async fn flush(&self) -> Result<()> {
        let t = Instant::now();
        self.inner.flush().await?;
        if self.writes() {
            self.record(Op::Flush, KIND_FLUSH, t, 0, 0, None).await?;
        }
        self.sync_log(Op::Flush).await
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        let t = Instant::now();
        self.inner.trim(offset, len).await?;
        if self.writes() {
            self.record(Op::Trim, KIND_TRIM, t, offset, len, None)
                .await?;
        }
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let t = Instant::now();
        self.inner.write_zeroes(offset, len).await?;
        if self.writes() {
            self.record(Op::WriteZeroes, KIND_ZEROES, t, offset, len, None)
                .await?;
        }
        Ok(())
    }
    async fn close(&self) -> Result<()> {
        let synced = self.sync_log(Op::Close).await;
        self.out.lock().await.take();
        let closed = self.inner.close().await;
        synced.and(closed)
    }
}

/// Copies `src` to `dst` block by block, skipping blocks that are all zero
/// (a fresh device reads zeroes there anyway). With a [`Binlog`] as `dst`,
/// this produces a replayable image of `src`. Returns the number of blocks
/// written. The last block may be partial.
pub async fn create_binlog_from_device<S, D>(src: &S, dst: &D, block_size: u64) -> Result<u64>
where
    S: Provider + ?Sized,
    D: Provider + ?Sized,
{
    let layout = crate::block::BlockLayout::new(src.size(), block_size)?;
    if dst.size() < src.size() {
        return Err(Error::Invalid(format!(
            "destination has {} bytes, source {}",
            dst.size(),
            src.size()
        )));
    }
    let mut written = 0;
    let mut buf = BytesMut::zeroed(block_size as usize);
    for b in 0..layout.num_blocks() {
        let r = layout.block_range(b);
        buf.resize((r.end - r.start) as usize, 0);
        let got = src.read_at(r.start, buf).await?;
        if got.iter().all(|&x| x == 0) {
            buf = got;
            continue;
        }
        dst.write_at(r.start, Bytes::copy_from_slice(&got)).await?;
        buf = got;
        written += 1;
    }
    dst.flush().await?;
    Ok(written)
}
