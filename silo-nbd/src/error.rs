//! The error type of `silo-nbd`.

use crate::handshake::HandshakeError;
use crate::transmission::ProtocolError;

/// Errors of the server and kernel attach.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Socket I/O failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The client broke the handshake.
    #[error("handshake failed: {0}")]
    Handshake(#[from] HandshakeError),
    /// The client broke the transmission protocol.
    #[error("protocol violation: {0}")]
    Protocol(#[from] ProtocolError),
    /// The handshake took too long.
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// An export with this name is already served.
    #[error("an export named {0:?} already exists")]
    ExportExists(String),
    /// No export with this name.
    #[error("no export named {0:?}")]
    NoSuchExport(String),
    /// Kernel attach failed.
    #[error("kernel attach: {0}")]
    Kernel(String),
}

impl Error {
    pub(crate) fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> Error {
        move |source| Error::Io { context, source }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
