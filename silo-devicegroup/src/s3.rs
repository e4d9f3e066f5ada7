//! S3 in the device group: the `sync { … }` block of a sending device
//! (continuous sync to S3), S3-assisted migration on both sides, and the
//! mapping of a schema to [`S3Config`]/[`SyncSettings`].
//!
//! # Assisted migration
//!
//! ```text
//!  sender                                   receiver
//!  S3Sync ──stop──► safe blocks (b, sha256)
//!  AlternateSources ───────────────────────► opens the grab store with its
//!                                            own credentials (manifest checked)
//!  migrator reads b; sha256 still equal?
//!    yes: WriteAtHash(b, h) ───────────────► ack, queue b ──► grab workers:
//!    no:  WriteAt(b, data)  ───────────────►   GET b, verify h, write b
//!  DirtyList / WriteAt (P2P) ──────────────►   P2P always wins over S3
//!                                              mismatch / S3 error:
//!                            ◄──── ReadAt(b) ──  fetch b from the source
//!  Completed ──────────────────────────────► waits until the queue is empty
//! ```
//!
//! Rules that make it safe:
//! * A block is only hash-written when the sender's *current* data still
//!   hashes to the listed value, and blocks the destination waits for
//!   (need-at) and dirty re-sends always travel with data.
//! * On the receiver every write from the wire and every dirty list marks
//!   the block *superseded* under a per-block lock; a grab writes only if
//!   the block is not superseded, under the same lock. So an S3 copy never
//!   overwrites newer data, and a dirty block is never marked present with
//!   its old S3 copy.
//! * A grab that fails (S3 down, object changed, hash mismatch) falls back
//!   to reading the block from the source over the migration connection.
//!   A reader of a queued block moves it to the front of the queue. The
//!   completion event is acknowledged only once every queued block has
//!   been written, so completion still means every block is present.
//! * Credentials never travel: the receiver grabs with its own
//!   [`ReceiverS3`](crate::ReceiverS3) settings (the policy replaces the
//!   sender's), and receives only block numbers and hashes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use silo_protocol::bridge::FromProtocol;
use silo_protocol::AlternateSource;
use silo_s3::hashindex::{sha256, zero_hash};
use silo_s3::{
    open_grab_source, BlockStore, Credentials, RetrySettings, S3Config, S3Sync, SyncSettings,
};
use silo_storage::bitfield::Bitfield;
use silo_storage::waiting::WaitingCacheRemote;
use silo_storage::{BlockLayout, Capabilities, Provider};
use tokio::sync::{mpsc, Notify, Semaphore};

use crate::schema::{DeviceSchema, SyncSchema};

/// Key prefix of a device in its bucket: `<prefix>/<name>`, or `<name>`
/// when `prefix` is empty (Go silo appends the device name to the prefix
/// too, so one prefix serves a whole group).
pub fn device_prefix(prefix: &str, name: &str) -> String {
    let p = prefix.trim_matches('/');
    if p.is_empty() {
        name.to_string()
    } else {
        format!("{p}/{name}")
    }
}

/// The S3 location of device `d` per its `sync` block, under key prefix
/// `prefix` (the upload prefix, or the grab prefix on a receiver), with
/// `retry` as the retry policy.
///
/// `endpoint` is `host:port` as in Go silo (`secure` picks `https`), or a
/// full URL. Objects are one per `blocksize` (the migration block size,
/// which S3-assisted migration needs: a block is hash-written only when its
/// range is exactly one stored object).
pub fn sync_s3_config(
    d: &DeviceSchema,
    sync: &SyncSchema,
    prefix: &str,
    retry: RetrySettings,
) -> S3Config {
    let endpoint = if sync.endpoint.contains("://") {
        sync.endpoint.clone()
    } else {
        let scheme = if sync.secure { "https" } else { "http" };
        format!("{scheme}://{}", sync.endpoint)
    };
    let mut cfg = S3Config::new(
        Some(endpoint),
        sync.bucket.clone(),
        device_prefix(prefix, &d.name),
        Credentials::new(sync.access_key.clone(), sync.secret_key.clone()),
        d.size_bytes(),
    );
    cfg.allow_http = !sync.secure;
    cfg.block_size = d.block_size_bytes();
    cfg.concurrency = (sync.config.concurrency as usize).max(1);
    cfg.retry = retry;
    cfg
}

/// Where and how `system = "s3"` devices reach S3: the endpoint and the
/// credentials. They are never part of a schema (Go silo keeps keys in
/// plaintext in its configs); set them in
/// [`BuildOptions::s3`](crate::BuildOptions::s3), or let
/// [`S3Access::from_env`] read the usual AWS variables.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct S3Access {
    /// Endpoint URL (`http://127.0.0.1:9000`); `None` means AWS.
    pub endpoint: Option<String>,
    /// Credentials.
    pub credentials: Credentials,
    /// Allow a plain-HTTP endpoint.
    pub allow_http: bool,
    /// Concurrent requests per device.
    pub concurrency: usize,
    /// Retry policy.
    pub retry: RetrySettings,
}

impl S3Access {
    /// Access to `endpoint` with `credentials` (plain HTTP allowed when the
    /// endpoint URL says `http://`), 16 concurrent requests, default retries.
    pub fn new(endpoint: Option<String>, credentials: Credentials) -> Self {
        let allow_http = endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"));
        S3Access {
            endpoint,
            credentials,
            allow_http,
            concurrency: silo_s3::config::DEFAULT_CONCURRENCY,
            retry: RetrySettings::default(),
        }
    }

    /// From the environment: `AWS_ENDPOINT_URL` (optional),
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`.
    pub fn from_env() -> Result<Self, silo_s3::S3Error> {
        let endpoint = std::env::var("AWS_ENDPOINT_URL")
            .ok()
            .filter(|e| !e.is_empty());
        Ok(S3Access::new(endpoint, Credentials::from_env()?))
    }

    /// The configuration of `system = "s3"` device `d`.
    pub fn device_config(&self, d: &DeviceSchema) -> Result<S3Config, String> {
        let location = d
            .location
            .as_deref()
            .map(|l| l.to_string_lossy().into_owned())
            .ok_or_else(|| format!("device {:?}: system s3 needs a location", d.name))?;
        let (bucket, prefix) = parse_s3_location(&location)?;
        let mut cfg = S3Config::new(
            self.endpoint.clone(),
            bucket,
            prefix,
            self.credentials.clone(),
            d.size_bytes(),
        );
        cfg.allow_http = self.allow_http;
        cfg.block_size = d.block_size_bytes();
        cfg.concurrency = self.concurrency.max(1);
        cfg.retry = self.retry.clone();
        Ok(cfg)
    }
}

/// Splits `s3://bucket/prefix` into bucket and key prefix (which may be
/// empty).
pub fn parse_s3_location(location: &str) -> Result<(String, String), String> {
    let rest = location.strip_prefix("s3://").ok_or_else(|| {
        format!("an s3 device's location must look like s3://bucket/prefix, not {location:?}")
    })?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(format!("no bucket in the s3 location {location:?}"));
    }
    let prefix = prefix.trim_matches('/');
    if prefix.split('/').any(|part| part == "." || part == "..") {
        return Err(format!(
            "the s3 location {location:?} has a . or .. segment"
        ));
    }
    Ok((bucket.to_string(), prefix.to_string()))
}

/// The sync settings of a `sync` block.
///
/// S3 objects and dirty tracking are per `blocksize`; `blockshift` (Go
/// silo's finer dirty-tracking granularity) is accepted and validated but
/// does not change what is uploaded: a dirty block is always uploaded
/// whole.
pub fn sync_settings(sync: &SyncSchema) -> SyncSettings {
    let c = &sync.config;
    SyncSettings {
        only_dirty: c.only_dirty,
        block_shift: 0,
        max_age: c.max_age,
        min_changed: c.min_changed,
        check_period: c.check_period,
        limit: (c.limit as usize).max(1),
        concurrency: (c.concurrency as usize).max(1),
        autostart: sync.auto_start,
        ..SyncSettings::default()
    }
}

/// A sending device's S3 sync.
pub(crate) struct SendS3 {
    pub sync: S3Sync,
    /// `"endpoint bucket prefix"`, sent with the alternate sources.
    pub location: String,
    /// Whether the sync was stopped for a migration.
    pub stopped_for_migration: AtomicBool,
}

impl SendS3 {
    /// Stops the sync and returns the blocks whose S3 copy equals the
    /// device now, as alternate sources.
    pub async fn stop_for_migration(&self, layout: &BlockLayout) -> Vec<AlternateSource> {
        self.stopped_for_migration.store(true, Ordering::SeqCst);
        let safe = self.sync.stop().await;
        safe.into_iter()
            .filter(|s| s.block < layout.num_blocks())
            .map(|s| {
                let r = layout.block_range(s.block);
                AlternateSource {
                    offset: r.start,
                    length: r.end - r.start,
                    sha256: s.hash,
                    location: self.location.clone(),
                }
            })
            .collect()
    }
}

/// Counters of a receiving device's S3 assist.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AssistMetrics {
    /// Blocks the sender listed as available from S3.
    pub listed: u64,
    /// Blocks the sender hash-wrote (to be fetched from S3).
    pub hash_writes: u64,
    /// Blocks fetched from S3, verified and written.
    pub grabbed: u64,
    /// Bytes of those blocks.
    pub grabbed_bytes: u64,
    /// Blocks fetched from the source instead (S3 failed or mismatched).
    pub fallbacks: u64,
    /// Of those, blocks whose S3 content did not match the hash.
    pub mismatches: u64,
    /// Grabs dropped because newer data had arrived over the wire.
    pub superseded: u64,
    /// Blocks queued and not yet written.
    pub pending: u64,
}

#[derive(Default)]
struct Counters {
    listed: AtomicU64,
    hash_writes: AtomicU64,
    grabbed: AtomicU64,
    grabbed_bytes: AtomicU64,
    fallbacks: AtomicU64,
    mismatches: AtomicU64,
    superseded: AtomicU64,
}

const STRIPES: usize = 64;

/// The receiver's side of S3-assisted migration for one device (see the
/// module documentation). Every receiving device has one: without S3
/// settings it refuses alternate sources and serves hash writes (which a
/// well-behaved sender then does not send) from the source.
pub(crate) struct Assist {
    name: String,
    layout: BlockLayout,
    config: Option<S3Config>,
    grab_concurrency: usize,
    store: Mutex<Option<BlockStore>>,
    /// Blocks whose data arrived over the wire (or were dirtied): an S3
    /// copy must not be written over them.
    superseded: Bitfield,
    /// Blocks queued for a grab.
    queued: Bitfield,
    hashes: Mutex<HashMap<u64, [u8; 32]>>,
    stripes: Box<[tokio::sync::Mutex<()>]>,
    normal: mpsc::UnboundedSender<u64>,
    urgent: mpsc::UnboundedSender<u64>,
    rx: Mutex<Option<(mpsc::UnboundedReceiver<u64>, mpsc::UnboundedReceiver<u64>)>>,
    pending: AtomicU64,
    idle: Notify,
    counters: Counters,
}

impl Assist {
    /// `config`: the receiver's grab location (its credentials, the
    /// sender's prefix), if it has S3 settings for this device.
    pub fn new(
        name: &str,
        layout: BlockLayout,
        config: Option<S3Config>,
        grab_concurrency: usize,
    ) -> Arc<Assist> {
        let (normal, nrx) = mpsc::unbounded_channel();
        let (urgent, urx) = mpsc::unbounded_channel();
        Arc::new(Assist {
            name: name.to_string(),
            layout,
            config,
            grab_concurrency: grab_concurrency.max(1),
            store: Mutex::new(None),
            superseded: Bitfield::new(layout.num_blocks()),
            queued: Bitfield::new(layout.num_blocks()),
            hashes: Mutex::new(HashMap::new()),
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            normal,
            urgent,
            rx: Mutex::new(Some((nrx, urx))),
            pending: AtomicU64::new(0),
            idle: Notify::new(),
            counters: Counters::default(),
        })
    }

    fn stripe(&self, b: u64) -> &tokio::sync::Mutex<()> {
        &self.stripes[(b % STRIPES as u64) as usize]
    }

    /// Counters.
    pub fn metrics(&self) -> AssistMetrics {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let c = &self.counters;
        AssistMetrics {
            listed: l(&c.listed),
            hash_writes: l(&c.hash_writes),
            grabbed: l(&c.grabbed),
            grabbed_bytes: l(&c.grabbed_bytes),
            fallbacks: l(&c.fallbacks),
            mismatches: l(&c.mismatches),
            superseded: l(&c.superseded),
            pending: l(&self.pending),
        }
    }

    /// The sender's list of blocks available from S3: opens the grab store
    /// (once) and checks its manifest against this device. An error means
    /// "no assist" (the sender then sends everything itself).
    pub async fn alternate_sources(&self, list: &[AlternateSource]) -> Result<(), String> {
        let Some(cfg) = &self.config else {
            return Err(format!(
                "device {:?}: the receiver has no S3 settings for this device",
                self.name
            ));
        };
        let opened = self.store.lock().is_some();
        if !opened {
            let store = open_grab_source(cfg).await.map_err(|e| {
                format!(
                    "device {:?}: cannot use S3 at {} bucket {:?} prefix {:?}: {e}",
                    self.name,
                    cfg.endpoint_name(),
                    cfg.bucket,
                    cfg.prefix
                )
            })?;
            *self.store.lock() = Some(store);
        }
        self.counters
            .listed
            .fetch_add(list.len() as u64, Ordering::Relaxed);
        tracing::info!(device = %self.name, blocks = list.len(), "S3 assist: alternate sources");
        Ok(())
    }

    /// A write-at-hash: queue block `b` for a grab.
    pub fn hash_write(&self, offset: u64, length: u64, hash: [u8; 32]) -> Result<(), String> {
        let bs = self.layout.block_size();
        let b = offset / bs;
        if offset % bs != 0 || b >= self.layout.num_blocks() || self.layout.block_len(b) != length {
            return Err(format!(
                "write-at-hash {offset}+{length} is not one block of device {:?}",
                self.name
            ));
        }
        self.counters.hash_writes.fetch_add(1, Ordering::Relaxed);
        self.hashes.lock().insert(b, hash);
        if self.queued.set_if_clear(b) {
            self.pending.fetch_add(1, Ordering::SeqCst);
            // The receiver half lives as long as the dispatcher; if it is
            // gone the group is closing and nothing waits for the block.
            let _ = self.normal.send(b);
        }
        Ok(())
    }

    /// A local reader waits for `[offset, offset+len)`: queued blocks in it
    /// jump the grab queue.
    pub fn prioritise(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.layout.size() {
            return;
        }
        let len = len.min(self.layout.size() - offset);
        for b in self.layout.blocks_touching(offset, len) {
            if self.queued.test(b) {
                let _ = self.urgent.send(b);
            }
        }
    }

    /// A dirty list: the blocks' S3 copies (and any grab in progress) are
    /// stale; mark them absent in the waiting cache.
    pub async fn dirty(&self, remote: &WaitingCacheRemote, blocks: &[u64]) {
        for &b in blocks {
            let _g = self.stripe(b).lock().await;
            self.superseded.set(b);
            remote.dirty(&[b]);
        }
    }

    /// Waits until every queued block has been written (or the group closes).
    pub async fn wait_idle(&self) {
        loop {
            let n = self.idle.notified();
            if self.pending.load(Ordering::SeqCst) == 0 {
                return;
            }
            n.await;
        }
    }

    fn done_one(&self) {
        if self.pending.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// Starts the grab dispatcher (once). It runs until the group aborts it.
    pub fn spawn_dispatcher(
        self: &Arc<Self>,
        from: Arc<FromProtocol>,
        remote: WaitingCacheRemote,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let (mut normal, mut urgent) = self.rx.lock().take()?;
        let me = self.clone();
        Some(tokio::spawn(async move {
            let limit = Arc::new(Semaphore::new(me.grab_concurrency));
            loop {
                let Ok(permit) = limit.clone().acquire_owned().await else {
                    return;
                };
                let b = tokio::select! {
                    biased;
                    Some(b) = urgent.recv() => b,
                    Some(b) = normal.recv() => b,
                    else => return,
                };
                if !me.queued.clear_if_set(b) {
                    continue; // already taken (urgent and normal copies)
                }
                let me = me.clone();
                let from = from.clone();
                let remote = remote.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    me.grab(b, &from, &remote).await;
                    me.done_one();
                });
            }
        }))
    }

    async fn grab(&self, b: u64, from: &FromProtocol, remote: &WaitingCacheRemote) {
        let r = self.layout.block_range(b);
        let (offset, len) = (r.start, r.end - r.start);
        if self.superseded.test(b) {
            self.counters.superseded.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Some(hash) = self.hashes.lock().get(&b).copied() else {
            return;
        };
        let store = self.store.lock().clone();
        let from_s3 = match &store {
            Some(store) => match store.get_block(b).await {
                Ok(Some(d)) if d.len() as u64 == len && sha256(&d) == hash => Some(Some(d)),
                Ok(None) if zero_hash(len) == hash => Some(None),
                Ok(_) => {
                    self.counters.mismatches.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(device = %self.name, block = b,
                        "S3 copy does not match the advertised hash; fetching it from the source");
                    None
                }
                Err(e) => {
                    tracing::warn!(device = %self.name, block = b, error = %e,
                        "S3 grab failed; fetching the block from the source");
                    None
                }
            },
            None => None,
        };
        let data = match from_s3 {
            Some(d) => {
                self.counters.grabbed.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .grabbed_bytes
                    .fetch_add(len, Ordering::Relaxed);
                d
            }
            None => {
                if self.superseded.test(b) {
                    self.counters.superseded.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                match from.read_remote(offset, len as u32).await {
                    Ok(d) => {
                        self.counters.fallbacks.fetch_add(1, Ordering::Relaxed);
                        Some(d)
                    }
                    Err(e) => {
                        // The connection is gone: the group's watcher
                        // fails readers of missing blocks.
                        tracing::warn!(device = %self.name, block = b, error = %e,
                            "could not fetch a block from the source");
                        return;
                    }
                }
            }
        };
        let _g = self.stripe(b).lock().await;
        if self.superseded.test(b) {
            self.counters.superseded.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let written = match data {
            Some(d) => remote.write_at(offset, d).await,
            None => remote.write_zeroes(offset, len).await,
        };
        if let Err(e) = written {
            tracing::warn!(device = %self.name, block = b, error = %e, "writing a grabbed block failed");
        }
    }
}

/// The provider the receiver's protocol handler writes into: the waiting
/// cache's remote side, with every write marking its blocks superseded
/// under their stripe locks (data over the wire always wins over S3).
pub(crate) struct AssistedRemote {
    pub remote: WaitingCacheRemote,
    pub assist: Arc<Assist>,
}

impl AssistedRemote {
    async fn guarded<F, Fut>(&self, offset: u64, len: u64, f: F) -> silo_storage::Result<()>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = silo_storage::Result<()>>,
    {
        let layout = &self.assist.layout;
        if len == 0 || offset >= layout.size() {
            return f().await;
        }
        let len = len.min(layout.size() - offset);
        let blocks: Vec<u64> = layout.blocks_touching(offset, len).collect();
        // Stripes in ascending order, each once: no lock-order deadlock.
        let mut stripes: Vec<usize> = blocks
            .iter()
            .map(|b| (b % STRIPES as u64) as usize)
            .collect();
        stripes.sort_unstable();
        stripes.dedup();
        let mut guards = Vec::with_capacity(stripes.len());
        for s in stripes {
            guards.push(self.assist.stripes[s].lock().await);
        }
        for &b in &blocks {
            self.assist.superseded.set(b);
        }
        f().await
    }
}

#[async_trait]
impl Provider for AssistedRemote {
    fn size(&self) -> u64 {
        self.remote.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.remote.capabilities()
    }
    async fn read_at(&self, offset: u64, buf: BytesMut) -> silo_storage::Result<BytesMut> {
        self.remote.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: Bytes) -> silo_storage::Result<()> {
        let len = data.len() as u64;
        self.guarded(offset, len, || self.remote.write_at(offset, data))
            .await
    }
    async fn flush(&self) -> silo_storage::Result<()> {
        self.remote.flush().await
    }
    async fn trim(&self, offset: u64, len: u64) -> silo_storage::Result<()> {
        self.guarded(offset, len, || self.remote.trim(offset, len))
            .await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> silo_storage::Result<()> {
        self.guarded(offset, len, || self.remote.write_zeroes(offset, len))
            .await
    }
    fn cancel_writes(&self, offset: u64, len: u64) {
        self.remote.cancel_writes(offset, len)
    }
    async fn close(&self) -> silo_storage::Result<()> {
        self.remote.close().await
    }
}
