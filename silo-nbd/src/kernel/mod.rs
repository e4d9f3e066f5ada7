//! Attaching an export to a Linux `/dev/nbdN`.
//!
//! The kernel's nbd client speaks only the transmission phase (simple
//! replies), so the handshake is replaced by configuration: we create
//! `connections` Unix socketpairs, serve our ends with the server's
//! transmission loop ([`Server::spawn_transmission`]) and hand the other
//! ends to the kernel with the generic-netlink `nbd` family
//! (`NBD_CMD_CONNECT`, with a dead-connection timeout so a connection can be
//! replaced by `NBD_CMD_RECONFIGURE` without I/O errors). Where the netlink
//! family is missing (very old kernels) the ioctl interface is used instead,
//! which parks one thread in `NBD_DO_IT` for the device's life.
//!
//! The raw syscalls are in the private `sys` module, the only `unsafe` code
//! of the crate; the messages are built and parsed in [`netlink`] (pure,
//! unit-tested).
//!
//! Hosts without the nbd module (`/dev/nbd0` missing, e.g. containers) get
//! an [`Error::Kernel`] from [`attach`]; check [`module_loaded`] first.

pub mod netlink;
mod sys;

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::Server;

/// `NBD_SET_SOCK`.
pub const NBD_SET_SOCK: u32 = 0xab00;
/// `NBD_SET_BLKSIZE`.
pub const NBD_SET_BLKSIZE: u32 = 0xab01;
/// `NBD_DO_IT`.
pub const NBD_DO_IT: u32 = 0xab03;
/// `NBD_CLEAR_SOCK`.
pub const NBD_CLEAR_SOCK: u32 = 0xab04;
/// `NBD_CLEAR_QUE`.
pub const NBD_CLEAR_QUE: u32 = 0xab05;
/// `NBD_SET_SIZE_BLOCKS`.
pub const NBD_SET_SIZE_BLOCKS: u32 = 0xab07;
/// `NBD_DISCONNECT`.
pub const NBD_DISCONNECT: u32 = 0xab08;
/// `NBD_SET_TIMEOUT`.
pub const NBD_SET_TIMEOUT: u32 = 0xab09;
/// `NBD_SET_FLAGS`.
pub const NBD_SET_FLAGS: u32 = 0xab0a;

/// Which kernel interface to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum AttachMethod {
    /// Netlink, falling back to ioctl if the netlink family is missing.
    #[default]
    Auto,
    /// Netlink only.
    Netlink,
    /// ioctl only.
    Ioctl,
}

/// Settings of [`attach`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AttachConfig {
    /// Device index (`/dev/nbdN`); `None` lets the kernel pick a free one.
    pub index: Option<u32>,
    /// Number of connections (socketpairs); the kernel spreads requests
    /// over them. Only exports advertising `CAN_MULTI_CONN` get more than 1.
    pub connections: usize,
    /// Logical block size (512, 1024, 2048 or 4096).
    pub block_size: u32,
    /// Per-request timeout (`None`: kernel default).
    pub timeout: Option<Duration>,
    /// How long the kernel waits for a dead connection to be replaced by
    /// [`KernelDevice::reconfigure`] before failing I/O.
    pub dead_conn_timeout: Option<Duration>,
    /// Let the kernel remove the device when it disconnects.
    pub destroy_on_disconnect: bool,
    /// Interface to use.
    pub method: AttachMethod,
    /// How long to retry a connect that fails spuriously (udev races).
    pub retry_for: Duration,
}

impl Default for AttachConfig {
    fn default() -> Self {
        AttachConfig {
            index: None,
            connections: 4,
            block_size: 4096,
            timeout: None,
            dead_conn_timeout: Some(Duration::from_secs(30)),
            destroy_on_disconnect: false,
            method: AttachMethod::Auto,
            retry_for: Duration::from_secs(5),
        }
    }
}

impl AttachConfig {
    /// Uses device `/dev/nbd{index}` instead of letting the kernel choose.
    pub fn with_index(mut self, index: u32) -> Self {
        self.index = Some(index);
        self
    }

    /// Number of connections (at least 1).
    pub fn with_connections(mut self, n: usize) -> Self {
        self.connections = n.max(1);
        self
    }

    /// Logical block size (512, 1024, 2048 or 4096).
    pub fn with_block_size(mut self, block_size: u32) -> Self {
        self.block_size = block_size;
        self
    }

    /// Per-request timeout.
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    /// Dead-connection timeout (time to [`KernelDevice::reconfigure`]).
    pub fn with_dead_conn_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.dead_conn_timeout = timeout;
        self
    }

    /// Remove the device when it disconnects.
    pub fn with_destroy_on_disconnect(mut self, destroy: bool) -> Self {
        self.destroy_on_disconnect = destroy;
        self
    }

    /// Kernel interface to use.
    pub fn with_method(mut self, method: AttachMethod) -> Self {
        self.method = method;
        self
    }
}

/// Whether this host has the nbd module loaded (`/dev/nbd0` exists).
pub fn module_loaded() -> bool {
    Path::new("/dev/nbd0").exists()
}

/// Size exposed to the kernel: rounded down to the block size.
pub fn kernel_size(export_size: u64, block_size: u32) -> u64 {
    export_size / u64::from(block_size) * u64::from(block_size)
}

#[derive(Debug)]
enum Attached {
    Netlink {
        family: u16,
    },
    Ioctl {
        thread: Option<std::thread::JoinHandle<()>>,
    },
}

/// An export attached to `/dev/nbdN`.
#[derive(Debug)]
pub struct KernelDevice {
    index: u32,
    server: Server,
    export: String,
    config: AttachConfig,
    attached: Attached,
}

fn kerr(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::Kernel(format!("{what}: {e}"))
}

/// One netlink request/response exchange; returns the reply datagrams.
fn transact(sock: &sys::NetlinkSocket, msg: &[u8], seq: u32) -> std::io::Result<Vec<Vec<u8>>> {
    sock.send(msg)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = sock.recv(&mut buf)?;
        let data = &buf[..n];
        let mut done = false;
        for m in netlink::messages(data) {
            if m.seq != seq {
                continue;
            }
            match netlink::error_code(&m) {
                Some(0) => done = true,
                Some(code) => return Err(std::io::Error::from_raw_os_error(code)),
                None if m.kind == netlink::NLMSG_DONE => done = true,
                None => {}
            }
        }
        out.push(data.to_vec());
        if done {
            return Ok(out);
        }
    }
}

fn seq() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static SEQ: AtomicU32 = AtomicU32::new(1);
    SEQ.fetch_add(1, Ordering::Relaxed)
}

fn family_id(sock: &sys::NetlinkSocket) -> std::io::Result<u16> {
    let s = seq();
    let replies = transact(
        sock,
        &netlink::get_family(s, netlink::NBD_GENL_FAMILY_NAME),
        s,
    )?;
    replies
        .iter()
        .flat_map(|d| {
            netlink::messages(d)
                .into_iter()
                .filter_map(|m| netlink::family_id(&m))
                .collect::<Vec<_>>()
        })
        .next()
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "no nbd family id in reply")
        })
}

/// Creates `n` socketpairs, serves our ends on `server`, returns the
/// kernel's ends.
fn socketpairs(server: &Server, export: &str, n: usize) -> Result<Vec<StdUnixStream>> {
    let mut theirs = Vec::with_capacity(n);
    for _ in 0..n {
        let (ours, kernel) = StdUnixStream::pair().map_err(kerr("socketpair"))?;
        ours.set_nonblocking(true)
            .map_err(kerr("set_nonblocking"))?;
        let ours = tokio::net::UnixStream::from_std(ours).map_err(kerr("register socket"))?;
        server.spawn_transmission(ours, export)?;
        theirs.push(kernel);
    }
    Ok(theirs)
}

/// Attaches export `export` of `server` to a `/dev/nbdN`.
pub async fn attach(server: &Server, export: &str, config: &AttachConfig) -> Result<KernelDevice> {
    let ex = server
        .export(export)
        .ok_or_else(|| Error::NoSuchExport(export.into()))?;
    let info = ex.info().clone();
    if !matches!(config.block_size, 512 | 1024 | 2048 | 4096) {
        return Err(Error::Kernel(format!(
            "invalid block size {}",
            config.block_size
        )));
    }
    let size = kernel_size(info.size, config.block_size);
    if size == 0 {
        return Err(Error::Kernel(format!(
            "export {export:?} is smaller than one block"
        )));
    }
    if size != info.size {
        warn!(export, size = info.size, exposed = size, "export size is not a multiple of the block size; the tail is not visible to the kernel");
    }
    let multi = info.flags & crate::proto::TFLAG_CAN_MULTI_CONN != 0;
    let connections = if multi { config.connections.max(1) } else { 1 };
    let theirs = socketpairs(server, export, connections)?;
    let fds: Vec<RawFd> = theirs.iter().map(|s| s.as_raw_fd()).collect();
    let params = netlink::ConnectParams {
        index: config.index,
        size,
        block_size: u64::from(config.block_size),
        timeout: config.timeout.map(|t| t.as_secs().max(1)),
        dead_conn_timeout: config.dead_conn_timeout.map(|t| t.as_secs().max(1)),
        server_flags: u64::from(info.flags),
        client_flags: if config.destroy_on_disconnect {
            netlink::NBD_CFLAG_DESTROY_ON_DISCONNECT
        } else {
            0
        },
        fds,
        backend: Some(format!("silo-nbd:{export}")),
    };
    let cfg = config.clone();
    let result = tokio::task::spawn_blocking(move || {
        let r = connect_blocking(&params, &cfg);
        drop(theirs); // the kernel holds its own references now
        r
    })
    .await
    .map_err(|e| Error::Kernel(format!("attach task failed: {e}")))?;
    let (index, attached) = result?;
    info!(export, index, connections, "attached to /dev/nbd{index}");
    Ok(KernelDevice {
        index,
        server: server.clone(),
        export: export.into(),
        config: config.clone(),
        attached,
    })
}

fn connect_blocking(p: &netlink::ConnectParams, cfg: &AttachConfig) -> Result<(u32, Attached)> {
    if cfg.method != AttachMethod::Ioctl {
        match netlink_connect(p, cfg.retry_for) {
            Ok(r) => return Ok(r),
            Err(NetlinkFailure::NoFamily(e)) if cfg.method == AttachMethod::Auto => {
                debug!(error = %e, "nbd netlink family unavailable, falling back to ioctl");
            }
            Err(NetlinkFailure::NoFamily(e)) | Err(NetlinkFailure::Failed(e)) => return Err(e),
        }
    }
    ioctl_connect(p)
}

enum NetlinkFailure {
    NoFamily(Error),
    Failed(Error),
}

fn netlink_connect(
    p: &netlink::ConnectParams,
    retry_for: Duration,
) -> Result<(u32, Attached), NetlinkFailure> {
    let sock = sys::NetlinkSocket::open_generic(Duration::from_secs(5))
        .map_err(|e| NetlinkFailure::NoFamily(kerr("netlink socket")(e)))?;
    let family = family_id(&sock).map_err(|e| {
        NetlinkFailure::NoFamily(kerr(
            "resolve nbd netlink family (is the nbd module loaded?)",
        )(e))
    })?;
    let start = Instant::now();
    loop {
        let s = seq();
        match transact(&sock, &netlink::connect(family, s, p), s) {
            Ok(replies) => {
                let index = replies
                    .iter()
                    .flat_map(|d| {
                        netlink::messages(d)
                            .into_iter()
                            .filter_map(|m| netlink::connect_index(&m))
                            .collect::<Vec<_>>()
                    })
                    .next()
                    .or(p.index)
                    .ok_or_else(|| {
                        NetlinkFailure::Failed(Error::Kernel(
                            "connect reply without a device index".into(),
                        ))
                    })?;
                return Ok((index, Attached::Netlink { family }));
            }
            // EINVAL will not get better; anything else may be a udev race.
            Err(e) if e.raw_os_error() != Some(libc::EINVAL) && start.elapsed() < retry_for => {
                debug!(error = %e, "NBD_CMD_CONNECT failed, retrying");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(NetlinkFailure::Failed(kerr("NBD_CMD_CONNECT")(e))),
        }
    }
}

fn free_device() -> Option<u32> {
    (0..256u32).find(|i| {
        Path::new(&format!("/dev/nbd{i}")).exists()
            && !Path::new(&format!("/sys/block/nbd{i}/pid")).exists()
    })
}

fn ioctl_connect(p: &netlink::ConnectParams) -> Result<(u32, Attached)> {
    let index = p
        .index
        .or_else(free_device)
        .ok_or_else(|| Error::Kernel("no free /dev/nbdN (is the nbd module loaded?)".into()))?;
    let path = format!("/dev/nbd{index}");
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| Error::Kernel(format!("open {path}: {e}")))?;
    let fd = dev.as_raw_fd();
    sys::nbd_ioctl(fd, NBD_SET_BLKSIZE, p.block_size).map_err(kerr("NBD_SET_BLKSIZE"))?;
    sys::nbd_ioctl(fd, NBD_SET_SIZE_BLOCKS, p.size / p.block_size)
        .map_err(kerr("NBD_SET_SIZE_BLOCKS"))?;
    sys::nbd_ioctl(fd, NBD_SET_FLAGS, p.server_flags).map_err(kerr("NBD_SET_FLAGS"))?;
    if let Some(t) = p.timeout {
        sys::nbd_ioctl(fd, NBD_SET_TIMEOUT, t).map_err(kerr("NBD_SET_TIMEOUT"))?;
    }
    for s in &p.fds {
        sys::nbd_ioctl(fd, NBD_SET_SOCK, *s as u64).map_err(kerr("NBD_SET_SOCK"))?;
    }
    let thread = std::thread::Builder::new()
        .name(format!("nbd{index}-do-it"))
        .spawn(move || {
            let fd = dev.as_raw_fd();
            if let Err(e) = sys::nbd_ioctl(fd, NBD_DO_IT, 0) {
                debug!(error = %e, "NBD_DO_IT returned");
            }
            let _ = sys::nbd_ioctl(fd, NBD_CLEAR_QUE, 0);
            let _ = sys::nbd_ioctl(fd, NBD_CLEAR_SOCK, 0);
        })
        .map_err(kerr("spawn NBD_DO_IT thread"))?;
    Ok((
        index,
        Attached::Ioctl {
            thread: Some(thread),
        },
    ))
}

impl KernelDevice {
    /// The device index N of `/dev/nbdN`.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// `/dev/nbdN`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/nbd{}", self.index))
    }

    /// Whether the kernel reports the device as connected (netlink only;
    /// ioctl devices report whether their `NBD_DO_IT` thread still runs).
    pub async fn is_connected(&self) -> Result<bool> {
        match &self.attached {
            Attached::Ioctl { thread } => Ok(thread.as_ref().is_some_and(|t| !t.is_finished())),
            Attached::Netlink { family } => {
                let (family, index) = (*family, self.index);
                tokio::task::spawn_blocking(move || {
                    let sock = sys::NetlinkSocket::open_generic(Duration::from_secs(5))
                        .map_err(kerr("netlink socket"))?;
                    let s = seq();
                    let replies = transact(&sock, &netlink::status(family, s, index), s)
                        .map_err(kerr("NBD_CMD_STATUS"))?;
                    Ok(replies.iter().any(|d| {
                        netlink::messages(d)
                            .iter()
                            .flat_map(netlink::status_devices)
                            .any(|(i, c)| i == index && c)
                    }))
                })
                .await
                .map_err(|e| Error::Kernel(format!("status task failed: {e}")))?
            }
        }
    }

    /// Hands the kernel `connections` fresh connections (served by the same
    /// server), e.g. after the previous ones died or to swap the export's
    /// provider stack; the kernel drops dead ones. Netlink only.
    pub async fn reconfigure(&self, connections: usize) -> Result<()> {
        let Attached::Netlink { family } = self.attached else {
            return Err(Error::Kernel(
                "reconfigure needs the netlink interface".into(),
            ));
        };
        let theirs = socketpairs(&self.server, &self.export, connections.max(1))?;
        let fds: Vec<RawFd> = theirs.iter().map(|s| s.as_raw_fd()).collect();
        let index = self.index;
        let dead = self.config.dead_conn_timeout.map(|t| t.as_secs().max(1));
        tokio::task::spawn_blocking(move || {
            let sock = sys::NetlinkSocket::open_generic(Duration::from_secs(5))
                .map_err(kerr("netlink socket"))?;
            let s = seq();
            let r = transact(
                &sock,
                &netlink::reconfigure(family, s, index, &fds, dead),
                s,
            )
            .map_err(kerr("NBD_CMD_RECONFIGURE"));
            drop(theirs);
            r.map(|_| ())
        })
        .await
        .map_err(|e| Error::Kernel(format!("reconfigure task failed: {e}")))?
    }

    /// Disconnects the device cleanly: the kernel flushes and sends
    /// `NBD_CMD_DISC` on its connections, whose transmission loops then end.
    pub async fn disconnect(mut self) -> Result<()> {
        let index = self.index;
        match &mut self.attached {
            Attached::Netlink { family } => {
                let family = *family;
                tokio::task::spawn_blocking(move || {
                    let sock = sys::NetlinkSocket::open_generic(Duration::from_secs(5))
                        .map_err(kerr("netlink socket"))?;
                    let s = seq();
                    transact(&sock, &netlink::disconnect(family, s, index), s)
                        .map_err(kerr("NBD_CMD_DISCONNECT"))?;
                    Ok::<_, Error>(())
                })
                .await
                .map_err(|e| Error::Kernel(format!("disconnect task failed: {e}")))??;
            }
            Attached::Ioctl { thread } => {
                let thread = thread.take();
                tokio::task::spawn_blocking(move || {
                    let path = format!("/dev/nbd{index}");
                    let dev = std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&path)
                        .map_err(|e| Error::Kernel(format!("open {path}: {e}")))?;
                    sys::nbd_ioctl(dev.as_raw_fd(), NBD_DISCONNECT, 0)
                        .map_err(kerr("NBD_DISCONNECT"))?;
                    if let Some(t) = thread {
                        let _ = t.join();
                    }
                    Ok::<_, Error>(())
                })
                .await
                .map_err(|e| Error::Kernel(format!("disconnect task failed: {e}")))??;
            }
        }
        info!(index, "detached /dev/nbd{index}");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_uapi() {
        // _IO(0xab, nr) == (0xab << 8) | nr
        assert_eq!(NBD_SET_SOCK, 0xab << 8);
        assert_eq!(NBD_DO_IT, (0xab << 8) | 3);
        assert_eq!(NBD_SET_FLAGS, (0xab << 8) | 10);
    }

    #[test]
    fn sizes_round_down() {
        assert_eq!(kernel_size(10_000, 4096), 8192);
        assert_eq!(kernel_size(8192, 512), 8192);
        assert_eq!(kernel_size(100, 512), 0);
    }

    #[tokio::test]
    async fn attach_reports_clear_errors() {
        let server = Server::default();
        let p: silo_storage::DynProvider =
            std::sync::Arc::new(silo_storage::MemoryStorage::new(100));
        server.add_export(crate::Export::new("tiny", p)).unwrap();
        let e = attach(&server, "missing", &AttachConfig::default())
            .await
            .unwrap_err();
        assert!(matches!(e, Error::NoSuchExport(_)));
        let e = attach(&server, "tiny", &AttachConfig::default())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("smaller than one block"), "{e}");
        let cfg = AttachConfig::default().with_block_size(1000);
        let e = attach(&server, "tiny", &cfg).await.unwrap_err();
        assert!(e.to_string().contains("block size"), "{e}");
    }

    #[tokio::test]
    async fn netlink_socket_opens_and_family_lookup_answers() {
        // Generic netlink exists on every Linux kernel; the nbd family only
        // where the module is loaded. Either way the answer is clean.
        let sock =
            sys::NetlinkSocket::open_generic(Duration::from_secs(2)).expect("netlink socket");
        match family_id(&sock) {
            Ok(id) => assert!(module_loaded() || id > 0),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}"),
        }
    }
}
