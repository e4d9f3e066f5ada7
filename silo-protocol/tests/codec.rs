//! Codec tests: encode → decode → equal for every message kind (proptest),
//! golden byte vectors, hostile input, and the fuzz corpus replay.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use silo_protocol::compress::{Compression, Encoding};
use silo_protocol::*;

const LIMITS: Limits = Limits { max_frame: 1 << 20 };

fn arb_string(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<char>(), 0..max).prop_map(|v| v.into_iter().collect())
}

fn arb_bytes(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

/// Block-like data: zeroes, runs, text and random bytes mixed.
fn arb_block() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        (1usize..5000).prop_map(|n| Bytes::from(vec![0u8; n])),
        proptest::collection::vec((any::<u8>(), 1usize..200, any::<bool>()), 1..40).prop_map(
            |runs| {
                let mut v = Vec::new();
                for (b, n, zero) in runs {
                    v.extend(std::iter::repeat(if zero { 0 } else { b }).take(n));
                }
                Bytes::from(v)
            }
        ),
        proptest::collection::vec(any::<u8>(), 1..3000).prop_map(Bytes::from),
    ]
}

fn arb_info() -> impl Strategy<Value = DeviceInfo> {
    (any::<u64>(), 1u32.., arb_string(20), arb_string(200)).prop_map(
        |(size, block_size, name, schema)| DeviceInfo {
            size,
            block_size,
            name,
            schema,
        },
    )
}

fn arb_range() -> impl Strategy<Value = Range> {
    (any::<u64>(), 1u64..).prop_filter_map("no overflow", |(offset, length)| {
        offset.checked_add(length).map(|_| Range { offset, length })
    })
}

fn arb_list() -> impl Strategy<Value = BlockList> {
    (1u32.., proptest::collection::vec(any::<u64>(), 0..100))
        .prop_map(|(block_size, blocks)| BlockList { block_size, blocks })
}

fn arb_write() -> impl Strategy<Value = WriteAt> {
    let policy = prop_oneof![
        Just(Compression::None),
        Just(Compression::ZeroElision),
        Just(Compression::Lz4)
    ];
    (0u64..(1 << 50), arb_block(), policy)
        .prop_map(|(offset, data, p)| WriteAt::compressed(offset, &data, p, Features::ALL))
}

fn arb_event() -> impl Strategy<Value = Event> {
    prop_oneof![
        Just(Event::new(EventKind::PreLock)),
        Just(Event::new(EventKind::PostLock)),
        Just(Event::new(EventKind::PreUnlock)),
        Just(Event::new(EventKind::PostUnlock)),
        Just(Event::new(EventKind::Completed)),
        (any::<u8>(), arb_bytes(300)).prop_map(|(t, p)| Event::custom(t, p)),
    ]
}

fn arb_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        arb_info().prop_map(Message::DeviceInfo),
        proptest::collection::vec((1u32.., arb_info()), 0..5)
            .prop_map(|devices| Message::DeviceGroupInfo(DeviceGroupInfo { devices })),
        arb_write().prop_map(Message::WriteAt),
        (0u64..(1 << 50), 1u32.., any::<bool>(), any::<[u8; 32]>()).prop_map(
            |(offset, length, s3, sha256)| {
                Message::WriteAtHash(WriteAtHash {
                    offset,
                    length,
                    location: if s3 {
                        HashLocation::S3
                    } else {
                        HashLocation::BaseImage
                    },
                    sha256,
                })
            }
        ),
        (0u64..(1 << 50), 1u32..=LIMITS.max_frame)
            .prop_map(|(offset, length)| Message::ReadAt(ReadAt { offset, length })),
        arb_range().prop_map(Message::NeedAt),
        arb_range().prop_map(Message::DontNeedAt),
        arb_list().prop_map(Message::DirtyList),
        arb_event().prop_map(Message::Event),
        proptest::collection::vec(
            (arb_range(), any::<[u8; 32]>(), arb_string(30)).prop_map(|(r, sha256, location)| {
                AlternateSource {
                    offset: r.offset,
                    length: r.length,
                    sha256,
                    location,
                }
            }),
            0..8
        )
        .prop_map(Message::AlternateSources),
        arb_list().prop_map(Message::YouAlreadyHave),
        Just(Message::RemoveDevice),
        any::<u32>().prop_map(|length| Message::WriteAtOk { length }),
        arb_bytes(2000).prop_map(Message::ReadAtData),
        Just(Message::Ack),
        (any::<u16>(), arb_string(100))
            .prop_map(|(c, t)| Message::Error(ErrorResponse::new(ErrorCode::from_u16(c), t))),
    ]
}

fn frame_for(message: Message, device: u32, txid: u32) -> Frame {
    let txid = match message.kind().class() {
        Class::Notice => 0,
        _ => txid.max(1),
    };
    Frame {
        device,
        txid,
        message,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_message_roundtrips(msg in arb_message(), device in any::<u32>(), txid in any::<u32>()) {
        let frame = frame_for(msg, device, txid);
        let wire = frame.to_vec(&LIMITS).unwrap();
        let (back, used) = Frame::decode(&wire, &LIMITS).unwrap();
        prop_assert_eq!(used, wire.len());
        prop_assert_eq!(&back, &frame);
        // Canonical: re-encoding the decoded frame gives the same bytes.
        prop_assert_eq!(back.to_vec(&LIMITS).unwrap(), wire.clone());
        // The streaming decoder agrees, fed in arbitrary pieces.
        let mut dec = FrameDecoder::new(LIMITS);
        let mut buf = BytesMut::new();
        let mut got = None;
        for chunk in wire.chunks(7) {
            buf.extend_from_slice(chunk);
            if let Some(f) = dec.decode(&mut buf).unwrap() {
                got = Some(f);
            }
        }
        prop_assert_eq!(got, Some(frame));
    }

    #[test]
    fn compressed_writes_decode_to_the_data(data in arb_block(), offset in 0u64..(1 << 40)) {
        for policy in [Compression::None, Compression::ZeroElision, Compression::Lz4] {
            let w = WriteAt::compressed(offset, &data, policy, Features::ALL);
            prop_assert_eq!(w.data().unwrap(), data.clone());
            // Through the wire as well.
            let wire = frame_for(Message::WriteAt(w), 3, 9).to_vec(&LIMITS).unwrap();
            let (f, _) = Frame::decode(&wire, &LIMITS).unwrap();
            let Message::WriteAt(w) = f.message else { panic!("kind changed") };
            prop_assert_eq!(w.data().unwrap(), data.clone());
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        // Also exercises canonical re-encoding of whatever happens to decode.
        fuzz_decode(&data);
    }

    #[test]
    fn mutated_frames_never_panic(msg in arb_message(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6)) {
        let mut wire = frame_for(msg, 1, 1).to_vec(&LIMITS).unwrap();
        for (at, b) in flips {
            let i = at % wire.len();
            wire[i] ^= b;
        }
        fuzz_decode(&wire);
        let cut = wire.len() / 2;
        fuzz_decode(&wire[..cut]);
    }
}

fn hex_of(frame: &Frame) -> String {
    hex::encode(frame.to_vec(&LIMITS).unwrap())
}

/// Golden vectors: the exact bytes of one frame of every kind. If one of
/// these changes, the wire format changed: bump the version (PROTOCOL.md).
#[test]
fn golden_vectors() {
    let info = DeviceInfo {
        size: 0x10_0000,
        block_size: 4096,
        name: "disk".into(),
        schema: "x".into(),
    };
    let hash = [0xabu8; 32];
    let cases: Vec<(Frame, &str)> = vec![
        (
            frame_for(Message::DeviceInfo(info.clone()), 1, 0),
            "1900000001000000010000000000000000001000000000000010000004000000010000006469736b78",
        ),
        (
            frame_for(Message::DeviceGroupInfo(DeviceGroupInfo { devices: vec![(2, info)] }), 0, 0),
            "2500000002000000000000000000000001000000020000001900000000001000000000000010000004000000010000006469736b78",
        ),
        (
            frame_for(Message::WriteAt(WriteAt::plain(0x2000, Bytes::from_static(b"abcd"))), 1, 7),
            "140000000300000001000000070000000020000000000000040000000000000061626364",
        ),
        (
            frame_for(Message::WriteAt(WriteAt::zeroes(4096, 4096)), 1, 8),
            "1000000003000000010000000800000000100000000000000010000001000000",
        ),
        (
            frame_for(
                Message::WriteAt(WriteAt {
                    offset: 0,
                    length: 64,
                    encoding: Encoding::Sparse,
                    payload: Bytes::from_static(&[40, 0, 0, 0, 2, 0, 0, 0, 1, 2]),
                }),
                1,
                9,
            ),
            "1a0000000300000001000000090000000000000000000000400000000200000028000000020000000102",
        ),
        (
            frame_for(
                Message::WriteAt(WriteAt::compressed(0, &Bytes::from(vec![7u8; 64]), Compression::Lz4, Features::ALL)),
                1,
                10,
            ),
            "1c00000003000000010000000a000000000000000000000040000000030000001f0701002660070707070707",
        ),
        (
            frame_for(
                Message::WriteAtHash(WriteAtHash {
                    offset: 4096,
                    length: 4096,
                    location: HashLocation::S3,
                    sha256: hash,
                }),
                1,
                11,
            ),
            "3000000004000000010000000b00000000100000000000000010000001000000abababababababababababababababababababababababababababababababab",
        ),
        (frame_for(Message::ReadAt(ReadAt { offset: 512, length: 1024 }), 2, 12), "1000000005000000020000000c00000000020000000000000004000000000000"),
        (frame_for(Message::NeedAt(Range { offset: 4096, length: 8192 }), 2, 0), "1000000006000000020000000000000000100000000000000020000000000000"),
        (frame_for(Message::DontNeedAt(Range { offset: 0, length: 4096 }), 2, 0), "1000000007000000020000000000000000000000000000000010000000000000"),
        (
            frame_for(
                Message::DirtyList(BlockList {
                    block_size: 4096,
                    blocks: vec![1, 5],
                }),
                1,
                13,
            ),
            "1800000008000000010000000d000000001000000200000001000000000000000500000000000000",
        ),
        (frame_for(Message::Event(Event::new(EventKind::Completed)), 1, 14), "0400000009000000010000000e00000004000000"),
        (
            frame_for(Message::Event(Event::custom(3, Bytes::from_static(b"go"))), 0, 15),
            "0600000009000000000000000f00000005030000676f",
        ),
        (
            frame_for(
                Message::AlternateSources(vec![AlternateSource {
                    offset: 0,
                    length: 4096,
                    sha256: hash,
                    location: "s3".into(),
                }]),
                1,
                16,
            ),
            "380000000a00000001000000100000000100000000000000000000000010000000000000abababababababababababababababababababababababababababababababab02007333",
        ),
        (
            frame_for(
                Message::YouAlreadyHave(BlockList {
                    block_size: 65536,
                    blocks: vec![0],
                }),
                1,
                17,
            ),
            "100000000b000000010000001100000000000100010000000000000000000000",
        ),
        (frame_for(Message::RemoveDevice, 3, 0), "000000000c0000000300000000000000"),
        (frame_for(Message::WriteAtOk { length: 4096 }, 1, 7), "0400000081000000010000000700000000100000"),
        (frame_for(Message::ReadAtData(Bytes::from_static(b"xyz")), 2, 12), "0300000082000000020000000c00000078797a"),
        (frame_for(Message::Ack, 1, 13), "0000000083000000010000000d000000"),
        (
            frame_for(Message::Error(ErrorResponse::new(ErrorCode::OutOfRange, "no")), 1, 7),
            "06000000840000000100000007000000010002006e6f",
        ),
    ];
    let mut kinds_seen = std::collections::BTreeSet::new();
    let mut mismatches = Vec::new();
    for (frame, want) in &cases {
        kinds_seen.insert(frame.message.kind());
        let got = hex_of(frame);
        if got != *want {
            mismatches.push(format!(
                "{:?}: got {got}, want {want}",
                frame.message.kind()
            ));
        }
        // Golden bytes decode back to the frame.
        let (back, _) = Frame::decode(&hex::decode(&got).unwrap(), &LIMITS).unwrap();
        assert_eq!(&back, frame);
    }
    assert!(
        mismatches.is_empty(),
        "golden vectors changed:\n{}",
        mismatches.join("\n")
    );
    assert_eq!(
        kinds_seen.len(),
        Kind::ALL.len(),
        "every kind has a golden vector"
    );
}
