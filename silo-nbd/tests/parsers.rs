//! The sans-IO parsers against hostile bytes: the checked-in fuzz corpus
//! replayed through the fuzz entry points, "arbitrary bytes never panic"
//! property tests, and a model test of the whole server (handshake +
//! transmission over an in-memory stream) against a plain `Vec<u8>`.

use std::sync::Arc;

use bytes::{Buf, BufMut, BytesMut};
use proptest::prelude::*;
use silo_nbd::fuzz_support;
use silo_nbd::proto::*;
use silo_nbd::{Errno, Export, Server};
use silo_storage::MemoryStorage;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

fn corpus(dir: &str) -> Vec<(String, Vec<u8>)> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(dir);
    let mut v: Vec<_> = std::fs::read_dir(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .map(|e| {
            let p = e.unwrap().path();
            (p.display().to_string(), std::fs::read(&p).unwrap())
        })
        .collect();
    v.sort();
    assert!(v.len() >= 5, "corpus {dir} is missing");
    v
}

#[test]
fn replay_handshake_corpus() {
    for (name, data) in corpus("handshake") {
        eprintln!("replaying {name}");
        fuzz_support::handshake(&data);
    }
}

#[test]
fn replay_request_corpus() {
    for (name, data) in corpus("requests") {
        eprintln!("replaying {name}");
        fuzz_support::requests(&data);
        fuzz_support::requests_with_magic(&data);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_handshake_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        fuzz_support::handshake(&data);
    }

    #[test]
    fn arbitrary_request_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        fuzz_support::requests(&data);
        fuzz_support::requests_with_magic(&data);
    }

    #[test]
    fn corpus_mutations_never_panic(pick in 0usize..16, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let mut all = corpus("handshake");
        all.extend(corpus("requests"));
        let mut data = all[pick % all.len()].1.clone();
        for (at, b) in flips {
            if !data.is_empty() {
                let n = data.len();
                data[at % n] ^= b;
            }
        }
        fuzz_support::handshake(&data);
        fuzz_support::requests(&data);
    }
}

// ---- model test: real server code over an in-memory stream -------------

const SIZE: u64 = 256 * 1024;

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: u32, seed: u8 },
    Read { off: u64, len: u32 },
    Trim { off: u64, len: u32 },
    Zero { off: u64, len: u32 },
    Flush,
}

fn op() -> impl Strategy<Value = Op> {
    // Mostly in range, sometimes across or past the end.
    let off = prop_oneof![4 => 0..SIZE, 1 => SIZE - 2048..SIZE + 4096];
    let len = 0u32..20_000;
    prop_oneof![
        4 => (off.clone(), len.clone(), any::<u8>()).prop_map(|(off, len, seed)| Op::Write { off, len, seed }),
        // Whole 64 KiB chunks of the memory device (sometimes past the
        // end): received in pieces the device adopts without a copy.
        2 => (0u64..5, 1u32..3, any::<u8>()).prop_map(|(c, n, seed)| Op::Write { off: c * 65536, len: n * 65536, seed }),
        4 => (off.clone(), len.clone()).prop_map(|(off, len)| Op::Read { off, len }),
        1 => (off.clone(), len.clone()).prop_map(|(off, len)| Op::Trim { off, len }),
        1 => (off, len).prop_map(|(off, len)| Op::Zero { off, len }),
        1 => Just(Op::Flush),
    ]
}

async fn client(server: &Server) -> DuplexStream {
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let s = server.clone();
    tokio::spawn(async move { s.handle_connection(theirs).await });
    let mut c = ours;
    let mut g = [0u8; 18];
    c.read_exact(&mut g).await.unwrap();
    let mut m = BytesMut::new();
    m.put_u32(3);
    m.put_u64(IHAVEOPT);
    m.put_u32(OPT_STRUCTURED_REPLY);
    m.put_u32(0);
    m.put_u64(IHAVEOPT);
    m.put_u32(OPT_GO);
    m.put_u32(10);
    m.put_u32(4);
    m.put_slice(b"disk");
    m.put_u16(0);
    c.write_all(&m).await.unwrap();
    loop {
        let mut h = [0u8; 20];
        c.read_exact(&mut h).await.unwrap();
        let mut h = &h[..];
        h.advance(8);
        let option = h.get_u32();
        let kind = h.get_u32();
        let len = h.get_u32() as usize;
        let mut p = vec![0u8; len];
        c.read_exact(&mut p).await.unwrap();
        assert!(kind == REP_ACK || kind == REP_INFO, "{kind:#x}");
        if kind == REP_ACK && option == OPT_GO {
            return c;
        }
    }
}

/// Sends one request and reads its reply: Ok(read data) or Err(errno).
async fn call(
    c: &mut DuplexStream,
    kind: u16,
    off: u64,
    len: u32,
    data: &[u8],
) -> Result<Vec<u8>, u32> {
    let mut m = BytesMut::new();
    m.put_u32(REQUEST_MAGIC);
    m.put_u16(0);
    m.put_u16(kind);
    m.put_u64(99);
    m.put_u64(off);
    m.put_u32(len);
    m.put_slice(data);
    c.write_all(&m).await.unwrap();
    let mut magic = [0u8; 4];
    c.read_exact(&mut magic).await.unwrap();
    match u32::from_be_bytes(magic) {
        SIMPLE_REPLY_MAGIC => {
            let mut rest = [0u8; 12];
            c.read_exact(&mut rest).await.unwrap();
            let err = u32::from_be_bytes(rest[..4].try_into().unwrap());
            assert_ne!(
                kind, CMD_READ,
                "simple reply to READ with structured replies"
            );
            if err != 0 {
                Err(err)
            } else {
                Ok(Vec::new())
            }
        }
        STRUCTURED_REPLY_MAGIC => {
            let mut rest = [0u8; 16];
            c.read_exact(&mut rest).await.unwrap();
            let mut r = &rest[..];
            let flags = r.get_u16();
            let ty = r.get_u16();
            let _cookie = r.get_u64();
            let plen = r.get_u32() as usize;
            assert_eq!(flags & REPLY_FLAG_DONE, REPLY_FLAG_DONE);
            let mut p = vec![0u8; plen];
            c.read_exact(&mut p).await.unwrap();
            match ty {
                REPLY_TYPE_OFFSET_DATA => {
                    assert_eq!(u64::from_be_bytes(p[..8].try_into().unwrap()), off);
                    Ok(p[8..].to_vec())
                }
                REPLY_TYPE_NONE => Ok(Vec::new()),
                REPLY_TYPE_ERROR => Err(u32::from_be_bytes(p[..4].try_into().unwrap())),
                other => panic!("unexpected chunk type {other}"),
            }
        }
        other => panic!("bad reply magic {other:#x}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn server_matches_a_vec_model(ops in proptest::collection::vec(op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let server = Server::default();
            server.add_export(Export::new("disk", Arc::new(MemoryStorage::new(SIZE)))).unwrap();
            let mut c = client(&server).await;
            let mut model = vec![0u8; SIZE as usize];
            for op in ops {
                let in_range = |off: u64, len: u32| off + u64::from(len) <= SIZE;
                match op {
                    Op::Write { off, len, seed } => {
                        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect();
                        let r = call(&mut c, CMD_WRITE, off, len, &data).await;
                        if in_range(off, len) {
                            assert_eq!(r, Ok(Vec::new()));
                            model[off as usize..(off + u64::from(len)) as usize].copy_from_slice(&data);
                        } else {
                            assert_eq!(r, Err(Errno::NoSpc.code()));
                        }
                    }
                    Op::Read { off, len } => {
                        let r = call(&mut c, CMD_READ, off, len, &[]).await;
                        if in_range(off, len) {
                            assert_eq!(r.unwrap(), &model[off as usize..(off + u64::from(len)) as usize]);
                        } else {
                            assert_eq!(r, Err(Errno::Inval.code()));
                        }
                    }
                    Op::Trim { off, len } | Op::Zero { off, len } => {
                        let trim = matches!(op, Op::Trim { .. });
                        let kind = if trim { CMD_TRIM } else { CMD_WRITE_ZEROES };
                        let r = call(&mut c, kind, off, len, &[]).await;
                        if in_range(off, len) {
                            assert_eq!(r, Ok(Vec::new()));
                            model[off as usize..(off + u64::from(len)) as usize].fill(0);
                        } else {
                            let e = if trim { Errno::Inval } else { Errno::NoSpc };
                            assert_eq!(r, Err(e.code()));
                        }
                    }
                    Op::Flush => assert_eq!(call(&mut c, CMD_FLUSH, 0, 0, &[]).await, Ok(Vec::new())),
                }
            }
            let all = call(&mut c, CMD_READ, 0, SIZE as u32, &[]).await.unwrap();
            assert!(all == model, "final contents differ from the model");
        });
    }
}
