//! `silo sync` against a real S3 server (`s3s-fs` on 127.0.0.1).

mod common;

use std::time::Duration;

use common::*;
use silo_s3::testing::S3sFs;

const BS: usize = 64 << 10;

fn config(dir: &std::path::Path, s3: &S3sFs) -> std::path::PathBuf {
    let c = s3.credentials();
    write_config(
        dir,
        &format!(
            r#"
device "disk" {{
  system    = "file"
  size      = "1m"
  blocksize = "64k"
  location  = "{}"
  sync {{
    secure          = false
    accesskey       = "{}"
    secretkey       = "{}"
    endpoint        = "127.0.0.1:{}"
    bucket          = "silo"
    prefix          = "disk"
    autostart       = false
    grabconcurrency = 4
    config {{
      onlydirty   = false
      blockshift  = 0
      maxage      = "100ms"
      minchanged  = 1
      limit       = 64
      checkperiod = "100ms"
      concurrency = 4
    }}
  }}
}}
device "plain" {{
  system = "memory"
  size   = "1m"
}}
"#,
            dir.join("disk.img").display(),
            c.access_key_id.expose(),
            c.secret_access_key.expose(),
            s3.port()
        ),
    )
}

fn object(s3: &S3sFs, block: u64) -> Vec<u8> {
    let p = s3
        .data_dir()
        .join("silo/disk/disk/blocks")
        .join(format!("{block:016x}"));
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn sync_once_uploads_every_block_and_resumes() {
    let s3 = S3sFs::start();
    s3.create_bucket("silo");
    let tmp = tempfile::tempdir().unwrap();
    let data = pattern(1 << 20, 9);
    std::fs::write(tmp.path().join("disk.img"), &data).unwrap();
    let conf = config(tmp.path(), &s3);
    let o = silo()
        .args(["sync", "--config", conf.to_str().unwrap(), "--once"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains("disk: 16 of 16 block(s) safely in S3"),
        "{out}"
    );
    assert!(
        !out.contains("plain"),
        "only devices with a sync block: {out}"
    );
    for b in 0..16u64 {
        assert_eq!(
            object(&s3, b),
            data[b as usize * BS..(b as usize + 1) * BS],
            "block {b}"
        );
    }
    // A second pass resumes from the hash index: nothing uploaded again.
    let o = silo()
        .args(["sync", "--config", conf.to_str().unwrap(), "--once"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("(0 B uploaded, 16 resumed)"), "{out}");
}

#[test]
fn continuous_sync_uploads_writes_made_through_nbd() {
    let s3 = S3sFs::start();
    s3.create_bucket("silo");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("disk.img"), pattern(1 << 20, 3)).unwrap();
    let conf = config(tmp.path(), &s3);
    let nbd = free_addr();
    let mut p = Proc::start(
        tmp.path(),
        "sync",
        &[
            "sync",
            "--config",
            conf.to_str().unwrap(),
            "--nbd-listen",
            &nbd.to_string(),
        ],
    );
    p.wait_for("syncing continuously", Duration::from_secs(30));
    let (ok, o) = tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x6d 128k 64k",
            &format!("nbd://{nbd}/disk"),
        ],
    );
    assert!(ok, "{o}");
    // The running sync uploads it (max age 100 ms), without a signal.
    let t0 = std::time::Instant::now();
    while object(&s3, 2) != vec![0x6d; BS] {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "block 2 never uploaded"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    p.term();
    assert_eq!(
        p.wait(Duration::from_secs(30)),
        0,
        "{}\n{}",
        p.stdout(),
        p.stderr()
    );
    let file = std::fs::read(tmp.path().join("disk.img")).unwrap();
    assert!(file[128 << 10..192 << 10].iter().all(|&b| b == 0x6d));
}
