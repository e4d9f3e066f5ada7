//! Transport tests over real TCP loopback sockets and `tokio::io::duplex`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use silo_protocol::transport::{Config, Connection, Priority};
use silo_protocol::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn tcp_pair(a: Config, b: Config) -> (Connection, Connection) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        s.set_nodelay(true).unwrap();
        let (r, w) = s.into_split();
        Connection::from_split(r, w, b).await.unwrap()
    });
    let c = TcpStream::connect(addr).await.unwrap();
    c.set_nodelay(true).unwrap();
    let (r, w) = c.into_split();
    let client = Connection::from_split(r, w, a).await.unwrap();
    (client, server.await.unwrap())
}

async fn duplex_pair(a: Config, b: Config) -> (Connection, Connection) {
    let (x, y) = tokio::io::duplex(256 << 10);
    let (ca, cb) = tokio::join!(Connection::connect(x, a), Connection::connect(y, b));
    (ca.unwrap(), cb.unwrap())
}

/// The handshake of a hand-written raw peer.
async fn raw_hello<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S, depth: u32) {
    let (mut r, mut w) = tokio::io::split(s);
    raw_hello2(&mut r, &mut w, depth).await;
}

async fn raw_hello2<R, W>(r: &mut R, w: &mut W, depth: u32)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    w.write_all(&Hello::new(Features::ALL, 1 << 20, depth).encode())
        .await
        .unwrap();
    let mut hello = [0u8; 32];
    r.read_exact(&mut hello).await.unwrap();
}

/// Serves writes and reads of `device` against an in-memory Vec.
fn serve_device(conn: &Connection, device: u32, size: usize) -> tokio::task::JoinHandle<Vec<u8>> {
    let mut writes = conn.incoming(device, Kind::WriteAt).unwrap();
    let mut reads = conn.incoming(device, Kind::ReadAt).unwrap();
    tokio::spawn(async move {
        let mut data = vec![0u8; size];
        loop {
            tokio::select! {
                r = writes.recv() => {
                    let Ok(req) = r else { return data };
                    let Message::WriteAt(w) = &req.message else { panic!() };
                    let d = w.data().unwrap();
                    data[w.offset as usize..w.offset as usize + d.len()].copy_from_slice(&d);
                    let length = w.length;
                    req.respond(Message::WriteAtOk { length }).await.unwrap();
                }
                r = reads.recv() => {
                    let Ok(req) = r else { return data };
                    let Message::ReadAt(ra) = &req.message else { panic!() };
                    let d = Bytes::copy_from_slice(&data[ra.offset as usize..(ra.offset + ra.length as u64) as usize]);
                    req.respond(Message::ReadAtData(d)).await.unwrap();
                }
            }
        }
    })
}

fn pattern(device: u32, block: u64, len: usize) -> Bytes {
    (0..len)
        .map(|i| {
            if i % 3 == 0 {
                0
            } else {
                (device as u64 * 31 + block * 7 + i as u64) as u8
            }
        })
        .collect::<Vec<u8>>()
        .into()
}

async fn concurrent_devices(a: Connection, b: Connection) {
    const DEVICES: u32 = 4;
    const BLOCKS: u64 = 32;
    const BS: usize = 8192;
    let servers: Vec<_> = (1..=DEVICES)
        .map(|d| serve_device(&b, d, BLOCKS as usize * BS))
        .collect();
    let mut tasks = Vec::new();
    for d in 1..=DEVICES {
        for blk in 0..BLOCKS {
            let a = a.clone();
            tasks.push(tokio::spawn(async move {
                let data = pattern(d, blk, BS);
                let comp = [
                    Compression::None,
                    Compression::Lz4,
                    Compression::ZeroElision,
                ][(blk % 3) as usize];
                a.write_at(d, blk * BS as u64, &data, comp, Priority::Bulk)
                    .await
                    .unwrap();
                let back = a
                    .read_at(d, blk * BS as u64, BS as u32, Priority::Urgent)
                    .await
                    .unwrap();
                assert_eq!(back, data, "device {d} block {blk}");
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    a.close();
    for (i, s) in servers.into_iter().enumerate() {
        let data = tokio::time::timeout(Duration::from_secs(5), s)
            .await
            .unwrap()
            .unwrap();
        let d = i as u32 + 1;
        for blk in 0..BLOCKS {
            assert_eq!(
                &data[blk as usize * BS..(blk as usize + 1) * BS],
                &pattern(d, blk, BS)[..]
            );
        }
    }
    let m = a.metrics();
    assert_eq!(m.kind(Kind::WriteAt).frames_out, DEVICES as u64 * BLOCKS);
    assert_eq!(m.kind(Kind::ReadAt).frames_out, DEVICES as u64 * BLOCKS);
    assert_eq!(m.kind(Kind::ReadAtData).frames_in, DEVICES as u64 * BLOCKS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_on_several_devices_tcp() {
    let (a, b) = tcp_pair(Config::default(), Config::default()).await;
    concurrent_devices(a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_on_several_devices_duplex() {
    let (a, b) = duplex_pair(Config::default(), Config::default()).await;
    concurrent_devices(a, b).await;
}

async fn drop_mid_stream(a: Connection, b: Connection) {
    // The peer receives requests but never answers; then the connection dies.
    let mut writes = b.incoming(1, Kind::WriteAt).unwrap();
    let mut waiters = Vec::new();
    for i in 0..20u64 {
        let a = a.clone();
        waiters.push(tokio::spawn(async move {
            a.write_at(
                1,
                i * 4096,
                &Bytes::from(vec![1u8; 4096]),
                Compression::None,
                Priority::Bulk,
            )
            .await
        }));
    }
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(writes.recv().await.unwrap());
    }
    // A consumer on the dropping side, blocked in recv.
    let mut events = a.incoming(1, Kind::Event).unwrap();
    let recv_waiter = tokio::spawn(async move { events.recv().await.map(|_| ()) });
    let start = Instant::now();
    std::mem::forget(got); // no error replies: the peer just vanishes
    b.close();
    drop(writes);
    drop(b);
    for w in waiters {
        let r = tokio::time::timeout(Duration::from_secs(2), w)
            .await
            .expect("waiter hung")
            .unwrap();
        let e = r.unwrap_err();
        assert!(e.is_connection_closed(), "{e}");
    }
    let r = tokio::time::timeout(Duration::from_secs(2), recv_waiter)
        .await
        .unwrap()
        .unwrap();
    assert!(r.unwrap_err().is_connection_closed());
    assert!(start.elapsed() < Duration::from_secs(2));
    // Later calls fail at once.
    let e = a.read_at(1, 0, 10, Priority::Urgent).await.unwrap_err();
    assert!(e.is_connection_closed());
    let e = a
        .notify(1, Message::RemoveDevice, Priority::Urgent)
        .await
        .unwrap_err();
    assert!(e.is_connection_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_drop_fails_every_waiter_tcp() {
    let (a, b) = tcp_pair(Config::default(), Config::default()).await;
    drop_mid_stream(a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_drop_fails_every_waiter_duplex() {
    let (a, b) = duplex_pair(Config::default(), Config::default()).await;
    drop_mid_stream(a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_socket_dying_inside_a_frame_fails_waiters() {
    // A hand-written peer: handshake, read one request, then send half a
    // frame and close the socket.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let peer = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        raw_hello(&mut s, 8).await;
        let mut hdr = [0u8; HEADER_LEN];
        s.read_exact(&mut hdr).await.unwrap();
        let h = FrameHeader::decode(&hdr, &Limits::default()).unwrap();
        let mut body = vec![0u8; h.len as usize];
        s.read_exact(&mut body).await.unwrap();
        // Half of a ReadAtData frame of 100 bytes.
        let resp = Frame {
            device: h.device,
            txid: h.txid,
            message: Message::ReadAtData(Bytes::from(vec![9u8; 100])),
        }
        .to_vec(&Limits::default())
        .unwrap();
        s.write_all(&resp[..50]).await.unwrap();
        drop(s);
    });
    let s = TcpStream::connect(addr).await.unwrap();
    let a = Connection::connect(s, Config::default()).await.unwrap();
    let e = tokio::time::timeout(
        Duration::from_secs(2),
        a.read_at(1, 0, 100, Priority::Urgent),
    )
    .await
    .expect("hung")
    .unwrap_err();
    assert!(e.is_connection_closed(), "{e}");
    assert!(e.to_string().contains("inside"), "{e}");
    peer.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unconsumed_kind_does_not_stall_other_traffic() {
    let small = Config::default().with_queue_depth(4);
    let (a, b) = duplex_pair(Config::default(), small).await;
    let server = serve_device(&b, 1, 1 << 20);
    // Nobody consumes events on device 1 or hints on device 2: flood them.
    let mut flood = Vec::new();
    for _ in 0..20 {
        let a = a.clone();
        flood.push(tokio::spawn(async move {
            a.request_ack(1, Message::Event(Event::new(EventKind::PreLock)))
                .await
        }));
    }
    for i in 0..200u64 {
        a.notify(
            2,
            Message::NeedAt(Range {
                offset: i,
                length: 1,
            }),
            Priority::Urgent,
        )
        .await
        .unwrap();
    }
    // Writes still flow.
    for i in 0..50u64 {
        let data = pattern(1, i, 4096);
        tokio::time::timeout(
            Duration::from_secs(5),
            a.write_at(1, i * 4096, &data, Compression::Lz4, Priority::Bulk),
        )
        .await
        .expect("writes stalled behind an unconsumed kind")
        .unwrap();
    }
    // Hints beyond the queue depth were dropped and counted.
    let mb = b.metrics();
    assert!(mb.dropped_notices >= 196, "{mb:?}");
    // The flow-controlled sender kept 4 events outstanding; a late consumer
    // drains them, then the rest arrive.
    let mut events = b.incoming(1, Kind::Event).unwrap();
    let consumer = tokio::spawn(async move {
        for _ in 0..20 {
            let req = events.recv().await.unwrap();
            req.respond(Message::Ack).await.unwrap();
        }
    });
    for f in flood {
        tokio::time::timeout(Duration::from_secs(5), f)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    consumer.await.unwrap();
    assert_eq!(
        b.metrics().busy_replies,
        0,
        "flow control kept the sender within the queue depth"
    );
    a.close();
    server.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_overflow_replies_busy_and_dropped_consumer_replies_unhandled() {
    // A peer ignoring flow control is simulated by a sender with huge credit
    // against a receiver queue of 2: use raw frames.
    let (x, y) = tokio::io::duplex(1 << 20);
    let b = tokio::spawn(Connection::connect(
        y,
        Config::default().with_queue_depth(2),
    ));
    let (mut r, mut w) = tokio::io::split(x);
    raw_hello2(&mut r, &mut w, 64).await;
    let b = b.await.unwrap().unwrap();
    for txid in 1..=5u32 {
        let f = Frame {
            device: 3,
            txid,
            message: Message::Event(Event::new(EventKind::Completed)),
        };
        w.write_all(&f.to_vec(&Limits::default()).unwrap())
            .await
            .unwrap();
    }
    let mut dec = FrameDecoder::new(Limits::default());
    let mut buf = bytes::BytesMut::new();
    let mut replies = Vec::new();
    while replies.len() < 3 {
        r.read_buf(&mut buf).await.unwrap();
        while let Some(f) = dec.decode(&mut buf).unwrap() {
            replies.push(f);
        }
    }
    for f in &replies {
        let Message::Error(e) = &f.message else {
            panic!("{f:?}")
        };
        assert_eq!(e.code, ErrorCode::Busy);
        assert!(f.txid >= 3);
    }
    // The two queued requests are still delivered; dropping them unanswered
    // replies Unhandled.
    let mut inc = b.incoming(3, Kind::Event).unwrap();
    let first = inc.recv().await.unwrap();
    assert_eq!(first.txid, 1);
    drop(first);
    drop(inc);
    let f = Frame {
        device: 3,
        txid: 9,
        message: Message::Event(Event::new(EventKind::Completed)),
    };
    w.write_all(&f.to_vec(&Limits::default()).unwrap())
        .await
        .unwrap();
    let mut codes = Vec::new();
    while codes.len() < 3 {
        r.read_buf(&mut buf).await.unwrap();
        while let Some(f) = dec.decode(&mut buf).unwrap() {
            let Message::Error(e) = f.message else {
                panic!()
            };
            codes.push((f.txid, e.code));
        }
    }
    codes.sort_by_key(|c| c.0);
    // txid 1 dropped by its consumer, txid 2 dropped with the queue,
    // txid 9 arrived after the consumer went away.
    assert_eq!(
        codes,
        vec![
            (1, ErrorCode::Unhandled),
            (2, ErrorCode::Unhandled),
            (9, ErrorCode::Unhandled)
        ]
    );
    assert_eq!(b.metrics().busy_replies, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urgent_frames_overtake_queued_bulk() {
    // The peer is a raw socket that does not read until the urgent notice is
    // queued, so bulk frames pile up in the writer queue (a 64 KiB pipe).
    let (x, y) = tokio::io::duplex(64 << 10);
    let (mut r, mut w) = tokio::io::split(y);
    let peer_hello = async {
        raw_hello2(&mut r, &mut w, 64).await;
    };
    let (a, ()) = tokio::join!(Connection::connect(x, Config::default()), peer_hello);
    let a = a.unwrap();
    let mut bulk = Vec::new();
    for i in 0..40u64 {
        let a = a.clone();
        bulk.push(tokio::spawn(async move {
            let d = Bytes::from(vec![(i + 1) as u8; 256 << 10]);
            a.write_at(1, i * (256 << 10), &d, Compression::None, Priority::Bulk)
                .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.notify(
        1,
        Message::NeedAt(Range {
            offset: 0,
            length: 1,
        }),
        Priority::Urgent,
    )
    .await
    .unwrap();
    // Count the bulk writes that arrive before the urgent notice.
    let mut dec = FrameDecoder::new(Limits::default());
    let mut buf = bytes::BytesMut::new();
    let mut before = 0;
    'outer: loop {
        r.read_buf(&mut buf).await.unwrap();
        while let Some(f) = dec.decode(&mut buf).unwrap() {
            match f.message {
                Message::NeedAt(_) => break 'outer,
                Message::WriteAt(_) => before += 1,
                m => panic!("{m:?}"),
            }
        }
    }
    assert!(
        before <= 2,
        "urgent notice arrived after {before} of 40 queued bulk writes"
    );
    a.close();
    for t in bulk {
        assert!(t.await.unwrap().unwrap_err().is_connection_closed());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_rejects_incompatible_peers() {
    // Another major version: both versions named.
    let (x, mut y) = tokio::io::duplex(4096);
    let peer = tokio::spawn(async move {
        let mut h = Hello::new(Features::ALL, 1 << 20, 8);
        h.major = 2;
        h.minor = 5;
        y.write_all(&h.encode()).await.unwrap();
        let mut buf = [0u8; 32];
        y.read_exact(&mut buf).await.unwrap();
        y
    });
    let e = Connection::connect(x, Config::default()).await.unwrap_err();
    let t = e.to_string();
    assert!(t.contains("1.0") && t.contains("2.5"), "{t}");
    drop(peer.await.unwrap());
    // Not a silo peer at all.
    let (x, mut y) = tokio::io::duplex(4096);
    tokio::spawn(async move {
        y.write_all(b"SSH-2.0-OpenSSH_9.6\r\n and more bytes....")
            .await
            .unwrap();
        let mut buf = [0u8; 32];
        let _ = y.read_exact(&mut buf).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    });
    let e = Connection::connect(x, Config::default()).await.unwrap_err();
    assert!(
        e.to_string().contains("not speaking the silo protocol"),
        "{e}"
    );
    // A silent peer times out.
    let (x, _y) = tokio::io::duplex(4096);
    let mut cfg = Config::default();
    cfg.handshake_timeout = Duration::from_millis(100);
    let e = Connection::connect(x, cfg).await.unwrap_err();
    assert!(e.to_string().contains("no hello"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn features_are_negotiated_and_enforced() {
    let plain_only = Config::default().with_features(Features::empty());
    let (a, b) = duplex_pair(Config::default(), plain_only).await;
    assert_eq!(a.features(), Features::empty());
    let server = serve_device(&b, 1, 1 << 16);
    // Compression falls back to plain when nothing was negotiated.
    a.write_at(
        1,
        0,
        &Bytes::from(vec![0u8; 4096]),
        Compression::Lz4,
        Priority::Bulk,
    )
    .await
    .unwrap();
    assert_eq!(
        a.metrics().kind(Kind::WriteAt).bytes_out,
        (HEADER_LEN + 16 + 4096) as u64
    );
    // Explicitly un-negotiated messages are refused locally.
    let e = a
        .request(1, Message::WriteAt(WriteAt::zeroes(0, 10)), Priority::Bulk)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotAllowed { .. }), "{e}");
    a.close();
    server.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_responses_carry_reason_and_frames_beyond_the_peer_limit_are_refused() {
    let (a, b) = duplex_pair(
        Config::default(),
        Config::default().with_max_frame(128 << 10),
    )
    .await;
    let mut reads = b.incoming(5, Kind::ReadAt).unwrap();
    tokio::spawn(async move {
        while let Ok(r) = reads.recv().await {
            r.respond_error(ErrorCode::OutOfRange, "read past the end")
                .unwrap();
        }
    });
    match a
        .read_at(5, 1 << 40, 10, Priority::Urgent)
        .await
        .unwrap_err()
    {
        Error::Remote { device, code, text } => {
            assert_eq!((device, code), (5, ErrorCode::OutOfRange));
            assert_eq!(text, "read past the end");
        }
        e => panic!("{e}"),
    }
    // 1 MiB write to a peer accepting 128 KiB frames: refused before sending.
    let e = a
        .write_at(
            5,
            0,
            &Bytes::from(vec![1u8; 1 << 20]),
            Compression::None,
            Priority::Bulk,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::Encode(EncodeError::TooLarge { .. })),
        "{e}"
    );
    // No reply at all: a configured timeout fires and the late reply is counted as orphan.
    let (a, b) = duplex_pair(
        Config::default().with_request_timeout(Some(Duration::from_millis(100))),
        Config::default(),
    )
    .await;
    let mut ev = b.incoming(1, Kind::Event).unwrap();
    let e = a
        .request_ack(1, Message::Event(Event::new(EventKind::Completed)))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    ev.recv()
        .await
        .unwrap()
        .respond(Message::Ack)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(a.metrics().orphan_responses, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_gets_an_error_reply_and_the_connection_survives() {
    let (x, y) = tokio::io::duplex(1 << 20);
    let b = tokio::spawn(Connection::connect(y, Config::default()));
    let (mut r, mut w) = tokio::io::split(x);
    raw_hello2(&mut r, &mut w, 64).await;
    let b = b.await.unwrap().unwrap();
    // A write-at whose LZ4... no: whose plain payload is short (structure error).
    let mut bad = Frame {
        device: 1,
        txid: 44,
        message: Message::WriteAt(WriteAt::plain(0, Bytes::from_static(b"abcd"))),
    }
    .to_vec(&Limits::default())
    .unwrap();
    bad[HEADER_LEN + 8] = 9; // declared length 9, payload 4
    w.write_all(&bad).await.unwrap();
    let mut dec = FrameDecoder::new(Limits::default());
    let mut buf = bytes::BytesMut::new();
    let reply = loop {
        r.read_buf(&mut buf).await.unwrap();
        if let Some(f) = dec.decode(&mut buf).unwrap() {
            break f;
        }
    };
    assert_eq!(reply.txid, 44);
    let Message::Error(e) = reply.message else {
        panic!()
    };
    assert_eq!(e.code, ErrorCode::Malformed);
    assert!(!b.is_closed());
    assert_eq!(b.metrics().malformed_in, 1);
    // A frame header over the limit is fatal.
    let mut hdr = [0u8; HEADER_LEN];
    hdr[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    hdr[4] = Kind::WriteAt as u8;
    w.write_all(&hdr).await.unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(2), b.closed())
        .await
        .unwrap();
    assert!(reason.to_string().contains("exceeds the limit"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_frames_arrive_intact_over_tcp() {
    // Larger than the reader's initial body buffer, so it has to grow.
    let (a, b) = tcp_pair(Config::default(), Config::default()).await;
    let server = serve_device(&b, 1, 12 << 20);
    let big: Bytes = (0..(5usize << 20) + 3)
        .map(|i| (i % 253) as u8)
        .collect::<Vec<u8>>()
        .into();
    a.write_at(1, 4096, &big, Compression::None, Priority::Bulk)
        .await
        .unwrap();
    let back = a
        .read_at(1, 4096, big.len() as u32, Priority::Bulk)
        .await
        .unwrap();
    assert_eq!(back, big);
    a.close();
    let data = server.await.unwrap();
    assert_eq!(&data[4096..4096 + big.len()], &big[..]);
}

#[tokio::test(flavor = "current_thread")]
async fn small_frames_are_coalesced_into_few_writes() {
    let (a, b) = duplex_pair(Config::default(), Config::default()).await;
    let mut needs = b.incoming(1, Kind::NeedAt).unwrap();
    let before = a.metrics().writes;
    // Queued without yielding: the writer finds them all at once.
    for i in 0..200u64 {
        a.notify_now(
            1,
            Message::NeedAt(Range {
                offset: i,
                length: 1,
            }),
            Priority::Urgent,
        )
        .unwrap();
    }
    for i in 0..200u64 {
        let r = needs.recv().await.unwrap();
        assert_eq!(
            r.message,
            Message::NeedAt(Range {
                offset: i,
                length: 1
            }),
            "order kept"
        );
    }
    let m = a.metrics();
    assert_eq!(m.kind(Kind::NeedAt).frames_out, 200);
    assert_eq!(m.kind(Kind::NeedAt).bytes_out, 200 * 32);
    assert!(
        m.writes - before <= 2,
        "{} writes for 200 small frames",
        m.writes - before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_devices_answer_instead_of_leaving_senders_waiting() {
    let (a, b) = duplex_pair(Config::default(), Config::default()).await;
    // Device 1 has a consumer; device 2 gets a request nobody ever claims.
    let mut dev1 = b.incoming(1, Kind::Event).unwrap();
    let unclaimed = tokio::spawn({
        let a = a.clone();
        async move {
            a.request_ack(2, Message::Event(Event::new(EventKind::Completed)))
                .await
        }
    });
    let server3 = serve_device(&b, 3, 1 << 16);
    tokio::time::sleep(Duration::from_millis(50)).await;
    b.close_device(2);
    b.close_device(1);
    // The queued, unclaimed request was answered.
    let e = tokio::time::timeout(Duration::from_secs(2), unclaimed)
        .await
        .expect("sender left waiting")
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Remote {
                code: ErrorCode::Unhandled,
                ..
            }
        ),
        "{e}"
    );
    // New requests get UnknownDevice; the consumer learns the device closed.
    let e = a
        .request_ack(1, Message::Event(Event::new(EventKind::Completed)))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Remote {
                code: ErrorCode::UnknownDevice,
                ..
            }
        ),
        "{e}"
    );
    assert!(matches!(
        dev1.recv().await.unwrap_err(),
        Error::DeviceClosed { device: 1 }
    ));
    assert!(matches!(
        b.incoming(1, Kind::WriteAt).unwrap_err(),
        Error::DeviceClosed { device: 1 }
    ));
    // Other devices are unaffected.
    a.write_at(
        3,
        0,
        &Bytes::from_static(b"still here"),
        Compression::None,
        Priority::Bulk,
    )
    .await
    .unwrap();
    a.close();
    let data = server3.await.unwrap();
    assert_eq!(&data[..10], b"still here");
}

/// On a device that asked for it, a big block arrives as the only handle to
/// an allocation of its own size (so a memory device can keep it without a
/// copy); small frames and the big ones interleave without losing a byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_payloads_arrive_in_their_own_allocation() {
    let (a, b) = tcp_pair(Config::default(), Config::default()).await;
    b.receive_big_blocks_apart(1, true);
    b.receive_big_blocks_apart(2, true);
    b.receive_big_blocks_apart(2, false);
    let mut writes = b.incoming(1, Kind::WriteAt).unwrap();
    let mut shared = b.incoming(2, Kind::WriteAt).unwrap();
    let other = tokio::spawn(async move {
        let req = shared.recv().await.unwrap();
        let Message::WriteAt(w) = &req.message else {
            panic!("not a write")
        };
        let (length, d) = (w.length, w.data().unwrap());
        req.respond(Message::WriteAtOk { length }).await.unwrap();
        d
    });
    let server = tokio::spawn(async move {
        let mut got = Vec::new();
        while let Ok(req) = writes.recv().await {
            let Message::WriteAt(w) = &req.message else {
                panic!("not a write")
            };
            let (offset, length) = (w.offset, w.length);
            let d = w.data().unwrap();
            assert_eq!(d, pattern(1, offset >> 20, length as usize));
            req.respond(Message::WriteAtOk { length }).await.unwrap();
            // The request is gone: only `d` refers to its memory now.
            let own = match d.try_into_mut() {
                Ok(m) => Some(m.capacity() == m.len()),
                Err(_) => None,
            };
            got.push((offset, length, own));
        }
        got
    });
    let mut sends = Vec::new();
    for i in 0..24u64 {
        let a = a.clone();
        let len = if i % 3 == 0 { 4096 } else { 1 << 20 };
        sends.push(tokio::spawn(async move {
            let data = pattern(1, i, len);
            a.write_at(1, i << 20, &data, Compression::None, Priority::Bulk)
                .await
                .unwrap();
        }));
    }
    for s in sends {
        s.await.unwrap();
    }
    // Device 2 did not ask: its big block is cut from a shared buffer.
    let data = pattern(2, 0, 1 << 20);
    a.write_at(2, 0, &data, Compression::None, Priority::Bulk)
        .await
        .unwrap();
    let d = other.await.unwrap();
    assert_eq!(d, data);
    assert!(d.try_into_mut().map_or(true, |m| m.capacity() > m.len()));
    a.close();
    let got = server.await.unwrap();
    assert_eq!(got.len(), 24);
    for (offset, length, own) in got {
        if length >= 1 << 20 {
            assert_eq!(own, Some(true), "block at {offset} shares its buffer");
        }
    }
}
