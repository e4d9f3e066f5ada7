//! The async server: accept loops, handshake driver and the transmission
//! loop (one reader, one writer task, one task per request).

use std::future::Future;
use std::io::IoSlice;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::RwLock;
use silo_storage::provider::write_zeroes_by_writing;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::errno::Errno;
use crate::error::{Error, Result};
use crate::export::{Export, ExportInfo, Extent};
use crate::handshake::{Catalog, Handshake, Outcome};
use crate::proto::*;
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
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_in_flight: 64,
            handshake_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
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
                    let (r, w) = stream.into_split();
                    self.spawn_connection(r, w, peer.to_string());
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
                    let (r, w) = stream.into_split();
                    self.spawn_connection(r, w, format!("unix#{n}"));
                }
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    fn spawn_connection<R, W>(&self, r: R, w: W, peer: String)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let inner = self.inner.clone();
        let span = tracing::info_span!("nbd_conn", %peer);
        self.inner.tasks.spawn(
            async move {
                match connection(inner, r, w).await {
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
        connection(self.inner.clone(), r, w).await
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
            false,
            false,
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
                if let Err(e) = transmission(inner, export, r, w, buf, false, false).await {
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

async fn connection<R, W>(inner: Arc<Inner>, mut r: R, mut w: W) -> Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
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
        negotiated.structured,
        negotiated.base_allocation,
    )
    .await
}

/// Read buffers of one connection, reused once their reply is written:
/// no allocation, page faults or zero-filling per read on the hot path.
/// Holds at most [`BufPool::MAX_BYTES`], buffers up to [`BufPool::MAX_BUF`].
#[derive(Default)]
struct BufPool {
    free: parking_lot::Mutex<(Vec<BytesMut>, usize)>,
}

impl BufPool {
    const MAX_BYTES: usize = 16 << 20;
    const MAX_BUF: usize = 4 << 20;

    /// A buffer of exactly `len` initialised bytes (contents unspecified:
    /// providers overwrite all of it, and on error it is not sent).
    fn get(&self, len: usize) -> BytesMut {
        let reused = {
            let mut free = self.free.lock();
            match free.0.iter().position(|b| b.capacity() >= len) {
                Some(i) => {
                    let b = free.0.swap_remove(i);
                    free.1 -= b.capacity();
                    Some(b)
                }
                None => None,
            }
        };
        match reused {
            Some(mut b) => {
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
    fn put(&self, data: Bytes) {
        if data.len() > Self::MAX_BUF || data.is_empty() {
            return;
        }
        let Ok(b) = data.try_into_mut() else {
            return;
        };
        let mut free = self.free.lock();
        if free.1 + b.capacity() <= Self::MAX_BYTES {
            free.1 += b.capacity();
            free.0.push(b);
        }
    }
}

/// A reply queued for the writer: header, optional payload, and the
/// in-flight permit released once it is written.
struct Outgoing {
    head: ReplyHead,
    data: Option<Bytes>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Outgoing {
    fn head(head: ReplyHead) -> Outgoing {
        Outgoing {
            head,
            data: None,
            _permit: None,
        }
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

async fn transmission<R, W>(
    inner: Arc<Inner>,
    export: Arc<Export>,
    mut r: R,
    w: W,
    mut buf: BytesMut,
    structured: bool,
    base_allocation: bool,
) -> Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let metrics = export.metrics.clone();
    let _conn = Gauge::inc(&metrics.connections);
    metrics.connections_total.fetch_add(1, Ordering::Relaxed);
    let max_in_flight = inner.config.max_in_flight.max(1);
    let permits = Arc::new(Semaphore::new(max_in_flight));
    let (tx, rx) = mpsc::unbounded_channel::<Outgoing>();
    let writer_dead = CancellationToken::new();
    let pool = Arc::new(BufPool::default());
    let mut writer = tokio::spawn(writer_loop(w, rx, writer_dead.clone(), pool.clone()));
    let mut decoder = RequestDecoder::new(&export.info);
    let mut draining = false;

    let result: Result<()> = loop {
        let req = match decoder.decode(&mut buf) {
            Ok(req) => req,
            Err(e) => {
                warn!(error = %e, export = %export.info.name, "malformed request, closing connection");
                break Err(e.into());
            }
        };
        if let Some(req) = req {
            let (kind, cookie) = (req.header.kind, req.header.cookie);
            if kind == crate::proto::CMD_DISC {
                debug!("client sent NBD_CMD_DISC");
                break Ok(());
            }
            // Every reply, error replies included, holds a permit until it
            // is written: a client that sends without reading stalls here
            // instead of growing the reply queue.
            let permit = tokio::select! {
                biased;
                p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
                // Stuck behind unwritten replies: shutdown or a dead writer
                // ends the connection (the drain below is bounded).
                _ = inner.shutdown.cancelled() => break Ok(()),
                _ = writer_dead.cancelled() => break Ok(()),
            };
            let refuse = |errno, permit| Outgoing {
                head: error_reply(cookie, kind, structured, errno),
                data: None,
                _permit: Some(permit),
            };
            if draining {
                let _ = tx.send(refuse(Errno::Shutdown, permit));
                continue;
            }
            match validate(req, &export.info, structured, base_allocation) {
                Ok(Command::Disconnect) => unreachable!("handled above"),
                Err(errno) => {
                    metrics.errors.fetch_add(1, Ordering::Relaxed);
                    debug!(kind, cookie, %errno, "request refused");
                    let _ = tx.send(refuse(errno, permit));
                }
                Ok(cmd) => {
                    let export = export.clone();
                    let pool = pool.clone();
                    let mut fut = Box::pin(async move {
                        let mut out = execute(&export, &pool, cmd, cookie, kind, structured).await;
                        out._permit = Some(permit);
                        out
                    });
                    // Poll once right here: a provider that answers without
                    // waiting (memory, cached data) costs no task hop; one
                    // that has to wait continues on its own task, so it
                    // never holds up the requests behind it.
                    match std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
                        Poll::Ready(out) => {
                            let _ = tx.send(out);
                        }
                        Poll::Pending => {
                            let tx = tx.clone();
                            tokio::spawn(async move {
                                let _ = tx.send(fut.await);
                            });
                        }
                    }
                }
            }
            continue;
        }
        if draining {
            break Ok(());
        }
        // Room for the rest of the current request (so a large WRITE
        // payload lands in one allocation and is never copied again), and
        // at least 64 KiB so small requests are read in batches.
        let need = decoder
            .wanted(&buf)
            .saturating_sub(buf.len())
            .max(64 * 1024);
        if buf.capacity() - buf.len() < need {
            buf.reserve(need);
        }
        tokio::select! {
            biased;
            _ = inner.shutdown.cancelled() => {
                // Answer what is already buffered with ESHUTDOWN, then close.
                draining = true;
            }
            _ = writer_dead.cancelled() => break Ok(()),
            n = r.read_buf(&mut buf) => match n {
                Ok(0) => {
                    if !buf.is_empty() {
                        debug!(left = buf.len(), "client disconnected mid-request");
                    }
                    break Ok(());
                }
                Ok(_) => {}
                Err(e) => break Err(Error::Io { context: "read request", source: e }),
            },
        }
    };
    // Drain: every in-flight request finishes and its reply is written,
    // within the configured grace period (a client that stopped reading
    // must not hold the server up forever).
    let drain = async {
        let _all = permits
            .acquire_many(max_in_flight as u32)
            .await
            .expect("semaphore never closed");
        drop(tx);
        (&mut writer).await
    };
    match tokio::time::timeout(inner.config.drain_timeout, drain).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => debug!(error = %e, "reply writer failed"),
        Ok(Err(e)) => warn!(error = %e, "reply writer panicked"),
        Err(_) => {
            warn!(timeout = ?inner.config.drain_timeout, "in-flight requests not drained in time, closing");
            writer.abort();
        }
    }
    result
}

async fn writer_loop<W>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    dead: CancellationToken,
    pool: Arc<BufPool>,
) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    const BATCH: usize = 64;
    let mut batch: Vec<Outgoing> = Vec::with_capacity(BATCH);
    let res = async {
        while let Some(first) = rx.recv().await {
            batch.push(first);
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(o) => batch.push(o),
                    Err(_) => break,
                }
            }
            let mut parts: Vec<&[u8]> = Vec::with_capacity(batch.len() * 2);
            for o in &batch {
                parts.push(o.head.as_slice());
                if let Some(d) = &o.data {
                    parts.push(d);
                }
            }
            write_all_vectored(&mut w, &mut parts).await?;
            for o in batch.drain(..) {
                if let Some(d) = o.data {
                    pool.put(d);
                }
            }
        }
        w.flush().await?;
        w.shutdown().await
    }
    .await;
    if res.is_err() {
        dead.cancel();
    }
    res
}

/// Writes every part with as few `writev` calls as possible.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    parts: &mut [&[u8]],
) -> std::io::Result<()> {
    let mut idx = 0;
    while idx < parts.len() && parts[idx].is_empty() {
        idx += 1;
    }
    while idx < parts.len() {
        let slices: Vec<IoSlice<'_>> = parts[idx..]
            .iter()
            .take(512)
            .map(|p| IoSlice::new(p))
            .collect();
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let len = parts[idx].len();
            if n >= len {
                n -= len;
                idx += 1;
            } else {
                parts[idx] = &parts[idx][n..];
                n = 0;
            }
        }
        while idx < parts.len() && parts[idx].is_empty() {
            idx += 1;
        }
    }
    Ok(())
}

/// Runs one validated command against the provider and builds its reply.
async fn execute(
    export: &Export,
    pool: &BufPool,
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
                let buf = p.read_at(offset, pool.get(len as usize)).await?;
                m.reads.fetch_add(1, Ordering::Relaxed);
                m.bytes_read.fetch_add(u64::from(len), Ordering::Relaxed);
                let head = if !structured {
                    simple_reply(cookie, None)
                } else if len == 0 {
                    structured_done(cookie)
                } else {
                    read_data_header(cookie, offset, len)
                };
                Ok(Outgoing {
                    head,
                    data: Some(buf.freeze()),
                    _permit: None,
                })
            }
            Command::Write { offset, data, fua } => {
                let len = data.len() as u64;
                p.write_at(offset, data).await?;
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
                let mut buf = pool.get(CHUNK.min(u64::from(len)) as usize);
                while done < u64::from(len) {
                    let n = (u64::from(len) - done).min(CHUNK) as usize;
                    buf.resize(n, 0);
                    buf = p.read_at(offset + done, buf).await?;
                    done += n as u64;
                }
                pool.put(buf.freeze());
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
                    _permit: None,
                })
            }
            Command::Disconnect => Ok(ok()),
        }
    }
    .await;
    match res {
        Ok(out) => out,
        Err(e) => {
            m.errors.fetch_add(1, Ordering::Relaxed);
            let errno = Errno::from_storage(&e, write);
            if errno == Errno::Io {
                warn!(error = %e, %errno, "provider I/O error");
            } else {
                debug!(error = %e, %errno, "request failed");
            }
            Outgoing::head(error_reply(cookie, kind, structured, errno))
        }
    }
}

/// A structured reply with no data (`NONE` chunk, `DONE`), for zero-length reads.
fn structured_done(cookie: u64) -> ReplyHead {
    crate::transmission::structured_none(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_pool_reuses_and_stays_bounded() {
        let pool = BufPool::default();
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
        assert!(pool.free.lock().1 <= BufPool::MAX_BYTES);
    }
}
