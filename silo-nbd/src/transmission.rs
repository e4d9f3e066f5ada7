//! Sans-IO transmission phase: request decoding, request validation and
//! reply encoding.
//!
//! [`RequestDecoder::decode`] takes bytes from the front of a read buffer and
//! returns whole requests. A WRITE payload is split off the buffer without a
//! copy (`Bytes`); its length is checked against the maximum payload before
//! anything is buffered, and the payload of a write that will be refused
//! (past the end, read-only export) is discarded as it arrives instead of
//! being buffered. With [`RequestDecoder::with_write_pieces`], a large
//! aligned WRITE payload is instead collected into separate buffers of one
//! piece each, which the caller reads the socket straight into
//! ([`RequestDecoder::payload_room`]): a provider that adopts such buffers
//! as its memory ([`silo_storage::Provider::adopt_size`]) then stores the
//! payload without a single copy in user space. [`validate`] turns a request into a [`Command`] or the
//! [`Errno`] to answer with; the reply encoders build headers into a small
//! inline buffer so a reply is `header + Bytes` written with one vectored
//! write.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::errno::Errno;
use crate::export::{ExportInfo, Extent};
use crate::proto::*;

/// The fixed part of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`NBD_CMD_*`).
    pub kind: u16,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Offset in bytes.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
}

impl RequestHeader {
    /// Encodes the header (client side; used by tests and fuzzing).
    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u32(REQUEST_MAGIC);
        out.put_u16(self.flags);
        out.put_u16(self.kind);
        out.put_u64(self.cookie);
        out.put_u64(self.offset);
        out.put_u32(self.len);
    }
}

/// The payload that came with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// No payload (every command but WRITE).
    None,
    /// A WRITE payload, split from the read buffer without copying.
    Data(Bytes),
    /// A WRITE payload collected in pieces (see
    /// [`RequestDecoder::with_write_pieces`]): consecutive, each the only
    /// handle to its allocation.
    Pieces(Vec<Bytes>),
    /// A WRITE payload that will be refused; it is skipped, not buffered.
    Discarded,
}

/// A decoded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The header.
    pub header: RequestHeader,
    /// The payload.
    pub payload: Payload,
}

/// A request stream that cannot be followed any further: close the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The request did not start with the request magic.
    #[error("bad request magic {0:#010x}")]
    BadMagic(u32),
    /// A WRITE announced more payload than the export accepts.
    #[error("write payload of {len} bytes exceeds the maximum of {max}")]
    PayloadTooLarge {
        /// Announced length.
        len: u32,
        /// Maximum accepted.
        max: u32,
    },
}

/// Makes the empty buffers write payloads are collected in (capacity at
/// least the piece size).
pub type PieceAlloc = Box<dyn FnMut() -> BytesMut + Send>;

/// Decodes requests from a byte stream (see the module docs).
pub struct RequestDecoder {
    size: u64,
    max_payload: u32,
    read_only: bool,
    discard: u64,
    /// Size of the pieces large writes are collected in (0: never).
    piece: usize,
    /// The write whose payload is being collected in pieces.
    collecting: Option<Collecting>,
    /// Whether the last request decoded was collected in pieces.
    last_in_pieces: bool,
    /// Where piece buffers come from.
    alloc: Option<PieceAlloc>,
}

impl std::fmt::Debug for RequestDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestDecoder")
            .field("size", &self.size)
            .field("max_payload", &self.max_payload)
            .field("read_only", &self.read_only)
            .field("discard", &self.discard)
            .field("piece", &self.piece)
            .field("collecting", &self.collecting)
            .finish()
    }
}

/// A WRITE whose payload arrives piece by piece.
#[derive(Debug)]
struct Collecting {
    header: RequestHeader,
    /// Completed pieces.
    pieces: Vec<Bytes>,
    /// The piece being filled.
    cur: BytesMut,
    /// Bytes `cur` is to hold (one piece).
    want: usize,
    /// Payload bytes not yet assigned to `pieces` or `cur`.
    left: usize,
}

impl Collecting {
    fn new(header: RequestHeader, piece: usize, alloc: &mut PieceAlloc) -> Collecting {
        let len = header.len as usize;
        Collecting {
            header,
            pieces: Vec::with_capacity(len / piece),
            cur: alloc(),
            want: piece,
            left: len - piece,
        }
    }

    /// Room left in the piece being filled.
    fn room(&self) -> usize {
        self.want - self.cur.len()
    }

    /// Moves a full piece into `pieces` and starts the next one; returns
    /// whether the payload is complete.
    fn settle(&mut self, alloc: &mut PieceAlloc) -> bool {
        if self.want > 0 && self.room() == 0 {
            self.pieces.push(std::mem::take(&mut self.cur).freeze());
            self.want = self.left.min(self.want);
            self.left -= self.want;
            if self.want > 0 {
                self.cur = alloc();
            }
        }
        self.want == 0
    }
}

impl RequestDecoder {
    /// A decoder for requests to `export`.
    pub fn new(export: &ExportInfo) -> RequestDecoder {
        RequestDecoder {
            size: export.size,
            max_payload: export.max_payload,
            read_only: export.read_only(),
            discard: 0,
            piece: 0,
            collecting: None,
            last_in_pieces: false,
            alloc: None,
        }
    }

    /// Collects the payload of every WRITE that covers whole pieces of
    /// `piece` bytes (offset and length multiples of it) into separate
    /// buffers of one piece each, made by `alloc` (empty, capacity at least
    /// `piece`), unless the payload is already buffered whole. `piece` 0
    /// turns it off.
    pub fn with_write_pieces(mut self, piece: usize, alloc: PieceAlloc) -> RequestDecoder {
        self.piece = piece;
        self.alloc = (piece > 0).then_some(alloc);
        self
    }

    /// Whether a WRITE payload is being collected in pieces.
    pub fn collecting(&self) -> bool {
        self.collecting.is_some()
    }

    /// While a WRITE payload is being collected in pieces: the buffer the
    /// next payload bytes go into (read straight into it, at most its
    /// limit), instead of the read buffer. The read buffer holds nothing
    /// more to decode meanwhile. `None` otherwise.
    pub fn payload_room(&mut self) -> Option<bytes::buf::Limit<&mut BytesMut>> {
        let c = self.collecting.as_mut()?;
        let room = c.room();
        Some((&mut c.cur).limit(room))
    }

    /// How many bytes to read into the read buffer at most next, if fewer
    /// than it has room for: after a write collected in pieces, only the
    /// next header (the next request is likely another large write, whose
    /// payload should go into pieces, not the read buffer).
    pub fn read_hint(&self) -> Option<usize> {
        self.last_in_pieces.then_some(REQUEST_HEADER_LEN)
    }

    /// Continues a payload being collected with the bytes in `buf`.
    fn collect(&mut self, buf: &mut BytesMut) -> Option<Request> {
        let c = self.collecting.as_mut()?;
        let alloc = self.alloc.as_mut()?;
        loop {
            let n = c.room().min(buf.len());
            if n > 0 {
                c.cur.extend_from_slice(&buf[..n]);
                buf.advance(n);
            }
            if c.settle(alloc) {
                let c = self.collecting.take().expect("collecting");
                self.last_in_pieces = true;
                return Some(Request {
                    header: c.header,
                    payload: Payload::Pieces(c.pieces),
                });
            }
            if buf.is_empty() {
                return None;
            }
        }
    }

    /// How many bytes the buffer should hold before the next call can make
    /// progress (a hint for sizing reads; never more than header + max payload).
    pub fn wanted(&self, buf: &[u8]) -> usize {
        if self.discard > 0 || self.collecting.is_some() {
            return 1;
        }
        if buf.len() >= REQUEST_HEADER_LEN && u16::from_be_bytes([buf[6], buf[7]]) == CMD_WRITE {
            let len = u32::from_be_bytes(buf[24..28].try_into().expect("4 bytes"));
            return REQUEST_HEADER_LEN + len.min(self.max_payload) as usize;
        }
        REQUEST_HEADER_LEN
    }

    /// Takes the next complete request off the front of `buf`, if there is one.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Request>, ProtocolError> {
        if self.collecting.is_some() {
            return Ok(self.collect(buf));
        }
        if self.discard > 0 {
            let n = self.discard.min(buf.len() as u64);
            buf.advance(n as usize);
            self.discard -= n;
            if self.discard > 0 {
                return Ok(None);
            }
        }
        if buf.len() < REQUEST_HEADER_LEN {
            return Ok(None);
        }
        let mut h = &buf[..REQUEST_HEADER_LEN];
        let magic = h.get_u32();
        if magic != REQUEST_MAGIC {
            return Err(ProtocolError::BadMagic(magic));
        }
        let header = RequestHeader {
            flags: h.get_u16(),
            kind: h.get_u16(),
            cookie: h.get_u64(),
            offset: h.get_u64(),
            len: h.get_u32(),
        };
        if header.kind != CMD_WRITE {
            self.last_in_pieces = false;
            buf.advance(REQUEST_HEADER_LEN);
            return Ok(Some(Request {
                header,
                payload: Payload::None,
            }));
        }
        if header.len > self.max_payload {
            return Err(ProtocolError::PayloadTooLarge {
                len: header.len,
                max: self.max_payload,
            });
        }
        let in_range = header
            .offset
            .checked_add(u64::from(header.len))
            .is_some_and(|end| end <= self.size);
        if !in_range || self.read_only {
            buf.advance(REQUEST_HEADER_LEN);
            self.discard = u64::from(header.len);
            let n = self.discard.min(buf.len() as u64);
            buf.advance(n as usize);
            self.discard -= n;
            return Ok(Some(Request {
                header,
                payload: Payload::Discarded,
            }));
        }
        let total = REQUEST_HEADER_LEN + header.len as usize;
        let piece = self.piece as u64;
        let in_pieces = piece > 0
            && self.alloc.is_some()
            && header.len > 0
            && header.offset % piece == 0
            && u64::from(header.len) % piece == 0;
        self.last_in_pieces = in_pieces;
        if in_pieces && buf.len() < total {
            buf.advance(REQUEST_HEADER_LEN);
            let alloc = self.alloc.as_mut().expect("checked above");
            self.collecting = Some(Collecting::new(header, self.piece, alloc));
            return Ok(self.collect(buf));
        }
        if buf.len() < total {
            // The caller makes room for the rest ([`Self::wanted`]).
            return Ok(None);
        }
        buf.advance(REQUEST_HEADER_LEN);
        let data = buf.split_to(header.len as usize).freeze();
        Ok(Some(Request {
            header,
            payload: Payload::Data(data),
        }))
    }
}

/// A validated command, ready to execute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Read `len` bytes at `offset`.
    Read {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// Write `data` at `offset`.
    Write {
        /// Offset.
        offset: u64,
        /// Payload.
        data: Bytes,
        /// Flush before replying.
        fua: bool,
    },
    /// Write `pieces`, one after the other, from `offset` (a payload the
    /// decoder collected in pieces).
    WritePieces {
        /// Offset.
        offset: u64,
        /// Payload, in order.
        pieces: Vec<Bytes>,
        /// Flush before replying.
        fua: bool,
    },
    /// Flush.
    Flush,
    /// Trim.
    Trim {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Flush before replying.
        fua: bool,
    },
    /// Write zeroes.
    WriteZeroes {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Flush before replying.
        fua: bool,
        /// Do not deallocate.
        no_hole: bool,
        /// Fail with `ENOTSUP` unless zeroing is fast.
        fast: bool,
    },
    /// Prefetch (read and discard).
    Cache {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// `base:allocation` block status.
    BlockStatus {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Only one extent wanted.
        req_one: bool,
    },
    /// The client is leaving (no reply).
    Disconnect,
}

impl Command {
    /// Whether the command changes data (for errno mapping and metrics).
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Command::Write { .. }
                | Command::WritePieces { .. }
                | Command::Trim { .. }
                | Command::WriteZeroes { .. }
        )
    }
}

/// Checks a request against the export and the negotiated options.
///
/// `structured`/`base_allocation` are what the handshake negotiated. The
/// errno rules are listed in [`crate::errno`].
pub fn validate(
    req: Request,
    export: &ExportInfo,
    structured: bool,
    base_allocation: bool,
) -> Result<Command, Errno> {
    let h = req.header;
    if h.flags & !CMD_FLAGS_KNOWN != 0 {
        return Err(Errno::Inval);
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let in_range = h
        .offset
        .checked_add(u64::from(h.len))
        .is_some_and(|end| end <= export.size);
    let align = u64::from(export.min_block.max(1));
    let aligned = h.offset % align == 0 && u64::from(h.len) % align == 0;
    let writable = |range_errno: Errno| -> Result<(), Errno> {
        if export.read_only() {
            Err(Errno::Perm)
        } else if !in_range {
            Err(range_errno)
        } else if !aligned {
            Err(Errno::Inval)
        } else {
            Ok(())
        }
    };
    let readable = || -> Result<(), Errno> {
        if !in_range || !aligned {
            Err(Errno::Inval)
        } else {
            Ok(())
        }
    };
    match h.kind {
        CMD_READ => {
            if h.len > export.max_payload {
                return Err(Errno::Inval);
            }
            readable()?;
            Ok(Command::Read {
                offset: h.offset,
                len: h.len,
            })
        }
        CMD_WRITE => {
            writable(Errno::NoSpc)?;
            match req.payload {
                Payload::Data(data) => Ok(Command::Write {
                    offset: h.offset,
                    data,
                    fua,
                }),
                Payload::Pieces(pieces) => Ok(Command::WritePieces {
                    offset: h.offset,
                    pieces,
                    fua,
                }),
                // The decoder only discards writes that fail the checks above.
                Payload::None | Payload::Discarded => Err(Errno::Inval),
            }
        }
        CMD_DISC => Ok(Command::Disconnect),
        CMD_FLUSH => {
            if export.flags & TFLAG_SEND_FLUSH == 0 {
                return Err(Errno::Inval);
            }
            Ok(Command::Flush)
        }
        CMD_TRIM => {
            writable(Errno::Inval)?;
            if export.flags & TFLAG_SEND_TRIM == 0 {
                return Err(Errno::Inval);
            }
            Ok(Command::Trim {
                offset: h.offset,
                len: h.len,
                fua,
            })
        }
        CMD_WRITE_ZEROES => {
            writable(Errno::NoSpc)?;
            let fast = h.flags & CMD_FLAG_FAST_ZERO != 0;
            if fast && !export.fast_zero {
                return Err(Errno::NotSup);
            }
            Ok(Command::WriteZeroes {
                offset: h.offset,
                len: h.len,
                fua,
                no_hole: h.flags & CMD_FLAG_NO_HOLE != 0,
                fast,
            })
        }
        CMD_CACHE => {
            readable()?;
            Ok(Command::Cache {
                offset: h.offset,
                len: h.len,
            })
        }
        CMD_BLOCK_STATUS => {
            if !structured || !base_allocation || h.len == 0 {
                return Err(Errno::Inval);
            }
            readable()?;
            Ok(Command::BlockStatus {
                offset: h.offset,
                len: h.len,
                req_one: h.flags & CMD_FLAG_REQ_ONE != 0,
            })
        }
        _ => Err(Errno::Inval),
    }
}

/// A reply header built in place (no allocation): up to 32 bytes.
#[derive(Clone, Copy)]
pub struct ReplyHead {
    buf: [u8; 32],
    len: u8,
}

impl std::fmt::Debug for ReplyHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ReplyHead").field(&self.as_slice()).finish()
    }
}

impl Default for ReplyHead {
    fn default() -> Self {
        ReplyHead::new()
    }
}

impl ReplyHead {
    fn new() -> ReplyHead {
        ReplyHead {
            buf: [0; 32],
            len: 0,
        }
    }

    fn put(&mut self, bytes: &[u8]) {
        let at = self.len as usize;
        self.buf[at..at + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len() as u8;
    }

    /// The encoded bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }
}

/// A simple reply: magic, error (0 = success), cookie.
pub fn simple_reply(cookie: u64, error: Option<Errno>) -> ReplyHead {
    let mut r = ReplyHead::new();
    r.put(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    r.put(&error.map_or(0, Errno::code).to_be_bytes());
    r.put(&cookie.to_be_bytes());
    r
}

fn chunk_header(r: &mut ReplyHead, flags: u16, kind: u16, cookie: u64, len: u32) {
    r.put(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    r.put(&flags.to_be_bytes());
    r.put(&kind.to_be_bytes());
    r.put(&cookie.to_be_bytes());
    r.put(&len.to_be_bytes());
}

/// The header of a structured read reply: one `OFFSET_DATA` chunk with the
/// `DONE` flag; `data_len` bytes of data follow it.
pub fn read_data_header(cookie: u64, offset: u64, data_len: u32) -> ReplyHead {
    let mut r = ReplyHead::new();
    chunk_header(
        &mut r,
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        8 + data_len,
    );
    r.put(&offset.to_be_bytes());
    r
}

/// A structured `NONE` chunk with the `DONE` flag (ends a reply without data).
pub fn structured_none(cookie: u64) -> ReplyHead {
    let mut r = ReplyHead::new();
    chunk_header(&mut r, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
    r
}

/// A structured `ERROR` chunk with the `DONE` flag and no message.
pub fn structured_error(cookie: u64, error: Errno) -> ReplyHead {
    let mut r = ReplyHead::new();
    chunk_header(&mut r, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, 6);
    r.put(&error.code().to_be_bytes());
    r.put(&0u16.to_be_bytes());
    r
}

/// The error reply for a request of type `kind`: structured for READ and
/// BLOCK_STATUS once structured replies are negotiated (the spec forbids a
/// simple reply to READ then), simple otherwise.
pub fn error_reply(cookie: u64, kind: u16, structured: bool, error: Errno) -> ReplyHead {
    if structured && (kind == CMD_READ || kind == CMD_BLOCK_STATUS) {
        structured_error(cookie, error)
    } else {
        simple_reply(cookie, Some(error))
    }
}

/// Most descriptors in one block-status reply.
pub const MAX_EXTENTS: usize = 2048;

/// Turns extents into wire descriptors `(length, flags)` covering at most
/// `len` bytes: zero-length extents dropped, neighbours with equal state
/// merged, the last one cut at `len`, at most one with `req_one` and at most
/// [`MAX_EXTENTS`]. An empty answer becomes one data extent of `len`.
pub fn clamp_extents(extents: &[Extent], len: u32, req_one: bool) -> Vec<(u32, u32)> {
    let limit = if req_one { 1 } else { MAX_EXTENTS };
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut left = u64::from(len);
    for e in extents {
        if left == 0 {
            break;
        }
        if e.len == 0 {
            continue;
        }
        let n = e.len.min(left) as u32;
        left -= u64::from(n);
        let full = out.len() == limit;
        match out.last_mut() {
            Some(last) if last.1 == e.state() => last.0 += n,
            _ if full => break,
            _ => out.push((n, e.state())),
        }
    }
    if out.is_empty() && len > 0 {
        out.push((len, 0));
    }
    out
}

/// Appends a complete `BLOCK_STATUS` reply (one chunk with `DONE`) for
/// `context` to `out`.
pub fn block_status_reply(
    cookie: u64,
    context: u32,
    descriptors: &[(u32, u32)],
    out: &mut BytesMut,
) {
    let mut h = ReplyHead::new();
    chunk_header(
        &mut h,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        4 + 8 * descriptors.len() as u32,
    );
    out.reserve(h.as_slice().len() + 4 + 8 * descriptors.len());
    out.put_slice(h.as_slice());
    out.put_u32(context);
    for (len, flags) in descriptors {
        out.put_u32(*len);
        out.put_u32(*flags);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(kind: u16, flags: u16, offset: u64, len: u32) -> BytesMut {
        let mut b = BytesMut::new();
        RequestHeader {
            flags,
            kind,
            cookie: 7,
            offset,
            len,
        }
        .encode(&mut b);
        b
    }

    #[test]
    fn decodes_read_and_write_zero_copy() {
        let info = ExportInfo::simple("d", 1 << 20);
        let mut d = RequestDecoder::new(&info);
        let mut buf = req(CMD_READ, 0, 512, 4096);
        buf.extend_from_slice(&req(CMD_WRITE, CMD_FLAG_FUA, 0, 4)[..]);
        buf.extend_from_slice(b"ab");
        let r = d.decode(&mut buf).unwrap().unwrap();
        assert_eq!(r.header.kind, CMD_READ);
        assert_eq!(r.payload, Payload::None);
        assert_eq!(
            d.decode(&mut buf).unwrap(),
            None,
            "write payload incomplete"
        );
        assert_eq!(d.wanted(&buf), 28 + 4);
        buf.extend_from_slice(b"cd");
        let w = d.decode(&mut buf).unwrap().unwrap();
        assert_eq!(w.payload, Payload::Data(Bytes::from_static(b"abcd")));
        assert!(buf.is_empty());
        let cmd = validate(w, &info, false, false).unwrap();
        assert!(matches!(cmd, Command::Write { fua: true, .. }));
    }

    #[test]
    fn refused_writes_are_discarded_not_buffered() {
        let info = ExportInfo::simple("d", 4096);
        let mut d = RequestDecoder::new(&info);
        let mut buf = req(CMD_WRITE, 0, 4096, 1 << 20);
        let r = d.decode(&mut buf).unwrap().unwrap();
        assert_eq!(r.payload, Payload::Discarded);
        assert_eq!(validate(r, &info, false, false), Err(Errno::NoSpc));
        // Payload arrives in pieces and is dropped; then the next request.
        for _ in 0..16 {
            buf.extend_from_slice(&[1u8; 65536]);
            assert_eq!(d.decode(&mut buf).unwrap(), None);
            assert!(buf.is_empty());
        }
        buf.extend_from_slice(&req(CMD_FLUSH, 0, 0, 0));
        assert_eq!(d.decode(&mut buf).unwrap().unwrap().header.kind, CMD_FLUSH);
    }

    fn pieces_decoder(info: &ExportInfo, piece: usize) -> RequestDecoder {
        RequestDecoder::new(info)
            .with_write_pieces(piece, Box::new(move || BytesMut::with_capacity(piece)))
    }

    #[test]
    fn aligned_writes_are_collected_in_pieces_read_straight_into() {
        let info = ExportInfo::simple("d", 1 << 20);
        let mut d = pieces_decoder(&info, 4096);
        let payload: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 251) as u8).collect();
        let mut buf = req(CMD_WRITE, CMD_FLAG_FUA, 8192, 3 * 4096);
        buf.extend_from_slice(&payload[..1000]);
        assert_eq!(d.read_hint(), None);
        // The buffered part is taken; the rest goes into the piece itself.
        assert_eq!(d.decode(&mut buf).unwrap(), None);
        assert!(buf.is_empty() && d.collecting());
        let mut at = 1000;
        while d.collecting() {
            let mut room = d.payload_room().expect("collecting");
            let n = room.remaining_mut().min(1500);
            room.put_slice(&payload[at..at + n]);
            at += n;
            if let Some(r) = d.decode(&mut buf).unwrap() {
                assert_eq!(at, payload.len());
                let Payload::Pieces(pieces) = &r.payload else {
                    panic!("not in pieces: {:?}", r.payload);
                };
                assert_eq!(pieces.len(), 3);
                assert_eq!(pieces.concat(), payload);
                let cmd = validate(r, &info, false, false).unwrap();
                let Command::WritePieces {
                    offset,
                    pieces,
                    fua,
                } = cmd
                else {
                    panic!("{cmd:?}");
                };
                assert_eq!((offset, fua), (8192, true));
                for p in pieces {
                    // Each piece is its own allocation, ready to be adopted.
                    let m = p.try_into_mut().expect("sole handle");
                    assert_eq!(m.capacity(), 4096);
                }
                break;
            }
            assert!(at < payload.len(), "complete payload not returned");
        }
        assert!(!d.collecting());
        // After such a write, read only the next header into the buffer.
        assert_eq!(d.read_hint(), Some(REQUEST_HEADER_LEN));
        // An unaligned write, then a payload already buffered whole, are
        // plain `Data`; other commands still decode.
        let mut buf = req(CMD_WRITE, 0, 100, 4096);
        buf.extend_from_slice(&[1u8; 4096]);
        buf.extend_from_slice(&req(CMD_WRITE, 0, 0, 4096)[..]);
        buf.extend_from_slice(&[2u8; 4096]);
        buf.extend_from_slice(&req(CMD_FLUSH, 0, 0, 0)[..]);
        let r = d.decode(&mut buf).unwrap().unwrap();
        assert_eq!(r.payload, Payload::Data(Bytes::from(vec![1u8; 4096])));
        assert_eq!(d.read_hint(), None);
        let r = d.decode(&mut buf).unwrap().unwrap();
        assert_eq!(r.payload, Payload::Data(Bytes::from(vec![2u8; 4096])));
        let r = d.decode(&mut buf).unwrap().unwrap();
        assert_eq!(r.header.kind, CMD_FLUSH);
        assert_eq!(d.read_hint(), None);
        assert!(buf.is_empty());
    }

    #[test]
    fn payload_bytes_in_the_buffer_continue_a_collection_in_order() {
        // Bytes that land in the read buffer mid-collection (a poll read)
        // are appended in order, and what follows the payload stays.
        let info = ExportInfo::simple("d", 1 << 20);
        let mut d = pieces_decoder(&info, 512);
        let payload: Vec<u8> = (0..2048u32).map(|i| (i * 7 % 256) as u8).collect();
        let mut buf = req(CMD_WRITE, 0, 0, 2048);
        buf.extend_from_slice(&payload[..10]);
        assert_eq!(d.decode(&mut buf).unwrap(), None);
        d.payload_room().unwrap().put_slice(&payload[10..300]);
        buf.extend_from_slice(&payload[300..]);
        buf.extend_from_slice(&req(CMD_READ, 0, 0, 512)[..]);
        let r = d.decode(&mut buf).unwrap().unwrap();
        let Payload::Pieces(p) = r.payload else {
            panic!("not in pieces")
        };
        assert_eq!(p.len(), 4);
        assert_eq!(p.concat(), payload);
        assert_eq!(d.decode(&mut buf).unwrap().unwrap().header.kind, CMD_READ);
        // Refused writes are still discarded, never collected.
        let ro = ExportInfo::simple("d", 4096);
        let mut d = pieces_decoder(&ro, 512);
        let mut buf = req(CMD_WRITE, 0, 4096, 1024);
        buf.extend_from_slice(&[0u8; 100]);
        let r = d.decode(&mut buf).unwrap().unwrap();
        assert_eq!(r.payload, Payload::Discarded);
        assert!(!d.collecting());
    }

    #[test]
    fn hostile_headers() {
        let info = ExportInfo::simple("d", 4096);
        let mut d = RequestDecoder::new(&info);
        let mut buf = req(CMD_WRITE, 0, 0, u32::MAX);
        assert!(matches!(
            d.decode(&mut buf),
            Err(ProtocolError::PayloadTooLarge { .. })
        ));
        assert!(buf.capacity() < 1024, "nothing allocated for the payload");
        let mut buf = BytesMut::from(&[0xffu8; 28][..]);
        assert!(matches!(
            RequestDecoder::new(&info).decode(&mut buf),
            Err(ProtocolError::BadMagic(_))
        ));
    }

    #[test]
    fn validation_errnos() {
        let info = ExportInfo::simple("d", 4096);
        let v = |kind, flags, off, len| {
            let mut b = req(kind, flags, off, len);
            if kind == CMD_WRITE {
                b.extend_from_slice(&vec![0; len as usize]);
            }
            let r = RequestDecoder::new(&info).decode(&mut b).unwrap().unwrap();
            validate(r, &info, true, true)
        };
        assert_eq!(v(CMD_READ, 0, 4000, 100), Err(Errno::Inval));
        assert_eq!(v(CMD_READ, 0, u64::MAX, 2), Err(Errno::Inval));
        assert_eq!(v(CMD_WRITE, 0, 4000, 100), Err(Errno::NoSpc));
        assert_eq!(v(CMD_WRITE_ZEROES, 0, 4000, 100), Err(Errno::NoSpc));
        assert_eq!(v(CMD_TRIM, 0, 4000, 100), Err(Errno::Inval));
        assert_eq!(v(99, 0, 0, 0), Err(Errno::Inval));
        assert_eq!(v(CMD_READ, 1 << 9, 0, 1), Err(Errno::Inval), "unknown flag");
        assert_eq!(v(CMD_BLOCK_STATUS, 0, 0, 0), Err(Errno::Inval));
        assert!(v(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 4096).is_ok());
        assert_eq!(v(CMD_DISC, 0, 0, 0), Ok(Command::Disconnect));

        let mut ro = info.clone();
        ro.flags |= TFLAG_READ_ONLY;
        let mut b = req(CMD_WRITE, 0, 0, 10);
        b.extend_from_slice(&[0; 10]);
        let r = RequestDecoder::new(&ro).decode(&mut b).unwrap().unwrap();
        assert_eq!(validate(r, &ro, false, false), Err(Errno::Perm));

        let mut aligned = info.clone();
        aligned.min_block = 512;
        let mut b = req(CMD_READ, 0, 1, 512);
        let r = RequestDecoder::new(&aligned)
            .decode(&mut b)
            .unwrap()
            .unwrap();
        assert_eq!(validate(r, &aligned, false, false), Err(Errno::Inval));

        // Block status needs the negotiated context.
        let mut b = req(CMD_BLOCK_STATUS, 0, 0, 10);
        let r = RequestDecoder::new(&info).decode(&mut b).unwrap().unwrap();
        assert_eq!(validate(r, &info, true, false), Err(Errno::Inval));
    }

    #[test]
    fn reply_encodings() {
        let s = simple_reply(0x0102, Some(Errno::Io));
        assert_eq!(
            s.as_slice(),
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 1, 2]
        );
        let r = read_data_header(9, 4096, 512);
        assert_eq!(r.as_slice().len(), 28);
        assert_eq!(&r.as_slice()[4..8], &[0, 1, 0, 1]);
        assert_eq!(&r.as_slice()[16..20], &(520u32).to_be_bytes());
        let e = error_reply(9, CMD_READ, true, Errno::Inval);
        assert_eq!(e.as_slice().len(), 26);
        assert_eq!(&e.as_slice()[6..8], &REPLY_TYPE_ERROR.to_be_bytes());
        assert_eq!(
            error_reply(9, CMD_WRITE, true, Errno::Inval)
                .as_slice()
                .len(),
            16
        );
        let mut out = BytesMut::new();
        block_status_reply(1, 1, &[(4096, 3), (512, 0)], &mut out);
        assert_eq!(out.len(), 20 + 4 + 16);
        assert_eq!(&out[16..20], &20u32.to_be_bytes());
    }

    #[test]
    fn extents_are_clamped_and_merged() {
        let e = [
            Extent::hole(100),
            Extent::hole(0),
            Extent::hole(50),
            Extent::data(1000),
            Extent::hole(10),
        ];
        assert_eq!(clamp_extents(&e, 500, false), vec![(150, 3), (350, 0)]);
        assert_eq!(clamp_extents(&e, 500, true), vec![(150, 3)]);
        assert_eq!(clamp_extents(&[], 500, false), vec![(500, 0)]);
        let many: Vec<Extent> = (0..10_000)
            .map(|i| {
                if i % 2 == 0 {
                    Extent::data(1)
                } else {
                    Extent::hole(1)
                }
            })
            .collect();
        let c = clamp_extents(&many, 10_000, false);
        assert_eq!(c.len(), MAX_EXTENTS);
        assert!(c.iter().map(|x| u64::from(x.0)).sum::<u64>() <= 10_000);
    }
}
