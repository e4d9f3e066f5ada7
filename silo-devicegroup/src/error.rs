//! The error type of device groups.

use crate::policy::PolicyError;
use crate::schema::SchemaError;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a device-group operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A schema is invalid.
    #[error(transparent)]
    Schema(#[from] Box<SchemaError>),
    /// A sender-supplied schema was refused by the receiver's policy.
    #[error("device {index}: {source}")]
    Policy {
        /// Index of the device in the group.
        index: usize,
        /// The refusal.
        #[source]
        source: PolicyError,
    },
    /// Building or using a device's storage failed.
    #[error("device {device:?}: {context}: {source}")]
    Storage {
        /// Device name.
        device: String,
        /// What was being done.
        context: String,
        /// The storage error.
        #[source]
        source: silo_storage::Error,
    },
    /// A protocol operation failed (connection dropped, peer error, …).
    #[error("{context}: {source}")]
    Protocol {
        /// What was being done.
        context: String,
        /// The protocol error.
        #[source]
        source: silo_protocol::Error,
    },
    /// The connection closed before the operation could finish.
    #[error("{context}: the migration connection closed: {reason}")]
    Disconnected {
        /// What was being done.
        context: String,
        /// Why the connection closed.
        reason: String,
    },
    /// A call was made in the wrong state (e.g. `migrate_all` before
    /// `start_migration_to`).
    #[error("{0}")]
    State(String),
    /// A feature of the schema is not supported by this build.
    #[error("device {device:?}: {what} is not supported yet")]
    Unsupported {
        /// Device name.
        device: String,
        /// What is not supported.
        what: String,
    },
    /// The peer sent something inconsistent (bad device ids, sizes that do
    /// not match the schema, …).
    #[error("invalid data from the peer: {0}")]
    Peer(String),
    /// A hook or handler asked to abort.
    #[error("aborted by {hook}: {reason}")]
    Aborted {
        /// The hook.
        hook: &'static str,
        /// Its reason.
        reason: String,
    },
    /// An S3 operation of a device failed (opening its bucket, starting
    /// its sync, an S3 device).
    #[error("device {device:?}: {context}: {source}")]
    S3 {
        /// Device name.
        device: String,
        /// What was being done.
        context: String,
        /// The S3 error (boxed: it is large).
        #[source]
        source: Box<silo_s3::S3Error>,
    },
    /// The NBD export could not be set up.
    #[error("device {device:?}: NBD export: {reason}")]
    Nbd {
        /// Device name.
        device: String,
        /// Why.
        reason: String,
    },
}

impl From<SchemaError> for Error {
    fn from(e: SchemaError) -> Self {
        Error::Schema(Box::new(e))
    }
}

impl Error {
    pub(crate) fn storage(
        device: &str,
        context: impl Into<String>,
        source: silo_storage::Error,
    ) -> Error {
        Error::Storage {
            device: device.to_string(),
            context: context.into(),
            source,
        }
    }

    pub(crate) fn s3(device: &str, context: impl Into<String>, source: silo_s3::S3Error) -> Error {
        Error::S3 {
            device: device.to_string(),
            context: context.into(),
            source: Box::new(source),
        }
    }

    pub(crate) fn protocol(context: impl Into<String>, source: silo_protocol::Error) -> Error {
        let context = context.into();
        match source {
            silo_protocol::Error::ConnectionClosed(reason) => Error::Disconnected {
                context,
                reason: reason.to_string(),
            },
            source => Error::Protocol { context, source },
        }
    }

    /// Whether the error means the migration connection is gone.
    pub fn is_disconnected(&self) -> bool {
        match self {
            Error::Disconnected { .. } => true,
            Error::Protocol { source, .. } => {
                matches!(source, silo_protocol::Error::ConnectionClosed(_))
            }
            _ => false,
        }
    }
}
