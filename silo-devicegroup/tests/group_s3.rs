//! S3-assisted migration between device groups, against a real `s3s-fs`
//! on 127.0.0.1 (SigV4 checked) and over real TCP.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use silo_devicegroup::{
    DefaultHooks, DeviceGroup, DeviceSchema, Error, GroupOptions, ReceiveOptions, ReceivePolicy,
    ReceiverS3, SiloSchema,
};
use silo_s3::testing::S3sFs;
use silo_s3::RetrySettings;
use silo_storage::DynProvider;

const BUCKET: &str = "silo";
const MIB: u64 = 1 << 20;

fn schema(s3: &S3sFs, name: &str, size: u64, prefix: &str) -> DeviceSchema {
    let creds = s3.credentials();
    let text = format!(
        r#"device "{name}" {{
  system    = "memory"
  size      = "{size}"
  blocksize = "1m"
  sync {{
    secure          = false
    accesskey       = "{ak}"
    secretkey       = "{sk}"
    endpoint        = "127.0.0.1:{port}"
    bucket          = "{BUCKET}"
    prefix          = "{prefix}"
    autostart       = false
    grabconcurrency = 8
    config {{
      onlydirty   = false
      blockshift  = 0
      maxage      = "100ms"
      minchanged  = 1
      checkperiod = "100ms"
      limit       = 256
      concurrency = 8
    }}
  }}
}}
"#,
        ak = creds.access_key_id.expose(),
        sk = creds.secret_access_key.expose(),
        port = s3.port(),
    );
    SiloSchema::parse_hcl(&text, "s3-test.conf")
        .unwrap()
        .devices
        .remove(0)
}

fn receiver_s3(s3: &S3sFs) -> ReceiverS3 {
    let creds = s3.credentials();
    ReceiverS3 {
        endpoint: format!("127.0.0.1:{}", s3.port()),
        bucket: BUCKET.into(),
        access_key: creds.access_key_id.expose().to_string(),
        secret_key: creds.secret_access_key.expose().to_string(),
        secure: false,
        prefix: "dst".into(),
        grab_prefix: None,
        auto_start: false,
    }
}

fn opts() -> GroupOptions {
    GroupOptions::default().with_s3_retry(RetrySettings::fast())
}

fn spawn_s3_receiver(
    conn: silo_protocol::Connection,
    base: std::path::PathBuf,
    s3: Option<ReceiverS3>,
) -> tokio::task::JoinHandle<silo_devicegroup::Result<Arc<DeviceGroup>>> {
    tokio::spawn(async move {
        let mut policy = ReceivePolicy::new(&base);
        policy.s3 = s3;
        DeviceGroup::new_from_protocol(
            conn,
            |_, s: DeviceSchema| s,
            ReceiveOptions::new(policy)
                .with_rewrite_paths(true)
                .with_group(opts()),
        )
        .await
    })
}

/// Builds a sender with one device of `size` bytes filled with random data,
/// fully synced to S3, then overwrites `changed` blocks so that they are
/// not safely in S3 any more.
async fn synced_sender(s3: &S3sFs, size: u64, changed: &[u64]) -> Arc<DeviceGroup> {
    s3.create_bucket(BUCKET);
    let g = DeviceGroup::new_from_schema(vec![schema(s3, "disk", size, "src")], opts())
        .await
        .unwrap();
    let p = g.provider("disk").unwrap();
    write_pattern(&p, 0, size as usize, 7).await;
    let sync = g.s3_sync("disk").unwrap();
    sync.sync_all(20).await.unwrap();
    assert_eq!(sync.metrics().safe_blocks, size / MIB, "everything synced");
    for &b in changed {
        write_pattern(&p, b * MIB + 100, 4096, 1000 + b).await;
    }
    g
}

/// Writes 1–8 KiB at random offsets below `hot` every millisecond until
/// stopped; returns the number of writes.
fn spawn_hot_writer(
    p: DynProvider,
    hot: u64,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut n = 0;
        while !stop.load(Ordering::SeqCst) {
            let len = rng.gen_range(1..=8192u64);
            let off = rng.gen_range(0..hot - len);
            if try_write_pattern(&p, off, len as usize, rng.gen())
                .await
                .is_err()
            {
                break;
            }
            n += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        n
    })
}

/// Asserts that the destination's device equals the source's and returns
/// the destination's assist counters.
async fn assert_equal(src: &DeviceGroup, dst: &DeviceGroup) -> silo_devicegroup::AssistMetrics {
    let sp: DynProvider = src.unlocked_provider("disk").unwrap();
    let dp: DynProvider = dst.provider("disk").unwrap();
    assert_eq!(sha(&sp).await, sha(&dp).await, "destination equals source");
    dst.metrics("disk").unwrap().assist.unwrap()
}

async fn cut_over(src: &DeviceGroup, dst: &DeviceGroup) {
    src.migrate_dirty(&DefaultHooks).await.unwrap();
    src.cut_over(None).await.unwrap();
    dst.wait_for_completion().await.unwrap();
}

/// A device 90 % in S3, written during the migration: the receiver grabs
/// the S3 blocks itself, the rest comes over the wire, the hashes agree and
/// the connection carries a small fraction of the device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assisted_migration_sends_a_fraction_over_the_wire() {
    let s3 = S3sFs::start();
    let size = 64 * MIB;
    let changed: Vec<u64> = (0..64).step_by(10).collect(); // 7 of 64 blocks
    let src = synced_sender(&s3, size, &changed).await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = tcp_pair().await;
    let recv = spawn_s3_receiver(b, dir.path().to_path_buf(), Some(receiver_s3(&s3)));
    src.start_migration_to(a.clone()).await.unwrap();
    let dst = recv.await.unwrap().unwrap();

    // A writer keeps writing to a hot region (the first 4 MiB) during the
    // bulk pass and the dirty rounds.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_hot_writer(src.provider("disk").unwrap(), 4 * MIB, stop.clone());
    src.migrate_all(16, None).await.unwrap();
    let bulk_wire = a.metrics().total().bytes_out;
    src.migrate_dirty(&DefaultHooks).await.unwrap();
    stop.store(true, Ordering::SeqCst);
    let writes = writer.await.unwrap();
    cut_over(&src, &dst).await;

    let m = assert_equal(&src, &dst).await;
    // 57 blocks were safely in S3, less hot blocks 1-3 if the writer got to
    // them before `migrate_all` stopped the sync.
    assert!((54..=57).contains(&m.listed), "{m:?}");
    assert!(m.grabbed >= 50, "most listed blocks came from S3: {m:?}");
    assert_eq!(m.pending, 0, "{m:?}");
    let wire = a.metrics().total().bytes_out;
    eprintln!(
        "assisted: {bulk_wire} bytes in the bulk pass, {wire} in all, {writes} writes, {m:?}"
    );
    assert!(writes > 0, "the writer wrote during the migration");
    // The bulk pass sends the 7-10 blocks that S3 does not hold (plus
    // hash writes); the dirty rounds then re-send the writer's hot blocks.
    assert!(
        bulk_wire < size / 4,
        "{bulk_wire} bytes over the wire in the bulk pass for a {size}-byte device that is \
         90 % in S3 ({writes} writes during the migration, {m:?})"
    );
    assert!(
        wire < size,
        "{wire} bytes in all: less than one copy of the device"
    );
    src.close_all().await.unwrap();
    dst.close_all().await.unwrap();
}

/// The same device without assist (the receiver has no S3 settings and
/// declines the alternate sources): everything travels over the wire and
/// the result is still exact. This is also the control for the bound above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_without_s3_settings_gets_every_block_over_the_wire() {
    let s3 = S3sFs::start();
    let size = 16 * MIB;
    let src = synced_sender(&s3, size, &[3]).await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = tcp_pair().await;
    let recv = spawn_s3_receiver(b, dir.path().to_path_buf(), None);
    src.start_migration_to(a.clone()).await.unwrap();
    let dst = recv.await.unwrap().unwrap();
    src.migrate_all(8, None).await.unwrap();
    cut_over(&src, &dst).await;
    let m = assert_equal(&src, &dst).await;
    assert_eq!((m.listed, m.hash_writes, m.grabbed), (0, 0, 0), "{m:?}");
    assert!(a.metrics().total().bytes_out >= size, "every byte was sent");
    src.close_all().await.unwrap();
    dst.close_all().await.unwrap();
}

/// S3 objects that changed behind the sync's back (corrupted, or rewritten
/// by someone else) fail the receiver's hash check: those blocks are
/// fetched from the source instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_s3_objects_fall_back_to_the_source() {
    let s3 = S3sFs::start();
    let size = 16 * MIB;
    let src = synced_sender(&s3, size, &[]).await;
    let blocks = s3.data_dir().join(BUCKET).join("src/disk/blocks");
    for b in [2u64, 5, 11] {
        let f = blocks.join(format!("{b:016x}"));
        let mut data = std::fs::read(&f).unwrap();
        data[12345] ^= 0xff;
        std::fs::write(&f, data).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = tcp_pair().await;
    let recv = spawn_s3_receiver(b, dir.path().to_path_buf(), Some(receiver_s3(&s3)));
    src.start_migration_to(a).await.unwrap();
    let dst = recv.await.unwrap().unwrap();
    src.migrate_all(8, None).await.unwrap();
    cut_over(&src, &dst).await;
    let m = assert_equal(&src, &dst).await;
    assert_eq!(m.mismatches, 3, "{m:?}");
    assert_eq!(m.fallbacks, 3, "{m:?}");
    assert_eq!(m.grabbed, 13, "{m:?}");
    src.close_all().await.unwrap();
    dst.close_all().await.unwrap();
}

/// The S3 server dies after the receiver accepted the alternate sources:
/// every grab fails (after its retries) and falls back to the source; the
/// migration completes with exact data and nothing hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_outage_during_the_migration_falls_back_to_the_source() {
    let server = S3sFs::start();
    let size = 16 * MIB;
    let src = synced_sender(&server, size, &[]).await;
    let rs3 = receiver_s3(&server);
    let s3 = Arc::new(parking_lot::Mutex::new(server));
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = tcp_pair().await;
    let recv = spawn_s3_receiver(b, dir.path().to_path_buf(), Some(rs3));
    src.start_migration_to(a).await.unwrap();
    let dst = recv.await.unwrap().unwrap();
    // The receiver holds the list only once `migrate_all` sent it; stop S3
    // as soon as the first hash write has arrived there.
    let killer = {
        let s3 = s3.clone();
        let dst = dst.clone();
        tokio::spawn(async move {
            loop {
                let m = dst.metrics("disk").unwrap().assist.unwrap();
                if m.hash_writes > 0 {
                    s3.lock().stop();
                    return m;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    src.migrate_all(8, None).await.unwrap();
    let at_kill = tokio::time::timeout(Duration::from_secs(30), killer)
        .await
        .expect("hash writes reached the receiver")
        .unwrap();
    tokio::time::timeout(Duration::from_secs(60), cut_over(&src, &dst))
        .await
        .expect("the migration finished despite the outage");
    let m = assert_equal(&src, &dst).await;
    assert_eq!(m.hash_writes, 16, "{m:?}");
    assert_eq!(m.grabbed + m.fallbacks, 16, "every block arrived: {m:?}");
    assert!(
        m.fallbacks > 0,
        "blocks after the outage came from the source: {m:?} (at kill: {at_kill:?})"
    );
    src.close_all().await.unwrap();
    dst.close_all().await.unwrap();
}

/// A bucket that already holds the device with another block size is an
/// error when the sending group is built — not a silently useless assist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatched_block_size_in_the_bucket_is_an_error_at_start_up() {
    let s3 = S3sFs::start();
    let size = 8 * MIB;
    let cfg = s3.config(BUCKET, "src/disk", size, 64 << 10);
    silo_s3::S3Storage::create(&cfg).await.unwrap();
    let e = DeviceGroup::new_from_schema(vec![schema(&s3, "disk", size, "src")], opts())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::S3 { .. }), "{e}");
    let text = e.to_string();
    assert!(text.contains("disk") && text.contains("65536"), "{text}");
}

/// Wrong credentials in the sender's schema: a clear authentication error
/// at start-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_an_error_at_start_up() {
    let s3 = S3sFs::start();
    s3.create_bucket(BUCKET);
    let mut d = schema(&s3, "disk", 4 * MIB, "src");
    d.sync.as_mut().unwrap().secret_key = "not-the-key".into();
    let e = DeviceGroup::new_from_schema(vec![d], opts())
        .await
        .unwrap_err();
    let Error::S3 { source, .. } = &e else {
        panic!("expected an S3 error, got {e}");
    };
    assert!(source.is_authentication(), "{e}");
}

/// A `system = "s3"` device migrates into the receiver's own bucket and
/// prefix (the sender's location is never used by the receiver), with the
/// receiver's keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_device_migrates_into_the_receivers_bucket() {
    let s3 = S3sFs::start();
    s3.create_bucket(BUCKET);
    s3.create_bucket("theirs");
    let size = 4 * MIB + 12345;
    let mut d = DeviceSchema::new("disk", silo_devicegroup::System::S3, size);
    d.block_size = Some(256 << 10);
    d.location = Some("s3://theirs/src".into());
    d.validate().unwrap();
    let access = silo_devicegroup::S3Access::new(Some(s3.endpoint()), s3.credentials());
    let src = DeviceGroup::new_from_schema(
        vec![d],
        opts().with_build(silo_devicegroup::BuildOptions::default().with_s3(access)),
    )
    .await
    .unwrap();
    let p = src.provider("disk").unwrap();
    write_pattern(&p, 0, size as usize, 5).await;
    assert!(
        s3.data_dir().join("theirs/src/blocks").is_dir(),
        "the sender's blocks are objects in its bucket"
    );

    let dir = tempfile::tempdir().unwrap();
    let (a, b) = tcp_pair().await;
    let rs3 = receiver_s3(&s3);
    let base = dir.path().to_path_buf();
    let recv = tokio::spawn(async move {
        let mut policy = ReceivePolicy::new(&base);
        policy.s3 = Some(rs3);
        policy.allowed_systems.push(silo_devicegroup::System::S3);
        DeviceGroup::new_from_protocol(
            b,
            |_, s: DeviceSchema| s,
            ReceiveOptions::new(policy).with_group(opts()),
        )
        .await
    });
    src.start_migration_to(a).await.unwrap();
    let dst = recv.await.unwrap().unwrap();
    assert_eq!(
        dst.schema("disk").unwrap().location.as_deref(),
        Some(std::path::Path::new("s3://silo/dst/disk")),
        "the receiver's bucket and prefix, not the sender's"
    );
    src.migrate_all(8, None).await.unwrap();
    cut_over(&src, &dst).await;
    let sp: DynProvider = src.unlocked_provider("disk").unwrap();
    let dp: DynProvider = dst.provider("disk").unwrap();
    let want = sha(&sp).await;
    assert_eq!(want, sha(&dp).await);
    assert!(s3.data_dir().join(BUCKET).join("dst/disk/blocks").is_dir());
    src.close_all().await.unwrap();
    dst.close_all().await.unwrap();
    // Reopened from the bucket, the received device still holds the data.
    let mut again = DeviceSchema::new("disk", silo_devicegroup::System::S3, size);
    again.block_size = Some(256 << 10);
    again.location = Some("s3://silo/dst/disk".into());
    let access = silo_devicegroup::S3Access::new(Some(s3.endpoint()), s3.credentials());
    let built = silo_devicegroup::build_device(
        &again,
        &silo_devicegroup::BuildOptions::default().with_s3(access),
    )
    .await
    .unwrap();
    assert_eq!(sha(&built.provider).await, want);
    built.close().await.unwrap();
}

/// Bad S3 locations are schema errors with the field named.
#[test]
fn s3_locations_are_validated() {
    for bad in ["bucket/prefix", "s3://", "s3:///x", "s3://b/../x"] {
        let text = format!(
            "device \"d\" {{\n  system = \"s3\"\n  size = \"1m\"\n  location = \"{bad}\"\n}}\n"
        );
        let e = SiloSchema::parse_hcl(&text, "x.conf").unwrap_err();
        assert!(e.to_string().contains("location"), "{bad}: {e}");
    }
    let ok = "device \"d\" {\n  system = \"s3\"\n  size = \"1m\"\n  location = \"s3://b/p/q\"\n}\n";
    SiloSchema::parse_hcl(ok, "x.conf").unwrap();
}

/// The group info a sender puts on the wire carries no S3 keys (the
/// receiver uses its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_keys_never_travel_over_the_wire() {
    let s3 = S3sFs::start();
    s3.create_bucket(BUCKET);
    let d = schema(&s3, "disk", 2 * MIB, "src");
    let secret = d.sync.as_ref().unwrap().secret_key.clone();
    let access = d.sync.as_ref().unwrap().access_key.clone();
    let src = DeviceGroup::new_from_schema(vec![d], opts()).await.unwrap();
    let (a, b) = tcp_pair().await;
    let mut infos = b.incoming(0, silo_protocol::Kind::DeviceGroupInfo).unwrap();
    let start = {
        let src = src.clone();
        tokio::spawn(async move { src.start_migration_to(a).await })
    };
    let info = tokio::time::timeout(Duration::from_secs(10), infos.recv())
        .await
        .unwrap()
        .unwrap();
    let silo_protocol::Message::DeviceGroupInfo(info) = &info.message else {
        panic!("expected group info");
    };
    let text = &info.devices[0].1.schema;
    assert!(text.contains("sync"), "the sync block is sent: {text}");
    assert!(!text.contains(&secret), "secret key on the wire: {text}");
    assert!(!text.contains(&access), "access key on the wire: {text}");
    b.close();
    assert!(start.await.unwrap().is_err(), "no receiver answered");
    src.close_all().await.unwrap();
}

/// With `auto_start`, a receiver starts its own sync to its own prefix once
/// its migration completed, and becomes an S3-assisted source for the next
/// hop: A → B (assisted from A's objects) → C (assisted from B's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_syncs_itself_and_assists_the_next_hop() {
    let s3 = S3sFs::start();
    let size = 8 * MIB;
    let a_group = synced_sender(&s3, size, &[1]).await;
    let hop = |prefix: &str| {
        let mut r = receiver_s3(&s3);
        r.prefix = prefix.into();
        r.auto_start = true;
        r
    };
    // A → B
    let dir_b = tempfile::tempdir().unwrap();
    let (a, b) = tcp_pair().await;
    let recv = spawn_s3_receiver(b, dir_b.path().to_path_buf(), Some(hop("b")));
    a_group.start_migration_to(a).await.unwrap();
    let b_group = recv.await.unwrap().unwrap();
    a_group.migrate_all(8, None).await.unwrap();
    cut_over(&a_group, &b_group).await;
    let mb = assert_equal(&a_group, &b_group).await;
    assert!(mb.grabbed >= 6, "A → B was assisted: {mb:?}");
    // B uploads the received device to its own prefix.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(m) = b_group.metrics("disk").unwrap().s3_sync {
            if m.safe_blocks == size / MIB {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "B's sync did not upload the device: {:?}",
            b_group.metrics("disk").unwrap().s3_sync
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(s3.data_dir().join(BUCKET).join("b/disk/blocks").is_dir());
    // B → C, grabbing from B's prefix.
    let dir_c = tempfile::tempdir().unwrap();
    let (a, b) = tcp_pair().await;
    let recv = spawn_s3_receiver(b, dir_c.path().to_path_buf(), Some(hop("c")));
    b_group.start_migration_to(a).await.unwrap();
    let c_group = recv.await.unwrap().unwrap();
    b_group.migrate_all(8, None).await.unwrap();
    cut_over(&b_group, &c_group).await;
    let mc = assert_equal(&b_group, &c_group).await;
    assert_eq!(
        mc.grabbed,
        size / MIB,
        "B → C came from B's objects: {mc:?}"
    );
    for g in [a_group, b_group, c_group] {
        g.close_all().await.unwrap();
    }
}
