//! Model test: random sequences of read / write / flush / trim /
//! write-zeroes at random offsets and lengths (block-aligned, unaligned,
//! touching the device's last partial block, zero-length, out of range)
//! against every source, compared with a plain `Vec<u8>`.
//!
//! Out-of-range requests must fail with `ErrorKind::OutOfRange` and leave
//! the data unchanged. After each sequence the whole device is compared,
//! then (file sources) the device is closed, reopened and compared again.

use std::sync::OnceLock;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use silo_storage::sources::{Engine, FileStorage, SparseFile};
use silo_storage::{ErrorKind, MemoryStorage, NotShared, Provider};

/// Device size: not a multiple of 4096 (or of 512).
const SIZE: u64 = 16 * 4096 + 1234;
const BS: u64 = 4096;

#[derive(Debug, Clone)]
enum Act {
    Read(u64, u64),
    /// `read_shared`, keeping the pieces to the end if the flag is set.
    Shared(u64, u64, bool),
    Write(u64, u64, u8),
    Flush,
    Trim(u64, u64),
    Zeroes(u64, u64),
}

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => (0..=SIZE / BS).prop_map(|b| b * BS),           // block-aligned
        3 => 0..SIZE,                                        // anywhere
        2 => (0..BS + 100).prop_map(|d| SIZE.saturating_sub(d)), // near the end
        1 => SIZE..SIZE + 5000,                              // past the end
        1 => Just(u64::MAX - 10),                            // overflowing
    ]
}

fn length() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => (0..=4u64).prop_map(|n| n * BS),  // whole blocks (incl. 0)
        4 => 0..3 * BS,                        // anything
        1 => 1..64u64,                         // tiny
        1 => Just(SIZE),                       // whole device (in range only at 0)
    ]
}

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![
        4 => (offset(), length()).prop_map(|(o, l)| Act::Read(o, l)),
        2 => (offset(), length(), any::<bool>()).prop_map(|(o, l, k)| Act::Shared(o, l, k)),
        6 => (offset(), length(), any::<u8>()).prop_map(|(o, l, s)| Act::Write(o, l, s)),
        1 => Just(Act::Flush),
        2 => (offset(), length()).prop_map(|(o, l)| Act::Trim(o, l)),
        2 => (offset(), length()).prop_map(|(o, l)| Act::Zeroes(o, l)),
    ]
}

fn pattern(len: u64, seed: u8, off: u64) -> Vec<u8> {
    (0..len)
        .map(|i| ((off.wrapping_add(i) as u8).wrapping_mul(31) ^ seed) | 1)
        .collect()
}

fn in_range(off: u64, len: u64) -> bool {
    off.checked_add(len).is_some_and(|e| e <= SIZE)
}

fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Memory,
    Uring,
    Blocking,
    /// `Engine::Auto`, buffered: cached reads and small writes inline.
    Auto,
    Sparse,
}

struct Dut {
    p: Box<dyn Provider>,
    _dir: Option<tempfile::TempDir>,
    path: Option<std::path::PathBuf>,
}

fn make(kind: Kind) -> Dut {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dev");
    let p: Box<dyn Provider> = match kind {
        Kind::Memory => Box::new(MemoryStorage::with_chunk_size(SIZE, 8192)),
        Kind::Uring => Box::new(FileStorage::create(&path, SIZE, Engine::Uring).unwrap()),
        Kind::Blocking => Box::new(FileStorage::create(&path, SIZE, Engine::Blocking).unwrap()),
        Kind::Auto => Box::new(FileStorage::create(&path, SIZE, Engine::Auto).unwrap()),
        Kind::Sparse => Box::new(SparseFile::create(&path, SIZE, BS).unwrap()),
    };
    Dut {
        p,
        _dir: Some(dir),
        path: Some(path),
    }
}

fn reopen(kind: Kind, path: &std::path::Path) -> Option<Box<dyn Provider>> {
    match kind {
        Kind::Memory => None,
        Kind::Uring => Some(Box::new(FileStorage::open(path, Engine::Uring).unwrap())),
        Kind::Blocking => Some(Box::new(FileStorage::open(path, Engine::Blocking).unwrap())),
        Kind::Auto => Some(Box::new(FileStorage::open(path, Engine::Auto).unwrap())),
        Kind::Sparse => Some(Box::new(SparseFile::open(path).unwrap())),
    }
}

async fn whole(p: &dyn Provider) -> Vec<u8> {
    p.read_at(0, BytesMut::zeroed(SIZE as usize))
        .await
        .unwrap()
        .to_vec()
}

fn expect_oor<T: std::fmt::Debug>(
    r: silo_storage::Result<T>,
    what: &str,
) -> Result<(), TestCaseError> {
    match r {
        Err(e) if e.kind() == ErrorKind::OutOfRange => Ok(()),
        other => Err(TestCaseError::fail(format!(
            "{what}: expected OutOfRange, got {other:?}"
        ))),
    }
}

async fn run(kind: Kind, acts: Vec<Act>) -> Result<(), TestCaseError> {
    let dut = make(kind);
    let p = &*dut.p;
    let mut model = vec![0u8; SIZE as usize];
    // Pieces of shared reads still held, with what they read.
    let mut held: Vec<(String, Vec<Bytes>, Vec<u8>)> = Vec::new();
    prop_assert_eq!(p.size(), SIZE);
    for (i, a) in acts.iter().enumerate() {
        let ctx = format!("{kind:?} step {i}: {a:?}");
        match *a {
            Act::Read(o, l) => {
                let l = l.min(4 * SIZE);
                let r = p.read_at(o, BytesMut::zeroed(l as usize)).await;
                if in_range(o, l) {
                    let got = r.map_err(|e| TestCaseError::fail(format!("{ctx}: {e}")))?;
                    prop_assert_eq!(&got[..], &model[o as usize..(o + l) as usize], "{}", ctx);
                } else {
                    expect_oor(r, &ctx)?;
                }
            }
            Act::Shared(o, l, keep) => {
                let l = l.min(4 * SIZE);
                let r = p.read_shared(o, l as usize);
                if matches!(kind, Kind::Memory) {
                    // Memory lends whole chunks (its short last one
                    // included) and refuses out-of-range reads outright.
                    let whole = l > 0 && o % 8192 == 0 && ((o + l) % 8192 == 0 || o + l == SIZE);
                    prop_assert_eq!(r.is_err(), in_range(o, l) && !whole, "{}", ctx);
                }
                match r {
                    // Not shared (files never lend): nothing to check.
                    Err(NotShared) => {}
                    Ok(r) if in_range(o, l) => {
                        let pieces = r.map_err(|e| TestCaseError::fail(format!("{ctx}: {e}")))?;
                        let got: Vec<u8> = pieces.iter().flat_map(|b| b.iter().copied()).collect();
                        let want = &model[o as usize..(o + l) as usize];
                        prop_assert_eq!(&got[..], want, "{}", ctx);
                        if keep {
                            held.push((ctx, pieces, want.to_vec()));
                        }
                    }
                    Ok(r) => expect_oor(r, &ctx)?,
                }
            }
            Act::Write(o, l, s) => {
                let l = l.min(4 * SIZE);
                let data = pattern(l, s, o);
                let r = p.write_at(o, Bytes::from(data.clone())).await;
                if in_range(o, l) {
                    r.map_err(|e| TestCaseError::fail(format!("{ctx}: {e}")))?;
                    model[o as usize..(o + l) as usize].copy_from_slice(&data);
                } else {
                    expect_oor(r, &ctx)?;
                }
            }
            Act::Flush => p
                .flush()
                .await
                .map_err(|e| TestCaseError::fail(format!("{ctx}: {e}")))?,
            Act::Trim(o, l) | Act::Zeroes(o, l) => {
                let r = if matches!(a, Act::Trim(..)) {
                    p.trim(o, l).await
                } else {
                    p.write_zeroes(o, l).await
                };
                if in_range(o, l) {
                    r.map_err(|e| TestCaseError::fail(format!("{ctx}: {e}")))?;
                    model[o as usize..(o + l) as usize].fill(0);
                } else {
                    expect_oor(r, &ctx)?;
                }
            }
        }
    }
    // Later writes never changed what a shared read handed out.
    for (ctx, pieces, want) in &held {
        let got: Vec<u8> = pieces.iter().flat_map(|b| b.iter().copied()).collect();
        prop_assert!(&got == want, "{}: shared pieces changed later", ctx);
    }
    let got = whole(p).await;
    prop_assert!(
        got == model,
        "{:?}: final contents differ from the model",
        kind
    );
    p.close().await.unwrap();
    let closed = p.read_at(0, BytesMut::zeroed(1)).await;
    prop_assert!(
        matches!(&closed, Err(e) if e.kind() == ErrorKind::Closed) || matches!(kind, Kind::Memory),
        "{:?}",
        closed
    );
    if let Some(path) = &dut.path {
        if let Some(q) = reopen(kind, path) {
            prop_assert_eq!(q.size(), SIZE);
            let again = whole(&*q).await;
            prop_assert!(again == model, "{:?}: contents differ after reopen", kind);
        }
    }
    Ok(())
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 128,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn memory_matches_model(acts in prop::collection::vec(act(), 1..60)) {
        rt().block_on(run(Kind::Memory, acts))?;
    }

    #[test]
    fn file_uring_matches_model(acts in prop::collection::vec(act(), 1..60)) {
        rt().block_on(run(Kind::Uring, acts))?;
    }

    #[test]
    fn file_blocking_matches_model(acts in prop::collection::vec(act(), 1..60)) {
        rt().block_on(run(Kind::Blocking, acts))?;
    }

    #[test]
    fn file_auto_matches_model(acts in prop::collection::vec(act(), 1..60)) {
        rt().block_on(run(Kind::Auto, acts))?;
    }

    #[test]
    fn sparse_matches_model(acts in prop::collection::vec(act(), 1..60)) {
        rt().block_on(run(Kind::Sparse, acts))?;
    }
}
