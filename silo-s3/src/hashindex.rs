//! The hash index: which blocks are safely stored in S3, with the SHA-256 of
//! the content that was stored. The sync updates it only after a PUT (or
//! DELETE, for an all-zero block) succeeded, and removes a block's entry
//! *before* uploading a new version of it, so the index never claims a
//! content that is not in the bucket. It is persisted as `hashes.bin`
//! under the device prefix, which lets a restarted sync resume and lets a
//! migration destination fetch blocks by hash.
//!
//! A block recorded with the hash of an all-zero block may have no object
//! at all (zero blocks are deleted, and a missing object reads as zeroes).
//!
//! Format of `hashes.bin` (all integers little-endian):
//!
//! ```text
//! magic "SILOHIX\0" | version u32 = 1 | reserved u32 = 0
//! size u64 | block_size u64 | count u64
//! count × (block u64 | sha256 [32])     strictly increasing block numbers
//! sha256 [32] of everything before it
//! ```

use std::collections::BTreeMap;

use bytes::{BufMut, Bytes, BytesMut};
use sha2::{Digest, Sha256};
use silo_storage::BlockLayout;

use crate::error::{Result, S3Error};
use crate::grab::SafeBlock;
use crate::keys::HASH_INDEX;
use crate::store::BlockStore;

/// A SHA-256 digest.
pub type Hash = [u8; 32];

const MAGIC: &[u8; 8] = b"SILOHIX\0";
const VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 4 + 8 + 8 + 8;
const ENTRY: usize = 8 + 32;

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> Hash {
    Sha256::digest(data).into()
}

/// SHA-256 of `len` zero bytes (what a missing block object holds).
pub fn zero_hash(len: u64) -> Hash {
    let mut h = Sha256::new();
    let zeroes = [0u8; 4096];
    let mut left = len;
    while left > 0 {
        let n = left.min(zeroes.len() as u64) as usize;
        h.update(&zeroes[..n]);
        left -= n as u64;
    }
    h.finalize().into()
}

/// Per-block hashes of safely stored blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashIndex {
    layout: BlockLayout,
    entries: BTreeMap<u64, Hash>,
}

impl HashIndex {
    /// An empty index for a device of this geometry.
    pub fn new(layout: BlockLayout) -> Self {
        HashIndex {
            layout,
            entries: BTreeMap::new(),
        }
    }

    /// Geometry.
    pub fn layout(&self) -> BlockLayout {
        self.layout
    }

    /// Records that block `b` is stored with content hash `hash`.
    /// Blocks outside the device are ignored (and reported as `false`).
    pub fn set(&mut self, b: u64, hash: Hash) -> bool {
        if b >= self.layout.num_blocks() {
            return false;
        }
        self.entries.insert(b, hash);
        true
    }

    /// Forgets block `b` (its stored content is about to change or is
    /// unknown).
    pub fn remove(&mut self, b: u64) -> Option<Hash> {
        self.entries.remove(&b)
    }

    /// The stored hash of block `b`.
    pub fn get(&self, b: u64) -> Option<&Hash> {
        self.entries.get(&b)
    }

    /// Number of blocks recorded.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if no block is recorded.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every recorded block, in block order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &Hash)> + '_ {
        self.entries.iter().map(|(b, h)| (*b, h))
    }

    /// The recorded blocks as a list for migration (`AlternateSources`).
    pub fn safe_blocks(&self) -> Vec<SafeBlock> {
        self.entries
            .iter()
            .map(|(&block, &hash)| SafeBlock { block, hash })
            .collect()
    }

    /// Serialises to the `hashes.bin` format.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(HEADER + self.entries.len() * ENTRY + 32);
        out.put_slice(MAGIC);
        out.put_u32_le(VERSION);
        out.put_u32_le(0);
        out.put_u64_le(self.layout.size());
        out.put_u64_le(self.layout.block_size());
        out.put_u64_le(self.entries.len() as u64);
        for (b, h) in &self.entries {
            out.put_u64_le(*b);
            out.put_slice(h);
        }
        let sum = sha256(&out);
        out.put_slice(&sum);
        out.freeze()
    }

    /// Parses `hashes.bin` read from `key`, checking it belongs to a device
    /// of geometry `layout`. Every length is checked before allocating.
    pub fn decode(key: &str, layout: BlockLayout, data: &[u8]) -> Result<Self> {
        let corrupt = |reason: String| S3Error::Corrupt {
            key: key.into(),
            reason,
        };
        if data.len() < HEADER + 32 {
            return Err(corrupt(format!("{} bytes is too short", data.len())));
        }
        let (body, sum) = data.split_at(data.len() - 32);
        if sha256(body)[..] != sum[..] {
            return Err(corrupt("checksum mismatch".into()));
        }
        if &body[..8] != MAGIC {
            return Err(corrupt("bad magic".into()));
        }
        let u32_at = |i: usize| u32::from_le_bytes(body[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != VERSION {
            return Err(S3Error::ManifestMismatch {
                key: key.into(),
                field: "hash index version",
                stored: version.to_string(),
                configured: VERSION.to_string(),
            });
        }
        let (size, block_size, count) = (u64_at(16), u64_at(24), u64_at(32));
        if block_size != layout.block_size() {
            return Err(S3Error::ManifestMismatch {
                key: key.into(),
                field: "block_size",
                stored: block_size.to_string(),
                configured: layout.block_size().to_string(),
            });
        }
        if size != layout.size() {
            return Err(S3Error::ManifestMismatch {
                key: key.into(),
                field: "size",
                stored: size.to_string(),
                configured: layout.size().to_string(),
            });
        }
        let expect = count
            .checked_mul(ENTRY as u64)
            .and_then(|n| n.checked_add(HEADER as u64));
        if expect != Some(body.len() as u64) || count > layout.num_blocks() {
            return Err(corrupt(format!(
                "{count} entries do not fit {} bytes for {} blocks",
                body.len(),
                layout.num_blocks()
            )));
        }
        let mut entries = BTreeMap::new();
        let mut prev: Option<u64> = None;
        for e in body[HEADER..].chunks_exact(ENTRY) {
            let b = u64::from_le_bytes(e[..8].try_into().expect("8 bytes"));
            if b >= layout.num_blocks() || prev.is_some_and(|p| p >= b) {
                return Err(corrupt(format!("bad or unordered block number {b}")));
            }
            prev = Some(b);
            entries.insert(b, e[8..].try_into().expect("32 bytes"));
        }
        Ok(HashIndex { layout, entries })
    }

    /// Loads the index of `store`'s device; an empty index if there is none.
    pub async fn load(store: &BlockStore) -> Result<Self> {
        let key = store.keys().hash_index();
        match store.get_meta(HASH_INDEX).await? {
            None => Ok(HashIndex::new(store.layout())),
            Some(d) => HashIndex::decode(key.as_ref(), store.layout(), &d),
        }
    }

    /// Writes the index of `store`'s device.
    pub async fn save(&self, store: &BlockStore) -> Result<()> {
        if self.layout != store.layout() {
            return Err(S3Error::Config(format!(
                "hash index geometry {:?} differs from the store's {:?}",
                self.layout,
                store.layout()
            )));
        }
        store.put_meta(HASH_INDEX, self.encode()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn zero_hash_matches_sha_of_zeroes() {
        assert_eq!(zero_hash(10_000), sha256(&vec![0u8; 10_000]));
        assert_eq!(zero_hash(0), sha256(&[]));
    }

    #[test]
    fn rejects_corruption_and_mismatch() {
        let l = BlockLayout::new(10 * 4096 + 5, 4096).unwrap();
        let mut idx = HashIndex::new(l);
        idx.set(0, [1; 32]);
        idx.set(10, [2; 32]);
        assert!(!idx.set(11, [3; 32]));
        let enc = idx.encode();
        assert_eq!(HashIndex::decode("k", l, &enc).unwrap(), idx);
        let mut bad = enc.to_vec();
        bad[HEADER + 3] ^= 1;
        assert!(HashIndex::decode("k", l, &bad).is_err());
        let other = BlockLayout::new(10 * 4096 + 5, 8192).unwrap();
        assert!(matches!(
            HashIndex::decode("k", other, &enc),
            Err(S3Error::ManifestMismatch {
                field: "block_size",
                ..
            })
        ));
        assert!(HashIndex::decode("k", l, &enc[..20]).is_err());
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip(blocks in proptest::collection::btree_map(0u64..100, any::<[u8; 32]>(), 0..50)) {
            let l = BlockLayout::new(100 * 512, 512).unwrap();
            let mut idx = HashIndex::new(l);
            for (b, h) in &blocks { idx.set(*b, *h); }
            let back = HashIndex::decode("k", l, &idx.encode()).unwrap();
            prop_assert_eq!(back, idx);
        }

        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..400)) {
            let l = BlockLayout::new(100 * 512, 512).unwrap();
            let _ = HashIndex::decode("k", l, &data);
            // Also with a valid magic and checksum, so the parser proper runs.
            let mut body = MAGIC.to_vec();
            body.extend_from_slice(&data);
            let sum = sha256(&body);
            body.extend_from_slice(&sum);
            let _ = HashIndex::decode("k", l, &body);
        }
    }
}
