//! `silo serve` + `silo connect` as real processes on 127.0.0.1, with a
//! source device exposed over NBD and written by `qemu-io` during the
//! migration; the destination files must equal the source files.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(60);

fn config(src: &Path, disk_mb: u64) -> String {
    format!(
        r#"
device "disk0" {{
  system    = "file"
  size      = "{disk_mb}m"
  blocksize = "64k"
  expose    = true
  location  = "{}"
}}

device "scratch" {{
  system    = "memory"
  size      = "3m"
  blocksize = "64k"
}}
"#,
        src.join("disk0.img").display()
    )
}

/// Starts `silo serve` on `listen` with `extra` flags and waits until it
/// waits for a receiver.
fn start_serve(dir: &Path, conf: &Path, listen: SocketAddr, extra: &[&str]) -> Proc {
    let (c, l) = (conf.to_str().unwrap(), listen.to_string());
    let mut args = vec!["serve", "--config", c, "--listen", &l];
    args.extend_from_slice(extra);
    let mut p = Proc::start(dir, "serve", &args);
    p.wait_for("waiting for a receiver", T);
    p
}

/// Starts `silo connect` to `addr` receiving into `dst`.
fn start_connect(dir: &Path, addr: SocketAddr, dst: &Path, extra: &[&str]) -> Proc {
    let (a, d) = (addr.to_string(), dst.to_str().unwrap());
    let mut args = vec!["connect", "--addr", &a, "--dir", d];
    args.extend_from_slice(extra);
    Proc::start(dir, "connect", &args)
}

fn make_source(src: &Path, disk_mb: u64) {
    std::fs::create_dir_all(src).unwrap();
    std::fs::write(src.join("disk0.img"), pattern((disk_mb << 20) as usize, 42)).unwrap();
}

/// The issue's end-to-end test: qemu-io keeps writing patterns through the
/// source's NBD export while the group migrates; after both processes
/// exit 0, the destination file equals the source file byte for byte.
#[test]
fn serve_connect_with_qemu_io_writes_during_migration() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let dst = tmp.path().join("dst");
    // Big enough that the copy outlasts several qemu-io runs (release
    // builds copy several times faster).
    let disk_mb = if cfg!(debug_assertions) { 96 } else { 384 };
    make_source(&src, disk_mb);
    let conf = write_config(tmp.path(), &config(&src, disk_mb));
    let (listen, nbd) = (free_addr(), free_addr());
    let mut serve = start_serve(
        tmp.path(),
        &conf,
        listen,
        &["--nbd-listen", &nbd.to_string(), "--concurrency", "2"],
    );
    let export = format!("nbd://{nbd}/disk0");
    // One write before the migration starts.
    let (ok, o) = tool(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x11 0 64k", &export],
    );
    assert!(ok, "{o}");

    let mut connect = start_connect(tmp.path(), listen, &dst, &[]);
    // Writer: distinct patterns at distinct offsets until the receiver is
    // done; records which writes succeeded while the migration ran.
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (done, export) = (done.clone(), export.clone());
        std::thread::spawn(move || {
            let mut ok_writes = Vec::new();
            let mut i = 0u64;
            // Non-overlapping 100 KiB writes, 700 KiB apart, inside the disk.
            let max_i = (disk_mb - 2) * 1024 / 700;
            while !done.load(Ordering::SeqCst) && i < max_i {
                let off = (1 << 20) + i * 700 * 1024 + 512;
                let val = 0x20 + (i % 200) as u8;
                let (ok, _) = tool(
                    "qemu-io",
                    &[
                        "-f",
                        "raw",
                        "-c",
                        &format!("write -P {val} {off} 100k"),
                        &export,
                    ],
                );
                if ok && !done.load(Ordering::SeqCst) {
                    ok_writes.push((off, val));
                }
                i += 1;
            }
            ok_writes
        })
    };
    let crc = connect.wait(T);
    done.store(true, Ordering::SeqCst);
    let src_rc = serve.wait(T);
    let writes = writer.join().unwrap();
    assert_eq!(
        crc,
        0,
        "connect:\n{}\n{}",
        connect.stdout(),
        connect.stderr()
    );
    assert_eq!(src_rc, 0, "serve:\n{}\n{}", serve.stdout(), serve.stderr());
    eprintln!(
        "{} qemu-io writes completed during the migration",
        writes.len()
    );
    assert!(
        !writes.is_empty(),
        "no qemu-io write completed during the migration; serve said:\n{}",
        serve.stdout()
    );
    assert!(
        serve.stdout().contains("migration complete"),
        "{}",
        serve.stdout()
    );
    assert!(
        connect.stdout().contains("authority transferred"),
        "{}",
        connect.stdout()
    );
    // Byte-for-byte equality of the file device.
    let s = std::fs::read(src.join("disk0.img")).unwrap();
    let d = std::fs::read(dst.join("disk0.img")).unwrap();
    assert_eq!(s.len(), d.len());
    assert!(s == d, "destination differs from the source");
    // The writes really are in it.
    assert!(d[..65536].iter().all(|&b| b == 0x11));
    for (off, val) in &writes {
        let r = &d[*off as usize..*off as usize + 100 * 1024];
        assert!(r.iter().all(|b| b == val), "write at {off} missing");
    }
    // The memory device was stored as a file under DIR (all zeroes here).
    let scratch = std::fs::read(dst.join("scratch.img")).unwrap();
    assert_eq!(scratch.len(), 3 << 20);
    assert!(scratch.iter().all(|&b| b == 0));
    // Stderr is free of warnings about lost data or panics.
    for p in [&serve, &connect] {
        assert!(!p.stderr().contains("panicked"), "{}", p.stderr());
    }
}

/// `--continuous`: the source keeps syncing; the Prometheus endpoints of
/// both sides answer over HTTP with the documented names while the
/// migration runs; a write on the source reaches the destination's NBD
/// export (lazy fetch of a dirty block); SIGTERM cuts over and both exit 0
/// with equal files.
#[test]
fn continuous_sync_metrics_and_sigterm_cut_over() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let dst = tmp.path().join("dst");
    let disk_mb = 16;
    make_source(&src, disk_mb);
    let conf = write_config(tmp.path(), &config(&src, disk_mb));
    let (listen, nbd, metrics, dnbd, dmetrics) = (
        free_addr(),
        free_addr(),
        free_addr(),
        free_addr(),
        free_addr(),
    );
    let mut serve = start_serve(
        tmp.path(),
        &conf,
        listen,
        &[
            "--nbd-listen",
            &nbd.to_string(),
            "--metrics",
            &metrics.to_string(),
            "--continuous",
        ],
    );
    let mut connect = start_connect(
        tmp.path(),
        listen,
        &dst,
        &[
            "--nbd-listen",
            &dnbd.to_string(),
            "--metrics",
            &dmetrics.to_string(),
        ],
    );
    serve.wait_for("continuous mode", T);
    // Sender metrics while the migration runs.
    let (status, body) = http_get(metrics, "/metrics").unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK");
    for name in [
        "silo_device_size_bytes",
        "silo_device_ops_total",
        "silo_device_bytes_total",
        "silo_device_dirty_blocks",
        "silo_migration_blocks_total",
        "silo_migration_blocks_migrated",
        "silo_migration_blocks_dirty",
        "silo_migration_blocks_pending",
        "silo_migration_bytes_sent_total",
        "silo_migration_dirty_rounds_total",
        "silo_migration_cutover_seconds",
        "silo_protocol_bytes_total",
    ] {
        assert!(
            body.contains(&format!("# TYPE {name} ")),
            "{name} missing:\n{body}"
        );
    }
    let total_blocks = (disk_mb << 20) / (64 << 10);
    assert!(
        body.contains(&format!(
            "silo_migration_blocks_migrated{{device=\"disk0\"}} {total_blocks}"
        )),
        "{body}"
    );
    assert!(body.contains("silo_migration_completed 0"), "{body}");
    let sent: f64 = body
        .lines()
        .find_map(|l| {
            l.strip_prefix("silo_protocol_bytes_total{kind=\"write-at\",direction=\"out\"} ")
        })
        .unwrap_or_else(|| panic!("no write-at bytes:\n{body}"))
        .parse()
        .unwrap();
    assert!(sent >= (disk_mb << 20) as f64, "{body}");
    assert_eq!(
        http_get(metrics, "/nope").unwrap().0,
        "HTTP/1.1 404 Not Found"
    );
    // Receiver metrics.
    let (status, body) = http_get(dmetrics, "/metrics").unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK");
    for name in [
        "silo_receive_blocks_present",
        "silo_receive_waits_total",
        "silo_receive_needs_total",
        "silo_protocol_bytes_total",
    ] {
        assert!(
            body.contains(&format!("# TYPE {name} ")),
            "{name} missing:\n{body}"
        );
    }
    // A write on the source shows up at the destination's export.
    let (ok, o) = tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5c 300k 200k",
            &format!("nbd://{nbd}/disk0"),
        ],
    );
    assert!(ok, "{o}");
    let t0 = Instant::now();
    loop {
        let (ok, o) = tool(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-r",
                "-c",
                "read -P 0x5c 300k 200k",
                &format!("nbd://{dnbd}/disk0"),
            ],
        );
        if ok && !o.contains("Pattern verification failed") {
            break;
        }
        assert!(
            t0.elapsed() < T,
            "the write never reached the destination: {o}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let body = http_get(metrics, "/metrics").unwrap().1;
    let rounds: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("silo_migration_dirty_rounds_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(rounds >= 1.0, "{body}");
    // SIGTERM: cut-over, exit 0 on both sides.
    serve.term();
    assert_eq!(
        serve.wait(T),
        0,
        "serve:\n{}\n{}",
        serve.stdout(),
        serve.stderr()
    );
    assert_eq!(
        connect.wait(T),
        0,
        "connect:\n{}\n{}",
        connect.stdout(),
        connect.stderr()
    );
    assert!(sha_file(&src.join("disk0.img")) == sha_file(&dst.join("disk0.img")));
}

/// A receiver stopped by SIGTERM mid-migration exits non-zero and says the
/// migration did not complete; the sender fails with a one-line error.
#[test]
fn interrupted_migration_exits_non_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let dst = tmp.path().join("dst");
    make_source(&src, 8);
    let conf = write_config(tmp.path(), &config(&src, 8));
    let (listen, nbd) = (free_addr(), free_addr());
    let mut serve = start_serve(
        tmp.path(),
        &conf,
        listen,
        &["--nbd-listen", &nbd.to_string(), "--continuous"],
    );
    let mut connect = start_connect(tmp.path(), listen, &dst, &[]);
    serve.wait_for("continuous mode", T);
    connect.term();
    let crc = connect.wait(T);
    assert_ne!(crc, 0, "{}", connect.stdout());
    assert!(
        connect.stderr().contains("interrupted"),
        "{}",
        connect.stderr()
    );
    let src_rc = serve.wait(T);
    assert_ne!(src_rc, 0, "serve:\n{}", serve.stdout());
    let err = serve.stderr();
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("silo: ")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// `connect --nbd-listen --keep-serving`: the destination's export can be
/// read whole while the bulk copy is still running (reads of missing blocks
/// wait and are fetched with priority) and stays up after the migration
/// completed, until SIGTERM.
#[test]
fn destination_exports_during_migration_and_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let dst = tmp.path().join("dst");
    let disk_mb = 48;
    make_source(&src, disk_mb);
    let conf = write_config(tmp.path(), &config(&src, disk_mb));
    let (listen, nbd, dnbd, dmetrics) = (free_addr(), free_addr(), free_addr(), free_addr());
    let ns = nbd.to_string();
    let mut serve = start_serve(
        tmp.path(),
        &conf,
        listen,
        &["--nbd-listen", &ns, "--concurrency", "1"],
    );
    let (dn, dm) = (dnbd.to_string(), dmetrics.to_string());
    let mut connect = start_connect(
        tmp.path(),
        listen,
        &dst,
        &["--nbd-listen", &dn, "--keep-serving", "--metrics", &dm],
    );
    connect.wait_for("exported over NBD", T);
    let copy = tmp.path().join("copy.img");
    let (ok, o) = tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &format!("nbd://{dnbd}/disk0"),
            copy.to_str().unwrap(),
        ],
    );
    assert!(ok, "{o}");
    assert!(
        std::fs::read(&copy).unwrap() == std::fs::read(src.join("disk0.img")).unwrap(),
        "the destination export served different data"
    );
    assert_eq!(
        serve.wait(T),
        0,
        "serve:\n{}\n{}",
        serve.stdout(),
        serve.stderr()
    );
    connect.wait_for("serving the devices over NBD until", T);
    let (ok, list) = tool("nbdinfo", &["--list", &format!("nbd://{dnbd}")]);
    assert!(
        ok && list.contains("export=\"disk0\"") && list.contains("export=\"scratch\""),
        "{list}"
    );
    let body = http_get(dmetrics, "/metrics").unwrap().1;
    assert!(body.contains("silo_migration_completed 1"), "{body}");
    connect.term();
    assert_eq!(
        connect.wait(T),
        0,
        "connect:\n{}\n{}",
        connect.stdout(),
        connect.stderr()
    );
    assert!(sha_file(&src.join("disk0.img")) == sha_file(&dst.join("disk0.img")));
}

/// SIGTERM to the sender during the bulk copy: it exits 130 saying the
/// migration did not complete, and the receiver fails (non-zero) instead of
/// reporting completion. (Should the copy already have finished when the
/// signal lands, both must have completed consistently instead.)
#[test]
fn sender_interrupted_during_bulk_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let dst = tmp.path().join("dst");
    let disk_mb = if cfg!(debug_assertions) { 96 } else { 384 };
    make_source(&src, disk_mb);
    let conf = write_config(tmp.path(), &config(&src, disk_mb));
    let (listen, nbd) = (free_addr(), free_addr());
    let ns = nbd.to_string();
    let mut serve = start_serve(
        tmp.path(),
        &conf,
        listen,
        &["--nbd-listen", &ns, "--concurrency", "1"],
    );
    let mut connect = start_connect(tmp.path(), listen, &dst, &[]);
    connect.wait_for("receiving 2 device(s)", T);
    serve.term();
    let src_rc = serve.wait(T);
    let dst_rc = connect.wait(T);
    if src_rc == 0 {
        eprintln!("the copy finished before SIGTERM arrived; checking consistency instead");
        assert_eq!(dst_rc, 0);
        assert!(sha_file(&src.join("disk0.img")) == sha_file(&dst.join("disk0.img")));
        return;
    }
    assert_eq!(
        src_rc,
        130,
        "serve:\n{}\n{}",
        serve.stdout(),
        serve.stderr()
    );
    assert!(serve.stderr().contains("interrupted"), "{}", serve.stderr());
    assert_ne!(dst_rc, 0, "connect:\n{}", connect.stdout());
    assert!(
        !connect.stdout().contains("migration complete"),
        "{}",
        connect.stdout()
    );
    let err = connect.stderr();
    assert_eq!(
        err.lines().filter(|l| l.starts_with("silo: ")).count(),
        1,
        "{err}"
    );
}
