//! [`Gated`]: the provider behind [`Lockable`](super::Lockable) (reads and
//! writes wait while locked) and [`ReadOnlyGate`](super::ReadOnlyGate) (only
//! writes wait), chosen by a [`GateMode`] marker.
//!
//! The gate state is a single atomic word; waiting uses
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
use crate::error::{Error, Op, Result};
use crate::provider::{DynProvider, Provider};

const LOCKED: u64 = 1 << 63;
const CLOSED: u64 = 1 << 62;
const COUNT: u64 = CLOSED - 1;

/// A gate that operations pass through while it is open. The state is one
/// atomic word (locked bit, closed bit, in-flight count), so entering and
/// leaving cost one atomic operation each when nobody waits.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    state: AtomicU64,
    /// Notified on unlock and close.
    opened: Notify,
    /// Notified when the last in-flight operation leaves a locked or closed
    /// gate, and on unlock.
    drained: Notify,
}

/// Proof that an operation is inside the gate; leaving is on drop (also when
/// the operation's future is dropped).
pub(crate) struct Pass<'a> {
    gate: &'a Gate,
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        let prev = self.gate.state.fetch_sub(1, Ordering::AcqRel);
        if prev & COUNT == 1 && prev & (LOCKED | CLOSED) != 0 {
            self.gate.drained.notify_waiters();
        }
    }
}

impl Gate {
    /// Waits until the gate is open, then enters it.
    pub(crate) async fn enter(&self, op: Op) -> Result<Pass<'_>> {
        let mut cur = self.state.load(Ordering::Acquire);
        loop {
            if cur & CLOSED != 0 {
                return Err(Error::Closed { op });
            }
            if cur & LOCKED == 0 {
                match self.state.compare_exchange_weak(
                    cur,
                    cur + 1,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => return Ok(Pass { gate: self }),
                    Err(actual) => {
                        cur = actual;
                        continue;
                    }
                }
            }
            // Locked: register for the wake-up first, then re-check, so an
            // unlock between the check and the await is not missed.
            let mut notified = pin!(self.opened.notified());
            notified.as_mut().enable();
            cur = self.state.load(Ordering::Acquire);
            if cur & (LOCKED | CLOSED) == LOCKED {
                notified.await;
                cur = self.state.load(Ordering::Acquire);
            }
        }
    }

    /// Closes the gate to new operations; returns once no gated operation
    /// is in flight (or the gate was unlocked meanwhile).
    pub(crate) async fn lock(&self) {
        self.state.fetch_or(LOCKED, Ordering::AcqRel);
        loop {
            let mut notified = pin!(self.drained.notified());
            notified.as_mut().enable();
            let s = self.state.load(Ordering::Acquire);
            if s & COUNT == 0 || s & LOCKED == 0 {
                return;
            }
            notified.await;
        }
    }

    pub(crate) fn unlock(&self) {
        self.state.fetch_and(!LOCKED, Ordering::AcqRel);
        self.opened.notify_waiters();
        self.drained.notify_waiters();
    }

    pub(crate) fn is_locked(&self) -> bool {
        self.state.load(Ordering::Acquire) & LOCKED != 0
    }

    /// Makes every waiting and later operation fail with `Closed`.
    pub(crate) fn close(&self) {
        let _ = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                Some((s | CLOSED) & !LOCKED)
            });
        self.opened.notify_waiters();
        self.drained.notify_waiters();
    }

    /// Waits until no gated operation is in flight (used by close).
    pub(crate) async fn drain(&self) {
        loop {
            let mut notified = pin!(self.drained.notified());
            notified.as_mut().enable();
            if self.state.load(Ordering::Acquire) & COUNT == 0 {
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
    gate: Gate,
    _mode: PhantomData<M>,
}

impl<P: Provider, M: GateMode> Gated<P, M> {
    /// Wraps `inner`, unlocked.
    pub fn new(inner: P) -> Self {
        Gated {
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

    async fn read_at(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        let _pass = if M::GATES_READS {
            Some(self.gate.enter(Op::Read).await?)
        } else {
            None
        };
        self.inner.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: Bytes) -> Result<()> {
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
