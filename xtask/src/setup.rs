//! Installs what the test suite needs on a fresh Debian machine.
//!
//! Idempotent: each step checks first and does nothing when the tool is
//! already there. Set `SILO_SKIP_SETUP=1` to skip all of it.

use std::path::PathBuf;
use std::process::Command;

use crate::run;

/// Debian packages the tests use, with a binary that proves each is installed.
const APT: &[(&str, &str)] = &[
    ("qemu-utils", "qemu-img"),
    ("libnbd-bin", "nbdinfo"),
    ("python3-libnbd", "/usr/lib/python3/dist-packages/nbd.py"),
    ("nbdkit", "nbdkit"),
    ("nbdfuse", "nbdfuse"),
    ("fio", "fio"),
    ("e2fsprogs", "mkfs.ext4"),
    ("fuse3", "fusermount3"),
];

/// Where project-local tools (s3s-fs) are installed.
pub fn tools_dir() -> PathBuf {
    crate::root().join("target").join("tools")
}

fn have(bin: &str) -> bool {
    if bin.starts_with('/') {
        return std::path::Path::new(bin).exists();
    }
    Command::new("sh")
        .args(["-c", &format!("command -v {bin} >/dev/null 2>&1")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Installs everything that is missing.
pub fn run() -> Result<(), String> {
    if std::env::var_os("SILO_SKIP_SETUP").is_some() {
        eprintln!("xtask: SILO_SKIP_SETUP set, not installing anything");
        return Ok(());
    }
    let missing: Vec<&str> = APT
        .iter()
        .filter(|(_, bin)| !have(bin))
        .map(|(pkg, _)| *pkg)
        .collect();
    if !missing.is_empty() {
        eprintln!("xtask: installing Debian packages {missing:?}");
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    let s3 = tools_dir().join("bin").join("s3s-fs");
    if !s3.exists() {
        eprintln!("xtask: installing s3s-fs 0.14.1 (the local S3 server for tests)");
        run(Command::new("cargo")
            .args([
                "install",
                "s3s-fs@0.14.1",
                "--features",
                "binary",
                "--locked",
                "--root",
            ])
            .arg(tools_dir()))?;
    }
    Ok(())
}
