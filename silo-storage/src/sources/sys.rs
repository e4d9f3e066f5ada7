//! The only place in `silo-storage` with `unsafe` code: the kernel
//! interfaces the file sources need and `std` does not wrap.
//!
//! * [`fallocate`]: punch holes / zero ranges (trim, write-zeroes).
//! * [`AlignedBuf`]: page-aligned heap memory for `O_DIRECT` bounce buffers.
//! * [`uring`] (feature `uring`): a few io_uring instances per process (one
//!   per CPU), shared by every [`FileStorage`](super::FileStorage) using the
//!   io_uring engine.
//!
//! Every `unsafe` block carries a `// SAFETY:` comment.
#![allow(unsafe_code)]

use std::alloc::Layout;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

use bytes::{Bytes, BytesMut};

/// `fallocate(2)` on `file`.
pub(crate) fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let off = i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let len = i64::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    loop {
        // SAFETY: plain syscall on a file descriptor kept open by `file` for
        // the duration of the call; no memory is passed to the kernel.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `preadv2(RWF_NOWAIT)`: reads into `buf` what the page cache can serve
/// without blocking. `Ok(n)` may be short (only part cached) or 0 (end of
/// file); nothing cached is `Err(WouldBlock)`; a kernel or file system
/// without `RWF_NOWAIT` gives `EOPNOTSUPP`/`EINVAL`/`ENOSYS`.
pub(crate) fn read_nowait(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let off =
            i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        loop {
            // SAFETY: the iovec points at `buf`, valid for writes of
            // `buf.len()` bytes and exclusively borrowed for the duration of
            // this synchronous call; the descriptor is kept open by `file`.
            let r = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
            if r >= 0 {
                return Ok(r as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = (file, buf, offset);
        Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }
}

/// Whether every page of `[offset, offset + len)` of `file` is in the page
/// cache, from `cachestat(2)` (Linux 6.5; it counts the pages without
/// touching the data). `Err` where the call is unavailable (`ENOSYS`) or
/// fails; the caller then reads the usual way.
pub(crate) fn all_cached(file: &File, offset: u64, len: u64) -> io::Result<bool> {
    #[cfg(target_os = "linux")]
    {
        /// `cachestat`'s number, the same on every architecture (it came
        /// after the tables were unified).
        const SYS_CACHESTAT: libc::c_long = 451;
        #[repr(C)]
        struct Range {
            off: u64,
            len: u64,
        }
        #[repr(C)]
        #[derive(Default)]
        struct Stat {
            nr_cache: u64,
            nr_dirty: u64,
            nr_writeback: u64,
            nr_evicted: u64,
            nr_recently_evicted: u64,
        }
        if len == 0 {
            return Ok(true);
        }
        let page = 4096u64;
        let first = offset / page;
        let pages = (offset + len).div_ceil(page) - first;
        let range = Range {
            off: first * page,
            len: pages * page,
        };
        let mut stat = Stat::default();
        // SAFETY: `range` and `stat` are live, properly aligned `repr(C)`
        // structs matching the kernel's `cachestat_range` and `cachestat`
        // for the duration of this synchronous call, which only reads the
        // first and writes the second; the descriptor is kept open by `file`.
        let r = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                file.as_raw_fd(),
                &range as *const Range,
                &mut stat as *mut Stat,
                0u32,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stat.nr_cache >= pages)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (file, offset, len);
        Err(io::Error::from_raw_os_error(libc::ENOSYS))
    }
}

/// How many times the calling thread has given up the CPU voluntarily
/// (slept in the kernel: waited for a lock, I/O or writeback throttling),
/// from `getrusage(RUSAGE_THREAD)`; `None` where that is unavailable.
/// Preemption is not counted, so a difference across a call tells that the
/// call blocked, not that the machine was busy.
pub(crate) fn voluntary_switches() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: `rusage` is plain old data for which all-zero bytes are a
        // valid value.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `ru` is a valid, exclusively borrowed `rusage` the kernel
        // fills during this synchronous call.
        let r = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
        (r == 0).then_some(ru.ru_nvcsw as u64)
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// `posix_fadvise(DONTNEED)` over the whole file: drops its clean cached
/// pages (tests use it to make reads miss the page cache).
#[cfg(test)]
pub(crate) fn drop_cached(file: &File) -> io::Result<()> {
    file.sync_all()?;
    // SAFETY: plain syscall on a descriptor kept open by `file`; no memory
    // is passed to the kernel.
    let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(r))
    }
}

/// The buffer an operation owns while the kernel may use it.
pub(crate) enum OpBuf {
    /// Nothing (fsync, fallocate).
    None,
    /// Destination of a read.
    Read(BytesMut),
    /// Source of a write.
    Write(Bytes),
    /// Aligned bounce buffer (O_DIRECT), read into or written from.
    Aligned(AlignedBuf, usize),
}

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Read into the buffer.
    Read,
    /// Write from the buffer.
    Write,
    /// fsync the file.
    Fsync,
    /// fallocate(mode) over `len` bytes.
    Fallocate {
        /// fallocate mode flags.
        mode: i32,
        /// Length of the range.
        len: u64,
    },
}

impl OpBuf {
    /// Bytes to transfer.
    pub(crate) fn len(&self) -> usize {
        match self {
            OpBuf::None => 0,
            OpBuf::Read(b) => b.len(),
            OpBuf::Write(b) => b.len(),
            OpBuf::Aligned(_, n) => *n,
        }
    }
}

/// Runs one operation with positioned I/O on the calling thread (the
/// blocking engine).
pub(crate) fn blocking_op(file: &File, kind: Kind, offset: u64, buf: &mut OpBuf) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    match (kind, buf) {
        (Kind::Read, OpBuf::Read(b)) => file.read_exact_at(b, offset),
        (Kind::Read, OpBuf::Aligned(b, n)) => {
            file.read_exact_at(&mut b.as_mut_slice()[..*n], offset)
        }
        (Kind::Write, OpBuf::Write(b)) => file.write_all_at(b, offset),
        (Kind::Write, OpBuf::Aligned(b, n)) => file.write_all_at(&b.as_slice()[..*n], offset),
        (Kind::Fsync, _) => file.sync_all(),
        (Kind::Fallocate { mode, len }, _) => fallocate(file, mode, offset, len),
        (Kind::Read | Kind::Write, _) => Err(io::Error::other("read/write without a buffer")),
    }
}

/// Alignment of [`AlignedBuf`] (enough for `O_DIRECT` on every common
/// device: logical blocks are 512 or 4096 bytes).
pub(crate) const DIRECT_ALIGN: usize = 4096;

/// A zero-initialised heap buffer aligned to [`DIRECT_ALIGN`].
pub(crate) struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like a Box<[u8]>);
// moving it to another thread moves that ownership.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`, which is Sync.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (`len > 0`).
    pub(crate) fn new(len: usize) -> AlignedBuf {
        let layout = Layout::from_size_align(len.max(1), DIRECT_ALIGN).expect("valid layout");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, layout }
    }

    /// Capacity in bytes.
    pub(crate) fn len(&self) -> usize {
        self.layout.size()
    }

    /// The bytes.
    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for layout.size() initialised bytes for as
        // long as self lives; the borrow ties the slice to self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    /// The bytes, mutably.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated with exactly this layout and is freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

#[cfg(feature = "uring")]
pub(crate) mod uring {
    //! A few io_uring instances per process (one per CPU, each thread uses
    //! one), shared by every file using the io_uring engine.
    //!
    //! # How an operation travels
    //!
    //! 1. The task takes a permit (bounds in-flight operations to the
    //!    completion queue size), stores the operation — including the buffer
    //!    it owns and whatever must stay alive (the `File`, a close guard) —
    //!    in the op table, and pushes a submission entry.
    //! 2. It yields once, so that other tasks on the same worker can push
    //!    theirs, then enters the kernel with *all* pending entries (whoever
    //!    gets the enter lock submits everybody's entries: at queue depth 32
    //!    the kernel sees batches, at queue depth 1 a cached read completes
    //!    inline in that same `io_uring_enter`).
    //! 3. It reaps the completion queue and delivers every completion it
    //!    finds through the op's oneshot channel. Operations the kernel
    //!    completes later (writes punted to io-wq, device reads) are reaped by
    //!    a dedicated reaper thread that sleeps in `io_uring_enter` while
    //!    anything is in flight. A lone operation (nothing else in flight on
    //!    the ring) first waits up to 50 µs for its completion on its own
    //!    thread, so a short one costs one wake-up instead of two in series.
    //! 4. Short transfers are resubmitted for the rest; `EAGAIN`/`EINTR` are
    //!    retried.
    //!
    //! # Soundness
    //!
    //! The kernel only ever sees pointers into buffers owned by the op table
    //! entry. The entry is removed exactly when its final completion is
    //! reaped, so a caller dropping its future cannot free a buffer the kernel
    //! still uses: the buffer then simply dies with the entry, after the
    //! kernel is done with it.

    use std::any::Any;
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
    use std::sync::{Arc, OnceLock};

    use io_uring::{opcode, squeue, types, IoUring};
    use parking_lot::{Condvar, Mutex};
    use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

    use super::{Kind, OpBuf};

    /// Submission queue entries of each ring.
    const RING_ENTRIES: u32 = 256;
    /// `io_uring_enter` flag: wait for completions.
    const IORING_ENTER_GETEVENTS: u32 = 1;
    /// Largest single read/write submitted at once (larger ones continue as
    /// "short" transfers).
    const MAX_CHUNK: usize = 1 << 30;
    /// How long a lone operation that did not complete inside
    /// `io_uring_enter` waits for its completion on the submitting thread
    /// (see [`Ring::wait_briefly`]).
    const INLINE_WAIT_NS: u32 = 50_000;

    /// An operation handed to the ring.
    pub(crate) struct Request {
        /// What to do.
        pub kind: Kind,
        /// File to do it on (kept alive until the kernel is done).
        pub file: Arc<File>,
        /// Byte offset in the file.
        pub offset: u64,
        /// The buffer (moved in, handed back on completion).
        pub buf: OpBuf,
        /// Anything that must live until the kernel completes (close guard).
        pub keep: Option<Box<dyn Any + Send>>,
    }

    /// What comes back: the result and the buffer.
    pub(crate) type Completion = (io::Result<()>, OpBuf);

    struct Slot {
        req: Request,
        done: usize,
        tx: oneshot::Sender<Completion>,
        _permit: OwnedSemaphorePermit,
    }

    impl Slot {
        fn buf_len(&self) -> usize {
            self.req.buf.len()
        }

        /// The submission entry for what remains of this operation.
        fn entry(&mut self, user_data: u64) -> squeue::Entry {
            let fd = types::Fd(self.req.file.as_raw_fd());
            let offset = self.req.offset + self.done as u64;
            let rest = (self.buf_len() - self.done).min(MAX_CHUNK) as u32;
            let done = self.done;
            let e = match (self.req.kind, &mut self.req.buf) {
                (Kind::Read, OpBuf::Read(b)) => opcode::Read::new(fd, b[done..].as_mut_ptr(), rest)
                    .offset(offset)
                    .build(),
                (Kind::Read, OpBuf::Aligned(b, _)) => {
                    opcode::Read::new(fd, b.as_mut_slice()[done..].as_mut_ptr(), rest)
                        .offset(offset)
                        .build()
                }
                (Kind::Write, OpBuf::Write(b)) => opcode::Write::new(fd, b[done..].as_ptr(), rest)
                    .offset(offset)
                    .build(),
                (Kind::Write, OpBuf::Aligned(b, _)) => {
                    opcode::Write::new(fd, b.as_slice()[done..].as_ptr(), rest)
                        .offset(offset)
                        .build()
                }
                (Kind::Fsync, _) => opcode::Fsync::new(fd).build(),
                (Kind::Fallocate { mode, len }, _) => opcode::Fallocate::new(fd, len)
                    .offset(offset)
                    .mode(mode)
                    .build(),
                (Kind::Read | Kind::Write, _) => opcode::Nop::new().build(),
            };
            e.user_data(user_data)
        }
    }

    /// A tiny slab: op table indexed by user_data.
    #[derive(Default)]
    struct Table {
        slots: Vec<Option<Slot>>,
        free: Vec<usize>,
    }

    impl Table {
        fn insert(&mut self, s: Slot) -> usize {
            match self.free.pop() {
                Some(i) => {
                    self.slots[i] = Some(s);
                    i
                }
                None => {
                    self.slots.push(Some(s));
                    self.slots.len() - 1
                }
            }
        }
        fn remove(&mut self, i: usize) -> Option<Slot> {
            let s = self.slots.get_mut(i)?.take();
            if s.is_some() {
                self.free.push(i);
            }
            s
        }
    }

    /// One ring with its op table and reaper.
    pub(crate) struct Ring {
        ring: IoUring,
        /// Guards the submission queue (pushing entries).
        sq: Mutex<()>,
        /// Guards the completion queue (reaping) and the op table.
        table: Mutex<Table>,
        /// Held by whoever is inside a submitting `io_uring_enter`.
        enter: Mutex<()>,
        /// Bounds in-flight operations.
        permits: Arc<Semaphore>,
        /// Operations submitted and not yet finally completed.
        inflight: AtomicUsize,
        /// Entries the kernel has accepted and not yet completed (can dip
        /// below zero briefly: a completion may be reaped before its
        /// submitter adds the count).
        in_kernel: AtomicI64,
        park: Mutex<()>,
        wake: Condvar,
        /// `io_uring_enter` calls that submitted entries.
        enters: AtomicU64,
        /// Entries submitted by those calls.
        submitted: AtomicU64,
        /// The kernel takes a timeout with `io_uring_enter`
        /// (`IORING_FEAT_EXT_ARG`, Linux 5.11).
        ext_arg: bool,
    }

    /// Submission counters of the rings.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct RingStats {
        /// `io_uring_enter` calls that submitted at least one entry.
        pub submit_calls: u64,
        /// Entries submitted in total (`submitted / submit_calls` is the
        /// average batch size).
        pub submitted: u64,
    }

    /// Rings: one per CPU (at most [`MAX_RINGS`]); each thread uses one,
    /// assigned round-robin on first use, so inline completions (cached
    /// reads run inside `io_uring_enter`, under the ring's lock) proceed on
    /// every core in parallel instead of queueing behind one ring.
    static RINGS: OnceLock<Result<Vec<&'static Ring>, String>> = OnceLock::new();
    const MAX_RINGS: usize = 8;
    static NEXT_THREAD: AtomicUsize = AtomicUsize::new(0);

    thread_local! {
        static THREAD_INDEX: usize = NEXT_THREAD.fetch_add(1, Ordering::Relaxed);
    }

    fn rings() -> Result<&'static [&'static Ring], String> {
        let rings = RINGS.get_or_init(|| {
            if std::env::var("SILO_URING").is_ok_and(|v| v == "off") {
                return Err("io_uring disabled by SILO_URING=off".into());
            }
            let n = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .clamp(1, MAX_RINGS);
            (0..n)
                .map(|i| {
                    let r: &'static Ring = Box::leak(Box::new(Ring::new()?));
                    std::thread::Builder::new()
                        .name(format!("silo-uring-{i}"))
                        .spawn(move || r.reaper())
                        .map_err(|e| format!("cannot start the io_uring reaper thread: {e}"))?;
                    Ok(r)
                })
                .collect()
        });
        match rings {
            Ok(v) => Ok(v),
            Err(e) => Err(e.clone()),
        }
    }

    /// The calling thread's ring, creating (and probing) the rings on first
    /// use. An error means io_uring is unusable here (old kernel, seccomp,
    /// missing opcodes); the result is cached for the process.
    pub(crate) fn global() -> Result<&'static Ring, String> {
        let rings = rings()?;
        Ok(rings[THREAD_INDEX.with(|i| *i) % rings.len()])
    }

    /// Ring number `key` (modulo the number of rings): what keeps the
    /// buffered writes of one file on one ring, whose io-wq then runs them
    /// one at a time (it serialises buffered writes per inode), instead of
    /// a worker per ring spinning on the inode lock the filesystem takes
    /// for each of them anyway.
    pub(crate) fn keyed(key: usize) -> Result<&'static Ring, String> {
        let rings = rings()?;
        Ok(rings[key % rings.len()])
    }

    /// Counters summed over all rings.
    pub(crate) fn stats() -> Option<RingStats> {
        let rings = rings().ok()?;
        Some(rings.iter().fold(RingStats::default(), |a, r| {
            let s = r.stats();
            RingStats {
                submit_calls: a.submit_calls + s.submit_calls,
                submitted: a.submitted + s.submitted,
            }
        }))
    }

    impl Ring {
        fn new() -> Result<Ring, String> {
            let ring = IoUring::new(RING_ENTRIES).map_err(|e| format!("io_uring_setup: {e}"))?;
            let mut probe = io_uring::Probe::new();
            ring.submitter()
                .register_probe(&mut probe)
                .map_err(|e| format!("io_uring probe: {e}"))?;
            for (name, code) in [
                ("read", opcode::Read::CODE),
                ("write", opcode::Write::CODE),
                ("fsync", opcode::Fsync::CODE),
                ("fallocate", opcode::Fallocate::CODE),
            ] {
                if !probe.is_supported(code) {
                    return Err(format!("io_uring lacks the {name} opcode"));
                }
            }
            let cq = ring.params().cq_entries() as usize;
            let ext_arg = ring.params().is_feature_ext_arg();
            let r = Ring {
                ring,
                sq: Mutex::new(()),
                table: Mutex::new(Table::default()),
                enter: Mutex::new(()),
                permits: Arc::new(Semaphore::new(cq.min(2 * RING_ENTRIES as usize))),
                inflight: AtomicUsize::new(0),
                in_kernel: AtomicI64::new(0),
                park: Mutex::new(()),
                wake: Condvar::new(),
                enters: AtomicU64::new(0),
                submitted: AtomicU64::new(0),
                ext_arg,
            };
            // A NOP round trip: catches seccomp profiles that allow setup but
            // not io_uring_enter.
            r.push(&[opcode::Nop::new().build().user_data(u64::MAX)]);
            r.ring
                .submitter()
                .submit_and_wait(1)
                .map_err(|e| format!("io_uring_enter: {e}"))?;
            {
                let _t = r.table.lock();
                // SAFETY: the table lock serialises all completion-queue access.
                let mut cq = unsafe { r.ring.completion_shared() };
                for cqe in &mut cq {
                    if cqe.result() < 0 {
                        return Err(format!(
                            "io_uring NOP failed: {}",
                            io::Error::from_raw_os_error(-cqe.result())
                        ));
                    }
                }
            }
            Ok(r)
        }

        /// Runs one operation to completion (including resubmission of
        /// short transfers) and hands back its buffer.
        pub(crate) async fn run(&'static self, req: Request) -> Completion {
            let valid = matches!(
                (req.kind, &req.buf),
                (Kind::Read, OpBuf::Read(_) | OpBuf::Aligned(..))
                    | (Kind::Write, OpBuf::Write(_) | OpBuf::Aligned(..))
                    | (Kind::Fsync | Kind::Fallocate { .. }, _)
            );
            if !valid {
                return (
                    Err(io::Error::other("operation without a matching buffer")),
                    req.buf,
                );
            }
            let permit = match self.permits.clone().acquire_owned().await {
                Ok(p) => p,
                Err(_) => return (Err(io::Error::other("io_uring closed")), req.buf),
            };
            let (tx, rx) = oneshot::channel();
            let entry = {
                let mut t = self.table.lock();
                let idx = t.insert(Slot {
                    req,
                    done: 0,
                    tx,
                    _permit: permit,
                });
                let slot = t.slots[idx].as_mut().expect("just inserted");
                slot.entry(idx as u64)
            };
            self.inflight.fetch_add(1, Ordering::SeqCst);
            self.push(&[entry]);
            // Whatever happens to this future from here on, the entry gets
            // submitted: either below, or by the guard when dropped early.
            // With other operations in flight, yield once so the tasks
            // woken by the last reap can push theirs and one enter submits
            // them all; alone (queue depth 1), submit at once.
            if self.inflight.load(Ordering::SeqCst) > 1 {
                let guard = SubmitOnDrop(self);
                tokio::task::yield_now().await;
                std::mem::forget(guard);
            }
            self.submit_and_reap();
            let mut rx = rx;
            if self.ext_arg && self.inflight.load(Ordering::SeqCst) == 1 {
                match rx.try_recv() {
                    Ok(c) => return c,
                    Err(oneshot::error::TryRecvError::Empty) => self.wait_briefly(),
                    Err(oneshot::error::TryRecvError::Closed) => {}
                }
            }
            match rx.await {
                Ok(c) => c,
                // The slot is only dropped unsent if the ring itself dies.
                Err(_) => (
                    Err(io::Error::other("io_uring operation lost")),
                    OpBuf::None,
                ),
            }
        }

        /// Pushes entries onto the submission queue (submitting first when
        /// it is full).
        fn push(&self, entries: &[squeue::Entry]) {
            let _g = self.sq.lock();
            for e in entries {
                loop {
                    // SAFETY: the sq lock serialises every access to the
                    // submission queue, so no other SubmissionQueue exists.
                    let mut sq = unsafe { self.ring.submission_shared() };
                    // SAFETY: the entry's pointers reference buffers owned by
                    // its op-table slot, which lives until the final
                    // completion of that entry is reaped.
                    if unsafe { sq.push(e) }.is_ok() {
                        sq.sync();
                        break;
                    }
                    drop(sq);
                    if let Err(err) = self.ring.submitter().submit() {
                        tracing::warn!(error = %err, "io_uring submit with a full queue failed");
                        std::thread::yield_now();
                    }
                }
            }
        }

        fn sq_pending(&self) -> bool {
            let _g = self.sq.lock();
            // SAFETY: the sq lock is held, see push.
            let sq = unsafe { self.ring.submission_shared() };
            !sq.is_empty()
        }

        /// Submits everything pending (combining concurrent callers into
        /// one `io_uring_enter`) and delivers every completion found.
        fn submit_and_reap(&self) {
            // Nothing pending: a task that resumed earlier submitted our
            // entry with its own (and reaped what completed inline).
            while self.sq_pending() {
                // If someone else is inside enter, they check the queue
                // again after leaving it and submit our entries: our push
                // happened before this failed try_lock.
                let Some(g) = self.enter.try_lock() else {
                    return;
                };
                let r = self.ring.submitter().submit();
                drop(g);
                self.count(&r);
                if let Err(e) = r {
                    if !matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)
                    ) {
                        tracing::error!(error = %e, "io_uring_enter failed");
                    }
                }
                self.reap();
            }
            self.wake_reaper();
        }

        /// A lone operation the kernel did not complete inline (a buffered
        /// write punted to io-wq, a read from the device) waits up to
        /// [`INLINE_WAIT_NS`] for its completion right here, so that a
        /// short one costs one wake-up (kernel → this thread) instead of
        /// two in series (kernel → reaper → the task's worker), which on a
        /// VM is tens of microseconds. Longer ones are left to the reaper
        /// as before. Blocks the calling thread at most that long, and only
        /// when nothing else is in flight on the ring.
        fn wait_briefly(&self) {
            if let Some(g) = self.enter.try_lock() {
                let ts = types::Timespec::new().nsec(INLINE_WAIT_NS);
                let args = types::SubmitArgs::new().timespec(&ts);
                let r = self.ring.submitter().submit_with_args(1, &args);
                drop(g);
                self.count(&r);
                if let Err(e) = r {
                    if !matches!(
                        e.raw_os_error(),
                        Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
                    ) {
                        tracing::warn!(error = %e, "io_uring timed wait failed");
                    }
                }
            }
            // Delivers what completed (ours included) and submits anything
            // pushed meanwhile by others, who skipped the enter while we
            // held it.
            self.submit_and_reap();
            self.reap();
        }

        /// Lets the reaper wait for entries the kernel completes
        /// asynchronously (io-wq, device I/O).
        fn wake_reaper(&self) {
            if self.in_kernel.load(Ordering::SeqCst) > 0 {
                let _p = self.park.lock();
                self.wake.notify_one();
            }
        }

        fn count(&self, r: &io::Result<usize>) {
            if let Ok(n) = r {
                if *n > 0 {
                    self.in_kernel.fetch_add(*n as i64, Ordering::SeqCst);
                    self.enters.fetch_add(1, Ordering::Relaxed);
                    self.submitted.fetch_add(*n as u64, Ordering::Relaxed);
                }
            }
        }

        /// Submission counters.
        pub(crate) fn stats(&self) -> RingStats {
            RingStats {
                submit_calls: self.enters.load(Ordering::Relaxed),
                submitted: self.submitted.load(Ordering::Relaxed),
            }
        }

        /// Delivers every available completion; resubmits short transfers.
        fn reap(&self) {
            let mut again = Vec::new();
            {
                let mut t = self.table.lock();
                // SAFETY: the table lock serialises all completion-queue access.
                let mut cq = unsafe { self.ring.completion_shared() };
                cq.sync();
                for cqe in &mut cq {
                    let ud = cqe.user_data();
                    if ud == u64::MAX {
                        continue;
                    }
                    self.in_kernel.fetch_sub(1, Ordering::SeqCst);
                    let idx = ud as usize;
                    let res = cqe.result();
                    let Some(slot) = t.slots.get_mut(idx).and_then(Option::as_mut) else {
                        tracing::error!(user_data = ud, "io_uring completion for an unknown op");
                        continue;
                    };
                    let outcome: Option<io::Result<()>> = if res < 0 {
                        if res == -libc::EAGAIN || res == -libc::EINTR {
                            None
                        } else {
                            Some(Err(io::Error::from_raw_os_error(-res)))
                        }
                    } else {
                        match slot.req.kind {
                            Kind::Read | Kind::Write if res == 0 && slot.buf_len() > slot.done => {
                                Some(Err(if slot.req.kind == Kind::Read {
                                    io::Error::from(io::ErrorKind::UnexpectedEof)
                                } else {
                                    io::Error::from(io::ErrorKind::WriteZero)
                                }))
                            }
                            Kind::Read | Kind::Write => {
                                slot.done += res as usize;
                                (slot.done >= slot.buf_len()).then_some(Ok(()))
                            }
                            _ => Some(Ok(())),
                        }
                    };
                    match outcome {
                        None => again.push(slot.entry(ud)),
                        Some(r) => {
                            let slot = t.remove(idx).expect("slot present");
                            self.inflight.fetch_sub(1, Ordering::SeqCst);
                            let Slot { req, tx, .. } = slot;
                            let Request { buf, keep, .. } = req;
                            // A dropped receiver means the caller went away;
                            // the buffer is freed here, after the kernel is done.
                            let _ = tx.send((r, buf));
                            drop(keep);
                        }
                    }
                }
            }
            if !again.is_empty() {
                self.push(&again);
                let r = self.ring.submitter().submit();
                self.count(&r);
                if let Err(e) = r {
                    tracing::warn!(error = %e, "io_uring resubmission enter failed");
                }
            }
        }

        /// The reaper thread: waits in the kernel while anything is in
        /// flight and delivers completions the submitters did not see. It
        /// never submits (submitting is the tasks' job, so that their
        /// entries batch and cached reads complete inline on their thread).
        fn reaper(&self) {
            loop {
                {
                    let mut p = self.park.lock();
                    while self.in_kernel.load(Ordering::SeqCst) <= 0 {
                        self.wake.wait(&mut p);
                    }
                }
                // SAFETY: a plain wait (no submissions, no argument): it
                // touches no memory of ours; the completion queue is read
                // afterwards under the table lock.
                let r = unsafe {
                    self.ring.submitter().enter::<libc::sigset_t>(
                        0,
                        1,
                        IORING_ENTER_GETEVENTS,
                        None,
                    )
                };
                if let Err(e) = r {
                    if !matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)
                    ) {
                        tracing::error!(error = %e, "io_uring reaper enter failed");
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
                self.reap();
            }
        }
    }

    /// Submits pending entries if a `run` future is dropped before it
    /// submitted its own, so no entry is left unsubmitted.
    struct SubmitOnDrop(&'static Ring);

    impl Drop for SubmitOnDrop {
        fn drop(&mut self) {
            self.0.submit_and_reap();
        }
    }
}
