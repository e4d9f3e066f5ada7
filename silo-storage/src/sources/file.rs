//! A file (or block device) source with two I/O engines:
//!
//! * [`Engine::Uring`]: reads, writes, fsync and fallocate go through the
//!   io_uring instances of the process (one per CPU, see `sys::uring`): no thread hop for cached
//!   reads at queue depth 1, batched submissions at higher depths.
//! * [`Engine::Blocking`]: positioned I/O (`pread`/`pwrite` through
//!   [`FileExt`](std::os::unix::fs::FileExt)) on tokio's blocking pool.
//!
//! [`Engine::Auto`] probes io_uring once per process (the result is cached)
//! and falls back to the blocking engine when it is unavailable (old kernel,
//! seccomp profile, missing opcodes, the crate built without the `uring`
//! feature, or the environment variable `SILO_URING=off` set before the
//! first probe).
//!
//! # Cached reads first (`Engine::Auto`, buffered files)
//!
//! With [`Engine::Auto`] on a buffered (not `O_DIRECT`) file, a read first
//! tries `preadv2(RWF_NOWAIT)` on the calling thread: whatever the page
//! cache holds is copied at once, with one syscall and no thread hop or ring
//! bookkeeping (measured on a loaded 2-core VM: 4 KiB cached reads at queue
//! depth 1 ~1.9 µs through the ring vs ~1 µs for a bare `pread`). Only the part
//! that is not cached (`EAGAIN` or a short read) goes to the engine
//! (io_uring, else blocking), so a read never blocks the calling thread
//! on the device. The explicit engines ([`Engine::Uring`],
//! [`Engine::Blocking`]) send every operation through that engine, so the
//! test suite exercises each engine's read path on its own. Where
//! `RWF_NOWAIT` is unsupported, the first `EOPNOTSUPP` turns the fast path
//! off for that file.
//!
//! # Buffered writes inline (`Engine::Auto`, buffered files)
//!
//! With [`Engine::Auto`] on a buffered file, a write of at most
//! [`INLINE_WRITE_MAX`] bytes is a `pwrite` on the calling thread: it
//! copies into the page cache, the same work the engine's worker would do,
//! without handing the operation to another thread and waking the caller
//! again (on a 2-core VM that hand-off cost 3–4× the write itself; ext4
//! refuses `RWF_NOWAIT` for buffered writes, so there is no non-blocking
//! variant to try first). A buffered write can still block — dirty-page
//! throttling, a partial page that must be read first, journal waits — and
//! it then blocks the calling async worker. So only one write per file
//! runs inline at a time (a write arriving meanwhile goes to the engine,
//! so concurrent writers still overlap and the other workers stay free),
//! and every inline write is timed: after one that blocked in the kernel
//! (the thread's voluntary context switches went up) and took longer than
//! [`INLINE_SLOW`], the file sends its writes to the engine for
//! [`INLINE_BACKOFF_FACTOR`] times as long as that write took (at most
//! [`INLINE_BACKOFF_MAX`]), then tries inline again, so stalling inline writes keep
//! a worker blocked for about 1/17 of the time at most (for stalls up to
//! the cap's 1/16, about 60 ms). A write that was
//! only preempted does not count: on a busy 2-core machine that is common.
//! (A fixed 200 ms back-off after any write slower than 2 ms sent most of
//! a sequential overwrite through hand-offs: a few short waits on the
//! inode lock cost ~7 % of throughput.)
//! [`FileOptions::with_inline_writes`] switches this off.
//!
//! Buffered writes that go through io_uring all use one ring per file
//! (rings are otherwise per thread): the filesystem runs buffered writes to
//! one file one at a time (ext4, XFS and btrfs take the inode lock
//! exclusively), and one ring's io-wq runs them in order on one worker
//! instead of a worker per ring spinning on that lock (measured: ~8 % of
//! the CPU time of a stream of 256 KiB writes on 2 cores).
//!
//! # Ranges lent for `sendfile` (buffered files)
//!
//! [`Provider::read_file`] lends a range of a buffered file when
//! `cachestat(2)` (Linux 6.5) says the page cache holds all of it, so a
//! sender can copy it from the page cache to a socket in the kernel
//! without a copy into user space, and without waiting for the disk on
//! its own thread. A range not wholly cached, an `O_DIRECT` file, or a
//! kernel without `cachestat` is read the usual way.
//!
//! # O_DIRECT
//!
//! With [`FileOptions::direct`], the file is opened with `O_DIRECT`. Offsets
//! and lengths must then be multiples of [`DIRECT_ALIGN`] (4096); other
//! requests fail with [`Error::Invalid`] (stack a block splitter on top to
//! align them). Caller buffers need no particular alignment: misaligned ones
//! go through page-aligned bounce buffers from a small pool (one copy).
//!
//! # Semantics
//!
//! * `flush` is `fsync(2)`.
//! * `trim` punches a hole (`fallocate(PUNCH_HOLE | KEEP_SIZE)`), falling back
//!   to writing zeroes where the filesystem cannot; `write_zeroes` uses
//!   `ZERO_RANGE`, then `PUNCH_HOLE`, then writing zeroes.
//! * `cancel_writes` is a no-op: writes are handed to the kernel at once and
//!   there is nothing queued to cancel.
//! * `close` waits for every admitted operation — including ones whose caller
//!   dropped its future, which the kernel still owns — and makes later calls
//!   fail with [`Error::Closed`]. It does not imply `flush`.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;

use super::gate::{Gate, Pass};
use super::sys::{self, AlignedBuf, Kind, OpBuf};
use crate::error::{check_range, Error, Op, Result};
use crate::provider::{write_zeroes_by_writing, Capabilities, FileRange, NotShared, Now, Provider};

/// Alignment of offsets and lengths required with `O_DIRECT`.
pub const DIRECT_ALIGN: u64 = sys::DIRECT_ALIGN as u64;

/// Largest buffered write done inline on the calling thread.
pub const INLINE_WRITE_MAX: usize = 1 << 20;

/// Hands each file its own ring key ([`sys::uring::keyed`]).
static NEXT_RING_KEY: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// An inline write that blocked and took longer than this sends writes to
/// the engine for a while.
pub const INLINE_SLOW: std::time::Duration = std::time::Duration::from_millis(2);
/// Inline writes at least this large check whether they blocked (see the
/// module docs); smaller ones go by their time alone.
const INLINE_PROBE_MIN: usize = 64 << 10;
/// After a slow inline write, writes go to the engine for this many times
/// as long as it took.
pub const INLINE_BACKOFF_FACTOR: u32 = 16;
/// The longest a slow inline write sends writes to the engine.
pub const INLINE_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// Bounce buffers kept for reuse (O_DIRECT only).
const POOL_MAX: usize = 32;
/// Largest bounce buffer kept for reuse.
const POOL_MAX_BUF: usize = 4 << 20;

/// Which I/O engine a [`FileStorage`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Engine {
    /// io_uring when available (probed once per process), else blocking.
    #[default]
    Auto,
    /// io_uring; opening fails if it is unavailable.
    Uring,
    /// Positioned I/O on tokio's blocking pool.
    Blocking,
}

impl Engine {
    /// Whether io_uring can be used in this process (probed once, cached).
    /// `Err` carries the reason it cannot.
    pub fn uring_available() -> std::result::Result<(), String> {
        #[cfg(feature = "uring")]
        {
            sys::uring::global().map(|_| ())
        }
        #[cfg(not(feature = "uring"))]
        {
            Err("silo-storage was built without the `uring` feature".into())
        }
    }

    /// Submission counters of the io_uring instances (`None` if it was
    /// never created or is unavailable). Shows how well submissions batch.
    pub fn uring_stats() -> Option<UringStats> {
        #[cfg(feature = "uring")]
        {
            sys::uring::stats()
        }
        #[cfg(not(feature = "uring"))]
        {
            None
        }
    }

    fn resolve(self) -> Result<Engine> {
        match self {
            Engine::Blocking => Ok(Engine::Blocking),
            Engine::Auto => match Engine::uring_available() {
                Ok(()) => Ok(Engine::Uring),
                Err(reason) => {
                    tracing::info!(%reason, "io_uring unavailable, using positioned I/O on the blocking pool");
                    Ok(Engine::Blocking)
                }
            },
            Engine::Uring => match Engine::uring_available() {
                Ok(()) => Ok(Engine::Uring),
                Err(reason) => Err(Error::io(
                    Op::Open,
                    0,
                    0,
                    io::Error::new(
                        io::ErrorKind::Unsupported,
                        format!("io_uring engine requested but unavailable: {reason}"),
                    ),
                )),
            },
        }
    }
}

#[cfg(feature = "uring")]
pub use super::sys::uring::RingStats as UringStats;

/// Counters of the io_uring instances (always zero without the `uring`
/// feature).
#[cfg(not(feature = "uring"))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UringStats {
    /// `io_uring_enter` calls that submitted at least one entry.
    pub submit_calls: u64,
    /// Entries submitted in total.
    pub submitted: u64,
}

/// How to open a [`FileStorage`]: start from [`FileOptions::engine`] (or
/// `default()`) and adjust with the `with_*` methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct FileOptions {
    /// The I/O engine.
    pub engine: Engine,
    /// Open with `O_DIRECT` (see the module docs for the alignment rules).
    pub direct: bool,
    /// Open read-only; writes fail with [`Error::ReadOnly`].
    pub read_only: bool,
    /// With [`Engine::Auto`] on a buffered file, small writes run inline
    /// on the calling thread (see the module docs). On by default.
    pub inline_writes: bool,
}

impl Default for FileOptions {
    fn default() -> Self {
        FileOptions {
            engine: Engine::Auto,
            direct: false,
            read_only: false,
            inline_writes: true,
        }
    }
}

impl FileOptions {
    /// Options with the given engine, buffered, writable.
    pub fn engine(engine: Engine) -> Self {
        FileOptions {
            engine,
            ..FileOptions::default()
        }
    }

    /// The same options with `O_DIRECT` switched on or off.
    pub fn with_direct(mut self, direct: bool) -> Self {
        self.direct = direct;
        self
    }

    /// The same options, read-only or not.
    pub fn with_read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// The same options with inline buffered writes on or off.
    pub fn with_inline_writes(mut self, inline: bool) -> Self {
        self.inline_writes = inline;
        self
    }
}

/// A provider over a regular file or a block device.
pub struct FileStorage {
    file: Arc<File>,
    path: PathBuf,
    size: u64,
    engine: Engine,
    opts: FileOptions,
    gate: Gate,
    pool: Mutex<Vec<AlignedBuf>>,
    /// Reads try `preadv2(RWF_NOWAIT)` first (see the module docs).
    cached_first: AtomicBool,
    /// Cached ranges are lent for `sendfile` ([`Provider::read_file`]):
    /// buffered files while `cachestat(2)` works.
    file_ranges: AtomicBool,
    /// Small writes run inline (see the module docs).
    inline_writes: bool,
    /// Inline writes are off until this many ns after `opened`.
    inline_off_until: AtomicU64,
    /// Set while an inline write runs: the next one goes to the engine, so
    /// at most one async worker at a time is busy in `pwrite` and the
    /// others keep serving (concurrent writes still overlap in the engine).
    inline_busy: AtomicBool,
    /// The ring this file's buffered writes go to ([`sys::uring::keyed`]).
    ring_key: usize,
    opened: Instant,
}

impl std::fmt::Debug for FileStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStorage")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("engine", &self.engine)
            .field("direct", &self.opts.direct)
            .finish()
    }
}

fn open_err(path: &Path, e: io::Error) -> Error {
    Error::io(
        Op::Open,
        0,
        0,
        io::Error::new(e.kind(), format!("{}: {e}", path.display())),
    )
}

impl FileStorage {
    /// Creates (or truncates) `path` as a zero-filled device of `size` bytes.
    pub fn create(path: impl AsRef<Path>, size: u64, engine: Engine) -> Result<Self> {
        Self::create_with(path, size, FileOptions::engine(engine))
    }

    /// Opens an existing file (or block device); its size is the device size.
    pub fn open(path: impl AsRef<Path>, engine: Engine) -> Result<Self> {
        Self::open_with(path, FileOptions::engine(engine))
    }

    /// [`create`](Self::create) with full options.
    pub fn create_with(path: impl AsRef<Path>, size: u64, opts: FileOptions) -> Result<Self> {
        let path = path.as_ref();
        if opts.read_only {
            return Err(Error::Invalid(
                "cannot create a read-only file storage".into(),
            ));
        }
        let engine = opts.engine.resolve()?;
        let file = Self::options(opts)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| open_err(path, e))?;
        file.set_len(size).map_err(|e| open_err(path, e))?;
        Ok(Self::build(file, path, size, engine, opts))
    }

    /// [`open`](Self::open) with full options.
    pub fn open_with(path: impl AsRef<Path>, opts: FileOptions) -> Result<Self> {
        let path = path.as_ref();
        let engine = opts.engine.resolve()?;
        let mut file = Self::options(opts)
            .open(path)
            .map_err(|e| open_err(path, e))?;
        // seek(End) also works for block devices, whose metadata length is 0.
        let size = file.seek(SeekFrom::End(0)).map_err(|e| open_err(path, e))?;
        Ok(Self::build(file, path, size, engine, opts))
    }

    fn options(opts: FileOptions) -> OpenOptions {
        let mut o = OpenOptions::new();
        o.read(true).write(!opts.read_only);
        if opts.direct {
            o.custom_flags(libc::O_DIRECT);
        }
        o
    }

    fn build(file: File, path: &Path, size: u64, engine: Engine, opts: FileOptions) -> Self {
        tracing::debug!(path = %path.display(), size, ?engine, direct = opts.direct, "file storage opened");
        let cached_first = opts.engine == Engine::Auto && !opts.direct;
        let inline_writes = cached_first && opts.inline_writes && !opts.read_only;
        FileStorage {
            file: Arc::new(file),
            path: path.to_owned(),
            size,
            engine,
            opts: FileOptions { engine, ..opts },
            gate: Gate::default(),
            pool: Mutex::new(Vec::new()),
            cached_first: AtomicBool::new(cached_first),
            file_ranges: AtomicBool::new(!opts.direct),
            inline_writes,
            inline_off_until: AtomicU64::new(0),
            inline_busy: AtomicBool::new(false),
            ring_key: NEXT_RING_KEY.fetch_add(1, Ordering::Relaxed),
            opened: Instant::now(),
        }
    }

    /// The engine in use ([`Engine::Uring`] or [`Engine::Blocking`], never
    /// `Auto`).
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The path this storage was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file was opened with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.opts.direct
    }

    fn check_direct(&self, op: Op, offset: u64, len: u64) -> Result<()> {
        if self.opts.direct && (offset % DIRECT_ALIGN != 0 || len % DIRECT_ALIGN != 0) {
            return Err(Error::Invalid(format!(
                "{op} of {len} bytes at offset {offset} on {}: O_DIRECT needs offsets and lengths that are multiples of {DIRECT_ALIGN}",
                self.path.display()
            )));
        }
        Ok(())
    }

    fn bounce(&self, len: usize) -> AlignedBuf {
        let mut pool = self.pool.lock();
        if let Some(i) = pool.iter().position(|b| b.len() >= len) {
            return pool.swap_remove(i);
        }
        drop(pool);
        AlignedBuf::new(len.next_power_of_two().max(sys::DIRECT_ALIGN))
    }

    fn recycle(&self, buf: AlignedBuf) {
        let mut pool = self.pool.lock();
        if pool.len() < POOL_MAX && buf.len() <= POOL_MAX_BUF {
            pool.push(buf);
        }
    }

    fn needs_bounce(&self, ptr: *const u8) -> bool {
        self.opts.direct && (ptr as usize) % sys::DIRECT_ALIGN != 0
    }

    /// Runs one operation on the engine; the operation owns `buf` (and
    /// `pass`) until it is finished, even if this future is dropped.
    async fn submit(
        &self,
        kind: Kind,
        offset: u64,
        buf: OpBuf,
        pass: Pass,
    ) -> (io::Result<()>, OpBuf) {
        match self.engine {
            #[cfg(feature = "uring")]
            Engine::Uring => match if kind == Kind::Write && !self.opts.direct {
                sys::uring::keyed(self.ring_key)
            } else {
                sys::uring::global()
            } {
                Ok(ring) => {
                    ring.run(sys::uring::Request {
                        kind,
                        file: self.file.clone(),
                        offset,
                        buf,
                        keep: Some(Box::new(pass)),
                    })
                    .await
                }
                Err(e) => (Err(io::Error::other(e)), buf),
            },
            _ => {
                let file = self.file.clone();
                let mut buf = buf;
                let job = tokio::task::spawn_blocking(move || {
                    let r = sys::blocking_op(&file, kind, offset, &mut buf);
                    drop(pass);
                    (r, buf)
                });
                match job.await {
                    Ok(done) => done,
                    Err(e) => (Err(io::Error::other(e)), OpBuf::None),
                }
            }
        }
    }

    /// Reads `buf` (whose first `done` bytes the page cache already
    /// served) through the engine.
    async fn do_read(
        &self,
        offset: u64,
        mut buf: BytesMut,
        done: usize,
        pass: Pass,
    ) -> Result<BytesMut> {
        let len = buf.len();
        let err = |e| Error::io(Op::Read, offset, len as u64, e);
        let lost = || err(io::Error::other("read buffer lost"));
        if self.needs_bounce(buf.as_ptr()) {
            let bounce = OpBuf::Aligned(self.bounce(len), len);
            let (res, b) = self.submit(Kind::Read, offset, bounce, pass).await;
            res.map_err(err)?;
            let OpBuf::Aligned(a, _) = b else {
                return Err(lost());
            };
            buf.copy_from_slice(&a.as_slice()[..len]);
            self.recycle(a);
            return Ok(buf);
        }
        // The rest (usually all of it) through the engine; split_off and
        // unsplit keep the one allocation.
        let rest = buf.split_off(done);
        let (res, b) = self
            .submit(Kind::Read, offset + done as u64, OpBuf::Read(rest), pass)
            .await;
        res.map_err(err)?;
        match b {
            OpBuf::Read(b) => {
                buf.unsplit(b);
                Ok(buf)
            }
            _ => Err(lost()),
        }
    }

    /// The cached-reads-first step: how many leading bytes of `buf` the
    /// page cache served without blocking (0 when the fast path is off).
    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> usize {
        if !self.cached_first.load(Ordering::Relaxed) {
            return 0;
        }
        match sys::read_nowait(&self.file, buf, offset) {
            Ok(n) => n,
            Err(e) => {
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS)
                ) {
                    tracing::debug!(path = %self.path.display(), error = %e, "RWF_NOWAIT reads unsupported, sending every read to the engine");
                    self.cached_first.store(false, Ordering::Relaxed);
                }
                // EAGAIN (nothing cached) and real errors: the engine reads
                // (and reports) it.
                0
            }
        }
    }

    /// Writes `data` on the calling thread if inline writes are on (and not
    /// backing off after a slow one); gives it back otherwise.
    fn write_inline(&self, offset: u64, data: Bytes) -> std::result::Result<Result<()>, Bytes> {
        if !self.inline_writes || data.len() > INLINE_WRITE_MAX {
            return Err(data);
        }
        let start = Instant::now();
        let since_open = start.duration_since(self.opened).as_nanos() as u64;
        if since_open < self.inline_off_until.load(Ordering::Relaxed)
            || self.inline_busy.swap(true, Ordering::Acquire)
        {
            return Err(data);
        }
        use std::os::unix::fs::FileExt;
        // Two `getrusage` calls cost ~0.25 µs: asked only for writes long
        // enough that this is noise; a small write slower than
        // `INLINE_SLOW` most likely blocked anyway.
        let slept_before = if data.len() >= INLINE_PROBE_MIN {
            sys::voluntary_switches()
        } else {
            None
        };
        let r = self.file.write_all_at(&data, offset);
        let slept = match slept_before {
            Some(a) => sys::voluntary_switches() != Some(a),
            // Without the count, any slow write counts as blocked.
            None => true,
        };
        self.inline_busy.store(false, Ordering::Release);
        let took = start.elapsed();
        // Only a write that blocked in the kernel backs off: one that was
        // merely preempted (other processes on a busy machine) would have
        // cost an engine's worker thread the same.
        if slept && took > INLINE_SLOW {
            tracing::debug!(path = %self.path.display(), ?took, "slow inline write blocked, sending writes to the engine for a while");
            let backoff = (took * INLINE_BACKOFF_FACTOR).min(INLINE_BACKOFF_MAX);
            let until = since_open + (took + backoff).as_nanos() as u64;
            self.inline_off_until.store(until, Ordering::Relaxed);
        }
        Ok(r.map_err(|e| Error::io(Op::Write, offset, data.len() as u64, e)))
    }

    async fn do_write(&self, offset: u64, data: Bytes, pass: Pass) -> Result<()> {
        let data = match self.write_inline(offset, data) {
            Ok(r) => return r,
            Err(data) => data,
        };
        let len = data.len();
        let buf = if self.needs_bounce(data.as_ptr()) {
            let mut bounce = self.bounce(len);
            bounce.as_mut_slice()[..len].copy_from_slice(&data);
            OpBuf::Aligned(bounce, len)
        } else {
            OpBuf::Write(data)
        };
        let (res, b) = self.submit(Kind::Write, offset, buf, pass).await;
        if let OpBuf::Aligned(a, _) = b {
            self.recycle(a);
        }
        res.map_err(|e| Error::io(Op::Write, offset, len as u64, e))
    }

    /// fsync (`mode == None`) or fallocate through the engine.
    async fn control(
        &self,
        op: Op,
        offset: u64,
        len: u64,
        mode: Option<i32>,
    ) -> Result<io::Result<()>> {
        let pass = self.gate.enter(op)?;
        let kind = match mode {
            Some(mode) => Kind::Fallocate { mode, len },
            None => Kind::Fsync,
        };
        Ok(self.submit(kind, offset, OpBuf::None, pass).await.0)
    }

    /// Tries the fallocate modes in order; `Ok(false)` if none is supported.
    async fn fallocate_any(&self, op: Op, offset: u64, len: u64, modes: &[i32]) -> Result<bool> {
        for &mode in modes {
            match self.control(op, offset, len, Some(mode)).await? {
                Ok(()) => return Ok(true),
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
                    ) => {}
                Err(e) => return Err(Error::io(op, offset, len, e)),
            }
        }
        Ok(false)
    }

    fn writable(&self, op: Op) -> Result<()> {
        if self.opts.read_only {
            return Err(Error::ReadOnly { op });
        }
        Ok(())
    }
}

#[async_trait]
impl Provider for FileStorage {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL.with_read_only(self.opts.read_only)
    }

    fn read_file(&self, offset: u64, len: usize) -> Now<FileRange, NotShared> {
        if len == 0 || !self.file_ranges.load(Ordering::Relaxed) || self.gate.is_closed() {
            return Err(NotShared);
        }
        if let Err(e) = check_range(Op::Read, offset, len as u64, self.size) {
            return Ok(Err(e));
        }
        // Only a range the page cache holds whole: the sender copies it on
        // its own thread, which must not wait for the disk.
        match sys::all_cached(&self.file, offset, len as u64) {
            Ok(true) => Ok(Ok(FileRange {
                file: self.file.clone(),
                offset,
                len,
            })),
            Ok(false) => Err(NotShared),
            Err(e) => {
                tracing::debug!(path = %self.path.display(), error = %e, "cachestat unavailable, not lending file ranges");
                self.file_ranges.store(false, Ordering::Relaxed);
                Err(NotShared)
            }
        }
    }

    async fn read_at(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        check_range(Op::Read, offset, buf.len() as u64, self.size)?;
        let mut buf = buf;
        // Cached reads first, before admission: one served whole by the
        // page cache finishes here without the gate's Arc and shared
        // counter (four locked instructions per read). It may
        // still finish just after a concurrent `close` started; it only
        // reads an open descriptor, so nothing is harmed.
        let done = if buf.is_empty() || self.gate.is_closed() {
            0
        } else {
            self.read_cached(offset, &mut buf)
        };
        if done == buf.len() && done > 0 {
            return Ok(buf);
        }
        let pass = self.gate.enter(Op::Read)?;
        if buf.is_empty() {
            return Ok(buf);
        }
        self.check_direct(Op::Read, offset, buf.len() as u64)?;
        self.do_read(offset, buf, done, pass).await
    }

    async fn write_at(&self, offset: u64, data: Bytes) -> Result<()> {
        self.writable(Op::Write)?;
        check_range(Op::Write, offset, data.len() as u64, self.size)?;
        let pass = self.gate.enter(Op::Write)?;
        if data.is_empty() {
            return Ok(());
        }
        self.check_direct(Op::Write, offset, data.len() as u64)?;
        self.do_write(offset, data, pass).await
    }

    async fn flush(&self) -> Result<()> {
        self.gate.enter(Op::Flush)?;
        if self.opts.read_only {
            return Ok(());
        }
        self.control(Op::Flush, 0, 0, None)
            .await?
            .map_err(|e| Error::io(Op::Flush, 0, 0, e))
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.writable(Op::Trim)?;
        check_range(Op::Trim, offset, len, self.size)?;
        self.gate.enter(Op::Trim)?;
        if len == 0 {
            return Ok(());
        }
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if !self.fallocate_any(Op::Trim, offset, len, &[punch]).await? {
            write_zeroes_by_writing(self, offset, len).await?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.writable(Op::WriteZeroes)?;
        check_range(Op::WriteZeroes, offset, len, self.size)?;
        self.gate.enter(Op::WriteZeroes)?;
        if len == 0 {
            return Ok(());
        }
        let modes = [
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        ];
        if !self
            .fallocate_any(Op::WriteZeroes, offset, len, &modes)
            .await?
        {
            write_zeroes_by_writing(self, offset, len).await?;
        }
        Ok(())
    }

    fn cancel_writes(&self, _offset: u64, _len: u64) {}

    async fn close(&self) -> Result<()> {
        self.gate.close().await;
        self.pool.lock().clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::os::unix::fs::FileExt;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 + i / 4096) as u8).collect()
    }

    /// `Engine::Auto` reads cached data inline and the rest through the
    /// engine: fully cached, not cached at all, and cached only at the
    /// start (a short `RWF_NOWAIT` read continued by the engine) all
    /// return the file's bytes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn auto_reads_cached_uncached_and_partly_cached() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data = pattern(1 << 20);
        std::fs::write(&path, &data).unwrap();
        let f = FileStorage::open(&path, Engine::Auto).unwrap();
        assert!(f.cached_first.load(Ordering::Relaxed));
        let raw = File::open(&path).unwrap();
        let check = |b: &BytesMut, off: usize| {
            assert!(b[..] == data[off..off + b.len()], "bytes at {off} differ");
        };

        // Fully cached (just written).
        let b = f.read_at(4096, BytesMut::zeroed(65536)).await.unwrap();
        check(&b, 4096);

        // Nothing cached. (Under a loaded parallel test run the kernel
        // may keep a page for a moment after the fadvise: try a few times.)
        let mut probe = vec![0u8; 4096];
        let mut cold = Ok(0);
        for _ in 0..20 {
            sys::drop_cached(&raw).unwrap();
            cold = sys::read_nowait(&raw, &mut probe, 512 << 10);
            if cold.is_err() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(
            matches!(&cold, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "dropped pages still cached: {cold:?}"
        );
        let b = f.read_at(512 << 10, BytesMut::zeroed(65536)).await.unwrap();
        check(&b, 512 << 10);

        // Only the first page cached: the inline read is short and the
        // engine reads the rest into the same buffer.
        sys::drop_cached(&raw).unwrap();
        raw.read_exact_at(&mut probe, 0).unwrap();
        // (Readahead caches a little more than the page read, far less than
        // the whole file.)
        let mut whole = vec![0u8; data.len()];
        let n = sys::read_nowait(&raw, &mut whole, 0).unwrap();
        assert!(
            (4096..data.len()).contains(&n),
            "want a short inline read, got {n} bytes"
        );
        let b = f.read_at(0, BytesMut::zeroed(data.len())).await.unwrap();
        check(&b, 0);
    }

    /// A cached range of a buffered file is lent as the file's own bytes;
    /// out-of-range requests fail; uncached ranges, `O_DIRECT` files and
    /// closed providers are read the usual way.
    #[tokio::test]
    async fn cached_ranges_are_lent_as_file_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = FileStorage::create(&path, 1 << 20, Engine::Auto).unwrap();
        let data = Bytes::from(pattern(256 << 10));
        f.write_at(64 << 10, data.clone()).await.unwrap();
        let r = match f.read_file(64 << 10, data.len()) {
            Ok(r) => r.unwrap(),
            Err(NotShared) => {
                // A kernel older than 6.5 has no cachestat: then nothing
                // is ever lent, which is what must hold.
                assert!(
                    !f.file_ranges.load(Ordering::Relaxed),
                    "cached range not lent"
                );
                return;
            }
        };
        assert_eq!((r.offset, r.len), (64 << 10, data.len()));
        let mut got = vec![0u8; r.len];
        r.file.read_exact_at(&mut got, r.offset).unwrap();
        assert!(got == data[..], "lent range holds other bytes");
        assert!(matches!(
            f.read_file((1 << 20) - 4096, 8192),
            Ok(Err(Error::OutOfRange { .. }))
        ));
        assert!(
            f.read_file(0, 0).is_err(),
            "nothing to lend for an empty read"
        );

        // Not cached (retried: a loaded machine may keep a page a moment).
        let raw = File::open(&path).unwrap();
        let mut lent = true;
        for _ in 0..20 {
            sys::drop_cached(&raw).unwrap();
            lent = f.read_file(64 << 10, data.len()).is_ok();
            if !lent {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!lent, "an uncached range was lent");
        assert!(f.file_ranges.load(Ordering::Relaxed));

        f.close().await.unwrap();
        assert!(
            f.read_file(0, 4096).is_err(),
            "closed provider lent a range"
        );

        if let Ok(d) = FileStorage::create_with(
            dir.path().join("d"),
            1 << 20,
            FileOptions::engine(Engine::Auto).with_direct(true),
        ) {
            assert!(d.read_file(0, 4096).is_err(), "O_DIRECT file lent a range");
        }
    }

    /// With `Engine::Auto` on a buffered file a small write finishes on
    /// the first poll (it ran on this thread); switched off, or larger than
    /// `INLINE_WRITE_MAX`, it still lands. Every write reads back.
    #[test]
    fn auto_writes_small_buffered_writes_inline() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let size = 4 * INLINE_WRITE_MAX as u64;
        let f = FileStorage::create(&path, size, Engine::Auto).unwrap();
        let data = Bytes::from(pattern(10_000));
        {
            let mut fut = std::pin::pin!(f.write_at(1234, data.clone()));
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            match fut.as_mut().poll(&mut cx) {
                std::task::Poll::Ready(r) => r.unwrap(),
                std::task::Poll::Pending => panic!("a small buffered write did not run inline"),
            }
        }
        let off = FileStorage::create_with(
            dir.path().join("g"),
            size,
            FileOptions::engine(Engine::Auto).with_inline_writes(false),
        )
        .unwrap();
        assert!(!off.inline_writes && f.inline_writes);
        let big = Bytes::from(pattern(INLINE_WRITE_MAX + 4096));
        rt.block_on(async {
            off.write_at(1234, data.clone()).await.unwrap();
            f.write_at(INLINE_WRITE_MAX as u64, big.clone())
                .await
                .unwrap();
            let back = f.read_at(1234, BytesMut::zeroed(data.len())).await.unwrap();
            assert_eq!(&back[..], &data[..]);
            let back = off
                .read_at(1234, BytesMut::zeroed(data.len()))
                .await
                .unwrap();
            assert_eq!(&back[..], &data[..]);
            let back = f
                .read_at(INLINE_WRITE_MAX as u64, BytesMut::zeroed(big.len()))
                .await
                .unwrap();
            assert_eq!(&back[..], &big[..]);
        });
        // Read-only and O_DIRECT files never write inline.
        let ro = FileStorage::open_with(
            &path,
            FileOptions::engine(Engine::Auto).with_read_only(true),
        )
        .unwrap();
        assert!(!ro.inline_writes);
    }

    /// The explicit engines never take the inline path, so the suite tests
    /// their own read paths; O_DIRECT never does either.
    #[test]
    fn explicit_engines_and_direct_skip_cached_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        for (opts, want) in [
            (FileOptions::engine(Engine::Auto), true),
            (FileOptions::engine(Engine::Blocking), false),
            (FileOptions::engine(Engine::Uring), false),
            (FileOptions::engine(Engine::Auto).with_direct(true), false),
        ] {
            let f = match FileStorage::create_with(&path, 8192, opts) {
                Ok(f) => f,
                // io_uring or O_DIRECT unavailable here: nothing to check.
                Err(e) => {
                    tracing::warn!(?opts, error = %e, "cannot open, case skipped");
                    continue;
                }
            };
            assert_eq!(f.cached_first.load(Ordering::Relaxed), want, "{opts:?}");
        }
    }
}
