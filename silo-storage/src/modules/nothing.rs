//! [`Nothing`]: a `/dev/null` provider. Reads return zeroes, writes are
//! discarded, everything else succeeds. Useful as a migration sink in
//! benchmarks.

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use crate::error::{check_range, Op, Result};
use crate::provider::{Capabilities, Provider};

/// A provider that stores nothing.
#[derive(Debug, Clone, Copy)]
pub struct Nothing {
    size: u64,
}

impl Nothing {
    /// A sink of `size` bytes.
    pub fn new(size: u64) -> Self {
        Nothing { size }
    }
}

#[async_trait]
impl Provider for Nothing {
    fn size(&self) -> u64 {
        self.size
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }
    async fn read_at(&self, offset: u64, mut buf: BytesMut) -> Result<BytesMut> {
        check_range(Op::Read, offset, buf.len() as u64, self.size)?;
        buf.fill(0);
        Ok(buf)
    }
    async fn write_at(&self, offset: u64, data: Bytes) -> Result<()> {
        check_range(Op::Write, offset, data.len() as u64, self.size)
    }
    async fn flush(&self) -> Result<()> {
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        check_range(Op::Trim, offset, len, self.size)
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        check_range(Op::WriteZeroes, offset, len, self.size)
    }
    fn cancel_writes(&self, _offset: u64, _len: u64) {}
    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::ProviderExt;

    #[tokio::test]
    async fn discards() {
        let n = Nothing::new(100);
        n.write_slice(0, &[1; 100]).await.unwrap();
        assert_eq!(&n.read_bytes(0, 100).await.unwrap()[..], &[0; 100]);
        assert!(n.write_slice(1, &[1; 100]).await.is_err());
    }
}
