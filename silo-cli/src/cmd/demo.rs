//! `silo demo`: a whole migration in one process, over loopback TCP, with a
//! background writer and destination reads, verified by SHA-256.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use parking_lot::Mutex;
use silo_devicegroup::{
    DeviceGroup, DeviceSchema, GroupOptions, ReceiveOptions, ReceivePolicy, System,
};
use silo_protocol::Connection;
use silo_storage::migrator::BlockEvent;
use silo_storage::order::BlockKind;
use silo_storage::{DynProvider, ProviderExt};

use crate::progress::{Display, Side};
use crate::timeline;
use crate::util::{self, human_bytes, CountingHooks, RunStats};

/// Arguments of `silo demo`.
#[derive(Debug)]
pub struct Args {
    pub timeline: Option<PathBuf>,
    pub memory_size: u64,
    pub file_size: u64,
    pub block_size: u64,
}

/// Most timeline events kept (a bound on memory for big demo devices).
const MAX_EVENTS: usize = 2_000_000;

/// Fills `p` with pseudo-random data (xorshift, seeded), 1 MiB at a time.
async fn fill(p: &DynProvider, seed: u64) -> anyhow::Result<()> {
    let size = p.size();
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        for chunk in buf[..n].chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
        p.write_slice(off, &buf[..n]).await.context("filling")?;
        off += n as u64;
    }
    Ok(())
}

/// Writes 4–64 KiB at random offsets every millisecond until `stop`.
fn spawn_writer(p: DynProvider, seed: u64, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut x = seed | 1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let size = p.size();
        let mut writes = 0;
        while !stop.load(Ordering::Relaxed) {
            let len = (4096 * (1 + next() % 16)).min(size);
            let off = (next() % (size - len + 1)) & !4095;
            let data = Bytes::from(vec![(next() & 0xff) as u8; len as usize]);
            if p.write_at(off, data).await.is_err() {
                break;
            }
            writes += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        writes
    })
}

async fn tcp_pair() -> anyhow::Result<(Connection, Connection)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding a loopback port")?;
    let addr = listener.local_addr()?;
    let accept = tokio::spawn(async move {
        let (s, _) = listener.accept().await?;
        Connection::connect_tcp(s, silo_protocol::Config::default())
            .await
            .map_err(std::io::Error::other)
    });
    let s = tokio::net::TcpStream::connect(addr)
        .await
        .context("connecting over loopback")?;
    let a = Connection::connect_tcp(s, silo_protocol::Config::default())
        .await
        .context("handshake")?;
    let b = accept.await.context("accept task")?.context("handshake")?;
    Ok((a, b))
}

pub async fn run(a: Args) -> anyhow::Result<ExitCode> {
    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    let src_dir = tmp.path().join("source");
    let dst_dir = tmp.path().join("destination");
    std::fs::create_dir_all(&src_dir)?;
    std::fs::create_dir_all(&dst_dir)?;
    let mut mem = DeviceSchema::new("memory", System::Memory, a.memory_size);
    mem.block_size = Some(a.block_size);
    let mut file = DeviceSchema::new("disk", System::File, a.file_size);
    file.block_size = Some(a.block_size);
    file.location = Some(src_dir.join("disk.img"));

    let t0 = tokio::time::Instant::now();
    let events: Arc<Mutex<Vec<timeline::Event>>> = Arc::new(Mutex::new(Vec::new()));
    let observer = {
        let events = events.clone();
        Arc::new(move |dev: usize, e: &BlockEvent| {
            if !e.ok {
                return;
            }
            let kind = match e.kind {
                BlockKind::Dirty => timeline::Kind::Dirty,
                BlockKind::Priority => timeline::Kind::Priority,
                _ => timeline::Kind::Bulk,
            };
            let mut v = events.lock();
            if v.len() < MAX_EVENTS {
                v.push(timeline::Event {
                    t: e.started.saturating_duration_since(t0).as_secs_f64(),
                    device: dev,
                    block: e.block,
                    kind,
                });
            }
        })
    };
    let src = DeviceGroup::new_from_schema(
        vec![mem, file],
        GroupOptions::default().with_block_observer(observer),
    )
    .await
    .context("building the demo devices")?;
    let r = demo(&a, &src, &dst_dir, &events, t0).await;
    util::close_after_cutover(&src).await;
    r
}

async fn demo(
    a: &Args,
    src: &Arc<DeviceGroup>,
    dst_dir: &std::path::Path,
    events: &Arc<Mutex<Vec<timeline::Event>>>,
    t0: tokio::time::Instant,
) -> anyhow::Result<ExitCode> {
    crate::out(format!(
        "silo demo: memory device {} + file device {} ({} blocks), background writer, loopback TCP",
        human_bytes(a.memory_size as f64),
        human_bytes(a.file_size as f64),
        human_bytes(a.block_size as f64)
    ));
    for (i, n) in src.names().iter().enumerate() {
        fill(&src.provider(n).context("device")?, 1 + i as u64).await?;
    }
    let (ca, cb) = tcp_pair().await?;
    let policy = ReceivePolicy::new(dst_dir);
    let opts = ReceiveOptions::new(policy).with_rewrite_paths(true);
    let recv = tokio::spawn(DeviceGroup::new_from_protocol(cb, |_, s| s, opts));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = src
        .names()
        .iter()
        .enumerate()
        .filter_map(|(i, n)| {
            src.provider(n)
                .map(|p| spawn_writer(p, 77 + i as u64, stop.clone()))
        })
        .collect();
    let started = Instant::now();
    src.start_migration_to(ca.clone())
        .await
        .context("starting the migration")?;
    let dst = recv
        .await
        .context("receiver task")?
        .context("receiving the group")?;
    let authority = Arc::new(AtomicBool::new(false));
    {
        let authority = authority.clone();
        dst.handle_custom_data(move |_| authority.store(true, Ordering::SeqCst));
    }
    // A workload on the destination reading before the data arrived: its
    // reads wait and fetch their blocks with priority.
    let reads = Arc::new(AtomicU64::new(0));
    // All reads are issued at once, before the bulk pass starts, so their
    // need-at requests overtake it.
    let mut reader = Vec::new();
    for n in dst.names() {
        let Some(p) = dst.provider(&n) else { continue };
        let size = p.size();
        for k in 0..6u64 {
            let off = (size / 2 + k * size / 13) & !4095;
            let len = 4096.min(size - off) as usize;
            let (p, reads) = (p.clone(), reads.clone());
            reader.push(tokio::spawn(async move {
                if p.read_bytes(off, len).await.is_ok() {
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let stats = Arc::new(RunStats::default());
    let display = Display::start(src.clone(), Side::Send);
    let r = src.migrate_all(32, None).await;
    display.finish();
    r.context("migrating")?;
    for r in reader {
        let _ = r.await;
    }
    src.migrate_dirty(&CountingHooks(stats.clone()))
        .await
        .context("dirty rounds")?;
    let cutover = util::cut_over(src, &stats, b"demo: authority").await?;
    dst.wait_for_completion()
        .await
        .context("waiting for the destination")?;
    let elapsed = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        // Writers are paused by the cut-over lock (their last write fails
        // when the source closes): do not wait for them.
        w.abort();
    }
    let writes: u64 = src
        .names()
        .iter()
        .filter_map(|n| src.metrics(n))
        .map(|m| m.volatility_writes)
        .sum();
    // Verify.
    let mut all_equal = true;
    let mut lines = Vec::new();
    for n in src.names() {
        let s = util::sha256_hex(&src.unlocked_provider(&n).context("source")?).await?;
        let d = util::sha256_hex(&dst.provider(&n).context("destination")?).await?;
        let eq = s == d;
        all_equal &= eq;
        lines.push(format!(
            "  {n:<8} source {}…  destination {}…  {}",
            &s[..16],
            &d[..16],
            if eq { "equal" } else { "DIFFERENT" }
        ));
    }
    let bytes: u64 = src
        .names()
        .iter()
        .filter_map(|n| src.metrics(n))
        .filter_map(|m| m.migration.map(|p| p.bytes_sent))
        .sum();
    let total: u64 = a.memory_size + a.file_size;
    // Time 0 = the first transfer (device filling and set-up excluded).
    let mut ev = events.lock().clone();
    let first = ev.iter().map(|e| e.t).fold(f64::INFINITY, f64::min);
    if first.is_finite() {
        for e in &mut ev {
            e.t -= first;
        }
    }
    let count = |k: timeline::Kind| ev.iter().filter(|e| e.kind == k).count();
    crate::out("summary:");
    crate::out(format!(
        "  2 devices, {}; {} sent in {:.2}s ({}/s)",
        human_bytes(total as f64),
        human_bytes(bytes as f64),
        elapsed.as_secs_f64(),
        human_bytes(bytes as f64 / elapsed.as_secs_f64().max(1e-6))
    ));
    crate::out(format!(
        "  block transfers: {} bulk, {} priority ({} destination reads), {} dirty",
        count(timeline::Kind::Bulk),
        count(timeline::Kind::Priority),
        reads.load(Ordering::Relaxed),
        count(timeline::Kind::Dirty)
    ));
    crate::out(format!(
        "  dirty rounds: {} ({} blocks re-sent); source writes during the migration: {writes}",
        stats.dirty_rounds.load(Ordering::Relaxed),
        stats.dirty_blocks.load(Ordering::Relaxed)
    ));
    crate::out(format!(
        "  cut-over: {:.1} ms; authority transferred: {}",
        cutover.as_secs_f64() * 1e3,
        if authority.load(Ordering::SeqCst) {
            "yes"
        } else {
            "no"
        }
    ));
    crate::out("  sha256:");
    for l in lines {
        crate::out(l);
    }
    crate::out(format!(
        "  hashes: {}",
        if all_equal { "all equal" } else { "DIFFERENT" }
    ));
    if let Some(path) = &a.timeline {
        let devices: Vec<(String, u64)> = src
            .names()
            .iter()
            .map(|n| {
                let size = src.provider(n).map(|p| p.size()).unwrap_or(0);
                (n.clone(), size.div_ceil(a.block_size))
            })
            .collect();
        let svg = timeline::render(&ev, &devices, "silo demo migration", 200_000);
        std::fs::write(path, svg)
            .with_context(|| format!("cannot write the timeline {}", path.display()))?;
        crate::out(format!("  timeline: {}", path.display()));
    }
    let _ = t0;
    dst.close_all().await.context("closing the destination")?;
    Ok(if all_equal {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
