//! Concurrency, lifecycle and crash tests for the sources: concurrent
//! writers on disjoint and overlapping ranges, cancel-writes, close while
//! I/O is in flight (including dropped futures), reopen after close, the
//! sparse file after a crash-like drop (and with torn records), O_DIRECT,
//! hole punching, and which engine `Auto` picks.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use silo_storage::sources::{Engine, FileOptions, FileStorage, SparseFile};
use silo_storage::{hash, DynProvider, ErrorKind, MemoryStorage, Provider, ProviderExt};

const BS: u64 = 4096;

#[derive(Debug, Clone, Copy)]
enum Kind {
    Memory,
    Uring,
    Blocking,
    Sparse,
}

const ALL: [Kind; 4] = [Kind::Memory, Kind::Uring, Kind::Blocking, Kind::Sparse];

fn make(kind: Kind, dir: &Path, size: u64) -> DynProvider {
    let path = dir.join(format!("{kind:?}"));
    match kind {
        Kind::Memory => Arc::new(MemoryStorage::with_chunk_size(size, 4096)),
        Kind::Uring => Arc::new(FileStorage::create(&path, size, Engine::Uring).unwrap()),
        Kind::Blocking => Arc::new(FileStorage::create(&path, size, Engine::Blocking).unwrap()),
        Kind::Sparse => Arc::new(SparseFile::create(&path, size, BS).unwrap()),
    }
}

fn fill(len: usize, id: u8, round: u32) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| id ^ (round as u8).wrapping_mul(17) ^ (i as u8 & 0xf0))
            .collect::<Vec<u8>>(),
    )
}

/// 16 writers, each owning a disjoint, unaligned range, each writing its
/// range 20 times concurrently with everybody else; afterwards every range
/// holds exactly its writer's last write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_disjoint_writers() {
    let dir = tempfile::tempdir().unwrap();
    for kind in ALL {
        let size = 16 * 3 * BS + 777;
        let p = make(kind, dir.path(), size);
        let region = (size - 777) / 16; // 3 blocks, unaligned start below
        let mut tasks = Vec::new();
        for id in 0..16u64 {
            let p = p.clone();
            tasks.push(tokio::spawn(async move {
                let off = id * region + 100; // unaligned, crosses blocks
                let len = (region - 100) as usize;
                for round in 0..20 {
                    p.write_at(off, fill(len, id as u8 + 1, round))
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        for id in 0..16u64 {
            let off = id * region + 100;
            let len = (region - 100) as usize;
            let got = p.read_bytes(off, len).await.unwrap();
            assert_eq!(got, fill(len, id as u8 + 1, 19), "{kind:?} writer {id}");
            let gap = p.read_bytes(id * region, 100).await.unwrap();
            assert!(
                gap.iter().all(|&b| b == 0),
                "{kind:?} gap before writer {id}"
            );
        }
        p.close().await.unwrap();
    }
}

/// 8 writers repeatedly write the same block-aligned 8-block range, each
/// with its own constant byte. What we check: every byte is some writer's
/// byte (nothing else, no zeroes), and every 4 KiB block is uniform — one
/// writer's write wins per block (a block-sized aligned write is never torn
/// by a concurrent one); different blocks may have different winners.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_overlapping_writers() {
    let dir = tempfile::tempdir().unwrap();
    for kind in ALL {
        let size = 64 * BS;
        let p = make(kind, dir.path(), size);
        let off = 10 * BS;
        let len = 8 * BS as usize;
        let mut tasks = Vec::new();
        for id in 1..=8u8 {
            let p = p.clone();
            tasks.push(tokio::spawn(async move {
                let data = Bytes::from(vec![id; len]);
                for _ in 0..30 {
                    p.write_at(off, data.clone()).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let got = p.read_bytes(off, len).await.unwrap();
        for (b, block) in got.chunks(BS as usize).enumerate() {
            let first = block[0];
            assert!((1..=8).contains(&first), "{kind:?} block {b}: byte {first}");
            assert!(
                block.iter().all(|&x| x == first),
                "{kind:?} block {b} mixes writers"
            );
        }
        p.close().await.unwrap();
    }
}

/// cancel_writes is a hint: a write racing it either succeeds (its data is
/// there) or fails with Cancelled (the old or new data is there); writes
/// outside the range and writes issued after the call are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_writes_semantics() {
    let dir = tempfile::tempdir().unwrap();
    for kind in ALL {
        let p = make(kind, dir.path(), 32 * BS);
        let old = Bytes::from(vec![1u8; 4 * BS as usize]);
        let new = Bytes::from(vec![2u8; 4 * BS as usize]);
        p.write_at(0, old.clone()).await.unwrap();
        let racing = {
            let p = p.clone();
            let new = new.clone();
            tokio::spawn(async move { p.write_at(0, new).await })
        };
        let outside = {
            let p = p.clone();
            tokio::spawn(async move { p.write_at(16 * BS, Bytes::from(vec![3u8; 4096])).await })
        };
        p.cancel_writes(0, 8 * BS);
        let r = racing.await.unwrap();
        outside.await.unwrap().unwrap();
        let got = p.read_bytes(0, 4 * BS as usize).await.unwrap();
        match r {
            Ok(()) => assert_eq!(got, new, "{kind:?}"),
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Cancelled, "{kind:?}: {e}");
                assert!(got == old || got == new, "{kind:?}");
            }
        }
        assert_eq!(p.read_bytes(16 * BS, 4096).await.unwrap(), vec![3u8; 4096]);
        // After the call returned, writes to the range work normally.
        p.write_at(0, Bytes::from(vec![4u8; 100])).await.unwrap();
        assert_eq!(p.read_bytes(0, 100).await.unwrap(), vec![4u8; 100]);
        p.close().await.unwrap();
    }
}

/// close() while many reads and writes are in flight returns promptly,
/// every operation finishes (Ok or Closed), and later operations of every
/// kind fail with Closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_while_io_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    for kind in [Kind::Uring, Kind::Blocking, Kind::Sparse] {
        let p = make(kind, dir.path(), 256 * BS);
        let mut tasks = Vec::new();
        for id in 0..32u64 {
            let p = p.clone();
            tasks.push(tokio::spawn(async move {
                let mut ok = 0u32;
                for i in 0..10_000u64 {
                    let off = ((id * 7 + i) % 256) * BS;
                    let r = if i % 2 == 0 {
                        p.write_at(off, Bytes::from(vec![id as u8; 4096])).await
                    } else {
                        p.read_at(off, BytesMut::zeroed(4096)).await.map(|_| ())
                    };
                    match r {
                        Ok(()) => ok += 1,
                        Err(e) if e.kind() == ErrorKind::Closed => return ok,
                        Err(e) => panic!("{kind:?}: unexpected error {e}"),
                    }
                }
                ok
            }));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        tokio::time::timeout(Duration::from_secs(10), p.close())
            .await
            .unwrap_or_else(|_| panic!("{kind:?}: close hung"))
            .unwrap();
        let mut done = 0u32;
        for t in tasks {
            done += tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .unwrap_or_else(|_| panic!("{kind:?}: an operation hung after close"))
                .unwrap();
        }
        // close really interrupted the workload (it was in flight).
        assert!(
            done > 0 && done < 32 * 10_000,
            "{kind:?}: {done} ops before close"
        );
        let kinds = [
            p.read_at(0, BytesMut::zeroed(10)).await.map(|_| ()),
            p.write_at(0, Bytes::from_static(b"x")).await,
            p.flush().await,
            p.trim(0, 4096).await,
            p.write_zeroes(0, 4096).await,
        ];
        for r in kinds {
            assert_eq!(r.unwrap_err().kind(), ErrorKind::Closed, "{kind:?}");
        }
        p.close().await.unwrap(); // closing twice is fine
    }
}

/// Futures dropped while the kernel owns their buffers: nothing is freed
/// early (the buffer lives with the op), close still waits for them, and
/// the data of completed writes is intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_futures_are_safe() {
    let dir = tempfile::tempdir().unwrap();
    for engine in [Engine::Uring, Engine::Blocking] {
        let path = dir.path().join(format!("drop-{engine:?}"));
        let f = Arc::new(FileStorage::create(&path, 1 << 22, engine).unwrap());
        for i in 0..200u64 {
            let off = (i % 64) * 65536;
            let fut = f.write_at(off, Bytes::from(vec![(i % 251) as u8 + 1; 65536]));
            // Poll once (submits), then drop.
            let _ = tokio::time::timeout(Duration::ZERO, fut).await;
            let rfut = f.read_at(off, BytesMut::zeroed(65536));
            let _ = tokio::time::timeout(Duration::ZERO, rfut).await;
        }
        tokio::time::timeout(Duration::from_secs(10), f.close())
            .await
            .expect("close hung")
            .unwrap();
        // Every block holds either zeroes or one whole write's pattern.
        let g = FileStorage::open(&path, engine).unwrap();
        for blk in 0..64u64 {
            let d = g.read_bytes(blk * 65536, 65536).await.unwrap();
            assert!(d.iter().all(|&b| b == d[0]), "{engine:?} block {blk} torn");
        }
    }
}

/// Data written before close is seen by a new FileStorage on the same
/// file, with either engine, including the last partial block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_reopened_after_close_sees_data() {
    let dir = tempfile::tempdir().unwrap();
    let size = 300 * BS + 123;
    for (w, r) in [
        (Engine::Uring, Engine::Blocking),
        (Engine::Blocking, Engine::Uring),
    ] {
        let path = dir.path().join(format!("reopen-{w:?}"));
        let f = FileStorage::create(&path, size, w).unwrap();
        for i in 0..300u64 {
            f.write_at(i * BS, Bytes::from(vec![i as u8 | 1; 4096]))
                .await
                .unwrap();
        }
        f.write_at(size - 123, Bytes::from(vec![0xee; 123]))
            .await
            .unwrap();
        f.flush().await.unwrap();
        f.close().await.unwrap();
        let g = FileStorage::open(&path, r).unwrap();
        assert_eq!(g.size(), size);
        assert!(hash::equal(&f_content(&g).await, &g).await.unwrap());
        for i in 0..300u64 {
            assert_eq!(
                g.read_bytes(i * BS, 4096).await.unwrap(),
                vec![i as u8 | 1; 4096]
            );
        }
        assert_eq!(
            g.read_bytes(size - 123, 123).await.unwrap(),
            vec![0xee; 123]
        );
    }
}

async fn f_content(p: &FileStorage) -> MemoryStorage {
    let m = MemoryStorage::new(p.size());
    let all = p.read_bytes(0, p.size() as usize).await.unwrap();
    m.write_at(0, all).await.unwrap();
    m
}

/// Every acknowledged full-block write to a sparse file survives a drop
/// without close (the process stays alive, like a crash of the owner) and a
/// reopen; so do partial writes, trims and the last partial block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_survives_crash_like_drop() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sparse");
    let size = 200 * BS + 1000;
    let model = MemoryStorage::new(size);
    {
        let s = Arc::new(SparseFile::create(&path, size, BS).unwrap());
        let mut tasks = Vec::new();
        for t in 0..8u64 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in 0..25u64 {
                    let b = (i * 8 + t) % 200;
                    let data = Bytes::from(vec![(b % 250) as u8 + 1; 4096]);
                    s.write_at(b * BS, data.clone()).await.unwrap();
                    acked.push((b, data));
                }
                acked
            }));
        }
        for t in tasks {
            for (b, data) in t.await.unwrap() {
                model.write_at(b * BS, data).await.unwrap();
            }
        }
        // A partial write into a never-written block, a trim, the tail.
        for (off, data) in [(7 * BS + 5, vec![9u8; 10]), (size - 1000, vec![8u8; 1000])] {
            s.write_slice(off, &data).await.unwrap();
            model.write_slice(off, &data).await.unwrap();
        }
        s.trim(20 * BS, 3 * BS).await.unwrap();
        model.trim(20 * BS, 3 * BS).await.unwrap();
        assert!(!s.has_block(21));
        drop(s); // no close, no flush
    }
    let s = SparseFile::open(&path).unwrap();
    assert_eq!(s.recovery().torn, 0);
    assert_eq!(s.size(), size);
    let d = hash::difference(&model, &s, BS).await.unwrap();
    assert!(d.is_empty(), "{d:?}");
    assert_eq!(s.stored_blocks(), 201 - 3); // 200 full + tail block, minus 3 trimmed
                                            // Blocks never written are not stored.
    let s2 = SparseFile::create(dir.path().join("empty"), 1 << 30, 65536).unwrap();
    s2.write_slice(500 << 20, b"hello").await.unwrap();
    assert_eq!(s2.stored_blocks(), 1);
    assert!(std::fs::metadata(s2.path()).unwrap().len() < 200_000);
}

/// A torn final record (partial append) and a corrupted record in the
/// middle are detected on reopen and ignored; everything else survives.
#[tokio::test]
async fn sparse_torn_records_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("torn");
    let s = SparseFile::create(&path, 10 * BS, BS).unwrap();
    for b in 0..5u64 {
        s.write_at(b * BS, Bytes::from(vec![b as u8 + 1; 4096]))
            .await
            .unwrap();
    }
    drop(s);
    let rec = 32 + BS;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        // Flip a payload byte of record 2 (block 2): torn in-place overwrite.
        f.write_all_at(&[0xff], 64 + 2 * rec + 32 + 100).unwrap();
        // Append half a record: torn append.
        let len = f.metadata().unwrap().len();
        f.write_all_at(&vec![0xab; (rec / 2) as usize], len)
            .unwrap();
    }
    let s = SparseFile::open(&path).unwrap();
    let r = s.recovery();
    assert_eq!(
        (r.data, r.torn, r.truncated_bytes),
        (4, 1, rec / 2),
        "{r:?}"
    );
    for b in [0u64, 1, 3, 4] {
        assert_eq!(
            s.read_bytes(b * BS, 4096).await.unwrap(),
            vec![b as u8 + 1; 4096]
        );
    }
    assert!(s
        .read_bytes(2 * BS, 4096)
        .await
        .unwrap()
        .iter()
        .all(|&x| x == 0));
    // The torn slot is reused and the file keeps working.
    s.write_at(7 * BS, Bytes::from(vec![7u8; 4096]))
        .await
        .unwrap();
    drop(s);
    let s = SparseFile::open(&path).unwrap();
    assert_eq!(s.recovery().torn, 0);
    assert_eq!(s.read_bytes(7 * BS, 4096).await.unwrap(), vec![7u8; 4096]);
    // A header claiming an absurd size (with a valid check): a clear error,
    // not an allocation abort.
    {
        use sha2::Digest;
        let mut h = [0u8; 64];
        h[0..8].copy_from_slice(b"SILOSPF1");
        h[8..12].copy_from_slice(&1u32.to_le_bytes());
        h[12..16].copy_from_slice(&512u32.to_le_bytes());
        h[16..24].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        let c = sha2::Sha256::digest(&h[..24]);
        h[24..32].copy_from_slice(&c[..8]);
        std::fs::write(dir.path().join("huge"), h).unwrap();
        let e = SparseFile::open(dir.path().join("huge")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    }
    // Not a sparse file at all: a clear error.
    std::fs::write(dir.path().join("junk"), vec![1u8; 100]).unwrap();
    let e = SparseFile::open(dir.path().join("junk")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
}

/// On this machine io_uring works, so Auto must pick it.
#[tokio::test]
async fn auto_engine_uses_io_uring_here() {
    if let Err(reason) = Engine::uring_available() {
        panic!("io_uring is expected to work on this machine: {reason}");
    }
    let dir = tempfile::tempdir().unwrap();
    let f = FileStorage::create(dir.path().join("auto"), 4096, Engine::Auto).unwrap();
    assert_eq!(f.engine(), Engine::Uring);
    let b = FileStorage::create(dir.path().join("b"), 4096, Engine::Blocking).unwrap();
    assert_eq!(b.engine(), Engine::Blocking);
}

/// O_DIRECT: aligned requests work with aligned and misaligned caller
/// buffers (bounced), misaligned offsets/lengths get a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_io_alignment() {
    let dir = tempfile::tempdir().unwrap();
    for engine in [Engine::Uring, Engine::Blocking] {
        let path = dir.path().join(format!("direct-{engine:?}"));
        let opts = FileOptions::engine(engine).with_direct(true);
        let f = FileStorage::create_with(&path, 64 * BS, opts).unwrap();
        assert!(f.is_direct());
        // Misaligned buffer start: a slice at offset 1 of a larger Bytes.
        let big = Bytes::from(vec![5u8; 2 * 4096 + 1]);
        f.write_at(BS, big.slice(1..)).await.unwrap();
        let got = f.read_bytes(BS, 8192).await.unwrap();
        assert_eq!(got, vec![5u8; 8192]);
        let e = f
            .write_at(100, Bytes::from(vec![1u8; 4096]))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
        assert!(e.to_string().contains("O_DIRECT"), "{e}");
        let e = f.read_at(0, BytesMut::zeroed(100)).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid);
        f.flush().await.unwrap();
        f.trim(BS, BS).await.unwrap();
        assert!(f
            .read_bytes(BS, 4096)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 0));
        f.close().await.unwrap();
    }
}

/// Trim really deallocates (the file's allocated blocks shrink) and reads
/// zeroes; write_zeroes reads zeroes; a read-only file refuses writes.
#[tokio::test]
async fn trim_punches_holes_and_read_only_refuses() {
    let dir = tempfile::tempdir().unwrap();
    for engine in [Engine::Uring, Engine::Blocking] {
        let path = dir.path().join(format!("trim-{engine:?}"));
        let f = FileStorage::create(&path, 4 << 20, engine).unwrap();
        f.write_at(0, Bytes::from(vec![1u8; 4 << 20]))
            .await
            .unwrap();
        f.flush().await.unwrap();
        let before = std::fs::metadata(&path).unwrap().blocks();
        f.trim(0, 2 << 20).await.unwrap();
        let after = std::fs::metadata(&path).unwrap().blocks();
        assert!(after < before, "{engine:?}: {before} -> {after} blocks");
        assert!(f
            .read_bytes(0, 2 << 20)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 0));
        f.write_zeroes(3 << 20, 1000).await.unwrap();
        assert!(f
            .read_bytes(3 << 20, 1000)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 0));
        assert_eq!(
            f.read_bytes((3 << 20) + 1000, 10).await.unwrap(),
            vec![1u8; 10]
        );
        f.close().await.unwrap();
        let ro = FileStorage::open_with(&path, FileOptions::engine(engine).with_read_only(true))
            .unwrap();
        assert!(ro.capabilities().read_only);
        let e = ro.write_at(0, Bytes::from_static(b"x")).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ReadOnly);
        assert_eq!(
            ro.read_bytes((3 << 20) + 1000, 10).await.unwrap(),
            vec![1u8; 10]
        );
    }
    let e = FileStorage::open(dir.path().join("missing"), Engine::Auto).unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");
}

/// A file shrunk behind the storage's back: the read comes back short, the
/// engine resubmits the rest, hits end-of-file and fails cleanly (no hang,
/// no stale bytes passed off as data).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_reads_are_resumed_then_fail_at_eof() {
    let dir = tempfile::tempdir().unwrap();
    for engine in [Engine::Uring, Engine::Blocking] {
        let path = dir.path().join(format!("short-{engine:?}"));
        let f = FileStorage::create(&path, 1 << 20, engine).unwrap();
        f.write_at(0, Bytes::from(vec![7u8; 1 << 20]))
            .await
            .unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(300_000)
            .unwrap();
        let ok = f.read_bytes(0, 300_000).await.unwrap();
        assert!(ok.iter().all(|&b| b == 7), "{engine:?}");
        let e = tokio::time::timeout(
            Duration::from_secs(10),
            f.read_at(0, BytesMut::zeroed(1 << 20)),
        )
        .await
        .expect("short read hung")
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io, "{engine:?}: {e}");
        assert!(e.to_string().contains("1048576"), "{engine:?}: {e}");
        f.close().await.unwrap();
    }
}
