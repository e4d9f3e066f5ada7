//! Hostile input: every malformed frame, hello or payload is an error —
//! never a panic, a hang, or an allocation beyond the frame limit.

use bytes::{BufMut, Bytes, BytesMut};
use silo_protocol::compress;
use silo_protocol::handshake::{negotiate, HELLO_LEN, MAGIC};
use silo_protocol::*;

const LIMITS: Limits = Limits { max_frame: 1 << 20 };

fn header(len: u32, kind: u8, device: u32, txid: u32) -> Vec<u8> {
    let mut v = Vec::new();
    v.put_u32_le(len);
    v.put_u8(kind);
    v.put_u8(0);
    v.put_u16_le(0);
    v.put_u32_le(device);
    v.put_u32_le(txid);
    v
}

fn frame(kind: u8, txid: u32, body: &[u8]) -> Vec<u8> {
    let mut v = header(body.len() as u32, kind, 1, txid);
    v.extend_from_slice(body);
    v
}

fn decode_err(wire: &[u8]) -> DecodeError {
    match Frame::decode(wire, &LIMITS) {
        Ok((f, _)) => panic!("decoded hostile input as {f:?}"),
        Err(e) => e,
    }
}

fn sample_frames() -> Vec<Vec<u8>> {
    let msgs = vec![
        (
            Message::WriteAt(WriteAt::plain(4096, Bytes::from(vec![5u8; 100]))),
            1,
        ),
        (
            Message::DirtyList(BlockList {
                block_size: 4096,
                blocks: vec![1, 2, 3],
            }),
            2,
        ),
        (
            Message::DeviceInfo(DeviceInfo {
                size: 1 << 20,
                block_size: 4096,
                name: "d".into(),
                schema: "s".into(),
            }),
            0,
        ),
        (
            Message::AlternateSources(vec![AlternateSource {
                offset: 0,
                length: 10,
                sha256: [1; 32],
                location: "here".into(),
            }]),
            3,
        ),
        (
            Message::Error(ErrorResponse::new(ErrorCode::Io, "disk on fire")),
            4,
        ),
    ];
    msgs.into_iter()
        .map(|(message, txid)| {
            Frame {
                device: 1,
                txid,
                message,
            }
            .to_vec(&LIMITS)
            .unwrap()
        })
        .collect()
}

#[test]
fn truncated_frames_are_errors_and_the_stream_decoder_waits() {
    for wire in sample_frames() {
        for cut in 0..wire.len() {
            let e = decode_err(&wire[..cut]);
            assert!(matches!(e, DecodeError::Truncated { .. }), "cut {cut}: {e}");
            let mut dec = FrameDecoder::new(LIMITS);
            let mut buf = BytesMut::from(&wire[..cut]);
            assert_eq!(
                dec.decode(&mut buf).unwrap(),
                None,
                "incomplete frame must not decode"
            );
        }
        // A body truncated *inside* a frame whose header says it is shorter:
        // the message decoder reports what is missing.
        if wire.len() > HEADER_LEN + 1 {
            let body_len = wire.len() - HEADER_LEN - 1;
            let mut short = wire[..wire.len() - 1].to_vec();
            short[..4].copy_from_slice(&(body_len as u32).to_le_bytes());
            let _ = decode_err(&short);
        }
    }
}

#[test]
fn oversized_frame_is_rejected_before_allocation() {
    let wire = header(u32::MAX, Kind::WriteAt as u8, 1, 1);
    assert_eq!(
        decode_err(&wire),
        DecodeError::FrameTooLarge {
            len: u32::MAX as u64,
            max: LIMITS.max_frame as u64
        }
    );
    // The streaming decoder fails on the header alone and never reserves.
    let mut dec = FrameDecoder::new(LIMITS);
    let mut buf = BytesMut::from(&wire[..]);
    let cap = buf.capacity();
    assert!(dec.decode(&mut buf).is_err());
    assert_eq!(buf.capacity(), cap);
}

#[test]
fn oversized_counts_and_lengths_are_errors() {
    // Dirty list claiming u32::MAX blocks in a 16-byte body.
    let mut b = Vec::new();
    b.put_u32_le(4096);
    b.put_u32_le(u32::MAX);
    b.put_u64_le(1);
    assert!(matches!(
        decode_err(&frame(Kind::DirtyList as u8, 1, &b)),
        DecodeError::Truncated { .. }
    ));
    // You-already-have likewise.
    assert!(matches!(
        decode_err(&frame(Kind::YouAlreadyHave as u8, 1, &b)),
        DecodeError::Truncated { .. }
    ));
    // Alternate sources with a huge count.
    let mut b = Vec::new();
    b.put_u32_le(u32::MAX);
    b.put_bytes(0, 60);
    assert!(matches!(
        decode_err(&frame(Kind::AlternateSources as u8, 1, &b)),
        DecodeError::Invalid { .. }
    ));
    // Alternate source whose location length runs past the body.
    let mut b = Vec::new();
    b.put_u32_le(1);
    b.put_u64_le(0);
    b.put_u64_le(10);
    b.put_bytes(7, 32);
    b.put_u16_le(500);
    b.extend_from_slice(b"abc");
    assert!(matches!(
        decode_err(&frame(Kind::AlternateSources as u8, 1, &b)),
        DecodeError::Truncated { .. }
    ));
    // Device group info with a huge count.
    let mut b = Vec::new();
    b.put_u32_le(1 << 30);
    b.put_bytes(0, 40);
    assert!(matches!(
        decode_err(&frame(Kind::DeviceGroupInfo as u8, 0, &b)),
        DecodeError::Invalid { .. }
    ));
    // Device group info whose entry length runs past the body.
    let mut b = Vec::new();
    b.put_u32_le(1);
    b.put_u32_le(1);
    b.put_u32_le(1000);
    b.put_bytes(0, 20);
    assert!(matches!(
        decode_err(&frame(Kind::DeviceGroupInfo as u8, 0, &b)),
        DecodeError::Truncated { .. }
    ));
    // Device info with name/schema lengths beyond the body.
    let mut b = Vec::new();
    b.put_u64_le(1 << 20);
    b.put_u32_le(4096);
    b.put_u16_le(u16::MAX);
    b.put_u16_le(0);
    b.put_u32_le(u32::MAX);
    b.extend_from_slice(b"ab");
    assert!(matches!(
        decode_err(&frame(Kind::DeviceInfo as u8, 0, &b)),
        DecodeError::Truncated { .. }
    ));
    // Error text longer than the body.
    let mut b = Vec::new();
    b.put_u16_le(2);
    b.put_u16_le(9000);
    assert!(matches!(
        decode_err(&frame(Kind::Error as u8, 1, &b)),
        DecodeError::Truncated { .. }
    ));
    // Read larger than the frame limit (the response could never be sent).
    let mut b = Vec::new();
    b.put_u64_le(0);
    b.put_u32_le(LIMITS.max_frame + 1);
    b.put_u32_le(0);
    assert!(matches!(
        decode_err(&frame(Kind::ReadAt as u8, 1, &b)),
        DecodeError::Invalid { .. }
    ));
    // Offset + length overflowing u64.
    let mut b = Vec::new();
    b.put_u64_le(u64::MAX - 10);
    b.put_u64_le(100);
    assert!(matches!(
        decode_err(&frame(Kind::NeedAt as u8, 0, &b)),
        DecodeError::Invalid { .. }
    ));
}

#[test]
fn zero_lengths_and_empty_bodies_are_errors() {
    // Write of length 0.
    let mut b = Vec::new();
    b.put_u64_le(0);
    b.put_u32_le(0);
    b.put_u32_le(0);
    assert!(matches!(
        decode_err(&frame(Kind::WriteAt as u8, 1, &b)),
        DecodeError::Invalid { .. }
    ));
    // Read of length 0.
    let mut b = Vec::new();
    b.put_u64_le(0);
    b.put_u32_le(0);
    b.put_u32_le(0);
    assert!(matches!(
        decode_err(&frame(Kind::ReadAt as u8, 1, &b)),
        DecodeError::Invalid { .. }
    ));
    // Need-at of length 0.
    let mut b = Vec::new();
    b.put_u64_le(0);
    b.put_u64_le(0);
    assert!(matches!(
        decode_err(&frame(Kind::NeedAt as u8, 0, &b)),
        DecodeError::Invalid { .. }
    ));
    // Every kind with a fixed part rejects an empty body.
    for kind in Kind::ALL {
        let txid = if kind.class() == Class::Notice { 0 } else { 1 };
        let r = Frame::decode(&frame(*kind as u8, txid, &[]), &LIMITS);
        match kind {
            Kind::RemoveDevice | Kind::Ack | Kind::ReadAtData => assert!(r.is_ok(), "{kind}"),
            Kind::AlternateSources | Kind::DeviceGroupInfo => {
                assert!(r.is_err(), "{kind} needs its count")
            }
            _ => assert!(r.is_err(), "{kind} accepted an empty body"),
        }
    }
    // Block size 0 in a dirty list.
    let mut b = Vec::new();
    b.put_u32_le(0);
    b.put_u32_le(0);
    assert!(decode_err(&frame(Kind::DirtyList as u8, 1, &b))
        .to_string()
        .contains("block size"));
}

#[test]
fn unknown_kinds_flags_and_txid_rules() {
    for k in [0x00u8, 0x0d, 0x40, 0x80, 0x85, 0xff] {
        assert_eq!(decode_err(&frame(k, 1, &[])), DecodeError::UnknownKind(k));
    }
    let mut f = frame(Kind::Ack as u8, 1, &[]);
    f[5] = 1;
    assert!(matches!(
        decode_err(&f),
        DecodeError::ReservedNonZero { .. }
    ));
    let mut f = frame(Kind::Ack as u8, 1, &[]);
    f[7] = 1;
    assert!(matches!(
        decode_err(&f),
        DecodeError::ReservedNonZero { .. }
    ));
    // Request without txid, notice with one.
    assert!(matches!(
        decode_err(&frame(Kind::Ack as u8, 0, &[])),
        DecodeError::Invalid { .. }
    ));
    assert!(matches!(
        decode_err(&frame(Kind::RemoveDevice as u8, 5, &[])),
        DecodeError::Invalid { .. }
    ));
    // Trailing bytes after a complete body.
    assert!(matches!(
        decode_err(&frame(Kind::Ack as u8, 1, &[1])),
        DecodeError::TrailingBytes { .. }
    ));
    // Unknown write encoding, event kind, hash location.
    let mut b = Vec::new();
    b.put_u64_le(0);
    b.put_u32_le(4);
    b.put_u8(9);
    b.put_bytes(0, 3);
    b.put_bytes(1, 4);
    assert!(matches!(
        decode_err(&frame(Kind::WriteAt as u8, 1, &b)),
        DecodeError::Invalid { .. }
    ));
    assert!(matches!(
        decode_err(&frame(Kind::Event as u8, 1, &[9, 0, 0, 0])),
        DecodeError::Invalid { .. }
    ));
    assert!(matches!(
        decode_err(&frame(Kind::Event as u8, 1, &[4, 0, 0, 0, 1])),
        DecodeError::Invalid { .. }
    ));
    // Bad UTF-8 in a name.
    let mut b = Vec::new();
    b.put_u64_le(1);
    b.put_u32_le(1);
    b.put_u16_le(2);
    b.put_u16_le(0);
    b.put_u32_le(0);
    b.extend_from_slice(&[0xff, 0xfe]);
    assert!(matches!(
        decode_err(&frame(Kind::DeviceInfo as u8, 0, &b)),
        DecodeError::BadUtf8 { .. }
    ));
}

fn write_frame(length: u32, encoding: u8, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.put_u64_le(0);
    b.put_u32_le(length);
    b.put_u8(encoding);
    b.put_bytes(0, 3);
    b.extend_from_slice(payload);
    frame(Kind::WriteAt as u8, 1, &b)
}

fn decoded_write(wire: &[u8]) -> WriteAt {
    match Frame::decode(wire, &LIMITS).unwrap().0.message {
        Message::WriteAt(w) => w,
        m => panic!("{m:?}"),
    }
}

#[test]
fn bad_compressed_payloads_are_errors() {
    // LZ4 garbage.
    let w = decoded_write(&write_frame(4096, Encoding::Lz4 as u8, &[0xff; 40]));
    assert!(matches!(w.data(), Err(DecodeError::Decompress { .. })));
    // LZ4 bomb: 1 MiB of zeroes compressed, declared as 4 KiB. The decoder
    // writes into a 4 KiB buffer and fails instead of growing it.
    let bomb = compress::lz4_encode(&vec![0u8; 1 << 20]);
    assert!(bomb.len() < 8192);
    let w = decoded_write(&write_frame(4096, Encoding::Lz4 as u8, &bomb));
    assert!(matches!(w.data(), Err(DecodeError::Decompress { .. })));
    // LZ4 that decodes to fewer bytes than declared.
    let small = compress::lz4_encode(&[1u8; 100]);
    let w = decoded_write(&write_frame(4096, Encoding::Lz4 as u8, &small));
    assert!(matches!(w.data(), Err(DecodeError::Decompress { .. })));
    // Truncated LZ4 stream.
    let good = compress::lz4_encode(&(0..4096u32).map(|i| (i % 251) as u8).collect::<Vec<_>>());
    for cut in [1, good.len() / 2, good.len() - 1] {
        let w = decoded_write(&write_frame(4096, Encoding::Lz4 as u8, &good[..cut]));
        assert!(w.data().is_err(), "cut {cut}");
    }
    // Declared length beyond the frame limit: rejected before any output
    // buffer exists (a "zeroes" bomb).
    let e = decode_err(&write_frame(u32::MAX, Encoding::Zeroes as u8, &[]));
    assert!(matches!(e, DecodeError::Invalid { .. }), "{e}");
    let e = decode_err(&write_frame(
        LIMITS.max_frame + 1,
        Encoding::Lz4 as u8,
        &bomb,
    ));
    assert!(matches!(e, DecodeError::Invalid { .. }), "{e}");
    // Zeroes with a payload.
    assert!(decode_err(&write_frame(16, Encoding::Zeroes as u8, &[0]))
        .to_string()
        .contains("zeroes"));
    // Plain payload shorter than declared.
    assert!(matches!(
        decode_err(&write_frame(16, Encoding::Plain as u8, &[1; 15])),
        DecodeError::Invalid { .. }
    ));
    // Sparse: record past the block, truncated record header, truncated
    // literal, empty literal, offset overflow.
    let rec = |zeros: u32, lit: u32, data: &[u8]| {
        let mut v = Vec::new();
        v.put_u32_le(zeros);
        v.put_u32_le(lit);
        v.extend_from_slice(data);
        v
    };
    for payload in [
        rec(100, 1, &[1]),
        rec(0, 1, &[1])[..5].to_vec(),
        rec(0, 10, &[1, 2]),
        rec(0, 0, &[]),
        rec(u32::MAX, 1, &[1]),
        [rec(10, 2, &[1, 1]), rec(u32::MAX - 5, 1, &[1])].concat(),
    ] {
        let e = decode_err(&write_frame(64, Encoding::Sparse as u8, &payload));
        assert!(matches!(e, DecodeError::Decompress { .. }), "{e}");
        assert!(compress::sparse_decode(&payload, 64).is_err());
    }
}

#[test]
fn device_bounds_are_checked() {
    let size = 1 << 20;
    let ok = Message::WriteAt(WriteAt::plain(size - 4, Bytes::from_static(b"abcd")));
    assert!(ok.check_device_bounds(size).is_ok());
    let past = Message::WriteAt(WriteAt::plain(size - 3, Bytes::from_static(b"abcd")));
    assert!(past.check_device_bounds(size).is_err());
    let read = Message::ReadAt(ReadAt {
        offset: size,
        length: 1,
    });
    assert!(read.check_device_bounds(size).is_err());
    let list = Message::DirtyList(BlockList {
        block_size: 4096,
        blocks: vec![0, 255],
    });
    assert!(list.check_device_bounds(size).is_ok());
    let list = Message::DirtyList(BlockList {
        block_size: 4096,
        blocks: vec![256],
    });
    assert!(list.check_device_bounds(size).is_err());
    // A short last block still counts as a block.
    let list = Message::YouAlreadyHave(BlockList {
        block_size: 4096,
        blocks: vec![256],
    });
    assert!(list.check_device_bounds(size + 1).is_ok());
    let alt = Message::AlternateSources(vec![AlternateSource {
        offset: size - 10,
        length: 11,
        sha256: [0; 32],
        location: String::new(),
    }]);
    assert!(alt.check_device_bounds(size).is_err());
}

#[test]
fn hello_errors_are_clear() {
    let ours = Hello::new(Features::ALL, 1 << 20, 64);
    let mut theirs = ours;
    theirs.major = 7;
    theirs.minor = 3;
    let e = negotiate(&ours, &theirs).unwrap_err();
    let text = e.to_string();
    assert!(text.contains("1.0") && text.contains("7.3"), "{text}");
    // Bad magic (e.g. an HTTP client).
    let e = Hello::decode(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n12345").unwrap_err();
    assert!(matches!(e, HandshakeError::BadMagic(_)), "{e}");
    // Truncated.
    let bytes = ours.encode();
    for cut in 0..HELLO_LEN {
        assert!(Hello::decode(&bytes[..cut]).is_err());
    }
    assert_eq!(&bytes[..8], &MAGIC);
    // Zero limits.
    let mut bad = bytes;
    bad[20..24].copy_from_slice(&0u32.to_le_bytes());
    assert!(matches!(
        Hello::decode(&bad),
        Err(HandshakeError::Invalid(_))
    ));
    let mut bad = bytes;
    bad[24..28].copy_from_slice(&0u32.to_le_bytes());
    assert!(matches!(
        Hello::decode(&bad),
        Err(HandshakeError::Invalid(_))
    ));
    // Newer minor with unknown feature bits negotiates down.
    let mut newer = ours;
    newer.minor = 9;
    newer.features = Features::from_bits(u64::MAX);
    let n = negotiate(&ours, &Hello::decode(&newer.encode()).unwrap()).unwrap();
    assert_eq!(n.minor, 0);
    assert_eq!(n.features, Features::ALL);
}

#[test]
fn encoder_refuses_what_the_decoder_would_reject() {
    let big = Frame {
        device: 1,
        txid: 1,
        message: Message::ReadAtData(Bytes::from(vec![0u8; LIMITS.max_frame as usize + 1])),
    };
    assert!(matches!(
        big.to_vec(&LIMITS),
        Err(EncodeError::TooLarge { .. })
    ));
    let zero = Frame {
        device: 1,
        txid: 1,
        message: Message::WriteAt(WriteAt::plain(0, Bytes::new())),
    };
    assert!(zero.to_vec(&LIMITS).is_err());
    let notice_with_txid = Frame {
        device: 1,
        txid: 3,
        message: Message::RemoveDevice,
    };
    assert!(notice_with_txid.to_vec(&LIMITS).is_err());
    let long_name = Frame {
        device: 1,
        txid: 0,
        message: Message::DeviceInfo(DeviceInfo {
            size: 1,
            block_size: 1,
            name: "n".repeat(70000),
            schema: String::new(),
        }),
    };
    assert!(long_name.to_vec(&LIMITS).is_err());
    // Error text is cut to fit instead of failing.
    let e = ErrorResponse::new(ErrorCode::Io, "é".repeat(40000));
    assert!(e.text.len() <= u16::MAX as usize);
}

/// Replays the checked-in fuzz corpus through the fuzz target's function.
#[test]
fn fuzz_corpus_replays() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus directory") {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        fuzz_decode(&data);
        n += 1;
    }
    assert!(n >= 20, "corpus has only {n} files");
}
