//! [`Gated`]: the provider behind [`Lockable`](super::Lockable) (reads and
//! writes wait while locked) and [`ReadOnlyGate`](super::ReadOnlyGate) (only
//! writes wait), chosen by a [`GateMode`] marker.
//!
//! The gate's flags are one atomic word and its in-flight count is sharded
//! per thread (see `Gate`); waiting uses
//! [`tokio::sync::Notify`] with the "enable, then check, then await" pattern
//! inside a loop that re-checks the condition, so a wake-up can neither be
//! lost nor let an operation through a gate that was locked again in between
//! (the Go version checked with `if` once).

use std::marker::PhantomData;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use tokio::sync::Notify;

use super::LockControl;
use crate::barrier;
use crate::error::{Error, Op, Result};
use crate::provider::{DynProvider, FileRange, NotShared, Now, Provider};
use crate::shard::{shard, Counter, Padded, Shard, SLOTS};

const LOCKED: u64 = 1;
const CLOSED: u64 = 2;

/// A gate that operations pass through while it is open. The locked and
/// closed flags are one atomic word; the in-flight count is sharded per
/// thread (one cache line each), so operations on different cores do not
/// contend on it. Entering costs one atomic addition on the thread's own
/// shard and a load of the flags; leaving one subtraction.
///
/// Why `lock` cannot miss an operation: an operation increments its shard,
/// passes a barrier, then reads the flags; `lock` sets the flag, passes a
/// barrier, then sums the shards. Either the operation's read comes after
/// the flag was set (it backs out and waits) or its increment comes before
/// the sum (`lock` waits for it to leave). Leaving is the same: decrement,
/// barrier, read the flags (and wake a waiting `lock` if set).
///
/// The barriers are asymmetric (`crate::barrier`): operations, the hot
/// path, pass a compiler fence and update their own shard with plain
/// stores (a thread that owns its shard is its only writer; a pass dropped
/// on another thread counts in `left_elsewhere` with a locked addition);
/// `lock` and `drain`, which are rare, pay for a process-wide barrier.
/// That keeps locked instructions off the I/O path, where on x86 each one
/// waits for the data just copied to reach the cache.
#[derive(Debug)]
pub(crate) struct Gate {
    flags: AtomicU64,
    /// Operations in flight, per shard of the thread that entered.
    in_flight: [Padded<Slot>; SLOTS],
    /// Notified on unlock and close.
    opened: Notify,
    /// Notified when an operation leaves a locked or closed gate, and on
    /// unlock.
    drained: Notify,
}

/// Proof that an operation is inside the gate; leaving is on drop (also when
/// the operation's future is dropped, on whatever thread).
pub(crate) struct Pass<'a> {
    gate: &'a Gate,
    shard: Shard,
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        self.gate.leave(self.shard);
    }
}

/// One shard's in-flight count: `entered - left_elsewhere`.
#[derive(Debug, Default)]
struct Slot {
    /// Entries minus the leaves made on the entering shard's thread: plain
    /// stores by the owner (locked additions on the shared shard).
    entered: Counter,
    /// Leaves made on another thread than the owner of this shard.
    left_elsewhere: AtomicU64,
}

impl Default for Gate {
    fn default() -> Self {
        barrier::init();
        Gate {
            flags: AtomicU64::new(0),
            in_flight: std::array::from_fn(|_| Padded::default()),
            opened: Notify::new(),
            drained: Notify::new(),
        }
    }
}

impl Gate {
    /// Operations inside the gate.
    fn count(&self) -> u64 {
        self.in_flight.iter().fold(0u64, |n, c| {
            n.wrapping_add(c.0.entered.get())
                .wrapping_sub(c.0.left_elsewhere.load(Ordering::SeqCst))
        })
    }

    fn leave(&self, entered: Shard) {
        let slot = &self.in_flight[entered.index()].0;
        if !entered.owned() || shard() == entered {
            // Adding u64::MAX subtracts one (wrapping).
            slot.entered.add(entered, u64::MAX);
        } else {
            slot.left_elsewhere.fetch_add(1, Ordering::SeqCst);
        }
        barrier::fast();
        if self.flags.load(Ordering::SeqCst) != 0 {
            // Somebody may wait for the gate to drain; it re-counts.
            self.drained.notify_waiters();
        }
    }

    /// Enters the gate if it is open: `None` when it is locked (the caller
    /// has to wait with [`Gate::enter`]).
    pub(crate) fn try_enter(&self, op: Op) -> Option<Result<Pass<'_>>> {
        let shard = shard();
        self.in_flight[shard.index()].0.entered.add(shard, 1);
        barrier::fast();
        let f = self.flags.load(Ordering::SeqCst);
        if f == 0 {
            return Some(Ok(Pass { gate: self, shard }));
        }
        self.leave(shard);
        if f & CLOSED != 0 {
            Some(Err(Error::Closed { op }))
        } else {
            None
        }
    }

    /// Waits until the gate is open, then enters it.
    pub(crate) async fn enter(&self, op: Op) -> Result<Pass<'_>> {
        loop {
            if let Some(r) = self.try_enter(op) {
                return r;
            }
            // Locked: register for the wake-up first, then re-check, so an
            // unlock between the check and the await is not missed.
            let mut notified = pin!(self.opened.notified());
            notified.as_mut().enable();
            if self.flags.load(Ordering::SeqCst) == LOCKED {
                notified.await;
            }
        }
    }

    /// Closes the gate to new operations; returns once no gated operation
    /// is in flight (or the gate was unlocked meanwhile).
    pub(crate) async fn lock(&self) {
        self.flags.fetch_or(LOCKED, Ordering::SeqCst);
        // Every operation now either sees the flag or is counted below.
        barrier::slow();
        loop {
            let mut notified = pin!(self.drained.notified());
            notified.as_mut().enable();
            if self.flags.load(Ordering::SeqCst) & LOCKED == 0 || self.count() == 0 {
                return;
            }
            notified.await;
        }
    }

    pub(crate) fn unlock(&self) {
        self.flags.fetch_and(!LOCKED, Ordering::SeqCst);
        self.opened.notify_waiters();
        self.drained.notify_waiters();
    }

    pub(crate) fn is_locked(&self) -> bool {
        self.flags.load(Ordering::SeqCst) & LOCKED != 0
    }

    /// Makes every waiting and later operation fail with `Closed`.
    pub(crate) fn close(&self) {
        let _ = self
            .flags
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |s| {
                Some((s | CLOSED) & !LOCKED)
            });
        self.opened.notify_waiters();
        self.drained.notify_waiters();
    }

    /// Waits until no gated operation is in flight (used by close).
    pub(crate) async fn drain(&self) {
        // Pairs with the operations' barrier (the caller closed the gate).
        barrier::slow();
        loop {
            let mut notified = pin!(self.drained.notified());
            notified.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Which operations a [`Gated`] provider pauses.
pub trait GateMode: Send + Sync + 'static {
    /// Reads wait too (not only write, trim and write-zeroes).
    const GATES_READS: bool;
}

/// Reads and writes wait while locked ([`Lockable`](super::Lockable)).
#[derive(Debug)]
pub enum ReadsAndWrites {}

/// Only writes wait while locked ([`ReadOnlyGate`](super::ReadOnlyGate)).
#[derive(Debug)]
pub enum WritesOnly {}

impl GateMode for ReadsAndWrites {
    const GATES_READS: bool = true;
}

impl GateMode for WritesOnly {
    const GATES_READS: bool = false;
}

/// A provider whose operations can be paused; see [`Lockable`](super::Lockable)
/// and [`ReadOnlyGate`](super::ReadOnlyGate).
pub struct Gated<P = DynProvider, M: GateMode = ReadsAndWrites> {
    inner: P,
    /// `inner.may_complete_now()`, asked once.
    fast: bool,
    gate: Gate,
    _mode: PhantomData<M>,
}

impl<P: Provider, M: GateMode> Gated<P, M> {
    /// Wraps `inner`, unlocked.
    pub fn new(inner: P) -> Self {
        Gated {
            fast: inner.may_complete_now(),
            inner,
            gate: Gate::default(),
            _mode: PhantomData,
        }
    }

    /// The wrapped provider.
    pub fn inner(&self) -> &P {
        &self.inner
    }

    /// Pauses new gated operations and waits until the ones in progress have
    /// finished: once this returns, nothing is being written below this
    /// layer. Not counted: one `unlock()` undoes any number of `lock()`s.
    pub async fn lock(&self) {
        self.gate.lock().await
    }

    /// Resumes paused and new operations.
    pub fn unlock(&self) {
        self.gate.unlock()
    }

    /// Whether the provider is locked.
    pub fn is_locked(&self) -> bool {
        self.gate.is_locked()
    }

    /// Admission of a read that must complete without waiting: `Ok` to go
    /// ahead (holding the pass, if reads are gated), `Err(Some)` when the
    /// gate is closed, `Err(None)` when it cannot be entered now (or
    /// nothing below completes without waiting).
    fn read_pass(&self) -> std::result::Result<Option<Pass<'_>>, Option<Error>> {
        if !self.fast {
            return Err(None);
        }
        if !M::GATES_READS {
            return Ok(None);
        }
        match self.gate.try_enter(Op::Read) {
            None => Err(None),
            Some(Err(e)) => Err(Some(e)),
            Some(Ok(pass)) => Ok(Some(pass)),
        }
    }
}

#[async_trait]
impl<P: Provider, M: GateMode> LockControl for Gated<P, M> {
    async fn lock(&self) {
        Gated::lock(self).await
    }
    fn unlock(&self) {
        Gated::unlock(self)
    }
    fn is_locked(&self) -> bool {
        Gated::is_locked(self)
    }
}

#[async_trait]
impl<P: Provider, M: GateMode> Provider for Gated<P, M> {
    forward!(inner; size, capabilities, flush, cancel_writes);

    fn may_complete_now(&self) -> bool {
        self.fast
    }
    fn adopt_size(&self) -> Option<usize> {
        self.inner.adopt_size()
    }
    fn adopt_buffer(&self) -> BytesMut {
        self.inner.adopt_buffer()
    }
    fn read_now(&self, offset: u64, buf: BytesMut) -> Now<BytesMut, BytesMut> {
        match self.read_pass() {
            Ok(_pass) => self.inner.read_now(offset, buf),
            Err(Some(e)) => Ok(Err(e)),
            Err(None) => Err(buf),
        }
    }
    fn read_shared(&self, offset: u64, len: usize) -> Now<Vec<Bytes>, NotShared> {
        match self.read_pass() {
            Ok(_pass) => self.inner.read_shared(offset, len),
            Err(Some(e)) => Ok(Err(e)),
            Err(None) => Err(NotShared),
        }
    }
    fn read_file(&self, offset: u64, len: usize) -> Now<FileRange, NotShared> {
        match self.read_pass() {
            Ok(_pass) => self.inner.read_file(offset, len),
            Err(Some(e)) => Ok(Err(e)),
            Err(None) => Err(NotShared),
        }
    }
    fn write_now(&self, offset: u64, data: Bytes) -> Now<(), Bytes> {
        if !self.fast {
            return Err(data);
        }
        match self.gate.try_enter(Op::Write) {
            None => Err(data),
            Some(Err(e)) => Ok(Err(e)),
            Some(Ok(_pass)) => self.inner.write_now(offset, data),
        }
    }
    async fn read_at(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        let buf = match self.read_now(offset, buf) {
            Ok(r) => return r,
            Err(buf) => buf,
        };
        let _pass = if M::GATES_READS {
            Some(self.gate.enter(Op::Read).await?)
        } else {
            None
        };
        self.inner.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: Bytes) -> Result<()> {
        let data = match self.write_now(offset, data) {
            Ok(r) => return r,
            Err(data) => data,
        };
        let _pass = self.gate.enter(Op::Write).await?;
        self.inner.write_at(offset, data).await
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        let _pass = self.gate.enter(Op::Trim).await?;
        self.inner.trim(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let _pass = self.gate.enter(Op::WriteZeroes).await?;
        self.inner.write_zeroes(offset, len).await
    }
    async fn close(&self) -> Result<()> {
        self.gate.close();
        self.gate.drain().await;
        self.inner.close().await
    }
}
