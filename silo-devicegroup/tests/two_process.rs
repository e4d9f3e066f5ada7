//! The `migrate` example run as two real processes over TCP: a full
//! migration with equal hashes, and each side killed mid-migration.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The example binary `target/<profile>/examples/migrate`, (re)built once
/// per test process with the same profile (`cargo test` builds examples, but
/// `cargo test --test two_process` alone would leave a stale one).
fn example() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().unwrap();
            let profile_dir = exe.parent().unwrap().parent().unwrap();
            let path = profile_dir.join("examples").join("migrate");
            let cargo = option_env!("CARGO").unwrap_or("cargo");
            let mut c = Command::new(cargo);
            c.args(["build", "-p", "silo-devicegroup", "--example", "migrate"]);
            if !cfg!(debug_assertions) {
                c.arg("--release");
            }
            // Build into the directory this test binary came from.
            if let Some(target) = profile_dir.parent() {
                c.env("CARGO_TARGET_DIR", target);
            }
            let st = c.status().expect("cargo runs");
            assert!(st.success(), "building the migrate example failed");
            assert!(path.exists(), "{} missing", path.display());
            path
        })
        .clone()
}

fn config(dir: &Path, mem: &str) -> PathBuf {
    let conf = format!(
        "device \"mem\" {{\n  system = \"memory\"\n  size = \"{mem}\"\n  blocksize = \"64k\"\n}}\n\
         device \"disk\" {{\n  system = \"file\"\n  size = \"1234567\"\n  blocksize = \"4k\"\n  location = \"{}\"\n}}\n",
        dir.join("disk.img").display()
    );
    let p = dir.join("silo.conf");
    std::fs::write(&p, conf).unwrap();
    p
}

/// Starts the receiver and returns it with the address it listens on.
fn receiver(dir: &Path) -> (Child, BufReader<std::process::ChildStdout>, String) {
    let mut child = Command::new(example())
        .args(["receive", "--listen", "127.0.0.1:0", "--dir"])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let addr = line
        .strip_prefix("listening ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .trim()
        .to_string();
    (child, out, addr)
}

fn sender(addr: &str, conf: &Path, sync_seconds: &str) -> Child {
    Command::new(example())
        .args([
            "send",
            "--fill",
            "--connect",
            addr,
            "--sync-seconds",
            sync_seconds,
            "--config",
        ])
        .arg(conf)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Reads the receiver's output until its devices are built (the migration
/// is then under way).
fn wait_ready(out: &mut BufReader<std::process::ChildStdout>) {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "receiver ended early"
        );
        if line.starts_with("ready ") {
            return;
        }
    }
}

fn wait_timeout(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn lines(r: impl std::io::Read) -> Vec<String> {
    BufReader::new(r).lines().map_while(Result::ok).collect()
}

#[test]
fn two_processes_migrate_with_equal_hashes() {
    let sdir = tempfile::tempdir().unwrap();
    let ddir = tempfile::tempdir().unwrap();
    let conf = config(sdir.path(), "8m");
    let (mut rx, rout, addr) = receiver(ddir.path());
    let mut tx = sender(&addr, &conf, "0.5");
    let st = wait_timeout(&mut tx, Duration::from_secs(120));
    let tx_out = lines(tx.stdout.take().unwrap());
    assert!(st.success(), "sender failed: {tx_out:?}");
    let rst = wait_timeout(&mut rx, Duration::from_secs(60));
    let rx_out = lines(rout);
    assert!(rst.success(), "receiver failed: {rx_out:?}");
    let hashes = |v: &[String]| -> Vec<String> {
        v.iter()
            .filter(|l| l.starts_with("sha "))
            .cloned()
            .collect()
    };
    assert_eq!(hashes(&tx_out).len(), 2, "{tx_out:?}");
    assert_eq!(hashes(&tx_out), hashes(&rx_out));
    assert!(
        rx_out.contains(&"custom authority".to_string()),
        "{rx_out:?}"
    );
    assert!(ddir.path().join("disk.img").exists());
}

#[test]
fn killed_receiver_fails_the_sender_and_killed_sender_fails_the_receiver() {
    // Receiver killed (SIGKILL) while the sender is in its dirty rounds.
    let sdir = tempfile::tempdir().unwrap();
    let ddir = tempfile::tempdir().unwrap();
    let conf = config(sdir.path(), "8m");
    let (mut rx, mut rout, addr) = receiver(ddir.path());
    let mut tx = sender(&addr, &conf, "60");
    wait_ready(&mut rout);
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        tx.try_wait().unwrap().is_none(),
        "the sender is still migrating"
    );
    rx.kill().unwrap();
    rx.wait().unwrap();
    let killed = Instant::now();
    let st = wait_timeout(&mut tx, Duration::from_secs(20));
    assert!(!st.success(), "the sender must fail when its receiver dies");
    eprintln!("sender exited {:?} after the kill", killed.elapsed());

    // Sender killed: the receiver exits with an error, without printing hashes.
    let ddir = tempfile::tempdir().unwrap();
    let (mut rx, mut rout, addr) = receiver(ddir.path());
    let mut tx = sender(&addr, &conf, "60");
    wait_ready(&mut rout);
    std::thread::sleep(Duration::from_millis(1000));
    tx.kill().unwrap();
    tx.wait().unwrap();
    let st = wait_timeout(&mut rx, Duration::from_secs(20));
    let out = lines(rout);
    assert!(
        !st.success(),
        "the receiver must not report completion: {out:?}"
    );
    assert!(!out.iter().any(|l| l.starts_with("sha ")), "{out:?}");
}
