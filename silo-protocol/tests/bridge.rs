//! ToProtocol / FromProtocol between real `silo-storage` providers over a
//! real TCP loopback connection.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use silo_protocol::bridge::{FromProtocol, FromProtocolHandler, ToProtocol};
use silo_protocol::transport::{Config, Connection};
use silo_protocol::*;
use silo_storage::{Capabilities, DynProvider, MemoryStorage, Op, Provider, ProviderExt};
use tokio::net::{TcpListener, TcpStream};

const SIZE: u64 = 1 << 20;
const BS: usize = 4096;

async fn tcp_pair() -> (Connection, Connection) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        Connection::connect_tcp(s, Config::default()).await.unwrap()
    });
    let c = TcpStream::connect(addr).await.unwrap();
    let client = Connection::connect_tcp(c, Config::default()).await.unwrap();
    (client, server.await.unwrap())
}

fn sha(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

#[derive(Default)]
struct Recorder {
    dirty: Mutex<Vec<BlockList>>,
    events: Mutex<Vec<Event>>,
    alt: Mutex<Vec<AlternateSource>>,
    yah: Mutex<Vec<BlockList>>,
    hash_writes: Mutex<Vec<WriteAtHash>>,
    infos: Mutex<Vec<DeviceInfo>>,
    removed: AtomicBool,
    slow_done: AtomicBool,
}

#[async_trait]
impl FromProtocolHandler for Recorder {
    async fn device_info(&self, info: DeviceInfo) {
        self.infos.lock().push(info);
    }
    async fn dirty_list(&self, list: BlockList) -> Result<(), ErrorResponse> {
        // The ack must wait for this to finish.
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.slow_done.store(true, Ordering::SeqCst);
        self.dirty.lock().push(list);
        Ok(())
    }
    async fn event(&self, event: Event) -> Result<(), ErrorResponse> {
        if event.kind == EventKind::Custom(99) {
            return Err(ErrorResponse::new(
                ErrorCode::Invalid,
                "custom 99 is refused",
            ));
        }
        self.events.lock().push(event);
        Ok(())
    }
    async fn alternate_sources(&self, list: Vec<AlternateSource>) -> Result<(), ErrorResponse> {
        *self.alt.lock() = list;
        Ok(())
    }
    async fn write_at_hash(&self, write: WriteAtHash) -> Result<(), ErrorResponse> {
        self.hash_writes.lock().push(write);
        Ok(())
    }
    async fn you_already_have(&self, list: BlockList) -> Result<(), ErrorResponse> {
        self.yah.lock().push(list);
        Ok(())
    }
    async fn removed(&self) {
        self.removed.store(true, Ordering::SeqCst);
    }
}

/// A provider that fails writes at one offset (to check that errors are
/// replied with their reason and serving continues).
struct FailAt {
    inner: MemoryStorage,
    bad_offset: u64,
    failures: AtomicUsize,
}

#[async_trait]
impl Provider for FailAt {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn read_at(&self, offset: u64, buf: BytesMut) -> silo_storage::Result<BytesMut> {
        self.inner.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: Bytes) -> silo_storage::Result<()> {
        if offset == self.bad_offset {
            self.failures.fetch_add(1, Ordering::SeqCst);
            return Err(silo_storage::Error::io(
                Op::Write,
                offset,
                data.len() as u64,
                std::io::Error::other("medium error"),
            ));
        }
        self.inner.write_at(offset, data).await
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_through_the_bridges_ends_with_equal_hashes() {
    let (src_conn, dst_conn) = tcp_pair().await;
    let dst: DynProvider = Arc::new(MemoryStorage::new(SIZE));
    let recorder = Arc::new(Recorder::default());
    let from = Arc::new(
        FromProtocol::new(dst_conn.clone(), 1, dst.clone()).with_handler(recorder.clone()),
    );
    let serving = tokio::spawn({
        let from = from.clone();
        async move { from.serve().await }
    });
    let to = Arc::new(ToProtocol::new(src_conn.clone(), 1, SIZE));
    to.set_compression(Compression::Lz4);
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    to.send_device_info(DeviceInfo {
        size: SIZE,
        block_size: BS as u32,
        name: "disk0".into(),
        schema: "device \"disk0\" {}".into(),
    })
    .await
    .unwrap();
    // Concurrent block writes of mixed content (zero, text-like, random),
    // each compression policy in turn.
    let mut tasks = Vec::new();
    for blk in 0..(SIZE as usize / BS) {
        let data: Vec<u8> = match blk % 4 {
            0 => vec![0; BS],
            1 => (0..BS).map(|i| b"hello silo "[i % 11]).collect(),
            2 => (0..BS).map(|_| rng.gen()).collect(),
            _ => (0..BS)
                .map(|i| if i < 100 { rng.gen() } else { 0 })
                .collect(),
        };
        model[blk * BS..(blk + 1) * BS].copy_from_slice(&data);
        let to = to.clone();
        tasks.push(tokio::spawn(async move {
            to.write_at((blk * BS) as u64, Bytes::from(data)).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    // The other policies, sequentially.
    for (i, policy) in [Compression::None, Compression::ZeroElision]
        .into_iter()
        .enumerate()
    {
        to.set_compression(policy);
        let blk = 16 + 4 * i; // a mostly-zero block (blk % 4 == 0 is all zero)
        let data: Vec<u8> = (0..BS).map(|j| if j % 1000 == 1 { 9 } else { 0 }).collect();
        model[blk * BS..(blk + 1) * BS].copy_from_slice(&data);
        to.write_at((blk * BS) as u64, Bytes::from(data))
            .await
            .unwrap();
    }
    to.set_compression(Compression::Lz4);
    // Unaligned write, trim and write-zeroes travel too.
    to.write_slice(5000, b"unaligned").await.unwrap();
    model[5000..5009].copy_from_slice(b"unaligned");
    to.trim(2 * BS as u64, 3 * BS as u64).await.unwrap();
    model[2 * BS..5 * BS].fill(0);
    to.write_zeroes(SIZE - 100, 100).await.unwrap();
    model[SIZE as usize - 100..].fill(0);
    // Reads through ToProtocol go to the destination.
    let back = to.read_bytes(4000, 2000).await.unwrap();
    assert_eq!(&back[..], &model[4000..6000]);
    let all = dst.read_bytes(0, SIZE as usize).await.unwrap();
    assert_eq!(
        sha(&all),
        sha(&model),
        "destination equals the source model"
    );
    assert_eq!(recorder.infos.lock()[0].name, "disk0");
    // Compression saved bytes on the wire.
    let m = to.metrics();
    assert!(m.wire_bytes.load(Ordering::Relaxed) < m.write_bytes.load(Ordering::Relaxed) * 3 / 4);
    // Out-of-range I/O is refused locally.
    assert!(to.write_slice(SIZE - 1, b"xx").await.is_err());
    assert!(to.read_bytes(SIZE, 1).await.is_err());
    // Remove-device ends serving.
    to.remove_device().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), serving)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(recorder.removed.load(Ordering::SeqCst));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_messages_are_acked_after_their_handler() {
    let (src_conn, dst_conn) = tcp_pair().await;
    let dst: DynProvider = Arc::new(MemoryStorage::new(SIZE));
    let recorder = Arc::new(Recorder::default());
    let from = Arc::new(FromProtocol::new(dst_conn, 1, dst.clone()).with_handler(recorder.clone()));
    tokio::spawn({
        let from = from.clone();
        async move { from.serve().await }
    });
    let to = ToProtocol::new(src_conn, 1, SIZE);
    to.send_dirty_list(BS as u32, vec![1, 2, 3]).await.unwrap();
    assert!(
        recorder.slow_done.load(Ordering::SeqCst),
        "ack came before the handler finished"
    );
    assert_eq!(recorder.dirty.lock()[0].blocks, vec![1, 2, 3]);
    // Out-of-range block index: error reply with the reason.
    let e = to.send_dirty_list(BS as u32, vec![256]).await.unwrap_err();
    assert!(
        matches!(
            e,
            Error::Remote {
                code: ErrorCode::OutOfRange,
                ..
            }
        ),
        "{e}"
    );
    to.send_event(Event::new(EventKind::PreLock)).await.unwrap();
    to.send_event(Event::custom(1, Bytes::from_static(b"authority")))
        .await
        .unwrap();
    let e = to
        .send_event(Event::custom(99, Bytes::new()))
        .await
        .unwrap_err();
    match e {
        Error::Remote { code, text, .. } => {
            assert_eq!(code, ErrorCode::Invalid);
            assert!(text.contains("refused"));
        }
        e => panic!("{e}"),
    }
    assert_eq!(recorder.events.lock().len(), 2);
    assert_eq!(
        recorder.events.lock()[1].payload,
        Bytes::from_static(b"authority")
    );
    to.send_you_already_have(BS as u32, vec![0, 9])
        .await
        .unwrap();
    assert_eq!(recorder.yah.lock()[0].blocks, vec![0, 9]);

    // Alternate sources: a block whose data still has the listed hash goes
    // as a hash write; changed data goes with data.
    let block = Bytes::from(vec![42u8; BS]);
    to.send_alternate_sources(vec![
        AlternateSource {
            offset: 0,
            length: BS as u64,
            sha256: sha(&block),
            location: "s3 bucket disk".into(),
        },
        AlternateSource {
            offset: BS as u64,
            length: BS as u64,
            sha256: sha(&block),
            location: "s3 bucket disk".into(),
        },
    ])
    .await
    .unwrap();
    assert_eq!(recorder.alt.lock().len(), 2);
    to.write_at(0, block.clone()).await.unwrap();
    to.write_at(BS as u64, Bytes::from(vec![43u8; BS]))
        .await
        .unwrap();
    assert_eq!(to.metrics().hash_writes.load(Ordering::Relaxed), 1);
    assert_eq!(recorder.hash_writes.lock().len(), 1);
    assert_eq!(recorder.hash_writes.lock()[0].sha256, sha(&block));
    assert_eq!(
        dst.read_bytes(0, 1).await.unwrap()[0],
        0,
        "hash write carries no data"
    );
    assert_eq!(dst.read_bytes(BS as u64, 1).await.unwrap()[0], 43);
    // After clearing, the same block travels with data.
    to.clear_alternate_sources();
    to.write_at(0, block.clone()).await.unwrap();
    assert_eq!(dst.read_bytes(0, 1).await.unwrap()[0], 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_errors_are_replied_and_serving_continues() {
    let (src_conn, dst_conn) = tcp_pair().await;
    let failing = Arc::new(FailAt {
        inner: MemoryStorage::new(SIZE / 2),
        bad_offset: 8192,
        failures: AtomicUsize::new(0),
    });
    let from = Arc::new(FromProtocol::new(dst_conn, 1, failing.clone()));
    tokio::spawn({
        let from = from.clone();
        async move { from.serve().await }
    });
    // The source believes the device is larger than the destination's.
    let to = ToProtocol::new(src_conn, 1, SIZE);
    for round in 0..3 {
        let e = to.write_slice(8192, b"boom").await.unwrap_err();
        assert!(e.to_string().contains("medium error"), "round {round}: {e}");
        let e = to.write_slice(SIZE - 10, b"past").await.unwrap_err();
        assert!(e.to_string().contains("OutOfRange"), "round {round}: {e}");
        to.write_slice(0, b"still served").await.unwrap();
    }
    assert_eq!(failing.failures.load(Ordering::SeqCst), 3);
    assert_eq!(from.metrics().errors.load(Ordering::Relaxed), 6);
    assert_eq!(
        &failing.read_bytes(0, 12).await.unwrap()[..],
        b"still served"
    );
    // Hash writes without a handler are refused (the data did not arrive).
    let e = to
        .write_at_hash(WriteAtHash {
            offset: 0,
            length: 16,
            location: HashLocation::S3,
            sha256: [0; 32],
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Remote {
                code: ErrorCode::Unsupported,
                ..
            }
        ),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn need_at_reaches_the_source_and_destination_reads_are_served() {
    let (src_conn, dst_conn) = tcp_pair().await;
    let src: DynProvider = Arc::new(MemoryStorage::new(SIZE));
    src.write_slice(12345, b"source data").await.unwrap();
    let to = Arc::new(ToProtocol::new(src_conn, 2, SIZE));
    let mut needs = to.need_at_requests().unwrap();
    let mut dont = to.dont_need_at_requests().unwrap();
    tokio::spawn({
        let to = to.clone();
        let src = src.clone();
        async move { to.serve_reads(src, 4).await }
    });
    let from = Arc::new(FromProtocol::new(
        dst_conn,
        2,
        Arc::new(MemoryStorage::new(SIZE)),
    ));
    // A waiting cache calls these synchronously from its callbacks.
    let need: Arc<dyn Fn(u64, u64) + Send + Sync> = Arc::new(from.need_at_fn());
    let dont_fn: Arc<dyn Fn(u64, u64) + Send + Sync> = Arc::new(from.dont_need_at_fn());
    need(8192, 4096);
    dont_fn(0, 4096);
    from.need_at(0, 0).unwrap(); // empty: nothing sent
    let n = needs.recv().await.unwrap();
    assert_eq!(
        n.message,
        Message::NeedAt(Range {
            offset: 8192,
            length: 4096
        })
    );
    assert!(!n.needs_response());
    let d = dont.recv().await.unwrap();
    assert_eq!(
        d.message,
        Message::DontNeedAt(Range {
            offset: 0,
            length: 4096
        })
    );
    let data = from.read_remote(12345, 11).await.unwrap();
    assert_eq!(&data[..], b"source data");
    let e = from.read_remote(SIZE - 1, 2).await.unwrap_err();
    assert!(
        matches!(
            e,
            Error::Remote {
                code: ErrorCode::OutOfRange,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(from.metrics().need_at.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connection_fails_writers_and_ends_serving() {
    let (src_conn, dst_conn) = tcp_pair().await;
    // A destination that never finishes a write: the source's writes hang
    // until the connection goes away.
    struct Stuck;
    #[async_trait]
    impl Provider for Stuck {
        fn size(&self) -> u64 {
            SIZE
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities::NONE
        }
        async fn read_at(&self, _o: u64, b: BytesMut) -> silo_storage::Result<BytesMut> {
            Ok(b)
        }
        async fn write_at(&self, _o: u64, _d: Bytes) -> silo_storage::Result<()> {
            std::future::pending().await
        }
        async fn flush(&self) -> silo_storage::Result<()> {
            Ok(())
        }
        async fn trim(&self, _o: u64, _l: u64) -> silo_storage::Result<()> {
            Ok(())
        }
        async fn write_zeroes(&self, _o: u64, _l: u64) -> silo_storage::Result<()> {
            Ok(())
        }
        fn cancel_writes(&self, _o: u64, _l: u64) {}
        async fn close(&self) -> silo_storage::Result<()> {
            Ok(())
        }
    }
    let from = Arc::new(FromProtocol::new(dst_conn.clone(), 1, Arc::new(Stuck)));
    let serving = tokio::spawn({
        let from = from.clone();
        async move { from.serve().await }
    });
    let to = Arc::new(ToProtocol::new(src_conn.clone(), 1, SIZE));
    let mut writers = Vec::new();
    for i in 0..8u64 {
        let to = to.clone();
        writers.push(tokio::spawn(async move {
            to.write_at(i * 4096, Bytes::from(vec![1u8; 4096])).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    dst_conn.close();
    for w in writers {
        let e = tokio::time::timeout(Duration::from_secs(2), w)
            .await
            .expect("writer hung after the connection dropped")
            .unwrap()
            .unwrap_err();
        assert_eq!(e.kind(), silo_storage::ErrorKind::Remote, "{e}");
    }
    let r = tokio::time::timeout(Duration::from_secs(2), serving)
        .await
        .unwrap()
        .unwrap();
    assert!(r.unwrap_err().is_connection_closed());
}
