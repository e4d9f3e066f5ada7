//! Bridges between `silo-storage` providers and a [`Connection`] (feature
//! `storage`).
//!
//! * [`ToProtocol`] (source side): a [`Provider`] for one device whose writes
//!   become write-at requests (compressed, or write-at-hash when the block is
//!   in the alternate sources with the same SHA-256) and whose reads become
//!   read-at requests; plus senders for device info, dirty lists, events,
//!   alternate sources, you-already-have and remove-device, and the streams
//!   of need-at / don't-need-at hints coming back.
//! * [`FromProtocol`] (destination side): applies the requests received for
//!   one device to a local provider (typically the remote half of a waiting
//!   cache) and replies; sends need-at / don't-need-at upstream. Every
//!   provider error is replied as an error response with its reason code and
//!   serving continues.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use silo_storage::{check_range, Capabilities, DynProvider, ErrorKind, Op, Provider};
use tokio::sync::Semaphore;

use crate::compress::{Compression, Encoding};
use crate::error::Error;
use crate::frame::Kind;
use crate::message::{
    AlternateSource, BlockList, DeviceInfo, ErrorCode, ErrorResponse, Event, HashLocation, Message,
    Range, WriteAt, WriteAtHash,
};
use crate::transport::{Connection, Incoming, Priority, Request};

/// Room left in a frame for headers when chunking large reads/writes.
const FRAME_SLACK: u32 = 64;

/// The wire reason code for a storage error.
pub fn error_code(kind: ErrorKind) -> ErrorCode {
    match kind {
        ErrorKind::OutOfRange => ErrorCode::OutOfRange,
        ErrorKind::Io => ErrorCode::Io,
        ErrorKind::ReadOnly => ErrorCode::ReadOnly,
        ErrorKind::Unsupported => ErrorCode::Unsupported,
        ErrorKind::Closed => ErrorCode::Closed,
        ErrorKind::Cancelled => ErrorCode::Cancelled,
        ErrorKind::Timeout => ErrorCode::Timeout,
        ErrorKind::Corrupt => ErrorCode::Corrupt,
        ErrorKind::Invalid => ErrorCode::Invalid,
        ErrorKind::OutOfSpace => ErrorCode::OutOfSpace,
        _ => ErrorCode::Remote,
    }
}

fn to_storage(context: String, e: Error) -> silo_storage::Error {
    silo_storage::Error::remote(context, e)
}

/// Counters of a [`ToProtocol`].
#[derive(Debug, Default)]
pub struct ToProtocolMetrics {
    /// Write-at requests sent.
    pub writes: AtomicU64,
    /// Bytes of block data written (before compression).
    pub write_bytes: AtomicU64,
    /// Bytes of payload actually sent for those writes.
    pub wire_bytes: AtomicU64,
    /// Writes sent as write-at-hash.
    pub hash_writes: AtomicU64,
    /// Read-at requests sent.
    pub reads: AtomicU64,
}

/// Source side: a [`Provider`] that sends everything to one device of the
/// peer. Cheap to share (`Arc`); clones of the connection may serve other
/// devices at the same time.
#[derive(Debug)]
pub struct ToProtocol {
    conn: Connection,
    device: u32,
    size: u64,
    compression: Mutex<Compression>,
    alt_sources: Mutex<HashMap<(u64, u64), [u8; 32]>>,
    metrics: ToProtocolMetrics,
}

impl ToProtocol {
    /// A provider of `size` bytes that writes to `device` over `conn`.
    pub fn new(conn: Connection, device: u32, size: u64) -> ToProtocol {
        ToProtocol {
            conn,
            device,
            size,
            compression: Mutex::new(Compression::default()),
            alt_sources: Mutex::new(HashMap::new()),
            metrics: ToProtocolMetrics::default(),
        }
    }

    /// Sets the compression policy of write-at frames.
    pub fn set_compression(&self, compression: Compression) {
        *self.compression.lock() = compression;
    }

    /// The device id.
    pub fn device(&self) -> u32 {
        self.device
    }

    /// The connection.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Counters.
    pub fn metrics(&self) -> &ToProtocolMetrics {
        &self.metrics
    }

    fn max_chunk(&self) -> u32 {
        self.conn
            .negotiated()
            .peer_max_frame
            .saturating_sub(FRAME_SLACK)
    }

    /// Writes `data` at `offset` with the given writer priority (use
    /// [`Priority::Urgent`] for blocks the destination asked for with
    /// need-at). Blocks listed in the alternate sources with the same
    /// SHA-256 are sent as write-at-hash.
    pub async fn write_at_priority(
        &self,
        offset: u64,
        data: Bytes,
        priority: Priority,
    ) -> silo_storage::Result<()> {
        check_range(Op::Write, offset, data.len() as u64, self.size)?;
        if data.is_empty() {
            return Ok(());
        }
        if let Some(hash) = self.alt_source_hash(offset, data.len() as u64) {
            if <[u8; 32]>::from(Sha256::digest(&data)) == hash {
                let w = WriteAtHash {
                    offset,
                    length: data.len() as u32,
                    location: HashLocation::S3,
                    sha256: hash,
                };
                self.metrics.hash_writes.fetch_add(1, Ordering::Relaxed);
                return self
                    .conn
                    .request(self.device, Message::WriteAtHash(w), priority)
                    .await
                    .map(|_| ())
                    .map_err(|e| {
                        to_storage(
                            format!("write-at-hash at {offset} on device {}", self.device),
                            e,
                        )
                    });
            }
        }
        self.write_data_at(offset, data, priority).await
    }

    /// Writes `data` at `offset` as write-at frames, never as a write-at-hash
    /// (for blocks the destination is waiting for: fetching them from the
    /// source's data is faster than from an alternate source).
    pub async fn write_data_at(
        &self,
        offset: u64,
        data: Bytes,
        priority: Priority,
    ) -> silo_storage::Result<()> {
        check_range(Op::Write, offset, data.len() as u64, self.size)?;
        let compression = *self.compression.lock();
        let chunk = self.max_chunk() as usize;
        let mut at = 0usize;
        while at < data.len() {
            let part = data.slice(at..data.len().min(at + chunk));
            let w =
                WriteAt::compressed(offset + at as u64, &part, compression, self.conn.features());
            self.metrics.writes.fetch_add(1, Ordering::Relaxed);
            self.metrics
                .write_bytes
                .fetch_add(part.len() as u64, Ordering::Relaxed);
            self.metrics
                .wire_bytes
                .fetch_add(w.payload.len() as u64, Ordering::Relaxed);
            self.conn
                .send_write(self.device, w, priority)
                .await
                .map_err(|e| {
                    to_storage(
                        format!("write-at {offset}+{} on device {}", part.len(), self.device),
                        e,
                    )
                })?;
            at += part.len();
        }
        Ok(())
    }

    fn alt_source_hash(&self, offset: u64, len: u64) -> Option<[u8; 32]> {
        let a = self.alt_sources.lock();
        if a.is_empty() {
            return None;
        }
        a.get(&(offset, len)).copied()
    }

    /// Sends the device info (notice, urgent).
    pub async fn send_device_info(&self, info: DeviceInfo) -> Result<(), Error> {
        self.conn
            .notify(self.device, Message::DeviceInfo(info), Priority::Urgent)
            .await
    }

    /// Sends a dirty list and waits for the acknowledgement (the receiver has
    /// marked the blocks absent when it returns).
    pub async fn send_dirty_list(&self, block_size: u32, blocks: Vec<u64>) -> Result<(), Error> {
        self.conn
            .request_ack(
                self.device,
                Message::DirtyList(BlockList { block_size, blocks }),
            )
            .await
    }

    /// Sends an event and waits until the receiver handled it.
    pub async fn send_event(&self, event: Event) -> Result<(), Error> {
        self.conn
            .request_ack(self.device, Message::Event(event))
            .await
    }

    /// Sends the alternate sources and remembers them: later writes of a
    /// listed range whose data still has the listed hash go as write-at-hash.
    pub async fn send_alternate_sources(&self, list: Vec<AlternateSource>) -> Result<(), Error> {
        {
            let mut a = self.alt_sources.lock();
            a.clear();
            for s in &list {
                a.insert((s.offset, s.length), s.sha256);
            }
        }
        self.conn
            .request_ack(self.device, Message::AlternateSources(list))
            .await
    }

    /// Forgets the alternate sources (dirty blocks must travel with data).
    pub fn clear_alternate_sources(&self) {
        self.alt_sources.lock().clear();
    }

    /// Sends a write-at-hash explicitly.
    pub async fn write_at_hash(&self, write: WriteAtHash) -> Result<(), Error> {
        self.conn
            .request(self.device, Message::WriteAtHash(write), Priority::Bulk)
            .await
            .map(|_| ())
    }

    /// Tells the receiver it already has these blocks (shared base image).
    pub async fn send_you_already_have(
        &self,
        block_size: u32,
        blocks: Vec<u64>,
    ) -> Result<(), Error> {
        self.conn
            .request_ack(
                self.device,
                Message::YouAlreadyHave(BlockList { block_size, blocks }),
            )
            .await
    }

    /// Removes the device from the migration (notice).
    pub async fn remove_device(&self) -> Result<(), Error> {
        self.conn
            .notify(self.device, Message::RemoveDevice, Priority::Urgent)
            .await
    }

    /// The stream of need-at hints from the destination (each
    /// [`Request::message`] is a [`Message::NeedAt`]).
    pub fn need_at_requests(&self) -> Result<Incoming, Error> {
        self.conn.incoming(self.device, Kind::NeedAt)
    }

    /// The stream of don't-need-at hints from the destination.
    pub fn dont_need_at_requests(&self) -> Result<Incoming, Error> {
        self.conn.incoming(self.device, Kind::DontNeedAt)
    }

    /// Serves the destination's read-at requests from `provider` until the
    /// connection closes (returns that error). Reads run concurrently (up
    /// to `concurrency`); their data is sent urgent.
    pub async fn serve_reads(
        &self,
        provider: DynProvider,
        concurrency: usize,
    ) -> Result<(), Error> {
        let mut reads = self.conn.incoming(self.device, Kind::ReadAt)?;
        let limit = Arc::new(Semaphore::new(concurrency.max(1)));
        loop {
            let req = reads.recv().await?;
            let permit = limit.clone().acquire_owned().await;
            let provider = provider.clone();
            tokio::spawn(async move {
                let _permit = permit;
                serve_read(&provider, req, Priority::Urgent).await;
            });
        }
    }
}

#[async_trait]
impl Provider for ToProtocol {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        // Flush is trivially satisfied (every write is acknowledged after the
        // peer applied it); no FUA; trim and write-zeroes travel as zero writes.
        let mut c = Capabilities::ALL;
        c.fua = false;
        c
    }

    async fn read_at(&self, offset: u64, mut buf: BytesMut) -> silo_storage::Result<BytesMut> {
        check_range(Op::Read, offset, buf.len() as u64, self.size)?;
        let chunk = self.max_chunk() as usize;
        let mut at = 0usize;
        while at < buf.len() {
            let n = (buf.len() - at).min(chunk);
            self.metrics.reads.fetch_add(1, Ordering::Relaxed);
            let data = self
                .conn
                .read_at(self.device, offset + at as u64, n as u32, Priority::Urgent)
                .await
                .map_err(|e| {
                    to_storage(format!("read-at {offset}+{n} on device {}", self.device), e)
                })?;
            buf[at..at + n].copy_from_slice(&data);
            at += n;
        }
        Ok(buf)
    }

    async fn write_at(&self, offset: u64, data: Bytes) -> silo_storage::Result<()> {
        self.write_at_priority(offset, data, Priority::Bulk).await
    }

    async fn flush(&self) -> silo_storage::Result<()> {
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64) -> silo_storage::Result<()> {
        self.write_zeroes(offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> silo_storage::Result<()> {
        check_range(Op::WriteZeroes, offset, len, self.size)?;
        if !self.conn.features().contains(Encoding::Zeroes.feature()) {
            return silo_storage::provider::write_zeroes_by_writing(self, offset, len).await;
        }
        let chunk = u64::from(self.max_chunk());
        let mut at = 0u64;
        while at < len {
            let n = (len - at).min(chunk);
            self.conn
                .send_write(
                    self.device,
                    WriteAt::zeroes(offset + at, n as u32),
                    Priority::Bulk,
                )
                .await
                .map_err(|e| {
                    to_storage(
                        format!("write-zeroes {offset}+{len} on device {}", self.device),
                        e,
                    )
                })?;
            at += n;
        }
        Ok(())
    }

    fn cancel_writes(&self, _offset: u64, _len: u64) {}

    async fn close(&self) -> silo_storage::Result<()> {
        Ok(())
    }
}

async fn serve_read(provider: &DynProvider, req: Request, priority: Priority) {
    let Message::ReadAt(r) = req.message else {
        let _ = req.respond_error(ErrorCode::Invalid, "not a read-at");
        return;
    };
    if let Err(e) = req.message.check_device_bounds(provider.size()) {
        let _ = req.respond_error(ErrorCode::OutOfRange, e.to_string());
        return;
    }
    match provider
        .read_at(r.offset, BytesMut::zeroed(r.length as usize))
        .await
    {
        Ok(buf) => {
            let _ = req
                .respond_with(Message::ReadAtData(buf.freeze()), priority)
                .await;
        }
        Err(e) => {
            let _ = req.respond_error(error_code(e.kind()), e.to_string());
        }
    }
}

/// Callbacks of a [`FromProtocol`] for what a provider cannot do. Every
/// method has a default. A returned error is sent to the peer as an error
/// response; serving continues.
#[async_trait]
pub trait FromProtocolHandler: Send + Sync + 'static {
    /// A device info arrived.
    async fn device_info(&self, _info: DeviceInfo) {}
    /// A dirty list arrived; the ack is sent after this returns (mark the
    /// blocks absent here).
    async fn dirty_list(&self, _list: BlockList) -> Result<(), ErrorResponse> {
        Ok(())
    }
    /// An event arrived; the ack is sent after this returns.
    async fn event(&self, _event: Event) -> Result<(), ErrorResponse> {
        Ok(())
    }
    /// Alternate sources arrived.
    async fn alternate_sources(&self, _list: Vec<AlternateSource>) -> Result<(), ErrorResponse> {
        Ok(())
    }
    /// A block known by hash. The default refuses (`Unsupported`) so the
    /// sender knows the data did not arrive.
    async fn write_at_hash(&self, _write: WriteAtHash) -> Result<(), ErrorResponse> {
        Err(ErrorResponse::new(
            ErrorCode::Unsupported,
            "hash writes are not handled here",
        ))
    }
    /// Blocks the receiver already has.
    async fn you_already_have(&self, _list: BlockList) -> Result<(), ErrorResponse> {
        Ok(())
    }
    /// The device was removed; `serve` returns after this.
    async fn removed(&self) {}
}

/// A handler that accepts everything and refuses hash writes.
#[derive(Debug, Default, Clone, Copy)]
pub struct DefaultHandler;

#[async_trait]
impl FromProtocolHandler for DefaultHandler {}

/// Counters of a [`FromProtocol`].
#[derive(Debug, Default)]
pub struct FromProtocolMetrics {
    /// Writes applied.
    pub writes: AtomicU64,
    /// Bytes written (decoded).
    pub write_bytes: AtomicU64,
    /// Requests answered with an error.
    pub errors: AtomicU64,
    /// Reads served.
    pub reads: AtomicU64,
    /// Need-at hints sent.
    pub need_at: AtomicU64,
    /// Don't-need-at hints sent.
    pub dont_need_at: AtomicU64,
}

/// Destination side: applies one device's incoming requests to a local
/// provider. Share it in an `Arc` to call [`FromProtocol::need_at`] from a
/// waiting cache's callbacks while [`FromProtocol::serve`] runs.
pub struct FromProtocol {
    conn: Connection,
    device: u32,
    provider: DynProvider,
    handler: Arc<dyn FromProtocolHandler>,
    concurrency: usize,
    metrics: Arc<FromProtocolMetrics>,
}

impl std::fmt::Debug for FromProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FromProtocol")
            .field("device", &self.device)
            .field("metrics", &self.metrics)
            .finish()
    }
}

impl FromProtocol {
    /// Applies requests for `device` to `provider`.
    pub fn new(conn: Connection, device: u32, provider: DynProvider) -> FromProtocol {
        FromProtocol {
            conn,
            device,
            provider,
            handler: Arc::new(DefaultHandler),
            concurrency: 64,
            metrics: Arc::default(),
        }
    }

    /// Sets the callbacks.
    pub fn with_handler(mut self, handler: Arc<dyn FromProtocolHandler>) -> Self {
        self.handler = handler;
        self
    }

    /// Sets how many writes/reads are applied concurrently (default 64).
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// The device id.
    pub fn device(&self) -> u32 {
        self.device
    }

    /// Counters.
    pub fn metrics(&self) -> &FromProtocolMetrics {
        &self.metrics
    }

    /// Asks the source for `[offset, offset + len)` with priority (urgent
    /// notice; does not wait). Wire it to the waiting cache's need-at hook.
    pub fn need_at(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.hint(true, offset, len)
    }

    /// Tells the source the range was written locally and need not be sent
    /// (urgent notice; does not wait). Wire it to the don't-need-at hook.
    pub fn dont_need_at(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.hint(false, offset, len)
    }

    /// A callback for a waiting cache's need-at hook (e.g.
    /// `Arc::new(from.need_at_fn())` as a `silo_storage::waiting::RangeHandler`).
    /// Errors (connection gone) are logged, not returned.
    pub fn need_at_fn(self: &Arc<Self>) -> impl Fn(u64, u64) + Send + Sync + 'static {
        self.hint_fn(true)
    }

    /// A callback for a waiting cache's don't-need-at hook (see
    /// [`FromProtocol::need_at_fn`]).
    pub fn dont_need_at_fn(self: &Arc<Self>) -> impl Fn(u64, u64) + Send + Sync + 'static {
        self.hint_fn(false)
    }

    fn hint_fn(self: &Arc<Self>, need: bool) -> impl Fn(u64, u64) + Send + Sync + 'static {
        let this = Arc::downgrade(self);
        move |offset, len| {
            if let Some(this) = this.upgrade() {
                if let Err(e) = this.hint(need, offset, len) {
                    tracing::debug!(offset, len, need, error = %e, "range hint not sent");
                }
            }
        }
    }

    fn hint(&self, need: bool, offset: u64, length: u64) -> Result<(), Error> {
        if length == 0 {
            return Ok(());
        }
        let range = Range { offset, length };
        let (counter, msg) = if need {
            (&self.metrics.need_at, Message::NeedAt(range))
        } else {
            (&self.metrics.dont_need_at, Message::DontNeedAt(range))
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.conn.notify_now(self.device, msg, Priority::Urgent)
    }

    /// Reads from the source's device (for data that must be fetched now).
    pub async fn read_remote(&self, offset: u64, len: u32) -> Result<Bytes, Error> {
        self.conn
            .read_at(self.device, offset, len, Priority::Urgent)
            .await
    }

    /// Serves every request kind of the device until a remove-device notice
    /// arrives (`Ok`) or the connection closes (`Err`). Writes and reads are
    /// applied concurrently (bounded); dirty lists, events and the other
    /// control messages are handled in arrival order and acknowledged after
    /// their callback returns.
    pub async fn serve(&self) -> Result<(), Error> {
        let d = self.device;
        let c = &self.conn;
        let mut writes = c.incoming(d, Kind::WriteAt)?;
        let mut hash_writes = c.incoming(d, Kind::WriteAtHash)?;
        let mut reads = c.incoming(d, Kind::ReadAt)?;
        let mut dirty = c.incoming(d, Kind::DirtyList)?;
        let mut events = c.incoming(d, Kind::Event)?;
        let mut alt = c.incoming(d, Kind::AlternateSources)?;
        let mut yah = c.incoming(d, Kind::YouAlreadyHave)?;
        let mut infos = c.incoming(d, Kind::DeviceInfo)?;
        let mut remove = c.incoming(d, Kind::RemoveDevice)?;
        let limit = Arc::new(Semaphore::new(self.concurrency));
        loop {
            tokio::select! {
                r = writes.recv() => self.spawn_data(&limit, r?).await,
                r = reads.recv() => self.spawn_data(&limit, r?).await,
                r = hash_writes.recv() => self.control(r?).await,
                r = dirty.recv() => self.control(r?).await,
                r = events.recv() => self.control(r?).await,
                r = alt.recv() => self.control(r?).await,
                r = yah.recv() => self.control(r?).await,
                r = infos.recv() => self.control(r?).await,
                r = remove.recv() => {
                    r?;
                    self.handler.removed().await;
                    self.conn.close_device(d);
                    // Let in-flight writes and reads finish.
                    let _ = limit.acquire_many(self.concurrency as u32).await;
                    return Ok(());
                }
            }
        }
    }

    /// Applies a write or serves a read in its own task (at most
    /// `concurrency` at once).
    async fn spawn_data(&self, limit: &Arc<Semaphore>, req: Request) {
        let permit = limit.clone().acquire_owned().await;
        let provider = self.provider.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if req.kind() == Kind::ReadAt {
                metrics.reads.fetch_add(1, Ordering::Relaxed);
                serve_read(&provider, req, Priority::Bulk).await;
            } else {
                apply_write(&provider, &metrics, req).await;
            }
        });
    }

    /// Handles one control request in arrival order: bounds check, the
    /// handler's callback, then the reply.
    async fn control(&self, req: Request) {
        if let Err(e) = req.message.check_device_bounds(self.provider.size()) {
            return self.fail(req, ErrorCode::OutOfRange, e.to_string());
        }
        let h = &self.handler;
        let res = match req.message.clone() {
            Message::WriteAtHash(w) => match h.write_at_hash(w).await {
                Ok(()) => {
                    let _ = req.respond(Message::WriteAtOk { length: w.length }).await;
                    return;
                }
                Err(e) => Err(e),
            },
            Message::DirtyList(l) => h.dirty_list(l).await,
            Message::Event(e) => h.event(e).await,
            Message::AlternateSources(l) => h.alternate_sources(l).await,
            Message::YouAlreadyHave(l) => h.you_already_have(l).await,
            Message::DeviceInfo(i) => {
                h.device_info(i).await;
                return;
            }
            m => Err(ErrorResponse::new(
                ErrorCode::Unsupported,
                format!("{} is not handled here", m.kind()),
            )),
        };
        match res {
            Ok(()) => {
                let _ = req.respond(Message::Ack).await;
            }
            Err(e) => self.fail(req, e.code, e.text),
        }
    }

    fn fail(&self, req: Request, code: ErrorCode, text: String) {
        self.metrics.errors.fetch_add(1, Ordering::Relaxed);
        let _ = req.respond_error(code, text);
    }
}

async fn apply_write(provider: &DynProvider, metrics: &FromProtocolMetrics, req: Request) {
    let fail = |req: Request, code: ErrorCode, text: String| {
        metrics.errors.fetch_add(1, Ordering::Relaxed);
        let _ = req.respond_error(code, text);
    };
    let Message::WriteAt(w) = &req.message else {
        return fail(req, ErrorCode::Invalid, "not a write-at".into());
    };
    if let Err(e) = req.message.check_device_bounds(provider.size()) {
        return fail(req, ErrorCode::OutOfRange, e.to_string());
    }
    let (offset, length) = (w.offset, w.length);
    let res = if w.encoding == Encoding::Zeroes {
        provider.write_zeroes(offset, length.into()).await
    } else {
        match w.data() {
            Ok(data) => provider.write_at(offset, data).await,
            Err(e) => return fail(req, ErrorCode::Malformed, e.to_string()),
        }
    };
    match res {
        Ok(()) => {
            metrics.writes.fetch_add(1, Ordering::Relaxed);
            metrics
                .write_bytes
                .fetch_add(length.into(), Ordering::Relaxed);
            let _ = req.respond(Message::WriteAtOk { length }).await;
        }
        Err(e) => {
            tracing::debug!(offset, length, error = %e, "write-at failed; replying with the error");
            fail(req, error_code(e.kind()), e.to_string())
        }
    }
}
