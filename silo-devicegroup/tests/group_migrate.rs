//! Device-group migrations over real TCP on 127.0.0.1.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use silo_devicegroup::{DeviceGroup, DeviceSchema, GroupOptions, System};

fn mem(name: &str, size: u64, bs: u64) -> DeviceSchema {
    let mut s = DeviceSchema::new(name, System::Memory, size);
    s.block_size = Some(bs);
    s
}

/// The simplest full lifecycle: two memory devices, bulk, dirty rounds under
/// writers, cut-over with authority transfer, equal hashes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_memory_devices_under_writers() {
    let dir = tempfile::tempdir().unwrap();
    let src = DeviceGroup::new_from_schema(
        vec![mem("a", 4 << 20, 64 << 10), mem("b", 1_234_567, 4096)],
        GroupOptions::default(),
    )
    .await
    .unwrap();
    for (i, n) in src.names().iter().enumerate() {
        let p = src.provider(n).unwrap();
        write_pattern(&p, 0, p.size() as usize, i as u64 + 1).await;
    }
    let (a, b) = tcp_pair().await;
    let recv = spawn_receiver(b, dir.path().to_path_buf());
    src.start_migration_to(a).await.unwrap();
    let dst = recv.await.unwrap().unwrap();
    let got = Arc::new(parking_lot::Mutex::new(Vec::<Bytes>::new()));
    {
        let got = got.clone();
        dst.handle_custom_data(move |d| got.lock().push(d));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = src
        .names()
        .iter()
        .enumerate()
        .map(|(i, n)| {
            spawn_writer(
                src.provider(n).unwrap(),
                i as u64,
                stop.clone(),
                Duration::from_micros(200),
            )
        })
        .collect();
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let handler: silo_devicegroup::ProgressHandler = {
        let seen = seen.clone();
        Arc::new(move |ps: &[silo_devicegroup::DeviceProgress]| seen.lock().push(ps.to_vec()))
    };
    src.migrate_all(8, Some(handler)).await.unwrap();
    {
        // The handler saw every device, and its last call the finished pass.
        let seen = seen.lock();
        assert!(seen.len() >= 2);
        assert!(seen.iter().all(|ps| ps.len() == 2));
        let last = seen.last().unwrap();
        for p in last {
            assert_eq!(p.progress.migrated_blocks, p.progress.total_blocks, "{p:?}");
        }
        assert_eq!(last[1].progress.total_blocks, 1_234_567u64.div_ceil(4096));
    }
    src.migrate_dirty(&silo_devicegroup::DefaultHooks)
        .await
        .unwrap();
    let took = src
        .cut_over(Some(Bytes::from_static(b"authority")))
        .await
        .unwrap();
    assert!(took < Duration::from_secs(10));
    dst.wait_for_completion().await.unwrap();
    assert_eq!(got.lock().as_slice(), &[Bytes::from_static(b"authority")]);
    for n in src.names() {
        let s = sha(&src.unlocked_provider(&n).unwrap()).await;
        let d = sha(&dst.provider(&n).unwrap()).await;
        assert_eq!(s, d, "device {n}");
    }
    stop.store(true, Ordering::SeqCst);
    src.close_all().await.unwrap();
    for w in writers {
        assert!(w.await.unwrap() > 0);
    }
    dst.close_all().await.unwrap();
}

fn file_dev(
    name: &str,
    system: System,
    size: u64,
    bs: u64,
    path: &std::path::Path,
) -> DeviceSchema {
    let mut s = DeviceSchema::new(name, system, size);
    s.block_size = Some(bs);
    s.location = Some(path.to_path_buf());
    s
}

/// Size of the big sparse device: several GiB in release builds, smaller in
/// debug builds where reading and hashing zeroes is ~20× slower.
fn big_sparse_size() -> u64 {
    if cfg!(debug_assertions) {
        256 << 20
    } else {
        4 << 30
    }
}

/// The group: memory, file (1 234 567 bytes), a big sparse file,
/// copy-on-write over a base that is not on the destination and
/// copy-on-write over a base the destination shares (you-already-have), all
/// migrating while writers keep writing to every device; after the cut-over
/// sequence the destination's SHA-256 equals the source's for every device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_group_under_concurrent_writers() {
    let sdir = tempfile::tempdir().unwrap();
    let ddir = tempfile::tempdir().unwrap();
    let s = sdir.path();
    // Bases of the copy-on-write devices (read-only from then on).
    let cow_size = 8u64 << 20;
    for (base, seed) in [("base1.img", 11u64), ("base2.img", 12)] {
        let f = silo_storage::sources::FileStorage::create(
            s.join(base),
            cow_size,
            silo_storage::sources::Engine::Auto,
        )
        .unwrap();
        let p: silo_storage::DynProvider = Arc::new(f);
        write_pattern(&p, 0, cow_size as usize, seed).await;
        silo_storage::Provider::close(p.as_ref()).await.unwrap();
    }
    // The destination has the shared base too.
    std::fs::copy(s.join("base2.img"), ddir.path().join("base2.img")).unwrap();

    let mut cow1 = file_dev("cow", System::File, cow_size, 64 << 10, &s.join("cow1.img"));
    let mut src1 = file_dev(
        "cow1.state",
        System::File,
        cow_size,
        64 << 10,
        &s.join("base1.img"),
    );
    src1.name = s.join("cow1.state").to_string_lossy().into_owned();
    cow1.source = Some(Box::new(src1));
    let mut cow2 = file_dev(
        "cowshared",
        System::File,
        cow_size,
        64 << 10,
        &s.join("cow2.img"),
    );
    let mut src2 = file_dev("x", System::File, cow_size, 64 << 10, &s.join("base2.img"));
    src2.name = s.join("cow2.state").to_string_lossy().into_owned();
    cow2.source = Some(Box::new(src2));
    cow2.source_shared = true;
    let schemas = vec![
        mem("memory", 16 << 20, 64 << 10),
        file_dev("odd", System::File, 1_234_567, 4096, &s.join("odd.img")),
        file_dev(
            "sparse",
            System::SparseFile,
            big_sparse_size(),
            1 << 20,
            &s.join("big.sparse"),
        ),
        cow1,
        cow2,
    ];
    let src = DeviceGroup::new_from_schema(schemas, GroupOptions::default())
        .await
        .unwrap();
    // Initial data: full for the small devices, a few scattered MiB on the big one.
    write_pattern(&src.provider("memory").unwrap(), 0, 16 << 20, 1).await;
    write_pattern(&src.provider("odd").unwrap(), 0, 1_234_567, 2).await;
    let big = src.provider("sparse").unwrap();
    for i in 0..8u64 {
        write_pattern(&big, i * (big.size() / 8) + 12345, 300_000, 30 + i).await;
    }
    write_pattern(&src.provider("cow").unwrap(), 100_000, 200_000, 4).await;
    write_pattern(&src.provider("cowshared").unwrap(), 3 << 20, 100_000, 5).await;

    let (a, b) = tcp_pair().await;
    let recv = spawn_receiver(b, ddir.path().to_path_buf());
    src.start_migration_to(a).await.unwrap();
    let dst = recv.await.unwrap().unwrap();
    let authority = Arc::new(AtomicBool::new(false));
    {
        let authority = authority.clone();
        dst.handle_custom_data(move |d| authority.store(&d[..] == b"go", Ordering::SeqCst));
    }
    let t0 = std::time::Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = src
        .names()
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let p = src.provider(n).unwrap();
            // The big device: writes confined to its first 64 MiB.
            let p: silo_storage::DynProvider = if n == "sparse" {
                Arc::new(Window(p, 64 << 20))
            } else {
                p
            };
            spawn_writer(p, 100 + i as u64, stop.clone(), Duration::from_micros(500))
        })
        .collect();
    src.migrate_all(32, None).await.unwrap();
    eprintln!("bulk done after {:?}", t0.elapsed());
    // The shared base was not sent: the bulk pass moved only the overlay's
    // blocks of that device.
    let m = src.metrics("cowshared").unwrap().migration.unwrap();
    assert!(m.blocks_sent < m.total_blocks / 2, "{m:?}");
    src.migrate_dirty(&silo_devicegroup::DefaultHooks)
        .await
        .unwrap();
    let cut = src.cut_over(Some(Bytes::from_static(b"go"))).await.unwrap();
    eprintln!("cut-over took {cut:?}, total {:?}", t0.elapsed());
    dst.wait_for_completion().await.unwrap();
    assert!(authority.load(Ordering::SeqCst));
    for n in src.names() {
        let (sp, dp) = (
            src.unlocked_provider(&n).unwrap(),
            dst.provider(&n).unwrap(),
        );
        if n == "sparse" {
            // Hashing GiBs of zeroes twice would dominate the test: compare
            // the SHA-256 of every allocated (non-zero) block instead.
            let (sd, dd) = tokio::join!(sparse_digest(&sp, 1 << 20), sparse_digest(&dp, 1 << 20));
            assert!(!sd.is_empty());
            assert_eq!(sd, dd, "device {n}");
        } else {
            let (sh, dh) = tokio::join!(sha(&sp), sha(&dp));
            assert_eq!(sh, dh, "device {n}");
        }
    }
    eprintln!("hashes compared after {:?}", t0.elapsed());
    stop.store(true, Ordering::SeqCst);
    src.close_all().await.unwrap();
    for w in writers {
        assert!(
            w.await.unwrap() > 0,
            "every writer wrote during the migration"
        );
    }
    dst.close_all().await.unwrap();
}

/// The first `1` bytes of a provider (keeps a writer on a small window).
struct Window(silo_storage::DynProvider, u64);

#[async_trait::async_trait]
impl silo_storage::Provider for Window {
    fn size(&self) -> u64 {
        self.1
    }
    fn capabilities(&self) -> silo_storage::Capabilities {
        self.0.capabilities()
    }
    async fn read_at(&self, o: u64, b: bytes::BytesMut) -> silo_storage::Result<bytes::BytesMut> {
        self.0.read_at(o, b).await
    }
    async fn write_at(&self, o: u64, d: Bytes) -> silo_storage::Result<()> {
        self.0.write_at(o, d).await
    }
    async fn flush(&self) -> silo_storage::Result<()> {
        self.0.flush().await
    }
    async fn trim(&self, o: u64, l: u64) -> silo_storage::Result<()> {
        self.0.trim(o, l).await
    }
    async fn write_zeroes(&self, o: u64, l: u64) -> silo_storage::Result<()> {
        self.0.write_zeroes(o, l).await
    }
    fn cancel_writes(&self, o: u64, l: u64) {
        self.0.cancel_writes(o, l)
    }
    async fn close(&self) -> silo_storage::Result<()> {
        Ok(())
    }
}
