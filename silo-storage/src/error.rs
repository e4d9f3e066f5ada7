//! The one error type of `silo-storage`, with the context a caller needs
//! (operation, offset, length) and a small stable [`ErrorKind`] for mapping to
//! errno values (NBD) or wire error codes (protocol).

use std::fmt;

/// The operation that failed, carried in every error for context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Op {
    /// A read.
    Read,
    /// A write.
    Write,
    /// A flush (durability barrier).
    Flush,
    /// A trim / discard.
    Trim,
    /// A write of zeroes.
    WriteZeroes,
    /// Closing a provider.
    Close,
    /// Opening or creating a provider.
    Open,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::WriteZeroes => "write-zeroes",
            Op::Close => "close",
            Op::Open => "open",
        })
    }
}

/// A small, stable classification of [`Error`]s, for errno mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The request lies (partly) outside the device.
    OutOfRange,
    /// The underlying medium failed.
    Io,
    /// The device refuses writes.
    ReadOnly,
    /// The operation is not supported by this provider.
    Unsupported,
    /// The provider is closed.
    Closed,
    /// The operation was cancelled (`cancel_writes`, shutdown, dropped peer).
    Cancelled,
    /// A wait ran out of time.
    Timeout,
    /// Data failed a consistency check (hash mismatch, mirror divergence).
    Corrupt,
    /// The caller passed an invalid argument or configuration.
    Invalid,
    /// No space left (mapped storage full, sparse file cannot grow).
    OutOfSpace,
    /// A remote peer or service failed (protocol, S3).
    Remote,
}

/// Errors returned by providers and the migration engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request lies (partly) outside the device.
    #[error("{op} of {len} bytes at offset {offset} is out of range for a device of {size} bytes")]
    OutOfRange {
        /// The operation.
        op: Op,
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Size of the device.
        size: u64,
    },
    /// The underlying medium failed.
    #[error("{op} of {len} bytes at offset {offset} failed: {source}")]
    Io {
        /// The operation.
        op: Op,
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The device refuses writes.
    #[error("{op} refused: the device is read-only")]
    ReadOnly {
        /// The operation.
        op: Op,
    },
    /// The operation is not supported by this provider.
    #[error("{op} is not supported by {provider}")]
    Unsupported {
        /// The operation.
        op: Op,
        /// The provider that refused it.
        provider: &'static str,
    },
    /// The provider is closed.
    #[error("{op} failed: the device is closed")]
    Closed {
        /// The operation.
        op: Op,
    },
    /// The operation was cancelled.
    #[error("{op} of {len} bytes at offset {offset} was cancelled")]
    Cancelled {
        /// The operation.
        op: Op,
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
    },
    /// A wait ran out of time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long we waited.
        after: std::time::Duration,
    },
    /// Data failed a consistency check.
    #[error("data corruption: {0}")]
    Corrupt(String),
    /// An invalid argument or configuration.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// No space left.
    #[error("out of space: {0}")]
    OutOfSpace(String),
    /// A remote peer or service failed.
    #[error("{context}: {source}")]
    Remote {
        /// What we were doing.
        context: String,
        /// The remote error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

impl Error {
    /// The stable classification of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::OutOfRange { .. } => ErrorKind::OutOfRange,
            Error::Io { .. } => ErrorKind::Io,
            Error::ReadOnly { .. } => ErrorKind::ReadOnly,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
            Error::Closed { .. } => ErrorKind::Closed,
            Error::Cancelled { .. } => ErrorKind::Cancelled,
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::Corrupt(_) => ErrorKind::Corrupt,
            Error::Invalid(_) => ErrorKind::Invalid,
            Error::OutOfSpace(_) => ErrorKind::OutOfSpace,
            Error::Remote { .. } => ErrorKind::Remote,
        }
    }

    /// Wraps an OS error with its context.
    pub fn io(op: Op, offset: u64, len: u64, source: std::io::Error) -> Self {
        Error::Io {
            op,
            offset,
            len,
            source,
        }
    }

    /// Wraps any remote failure with a context string.
    pub fn remote(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Error::Remote {
            context: context.into(),
            source: source.into(),
        }
    }

    /// A copy of this error that keeps its kind and message (sources are
    /// flattened to text). Useful to hand one failure to several waiters.
    pub fn duplicate(&self) -> Self {
        match self {
            Error::OutOfRange {
                op,
                offset,
                len,
                size,
            } => Error::OutOfRange {
                op: *op,
                offset: *offset,
                len: *len,
                size: *size,
            },
            Error::Io {
                op,
                offset,
                len,
                source,
            } => Error::Io {
                op: *op,
                offset: *offset,
                len: *len,
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            Error::ReadOnly { op } => Error::ReadOnly { op: *op },
            Error::Unsupported { op, provider } => Error::Unsupported { op: *op, provider },
            Error::Closed { op } => Error::Closed { op: *op },
            Error::Cancelled { op, offset, len } => Error::Cancelled {
                op: *op,
                offset: *offset,
                len: *len,
            },
            Error::Timeout { what, after } => Error::Timeout {
                what: what.clone(),
                after: *after,
            },
            Error::Corrupt(s) => Error::Corrupt(s.clone()),
            Error::Invalid(s) => Error::Invalid(s.clone()),
            Error::OutOfSpace(s) => Error::OutOfSpace(s.clone()),
            Error::Remote { context, source } => Error::Remote {
                context: context.clone(),
                source: source.to_string().into(),
            },
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Checks that `[offset, offset + len)` lies inside a device of `size` bytes,
/// without overflowing.
pub fn check_range(op: Op, offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange {
            op,
            offset,
            len,
            size,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_checks_do_not_overflow() {
        assert!(check_range(Op::Read, 0, 10, 10).is_ok());
        assert!(check_range(Op::Read, 10, 0, 10).is_ok());
        assert!(check_range(Op::Read, 10, 1, 10).is_err());
        assert!(check_range(Op::Read, u64::MAX, 2, 10).is_err());
        assert!(check_range(Op::Read, 11, 0, 10).is_err());
    }

    #[test]
    fn messages_carry_context() {
        let e = check_range(Op::Write, 4096, 512, 4000).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("write") && s.contains("4096") && s.contains("4000"),
            "{s}"
        );
        assert_eq!(e.kind(), ErrorKind::OutOfRange);
        assert_eq!(e.duplicate().to_string(), s);
    }
}
