//! Benchmarks of the devicegroup group.
//!
//! * A group of 4 × 256 MiB memory devices (random data) migrated over
//!   loopback TCP by `DeviceGroup` (sender and receiver in this process, real
//!   sockets), from `migrate_all` to the receiver's last completion ack,
//!   beside a raw TCP copy of the same number of bytes in the same run.
//! * Cut-over time under a steady background writer: a 256 MiB device is
//!   migrated while a writer writes 4 KiB every millisecond; after the bulk
//!   copy and a dirty pass, `cut_over` (writers paused → final dirty round →
//!   authority transfer → receiver complete) is timed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use silo_devicegroup::{
    DefaultHooks, DeviceGroup, DeviceSchema, GroupOptions, ReceiveOptions, ReceivePolicy, System,
};
use silo_protocol::{Compression, Config, Connection};
use silo_storage::{DynProvider, Provider};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::protocol::process_cpu_ns;
use crate::report::Report;
use crate::Opts;

const GROUP: &str = "devicegroup";
const MIB: u64 = 1 << 20;

/// Runs the devicegroup benchmarks.
pub fn run(opts: &Opts, report: &mut Report, rt: &tokio::runtime::Runtime) {
    let dev = if opts.quick { 16 * MIB } else { 256 * MIB };
    let total = 4 * dev;
    let (mut raw, mut raw_fresh, mut ours) = (0f64, 0f64, 0f64);
    let rounds = if opts.quick { 1 } else { 3 };
    let (mut raw_cpu, mut ours_cpu) = (u64::MAX, u64::MAX);
    for _ in 0..rounds {
        let c = process_cpu_ns();
        raw = raw.max(rt.block_on(raw_tcp_copy(total, false)));
        raw_cpu = raw_cpu.min(process_cpu_ns().saturating_sub(c));
        raw_fresh = raw_fresh.max(rt.block_on(raw_tcp_copy(total, true)));
        let (mbs, cpu) = rt.block_on(group_migration(dev, Compression::None));
        ours = ours.max(mbs);
        ours_cpu = ours_cpu.min(cpu);
    }
    crate::protocol::cpu_note(
        report,
        GROUP,
        "devicegroup migration",
        rounds,
        ours_cpu,
        raw_cpu,
        total / MIB,
    );
    let lz4 = rt.block_on(group_migration(dev, Compression::Lz4)).0;
    report.add(
        GROUP,
        &format!("4 × {} MiB group migration, loopback TCP", dev / MIB),
        ours,
        "raw TCP copy of the same bytes",
        raw,
        "MB/s",
        true,
        "≥ 0.8×",
    );
    report.add(
        GROUP,
        &format!("4 × {} MiB group migration, loopback TCP", dev / MIB),
        ours,
        "raw TCP copy kept in fresh 1 MiB buffers",
        raw_fresh,
        "MB/s",
        true,
        "≥ 0.8×",
    );
    report.add(
        GROUP,
        &format!(
            "4 × {} MiB group migration, LZ4 (default compression)",
            dev / MIB
        ),
        lz4,
        "raw TCP copy of the same bytes",
        raw,
        "MB/s",
        true,
        "—",
    );
    let (cut, round) = rt.block_on(cut_over_under_writer(dev));
    report.add(
        GROUP,
        &format!("cut-over under a steady writer ({} MiB device)", dev / MIB),
        cut,
        "one dirty round with the writer running",
        round,
        "ms",
        false,
        "milliseconds",
    );
    report.note(
        GROUP,
        &format!(
            "Group migration: 4 memory devices of {} MiB filled with random data, 1 MiB blocks, \
             `migrate_all(64)` + `completed()` between two `DeviceGroup`s in this process over a \
             real loopback TCP connection (TCP_NODELAY), timed from `migrate_all` to the last \
             completion ack (which the receiver gives only once every block is present); no \
             compression (random data does not compress; an LZ4 row shows the default). The \
             destination writes into fresh memory devices, so its page faults are part of the \
             figure. Two raw references, each best of {rounds}, with `write_all` in 1 MiB chunks \
             to a reader on the same runtime: one reads into a single reused 1 MiB buffer (the \
             wire's ceiling: it keeps nothing), one reads each MiB into a fresh buffer and keeps \
             them all (the least a receiver that stores the bytes must do: the same allocations \
             and page faults, no other work). On this VM first-touch page faults are very \
             expensive (about 1 s per fresh GiB from a plain loop, the hypervisor's free page \
             reporting hands freed memory back to the host), so the two references differ by \
             3-4x and the fresh one is the fair yardstick for a migration that stores what it \
             receives; `MADV_HUGEPAGE` backing was measured slower still. The CPU-time note \
             compares with the first reference. Cut-over: one {} MiB device, a \
             writer writing 4 KiB at random offsets every 1 ms through the group; after the bulk \
             copy and `migrate_dirty`, `cut_over(authority)` is timed (lock → final dirty round \
             → custom data → completion acks); the reference is a dirty round without the lock.",
            dev / MIB,
            dev / MIB
        ),
    );
}

fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (a, b) = (a.expect("connect"), b.expect("accept").0);
    a.set_nodelay(true).expect("nodelay");
    b.set_nodelay(true).expect("nodelay");
    (a, b)
}

/// A raw TCP copy of `total` bytes in 1 MiB writes. The reader reads into
/// one reused 1 MiB buffer (`keep == false`: the wire's ceiling, nothing is
/// kept) or into a fresh 1 MiB buffer per MiB that it keeps until the end
/// (`keep`: the least a receiver that stores the bytes must do, allocation
/// and page faults included).
async fn raw_tcp_copy(total: u64, keep: bool) -> f64 {
    let (mut a, mut b) = tcp_pair().await;
    let data = random(MIB as usize, 9);
    let start = Instant::now();
    let reader = tokio::spawn(async move {
        let mut kept: Vec<bytes::BytesMut> = Vec::new();
        let mut buf = bytes::BytesMut::with_capacity(MIB as usize);
        let mut got = 0u64;
        while got < total {
            let n = b.read_buf(&mut buf).await.expect("read");
            assert!(n > 0, "raw copy ended early");
            got += n as u64;
            if buf.len() == MIB as usize {
                if keep {
                    kept.push(std::mem::replace(
                        &mut buf,
                        bytes::BytesMut::with_capacity(MIB as usize),
                    ));
                } else {
                    buf.clear();
                }
            }
        }
        std::hint::black_box(&kept);
    });
    for _ in 0..total / MIB {
        a.write_all(&data).await.expect("write");
    }
    reader.await.expect("reader");
    mb_per_s(total, start.elapsed())
}

/// `len` pseudo-random bytes (xorshift, seeded).
pub(crate) fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

async fn fill(p: &DynProvider, seed: u64) {
    let mut off = 0;
    while off < p.size() {
        let n = (p.size() - off).min(MIB);
        let data = Bytes::from(random(n as usize, seed + off));
        p.write_at(off, data).await.expect("fill");
        off += n;
    }
}

/// Two protocol endpoints over loopback TCP (TCP_NODELAY, default config).
pub(crate) async fn connection_pair() -> (Connection, Connection) {
    let (a, b) = tcp_pair().await;
    let conn = |s: TcpStream| async move {
        let (r, w) = s.into_split();
        Connection::from_split(r, w, Config::default())
            .await
            .expect("handshake")
    };
    tokio::join!(conn(a), conn(b))
}

/// A sender group of `count` memory devices of `size` bytes, filled, and a
/// receiver connected to it over loopback TCP.
async fn pair(
    count: usize,
    size: u64,
    compression: Compression,
) -> (Arc<DeviceGroup>, Arc<DeviceGroup>, tempfile::TempDir) {
    let schemas = (0..count)
        .map(|i| {
            let mut s = DeviceSchema::new(format!("dev{i}"), System::Memory, size);
            s.block_size = Some(MIB);
            s
        })
        .collect();
    let src = DeviceGroup::new_from_schema(
        schemas,
        GroupOptions::default().with_compression(compression),
    )
    .await
    .expect("sender group");
    for (i, n) in src.names().iter().enumerate() {
        fill(&src.provider(n).expect("device"), i as u64 * 1000 + 1).await;
    }
    let (a, b) = connection_pair().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = ReceivePolicy::new(dir.path());
    let recv = tokio::spawn(DeviceGroup::new_from_protocol(
        b,
        |_, s| s,
        ReceiveOptions::new(policy),
    ));
    src.start_migration_to(a).await.expect("start");
    let dst = recv.await.expect("join").expect("receiver group");
    dst.handle_custom_data(|_| {});
    (src, dst, dir)
}

/// Returns (MB/s, CPU ns of the process during the timed part).
async fn group_migration(dev: u64, compression: Compression) -> (f64, u64) {
    let (src, dst, _dir) = pair(4, dev, compression).await;
    let cpu = process_cpu_ns();
    let start = Instant::now();
    src.migrate_all(64, None).await.expect("migrate_all");
    src.completed().await.expect("completed");
    let took = start.elapsed();
    let cpu = process_cpu_ns().saturating_sub(cpu);
    dst.wait_for_completion().await.expect("complete");
    src.close_all().await.expect("close");
    dst.close_all().await.expect("close");
    (mb_per_s(4 * dev, took), cpu)
}

/// Returns (cut-over ms, unlocked dirty round ms).
async fn cut_over_under_writer(dev: u64) -> (f64, f64) {
    let (src, dst, _dir) = pair(1, dev, Compression::ZeroElision).await;
    let p = src.provider("dev0").expect("device");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut x = 12345u64;
            let block = Bytes::from(random(4096, 3));
            while !stop.load(Ordering::SeqCst) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let off = (x % (p.size() / 4096)) * 4096;
                if p.write_at(off, block.clone()).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    src.migrate_all(64, None).await.expect("migrate_all");
    src.migrate_dirty(&DefaultHooks).await.expect("dirty");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t = Instant::now();
    src.migrate_dirty(&DefaultHooks).await.expect("dirty");
    let round = t.elapsed();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let cut = src
        .cut_over(Some(Bytes::from_static(b"authority")))
        .await
        .expect("cut-over");
    dst.wait_for_completion().await.expect("complete");
    stop.store(true, Ordering::SeqCst);
    src.close_all().await.expect("close");
    let _ = writer.await;
    dst.close_all().await.expect("close");
    (cut.as_secs_f64() * 1e3, round.as_secs_f64() * 1e3)
}
