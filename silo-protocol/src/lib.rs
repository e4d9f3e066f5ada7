//! # silo-protocol
//!
//! The wire between a migration source and destination: a versioned, bounded,
//! sans-IO codec and an async transport that multiplexes many devices and
//! transactions over one byte stream.
//!
//! ```text
//!  source (silo-devicegroup)                    destination
//!  ToProtocol (Provider) ──┐                ┌── FromProtocol → local Provider
//!                          ▼                │
//!                  transport::Connection ◄══════► transport::Connection
//!                   (tokio, any AsyncRead + AsyncWrite: TCP, Unix, TLS, duplex)
//!                          │
//!       frame / message / handshake / compress   ← sans-IO codec, no tokio
//! ```
//!
//! * [`frame`]: the 16-byte header, [`Kind`]s, [`Limits`] checked before any
//!   allocation, a streaming [`FrameDecoder`].
//! * [`message`]: every [`Message`] and its body codec (canonical: whatever
//!   decodes re-encodes to the same bytes).
//! * [`handshake`]: magic, version, feature flags, frame and queue limits.
//! * [`compress`]: write-at payload encodings (zeroes, zero-run elision, LZ4)
//!   with decoders bounded by the declared block length.
//! * [`transport`] (feature `transport`, default): [`transport::Connection`].
//! * `bridge` (feature `storage`): `ToProtocol` / `FromProtocol` between
//!   `silo-storage` providers and a connection.
//!
//! The byte layouts, handshake, flows and versioning rules are in
//! `PROTOCOL.md`.
//!
//! # Sans-IO use of the codec
//!
//! ```
//! use bytes::{Bytes, BytesMut};
//! use silo_protocol::{Compression, Features, Frame, FrameDecoder, Limits, Message, WriteAt};
//!
//! let limits = Limits::default();
//! let block = Bytes::from(vec![0u8; 4096]);
//! let frame = Frame {
//!     device: 1,
//!     txid: 7,
//!     message: Message::WriteAt(WriteAt::compressed(0, &block, Compression::Lz4, Features::ALL)),
//! };
//! // Header and fixed fields go to `head`; the bulk payload is returned
//! // separately so it can be written without a copy.
//! let mut head = BytesMut::new();
//! let tail = frame.encode(&mut head, &limits)?;
//!
//! // The receiving side feeds whatever bytes arrive into a decoder.
//! let mut decoder = FrameDecoder::new(limits);
//! let mut rx = BytesMut::new();
//! rx.extend_from_slice(&head);
//! rx.extend_from_slice(&tail);
//! let got = decoder.decode(&mut rx)?.expect("a whole frame");
//! let Message::WriteAt(w) = &got.message else { unreachable!() };
//! assert_eq!(w.data()?, block); // an all-zero block travelled as a 32-byte frame
//! assert_eq!(head.len() + tail.len(), 32);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]

pub mod compress;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod message;

#[cfg(feature = "transport")]
pub mod transport;

#[cfg(feature = "storage")]
pub mod bridge;

pub use compress::{Compression, Encoding};
pub use error::{DecodeError, EncodeError, HandshakeError};
pub use frame::{
    Class, Frame, FrameDecoder, FrameHeader, Kind, Limits, DEFAULT_MAX_FRAME, HEADER_LEN,
};
pub use handshake::{Features, Hello, Negotiated};
pub use message::{
    AlternateSource, BlockList, DeviceGroupInfo, DeviceInfo, ErrorCode, ErrorResponse, Event,
    EventKind, HashLocation, Message, Range, ReadAt, WriteAt, WriteAtHash,
};

#[cfg(feature = "transport")]
pub use error::Error;
#[cfg(feature = "transport")]
pub use transport::{Config, Connection, Incoming, Metrics, MetricsSnapshot, Priority, Request};

/// Decodes one frame from `data` and, if it is valid, checks that it
/// re-encodes to exactly the same bytes. This is the fuzz target's body
/// (also replayed over a checked-in corpus by the tests). Never panics on any
/// input except when canonical re-encoding is violated (a bug).
pub fn fuzz_decode(data: &[u8]) {
    let limits = Limits { max_frame: 1 << 20 };
    let mut offset = 0;
    while offset < data.len() {
        match Frame::decode(&data[offset..], &limits) {
            Ok((frame, used)) => {
                let again = frame.to_vec(&limits).expect("a decoded frame re-encodes");
                assert_eq!(
                    &again[..],
                    &data[offset..offset + used],
                    "canonical re-encoding"
                );
                if let Message::WriteAt(w) = &frame.message {
                    if let Ok(d) = w.data() {
                        assert_eq!(d.len(), w.length as usize);
                    }
                }
                offset += used;
            }
            Err(_) => break,
        }
    }
    let _ = Hello::decode(data);
    let mut dec = FrameDecoder::new(limits);
    let mut buf = bytes::BytesMut::from(data);
    while let Ok(Some(_)) = dec.decode(&mut buf) {}
}
