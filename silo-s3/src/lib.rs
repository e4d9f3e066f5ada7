//! # silo-s3
//!
//! S3 for silo: a device stored as one object per block, continuous sync of
//! any device to S3, and the S3 side of S3-assisted migration.
//!
//! ```text
//!   silo provider stack ──write_at/read_at──▶ S3Storage ─┐
//!                                                        │  BlockStore (object layer:
//!   sync (hash index) ─────────put_block────────────────▶│  limit, metrics, errors)
//!                                                        │
//!   migration destination ◀──fetch_blocks_by_hash────────┘──▶ object_store ──▶ S3
//! ```
//!
//! Objects of a device under its prefix: `manifest.json` (size, block size,
//! format version; checked on open), `hashes.bin` (per-block SHA-256 of the
//! blocks the sync knows to be safely stored) and `blocks/<index>`.
//!
//! Requests go through the [`object_store`] crate, whose retry policy
//! (exponential backoff with jitter, bounded by a timeout) handles transient
//! failures; see [`RetrySettings`]. Credentials are held in [`Secret`]s and
//! are never logged or serialised.
#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod grab;
pub mod hashindex;
pub mod keys;
pub mod manifest;
pub mod metrics;
pub mod provider;
pub mod store;
pub mod sync;
#[cfg(feature = "testing")]
pub mod testing;

pub use config::{Credentials, RetrySettings, S3Config, Secret};
pub use error::{s3_error_of, S3Error};
pub use grab::{
    fetch_blocks_by_hash, open_grab_source, GrabFailure, GrabFailureReason, GrabReport, SafeBlock,
};
pub use hashindex::HashIndex;
pub use manifest::Manifest;
pub use metrics::{S3Metrics, S3MetricsSnapshot};
pub use provider::{OpenMode, S3Storage};
pub use store::BlockStore;
pub use sync::{S3Sync, S3SyncMetrics, SyncSettings};

/// The README's examples are compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
