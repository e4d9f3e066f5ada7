//! Test support (feature `testing`): a real `s3s-fs` S3 server on
//! 127.0.0.1 with a random free port, a temporary data directory and random
//! access/secret keys (requests are SigV4-checked), killed on drop.
//!
//! The binary is `$SILO_S3S_FS` if set, else `$SILO_TOOLS/bin/s3s-fs`
//! (`cargo xtask test` sets `SILO_TOOLS`), else
//! `<workspace>/target/tools/bin/s3s-fs`. If it is missing, [`S3sFs::start`]
//! panics with a message telling to run `cargo xtask setup` — a test that
//! needs S3 fails, it never passes silently.
//!
//! ```no_run
//! # async fn demo() {
//! use silo_s3::testing::S3sFs;
//! let server = S3sFs::start();
//! let cfg = server.config("bucket", "dev0", 1 << 20, 64 * 1024);
//! let dev = silo_s3::S3Storage::open_or_create(&cfg).await.unwrap();
//! # }
//! ```

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::config::{Credentials, RetrySettings, S3Config};

/// Version of `s3s-fs` the project installs.
pub const S3S_FS_VERSION: &str = "0.14.1";

/// Where the `s3s-fs` binary is expected.
pub fn s3s_fs_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("SILO_S3S_FS") {
        return PathBuf::from(p);
    }
    let tools = match std::env::var_os("SILO_TOOLS") {
        Some(t) => PathBuf::from(t),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the crate lives in the workspace")
            .join("target")
            .join("tools"),
    };
    tools.join("bin").join("s3s-fs")
}

fn random_hex(tag: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = Sha256::new();
    h.update(tag.as_bytes());
    h.update(std::process::id().to_le_bytes());
    h.update(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
            .to_le_bytes(),
    );
    h.update(
        COUNTER
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_le_bytes(),
    );
    hex::encode(&h.finalize()[..12])
}

/// Deterministic pseudo-random test data (xorshift) for `seed`; never
/// all-zero for a non-empty length.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8 | 1
        })
        .collect()
}

/// A running `s3s-fs` server (killed on drop).
pub struct S3sFs {
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
    access_key: String,
    secret_key: String,
}

impl std::fmt::Debug for S3sFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3sFs")
            .field("port", &self.port)
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl S3sFs {
    /// Starts a server with fresh keys on a free port; panics (failing the
    /// test) if the binary is missing or the server does not come up.
    pub fn start() -> Self {
        let bin = s3s_fs_binary();
        if !bin.exists() {
            panic!(
                "the S3 test server is not installed: {} does not exist. \
                 Run `cargo xtask setup` (installs s3s-fs {S3S_FS_VERSION} into target/tools), \
                 or set SILO_S3S_FS to an s3s-fs binary.",
                bin.display()
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("silo-s3s-fs-")
            .tempdir()
            .expect("create a temp dir for s3s-fs");
        std::fs::create_dir_all(dir.path().join("data")).expect("create s3s-fs data dir");
        let mut server = S3sFs {
            child: None,
            dir,
            port: 0,
            access_key: format!("AK{}", random_hex("access")),
            secret_key: random_hex("secret"),
        };
        let mut last = String::new();
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("find a free port")
                .port();
            server.port = port;
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => last = e,
            }
        }
        panic!("s3s-fs did not start: {last}");
    }

    fn spawn(&mut self) -> Result<(), String> {
        let bin = s3s_fs_binary();
        let log = std::fs::File::create(self.log_path()).map_err(|e| e.to_string())?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let mut child = Command::new(&bin)
            .arg("--host")
            .arg("127.0.0.1")
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--access-key")
            .arg(&self.access_key)
            .arg("--secret-key")
            .arg(&self.secret_key)
            .arg(self.data_dir())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                return Err(format!("s3s-fs exited with {status}: {log}"));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err("s3s-fs did not accept connections within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("s3s-fs.log")
    }

    /// The directory whose subdirectories are the buckets.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The valid credentials of this server.
    pub fn credentials(&self) -> Credentials {
        Credentials::new(&self.access_key, &self.secret_key)
    }

    /// Creates a bucket (a directory in the data dir; s3s-fs maps buckets
    /// to directories).
    pub fn create_bucket(&self, name: &str) {
        std::fs::create_dir_all(self.data_dir().join(name)).expect("create bucket directory");
    }

    /// A configuration for a device on this server (creates the bucket).
    /// Uses fast retries so failure tests finish quickly.
    pub fn config(&self, bucket: &str, prefix: &str, size: u64, block_size: u64) -> S3Config {
        self.create_bucket(bucket);
        let mut c = S3Config::new(
            Some(self.endpoint()),
            bucket,
            prefix,
            self.credentials(),
            size,
        );
        c.allow_http = true;
        c.block_size = block_size;
        c.concurrency = 8;
        c.retry = RetrySettings::fast();
        c
    }

    /// Kills the server (data stays), to simulate an outage.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restarts a stopped server on the same port with the same keys and
    /// data.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => panic!("s3s-fs did not restart: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// True while the server process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        self.stop();
    }
}
