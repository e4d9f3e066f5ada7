//! Every message of the protocol, with its body codec (sans-IO).
//!
//! Bodies are little-endian. Counts and lengths are checked against the bytes
//! actually present before anything is allocated, reserved fields must be
//! zero, and a decoded body must be consumed exactly, so every accepted body
//! re-encodes to the same bytes (canonical encoding). See `PROTOCOL.md` for
//! the byte layouts.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::compress::{self, Compression, Encoding};
use crate::error::{DecodeError, EncodeError};
use crate::frame::{Kind, Limits};
use crate::handshake::Features;

/// Device size, block size, name and schema (e.g. the HCL of a `device`
/// block). Sent before the data of a device.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceInfo {
    /// Size in bytes.
    pub size: u64,
    /// Block size of the migration in bytes (> 0).
    pub block_size: u32,
    /// Device name (≤ 65535 bytes of UTF-8).
    pub name: String,
    /// Schema text (may be empty).
    pub schema: String,
}

/// The device infos of a whole device group, keyed by device id (≠ 0).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceGroupInfo {
    /// `(device id, info)` in sending order.
    pub devices: Vec<(u32, DeviceInfo)>,
}

/// A block of data at `offset`, `length` bytes once decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteAt {
    /// Byte offset on the device.
    pub offset: u64,
    /// Decoded length in bytes (> 0, ≤ the frame limit).
    pub length: u32,
    /// Payload encoding.
    pub encoding: Encoding,
    /// Encoded payload (shared, never copied by the codec).
    pub payload: Bytes,
}

impl WriteAt {
    /// An uncompressed write; `data` is sent without copying.
    pub fn plain(offset: u64, data: Bytes) -> WriteAt {
        WriteAt {
            offset,
            length: data.len() as u32,
            encoding: Encoding::Plain,
            payload: data,
        }
    }

    /// A write of `length` zero bytes (no payload).
    pub fn zeroes(offset: u64, length: u32) -> WriteAt {
        WriteAt {
            offset,
            length,
            encoding: Encoding::Zeroes,
            payload: Bytes::new(),
        }
    }

    /// A write compressed under `policy` with the encodings in `allowed`.
    pub fn compressed(
        offset: u64,
        data: &Bytes,
        policy: Compression,
        allowed: Features,
    ) -> WriteAt {
        let (encoding, payload) = compress::encode(data, policy, allowed);
        WriteAt {
            offset,
            length: data.len() as u32,
            encoding,
            payload,
        }
    }

    /// The decoded data, exactly `length` bytes (plain payloads are shared).
    pub fn data(&self) -> Result<Bytes, DecodeError> {
        compress::decode(self.encoding, &self.payload, self.length)
    }
}

/// Where a block known by hash can be fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
#[non_exhaustive]
pub enum HashLocation {
    /// From S3 (alternate sources).
    S3 = 1,
    /// From the receiver's own base image.
    BaseImage = 2,
}

/// The block at `offset` has this SHA-256; fetch it from `location`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteAtHash {
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes (> 0).
    pub length: u32,
    /// Where the content is.
    pub location: HashLocation,
    /// SHA-256 of the content.
    pub sha256: [u8; 32],
}

/// Read `length` bytes at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadAt {
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes (> 0, ≤ the frame limit).
    pub length: u32,
}

/// A byte range (need-at, don't-need-at).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes (> 0; `offset + length` does not overflow).
    pub length: u64,
}

/// A list of block indices of a given block size (dirty list,
/// you-already-have).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BlockList {
    /// Block size in bytes (> 0).
    pub block_size: u32,
    /// Block indices.
    pub blocks: Vec<u64>,
}

/// What an event announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EventKind {
    /// The source is about to lock the device.
    PreLock,
    /// The source locked the device.
    PostLock,
    /// The source is about to unlock.
    PreUnlock,
    /// The source unlocked.
    PostUnlock,
    /// Every block of the device has been sent.
    Completed,
    /// Application data (e.g. authority transfer), with a sub-type.
    Custom(u8),
}

/// An event; acknowledged after the receiver handled it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The event.
    pub kind: EventKind,
    /// Payload (only for `Custom`; empty otherwise).
    pub payload: Bytes,
}

impl Event {
    /// An event without payload.
    pub fn new(kind: EventKind) -> Event {
        Event {
            kind,
            payload: Bytes::new(),
        }
    }

    /// A custom event.
    pub fn custom(sub_type: u8, payload: Bytes) -> Event {
        Event {
            kind: EventKind::Custom(sub_type),
            payload,
        }
    }
}

/// A range available elsewhere (S3) with its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlternateSource {
    /// Byte offset.
    pub offset: u64,
    /// Length (> 0).
    pub length: u64,
    /// SHA-256 of the range's content.
    pub sha256: [u8; 32],
    /// Informational location, e.g. `"endpoint bucket name"` (≤ 65535 bytes).
    pub location: String,
}

/// Reason codes of error responses (stable wire values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The range lies outside the device.
    OutOfRange,
    /// The storage failed.
    Io,
    /// The device is read-only.
    ReadOnly,
    /// Not supported.
    Unsupported,
    /// The device is closed.
    Closed,
    /// Cancelled.
    Cancelled,
    /// Timed out.
    Timeout,
    /// Data failed a consistency check.
    Corrupt,
    /// Invalid argument.
    Invalid,
    /// No space.
    OutOfSpace,
    /// A remote service failed.
    Remote,
    /// The request was malformed (decode error).
    Malformed,
    /// No such device on this connection.
    UnknownDevice,
    /// The queue for this (device, kind) is full: retry later.
    Busy,
    /// Nobody handles this kind of request on this device.
    Unhandled,
    /// The request uses a feature that was not negotiated.
    NotNegotiated,
    /// A code this version does not know.
    Other(u16),
}

impl ErrorCode {
    /// Wire value.
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::OutOfRange => 1,
            ErrorCode::Io => 2,
            ErrorCode::ReadOnly => 3,
            ErrorCode::Unsupported => 4,
            ErrorCode::Closed => 5,
            ErrorCode::Cancelled => 6,
            ErrorCode::Timeout => 7,
            ErrorCode::Corrupt => 8,
            ErrorCode::Invalid => 9,
            ErrorCode::OutOfSpace => 10,
            ErrorCode::Remote => 11,
            ErrorCode::Malformed => 12,
            ErrorCode::UnknownDevice => 13,
            ErrorCode::Busy => 14,
            ErrorCode::Unhandled => 15,
            ErrorCode::NotNegotiated => 16,
            ErrorCode::Other(v) => v,
        }
    }

    /// From the wire value (unknown values are kept as `Other`).
    pub fn from_u16(v: u16) -> ErrorCode {
        match v {
            1 => ErrorCode::OutOfRange,
            2 => ErrorCode::Io,
            3 => ErrorCode::ReadOnly,
            4 => ErrorCode::Unsupported,
            5 => ErrorCode::Closed,
            6 => ErrorCode::Cancelled,
            7 => ErrorCode::Timeout,
            8 => ErrorCode::Corrupt,
            9 => ErrorCode::Invalid,
            10 => ErrorCode::OutOfSpace,
            11 => ErrorCode::Remote,
            12 => ErrorCode::Malformed,
            13 => ErrorCode::UnknownDevice,
            14 => ErrorCode::Busy,
            15 => ErrorCode::Unhandled,
            16 => ErrorCode::NotNegotiated,
            v => ErrorCode::Other(v),
        }
    }
}

/// An error response: reason code and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorResponse {
    /// Reason code.
    pub code: ErrorCode,
    /// Human-readable explanation (≤ 65535 bytes; longer text is cut at a
    /// character boundary by [`ErrorResponse::new`]).
    pub text: String,
}

impl ErrorResponse {
    /// An error response; the text is shortened to fit the wire field.
    pub fn new(code: ErrorCode, text: impl Into<String>) -> ErrorResponse {
        let mut text = text.into();
        if text.len() > u16::MAX as usize {
            let mut cut = u16::MAX as usize;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        ErrorResponse { code, text }
    }
}

/// A protocol message (the body of one frame).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Message {
    /// Notice: device info.
    DeviceInfo(DeviceInfo),
    /// Notice: device infos of a group (device 0).
    DeviceGroupInfo(DeviceGroupInfo),
    /// Request → `WriteAtOk`: a block of data.
    WriteAt(WriteAt),
    /// Request → `WriteAtOk`: a block known by hash.
    WriteAtHash(WriteAtHash),
    /// Request → `ReadAtData`: read a range.
    ReadAt(ReadAt),
    /// Notice: the receiver needs this range soon.
    NeedAt(Range),
    /// Notice: the receiver no longer needs this range.
    DontNeedAt(Range),
    /// Request → `Ack`: these blocks changed and will be re-sent.
    DirtyList(BlockList),
    /// Request → `Ack`: an event.
    Event(Event),
    /// Request → `Ack`: ranges available from S3.
    AlternateSources(Vec<AlternateSource>),
    /// Request → `Ack`: blocks the receiver already has.
    YouAlreadyHave(BlockList),
    /// Notice: the device leaves the migration.
    RemoveDevice,
    /// Response: the write of `length` bytes succeeded.
    WriteAtOk {
        /// Bytes written.
        length: u32,
    },
    /// Response: read data.
    ReadAtData(Bytes),
    /// Response: acknowledged.
    Ack,
    /// Response: the request failed.
    Error(ErrorResponse),
}

// Fixed part sizes.
const DEVICE_INFO_FIXED: usize = 20;
const WRITE_AT_FIXED: usize = 16;
const WRITE_AT_HASH_LEN: usize = 48;
const READ_AT_LEN: usize = 16;
const RANGE_LEN: usize = 16;
const BLOCK_LIST_FIXED: usize = 8;
const ALT_FIXED: usize = 50;

/// A bounds-checked reader over a body. Every read checks the bytes present.
struct Rd {
    buf: Bytes,
    what: &'static str,
}

impl Rd {
    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.buf.remaining() < n {
            return Err(DecodeError::Truncated {
                what: self.what,
                need: n as u64,
                have: self.buf.remaining() as u64,
            });
        }
        Ok(())
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.need(2)?;
        Ok(self.buf.get_u16_le())
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        Ok(self.buf.get_u32_le())
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.need(8)?;
        Ok(self.buf.get_u64_le())
    }
    fn bytes(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        self.need(n)?;
        Ok(self.buf.split_to(n))
    }
    fn hash(&mut self) -> Result<[u8; 32], DecodeError> {
        self.need(32)?;
        let mut h = [0u8; 32];
        self.buf.copy_to_slice(&mut h);
        Ok(h)
    }
    fn string(&mut self, n: usize, what: &'static str) -> Result<String, DecodeError> {
        let b = self.bytes(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::BadUtf8 { what })
    }
    fn zero_u16(&mut self, what: &'static str) -> Result<(), DecodeError> {
        if self.u16()? != 0 {
            return Err(DecodeError::ReservedNonZero { what });
        }
        Ok(())
    }
    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }
    fn remaining(&self) -> usize {
        self.buf.remaining()
    }
    fn finish(self) -> Result<(), DecodeError> {
        if self.buf.has_remaining() {
            return Err(DecodeError::TrailingBytes {
                what: self.what,
                extra: self.buf.remaining(),
            });
        }
        Ok(())
    }
}

fn fits<T: TryFrom<usize>>(what: &'static str, n: usize) -> Result<T, EncodeError> {
    T::try_from(n).map_err(|_| EncodeError::Invalid {
        what,
        reason: format!("{n} does not fit its wire field"),
    })
}

fn nonzero_len(what: &'static str, len: u64, max: u64) -> Result<(), DecodeError> {
    if len == 0 {
        return Err(DecodeError::invalid(what, "zero length"));
    }
    if len > max {
        return Err(DecodeError::invalid(
            what,
            format!("length {len} exceeds the limit {max}"),
        ));
    }
    Ok(())
}

fn end_of(what: &'static str, offset: u64, len: u64) -> Result<u64, DecodeError> {
    offset.checked_add(len).ok_or_else(|| {
        DecodeError::invalid(what, format!("offset {offset} + length {len} overflows"))
    })
}

fn enc_check(r: Result<(), DecodeError>, what: &'static str) -> Result<(), EncodeError> {
    r.map_err(|e| EncodeError::Invalid {
        what,
        reason: e.to_string(),
    })
}

impl DeviceInfo {
    fn encode(&self, dst: &mut BytesMut) -> Result<(), EncodeError> {
        if self.block_size == 0 {
            return Err(EncodeError::Invalid {
                what: "device-info block size",
                reason: "zero".into(),
            });
        }
        let name_len: u16 = fits("device name", self.name.len())?;
        let schema_len: u32 = fits("device schema", self.schema.len())?;
        dst.reserve(DEVICE_INFO_FIXED + self.name.len() + self.schema.len());
        dst.put_u64_le(self.size);
        dst.put_u32_le(self.block_size);
        dst.put_u16_le(name_len);
        dst.put_u16_le(0);
        dst.put_u32_le(schema_len);
        dst.extend_from_slice(self.name.as_bytes());
        dst.extend_from_slice(self.schema.as_bytes());
        Ok(())
    }

    fn decode(r: &mut Rd) -> Result<DeviceInfo, DecodeError> {
        let size = r.u64()?;
        let block_size = r.u32()?;
        if block_size == 0 {
            return Err(DecodeError::invalid("device-info block size", "zero"));
        }
        let name_len = r.u16()? as usize;
        r.zero_u16("device-info reserved")?;
        let schema_len = r.u32()? as usize;
        let name = r.string(name_len, "device name")?;
        let schema = r.string(schema_len, "device schema")?;
        Ok(DeviceInfo {
            size,
            block_size,
            name,
            schema,
        })
    }
}

fn encode_block_list(l: &BlockList, dst: &mut BytesMut) -> Result<(), EncodeError> {
    if l.block_size == 0 {
        return Err(EncodeError::Invalid {
            what: "block size",
            reason: "zero".into(),
        });
    }
    let count: u32 = fits("block count", l.blocks.len())?;
    dst.reserve(BLOCK_LIST_FIXED + 8 * l.blocks.len());
    dst.put_u32_le(l.block_size);
    dst.put_u32_le(count);
    for b in &l.blocks {
        dst.put_u64_le(*b);
    }
    Ok(())
}

fn decode_block_list(r: &mut Rd) -> Result<BlockList, DecodeError> {
    let block_size = r.u32()?;
    if block_size == 0 {
        return Err(DecodeError::invalid("block size", "zero"));
    }
    let count = r.u32()? as usize;
    // Bound the count by the bytes present before allocating.
    let need = count
        .checked_mul(8)
        .ok_or_else(|| DecodeError::invalid("block count", "overflow"))?;
    r.need(need)?;
    let mut blocks = Vec::with_capacity(count);
    for _ in 0..count {
        blocks.push(r.u64()?);
    }
    Ok(BlockList { block_size, blocks })
}

impl Message {
    /// The kind byte of this message.
    pub fn kind(&self) -> Kind {
        match self {
            Message::DeviceInfo(_) => Kind::DeviceInfo,
            Message::DeviceGroupInfo(_) => Kind::DeviceGroupInfo,
            Message::WriteAt(_) => Kind::WriteAt,
            Message::WriteAtHash(_) => Kind::WriteAtHash,
            Message::ReadAt(_) => Kind::ReadAt,
            Message::NeedAt(_) => Kind::NeedAt,
            Message::DontNeedAt(_) => Kind::DontNeedAt,
            Message::DirtyList(_) => Kind::DirtyList,
            Message::Event(_) => Kind::Event,
            Message::AlternateSources(_) => Kind::AlternateSources,
            Message::YouAlreadyHave(_) => Kind::YouAlreadyHave,
            Message::RemoveDevice => Kind::RemoveDevice,
            Message::WriteAtOk { .. } => Kind::WriteAtOk,
            Message::ReadAtData(_) => Kind::ReadAtData,
            Message::Ack => Kind::Ack,
            Message::Error(_) => Kind::Error,
        }
    }

    /// Encodes the body into `dst`; returns the bulk tail that follows it
    /// (empty for messages without one). See [`crate::Frame::encode`].
    pub fn encode_body(&self, dst: &mut BytesMut, limits: &Limits) -> Result<Bytes, EncodeError> {
        let max = u64::from(limits.max_frame);
        match self {
            Message::DeviceInfo(d) => d.encode(dst)?,
            Message::DeviceGroupInfo(g) => {
                let count: u32 = fits("device count", g.devices.len())?;
                dst.put_u32_le(count);
                for (dev, info) in &g.devices {
                    if *dev == 0 {
                        return Err(EncodeError::Invalid {
                            what: "device-group-info device id",
                            reason: "0 is the control channel".into(),
                        });
                    }
                    dst.put_u32_le(*dev);
                    let at = dst.len();
                    dst.put_u32_le(0);
                    info.encode(dst)?;
                    let len: u32 = fits("device info", dst.len() - at - 4)?;
                    dst[at..at + 4].copy_from_slice(&len.to_le_bytes());
                }
            }
            Message::WriteAt(w) => {
                if u64::from(w.length) > max {
                    return Err(EncodeError::TooLarge {
                        what: "write-at block",
                        len: w.length.into(),
                        max,
                    });
                }
                enc_check(
                    nonzero_len("write-at length", w.length.into(), max),
                    "write-at length",
                )?;
                enc_check(
                    compress::check_structure(w.encoding, &w.payload, w.length),
                    "write-at payload",
                )?;
                dst.reserve(WRITE_AT_FIXED);
                dst.put_u64_le(w.offset);
                dst.put_u32_le(w.length);
                dst.put_u8(w.encoding as u8);
                dst.put_bytes(0, 3);
                return Ok(w.payload.clone());
            }
            Message::WriteAtHash(h) => {
                enc_check(
                    nonzero_len("write-at-hash length", h.length.into(), u64::MAX),
                    "write-at-hash length",
                )?;
                dst.reserve(WRITE_AT_HASH_LEN);
                dst.put_u64_le(h.offset);
                dst.put_u32_le(h.length);
                dst.put_u8(h.location as u8);
                dst.put_bytes(0, 3);
                dst.extend_from_slice(&h.sha256);
            }
            Message::ReadAt(r) => {
                enc_check(
                    nonzero_len("read-at length", r.length.into(), max),
                    "read-at length",
                )?;
                dst.reserve(READ_AT_LEN);
                dst.put_u64_le(r.offset);
                dst.put_u32_le(r.length);
                dst.put_u32_le(0);
            }
            Message::NeedAt(r) | Message::DontNeedAt(r) => {
                enc_check(
                    nonzero_len("range length", r.length, u64::MAX),
                    "range length",
                )?;
                enc_check(end_of("range", r.offset, r.length).map(|_| ()), "range")?;
                dst.reserve(RANGE_LEN);
                dst.put_u64_le(r.offset);
                dst.put_u64_le(r.length);
            }
            Message::DirtyList(l) | Message::YouAlreadyHave(l) => encode_block_list(l, dst)?,
            Message::Event(e) => {
                let (k, sub) = match e.kind {
                    EventKind::PreLock => (0u8, 0u8),
                    EventKind::PostLock => (1, 0),
                    EventKind::PreUnlock => (2, 0),
                    EventKind::PostUnlock => (3, 0),
                    EventKind::Completed => (4, 0),
                    EventKind::Custom(s) => (5, s),
                };
                if k != 5 && !e.payload.is_empty() {
                    return Err(EncodeError::Invalid {
                        what: "event payload",
                        reason: "only custom events carry a payload".into(),
                    });
                }
                dst.put_u8(k);
                dst.put_u8(sub);
                dst.put_u16_le(0);
                return Ok(e.payload.clone());
            }
            Message::AlternateSources(list) => {
                let count: u32 = fits("alternate source count", list.len())?;
                dst.put_u32_le(count);
                for a in list {
                    enc_check(
                        nonzero_len("alternate source length", a.length, u64::MAX),
                        "alternate source",
                    )?;
                    enc_check(
                        end_of("alternate source", a.offset, a.length).map(|_| ()),
                        "alternate source",
                    )?;
                    let loc: u16 = fits("alternate source location", a.location.len())?;
                    dst.reserve(ALT_FIXED + a.location.len());
                    dst.put_u64_le(a.offset);
                    dst.put_u64_le(a.length);
                    dst.extend_from_slice(&a.sha256);
                    dst.put_u16_le(loc);
                    dst.extend_from_slice(a.location.as_bytes());
                }
            }
            Message::RemoveDevice | Message::Ack => {}
            Message::WriteAtOk { length } => dst.put_u32_le(*length),
            Message::ReadAtData(d) => return Ok(d.clone()),
            Message::Error(e) => {
                let len: u16 = fits("error text", e.text.len())?;
                dst.put_u16_le(e.code.to_u16());
                dst.put_u16_le(len);
                dst.extend_from_slice(e.text.as_bytes());
            }
        }
        Ok(Bytes::new())
    }

    /// Decodes the body of a frame of kind `kind`. Bulk payloads are slices
    /// of `body` (no copy).
    pub fn decode_body(kind: Kind, body: Bytes, limits: &Limits) -> Result<Message, DecodeError> {
        let max = u64::from(limits.max_frame);
        let mut r = Rd {
            buf: body,
            what: kind.name(),
        };
        let msg = match kind {
            Kind::DeviceInfo => Message::DeviceInfo(DeviceInfo::decode(&mut r)?),
            Kind::DeviceGroupInfo => {
                let count = r.u32()? as usize;
                // Each entry needs at least 8 + DEVICE_INFO_FIXED bytes.
                if count > r.remaining() / (8 + DEVICE_INFO_FIXED) {
                    return Err(DecodeError::invalid(
                        "device count",
                        format!("{count} entries cannot fit in {} bytes", r.remaining()),
                    ));
                }
                let mut devices = Vec::with_capacity(count);
                for _ in 0..count {
                    let dev = r.u32()?;
                    if dev == 0 {
                        return Err(DecodeError::invalid(
                            "device-group-info device id",
                            "0 is the control channel",
                        ));
                    }
                    let len = r.u32()? as usize;
                    let mut inner = Rd {
                        buf: r.bytes(len)?,
                        what: "device-group-info entry",
                    };
                    let info = DeviceInfo::decode(&mut inner)?;
                    inner.finish()?;
                    devices.push((dev, info));
                }
                Message::DeviceGroupInfo(DeviceGroupInfo { devices })
            }
            Kind::WriteAt => {
                let offset = r.u64()?;
                let length = r.u32()?;
                let enc = r.u8()?;
                let encoding = Encoding::from_u8(enc).ok_or_else(|| {
                    DecodeError::invalid("write-at encoding", format!("unknown encoding {enc}"))
                })?;
                if r.u8()? != 0 || r.u16()? != 0 {
                    return Err(DecodeError::ReservedNonZero {
                        what: "write-at reserved",
                    });
                }
                nonzero_len("write-at length", length.into(), max)?;
                end_of("write-at", offset, length.into())?;
                let payload = r.rest();
                compress::check_structure(encoding, &payload, length)?;
                Message::WriteAt(WriteAt {
                    offset,
                    length,
                    encoding,
                    payload,
                })
            }
            Kind::WriteAtHash => {
                let offset = r.u64()?;
                let length = r.u32()?;
                let loc = r.u8()?;
                let location = match loc {
                    1 => HashLocation::S3,
                    2 => HashLocation::BaseImage,
                    _ => {
                        return Err(DecodeError::invalid(
                            "hash location",
                            format!("unknown location {loc}"),
                        ))
                    }
                };
                if r.u8()? != 0 || r.u16()? != 0 {
                    return Err(DecodeError::ReservedNonZero {
                        what: "write-at-hash reserved",
                    });
                }
                nonzero_len("write-at-hash length", length.into(), u64::MAX)?;
                end_of("write-at-hash", offset, length.into())?;
                let sha256 = r.hash()?;
                Message::WriteAtHash(WriteAtHash {
                    offset,
                    length,
                    location,
                    sha256,
                })
            }
            Kind::ReadAt => {
                let offset = r.u64()?;
                let length = r.u32()?;
                if r.u32()? != 0 {
                    return Err(DecodeError::ReservedNonZero {
                        what: "read-at reserved",
                    });
                }
                nonzero_len("read-at length", length.into(), max)?;
                end_of("read-at", offset, length.into())?;
                Message::ReadAt(ReadAt { offset, length })
            }
            Kind::NeedAt | Kind::DontNeedAt => {
                let offset = r.u64()?;
                let length = r.u64()?;
                nonzero_len("range length", length, u64::MAX)?;
                end_of("range", offset, length)?;
                let range = Range { offset, length };
                if kind == Kind::NeedAt {
                    Message::NeedAt(range)
                } else {
                    Message::DontNeedAt(range)
                }
            }
            Kind::DirtyList => Message::DirtyList(decode_block_list(&mut r)?),
            Kind::YouAlreadyHave => Message::YouAlreadyHave(decode_block_list(&mut r)?),
            Kind::Event => {
                let k = r.u8()?;
                let sub = r.u8()?;
                r.zero_u16("event reserved")?;
                let kind = match (k, sub) {
                    (0, 0) => EventKind::PreLock,
                    (1, 0) => EventKind::PostLock,
                    (2, 0) => EventKind::PreUnlock,
                    (3, 0) => EventKind::PostUnlock,
                    (4, 0) => EventKind::Completed,
                    (5, s) => EventKind::Custom(s),
                    (0..=4, _) => {
                        return Err(DecodeError::ReservedNonZero {
                            what: "event sub-type",
                        })
                    }
                    _ => {
                        return Err(DecodeError::invalid(
                            "event kind",
                            format!("unknown event {k}"),
                        ))
                    }
                };
                let payload = r.rest();
                if !matches!(kind, EventKind::Custom(_)) && !payload.is_empty() {
                    return Err(DecodeError::invalid(
                        "event payload",
                        "only custom events carry a payload",
                    ));
                }
                Message::Event(Event { kind, payload })
            }
            Kind::AlternateSources => {
                let count = r.u32()? as usize;
                if count > r.remaining() / ALT_FIXED {
                    return Err(DecodeError::invalid(
                        "alternate source count",
                        format!("{count} entries cannot fit in {} bytes", r.remaining()),
                    ));
                }
                let mut list = Vec::with_capacity(count);
                for _ in 0..count {
                    let offset = r.u64()?;
                    let length = r.u64()?;
                    nonzero_len("alternate source length", length, u64::MAX)?;
                    end_of("alternate source", offset, length)?;
                    let sha256 = r.hash()?;
                    let loc = r.u16()? as usize;
                    let location = r.string(loc, "alternate source location")?;
                    list.push(AlternateSource {
                        offset,
                        length,
                        sha256,
                        location,
                    });
                }
                Message::AlternateSources(list)
            }
            Kind::RemoveDevice => Message::RemoveDevice,
            Kind::WriteAtOk => Message::WriteAtOk { length: r.u32()? },
            Kind::ReadAtData => Message::ReadAtData(r.rest()),
            Kind::Ack => Message::Ack,
            Kind::Error => {
                let code = ErrorCode::from_u16(r.u16()?);
                let len = r.u16()? as usize;
                let text = r.string(len, "error text")?;
                Message::Error(ErrorResponse { code, text })
            }
        };
        r.finish()?;
        Ok(msg)
    }

    /// Checks every offset, length and block index against a device of
    /// `size` bytes (what the codec alone cannot know).
    pub fn check_device_bounds(&self, size: u64) -> Result<(), DecodeError> {
        let range = |what: &'static str, offset: u64, len: u64| -> Result<(), DecodeError> {
            let end = end_of(what, offset, len)?;
            if end > size {
                return Err(DecodeError::invalid(
                    what,
                    format!("range {offset}+{len} is beyond the device size {size}"),
                ));
            }
            Ok(())
        };
        match self {
            Message::WriteAt(w) => range("write-at", w.offset, w.length.into()),
            Message::WriteAtHash(h) => range("write-at-hash", h.offset, h.length.into()),
            Message::ReadAt(r) => range("read-at", r.offset, r.length.into()),
            Message::NeedAt(r) | Message::DontNeedAt(r) => range("range", r.offset, r.length),
            Message::DirtyList(l) | Message::YouAlreadyHave(l) => {
                let blocks = size.div_ceil(u64::from(l.block_size));
                match l.blocks.iter().find(|&&b| b >= blocks) {
                    Some(b) => Err(DecodeError::invalid(
                        "block index",
                        format!("block {b} is beyond the {blocks} blocks of the device"),
                    )),
                    None => Ok(()),
                }
            }
            Message::AlternateSources(list) => list
                .iter()
                .try_for_each(|a| range("alternate source", a.offset, a.length)),
            _ => Ok(()),
        }
    }
}
