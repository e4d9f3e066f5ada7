//! Live migration of a device group between two processes over TCP.
//!
//! ```text
//! # terminal 1 (destination): prints "listening 127.0.0.1:PORT", "ready
//! # <devices>" once the devices are built, "custom <text>" for custom data
//! # and, once complete, "sha <device> <hex>" per device.
//! cargo run --example migrate -- receive --listen 127.0.0.1:0 --dir /tmp/dst
//!
//! # terminal 2 (source): builds the group from an HCL config, fills it,
//! # keeps writers running during the migration, then cuts over.
//! cargo run --example migrate -- send --connect 127.0.0.1:PORT --config silo.conf \
//!     [--fill] [--sync-seconds N]
//! ```
//!
//! `--sync-seconds N` keeps the source live for N seconds after the bulk copy
//! (writers running, dirty rounds every 100 ms) before the cut-over.
//! Exit status 0 on success, 1 with a message on stderr otherwise.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use silo_devicegroup::{
    DefaultHooks, DeviceGroup, GroupOptions, ReceiveOptions, ReceivePolicy, SiloSchema,
};
use silo_protocol::{Config, Connection};
use silo_storage::{DynProvider, Provider};
use tokio::net::{TcpListener, TcpStream};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

async fn connection(s: TcpStream) -> Result<Connection, BoxError> {
    s.set_nodelay(true)?;
    let (r, w) = s.into_split();
    Ok(Connection::from_split(r, w, Config::default()).await?)
}

async fn print_hashes(g: &DeviceGroup, locked_source: bool) -> Result<(), BoxError> {
    for n in g.names() {
        let p = if locked_source {
            g.unlocked_provider(&n)
        } else {
            g.provider(&n)
        }
        .ok_or("no such device")?;
        let h = silo_storage::hash::sha256(p.as_ref()).await?;
        println!("sha {n} {}", silo_storage::hash::to_hex(&h));
    }
    Ok(())
}

async fn receive(args: &[String]) -> Result<(), BoxError> {
    let listen = arg(args, "--listen").unwrap_or_else(|| "127.0.0.1:0".into());
    let dir = arg(args, "--dir").ok_or("--dir DIR is required")?;
    std::fs::create_dir_all(&dir)?;
    let listener = TcpListener::bind(&listen).await?;
    println!("listening {}", listener.local_addr()?);
    let (s, peer) = listener.accept().await?;
    eprintln!("receiving from {peer}");
    let conn = connection(s).await?;
    let opts = ReceiveOptions::new(ReceivePolicy::new(&dir)).with_rewrite_paths(true);
    let group = DeviceGroup::new_from_protocol(conn, |_, s| s, opts).await?;
    group.handle_custom_data(|d| println!("custom {}", String::from_utf8_lossy(&d)));
    println!("ready {}", group.names().join(" "));
    let t = Instant::now();
    group.wait_for_completion().await?;
    eprintln!("migration complete after {:?}", t.elapsed());
    print_hashes(&group, false).await?;
    group.close_all().await?;
    Ok(())
}

async fn fill(p: &DynProvider, seed: u64) -> Result<(), BoxError> {
    let chunk = 1 << 20;
    let mut off = 0u64;
    let mut x = seed | 1;
    while off < p.size() {
        let n = (p.size() - off).min(chunk) as usize;
        let mut v = vec![0u8; n];
        for b in v.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        p.write_at(off, Bytes::from(v)).await?;
        off += n as u64;
    }
    Ok(())
}

async fn send(args: &[String]) -> Result<(), BoxError> {
    let to = arg(args, "--connect").ok_or("--connect ADDR is required")?;
    let config = arg(args, "--config").ok_or("--config FILE is required")?;
    let sync_for = Duration::from_secs_f64(
        arg(args, "--sync-seconds")
            .map(|s| s.parse())
            .transpose()?
            .unwrap_or(0.0),
    );
    let schema = SiloSchema::from_file(&config)?;
    let group = DeviceGroup::new_from_schema(schema.devices, GroupOptions::default()).await?;
    if args.iter().any(|a| a == "--fill") {
        for (i, n) in group.names().iter().enumerate() {
            fill(&group.provider(n).ok_or("no device")?, i as u64 + 1).await?;
        }
    }
    let conn = connection(TcpStream::connect(&to).await?).await?;
    group.start_migration_to(conn).await?;
    // Writers keep the devices busy until the cut-over locks them.
    let stop = Arc::new(AtomicBool::new(false));
    for n in group.names() {
        let p = group.provider(&n).ok_or("no device")?;
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let off = (i * 7919 * 4096) % p.size().saturating_sub(512).max(1);
                if p.write_at(off, Bytes::from(vec![i as u8; 512]))
                    .await
                    .is_err()
                {
                    break;
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
    }
    let t = Instant::now();
    group
        .migrate_all(
            64,
            Some(Arc::new(|ps: &[silo_devicegroup::DeviceProgress]| {
                let (m, t): (u64, u64) = ps.iter().fold((0, 0), |(m, t), p| {
                    (m + p.progress.migrated_blocks, t + p.progress.total_blocks)
                });
                tracing::debug!(migrated = m, total = t, "progress");
            })),
        )
        .await?;
    eprintln!("bulk copy done after {:?}", t.elapsed());
    let until = Instant::now() + sync_for;
    while Instant::now() < until {
        group.migrate_dirty(&DefaultHooks).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cut = group
        .cut_over(Some(Bytes::from_static(b"authority")))
        .await?;
    stop.store(true, Ordering::SeqCst);
    eprintln!("cut-over took {cut:?}");
    print_hashes(&group, true).await?;
    group.close_all().await?;
    Ok(())
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("send") => send(&args).await,
        Some("receive") => receive(&args).await,
        _ => Err("usage: migrate send|receive [options] (see the source)".into()),
    };
    if let Err(e) = r {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
