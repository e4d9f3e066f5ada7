//! The error type of `silo-s3`.
//!
//! Constructors and S3-specific calls return [`S3Error`]; the
//! [`Provider`](silo_storage::Provider) methods return
//! [`silo_storage::Error`], into which an `S3Error` converts as
//! [`silo_storage::Error::Remote`] (kind [`ErrorKind::Remote`]) with the
//! `S3Error` as its source, so a caller can still downcast to it.
//!
//! Messages never contain credentials.

use silo_storage::ErrorKind;

/// Errors from the S3 side of silo.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum S3Error {
    /// The configuration is incomplete or inconsistent.
    #[error("invalid S3 configuration: {0}")]
    Config(String),
    /// The server rejected our credentials or signature (HTTP 401/403).
    #[error(
        "S3 authentication failed for bucket `{bucket}` at {endpoint} while {context} \
         (check the access key and the secret key): {source}"
    )]
    Authentication {
        /// The endpoint we talked to.
        endpoint: String,
        /// The bucket.
        bucket: String,
        /// What we were doing.
        context: String,
        /// The error from the client library.
        #[source]
        source: Box<object_store::Error>,
    },
    /// The bucket does not exist.
    #[error("S3 bucket `{bucket}` does not exist at {endpoint}")]
    BucketNotFound {
        /// The endpoint we talked to.
        endpoint: String,
        /// The bucket.
        bucket: String,
    },
    /// The device's manifest object is missing (open without create).
    #[error("no silo manifest at `{key}`: the device was never created under this prefix")]
    ManifestMissing {
        /// The manifest's object key.
        key: String,
    },
    /// The manifest stored in the bucket disagrees with the configuration.
    #[error(
        "the silo manifest at `{key}` says {field} = {stored}, but this device is configured \
         with {field} = {configured}"
    )]
    ManifestMismatch {
        /// The manifest's object key.
        key: String,
        /// The field that differs (`size`, `block_size`, `version`, …).
        field: &'static str,
        /// The value in the bucket.
        stored: String,
        /// The configured value.
        configured: String,
    },
    /// An object we wrote (manifest, hash index, block) cannot be decoded or
    /// has the wrong length.
    #[error("corrupt S3 object `{key}`: {reason}")]
    Corrupt {
        /// The object key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The object is missing.
    #[error("S3 object `{key}` not found")]
    NotFound {
        /// The object key.
        key: String,
    },
    /// A request failed (after `object_store`'s retries for transient
    /// errors).
    #[error("S3 request failed while {context}: {source}")]
    Request {
        /// What we were doing.
        context: String,
        /// The error from the client library.
        #[source]
        source: Box<object_store::Error>,
    },
    /// An upload was cancelled by `cancel_writes` or a sync stop.
    #[error("S3 upload cancelled while {context}")]
    Cancelled {
        /// What we were doing.
        context: String,
    },
    /// Some uploads of a sync pass failed (the blocks stay dirty and are
    /// retried on the next pass).
    #[error("{failed} of {blocks} block uploads of the sync pass failed")]
    SyncIncomplete {
        /// Failed uploads.
        failed: u64,
        /// Blocks in the pass.
        blocks: u64,
    },
    /// A silo storage error (e.g. reading the device being synced).
    #[error(transparent)]
    Storage(#[from] silo_storage::Error),
}

impl S3Error {
    /// The closest [`ErrorKind`] for errno/wire mapping.
    pub fn kind(&self) -> ErrorKind {
        match self {
            S3Error::Config(_) => ErrorKind::Invalid,
            S3Error::ManifestMismatch { .. } => ErrorKind::Invalid,
            S3Error::Corrupt { .. } => ErrorKind::Corrupt,
            S3Error::Cancelled { .. } => ErrorKind::Cancelled,
            S3Error::Storage(e) => e.kind(),
            _ => ErrorKind::Remote,
        }
    }

    /// True for [`S3Error::Authentication`], also when wrapped in a
    /// [`silo_storage::Error`].
    pub fn is_authentication(&self) -> bool {
        matches!(self, S3Error::Authentication { .. })
    }
}

/// Finds an [`S3Error`] inside a [`silo_storage::Error`] returned by a
/// provider call, if there is one.
pub fn s3_error_of(e: &silo_storage::Error) -> Option<&S3Error> {
    match e {
        silo_storage::Error::Remote { source, .. } => source.downcast_ref::<S3Error>(),
        _ => None,
    }
}

impl From<S3Error> for silo_storage::Error {
    fn from(e: S3Error) -> Self {
        match e {
            S3Error::Storage(e) => e,
            S3Error::Config(s) => silo_storage::Error::Invalid(s),
            other => silo_storage::Error::remote("S3", other),
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = S3Error> = std::result::Result<T, E>;
