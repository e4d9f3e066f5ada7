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
    src.migrate_all(8, None).await.unwrap();
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
