//! Helpers shared by the device-group tests.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use silo_devicegroup::{DeviceGroup, DeviceSchema, ReceiveOptions, ReceivePolicy};
use silo_protocol::{Config, Connection};
use silo_storage::{DynProvider, Provider};
use tokio::net::{TcpListener, TcpStream};

/// Connects two protocol endpoints over real TCP on 127.0.0.1.
pub async fn tcp_pair() -> (Connection, Connection) {
    tcp_pair_with(Config::default()).await
}

/// [`tcp_pair`] with a transport configuration.
pub async fn tcp_pair_with(config: Config) -> (Connection, Connection) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let c2 = config.clone();
    let accept = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        s.set_nodelay(true).unwrap();
        let (r, w) = s.into_split();
        Connection::from_split(r, w, c2).await.unwrap()
    });
    let s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let (r, w) = s.into_split();
    let a = Connection::from_split(r, w, config).await.unwrap();
    (a, accept.await.unwrap())
}

/// Starts receiving a group on `conn` with the default policy over `base`,
/// every sender path moved into `base`.
pub fn spawn_receiver(
    conn: Connection,
    base: std::path::PathBuf,
) -> tokio::task::JoinHandle<silo_devicegroup::Result<Arc<DeviceGroup>>> {
    tokio::spawn(async move {
        let policy = ReceivePolicy::new(&base);
        DeviceGroup::new_from_protocol(
            conn,
            |_, s: DeviceSchema| s,
            ReceiveOptions::new(policy).with_rewrite_paths(true),
        )
        .await
    })
}

/// SHA-256 of a whole provider, hex.
pub async fn sha(p: &DynProvider) -> String {
    silo_storage::hash::to_hex(&silo_storage::hash::sha256(p.as_ref()).await.unwrap())
}

/// Writes `len` bytes of pseudo-random data (seeded) at `offset`.
pub async fn write_pattern(p: &DynProvider, offset: u64, len: usize, seed: u64) {
    try_write_pattern(p, offset, len, seed).await.unwrap()
}

/// [`write_pattern`] returning the error.
pub async fn try_write_pattern(
    p: &DynProvider,
    offset: u64,
    len: usize,
    seed: u64,
) -> silo_storage::Result<()> {
    use silo_storage::ProviderExt;
    let mut v = vec![0u8; len];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for b in v.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    p.write_slice(offset, &v).await
}

/// A writer task that writes small random chunks all over `p` until stopped
/// (or a write fails, e.g. the device was closed). Returns the number of
/// writes done.
pub fn spawn_writer(
    p: DynProvider,
    seed: u64,
    stop: Arc<std::sync::atomic::AtomicBool>,
    pause: Duration,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut n = 0u64;
        let size = p.size();
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let len = rng.gen_range(1..=8192u64).min(size) as usize;
            let off = rng.gen_range(0..=size - len as u64);
            if try_write_pattern(&p, off, len, rng.gen()).await.is_err() {
                break;
            }
            n += 1;
            tokio::time::sleep(pause).await;
        }
        n
    })
}

/// A digest of a device that costs little on sparse data: for every block
/// of `block_size` bytes that is not all zero, its index and SHA-256 (all-zero
/// blocks are left out). Two devices of the same size have equal digests
/// exactly when their contents are equal.
pub async fn sparse_digest(p: &DynProvider, block_size: u64) -> Vec<(u64, String)> {
    use sha2::Digest;
    use silo_storage::ProviderExt;
    let mut out = Vec::new();
    let mut off = 0u64;
    let mut b = 0u64;
    while off < p.size() {
        let n = block_size.min(p.size() - off) as usize;
        let data = p.read_bytes(off, n).await.unwrap();
        if data.iter().any(|&x| x != 0) {
            out.push((b, hex::encode(sha2::Sha256::digest(&data))));
        }
        off += n as u64;
        b += 1;
    }
    out
}

/// A TCP proxy between a client and `upstream` that forwards client →
/// upstream bytes at `rate` bytes/s (the other direction unthrottled), with
/// small socket buffers so little data hides in the kernel. Returns the
/// address to connect to and a handle that drops both sockets when aborted.
pub async fn slow_proxy(
    upstream: std::net::SocketAddr,
    rate: u64,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(16 << 10).unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = sock.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        client.set_nodelay(true).unwrap();
        let server = TcpStream::connect(upstream).await.unwrap();
        server.set_nodelay(true).unwrap();
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        let up = async move {
            let chunk = 4096usize;
            let mut buf = vec![0u8; chunk];
            let start = tokio::time::Instant::now();
            let mut sent = 0u64;
            loop {
                let n = match cr.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                sent += n as u64;
                let due = start + Duration::from_secs_f64(sent as f64 / rate as f64);
                tokio::time::sleep_until(due).await;
                if sw.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        };
        let down = async move {
            let _ = tokio::io::copy(&mut sr, &mut cw).await;
        };
        tokio::join!(up, down);
    });
    (addr, task)
}

/// A protocol connection to `addr` with a small socket send buffer.
pub async fn connect_small(addr: std::net::SocketAddr) -> Connection {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_send_buffer_size(16 << 10).unwrap();
    let s = sock.connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let (r, w) = s.into_split();
    Connection::from_split(r, w, Config::default())
        .await
        .unwrap()
}

/// Accepts one protocol connection on `listener`.
pub async fn accept(listener: TcpListener) -> Connection {
    let (s, _) = listener.accept().await.unwrap();
    s.set_nodelay(true).unwrap();
    let (r, w) = s.into_split();
    Connection::from_split(r, w, Config::default())
        .await
        .unwrap()
}
