//! `write_now` / `read_now`: a stack of counting and marking layers over a
//! memory device completes synchronously, with the same results and
//! bookkeeping as the async path; anything that would wait hands the buffer
//! back untouched.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use silo_storage::dirty::{dirty_tracker, DirtySource};
use silo_storage::modules::{ArtificialLatency, LatencyConfig, Lockable, Metrics};
use silo_storage::volatility::VolatilityMonitor;
use silo_storage::{DynProvider, Error, MemoryStorage, Provider, ProviderExt};

const SIZE: u64 = 64 * 1024;

#[tokio::test]
async fn a_tracking_stack_over_memory_completes_at_once() {
    let mem: DynProvider = Arc::new(MemoryStorage::new(SIZE));
    let (local, remote) = dirty_tracker(mem.clone(), 4096).unwrap();
    remote.track_at(0, SIZE);
    let vol =
        Arc::new(VolatilityMonitor::new(Arc::new(local), 4096, Duration::from_secs(60)).unwrap());
    let top = Arc::new(Metrics::with_timing_every(
        Lockable::new(vol.clone() as DynProvider),
        1,
    ));

    let r = top.write_now(4096 + 10, Bytes::from_static(&[9; 100]));
    assert!(matches!(r, Ok(Ok(()))), "{r:?}");
    // The write is in memory, the block is dirty and counted.
    assert_eq!(
        &mem.read_bytes(4096 + 10, 100).await.unwrap()[..],
        &[9; 100]
    );
    assert_eq!(remote.take_dirty(), vec![1]);
    assert_eq!(vol.volatility(1), 1);
    let back = top
        .read_now(4096 + 10, BytesMut::zeroed(100))
        .unwrap()
        .unwrap();
    assert_eq!(&back[..], &[9; 100]);
    let s = top.snapshot();
    assert_eq!((s.write.ops, s.write.bytes, s.write.timed), (1, 100, 1));
    assert_eq!((s.read.ops, s.read.bytes, s.read.in_flight), (1, 100, 0));
    // Whole chunks are lent through every layer, and counted.
    let pieces = top.read_shared(0, SIZE as usize).unwrap().unwrap();
    let all: Vec<u8> = pieces.iter().flat_map(|b| b.iter().copied()).collect();
    assert_eq!(&all[4096 + 10..4096 + 110], &[9; 100]);
    assert_eq!(all.len() as u64, SIZE);
    let s = top.snapshot();
    assert_eq!((s.read.ops, s.read.bytes), (2, 100 + SIZE));
    // Reading through the local side tracks nothing new.
    assert!(remote.take_dirty().is_empty());

    // Out of range: completes, with the same error as the async path.
    let r = top.write_now(SIZE - 10, Bytes::from_static(&[1; 20]));
    assert!(matches!(r, Ok(Err(Error::OutOfRange { .. }))), "{r:?}");
    assert!(top
        .write_at(SIZE - 10, Bytes::from_static(&[1; 20]))
        .await
        .is_err());
    let s = top.snapshot();
    assert_eq!((s.write.ops, s.write.errors), (3, 2));
}

#[tokio::test]
async fn a_locked_gate_hands_the_buffer_back_and_counts_nothing() {
    let mem: DynProvider = Arc::new(MemoryStorage::new(SIZE));
    let lock = Arc::new(Lockable::new(mem.clone()));
    let top = Metrics::new(lock.clone() as DynProvider);
    lock.lock().await;
    let data = Bytes::from_static(&[3; 10]);
    match top.write_now(0, data.clone()) {
        Err(back) => assert_eq!(back, data),
        other => panic!("a locked write completed: {other:?}"),
    }
    assert!(top.read_now(0, BytesMut::zeroed(10)).is_err());
    assert!(top.read_shared(0, SIZE as usize).is_err());
    assert_eq!(top.snapshot().write.ops, 0);
    assert_eq!(
        mem.read_bytes(0, 10).await.unwrap(),
        Bytes::from_static(&[0; 10])
    );
    // The async path waits for the unlock, then writes.
    let w = tokio::spawn({
        let top = Arc::new(top);
        async move {
            top.write_at(0, Bytes::from_static(&[3; 10])).await.unwrap();
            top
        }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!w.is_finished());
    lock.unlock();
    let top = w.await.unwrap();
    assert_eq!(top.snapshot().write.ops, 1);
    assert_eq!(
        mem.read_bytes(0, 10).await.unwrap(),
        Bytes::from_static(&[3; 10])
    );
    // Closed: completes with the error.
    lock.close().await.unwrap();
    assert!(matches!(
        top.write_now(0, Bytes::from_static(&[1])),
        Ok(Err(Error::Closed { .. }))
    ));
}

#[tokio::test]
async fn a_layer_that_waits_sends_the_stack_down_the_async_path() {
    let mem: DynProvider = Arc::new(MemoryStorage::new(SIZE));
    let slow: DynProvider = Arc::new(ArtificialLatency::new(
        mem.clone(),
        LatencyConfig {
            write: Duration::from_millis(1),
            ..LatencyConfig::default()
        },
    ));
    let (local, remote) = dirty_tracker(slow, 4096).unwrap();
    remote.track_at(0, SIZE);
    let top = Metrics::new(Arc::new(local) as DynProvider);
    let data = Bytes::from_static(&[5; 8]);
    assert!(top.write_now(8192, data.clone()).is_err());
    assert!(
        remote.take_dirty().is_empty(),
        "a write that was not done marked a block"
    );
    top.write_at(8192, data).await.unwrap();
    assert_eq!(remote.take_dirty(), vec![2]);
    assert_eq!(top.snapshot().write.ops, 1);
    assert_eq!(&mem.read_bytes(8192, 8).await.unwrap()[..], &[5; 8]);
}

#[tokio::test]
async fn reads_through_a_layer_over_the_remote_side_still_start_tracking() {
    let mem: DynProvider = Arc::new(MemoryStorage::new(SIZE));
    let (local, remote) = dirty_tracker(mem, 4096).unwrap();
    let reader = Metrics::new(Arc::new(remote.clone()) as DynProvider);
    assert!(reader.read_now(0, BytesMut::zeroed(10)).is_err());
    // Nor may it lend memory past the tracking.
    assert!(reader.read_shared(0, SIZE as usize).is_err());
    reader
        .read_at(3 * 4096, BytesMut::zeroed(4096))
        .await
        .unwrap();
    // Block 3 was read for migration: a later write makes it dirty.
    local.write_slice(3 * 4096 + 1, &[1]).await.unwrap();
    local.write_slice(5 * 4096, &[1]).await.unwrap();
    assert_eq!(remote.take_dirty(), vec![3]);
}
