//! Hashing and comparison helpers: whole-device SHA-256, per-block SHA-256,
//! and equality / difference of two providers.
//!
//! Every helper streams the device in chunks of at most [`HASH_CHUNK`]
//! bytes, reusing its buffers, so memory stays bounded whatever the device
//! size; the read of the next chunk overlaps with hashing (or comparing) the
//! current one.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use silo_storage::{hash, MemoryStorage, ProviderExt};
//! let a = MemoryStorage::new(10_000);
//! let b = MemoryStorage::new(10_000);
//! b.write_slice(5_000, b"changed").await.unwrap();
//! let d = hash::difference(&a, &b, 4096).await.unwrap();
//! assert_eq!(d.blocks, vec![1]);
//! assert_eq!(d.bytes, 7);
//! assert!(!hash::equal(&a, &b).await.unwrap());
//! assert_ne!(hash::sha256(&a).await.unwrap(), hash::sha256(&b).await.unwrap());
//! # });
//! ```

use bytes::BytesMut;
use sha2::{Digest, Sha256};

use crate::block::BlockLayout;
use crate::error::Result;
use crate::provider::Provider;

/// Largest chunk read at once by the helpers here (1 MiB).
pub const HASH_CHUNK: usize = 1 << 20;

/// A SHA-256 digest.
pub type Digest256 = [u8; 32];

/// Lower-case hex of a digest (for logs and test messages).
pub fn to_hex(d: &Digest256) -> String {
    hex::encode(d)
}

/// Reads `[offset, offset + len)` of `p` into `buf` (resized, reused).
async fn read_chunk<P: Provider + ?Sized>(
    p: &P,
    offset: u64,
    len: usize,
    mut buf: BytesMut,
) -> Result<BytesMut> {
    buf.resize(len, 0);
    p.read_at(offset, buf).await
}

/// Walks `p` in chunks of `chunk` bytes (the last one may be shorter),
/// calling `f(offset, bytes)` for each, reading the next chunk while `f`
/// runs on the current one.
async fn for_each_chunk<P, F>(p: &P, chunk: usize, mut f: F) -> Result<()>
where
    P: Provider + ?Sized,
    F: FnMut(u64, &[u8]),
{
    let size = p.size();
    let len_at = |off: u64| (size - off).min(chunk as u64) as usize;
    if size == 0 {
        return Ok(());
    }
    let mut cur = read_chunk(p, 0, len_at(0), BytesMut::new()).await?;
    let mut spare = BytesMut::new();
    let mut off = 0u64;
    loop {
        let next = off + cur.len() as u64;
        if next >= size {
            f(off, &cur);
            return Ok(());
        }
        let (r, ()) = tokio::join!(read_chunk(p, next, len_at(next), spare), async {
            f(off, &cur)
        });
        spare = std::mem::replace(&mut cur, r?);
        off = next;
    }
}

/// SHA-256 over the whole device.
pub async fn sha256<P: Provider + ?Sized>(p: &P) -> Result<Digest256> {
    let mut h = Sha256::new();
    for_each_chunk(p, HASH_CHUNK, |_, data| h.update(data)).await?;
    Ok(h.finalize().into())
}

/// SHA-256 of every block of `block_size` bytes (the last one may be
/// partial), in block order.
pub async fn block_hashes<P: Provider + ?Sized>(p: &P, block_size: u64) -> Result<Vec<Digest256>> {
    let layout = BlockLayout::new(p.size(), block_size)?;
    let bs = block_size as usize;
    // Whole blocks per chunk, at least one.
    let chunk = bs.max(HASH_CHUNK / bs * bs);
    let mut out = Vec::with_capacity(layout.num_blocks() as usize);
    for_each_chunk(p, chunk, |_, data| {
        out.extend(data.chunks(bs).map(|b| Digest256::from(Sha256::digest(b))));
    })
    .await?;
    Ok(out)
}

/// Walks the common prefix of two providers side by side, reading both
/// concurrently, until `f(offset, a_bytes, b_bytes)` returns false.
async fn for_each_pair<A, B, F>(a: &A, b: &B, chunk: usize, mut f: F) -> Result<()>
where
    A: Provider + ?Sized,
    B: Provider + ?Sized,
    F: FnMut(u64, &[u8], &[u8]) -> bool,
{
    let size = a.size().min(b.size());
    let mut ba = BytesMut::new();
    let mut bb = BytesMut::new();
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(chunk as u64) as usize;
        let (ra, rb) = tokio::join!(read_chunk(a, off, n, ba), read_chunk(b, off, n, bb));
        ba = ra?;
        bb = rb?;
        if !f(off, &ba, &bb) {
            break;
        }
        off += n as u64;
    }
    Ok(())
}

/// Whether both providers have the same size and contents.
pub async fn equal<A, B>(a: &A, b: &B) -> Result<bool>
where
    A: Provider + ?Sized,
    B: Provider + ?Sized,
{
    if a.size() != b.size() {
        return Ok(false);
    }
    let mut same = true;
    for_each_pair(a, b, HASH_CHUNK, |_, x, y| {
        same = x == y;
        same
    })
    .await?;
    Ok(same)
}

/// How two providers differ.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Difference {
    /// Indices of the blocks that differ, ascending.
    pub blocks: Vec<u64>,
    /// Number of bytes that differ.
    pub bytes: u64,
    /// Sizes of the two providers, when they differ (then only the common
    /// prefix was compared, and the extra length counts as differing bytes).
    pub sizes: Option<(u64, u64)>,
}

impl Difference {
    /// Whether nothing differs.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty() && self.bytes == 0 && self.sizes.is_none()
    }
}

/// The blocks (of `block_size` bytes) and bytes in which `a` and `b` differ.
pub async fn difference<A, B>(a: &A, b: &B, block_size: u64) -> Result<Difference>
where
    A: Provider + ?Sized,
    B: Provider + ?Sized,
{
    let common = a.size().min(b.size());
    BlockLayout::new(common, block_size)?;
    let bs = block_size as usize;
    let chunk = bs.max(HASH_CHUNK / bs * bs);
    let mut d = Difference::default();
    for_each_pair(a, b, chunk, |off, ca, cb| {
        for (i, (x, y)) in ca.chunks(bs).zip(cb.chunks(bs)).enumerate() {
            if x != y {
                d.blocks.push(off / block_size + i as u64);
                d.bytes += x.iter().zip(y).filter(|(p, q)| p != q).count() as u64;
            }
        }
        true
    })
    .await?;
    if a.size() != b.size() {
        d.sizes = Some((a.size(), b.size()));
        d.bytes += a.size().abs_diff(b.size());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::ProviderExt;
    use crate::sources::MemoryStorage;

    #[tokio::test]
    async fn hashes_match_a_plain_digest() {
        // Size not a multiple of the chunk or the block size.
        let size = HASH_CHUNK as u64 * 2 + 12_345;
        let m = MemoryStorage::new(size);
        let data: Vec<u8> = (0..size).map(|i| (i * 7 % 253) as u8).collect();
        m.write_slice(0, &data).await.unwrap();
        let want: Digest256 = Sha256::digest(&data).into();
        assert_eq!(sha256(&m).await.unwrap(), want);
        let hs = block_hashes(&m, 65536).await.unwrap();
        assert_eq!(hs.len(), size.div_ceil(65536) as usize);
        for (i, h) in hs.iter().enumerate() {
            let s = i * 65536;
            let e = (s + 65536).min(data.len());
            assert_eq!(
                *h,
                Digest256::from(Sha256::digest(&data[s..e])),
                "block {i}"
            );
        }
        assert!(equal(&m, &m).await.unwrap());
    }

    #[tokio::test]
    async fn difference_counts_blocks_and_bytes() {
        let a = MemoryStorage::new(3 * HASH_CHUNK as u64 + 100);
        let b = MemoryStorage::new(3 * HASH_CHUNK as u64 + 100);
        assert!(difference(&a, &b, 4096).await.unwrap().is_empty());
        b.write_slice(4095, &[1, 2]).await.unwrap(); // blocks 0 and 1
        b.write_slice(3 * HASH_CHUNK as u64 + 99, &[9])
            .await
            .unwrap(); // last, partial
        let d = difference(&a, &b, 4096).await.unwrap();
        assert_eq!(d.blocks, vec![0, 1, (3 * HASH_CHUNK as u64 + 99) / 4096]);
        assert_eq!(d.bytes, 3);
        assert!(!equal(&a, &b).await.unwrap());
        let c = MemoryStorage::new(100);
        assert!(!equal(&a, &c).await.unwrap());
        assert_eq!(
            difference(&c, &c, 4096).await.unwrap(),
            Difference::default()
        );
        let e = MemoryStorage::new(0);
        assert!(equal(&e, &e).await.unwrap());
        assert_eq!(
            sha256(&e).await.unwrap(),
            Digest256::from(Sha256::digest([]))
        );
    }
}
