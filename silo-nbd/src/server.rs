//! The async server: accept loops, handshake driver and the transmission
//! loop (one task per connection reads, runs and answers requests).

use std::collections::VecDeque;
use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::stream::{FuturesUnordered, StreamExt};
use parking_lot::RwLock;
use silo_storage::provider::write_zeroes_by_writing;
use silo_storage::{FileRange, NotShared};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::busy_poll::{self, BusyPoll, Polled};
use crate::errno::Errno;
use crate::error::{Error, Result};
use crate::export::{Export, ExportInfo, Extent};
use crate::handshake::{Catalog, Handshake, Outcome};
use crate::proto::*;
use crate::sendfile::ReplySink;
use crate::transmission::{
    block_status_reply, clamp_extents, error_reply, read_data_header, simple_reply, validate,
    Command, ReplyHead, RequestDecoder, MAX_EXTENTS,
};

/// Server settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Most requests executing at once per connection; the reader stops
    /// reading (TCP back-pressure) while this many are in flight. Memory per
    /// connection is bounded by this × the maximum payload.
    pub max_in_flight: usize,
    /// Time a client has to finish the handshake.
    pub handshake_timeout: Duration,
    /// When a connection ends (disconnect, protocol error, shutdown), how
    /// long its in-flight requests get to finish and their replies to be
    /// written before the connection is dropped anyway.
    pub drain_timeout: Duration,
    /// How long a TCP or Unix connection that has answered every request
    /// keeps reading its socket for the next one before it parks, while its
    /// client sends each request within this time of going idle (a client
    /// at queue depth 1) and its requests move at most 64 KiB of data (a
    /// client streaming large requests needs the CPU more). On a VM this
    /// spares a halted vCPU's wake-up per request: tens of µs. Costs at
    /// most this much CPU time per idle period, and only for quick
    /// clients. Zero turns it off.
    pub busy_poll: Duration,
    /// Whether large WRITE payloads are received straight into buffers the
    /// export's provider keeps as its memory, when it says it can
    /// ([`silo_storage::Provider::adopt_size`], e.g. a `MemoryStorage`):
    /// a write whose offset and length are multiples of that size is read
    /// from the socket in pieces of that size and never copied in user
    /// space. On by default.
    pub adopt_writes: bool,
    /// Whether READs of at least 64 KiB on TCP and Unix connections are
    /// sent with `sendfile(2)` when the export's provider keeps the range in
    /// a cached file ([`silo_storage::Provider::read_file`], e.g. a buffered
    /// `FileStorage`): the kernel copies each byte from the page cache into
    /// the socket once, instead of into a buffer and from there to the
    /// socket. On by default.
    pub sendfile_reads: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_in_flight: 64,
            handshake_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
            busy_poll: Duration::from_micros(100),
            adopt_writes: true,
            sendfile_reads: true,
        }
    }
}

impl ServerConfig {
    /// Sets [`drain_timeout`](Self::drain_timeout).
    pub fn with_drain_timeout(mut self, t: Duration) -> Self {
        self.drain_timeout = t;
        self
    }

    /// Sets [`handshake_timeout`](Self::handshake_timeout).
    pub fn with_handshake_timeout(mut self, t: Duration) -> Self {
        self.handshake_timeout = t;
        self
    }

    /// Sets [`busy_poll`](Self::busy_poll) (zero: off).
    pub fn with_busy_poll(mut self, t: Duration) -> Self {
        self.busy_poll = t;
        self
    }

    /// Sets [`adopt_writes`](Self::adopt_writes).
    pub fn with_adopt_writes(mut self, on: bool) -> Self {
        self.adopt_writes = on;
        self
    }

    /// Sets [`sendfile_reads`](Self::sendfile_reads).
    pub fn with_sendfile_reads(mut self, on: bool) -> Self {
        self.sendfile_reads = on;
        self
    }

    /// Sets [`max_in_flight`](Self::max_in_flight) (at least 1).
    pub fn with_max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }
}

struct Inner {
    config: ServerConfig,
    exports: RwLock<Vec<Arc<Export>>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Catalog for Inner {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        self.find(name).map(|e| e.info.clone())
    }
    fn list(&self) -> Vec<ExportInfo> {
        self.exports.read().iter().map(|e| e.info.clone()).collect()
    }
    fn shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }
}

impl Inner {
    fn find(&self, name: &str) -> Option<Arc<Export>> {
        let exports = self.exports.read();
        if name.is_empty() {
            return exports.first().cloned();
        }
        exports.iter().find(|e| e.info.name == name).cloned()
    }
}

/// An NBD server with several named exports. Cheap to clone (shared state).
///
/// The first export added is also the default export (empty name).
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.inner.config)
            .field("exports", &self.inner.exports.read().len())
            .finish()
    }
}

impl Default for Server {
    fn default() -> Self {
        Server::new(ServerConfig::default())
    }
}

impl Server {
    /// A server with no exports.
    pub fn new(config: ServerConfig) -> Server {
        Server {
            inner: Arc::new(Inner {
                config,
                exports: RwLock::new(Vec::new()),
                shutdown: CancellationToken::new(),
                tasks: TaskTracker::new(),
            }),
        }
    }

    /// Adds an export; fails if the name is taken.
    pub fn add_export(&self, export: Export) -> Result<Arc<Export>> {
        let mut exports = self.inner.exports.write();
        if exports.iter().any(|e| e.info.name == export.info.name) {
            return Err(Error::ExportExists(export.info.name));
        }
        let export = Arc::new(export);
        exports.push(export.clone());
        Ok(export)
    }

    /// Removes an export (connections already using it keep it alive).
    pub fn remove_export(&self, name: &str) -> Option<Arc<Export>> {
        let mut exports = self.inner.exports.write();
        let at = exports.iter().position(|e| e.info.name == name)?;
        Some(exports.remove(at))
    }

    /// The export called `name` (`""`: the default export).
    pub fn export(&self, name: &str) -> Option<Arc<Export>> {
        self.inner.find(name)
    }

    /// Names of all exports, in the order they were added.
    pub fn export_names(&self) -> Vec<String> {
        self.inner
            .exports
            .read()
            .iter()
            .map(|e| e.info.name.clone())
            .collect()
    }

    /// Accepts TCP connections until [`shutdown`](Self::shutdown); each is
    /// served on its own task with `TCP_NODELAY`.
    pub async fn serve_tcp(&self, listener: TcpListener) -> Result<()> {
        loop {
            let accepted = tokio::select! {
                _ = self.inner.shutdown.cancelled() => return Ok(()),
                r = listener.accept() => r,
            };
            match accepted {
                Ok((stream, peer)) => {
                    if let Err(e) = stream.set_nodelay(true) {
                        warn!(%peer, error = %e, "cannot set TCP_NODELAY");
                    }
                    let socket = busy_poll::Socket::tcp(&stream);
                    let (r, w) = stream.into_split();
                    self.spawn_connection(r, w, socket, peer.to_string());
                }
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// Accepts Unix-socket connections until [`shutdown`](Self::shutdown).
    pub async fn serve_unix(&self, listener: UnixListener) -> Result<()> {
        let mut n = 0u64;
        loop {
            let accepted = tokio::select! {
                _ = self.inner.shutdown.cancelled() => return Ok(()),
                r = listener.accept() => r,
            };
            match accepted {
                Ok((stream, _)) => {
                    n += 1;
                    let socket = busy_poll::Socket::unix(&stream);
                    let (r, w) = stream.into_split();
                    self.spawn_connection(r, w, socket, format!("unix#{n}"));
                }
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    fn spawn_connection<R, W>(&self, r: R, w: W, socket: Option<busy_poll::Socket>, peer: String)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: ReplySink,
    {
        let inner = self.inner.clone();
        let span = tracing::info_span!("nbd_conn", %peer);
        self.inner.tasks.spawn(
            async move {
                match connection(inner, r, w, socket).await {
                    Ok(()) => debug!("connection closed"),
                    Err(e) => warn!(error = %e, "connection closed on error"),
                }
            }
            .instrument(span),
        );
    }

    /// Serves one already-accepted connection (handshake, then
    /// transmission) on the current task; returns when it closes.
    pub async fn handle_connection<S>(&self, stream: S) -> Result<()>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        let _guard = self.inner.tasks.token();
        connection(self.inner.clone(), r, w, None).await
    }

    /// Serves the transmission phase only (no handshake, simple replies):
    /// what the Linux kernel client speaks on the sockets it is handed.
    pub async fn serve_transmission<S>(&self, stream: S, export: &str) -> Result<()>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let export = self
            .inner
            .find(export)
            .ok_or_else(|| Error::NoSuchExport(export.into()))?;
        let (r, w) = tokio::io::split(stream);
        let _guard = self.inner.tasks.token();
        transmission(
            self.inner.clone(),
            export,
            r,
            w,
            BytesMut::with_capacity(64 * 1024),
            Negotiated::default(),
            None,
        )
        .await
    }

    /// Spawns [`serve_transmission`](Self::serve_transmission) on a task
    /// tracked by the server (so [`shutdown`](Self::shutdown) waits for it).
    pub fn spawn_transmission<S>(&self, stream: S, export: &str) -> Result<()>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let export = self
            .inner
            .find(export)
            .ok_or_else(|| Error::NoSuchExport(export.into()))?;
        let (r, w) = tokio::io::split(stream);
        let inner = self.inner.clone();
        let span = tracing::info_span!("nbd_conn", peer = "kernel", export = %export.info.name);
        self.inner.tasks.spawn(
            async move {
                let buf = BytesMut::with_capacity(64 * 1024);
                if let Err(e) =
                    transmission(inner, export, r, w, buf, Negotiated::default(), None).await
                {
                    warn!(error = %e, "kernel connection closed on error");
                }
            }
            .instrument(span),
        );
        Ok(())
    }

    /// Whether [`shutdown`](Self::shutdown) was called.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutdown.is_cancelled()
    }

    /// Stops accepting connections and options, lets every connection
    /// finish the requests it already received (new ones are answered
    /// `ESHUTDOWN`), closes them and waits until all are gone.
    pub async fn shutdown(&self) {
        info!("nbd server shutting down");
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}

async fn connection<R, W>(
    inner: Arc<Inner>,
    mut r: R,
    mut w: W,
    socket: Option<busy_poll::Socket>,
) -> Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: ReplySink,
{
    let mut buf = BytesMut::with_capacity(4096);
    let mut hs = Handshake::new();
    let negotiate = async {
        loop {
            let outcome = hs.receive(&mut buf, &*inner)?;
            if !hs.output().is_empty() {
                let out = hs.output().split();
                w.write_all(&out)
                    .await
                    .map_err(Error::io("handshake write"))?;
            }
            match outcome {
                Some(outcome) => return Ok::<_, Error>(Some(outcome)),
                None => {
                    let n = tokio::select! {
                        n = r.read_buf(&mut buf) => n.map_err(Error::io("handshake read"))?,
                        _ = inner.shutdown.cancelled() => return Ok(None),
                    };
                    if n == 0 {
                        return Ok(None);
                    }
                }
            }
        }
    };
    let outcome = tokio::time::timeout(inner.config.handshake_timeout, negotiate)
        .await
        .map_err(|_| Error::HandshakeTimeout)??;
    let negotiated = match outcome {
        None => return Ok(()),
        Some(Outcome::Aborted) => {
            debug!("client aborted the handshake");
            let _ = w.shutdown().await;
            return Ok(());
        }
        Some(Outcome::Transmission(n)) => n,
    };
    let export = inner
        .find(&negotiated.export.name)
        .ok_or_else(|| Error::NoSuchExport(negotiated.export.name.clone()))?;
    debug!(export = %export.info.name, structured = negotiated.structured, "transmission");
    transmission(
        inner,
        export,
        r,
        w,
        buf,
        Negotiated {
            structured: negotiated.structured,
            base_allocation: negotiated.base_allocation,
        },
        socket,
    )
    .await
}

/// Read buffers of one connection, reused once their reply is written:
/// no allocation, page faults or zero-filling per read on the hot path.
/// Holds at most [`BufPool::MAX_BYTES`], buffers up to [`BufPool::MAX_BUF`].
/// Owned by the connection task (no lock); the most recently returned
/// buffer is handed out first, so a connection whose replies are written
/// as fast as they are produced keeps cycling one cache-hot buffer.
#[derive(Default)]
struct BufPool {
    free: Vec<BytesMut>,
    bytes: usize,
}

impl BufPool {
    const MAX_BYTES: usize = 16 << 20;
    const MAX_BUF: usize = 4 << 20;

    /// A buffer of exactly `len` initialised bytes (contents unspecified:
    /// providers overwrite all of it, and on error it is not sent).
    fn get(&mut self, len: usize) -> BytesMut {
        match self.free.iter().rposition(|b| b.capacity() >= len) {
            Some(i) => {
                let mut b = self.free.swap_remove(i);
                self.bytes -= b.capacity();
                if b.len() >= len {
                    b.truncate(len);
                } else {
                    b.resize(len, 0);
                }
                b
            }
            None => BytesMut::zeroed(len),
        }
    }

    /// Takes a buffer back if nobody else holds it and it fits the bounds.
    fn put(&mut self, data: Bytes) {
        if data.len() > Self::MAX_BUF || data.is_empty() {
            return;
        }
        let Ok(b) = data.try_into_mut() else {
            return;
        };
        if self.bytes + b.capacity() <= Self::MAX_BYTES {
            self.bytes += b.capacity();
            self.free.push(b);
        }
    }
}

/// The allocations a connection receives requests into, reused once every
/// payload cut from them has been dropped, instead of freeing them and
/// allocating new ones: fresh memory costs a page fault per 4 KiB (and
/// malloc hands freed memory back to the kernel), measured at ~12 % of the
/// server's CPU time under a stream of 256 KiB writes. Keeps at most
/// [`RecvBuffers::MAX_BYTES`] in buffers of [`RecvBuffers::FRESH`] bytes:
/// enough to cycle through while [`MAX_HELD`] bytes of write payloads wait
/// for their provider.
#[derive(Default)]
struct RecvBuffers {
    /// Earlier receive buffers (each a view of an allocation of
    /// [`Self::FRESH`] bytes), possibly still shared with payloads of
    /// requests in flight; oldest first.
    retired: VecDeque<BytesMut>,
    /// Whether `buf` is a view of one of our allocations.
    ours: bool,
}

impl RecvBuffers {
    const MAX_BYTES: usize = 32 << 20;
    /// Capacity of a new receive buffer (several large requests each).
    const FRESH: usize = 2 << 20;

    /// Gives `buf` room for `need` more bytes, keeping its contents: in
    /// place if nothing else uses its allocation, else in a retired one
    /// that is free again, else in a new allocation.
    fn make_room(&mut self, buf: &mut BytesMut, need: usize) {
        if buf.try_reclaim(need) {
            return;
        }
        let want = buf.len() + need;
        let reused = if want <= Self::FRESH {
            // The most recently used first: likeliest still in the caches.
            self.retired.iter_mut().rposition(|r| {
                r.clear();
                r.try_reclaim(Self::FRESH)
            })
        } else {
            None
        };
        let mut next = match reused {
            Some(i) => self.retired.remove(i).expect("position is in range"),
            None => BytesMut::with_capacity(want.max(Self::FRESH)),
        };
        next.extend_from_slice(buf);
        let old = std::mem::replace(buf, next);
        if std::mem::replace(&mut self.ours, want <= Self::FRESH) {
            if self.retired.len() * Self::FRESH >= Self::MAX_BYTES {
                self.retired.pop_front();
            }
            self.retired.push_back(old);
        }
    }
}

/// A reply waiting to be written: header and optional payload.
struct Outgoing {
    head: ReplyHead,
    data: Option<Bytes>,
    /// Payload pieces after `data`: a read answered with the provider's
    /// own memory ([`Provider::read_shared`](silo_storage::Provider::read_shared)) sends them as they are.
    more: Vec<Bytes>,
    /// The payload, last, as a range of a cached file sent with
    /// `sendfile` (see [`ServerConfig::sendfile_reads`]).
    file: Option<FileRange>,
    /// Write payload bytes the request held until it finished (see
    /// [`OutQueue::held`]).
    held: usize,
}

impl Outgoing {
    fn head(head: ReplyHead) -> Outgoing {
        Outgoing {
            head,
            data: None,
            more: Vec::new(),
            file: None,
            held: 0,
        }
    }

    fn len(&self) -> usize {
        self.memory_len() + self.file.as_ref().map_or(0, |f| f.len)
    }

    /// Bytes of the parts sent from memory.
    fn memory_len(&self) -> usize {
        self.parts().map(<[u8]>::len).sum()
    }

    /// What goes on the wire from memory, in order (some parts may be
    /// empty), before [`file`](Self::file).
    fn parts(&self) -> impl Iterator<Item = &[u8]> {
        std::iter::once(self.head.as_slice())
            .chain(self.data.as_deref())
            .chain(self.more.iter().map(|b| &b[..]))
    }
}

/// The replies of one connection not yet written, in completion order,
/// and the read-buffer pool their payloads go back to.
#[derive(Default)]
struct OutQueue {
    queue: VecDeque<Outgoing>,
    /// Bytes of the front reply already written.
    front_done: usize,
    /// Bytes queued and not yet written.
    bytes: usize,
    /// Write payload bytes of requests still executing. The reader stops
    /// at [`MAX_HELD`] of them: writes that queue behind a slow provider
    /// (or one that serialises them, as a filesystem does for one file)
    /// gain nothing from more of them waiting, and a small set of receive
    /// buffers stays in the CPU's caches.
    held: usize,
    pool: BufPool,
}

/// Most write payload bytes a connection keeps waiting for its provider
/// before it stops reading (one request is always let through).
const MAX_HELD: usize = 8 << 20;

/// Largest piece a write payload is received in (see
/// [`ServerConfig::adopt_writes`]); a provider adopting larger buffers gets
/// its writes copied as usual.
const MAX_PIECE: usize = 4 << 20;

/// What a connection's socket did: see `transmission`'s main loop.
enum Io {
    /// A read of request bytes finished.
    Read(std::io::Result<usize>),
    /// Queued replies were (partly) written.
    Wrote(std::io::Result<()>),
}

/// A write-side poll result with "0 bytes" turned into error `kind`: a
/// sink that takes nothing (or a file that ends early) would otherwise be
/// polled forever.
fn nonzero(
    p: Poll<std::io::Result<usize>>,
    kind: std::io::ErrorKind,
) -> Poll<std::io::Result<usize>> {
    match p {
        Poll::Ready(Ok(0)) => Poll::Ready(Err(kind.into())),
        p => p,
    }
}

impl OutQueue {
    /// Replies handed to one `writev` at most.
    const BATCH: usize = 64;
    /// Slices handed to one `writev` at most (a reply has a header and one
    /// payload, or a header and the pieces of a shared read).
    const SLICES: usize = 256;

    fn push(&mut self, o: Outgoing) {
        self.bytes += o.len();
        self.held -= o.held;
        self.queue.push_back(o);
    }

    fn len(&self) -> usize {
        self.queue.len()
    }

    fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Forgets every queued reply (the peer is gone).
    fn clear(&mut self) {
        self.queue.clear();
        self.front_done = 0;
        self.bytes = 0;
    }

    /// Writes queued replies until the queue is empty (`Ready(Ok)`) or the
    /// socket is full (`Pending`, with the waker registered). Progress is
    /// kept in `self`, so dropping the poll at any point loses nothing.
    fn poll_write<W: ReplySink>(
        &mut self,
        w: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        while let Some(front) = self.queue.front() {
            // The front reply's file payload, once its header is out.
            let sent = self.front_done.checked_sub(front.memory_len());
            if let (Some(f), Some(sent)) = (&front.file, sent) {
                let sending = w.poll_sendfile(cx, &f.file, f.offset + sent as u64, f.len - sent);
                // 0: the file is shorter than the device said.
                let n = ready!(nonzero(sending, std::io::ErrorKind::UnexpectedEof))?;
                self.advance(n);
                continue;
            }
            let n = {
                let mut slices: [IoSlice<'_>; Self::SLICES] = [IoSlice::new(&[]); Self::SLICES];
                let mut k = 0;
                let mut skip = self.front_done;
                'fill: for o in self.queue.iter().take(Self::BATCH) {
                    for part in o.parts() {
                        // Written already, or empty.
                        if skip >= part.len() {
                            skip -= part.len();
                            continue;
                        }
                        if k == Self::SLICES {
                            break 'fill;
                        }
                        slices[k] = IoSlice::new(&part[skip..]);
                        skip = 0;
                        k += 1;
                    }
                    // A file payload follows: sent on its own, above.
                    if o.file.is_some() {
                        break 'fill;
                    }
                }
                let writing = Pin::new(&mut *w).poll_write_vectored(cx, &slices[..k]);
                ready!(nonzero(writing, std::io::ErrorKind::WriteZero))?
            };
            self.advance(n);
        }
        Poll::Ready(Ok(()))
    }

    /// Marks `n` more bytes written: finished replies leave the queue and
    /// their payload buffers go back to the pool.
    fn advance(&mut self, n: usize) {
        self.bytes -= n;
        let mut n = self.front_done + n;
        while let Some(front) = self.queue.front() {
            let len = front.len();
            if n < len {
                break;
            }
            n -= len;
            let done = self.queue.pop_front().expect("front exists");
            if let Some(d) = done.data {
                self.pool.put(d);
            }
        }
        self.front_done = n;
    }
}

/// Decrements a gauge when dropped (so it is right on every exit path).
struct Gauge<'a>(&'a std::sync::atomic::AtomicU64);

impl<'a> Gauge<'a> {
    fn inc(a: &'a std::sync::atomic::AtomicU64) -> Gauge<'a> {
        a.fetch_add(1, Ordering::Relaxed);
        Gauge(a)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

type Waiting = FuturesUnordered<Pin<Box<dyn Future<Output = Outgoing> + Send>>>;

/// The transmission phase of one connection, on one task: it reads and
/// decodes requests, runs each one at once, and writes the replies in
/// completion order. A request whose provider answers without waiting
/// (memory, cached data) is answered without any task hop or channel: its
/// reply is queued and written by this same task, usually in the same
/// wake-up. One that has to wait is kept in a set polled by this task, so
/// it never holds up the requests behind it, and its completion wakes this
/// task directly. Reading, writing and waiting for completions are
/// polled together, so a client that is slow to read its replies cannot
/// deadlock a client that is still sending.
/// What the handshake settled for the transmission phase (the default:
/// simple replies only, as the kernel client speaks).
#[derive(Debug, Default, Clone, Copy)]
struct Negotiated {
    structured: bool,
    base_allocation: bool,
}

async fn transmission<R, W>(
    inner: Arc<Inner>,
    export: Arc<Export>,
    mut r: R,
    mut w: W,
    mut buf: BytesMut,
    Negotiated {
        structured,
        base_allocation,
    }: Negotiated,
    socket: Option<busy_poll::Socket>,
) -> Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: ReplySink,
{
    /// Queued reply bytes after which a reply is written before the next
    /// buffered request is run (keeps read buffers few and cache-hot).
    const WRITE_AT: usize = 128 * 1024;

    let metrics = export.metrics.clone();
    let _conn = Gauge::inc(&metrics.connections);
    metrics.connections_total.fetch_add(1, Ordering::Relaxed);
    // Every request counts from the moment it is decoded until its reply
    // (error replies included) is written: a client that sends without
    // reading stalls the reader instead of growing the reply queue.
    let max_in_flight = inner.config.max_in_flight.max(1);
    let mut out = OutQueue::default();
    let mut pending: Waiting = FuturesUnordered::new();
    // Pieces a large write's payload is received in: what the provider
    // adopts without a copy, if the server may and the size is sensible.
    let piece = export
        .provider
        .adopt_size()
        .filter(|p| inner.config.adopt_writes && (4096..=MAX_PIECE).contains(p))
        .unwrap_or(0);
    let provider = export.provider.clone();
    // Large reads of a cached file go out with `sendfile`.
    let sendfile = inner.config.sendfile_reads && w.can_sendfile();
    let mut decoder = RequestDecoder::new(&export.info)
        .with_write_pieces(piece, Box::new(move || provider.adopt_buffer()));
    // Set once shutdown starts: buffered requests are answered ESHUTDOWN,
    // nothing more is read, and the connection closes by then at the latest.
    let mut drain_by: Option<Instant> = None;
    let mut write_failed = false;
    let never = Instant::now() + Duration::from_secs(365 * 24 * 3600);
    let mut shutdown = std::pin::pin!(inner.shutdown.cancelled());
    let mut poll = BusyPoll::new(socket, inner.config.busy_poll);
    let mut recv = RecvBuffers::default();
    // Requests decoded since the connection was last idle, and the data
    // length of the latest (reads and writes; 0 for the others).
    let mut served = 0usize;
    let mut last_len = 0u32;
    // Payload length of the latest WRITE: the likely size of the next.
    let mut last_write = 0usize;

    let result: Result<()> = 'conn: loop {
        // Run every complete request already buffered (up to the limit).
        let mut limited = false;
        loop {
            if pending.len() + out.len() >= max_in_flight || out.held >= MAX_HELD {
                limited = true;
                break;
            }
            let req = match decoder.decode(&mut buf) {
                Ok(Some(req)) => req,
                Ok(None) => break,
                Err(e) => {
                    warn!(error = %e, export = %export.info.name, "malformed request, closing connection");
                    break 'conn Err(e.into());
                }
            };
            let (kind, cookie) = (req.header.kind, req.header.cookie);
            served += 1;
            if kind == CMD_WRITE {
                last_write = req.header.len as usize;
            }
            last_len = match kind {
                CMD_READ | CMD_WRITE => req.header.len,
                _ => 0,
            };
            if kind == CMD_DISC {
                debug!("client sent NBD_CMD_DISC");
                break 'conn Ok(());
            }
            if drain_by.is_some() {
                out.push(Outgoing::head(error_reply(
                    cookie,
                    kind,
                    structured,
                    Errno::Shutdown,
                )));
                continue;
            }
            match validate(req, &export.info, structured, base_allocation) {
                Ok(Command::Disconnect) => unreachable!("handled above"),
                Err(errno) => {
                    metrics.errors.fetch_add(1, Ordering::Relaxed);
                    debug!(kind, cookie, %errno, "request refused");
                    out.push(Outgoing::head(error_reply(cookie, kind, structured, errno)));
                }
                Ok(cmd) => 'run: {
                    if let Command::Read { offset, len } = cmd {
                        if let Some(o) =
                            read_lent(&export, offset, len, cookie, kind, structured, sendfile)
                        {
                            out.push(o);
                            break 'run;
                        }
                    }
                    let read_buf = match &cmd {
                        Command::Read { len, .. } => Some(out.pool.get(*len as usize)),
                        _ => None,
                    };
                    let held = match &cmd {
                        Command::Write { data, .. } => data.len(),
                        Command::WritePieces { pieces, .. } => pieces.iter().map(Bytes::len).sum(),
                        _ => 0,
                    };
                    out.held += held;
                    let export = export.clone();
                    let mut fut = Box::pin(async move {
                        let mut o = execute(&export, read_buf, cmd, cookie, kind, structured).await;
                        o.held = held;
                        o
                    });
                    // Poll once right here: a provider that answers
                    // without waiting costs no task hop at all.
                    match std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
                        Poll::Ready(o) => out.push(o),
                        Poll::Pending => pending.push(fut),
                    }
                }
            }
            if out.bytes >= WRITE_AT && !write_failed {
                let res = std::future::poll_fn(|cx| Poll::Ready(out.poll_write(&mut w, cx))).await;
                if let Poll::Ready(Err(e)) = res {
                    debug!(error = %e, "reply write failed");
                    write_failed = true;
                }
            }
        }
        if write_failed {
            break Ok(());
        }
        if drain_by.is_some() && !limited {
            // Every buffered request is answered (or queued).
            break Ok(());
        }
        let can_read =
            drain_by.is_none() && pending.len() + out.len() < max_in_flight && out.held < MAX_HELD;
        // Room for the rest of the current request (so a large WRITE
        // payload lands in one allocation and is never copied again), and
        // at least 64 KiB so small requests are read in batches.
        let mut read_limit = usize::MAX;
        if can_read {
            let rest = decoder.wanted(&buf).saturating_sub(buf.len());
            let need = rest.max(64 * 1024);
            if buf.capacity() - buf.len() < need {
                recv.make_room(&mut buf, need);
            }
            // Near the end of the buffer (less room after the current
            // request than for a write as large as the last), read no
            // further than the current request and the next header: a
            // large request cut off at the end would be copied into the
            // next buffer. (nbdcopy writing 256 KiB requests to a file
            // export: those copies took 2.4 % of the server's CPU time
            // with a fixed 64 KiB tail, 1.5 % with this one.)
            let tail = (64 * 1024).max(last_write + REQUEST_HEADER_LEN);
            if buf.capacity() - buf.len() - rest < tail {
                read_limit = rest + REQUEST_HEADER_LEN;
            }
            if let Some(hint) = decoder.read_hint() {
                read_limit = read_limit.min(hint.max(rest));
            }
        }
        // (Not while large writes stream in: their payloads are read into
        // pieces, and their client does not wait for each reply.)
        let idle = can_read
            && pending.is_empty()
            && out.is_empty()
            && !decoder.collecting()
            && decoder.read_hint().is_none();
        if let Some(p) = poll.as_mut().filter(|_| idle) {
            let served = std::mem::take(&mut served);
            if p.wanted(served, last_len) && !inner.shutdown.is_cancelled() {
                match p.poll(&mut buf).await {
                    Polled::Data => {
                        metrics.busy_poll_hits.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Polled::Timeout => {
                        metrics.busy_poll_misses.fetch_add(1, Ordering::Relaxed);
                    }
                    Polled::Closed => {}
                }
            } else {
                p.parking();
            }
        }
        // While large writes stream in, reading goes before writing
        // replies: replies then leave in batches (one `writev` for many)
        // whenever the socket has nothing more, instead of one per write.
        let streaming = decoder.collecting() || decoder.read_hint().is_some();
        // A payload being collected in pieces is read straight into its
        // piece (nothing is left in `buf` to decode meanwhile).
        let mut limited = match decoder.payload_room() {
            Some(room) => room,
            None => (&mut buf).limit(read_limit),
        };
        let mut read = std::pin::pin!(r.read_buf(&mut limited));
        let has_out = !out.is_empty();
        // Reading and writing replies, in one future so their order can
        // change (`select!`'s order is fixed).
        let io = std::future::poll_fn(|cx| {
            if streaming && can_read {
                if let Poll::Ready(n) = read.as_mut().poll(cx) {
                    return Poll::Ready(Io::Read(n));
                }
            }
            if has_out {
                if let Poll::Ready(res) = out.poll_write(&mut w, cx) {
                    return Poll::Ready(Io::Wrote(res));
                }
            }
            if !streaming && can_read {
                if let Poll::Ready(n) = read.as_mut().poll(cx) {
                    return Poll::Ready(Io::Read(n));
                }
            }
            Poll::Pending
        });
        tokio::select! {
            biased;
            _ = &mut shutdown, if drain_by.is_none() => {
                // Answer what is already buffered with ESHUTDOWN, then close.
                drain_by = Some(Instant::now() + inner.config.drain_timeout);
            }
            Some(o) = pending.next(), if !pending.is_empty() => out.push(o),
            ev = io, if has_out || can_read => match ev {
                Io::Wrote(Err(e)) => {
                    debug!(error = %e, "reply write failed");
                    write_failed = true;
                }
                Io::Wrote(Ok(())) => {}
                Io::Read(Ok(0)) => {
                    if !buf.is_empty() {
                        debug!(left = buf.len(), "client disconnected mid-request");
                    }
                    break Ok(());
                }
                Io::Read(Ok(_)) => {
                    if let Some(p) = poll.as_mut() {
                        p.read();
                    }
                }
                Io::Read(Err(e)) => break Err(Error::Io { context: "read request", source: e }),
            },
            _ = tokio::time::sleep_until(drain_by.unwrap_or(never)), if drain_by.is_some() => break Ok(()),
        }
    };
    // Drain: every in-flight request finishes and its reply is written,
    // within the configured grace period (a client that stopped reading
    // must not hold the server up forever).
    let deadline = drain_by.unwrap_or_else(|| Instant::now() + inner.config.drain_timeout);
    if write_failed {
        out.clear();
    }
    let drain = async {
        while !pending.is_empty() || !out.is_empty() {
            tokio::select! {
                biased;
                Some(o) = pending.next(), if !pending.is_empty() => {
                    if !write_failed {
                        out.push(o);
                    }
                }
                res = std::future::poll_fn(|cx| out.poll_write(&mut w, cx)), if !out.is_empty() => {
                    if let Err(e) = res {
                        debug!(error = %e, "reply write failed");
                        write_failed = true;
                        out.clear();
                    }
                }
            }
        }
        if !write_failed {
            let _ = w.flush().await;
            let _ = w.shutdown().await;
        }
    };
    if tokio::time::timeout_at(deadline, drain).await.is_err() {
        warn!(timeout = ?inner.config.drain_timeout, "in-flight requests not drained in time, closing");
    }
    if !pending.is_empty() {
        // Provider operations are never cancelled halfway: what is still
        // running finishes on its own (its reply has nowhere to go).
        tokio::spawn(async move { while pending.next().await.is_some() {} });
    }
    result
}

/// Runs one validated command against the provider and builds its reply.
async fn execute(
    export: &Export,
    read_buf: Option<BytesMut>,
    cmd: Command,
    cookie: u64,
    kind: u16,
    structured: bool,
) -> Outgoing {
    let m = &export.metrics;
    let _in_flight = Gauge::inc(&m.in_flight);
    let write = cmd.is_write();
    let p = &export.provider;
    let ok = || Outgoing::head(simple_reply(cookie, None));
    let res: silo_storage::Result<Outgoing> = async {
        match cmd {
            Command::Read { offset, len } => {
                let buf = read_buf.unwrap_or_else(|| BytesMut::zeroed(len as usize));
                // A provider that can answer at once does so without a
                // boxed future of its own (~0.1–0.25 µs per request).
                let buf = match p.read_now(offset, buf) {
                    Ok(r) => r?,
                    Err(buf) => p.read_at(offset, buf).await?,
                };
                m.reads.fetch_add(1, Ordering::Relaxed);
                m.bytes_read.fetch_add(u64::from(len), Ordering::Relaxed);
                Ok(Outgoing {
                    head: read_head(cookie, offset, len, structured),
                    data: Some(buf.freeze()),
                    more: Vec::new(),
                    file: None,
                    held: 0,
                })
            }
            Command::Write { offset, data, fua } => {
                let len = data.len() as u64;
                match p.write_now(offset, data) {
                    Ok(r) => r?,
                    Err(data) => p.write_at(offset, data).await?,
                }
                if fua {
                    p.flush().await?;
                }
                m.writes.fetch_add(1, Ordering::Relaxed);
                m.bytes_written.fetch_add(len, Ordering::Relaxed);
                Ok(ok())
            }
            Command::WritePieces {
                offset,
                pieces,
                fua,
            } => {
                let mut len = 0u64;
                for piece in pieces {
                    let n = piece.len() as u64;
                    match p.write_now(offset + len, piece) {
                        Ok(r) => r?,
                        Err(piece) => p.write_at(offset + len, piece).await?,
                    }
                    len += n;
                }
                if fua {
                    p.flush().await?;
                }
                m.writes.fetch_add(1, Ordering::Relaxed);
                m.bytes_written.fetch_add(len, Ordering::Relaxed);
                Ok(ok())
            }
            Command::Flush => {
                p.flush().await?;
                m.flushes.fetch_add(1, Ordering::Relaxed);
                Ok(ok())
            }
            Command::Trim { offset, len, fua } => {
                p.trim(offset, u64::from(len)).await?;
                if fua {
                    p.flush().await?;
                }
                m.trims.fetch_add(1, Ordering::Relaxed);
                Ok(ok())
            }
            Command::WriteZeroes {
                offset,
                len,
                fua,
                no_hole,
                fast,
            } => {
                if no_hole && fast {
                    // Allocating zeroes means writing them: never fast.
                    return Err(silo_storage::Error::Unsupported {
                        op: silo_storage::Op::WriteZeroes,
                        provider: "nbd fast zero without holes",
                    });
                }
                if no_hole {
                    write_zeroes_by_writing(&**p, offset, u64::from(len)).await?;
                } else {
                    p.write_zeroes(offset, u64::from(len)).await?;
                }
                if fua {
                    p.flush().await?;
                }
                m.zeroes.fetch_add(1, Ordering::Relaxed);
                Ok(ok())
            }
            Command::Cache { offset, len } => {
                const CHUNK: u64 = 1 << 20;
                let mut done = 0u64;
                let mut buf = BytesMut::zeroed(CHUNK.min(u64::from(len)) as usize);
                while done < u64::from(len) {
                    let n = (u64::from(len) - done).min(CHUNK) as usize;
                    buf.resize(n, 0);
                    buf = p.read_at(offset + done, buf).await?;
                    done += n as u64;
                }
                drop(buf);
                m.caches.fetch_add(1, Ordering::Relaxed);
                Ok(ok())
            }
            Command::BlockStatus {
                offset,
                len,
                req_one,
            } => {
                let mut extents = Vec::new();
                let max = if req_one { 1 } else { MAX_EXTENTS };
                match &export.allocation {
                    Some(a) => a.extents(offset, u64::from(len), max, &mut extents),
                    None => extents.push(Extent::data(u64::from(len))),
                }
                let descriptors = clamp_extents(&extents, len, req_one);
                let mut out = BytesMut::new();
                block_status_reply(cookie, BASE_ALLOCATION_ID, &descriptors, &mut out);
                m.block_status.fetch_add(1, Ordering::Relaxed);
                Ok(Outgoing {
                    head: ReplyHead::default(),
                    data: Some(out.freeze()),
                    more: Vec::new(),
                    file: None,
                    held: 0,
                })
            }
            Command::Disconnect => Ok(ok()),
        }
    }
    .await;
    match res {
        Ok(out) => out,
        Err(e) => failed(export, &e, write, cookie, kind, structured),
    }
}

/// The error reply to a request the provider failed, counted and logged.
fn failed(
    export: &Export,
    e: &silo_storage::Error,
    write: bool,
    cookie: u64,
    kind: u16,
    structured: bool,
) -> Outgoing {
    export.metrics.errors.fetch_add(1, Ordering::Relaxed);
    let errno = Errno::from_storage(e, write);
    if errno == Errno::Io {
        warn!(error = %e, %errno, "provider I/O error");
    } else {
        debug!(error = %e, %errno, "request failed");
    }
    Outgoing::head(error_reply(cookie, kind, structured, errno))
}

/// The header of a successful read's reply.
fn read_head(cookie: u64, offset: u64, len: u32, structured: bool) -> ReplyHead {
    if !structured {
        simple_reply(cookie, None)
    } else if len == 0 {
        structured_done(cookie)
    } else {
        read_data_header(cookie, offset, len)
    }
}

/// Smallest READ sent with `sendfile` (see [`ServerConfig::sendfile_reads`]):
/// below it a syscall per reply costs more than the copy it saves, and
/// small replies go out many to one `writev`.
const SENDFILE_MIN: u32 = 64 * 1024;

/// Answers a read with what the provider lends for that range, if it lends
/// anything: its own memory (see
/// [`Provider::read_shared`](silo_storage::Provider::read_shared)), written
/// to the socket with no copy into a buffer of ours; else, when `sendfile`
/// is allowed and the read is at least [`SENDFILE_MIN`], a range of the
/// cached file it keeps the data in (see
/// [`Provider::read_file`](silo_storage::Provider::read_file)), copied
/// from the page cache to the socket by the kernel. `None`: read it the
/// usual way.
fn read_lent(
    export: &Export,
    offset: u64,
    len: u32,
    cookie: u64,
    kind: u16,
    structured: bool,
    sendfile: bool,
) -> Option<Outgoing> {
    let p = &export.provider;
    let fail = |e| Some(failed(export, &e, false, cookie, kind, structured));
    let (more, file) = match p.read_shared(offset, len as usize) {
        Ok(Ok(pieces)) => (pieces, None),
        Ok(Err(e)) => return fail(e),
        Err(NotShared) if !sendfile || len < SENDFILE_MIN => return None,
        Err(NotShared) => match p.read_file(offset, len as usize) {
            Ok(Ok(range)) if range.len == len as usize => (Vec::new(), Some(range)),
            Ok(Ok(range)) => {
                // Not the range asked for: a provider bug, read it the
                // usual way.
                warn!(
                    offset,
                    len,
                    lent = range.len,
                    "provider lent a file range of the wrong length"
                );
                return None;
            }
            Ok(Err(e)) => return fail(e),
            Err(NotShared) => return None,
        },
    };
    let m = &export.metrics;
    m.reads.fetch_add(1, Ordering::Relaxed);
    m.bytes_read.fetch_add(u64::from(len), Ordering::Relaxed);
    if file.is_some() {
        m.sendfile_reads.fetch_add(1, Ordering::Relaxed);
    }
    Some(Outgoing {
        head: read_head(cookie, offset, len, structured),
        data: None,
        more,
        file,
        held: 0,
    })
}

/// A structured reply with no data (`NONE` chunk, `DONE`), for zero-length reads.
fn structured_done(cookie: u64) -> ReplyHead {
    crate::transmission::structured_none(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receive_buffers_are_reused_once_their_payloads_are_gone() {
        let mut recv = RecvBuffers::default();
        let mut buf = BytesMut::with_capacity(64);
        let mut payloads = Vec::new();
        let mut first = None;
        for round in 0..4 {
            // Receive most of a buffer's worth, cut it into payloads.
            recv.make_room(&mut buf, RecvBuffers::FRESH - 4096);
            if round == 0 {
                first = Some(buf.as_ptr() as usize);
            }
            buf.resize(RecvBuffers::FRESH - 4096, round as u8);
            payloads.push(buf.split_to(RecvBuffers::FRESH - 8192).freeze());
            if round == 2 {
                // The payload of round 0 is written: its buffer is free.
                payloads.remove(0);
            }
        }
        // Round 3 reused round 0's allocation instead of allocating.
        let base = |b: &BytesMut| b.as_ptr() as usize;
        assert!(
            (first.unwrap()..first.unwrap() + RecvBuffers::FRESH).contains(&base(&buf)),
            "not reused"
        );
        // The partial request at the end of the old buffer moved along.
        assert!(buf[..4096].iter().all(|&b| b == 3));
        // Bounded: never more than MAX_BYTES retired.
        for _ in 0..64 {
            payloads.push(buf.split().freeze());
            recv.make_room(&mut buf, RecvBuffers::FRESH);
        }
        assert!(recv.retired.len() * RecvBuffers::FRESH <= RecvBuffers::MAX_BYTES);
    }

    #[test]
    fn buffer_pool_reuses_and_stays_bounded() {
        let mut pool = BufPool::default();
        let b = pool.get(4096);
        assert_eq!(b.len(), 4096);
        let ptr = b.as_ptr();
        pool.put(b.freeze());
        let again = pool.get(1000);
        assert_eq!(again.len(), 1000);
        assert_eq!(again.as_ptr(), ptr, "buffer reused");
        let bigger = {
            pool.put(again.freeze());
            pool.get(8192)
        };
        assert_eq!(bigger.len(), 8192);
        // A shared buffer is not taken back; oversized ones neither.
        let shared = BytesMut::zeroed(100).freeze();
        let _other = shared.clone();
        pool.put(shared);
        pool.put(BytesMut::zeroed(BufPool::MAX_BUF + 1).freeze());
        for _ in 0..64 {
            pool.put(BytesMut::zeroed(BufPool::MAX_BUF).freeze());
        }
        assert!(pool.bytes <= BufPool::MAX_BYTES);
        assert_eq!(
            pool.bytes,
            pool.free.iter().map(BytesMut::capacity).sum::<usize>()
        );
    }

    /// A writer that takes at most 7 bytes per call, file ranges included
    /// (read with `pread`, as `sendfile` would send them).
    struct Slow(std::io::Cursor<Vec<u8>>);
    impl AsyncWrite for Slow {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = b.len().min(7);
            Poll::Ready(std::io::Write::write(&mut self.get_mut().0, &b[..n]))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }
    impl ReplySink for Slow {
        fn can_sendfile(&self) -> bool {
            true
        }
        fn poll_sendfile(
            &mut self,
            _: &mut Context<'_>,
            file: &std::fs::File,
            offset: u64,
            len: usize,
        ) -> Poll<std::io::Result<usize>> {
            use std::os::unix::fs::FileExt;
            let mut b = vec![0u8; len.min(7)];
            let n = file.read_at(&mut b, offset)?;
            Poll::Ready(std::io::Write::write(&mut self.0, &b[..n]))
        }
    }

    /// Replies with file payloads go out in order between replies from
    /// memory, however the writes split; a file shorter than its range
    /// is an error, not a hang.
    #[test]
    fn out_queue_sends_file_payloads_in_order() {
        use std::io::Write;
        let mut f = tempfile::tempfile().unwrap();
        let content: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        f.write_all(&content).unwrap();
        let f = Arc::new(f);
        let mut q = OutQueue::default();
        let mut want = Vec::new();
        for i in 0..6u64 {
            let head = simple_reply(i, None);
            want.extend_from_slice(head.as_slice());
            let file = (i % 2 == 1).then(|| {
                let (offset, len) = (i * 100, 1000 + i as usize);
                want.extend_from_slice(&content[offset as usize..offset as usize + len]);
                FileRange {
                    file: f.clone(),
                    offset,
                    len,
                }
            });
            q.push(Outgoing {
                file,
                ..Outgoing::head(head)
            });
        }
        assert_eq!(q.bytes, want.len());
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut sink = Slow(std::io::Cursor::new(Vec::new()));
        assert!(matches!(
            q.poll_write(&mut sink, &mut cx),
            Poll::Ready(Ok(()))
        ));
        assert!(q.is_empty());
        assert_eq!(q.bytes, 0);
        assert!(sink.0.get_ref() == &want);

        // Past the end of the file.
        q.push(Outgoing {
            file: Some(FileRange {
                file: f.clone(),
                offset: 4990,
                len: 20,
            }),
            ..Outgoing::head(simple_reply(9, None))
        });
        let res = q.poll_write(&mut sink, &mut cx);
        assert!(
            matches!(&res, Poll::Ready(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof),
            "{res:?}"
        );
    }

    /// Partial writes: replies leave the queue only once fully written,
    /// their buffers go back to the pool, and the bytes written are the
    /// replies' bytes in order.
    #[test]
    fn out_queue_partial_writes() {
        let mut q = OutQueue::default();
        let mut want = Vec::new();
        for i in 0..5u8 {
            let head = simple_reply(u64::from(i), None);
            want.extend_from_slice(head.as_slice());
            let data = (i % 2 == 0).then(|| {
                let d = BytesMut::from(&[i; 1000][..]).freeze();
                want.extend_from_slice(&d);
                d
            });
            q.push(Outgoing {
                more: Vec::new(),
                file: None,
                head,
                data,
                held: 0,
            });
        }
        assert_eq!(q.bytes, want.len());
        let mut w = Slow(std::io::Cursor::new(Vec::new()));
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let res = q.poll_write(&mut w, &mut cx);
        assert!(matches!(res, Poll::Ready(Ok(()))));
        assert!(q.is_empty());
        assert_eq!(q.bytes, 0);
        assert_eq!(w.0.into_inner(), want);
        assert_eq!(q.pool.free.len(), 3, "payload buffers returned");
    }
}
