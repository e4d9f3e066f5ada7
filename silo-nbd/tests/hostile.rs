//! Hostile and unusual clients, spoken byte by byte over real TCP: bad
//! magic, oversized lengths, unknown commands, clients vanishing
//! mid-request; plus out-of-order replies behind a slow provider and
//! graceful shutdown draining in-flight requests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use silo_nbd::proto::*;
use silo_nbd::{Export, Server, ServerConfig};
use silo_storage::{Capabilities, MemoryStorage, Provider, ProviderExt, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(10);

/// Reads at offsets below `slow_below` wait `delay` first; writes wait
/// for a permit of `write_gate`, if there is one.
struct Slow {
    inner: MemoryStorage,
    slow_below: u64,
    delay: Duration,
    reads: AtomicU64,
    write_gate: Option<tokio::sync::Semaphore>,
}

#[async_trait]
impl Provider for Slow {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn read_at(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        if offset < self.slow_below {
            tokio::time::sleep(self.delay).await;
        }
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: Bytes) -> Result<()> {
        if let Some(g) = &self.write_gate {
            g.acquire().await.expect("never closed").forget();
        }
        self.inner.write_at(offset, data).await
    }
    async fn flush(&self) -> Result<()> {
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.trim(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.write_zeroes(offset, len).await
    }
    fn cancel_writes(&self, _: u64, _: u64) {}
    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

/// Fails every read and write at offsets ≥ 512 KiB with an I/O error.
struct Faulty(MemoryStorage);

#[async_trait]
impl Provider for Faulty {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
    async fn read_at(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        if offset >= 512 * 1024 {
            return Err(silo_storage::Error::io(
                silo_storage::Op::Read,
                offset,
                buf.len() as u64,
                std::io::Error::other("medium error"),
            ));
        }
        self.0.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: Bytes) -> Result<()> {
        if offset >= 512 * 1024 {
            return Err(silo_storage::Error::io(
                silo_storage::Op::Write,
                offset,
                data.len() as u64,
                std::io::Error::other("medium error"),
            ));
        }
        self.0.write_at(offset, data).await
    }
    async fn flush(&self) -> Result<()> {
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.0.trim(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.0.write_zeroes(offset, len).await
    }
    fn cancel_writes(&self, _: u64, _: u64) {}
    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

async fn start(slow: Duration) -> (Server, u16, Arc<Slow>) {
    let p = Arc::new(Slow {
        inner: MemoryStorage::new(1 << 20),
        slow_below: 4096,
        delay: slow,
        reads: AtomicU64::new(0),
        write_gate: None,
    });
    let server = Server::new(ServerConfig::default().with_max_in_flight(16));
    server.add_export(Export::new("disk", p.clone())).unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let s = server.clone();
    tokio::spawn(async move { s.serve_tcp(l).await });
    (server, port, p)
}

/// Fixed-newstyle handshake with NBD_OPT_GO; returns a stream in
/// transmission (simple replies).
async fn connect(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    let mut m = Vec::new();
    m.extend_from_slice(&3u32.to_be_bytes());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&(4u32 + 4 + 2).to_be_bytes());
    m.extend_from_slice(&4u32.to_be_bytes());
    m.extend_from_slice(b"disk");
    m.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&m).await.unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).await.unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).await.unwrap();
        match kind {
            REP_ACK => return s,
            REP_INFO => {}
            other => panic!("unexpected reply {other:#x}"),
        }
    }
}

fn request(kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(28);
    v.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

/// Reads one simple reply: (error, cookie).
async fn reply<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> (u32, u64) {
    let mut h = [0u8; 16];
    tokio::time::timeout(T, s.read_exact(&mut h))
        .await
        .expect("reply in time")
        .unwrap();
    assert_eq!(
        u32::from_be_bytes(h[..4].try_into().unwrap()),
        SIMPLE_REPLY_MAGIC
    );
    (
        u32::from_be_bytes(h[4..8].try_into().unwrap()),
        u64::from_be_bytes(h[8..16].try_into().unwrap()),
    )
}

async fn expect_closed(s: &mut TcpStream) {
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(T, s.read(&mut buf))
            .await
            .expect("closed in time")
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// After any abuse, the server still serves a well-behaved client.
async fn still_serves(port: u16) {
    let mut s = connect(port).await;
    s.write_all(&request(CMD_WRITE, 0, 1, 8192, 4))
        .await
        .unwrap();
    s.write_all(b"good").await.unwrap();
    assert_eq!(reply(&mut s).await, (0, 1));
    s.write_all(&request(CMD_READ, 0, 2, 8192, 4))
        .await
        .unwrap();
    assert_eq!(reply(&mut s).await, (0, 2));
    let mut d = [0u8; 4];
    s.read_exact(&mut d).await.unwrap();
    assert_eq!(&d, b"good");
    s.write_all(&request(CMD_DISC, 0, 3, 0, 0)).await.unwrap();
    expect_closed(&mut s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_handshake_magic_and_flags_close_the_connection() {
    let (server, port, _) = start(Duration::ZERO).await;
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.unwrap();
    s.write_all(&3u32.to_be_bytes()).await.unwrap();
    s.write_all(&[0x41; 16]).await.unwrap();
    expect_closed(&mut s).await;

    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.read_exact(&mut g).await.unwrap();
    s.write_all(&0xffff_0000u32.to_be_bytes()).await.unwrap();
    expect_closed(&mut s).await;
    still_serves(port).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_magic_closes_the_connection() {
    let (server, port, _) = start(Duration::ZERO).await;
    let mut s = connect(port).await;
    s.write_all(&[0xee; 28]).await.unwrap();
    expect_closed(&mut s).await;
    still_serves(port).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_write_closes_without_buffering() {
    let (server, port, _) = start(Duration::ZERO).await;
    let mut s = connect(port).await;
    s.write_all(&request(CMD_WRITE, 0, 1, 0, u32::MAX))
        .await
        .unwrap();
    // The server must not wait for 4 GiB; it closes right away.
    expect_closed(&mut s).await;
    // A write past the end within the payload limit is answered ENOSPC and
    // its payload skipped, keeping the stream in sync.
    let mut s = connect(port).await;
    s.write_all(&request(CMD_WRITE, 0, 2, (1 << 20) - 10, 4096))
        .await
        .unwrap();
    s.write_all(&[9u8; 4096]).await.unwrap();
    assert_eq!(reply(&mut s).await, (28, 2));
    // An oversized READ is refused with EINVAL, connection kept.
    s.write_all(&request(CMD_READ, 0, 3, 0, MAX_PAYLOAD + 1))
        .await
        .unwrap();
    assert_eq!(reply(&mut s).await, (22, 3));
    still_serves(port).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_command_and_flags_get_einval_and_keep_sync() {
    let (server, port, _) = start(Duration::ZERO).await;
    let mut s = connect(port).await;
    s.write_all(&request(42, 0, 7, 0, 0)).await.unwrap();
    assert_eq!(reply(&mut s).await, (22, 7));
    s.write_all(&request(CMD_FLUSH, 1 << 12, 8, 0, 0))
        .await
        .unwrap();
    assert_eq!(reply(&mut s).await, (22, 8));
    // BLOCK_STATUS without structured replies / meta context: EINVAL.
    s.write_all(&request(CMD_BLOCK_STATUS, 0, 9, 0, 4096))
        .await
        .unwrap();
    assert_eq!(reply(&mut s).await, (22, 9));
    s.write_all(&request(CMD_FLUSH, 0, 10, 0, 0)).await.unwrap();
    assert_eq!(reply(&mut s).await, (0, 10));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_mid_request_is_harmless() {
    let (server, port, p) = start(Duration::ZERO).await;
    for cut in [3usize, 27, 28 + 1000] {
        let mut s = connect(port).await;
        let mut w = request(CMD_WRITE, 0, 1, 0, 1 << 20);
        w.extend_from_slice(&vec![0x77u8; 1 << 20]);
        s.write_all(&w[..cut]).await.unwrap();
        drop(s);
    }
    // A read in flight whose client vanishes completes and is dropped.
    let mut s = connect(port).await;
    s.write_all(&request(CMD_READ, 0, 1, 0, 4096))
        .await
        .unwrap();
    drop(s);
    still_serves(port).await;
    // No partial write reached the provider.
    assert_eq!(
        p.inner.read_bytes(0, 16).await.unwrap(),
        Bytes::from(vec![0u8; 16])
    );
    let stats = server.export("disk").unwrap().metrics().snapshot();
    assert_eq!(stats.writes, 1, "only still_serves wrote: {stats:?}");
    server.shutdown().await;
    let stats = server.export("disk").unwrap().metrics().snapshot();
    assert_eq!((stats.in_flight, stats.connections), (0, 0), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_read_does_not_block_other_requests() {
    let (server, port, _) = start(Duration::from_millis(400)).await;
    let mut s = connect(port).await;
    let mut batch = request(CMD_READ, 0, 1, 0, 512); // slow
    for c in 2..=10u64 {
        batch.extend_from_slice(&request(CMD_READ, 0, c, 8192, 512)); // fast
    }
    s.write_all(&batch).await.unwrap();
    let mut order = Vec::new();
    for _ in 0..10 {
        let (err, cookie) = reply(&mut s).await;
        assert_eq!(err, 0);
        let mut d = [0u8; 512];
        s.read_exact(&mut d).await.unwrap();
        order.push(cookie);
    }
    assert_eq!(order.last(), Some(&1), "slow read answered last: {order:?}");
    let mut fast: Vec<u64> = order[..9].to_vec();
    fast.sort();
    assert_eq!(fast, (2..=10).collect::<Vec<_>>());
    server.shutdown().await;
}

/// Writes that wait for their provider hold at most a few MiB of payload
/// per connection: the server stops reading (TCP back-pressure) instead of
/// buffering everything the client sends, and answers all once they land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_writes_hold_bounded_memory() {
    const MIB: u64 = 1 << 20;
    let p = Arc::new(Slow {
        inner: MemoryStorage::new(64 * MIB),
        slow_below: 0,
        delay: Duration::ZERO,
        reads: AtomicU64::new(0),
        write_gate: Some(tokio::sync::Semaphore::new(0)),
    });
    let server = Server::new(ServerConfig::default());
    let export = server.add_export(Export::new("disk", p.clone())).unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let s = server.clone();
    tokio::spawn(async move { s.serve_tcp(l).await });
    let s = connect(port).await;
    let (mut r, mut w) = s.into_split();
    let n = 48u64;
    let writer = tokio::spawn(async move {
        for c in 0..n {
            w.write_all(&request(CMD_WRITE, 0, c, c * MIB, MIB as u32))
                .await
                .unwrap();
            w.write_all(&vec![c as u8 + 1; MIB as usize]).await.unwrap();
        }
        w
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stuck = export.metrics().snapshot().in_flight;
    assert!((2..=9).contains(&stuck), "{stuck} writes in flight");
    p.write_gate.as_ref().unwrap().add_permits(n as usize);
    for _ in 0..n {
        let (err, _) = reply(&mut r).await;
        assert_eq!(err, 0);
    }
    let _w = writer.await.unwrap();
    for c in [0, 17, n - 1] {
        let b = p.inner.read_bytes(c * MIB, MIB as usize).await.unwrap();
        assert!(b.iter().all(|&x| x == c as u8 + 1), "block {c}");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_pipelined_requests_all_answered() {
    let (server, port, _) = start(Duration::ZERO).await;
    let mut s = connect(port).await;
    let (mut r, mut w) = s.split();
    let n = 2000u64;
    let writer = async {
        for c in 0..n {
            let off = (c % 256) * 4096;
            w.write_all(&request(CMD_READ, 0, c, off, 4096))
                .await
                .unwrap();
        }
    };
    let reader = async {
        let mut seen = vec![false; n as usize];
        for _ in 0..n {
            let mut h = [0u8; 16];
            r.read_exact(&mut h).await.unwrap();
            assert_eq!(u32::from_be_bytes(h[4..8].try_into().unwrap()), 0);
            let c = u64::from_be_bytes(h[8..16].try_into().unwrap());
            let mut d = vec![0u8; 4096];
            r.read_exact(&mut d).await.unwrap();
            assert!(
                !std::mem::replace(&mut seen[c as usize], true),
                "cookie {c} twice"
            );
        }
        seen.iter().all(|&x| x)
    };
    let ((), all) = tokio::time::timeout(T, async { tokio::join!(writer, reader) })
        .await
        .unwrap();
    assert!(all);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_then_closes() {
    let (server, port, p) = start(Duration::from_millis(300)).await;
    let mut s = connect(port).await;
    s.write_all(&request(CMD_READ, 0, 1, 0, 512)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await; // request is in flight
    let srv = server.clone();
    let shut = tokio::spawn(async move { srv.shutdown().await });
    let (err, cookie) = reply(&mut s).await;
    assert_eq!(
        (err, cookie),
        (0, 1),
        "in-flight read completed, not aborted"
    );
    let mut d = [0u8; 512];
    s.read_exact(&mut d).await.unwrap();
    expect_closed(&mut s).await;
    tokio::time::timeout(T, shut).await.unwrap().unwrap();
    assert_eq!(p.reads.load(Ordering::SeqCst), 1);
    // New connections are refused or closed immediately.
    match TcpStream::connect(("127.0.0.1", port)).await {
        Err(_) => {}
        Ok(mut s) => expect_closed(&mut s).await,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_io_errors_become_eio_and_the_connection_survives() {
    let server = Server::default();
    server
        .add_export(Export::new(
            "disk",
            Arc::new(Faulty(MemoryStorage::new(1 << 20))),
        ))
        .unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let s = server.clone();
    tokio::spawn(async move { s.serve_tcp(l).await });
    let mut c = connect(port).await;
    c.write_all(&request(CMD_READ, 0, 1, 600 * 1024, 4096))
        .await
        .unwrap();
    assert_eq!(reply(&mut c).await, (5, 1), "EIO, and no data follows");
    c.write_all(&request(CMD_WRITE, 0, 2, 600 * 1024, 4))
        .await
        .unwrap();
    c.write_all(b"data").await.unwrap();
    assert_eq!(reply(&mut c).await, (5, 2));
    c.write_all(&request(CMD_READ, 0, 3, 0, 4)).await.unwrap();
    assert_eq!(reply(&mut c).await, (0, 3));
    let mut d = [1u8; 4];
    c.read_exact(&mut d).await.unwrap();
    assert_eq!(d, [0; 4]);
    assert_eq!(
        server.export("disk").unwrap().metrics().snapshot().errors,
        2
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_never_reads_is_bounded_and_cannot_block_shutdown() {
    let server = Server::new(
        ServerConfig::default()
            .with_max_in_flight(4)
            .with_drain_timeout(Duration::from_millis(500)),
    );
    server
        .add_export(Export::new("disk", Arc::new(MemoryStorage::new(8 << 20))))
        .unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let s = server.clone();
    tokio::spawn(async move { s.serve_tcp(l).await });
    let mut c = connect(port).await;
    // 200 reads of 1 MiB = 200 MiB of replies nobody reads, plus error
    // replies to unknown commands.
    let flood = tokio::spawn(async move {
        for i in 0..200u64 {
            let mut batch = request(CMD_READ, 0, i, 0, 1 << 20);
            batch.extend_from_slice(&request(77, 0, i, 0, 0));
            if c.write_all(&batch).await.is_err() {
                break;
            }
        }
        c // keep the socket open (and unread)
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    let stats = server.export("disk").unwrap().metrics().snapshot();
    assert!(
        stats.reads < 64,
        "server kept executing unread requests: {stats:?}"
    );
    assert!(stats.in_flight <= 4, "{stats:?}");
    tokio::time::timeout(Duration::from_secs(10), server.shutdown())
        .await
        .expect("shutdown is not blocked by a client that stopped reading");
    flood.abort();
}

/// The kernel's side of a socketpair: transmission only, simple replies,
/// the way `kernel::attach` serves `/dev/nbdN` (testable without the module).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transmission_only_sockets_as_handed_to_the_kernel() {
    let server = Server::default();
    server
        .add_export(Export::new("disk", Arc::new(MemoryStorage::new(1 << 20))))
        .unwrap();
    let (ours, mut kernel) = tokio::net::UnixStream::pair().unwrap();
    server.spawn_transmission(ours, "disk").unwrap();
    assert!(server
        .spawn_transmission(tokio::net::UnixStream::pair().unwrap().0, "nope")
        .is_err());
    let mut w = request(CMD_WRITE, CMD_FLAG_FUA, 1, 4096, 5);
    w.extend_from_slice(b"hello");
    w.extend_from_slice(&request(CMD_FLUSH, 0, 2, 0, 0));
    w.extend_from_slice(&request(CMD_READ, 0, 3, 4096, 5));
    kernel.write_all(&w).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        let mut h = [0u8; 16];
        kernel.read_exact(&mut h).await.unwrap();
        assert_eq!(&h[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&h[4..8], &[0; 4]);
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        if cookie == 3 {
            let mut d = [0u8; 5];
            kernel.read_exact(&mut d).await.unwrap();
            assert_eq!(&d, b"hello");
        }
        got.push(cookie);
    }
    got.sort();
    assert_eq!(got, [1, 2, 3]);
    kernel
        .write_all(&request(CMD_DISC, 0, 4, 0, 0))
        .await
        .unwrap();
    let mut rest = Vec::new();
    kernel.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    server.shutdown().await;
}

/// Large aligned writes to a plain memory device are received in pieces
/// the device adopts: payloads sent in odd fragments arrive intact, a
/// client vanishing mid-payload leaves nothing behind, and the stream stays
/// in sync around them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_received_in_pieces_survive_fragments_and_disconnects() {
    const CHUNK: u32 = 64 * 1024;
    let mem = Arc::new(MemoryStorage::new(1 << 20));
    assert_eq!(mem.adopt_size(), Some(CHUNK as usize));
    let server = Server::new(ServerConfig::default());
    server.add_export(Export::new("disk", mem.clone())).unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let s = server.clone();
    tokio::spawn(async move { s.serve_tcp(l).await });

    // Vanishing mid-payload, at several points (inside the first piece,
    // on a piece boundary, in a later piece): no byte reaches the device.
    for cut in [28 + 10, 28 + CHUNK as usize, 28 + 3 * CHUNK as usize + 5] {
        let mut s = connect(port).await;
        // (Chunks 12..16, which nothing else writes: the final comparison
        // below checks them too.)
        let mut w = request(CMD_WRITE, 0, 1, 12 * u64::from(CHUNK), 4 * CHUNK);
        w.extend_from_slice(&vec![0x55u8; 4 * CHUNK as usize]);
        s.write_all(&w[..cut]).await.unwrap();
        drop(s);
    }
    // (Each of those connections has ended by the time the server has
    // none left.)
    let deadline = tokio::time::Instant::now() + T;
    while server
        .export("disk")
        .unwrap()
        .metrics()
        .snapshot()
        .connections
        > 0
    {
        assert!(tokio::time::Instant::now() < deadline, "connections linger");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let got = mem.read_bytes(0, 1 << 20).await.unwrap();
    assert!(
        got.iter().all(|&x| x == 0),
        "a partial write reached the device"
    );

    // Two large writes (one with FUA) and a small unaligned one, sent in
    // fragments of odd sizes, then read back.
    let a: Vec<u8> = (0..4 * CHUNK).map(|i| (i % 253) as u8).collect();
    let b: Vec<u8> = (0..2 * CHUNK).map(|i| (i % 241) as u8 ^ 0xa5).collect();
    let mut stream = request(CMD_WRITE, 0, 1, u64::from(CHUNK), 4 * CHUNK);
    stream.extend_from_slice(&a);
    stream.extend_from_slice(&request(
        CMD_WRITE,
        CMD_FLAG_FUA,
        2,
        8 * u64::from(CHUNK),
        2 * CHUNK,
    ));
    stream.extend_from_slice(&b);
    stream.extend_from_slice(&request(CMD_WRITE, 0, 3, u64::from(CHUNK) + 100, 7));
    stream.extend_from_slice(b"patched");
    let mut s = connect(port).await;
    let mut at = 0;
    for (i, n) in [1usize, 26, 1, 5000, 65536, 3, 100_000]
        .iter()
        .cycle()
        .enumerate()
    {
        if at >= stream.len() {
            break;
        }
        let end = (at + n).min(stream.len());
        s.write_all(&stream[at..end]).await.unwrap();
        at = end;
        if i % 3 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let mut cookies = vec![
        reply(&mut s).await,
        reply(&mut s).await,
        reply(&mut s).await,
    ];
    cookies.sort();
    assert_eq!(cookies, vec![(0, 1), (0, 2), (0, 3)]);
    let mut want = vec![0u8; 1 << 20];
    want[CHUNK as usize..5 * CHUNK as usize].copy_from_slice(&a);
    want[8 * CHUNK as usize..10 * CHUNK as usize].copy_from_slice(&b);
    want[CHUNK as usize + 100..CHUNK as usize + 107].copy_from_slice(b"patched");
    let got = mem.read_bytes(0, 1 << 20).await.unwrap();
    assert!(got[..] == want[..], "device contents differ");
    let stats = server.export("disk").unwrap().metrics().snapshot();
    assert_eq!(
        stats.writes, 3,
        "only the complete writes counted: {stats:?}"
    );
    s.write_all(&request(CMD_DISC, 0, 4, 0, 0)).await.unwrap();
    expect_closed(&mut s).await;
    server.shutdown().await;
}
