//! Chained migration A → B → C, and the failure paths.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use silo_devicegroup::{
    DefaultHooks, DeviceGroup, DeviceSchema, Error, GroupOptions, ReceiveOptions, ReceivePolicy,
    System,
};
use silo_protocol::{DeviceGroupInfo, DeviceInfo, Event, EventKind, Kind, Message, Priority};
use silo_storage::ProviderExt;
use tokio::net::TcpListener;

fn schemas(dir: &std::path::Path) -> Vec<DeviceSchema> {
    let mut m = DeviceSchema::new("mem", System::Memory, 3 << 20);
    m.block_size = Some(64 << 10);
    let mut f = DeviceSchema::new("file", System::File, 1_234_567);
    f.block_size = Some(4096);
    f.location = Some(dir.join("file.img"));
    let mut sp = DeviceSchema::new("sparse", System::SparseFile, 64 << 20);
    sp.block_size = Some(1 << 20);
    sp.location = Some(dir.join("s.sparse"));
    vec![m, f, sp]
}

/// A → B under writers; B completes, takes over (writes of its own), then
/// migrates onward to C under writers; C equals B, which holds A's data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chained_migration_a_b_c() {
    let (da, db, dc) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let a = DeviceGroup::new_from_schema(schemas(da.path()), GroupOptions::default())
        .await
        .unwrap();
    for (i, n) in a.names().iter().enumerate() {
        let p = a.provider(n).unwrap();
        write_pattern(&p, 0, p.size().min(2 << 20) as usize, i as u64).await;
    }
    // A → B.
    let (c1, c2) = tcp_pair().await;
    let rb = spawn_receiver(c2, db.path().to_path_buf());
    a.start_migration_to(c1).await.unwrap();
    let b = rb.await.unwrap().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let wa: Vec<_> = a
        .names()
        .iter()
        .map(|n| {
            spawn_writer(
                a.provider(n).unwrap(),
                1,
                stop.clone(),
                Duration::from_millis(1),
            )
        })
        .collect();
    a.migrate_all(16, None).await.unwrap();
    a.migrate_dirty(&DefaultHooks).await.unwrap();
    a.cut_over(None).await.unwrap();
    b.wait_for_completion().await.unwrap();
    stop.store(true, Ordering::SeqCst);
    let mut a_hashes = Vec::new();
    for n in a.names() {
        a_hashes.push(sha(&a.unlocked_provider(&n).unwrap()).await);
    }
    a.close_all().await.unwrap();
    for w in wa {
        w.await.unwrap();
    }
    for (n, h) in a.names().iter().zip(&a_hashes) {
        assert_eq!(&sha(&b.provider(n).unwrap()).await, h, "A→B {n}");
    }
    // B is now the authority: it writes, and migrates onward to C.
    let (c3, c4) = tcp_pair().await;
    let rc = spawn_receiver(c4, dc.path().to_path_buf());
    b.start_migration_to(c3).await.unwrap();
    let c = rc.await.unwrap().unwrap();
    let authority = Arc::new(AtomicBool::new(false));
    {
        let authority = authority.clone();
        c.handle_custom_data(move |d| authority.store(&d[..] == b"to C", Ordering::SeqCst));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let wb: Vec<_> = b
        .names()
        .iter()
        .map(|n| {
            spawn_writer(
                b.provider(n).unwrap(),
                2,
                stop.clone(),
                Duration::from_millis(1),
            )
        })
        .collect();
    b.migrate_all(16, None).await.unwrap();
    b.migrate_dirty(&DefaultHooks).await.unwrap();
    b.cut_over(Some(Bytes::from_static(b"to C"))).await.unwrap();
    c.wait_for_completion().await.unwrap();
    assert!(authority.load(Ordering::SeqCst));
    let mut changed = 0;
    for (n, ah) in b.names().iter().zip(&a_hashes) {
        let bh = sha(&b.unlocked_provider(n).unwrap()).await;
        assert_eq!(sha(&c.provider(n).unwrap()).await, bh, "B→C {n}");
        changed += usize::from(&bh != ah);
    }
    assert!(changed > 0, "B's own writes reached C");
    stop.store(true, Ordering::SeqCst);
    b.close_all().await.unwrap();
    for w in wb {
        w.await.unwrap();
    }
    c.close_all().await.unwrap();
}

/// A 16 MiB device migrating over a 1 MiB/s proxy with a receiver; the bulk
/// copy runs in a task. Returns (dir, sender, receiver, proxy task, bulk task).
async fn slow_migration() -> (
    tempfile::TempDir,
    Arc<DeviceGroup>,
    Arc<DeviceGroup>,
    tokio::task::JoinHandle<()>,
    tokio::task::JoinHandle<silo_devicegroup::Result<()>>,
) {
    let dir = tempfile::tempdir().unwrap();
    let mut s = DeviceSchema::new("disk", System::Memory, 16 << 20);
    s.block_size = Some(64 << 10);
    let src = DeviceGroup::new_from_schema(vec![s], GroupOptions::default())
        .await
        .unwrap();
    write_pattern(&src.provider("disk").unwrap(), 0, 16 << 20, 3).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (proxy, proxy_task) = slow_proxy(listener.local_addr().unwrap(), 1 << 20).await;
    let recv_conn = tokio::spawn(accept(listener));
    let conn = connect_small(proxy).await;
    let recv = spawn_receiver(recv_conn.await.unwrap(), dir.path().to_path_buf());
    src.start_migration_to(conn).await.unwrap();
    let dst = recv.await.unwrap().unwrap();
    let bulk = {
        let src = src.clone();
        tokio::spawn(async move { src.migrate_all(4, None).await })
    };
    (dir, src, dst, proxy_task, bulk)
}

/// The receiver's connection drops mid-migration (a proxy between them is
/// killed): the sender's `migrate_all` fails within a bounded time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_gone_fails_the_sender_promptly() {
    let (_dir, src, dst, proxy_task, bulk) = slow_migration().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!bulk.is_finished());
    let killed = Instant::now();
    proxy_task.abort();
    let r = tokio::time::timeout(Duration::from_secs(10), bulk)
        .await
        .expect("the sender noticed within 10 s")
        .unwrap();
    let e = r.unwrap_err();
    eprintln!("sender failed after {:?}: {e}", killed.elapsed());
    // Later calls fail too, and nothing hangs.
    assert!(src.completed().await.is_err());
    // The receiver also sees it: no false completion.
    let w = tokio::time::timeout(Duration::from_secs(10), dst.wait_for_completion())
        .await
        .unwrap();
    assert!(w.is_err());
    src.close_all().await.unwrap();
    dst.close_all().await.unwrap();
}

/// The sender disappears mid-migration: the receiver's `wait_for_completion`
/// errors (never reports completion), and reads of blocks that never
/// arrived fail instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_gone_fails_the_receiver() {
    let (_dir, src, dst, proxy_task, bulk) = slow_migration().await;
    let waiter = {
        let dst = dst.clone();
        tokio::spawn(async move { dst.wait_for_completion().await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The sender "dies": its group and connection go away.
    bulk.abort();
    src.close_all().await.unwrap();
    drop(src);
    proxy_task.abort();
    let r = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the receiver noticed within 10 s")
        .unwrap();
    assert!(matches!(r, Err(ref e) if e.is_disconnected()), "{r:?}");
    assert_eq!(dst.completed_devices(), vec![false]);
    let p = dst.provider("disk").unwrap();
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        p.read_bytes((16 << 20) - 4096, 4096),
    )
    .await
    .expect("a read of a missing block does not hang");
    assert!(read.is_err());
    dst.close_all().await.unwrap();
}

/// A hostile sender (speaking the protocol directly): schemas with a path
/// outside the receiver's base directory, or a memory device far above the
/// receiver's limit, are refused with a clear error, and the sender is told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_schemas_are_refused() {
    let cases = [
        (
            "device \"evil\" {\n  system = \"file\"\n  size = \"1m\"\n  location = \"/etc/silo-evil.img\"\n}\n",
            1u64 << 20,
            "outside the receiver's base directory",
        ),
        (
            "device \"evil\" {\n  system = \"file\"\n  size = \"1m\"\n  location = \"../../escape.img\"\n}\n",
            1 << 20,
            "outside the receiver's base directory",
        ),
        (
            "device \"evil\" {\n  system = \"memory\"\n  size = \"1t\"\n}\n",
            1 << 40,
            "exceeds the receiver's limit",
        ),
    ];
    for (schema, size, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (evil, victim) = tcp_pair().await;
        let policy = ReceivePolicy::new(dir.path());
        let recv = tokio::spawn(DeviceGroup::new_from_protocol(
            victim,
            |_, s| s,
            ReceiveOptions::new(policy),
        ));
        let mut events = evil.incoming(0, Kind::Event).unwrap();
        let info = DeviceGroupInfo {
            devices: vec![(
                1,
                DeviceInfo {
                    size,
                    block_size: 1 << 20,
                    name: "evil".into(),
                    schema: schema.into(),
                },
            )],
        };
        evil.notify(0, Message::DeviceGroupInfo(info), Priority::Urgent)
            .await
            .unwrap();
        let err = recv.await.unwrap().unwrap_err();
        assert!(matches!(err, Error::Policy { .. }), "{err:?}");
        assert!(err.to_string().contains(want), "{err}");
        // The sender is told why.
        let req = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .unwrap()
            .unwrap();
        let Message::Event(Event {
            kind: EventKind::Custom(sub),
            payload,
        }) = &req.message
        else {
            panic!("{:?}", req.message)
        };
        assert_eq!(*sub, silo_devicegroup::EVENT_REFUSED);
        assert!(String::from_utf8_lossy(payload).contains(want));
        // (The receiver may already have dropped the connection.)
        let _ = req.respond(Message::Ack).await;
        assert!(!std::path::Path::new("/etc/silo-evil.img").exists());
    }
}

/// A real sender whose schema the receiver refuses gets the reason from
/// `start_migration_to`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_group_fails_start_migration_to() {
    let sdir = tempfile::tempdir().unwrap();
    let ddir = tempfile::tempdir().unwrap();
    let mut s = DeviceSchema::new("big", System::Memory, 64 << 20);
    s.block_size = Some(1 << 20);
    let mut f = DeviceSchema::new("f", System::File, 1 << 20);
    f.location = Some(sdir.path().join("f.img"));
    let src = DeviceGroup::new_from_schema(vec![s, f], GroupOptions::default())
        .await
        .unwrap();
    let (a, b) = tcp_pair().await;
    let mut policy = ReceivePolicy::new(ddir.path());
    policy.max_memory_device_size = 1 << 20;
    let recv = tokio::spawn(DeviceGroup::new_from_protocol(
        b,
        |_, s| s,
        ReceiveOptions::new(policy),
    ));
    let e = src.start_migration_to(a).await.unwrap_err();
    assert!(e.to_string().contains("refused"), "{e}");
    assert!(recv.await.unwrap().is_err());
    assert!(src.migrate_all(4, None).await.is_err());
    src.close_all().await.unwrap();
}
