//! `S3Storage` against a real `s3s-fs` server on 127.0.0.1 (SigV4 checked).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::TryStreamExt;
use proptest::prelude::*;
use silo_s3::testing::{pattern, S3sFs};
use silo_s3::{s3_error_of, Credentials, OpenMode, S3Error, S3Storage};
use silo_storage::{ErrorKind, Provider, ProviderExt};

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, len: usize, seed: u64 },
    Read { offset: u64, len: usize },
    Trim { offset: u64, len: u64 },
    Zero { offset: u64, len: u64 },
}

const BS: u64 = 4096;
// Five full blocks and a partial sixth.
const SIZE: u64 = 5 * BS + 1000;

fn op() -> impl Strategy<Value = Op> {
    // Offsets and lengths biased towards block edges, the partial last
    // block and just past the end.
    let edge = prop_oneof![
        0..SIZE + 10,
        (0u64..6).prop_map(|b| b * BS),
        (1u64..6).prop_map(|b| b * BS - 1),
        Just(SIZE - 1000),
        Just(SIZE - 1),
        Just(SIZE),
    ];
    let len = prop_oneof![
        1usize..600,
        1usize..(3 * BS as usize),
        Just(BS as usize),
        Just(1000usize)
    ];
    // Zeroing lengths also span most of the device (the listing path).
    let long = prop_oneof![(1u64..3 * BS), (4 * BS..SIZE + 10)];
    prop_oneof![
        4 => (edge.clone(), len.clone(), any::<u64>()).prop_map(|(offset, len, seed)| Op::Write { offset, len, seed }),
        3 => (edge.clone(), len.clone()).prop_map(|(offset, len)| Op::Read { offset, len }),
        1 => (edge.clone(), long.clone()).prop_map(|(offset, len)| Op::Trim { offset, len }),
        1 => (edge, long).prop_map(|(offset, len)| Op::Zero { offset, len }),
    ]
}

fn in_range(offset: u64, len: u64) -> bool {
    offset.checked_add(len).is_some_and(|e| e <= SIZE)
}

async fn run_model(server: &S3sFs, case: u64, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let cfg = server.config("model", &format!("case{case}"), SIZE, BS);
    let dev = S3Storage::open_or_create(&cfg)
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut model = vec![0u8; SIZE as usize];
    for op in ops {
        match op {
            Op::Write { offset, len, seed } => {
                let data = pattern(seed, len);
                let r = dev.write_at(offset, Bytes::from(data.clone())).await;
                if in_range(offset, len as u64) {
                    prop_assert!(r.is_ok(), "write {offset}+{len}: {r:?}");
                    model[offset as usize..offset as usize + len].copy_from_slice(&data);
                } else {
                    prop_assert_eq!(r.unwrap_err().kind(), ErrorKind::OutOfRange);
                }
            }
            Op::Read { offset, len } => {
                // A dirty buffer: never-written blocks must come back as zeroes.
                let buf = bytes::BytesMut::from(&vec![0xAAu8; len][..]);
                let r = dev.read_at(offset, buf).await;
                if in_range(offset, len as u64) {
                    let got = r.map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert!(
                        got[..] == model[offset as usize..offset as usize + len],
                        "read {}+{}",
                        offset,
                        len
                    );
                } else {
                    prop_assert_eq!(r.unwrap_err().kind(), ErrorKind::OutOfRange);
                }
            }
            Op::Trim { offset, len } | Op::Zero { offset, len } => {
                let r = if matches!(op, Op::Trim { .. }) {
                    dev.trim(offset, len).await
                } else {
                    dev.write_zeroes(offset, len).await
                };
                if in_range(offset, len) {
                    prop_assert!(r.is_ok(), "trim/zero {offset}+{len}: {r:?}");
                    model[offset as usize..(offset + len) as usize].fill(0);
                } else {
                    prop_assert_eq!(r.unwrap_err().kind(), ErrorKind::OutOfRange);
                }
            }
        }
    }
    let all = dev
        .read_bytes(0, SIZE as usize)
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert!(all[..] == model[..], "final contents differ");
    // A second provider opening the same prefix sees the same bytes.
    let again = S3Storage::open(&cfg)
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let all2 = again
        .read_bytes(0, SIZE as usize)
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert!(all2[..] == model[..], "reopened contents differ");
    Ok(())
}

#[test]
fn model_based_against_real_server() {
    let server = S3sFs::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let case = std::sync::atomic::AtomicU64::new(0);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 12,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(&proptest::collection::vec(op(), 1..16), |ops| {
            let c = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            rt.block_on(run_model(&server, c, ops))
        })
        .unwrap();
}

async fn list_keys(dev: &S3Storage) -> Vec<(String, u64)> {
    let store = dev.block_store();
    let metas: Vec<_> = store
        .object_store()
        .list(Some(store.keys().prefix()))
        .try_collect()
        .await
        .unwrap();
    let mut v: Vec<_> = metas
        .into_iter()
        .map(|m| (m.location.to_string(), m.size))
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_really_appear_in_the_bucket() {
    let server = S3sFs::start();
    let size = 3 * BS + 100;
    let cfg = server.config("objects", "dev/a", size, BS);
    let dev = S3Storage::create(&cfg).await.unwrap();
    assert_eq!(
        list_keys(&dev).await,
        vec![(
            "dev/a/manifest.json".to_string(),
            list_keys(&dev).await[0].1
        )]
    );

    dev.write_slice(0, &pattern(1, BS as usize)).await.unwrap();
    // A partial write into the trailing partial block: stored at its real length.
    dev.write_slice(3 * BS + 10, &[7u8; 20]).await.unwrap();
    let keys = list_keys(&dev).await;
    let names: Vec<_> = keys.iter().map(|(k, s)| (k.as_str(), *s)).collect();
    assert_eq!(
        names[..2],
        [
            ("dev/a/blocks/0000000000000000", BS),
            ("dev/a/blocks/0000000000000003", 100)
        ]
    );
    assert_eq!(names[2].0, "dev/a/manifest.json");
    // The objects are on the server's disk too (not only in some cache).
    let on_disk = server
        .data_dir()
        .join("objects/dev/a/blocks/0000000000000003");
    assert_eq!(std::fs::metadata(&on_disk).unwrap().len(), 100);
    assert_eq!(
        dev.block_store().list_blocks().await.unwrap(),
        vec![(0, BS), (3, 100)]
    );

    // Zeroing a whole block deletes its object; trimming the partial one too.
    dev.write_slice(0, &vec![0u8; BS as usize]).await.unwrap();
    dev.trim(3 * BS, 100).await.unwrap();
    assert!(dev.block_store().list_blocks().await.unwrap().is_empty());
    let m = dev.metrics().snapshot();
    assert!(m.puts >= 3 && m.deletes >= 2 && m.merge_gets >= 1, "{m:?}");
    assert_eq!(m.inflight_reads + m.inflight_writes, 0);
    assert_eq!(m.errors, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_a_clear_authentication_error() {
    let server = S3sFs::start();
    for creds in [
        Credentials::new(
            server.credentials().access_key_id.expose(),
            "not-the-secret",
        ),
        Credentials::new(
            "unknown-access-key",
            server.credentials().secret_access_key.expose(),
        ),
    ] {
        let mut cfg = server.config("auth", "dev", 8192, BS);
        cfg.credentials = creds;
        let t = Instant::now();
        let err = S3Storage::open_or_create(&cfg).await.unwrap_err();
        assert!(err.is_authentication(), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("authentication failed") && msg.contains("secret key"),
            "{msg}"
        );
        assert!(
            !msg.contains("not-the-secret"),
            "the secret leaked into: {msg}"
        );
        // Auth errors are not retried for long.
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }
    // The right credentials work.
    let cfg = server.config("auth", "dev", 8192, BS);
    S3Storage::open_or_create(&cfg).await.unwrap();
    // A provider call with wrong credentials (e.g. keys rotated under a
    // running device) reports the same error through silo_storage::Error.
    let dev = S3Storage::open(&cfg).await.unwrap();
    drop(dev);
    let mut bad = cfg.clone();
    bad.credentials = Credentials::new("x", "y");
    let store = silo_s3::BlockStore::from_config(&bad).unwrap();
    let err = store.get_block(0).await.unwrap_err();
    assert!(err.is_authentication(), "{err:?}");
    let as_storage: silo_storage::Error = err.into();
    assert_eq!(as_storage.kind(), ErrorKind::Remote);
    assert!(s3_error_of(&as_storage).is_some_and(S3Error::is_authentication));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_bucket_is_reported() {
    let server = S3sFs::start();
    let mut cfg = server.config("exists", "dev", 8192, BS);
    cfg.bucket = "no-such-bucket".into();
    let err = S3Storage::open_or_create(&cfg).await.unwrap_err();
    assert!(matches!(err, S3Error::BucketNotFound { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_is_written_and_checked() {
    let server = S3sFs::start();
    let cfg = server.config("manifest", "dev", 10 * BS, BS);
    // Open without create: no manifest yet.
    let err = S3Storage::open(&cfg).await.unwrap_err();
    assert!(matches!(err, S3Error::ManifestMissing { .. }), "{err:?}");
    let dev = S3Storage::create(&cfg).await.unwrap();
    dev.write_slice(BS, &[1, 2, 3]).await.unwrap();
    // Create again is refused: it would hand out someone's data as new.
    assert!(S3Storage::create(&cfg).await.is_err());

    let mut other_bs = cfg.clone();
    other_bs.block_size = 2 * BS;
    let err = S3Storage::open_or_create(&other_bs).await.unwrap_err();
    match &err {
        S3Error::ManifestMismatch {
            field,
            stored,
            configured,
            ..
        } => {
            assert_eq!(
                (*field, stored.as_str(), configured.as_str()),
                ("block_size", "4096", "8192")
            );
        }
        e => panic!("expected a mismatch, got {e:?}"),
    }
    assert!(err.to_string().contains("block_size = 4096"), "{err}");
    let mut other_size = cfg.clone();
    other_size.size = 11 * BS;
    let err = S3Storage::open_with(&other_size, OpenMode::Open)
        .await
        .unwrap_err();
    assert!(
        matches!(err, S3Error::ManifestMismatch { field: "size", .. }),
        "{err:?}"
    );

    // A garbage manifest is a clear error, not a panic.
    std::fs::write(
        server.data_dir().join("manifest/dev/manifest.json"),
        b"{not json",
    )
    .unwrap();
    let err = S3Storage::open(&cfg).await.unwrap_err();
    assert!(matches!(err, S3Error::Corrupt { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_writes_aborts_inflight_uploads() {
    let server = S3sFs::start();
    let bs = 256 * 1024u64;
    let blocks = 48u64;
    let mut cfg = server.config("cancel", "dev", blocks * bs, bs);
    cfg.concurrency = 2;
    let dev = Arc::new(S3Storage::create(&cfg).await.unwrap());
    let data = Bytes::from(pattern(9, (blocks * bs) as usize));

    let w = {
        let dev = dev.clone();
        let data = data.clone();
        tokio::spawn(async move { dev.write_at(0, data).await })
    };
    // Wait until uploads are in flight, then cancel an unrelated range
    // (nothing happens) and the written range.
    let t = Instant::now();
    while dev.metrics().snapshot().inflight_writes == 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "no upload started");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    dev.cancel_writes(blocks * bs, 0);
    dev.cancel_writes(bs * 40, bs);
    let err = tokio::time::timeout(Duration::from_secs(20), w)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Cancelled, "{err}");
    let m = dev.metrics().snapshot();
    assert_eq!(m.cancelled, 1);
    assert!(
        m.puts < blocks,
        "the whole write went through before the cancel: {m:?}"
    );
    // Nothing is stuck: the in-flight gauges are back to zero and the same
    // range can be written and read back.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(dev.metrics().snapshot().inflight_writes, 0);
    dev.write_at(0, data.slice(..(4 * bs) as usize))
        .await
        .unwrap();
    assert_eq!(
        dev.read_bytes(0, (4 * bs) as usize).await.unwrap(),
        data.slice(..(4 * bs) as usize)
    );
    // cancel_writes with nothing in flight is a no-op.
    dev.cancel_writes(0, blocks * bs);
    dev.write_at(bs, data.slice(..bs as usize)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_stopped_mid_operation_gives_a_clear_error_then_recovers() {
    let mut server = S3sFs::start();
    let bs = 64 * 1024u64;
    let blocks = 64u64;
    let mut cfg = server.config("outage", "dev", blocks * bs, bs);
    cfg.concurrency = 2;
    let dev = Arc::new(S3Storage::create(&cfg).await.unwrap());
    let first = Bytes::from(pattern(3, bs as usize));
    dev.write_at(0, first.clone()).await.unwrap();

    let w = {
        let dev = dev.clone();
        tokio::spawn(async move {
            dev.write_at(bs, Bytes::from(pattern(4, ((blocks - 1) * bs) as usize)))
                .await
        })
    };
    let t = Instant::now();
    while dev.metrics().snapshot().puts < 3 {
        assert!(t.elapsed() < Duration::from_secs(10), "no upload happened");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    server.stop();
    let t = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(30), w)
        .await
        .expect("the write must fail in bounded time, not hang")
        .expect("no panic");
    let err = res.expect_err("the server is gone");
    assert_eq!(err.kind(), ErrorKind::Remote, "{err}");
    let s3 = s3_error_of(&err).expect("an S3 error inside");
    assert!(matches!(s3, S3Error::Request { .. }), "{s3:?}");
    let msg = err.to_string();
    assert!(msg.contains("writing") && msg.contains("retries"), "{msg}");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());

    // Reads fail the same way while it is down.
    let err = tokio::time::timeout(Duration::from_secs(30), dev.read_bytes(0, 10))
        .await
        .expect("bounded")
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Remote);
    assert!(dev.metrics().snapshot().errors >= 2);

    // Back up: the data written before the outage is intact.
    server.restart();
    assert_eq!(dev.read_bytes(0, bs as usize).await.unwrap(), first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_waits_and_refuses_later_calls() {
    let server = S3sFs::start();
    let cfg = server.config("close", "dev", 4 * BS, BS);
    let dev = S3Storage::create(&cfg).await.unwrap();
    dev.write_slice(0, b"hello").await.unwrap();
    dev.flush().await.unwrap();
    assert!(dev.capabilities().trim);
    dev.close().await.unwrap();
    dev.close().await.unwrap();
    assert_eq!(
        dev.read_bytes(0, 5).await.unwrap_err().kind(),
        ErrorKind::Closed
    );
    assert_eq!(
        dev.write_slice(0, b"x").await.unwrap_err().kind(),
        ErrorKind::Closed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_partial_writes_to_one_block_are_not_lost() {
    let server = S3sFs::start();
    let cfg = server.config("rmw", "dev", 2 * BS, BS);
    let dev = Arc::new(S3Storage::create(&cfg).await.unwrap());
    // 32 writers each own a 100-byte slice of block 0 (and a few spill
    // into block 1); every one does GET-merge-PUT of the same object.
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        let dev = dev.clone();
        tasks.push(tokio::spawn(async move {
            let off = i * 130;
            dev.write_at(off, Bytes::from(pattern(i, 100)))
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let all = dev.read_bytes(0, (2 * BS) as usize).await.unwrap();
    for i in 0..32u64 {
        let off = (i * 130) as usize;
        assert_eq!(
            &all[off..off + 100],
            &pattern(i, 100)[..],
            "write {i} was lost"
        );
    }
    assert!(dev.metrics().snapshot().merge_gets >= 32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_times_out_instead_of_hanging() {
    // Accepts connections and reads requests, but never replies.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().flatten() {
            held.push(s);
        }
    });
    let mut cfg = silo_s3::S3Config::new(
        Some(format!("http://127.0.0.1:{port}")),
        "bucket",
        "dev",
        Credentials::new("a", "b"),
        8192,
    );
    cfg.allow_http = true;
    cfg.block_size = BS;
    cfg.retry = silo_s3::RetrySettings {
        request_timeout: Duration::from_millis(300),
        retry_timeout: Duration::from_secs(1),
        ..silo_s3::RetrySettings::fast()
    };
    let t = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(20), S3Storage::open_or_create(&cfg))
        .await
        .expect("must not hang")
        .unwrap_err();
    assert!(matches!(err, S3Error::Request { .. }), "{err:?}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimming_a_large_sparse_range_deletes_only_existing_objects() {
    let server = S3sFs::start();
    let blocks = 300u64;
    let size = blocks * BS + 10;
    let cfg = server.config("sparse", "dev", size, BS);
    let dev = S3Storage::create(&cfg).await.unwrap();
    for b in [0u64, 7, 150, 299, 300] {
        dev.write_slice(b * BS, &pattern(b, 10)).await.unwrap();
    }
    let before = dev.metrics().snapshot();
    // From the middle of block 0 to the end: block 0 is merged, the other
    // four objects are deleted, and the ~296 missing ones are not touched.
    dev.trim(5, size - 5).await.unwrap();
    let m = dev.metrics().snapshot();
    assert_eq!(m.deletes - before.deletes, 4, "{m:?}");
    assert_eq!(
        m.puts - before.puts,
        1,
        "block 0 keeps its first 5 bytes: {m:?}"
    );
    assert_eq!(
        dev.block_store().list_blocks().await.unwrap(),
        vec![(0, BS)]
    );
    let all = dev.read_bytes(0, size as usize).await.unwrap();
    assert_eq!(&all[..5], &pattern(0, 5)[..]);
    assert!(all[5..].iter().all(|&b| b == 0));
    // A range starting after block 0 lists from its own first block.
    dev.write_slice(200 * BS, b"x").await.unwrap();
    dev.write_zeroes(100 * BS, 150 * BS).await.unwrap();
    assert_eq!(
        dev.block_store().list_blocks().await.unwrap(),
        vec![(0, BS)]
    );
}
