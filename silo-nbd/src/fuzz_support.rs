//! Entry points shared by the fuzz targets (`fuzz/`) and the corpus-replay
//! and property tests: each drives a sans-IO parser with arbitrary bytes and
//! checks its invariants (no panic, bounded buffering, consistent output).

use bytes::{BufMut, BytesMut};

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
    let ex = exports();
    // (structured, export, write piece size): the last run collects aligned
    // writes in 4 KiB pieces, feeding them straight into the pieces.
    for (structured, info, piece) in [(true, &ex[0], 0), (false, &ex[1], 0), (true, &ex[0], 4096)] {
        let mut d = RequestDecoder::new(info)
            .with_write_pieces(piece, Box::new(move || BytesMut::with_capacity(piece)));
        let mut buf = BytesMut::new();
        let mut rest = data;
        'outer: while !rest.is_empty() {
            let n = 97.min(rest.len());
            match d.payload_room() {
                Some(mut room) => {
                    let n = n.min(room.remaining_mut());
                    room.put_slice(&rest[..n]);
                    rest = &rest[n..];
                }
                None => {
                    buf.extend_from_slice(&rest[..n]);
                    rest = &rest[n..];
                }
            }
            loop {
                match d.decode(&mut buf) {
                    Ok(Some(req)) => {
                        let h = req.header;
                        if let crate::transmission::Payload::Pieces(p) = &req.payload {
                            // Whole pieces adding up to the announced length.
                            assert!(p.iter().all(|p| p.len() == piece));
                            assert_eq!(p.len() * piece, h.len as usize);
                        }
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
