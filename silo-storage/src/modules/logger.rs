//! [`Logger`]: emits one `tracing` event per operation (target
//! `silo_storage::modules::logger`) with the device name, operation, offset,
//! length, result and duration. Successful operations log at `DEBUG`, failed
//! ones at `WARN`. Logging can be switched on and off at run time; when off
//! the cost is one relaxed atomic load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use crate::error::{Op, Result};
use crate::provider::{DynProvider, Provider};

/// A pass-through provider that logs every operation.
pub struct Logger<P = DynProvider> {
    inner: P,
    name: String,
    enabled: AtomicBool,
}

impl<P: Provider> Logger<P> {
    /// Wraps `inner`; `name` identifies the device in every event. Enabled.
    pub fn new(inner: P, name: impl Into<String>) -> Self {
        Logger {
            inner,
            name: name.into(),
            enabled: AtomicBool::new(true),
        }
    }

    /// Switches logging on or off.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed)
    }

    /// Whether logging is on.
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// The wrapped provider.
    pub fn inner(&self) -> &P {
        &self.inner
    }

    fn log<T>(&self, op: Op, offset: u64, len: u64, started: Option<Instant>, r: &Result<T>) {
        let Some(started) = started else { return };
        let us = started.elapsed().as_micros() as u64;
        match r {
            Ok(_) => tracing::debug!(
                device = %self.name, op = %op, offset, len, duration_us = us, "ok"
            ),
            Err(e) => tracing::warn!(
                device = %self.name, op = %op, offset, len, duration_us = us, error = %e, "failed"
            ),
        }
    }

    fn start(&self) -> Option<Instant> {
        self.is_enabled().then(Instant::now)
    }
}

#[async_trait]
impl<P: Provider> Provider for Logger<P> {
    forward!(inner; size, capabilities);

    async fn read_at(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        let (t, n) = (self.start(), buf.len() as u64);
        let r = self.inner.read_at(offset, buf).await;
        self.log(Op::Read, offset, n, t, &r);
        r
    }
    async fn write_at(&self, offset: u64, data: Bytes) -> Result<()> {
        let (t, n) = (self.start(), data.len() as u64);
        let r = self.inner.write_at(offset, data).await;
        self.log(Op::Write, offset, n, t, &r);
        r
    }
    async fn flush(&self) -> Result<()> {
        let t = self.start();
        let r = self.inner.flush().await;
        self.log(Op::Flush, 0, 0, t, &r);
        r
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        let t = self.start();
        let r = self.inner.trim(offset, len).await;
        self.log(Op::Trim, offset, len, t, &r);
        r
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let t = self.start();
        let r = self.inner.write_zeroes(offset, len).await;
        self.log(Op::WriteZeroes, offset, len, t, &r);
        r
    }
    fn cancel_writes(&self, offset: u64, len: u64) {
        if self.is_enabled() {
            tracing::debug!(device = %self.name, offset, len, "cancel-writes");
        }
        self.inner.cancel_writes(offset, len)
    }
    async fn close(&self) -> Result<()> {
        let t = self.start();
        let r = self.inner.close().await;
        self.log(Op::Close, 0, 0, t, &r);
        r
    }
}
