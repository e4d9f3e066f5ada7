//! `silo sync`: S3 sync of the devices that have a `sync { … }` block.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use silo_devicegroup::{build_device, BuildOptions, BuiltDevice, DeviceSchema};
use silo_s3::{RetrySettings, S3Config, S3Storage, S3Sync, SyncSettings};
use silo_storage::dirty::dirty_tracker;
use silo_storage::DynProvider;

use crate::util::{self, human_bytes};

/// Arguments of `silo sync`.
#[derive(Debug)]
pub struct Args {
    pub config: PathBuf,
    pub once: bool,
    pub nbd_listen: Option<SocketAddr>,
}

/// The S3 settings of a device's `sync` block: the same mapping the device
/// group uses (objects under `<prefix>/<device name>`, one per `blocksize`),
/// so a migration's receiver finds what `silo sync` uploaded.
pub fn settings_of(d: &DeviceSchema) -> Option<(S3Config, SyncSettings)> {
    let s = d.sync.as_ref()?;
    let cfg = silo_devicegroup::sync_s3_config(d, s, &s.prefix, RetrySettings::default());
    let settings = SyncSettings {
        autostart: false,
        ..silo_devicegroup::sync_settings(s)
    };
    Some((cfg, settings))
}

struct Synced {
    name: String,
    built: BuiltDevice,
    sync: S3Sync,
}

pub async fn run(a: Args) -> anyhow::Result<ExitCode> {
    let schema = util::load_schema(&a.config)?;
    let devices: Vec<&DeviceSchema> = schema.devices.iter().filter(|d| d.sync.is_some()).collect();
    if devices.is_empty() {
        anyhow::bail!(
            "no device in {} has a sync {{ ... }} block",
            a.config.display()
        );
    }
    let nbd = match a.nbd_listen {
        Some(addr) => Some(crate::cmd::serve::start_nbd(addr).await?),
        None => None,
    };
    let mut synced: Vec<Synced> = Vec::new();
    let mut failure = None;
    for d in devices {
        match build_one(d, nbd.as_ref().map(|n| &n.0)).await {
            Ok(s) => synced.push(s),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let result = match failure {
        Some(e) => Err(e),
        None => run_syncs(&synced, a.once).await,
    };
    crate::cmd::serve::stop_services(nbd, None).await;
    for s in &synced {
        let left = s.sync.stop().await;
        tracing::debug!(device = %s.name, safe = left.len(), "sync stopped");
        if let Err(e) = s.built.close().await {
            tracing::warn!(device = %s.name, error = %e, "closing");
        }
    }
    result
}

async fn build_one(
    d: &DeviceSchema,
    nbd: Option<&Arc<silo_nbd::Server>>,
) -> anyhow::Result<Synced> {
    let (mut cfg, settings) = settings_of(d).expect("filtered on sync");
    let name = d.name.clone();
    let sync_bs = settings
        .sync_block_size(d.block_size_bytes())
        .with_context(|| format!("device {name:?}"))?;
    cfg.block_size = sync_bs;
    let built = build_device(d, &BuildOptions::default())
        .await
        .with_context(|| format!("building device {name:?}"))?;
    let r = async {
        let (local, remote) =
            dirty_tracker(built.provider.clone(), sync_bs).context("dirty tracker")?;
        let s3 = Arc::new(S3Storage::open_or_create(&cfg).await.with_context(|| {
            format!("opening s3 bucket {:?} at {:?}", cfg.bucket, cfg.endpoint)
        })?);
        let sync = S3Sync::new(remote, s3, settings)
            .await
            .context("starting the sync")?;
        if let Some(server) = nbd {
            let p: DynProvider = Arc::new(local);
            server
                .add_export(silo_nbd::Export::new(name.clone(), p))
                .context("exporting over NBD")?;
        }
        anyhow::Ok(sync)
    }
    .await;
    match r {
        Ok(sync) => Ok(Synced { name, built, sync }),
        Err(e) => {
            let _ = built.close().await;
            Err(e.context(format!("device {name:?}")))
        }
    }
}

async fn run_syncs(synced: &[Synced], once: bool) -> anyhow::Result<ExitCode> {
    // One full pass first (both modes).
    let signal = util::shutdown_signal();
    tokio::pin!(signal);
    for s in synced {
        let pass = s.sync.sync_all(16);
        let left = tokio::select! {
            r = pass => r.with_context(|| format!("syncing {:?}", s.name))?,
            _ = &mut signal => {
                eprintln!("silo: interrupted during the first sync pass");
                return Ok(ExitCode::from(util::EXIT_INTERRUPTED));
            }
        };
        let m = s.sync.metrics();
        crate::out(format!(
            "{}: {} of {} block(s) safely in S3 ({} uploaded, {} resumed), {left} still dirty",
            s.name,
            m.safe_blocks,
            m.total_blocks,
            human_bytes(m.uploaded_bytes as f64),
            m.resumed_blocks
        ));
    }
    if once {
        return Ok(ExitCode::SUCCESS);
    }
    for s in synced {
        s.sync
            .start()
            .with_context(|| format!("starting the sync of {:?}", s.name))?;
    }
    crate::out(
        "syncing continuously (writes through --nbd-listen exports are tracked); Ctrl-C to stop",
    );
    signal.await;
    for s in synced {
        s.sync
            .sync_all(16)
            .await
            .with_context(|| format!("final pass of {:?}", s.name))?;
    }
    crate::out("stopped after a final pass");
    Ok(ExitCode::SUCCESS)
}
