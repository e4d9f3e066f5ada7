//! [`Sharded`]: the address space split into fixed-size shards, each its own
//! provider (for example one file per shard, or one memory region per NUMA
//! node). A request crossing shards is split and its parts run concurrently.
//! The last shard is shorter when the size is not a multiple of the shard
//! size.

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::future::{join_all, try_join_all};

use super::util::{join_bufs, split_buf};
use crate::error::{check_range, Error, Op, Result};
use crate::provider::{Capabilities, DynProvider, Provider};

/// A device made of consecutive shards.
pub struct Sharded<P = DynProvider> {
    size: u64,
    shard_size: u64,
    shards: Vec<P>,
}

/// One shard's part of a request.
struct Part {
    shard: usize,
    offset: u64,
    len: u64,
}

impl<P: Provider> Sharded<P> {
    /// Builds `ceil(size / shard_size)` shards with `factory(index, shard_len)`;
    /// every shard must report exactly `shard_len` bytes.
    pub fn new(
        size: u64,
        shard_size: u64,
        mut factory: impl FnMut(usize, u64) -> Result<P>,
    ) -> Result<Self> {
        if shard_size == 0 {
            return Err(Error::Invalid("shard size must not be 0".into()));
        }
        let n = size.div_ceil(shard_size);
        let shards = (0..n)
            .map(|i| factory(i as usize, (size - i * shard_size).min(shard_size)))
            .collect::<Result<Vec<_>>>()?;
        Self::from_shards(size, shard_size, shards)
    }

    /// Uses existing shards; checks that their sizes add up.
    pub fn from_shards(size: u64, shard_size: u64, shards: Vec<P>) -> Result<Self> {
        if shard_size == 0 {
            return Err(Error::Invalid("shard size must not be 0".into()));
        }
        if shards.len() as u64 != size.div_ceil(shard_size) {
            return Err(Error::Invalid(format!(
                "{} shards given, {} needed for {size} bytes in shards of {shard_size}",
                shards.len(),
                size.div_ceil(shard_size)
            )));
        }
        for (i, s) in shards.iter().enumerate() {
            let want = (size - i as u64 * shard_size).min(shard_size);
            if s.size() != want {
                return Err(Error::Invalid(format!(
                    "shard {i} has {} bytes, expected {want}",
                    s.size()
                )));
            }
        }
        Ok(Sharded {
            size,
            shard_size,
            shards,
        })
    }

    /// The shards, in address order.
    pub fn shards(&self) -> &[P] {
        &self.shards
    }

    /// Shard size in bytes.
    pub fn shard_size(&self) -> u64 {
        self.shard_size
    }

    fn parts(&self, offset: u64, len: u64) -> Vec<Part> {
        let mut out = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let shard = pos / self.shard_size;
            let in_shard = pos % self.shard_size;
            let n = (self.shard_size - in_shard).min(end - pos);
            out.push(Part {
                shard: shard as usize,
                offset: in_shard,
                len: n,
            });
            pos += n;
        }
        out
    }
}

#[async_trait]
impl<P: Provider> Provider for Sharded<P> {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        self.shards
            .iter()
            .map(|s| s.capabilities())
            .reduce(Capabilities::intersect)
            .unwrap_or(Capabilities::ALL)
    }

    async fn read_at(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        check_range(Op::Read, offset, buf.len() as u64, self.size)?;
        let parts = self.parts(offset, buf.len() as u64);
        if parts.len() == 1 {
            return self.shards[parts[0].shard]
                .read_at(parts[0].offset, buf)
                .await;
        }
        let bufs = split_buf(buf, parts.iter().map(|p| p.len as usize));
        let done = try_join_all(
            parts
                .iter()
                .zip(bufs)
                .map(|(p, b)| self.shards[p.shard].read_at(p.offset, b)),
        )
        .await?;
        Ok(join_bufs(done))
    }

    async fn write_at(&self, offset: u64, data: Bytes) -> Result<()> {
        check_range(Op::Write, offset, data.len() as u64, self.size)?;
        let parts = self.parts(offset, data.len() as u64);
        let mut at = 0usize;
        let futs = parts.iter().map(|p| {
            let slice = data.slice(at..at + p.len as usize);
            at += p.len as usize;
            self.shards[p.shard].write_at(p.offset, slice)
        });
        try_join_all(futs).await?;
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        try_join_all(self.shards.iter().map(|s| s.flush())).await?;
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        check_range(Op::Trim, offset, len, self.size)?;
        let parts = self.parts(offset, len);
        try_join_all(
            parts
                .iter()
                .map(|p| self.shards[p.shard].trim(p.offset, p.len)),
        )
        .await?;
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        check_range(Op::WriteZeroes, offset, len, self.size)?;
        let parts = self.parts(offset, len);
        try_join_all(
            parts
                .iter()
                .map(|p| self.shards[p.shard].write_zeroes(p.offset, p.len)),
        )
        .await?;
        Ok(())
    }

    fn cancel_writes(&self, offset: u64, len: u64) {
        let len = len.min(self.size.saturating_sub(offset));
        for p in self.parts(offset, len) {
            self.shards[p.shard].cancel_writes(p.offset, p.len);
        }
    }

    async fn close(&self) -> Result<()> {
        // Close every shard even if one fails; report the first failure.
        let results = join_all(self.shards.iter().map(|s| s.close())).await;
        results.into_iter().collect::<Result<Vec<_>>>()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::ProviderExt;
    use crate::sources::MemoryStorage;

    #[tokio::test]
    async fn cross_shard_io() {
        let s = Sharded::new(10_000, 4096, |_, n| Ok(MemoryStorage::new(n))).unwrap();
        assert_eq!(s.shards().len(), 3);
        assert_eq!(s.shards()[2].size(), 10_000 - 8192);
        let data: Vec<u8> = (0..9000u32).map(|i| (i % 253) as u8).collect();
        s.write_slice(500, &data).await.unwrap();
        assert_eq!(&s.read_bytes(500, 9000).await.unwrap()[..], &data[..]);
        assert_eq!(
            &s.shards()[1].read_bytes(0, 10).await.unwrap()[..],
            &data[4096 - 500..4096 - 500 + 10]
        );
        assert!(s.read_bytes(9_999, 2).await.is_err());
        assert!(Sharded::new(10, 0, |_, n| Ok(MemoryStorage::new(n))).is_err());
        assert!(Sharded::from_shards(10, 4, vec![MemoryStorage::new(4)]).is_err());
    }
}
