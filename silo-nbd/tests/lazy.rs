//! A migration destination served over NBD before the copy is complete:
//! the export is the destination's waiting cache, the client (`nbdcopy`)
//! reads the whole disk at once, and every block it reaches before the
//! slow bulk copy does is fetched on demand (the cache's "need" handler)
//! and served as soon as it arrives — the client sees the source's data.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use silo_nbd::Export;
use silo_storage::waiting::{waiting_cache, WaitingConfig};
use silo_storage::{DynProvider, MemoryStorage, Provider};

const SIZE: u64 = 8 << 20;
const BLOCK: u64 = 64 * 1024;

#[test]
fn nbdcopy_reads_through_the_waiting_cache_with_lazy_fetch() {
    need("nbdcopy");
    let source = Arc::new(pattern(SIZE as usize, 99));
    let inner: DynProvider = Arc::new(MemoryStorage::new(SIZE));
    let (local, remote) = waiting_cache(
        inner,
        BLOCK,
        WaitingConfig::default().with_timeout(Some(Duration::from_secs(30))),
    )
    .unwrap();
    let (need_tx, mut need_rx) = tokio::sync::mpsc::unbounded_channel::<(u64, u64)>();
    local.set_need_handler(Arc::new(move |off, len| {
        let _ = need_tx.send((off, len));
    }));
    let t = TestServer::start(vec![Export::new("disk", Arc::new(local))]);
    let remote = Arc::new(remote);

    // The "source": a slow bulk copy in order, plus priority answers to needs.
    let bulk = {
        let (remote, source) = (remote.clone(), source.clone());
        t.rt.spawn(async move {
            for b in 0..SIZE / BLOCK {
                tokio::time::sleep(Duration::from_millis(40)).await;
                let off = b * BLOCK;
                let data =
                    bytes::Bytes::copy_from_slice(&source[off as usize..(off + BLOCK) as usize]);
                remote.write_at(off, data).await.unwrap();
            }
        })
    };
    let served = Arc::new(AtomicU64::new(0));
    {
        let (remote, source, served) = (remote.clone(), source.clone(), served.clone());
        t.rt.spawn(async move {
            while let Some((off, len)) = need_rx.recv().await {
                tokio::time::sleep(Duration::from_millis(5)).await; // network
                let data =
                    bytes::Bytes::copy_from_slice(&source[off as usize..(off + len) as usize]);
                remote.write_at(off, data).await.unwrap();
                served.fetch_add(1, Ordering::SeqCst);
            }
        });
    }

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("copy.raw");
    let start = std::time::Instant::now();
    run(Command::new("nbdcopy").args([&t.uri("disk"), out.to_str().unwrap()]));
    let took = start.elapsed();
    assert_eq!(
        sha256_file(&out),
        sha256(&source),
        "client saw the source's data"
    );
    // The bulk copy alone needs 128 × 40 ms ≈ 5 s; the client finished far
    // earlier because its reads fetched blocks on demand.
    assert!(
        !bulk.is_finished(),
        "bulk copy finished first ({took:?}): no lazy fetch happened"
    );
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert!(
        served.load(Ordering::SeqCst) > 0,
        "no block was fetched on demand"
    );
    bulk.abort();
}
