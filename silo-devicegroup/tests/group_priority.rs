//! Destination reads during a migration over a slow link.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use silo_devicegroup::{DeviceGroup, DeviceSchema, GroupOptions, MigrationSchema, System};
use silo_storage::ProviderExt;
use tokio::net::TcpListener;

const BS: u64 = 64 << 10;
const BLOCKS: u64 = 64;

/// Bulk copy is slow (1 MiB/s through a throttling proxy, ascending order):
/// a destination read of a block far ahead of it completes, with the
/// source's data, while the bulk copy has moved less than half the device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn far_ahead_reads_overtake_the_bulk_copy() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = DeviceSchema::new("disk", System::Memory, BLOCKS * BS);
    s.block_size = Some(BS);
    s.migration = Some(MigrationSchema { any_order: true });
    let src = DeviceGroup::new_from_schema(vec![s], GroupOptions::default())
        .await
        .unwrap();
    let sp = src.provider("disk").unwrap();
    write_pattern(&sp, 0, (BLOCKS * BS) as usize, 5).await;

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (proxy, _proxy_task) = slow_proxy(listener.local_addr().unwrap(), 1 << 20).await;
    let recv_conn = tokio::spawn(accept(listener));
    let a = connect_small(proxy).await;
    let recv = spawn_receiver(recv_conn.await.unwrap(), dir.path().to_path_buf());
    src.start_migration_to(a).await.unwrap();
    let dst = recv.await.unwrap().unwrap();
    let bulk = {
        let src = src.clone();
        tokio::spawn(async move { src.migrate_all(2, None).await })
    };
    let dp = dst.provider("disk").unwrap();
    // Let the bulk copy get going first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for b in [BLOCKS - 1, BLOCKS - 10, BLOCKS / 2 + 3] {
        let t = std::time::Instant::now();
        let got = dp.read_bytes(b * BS + 100, 1000).await.unwrap();
        let present = dst.metrics("disk").unwrap().waiting.unwrap().remote_present;
        eprintln!("block {b}: {:?}, {present} blocks present", t.elapsed());
        assert_eq!(got, sp.read_bytes(b * BS + 100, 1000).await.unwrap());
        assert!(
            present < BLOCKS / 2,
            "the read of block {b} waited for the bulk copy ({present} blocks present)"
        );
    }
    bulk.await.unwrap().unwrap();
    src.cut_over(None).await.unwrap();
    dst.wait_for_completion().await.unwrap();
    assert_eq!(sha(&sp_unlocked(&src)).await, sha(&dp).await);
    src.close_all().await.unwrap();
    dst.close_all().await.unwrap();
}

fn sp_unlocked(g: &Arc<DeviceGroup>) -> silo_storage::DynProvider {
    g.unlocked_provider("disk").unwrap()
}

/// A destination write during the migration makes the block the
/// destination's: it is not waited for, the source is told not to send it
/// (don't-need-at), and the bulk copy never overwrites it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_writes_win_over_the_bulk_copy() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = DeviceSchema::new("disk", System::Memory, BLOCKS * BS);
    s.block_size = Some(BS);
    s.migration = Some(MigrationSchema { any_order: true });
    let src = DeviceGroup::new_from_schema(vec![s], GroupOptions::default())
        .await
        .unwrap();
    let sp = src.provider("disk").unwrap();
    write_pattern(&sp, 0, (BLOCKS * BS) as usize, 5).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (proxy, _proxy_task) = slow_proxy(listener.local_addr().unwrap(), 2 << 20).await;
    let recv_conn = tokio::spawn(accept(listener));
    let a = connect_small(proxy).await;
    let recv = spawn_receiver(recv_conn.await.unwrap(), dir.path().to_path_buf());
    src.start_migration_to(a).await.unwrap();
    let dst = recv.await.unwrap().unwrap();
    let dp = dst.provider("disk").unwrap();
    // Before the bulk copy starts: the destination owns block 60.
    let mine = vec![0xAB; BS as usize];
    dp.write_slice(60 * BS, &mine).await.unwrap();
    assert_eq!(dp.read_bytes(60 * BS, BS as usize).await.unwrap(), mine);
    tokio::time::sleep(Duration::from_millis(100)).await;
    src.migrate_all(2, None).await.unwrap();
    let p = src.metrics("disk").unwrap().migration.unwrap();
    assert_eq!(p.skipped_blocks, 1, "{p:?}");
    src.cut_over(None).await.unwrap();
    dst.wait_for_completion().await.unwrap();
    assert_eq!(dp.read_bytes(60 * BS, BS as usize).await.unwrap(), mine);
    assert_eq!(
        dp.read_bytes(0, (60 * BS) as usize).await.unwrap(),
        sp_unlocked(&src)
            .read_bytes(0, (60 * BS) as usize)
            .await
            .unwrap()
    );
    src.close_all().await.unwrap();
    dst.close_all().await.unwrap();
}
