//! The provider trait every source and module implements.
//!
//! # Contract
//!
//! * **Ranges are checked at the edge.** A request that does not lie entirely
//!   inside `[0, size())` fails with [`Error::OutOfRange`](crate::Error::OutOfRange); nothing is
//!   truncated silently and nothing panics. Zero-length requests inside (or at
//!   the end of) the device succeed and do nothing.
//! * **Buffers are owned while I/O is in flight.** [`Provider::read_at`] takes a
//!   [`BytesMut`] whose *length* is the number of bytes to read and gives it
//!   back filled; [`Provider::write_at`] takes [`Bytes`]. Because the operation
//!   owns the buffer, a kernel submission (io_uring) stays sound even when the
//!   caller drops its future, and a block read for sending can be frozen into
//!   `Bytes` and put on the wire without a copy.
//! * **Reads and writes are all-or-nothing** from the caller's point of view:
//!   `Ok` means every byte was transferred.
//! * **Trim** deallocates where the provider can; afterwards the range reads
//!   as zeroes on every silo provider (stronger than NBD requires, and what a
//!   migration needs to stay deterministic).
//! * **`cancel_writes(offset, len)`** is a hint: writes to that range that
//!   are in flight *may* fail with [`Error::Cancelled`](crate::Error::Cancelled); writes not yet issued
//!   are unaffected. Providers with nothing to cancel ignore it.
//! * **`flush`** returns once every write that completed before it was issued
//!   is durable (for volatile providers: immediately).
//! * **`close`** waits for in-flight operations to finish, releases resources
//!   and makes later operations fail with [`Error::Closed`](crate::Error::Closed). Closing twice is
//!   not an error.
//! * **Capabilities** describe what a layer can do, and every module forwards
//!   (and possibly restricts) the answer of the provider it wraps, so an NBD
//!   server can derive its transmission flags from the top of a stack.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use crate::error::Result;

/// What a provider can do. Modules forward the capabilities of the provider
/// they wrap, restricting them where they change behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Capabilities {
    /// `flush` is a meaningful durability barrier (or trivially succeeds on a
    /// volatile device that never loses acknowledged data while running).
    pub flush: bool,
    /// Forced unit access: a write followed by `flush` makes it durable.
    pub fua: bool,
    /// `trim` is supported.
    pub trim: bool,
    /// `write_zeroes` is efficient (no data written through the stack).
    pub write_zeroes: bool,
    /// Safe for several concurrent writers (e.g. several NBD connections):
    /// every write is visible to every later read, whichever caller made it.
    pub concurrent: bool,
    /// The provider refuses writes.
    pub read_only: bool,
}

impl Capabilities {
    /// Everything supported, writable.
    pub const ALL: Capabilities = Capabilities {
        flush: true,
        fua: true,
        trim: true,
        write_zeroes: true,
        concurrent: true,
        read_only: false,
    };

    /// Nothing optional supported, writable.
    pub const NONE: Capabilities = Capabilities {
        flush: false,
        fua: false,
        trim: false,
        write_zeroes: false,
        concurrent: false,
        read_only: false,
    };

    /// What both `self` and `other` support (for layers over several providers).
    pub fn intersect(self, other: Capabilities) -> Capabilities {
        Capabilities {
            flush: self.flush && other.flush,
            fua: self.fua && other.fua,
            trim: self.trim && other.trim,
            write_zeroes: self.write_zeroes && other.write_zeroes,
            concurrent: self.concurrent && other.concurrent,
            read_only: self.read_only || other.read_only,
        }
    }

    /// The same capabilities, marked read-only.
    pub fn with_read_only(mut self, read_only: bool) -> Capabilities {
        self.read_only = read_only;
        self
    }
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities::NONE
    }
}

/// A block device: sources store data, modules wrap another provider.
///
/// See the [module documentation](self) for the contract every
/// implementation follows.
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// Size of the device in bytes. Fixed for the provider's life.
    fn size(&self) -> u64;

    /// What this provider (and everything below it) supports.
    fn capabilities(&self) -> Capabilities;

    /// Reads `buf.len()` bytes at `offset` into `buf` and returns it.
    async fn read_at(&self, offset: u64, buf: BytesMut) -> Result<BytesMut>;

    /// Writes all of `data` at `offset`.
    async fn write_at(&self, offset: u64, data: Bytes) -> Result<()>;

    /// Makes every write completed before this call durable.
    async fn flush(&self) -> Result<()>;

    /// Discards `[offset, offset + len)`; afterwards it reads as zeroes.
    async fn trim(&self, offset: u64, len: u64) -> Result<()>;

    /// Writes zeroes over `[offset, offset + len)`.
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;

    /// Hint: in-flight writes to this range may be abandoned.
    fn cancel_writes(&self, offset: u64, len: u64);

    /// Whether [`Provider::write_now`] / [`Provider::read_now`] can ever
    /// complete here (layers answer for the provider they wrap and skip the
    /// attempt when it cannot). The default is `false`.
    fn may_complete_now(&self) -> bool {
        false
    }

    /// Writes `data` at `offset` at once, without waiting, if this provider
    /// and everything below it can (a memory device and the layers that
    /// only count or mark): `Ok(result)`, the same result `write_at` would
    /// give. `Err(data)` hands the data back with nothing done; then call
    /// [`Provider::write_at`]. A stack over a memory device so completes a
    /// write in one synchronous pass instead of a boxed future per layer.
    /// The default never completes.
    fn write_now(&self, offset: u64, data: Bytes) -> Now<(), Bytes> {
        let _ = offset;
        Err(data)
    }

    /// Reads into `buf` at once, without waiting, if this provider and
    /// everything below it can; like [`Provider::write_now`] for reads.
    fn read_now(&self, offset: u64, buf: BytesMut) -> Now<BytesMut, BytesMut> {
        let _ = offset;
        Err(buf)
    }

    /// The size of the writes this provider keeps without copying them:
    /// a write of exactly this many bytes at an offset that is a multiple
    /// of it, whose `data` is the only handle to an allocation of (about)
    /// that capacity, becomes the device's own memory (a memory device's
    /// chunk) instead of being copied into it. A sender that receives data
    /// into buffers of its own choosing (the NBD server) can then receive
    /// large writes into such buffers and save one copy of every byte.
    /// Layers that pass writes through unchanged answer for the provider
    /// they wrap. `None` (the default): writes are copied; any write is
    /// still accepted either way, this is only a hint.
    fn adopt_size(&self) -> Option<usize> {
        None
    }

    /// An empty buffer to receive one write of [`Provider::adopt_size`]
    /// bytes into: memory the provider gave up when it adopted an earlier
    /// buffer, if it kept some (its pages are already backed, so filling it
    /// costs no page faults), else a new allocation of that capacity. The
    /// default allocates.
    fn adopt_buffer(&self) -> BytesMut {
        BytesMut::with_capacity(self.adopt_size().unwrap_or(0))
    }

    /// Reads `[offset, offset + len)` without copying it, if this provider
    /// can hand out its own memory for that range: `Ok(result)` with
    /// pieces whose concatenation is the data, each a snapshot (a later
    /// write to the range leaves the pieces as they were: the provider
    /// copies what it writes to while a piece is held), or `Err(NotShared)` with
    /// nothing done; then read with [`Provider::read_at`]. A sender that
    /// puts reads on the wire (the NBD server) so saves one copy of every
    /// byte. A memory device shares ranges of whole chunks; layers that pass
    /// reads through unchanged answer for the provider they wrap. The
    /// default never shares.
    fn read_shared(&self, offset: u64, len: usize) -> Now<Vec<Bytes>, NotShared> {
        let _ = (offset, len);
        Err(NotShared)
    }

    /// Where `[offset, offset + len)` lies in a file, if this provider keeps
    /// that range as the bytes of a file the page cache holds right now:
    /// `Ok(result)` with the [`FileRange`], or `Err(NotShared)` with nothing
    /// done; then read with [`Provider::read_at`]. A sender that puts reads
    /// on a socket (the NBD server) copies the range from the page cache
    /// into the socket in the kernel (`sendfile(2)`), saving the copy into
    /// a buffer of its own. Unlike [`read_shared`](Self::read_shared), the
    /// bytes are read when they are sent, not by this call: they hold every
    /// write that completed before it, and may hold writes that run while
    /// they are sent (as any read racing a write may). Only for providers
    /// whose data is exactly the file's (a buffered
    /// [`FileStorage`](crate::sources::FileStorage)); layers that pass
    /// reads through unchanged answer for the provider they wrap. The
    /// default never does.
    fn read_file(&self, offset: u64, len: usize) -> Now<FileRange, NotShared> {
        let _ = (offset, len);
        Err(NotShared)
    }

    /// Waits for in-flight I/O, releases resources; later calls fail.
    async fn close(&self) -> Result<()>;
}

/// [`Provider::read_shared`]'s answer when it cannot lend the range: read
/// it with [`Provider::read_at`] instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotShared;

/// A device range kept as bytes of a file: see [`Provider::read_file`].
#[derive(Debug, Clone)]
pub struct FileRange {
    /// The file (kept open while the range is held).
    pub file: Arc<std::fs::File>,
    /// Where the range starts in the file.
    pub offset: u64,
    /// The range's length in bytes.
    pub len: usize,
}

/// What [`Provider::write_now`] and [`Provider::read_now`] return: `Ok`
/// with the operation's result when it completed, `Err` with the buffer
/// given back untouched when it could not complete without waiting.
pub type Now<T, B> = std::result::Result<Result<T>, B>;

/// A shared, type-erased provider: what modules wrap and stacks pass around.
pub type DynProvider = Arc<dyn Provider>;

/// Largest chunk [`write_zeroes_by_writing`] writes at once.
pub const ZERO_CHUNK: usize = 1 << 20;

/// Implements `write_zeroes` for a provider with no cheaper way: writes a
/// shared zero buffer in chunks of at most [`ZERO_CHUNK`] bytes (one
/// allocation per call, not per chunk).
pub async fn write_zeroes_by_writing<P: Provider + ?Sized>(
    p: &P,
    offset: u64,
    len: u64,
) -> Result<()> {
    crate::error::check_range(crate::error::Op::WriteZeroes, offset, len, p.size())?;
    if len == 0 {
        return Ok(());
    }
    let zeroes = Bytes::from(vec![0u8; (len as usize).min(ZERO_CHUNK)]);
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeroes.len() as u64) as usize;
        p.write_at(offset + done, zeroes.slice(..n)).await?;
        done += n as u64;
    }
    Ok(())
}

/// Convenience calls on any provider (including `Arc<dyn Provider>`).
#[async_trait]
pub trait ProviderExt: Provider {
    /// Reads `len` bytes at `offset` into a fresh buffer.
    async fn read_bytes(&self, offset: u64, len: usize) -> Result<Bytes> {
        Ok(self.read_at(offset, BytesMut::zeroed(len)).await?.freeze())
    }

    /// Writes a copy of `data` at `offset`.
    async fn write_slice(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_at(offset, Bytes::copy_from_slice(data)).await
    }
}

impl<P: Provider + ?Sized> ProviderExt for P {}

/// The boxed future every provider method returns (what `async_trait`
/// generates); the `Arc` forwarding below hands the inner provider's future
/// through unchanged instead of boxing it a second time.
pub(crate) type BoxFut<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// A layer's `read_at` / `write_at` future from its `read_now` /
/// `write_now` attempt: the finished result as a ready future, or the
/// buffer handed to `slow` for the awaiting path.
///
/// A layer writes those two methods by hand with this (not `async fn`) so
/// that the synchronous path builds no state machine: an `async fn` that
/// tries `write_now` and otherwise awaits the inner provider's future costs
/// 50–90 ns more per 4 KiB write over a memory device than this (measured
/// at 256 MiB, random offsets: its larger future and poll/drop code sit
/// between one write's copy and the next).
pub(crate) fn now_or<'f, T, B, F>(
    now: Now<T, B>,
    slow: impl FnOnce(B) -> F,
) -> BoxFut<'f, Result<T>>
where
    T: Send + 'f,
    F: std::future::Future<Output = Result<T>> + Send + 'f,
{
    match now {
        Ok(r) => Box::pin(std::future::ready(r)),
        Err(buf) => Box::pin(slow(buf)),
    }
}

/// Forwards async provider methods to `**self`, returning its future as is.
macro_rules! forward_boxed {
    ($($name:ident($($arg:ident: $ty:ty),*) -> $out:ty;)*) => {$(
        fn $name<'s, 'f>(&'s self, $($arg: $ty),*) -> BoxFut<'f, Result<$out>>
        where
            's: 'f,
            Self: 'f,
        {
            (**self).$name($($arg),*)
        }
    )*};
}

#[async_trait]
impl<P: Provider + ?Sized> Provider for Arc<P> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }
    forward_boxed! {
        read_at(offset: u64, buf: BytesMut) -> BytesMut;
        write_at(offset: u64, data: Bytes) -> ();
        flush() -> ();
        trim(offset: u64, len: u64) -> ();
        write_zeroes(offset: u64, len: u64) -> ();
        close() -> ();
    }
    fn cancel_writes(&self, offset: u64, len: u64) {
        (**self).cancel_writes(offset, len)
    }
    fn may_complete_now(&self) -> bool {
        (**self).may_complete_now()
    }
    fn adopt_size(&self) -> Option<usize> {
        (**self).adopt_size()
    }
    fn adopt_buffer(&self) -> BytesMut {
        (**self).adopt_buffer()
    }
    fn write_now(&self, offset: u64, data: Bytes) -> Now<(), Bytes> {
        (**self).write_now(offset, data)
    }
    fn read_now(&self, offset: u64, buf: BytesMut) -> Now<BytesMut, BytesMut> {
        (**self).read_now(offset, buf)
    }
    fn read_shared(&self, offset: u64, len: usize) -> Now<Vec<Bytes>, NotShared> {
        (**self).read_shared(offset, len)
    }
    fn read_file(&self, offset: u64, len: usize) -> Now<FileRange, NotShared> {
        (**self).read_file(offset, len)
    }
}
