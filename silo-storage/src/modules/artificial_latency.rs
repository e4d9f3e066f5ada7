//! [`ArtificialLatency`]: sleeps a fixed plus a per-byte delay before every
//! read and write (tokio timers, the runtime is never blocked). For tests and
//! benchmarks that need a slow device.

use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use crate::error::Result;
use crate::provider::{DynProvider, Provider};

/// Delays applied by [`ArtificialLatency`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LatencyConfig {
    /// Fixed delay per read.
    pub read: Duration,
    /// Extra delay per byte read.
    pub read_per_byte: Duration,
    /// Fixed delay per write (also trim / write-zeroes).
    pub write: Duration,
    /// Extra delay per byte written (not applied to trim / write-zeroes).
    pub write_per_byte: Duration,
}

/// A provider that delays reads and writes.
pub struct ArtificialLatency<P = DynProvider> {
    inner: P,
    cfg: LatencyConfig,
}

fn delay(fixed: Duration, per_byte: Duration, n: u64) -> Duration {
    let extra = per_byte.as_nanos().saturating_mul(n as u128);
    fixed.saturating_add(Duration::from_nanos(extra.min(u64::MAX as u128) as u64))
}

async fn sleep(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await
    }
}

impl<P: Provider> ArtificialLatency<P> {
    /// Wraps `inner` with the given delays.
    pub fn new(inner: P, cfg: LatencyConfig) -> Self {
        ArtificialLatency { inner, cfg }
    }

    /// The wrapped provider.
    pub fn inner(&self) -> &P {
        &self.inner
    }
}

#[async_trait]
impl<P: Provider> Provider for ArtificialLatency<P> {
    forward!(inner; size, capabilities, flush, cancel_writes, close);

    async fn read_at(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        sleep(delay(
            self.cfg.read,
            self.cfg.read_per_byte,
            buf.len() as u64,
        ))
        .await;
        self.inner.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: Bytes) -> Result<()> {
        sleep(delay(
            self.cfg.write,
            self.cfg.write_per_byte,
            data.len() as u64,
        ))
        .await;
        self.inner.write_at(offset, data).await
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        sleep(self.cfg.write).await;
        self.inner.trim(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        sleep(self.cfg.write).await;
        self.inner.write_zeroes(offset, len).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::provider::ProviderExt;
    use crate::sources::MemoryStorage;

    #[tokio::test(start_paused = true)]
    async fn delays_scale_with_bytes() {
        let p = ArtificialLatency::new(
            MemoryStorage::new(1 << 20),
            LatencyConfig {
                read: Duration::from_millis(5),
                read_per_byte: Duration::from_micros(1),
                write: Duration::from_millis(10),
                write_per_byte: Duration::ZERO,
            },
        );
        let t = Instant::now();
        let tt = tokio::time::Instant::now();
        p.read_bytes(0, 1000).await.unwrap();
        assert_eq!(tt.elapsed(), Duration::from_millis(6));
        p.write_slice(0, &[1; 1000]).await.unwrap();
        assert_eq!(tt.elapsed(), Duration::from_millis(16));
        // paused clock: no real time spent
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
