//! [`Gated`]: the provider behind [`Lockable`](super::Lockable) (reads and
//! writes wait while locked) and [`ReadOnlyGate`](super::ReadOnlyGate) (only
//! writes wait), chosen by a [`GateMode`] marker.
//!
//! State lives under a short synchronous mutex (never held across an
//! `.await`); waiting uses [`tokio::sync::Notify`] with the "enable, then
//! check, then await" pattern, inside a loop, so a wake-up can neither be lost
//! nor let an operation through a gate that was locked again in between.

use std::marker::PhantomData;
use std::pin::pin;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::sync::Notify;

use super::LockControl;
use crate::error::{Error, Op, Result};
use crate::provider::{DynProvider, Provider};

#[derive(Debug, Default)]
struct State {
    locked: bool,
    closed: bool,
    in_flight: usize,
}

/// A gate that operations pass through while it is open.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    state: Mutex<State>,
    /// Notified on unlock and close.
    opened: Notify,
    /// Notified when the last in-flight operation leaves, and on unlock.
    drained: Notify,
}

/// Proof that an operation is inside the gate; leaving is on drop (also when
/// the operation's future is dropped).
pub(crate) struct Pass<'a> {
    gate: &'a Gate,
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        let mut s = self.gate.state.lock();
        s.in_flight -= 1;
        let wake = s.in_flight == 0;
        drop(s);
        if wake {
            self.gate.drained.notify_waiters();
        }
    }
}

impl Gate {
    /// Waits until the gate is open, then enters it.
    pub(crate) async fn enter(&self, op: Op) -> Result<Pass<'_>> {
        loop {
            let mut notified = pin!(self.opened.notified());
            notified.as_mut().enable();
            {
                let mut s = self.state.lock();
                if s.closed {
                    return Err(Error::Closed { op });
                }
                if !s.locked {
                    s.in_flight += 1;
                    return Ok(Pass { gate: self });
                }
            }
            notified.await;
        }
    }

    /// Closes the gate and waits for new operations; returns once no gated
    /// operation is in flight (or the gate was unlocked meanwhile).
    pub(crate) async fn lock(&self) {
        self.state.lock().locked = true;
        loop {
            let mut notified = pin!(self.drained.notified());
            notified.as_mut().enable();
            {
                let s = self.state.lock();
                if s.in_flight == 0 || !s.locked {
                    return;
                }
            }
            notified.await;
        }
    }

    pub(crate) fn unlock(&self) {
        self.state.lock().locked = false;
        self.opened.notify_waiters();
        self.drained.notify_waiters();
    }

    pub(crate) fn is_locked(&self) -> bool {
        self.state.lock().locked
    }

    /// Makes every waiting and later operation fail with `Closed`.
    pub(crate) fn close(&self) {
        {
            let mut s = self.state.lock();
            s.closed = true;
            s.locked = false;
        }
        self.opened.notify_waiters();
        self.drained.notify_waiters();
    }

    /// Waits until no gated operation is in flight (used by close).
    pub(crate) async fn drain(&self) {
        loop {
            let mut notified = pin!(self.drained.notified());
            notified.as_mut().enable();
            if self.state.lock().in_flight == 0 {
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
