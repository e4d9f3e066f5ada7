//! The manifest object: what a reader must know to interpret the block
//! objects (device size, block size, format version). Written when a device
//! is created, checked when it is opened, so a mismatched configuration is
//! an error at start-up instead of silently wrong data.

use serde::{Deserialize, Serialize};

use crate::error::{Result, S3Error};

/// Format name stored in every manifest.
pub const FORMAT: &str = "silo-s3";
/// Current format version.
pub const FORMAT_VERSION: u32 = 1;
/// Largest manifest we accept (it is a few hundred bytes).
pub const MAX_MANIFEST_LEN: usize = 64 * 1024;

/// Contents of `<prefix>/manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// Format version ([`FORMAT_VERSION`]).
    pub version: u32,
    /// Device size in bytes.
    pub size: u64,
    /// Block size in bytes (= object size, except a trailing partial block).
    pub block_size: u64,
}

impl Manifest {
    /// The manifest of a device of this geometry.
    pub fn new(size: u64, block_size: u64) -> Self {
        Manifest {
            format: FORMAT.into(),
            version: FORMAT_VERSION,
            size,
            block_size,
        }
    }

    /// Serialises to JSON.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a manifest always serialises")
    }

    /// Parses a manifest read from `key`.
    pub fn decode(key: &str, data: &[u8]) -> Result<Self> {
        if data.len() > MAX_MANIFEST_LEN {
            return Err(S3Error::Corrupt {
                key: key.into(),
                reason: format!("manifest is {} bytes long", data.len()),
            });
        }
        let m: Manifest = serde_json::from_slice(data).map_err(|e| S3Error::Corrupt {
            key: key.into(),
            reason: format!("not a silo manifest: {e}"),
        })?;
        if m.format != FORMAT {
            return Err(S3Error::Corrupt {
                key: key.into(),
                reason: format!("format is `{}`, expected `{FORMAT}`", m.format),
            });
        }
        Ok(m)
    }

    /// Checks that this (stored) manifest matches the configured geometry.
    pub fn check(&self, key: &str, size: u64, block_size: u64) -> Result<()> {
        let mismatch = |field, stored: u64, configured: u64| S3Error::ManifestMismatch {
            key: key.into(),
            field,
            stored: stored.to_string(),
            configured: configured.to_string(),
        };
        if self.version != FORMAT_VERSION {
            return Err(mismatch(
                "version",
                self.version.into(),
                FORMAT_VERSION.into(),
            ));
        }
        if self.block_size != block_size {
            return Err(mismatch("block_size", self.block_size, block_size));
        }
        if self.size != size {
            return Err(mismatch("size", self.size, size));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_checks() {
        let m = Manifest::new(10_000, 4096);
        let back = Manifest::decode("k", &m.encode()).unwrap();
        assert_eq!(back, m);
        back.check("k", 10_000, 4096).unwrap();
        let e = back.check("k", 10_000, 8192).unwrap_err();
        assert!(e.to_string().contains("block_size = 4096"), "{e}");
        assert!(back.check("k", 20_000, 4096).is_err());
        assert!(Manifest::decode("k", b"{}").is_err());
        assert!(Manifest::decode("k", b"garbage").is_err());
        let mut other = m.clone();
        other.format = "other".into();
        assert!(Manifest::decode("k", &other.encode()).is_err());
    }
}
