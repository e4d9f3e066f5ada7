//! Serves a 64 MiB in-memory disk as export `disk` (plus a read-only view
//! `disk-ro`) on 127.0.0.1:10809 until Ctrl-C.
//!
//! ```text
//! cargo run -p silo-nbd --example serve_memory -- [ADDR] [SIZE_MIB]
//! nbdinfo --list nbd://127.0.0.1:10809
//! qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' nbd://127.0.0.1:10809/disk
//! ```
#![allow(clippy::print_stdout)]

use std::sync::Arc;

use silo_nbd::{AllocationTracker, Export, Server, ServerConfig};
use silo_storage::{DynProvider, MemoryStorage};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "silo_nbd=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:10809".into());
    let mib: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(64);
    let memory: DynProvider = Arc::new(MemoryStorage::new(mib << 20));
    // The tracker remembers written blocks so `nbdinfo --map` shows holes.
    let tracked = Arc::new(AllocationTracker::new(memory, 64 * 1024));
    let server = Server::new(ServerConfig::default());
    server.add_export(
        Export::new("disk", tracked.clone())
            .with_description("in-memory demo disk")
            .with_allocation(tracked.clone()),
    )?;
    server.add_export(Export::new("disk-ro", tracked.clone()).read_only(true))?;
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!(
        "serving nbd://{}/disk ({mib} MiB); Ctrl-C to stop",
        listener.local_addr()?
    );
    let s = server.clone();
    let serve = tokio::spawn(async move { s.serve_tcp(listener).await });
    tokio::signal::ctrl_c().await?;
    server.shutdown().await;
    serve.await??;
    let stats = server.export("disk").expect("export").metrics().snapshot();
    println!("done: {stats:?}");
    Ok(())
}
