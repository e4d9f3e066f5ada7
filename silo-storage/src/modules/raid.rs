//! [`Raid`]: a mirror. Writes (and trims, write-zeroes, flushes) go to every
//! mirror concurrently and succeed only if all succeed. Reads are made from
//! every mirror and compared: if one mirror fails while another succeeds, or
//! the bytes differ, the read fails with [`Error::Corrupt`] naming the first
//! differing offset (and block, when a block size is set) and the mirrors
//! involved. Useful to verify that two implementations or two replicas hold
//! the same data.

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::future::{join_all, try_join_all};

use crate::error::{check_range, Error, Op, Result};
use crate::provider::{Capabilities, DynProvider, Provider};

/// A mirror over N providers of the same size.
pub struct Raid<P = DynProvider> {
    mirrors: Vec<P>,
    size: u64,
    block_size: Option<u64>,
}

impl<P: Provider> Raid<P> {
    /// A mirror over `mirrors` (at least one, all the same size).
    pub fn new(mirrors: Vec<P>) -> Result<Self> {
        let Some(first) = mirrors.first() else {
            return Err(Error::Invalid("a raid needs at least one provider".into()));
        };
        let size = first.size();
        if let Some((i, m)) = mirrors.iter().enumerate().find(|(_, m)| m.size() != size) {
            return Err(Error::Invalid(format!(
                "raid mirror {i} has {} bytes, mirror 0 has {size}",
                m.size()
            )));
        }
        Ok(Raid {
            mirrors,
            size,
            block_size: None,
        })
    }

    /// Reports divergence with block numbers of this size too.
    pub fn with_block_size(mut self, block_size: u64) -> Self {
        self.block_size = Some(block_size.max(1));
        self
    }

    /// The mirrors.
    pub fn mirrors(&self) -> &[P] {
        &self.mirrors
    }

    fn diverged(&self, offset: u64, at: u64, i: usize, what: &str) -> Error {
        let pos = offset + at;
        let block = self
            .block_size
            .map(|bs| format!(" (block {})", pos / bs))
            .unwrap_or_default();
        Error::Corrupt(format!(
            "raid mirrors diverge at offset {pos}{block}: mirror {i} {what} mirror 0"
        ))
    }
}

#[async_trait]
impl<P: Provider> Provider for Raid<P> {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        self.mirrors
            .iter()
            .map(|m| m.capabilities())
            .reduce(Capabilities::intersect)
            .unwrap_or(Capabilities::NONE)
    }

    async fn read_at(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        check_range(Op::Read, offset, buf.len() as u64, self.size)?;
        let len = buf.len();
        let mut bufs = vec![buf];
        bufs.extend((1..self.mirrors.len()).map(|_| BytesMut::zeroed(len)));
        let results = join_all(
            self.mirrors
                .iter()
                .zip(bufs)
                .map(|(m, b)| m.read_at(offset, b)),
        )
        .await;
        let mut it = results.into_iter().enumerate();
        let (_, first) = it.next().expect("at least one mirror");
        for (i, r) in it {
            match (&first, r) {
                (Ok(a), Ok(b)) => {
                    if let Some(at) = a.iter().zip(b.iter()).position(|(x, y)| x != y) {
                        return Err(self.diverged(offset, at as u64, i, "differs from"));
                    }
                }
                (Err(_), Err(_)) => {}
                (Ok(_), Err(e)) => {
                    return Err(self.diverged(offset, 0, i, &format!("failed ({e}) unlike")))
                }
                (Err(e), Ok(_)) => {
                    return Err(self.diverged(
                        offset,
                        0,
                        i,
                        &format!("succeeded where ({e}) failed on"),
                    ))
                }
            }
        }
        first
    }

    async fn write_at(&self, offset: u64, data: Bytes) -> Result<()> {
        check_range(Op::Write, offset, data.len() as u64, self.size)?;
        try_join_all(
            self.mirrors
                .iter()
                .map(|m| m.write_at(offset, data.clone())),
        )
        .await?;
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        try_join_all(self.mirrors.iter().map(|m| m.flush())).await?;
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        try_join_all(self.mirrors.iter().map(|m| m.trim(offset, len))).await?;
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        try_join_all(self.mirrors.iter().map(|m| m.write_zeroes(offset, len))).await?;
        Ok(())
    }

    fn cancel_writes(&self, offset: u64, len: u64) {
        for m in &self.mirrors {
            m.cancel_writes(offset, len);
        }
    }

    async fn close(&self) -> Result<()> {
        let results = join_all(self.mirrors.iter().map(|m| m.close())).await;
        results.into_iter().collect::<Result<Vec<_>>>()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::provider::ProviderExt;
    use crate::sources::MemoryStorage;
    use crate::ErrorKind;

    #[tokio::test]
    async fn detects_divergence() {
        let a = Arc::new(MemoryStorage::new(8192));
        let b = Arc::new(MemoryStorage::new(8192));
        let raid = Raid::new(vec![a.clone(), b.clone()])
            .unwrap()
            .with_block_size(4096);
        raid.write_slice(100, &[5; 5000]).await.unwrap();
        assert_eq!(
            &raid.read_bytes(100, 5000).await.unwrap()[..],
            &[5; 5000][..]
        );
        assert_eq!(&b.read_bytes(100, 5000).await.unwrap()[..], &[5; 5000][..]);
        // Corrupt one mirror behind the raid's back.
        b.write_slice(4200, &[6]).await.unwrap();
        let e = raid.read_bytes(0, 8192).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        let msg = e.to_string();
        assert!(
            msg.contains("4200") && msg.contains("block 1") && msg.contains("mirror 1"),
            "{msg}"
        );
        // Reads not touching the divergence still work.
        raid.read_bytes(0, 4200).await.unwrap();
        assert!(Raid::<Arc<MemoryStorage>>::new(vec![]).is_err());
        assert!(Raid::new(vec![MemoryStorage::new(1), MemoryStorage::new(2)]).is_err());
    }
}
