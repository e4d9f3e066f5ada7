//! `silo nbd`: expose a schema's devices as NBD exports.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use silo_devicegroup::{build_device, BuildOptions};
use silo_nbd::{Export, Server};
use silo_storage::Provider;

use crate::util;

/// Arguments of `silo nbd`.
#[derive(Debug)]
pub struct Args {
    pub config: PathBuf,
    pub listen: Option<SocketAddr>,
    pub unix: Option<PathBuf>,
}

enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, PathBuf),
}

pub async fn run(a: Args) -> anyhow::Result<ExitCode> {
    let schema = util::load_schema(&a.config)?;
    let listener = match (&a.listen, &a.unix) {
        (Some(addr), None) => Listener::Tcp(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?,
        ),
        (None, Some(path)) => Listener::Unix(
            tokio::net::UnixListener::bind(path)
                .with_context(|| format!("cannot listen on {}", path.display()))?,
            path.clone(),
        ),
        _ => anyhow::bail!("give exactly one of --listen ADDR or --unix PATH"),
    };
    let server = Server::default();
    let mut built = Vec::new();
    let mut failed = None;
    for d in &schema.devices {
        match build_device(d, &BuildOptions::default()).await {
            Ok(b) => {
                let r = server.add_export(Export::new(d.name.clone(), b.provider.clone()));
                built.push((d.name.clone(), b));
                if let Err(e) = r {
                    failed = Some(anyhow::Error::new(e).context(format!("exporting {:?}", d.name)));
                    break;
                }
            }
            Err(e) => {
                failed =
                    Some(anyhow::Error::new(e).context(format!("building device {:?}", d.name)));
                break;
            }
        }
    }
    if let Some(e) = failed {
        let _ = close(&built).await;
        if let Listener::Unix(_, p) = &listener {
            let _ = std::fs::remove_file(p);
        }
        return Err(e);
    }
    let names: Vec<String> = built.iter().map(|b| b.0.clone()).collect();
    let (where_, task) = match listener {
        Listener::Tcp(l) => {
            let addr = l.local_addr().context("listener address")?;
            let s = server.clone();
            (
                format!("nbd://{addr}/<export>"),
                tokio::spawn(async move { s.serve_tcp(l).await }),
            )
        }
        Listener::Unix(l, p) => {
            let s = server.clone();
            (
                format!("nbd+unix:///<export>?socket={}", p.display()),
                tokio::spawn(async move { s.serve_unix(l).await }),
            )
        }
    };
    crate::out(format!(
        "serving {} export(s) [{}] at {where_}; Ctrl-C to stop",
        names.len(),
        names.join(", ")
    ));
    let mut task = task;
    let r = tokio::select! {
        _ = util::shutdown_signal() => None,
        r = &mut task => Some(r),
    };
    // Clients are told (ESHUTDOWN for new requests) and in-flight ones finish.
    server.shutdown().await;
    task.abort();
    let closed = close(&built).await;
    if let Some(p) = &a.unix {
        let _ = std::fs::remove_file(p);
    }
    match r {
        Some(Ok(Err(e))) => Err(anyhow::Error::new(e).context("NBD server failed")),
        Some(Err(e)) => Err(anyhow::anyhow!("NBD server task failed: {e}")),
        _ => {
            closed?;
            crate::out("stopped; devices flushed and closed");
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn close(built: &[(String, silo_devicegroup::BuiltDevice)]) -> anyhow::Result<()> {
    let mut first = None;
    for (name, b) in built {
        let p: Arc<dyn Provider> = b.provider.clone();
        if let Err(e) = p.flush().await {
            first.get_or_insert(anyhow::Error::new(e).context(format!("flushing {name}")));
        }
        if let Err(e) = b.close().await {
            first.get_or_insert(anyhow::Error::new(e).context(format!("closing {name}")));
        }
    }
    first.map_or(Ok(()), Err)
}
