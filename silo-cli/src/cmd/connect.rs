//! `silo connect`: receive a device group into a directory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use silo_devicegroup::{
    DeviceGroup, DeviceSchema, GroupOptions, ReceiveOptions, ReceivePolicy, System,
};
use silo_protocol::Connection;

use crate::metrics_http::Registry;
use crate::progress::{Display, Side};
use crate::util::{self, human_bytes, RunStats, EXIT_INTERRUPTED};

/// Arguments of `silo connect`.
#[derive(Debug)]
pub struct Args {
    pub addr: String,
    pub dir: PathBuf,
    pub nbd_listen: Option<SocketAddr>,
    pub keep_serving: bool,
    pub metrics: Option<SocketAddr>,
}

/// The receiver's adjustment of a sender schema: memory devices are stored
/// as files in `dir` too (so the data outlives the process), and every
/// device is exposed when an NBD address was given.
pub fn tweak_schema(dir: &std::path::Path, expose: bool, mut s: DeviceSchema) -> DeviceSchema {
    if s.system == System::Memory {
        s.system = System::File;
        s.location = Some(dir.join(format!("{}.img", util::file_name_for(&s.name))));
    }
    s.expose = expose;
    s
}

pub async fn run(a: Args) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&a.dir)
        .with_context(|| format!("cannot create directory {}", a.dir.display()))?;
    let dir = a
        .dir
        .canonicalize()
        .with_context(|| format!("cannot resolve directory {}", a.dir.display()))?;
    let registry = Arc::new(Registry::default());
    let metrics_task = crate::cmd::serve::start_metrics(a.metrics, &registry).await?;
    let nbd = match a.nbd_listen {
        Some(addr) => Some(crate::cmd::serve::start_nbd(addr).await?),
        None => None,
    };
    let signal = util::shutdown_signal();
    tokio::pin!(signal);
    let stream = tokio::select! {
        r = tokio::net::TcpStream::connect(&a.addr) => {
            r.with_context(|| format!("cannot connect to {}", a.addr))?
        }
        _ = &mut signal => return Ok(ExitCode::from(EXIT_INTERRUPTED)),
    };
    let conn = Connection::connect_tcp(stream, silo_protocol::Config::default())
        .await
        .context("migration handshake")?;
    let mut policy = ReceivePolicy::new(&dir);
    policy.allow_expose = nbd.is_some();
    let mut gopts = GroupOptions::default();
    if let Some((s, _)) = &nbd {
        gopts = gopts.with_nbd(s.clone());
    }
    let expose = nbd.is_some();
    let tdir = dir.clone();
    let opts = ReceiveOptions::new(policy)
        .with_rewrite_paths(true)
        .with_group(gopts);
    let group = tokio::select! {
        r = DeviceGroup::new_from_protocol(conn.clone(), move |_, s| tweak_schema(&tdir, expose, s), opts) => {
            r.context("receiving the device group")?
        }
        _ = &mut signal => return Ok(ExitCode::from(EXIT_INTERRUPTED)),
    };
    let authority = Arc::new(AtomicBool::new(false));
    {
        let authority = authority.clone();
        group.handle_custom_data(move |d| {
            tracing::info!(payload = %String::from_utf8_lossy(&d), "authority transferred");
            authority.store(true, Ordering::SeqCst);
        });
    }
    let stats = Arc::new(RunStats::default());
    crate::observe::register(&registry, &group, Some(conn.clone()), stats.clone());
    crate::out(format!(
        "receiving {} device(s) [{}] into {}{}",
        group.len(),
        group.names().join(", "),
        dir.display(),
        match a.nbd_listen {
            Some(n) => format!(", exported over NBD at {n}"),
            None => String::new(),
        }
    ));
    let started = Instant::now();
    let display = Display::start(group.clone(), Side::Receive);
    let r = tokio::select! {
        r = group.wait_for_completion() => Some(r),
        _ = &mut signal => None,
    };
    display.finish();
    let code = match r {
        None => {
            eprintln!("silo: interrupted: the migration did not complete");
            conn.close();
            util::flush_and_close(&group).await.ok();
            ExitCode::from(EXIT_INTERRUPTED)
        }
        Some(Err(e)) => {
            util::flush_and_close(&group).await.ok();
            crate::cmd::serve::stop_services(nbd, metrics_task).await;
            return Err(anyhow::Error::new(e).context("the migration failed"));
        }
        Some(Ok(())) => {
            stats.completed.store(1, Ordering::Relaxed);
            let total: u64 = group
                .names()
                .iter()
                .filter_map(|n| group.provider(n))
                .map(|p| p.size())
                .sum();
            let secs = started.elapsed().as_secs_f64();
            crate::out(format!(
                "migration complete: {} received in {:.2}s ({}/s){}",
                human_bytes(total as f64),
                secs,
                human_bytes(total as f64 / secs.max(1e-6)),
                if authority.load(Ordering::SeqCst) {
                    ", authority transferred"
                } else {
                    ""
                }
            ));
            for n in group.names() {
                if let Some(s) = group.schema(&n) {
                    if let Some(l) = &s.location {
                        crate::out(format!("  {n}: {}", l.display()));
                    }
                }
            }
            // Flush now so the files are complete even while serving on.
            for n in group.names() {
                if let Some(p) = group.unlocked_provider(&n) {
                    p.flush().await.with_context(|| format!("flushing {n}"))?;
                }
            }
            if a.keep_serving && nbd.is_some() {
                crate::out("serving the devices over NBD until SIGINT/SIGTERM");
                signal.await;
            }
            conn.close();
            util::flush_and_close(&group).await?;
            ExitCode::SUCCESS
        }
    };
    crate::cmd::serve::stop_services(nbd, metrics_task).await;
    Ok(code)
}
