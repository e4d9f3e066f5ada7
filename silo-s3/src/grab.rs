//! The S3 side of S3-assisted migration: fetch blocks that the source says
//! are safely in S3 (with their SHA-256), verify each one, and write it into
//! the destination. A block that cannot be fetched or does not match its
//! hash is reported (at once, through a callback, and in the final report)
//! so the caller can ask the migration source for it instead — never a
//! panic, never a block left silently missing.
//!
//! Credentials never travel: the destination opens the bucket with its own
//! [`S3Config`] (or environment) and receives only block
//! numbers and hashes.

use futures::StreamExt;
use silo_storage::{Error, Provider};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::S3Config;
use crate::error::{Result as S3Result, S3Error};
use crate::hashindex::{sha256, zero_hash, Hash};
use crate::store::BlockStore;

/// A block that is safely stored in S3 with content hash `hash`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SafeBlock {
    /// Block index (offset = block × block size of the store's manifest).
    pub block: u64,
    /// SHA-256 of the block's content (the full block; shorter for a
    /// trailing partial block).
    pub hash: Hash,
}

/// Why a block could not be grabbed.
#[derive(Debug)]
#[non_exhaustive]
pub enum GrabFailureReason {
    /// The object's content does not hash to the advertised hash (it was
    /// overwritten after the list was made, or is corrupt).
    HashMismatch {
        /// Hash of what S3 returned.
        actual: Hash,
    },
    /// The S3 request failed (after retries).
    S3(S3Error),
    /// Writing into the destination failed.
    Write(Error),
    /// The block number is outside the device.
    OutOfRange,
    /// The grab was cancelled before this block was delivered.
    Cancelled,
}

impl std::fmt::Display for GrabFailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GrabFailureReason::HashMismatch { actual } => {
                write!(f, "hash mismatch (S3 has {})", hex::encode(actual))
            }
            GrabFailureReason::S3(e) => write!(f, "S3 error: {e}"),
            GrabFailureReason::Write(e) => write!(f, "destination write failed: {e}"),
            GrabFailureReason::OutOfRange => f.write_str("block outside the device"),
            GrabFailureReason::Cancelled => f.write_str("cancelled"),
        }
    }
}

/// One block that was not delivered; fetch it from the migration source.
#[derive(Debug)]
pub struct GrabFailure {
    /// The block.
    pub block: u64,
    /// The hash that was advertised.
    pub expected: Hash,
    /// Why.
    pub reason: GrabFailureReason,
}

/// Outcome of [`fetch_blocks_by_hash`]: every requested block is either
/// counted in `delivered` or listed in `failed`.
#[derive(Debug, Default)]
pub struct GrabReport {
    /// Blocks verified and written into the destination.
    pub delivered: u64,
    /// Bytes written into the destination.
    pub bytes: u64,
    /// Blocks that were not delivered.
    pub failed: Vec<GrabFailure>,
}

/// Opens the objects of an existing device for grabbing, with the
/// destination's own configuration (credentials never travel with the
/// migration). `config.size` and `config.block_size` must be the
/// migration's: the device's manifest is checked against them, so a sync
/// with another block size is an error here, at start-up, instead of a
/// silently useless assist.
pub async fn open_grab_source(config: &S3Config) -> S3Result<BlockStore> {
    let store = BlockStore::from_config(config)?;
    store.probe().await?;
    let key = store.keys().manifest().to_string();
    match store.read_manifest().await? {
        None => Err(S3Error::ManifestMissing { key }),
        Some(m) => {
            m.check(&key, config.size, config.block_size)?;
            Ok(store)
        }
    }
}

async fn grab_one<D: Provider + ?Sized>(
    store: &BlockStore,
    sb: SafeBlock,
    dest: &D,
    cancel: &CancellationToken,
) -> Result<u64, GrabFailureReason> {
    let layout = store.layout();
    let len = layout.block_len(sb.block);
    if len == 0 {
        return Err(GrabFailureReason::OutOfRange);
    }
    if cancel.is_cancelled() {
        return Err(GrabFailureReason::Cancelled);
    }
    let fetched = tokio::select! {
        biased;
        _ = cancel.cancelled() => return Err(GrabFailureReason::Cancelled),
        r = store.get_block(sb.block) => r.map_err(GrabFailureReason::S3)?,
    };
    let offset = layout.block_offset(sb.block);
    let written = match fetched {
        Some(d) => {
            let actual = sha256(&d);
            if actual != sb.hash {
                return Err(GrabFailureReason::HashMismatch { actual });
            }
            dest.write_at(offset, d).await
        }
        // A missing object is an all-zero block.
        None => {
            let actual = zero_hash(len);
            if actual != sb.hash {
                return Err(GrabFailureReason::HashMismatch { actual });
            }
            dest.write_zeroes(offset, len).await
        }
    };
    written.map_err(GrabFailureReason::Write)?;
    Ok(len)
}

/// Fetches `blocks` from `store` with at most `concurrency` blocks in flight,
/// verifies each against its SHA-256 and writes it into `dest` at
/// `block × block_size`. `on_failure` is called as soon as a block fails
/// (so the caller can request it from the migration source right away);
/// the report lists the same failures. Cancelling `cancel` stops early:
/// blocks not yet delivered are reported as [`GrabFailureReason::Cancelled`].
///
/// The store's geometry (from its manifest, see
/// [`S3Storage::open`](crate::S3Storage::open)) must be the migration's: the
/// caller checks `store.layout().block_size()` against its own block size
/// before starting.
pub async fn fetch_blocks_by_hash<D, F>(
    store: &BlockStore,
    blocks: &[SafeBlock],
    concurrency: usize,
    dest: &D,
    cancel: &CancellationToken,
    mut on_failure: F,
) -> GrabReport
where
    D: Provider + ?Sized,
    F: FnMut(&GrabFailure),
{
    let mut report = GrabReport::default();
    let mut results = futures::stream::iter(blocks.iter().copied())
        .map(|sb| async move { (sb, grab_one(store, sb, dest, cancel).await) })
        .buffer_unordered(concurrency.max(1));
    while let Some((sb, r)) = results.next().await {
        match r {
            Ok(n) => {
                report.delivered += 1;
                report.bytes += n;
            }
            Err(reason) => {
                match &reason {
                    GrabFailureReason::Cancelled => debug!(block = sb.block, "grab cancelled"),
                    other => warn!(block = sb.block, reason = %other, "grab failed; falling back"),
                }
                let f = GrabFailure {
                    block: sb.block,
                    expected: sb.hash,
                    reason,
                };
                on_failure(&f);
                report.failed.push(f);
            }
        }
    }
    report
}
