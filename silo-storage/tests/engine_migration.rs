//! Migration engine tests with real concurrency: migrations under random
//! writers ending in a locked final round with equal SHA-256, lazy fetch
//! through the waiting cache with priority, errors, cancellation, odd
//! sizes, the waiting cache's rules and the syncer's safe-block map.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use rand::{rngs::StdRng, Rng, SeedableRng};
use sha2::{Digest, Sha256};
use silo_storage::dirty::{dirty_tracker, DirtySource};
use silo_storage::migrator::{BlockEvent, Concurrency, LockHandler, Migrator, MigratorConfig};
use silo_storage::modules::lockable::Lockable;
use silo_storage::order::{AnyOrder, BlockKind, BlockOrder, PriorityOrder};
use silo_storage::sources::{Engine, FileStorage};
use silo_storage::syncer::{Syncer, SyncerConfig};
use silo_storage::volatility::VolatilityMonitor;
use silo_storage::waiting::{waiting_cache, WaitingConfig};
use silo_storage::{
    Capabilities, DynProvider, Error, ErrorKind, MemoryStorage, Op, Provider, ProviderExt, Result,
};
use tokio::sync::{OwnedRwLockWriteGuard, RwLock};

const BS: u64 = 4096;

// ---------------------------------------------------------------- helpers

/// SHA-256 of a whole provider.
async fn sha(p: &dyn Provider) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut off = 0;
    while off < p.size() {
        let n = (p.size() - off).min(1 << 20) as usize;
        h.update(p.read_bytes(off, n).await.unwrap());
        off += n as u64;
    }
    h.finalize().into()
}

async fn random_fill(p: &dyn Provider, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; p.size() as usize];
    rng.fill(&mut data[..]);
    p.write_at(0, Bytes::from(data)).await.unwrap();
}

/// A lockable gate in front of the application's writes: writes hold a
/// shared guard for their whole duration, `lock` takes the exclusive guard
/// (waiting for in-flight writes to drain).
struct Gate {
    inner: DynProvider,
    lock: Arc<RwLock<()>>,
    held: Mutex<Option<OwnedRwLockWriteGuard<()>>>,
}

impl Gate {
    fn new(inner: DynProvider) -> Arc<Self> {
        Arc::new(Gate {
            inner,
            lock: Arc::new(RwLock::new(())),
            held: Mutex::new(None),
        })
    }
    async fn close_gate(&self) {
        if self.held.lock().is_some() {
            return;
        }
        let g = self.lock.clone().write_owned().await;
        *self.held.lock() = Some(g);
    }
    fn open_gate(&self) {
        self.held.lock().take();
    }
}

#[async_trait]
impl Provider for Gate {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn read_at(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        self.inner.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: Bytes) -> Result<()> {
        let _g = self.lock.read().await;
        self.inner.write_at(offset, data).await
    }
    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        let _g = self.lock.read().await;
        self.inner.trim(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let _g = self.lock.read().await;
        self.inner.write_zeroes(offset, len).await
    }
    fn cancel_writes(&self, offset: u64, len: u64) {
        self.inner.cancel_writes(offset, len)
    }
    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

/// A destination wrapper adding latency to writes and failing chosen
/// blocks a number of times (`u32::MAX` = always).
struct Faulty {
    inner: DynProvider,
    delay: Duration,
    fail: Mutex<Vec<(u64, u32)>>,
    writes: AtomicU64,
}

impl Faulty {
    fn new(inner: DynProvider, delay: Duration) -> Arc<Self> {
        Arc::new(Faulty {
            inner,
            delay,
            fail: Mutex::new(Vec::new()),
            writes: AtomicU64::new(0),
        })
    }
    fn fail_block(&self, block: u64, times: u32) {
        self.fail.lock().push((block, times));
    }
}

#[async_trait]
impl Provider for Faulty {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn read_at(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        self.inner.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: Bytes) -> Result<()> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        self.writes.fetch_add(1, Ordering::Relaxed);
        let b = offset / BS;
        {
            let mut f = self.fail.lock();
            if let Some(e) = f.iter_mut().find(|e| e.0 == b && e.1 > 0) {
                if e.1 != u32::MAX {
                    e.1 -= 1;
                }
                return Err(Error::io(
                    Op::Write,
                    offset,
                    data.len() as u64,
                    std::io::Error::other("injected failure"),
                ));
            }
        }
        self.inner.write_at(offset, data).await
    }
    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.trim(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.write_zeroes(offset, len).await
    }
    fn cancel_writes(&self, offset: u64, len: u64) {
        self.inner.cancel_writes(offset, len)
    }
    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

fn cfg() -> MigratorConfig {
    MigratorConfig::new(BS)
        .with_concurrency(Concurrency {
            standard: 8,
            dirty: 8,
            priority: 4,
        })
        .with_retries(2, Duration::from_millis(1))
}

// ------------------------------------------- migration under random writers

/// Pauses the application's writes for the final round.
#[async_trait]
trait WriterLock: Send + Sync {
    async fn close(&self);
    fn open(&self);
}

#[async_trait]
impl WriterLock for Gate {
    async fn close(&self) {
        self.close_gate().await
    }
    fn open(&self) {
        self.open_gate()
    }
}

#[async_trait]
impl WriterLock for Lockable<DynProvider> {
    async fn close(&self) {
        self.lock().await
    }
    fn open(&self) {
        self.unlock()
    }
}

type MakeLock = fn(DynProvider) -> (DynProvider, Arc<dyn WriterLock>);

fn test_gate(p: DynProvider) -> (DynProvider, Arc<dyn WriterLock>) {
    let g = Gate::new(p);
    (g.clone(), g)
}

fn real_lockable(p: DynProvider) -> (DynProvider, Arc<dyn WriterLock>) {
    let l = Arc::new(Lockable::new(p));
    (l.clone(), l)
}

/// The full source stack of a device: app → lock → volatility → dirty
/// tracker → base; the migrator reads the tracker's remote side in
/// priority-then-volatility order.
async fn migrate_with_writers(
    base: DynProvider,
    dest: DynProvider,
    seed: u64,
    make_lock: MakeLock,
) {
    random_fill(&*base, seed).await;
    let (local, remote) = dirty_tracker(base.clone(), BS).unwrap();
    let vol =
        Arc::new(VolatilityMonitor::new(Arc::new(local), BS, Duration::from_secs(60)).unwrap());
    let (gate, gate_ctl) = make_lock(vol.clone());
    let order = Arc::new(PriorityOrder::new(vol.clone()));
    order.add_all();
    let m = Migrator::new(Arc::new(remote.clone()), dest.clone(), order, cfg()).unwrap();
    m.set_dirty_source(Arc::new(remote.clone()));
    // The caller decides when to stop unlocking (the writer is paused for
    // cut-over); until then each snapshot briefly locks the writers.
    let hold = Arc::new(AtomicBool::new(false));
    let (g1, g2, h2) = (gate_ctl.clone(), gate_ctl.clone(), hold.clone());
    let lock: LockHandler = Arc::new(move || {
        let g = g1.clone();
        Box::pin(async move { g.close().await })
    });
    let unlock: LockHandler = Arc::new(move || {
        let g = g2.clone();
        let hold = h2.load(Ordering::SeqCst);
        Box::pin(async move {
            if !hold {
                g.open()
            }
        })
    });
    m.set_lock_handlers(lock, unlock);

    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let size = base.size();
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let (gate, stop, writes) = (gate.clone(), stop.clone(), writes.clone());
            tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(seed * 100 + w);
                while !stop.load(Ordering::SeqCst) {
                    let len = rng.gen_range(1..3 * BS);
                    let off = rng.gen_range(0..size - len);
                    let mut d = vec![0u8; len as usize];
                    rng.fill(&mut d[..]);
                    gate.write_at(off, Bytes::from(d)).await.unwrap();
                    writes.fetch_add(1, Ordering::Relaxed);
                    if rng.gen_bool(0.3) {
                        tokio::time::sleep(Duration::from_micros(200)).await;
                    } else {
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();

    // Let the writers get going (the machine may be busy), then migrate
    // while they keep writing.
    for _ in 0..1000 {
        if writes.load(Ordering::Relaxed) >= 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let before = writes.load(Ordering::Relaxed);
    m.migrate_all().await.unwrap();
    let mut rounds = 0;
    let mut resent = 0;
    loop {
        m.wait_for_completion().await.unwrap();
        rounds += 1;
        if rounds == 4 {
            // Cut-over: from the next snapshot on the writers stay paused,
            // while they are still writing at full speed right now.
            hold.store(true, Ordering::SeqCst);
        }
        match m.get_latest_dirty().await.unwrap() {
            None => break,
            Some(blocks) => {
                resent += blocks.len();
                m.migrate_dirty(&blocks).await.unwrap();
            }
        }
        assert!(rounds < 50, "did not converge");
    }
    assert!(m.is_locked());
    // Not vacuous: the writers ran during the migration and the dirty
    // rounds had work to do.
    assert!(before >= 20, "writers did not start");
    assert!(
        writes.load(Ordering::Relaxed) > before,
        "no write raced the migration"
    );
    assert!(resent > 0, "no dirty block was ever re-sent");
    assert_eq!(
        sha(&*base).await,
        sha(&*dest).await,
        "seed {seed}: destination differs after the locked final round"
    );
    let p = m.progress();
    assert_eq!(p.migrated_blocks, p.total_blocks);
    assert_eq!(p.ready_blocks, p.total_blocks);
    stop.store(true, Ordering::SeqCst);
    m.unlock().await;
    gate_ctl.open();
    for w in writers {
        w.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migration_under_random_writers_memory() {
    for seed in 1..=4 {
        let base: DynProvider = Arc::new(MemoryStorage::new(2 * 1024 * 1024));
        let dest: DynProvider = Arc::new(MemoryStorage::new(2 * 1024 * 1024));
        migrate_with_writers(base, dest, seed, test_gate).await;
    }
}

/// The same over real files (io_uring when available) with the modules'
/// real `Lockable` pausing the writers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migration_under_random_writers_file() {
    let dir = tempfile::tempdir().unwrap();
    for seed in 11..=13 {
        let size = 2 * 1024 * 1024 + 123;
        let base: DynProvider = Arc::new(
            FileStorage::create(dir.path().join(format!("src{seed}")), size, Engine::Auto).unwrap(),
        );
        let dest: DynProvider = Arc::new(
            FileStorage::create(dir.path().join(format!("dst{seed}")), size, Engine::Auto).unwrap(),
        );
        migrate_with_writers(base.clone(), dest.clone(), seed, real_lockable).await;
        base.close().await.unwrap();
        dest.close().await.unwrap();
    }
}

// -------------------------------------------- lazy fetch with priority

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn destination_read_gets_source_data_with_priority() {
    let n = 512u64;
    let src: DynProvider = Arc::new(MemoryStorage::new(n * BS));
    random_fill(&*src, 7).await;
    let (local, remote) = waiting_cache(
        Arc::new(MemoryStorage::new(n * BS)),
        BS,
        WaitingConfig::default().with_timeout(Some(Duration::from_secs(20))),
    )
    .unwrap();
    // A slow link: 1 ms per block, 2 standard blocks at a time.
    let dest = Faulty::new(Arc::new(remote.clone()), Duration::from_millis(1));
    let order = Arc::new(PriorityOrder::new(Arc::new(AnyOrder::new(n))));
    order.add_all();
    let m = Migrator::new(
        src.clone(),
        dest,
        order,
        MigratorConfig::new(BS).with_concurrency(Concurrency {
            standard: 2,
            dirty: 2,
            priority: 2,
        }),
    )
    .unwrap();
    let events: Arc<Mutex<Vec<BlockEvent>>> = Arc::default();
    let ev = events.clone();
    m.set_block_observer(Arc::new(move |e| ev.lock().push(*e)));
    let needs = Arc::new(Mutex::new(Vec::new()));
    let (m2, n2) = (m.clone(), needs.clone());
    local.set_need_handler(Arc::new(move |off, len| {
        n2.lock().push((off, len));
        m2.need_at(off, len);
    }));
    let m3 = m.clone();
    local.set_dont_need_handler(Arc::new(move |off, len| m3.dont_need_at(off, len)));

    let mig = {
        let m = m.clone();
        tokio::spawn(async move { m.migrate_all().await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let done_before_read = events.lock().len();
    assert!(done_before_read < 300, "the link is too fast for this test");
    // A local full-block write: the destination owns block 500 now.
    let mine = Bytes::from(vec![0xAB; BS as usize]);
    local.write_at(500 * BS, mine.clone()).await.unwrap();
    // Two concurrent readers of block 400 and one of 401..=402.
    let r1 = local.read_bytes(400 * BS + 10, 100);
    let r2 = local.read_bytes(400 * BS, BS as usize);
    let r3 = local.read_bytes(401 * BS, 2 * BS as usize);
    let (a, b, c) = tokio::join!(r1, r2, r3);
    assert_eq!(
        a.unwrap(),
        src.read_bytes(400 * BS + 10, 100).await.unwrap()
    );
    assert_eq!(
        b.unwrap(),
        src.read_bytes(400 * BS, BS as usize).await.unwrap()
    );
    assert_eq!(
        c.unwrap(),
        src.read_bytes(401 * BS, 2 * BS as usize).await.unwrap()
    );

    mig.await.unwrap().unwrap();
    // One need per block, not per reader.
    let mut need_blocks: Vec<u64> = needs.lock().iter().map(|&(o, _)| o / BS).collect();
    need_blocks.sort_unstable();
    assert_eq!(need_blocks, vec![400, 401, 402]);
    // Ordering: the requested blocks went out as Priority, long before the
    // ascending pass would have reached them.
    let ev = events.lock().clone();
    for want in [400u64, 401, 402] {
        let pos = ev.iter().position(|e| e.block == want && e.ok).unwrap();
        assert_eq!(ev[pos].kind, BlockKind::Priority);
        assert!(
            pos < done_before_read + 16,
            "block {want} completed at position {pos}, {done_before_read} were done when it was requested"
        );
        assert!(
            pos < 300,
            "block {want} was not prioritised (position {pos})"
        );
    }
    // Block 500 was not sent, and the local data won.
    assert!(!ev.iter().any(|e| e.block == 500));
    assert_eq!(m.progress().skipped_blocks, 1);
    assert_eq!(local.read_bytes(500 * BS, BS as usize).await.unwrap(), mine);
    assert!(local.is_complete());
    // Everything else equals the source.
    for blk in (0..n).filter(|&b| b != 500) {
        assert_eq!(
            local.read_bytes(blk * BS, BS as usize).await.unwrap(),
            src.read_bytes(blk * BS, BS as usize).await.unwrap(),
            "block {blk}"
        );
    }
}

// ------------------------------------------------ errors and cancellation

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_destination_errors_are_retried() {
    let n = 64u64;
    let src: DynProvider = Arc::new(MemoryStorage::new(n * BS));
    random_fill(&*src, 3).await;
    let dest = Faulty::new(Arc::new(MemoryStorage::new(n * BS)), Duration::ZERO);
    dest.fail_block(5, 2);
    let order = Arc::new(AnyOrder::new(n));
    order.add_all();
    let m = Migrator::new(src.clone(), dest.clone(), order, cfg()).unwrap();
    let errs = Arc::new(AtomicUsize::new(0));
    let e2 = errs.clone();
    let failed_blocks = Arc::new(Mutex::new(Vec::new()));
    let f2 = failed_blocks.clone();
    m.set_error_handler(Arc::new(move |b, _| {
        f2.lock().push(b);
        e2.fetch_add(1, Ordering::SeqCst);
    }));
    m.migrate_all().await.unwrap();
    assert_eq!(errs.load(Ordering::SeqCst), 2);
    assert_eq!(*failed_blocks.lock(), vec![5, 5]);
    assert_eq!(m.progress().retries, 2);
    assert_eq!(sha(&*src).await, sha(&*dest).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_destination_error_surfaces_without_hang() {
    let n = 256u64;
    let src: DynProvider = Arc::new(MemoryStorage::new(n * BS));
    let dest = Faulty::new(Arc::new(MemoryStorage::new(n * BS)), Duration::ZERO);
    dest.fail_block(17, u32::MAX);
    let order = Arc::new(AnyOrder::new(n));
    order.add_all();
    let m = Migrator::new(src, dest, order, cfg()).unwrap();
    let errs = Arc::new(AtomicUsize::new(0));
    let e2 = errs.clone();
    m.set_error_handler(Arc::new(move |_, _| {
        e2.fetch_add(1, Ordering::SeqCst);
    }));
    let r = tokio::time::timeout(Duration::from_secs(10), m.migrate_all())
        .await
        .expect("migrate_all hung");
    let e = r.expect_err("a failing destination must fail the migration");
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert!(e.to_string().contains("injected failure"), "{e}");
    assert_eq!(errs.load(Ordering::SeqCst), 3, "1 attempt + 2 retries");
    // Later calls keep reporting it.
    assert!(m.wait_for_completion().await.is_err());
    assert!(m.migrate(1).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_stops_promptly() {
    let n = 4096u64;
    let src: DynProvider = Arc::new(MemoryStorage::new(n * BS));
    let dest = Faulty::new(
        Arc::new(MemoryStorage::new(n * BS)),
        Duration::from_millis(50),
    );
    let order = Arc::new(AnyOrder::new(n));
    order.add_all();
    let m = Migrator::new(src, dest.clone(), order, cfg()).unwrap();
    let task = {
        let m = m.clone();
        tokio::spawn(async move { m.migrate_all().await })
    };
    tokio::time::sleep(Duration::from_millis(120)).await;
    let t0 = std::time::Instant::now();
    m.cancel();
    let r = tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("cancel did not stop the migration")
        .unwrap();
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(r.unwrap_err().kind(), ErrorKind::Cancelled);
    assert_eq!(m.progress().active_blocks, 0);
    let sent = dest.writes.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        dest.writes.load(Ordering::Relaxed),
        sent,
        "writes after cancel"
    );
    assert!(sent < n / 2);
}

// -------------------------------------------------------------- odd sizes

#[tokio::test]
async fn empty_and_odd_sized_devices() {
    for size in [0u64, 1, 4095, 4097, 1_234_567] {
        let src: DynProvider = Arc::new(MemoryStorage::new(size));
        random_fill(&*src, size).await;
        let dest: DynProvider = Arc::new(MemoryStorage::new(size));
        let (local, remote) = dirty_tracker(src.clone(), BS).unwrap();
        let order = Arc::new(AnyOrder::new(remote.layout().num_blocks()));
        order.add_all();
        let m = Migrator::new(Arc::new(remote.clone()), dest.clone(), order, cfg()).unwrap();
        m.set_dirty_source(Arc::new(remote.clone()));
        let last = Arc::new(Mutex::new(None));
        let l2 = last.clone();
        m.set_progress_handler(Arc::new(move |p| *l2.lock() = Some(*p)));
        m.migrate_all().await.unwrap();
        if size > 10 {
            local.write_slice(size - 10, &[9u8; 10]).await.unwrap();
        }
        while let Some(d) = m.get_latest_dirty().await.unwrap() {
            m.migrate_dirty(&d).await.unwrap();
            m.wait_for_completion().await.unwrap();
        }
        assert_eq!(sha(&*src).await, sha(&*dest).await, "size {size}");
        let p = last.lock().expect("progress reported");
        assert_eq!(p.total_blocks, size.div_ceil(BS));
        assert_eq!(p.ready_blocks, p.total_blocks);
        assert!(p.bytes_per_sec.is_finite());
        assert!(p.bytes_sent >= size, "{p:?}");
    }
}

#[tokio::test]
async fn size_mismatch_is_an_error() {
    let src: DynProvider = Arc::new(MemoryStorage::new(8192));
    let dest: DynProvider = Arc::new(MemoryStorage::new(4096));
    let r = Migrator::new(src, dest, Arc::new(AnyOrder::new(2)), cfg());
    assert_eq!(r.unwrap_err().kind(), ErrorKind::Invalid);
}

// ------------------------------------------------------- dirty dedupe

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_dirty_dedupes_without_dropping_the_rest() {
    let n = 16u64;
    let src: DynProvider = Arc::new(MemoryStorage::new(n * BS));
    random_fill(&*src, 11).await;
    let dest = Faulty::new(
        Arc::new(MemoryStorage::new(n * BS)),
        Duration::from_millis(5),
    );
    let m = Migrator::new(
        src.clone(),
        dest.clone(),
        Arc::new(AnyOrder::new(n)),
        cfg().with_concurrency(Concurrency {
            standard: 1,
            dirty: 1,
            priority: 1,
        }),
    )
    .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    m.set_block_observer(Arc::new(move |e| s2.lock().push(e.block)));
    let sent = m.migrate_dirty(&[3, 3, 5, 3, 7, 9, 9, 12]).await.unwrap();
    m.wait_for_completion().await.unwrap();
    let got: HashSet<u64> = seen.lock().iter().copied().collect();
    assert_eq!(got, HashSet::from([3, 5, 7, 9, 12]));
    assert!((5..=8).contains(&sent), "{sent}");
    for b in [3u64, 5, 7, 9, 12] {
        assert_eq!(
            dest.read_bytes(b * BS, BS as usize).await.unwrap(),
            src.read_bytes(b * BS, BS as usize).await.unwrap()
        );
    }
}

// -------------------------------------------------------- waiting cache

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_cache_wait_need_once_and_wake() {
    let (local, remote) = waiting_cache(
        Arc::new(MemoryStorage::new(8 * BS)),
        BS,
        WaitingConfig::default(),
    )
    .unwrap();
    let needs = Arc::new(Mutex::new(Vec::new()));
    let n2 = needs.clone();
    local.set_need_handler(Arc::new(move |o, l| n2.lock().push((o, l))));
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let l = local.clone();
            tokio::spawn(async move { l.read_bytes(2 * BS + 1, 10).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        readers.iter().all(|r| !r.is_finished()),
        "readers must wait"
    );
    assert_eq!(*needs.lock(), vec![(2 * BS, BS)]);
    // A partial remote write does not make the block present.
    remote.write_slice(2 * BS, &[5u8; 100]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(readers.iter().all(|r| !r.is_finished()));
    remote
        .write_slice(2 * BS, &[7u8; BS as usize])
        .await
        .unwrap();
    for r in readers {
        let got = tokio::time::timeout(Duration::from_secs(5), r)
            .await
            .expect("reader not woken")
            .unwrap()
            .unwrap();
        assert_eq!(&got[..], &[7u8; 10]);
    }
    // Present now: no wait, no new need.
    local.read_bytes(2 * BS, 10).await.unwrap();
    assert_eq!(needs.lock().len(), 1);
    // Dirtied: waits and needs again.
    remote.dirty(&[2]);
    let l = local.clone();
    let r = tokio::spawn(async move { l.read_bytes(2 * BS, 10).await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(needs.lock().len(), 2);
    remote.mark_present(2..3);
    assert_eq!(r.await.unwrap().unwrap().len(), 10);
    assert_eq!(local.metrics().needs, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_cache_local_write_wins_and_wakes() {
    let (local, remote) = waiting_cache(
        Arc::new(MemoryStorage::new(8 * BS)),
        BS,
        WaitingConfig::default(),
    )
    .unwrap();
    let dont = Arc::new(Mutex::new(Vec::new()));
    let d2 = dont.clone();
    local.set_dont_need_handler(Arc::new(move |o, l| d2.lock().push((o, l))));
    let l = local.clone();
    let reader = tokio::spawn(async move { l.read_bytes(3 * BS, BS as usize).await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    local
        .write_slice(3 * BS, &[1u8; 2 * BS as usize])
        .await
        .unwrap();
    assert_eq!(&reader.await.unwrap().unwrap()[..], &[1u8; BS as usize][..]);
    assert_eq!(*dont.lock(), vec![(3 * BS, 2 * BS)]);
    // A later remote write of those blocks does not overwrite them, but
    // still lands on the neighbours.
    remote
        .write_slice(2 * BS, &[9u8; 4 * BS as usize])
        .await
        .unwrap();
    assert_eq!(
        &local.read_bytes(3 * BS, 2 * BS as usize).await.unwrap()[..],
        &[1u8; 2 * BS as usize][..]
    );
    assert_eq!(
        &local.read_bytes(2 * BS, BS as usize).await.unwrap()[..],
        &[9u8; BS as usize][..]
    );
    assert_eq!(
        &local.read_bytes(5 * BS, BS as usize).await.unwrap()[..],
        &[9u8; BS as usize][..]
    );
    // A partial local write to a missing block waits for it first.
    let l = local.clone();
    let w = tokio::spawn(async move { l.write_slice(7 * BS + 5, &[4u8; 10]).await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!w.is_finished());
    remote
        .write_slice(7 * BS, &[8u8; BS as usize])
        .await
        .unwrap();
    w.await.unwrap().unwrap();
    let b7 = local.read_bytes(7 * BS, BS as usize).await.unwrap();
    assert_eq!(&b7[..5], &[8u8; 5]);
    assert_eq!(&b7[5..15], &[4u8; 10]);
    assert_eq!(&b7[15..], &[8u8; BS as usize - 15][..]);
    // ... and the partially written block is the destination's now.
    remote
        .write_slice(7 * BS, &[6u8; BS as usize])
        .await
        .unwrap();
    assert_eq!(local.read_bytes(7 * BS, BS as usize).await.unwrap(), b7);
}

/// Local and remote writes of the same blocks race: after both finished,
/// every block the local side wrote holds the local data.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiting_cache_local_wins_under_concurrency() {
    for round in 0..20u8 {
        let n = 64u64;
        let (local, remote) = waiting_cache(
            Arc::new(MemoryStorage::new(n * BS)),
            BS,
            WaitingConfig::default(),
        )
        .unwrap();
        let rem = tokio::spawn({
            let remote = remote.clone();
            async move {
                for _ in 0..3 {
                    for b in 0..n {
                        remote
                            .write_slice(b * BS, &[0xEE; BS as usize])
                            .await
                            .unwrap();
                    }
                }
            }
        });
        let loc = tokio::spawn({
            let local = local.clone();
            async move {
                for b in (0..n).step_by(2) {
                    local
                        .write_slice(b * BS, &[round; BS as usize])
                        .await
                        .unwrap();
                    tokio::task::yield_now().await;
                }
            }
        });
        rem.await.unwrap();
        loc.await.unwrap();
        for b in 0..n {
            let want = if b % 2 == 0 { round } else { 0xEE };
            let got = local.read_bytes(b * BS, BS as usize).await.unwrap();
            assert!(got.iter().all(|&x| x == want), "round {round} block {b}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_cache_fail_all_and_timeout() {
    let (local, remote) = waiting_cache(
        Arc::new(MemoryStorage::new(8 * BS)),
        BS,
        WaitingConfig::default(),
    )
    .unwrap();
    let readers: Vec<_> = (0..3u64)
        .map(|i| {
            let l = local.clone();
            tokio::spawn(async move { l.read_bytes(i * BS, 10).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    local.fail_all(Error::remote(
        "migration connection",
        std::io::Error::other("reset"),
    ));
    for r in readers {
        let e = tokio::time::timeout(Duration::from_secs(5), r)
            .await
            .expect("waiter not woken by fail_all")
            .unwrap()
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Remote);
    }
    // Later waits fail at once; present blocks still read.
    assert!(local.read_bytes(5 * BS, 1).await.is_err());
    remote.mark_present(5..6);
    local.read_bytes(5 * BS, 1).await.unwrap();
    local.clear_failure();

    let (local, _remote) = waiting_cache(
        Arc::new(MemoryStorage::new(8 * BS)),
        BS,
        WaitingConfig::default().with_timeout(Some(Duration::from_millis(50))),
    )
    .unwrap();
    let t0 = std::time::Instant::now();
    let e = local.read_bytes(0, 10).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert_eq!(local.metrics().failed_waits, 1);
    // The request is retried by the next reader (the need may have been lost).
    assert!(local.read_bytes(0, 10).await.is_err());
    assert_eq!(local.metrics().needs, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_cache_partial_last_block() {
    let size = 3 * BS + 100;
    let (local, remote) = waiting_cache(
        Arc::new(MemoryStorage::new(size)),
        BS,
        WaitingConfig::default(),
    )
    .unwrap();
    let l = local.clone();
    let r = tokio::spawn(async move { l.read_bytes(3 * BS, 100).await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    // A remote write of the whole (short) last block completes it.
    remote.write_slice(3 * BS, &[3u8; 100]).await.unwrap();
    assert_eq!(&r.await.unwrap().unwrap()[..], &[3u8; 100]);
    assert!(remote.is_present(3));
    // A local write reaching the device end covers the short block; one
    // that stops short of the end waits for it.
    let (local, remote) = waiting_cache(
        Arc::new(MemoryStorage::new(size)),
        BS,
        WaitingConfig::default(),
    )
    .unwrap();
    local.write_slice(3 * BS, &[1u8; 100]).await.unwrap();
    assert!(local.is_present(3));
    let l = local.clone();
    let w = tokio::spawn(async move { l.write_slice(2 * BS, &[1u8; 50]).await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!w.is_finished());
    remote
        .write_slice(2 * BS, &[2u8; BS as usize])
        .await
        .unwrap();
    w.await.unwrap().unwrap();
    remote
        .write_slice(0, &[2u8; 2 * BS as usize])
        .await
        .unwrap();
    assert!(local.is_complete());
}

// ------------------------------------------------------------- syncer

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn syncer_safe_blocks_exclude_failed_and_racing_writes() {
    let n = 32u64;
    let base: DynProvider = Arc::new(MemoryStorage::new(n * BS));
    random_fill(&*base, 5).await;
    let (local, remote) = dirty_tracker(base.clone(), BS).unwrap();
    let dest = Faulty::new(Arc::new(MemoryStorage::new(n * BS)), Duration::ZERO);
    dest.fail_block(8, u32::MAX);
    let s = Syncer::new(
        remote.clone(),
        dest.clone(),
        SyncerConfig::default()
            .with_check_period(Duration::from_millis(5))
            .with_thresholds(Duration::ZERO, 0)
            .with_limits(8, 4),
    )
    .unwrap();
    s.mark_all_dirty();
    s.start().unwrap();
    assert!(s.start().is_err(), "already running");
    // A writer keeps changing blocks 0..4 for a while.
    let w = tokio::spawn({
        let local = local.clone();
        async move {
            for i in 0..200u32 {
                local
                    .write_slice(u64::from(i % 4) * BS + 7, &i.to_le_bytes())
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_micros(300)).await;
            }
        }
    });
    // While it runs, whatever is listed safe must match the destination.
    for _ in 0..20 {
        for (b, h) in s.safe_blocks() {
            let at_dest: [u8; 32] =
                Sha256::digest(dest.read_bytes(b * BS, BS as usize).await.unwrap()).into();
            assert_eq!(
                h, at_dest,
                "block {b} listed with a hash the destination lacks"
            );
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    w.await.unwrap();
    // Let it catch up, then stop.
    for _ in 0..500 {
        if remote.dirty_count() <= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    s.stop().await;
    assert!(!s.is_running());
    let safe = s.safe_blocks();
    let listed: HashSet<u64> = safe.iter().map(|x| x.0).collect();
    assert!(!listed.contains(&8), "a failed block is never safe");
    assert_eq!(listed.len() as u64, n - 1, "{listed:?}");
    for (b, h) in safe {
        let src: [u8; 32] =
            Sha256::digest(base.read_bytes(b * BS, BS as usize).await.unwrap()).into();
        assert_eq!(h, src, "block {b}: safe hash is not the current content");
    }
    assert!(s.metrics().failed_uploads > 0);
    // Restart works.
    s.start().unwrap();
    s.stop().await;
}

/// Gate on the destination: the upload of one block is held while the
/// application rewrites that block; the old hash must not be listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syncer_write_during_upload_is_not_safe() {
    let n = 4u64;
    let base: DynProvider = Arc::new(MemoryStorage::new(n * BS));
    let (local, remote) = dirty_tracker(base.clone(), BS).unwrap();
    let dest_mem: DynProvider = Arc::new(MemoryStorage::new(n * BS));
    let gate = Gate::new(dest_mem.clone());
    gate.close_gate().await;
    let s = Syncer::new(
        remote.clone(),
        gate.clone(),
        SyncerConfig::default().with_limits(16, 4),
    )
    .unwrap();
    s.mark_all_dirty();
    let pass = tokio::spawn({
        let s = s.clone();
        async move { s.sync_pass().await }
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    // Uploads have read the old content and are held at the destination.
    local.write_slice(2 * BS, &[0x55; 64]).await.unwrap();
    gate.open_gate();
    let p = pass.await.unwrap().unwrap();
    assert_eq!(p.uploaded, n);
    let safe: Vec<u64> = s.safe_blocks().iter().map(|x| x.0).collect();
    assert_eq!(safe, vec![0, 1, 3], "block 2 changed during its upload");
    assert_eq!(s.sync_all(10).await.unwrap(), 0);
    let safe = s.safe_blocks();
    assert_eq!(safe.len(), 4);
    let h2: [u8; 32] = Sha256::digest(base.read_bytes(2 * BS, BS as usize).await.unwrap()).into();
    assert_eq!(safe[2], (2, h2));
    assert_eq!(sha(&*base).await, sha(&*dest_mem).await);
    let _ = remote.take_dirty();
}

#[tokio::test]
async fn dirty_blocks_can_be_requeued() {
    let base: DynProvider = Arc::new(MemoryStorage::new(8 * BS));
    let (local, remote) = dirty_tracker(base.clone(), BS).unwrap();
    let order = Arc::new(AnyOrder::new(8));
    order.add_all();
    let dest: DynProvider = Arc::new(MemoryStorage::new(8 * BS));
    let m = Migrator::new(Arc::new(remote.clone()), dest.clone(), order, cfg()).unwrap();
    assert_eq!(
        m.get_latest_dirty().await.unwrap_err().kind(),
        ErrorKind::Invalid,
        "no dirty source set"
    );
    m.set_dirty_source(Arc::new(remote.clone()));
    m.migrate_all().await.unwrap();
    local.write_slice(3 * BS + 1, &[1, 2, 3]).await.unwrap();
    local.write_slice(6 * BS, &[4]).await.unwrap();
    let d = m.get_latest_dirty().await.unwrap().unwrap();
    assert_eq!(d, vec![3, 6]);
    assert_eq!(m.progress().dirty_blocks, 2);
    // A hook decides to wait: the blocks are not lost.
    m.requeue_dirty(&d).unwrap();
    let d2 = m.get_latest_dirty().await.unwrap().unwrap();
    assert_eq!(d2, d);
    m.migrate_dirty(&d2).await.unwrap();
    m.wait_for_completion().await.unwrap();
    assert!(m.get_latest_dirty().await.unwrap().is_none());
    assert_eq!(sha(&*base).await, sha(&*dest).await);
}
