//! Shared helpers of the integration tests: an in-process server on a real
//! socket, real client processes, and a provider that counts flushes.
#![allow(dead_code, clippy::print_stdout)]

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use silo_nbd::{Export, Server, ServerConfig};
use silo_storage::{Capabilities, DynProvider, MemoryStorage, Provider, Result};

/// A server on 127.0.0.1 (random port) driven by its own runtime.
pub struct TestServer {
    pub rt: tokio::runtime::Runtime,
    pub server: Server,
    pub port: u16,
    pub unix: Option<std::path::PathBuf>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    pub fn start(exports: Vec<Export>) -> TestServer {
        Self::start_with(ServerConfig::default(), exports)
    }

    pub fn start_with(config: ServerConfig, exports: Vec<Export>) -> TestServer {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "silo_nbd=info".into()),
            )
            .with_test_writer()
            .try_init();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let server = Server::new(config);
        for e in exports {
            server.add_export(e).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let (port, unix) = rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = l.local_addr().unwrap().port();
            let s = server.clone();
            tokio::spawn(async move { s.serve_tcp(l).await.unwrap() });
            let u = tokio::net::UnixListener::bind(&sock).unwrap();
            let s = server.clone();
            tokio::spawn(async move { s.serve_unix(u).await.unwrap() });
            (port, sock.clone())
        });
        TestServer {
            rt,
            server,
            port,
            unix: Some(unix),
            _dir: dir,
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.port, export)
    }

    pub fn unix_uri(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            export,
            self.unix.as_ref().unwrap().display()
        )
    }

    pub fn provider(&self, export: &str) -> DynProvider {
        self.server.export(export).unwrap().provider().clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let s = self.server.clone();
        let _ = self.rt.block_on(async move {
            tokio::time::timeout(Duration::from_secs(10), s.shutdown()).await
        });
    }
}

/// Fails (never skips) when a client tool is missing: `cargo xtask setup`
/// installs them all.
pub fn need(tool: &str) {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{tool} is not installed; run `cargo xtask setup` (Debian packages qemu-utils, libnbd-bin, python3-libnbd, nbdkit, nbdfuse, fio)"
    );
}

/// Runs a command, panics with its output unless it succeeds; returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// `nbdsh` with Debian's python (the one that has the libnbd module).
pub fn nbdsh(uri: &str, script: &str) -> String {
    need("nbdsh");
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    run(Command::new("nbdsh").env("PATH", path).args([
        "--base-allocation",
        "-u",
        uri,
        "-c",
        script,
    ]))
}

pub fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

pub fn sha256_file(p: &Path) -> String {
    sha256(&std::fs::read(p).unwrap())
}

/// Reads the whole provider.
pub fn contents(rt: &tokio::runtime::Runtime, p: &DynProvider) -> Vec<u8> {
    use silo_storage::ProviderExt;
    rt.block_on(p.read_bytes(0, p.size() as usize))
        .unwrap()
        .to_vec()
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A memory provider that counts flushes (to see FUA reach the provider)
/// and can pretend to have fewer capabilities.
pub struct Counting {
    pub inner: MemoryStorage,
    pub flushes: AtomicU64,
    pub caps: Capabilities,
}

impl Counting {
    pub fn new(size: u64, caps: Capabilities) -> Arc<Counting> {
        Arc::new(Counting {
            inner: MemoryStorage::new(size),
            flushes: AtomicU64::new(0),
            caps,
        })
    }
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Provider for Counting {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.caps
    }
    async fn read_at(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        self.inner.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: Bytes) -> Result<()> {
        self.inner.write_at(offset, data).await
    }
    async fn flush(&self) -> Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.inner.flush().await
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.trim(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.write_zeroes(offset, len).await
    }
    fn cancel_writes(&self, offset: u64, len: u64) {
        self.inner.cancel_writes(offset, len)
    }
    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}
