//! Behaviour tests of the modules that a model test cannot express:
//! pausing, crash-like reopen, concurrency, error surfacing, record/replay.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rand::{Rng, SeedableRng};
use silo_storage::modules::{
    create_binlog_from_device, ArtificialLatency, Binlog, BinlogOptions, BinlogReplay,
    BlockSplitter, CopyOnWrite, CowConfig, CowPersist, Hooks, LatencyConfig, Lockable, Logger,
    Metrics, Raid, ReplaySpeed, Sharded, WriteCache, WriteCacheConfig,
};
use silo_storage::sources::{Engine, FileStorage, SparseFile};
use silo_storage::{DynProvider, Error, ErrorKind, MemoryStorage, Op, Provider, ProviderExt};

fn injected(off: u64) -> Error {
    Error::io(Op::Write, off, 0, std::io::Error::other("injected failure"))
}

async fn all(p: &dyn Provider) -> Vec<u8> {
    p.read_at(0, BytesMut::zeroed(p.size() as usize))
        .await
        .unwrap()
        .to_vec()
}

// ---------------------------------------------------------------- lockable

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockable_blocks_writers_until_unlock() {
    let mem = Arc::new(MemoryStorage::new(64 * 1024));
    let l = Arc::new(Lockable::new(mem.clone()));
    l.lock().await;
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..8u64 {
        let (l, done) = (l.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            l.write_slice(i * 1000, &[i as u8 + 1; 1000]).await.unwrap();
            done.fetch_add(1, Ordering::SeqCst);
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        done.load(Ordering::SeqCst),
        0,
        "a write passed a locked gate"
    );
    assert!(all(&*mem).await.iter().all(|&b| b == 0));
    l.unlock();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(done.load(Ordering::SeqCst), 8);
    assert_eq!(
        &mem.read_bytes(7000, 1000).await.unwrap()[..],
        &[8u8; 1000][..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_waits_for_in_flight_writes() {
    let mem = Arc::new(MemoryStorage::new(4096));
    let slow = Metrics::new(ArtificialLatency::new(
        mem.clone(),
        LatencyConfig {
            write: Duration::from_millis(150),
            ..LatencyConfig::default()
        },
    ));
    let counters = slow.metrics();
    let l = Arc::new(Lockable::new(slow));
    let w = tokio::spawn({
        let l = l.clone();
        async move { l.write_slice(0, &[7; 100]).await }
    });
    // Wait until the write is inside the gate (in flight below it).
    while counters.snapshot().write.in_flight == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    l.lock().await;
    // lock() returned: the in-flight write must have reached the memory.
    assert_eq!(&mem.read_bytes(0, 100).await.unwrap()[..], &[7; 100][..]);
    assert_eq!(counters.snapshot().write.ops, 1);
    w.await.unwrap().unwrap();
    l.unlock();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_write_lands_while_locked_under_churn() {
    let mem = Arc::new(MemoryStorage::new(256 * 1024));
    let l = Arc::new(Lockable::new(mem.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..4u64 {
        let (l, stop, writes) = (l.clone(), stop.clone(), writes.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(w);
            let mut n = 0u8;
            while !stop.load(Ordering::Relaxed) {
                n = n.wrapping_add(1);
                let off = rng.gen_range(0..255 * 1024);
                l.write_slice(off, &[n; 1024]).await.unwrap();
                writes.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        }));
    }
    for _ in 0..30 {
        l.lock().await;
        let before = all(&*mem).await;
        tokio::time::sleep(Duration::from_millis(3)).await;
        let after = all(&*mem).await;
        assert!(before == after, "the device changed while locked");
        l.unlock();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        writes.load(Ordering::Relaxed) > 30,
        "writers made no progress"
    );
}

/// A provider whose writes yield to the scheduler mid-way (so a task may
/// resume on the other worker and drop the lock's pass there) and that
/// counts writes in progress.
struct YieldingWrites {
    inner: MemoryStorage,
    active: AtomicUsize,
}

#[async_trait::async_trait]
impl Provider for YieldingWrites {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn capabilities(&self) -> silo_storage::Capabilities {
        self.inner.capabilities()
    }
    async fn read_at(&self, offset: u64, buf: BytesMut) -> silo_storage::Result<BytesMut> {
        self.inner.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: Bytes) -> silo_storage::Result<()> {
        self.active.fetch_add(1, Ordering::SeqCst);
        tokio::task::yield_now().await;
        let r = self.inner.write_at(offset, data).await;
        tokio::task::yield_now().await;
        self.active.fetch_sub(1, Ordering::SeqCst);
        r
    }
    async fn flush(&self) -> silo_storage::Result<()> {
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u64) -> silo_storage::Result<()> {
        self.inner.trim(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> silo_storage::Result<()> {
        self.inner.write_zeroes(offset, len).await
    }
    fn cancel_writes(&self, _offset: u64, _len: u64) {}
    async fn close(&self) -> silo_storage::Result<()> {
        Ok(())
    }
}

/// `lock` returns only when no write is inside, also when writes resume
/// on another thread than the one that entered the gate (their passes
/// leave from there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_drains_writes_that_moved_between_threads() {
    let inner = Arc::new(YieldingWrites {
        inner: MemoryStorage::new(64 * 1024),
        active: AtomicUsize::new(0),
    });
    let l = Arc::new(Lockable::new(inner.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..16u64 {
        let (l, stop) = (l.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                l.write_slice((w * 4096 + n) % 60_000, &[n as u8; 512])
                    .await
                    .unwrap();
            }
            n
        }));
    }
    for round in 0..100 {
        l.lock().await;
        for _ in 0..3 {
            assert_eq!(
                inner.active.load(Ordering::SeqCst),
                0,
                "round {round}: a write is inside a locked gate"
            );
            tokio::task::yield_now().await;
        }
        l.unlock();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert!(total > 100, "writers made no progress ({total})");
}

// ---------------------------------------------------------- copy-on-write

async fn patterned_base(dir: &std::path::Path, size: u64) -> (Arc<FileStorage>, Vec<u8>) {
    let base = FileStorage::create(dir.join("base.img"), size, Engine::Auto).unwrap();
    let data: Vec<u8> = (0..size).map(|i| (i % 249) as u8 + 1).collect();
    base.write_slice(0, &data).await.unwrap();
    base.flush().await.unwrap();
    (Arc::new(base), data)
}

#[tokio::test]
async fn cow_reopened_after_crash_like_drop_sees_flushed_writes() {
    const SIZE: u64 = 100_000; // not a multiple of the block size
    let dir = tempfile::tempdir().unwrap();
    let (base, mut model) = patterned_base(dir.path(), SIZE).await;
    let state = dir.path().join("cow.state");
    let cfg = CowConfig::new(4096).with_state_path(&state);
    let local_before;
    {
        let overlay = SparseFile::create(dir.path().join("overlay"), SIZE, 4096).unwrap();
        let cow = CopyOnWrite::open(base.clone(), overlay, cfg.clone())
            .await
            .unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..40 {
            let off = rng.gen_range(0..SIZE - 1);
            let len = rng.gen_range(1..6000).min(SIZE - off) as usize;
            let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            cow.write_slice(off, &data).await.unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
        // last partial block
        cow.write_slice(SIZE - 10, &[0xEE; 10]).await.unwrap();
        model[SIZE as usize - 10..].fill(0xEE);
        cow.flush().await.unwrap();
        local_before = cow.local_blocks();
        assert!(!local_before.is_empty());
        // dropped without close
    }
    let overlay = SparseFile::open(dir.path().join("overlay")).unwrap();
    let cow = CopyOnWrite::open(base.clone(), overlay, cfg).await.unwrap();
    assert_eq!(cow.local_blocks(), local_before);
    assert!(all(&cow).await == model, "reopened overlay lost writes");
    // The base file is untouched.
    let base_now = all(&*base).await;
    assert!(base_now
        .iter()
        .enumerate()
        .all(|(i, &b)| b == (i % 249) as u8 + 1));
    cow.close().await.unwrap();
}

#[tokio::test]
async fn cow_every_write_mode_survives_drop_without_flush() {
    const SIZE: u64 = 50_000;
    let dir = tempfile::tempdir().unwrap();
    let (base, mut model) = patterned_base(dir.path(), SIZE).await;
    let cfg = CowConfig::new(4096)
        .with_state_path(dir.path().join("cow.state"))
        .with_persist(CowPersist::EveryWrite);
    {
        let overlay = SparseFile::create(dir.path().join("overlay"), SIZE, 4096).unwrap();
        let cow = CopyOnWrite::open(base.clone(), overlay, cfg.clone())
            .await
            .unwrap();
        cow.write_slice(5000, &[9; 3000]).await.unwrap();
        model[5000..8000].fill(9);
    }
    let overlay = SparseFile::open(dir.path().join("overlay")).unwrap();
    let cow = CopyOnWrite::open(base, overlay, cfg).await.unwrap();
    assert_eq!(cow.local_blocks(), vec![1]);
    assert!(all(&cow).await == model);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cow_concurrent_partial_writes_to_fresh_blocks_are_all_kept() {
    // Many tasks write disjoint pieces of the same few blocks, none local yet:
    // the read-merge of one must not overwrite another's bytes.
    for round in 0..10u64 {
        let mem = Arc::new(MemoryStorage::new(4 * 4096));
        mem.write_slice(0, &[0x11; 4 * 4096]).await.unwrap();
        // Slow base reads so that read-merges really overlap in time.
        let base = ArtificialLatency::new(
            mem,
            LatencyConfig {
                read: Duration::from_millis(2),
                ..LatencyConfig::default()
            },
        );
        let overlay = Sharded::new(4 * 4096, 5000, |_, n| Ok(MemoryStorage::new(n))).unwrap();
        let cow = Arc::new(
            CopyOnWrite::open(base, overlay, CowConfig::new(4096))
                .await
                .unwrap(),
        );
        let mut model = vec![0x11u8; 4 * 4096];
        let mut tasks = Vec::new();
        for t in 0..32u64 {
            let off = t * 512 + round; // 512-byte pieces, unaligned in later rounds
            let len = 500usize;
            model[off as usize..off as usize + len].fill(t as u8 + 0x20);
            let cow = cow.clone();
            tasks.push(tokio::spawn(async move {
                cow.write_slice(off, &vec![t as u8 + 0x20; len])
                    .await
                    .unwrap()
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert!(
            all(&*cow).await == model,
            "round {round}: a concurrent write was lost"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_through_sharded_and_splitter() {
    const SIZE: u64 = 1 << 20;
    // Slow reads make the splitter's read-modify-writes overlap in time.
    let sharded = Sharded::new(SIZE, 100_000, |_, n| {
        Ok(ArtificialLatency::new(
            MemoryStorage::new(n),
            LatencyConfig {
                read: Duration::from_micros(200),
                ..LatencyConfig::default()
            },
        ))
    })
    .unwrap();
    let stack = Arc::new(BlockSplitter::new(sharded, 4096).unwrap());
    let mut tasks = Vec::new();
    // Each writer owns an interleaved set of 1000-byte slots (crossing block
    // and shard boundaries); overlapping in blocks but not in bytes.
    for w in 0..8u64 {
        let stack = stack.clone();
        tasks.push(tokio::spawn(async move {
            let mut slot = w;
            while (slot + 1) * 1000 <= SIZE {
                stack
                    .write_slice(slot * 1000, &[w as u8 + 1; 1000])
                    .await
                    .unwrap();
                slot += 8;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let content = all(&*stack).await;
    for (i, &b) in content.iter().enumerate() {
        let slot = i as u64 / 1000;
        let want = if (slot + 1) * 1000 <= SIZE {
            (slot % 8) as u8 + 1
        } else {
            0
        };
        assert_eq!(b, want, "byte {i}");
    }
}

// ------------------------------------------------------------------- raid

#[tokio::test]
async fn raid_detects_divergence_between_file_and_memory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mirror.img");
    let file: DynProvider = Arc::new(FileStorage::create(&path, 20_000, Engine::Auto).unwrap());
    let mem: DynProvider = Arc::new(MemoryStorage::new(20_000));
    let raid = Raid::new(vec![mem, file.clone()])
        .unwrap()
        .with_block_size(4096);
    raid.write_slice(0, &[3; 20_000]).await.unwrap();
    raid.flush().await.unwrap();
    assert_eq!(raid.read_bytes(0, 20_000).await.unwrap().len(), 20_000);
    // Change one byte of the file copy behind the raid's back.
    file.write_slice(12_345, &[4]).await.unwrap();
    let e = raid.read_bytes(8192, 8192).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(
        e.to_string().contains("12345") && e.to_string().contains("block 3"),
        "{e}"
    );
}

// ------------------------------------------------------------ write cache

#[tokio::test]
async fn write_cache_flush_error_surfaces_and_data_is_kept() {
    let mem = Arc::new(MemoryStorage::new(64 * 1024));
    let hooks = Arc::new(Hooks::new(mem.clone()));
    let fail = Arc::new(AtomicBool::new(true));
    let f2 = fail.clone();
    hooks.set_pre_write(Some(Arc::new(move |off, _d: &Bytes| {
        f2.load(Ordering::SeqCst).then(|| Err(injected(off)))
    })));
    let cache = WriteCache::new(
        hooks.clone(),
        WriteCacheConfig {
            block_size: 4096,
            min_data: 0,
            max_data: 1 << 20,
            flush_period: None,
        },
    )
    .unwrap();
    cache.write_slice(100, &[5; 9000]).await.unwrap();
    let e = cache.flush().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    // Nothing lost: still cached and readable.
    assert_eq!(cache.cached_bytes(), 9000);
    assert_eq!(
        &cache.read_bytes(100, 9000).await.unwrap()[..],
        &[5; 9000][..]
    );
    fail.store(false, Ordering::SeqCst);
    cache.flush().await.unwrap();
    assert_eq!(cache.cached_bytes(), 0);
    assert_eq!(
        &mem.read_bytes(100, 9000).await.unwrap()[..],
        &[5; 9000][..]
    );
}

#[tokio::test]
async fn write_cache_background_flush_error_reaches_next_call() {
    let mem = Arc::new(MemoryStorage::new(64 * 1024));
    let hooks = Arc::new(Hooks::new(mem.clone()));
    hooks.set_pre_write(Some(Arc::new(|off, _d: &Bytes| Some(Err(injected(off))))));
    let cache = WriteCache::new(
        hooks.clone(),
        WriteCacheConfig {
            block_size: 4096,
            min_data: 0,
            max_data: 1 << 20,
            flush_period: Some(Duration::from_millis(20)),
        },
    )
    .unwrap();
    cache.write_slice(0, &[1; 100]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await;
    let e = cache.write_slice(200, &[2; 100]).await.unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::Io,
        "background flush error was swallowed"
    );
    // Reported once; the rejected write was not applied, the first one is kept.
    hooks.clear();
    cache.write_slice(300, &[3; 100]).await.unwrap();
    cache.close().await.unwrap();
    let got = mem.read_bytes(0, 400).await.unwrap();
    assert_eq!(&got[..100], &[1; 100][..]);
    assert_eq!(&got[200..300], &[0; 100][..]);
    assert_eq!(&got[300..], &[3; 100][..]);
}

#[tokio::test]
async fn write_cache_close_reports_flush_failure() {
    let hooks = Arc::new(Hooks::new(MemoryStorage::new(8192)));
    hooks.set_pre_write(Some(Arc::new(|off, _d: &Bytes| Some(Err(injected(off))))));
    let cache = WriteCache::new(
        hooks,
        WriteCacheConfig {
            flush_period: None,
            ..WriteCacheConfig::new()
        },
    )
    .unwrap();
    cache.write_slice(0, &[1; 10]).await.unwrap();
    assert!(cache.close().await.is_err());
}

// ----------------------------------------------------------------- binlog

#[tokio::test]
async fn binlog_record_then_replay_reproduces_the_device() {
    const SIZE: u64 = 300_000;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("ops.binlog");
    let src = Arc::new(MemoryStorage::new(SIZE));
    let bl = Binlog::create(
        src.clone(),
        &log,
        BinlogOptions {
            log_reads: true,
            log_writes: true,
        },
    )
    .await
    .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    for i in 0..200 {
        let off = rng.gen_range(0..SIZE - 1);
        let len = rng.gen_range(1..20_000).min(SIZE - off);
        match i % 10 {
            0 => bl.trim(off, len).await.unwrap(),
            1 => bl.write_zeroes(off, len).await.unwrap(),
            2 => {
                bl.read_bytes(off, len as usize).await.unwrap();
            }
            3 => bl.flush().await.unwrap(),
            _ => {
                let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                bl.write_slice(off, &data).await.unwrap();
            }
        }
    }
    // Out-of-range operations fail and are not recorded.
    assert!(bl.write_slice(SIZE, &[1]).await.is_err());
    bl.close().await.unwrap();

    let dst = MemoryStorage::new(SIZE);
    let mut replay = BinlogReplay::open(&log).await.unwrap();
    assert_eq!(replay.size(), SIZE);
    let stats = replay
        .replay_all(&dst, ReplaySpeed::AsFastAsPossible)
        .await
        .unwrap();
    assert_eq!(stats.records, 200);
    assert_eq!(stats.reads, 20);
    assert!(
        all(&dst).await == all(&*src).await,
        "replay differs from the recorded device"
    );
}

#[tokio::test]
async fn binlog_replay_honours_recorded_and_scaled_timing() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("t.binlog");
    let bl = Binlog::create(MemoryStorage::new(4096), &log, BinlogOptions::default())
        .await
        .unwrap();
    for i in 0..4u8 {
        bl.write_slice(i as u64 * 10, &[i; 10]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    bl.close().await.unwrap();
    // Recorded: the last write is at >= 180 ms after the first.
    let t = Instant::now();
    BinlogReplay::open(&log)
        .await
        .unwrap()
        .replay_all(&MemoryStorage::new(4096), ReplaySpeed::Recorded)
        .await
        .unwrap();
    let recorded = t.elapsed();
    assert!(recorded >= Duration::from_millis(170), "{recorded:?}");
    let t = Instant::now();
    BinlogReplay::open(&log)
        .await
        .unwrap()
        .replay_all(&MemoryStorage::new(4096), ReplaySpeed::Scaled(0.1))
        .await
        .unwrap();
    let scaled = t.elapsed();
    assert!(
        scaled < recorded / 2,
        "scaled {scaled:?} vs recorded {recorded:?}"
    );
    assert!(scaled >= Duration::from_millis(17), "{scaled:?}");
}

#[tokio::test]
async fn create_binlog_from_device_skips_zero_blocks() {
    const SIZE: u64 = 10 * 4096 + 100;
    let dir = tempfile::tempdir().unwrap();
    let src = MemoryStorage::new(SIZE);
    src.write_slice(4096 * 2 + 7, &[1; 10]).await.unwrap();
    src.write_slice(4096 * 7, &[2; 4096]).await.unwrap();
    src.write_slice(SIZE - 5, &[3; 5]).await.unwrap();
    let log = dir.path().join("image.binlog");
    let bl = Binlog::create(MemoryStorage::new(SIZE), &log, BinlogOptions::default())
        .await
        .unwrap();
    let n = create_binlog_from_device(&src, &bl, 4096).await.unwrap();
    assert_eq!(n, 3);
    bl.close().await.unwrap();
    let dst = MemoryStorage::new(SIZE);
    let st = BinlogReplay::open(&log)
        .await
        .unwrap()
        .replay_all(&dst, ReplaySpeed::AsFastAsPossible)
        .await
        .unwrap();
    assert_eq!(st.writes, 3);
    assert!(all(&dst).await == all(&src).await);
}

#[tokio::test]
async fn damaged_binlogs_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("d.binlog");
    let bl = Binlog::create(MemoryStorage::new(8192), &log, BinlogOptions::default())
        .await
        .unwrap();
    bl.write_slice(0, &[1; 1000]).await.unwrap();
    bl.write_slice(5000, &[2; 1000]).await.unwrap();
    bl.close().await.unwrap();
    let good = std::fs::read(&log).unwrap();

    let check = |bytes: Vec<u8>, what: &'static str| {
        let log = log.clone();
        async move {
            std::fs::write(&log, bytes).unwrap();
            let r = match BinlogReplay::open(&log).await {
                Ok(mut rp) => rp
                    .replay_all(&MemoryStorage::new(8192), ReplaySpeed::AsFastAsPossible)
                    .await
                    .map(|_| ()),
                Err(e) => Err(e),
            };
            let e = r.expect_err(what);
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{what}: {e}");
        }
    };
    check(good[..good.len() - 10].to_vec(), "truncated data").await;
    check(good[..16 + 1025 + 5].to_vec(), "truncated header").await;
    let mut bad = good.clone();
    bad[0] = b'X';
    check(bad, "bad magic").await;
    let mut huge = good.clone();
    huge[16 + 17..16 + 25].copy_from_slice(&u64::MAX.to_le_bytes());
    check(huge, "huge length").await;
    let mut kind = good.clone();
    kind[16] = 99;
    check(kind, "unknown kind").await;
    check(good[..3].to_vec(), "short header").await;
}

#[tokio::test]
async fn binlog_write_failure_is_an_error() {
    if !std::path::Path::new("/dev/full").exists() {
        eprintln!("SKIPPED binlog_write_failure_is_an_error: /dev/full is missing");
        return;
    }
    let bl = Binlog::create(
        MemoryStorage::new(4 << 20),
        "/dev/full",
        BinlogOptions::default(),
    )
    .await
    .unwrap();
    // Larger than the log buffer, so the failing write happens now.
    let e = bl.write_slice(0, &vec![1u8; 3 << 20]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    assert!(e.to_string().contains("binlog"), "{e}");
}

// ----------------------------------------------------------- hooks, logger

#[tokio::test]
async fn hooks_inject_faults_below_a_stack() {
    let hooks = Arc::new(Hooks::new(MemoryStorage::new(16 * 1024)));
    // Fail every write that touches block 2.
    hooks.set_pre_write(Some(Arc::new(|off, d: &Bytes| {
        (off < 3 * 4096 && off + d.len() as u64 > 2 * 4096).then(|| Err(injected(off)))
    })));
    let stack = BlockSplitter::new(hooks.clone(), 4096).unwrap();
    stack.write_slice(0, &[1; 8192]).await.unwrap();
    let e = stack.write_slice(4000, &[1; 8192]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    hooks.set_pre_write(None);
    stack.write_slice(4000, &[1; 8192]).await.unwrap();
}

/// Counts `tracing` events (a minimal subscriber; the crate has no
/// tracing-subscriber dependency).
struct CountEvents(Arc<std::sync::Mutex<HashMap<String, usize>>>);

impl tracing::Subscriber for CountEvents {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, e: &tracing::Event<'_>) {
        struct V(String);
        impl tracing::field::Visit for V {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                if f.name() == "op" {
                    self.0 = format!("{v:?}");
                }
            }
        }
        if e.metadata().target().ends_with("logger") {
            let mut v = V(String::new());
            e.record(&mut v);
            *self.0.lock().unwrap().entry(v.0).or_default() += 1;
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn logger_emits_one_event_per_operation_and_can_be_switched_off() {
    let counts = Arc::new(std::sync::Mutex::new(HashMap::new()));
    let _g = tracing::subscriber::set_default(CountEvents(counts.clone()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let l = Logger::new(MemoryStorage::new(4096), "disk0");
        l.write_slice(0, &[1; 10]).await.unwrap();
        l.read_bytes(0, 10).await.unwrap();
        assert!(l.read_bytes(4090, 10).await.is_err());
        l.flush().await.unwrap();
        l.set_enabled(false);
        l.write_slice(0, &[1; 10]).await.unwrap();
        l.read_bytes(0, 10).await.unwrap();
    });
    let c = counts.lock().unwrap();
    assert_eq!(c.get("write"), Some(&1), "{c:?}");
    assert_eq!(c.get("read"), Some(&2), "{c:?}");
    assert_eq!(c.get("flush"), Some(&1), "{c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_cache_close_racing_writers_loses_no_acknowledged_write() {
    for round in 0..20u64 {
        let mem = Arc::new(MemoryStorage::new(1 << 20));
        let cache = Arc::new(
            WriteCache::new(
                mem.clone(),
                WriteCacheConfig {
                    block_size: 4096,
                    min_data: 16 << 10,
                    max_data: 64 << 10,
                    flush_period: Some(Duration::from_millis(1)),
                },
            )
            .unwrap(),
        );
        let mut tasks = Vec::new();
        for w in 0..4u64 {
            let cache = cache.clone();
            tasks.push(tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in 0..200u64 {
                    let off = (i * 4 + w) * 1000;
                    let v = (w as u8 + 1) ^ (round as u8);
                    match cache.write_slice(off, &[v; 1000]).await {
                        Ok(()) => acked.push((off, v)),
                        Err(e) => {
                            assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
                            break;
                        }
                    }
                    tokio::task::yield_now().await;
                }
                acked
            }));
        }
        tokio::time::sleep(Duration::from_millis(1 + round % 5)).await;
        cache.close().await.unwrap();
        for t in tasks {
            for (off, v) in t.await.unwrap() {
                assert_eq!(
                    &mem.read_bytes(off, 1000).await.unwrap()[..],
                    &[v; 1000][..],
                    "acknowledged write at {off} lost by close"
                );
            }
        }
    }
}
