//! Installs what the test suite needs on a fresh Debian machine.
//!
//! Idempotent: each step checks first and does nothing when the tool is
//! already there. Set `SILO_SKIP_SETUP=1` to skip all of it.

use std::path::PathBuf;
use std::process::Command;

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
        crate::run(Command::new("apt-get").arg("update").arg("-q"))?;
        crate::run(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    install_s3s_fs()?;
    Ok(())
}

/// Version of the local S3 test server (`s3s-fs`; newer releases need a
/// newer rustc than the project's).
const S3S_FS_VERSION: &str = "0.14.1";

/// Installs `s3s-fs` into `target/tools/bin` (the crate's `binary` feature
/// builds the `s3s-fs` executable) unless the right version is already
/// there. silo-s3's tests find it through `SILO_TOOLS`.
fn install_s3s_fs() -> Result<(), String> {
    let bin = tools_dir().join("bin").join("s3s-fs");
    let installed = Command::new(&bin)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let want = format!("s3s-fs {S3S_FS_VERSION}");
    if installed.as_deref() == Some(want.as_str()) {
        return Ok(());
    }
    eprintln!(
        "xtask: installing s3s-fs {S3S_FS_VERSION} (the local S3 server for tests; a few minutes)"
    );
    crate::run(
        crate::cargo()
            .args([
                "install",
                &format!("s3s-fs@{S3S_FS_VERSION}"),
                "--features",
                "binary",
                "--locked",
                "--force",
                "--root",
            ])
            .arg(tools_dir())
            // Build in cargo's own temporary directory, not a caller's target dir.
            .env_remove("CARGO_TARGET_DIR"),
    )?;
    if !bin.exists() {
        return Err(format!("cargo install did not produce {}", bin.display()));
    }
    Ok(())
}
