//! The async transport: one [`Connection`] multiplexes many devices and
//! transactions over any `AsyncRead + AsyncWrite` byte stream (TCP, Unix
//! socket, TLS stream, `tokio::io::duplex`).
//!
//! # Model
//!
//! * [`Connection::connect`] (or [`Connection::from_split`]) runs the
//!   handshake and spawns two tasks: a **reader** that decodes frames and
//!   routes them, and a **writer** that drains an outgoing queue.
//! * **Requests** ([`Connection::request`] and its typed helpers) get a fresh
//!   transaction id; the response with that id completes the call. An
//!   [`Message::Error`] reply becomes [`Error::Remote`] with its reason code.
//! * **Incoming requests and notices** are routed to a bounded queue per
//!   `(device, kind)`, consumed through [`Connection::incoming`]. Queues are
//!   created on first use by either side, so frames that arrive before their
//!   consumer subscribes wait for it.
//! * **No kind can stall the connection.** The reader never waits for a
//!   consumer: when a queue is full, a request is answered at once with
//!   [`ErrorCode::Busy`] and a notice is dropped (and counted in
//!   [`MetricsSnapshot::dropped_notices`]); when the consumer has gone away
//!   ([`Incoming`] dropped), requests are answered with
//!   [`ErrorCode::Unhandled`]. A well-behaved sender never sees `Busy`: it
//!   keeps at most the peer's announced `queue_depth` requests of one
//!   `(device, kind)` outstanding (credit-based flow control), so a slow
//!   consumer slows its own sender, not the connection.
//! * A [`Request`] dropped without a reply answers itself with
//!   [`ErrorCode::Unhandled`], so the peer never waits forever.
//!   [`Connection::close_device`] ends a device on the connection: what is
//!   queued unclaimed is answered `Unhandled`, later requests
//!   [`ErrorCode::UnknownDevice`]. A request for a device nobody ever
//!   consumes waits in its queue (it may be claimed later); use
//!   [`Config::request_timeout`] on the sender to bound that wait.
//! * **Writer.** Outgoing frames wait in two FIFO queues, urgent and bulk;
//!   urgent frames (need-at, priority block data, control messages) overtake
//!   every bulk frame not yet written. Small frames are coalesced into one
//!   write; large payloads go out with vectored writes, never copied. Each
//!   queue holds at most [`Config::write_budget`] bytes: senders wait for room
//!   (backpressure).
//! * **Failure.** When the stream fails, the peer closes it, a protocol error
//!   is detected, [`Connection::close`] is called or every handle is dropped,
//!   every pending request, every sender waiting for room or credit and every
//!   [`Incoming::recv`] fails promptly with [`Error::ConnectionClosed`].
//!
//! Ordering: frames of one priority are written in the order they were
//! queued; an urgent frame may be written before an earlier bulk frame. Where
//! order matters across kinds, wait for the acknowledgement (dirty lists and
//! events are acknowledged for this reason).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io::IoSlice;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};

use crate::compress::Compression;
use crate::error::{EncodeError, Error};
use crate::frame::{Class, Frame, FrameDecoder, Kind, Limits, DEFAULT_MAX_FRAME, HEADER_LEN};
use crate::handshake::{negotiate, Features, Hello, Negotiated, HELLO_LEN};
use crate::message::{ErrorCode, ErrorResponse, Message, ReadAt, WriteAt};

/// Writer priority of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Priority {
    /// Written before any queued bulk frame (need-at, blocks the destination
    /// asked for, control messages and their replies).
    Urgent,
    /// Bulk data (the background copy).
    Bulk,
}

impl Priority {
    /// The usual priority of a message: bulk for write-at and read data,
    /// urgent for everything else (small control traffic).
    pub fn default_for(msg: &Message) -> Priority {
        match msg {
            Message::WriteAt(_) | Message::ReadAtData(_) => Priority::Bulk,
            _ => Priority::Urgent,
        }
    }
}

/// Transport configuration.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// Largest frame body we accept (announced in the handshake). Default 64 MiB.
    pub max_frame: u32,
    /// Features we offer. Default: all.
    pub features: Features,
    /// Incoming requests (and notices) queued per `(device, kind)` before
    /// requests are answered `Busy` and notices dropped. Announced in the
    /// handshake. Default 256.
    pub queue_depth: u32,
    /// Bytes of outgoing frames each priority queue holds before senders
    /// wait. Default 32 MiB.
    pub write_budget: usize,
    /// Frames whose payload is at most this many bytes are copied into the
    /// coalescing buffer; larger payloads are written vectored. Default 16 KiB.
    pub coalesce_below: usize,
    /// Largest batch the writer assembles before writing. Default 256 KiB.
    pub batch_bytes: usize,
    /// Optional deadline for each request's response. Default none.
    pub request_timeout: Option<Duration>,
    /// Deadline for the peer's hello. Default 10 s.
    pub handshake_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_frame: DEFAULT_MAX_FRAME,
            features: Features::ALL,
            queue_depth: 256,
            write_budget: 32 << 20,
            coalesce_below: 16 << 10,
            batch_bytes: 256 << 10,
            request_timeout: None,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

impl Config {
    /// Sets the frame limit.
    pub fn with_max_frame(mut self, max_frame: u32) -> Self {
        self.max_frame = max_frame;
        self
    }
    /// Sets the offered features.
    pub fn with_features(mut self, features: Features) -> Self {
        self.features = features;
        self
    }
    /// Sets the per-(device, kind) queue depth.
    pub fn with_queue_depth(mut self, depth: u32) -> Self {
        self.queue_depth = depth.max(1);
        self
    }
    /// Sets the per-priority outgoing byte budget.
    pub fn with_write_budget(mut self, bytes: usize) -> Self {
        self.write_budget = bytes.max(1);
        self
    }
    /// Sets a request timeout.
    pub fn with_request_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.request_timeout = timeout;
        self
    }
}

const KINDS: usize = 16;

/// Largest step the receive buffer grows by before more bytes arrived.
const INITIAL_BODY: usize = 2 << 20;
/// Smallest read the reader asks for.
const READ_CHUNK: usize = 64 << 10;
/// Size of a receive buffer (several frames are cut from each).
const RECV_BUFFER: usize = 2 << 20;
/// Receive buffers kept for reuse while frames cut from them are in use.
const RECV_POOL: usize = 32;
/// Frame bodies at least this large are read into an allocation of their
/// own (exactly the body), so the block they carry can be kept as it is by
/// a provider (a memory device adopts it) without pinning other frames.
const DEDICATED_BODY: usize = 256 << 10;

/// How long a closed connection keeps trying to write what was queued.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

fn kind_index(kind: Kind) -> usize {
    Kind::ALL.iter().position(|k| *k == kind).unwrap_or(0) % KINDS
}

#[derive(Default)]
struct KindCounters {
    frames_in: AtomicU64,
    bytes_in: AtomicU64,
    frames_out: AtomicU64,
    bytes_out: AtomicU64,
}

/// Live counters of a connection (cheap atomics; see [`Metrics::snapshot`]).
#[derive(Default)]
pub struct Metrics {
    kinds: [KindCounters; KINDS],
    busy_replies: AtomicU64,
    unhandled_replies: AtomicU64,
    dropped_notices: AtomicU64,
    malformed_in: AtomicU64,
    orphan_responses: AtomicU64,
    writes: AtomicU64,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.snapshot().fmt(f)
    }
}

/// Frames and bytes (header included) of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KindStats {
    /// Frames received.
    pub frames_in: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// Frames sent.
    pub frames_out: u64,
    /// Bytes sent.
    pub bytes_out: u64,
}

/// A point-in-time copy of [`Metrics`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MetricsSnapshot {
    /// Per kind (only kinds with traffic).
    pub kinds: Vec<(Kind, KindStats)>,
    /// Requests answered `Busy` because their queue was full.
    pub busy_replies: u64,
    /// Requests answered `Unhandled` (consumer gone, or dropped unanswered).
    pub unhandled_replies: u64,
    /// Notices dropped because their queue was full or had no consumer.
    pub dropped_notices: u64,
    /// Incoming frames whose body failed to decode.
    pub malformed_in: u64,
    /// Responses nobody waited for (timed-out or cancelled requests).
    pub orphan_responses: u64,
    /// Write calls made by the writer (batches).
    pub writes: u64,
}

impl MetricsSnapshot {
    /// Stats of one kind.
    pub fn kind(&self, kind: Kind) -> KindStats {
        self.kinds
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, s)| *s)
            .unwrap_or_default()
    }
    /// Totals over every kind.
    pub fn total(&self) -> KindStats {
        self.kinds
            .iter()
            .fold(KindStats::default(), |mut t, (_, s)| {
                t.frames_in += s.frames_in;
                t.bytes_in += s.bytes_in;
                t.frames_out += s.frames_out;
                t.bytes_out += s.bytes_out;
                t
            })
    }
}

impl Metrics {
    /// Copies the counters.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let kinds = Kind::ALL
            .iter()
            .map(|k| {
                let c = &self.kinds[kind_index(*k)];
                (
                    *k,
                    KindStats {
                        frames_in: l(&c.frames_in),
                        bytes_in: l(&c.bytes_in),
                        frames_out: l(&c.frames_out),
                        bytes_out: l(&c.bytes_out),
                    },
                )
            })
            .filter(|(_, s)| *s != KindStats::default())
            .collect();
        MetricsSnapshot {
            kinds,
            busy_replies: l(&self.busy_replies),
            unhandled_replies: l(&self.unhandled_replies),
            dropped_notices: l(&self.dropped_notices),
            malformed_in: l(&self.malformed_in),
            orphan_responses: l(&self.orphan_responses),
            writes: l(&self.writes),
        }
    }
}

struct OutFrame {
    head: Bytes,
    tail: Bytes,
    kind: Kind,
    _permit: Option<OwnedSemaphorePermit>,
}

#[derive(Default)]
struct OutQueues {
    urgent: VecDeque<OutFrame>,
    bulk: VecDeque<OutFrame>,
}

struct PendingEntry {
    device: u32,
    tx: oneshot::Sender<Result<Message, Error>>,
}

#[derive(Default)]
struct PendingMap {
    closed: Option<Arc<str>>,
    map: HashMap<u32, PendingEntry>,
}

struct QueueSlot {
    tx: mpsc::Sender<Request>,
    rx: Option<mpsc::Receiver<Request>>,
}

struct Shared {
    config: Config,
    negotiated: Negotiated,
    limits_in: Limits,
    limits_out: Limits,
    next_txid: AtomicU32,
    pending: Mutex<PendingMap>,
    queues: Mutex<Option<HashMap<(u32, Kind), QueueSlot>>>,
    /// Devices closed with [`Connection::close_device`] (lock after `queues`).
    closed_devices: Mutex<std::collections::HashSet<u32>>,
    /// Devices whose big frames get an allocation of their own
    /// ([`Connection::receive_big_blocks_apart`]).
    apart: Mutex<std::collections::HashSet<u32>>,
    credits: Mutex<HashMap<(u32, Kind), Arc<Semaphore>>>,
    out: Mutex<OutQueues>,
    out_notify: Notify,
    budget_urgent: Arc<Semaphore>,
    budget_bulk: Arc<Semaphore>,
    budget_total: u32,
    closed_tx: watch::Sender<Option<Arc<str>>>,
    reader_abort: Mutex<Option<tokio::task::AbortHandle>>,
    drain_on_close: std::sync::atomic::AtomicBool,
    metrics: Metrics,
}

impl Shared {
    fn close_reason(&self) -> Option<Arc<str>> {
        self.closed_tx.borrow().clone()
    }

    fn closed_error(&self) -> Error {
        Error::ConnectionClosed(self.close_reason().unwrap_or_else(|| Arc::from("closed")))
    }

    /// Resolves once the connection is closed.
    fn wait_closed(&self) -> impl Future<Output = Error> + Send + 'static {
        let mut rx = self.closed_tx.subscribe();
        async move {
            let reason = match rx.wait_for(|c| c.is_some()).await {
                Ok(r) => r.clone().unwrap_or_else(|| Arc::from("closed")),
                Err(_) => Arc::from("closed"),
            };
            Error::ConnectionClosed(reason)
        }
    }

    /// Closes the connection: fails every waiter, ends both tasks.
    fn close(&self, reason: &str) {
        let reason: Arc<str> = Arc::from(reason);
        let first = self.closed_tx.send_if_modified(|c| {
            if c.is_none() {
                *c = Some(reason.clone());
                true
            } else {
                false
            }
        });
        if !first {
            return;
        }
        tracing::debug!(%reason, "silo-protocol connection closed");
        let pending = {
            let mut p = self.pending.lock();
            p.closed = Some(reason.clone());
            std::mem::take(&mut p.map)
        };
        for (_, e) in pending {
            let _ = e.tx.send(Err(Error::ConnectionClosed(reason.clone())));
        }
        // Dropping the senders ends every Incoming once it has drained.
        drop(self.queues.lock().take());
        self.budget_urgent.close();
        self.budget_bulk.close();
        for s in self.credits.lock().values() {
            s.close();
        }
        self.out_notify.notify_one();
        if let Some(a) = self.reader_abort.lock().take() {
            a.abort();
        }
    }

    fn count_out(&self, kind: Kind, bytes: usize) {
        let c = &self.metrics.kinds[kind_index(kind)];
        c.frames_out.fetch_add(1, Ordering::Relaxed);
        c.bytes_out.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    fn encode(
        &self,
        device: u32,
        txid: u32,
        message: &Message,
    ) -> Result<(Bytes, Bytes), EncodeError> {
        let mut head = BytesMut::with_capacity(64);
        let tail = Frame::encode_parts(device, txid, message, &mut head, &self.limits_out)?;
        Ok((head.freeze(), tail))
    }

    fn push(
        &self,
        (head, tail): (Bytes, Bytes),
        kind: Kind,
        permit: Option<OwnedSemaphorePermit>,
        priority: Priority,
    ) -> Result<(), Error> {
        if self.close_reason().is_some() {
            return Err(self.closed_error());
        }
        let frame = OutFrame {
            head,
            tail,
            kind,
            _permit: permit,
        };
        {
            let mut q = self.out.lock();
            match priority {
                Priority::Urgent => q.urgent.push_back(frame),
                Priority::Bulk => q.bulk.push_back(frame),
            }
        }
        self.out_notify.notify_one();
        Ok(())
    }

    /// Takes `n` permits, failing when the connection closes meanwhile.
    async fn acquire(&self, sem: &Arc<Semaphore>, n: u32) -> Result<OwnedSemaphorePermit, Error> {
        if let Ok(p) = sem.clone().try_acquire_many_owned(n) {
            return Ok(p);
        }
        let closed = self.wait_closed();
        tokio::select! {
            p = sem.clone().acquire_many_owned(n) => p.map_err(|_| self.closed_error()),
            e = closed => Err(e),
        }
    }

    /// Queues a frame, waiting for room in the priority's byte budget.
    async fn enqueue(
        &self,
        device: u32,
        txid: u32,
        message: &Message,
        priority: Priority,
    ) -> Result<(), Error> {
        let parts = self.encode(device, txid, message)?;
        let size = (parts.0.len() + parts.1.len()).min(self.budget_total as usize) as u32;
        let budget = match priority {
            Priority::Urgent => &self.budget_urgent,
            Priority::Bulk => &self.budget_bulk,
        };
        let permit = self.acquire(budget, size).await?;
        self.push(parts, message.kind(), Some(permit), priority)
    }

    /// Queues a frame without waiting (small control replies, drop paths).
    fn enqueue_nowait(
        &self,
        device: u32,
        txid: u32,
        message: &Message,
        priority: Priority,
    ) -> Result<(), Error> {
        let parts = self.encode(device, txid, message)?;
        self.push(parts, message.kind(), None, priority)
    }

    fn reply_error(&self, device: u32, txid: u32, code: ErrorCode, text: String) {
        let msg = Message::Error(ErrorResponse::new(code, text));
        let _ = self.enqueue_nowait(device, txid, &msg, Priority::Urgent);
    }

    fn credits(&self, device: u32, kind: Kind) -> Arc<Semaphore> {
        self.credits
            .lock()
            .entry((device, kind))
            .or_insert_with(|| Arc::new(Semaphore::new(self.negotiated.peer_queue_depth as usize)))
            .clone()
    }

    fn check_negotiated(&self, msg: &Message) -> Result<(), String> {
        let need = match msg {
            Message::WriteAt(w) => w.encoding.feature(),
            Message::WriteAtHash(_) | Message::AlternateSources(_) => Features::HASH_WRITES,
            Message::YouAlreadyHave(_) => Features::YOU_ALREADY_HAVE,
            _ => Features::empty(),
        };
        if self.negotiated.features.contains(need) {
            Ok(())
        } else {
            Err(format!(
                "{} needs a feature that was not negotiated",
                msg.kind()
            ))
        }
    }
}

/// Closes the connection when the last user handle goes away.
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.drain_on_close.store(true, Ordering::Relaxed);
        self.shared
            .close("every handle of the connection was dropped");
    }
}

/// One multiplexed protocol connection. Cheap to clone; the connection closes
/// when [`Connection::close`] is called, the stream fails, or the last clone
/// (including those held by [`Incoming`] and [`Request`]) is dropped.
#[derive(Clone)]
pub struct Connection {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("negotiated", &self.shared().negotiated)
            .field("closed", &self.shared().close_reason())
            .finish()
    }
}

impl Connection {
    fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    /// Runs the handshake over `io` and starts the connection. Must be called
    /// inside a tokio runtime. For TCP, set `TCP_NODELAY` first and prefer
    /// [`Connection::from_split`] with `into_split()` halves.
    pub async fn connect<S>(io: S, config: Config) -> Result<Connection, Error>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(io);
        Connection::from_split(r, w, config).await
    }

    /// [`Connection::connect`] for a TCP stream: sets `TCP_NODELAY` and uses
    /// the stream's owned halves (no lock between reader and writer).
    pub async fn connect_tcp(
        stream: tokio::net::TcpStream,
        config: Config,
    ) -> Result<Connection, Error> {
        stream.set_nodelay(true).map_err(|e| Error::Io {
            context: "setting TCP_NODELAY",
            message: e.to_string(),
        })?;
        let (r, w) = stream.into_split();
        Connection::from_split(r, w, config).await
    }

    /// Like [`Connection::connect`] with separate read and write halves.
    pub async fn from_split<R, W>(
        mut reader: R,
        mut writer: W,
        config: Config,
    ) -> Result<Connection, Error>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let ours = Hello::new(config.features, config.max_frame, config.queue_depth.max(1));
        let io_err = |context: &'static str| {
            move |e: std::io::Error| Error::Io {
                context,
                message: e.to_string(),
            }
        };
        let exchange = async {
            writer
                .write_all(&ours.encode())
                .await
                .map_err(io_err("sending hello"))?;
            writer.flush().await.map_err(io_err("sending hello"))?;
            let mut buf = [0u8; HELLO_LEN];
            // Read the magic first so a non-silo peer fails fast and clearly.
            reader
                .read_exact(&mut buf[..8])
                .await
                .map_err(io_err("reading hello"))?;
            if buf[..8] != crate::handshake::MAGIC {
                let mut magic = [0u8; 8];
                magic.copy_from_slice(&buf[..8]);
                return Err(Error::Handshake(crate::error::HandshakeError::BadMagic(
                    magic,
                )));
            }
            reader
                .read_exact(&mut buf[8..])
                .await
                .map_err(io_err("reading hello"))?;
            Ok::<_, Error>(Hello::decode(&buf)?)
        };
        let theirs = tokio::time::timeout(config.handshake_timeout, exchange)
            .await
            .map_err(|_| Error::Io {
                context: "handshake",
                message: format!(
                    "no hello from the peer within {:?}",
                    config.handshake_timeout
                ),
            })??;
        let negotiated = negotiate(&ours, &theirs)?;
        tracing::debug!(?negotiated, "silo-protocol handshake complete");
        let budget_total = config.write_budget.min(u32::MAX as usize / 2) as u32;
        let (closed_tx, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            limits_in: Limits {
                max_frame: config.max_frame,
            },
            limits_out: Limits {
                max_frame: negotiated.peer_max_frame,
            },
            negotiated,
            next_txid: AtomicU32::new(1),
            pending: Mutex::new(PendingMap::default()),
            queues: Mutex::new(Some(HashMap::new())),
            closed_devices: Mutex::new(std::collections::HashSet::new()),
            apart: Mutex::new(std::collections::HashSet::new()),
            credits: Mutex::new(HashMap::new()),
            out: Mutex::new(OutQueues::default()),
            out_notify: Notify::new(),
            budget_urgent: Arc::new(Semaphore::new(budget_total as usize)),
            budget_bulk: Arc::new(Semaphore::new(budget_total as usize)),
            budget_total,
            closed_tx,
            reader_abort: Mutex::new(None),
            drain_on_close: std::sync::atomic::AtomicBool::new(false),
            metrics: Metrics::default(),
            config,
        });
        let conn = Connection {
            handle: Arc::new(Handle {
                shared: shared.clone(),
            }),
        };
        let reader_task = tokio::spawn(read_loop(shared.clone(), reader));
        *shared.reader_abort.lock() = Some(reader_task.abort_handle());
        if shared.close_reason().is_some() {
            reader_task.abort();
        }
        tokio::spawn(write_loop(shared, writer));
        Ok(conn)
    }

    /// What the handshake agreed on.
    pub fn negotiated(&self) -> Negotiated {
        self.shared().negotiated
    }

    /// The features both sides support.
    pub fn features(&self) -> Features {
        self.shared().negotiated.features
    }

    /// The connection's counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.shared().metrics.snapshot()
    }

    /// True once the connection is closed.
    pub fn is_closed(&self) -> bool {
        self.shared().close_reason().is_some()
    }

    /// Resolves when the connection closes, with the reason.
    pub fn closed(&self) -> impl Future<Output = Error> + Send + 'static {
        self.shared().wait_closed()
    }

    /// Closes the connection: frames already queued are still written, then
    /// the stream is shut down; every waiter fails with
    /// [`Error::ConnectionClosed`].
    pub fn close(&self) {
        self.shared().drain_on_close.store(true, Ordering::Relaxed);
        self.shared().close("closed locally");
    }

    /// Sends a request and waits for its response. Error replies become
    /// [`Error::Remote`]; a reply of the wrong kind [`Error::UnexpectedResponse`].
    pub async fn request(
        &self,
        device: u32,
        message: Message,
        priority: Priority,
    ) -> Result<Message, Error> {
        let shared = self.shared();
        let kind = message.kind();
        if kind.class() != Class::Request {
            return Err(Error::NotAllowed {
                kind: kind.name(),
                reason: "not a request".into(),
            });
        }
        shared
            .check_negotiated(&message)
            .map_err(|reason| Error::NotAllowed {
                kind: kind.name(),
                reason,
            })?;
        // Credit: at most peer_queue_depth outstanding per (device, kind).
        let credits = shared.credits(device, kind);
        let _credit = shared.acquire(&credits, 1).await?;
        let (tx, rx) = oneshot::channel();
        let txid = {
            let mut p = shared.pending.lock();
            if let Some(r) = &p.closed {
                return Err(Error::ConnectionClosed(r.clone()));
            }
            let txid = loop {
                let t = shared.next_txid.fetch_add(1, Ordering::Relaxed);
                if t != 0 && !p.map.contains_key(&t) {
                    break t;
                }
            };
            p.map.insert(txid, PendingEntry { device, tx });
            txid
        };
        let guard = PendingGuard { shared, txid };
        shared.enqueue(device, txid, &message, priority).await?;
        let reply = match shared.config.request_timeout {
            None => rx.await,
            Some(t) => match tokio::time::timeout(t, rx).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(Error::Timeout {
                        device,
                        request: kind.name(),
                        after: t,
                    })
                }
            },
        };
        drop(guard);
        let reply = reply.map_err(|_| shared.closed_error())??;
        let expected = match kind {
            Kind::WriteAt | Kind::WriteAtHash => Kind::WriteAtOk,
            Kind::ReadAt => Kind::ReadAtData,
            _ => Kind::Ack,
        };
        match reply {
            Message::Error(e) => Err(Error::Remote {
                device,
                code: e.code,
                text: e.text,
            }),
            m if m.kind() == expected => Ok(m),
            m => Err(Error::UnexpectedResponse {
                device,
                request: kind.name(),
                got: m.kind().name(),
            }),
        }
    }

    /// Sends a request whose answer is a plain acknowledgement (dirty list,
    /// event, alternate sources, you-already-have).
    pub async fn request_ack(&self, device: u32, message: Message) -> Result<(), Error> {
        let p = Priority::default_for(&message);
        self.request(device, message, p).await.map(|_| ())
    }

    /// Writes `data` at `offset` on the peer's device, compressed under
    /// `compression` with the negotiated encodings, and waits for the reply.
    /// Plain data is sent without copying.
    pub async fn write_at(
        &self,
        device: u32,
        offset: u64,
        data: &Bytes,
        compression: Compression,
        priority: Priority,
    ) -> Result<(), Error> {
        let w = WriteAt::compressed(offset, data, compression, self.features());
        self.send_write(device, w, priority).await
    }

    /// Sends a prepared [`WriteAt`] and checks the acknowledged length.
    pub async fn send_write(
        &self,
        device: u32,
        write: WriteAt,
        priority: Priority,
    ) -> Result<(), Error> {
        let len = write.length;
        match self
            .request(device, Message::WriteAt(write), priority)
            .await?
        {
            Message::WriteAtOk { length } if length == len => Ok(()),
            _ => Err(Error::UnexpectedResponse {
                device,
                request: "write-at",
                got: "write-at-ok with a different length",
            }),
        }
    }

    /// Reads `length` bytes at `offset` from the peer's device.
    pub async fn read_at(
        &self,
        device: u32,
        offset: u64,
        length: u32,
        priority: Priority,
    ) -> Result<Bytes, Error> {
        match self
            .request(device, Message::ReadAt(ReadAt { offset, length }), priority)
            .await?
        {
            Message::ReadAtData(d) if d.len() == length as usize => Ok(d),
            _ => Err(Error::UnexpectedResponse {
                device,
                request: "read-at",
                got: "read-at-data of a different length",
            }),
        }
    }

    /// Sends a notice (no response), waiting for room in the writer queue.
    pub async fn notify(
        &self,
        device: u32,
        message: Message,
        priority: Priority,
    ) -> Result<(), Error> {
        self.check_notice(&message)?;
        self.shared().enqueue(device, 0, &message, priority).await
    }

    /// Sends a notice without waiting for queue room (for synchronous
    /// callbacks such as a waiting cache's need-at hook; notices are small).
    pub fn notify_now(
        &self,
        device: u32,
        message: Message,
        priority: Priority,
    ) -> Result<(), Error> {
        self.check_notice(&message)?;
        self.shared().enqueue_nowait(device, 0, &message, priority)
    }

    fn check_notice(&self, message: &Message) -> Result<(), Error> {
        if message.kind().class() != Class::Notice {
            return Err(Error::NotAllowed {
                kind: message.kind().name(),
                reason: "not a notice (use request or respond)".into(),
            });
        }
        Ok(())
    }

    /// Reads frames of `device` whose body is at least 256 KiB into an
    /// allocation of their own instead of cutting them from a shared
    /// receive buffer, so the block such a frame carries is the only handle
    /// to memory of its own size and a consumer can keep it as it is (a
    /// memory device adopts it without a copy). It costs an allocation per
    /// big frame, which only pays off when the consumer keeps the blocks;
    /// off by default.
    pub fn receive_big_blocks_apart(&self, device: u32, on: bool) {
        let mut apart = self.shared().apart.lock();
        if on {
            apart.insert(device);
        } else {
            apart.remove(&device);
        }
    }

    /// The consumer of requests and notices of `kind` on `device`. Frames
    /// that arrived before this call are delivered first. Only one consumer
    /// per `(device, kind)` may exist.
    pub fn incoming(&self, device: u32, kind: Kind) -> Result<Incoming, Error> {
        if kind.class() == Class::Response {
            return Err(Error::NotAllowed {
                kind: kind.name(),
                reason: "responses are routed to their requests".into(),
            });
        }
        let mut q = self.shared().queues.lock();
        let map = q.as_mut().ok_or_else(|| self.shared().closed_error())?;
        if self.shared().closed_devices.lock().contains(&device) {
            return Err(Error::DeviceClosed { device });
        }
        let depth = self.shared().config.queue_depth.max(1) as usize;
        let slot = map.entry((device, kind)).or_insert_with(|| new_slot(depth));
        let rx = slot.rx.take().ok_or(Error::AlreadyClaimed {
            device,
            kind: kind.name(),
        })?;
        Ok(Incoming {
            rx,
            conn: self.clone(),
            device,
            kind,
        })
    }
}

impl Connection {
    /// Stops accepting frames for `device` on this connection: its queues
    /// are closed (requests still queued and not claimed are answered
    /// `Unhandled`; consumers drain what they hold, then get
    /// [`Error::DeviceClosed`]) and later requests for it are answered
    /// [`ErrorCode::UnknownDevice`], later notices dropped.
    pub fn close_device(&self, device: u32) {
        let removed: Vec<QueueSlot> = {
            let mut q = self.shared().queues.lock();
            self.shared().closed_devices.lock().insert(device);
            match q.as_mut() {
                Some(map) => {
                    let keys: Vec<_> = map.keys().filter(|k| k.0 == device).copied().collect();
                    keys.iter().filter_map(|k| map.remove(k)).collect()
                }
                None => Vec::new(),
            }
        };
        drop(removed);
    }
}

fn new_slot(depth: usize) -> QueueSlot {
    let (tx, rx) = mpsc::channel(depth);
    QueueSlot { tx, rx: Some(rx) }
}

struct PendingGuard<'a> {
    shared: &'a Shared,
    txid: u32,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.pending.lock().map.remove(&self.txid);
    }
}

/// The stream of incoming requests (or notices) of one `(device, kind)`.
pub struct Incoming {
    rx: mpsc::Receiver<Request>,
    conn: Connection,
    device: u32,
    kind: Kind,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("device", &self.device)
            .field("kind", &self.kind)
            .finish()
    }
}

impl Incoming {
    /// The next request; [`Error::ConnectionClosed`] once the connection is
    /// closed and everything queued before has been delivered.
    pub async fn recv(&mut self) -> Result<Request, Error> {
        match self.rx.recv().await {
            Some(r) => Ok(r),
            None if self.conn.is_closed() => Err(self.conn.shared().closed_error()),
            None => Err(Error::DeviceClosed {
                device: self.device,
            }),
        }
    }

    /// The connection this stream belongs to.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}

/// One incoming request or notice. A request must be answered with
/// [`Request::respond`] or [`Request::respond_error`]; if it is dropped
/// unanswered it answers itself with [`ErrorCode::Unhandled`].
pub struct Request {
    /// Device id.
    pub device: u32,
    /// Transaction id (0 for notices).
    pub txid: u32,
    /// The message.
    pub message: Message,
    reply_to: Option<Arc<Shared>>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("device", &self.device)
            .field("txid", &self.txid)
            .field("message", &self.message)
            .finish()
    }
}

impl Request {
    /// The message kind.
    pub fn kind(&self) -> Kind {
        self.message.kind()
    }

    /// True if the peer waits for a response.
    pub fn needs_response(&self) -> bool {
        self.reply_to.is_some()
    }

    /// Answers with `message` at its default priority (see
    /// [`Priority::default_for`]). Notices need no answer: `Ok(())`.
    pub async fn respond(self, message: Message) -> Result<(), Error> {
        let p = Priority::default_for(&message);
        self.respond_with(message, p).await
    }

    /// Answers with `message` at `priority`.
    pub async fn respond_with(mut self, message: Message, priority: Priority) -> Result<(), Error> {
        let Some(shared) = self.reply_to.take() else {
            return Ok(());
        };
        if message.kind().class() != Class::Response {
            return Err(Error::NotAllowed {
                kind: message.kind().name(),
                reason: "not a response".into(),
            });
        }
        shared
            .enqueue(self.device, self.txid, &message, priority)
            .await
    }

    /// Answers with an error response (never waits for queue room).
    pub fn respond_error(mut self, code: ErrorCode, text: impl Into<String>) -> Result<(), Error> {
        let Some(shared) = self.reply_to.take() else {
            return Ok(());
        };
        let msg = Message::Error(ErrorResponse::new(code, text));
        shared.enqueue_nowait(self.device, self.txid, &msg, Priority::Urgent)
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if let Some(shared) = self.reply_to.take() {
            shared
                .metrics
                .unhandled_replies
                .fetch_add(1, Ordering::Relaxed);
            shared.reply_error(
                self.device,
                self.txid,
                ErrorCode::Unhandled,
                format!("{} was dropped without a response", self.message.kind()),
            );
        }
    }
}

async fn read_loop<R: AsyncRead + Unpin + Send + 'static>(shared: Arc<Shared>, reader: R) {
    let reason = match read_frames(&shared, reader).await {
        Ok(()) => "peer closed the connection".to_string(),
        Err(e) => e,
    };
    shared.close(&reason);
}

async fn read_frames<R: AsyncRead + Unpin>(
    shared: &Arc<Shared>,
    mut reader: R,
) -> Result<(), String> {
    // Frames are split off a receive buffer as `Bytes` (no copy). Buffers
    // whose frames are still in use are parked in a small pool and reclaimed
    // once every frame cut from them has been dropped, so steady-state block
    // traffic allocates (and page-faults) nothing.
    let mut decoder = FrameDecoder::new(shared.limits_in);
    let mut buf = BytesMut::with_capacity(RECV_BUFFER);
    let mut pool: Vec<BytesMut> = Vec::new();
    // Whether `buf` is a dedicated allocation for the pending frame's body.
    let mut dedicated = false;
    loop {
        let (header, body) = loop {
            match decoder
                .next_body(&mut buf)
                .map_err(|e| format!("protocol error: {e}"))?
            {
                Some(f) => {
                    if dedicated {
                        // Drop the empty remnant: the body is then the only
                        // handle to its allocation.
                        buf = BytesMut::new();
                        dedicated = false;
                    }
                    break f;
                }
                None if dedicated => {
                    let wanted = decoder.wanted(&buf);
                    let n = reader
                        .read_buf(&mut (&mut buf).limit(wanted))
                        .await
                        .map_err(|e| format!("read failed: {e}"))?;
                    if n == 0 {
                        return Err(stream_ended(&decoder, &buf));
                    }
                }
                None if decoder.pending_header().is_some_and(|h| {
                    h.len as usize >= DEDICATED_BODY && shared.apart.lock().contains(&h.device)
                }) =>
                {
                    // The header is validated, so the body is bounded by our
                    // frame limit; reserving is not touching, so a peer that
                    // never sends the body pins no memory it did not send.
                    let body = decoder.pending_header().map_or(0, |h| h.len as usize);
                    let mut own = BytesMut::with_capacity(body);
                    own.extend_from_slice(&buf); // the body's start, if any
                    retire(&mut pool, std::mem::replace(&mut buf, own));
                    dedicated = true;
                }
                None => {
                    // The header (if any) is validated, so `wanted` is bounded
                    // by our frame limit; grow at most by doubling, so a peer
                    // announcing a big frame without sending it pins little.
                    let wanted = decoder.wanted(&buf);
                    let room = wanted.clamp(READ_CHUNK, INITIAL_BODY.max(buf.len()));
                    make_room(&mut buf, &mut pool, room);
                    // Read at most one chunk past the current frame: when the
                    // next frame does not fit what is left of this buffer, at
                    // most that much is copied into the next one (an
                    // unbounded read would copy up to a whole frame).
                    let limit = wanted.saturating_add(READ_CHUNK);
                    let n = reader
                        .read_buf(&mut (&mut buf).limit(limit))
                        .await
                        .map_err(|e| format!("read failed: {e}"))?;
                    if n == 0 {
                        if decoder.is_idle(&buf) {
                            return Ok(());
                        }
                        return Err(stream_ended(&decoder, &buf));
                    }
                }
            }
        };
        let len = body.len();
        let c = &shared.metrics.kinds[kind_index(header.kind)];
        c.frames_in.fetch_add(1, Ordering::Relaxed);
        c.bytes_in
            .fetch_add((HEADER_LEN + len) as u64, Ordering::Relaxed);
        match Frame::decode_body(&header, body, &shared.limits_in) {
            Ok(frame) => route(shared, header.kind, frame),
            Err(e) => {
                shared.metrics.malformed_in.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(kind = %header.kind, device = header.device, error = %e, "malformed frame");
                match header.kind.class() {
                    Class::Request => shared.reply_error(
                        header.device,
                        header.txid,
                        ErrorCode::Malformed,
                        e.to_string(),
                    ),
                    Class::Response => {
                        let entry = shared.pending.lock().map.remove(&header.txid);
                        if let Some(entry) = entry {
                            let _ = entry.tx.send(Err(Error::Remote {
                                device: header.device,
                                code: ErrorCode::Malformed,
                                text: format!("malformed response: {e}"),
                            }));
                        }
                    }
                    Class::Notice => {
                        shared
                            .metrics
                            .dropped_notices
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

fn route(shared: &Arc<Shared>, kind: Kind, frame: Frame) {
    let Frame {
        device,
        txid,
        message,
    } = frame;
    match kind.class() {
        Class::Response => {
            let entry = {
                let mut p = shared.pending.lock();
                match p.map.get(&txid) {
                    Some(e) if e.device == device => p.map.remove(&txid),
                    _ => None,
                }
            };
            match entry {
                Some(e) => {
                    let _ = e.tx.send(Ok(message));
                }
                None => {
                    shared
                        .metrics
                        .orphan_responses
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        class => {
            let is_request = class == Class::Request;
            if is_request {
                if let Err(reason) = shared.check_negotiated(&message) {
                    shared.reply_error(device, txid, ErrorCode::NotNegotiated, reason);
                    return;
                }
            }
            let req = Request {
                device,
                txid,
                message,
                reply_to: is_request.then(|| shared.clone()),
            };
            let depth = shared.config.queue_depth.max(1) as usize;
            let res = {
                let mut q = shared.queues.lock();
                let Some(map) = q.as_mut() else {
                    return;
                };
                if shared.closed_devices.lock().contains(&device) {
                    drop(q);
                    let mut req = req;
                    req.reply_to = None;
                    if is_request {
                        shared.reply_error(
                            device,
                            txid,
                            ErrorCode::UnknownDevice,
                            format!("device {device} is closed on this connection"),
                        );
                    } else {
                        shared
                            .metrics
                            .dropped_notices
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
                map.entry((device, kind))
                    .or_insert_with(|| new_slot(depth))
                    .tx
                    .try_send(req)
            };
            if let Err(e) = res {
                let (mut req, full) = match e {
                    mpsc::error::TrySendError::Full(r) => (r, true),
                    mpsc::error::TrySendError::Closed(r) => (r, false),
                };
                req.reply_to = None;
                if !is_request {
                    shared
                        .metrics
                        .dropped_notices
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%kind, device, "notice dropped (queue full or unconsumed)");
                } else if full {
                    shared.metrics.busy_replies.fetch_add(1, Ordering::Relaxed);
                    shared.reply_error(
                        device,
                        txid,
                        ErrorCode::Busy,
                        format!("queue for {kind} on device {device} is full"),
                    );
                } else {
                    shared
                        .metrics
                        .unhandled_replies
                        .fetch_add(1, Ordering::Relaxed);
                    shared.reply_error(
                        device,
                        txid,
                        ErrorCode::Unhandled,
                        format!("nobody handles {kind} on device {device}"),
                    );
                }
            }
        }
    }
}

/// The error for a stream that ended inside a frame.
fn stream_ended(decoder: &FrameDecoder, buf: &BytesMut) -> String {
    match decoder.pending_header() {
        Some(h) => format!(
            "stream ended inside a {} frame ({} of {} bytes)",
            h.kind,
            buf.len(),
            h.len
        ),
        None => "stream ended inside a frame header".to_string(),
    }
}

/// Ensures `buf` has `room` spare bytes, preferring to reclaim an allocation
/// whose frames have all been dropped over allocating a new one.
fn make_room(buf: &mut BytesMut, pool: &mut Vec<BytesMut>, room: usize) {
    if buf.try_reclaim(room) {
        return;
    }
    let need = buf.len() + room;
    let reusable = (0..pool.len()).find(|&i| pool[i].try_reclaim(need));
    let next = reusable.map(|i| pool.swap_remove(i));
    let mut next = next.unwrap_or_else(|| BytesMut::with_capacity(need.max(RECV_BUFFER)));
    next.extend_from_slice(buf); // the start of a partial frame, if any
    retire(pool, std::mem::replace(buf, next));
}

/// Parks a receive buffer that was replaced, for reclaiming once the frames
/// cut from it are dropped (an empty remnant has nothing to reclaim).
fn retire(pool: &mut Vec<BytesMut>, mut old: BytesMut) {
    old.clear();
    if pool.len() < RECV_POOL && old.capacity() > 0 {
        pool.push(old);
    }
}

/// Writes `chunks` completely with vectored writes (no copies).
async fn write_chunks<W: AsyncWrite + Unpin>(
    w: &mut W,
    chunks: &mut VecDeque<Bytes>,
) -> std::io::Result<()> {
    while !chunks.is_empty() {
        let n = {
            let mut slices = [IoSlice::new(&[]); 16];
            let mut k = 0;
            for c in chunks.iter().take(16) {
                slices[k] = IoSlice::new(c);
                k += 1;
            }
            w.write_vectored(&slices[..k]).await?
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let mut left = n;
        while left > 0 {
            let Some(front) = chunks.front_mut() else {
                break;
            };
            if left >= front.len() {
                left -= front.len();
                chunks.pop_front();
            } else {
                front.advance(left);
                left = 0;
            }
        }
        while chunks.front().is_some_and(|c| c.is_empty()) {
            chunks.pop_front();
        }
    }
    Ok(())
}

async fn write_loop<W: AsyncWrite + Unpin + Send + 'static>(shared: Arc<Shared>, mut writer: W) {
    let coalesce_below = shared.config.coalesce_below;
    let batch_bytes = shared.config.batch_bytes.max(coalesce_below);
    let mut batch = BytesMut::with_capacity(batch_bytes + 64);
    let mut chunks: VecDeque<Bytes> = VecDeque::new();
    let mut taken: Vec<OutFrame> = Vec::new();
    loop {
        // Gather: urgent first, small frames copied into `batch`, the first
        // large payload ends the batch (so urgent frames get re-checked).
        {
            let mut q = shared.out.lock();
            let mut size = 0usize;
            while size < batch_bytes {
                let Some(f) = q.urgent.pop_front().or_else(|| q.bulk.pop_front()) else {
                    break;
                };
                let big = f.tail.len() > coalesce_below;
                size += f.head.len() + f.tail.len();
                taken.push(f);
                if big {
                    break;
                }
            }
        }
        if !taken.is_empty()
            && shared.close_reason().is_some()
            && !shared.drain_on_close.load(Ordering::Relaxed)
        {
            // Closed by an error: nothing will read what is left.
            taken.clear();
            shared.out.lock().urgent.clear();
            shared.out.lock().bulk.clear();
        }
        if taken.is_empty() {
            if shared.close_reason().is_some() {
                let _ = writer.shutdown().await;
                return;
            }
            shared.out_notify.notified().await;
            continue;
        }
        for f in &taken {
            shared.count_out(f.kind, f.head.len() + f.tail.len());
            if f.tail.len() > coalesce_below {
                if !batch.is_empty() || !f.head.is_empty() {
                    batch.extend_from_slice(&f.head);
                    chunks.push_back(batch.split().freeze());
                }
                chunks.push_back(f.tail.clone());
            } else {
                batch.extend_from_slice(&f.head);
                batch.extend_from_slice(&f.tail);
            }
        }
        if !batch.is_empty() {
            chunks.push_back(batch.split().freeze());
        }
        shared.metrics.writes.fetch_add(1, Ordering::Relaxed);
        // After a close, a peer that stops reading must not keep this task
        // alive forever: the drain gets a grace period.
        let closed = shared.wait_closed();
        let res = tokio::select! {
            r = async {
                write_chunks(&mut writer, &mut chunks).await?;
                writer.flush().await
            } => r,
            _ = async {
                closed.await;
                tokio::time::sleep(CLOSE_GRACE).await;
            } => Err(std::io::Error::other("connection closed and the peer is not reading")),
        };
        taken.clear(); // releases the budget permits
        chunks.clear();
        if batch.capacity() < batch_bytes {
            batch = BytesMut::with_capacity(batch_bytes + 64);
        }
        if let Err(e) = res {
            shared.close(&format!("write failed: {e}"));
            return;
        }
    }
}
