//! Continuous sync (`S3Sync`) and the verified grab, against a real
//! `s3s-fs` server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use silo_s3::hashindex::{sha256, HashIndex};
use silo_s3::testing::{pattern, S3sFs};
use silo_s3::{
    fetch_blocks_by_hash, open_grab_source, GrabFailureReason, S3Error, S3Storage, S3Sync,
    SafeBlock, SyncSettings,
};
use silo_storage::dirty::{dirty_tracker, DirtyTrackerLocal};
use silo_storage::{BlockLayout, DynProvider, MemoryStorage, Provider, ProviderExt};
use tokio_util::sync::CancellationToken;

fn fast_settings() -> SyncSettings {
    SyncSettings {
        max_age: Duration::ZERO,
        min_changed: 1,
        check_period: Duration::from_millis(20),
        limit: 64,
        concurrency: 4,
        index_save_period: Duration::from_millis(100),
        ..SyncSettings::default()
    }
}

struct Dev {
    mem: DynProvider,
    local: DirtyTrackerLocal,
    sync: S3Sync,
}

async fn device(
    server: &S3sFs,
    mem: DynProvider,
    prefix: &str,
    bs: u64,
    settings: SyncSettings,
) -> Dev {
    let cfg = server.config("sync", prefix, mem.size(), bs);
    let s3 = Arc::new(S3Storage::open_or_create(&cfg).await.unwrap());
    let (local, remote) = dirty_tracker(mem.clone(), bs).unwrap();
    let sync = S3Sync::new(remote, s3, settings).await.unwrap();
    Dev { mem, local, sync }
}

/// Every block of the device equals its S3 object (a missing object is
/// zeroes), and every listed safe block's hash equals both.
async fn assert_s3_matches(dev: &Dev, safe: &[SafeBlock]) {
    let s3 = dev.sync.storage();
    let layout = s3.layout();
    for b in 0..layout.num_blocks() {
        let r = layout.block_range(b);
        let local = dev
            .mem
            .read_bytes(r.start, (r.end - r.start) as usize)
            .await
            .unwrap();
        let remote = s3.block_store().get_block(b).await.unwrap();
        let remote = remote.unwrap_or_else(|| Bytes::from(vec![0u8; local.len()]));
        assert!(local == remote, "block {b} differs between device and S3");
    }
    for sb in safe {
        let r = layout.block_range(sb.block);
        let local = dev
            .mem
            .read_bytes(r.start, (r.end - r.start) as usize)
            .await
            .unwrap();
        assert_eq!(
            sha256(&local),
            sb.hash,
            "safe block {} has a wrong hash",
            sb.block
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_written_while_syncing_ends_with_every_object_matching_its_hash() {
    let server = S3sFs::start();
    let bs = 16 * 1024u64;
    let size = 40 * bs + 5000; // partial last block
    let mem: DynProvider = Arc::new(MemoryStorage::new(size));
    mem.write_slice(0, &pattern(1, size as usize))
        .await
        .unwrap();
    let dev = device(&server, mem, "live", bs, fast_settings()).await;
    dev.sync.start().unwrap();
    assert!(dev.sync.is_running());

    // A writer keeps changing the device while the sync runs.
    let local = dev.local.clone();
    let writer = tokio::spawn(async move {
        let t = Instant::now();
        let mut i = 0u64;
        while t.elapsed() < Duration::from_millis(1500) {
            let off = (i * 7919 * 613) % (size - 3000);
            local
                .write_slice(off, &pattern(i + 100, 3000))
                .await
                .unwrap();
            if i % 7 == 0 {
                local.write_zeroes((i * 31 % 40) * bs, bs).await.unwrap();
            }
            i += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        i
    });
    let writes = writer.await.unwrap();
    assert!(writes > 50, "{writes}");
    let m = dev.sync.metrics();
    assert!(m.passes > 3 && m.uploaded_blocks > 41, "{m:?}");
    assert_eq!(dev.sync.sync_all(20).await.unwrap(), 0);
    let safe = dev.sync.stop().await;
    assert!(!dev.sync.is_running());
    assert_eq!(
        safe.len() as u64,
        dev.sync.storage().layout().num_blocks(),
        "every block is synced"
    );
    assert_s3_matches(&dev, &safe).await;
    // The index in the bucket says the same.
    let index = HashIndex::load(dev.sync.storage().block_store())
        .await
        .unwrap();
    assert_eq!(index.safe_blocks(), safe);
    let m = dev.sync.metrics();
    assert_eq!((m.dirty_blocks, m.lag), (0, Duration::ZERO), "{m:?}");
    assert!(m.index_saves >= 1 && m.s3.errors == 0, "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_without_reuploading_unchanged_blocks() {
    let server = S3sFs::start();
    let bs = 8 * 1024u64;
    let size = 16 * bs - 100;
    let content = pattern(2, size as usize);
    let mem: DynProvider = Arc::new(MemoryStorage::new(size));
    mem.write_slice(0, &content).await.unwrap();
    let dev = device(&server, mem, "resume", bs, fast_settings()).await;
    assert_eq!(dev.sync.sync_all(5).await.unwrap(), 0);
    let first = dev.sync.stop().await;
    assert_eq!(first.len(), 16);
    let m = dev.sync.metrics();
    assert_eq!(m.uploaded_blocks, 16);
    drop(dev);

    // "Restart": a new process with the same device content, except three
    // blocks changed while the sync was down (one is the partial last one).
    let mem2: DynProvider = Arc::new(MemoryStorage::new(size));
    mem2.write_slice(0, &content).await.unwrap();
    mem2.write_slice(2 * bs + 10, b"changed").await.unwrap();
    mem2.write_slice(5 * bs, &pattern(5, bs as usize))
        .await
        .unwrap();
    mem2.write_slice(size - 50, &[9u8; 50]).await.unwrap();
    let dev2 = device(&server, mem2, "resume", bs, fast_settings()).await;
    let m = dev2.sync.metrics();
    assert_eq!((m.resumed_blocks, m.resume_mismatches), (13, 3), "{m:?}");
    assert_eq!(m.dirty_blocks, 3);
    assert_eq!(m.s3.puts, 0, "nothing uploaded yet: {m:?}");
    assert_eq!(dev2.sync.sync_all(5).await.unwrap(), 0);
    let safe = dev2.sync.stop().await;
    let m = dev2.sync.metrics();
    // Three block PUTs; the rest of the PUTs are hash index writes.
    assert_eq!(m.uploaded_blocks, 3, "{m:?}");
    assert_eq!(m.s3.puts - m.index_saves, 3, "{m:?}");
    assert_eq!(safe.len(), 16);
    assert_s3_matches(&dev2, &safe).await;

    // A third start with nothing changed uploads nothing at all.
    let mem3: DynProvider = Arc::new(MemoryStorage::new(size));
    mem3.write_slice(0, &dev2.mem.read_bytes(0, size as usize).await.unwrap())
        .await
        .unwrap();
    let dev3 = device(&server, mem3, "resume", bs, fast_settings()).await;
    assert_eq!(dev3.sync.sync_all(5).await.unwrap(), 0);
    let m = dev3.sync.metrics();
    assert_eq!(
        (m.resumed_blocks, m.uploaded_blocks, m.s3.puts),
        (16, 0, 0),
        "{m:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_dirty_uploads_just_the_writes_and_start_stop_restart() {
    let server = S3sFs::start();
    let bs = 4096u64;
    let mem: DynProvider = Arc::new(MemoryStorage::new(32 * bs));
    mem.write_slice(0, &pattern(3, (32 * bs) as usize))
        .await
        .unwrap();
    let settings = SyncSettings {
        only_dirty: true,
        autostart: true,
        ..fast_settings()
    };
    let dev = device(&server, mem, "onlydirty", bs, settings).await;
    assert!(dev.sync.is_running(), "autostart");
    assert!(dev.sync.start().is_err(), "already running");
    dev.local.write_slice(3 * bs + 1, b"x").await.unwrap();
    let t = Instant::now();
    while dev.sync.metrics().uploaded_blocks < 1 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the write was not synced"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let safe = dev.sync.stop().await;
    assert_eq!(safe.iter().map(|s| s.block).collect::<Vec<_>>(), vec![3]);
    assert_eq!(
        dev.sync
            .storage()
            .block_store()
            .list_blocks()
            .await
            .unwrap(),
        vec![(3, bs)]
    );
    // Restart after stop works and picks up new writes.
    dev.local.write_slice(7 * bs, b"y").await.unwrap();
    dev.sync.start().unwrap();
    let t = Instant::now();
    while dev.sync.metrics().uploaded_blocks < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "not synced after restart"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let safe = dev.sync.stop().await;
    assert_eq!(safe.iter().map(|s| s.block).collect::<Vec<_>>(), vec![3, 7]);
    assert_eq!(dev.sync.metrics().uploaded_blocks, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatched_block_sizes_are_an_error_at_start() {
    let server = S3sFs::start();
    let mem: DynProvider = Arc::new(MemoryStorage::new(64 * 1024));
    let cfg = server.config("sync", "mismatch", 64 * 1024, 8192);
    let s3 = Arc::new(S3Storage::open_or_create(&cfg).await.unwrap());
    let (_local, remote) = dirty_tracker(mem, 4096).unwrap();
    let err = S3Sync::new(remote, s3, fast_settings()).await.unwrap_err();
    assert!(err.to_string().contains("block sizes"), "{err}");
    assert_eq!(
        SyncSettings {
            block_shift: 4,
            ..SyncSettings::default()
        }
        .sync_block_size(4096)
        .unwrap(),
        65536
    );
    assert!(SyncSettings {
        block_shift: 60,
        ..SyncSettings::default()
    }
    .sync_block_size(4096)
    .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_stopped_mid_sync_retries_and_never_reports_unstored_blocks() {
    let mut server = S3sFs::start();
    let bs = 64 * 1024u64;
    let blocks = 48u64;
    let size = blocks * bs;
    let mem: DynProvider = Arc::new(MemoryStorage::new(size));
    mem.write_slice(0, &pattern(4, (8 * bs) as usize))
        .await
        .unwrap();
    let settings = SyncSettings {
        concurrency: 2,
        ..fast_settings()
    };
    let dev = device(&server, mem, "outage", bs, settings).await;
    assert_eq!(dev.sync.sync_all(5).await.unwrap(), 0);
    let before = dev.sync.safe_blocks();
    assert_eq!(before.len() as u64, blocks);

    // Rewrite everything, start syncing, and kill the server mid-pass.
    dev.local
        .write_slice(0, &pattern(5, size as usize))
        .await
        .unwrap();
    dev.sync.start().unwrap();
    let puts0 = dev.sync.metrics().s3.puts;
    let t = Instant::now();
    while dev.sync.metrics().s3.puts < puts0 + 4 {
        assert!(t.elapsed() < Duration::from_secs(10), "no upload started");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    server.stop();
    // Passes keep failing (retries, then errors) without panicking or hanging.
    let t = Instant::now();
    while dev.sync.metrics().failed_uploads == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "uploads did not fail"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let during = tokio::time::timeout(Duration::from_secs(30), dev.sync.stop())
        .await
        .expect("stop is bounded");
    assert!(dev.sync.metrics().dirty_blocks > 0);
    assert!(
        (during.len() as u64) < blocks,
        "some blocks cannot be synced while S3 is down"
    );

    // Server back: everything listed as safe during the outage really is
    // in S3 with that hash and equals the device.
    server.restart();
    let s3 = dev.sync.storage().block_store();
    for sb in &during {
        let data = s3
            .get_block(sb.block)
            .await
            .unwrap()
            .unwrap_or_else(|| Bytes::from(vec![0u8; bs as usize]));
        assert_eq!(
            sha256(&data),
            sb.hash,
            "block {} listed as safe but not stored",
            sb.block
        );
    }
    // The index object never claims unstored content either.
    let index = HashIndex::load(s3).await.unwrap();
    for (b, h) in index.iter() {
        let data = s3
            .get_block(b)
            .await
            .unwrap()
            .unwrap_or_else(|| Bytes::from(vec![0u8; bs as usize]));
        assert_eq!(
            &sha256(&data),
            h,
            "index lists block {b} with content that is not stored"
        );
    }
    // And the sync catches up.
    assert_eq!(dev.sync.sync_all(10).await.unwrap(), 0);
    let safe = dev.sync.stop().await;
    assert_eq!(safe.len() as u64, blocks);
    assert_s3_matches(&dev, &safe).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grab_verifies_hashes_and_reports_failures_for_fallback() {
    let mut server = S3sFs::start();
    let bs = 16 * 1024u64;
    let size = 20 * bs + 333;
    let mem: DynProvider = Arc::new(MemoryStorage::new(size));
    mem.write_slice(0, &pattern(6, (size - 2 * bs) as usize))
        .await
        .unwrap(); // last 2 blocks stay zero
    let dev = device(&server, mem.clone(), "grab", bs, fast_settings()).await;
    assert_eq!(dev.sync.sync_all(5).await.unwrap(), 0);
    let mut safe = dev.sync.stop().await;
    assert_eq!(safe.len(), 21);
    // Tamper with block 4 in S3 after the list was made; add a bogus block.
    // The destination opens the bucket with its own configuration; the
    // manifest must agree with the migration's geometry.
    let cfg = server.config("sync", "grab", size, bs);
    let store = open_grab_source(&cfg).await.unwrap();
    let mut other_bs = cfg.clone();
    other_bs.block_size = 2 * bs;
    let err = open_grab_source(&other_bs).await.unwrap_err();
    assert!(
        matches!(
            err,
            S3Error::ManifestMismatch {
                field: "block_size",
                ..
            }
        ),
        "{err:?}"
    );
    let mut missing = cfg.clone();
    missing.prefix = "never-synced".into();
    assert!(matches!(
        open_grab_source(&missing).await.unwrap_err(),
        S3Error::ManifestMissing { .. }
    ));
    store
        .put_block(4, Bytes::from(vec![1u8; bs as usize]))
        .await
        .unwrap();
    safe.push(SafeBlock {
        block: 999,
        hash: [0; 32],
    });

    let dest = MemoryStorage::new(size);
    let mut seen = Vec::new();
    let report = fetch_blocks_by_hash(&store, &safe, 4, &dest, &CancellationToken::new(), |f| {
        seen.push(f.block)
    })
    .await;
    assert_eq!(report.delivered, 20);
    seen.sort_unstable();
    assert_eq!(seen, vec![4, 999]);
    assert!(report
        .failed
        .iter()
        .any(|f| f.block == 4 && matches!(f.reason, GrabFailureReason::HashMismatch { .. })));
    assert!(report
        .failed
        .iter()
        .any(|f| f.block == 999 && matches!(f.reason, GrabFailureReason::OutOfRange)));
    // Every delivered block equals the source; block 4 was not written.
    let layout = BlockLayout::new(size, bs).unwrap();
    for b in 0..layout.num_blocks() {
        let r = layout.block_range(b);
        let want = if b == 4 {
            vec![0u8; bs as usize].into()
        } else {
            mem.read_bytes(r.start, (r.end - r.start) as usize)
                .await
                .unwrap()
        };
        assert_eq!(
            dest.read_bytes(r.start, (r.end - r.start) as usize)
                .await
                .unwrap(),
            want,
            "block {b}"
        );
    }

    // Cancelled before it starts: everything is reported for fallback.
    let cancel = CancellationToken::new();
    cancel.cancel();
    let report = fetch_blocks_by_hash(&store, &safe[..5], 4, &dest, &cancel, |_| {}).await;
    assert_eq!((report.delivered, report.failed.len()), (0, 5));
    assert!(report
        .failed
        .iter()
        .all(|f| matches!(f.reason, GrabFailureReason::Cancelled)));

    // S3 down: every block fails with an S3 error, in bounded time.
    server.stop();
    let t = Instant::now();
    let report = tokio::time::timeout(
        Duration::from_secs(60),
        fetch_blocks_by_hash(
            &store,
            &safe[..6],
            3,
            &dest,
            &CancellationToken::new(),
            |_| {},
        ),
    )
    .await
    .expect("the grab must not hang");
    assert_eq!(report.delivered, 0);
    assert_eq!(report.failed.len(), 6);
    assert!(
        report
            .failed
            .iter()
            .all(|f| matches!(f.reason, GrabFailureReason::S3(_))),
        "{:?}",
        report.failed
    );
    assert!(t.elapsed() < Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_age_min_changed_and_limit_shape_each_pass() {
    let server = S3sFs::start();
    let bs = 4096u64;
    let mem: DynProvider = Arc::new(MemoryStorage::new(16 * bs));
    let settings = SyncSettings {
        only_dirty: true,
        max_age: Duration::from_secs(3600),
        min_changed: 3,
        limit: 2,
        ..fast_settings()
    };
    let dev = device(&server, mem, "select", bs, settings).await;
    for b in 0..6u64 {
        dev.local.write_slice(b * bs, b"once").await.unwrap();
    }
    // Young blocks written fewer than min_changed times wait.
    assert_eq!(dev.sync.sync_now().await.unwrap().blocks, 0);
    assert_eq!(dev.sync.metrics().dirty_blocks, 6);
    for _ in 0..2 {
        for b in 0..4u64 {
            dev.local.write_slice(b * bs + 8, b"again").await.unwrap();
        }
    }
    // Four blocks qualify now, but at most `limit` per pass.
    let pass = dev.sync.sync_now().await.unwrap();
    assert_eq!((pass.blocks, pass.uploaded), (2, 2));
    let pass = dev.sync.sync_now().await.unwrap();
    assert_eq!((pass.blocks, pass.uploaded), (2, 2));
    assert_eq!(dev.sync.sync_now().await.unwrap().blocks, 0);
    let m = dev.sync.metrics();
    assert_eq!((m.uploaded_blocks, m.dirty_blocks), (4, 2), "{m:?}");
    assert!(
        m.lag > Duration::ZERO,
        "two blocks are still waiting: {m:?}"
    );
    // sync_all takes everything regardless of the thresholds.
    assert_eq!(dev.sync.sync_all(5).await.unwrap(), 0);
    assert_eq!(dev.sync.metrics().lag, Duration::ZERO);
    assert_eq!(dev.sync.stop().await.len(), 6);
}
