//! Close gate shared by the file sources: counts operations in flight,
//! refuses new ones once closing started, and lets `close` wait for the
//! count to reach zero.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

use crate::error::{Error, Op, Result};

#[derive(Debug, Default)]
struct Inner {
    active: AtomicUsize,
    closed: AtomicBool,
    idle: Notify,
}

/// Admission control for a provider's operations.
#[derive(Debug, Default, Clone)]
pub(crate) struct Gate(Arc<Inner>);

/// Proof that an operation was admitted; dropping it ends the operation.
/// It may be moved into the I/O engine so that the operation counts as in
/// flight until the kernel is done with it, even if the caller went away.
#[derive(Debug)]
pub(crate) struct Pass(Arc<Inner>);

impl Gate {
    /// Admits an operation, or fails with [`Error::Closed`].
    pub(crate) fn enter(&self, op: Op) -> Result<Pass> {
        self.0.active.fetch_add(1, Ordering::SeqCst);
        let pass = Pass(self.0.clone());
        if self.0.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed { op });
        }
        Ok(pass)
    }

    /// Whether closing has started.
    pub(crate) fn is_closed(&self) -> bool {
        self.0.closed.load(Ordering::Relaxed)
    }

    /// Refuses new operations and waits for the admitted ones to finish.
    pub(crate) async fn close(&self) {
        self.0.closed.store(true, Ordering::SeqCst);
        loop {
            let idle = self.0.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.0.active.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1 && self.0.closed.load(Ordering::SeqCst)
        {
            self.0.idle.notify_waiters();
        }
    }
}
