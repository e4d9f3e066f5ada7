//! Entry points shared by the fuzz targets (`fuzz/`) and the corpus-replay
//! and property tests: each drives a sans-IO parser with arbitrary bytes and
//! checks its invariants (no panic, bounded buffering, consistent output).

use bytes::BytesMut;

use crate::export::ExportInfo;
use crate::handshake::{Handshake, MAX_OPTION_LEN};
use crate::proto::{REQUEST_HEADER_LEN, REQUEST_MAGIC};
use crate::transmission::{validate, RequestDecoder};

fn exports() -> Vec<ExportInfo> {
    let mut ro = ExportInfo::simple("ro", 1 << 20);
    ro.flags |= crate::proto::TFLAG_READ_ONLY;
    vec![ExportInfo::simple("disk", 64 << 20), ro]
}

/// Feeds `data` to a server handshake in chunks whose sizes come from the
/// data itself. Panics if an invariant breaks.
pub fn handshake(data: &[u8]) {
    let ex = exports();
    let mut h = Handshake::new();
    let mut input = BytesMut::new();
    let mut rest = data;
    let chunk = data.first().map_or(1, |b| usize::from(*b % 64) + 1);
    while !rest.is_empty() {
        let n = chunk.min(rest.len());
        input.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        match h.receive(&mut input, &ex[..]) {
            Ok(None) => {}
            Ok(Some(_)) | Err(_) => return,
        }
        // Never more buffered than one maximal option.
        assert!(input.len() <= 16 + MAX_OPTION_LEN as usize + 64);
        h.output().clear();
    }
}

/// Feeds `data` as a transmission-phase byte stream to a request decoder
/// and validates every request. Panics if an invariant breaks.
pub fn requests(data: &[u8]) {
    for (structured, info) in [(true, &exports()[0]), (false, &exports()[1])] {
        let mut d = RequestDecoder::new(info);
        let mut buf = BytesMut::new();
        let mut rest = data;
        'outer: while !rest.is_empty() {
            let n = 97.min(rest.len());
            buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            loop {
                match d.decode(&mut buf) {
                    Ok(Some(req)) => {
                        let h = req.header;
                        if let Ok(cmd) = validate(req, info, structured, structured) {
                            // Anything accepted lies inside the export.
                            if !matches!(
                                cmd,
                                crate::transmission::Command::Flush
                                    | crate::transmission::Command::Disconnect
                            ) {
                                assert!(h.offset + u64::from(h.len) <= info.size);
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(_) => break 'outer,
                }
            }
            assert!(buf.len() <= REQUEST_HEADER_LEN + info.max_payload as usize + 97);
        }
    }
}

/// A well-formed request stream made from `data` (so fuzzing also reaches
/// deep states): every 28-byte window gets the request magic.
pub fn requests_with_magic(data: &[u8]) {
    let mut v = data.to_vec();
    for c in v.chunks_mut(REQUEST_HEADER_LEN) {
        if c.len() >= 4 {
            c[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        }
    }
    requests(&v);
}
