//! [`BlockStore`]: the object layer of an S3-backed device — one object per
//! block, the manifest and the hash index — with a concurrency limit,
//! metrics and error classification. [`S3Storage`](crate::S3Storage), the
//! sync and the grab helper are all built on it.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore, PutPayload};
use silo_storage::BlockLayout;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::config::S3Config;
use crate::error::{Result, S3Error};
use crate::keys::{parse_prefix, Keys};
use crate::manifest::Manifest;
use crate::metrics::S3Metrics;

/// Largest non-block object (manifest, hash index) we are willing to read.
pub const MAX_META_OBJECT: u64 = 1 << 30;

/// The objects of one device in one bucket.
#[derive(Clone)]
pub struct BlockStore {
    store: Arc<dyn ObjectStore>,
    keys: Keys,
    layout: BlockLayout,
    endpoint: String,
    bucket: String,
    limit: Arc<Semaphore>,
    concurrency: usize,
    metrics: Arc<S3Metrics>,
}

impl std::fmt::Debug for BlockStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockStore")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("prefix", &self.keys.prefix().as_ref())
            .field("layout", &self.layout)
            .finish()
    }
}

/// Decides whether an `object_store` error is an authentication failure.
/// The S3 client reports 401/403 on object requests as typed variants; on
/// some paths (listing) they come back as `Generic` with the HTTP status in
/// the message, which is the only place left to look.
fn is_auth_error(e: &object_store::Error) -> bool {
    match e {
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => true,
        object_store::Error::Generic { source, .. } => {
            let s = source.to_string();
            s.contains("403 Forbidden") || s.contains("401 Unauthorized")
        }
        _ => false,
    }
}

/// A LIST of a missing bucket: typed `NotFound`, or (on the S3 client's
/// listing path) `Generic` carrying S3's `NoSuchBucket` code.
fn is_missing_bucket(e: &object_store::Error) -> bool {
    match e {
        object_store::Error::NotFound { .. } => true,
        object_store::Error::Generic { source, .. } => source.to_string().contains("NoSuchBucket"),
        _ => false,
    }
}

impl BlockStore {
    /// The object layer for `config` (builds the S3 client; no I/O).
    pub fn from_config(config: &S3Config) -> Result<Self> {
        let store = Arc::new(config.build_store()?);
        Self::new(
            store,
            &config.prefix,
            BlockLayout::new(config.size, config.block_size).map_err(S3Error::from)?,
            config.concurrency,
            config.endpoint_name(),
            config.bucket.clone(),
        )
    }

    /// The object layer over any `object_store` (e.g. `InMemory` for unit
    /// tests).
    pub fn new(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        layout: BlockLayout,
        concurrency: usize,
        endpoint: String,
        bucket: String,
    ) -> Result<Self> {
        if concurrency == 0 {
            return Err(S3Error::Config("concurrency must be at least 1".into()));
        }
        if layout.block_size() > (1 << 30) {
            return Err(S3Error::Config("block size larger than 1 GiB".into()));
        }
        Ok(BlockStore {
            store,
            keys: Keys::new(parse_prefix(prefix)?),
            layout,
            endpoint,
            bucket,
            limit: Arc::new(Semaphore::new(concurrency)),
            concurrency,
            metrics: Arc::new(S3Metrics::default()),
        })
    }

    /// The same objects with a different geometry (e.g. for the grab of a
    /// device whose manifest was just read). Shares client, limit and
    /// metrics.
    pub fn with_layout(&self, layout: BlockLayout) -> Self {
        BlockStore {
            layout,
            ..self.clone()
        }
    }

    /// Geometry of the device.
    pub fn layout(&self) -> BlockLayout {
        self.layout
    }

    /// Object names.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The underlying client.
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Maximum concurrent requests.
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// Request counters.
    pub fn metrics(&self) -> &Arc<S3Metrics> {
        &self.metrics
    }

    /// `endpoint bucket/prefix`, for messages and alternate-source locations.
    pub fn location(&self) -> String {
        format!(
            "{} {}/{}",
            self.endpoint,
            self.bucket,
            self.keys.prefix().as_ref()
        )
    }

    pub(crate) fn classify(&self, e: object_store::Error, context: String) -> S3Error {
        self.metrics.error();
        if is_auth_error(&e) {
            return S3Error::Authentication {
                endpoint: self.endpoint.clone(),
                bucket: self.bucket.clone(),
                context,
                source: Box::new(e),
            };
        }
        warn!(error = %e, %context, "S3 request failed");
        S3Error::Request {
            context,
            source: Box::new(e),
        }
    }

    async fn permit(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.limit
            .acquire()
            .await
            .expect("the request semaphore is never closed")
    }

    /// GETs an object; `Ok(None)` when it does not exist.
    async fn get_object(
        &self,
        path: &Path,
        range: Option<std::ops::Range<u64>>,
        merge: bool,
    ) -> Result<Option<Bytes>> {
        let _permit = self.permit().await;
        let _g = self.metrics.inflight(false);
        let t = Instant::now();
        let opts = GetOptions {
            range: range.clone().map(GetRange::Bounded),
            ..Default::default()
        };
        let res = match self.store.get_opts(path, opts).await {
            Ok(r) => r.bytes().await,
            Err(e) => Err(e),
        };
        match res {
            Ok(b) => {
                self.metrics
                    .get_done(b.len() as u64, false, merge, t.elapsed());
                Ok(Some(b))
            }
            Err(object_store::Error::NotFound { .. }) => {
                self.metrics.get_done(0, true, merge, t.elapsed());
                Ok(None)
            }
            Err(e) => Err(self.classify(e, format!("reading `{path}`"))),
        }
    }

    /// PUTs an object.
    async fn put_object(&self, path: &Path, data: Bytes) -> Result<()> {
        let _permit = self.permit().await;
        let _g = self.metrics.inflight(true);
        let t = Instant::now();
        let len = data.len() as u64;
        match self.store.put(path, PutPayload::from(data)).await {
            Ok(_) => {
                self.metrics.put_done(len, t.elapsed());
                Ok(())
            }
            Err(object_store::Error::NotFound { .. }) => {
                self.metrics.error();
                Err(S3Error::BucketNotFound {
                    endpoint: self.endpoint.clone(),
                    bucket: self.bucket.clone(),
                })
            }
            Err(e) => Err(self.classify(e, format!("writing `{path}`"))),
        }
    }

    /// DELETEs an object; deleting a missing object succeeds.
    async fn delete_object(&self, path: &Path) -> Result<()> {
        let _permit = self.permit().await;
        let _g = self.metrics.inflight(true);
        match self.store.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                self.metrics.delete_done();
                Ok(())
            }
            Err(e) => Err(self.classify(e, format!("deleting `{path}`"))),
        }
    }

    fn check_block(&self, b: u64) -> Result<u64> {
        let len = self.layout.block_len(b);
        if len == 0 {
            return Err(S3Error::Config(format!(
                "block {b} is outside a device of {} blocks",
                self.layout.num_blocks()
            )));
        }
        Ok(len)
    }

    /// Reads block `b` whole; `None` if it was never written (or trimmed).
    /// An object of the wrong length is reported as corrupt.
    pub async fn get_block(&self, b: u64) -> Result<Option<Bytes>> {
        self.get_block_inner(b, false).await
    }

    pub(crate) async fn get_block_inner(&self, b: u64, merge: bool) -> Result<Option<Bytes>> {
        let len = self.check_block(b)?;
        let path = self.keys.block(b);
        let data = self.get_object(&path, None, merge).await?;
        if let Some(d) = &data {
            if d.len() as u64 != len {
                return Err(S3Error::Corrupt {
                    key: path.to_string(),
                    reason: format!("block object is {} bytes, expected {len}", d.len()),
                });
            }
        }
        Ok(data)
    }

    /// Reads `range` (relative to the block start) of block `b`; `None` if
    /// the block was never written.
    pub async fn get_block_range(
        &self,
        b: u64,
        range: std::ops::Range<u64>,
    ) -> Result<Option<Bytes>> {
        let len = self.check_block(b)?;
        if range.start >= range.end || range.end > len {
            return Err(S3Error::Config(format!(
                "range {range:?} is not inside block {b} of {len} bytes"
            )));
        }
        if range.start == 0 && range.end == len {
            return self.get_block(b).await;
        }
        let path = self.keys.block(b);
        let want = range.end - range.start;
        let data = self.get_object(&path, Some(range), false).await?;
        if let Some(d) = &data {
            if d.len() as u64 != want {
                return Err(S3Error::Corrupt {
                    key: path.to_string(),
                    reason: format!("ranged read returned {} bytes, expected {want}", d.len()),
                });
            }
        }
        Ok(data)
    }

    /// Stores block `b`; `data` must be exactly the block's length (shorter
    /// for a trailing partial block).
    pub async fn put_block(&self, b: u64, data: Bytes) -> Result<()> {
        let len = self.check_block(b)?;
        if data.len() as u64 != len {
            return Err(S3Error::Config(format!(
                "block {b} is {len} bytes, got {} bytes",
                data.len()
            )));
        }
        debug!(block = b, "PUT block");
        self.put_object(&self.keys.block(b), data).await
    }

    /// Deletes block `b` (it then reads as zeroes).
    pub async fn delete_block(&self, b: u64) -> Result<()> {
        self.check_block(b)?;
        self.delete_object(&self.keys.block(b)).await
    }

    /// Reads the manifest; `None` if there is none.
    pub async fn read_manifest(&self) -> Result<Option<Manifest>> {
        let key = self.keys.manifest();
        match self.get_object(&key, None, false).await? {
            None => Ok(None),
            Some(d) => Manifest::decode(key.as_ref(), &d).map(Some),
        }
    }

    /// Writes the manifest.
    pub async fn write_manifest(&self, m: &Manifest) -> Result<()> {
        self.put_object(&self.keys.manifest(), Bytes::from(m.encode()))
            .await
    }

    /// Reads a metadata object under the prefix (e.g. the hash index).
    pub async fn get_meta(&self, name: &str) -> Result<Option<Bytes>> {
        let key = self.keys.prefix().child(name);
        let d = self.get_object(&key, None, false).await?;
        if let Some(d) = &d {
            if d.len() as u64 > MAX_META_OBJECT {
                return Err(S3Error::Corrupt {
                    key: key.to_string(),
                    reason: format!("{} bytes is too large for a metadata object", d.len()),
                });
            }
        }
        Ok(d)
    }

    /// Writes a metadata object under the prefix.
    pub async fn put_meta(&self, name: &str, data: Bytes) -> Result<()> {
        self.put_object(&self.keys.prefix().child(name), data).await
    }

    /// The blocks in `range` that have an object, in block order, as a
    /// stream (one LIST page at a time, starting at `range.start`; memory
    /// does not grow with the device).
    pub fn existing_blocks(
        &self,
        range: std::ops::Range<u64>,
    ) -> futures::stream::BoxStream<'_, Result<u64>> {
        use futures::StreamExt;
        let dir = self.keys.blocks_dir();
        let listing = match range.start.checked_sub(1) {
            Some(before) => self
                .store
                .list_with_offset(Some(dir), &self.keys.block(before)),
            None => self.store.list(Some(dir)),
        };
        let end = range.end;
        let start = range.start;
        listing
            .map(move |r| match r {
                Ok(m) => Ok(self.keys.block_of(&m.location)),
                Err(e) => Err(self.classify(e, "listing block objects".into())),
            })
            .try_filter_map(|b| futures::future::ready(Ok(b)))
            .try_filter(move |b| futures::future::ready(*b >= start))
            .try_take_while(move |b| futures::future::ready(Ok(*b < end)))
            .boxed()
    }

    /// Lists the block objects that exist: `(block index, object size)`, in
    /// block order.
    pub async fn list_blocks(&self) -> Result<Vec<(u64, u64)>> {
        let _permit = self.permit().await;
        let metas: Vec<_> = self
            .store
            .list(Some(self.keys.blocks_dir()))
            .try_collect()
            .await
            .map_err(|e| self.classify(e, "listing block objects".into()))?;
        let mut out: Vec<(u64, u64)> = metas
            .iter()
            .filter_map(|m| self.keys.block_of(&m.location).map(|b| (b, m.size)))
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    /// Checks that the bucket exists and is reachable with these
    /// credentials (one LIST request under the prefix): wrong keys give
    /// [`S3Error::Authentication`], a missing bucket
    /// [`S3Error::BucketNotFound`].
    pub async fn probe(&self) -> Result<()> {
        let _permit = self.permit().await;
        match self
            .store
            .list_with_delimiter(Some(self.keys.prefix()))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_missing_bucket(&e) => {
                self.metrics.error();
                Err(S3Error::BucketNotFound {
                    endpoint: self.endpoint.clone(),
                    bucket: self.bucket.clone(),
                })
            }
            Err(e) => Err(self.classify(e, "checking the bucket".into())),
        }
    }
}
