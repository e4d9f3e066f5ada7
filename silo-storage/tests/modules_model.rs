//! Property tests: random sequences of reads, writes, flushes, trims and
//! write-zeroes (aligned, unaligned, touching the last partial block, and
//! out of range) through representative module stacks, compared with a
//! plain `Vec<u8>` model after every operation.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use silo_storage::modules::{
    BlockSplitter, CopyOnWrite, CowConfig, FilterRedundantWrites, Hooks, Lockable, Logger, Metrics,
    Raid, Sharded, WriteCache, WriteCacheConfig, WriteCombinator,
};
use silo_storage::{DynProvider, ErrorKind, MemoryStorage, Provider};

/// Not a multiple of any block size used below.
const SIZE: u64 = 13_000;

#[derive(Debug, Clone)]
enum Step {
    Write { offset: u64, len: usize, seed: u8 },
    Read { offset: u64, len: usize },
    Trim { offset: u64, len: u64 },
    Zero { offset: u64, len: u64 },
    Flush,
}

fn offset_len() -> impl Strategy<Value = (u64, usize)> {
    prop_oneof![
        // anywhere, including past the end
        (0..SIZE + 600, 0usize..3000),
        // block-aligned
        ((0..SIZE / 1024), 1usize..4).prop_map(|(b, n)| (b * 1024, n * 1024)),
        // the last partial block and just past it
        (SIZE - 1500..SIZE + 10, 0usize..1600),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        5 => (offset_len(), any::<u8>()).prop_map(|((offset, len), seed)| Step::Write { offset, len, seed }),
        4 => offset_len().prop_map(|(offset, len)| Step::Read { offset, len }),
        1 => offset_len().prop_map(|(offset, len)| Step::Trim { offset, len: len as u64 }),
        1 => offset_len().prop_map(|(offset, len)| Step::Zero { offset, len: len as u64 }),
        1 => Just(Step::Flush),
    ]
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

fn in_range(offset: u64, len: u64) -> bool {
    offset.checked_add(len).is_some_and(|e| e <= SIZE)
}

async fn run(
    p: &dyn Provider,
    mut model: Vec<u8>,
    steps: &[Step],
) -> Result<Vec<u8>, TestCaseError> {
    prop_assert_eq!(p.size(), SIZE);
    for (i, s) in steps.iter().enumerate() {
        match *s {
            Step::Write { offset, len, seed } => {
                let data = pattern(len, seed);
                let r = p.write_at(offset, Bytes::from(data.clone())).await;
                if in_range(offset, len as u64) {
                    prop_assert!(r.is_ok(), "step {}: {:?} failed: {:?}", i, s, r);
                    model[offset as usize..offset as usize + len].copy_from_slice(&data);
                } else {
                    prop_assert_eq!(r.unwrap_err().kind(), ErrorKind::OutOfRange);
                }
            }
            Step::Read { offset, len } => {
                let r = p.read_at(offset, BytesMut::zeroed(len)).await;
                if in_range(offset, len as u64) {
                    let got = r.map_err(|e| TestCaseError::fail(format!("step {i}: {e}")))?;
                    prop_assert!(
                        got[..] == model[offset as usize..offset as usize + len],
                        "step {}: read {:?} differs from the model",
                        i,
                        s
                    );
                } else {
                    prop_assert_eq!(r.unwrap_err().kind(), ErrorKind::OutOfRange);
                }
            }
            Step::Trim { offset, len } | Step::Zero { offset, len } => {
                let r = if matches!(s, Step::Trim { .. }) {
                    p.trim(offset, len).await
                } else {
                    p.write_zeroes(offset, len).await
                };
                if in_range(offset, len) {
                    prop_assert!(r.is_ok(), "step {}: {:?} failed: {:?}", i, s, r);
                    model[offset as usize..(offset + len) as usize].fill(0);
                } else {
                    prop_assert_eq!(r.unwrap_err().kind(), ErrorKind::OutOfRange);
                }
            }
            Step::Flush => {
                p.flush()
                    .await
                    .map_err(|e| TestCaseError::fail(format!("flush: {e}")))?;
            }
        }
    }
    // Whole device at the end.
    let all = p
        .read_at(0, BytesMut::zeroed(SIZE as usize))
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert!(all[..] == model[..], "final content differs from the model");
    Ok(model)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

fn mem() -> Arc<MemoryStorage> {
    Arc::new(MemoryStorage::with_chunk_size(SIZE, 4096))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// metrics → lockable → block splitter (512) → copy-on-write (1024) over a
    /// patterned memory base with a memory overlay.
    #[test]
    fn cow_stack_matches_model(steps in proptest::collection::vec(step(), 1..40)) {
        rt().block_on(async {
            let base = mem();
            let init = pattern(SIZE as usize, 7);
            base.write_at(0, Bytes::from(init.clone())).await.unwrap();
            let cow = CopyOnWrite::open(base.clone(), mem(), CowConfig::new(1024)).await.unwrap();
            let split = BlockSplitter::new(cow, 512).unwrap();
            let stack = Metrics::new(Lockable::new(split));
            run(&stack, init.clone(), &steps).await?;
            // The base is never written.
            let b = base.read_at(0, BytesMut::zeroed(SIZE as usize)).await.unwrap();
            prop_assert!(b[..] == init[..]);
            let snap = stack.snapshot();
            prop_assert_eq!(snap.read.in_flight + snap.write.in_flight, 0);
            Ok(())
        })?;
    }

    /// write cache → copy-on-write with a shared base: after switching the
    /// cache to write-through, every block the CoW reports as unrequired
    /// (identical to the base) really is identical to the base.
    #[test]
    fn cache_over_shared_cow_reports_only_unchanged_blocks(
        steps in proptest::collection::vec(step(), 1..40),
    ) {
        rt().block_on(async {
            let base = mem();
            let init = pattern(SIZE as usize, 11);
            base.write_at(0, Bytes::from(init.clone())).await.unwrap();
            let cow = CopyOnWrite::open(
                base,
                mem(),
                CowConfig::new(1024).with_shared_base(true),
            )
            .await
            .unwrap();
            let cache = WriteCache::new(cow, WriteCacheConfig {
                block_size: 1024,
                min_data: 2000,
                max_data: 6000,
                flush_period: None,
            })
            .unwrap();
            let model = run(&cache, init.clone(), &steps).await?;
            cache.set_write_through(true).await.unwrap();
            for b in cache.inner().unrequired_blocks() {
                let r = (b * 1024) as usize..((b + 1) * 1024).min(SIZE) as usize;
                prop_assert!(model[r.clone()] == init[r], "block {} reported unrequired but changed", b);
            }
            Ok(())
        })?;
    }

    /// sharded memory (shards of 3000 bytes, not a power of two).
    #[test]
    fn sharded_matches_model(steps in proptest::collection::vec(step(), 1..40)) {
        rt().block_on(async {
            let s = Sharded::new(SIZE, 3000, |_, n| Ok(MemoryStorage::new(n))).unwrap();
            run(&s, vec![0; SIZE as usize], &steps).await.map(|_| ())
        })?;
    }

    /// write cache with a tiny budget (constant eviction) over memory; the
    /// second half of the steps runs in write-through mode.
    #[test]
    fn write_cache_matches_model(
        steps in proptest::collection::vec(step(), 1..40),
        more in proptest::collection::vec(step(), 0..20),
    ) {
        rt().block_on(async {
            let inner = mem();
            let c = WriteCache::new(inner.clone(), WriteCacheConfig {
                block_size: 1024,
                min_data: 1000,
                max_data: 4000,
                flush_period: None,
            }).unwrap();
            let model = run(&c, vec![0; SIZE as usize], &steps).await?;
            c.set_write_through(true).await.unwrap();
            prop_assert_eq!(c.cached_bytes(), 0);
            run(&c, model, &more).await?;
            // After close everything is in the inner provider.
            let model = c.read_at(0, BytesMut::zeroed(SIZE as usize)).await.unwrap();
            c.close().await.unwrap();
            let below = inner.read_at(0, BytesMut::zeroed(SIZE as usize)).await.unwrap();
            prop_assert!(below[..] == model[..]);
            Ok(())
        })?;
    }

    /// filter-redundant-writes whose reference is the device itself, with
    /// allowance 0 and 3: the result must equal plain writes.
    #[test]
    fn filter_redundant_writes_matches_model(
        steps in proptest::collection::vec(step(), 1..40),
        allowance in prop_oneof![Just(0usize), Just(3usize)],
    ) {
        rt().block_on(async {
            let inner = mem();
            let init = pattern(SIZE as usize, 3);
            inner.write_at(0, Bytes::from(init.clone())).await.unwrap();
            let f = FilterRedundantWrites::new(inner.clone(), inner.clone(), allowance).unwrap();
            run(&f, init, &steps).await?;
            let st = f.stats();
            prop_assert!(st.bytes_written <= st.bytes_in);
            Ok(())
        })?;
    }

    /// logger → hooks → raid of two memories, through a single
    /// write-combinator input on one side.
    #[test]
    fn passthrough_stack_matches_model(steps in proptest::collection::vec(step(), 1..30)) {
        rt().block_on(async {
            let comb = WriteCombinator::new(mem() as DynProvider, 512).unwrap();
            let input: DynProvider = Arc::new(comb.add_input(1));
            let raid = Raid::new(vec![input, mem() as DynProvider]).unwrap();
            let stack = Logger::new(Hooks::new(raid), "model");
            stack.set_enabled(false);
            run(&stack, vec![0; SIZE as usize], &steps).await.map(|_| ())
        })?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Two write-combinator inputs (priorities 1 and 2) with unaligned writes,
    /// against a per-block priority model; the reported outcome must match.
    #[test]
    fn write_combinator_matches_priority_model(
        writes in proptest::collection::vec((any::<bool>(), 0..SIZE, 1usize..2500, any::<u8>()), 1..40),
    ) {
        rt().block_on(async {
            const BS: u64 = 1024;
            let comb = WriteCombinator::new(mem(), BS).unwrap();
            let inputs = [comb.add_input(1), comb.add_input(2)];
            let mut model = vec![0u8; SIZE as usize];
            let mut owner = vec![0u32; SIZE.div_ceil(BS) as usize];
            for (high, offset, len, seed) in writes {
                let len = len.min((SIZE - offset) as usize);
                let prio = if high { 2 } else { 1 };
                let data = pattern(len, seed);
                let out = inputs[high as usize]
                    .write_reporting(offset, Bytes::from(data.clone()))
                    .await
                    .unwrap();
                let (mut applied, mut dropped) = (0u64, 0u64);
                let mut pos = offset;
                while pos < offset + len as u64 {
                    let b = (pos / BS) as usize;
                    let end = ((b as u64 + 1) * BS).min(offset + len as u64);
                    if prio >= owner[b] {
                        owner[b] = prio;
                        let (s, e) = ((pos - offset) as usize, (end - offset) as usize);
                        model[pos as usize..end as usize].copy_from_slice(&data[s..e]);
                        applied += end - pos;
                    } else {
                        dropped += end - pos;
                    }
                    pos = end;
                }
                prop_assert_eq!((out.applied_bytes, out.dropped_bytes), (applied, dropped));
            }
            let all = comb.target().read_at(0, BytesMut::zeroed(SIZE as usize)).await.unwrap();
            prop_assert!(all[..] == model[..]);
            Ok(())
        })?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// Copy-on-write over real files (a file base, a sparse-file overlay, a
    /// state file): matches the model, and after flush + drop (no close) a
    /// reopened overlay still matches it.
    #[test]
    fn cow_on_files_matches_model_and_survives_reopen(
        steps in proptest::collection::vec(step(), 1..30),
    ) {
        use silo_storage::sources::{Engine, FileStorage, SparseFile};
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let base = Arc::new(FileStorage::create(dir.path().join("base"), SIZE, Engine::Auto).unwrap());
            let init = pattern(SIZE as usize, 5);
            base.write_at(0, Bytes::from(init.clone())).await.unwrap();
            let cfg = CowConfig::new(1024).with_state_path(dir.path().join("state"));
            let model = {
                let overlay = SparseFile::create(dir.path().join("overlay"), SIZE, 1024).unwrap();
                let cow = CopyOnWrite::open(base.clone(), overlay, cfg.clone()).await.unwrap();
                let model = run(&cow, init, &steps).await?;
                cow.flush().await.unwrap();
                model
            };
            let overlay = SparseFile::open(dir.path().join("overlay")).unwrap();
            let cow = CopyOnWrite::open(base, overlay, cfg).await.unwrap();
            let all = cow.read_at(0, BytesMut::zeroed(SIZE as usize)).await.unwrap();
            prop_assert!(all[..] == model[..], "reopened overlay differs from the model");
            cow.close().await.unwrap();
            Ok(())
        })?;
    }
}
