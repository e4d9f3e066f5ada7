//! Bad invocations: one line on stderr, a non-zero exit, never a panic or
//! a backtrace.

mod common;

use std::time::Duration;

use common::*;

/// Runs `silo ARGS` (with backtraces enabled, to prove none is printed) and
/// checks the one-line error; returns it.
fn fails(args: &[&str]) -> String {
    let mut c = silo();
    c.args(args).env("RUST_BACKTRACE", "1");
    let o = std::process::Command::output(&mut c).unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "{args:?} succeeded");
    assert_eq!(err.lines().count(), 1, "{args:?}: not one line:\n{err}");
    assert!(err.starts_with("silo: "), "{err}");
    for bad in ["panicked", "backtrace", "stack backtrace", "RUST_BACKTRACE"] {
        assert!(!err.contains(bad), "{err}");
    }
    err
}

#[test]
fn missing_config() {
    let e = fails(&[
        "serve",
        "--config",
        "/nonexistent/silo.conf",
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(
        e.contains("/nonexistent/silo.conf") && e.contains("No such file"),
        "{e}"
    );
    fails(&[
        "nbd",
        "--config",
        "/nonexistent/x.hcl",
        "--listen",
        "127.0.0.1:0",
    ]);
    fails(&["sync", "--config", "/nonexistent/x.hcl", "--once"]);
    fails(&["serve"]);
}

#[test]
fn bad_addresses() {
    let e = fails(&["serve", "--config", "x", "--listen", "not-an-address"]);
    assert!(e.contains("--listen"), "{e}");
    fails(&["connect", "--dir", "/tmp", "--nbd-listen", "1.2.3.4"]);
    fails(&["serve", "--config", "x", "--metrics", "localhost:port"]);
}

#[test]
fn unreadable_or_invalid_schema() {
    let tmp = tempfile::tempdir().unwrap();
    let c = write_config(
        tmp.path(),
        "device \"d\" {\n  system = \"memory\"\n  size = \"1m\"\n  blocksize = \"3000\"\n}\n",
    );
    let e = fails(&[
        "serve",
        "--config",
        c.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(e.contains("blocksize"), "{e}");
    assert!(e.contains(":4:"), "the line is named: {e}");
    std::fs::write(&c, "device { this is not hcl").unwrap();
    fails(&[
        "nbd",
        "--config",
        c.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    // A directory is not a readable schema.
    fails(&[
        "nbd",
        "--config",
        tmp.path().to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    // Binary garbage.
    std::fs::write(&c, [0xffu8, 0xfe, 0, 1, 2]).unwrap();
    fails(&["serve", "--config", c.to_str().unwrap()]);
    // No device with a sync block.
    std::fs::write(
        &c,
        "device \"d\" {\n  system = \"memory\"\n  size = \"1m\"\n}\n",
    )
    .unwrap();
    let e = fails(&["sync", "--config", c.to_str().unwrap(), "--once"]);
    assert!(e.contains("sync"), "{e}");
    // expose = true without --nbd-listen.
    std::fs::write(
        &c,
        "device \"d\" {\n  system = \"memory\"\n  size = \"1m\"\n  expose = true\n}\n",
    )
    .unwrap();
    let e = fails(&[
        "serve",
        "--config",
        c.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(e.contains("--nbd-listen"), "{e}");
}

#[test]
fn port_in_use() {
    let tmp = tempfile::tempdir().unwrap();
    let c = write_config(
        tmp.path(),
        "device \"d\" {\n  system = \"memory\"\n  size = \"1m\"\n}\n",
    );
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let e = fails(&["serve", "--config", c.to_str().unwrap(), "--listen", &addr]);
    assert!(e.contains(&addr) && e.contains("in use"), "{e}");
    let e = fails(&[
        "serve",
        "--config",
        c.to_str().unwrap(),
        "--listen",
        &free_addr().to_string(),
        "--metrics",
        &addr,
    ]);
    assert!(e.contains("metrics"), "{e}");
    let e = fails(&["nbd", "--config", c.to_str().unwrap(), "--listen", &addr]);
    assert!(e.contains("in use"), "{e}");
    let e = fails(&[
        "connect",
        "--addr",
        &free_addr().to_string(),
        "--dir",
        tmp.path().join("d").to_str().unwrap(),
        "--nbd-listen",
        &addr,
    ]);
    assert!(e.contains("NBD"), "{e}");
}

#[test]
fn nothing_listening() {
    let tmp = tempfile::tempdir().unwrap();
    let e = fails(&[
        "connect",
        "--addr",
        &free_addr().to_string(),
        "--dir",
        tmp.path().to_str().unwrap(),
    ]);
    assert!(e.contains("cannot connect"), "{e}");
    // Quick: the failure must not hang.
    let t0 = std::time::Instant::now();
    fails(&[
        "connect",
        "--addr",
        "no-such-host.invalid:1",
        "--dir",
        tmp.path().to_str().unwrap(),
    ]);
    assert!(t0.elapsed() < Duration::from_secs(30));
}

#[test]
fn help_and_version_succeed() {
    for a in ["--help", "--version", "demo --help", "serve --help"] {
        let o = silo().args(a.split(' ')).output().unwrap();
        assert!(o.status.success(), "{a}");
        assert!(!o.stdout.is_empty());
    }
}
