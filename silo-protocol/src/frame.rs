//! Framing: the 16-byte frame header, message kinds, limits and a streaming
//! frame decoder. Sans-IO: bytes in, frames out.
//!
//! ```text
//! offset width field
//!      0     4 len     body length in bytes (excluding this header), u32 LE
//!      4     1 kind    message kind (see `Kind`); bit 7 set = response
//!      5     1 flags   0 in protocol version 1
//!      6     2 reserved, 0
//!      8     4 device  device id, u32 LE (0 = device-group control channel)
//!     12     4 txid    transaction id, u32 LE (0 for notices)
//! ```

use bytes::{Buf, Bytes, BytesMut};
use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{DecodeError, EncodeError};
use crate::message::Message;

/// Size of the frame header in bytes.
pub const HEADER_LEN: usize = 16;

/// Default maximum frame body (64 MiB): room for a 64 MiB block in one frame.
pub const DEFAULT_MAX_FRAME: u32 = 64 << 20;

/// The fixed frame header, as laid out on the wire.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct RawHeader {
    /// Body length.
    pub len: U32,
    /// Message kind.
    pub kind: u8,
    /// Flags (0).
    pub flags: u8,
    /// Reserved (0).
    pub reserved: U16,
    /// Device id.
    pub device: U32,
    /// Transaction id.
    pub txid: U32,
}

/// Size limits applied while decoding, before anything is allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame body accepted (bytes). Also the largest block a write,
    /// read or decompression may declare.
    pub max_frame: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame: DEFAULT_MAX_FRAME,
        }
    }
}

/// Whether a kind is a request (answered), a notice (not answered) or a
/// response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// Expects exactly one response with the same txid (txid ≠ 0).
    Request,
    /// Fire and forget (txid = 0).
    Notice,
    /// Answers a request (txid = the request's).
    Response,
}

macro_rules! kinds {
    ($( $(#[$doc:meta])* $name:ident = $val:literal, $class:ident, $text:literal; )*) => {
        /// Message kinds (the `kind` byte of the frame header).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u8)]
        #[non_exhaustive]
        pub enum Kind {
            $( $(#[$doc])* $name = $val, )*
        }

        impl Kind {
            /// Every kind, in wire order.
            pub const ALL: &'static [Kind] = &[$(Kind::$name),*];

            /// The kind for a wire byte.
            pub fn from_u8(b: u8) -> Option<Kind> {
                match b {
                    $( $val => Some(Kind::$name), )*
                    _ => None,
                }
            }

            /// Request, notice or response.
            pub fn class(self) -> Class {
                match self {
                    $( Kind::$name => Class::$class, )*
                }
            }

            /// A stable name (for errors, logs and metrics).
            pub fn name(self) -> &'static str {
                match self {
                    $( Kind::$name => $text, )*
                }
            }
        }
    };
}

kinds! {
    /// Device size, block size, name and schema.
    DeviceInfo = 0x01, Notice, "device-info";
    /// Device infos of every device of a group (on device 0).
    DeviceGroupInfo = 0x02, Notice, "device-group-info";
    /// A block of data (plain or compressed).
    WriteAt = 0x03, Request, "write-at";
    /// Block content known by its SHA-256 (fetch it elsewhere).
    WriteAtHash = 0x04, Request, "write-at-hash";
    /// Read a range from the peer.
    ReadAt = 0x05, Request, "read-at";
    /// The receiver needs a range soon (priority hint).
    NeedAt = 0x06, Notice, "need-at";
    /// The receiver no longer needs a range (it was written locally).
    DontNeedAt = 0x07, Notice, "dont-need-at";
    /// Blocks changed since they were sent; they will be sent again.
    DirtyList = 0x08, Request, "dirty-list";
    /// A migration event (lock phases, completed, custom data).
    Event = 0x09, Request, "event";
    /// Blocks available from S3, with their SHA-256.
    AlternateSources = 0x0a, Request, "alternate-sources";
    /// Blocks the receiver already holds (shared base image).
    YouAlreadyHave = 0x0b, Request, "you-already-have";
    /// The device is removed from the migration.
    RemoveDevice = 0x0c, Notice, "remove-device";
    /// A write (or hash write) succeeded.
    WriteAtOk = 0x81, Response, "write-at-ok";
    /// The data of a read.
    ReadAtData = 0x82, Response, "read-at-data";
    /// Generic acknowledgement (dirty list, event, alternate sources, you-already-have).
    Ack = 0x83, Response, "ack";
    /// A request failed: reason code and text.
    Error = 0x84, Response, "error";
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A decoded, validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Body length.
    pub len: u32,
    /// Message kind.
    pub kind: Kind,
    /// Device id.
    pub device: u32,
    /// Transaction id.
    pub txid: u32,
}

impl FrameHeader {
    /// Decodes and validates a header: known kind, zero flags and reserved
    /// bits, txid rule of the kind's class, and `len <= limits.max_frame`.
    /// Call this before allocating the body.
    pub fn decode(buf: &[u8], limits: &Limits) -> Result<FrameHeader, DecodeError> {
        let (raw, _) = RawHeader::read_from_prefix(buf).map_err(|_| DecodeError::Truncated {
            what: "frame header",
            need: HEADER_LEN as u64,
            have: buf.len() as u64,
        })?;
        let len = raw.len.get();
        if len > limits.max_frame {
            return Err(DecodeError::FrameTooLarge {
                len: len.into(),
                max: limits.max_frame.into(),
            });
        }
        let kind = Kind::from_u8(raw.kind).ok_or(DecodeError::UnknownKind(raw.kind))?;
        if raw.flags != 0 {
            return Err(DecodeError::ReservedNonZero {
                what: "frame flags",
            });
        }
        if raw.reserved.get() != 0 {
            return Err(DecodeError::ReservedNonZero {
                what: "frame reserved",
            });
        }
        let txid = raw.txid.get();
        match (kind.class(), txid) {
            (Class::Notice, 0) | (Class::Request | Class::Response, 1..) => {}
            (Class::Notice, _) => {
                return Err(DecodeError::invalid(
                    "txid",
                    format!("a {kind} notice must carry txid 0"),
                ))
            }
            _ => {
                return Err(DecodeError::invalid(
                    "txid",
                    format!("a {kind} must carry a non-zero txid"),
                ))
            }
        }
        Ok(FrameHeader {
            len,
            kind,
            device: raw.device.get(),
            txid,
        })
    }

    /// The wire bytes of this header.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let raw = RawHeader {
            len: U32::new(self.len),
            kind: self.kind as u8,
            flags: 0,
            reserved: U16::new(0),
            device: U32::new(self.device),
            txid: U32::new(self.txid),
        };
        let mut out = [0u8; HEADER_LEN];
        out.copy_from_slice(raw.as_bytes());
        out
    }
}

/// A message with its routing: device id and transaction id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Device id (0 = device-group control channel).
    pub device: u32,
    /// Transaction id (0 for notices).
    pub txid: u32,
    /// The message.
    pub message: Message,
}

impl Frame {
    /// Encodes the header and the message's fixed fields into `dst` and
    /// returns the bulk payload (block data, read data, custom event data)
    /// that must follow it on the wire. The payload is **not** copied: write
    /// `dst` and then the returned bytes (e.g. with a vectored write).
    ///
    /// Fails if the body would exceed `limits.max_frame` or a field does not
    /// fit its wire width.
    pub fn encode(&self, dst: &mut BytesMut, limits: &Limits) -> Result<Bytes, EncodeError> {
        Frame::encode_parts(self.device, self.txid, &self.message, dst, limits)
    }

    /// [`Frame::encode`] from borrowed parts (no clone of the message).
    pub fn encode_parts(
        device: u32,
        txid: u32,
        message: &Message,
        dst: &mut BytesMut,
        limits: &Limits,
    ) -> Result<Bytes, EncodeError> {
        let kind = message.kind();
        if (kind.class() != Class::Notice) != (txid != 0) {
            return Err(EncodeError::Invalid {
                what: "txid",
                reason: format!("{kind} with txid {txid}"),
            });
        }
        let start = dst.len();
        dst.extend_from_slice(&[0u8; HEADER_LEN]);
        let tail = match message.encode_body(dst, limits) {
            Ok(t) => t,
            Err(e) => {
                dst.truncate(start);
                return Err(e);
            }
        };
        let body = (dst.len() - start - HEADER_LEN) as u64 + tail.len() as u64;
        if body > u64::from(limits.max_frame) {
            dst.truncate(start);
            return Err(EncodeError::TooLarge {
                what: kind.name(),
                len: body,
                max: limits.max_frame.into(),
            });
        }
        let header = FrameHeader {
            len: body as u32,
            kind,
            device,
            txid,
        };
        dst[start..start + HEADER_LEN].copy_from_slice(&header.to_bytes());
        Ok(tail)
    }

    /// Encodes into one contiguous buffer (copies the payload; for tests and
    /// tools, not for the hot path).
    pub fn to_vec(&self, limits: &Limits) -> Result<Vec<u8>, EncodeError> {
        let mut dst = BytesMut::new();
        let tail = self.encode(&mut dst, limits)?;
        let mut v = dst.to_vec();
        v.extend_from_slice(&tail);
        Ok(v)
    }

    /// Decodes a frame body of a validated header. `body` is sliced, not
    /// copied, for bulk payloads.
    pub fn decode_body(
        header: &FrameHeader,
        body: Bytes,
        limits: &Limits,
    ) -> Result<Frame, DecodeError> {
        if body.len() != header.len as usize {
            return Err(DecodeError::Truncated {
                what: "frame body",
                need: header.len.into(),
                have: body.len() as u64,
            });
        }
        let message = Message::decode_body(header.kind, body, limits)?;
        Ok(Frame {
            device: header.device,
            txid: header.txid,
            message,
        })
    }

    /// Decodes one whole frame from the start of `buf`, returning it and the
    /// number of bytes it used. `Truncated` if `buf` holds less than a frame.
    pub fn decode(buf: &[u8], limits: &Limits) -> Result<(Frame, usize), DecodeError> {
        let header = FrameHeader::decode(buf, limits)?;
        let total = HEADER_LEN + header.len as usize;
        if buf.len() < total {
            return Err(DecodeError::Truncated {
                what: "frame body",
                need: header.len.into(),
                have: (buf.len() - HEADER_LEN) as u64,
            });
        }
        let body = Bytes::copy_from_slice(&buf[HEADER_LEN..total]);
        Ok((Frame::decode_body(&header, body, limits)?, total))
    }
}

/// A streaming frame decoder over a receive buffer (sans-IO): feed bytes into
/// a `BytesMut`, call [`FrameDecoder::decode`] until it returns `Ok(None)`.
///
/// The header is validated (including the size limit) before the decoder asks
/// for more room, so a hostile length never causes an allocation; the buffer
/// only grows by what the caller actually reads.
#[derive(Debug, Clone, Default)]
pub struct FrameDecoder {
    limits: Limits,
    header: Option<FrameHeader>,
}

impl FrameDecoder {
    /// A decoder with these limits.
    pub fn new(limits: Limits) -> Self {
        FrameDecoder {
            limits,
            header: None,
        }
    }

    /// Bytes the decoder needs in `src` before the next frame is complete.
    pub fn wanted(&self, src: &BytesMut) -> usize {
        match self.header {
            None => HEADER_LEN.saturating_sub(src.len()),
            Some(h) => (h.len as usize).saturating_sub(src.len()),
        }
    }

    /// Takes the next complete frame out of `src`, if there is one. After an
    /// error the stream is out of sync and must be closed.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        match self.next_body(src)? {
            Some((header, body)) => Frame::decode_body(&header, body, &self.limits).map(Some),
            None => Ok(None),
        }
    }

    /// Like [`FrameDecoder::decode`] but stops after framing: returns the
    /// validated header and the (undecoded) body. Errors are header errors
    /// only, after which the stream is out of sync; body errors are left to
    /// [`Frame::decode_body`], so a transport can answer them and go on.
    pub fn next_body(
        &mut self,
        src: &mut BytesMut,
    ) -> Result<Option<(FrameHeader, Bytes)>, DecodeError> {
        let header = match self.header {
            Some(h) => h,
            None => {
                if src.len() < HEADER_LEN {
                    return Ok(None);
                }
                let h = FrameHeader::decode(&src[..HEADER_LEN], &self.limits)?;
                src.advance(HEADER_LEN);
                self.header = Some(h);
                h
            }
        };
        if src.len() < header.len as usize {
            return Ok(None);
        }
        self.header = None;
        Ok(Some((header, src.split_to(header.len as usize).freeze())))
    }

    /// True when no partial frame is buffered (a clean place for EOF).
    pub fn is_idle(&self, src: &BytesMut) -> bool {
        self.header.is_none() && src.is_empty()
    }

    /// The header of the frame being assembled, if it has been read.
    pub fn pending_header(&self) -> Option<FrameHeader> {
        self.header
    }
}
