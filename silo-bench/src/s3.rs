//! Benchmarks of the s3 group: S3-assisted vs unassisted migration of the
//! same device (90 % of its blocks already in S3), in the same run, against
//! a real `s3s-fs` on 127.0.0.1.
//!
//! One sending group holds a memory device of random data with a `sync`
//! block; it is synced to S3 completely, then 10 % of its blocks are
//! overwritten (so they are not safely in S3 any more). It is then migrated
//! twice over loopback TCP into fresh memory devices: once to a receiver
//! without S3 settings (it declines the alternate sources, so every block
//! travels over the wire), once to a receiver that grabs the listed blocks
//! from S3 itself. Each run is timed from `migrate_all` to the last
//! completion ack (the receiver acknowledges completion only when every
//! block is present, grabbed ones included), and the bytes of both
//! directions of the migration connection are counted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use silo_devicegroup::{
    DeviceGroup, DeviceSchema, GroupOptions, ReceiveOptions, ReceivePolicy, ReceiverS3,
    SyncConfigSchema, SyncSchema, System,
};
use silo_protocol::Compression;
use silo_s3::testing::S3sFs;
use silo_storage::{DynProvider, Provider};

use crate::devicegroup::{connection_pair, random};
use crate::report::Report;
use crate::Opts;

const GROUP: &str = "s3";
const MIB: u64 = 1 << 20;
const BUCKET: &str = "silo";

/// Runs the s3 benchmarks.
pub fn run(opts: &Opts, report: &mut Report, rt: &tokio::runtime::Runtime) {
    let size = if opts.quick { 64 * MIB } else { 1024 * MIB };
    let s3 = S3sFs::start();
    s3.create_bucket(BUCKET);
    let (src, upload) = rt.block_on(synced_sender(&s3, size));
    let plain = rt.block_on(migrate(&src, None));
    let assisted = rt.block_on(migrate(&src, Some(receiver_s3(&s3))));
    rt.block_on(async {
        let _ = src.close_all().await;
    });
    let name = format!("{} MiB device, 90 % in S3", size / MIB);
    report.add(
        GROUP,
        &format!("{name}: bytes over the migration connection"),
        assisted.wire as f64 / MIB as f64,
        "unassisted migration",
        plain.wire as f64 / MIB as f64,
        "MiB",
        false,
        "small fraction",
    );
    report.add(
        GROUP,
        &format!("{name}: migration time"),
        assisted.time.as_secs_f64() * 1e3,
        "unassisted migration",
        plain.time.as_secs_f64() * 1e3,
        "ms",
        false,
        "—",
    );
    report.note(
        GROUP,
        &format!(
            "One sending group, one {} MiB memory device of random data, 1 MiB blocks, with a \
             `sync` block to a local s3s-fs 0.14.1 (the initial upload of the whole device took \
             {:.1} s); after the upload 10 % of the blocks are overwritten. The device is then \
             migrated twice over loopback TCP into fresh memory devices, `migrate_all(64)` + \
             `completed()`, timed to the last completion ack: unassisted (the receiver has no \
             S3 settings and declines the alternate sources) and assisted (the receiver grabs \
             the {} listed blocks from S3 itself with grab concurrency 16, verifying each \
             SHA-256). Bytes are both directions of the migration connection, headers \
             included. The assisted run blocked on s3s-fs GETs ({} blocks grabbed, {} fetched \
             from the source after a failed grab); s3s-fs is slow for small GETs, so the time \
             row says little about a production S3 store — the bytes row is the point of the \
             assist: the wire carries what S3 does not hold.",
            size / MIB,
            upload.as_secs_f64(),
            assisted.listed,
            assisted.grabbed,
            assisted.fallbacks,
        ),
    );
}

struct Run {
    wire: u64,
    time: Duration,
    listed: u64,
    grabbed: u64,
    fallbacks: u64,
}

fn receiver_s3(s3: &S3sFs) -> ReceiverS3 {
    let c = s3.credentials();
    ReceiverS3 {
        endpoint: format!("127.0.0.1:{}", s3.port()),
        bucket: BUCKET.into(),
        access_key: c.access_key_id.expose().to_string(),
        secret_key: c.secret_access_key.expose().to_string(),
        secure: false,
        prefix: "dst".into(),
        grab_prefix: None,
        auto_start: false,
    }
}

/// The sender: filled, fully uploaded, then 10 % of its blocks overwritten.
/// Returns it and the time the upload took.
async fn synced_sender(s3: &S3sFs, size: u64) -> (Arc<DeviceGroup>, Duration) {
    let c = s3.credentials();
    let mut d = DeviceSchema::new("disk", System::Memory, size);
    d.block_size = Some(MIB);
    d.sync = Some(SyncSchema {
        secure: false,
        access_key: c.access_key_id.expose().to_string(),
        secret_key: c.secret_access_key.expose().to_string(),
        endpoint: format!("127.0.0.1:{}", s3.port()),
        bucket: BUCKET.into(),
        prefix: "src".into(),
        grab_prefix: String::new(),
        auto_start: false,
        grab_concurrency: 16,
        config: SyncConfigSchema {
            only_dirty: false,
            block_shift: 0,
            max_age: Duration::from_secs(1),
            min_changed: 1,
            check_period: Duration::from_secs(1),
            limit: 4096,
            concurrency: 16,
        },
    });
    let src = DeviceGroup::new_from_schema(
        vec![d],
        GroupOptions::default().with_compression(Compression::None),
    )
    .await
    .expect("sender group");
    let p: DynProvider = src.provider("disk").expect("device");
    let mut off = 0;
    while off < size {
        p.write_at(off, Bytes::from(random(MIB as usize, off + 1)))
            .await
            .expect("fill");
        off += MIB;
    }
    let start = Instant::now();
    let sync = src.s3_sync("disk").expect("sync");
    sync.sync_all(50).await.expect("upload");
    let upload = start.elapsed();
    for b in (0..size / MIB).step_by(10) {
        p.write_at(b * MIB + 4096, Bytes::from(random(4096, b + 7)))
            .await
            .expect("overwrite");
    }
    (src, upload)
}

async fn migrate(src: &Arc<DeviceGroup>, s3: Option<ReceiverS3>) -> Run {
    let (a, b) = connection_pair().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut policy = ReceivePolicy::new(dir.path());
    policy.s3 = s3;
    let recv = tokio::spawn(DeviceGroup::new_from_protocol(
        b,
        |_, s| s,
        ReceiveOptions::new(policy),
    ));
    src.start_migration_to(a.clone()).await.expect("start");
    let dst = recv.await.expect("join").expect("receiver group");
    let start = Instant::now();
    src.migrate_all(64, None).await.expect("migrate_all");
    src.completed().await.expect("completed");
    let time = start.elapsed();
    let t = a.metrics().total();
    let m = dst
        .metrics("disk")
        .and_then(|m| m.assist)
        .unwrap_or_default();
    // Check the result: equal content.
    let want = silo_storage::hash::sha256(src.unlocked_provider("disk").expect("src").as_ref())
        .await
        .expect("hash");
    let got = silo_storage::hash::sha256(dst.provider("disk").expect("dst").as_ref())
        .await
        .expect("hash");
    assert_eq!(want, got, "the migrated device differs from the source");
    let _ = dst.close_all().await;
    Run {
        wire: t.bytes_out + t.bytes_in,
        time,
        listed: m.listed,
        grabbed: m.grabbed,
        fallbacks: m.fallbacks,
    }
}
