//! Device construction from schemas.

mod common;

use std::sync::Arc;

use common::*;
use silo_devicegroup::{
    build_device, BuildOptions, DeviceGroup, DeviceSchema, GroupOptions, SiloSchema, System,
    WriteCacheSchema,
};
use silo_storage::{Provider, ProviderExt};

fn schema(name: &str, system: System, size: u64, loc: Option<&std::path::Path>) -> DeviceSchema {
    let mut s = DeviceSchema::new(name, system, size);
    s.block_size = Some(4096);
    s.location = loc.map(|p| p.to_path_buf());
    s
}

#[tokio::test]
async fn file_and_sparse_devices_persist_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    for system in [System::File, System::SparseFile] {
        let path = dir.path().join(format!("{system}.img"));
        let s = schema("d", system, 1_234_567, Some(&path));
        let d = build_device(&s, &BuildOptions::default()).await.unwrap();
        write_pattern(&d.provider, 4000, 10_000, 9).await;
        let want = sha(&d.provider).await;
        d.close().await.unwrap();
        let d = build_device(&s, &BuildOptions::default()).await.unwrap();
        assert_eq!(d.provider.size(), 1_234_567);
        assert_eq!(sha(&d.provider).await, want, "{system} reopened");
        d.close().await.unwrap();
        // A different size is refused, not truncated.
        let mut other = s.clone();
        other.size = 4096;
        let e = build_device(&other, &BuildOptions::default())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("1234567"), "{e}");
    }
}

#[tokio::test]
async fn directory_location_is_sharded_into_files() {
    let dir = tempfile::tempdir().unwrap();
    let s = schema("d", System::File, 10 * 4096 + 100, Some(dir.path()));
    let d = build_device(&s, &BuildOptions::default()).await.unwrap();
    write_pattern(&d.provider, 0, 10 * 4096 + 100, 1).await;
    d.close().await.unwrap();
    for i in 0..11 {
        assert!(dir.path().join(format!("file_{i}")).exists());
    }
    assert_eq!(
        std::fs::metadata(dir.path().join("file_10")).unwrap().len(),
        100
    );
}

#[tokio::test]
async fn cow_binlog_loadbinlog_and_writecache_stack() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let size = 64 * 4096;
    // A base file with data.
    let base = schema("base", System::File, size, Some(&p.join("base.img")));
    let b = build_device(&base, &BuildOptions::default()).await.unwrap();
    write_pattern(&b.provider, 0, size as usize, 3).await;
    let base_sha = sha(&b.provider).await;
    b.close().await.unwrap();
    // CoW over it, recording a binlog, behind a write cache.
    let mut s = schema("cow", System::File, size, Some(&p.join("overlay.img")));
    let mut src = base.clone();
    src.name = p.join("cow.state").to_string_lossy().into_owned();
    s.source = Some(Box::new(src));
    s.binlog = Some(p.join("writes.binlog"));
    s.write_cache = Some(WriteCacheSchema {
        min_size: 0,
        max_size: 1 << 20,
        flush_period: std::time::Duration::from_millis(50),
        block_size: None,
    });
    let d = build_device(&s, &BuildOptions::default()).await.unwrap();
    assert!(d.cow.is_some() && d.write_cache.is_some());
    assert_eq!(
        sha(&d.provider).await,
        base_sha,
        "reads fall through to the base"
    );
    d.provider.write_slice(5000, b"overlay data").await.unwrap();
    d.provider.flush().await.unwrap();
    let want = sha(&d.provider).await;
    d.close().await.unwrap();
    // (Checked before the device is reopened: opening truncates its binlog.)
    // The binlog replays into a fresh file device over the same base data:
    // a new file device loading the log reproduces the overlay's writes.
    let mut fresh = schema("fresh", System::File, size, Some(&p.join("fresh.img")));
    fresh.load_binlog = Some(p.join("writes.binlog"));
    let f = build_device(&fresh, &BuildOptions::default())
        .await
        .unwrap();
    assert_eq!(
        &f.provider.read_bytes(5000, 12).await.unwrap()[..],
        b"overlay data"
    );
    f.close().await.unwrap();
    // The base is untouched; the overlay map persisted.
    let b = build_device(&base, &BuildOptions::default()).await.unwrap();
    assert_eq!(sha(&b.provider).await, base_sha);
    b.close().await.unwrap();
    let d = build_device(&s, &BuildOptions::default()).await.unwrap();
    assert_eq!(sha(&d.provider).await, want, "CoW state reloaded");
    d.close().await.unwrap();
}

#[tokio::test]
async fn unsupported_and_invalid_schemas_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    // An s3 device without a location cannot be built (and its schema
    // does not validate either).
    let s3 = schema("s3dev", System::S3, 1 << 20, None);
    assert!(s3.validate().is_err());
    let e = build_device(&s3, &BuildOptions::default())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("location"), "{e}");
    // A group whose third device fails closes the first two (their files
    // can be reopened at once) and returns the error.
    let a = schema("a", System::File, 1 << 20, Some(&dir.path().join("a.img")));
    let b = schema("b", System::Memory, 1 << 20, None);
    let bad = schema(
        "c",
        System::File,
        1 << 20,
        Some(&dir.path().join("no/such/dir/c.img")),
    );
    let e = DeviceGroup::new_from_schema(vec![a.clone(), b, bad], GroupOptions::default())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("\"c\""), "{e}");
    let g = DeviceGroup::new_from_schema(vec![a.clone()], GroupOptions::default())
        .await
        .unwrap();
    g.close_all().await.unwrap();
    // Duplicate names are refused before anything is built.
    let e = DeviceGroup::new_from_schema(vec![a.clone(), a], GroupOptions::default())
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("duplicate") || e.to_string().contains("twice"),
        "{e}"
    );
    // expose without an NBD server is a clear error.
    let mut x = schema("x", System::Memory, 1 << 20, None);
    x.expose = true;
    let e = DeviceGroup::new_from_schema(vec![x], GroupOptions::default())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("NBD"), "{e}");
}

/// `expose = true` serves the application-facing top of the stack on the
/// group's NBD server; closing the group removes the export.
#[tokio::test]
async fn expose_adds_an_nbd_export() {
    let conf = "device \"vm\" {\n  system = \"memory\"\n  size = \"1m\"\n  blocksize = \"4k\"\n  expose = true\n}\n";
    let schema = SiloSchema::parse_hcl(conf, "test.conf").unwrap();
    let server = Arc::new(silo_nbd::Server::new(Default::default()));
    let g = DeviceGroup::new_from_schema(
        schema.devices,
        GroupOptions::default().with_nbd(server.clone()),
    )
    .await
    .unwrap();
    assert_eq!(server.export_names(), vec!["vm".to_string()]);
    let export = server.export("vm").unwrap();
    export.provider().write_slice(10, b"via nbd").await.unwrap();
    assert_eq!(
        &g.provider("vm").unwrap().read_bytes(10, 7).await.unwrap()[..],
        b"via nbd"
    );
    // Writes through the export are tracked like the application's.
    assert_eq!(g.metrics("vm").unwrap().volatility_writes, 1);
    g.close_all().await.unwrap();
    assert!(server.export_names().is_empty());
}
