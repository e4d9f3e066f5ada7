//! `silo serve`: build the group from a schema, migrate it to the first
//! receiver, cut over.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use silo_devicegroup::{DeviceGroup, GroupOptions};
use silo_protocol::Connection;
use tokio::net::TcpListener;

use crate::metrics_http::Registry;
use crate::progress::{Display, Side};
use crate::util::{self, human_bytes, CountingHooks, RunStats, EXIT_INTERRUPTED};

/// Arguments of `silo serve`.
#[derive(Debug)]
pub struct Args {
    pub config: PathBuf,
    pub listen: SocketAddr,
    pub nbd_listen: Option<SocketAddr>,
    pub concurrency: usize,
    pub metrics: Option<SocketAddr>,
    pub continuous: bool,
}

/// Authority-transfer payload sent at the cut-over.
pub const AUTHORITY: &[u8] = b"silo: authority transferred";

/// Binds the NBD listener of `--nbd-listen` and starts a server on it.
pub async fn start_nbd(addr: SocketAddr) -> anyhow::Result<NbdService> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for NBD on {addr}"))?;
    let server = Arc::new(silo_nbd::Server::default());
    let s = server.clone();
    let task = tokio::spawn(async move {
        if let Err(e) = s.serve_tcp(listener).await {
            tracing::warn!(error = %e, "NBD server stopped");
        }
    });
    tracing::info!(%addr, "NBD exports listening");
    Ok((server, task))
}

/// The NBD server of `--nbd-listen` and its accept task.
pub type NbdService = (Arc<silo_nbd::Server>, tokio::task::JoinHandle<()>);

/// Stops the NBD server (clients are answered and disconnected) and the
/// metrics endpoint.
pub async fn stop_services(nbd: Option<NbdService>, metrics: Option<tokio::task::JoinHandle<()>>) {
    if let Some((s, t)) = nbd {
        s.shutdown().await;
        t.abort();
    }
    if let Some(t) = metrics {
        t.abort();
    }
}

/// Binds `--metrics` and serves the registry.
pub async fn start_metrics(
    addr: Option<SocketAddr>,
    registry: &Arc<Registry>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    match addr {
        None => Ok(None),
        Some(a) => Ok(Some(
            crate::metrics_http::serve(a, registry.clone())
                .await
                .with_context(|| format!("cannot serve metrics on {a}"))?,
        )),
    }
}

pub async fn run(a: Args) -> anyhow::Result<ExitCode> {
    let schema = util::load_schema(&a.config)?;
    if a.concurrency == 0 {
        anyhow::bail!("--concurrency must be at least 1");
    }
    let exposed: Vec<String> = schema
        .devices
        .iter()
        .filter(|d| d.expose)
        .map(|d| d.name.clone())
        .collect();
    // Bind everything first: a port in use is reported before any device
    // is built.
    let listener = TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    let registry = Arc::new(Registry::default());
    let metrics_task = start_metrics(a.metrics, &registry).await?;
    let nbd = match a.nbd_listen {
        Some(addr) if !exposed.is_empty() => Some(start_nbd(addr).await?),
        Some(_) => {
            tracing::warn!("--nbd-listen given but no device has expose = true");
            None
        }
        // No address: the exports are attached to /dev/nbdN below.
        None if !exposed.is_empty() => Some((
            Arc::new(silo_nbd::Server::default()),
            tokio::spawn(async {}),
        )),
        None => None,
    };
    let mut opts = GroupOptions::default();
    if let Some((s, _)) = &nbd {
        opts = opts.with_nbd(s.clone());
    }
    let group = DeviceGroup::new_from_schema(schema.devices, opts)
        .await
        .context("building the devices")?;
    let mut kernel = Vec::new();
    if let (None, Some((server, _))) = (a.nbd_listen, &nbd) {
        for name in &exposed {
            match silo_nbd::kernel::attach(server, name, &silo_nbd::kernel::AttachConfig::default())
                .await
            {
                Ok(dev) => {
                    crate::out(format!(
                        "device {name} attached at {}",
                        dev.path().display()
                    ));
                    kernel.push(dev);
                }
                Err(e) => {
                    for dev in kernel {
                        let _ = dev.disconnect().await;
                    }
                    util::flush_and_close(&group).await.ok();
                    stop_services(nbd, metrics_task).await;
                    return Err(anyhow::Error::new(e).context(format!(
                        "device {name:?} has expose = true but cannot be attached to /dev/nbdN \
                         (load the nbd kernel module, or pass --nbd-listen ADDR to export it over TCP)"
                    )));
                }
            }
        }
    }
    let stats = Arc::new(RunStats::default());
    let result = serve_group(&a, &group, listener, &registry, &stats).await;
    let disconnect = |kernel: Vec<silo_nbd::kernel::KernelDevice>| async move {
        for dev in kernel {
            if let Err(e) = dev.disconnect().await {
                tracing::warn!(error = %e, "disconnecting a /dev/nbdN device");
            }
        }
    };
    let code = match result {
        Ok(Outcome::Done { took, started }) => {
            summary(&group, &stats, started, took);
            util::close_after_cutover(&group).await;
            disconnect(kernel).await;
            ExitCode::SUCCESS
        }
        Ok(Outcome::Interrupted) => {
            eprintln!("silo: interrupted: the migration did not complete");
            util::flush_and_close(&group).await.ok();
            disconnect(kernel).await;
            ExitCode::from(EXIT_INTERRUPTED)
        }
        Err(e) => {
            util::flush_and_close(&group).await.ok();
            disconnect(kernel).await;
            stop_services(nbd, metrics_task).await;
            return Err(e);
        }
    };
    stop_services(nbd, metrics_task).await;
    Ok(code)
}

enum Outcome {
    Done { took: Duration, started: Instant },
    Interrupted,
}

async fn serve_group(
    a: &Args,
    group: &Arc<DeviceGroup>,
    listener: TcpListener,
    registry: &Arc<Registry>,
    stats: &Arc<RunStats>,
) -> anyhow::Result<Outcome> {
    let addr = listener.local_addr().unwrap_or(a.listen);
    crate::out(format!(
        "serving {} device(s) [{}] on {addr}; waiting for a receiver (silo connect --addr {addr} --dir DIR)",
        group.len(),
        group.names().join(", ")
    ));
    let signal = util::shutdown_signal();
    tokio::pin!(signal);
    let conn = tokio::select! {
        r = listener.accept() => {
            let (stream, peer) = r.context("accepting the receiver")?;
            tracing::info!(%peer, "receiver connected");
            Connection::connect_tcp(stream, silo_protocol::Config::default())
                .await
                .context("migration handshake")?
        }
        _ = &mut signal => return Ok(Outcome::Interrupted),
    };
    drop(listener);
    crate::observe::register(registry, group, Some(conn.clone()), stats.clone());
    let started = Instant::now();
    let work = async {
        group
            .start_migration_to(conn.clone())
            .await
            .context("starting the migration")?;
        let display = Display::start(group.clone(), Side::Send);
        let r = group.migrate_all(a.concurrency, None).await;
        display.finish();
        r.context("migrating")?;
        group
            .migrate_dirty(&CountingHooks(stats.clone()))
            .await
            .context("dirty rounds")?;
        anyhow::Ok(())
    };
    tokio::select! {
        r = work => r?,
        _ = &mut signal => return Ok(Outcome::Interrupted),
    }
    if a.continuous {
        crate::out("in sync; continuous mode: syncing dirty blocks until SIGINT/SIGTERM, then cutting over");
        loop {
            tokio::select! {
                _ = &mut signal => break,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            let hooks = CountingHooks(stats.clone());
            let round = group.migrate_dirty(&hooks);
            tokio::select! {
                r = round => r.context("dirty rounds")?,
                _ = &mut signal => break,
            }
        }
    }
    let took = tokio::select! {
        r = util::cut_over(group, stats, AUTHORITY) => r?,
        _ = util::shutdown_signal() => {
            group.unlock_all();
            return Ok(Outcome::Interrupted);
        }
    };
    Ok(Outcome::Done { took, started })
}

fn summary(group: &DeviceGroup, stats: &RunStats, started: Instant, cutover: Duration) {
    let elapsed = started.elapsed();
    let bytes: u64 = group
        .names()
        .iter()
        .filter_map(|n| group.metrics(n))
        .filter_map(|m| m.migration.map(|p| p.bytes_sent))
        .sum();
    crate::out(format!(
        "migration complete: {} sent in {:.2}s ({}/s), {} dirty round(s) re-sending {} block(s), cut-over {:.1} ms",
        human_bytes(bytes as f64),
        elapsed.as_secs_f64(),
        human_bytes(bytes as f64 / elapsed.as_secs_f64().max(1e-6)),
        stats.dirty_rounds.load(Ordering::Relaxed),
        stats.dirty_blocks.load(Ordering::Relaxed),
        cutover.as_secs_f64() * 1e3
    ));
}
