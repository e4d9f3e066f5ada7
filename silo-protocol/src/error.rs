//! Errors of the codec ([`DecodeError`], [`EncodeError`], [`HandshakeError`])
//! and of the transport ([`Error`]).

#[cfg(feature = "transport")]
use crate::message::ErrorCode;

/// A frame or message could not be decoded. Every variant says what was being
/// decoded; none of them is ever a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Fewer bytes than the field needs.
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated {
        /// What was being decoded.
        what: &'static str,
        /// Bytes needed.
        need: u64,
        /// Bytes present.
        have: u64,
    },
    /// Bytes left over after a complete message.
    #[error("{extra} trailing bytes after {what}")]
    TrailingBytes {
        /// The message.
        what: &'static str,
        /// How many bytes were left.
        extra: usize,
    },
    /// The frame header announces a body larger than the configured limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Announced body length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The kind byte names no message of this protocol version.
    #[error("unknown message kind 0x{0:02x}")]
    UnknownKind(u8),
    /// A reserved field or flag is not zero.
    #[error("reserved field {what} is not zero")]
    ReservedNonZero {
        /// The field.
        what: &'static str,
    },
    /// A field holds a value the protocol forbids.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// The field.
        what: &'static str,
        /// Why it is invalid.
        reason: String,
    },
    /// A text field is not UTF-8.
    #[error("{what} is not valid UTF-8")]
    BadUtf8 {
        /// The field.
        what: &'static str,
    },
    /// A compressed payload does not decompress to exactly the declared length.
    #[error("bad {encoding} payload: {reason}")]
    Decompress {
        /// The encoding.
        encoding: &'static str,
        /// What went wrong.
        reason: String,
    },
}

impl DecodeError {
    pub(crate) fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        DecodeError::Invalid {
            what,
            reason: reason.into(),
        }
    }
}

/// A message cannot be encoded (it would break the receiver's limits).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The encoded body is larger than the frame limit.
    #[error("{what} would need a frame of {len} bytes, the limit is {max}")]
    TooLarge {
        /// The message kind.
        what: &'static str,
        /// Body length it would need.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A field does not fit its wire width or breaks a rule (e.g. zero length).
    #[error("cannot encode {what}: {reason}")]
    Invalid {
        /// The field.
        what: &'static str,
        /// Why.
        reason: String,
    },
}

/// The connection handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The peer did not start with the silo magic (not a silo peer).
    #[error("peer is not speaking the silo protocol (bad magic {0:02x?})")]
    BadMagic([u8; 8]),
    /// The peer speaks an incompatible major version.
    #[error("incompatible protocol versions: ours is {ours}, the peer's is {theirs}")]
    IncompatibleVersion {
        /// Our version (`major.minor`).
        ours: String,
        /// The peer's version (`major.minor`).
        theirs: String,
    },
    /// A field of the hello is out of range (e.g. a zero frame limit).
    #[error("invalid hello: {0}")]
    Invalid(String),
    /// The hello was cut short.
    #[error("truncated hello: {0} of 32 bytes")]
    Truncated(usize),
}

/// Errors of the async transport.
#[cfg(feature = "transport")]
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The connection is gone (peer closed, I/O error, protocol violation or
    /// local close). Every pending request and every waiter gets this.
    #[error("connection closed: {0}")]
    ConnectionClosed(std::sync::Arc<str>),
    /// The handshake failed.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// An I/O error during the handshake.
    #[error("I/O error during {context}: {message}")]
    Io {
        /// What we were doing.
        context: &'static str,
        /// The error text.
        message: String,
    },
    /// A message could not be encoded for this peer.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// A received message (e.g. a compressed payload) could not be decoded.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The peer replied with an error response.
    #[error("peer error {code:?} on device {device}: {text}")]
    Remote {
        /// Device the request was for.
        device: u32,
        /// The reason code.
        code: ErrorCode,
        /// The peer's explanation.
        text: String,
    },
    /// The peer replied with a message that does not answer the request.
    #[error("unexpected {got} in reply to {request} on device {device}")]
    UnexpectedResponse {
        /// Device.
        device: u32,
        /// The request kind.
        request: &'static str,
        /// The reply kind.
        got: &'static str,
    },
    /// The request did not complete within the configured timeout.
    #[error("{request} on device {device} timed out after {after:?}")]
    Timeout {
        /// Device.
        device: u32,
        /// The request kind.
        request: &'static str,
        /// The timeout.
        after: std::time::Duration,
    },
    /// The device was closed on this connection ([`crate::Connection::close_device`]).
    #[error("device {device} is closed on this connection")]
    DeviceClosed {
        /// Device.
        device: u32,
    },
    /// The queue for `(device, kind)` already has a consumer.
    #[error("requests of kind {kind} on device {device} already have a consumer")]
    AlreadyClaimed {
        /// Device.
        device: u32,
        /// Kind.
        kind: &'static str,
    },
    /// A message of this kind cannot be sent this way (e.g. a response via
    /// `request`), or uses a feature the peer did not negotiate.
    #[error("cannot send {kind}: {reason}")]
    NotAllowed {
        /// Kind.
        kind: &'static str,
        /// Why.
        reason: String,
    },
}

#[cfg(feature = "transport")]
impl Error {
    /// True for [`Error::ConnectionClosed`].
    pub fn is_connection_closed(&self) -> bool {
        matches!(self, Error::ConnectionClosed(_))
    }
}
