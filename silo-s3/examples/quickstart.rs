//! Starts a local S3 server (s3s-fs, installed by `cargo xtask setup`),
//! stores a small device in it, and reads it back.
//!
//! ```text
//! cargo run -p silo-s3 --features testing --example quickstart
//! ```

use silo_s3::testing::S3sFs;
use silo_s3::S3Storage;
use silo_storage::ProviderExt;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let server = S3sFs::start();
    // 1 MiB device of 64 KiB blocks under `devices/demo` in bucket `silo`.
    let config = server.config("silo", "devices/demo", 1 << 20, 64 * 1024);
    let dev = S3Storage::open_or_create(&config).await?;

    dev.write_slice(70_000, b"hello from S3").await?;
    let back = dev.read_bytes(70_000, 13).await?;
    assert_eq!(&back[..], b"hello from S3");
    // Never-written blocks read as zeroes.
    assert!(dev.read_bytes(0, 4096).await?.iter().all(|&b| b == 0));

    let objects = dev.block_store().list_blocks().await?;
    let m = dev.metrics().snapshot();
    eprintln!(
        "block objects: {objects:?}; {} PUTs, {} GETs ({} of missing blocks)",
        m.puts, m.gets, m.get_missing
    );
    Ok(())
}
