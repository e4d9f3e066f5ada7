//! Sans-IO fixed-newstyle handshake (server side).
//!
//! Calling contract: create a [`Handshake`] (which queues the greeting), then
//! repeatedly write out everything in [`Handshake::output`] and feed received
//! bytes to [`Handshake::receive`] until it returns an [`Outcome`] or an
//! error. `receive` consumes complete messages from the front of the input
//! buffer and leaves incomplete ones in place; it never allocates according
//! to a length from the wire before checking it against [`MAX_OPTION_LEN`]
//! (larger options are skipped and answered `NBD_REP_ERR_TOO_BIG`).
//! Any error means: close the connection.

use bytes::{Buf, BufMut, BytesMut};

use crate::export::ExportInfo;
use crate::proto::*;

/// Largest option payload we buffer; larger ones are discarded unread.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Most options one client may send before we give up on it.
pub const MAX_OPTIONS: u32 = 4096;
/// Longest export name or meta-context query accepted.
pub const MAX_NAME_LEN: usize = 4096;

/// Where the handshake looks up exports.
pub trait Catalog {
    /// The export called `name` (`""` is the default export, if any).
    fn lookup(&self, name: &str) -> Option<ExportInfo>;
    /// All exports, for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<ExportInfo>;
    /// The server is shutting down: refuse to start transmission.
    fn shutting_down(&self) -> bool {
        false
    }
}

impl Catalog for [ExportInfo] {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        if name.is_empty() {
            return self.first().cloned();
        }
        self.iter().find(|e| e.name == name).cloned()
    }
    fn list(&self) -> Vec<ExportInfo> {
        self.to_vec()
    }
}

/// The result of a successful negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The export the client chose.
    pub export: ExportInfo,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// `base:allocation` was selected for this export.
    pub base_allocation: bool,
}

/// How a handshake ended (without error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Enter transmission on this export (after writing [`Handshake::output`]).
    Transmission(Negotiated),
    /// The client sent `NBD_OPT_ABORT`; close after writing the output.
    Aborted,
}

/// Why a handshake failed; the connection must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The client set flags we do not know.
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    /// An option did not start with `IHAVEOPT`.
    #[error("bad option magic {0:#x}")]
    BadMagic(u64),
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist (the
    /// option has no error reply, so the spec says to disconnect).
    #[error("unknown export {0:?} requested with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    /// Too many options.
    #[error("client sent more than {MAX_OPTIONS} options")]
    TooManyOptions,
    /// The server is shutting down.
    #[error("server is shutting down")]
    Shutdown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ClientFlags,
    Options,
    /// Discarding an oversized option payload, then answering TOO_BIG.
    Discard {
        option: u32,
        remaining: u32,
    },
    Done,
}

/// Server side of the fixed-newstyle handshake. See the module docs.
#[derive(Debug)]
pub struct Handshake {
    state: State,
    out: BytesMut,
    no_zeroes: bool,
    structured: bool,
    /// Export name the meta contexts were selected for, and whether
    /// `base:allocation` is among them.
    meta: Option<(String, bool)>,
    options: u32,
}

impl Default for Handshake {
    fn default() -> Self {
        Self::new()
    }
}

/// A parsed option payload reader that fails softly (`None`) on truncation.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn u16(&mut self) -> Option<u16> {
        (self.0.len() >= 2).then(|| self.0.get_u16())
    }
    fn u32(&mut self) -> Option<u32> {
        (self.0.len() >= 4).then(|| self.0.get_u32())
    }
    fn string(&mut self, len: usize) -> Option<&'a str> {
        if len > self.0.len() || len > MAX_NAME_LEN {
            return None;
        }
        let (s, rest) = self.0.split_at(len);
        self.0 = rest;
        std::str::from_utf8(s).ok()
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Handshake {
    /// A new handshake; the greeting is already queued in [`output`](Self::output).
    pub fn new() -> Handshake {
        let mut out = BytesMut::with_capacity(256);
        out.put_u64(NBDMAGIC);
        out.put_u64(IHAVEOPT);
        out.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        Handshake {
            state: State::ClientFlags,
            out,
            no_zeroes: false,
            structured: false,
            meta: None,
            options: 0,
        }
    }

    /// Bytes to send to the client; the caller writes and clears them.
    pub fn output(&mut self) -> &mut BytesMut {
        &mut self.out
    }

    /// Processes as much of `input` as possible. Returns `Ok(Some(_))` when
    /// the handshake is over (the output still has to be written), `Ok(None)`
    /// when more input is needed.
    pub fn receive(
        &mut self,
        input: &mut BytesMut,
        catalog: &(impl Catalog + ?Sized),
    ) -> Result<Option<Outcome>, HandshakeError> {
        loop {
            match self.state {
                State::Done => return Ok(None),
                State::ClientFlags => {
                    if input.len() < 4 {
                        return Ok(None);
                    }
                    let flags = input.get_u32();
                    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
                        return Err(HandshakeError::UnknownClientFlags(flags));
                    }
                    self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
                    self.state = State::Options;
                }
                State::Discard { option, remaining } => {
                    let n = (remaining as usize).min(input.len());
                    input.advance(n);
                    let remaining = remaining - n as u32;
                    if remaining > 0 {
                        self.state = State::Discard { option, remaining };
                        return Ok(None);
                    }
                    self.reply_error(option, REP_ERR_TOO_BIG, "option too large");
                    self.state = State::Options;
                }
                State::Options => {
                    if input.len() < 16 {
                        return Ok(None);
                    }
                    let magic = u64::from_be_bytes(input[0..8].try_into().expect("8 bytes"));
                    if magic != IHAVEOPT {
                        return Err(HandshakeError::BadMagic(magic));
                    }
                    let option = u32::from_be_bytes(input[8..12].try_into().expect("4 bytes"));
                    let len = u32::from_be_bytes(input[12..16].try_into().expect("4 bytes"));
                    self.options += 1;
                    if self.options > MAX_OPTIONS {
                        return Err(HandshakeError::TooManyOptions);
                    }
                    if len > MAX_OPTION_LEN {
                        input.advance(16);
                        self.state = State::Discard {
                            option,
                            remaining: len,
                        };
                        continue;
                    }
                    if input.len() < 16 + len as usize {
                        // Undo the count: this option will be parsed again.
                        self.options -= 1;
                        input.reserve(16 + len as usize - input.len());
                        return Ok(None);
                    }
                    input.advance(16);
                    let data = input.split_to(len as usize);
                    if let Some(outcome) = self.option(option, &data, catalog)? {
                        self.state = State::Done;
                        return Ok(Some(outcome));
                    }
                }
            }
        }
    }

    fn reply_header(&mut self, option: u32, kind: u32, len: usize) {
        self.out.put_u64(REPLY_MAGIC);
        self.out.put_u32(option);
        self.out.put_u32(kind);
        self.out.put_u32(len as u32);
    }

    fn reply_ack(&mut self, option: u32) {
        self.reply_header(option, REP_ACK, 0);
    }

    fn reply_error(&mut self, option: u32, kind: u32, msg: &str) {
        self.reply_header(option, kind, msg.len());
        self.out.put_slice(msg.as_bytes());
    }

    fn option(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &(impl Catalog + ?Sized),
    ) -> Result<Option<Outcome>, HandshakeError> {
        match option {
            OPT_EXPORT_NAME => {
                let name = std::str::from_utf8(data).map_err(|_| {
                    HandshakeError::UnknownExport(String::from_utf8_lossy(data).into())
                })?;
                if catalog.shutting_down() {
                    return Err(HandshakeError::Shutdown);
                }
                let export = catalog
                    .lookup(name)
                    .ok_or_else(|| HandshakeError::UnknownExport(name.into()))?;
                self.out.put_u64(export.size);
                self.out.put_u16(export.flags);
                if !self.no_zeroes {
                    self.out.put_bytes(0, 124);
                }
                let base_allocation = self.meta_for(&export.name);
                return Ok(Some(Outcome::Transmission(Negotiated {
                    export,
                    structured: self.structured,
                    base_allocation,
                })));
            }
            OPT_ABORT => {
                self.reply_ack(option);
                return Ok(Some(Outcome::Aborted));
            }
            OPT_LIST => {
                if !data.is_empty() {
                    self.reply_error(option, REP_ERR_INVALID, "LIST takes no data");
                    return Ok(None);
                }
                for e in catalog.list() {
                    let desc = e.description.as_deref().unwrap_or("");
                    self.reply_header(option, REP_SERVER, 4 + e.name.len() + desc.len());
                    self.out.put_u32(e.name.len() as u32);
                    self.out.put_slice(e.name.as_bytes());
                    self.out.put_slice(desc.as_bytes());
                }
                self.reply_ack(option);
            }
            OPT_INFO | OPT_GO => return self.info_go(option, data, catalog),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    self.reply_error(option, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data");
                } else {
                    self.structured = true;
                    self.reply_ack(option);
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(option, data, catalog)
            }
            OPT_STARTTLS => self.reply_error(option, REP_ERR_UNSUP, "TLS is not supported"),
            _ => self.reply_error(option, REP_ERR_UNSUP, "unknown option"),
        }
        Ok(None)
    }

    fn meta_for(&self, export: &str) -> bool {
        matches!(&self.meta, Some((name, true)) if name == export)
    }

    fn info_go(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &(impl Catalog + ?Sized),
    ) -> Result<Option<Outcome>, HandshakeError> {
        let mut r = Reader(data);
        let parsed = (|| {
            let len = r.u32()? as usize;
            let name = r.string(len)?;
            let n = r.u16()? as usize;
            let mut requests = Vec::with_capacity(n.min(16));
            for _ in 0..n {
                requests.push(r.u16()?);
            }
            r.is_empty().then_some((name, requests))
        })();
        let Some((name, requests)) = parsed else {
            self.reply_error(option, REP_ERR_INVALID, "malformed INFO/GO request");
            return Ok(None);
        };
        if catalog.shutting_down() {
            self.reply_error(option, REP_ERR_SHUTDOWN, "server is shutting down");
            return Ok(None);
        }
        let Some(export) = catalog.lookup(name) else {
            self.reply_error(option, REP_ERR_UNKNOWN, "no such export");
            return Ok(None);
        };
        // NBD_INFO_EXPORT always.
        self.reply_header(option, REP_INFO, 12);
        self.out.put_u16(INFO_EXPORT);
        self.out.put_u64(export.size);
        self.out.put_u16(export.flags);
        if requests.contains(&INFO_NAME) {
            self.reply_header(option, REP_INFO, 2 + export.name.len());
            self.out.put_u16(INFO_NAME);
            self.out.put_slice(export.name.as_bytes());
        }
        if let Some(d) = export
            .description
            .as_deref()
            .filter(|_| requests.contains(&INFO_DESCRIPTION))
        {
            self.reply_header(option, REP_INFO, 2 + d.len());
            self.out.put_u16(INFO_DESCRIPTION);
            self.out.put_slice(d.as_bytes());
        }
        // Block sizes are always advertised (as qemu-nbd does).
        self.reply_header(option, REP_INFO, 14);
        self.out.put_u16(INFO_BLOCK_SIZE);
        self.out.put_u32(export.min_block);
        self.out.put_u32(export.preferred_block);
        self.out.put_u32(export.max_payload);
        self.reply_ack(option);
        if option == OPT_GO {
            let base_allocation = self.meta_for(&export.name);
            return Ok(Some(Outcome::Transmission(Negotiated {
                export,
                structured: self.structured,
                base_allocation,
            })));
        }
        Ok(None)
    }

    fn meta_context(&mut self, option: u32, data: &[u8], catalog: &(impl Catalog + ?Sized)) {
        let set = option == OPT_SET_META_CONTEXT;
        if set && !self.structured {
            self.reply_error(option, REP_ERR_INVALID, "structured replies not negotiated");
            return;
        }
        let mut r = Reader(data);
        let parsed = (|| {
            let len = r.u32()? as usize;
            let name = r.string(len)?;
            let n = r.u32()?;
            let mut queries = Vec::new();
            for _ in 0..n {
                let len = r.u32()? as usize;
                queries.push(r.string(len)?);
            }
            r.is_empty().then_some((name, queries))
        })();
        let Some((name, queries)) = parsed else {
            self.reply_error(option, REP_ERR_INVALID, "malformed meta context request");
            return;
        };
        let Some(export) = catalog.lookup(name) else {
            self.reply_error(option, REP_ERR_UNKNOWN, "no such export");
            return;
        };
        let matches =
            |q: &str| q == BASE_ALLOCATION || (!set && (q == "base:" || q == "base:allocation"));
        let selected = if queries.is_empty() {
            !set
        } else {
            queries.iter().any(|q| matches(q))
        };
        if selected {
            self.reply_header(option, REP_META_CONTEXT, 4 + BASE_ALLOCATION.len());
            self.out.put_u32(BASE_ALLOCATION_ID);
            self.out.put_slice(BASE_ALLOCATION.as_bytes());
        }
        if set {
            // Keyed by the resolved name, so "" (the default export) and its
            // real name select the same contexts.
            self.meta = Some((export.name.clone(), selected));
        }
        self.reply_ack(option);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exports() -> Vec<ExportInfo> {
        let mut a = ExportInfo::simple("disk", 1 << 20);
        a.description = Some("the disk".into());
        vec![a, ExportInfo::simple("other", 4096)]
    }

    fn opt(buf: &mut BytesMut, option: u32, data: &[u8]) {
        buf.put_u64(IHAVEOPT);
        buf.put_u32(option);
        buf.put_u32(data.len() as u32);
        buf.put_slice(data);
    }

    /// Parses option replies: (option, type, payload).
    fn replies(mut out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !out.is_empty() {
            assert_eq!(out.get_u64(), REPLY_MAGIC);
            let o = out.get_u32();
            let t = out.get_u32();
            let l = out.get_u32() as usize;
            v.push((o, t, out[..l].to_vec()));
            out = &out[l..];
        }
        v
    }

    fn started() -> (Handshake, BytesMut) {
        let mut h = Handshake::new();
        let greeting = h.output().split();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        assert_eq!(&greeting[8..16], b"IHAVEOPT");
        assert_eq!(&greeting[16..18], &[0, 3]);
        let mut input = BytesMut::new();
        input.put_u32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        (h, input)
    }

    fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.put_u32(name.len() as u32);
        d.put_slice(name.as_bytes());
        d.put_u16(infos.len() as u16);
        for i in infos {
            d.put_u16(*i);
        }
        d
    }

    #[test]
    fn list_info_go() {
        let (mut h, mut input) = started();
        let ex = exports();
        opt(&mut input, OPT_LIST, &[]);
        opt(
            &mut input,
            OPT_INFO,
            &go_data("disk", &[INFO_NAME, INFO_DESCRIPTION]),
        );
        opt(&mut input, 0x4242, b"junk");
        opt(&mut input, OPT_GO, &go_data("other", &[]));
        let outcome = h.receive(&mut input, &ex[..]).unwrap().unwrap();
        let Outcome::Transmission(n) = outcome else {
            panic!()
        };
        assert_eq!(n.export.name, "other");
        assert!(!n.structured);
        let r = replies(&h.output().split());
        let types: Vec<u32> = r.iter().map(|x| x.1).collect();
        assert_eq!(
            types,
            [
                REP_SERVER,
                REP_SERVER,
                REP_ACK, // list
                REP_INFO,
                REP_INFO,
                REP_INFO,
                REP_INFO,
                REP_ACK,       // info
                REP_ERR_UNSUP, // unknown option, still in sync
                REP_INFO,
                REP_INFO,
                REP_ACK // go
            ]
        );
        assert_eq!(&r[0].2[4..], b"diskthe disk");
        let export_info = &r[3].2;
        assert_eq!(
            u16::from_be_bytes([export_info[0], export_info[1]]),
            INFO_EXPORT
        );
        assert_eq!(
            u64::from_be_bytes(export_info[2..10].try_into().unwrap()),
            1 << 20
        );
        let bs = &r[6].2;
        assert_eq!(u16::from_be_bytes([bs[0], bs[1]]), INFO_BLOCK_SIZE);
        assert!(input.is_empty());
    }

    #[test]
    fn unknown_export_and_malformed_go_keep_sync() {
        let (mut h, mut input) = started();
        let ex = exports();
        opt(&mut input, OPT_GO, &go_data("nope", &[]));
        opt(&mut input, OPT_GO, &[0, 0, 0, 9, b'x']);
        assert_eq!(h.receive(&mut input, &ex[..]).unwrap(), None);
        let r = replies(&h.output().split());
        assert_eq!(r[0].1, REP_ERR_UNKNOWN);
        assert_eq!(r[1].1, REP_ERR_INVALID);
    }

    #[test]
    fn structured_and_meta_context() {
        let (mut h, mut input) = started();
        let ex = exports();
        let mut meta = Vec::new();
        meta.put_u32(4);
        meta.put_slice(b"disk");
        meta.put_u32(2);
        meta.put_u32(15);
        meta.put_slice(b"base:allocation");
        meta.put_u32(9);
        meta.put_slice(b"qemu:nope");
        opt(&mut input, OPT_SET_META_CONTEXT, &meta); // before structured: invalid
        opt(&mut input, OPT_STRUCTURED_REPLY, &[]);
        opt(&mut input, OPT_SET_META_CONTEXT, &meta);
        opt(&mut input, OPT_GO, &go_data("disk", &[]));
        let Some(Outcome::Transmission(n)) = h.receive(&mut input, &ex[..]).unwrap() else {
            panic!()
        };
        assert!(n.structured && n.base_allocation);
        let r = replies(&h.output().split());
        assert_eq!(r[0].1, REP_ERR_INVALID);
        assert_eq!(r[1].1, REP_ACK);
        assert_eq!(r[2].1, REP_META_CONTEXT);
        assert_eq!(&r[2].2[4..], b"base:allocation");
        assert_eq!(r[3].1, REP_ACK);
    }

    #[test]
    fn meta_context_for_other_export_is_not_used() {
        let (mut h, mut input) = started();
        let ex = exports();
        let mut meta = Vec::new();
        meta.put_u32(5);
        meta.put_slice(b"other");
        meta.put_u32(1);
        meta.put_u32(15);
        meta.put_slice(b"base:allocation");
        opt(&mut input, OPT_STRUCTURED_REPLY, &[]);
        opt(&mut input, OPT_SET_META_CONTEXT, &meta);
        opt(&mut input, OPT_GO, &go_data("disk", &[]));
        let Some(Outcome::Transmission(n)) = h.receive(&mut input, &ex[..]).unwrap() else {
            panic!()
        };
        assert!(!n.base_allocation);
    }

    #[test]
    fn export_name_with_and_without_zeroes() {
        for no_zeroes in [true, false] {
            let mut h = Handshake::new();
            h.output().clear();
            let mut input = BytesMut::new();
            input.put_u32(if no_zeroes { 3 } else { 1 });
            opt(&mut input, OPT_EXPORT_NAME, b"disk");
            let out = h.receive(&mut input, &exports()[..]).unwrap();
            assert!(matches!(out, Some(Outcome::Transmission(_))));
            assert_eq!(h.output().len(), if no_zeroes { 10 } else { 134 });
        }
        let mut h = Handshake::new();
        let mut input = BytesMut::new();
        input.put_u32(1);
        opt(&mut input, OPT_EXPORT_NAME, b"missing");
        assert!(matches!(
            h.receive(&mut input, &exports()[..]),
            Err(HandshakeError::UnknownExport(_))
        ));
    }

    #[test]
    fn hostile_inputs_are_errors_or_skipped() {
        let mut h = Handshake::new();
        let mut input = BytesMut::new();
        input.put_u32(0x80);
        assert_eq!(
            h.receive(&mut input, &exports()[..]),
            Err(HandshakeError::UnknownClientFlags(0x80))
        );

        let (mut h, mut input) = started();
        input.put_u64(0xdead_beef);
        input.put_u64(0);
        assert!(matches!(
            h.receive(&mut input, &exports()[..]),
            Err(HandshakeError::BadMagic(_))
        ));

        // An oversized option is discarded without buffering, answered TOO_BIG.
        let (mut h, mut input) = started();
        h.output().clear();
        input.put_u64(IHAVEOPT);
        input.put_u32(OPT_GO);
        input.put_u32(u32::MAX);
        input.put_bytes(7, 1000);
        assert_eq!(h.receive(&mut input, &exports()[..]).unwrap(), None);
        assert!(input.is_empty());
        assert!(h.output().is_empty());
        assert!(input.capacity() < 1 << 20);
    }

    #[test]
    fn byte_at_a_time_gives_same_result() {
        let ex = exports();
        let mut all = BytesMut::new();
        all.put_u32(1);
        opt(&mut all, OPT_STRUCTURED_REPLY, &[]);
        opt(&mut all, OPT_LIST, &[]);
        opt(&mut all, OPT_GO, &go_data("disk", &[INFO_BLOCK_SIZE]));
        let mut h1 = Handshake::new();
        let r1 = h1.receive(&mut all.clone(), &ex[..]).unwrap();
        let mut h2 = Handshake::new();
        let mut input = BytesMut::new();
        let mut r2 = None;
        for b in all.iter() {
            input.put_u8(*b);
            if let Some(o) = h2.receive(&mut input, &ex[..]).unwrap() {
                r2 = Some(o);
            }
        }
        assert_eq!(r1, r2);
        assert_eq!(h1.output(), h2.output());
    }
}
