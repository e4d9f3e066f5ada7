//! Object names of a device under its prefix.
//!
//! ```text
//! <prefix>/manifest.json          size, block size, format version
//! <prefix>/hashes.bin             per-block SHA-256 of safely stored blocks (sync)
//! <prefix>/blocks/<16 hex digits> one object per block, named by block index
//! ```
//!
//! Block objects are named by block index (not byte offset as in Go silo), in
//! fixed-width hex so that a listing comes back in block order; the block
//! size lives in the manifest, so a reader with another block size is
//! refused instead of silently reading the wrong bytes.

use object_store::path::Path;

use crate::error::{Result, S3Error};

/// Object name of the manifest, relative to the prefix.
pub const MANIFEST: &str = "manifest.json";
/// Object name of the hash index, relative to the prefix.
pub const HASH_INDEX: &str = "hashes.bin";
/// Directory of block objects, relative to the prefix.
pub const BLOCKS: &str = "blocks";

/// Parses a user-supplied prefix (leading/trailing `/` ignored).
pub fn parse_prefix(prefix: &str) -> Result<Path> {
    let trimmed = prefix.trim_matches('/');
    Path::parse(trimmed).map_err(|e| S3Error::Config(format!("invalid key prefix `{prefix}`: {e}")))
}

/// The object names of one device.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: Path,
    blocks: Path,
}

impl Keys {
    /// Names under `prefix`.
    pub fn new(prefix: Path) -> Self {
        let blocks = prefix.child(BLOCKS);
        Keys { prefix, blocks }
    }

    /// The device prefix.
    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    /// The manifest object.
    pub fn manifest(&self) -> Path {
        self.prefix.child(MANIFEST)
    }

    /// The hash index object.
    pub fn hash_index(&self) -> Path {
        self.prefix.child(HASH_INDEX)
    }

    /// The directory of block objects (for listing).
    pub fn blocks_dir(&self) -> &Path {
        &self.blocks
    }

    /// The object of block `b`.
    pub fn block(&self, b: u64) -> Path {
        self.blocks.child(format!("{b:016x}"))
    }

    /// The block index of a block object name, if it is one of ours.
    pub fn block_of(&self, path: &Path) -> Option<u64> {
        let rest: Vec<_> = path.prefix_match(&self.blocks)?.collect();
        match rest.as_slice() {
            [name] if name.as_ref().len() == 16 => u64::from_str_radix(name.as_ref(), 16).ok(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let k = Keys::new(parse_prefix("/devices/disk0/").unwrap());
        assert_eq!(k.manifest().as_ref(), "devices/disk0/manifest.json");
        let b = k.block(0x1234);
        assert_eq!(b.as_ref(), "devices/disk0/blocks/0000000000001234");
        assert_eq!(k.block_of(&b), Some(0x1234));
        assert_eq!(k.block_of(&k.manifest()), None);
        let root = Keys::new(parse_prefix("").unwrap());
        assert_eq!(root.block(1).as_ref(), "blocks/0000000000000001");
        assert!(parse_prefix("a//b").is_err());
    }
}
