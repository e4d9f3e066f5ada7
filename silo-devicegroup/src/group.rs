//! The [`DeviceGroup`]: devices that migrate together.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::future::{join_all, try_join_all};
use parking_lot::Mutex;
use silo_protocol::bridge::{FromProtocol, FromProtocolHandler, ToProtocol};
use silo_protocol::{
    BlockList, Connection, DeviceGroupInfo, DeviceInfo, ErrorCode, ErrorResponse, Event, EventKind,
    Kind, Message, Priority,
};
use silo_storage::bitfield::Bitfield;
use silo_storage::dirty::{dirty_tracker, DirtyMetrics, DirtySource, DirtyTrackerRemote};
use silo_storage::migrator::{Concurrency, Migrator, MigratorConfig, Progress};
use silo_storage::modules::lockable::Lockable;
use silo_storage::modules::metrics::{Metrics, MetricsSnapshot};
use silo_storage::order::{AnyOrder, BlockOrder, PriorityOrder};
use silo_storage::volatility::VolatilityMonitor;
use silo_storage::waiting::{
    waiting_cache, WaitingCacheLocal, WaitingCacheRemote, WaitingConfig, WaitingMetrics,
};
use silo_storage::{BlockLayout, Capabilities, DynProvider, Provider};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::device::{build_device, BuildOptions, BuiltDevice};
use crate::error::{Error, Result};
use crate::hooks::{CustomDataHandler, DeviceProgress, MigrateDirtyHooks, ProgressHandler};
use crate::policy::{sanitize, ReceivePolicy};
use crate::s3::{sync_s3_config, sync_settings, Assist, AssistMetrics, AssistedRemote, SendS3};
use crate::schema::{decode_device_hcl, encode_device_hcl, DeviceSchema, SiloSchema};

/// Custom-event sub-type of application data ([`DeviceGroup::send_custom_data`]).
pub const CUSTOM_DATA: u8 = 0;
/// Custom-event sub-type the receiver sends on device 0 once its devices are
/// built and served (the sender's `start_migration_to` waits for it).
pub const EVENT_READY: u8 = 0xF0;
/// Custom-event sub-type the receiver sends on device 0 when it refuses the
/// group (payload: the reason as UTF-8).
pub const EVENT_REFUSED: u8 = 0xF1;

/// Default sliding window of the volatility monitors.
pub const DEFAULT_VOLATILITY_WINDOW: Duration = Duration::from_secs(30 * 60);

/// Options of a device group (sending and receiving).
#[derive(Clone)]
#[non_exhaustive]
pub struct GroupOptions {
    /// Device construction options.
    pub build: BuildOptions,
    /// NBD server that devices with `expose = true` are exported on (export
    /// name = device name). Without one, `expose = true` is an error.
    pub nbd: Option<Arc<silo_nbd::Server>>,
    /// Window of the volatility monitors (default 30 min).
    pub volatility_window: Duration,
    /// Bound on a destination read's wait for a missing block (default none:
    /// it waits until the block arrives or the connection drops).
    pub waiting_timeout: Option<Duration>,
    /// How long `start_migration_to` waits for the receiver to build its
    /// devices, and `new_from_protocol` for the group info (default 60 s).
    pub setup_timeout: Duration,
    /// Concurrent reads a sender serves for its receiver (default 16).
    pub serve_read_concurrency: usize,
    /// Called for every block transfer attempt of every device's migrator
    /// (device index, event): the input of a migration timeline.
    pub block_observer: Option<BlockObserverFn>,
    /// Compression of outgoing blocks (default LZ4 with zero elision).
    pub compression: silo_protocol::Compression,
    /// Retry policy of S3 requests (sync uploads, S3 devices, grabs).
    pub s3_retry: silo_s3::RetrySettings,
}

/// Per-block observer of a group: device index and the migrator's event.
pub type BlockObserverFn = Arc<dyn Fn(usize, &silo_storage::migrator::BlockEvent) + Send + Sync>;

impl std::fmt::Debug for GroupOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupOptions")
            .field("build", &self.build)
            .field("nbd", &self.nbd.is_some())
            .field("volatility_window", &self.volatility_window)
            .field("waiting_timeout", &self.waiting_timeout)
            .field("setup_timeout", &self.setup_timeout)
            .field("compression", &self.compression)
            .finish()
    }
}

impl Default for GroupOptions {
    fn default() -> Self {
        GroupOptions {
            build: BuildOptions::default(),
            nbd: None,
            volatility_window: DEFAULT_VOLATILITY_WINDOW,
            waiting_timeout: None,
            setup_timeout: Duration::from_secs(60),
            serve_read_concurrency: 16,
            block_observer: None,
            compression: silo_protocol::Compression::default(),
            s3_retry: silo_s3::RetrySettings::default(),
        }
    }
}

impl GroupOptions {
    /// Sets the NBD server for `expose = true` devices.
    pub fn with_nbd(mut self, server: Arc<silo_nbd::Server>) -> Self {
        self.nbd = Some(server);
        self
    }
    /// Sets the device construction options.
    pub fn with_build(mut self, build: BuildOptions) -> Self {
        self.build = build;
        self
    }
    /// Sets the volatility window.
    pub fn with_volatility_window(mut self, window: Duration) -> Self {
        self.volatility_window = window;
        self
    }
    /// Sets the setup timeout.
    pub fn with_setup_timeout(mut self, timeout: Duration) -> Self {
        self.setup_timeout = timeout;
        self
    }
    /// Sets the compression of outgoing blocks.
    pub fn with_compression(mut self, compression: silo_protocol::Compression) -> Self {
        self.compression = compression;
        self
    }
    /// Sets the destination read wait bound.
    pub fn with_waiting_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.waiting_timeout = timeout;
        self
    }
    /// Sets the retry policy of S3 requests.
    pub fn with_s3_retry(mut self, retry: silo_s3::RetrySettings) -> Self {
        self.s3_retry = retry;
        self
    }
    /// Sets the per-block observer (see [`GroupOptions::block_observer`]).
    pub fn with_block_observer(mut self, observer: BlockObserverFn) -> Self {
        self.block_observer = Some(observer);
        self
    }
}

/// Options of a receiving group ([`DeviceGroup::new_from_protocol`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ReceiveOptions {
    /// What the receiver accepts from the sender's schemas.
    pub policy: ReceivePolicy,
    /// Group options.
    pub group: GroupOptions,
    /// How long a custom-data event waits for a handler
    /// ([`DeviceGroup::handle_custom_data`]) before it is refused (default 30 s).
    pub custom_data_wait: Duration,
    /// Move every sender path into [`ReceivePolicy::base_dir`] (by file
    /// name, with [`rewrite_paths_into`](crate::rewrite_paths_into)) before
    /// the policy is applied, so the sender's directory layout does not
    /// matter. Default `false`: sender paths must already resolve inside the
    /// base directory (relative paths are joined to it), anything else is
    /// refused.
    pub rewrite_paths: bool,
    /// Most devices a sender may describe (default 1024).
    pub max_devices: usize,
}

impl ReceiveOptions {
    /// Defaults with `policy`.
    pub fn new(policy: ReceivePolicy) -> Self {
        ReceiveOptions {
            policy,
            group: GroupOptions::default(),
            custom_data_wait: Duration::from_secs(30),
            rewrite_paths: false,
            max_devices: 1024,
        }
    }
    /// Sets [`ReceiveOptions::rewrite_paths`].
    pub fn with_rewrite_paths(mut self, rewrite: bool) -> Self {
        self.rewrite_paths = rewrite;
        self
    }
    /// Sets the group options.
    pub fn with_group(mut self, group: GroupOptions) -> Self {
        self.group = group;
        self
    }
}

/// Counters of one device.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeviceMetrics {
    /// Device name.
    pub name: String,
    /// Operations below the tracking layers (application and migration reads).
    pub provider: MetricsSnapshot,
    /// The dirty tracker.
    pub dirty: DirtyMetrics,
    /// Writes recorded by the volatility monitor.
    pub volatility_writes: u64,
    /// The waiting cache (receiving groups).
    pub waiting: Option<WaitingMetrics>,
    /// The current outgoing migration.
    pub migration: Option<Progress>,
    /// The device's continuous S3 sync (sending devices with a `sync` block).
    pub s3_sync: Option<silo_s3::S3SyncMetrics>,
    /// S3-assisted migration (receiving groups).
    pub assist: Option<AssistMetrics>,
}

/// One device with its whole stack.
struct Device {
    index: usize,
    name: String,
    schema: DeviceSchema,
    layout: BlockLayout,
    built: BuiltDevice,
    lockable: Arc<Lockable>,
    volatility: Arc<VolatilityMonitor>,
    dirty: DirtyTrackerRemote,
    metrics: Arc<Metrics>,
    waiting: Option<(WaitingCacheLocal, WaitingCacheRemote)>,
    /// Continuous S3 sync (sending devices with a `sync` block).
    s3: Arc<std::sync::OnceLock<SendS3>>,
    /// A receiving device's own sync, started once its migration completed
    /// (receiver policy `auto_start`).
    recv_sync: Option<Arc<PendingSync>>,
    /// S3 assist (receiving devices).
    assist: Option<Arc<Assist>>,
    exported: bool,
}

impl Device {
    fn top(&self) -> DynProvider {
        self.lockable.clone()
    }
}

/// The destination side of an outgoing migration for one device: the
/// protocol writer plus the set of blocks the destination asked for, which
/// are written with urgent priority so they overtake queued bulk frames.
struct UrgentDest {
    to: Arc<ToProtocol>,
    layout: BlockLayout,
    urgent: Bitfield,
}

#[async_trait]
impl Provider for UrgentDest {
    fn size(&self) -> u64 {
        self.to.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.to.capabilities()
    }
    async fn read_at(&self, offset: u64, buf: BytesMut) -> silo_storage::Result<BytesMut> {
        self.to.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: Bytes) -> silo_storage::Result<()> {
        let b = offset / self.layout.block_size();
        if b < self.layout.num_blocks() && self.urgent.clear_if_set(b) {
            // The destination is waiting: data now, never a hash to fetch.
            self.to.write_data_at(offset, data, Priority::Urgent).await
        } else {
            self.to
                .write_at_priority(offset, data, Priority::Bulk)
                .await
        }
    }
    async fn flush(&self) -> silo_storage::Result<()> {
        self.to.flush().await
    }
    async fn trim(&self, offset: u64, len: u64) -> silo_storage::Result<()> {
        self.to.trim(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> silo_storage::Result<()> {
        self.to.write_zeroes(offset, len).await
    }
    fn cancel_writes(&self, offset: u64, len: u64) {
        self.to.cancel_writes(offset, len)
    }
    async fn close(&self) -> silo_storage::Result<()> {
        Ok(())
    }
}

/// Per-device state of an outgoing migration.
struct SendDevice {
    to: Arc<ToProtocol>,
    dest: Arc<UrgentDest>,
    order: Arc<PriorityOrder>,
    migrator: Mutex<Option<Migrator>>,
    /// Don't-need hints that arrived before the migrator existed.
    not_needed: Bitfield,
}

impl SendDevice {
    fn migrator(&self) -> Option<Migrator> {
        self.migrator.lock().clone()
    }

    fn need_at(&self, offset: u64, len: u64) {
        let size = self.dest.layout.size();
        if offset >= size || len == 0 {
            return;
        }
        let len = len.min(size - offset);
        let m = self.migrator();
        for b in self.dest.layout.blocks_touching(offset, len) {
            // The next send of the block goes urgent, whether it comes from
            // the order (prioritised here) or from a queued dirty re-send
            // (then `prioritise` returns false; the bit still applies).
            self.dest.urgent.set(b);
            match &m {
                Some(m) => m.prioritise(b),
                None => self.order.prioritise(b),
            };
        }
    }

    fn dont_need_at(&self, offset: u64, len: u64) {
        let size = self.dest.layout.size();
        if offset >= size || len == 0 {
            return;
        }
        let len = len.min(size - offset);
        // Under the lock, so a hint racing the migrator's creation is not lost.
        let m = self.migrator.lock();
        match &*m {
            Some(m) => m.dont_need_at(offset, len),
            None => {
                for b in self.dest.layout.blocks_covered(offset, len) {
                    self.not_needed.set(b);
                    self.order.remove(b);
                }
            }
        }
    }
}

/// One outgoing migration.
struct Session {
    conn: Connection,
    devices: Vec<SendDevice>,
    tasks: Vec<JoinHandle<()>>,
    progress: Arc<Mutex<Vec<DeviceProgress>>>,
}

impl Drop for Session {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for d in &self.devices {
            if let Some(m) = d.migrator() {
                m.cancel();
            }
        }
    }
}

/// Receiving state (groups made by [`DeviceGroup::new_from_protocol`]).
struct Receiving {
    conn: Connection,
    from: Vec<Arc<FromProtocol>>,
    completed: Vec<AtomicBool>,
    failure: Mutex<Option<String>>,
    changed: Notify,
    custom: Mutex<Option<CustomDataHandler>>,
    custom_set: Notify,
    custom_wait: Duration,
}

impl Receiving {
    fn all_completed(&self) -> bool {
        self.completed.iter().all(|c| c.load(Ordering::SeqCst))
    }
}

/// A group of devices that migrate together. See the crate documentation
/// for the full lifecycle; every method takes `&self`, so share the group in
/// an `Arc` to call [`DeviceGroup::send_custom_data`] from hooks or tasks.
pub struct DeviceGroup {
    devices: Vec<Device>,
    opts: GroupOptions,
    session: Mutex<Option<Arc<Session>>>,
    receiving: Option<Arc<Receiving>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    closed: AtomicBool,
}

impl std::fmt::Debug for DeviceGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceGroup")
            .field("devices", &self.names())
            .field("receiving", &self.receiving.is_some())
            .field("migrating", &self.session.lock().is_some())
            .finish()
    }
}

impl Drop for DeviceGroup {
    fn drop(&mut self) {
        for t in self.tasks.lock().iter() {
            t.abort();
        }
    }
}

async fn wrap_device(
    index: usize,
    schema: DeviceSchema,
    built: BuiltDevice,
    receiving: bool,
    opts: &GroupOptions,
) -> Result<Device> {
    let name = schema.name.clone();
    let bs = schema.block_size_bytes();
    let err = |context: &str, e| Error::storage(&name, context, e);
    let layout = BlockLayout::new(built.provider.size(), bs).map_err(|e| err("block layout", e))?;
    let s3 = Arc::new(std::sync::OnceLock::new());
    let mut assist = None;
    let mut recv_sync = None;
    let mut device_top = built.provider.clone();
    if receiving {
        if let Some(sync) = schema.sync.as_ref().filter(|s| s.auto_start) {
            // Tracks every write from the start (the migration's too), so
            // the sync started at completion knows what it has uploaded.
            let (local, remote) = dirty_tracker(built.provider.clone(), bs)
                .map_err(|e| err("S3 dirty tracker", e))?;
            // The syncer's age and change rules count the migration's
            // writes too.
            remote.keep_write_stats();
            device_top = Arc::new(local);
            recv_sync = Some(Arc::new(PendingSync {
                tracker: Mutex::new(Some(remote)),
                config: sync_s3_config(&schema, sync, &sync.prefix, opts.s3_retry.clone()),
                settings: sync_settings(sync),
                slot: s3.clone(),
            }));
        }
        let grab = schema
            .sync
            .as_ref()
            .map(|sync| sync_s3_config(&schema, sync, &sync.grab_prefix, opts.s3_retry.clone()));
        let conc = schema
            .sync
            .as_ref()
            .map_or(1, |s| s.grab_concurrency as usize);
        assist = Some(Assist::new(&name, layout, grab, conc));
    } else if let Some(sync) = &schema.sync {
        let (top, send) = open_send_s3(&schema, sync, &built.provider, opts).await?;
        device_top = top;
        let _ = s3.set(send);
    }
    let (below, waiting) = if receiving {
        let (l, r) = waiting_cache(
            device_top.clone(),
            bs,
            WaitingConfig::default().with_timeout(opts.waiting_timeout),
        )
        .map_err(|e| err("waiting cache", e))?;
        (Arc::new(l.clone()) as DynProvider, Some((l, r)))
    } else {
        (device_top, None)
    };
    let metrics = Arc::new(Metrics::new(below));
    let (local, remote) =
        dirty_tracker(metrics.clone(), bs).map_err(|e| err("dirty tracker", e))?;
    let volatility = Arc::new(
        VolatilityMonitor::new(Arc::new(local), bs, opts.volatility_window)
            .map_err(|e| err("volatility monitor", e))?,
    );
    let lockable = Arc::new(Lockable::new(volatility.clone() as DynProvider));
    let mut dev = Device {
        index,
        name: name.clone(),
        layout,
        built,
        lockable,
        volatility,
        dirty: remote,
        metrics,
        waiting,
        s3,
        recv_sync,
        assist,
        exported: false,
        schema,
    };
    if dev.schema.expose {
        let Some(server) = &opts.nbd else {
            return Err(Error::Nbd {
                device: name,
                reason: "expose = true but the group has no NBD server (GroupOptions::with_nbd)"
                    .into(),
            });
        };
        server
            .add_export(silo_nbd::Export::new(name.clone(), dev.top()))
            .map_err(|e| Error::Nbd {
                device: name.clone(),
                reason: e.to_string(),
            })?;
        dev.exported = true;
    }
    Ok(dev)
}

/// A receiving device's own S3 sync, waiting for the migration to complete.
struct PendingSync {
    tracker: Mutex<Option<DirtyTrackerRemote>>,
    config: silo_s3::S3Config,
    settings: silo_s3::SyncSettings,
    slot: Arc<std::sync::OnceLock<SendS3>>,
}

impl PendingSync {
    /// Starts the sync in the background (once): it uploads the received
    /// device to the receiver's own prefix and keeps it synced, so this
    /// group can be an S3-assisted source for the next hop.
    fn start(&self) {
        let Some(tracker) = self.tracker.lock().take() else {
            return;
        };
        let cfg = self.config.clone();
        let settings = silo_s3::SyncSettings {
            autostart: true,
            ..self.settings.clone()
        };
        let slot = self.slot.clone();
        tokio::spawn(async move {
            let location = format!("{} {} {}", cfg.endpoint_name(), cfg.bucket, cfg.prefix);
            let r = async {
                let store = silo_s3::S3Storage::open_or_create(&cfg).await?;
                silo_s3::S3Sync::new(tracker, Arc::new(store), settings).await
            }
            .await;
            match r {
                Ok(sync) => {
                    tracing::info!(%location, "receiver's S3 sync started");
                    let _ = slot.set(SendS3 {
                        sync,
                        location,
                        stopped_for_migration: AtomicBool::new(false),
                    });
                }
                Err(e) => {
                    tracing::warn!(%location, error = %e, "could not start the receiver's S3 sync")
                }
            }
        });
    }
}

/// The S3 sync of a sending device: a dirty tracker right above the device
/// (every application write passes it) and an [`silo_s3::S3Sync`] to the
/// schema's bucket. Returns the new top of the device chain.
fn open_send_s3<'a>(
    schema: &'a DeviceSchema,
    sync: &'a crate::schema::SyncSchema,
    device: &'a DynProvider,
    opts: &'a GroupOptions,
) -> futures::future::BoxFuture<'a, Result<(DynProvider, SendS3)>> {
    // Boxed as `Send` here, where every lifetime is concrete: the sync's
    // internal streams otherwise defeat the compiler's `Send` inference in
    // the generic callers (`new_from_protocol` in a spawned task).
    Box::pin(async move {
        let name = schema.name.clone();
        let bs = schema.block_size_bytes();
        let (local, remote) = dirty_tracker(device.clone(), bs)
            .map_err(|e| Error::storage(&name, "S3 dirty tracker", e))?;
        let cfg = sync_s3_config(schema, sync, &sync.prefix, opts.s3_retry.clone());
        let location = format!("{} {} {}", cfg.endpoint_name(), cfg.bucket, cfg.prefix);
        let store = silo_s3::S3Storage::open_or_create(&cfg)
            .await
            .map_err(|e| Error::s3(&name, format!("opening {location}"), e))?;
        let sync = silo_s3::S3Sync::new(remote, Arc::new(store), sync_settings(sync))
            .await
            .map_err(|e| Error::s3(&name, "starting the S3 sync", e))?;
        let top: DynProvider = Arc::new(local);
        Ok((
            top,
            SendS3 {
                sync,
                location,
                stopped_for_migration: AtomicBool::new(false),
            },
        ))
    })
}

async fn close_device(d: &Device, nbd: Option<&Arc<silo_nbd::Server>>) -> Result<()> {
    // Close the gate while it may still be locked: operations paused by a
    // cut-over fail with `Closed` instead of being released onto a source
    // that has already handed over authority (unlocking first would let
    // them through).
    if d.exported {
        if let Some(s) = nbd {
            s.remove_export(&d.name);
        }
    }
    if let Some((l, _)) = &d.waiting {
        l.fail_all(silo_storage::Error::Closed {
            op: silo_storage::Op::Read,
        });
    }
    if let Some(s3) = d.s3.get() {
        // Stops uploads and writes the hash index, so a later sync resumes.
        let safe = s3.sync.stop().await;
        tracing::debug!(device = %d.name, safe = safe.len(), "S3 sync stopped");
    }
    let mut first = d
        .lockable
        .close()
        .await
        .map_err(|e| Error::storage(&d.name, "closing", e))
        .err();
    if let Err(e) = d.built.close().await {
        first.get_or_insert(Error::storage(&d.name, "closing", e));
    }
    first.map_or(Ok(()), Err)
}

async fn build_all(
    schemas: Vec<DeviceSchema>,
    receiving: bool,
    opts: &GroupOptions,
) -> Result<Vec<Device>> {
    SiloSchema {
        devices: schemas.clone(),
    }
    .validate()?;
    let mut devices: Vec<Device> = Vec::with_capacity(schemas.len());
    for (i, schema) in schemas.into_iter().enumerate() {
        let r = match build_device(&schema, &opts.build).await {
            Ok(built) => match wrap_device(i, schema, built, receiving, opts).await {
                Ok(d) => Ok(d),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        match r {
            Ok(d) => devices.push(d),
            Err(e) => {
                for d in &devices {
                    if let Err(ce) = close_device(d, opts.nbd.as_ref()).await {
                        tracing::warn!(error = %ce, "closing a device after a failed build");
                    }
                }
                return Err(e);
            }
        }
    }
    Ok(devices)
}

/// Races `fut` against the connection closing.
async fn or_closed<T>(
    conn: &Connection,
    context: &str,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let closed = conn.closed();
    tokio::select! {
        r = fut => r,
        e = closed => Err(Error::protocol(context, e)),
    }
}

fn convert_blocks(list: &BlockList, layout: &BlockLayout) -> Vec<u64> {
    let bs = u64::from(list.block_size);
    if bs == layout.block_size() {
        return list
            .blocks
            .iter()
            .copied()
            .filter(|&b| b < layout.num_blocks())
            .collect();
    }
    let mut out = Vec::new();
    for &b in &list.blocks {
        let Some(off) = b.checked_mul(bs) else {
            continue;
        };
        if off >= layout.size() {
            continue;
        }
        let len = bs.min(layout.size() - off);
        out.extend(layout.blocks_touching(off, len));
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The receiver's handler of one device's control messages.
struct RecvHandler {
    index: usize,
    layout: BlockLayout,
    remote: WaitingCacheRemote,
    assist: Arc<Assist>,
    sync: Option<Arc<PendingSync>>,
    state: std::sync::Weak<Receiving>,
}

#[async_trait]
impl FromProtocolHandler for RecvHandler {
    async fn dirty_list(&self, list: BlockList) -> Result<(), ErrorResponse> {
        let blocks = convert_blocks(&list, &self.layout);
        // Under the assist's block locks: a grab in progress cannot mark a
        // dirtied block present with its old S3 copy.
        self.assist.dirty(&self.remote, &blocks).await;
        Ok(())
    }

    async fn alternate_sources(
        &self,
        list: Vec<silo_protocol::AlternateSource>,
    ) -> Result<(), ErrorResponse> {
        self.assist
            .alternate_sources(&list)
            .await
            .map_err(|why| ErrorResponse::new(ErrorCode::Unsupported, why))
    }

    async fn write_at_hash(&self, w: silo_protocol::WriteAtHash) -> Result<(), ErrorResponse> {
        self.assist
            .hash_write(w.offset, w.length.into(), w.sha256)
            .map_err(|why| ErrorResponse::new(ErrorCode::Invalid, why))
    }

    async fn event(&self, event: Event) -> Result<(), ErrorResponse> {
        if event.kind != EventKind::Completed {
            return Ok(());
        }
        // Blocks hash-written by the sender are present once grabbed (or
        // fetched from the source after a failed grab).
        self.assist.wait_idle().await;
        let missing = self.layout.num_blocks() - self.remote.availability().count();
        if missing > 0 {
            return Err(ErrorResponse::new(
                ErrorCode::Invalid,
                format!("completed, but {missing} blocks never arrived"),
            ));
        }
        if let Some(state) = self.state.upgrade() {
            state.completed[self.index].store(true, Ordering::SeqCst);
            state.changed.notify_waiters();
            tracing::debug!(device = self.index, "device migration completed");
        }
        if let Some(p) = &self.sync {
            p.start();
        }
        Ok(())
    }

    async fn you_already_have(&self, list: BlockList) -> Result<(), ErrorResponse> {
        for b in convert_blocks(&list, &self.layout) {
            self.remote.mark_present(b..b + 1);
        }
        Ok(())
    }
}

impl DeviceGroup {
    /// Builds the devices of `schemas` (see [`crate::device`]) with the
    /// sender's stack:
    ///
    /// ```text
    /// application / NBD → Lockable → VolatilityMonitor → DirtyTrackerLocal → Metrics → device chain
    ///                                       migrator → DirtyTrackerRemote ─┘
    /// ```
    ///
    /// Any error closes what was built so far.
    pub async fn new_from_schema(
        schemas: Vec<DeviceSchema>,
        options: GroupOptions,
    ) -> Result<Arc<DeviceGroup>> {
        let devices = build_all(schemas, false, &options).await?;
        Ok(Arc::new(DeviceGroup {
            devices,
            opts: options,
            session: Mutex::new(None),
            receiving: None,
            tasks: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
        }))
    }

    /// Receives a group over `conn`: waits for the sender's group info, then
    /// for each device decodes the schema, applies the receiver's policy
    /// ([`sanitize`]), then `tweak(index, schema)` (trusted: may rewrite
    /// paths, set `expose`, …), validates, and builds it with the receiver's
    /// stack (a waiting cache below the tracking layers, so the group can
    /// migrate onward later). Destination reads of missing blocks ask the
    /// source for them with priority; local writes tell it not to send them.
    ///
    /// A refused or failed build is reported to the sender (which then fails
    /// in `start_migration_to`) and returned here.
    pub async fn new_from_protocol<T>(
        conn: Connection,
        mut tweak: T,
        options: ReceiveOptions,
    ) -> Result<Arc<DeviceGroup>>
    where
        T: FnMut(usize, DeviceSchema) -> DeviceSchema + Send,
    {
        let mut opts = options.group.clone();
        if opts.build.s3.is_none() {
            // `system = "s3"` devices of a receiver live in its own bucket
            // (the policy put them there), reached with its own keys.
            if let Some(r) = &options.policy.s3 {
                let scheme = if r.secure { "https" } else { "http" };
                let endpoint = if r.endpoint.contains("://") {
                    r.endpoint.clone()
                } else {
                    format!("{scheme}://{}", r.endpoint)
                };
                let mut access = crate::s3::S3Access::new(
                    Some(endpoint),
                    silo_s3::Credentials::new(r.access_key.clone(), r.secret_key.clone()),
                );
                access.retry = opts.s3_retry.clone();
                opts.build.s3 = Some(access);
            }
        }
        let mut infos = conn
            .incoming(0, Kind::DeviceGroupInfo)
            .map_err(|e| Error::protocol("waiting for the device group info", e))?;
        let info = tokio::time::timeout(opts.setup_timeout, infos.recv())
            .await
            .map_err(|_| {
                Error::Peer(format!(
                    "no device group info within {:?}",
                    opts.setup_timeout
                ))
            })?
            .map_err(|e| Error::protocol("waiting for the device group info", e))?;
        let Message::DeviceGroupInfo(info) = info.message.clone() else {
            return Err(Error::Peer("expected device group info".into()));
        };
        let result = async {
            let schemas = Self::accept_schemas(&info, &mut tweak, &options)?;
            build_all(schemas, true, &opts).await
        }
        .await;
        let devices = match result {
            Ok(d) => d,
            Err(e) => {
                let why = Bytes::from(e.to_string());
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    conn.request_ack(0, Message::Event(Event::custom(EVENT_REFUSED, why))),
                )
                .await;
                return Err(e);
            }
        };
        let n = devices.len();
        let receiving = Arc::new_cyclic(|weak: &std::sync::Weak<Receiving>| {
            let from = devices
                .iter()
                .map(|d| {
                    let (local, remote) = d.waiting.clone().expect("receiving devices wait");
                    let assist = d.assist.clone().expect("receiving devices have an assist");
                    let handler = RecvHandler {
                        index: d.index,
                        layout: d.layout,
                        remote: remote.clone(),
                        assist: assist.clone(),
                        sync: d.recv_sync.clone(),
                        state: weak.clone(),
                    };
                    let provider = Arc::new(AssistedRemote {
                        remote,
                        assist: assist.clone(),
                    });
                    if d.schema.system == crate::schema::System::Memory {
                        // A memory device keeps received blocks as they are.
                        conn.receive_big_blocks_apart(d.index as u32 + 1, true);
                    }
                    let from = Arc::new(
                        FromProtocol::new(conn.clone(), d.index as u32 + 1, provider)
                            .with_handler(Arc::new(handler)),
                    );
                    let need = from.need_at_fn();
                    local.set_need_handler(Arc::new(move |offset, len| {
                        need(offset, len);
                        assist.prioritise(offset, len);
                    }));
                    local.set_dont_need_handler(Arc::new(from.dont_need_at_fn()));
                    from
                })
                .collect();
            Receiving {
                conn: conn.clone(),
                from,
                completed: (0..n).map(|_| AtomicBool::new(false)).collect(),
                failure: Mutex::new(None),
                changed: Notify::new(),
                custom: Mutex::new(None),
                custom_set: Notify::new(),
                custom_wait: options.custom_data_wait,
            }
        });
        let group = Arc::new(DeviceGroup {
            devices,
            opts,
            session: Mutex::new(None),
            receiving: Some(receiving.clone()),
            tasks: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
        });
        let mut tasks = Vec::new();
        for (d, from) in group.devices.iter().zip(&receiving.from) {
            if let (Some(a), Some((_, remote))) = (&d.assist, &d.waiting) {
                tasks.extend(a.spawn_dispatcher(from.clone(), remote.clone()));
            }
        }
        for from in &receiving.from {
            let from = from.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = from.serve().await {
                    tracing::debug!(device = from.device(), error = %e, "receiver stopped serving");
                }
            }));
        }
        let events = conn
            .incoming(0, Kind::Event)
            .map_err(|e| Error::protocol("serving custom data", e))?;
        tasks.push(tokio::spawn(custom_data_loop(receiving.clone(), events)));
        // Connection watcher: fail waiters of incomplete devices.
        {
            let r = receiving.clone();
            let waiters: Vec<(usize, WaitingCacheLocal)> = group
                .devices
                .iter()
                .map(|d| (d.index, d.waiting.clone().expect("receiving").0))
                .collect();
            tasks.push(tokio::spawn(async move {
                let e = r.conn.closed().await;
                if !r.all_completed() {
                    tracing::warn!(error = %e, "migration connection closed before completion");
                    *r.failure.lock() = Some(e.to_string());
                    for (i, w) in &waiters {
                        if !r.completed[*i].load(Ordering::SeqCst) {
                            w.fail_all(silo_storage::Error::remote(
                                "migration source disconnected",
                                e.clone(),
                            ));
                        }
                    }
                }
                r.changed.notify_waiters();
            }));
        }
        *group.tasks.lock() = tasks;
        if let Err(e) = conn
            .request_ack(0, Message::Event(Event::custom(EVENT_READY, Bytes::new())))
            .await
        {
            let _ = group.close_all().await;
            return Err(Error::protocol(
                "telling the sender the devices are ready",
                e,
            ));
        }
        tracing::info!(devices = n, "receiving device group");
        Ok(group)
    }

    fn accept_schemas<T>(
        info: &DeviceGroupInfo,
        tweak: &mut T,
        options: &ReceiveOptions,
    ) -> Result<Vec<DeviceSchema>>
    where
        T: FnMut(usize, DeviceSchema) -> DeviceSchema,
    {
        let n = info.devices.len();
        if n > options.max_devices {
            return Err(Error::Peer(format!(
                "{n} devices exceed the receiver's limit of {}",
                options.max_devices
            )));
        }
        let mut ids: Vec<u32> = info.devices.iter().map(|(id, _)| *id).collect();
        ids.sort_unstable();
        if ids.iter().enumerate().any(|(i, id)| *id as usize != i + 1) {
            return Err(Error::Peer(format!(
                "device ids must be 1..={n}, got {ids:?}"
            )));
        }
        let mut schemas: Vec<Option<DeviceSchema>> = vec![None; n];
        for (id, di) in &info.devices {
            let index = *id as usize - 1;
            let mut schema = decode_device_hcl(&di.schema, &format!("<sender device {id}>"))?;
            if options.rewrite_paths {
                schema = crate::policy::rewrite_paths_into(schema, &options.policy.base_dir);
            }
            let schema = sanitize(&options.policy, schema)
                .map_err(|source| Error::Policy { index, source })?;
            let schema = tweak(index, schema);
            schema.validate()?;
            if schema.size_bytes() != di.size {
                return Err(Error::Peer(format!(
                    "device {id}: info says {} bytes, schema {}",
                    di.size,
                    schema.size_bytes()
                )));
            }
            if schema.block_size_bytes() != u64::from(di.block_size) {
                return Err(Error::Peer(format!(
                    "device {id}: info says block size {}, the schema (after tweak) {}",
                    di.block_size,
                    schema.block_size_bytes()
                )));
            }
            if di.name != schema.name {
                return Err(Error::Peer(format!(
                    "device {id}: info names {:?}, the schema {:?}",
                    di.name, schema.name
                )));
            }
            schemas[index] = Some(schema);
        }
        Ok(schemas.into_iter().flatten().collect())
    }

    // ----- accessors -----

    /// Number of devices.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Whether the group has no device.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Device names, in group order.
    pub fn names(&self) -> Vec<String> {
        self.devices.iter().map(|d| d.name.clone()).collect()
    }

    fn device(&self, name: &str) -> Option<&Device> {
        self.devices.iter().find(|d| d.name == name)
    }

    /// Index of the device called `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.device(name).map(|d| d.index)
    }

    /// The application-facing provider of a device (the top of its stack:
    /// writes through it are tracked, and paused by [`DeviceGroup::lock_all`]).
    pub fn provider(&self, name: &str) -> Option<DynProvider> {
        self.device(name).map(Device::top)
    }

    /// The application-facing provider of device `index`.
    pub fn provider_at(&self, index: usize) -> Option<DynProvider> {
        self.devices.get(index).map(Device::top)
    }

    /// The stack of a device *below* its lockable layer: writes through it
    /// are tracked, but [`DeviceGroup::lock_all`] does not pause it. Meant
    /// for inspection (e.g. hashing a source that is locked after its
    /// cut-over), not for the workload.
    pub fn unlocked_provider(&self, name: &str) -> Option<DynProvider> {
        self.device(name)
            .map(|d| d.volatility.clone() as DynProvider)
    }

    /// The lockable layer of a device.
    pub fn lockable(&self, name: &str) -> Option<Arc<Lockable>> {
        self.device(name).map(|d| d.lockable.clone())
    }

    /// The (receiver-adjusted) schema of a device.
    pub fn schema(&self, name: &str) -> Option<&DeviceSchema> {
        self.device(name).map(|d| &d.schema)
    }

    /// The schemas of every device, in group order.
    pub fn schemas(&self) -> Vec<DeviceSchema> {
        self.devices.iter().map(|d| d.schema.clone()).collect()
    }

    /// Counters of a device.
    pub fn metrics(&self, name: &str) -> Option<DeviceMetrics> {
        let d = self.device(name)?;
        let migration = self
            .session
            .lock()
            .as_ref()
            .and_then(|s| s.devices[d.index].migrator())
            .map(|m| m.progress());
        Some(DeviceMetrics {
            name: d.name.clone(),
            provider: d.metrics.snapshot(),
            dirty: d.dirty.metrics(),
            volatility_writes: d.volatility.total_writes(),
            waiting: d.waiting.as_ref().map(|(l, _)| l.metrics()),
            migration,
            s3_sync: d.s3.get().map(|s| s.sync.metrics()),
            assist: d.assist.as_ref().map(|a| a.metrics()),
        })
    }

    /// The continuous S3 sync of a sending device with a `sync` block (to
    /// start, stop or force passes; `migrate_all` stops it and sends its
    /// safe blocks as alternate sources).
    pub fn s3_sync(&self, name: &str) -> Option<&silo_s3::S3Sync> {
        self.device(name).and_then(|d| d.s3.get()).map(|s| &s.sync)
    }

    /// Every device's progress in the current outgoing migration.
    pub fn progress(&self) -> Vec<DeviceProgress> {
        match self.session.lock().as_ref() {
            Some(s) => s.progress.lock().clone(),
            None => self.initial_progress(),
        }
    }

    fn initial_progress(&self) -> Vec<DeviceProgress> {
        self.devices
            .iter()
            .map(|d| DeviceProgress {
                index: d.index,
                name: d.name.clone(),
                block_size: d.layout.block_size(),
                progress: Progress::default(),
            })
            .collect()
    }

    /// Whether every block of every device is present locally (always true
    /// for a sending group; for a receiving group once everything arrived).
    pub fn is_complete(&self) -> bool {
        self.devices
            .iter()
            .all(|d| d.waiting.as_ref().map_or(true, |(l, _)| l.is_complete()))
    }

    // ----- cut-over control -----

    /// Pauses every device's application I/O (NBD and [`DeviceGroup::provider`]);
    /// returns once writes in progress have finished. Migration reads are
    /// below the lock and continue.
    pub async fn lock_all(&self) {
        join_all(self.devices.iter().map(|d| d.lockable.lock())).await;
    }

    /// Resumes application I/O on every device.
    pub fn unlock_all(&self) {
        for d in &self.devices {
            d.lockable.unlock();
        }
    }

    // ----- sending -----

    fn session(&self, what: &str) -> Result<Arc<Session>> {
        self.session
            .lock()
            .clone()
            .ok_or_else(|| Error::State(format!("{what} needs start_migration_to first")))
    }

    /// Starts a migration of the whole group over `conn`: sends the group
    /// info (each device's size, block size, name and HCL schema) on device
    /// 0 and waits until the receiver has built its devices (or refused).
    /// Starts serving the receiver's need-at / don't-need-at hints and reads.
    /// On a receiving group this works once the group is complete (onward
    /// migration); a previous outgoing migration is dropped.
    pub async fn start_migration_to(&self, conn: Connection) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::State("the group is closed".into()));
        }
        if let Some(r) = &self.receiving {
            if !r.all_completed() {
                tracing::warn!("migrating onward before the incoming migration completed");
            }
        }
        let mut events = conn
            .incoming(0, Kind::Event)
            .map_err(|e| Error::protocol("start_migration_to", e))?;
        let info = DeviceGroupInfo {
            devices: self
                .devices
                .iter()
                .map(|d| {
                    (
                        d.index as u32 + 1,
                        DeviceInfo {
                            size: d.layout.size(),
                            block_size: d.layout.block_size() as u32,
                            name: d.name.clone(),
                            schema: encode_device_hcl(&without_credentials(&d.schema)),
                        },
                    )
                })
                .collect(),
        };
        let mut devices = Vec::with_capacity(self.devices.len());
        let mut tasks = Vec::new();
        for d in &self.devices {
            let id = d.index as u32 + 1;
            let to = Arc::new(ToProtocol::new(conn.clone(), id, d.layout.size()));
            to.set_compression(self.opts.compression);
            let inner_order: Arc<dyn BlockOrder> = if d.schema.any_order() {
                Arc::new(AnyOrder::new(d.layout.num_blocks()))
            } else {
                d.volatility.clone()
            };
            let order = Arc::new(PriorityOrder::new(inner_order));
            order.add_all();
            let dest = Arc::new(UrgentDest {
                to: to.clone(),
                layout: d.layout,
                urgent: Bitfield::new(d.layout.num_blocks()),
            });
            devices.push(SendDevice {
                to,
                dest,
                order,
                migrator: Mutex::new(None),
                not_needed: Bitfield::new(d.layout.num_blocks()),
            });
        }
        let progress = Arc::new(Mutex::new(self.initial_progress()));
        let session = Arc::new_cyclic(|weak: &std::sync::Weak<Session>| {
            for (i, sd) in devices.iter().enumerate() {
                let mut need = sd.to.need_at_requests();
                let mut dont = sd.to.dont_need_at_requests();
                let w = weak.clone();
                tasks.push(tokio::spawn(async move {
                    let (Ok(need), Ok(dont)) = (need.as_mut(), dont.as_mut()) else {
                        return;
                    };
                    loop {
                        let r = tokio::select! {
                            r = need.recv() => r,
                            r = dont.recv() => r,
                        };
                        let Ok(req) = r else { return };
                        let Some(s) = w.upgrade() else { return };
                        match req.message {
                            Message::NeedAt(r) => s.devices[i].need_at(r.offset, r.length),
                            Message::DontNeedAt(r) => s.devices[i].dont_need_at(r.offset, r.length),
                            _ => {}
                        }
                    }
                }));
                let to = sd.to.clone();
                let src: DynProvider = Arc::new(self.devices[i].dirty.clone());
                let conc = self.opts.serve_read_concurrency;
                tasks.push(tokio::spawn(async move {
                    let _ = to.serve_reads(src, conc).await;
                }));
            }
            Session {
                conn: conn.clone(),
                devices,
                tasks,
                progress,
            }
        });
        // Replace (and thereby stop) any previous session before waiting.
        *self.session.lock() = Some(session);
        conn.notify(0, Message::DeviceGroupInfo(info), Priority::Urgent)
            .await
            .map_err(|e| Error::protocol("sending the device group info", e))?;
        let wait = async {
            loop {
                let req = events
                    .recv()
                    .await
                    .map_err(|e| Error::protocol("waiting for the receiver", e))?;
                match &req.message {
                    Message::Event(Event {
                        kind: EventKind::Custom(EVENT_READY),
                        ..
                    }) => {
                        let _ = req.respond(Message::Ack).await;
                        return Ok(());
                    }
                    Message::Event(Event {
                        kind: EventKind::Custom(EVENT_REFUSED),
                        payload,
                    }) => {
                        let why = String::from_utf8_lossy(payload).into_owned();
                        let _ = req.respond(Message::Ack).await;
                        return Err(Error::Peer(format!(
                            "the receiver refused the group: {why}"
                        )));
                    }
                    _ => {
                        let _ = req.respond_error(ErrorCode::Unsupported, "unexpected event");
                    }
                }
            }
        };
        let r = match tokio::time::timeout(self.opts.setup_timeout, wait).await {
            Ok(r) => r,
            Err(_) => Err(Error::Peer(format!(
                "the receiver did not get ready within {:?}",
                self.opts.setup_timeout
            ))),
        };
        if r.is_err() {
            *self.session.lock() = None;
        }
        r
    }

    /// Copies every block of every device (bulk pass, least volatile first,
    /// blocks the destination asks for first) and waits for the transfers.
    ///
    /// `max_concurrency` is the total number of blocks in flight across the
    /// group: every device gets one slot, the rest is shared in proportion
    /// to device size. `progress` sees every device's progress.
    /// Fails promptly if the connection drops.
    pub async fn migrate_all(
        &self,
        max_concurrency: usize,
        progress: Option<ProgressHandler>,
    ) -> Result<()> {
        let s = self.session("migrate_all")?;
        let shares = concurrency_shares(
            max_concurrency,
            &self
                .devices
                .iter()
                .map(|d| d.layout.size())
                .collect::<Vec<_>>(),
        );
        for (d, sd) in self.devices.iter().zip(&s.devices) {
            if sd.migrator().is_none() {
                if let Some(s3) = d.s3.get() {
                    or_closed(
                        &s.conn,
                        "alternate sources",
                        send_alternate_sources(d, sd, s3),
                    )
                    .await?;
                }
            }
        }
        let mut migrators = Vec::with_capacity(self.devices.len());
        for (d, sd) in self.devices.iter().zip(&s.devices) {
            let m = match sd.migrator() {
                Some(m) => m,
                None => {
                    let share = shares[d.index];
                    let cfg =
                        MigratorConfig::new(d.layout.block_size()).with_concurrency(Concurrency {
                            standard: share,
                            dirty: share,
                            priority: share.clamp(1, 8),
                        });
                    let m = Migrator::new(
                        Arc::new(d.dirty.clone()),
                        sd.dest.clone(),
                        sd.order.clone(),
                        cfg,
                    )
                    .map_err(|e| Error::storage(&d.name, "creating the migrator", e))?;
                    m.set_dirty_source(Arc::new(d.dirty.clone()));
                    if let Some(obs) = self.opts.block_observer.clone() {
                        let index = d.index;
                        m.set_block_observer(Arc::new(move |e| obs(index, e)));
                    }
                    let mut slot = sd.migrator.lock();
                    for b in sd.not_needed.iter_set() {
                        m.dont_need(b);
                    }
                    *slot = Some(m.clone());
                    m
                }
            };
            let slot = s.progress.clone();
            let handler = progress.clone();
            let index = d.index;
            m.set_progress_handler(Arc::new(move |p: &Progress| {
                let snapshot = {
                    let mut all = slot.lock();
                    all[index].progress = *p;
                    handler.as_ref().map(|_| all.clone())
                };
                if let (Some(h), Some(all)) = (&handler, snapshot) {
                    h(&all);
                }
            }));
            migrators.push(m);
        }
        let started = Instant::now();
        let work = try_join_all(self.devices.iter().zip(&s.devices).zip(&migrators).map(
            |((d, sd), m)| async move {
                self.send_unrequired(d, sd, m).await?;
                m.migrate_all()
                    .await
                    .map_err(|e| Error::storage(&d.name, "migrating", e))
            },
        ));
        let r = or_closed(&s.conn, "migrate_all", async { work.await.map(|_| ()) })
            .instrument(tracing::info_span!(
                "migrate_all",
                devices = self.devices.len()
            ))
            .await;
        if let Some(h) = &progress {
            let all = s.progress.lock().clone();
            h(&all);
        }
        tracing::info!(elapsed = ?started.elapsed(), ok = r.is_ok(), "bulk migration finished");
        r
    }

    /// Copy-on-write devices whose base is shared with the destination:
    /// blocks still equal to the base are not sent (you-already-have).
    async fn send_unrequired(&self, d: &Device, sd: &SendDevice, m: &Migrator) -> Result<()> {
        let Some(cow) = &d.built.cow else {
            return Ok(());
        };
        if !d.schema.source_shared {
            return Ok(());
        }
        if let Some(wc) = &d.built.write_cache {
            // Every write must reach the CoW layer before it is asked.
            wc.set_write_through(true)
                .await
                .map_err(|e| Error::storage(&d.name, "write cache write-through", e))?;
        }
        let blocks = cow.unrequired_blocks();
        for &b in &blocks {
            let r = d.layout.block_range(b);
            d.dirty.track_at(r.start, r.end - r.start);
        }
        // A write that raced the snapshot made its block local before it
        // tested the tracking bit; re-send such blocks.
        for &b in &blocks {
            if cow.is_local(b) {
                d.dirty.mark_block_dirty(b);
            }
            m.set_migrated(b);
        }
        if blocks.is_empty() {
            return Ok(());
        }
        tracing::debug!(device = %d.name, blocks = blocks.len(), "you already have");
        sd.to
            .send_you_already_have(d.layout.block_size() as u32, blocks)
            .await
            .map_err(|e| Error::protocol(format!("device {:?}: you-already-have", d.name), e))
    }

    /// Re-sends dirty blocks in rounds until every device has no more dirty
    /// data (or its hooks stop it); see [`MigrateDirtyHooks`] for the exact
    /// order of calls. Devices run their loops concurrently. Can be called
    /// again (continuous sync). Without custom hooks pass
    /// [`DefaultHooks`](crate::DefaultHooks): a device's loop ends when a
    /// round finds no dirty block, or by [`default_continue`](crate::hooks::default_continue)
    /// (no new minimum for 8 rounds, or 1000 rounds) while writers keep
    /// dirtying blocks — those blocks stay dirty for the next call.
    pub async fn migrate_dirty(&self, hooks: &dyn MigrateDirtyHooks) -> Result<()> {
        let s = self.session("migrate_dirty")?;
        let mut ms = Vec::new();
        for (d, sd) in self.devices.iter().zip(&s.devices) {
            // Dirty blocks changed after the S3 copy: they travel with data.
            sd.to.clear_alternate_sources();
            ms.push(sd.migrator().ok_or_else(|| {
                Error::State(format!(
                    "migrate_dirty needs migrate_all first (device {:?})",
                    d.name
                ))
            })?);
        }
        let loops = try_join_all(
            self.devices
                .iter()
                .zip(&s.devices)
                .zip(ms)
                .map(|((d, sd), m)| async move { dirty_loop(d, sd, m, hooks).await }),
        );
        or_closed(&s.conn, "migrate_dirty", async { loops.await.map(|_| ()) })
            .instrument(tracing::info_span!("migrate_dirty"))
            .await
    }

    /// Sends a completion event for every device and waits for each
    /// acknowledgement (the receiver checks that every block arrived).
    pub async fn completed(&self) -> Result<()> {
        let s = self.session("completed")?;
        for (d, sd) in self.devices.iter().zip(&s.devices) {
            if let Some(m) = sd.migrator() {
                m.wait_for_completion()
                    .await
                    .map_err(|e| Error::storage(&d.name, "waiting for transfers", e))?;
            }
        }
        let all = try_join_all(
            self.devices
                .iter()
                .zip(&s.devices)
                .map(|(d, sd)| async move {
                    sd.to
                        .send_event(Event::new(EventKind::Completed))
                        .await
                        .map_err(|e| Error::protocol(format!("device {:?}: completed", d.name), e))
                }),
        );
        or_closed(&s.conn, "completed", async { all.await.map(|_| ()) }).await
    }

    /// Sends application data (e.g. an authority-transfer message) to the
    /// receiver's [`DeviceGroup::handle_custom_data`] handler and waits until
    /// the handler has returned.
    pub async fn send_custom_data(&self, data: impl Into<Bytes>) -> Result<()> {
        let s = self.session("send_custom_data")?;
        let ev = Event::custom(CUSTOM_DATA, data.into());
        or_closed(&s.conn, "send_custom_data", async {
            s.conn
                .request_ack(0, Message::Event(ev))
                .await
                .map_err(|e| Error::protocol("send_custom_data", e))
        })
        .await
    }

    /// The consistent cut-over, in one call:
    ///
    /// 1. [`lock_all`](DeviceGroup::lock_all): application writes pause (the
    ///    call returns once writes in progress finished);
    /// 2. [`migrate_dirty`](DeviceGroup::migrate_dirty) with the default
    ///    hooks: with writers paused the loop ends when a round finds nothing;
    /// 3. `authority` (if any) is sent with
    ///    [`send_custom_data`](DeviceGroup::send_custom_data): the receiver
    ///    may resume the workload when its handler sees it;
    /// 4. [`completed`](DeviceGroup::completed).
    ///
    /// The source stays locked afterwards (its data is now stale);
    /// [`unlock_all`](DeviceGroup::unlock_all) resumes it, e.g. after a
    /// failed cut-over. Returns the time from the lock to the receiver's
    /// last completion ack.
    pub async fn cut_over(&self, authority: Option<Bytes>) -> Result<Duration> {
        let started = Instant::now();
        async {
            self.lock_all().await;
            self.migrate_dirty(&crate::hooks::DefaultHooks).await?;
            if let Some(a) = authority {
                self.send_custom_data(a).await?;
            }
            self.completed().await
        }
        .instrument(tracing::info_span!("cut_over"))
        .await?;
        let took = started.elapsed();
        tracing::info!(?took, "cut-over complete");
        Ok(took)
    }

    // ----- receiving -----

    /// Installs the handler of custom data sent with
    /// [`DeviceGroup::send_custom_data`] (replacing any previous one). Data
    /// that arrived before is delivered to it. Receiving groups only.
    pub fn handle_custom_data(&self, handler: impl Fn(Bytes) + Send + Sync + 'static) {
        if let Some(r) = &self.receiving {
            *r.custom.lock() = Some(Arc::new(handler));
            r.custom_set.notify_waiters();
        }
    }

    /// Waits until the sender marked every device completed (every block
    /// arrived). Fails if the connection drops before that — never reports
    /// completion falsely. A sending group returns at once.
    pub async fn wait_for_completion(&self) -> Result<()> {
        let Some(r) = &self.receiving else {
            return Ok(());
        };
        loop {
            let changed = r.changed.notified();
            if r.all_completed() {
                return Ok(());
            }
            if let Some(why) = r.failure.lock().clone() {
                return Err(Error::Disconnected {
                    context: "waiting for the migration to complete".into(),
                    reason: why,
                });
            }
            changed.await;
        }
    }

    /// Which devices the sender marked completed (receiving groups).
    pub fn completed_devices(&self) -> Vec<bool> {
        match &self.receiving {
            Some(r) => r
                .completed
                .iter()
                .map(|c| c.load(Ordering::SeqCst))
                .collect(),
            None => vec![true; self.devices.len()],
        }
    }

    // ----- shutdown -----

    /// Stops every migration and task, closes the migration connections,
    /// unlocks and closes every device (waiters of missing blocks fail),
    /// removes NBD exports. Errors are
    /// collected; the first is returned. Closing twice is not an error.
    pub async fn close_all(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        if let Some(session) = self.session.lock().take() {
            // Queued frames are still written, then the stream shuts down.
            session.conn.close();
        }
        if let Some(r) = &self.receiving {
            r.conn.close();
        }
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
        let results = join_all(
            self.devices
                .iter()
                .map(|d| close_device(d, self.opts.nbd.as_ref())),
        )
        .await;
        results.into_iter().collect::<Result<Vec<_>>>().map(|_| ())
    }
}

/// `schema` as it is sent to a receiver: S3 keys blanked (they never travel;
/// the receiver's policy supplies its own).
fn without_credentials(schema: &DeviceSchema) -> DeviceSchema {
    let mut s = schema.clone();
    let mut at = Some(&mut s);
    while let Some(d) = at {
        if let Some(sync) = d.sync.as_mut() {
            sync.access_key.clear();
            sync.secret_key.clear();
        }
        at = d.source.as_deref_mut();
    }
    s
}

/// Stops a device's S3 sync and tells the receiver which blocks it can
/// fetch from S3. A receiver that declines (no S3 settings, bucket not
/// reachable, manifest mismatch) gets every block over the wire instead.
async fn send_alternate_sources(d: &Device, sd: &SendDevice, s3: &SendS3) -> Result<()> {
    let list = s3.stop_for_migration(&d.layout).await;
    if list.is_empty() {
        return Ok(());
    }
    let n = list.len();
    match sd.to.send_alternate_sources(list).await {
        Ok(()) => {
            tracing::info!(device = %d.name, blocks = n, "S3 assist: alternate sources sent");
            Ok(())
        }
        Err(e @ silo_protocol::Error::ConnectionClosed(_)) => Err(Error::protocol(
            format!("device {:?}: alternate sources", d.name),
            e,
        )),
        Err(e) => {
            tracing::warn!(device = %d.name, error = %e,
                "the receiver declined S3 assist; sending every block over the wire");
            sd.to.clear_alternate_sources();
            Ok(())
        }
    }
}

async fn dirty_loop(
    d: &Device,
    sd: &SendDevice,
    m: Migrator,
    hooks: &dyn MigrateDirtyHooks,
) -> Result<()> {
    let i = d.index;
    let to = &*sd.to;
    let mut history: Vec<usize> = Vec::new();
    loop {
        hooks.pre_get_dirty(i, to, &history).await?;
        // Transfers of earlier rounds (and the bulk pass) are done first, so
        // a block is not re-read while its previous send is in flight.
        m.wait_for_completion()
            .await
            .map_err(|e| Error::storage(&d.name, "dirty round", e))?;
        let blocks = d.dirty.take_dirty();
        if !hooks.post_get_dirty(i, to, &history, &blocks).await? {
            for &b in &blocks {
                d.dirty.mark_block_dirty(b);
            }
            break;
        }
        if blocks.is_empty() {
            break;
        }
        tracing::debug!(device = %d.name, dirty = blocks.len(), round = history.len(), "dirty round");
        to.send_dirty_list(d.layout.block_size() as u32, blocks.clone())
            .await
            .map_err(|e| Error::protocol(format!("device {:?}: dirty list", d.name), e))?;
        m.migrate_dirty(&blocks)
            .await
            .map_err(|e| Error::storage(&d.name, "dirty round", e))?;
        m.wait_for_completion()
            .await
            .map_err(|e| Error::storage(&d.name, "dirty round", e))?;
        history.push(blocks.len());
        if !hooks.post_migrate_dirty(i, to, &history).await? {
            break;
        }
    }
    hooks.completed(i, to, &history).await;
    Ok(())
}

/// Splits `max` slots over devices of `sizes`: one each, the rest in
/// proportion to size.
pub(crate) fn concurrency_shares(max: usize, sizes: &[u64]) -> Vec<usize> {
    let n = sizes.len();
    let max = max.max(n);
    let rest = (max - n) as u128;
    let total: u128 = sizes.iter().map(|&s| u128::from(s)).sum::<u128>().max(1);
    sizes
        .iter()
        .map(|&s| 1 + (rest * u128::from(s) / total) as usize)
        .collect()
}

async fn custom_data_loop(r: Arc<Receiving>, mut events: silo_protocol::Incoming) {
    loop {
        let Ok(req) = events.recv().await else { return };
        let payload = match &req.message {
            Message::Event(Event {
                kind: EventKind::Custom(CUSTOM_DATA),
                payload,
            }) => payload.clone(),
            _ => {
                let _ = req.respond_error(
                    ErrorCode::Unsupported,
                    "only custom data (sub-type 0) is handled on device 0",
                );
                continue;
            }
        };
        let deadline = tokio::time::Instant::now() + r.custom_wait;
        let handler = loop {
            let set = r.custom_set.notified();
            if let Some(h) = r.custom.lock().clone() {
                break Some(h);
            }
            if tokio::time::timeout_at(deadline, set).await.is_err() {
                break None;
            }
        };
        match handler {
            Some(h) => {
                h(payload);
                let _ = req.respond(Message::Ack).await;
            }
            None => {
                tracing::warn!("custom data refused: no handler installed");
                let _ = req.respond_error(ErrorCode::Unhandled, "no custom data handler installed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_give_each_device_one_and_split_the_rest_by_size() {
        assert_eq!(concurrency_shares(10, &[100, 100]), vec![5, 5]);
        assert_eq!(concurrency_shares(1, &[100, 100, 1]), vec![1, 1, 1]);
        let s = concurrency_shares(100, &[1 << 30, 1 << 20, 1 << 30, 1]);
        assert!(s.iter().all(|&x| x >= 1));
        assert!(s.iter().sum::<usize>() <= 100);
        assert!(s[0] > s[1]);
    }
}
