//! Device construction: a provider chain from a [`DeviceSchema`].
//!
//! ```text
//!   [WriteCache] → [Binlog] → [CopyOnWrite over a recursively built `source`] → base
//!   base = memory | file (io_uring auto; a directory = sharded `file_<i>`) | sparsefile
//! ```
//!
//! * `memory`: [`MemoryStorage`].
//! * `file`: [`FileStorage`] (io_uring when available). An existing file is
//!   opened and its size must equal `size`; a missing one is created and,
//!   with `loadbinlog`, the log is replayed into it. If `location` is an
//!   existing directory the device is sharded into files `file_<i>` of
//!   `blocksize` bytes each (created if missing, size-checked otherwise),
//!   as Go silo does.
//! * `sparsefile`: [`SparseFile`], resumed if it exists (size checked).
//! * `s3`: [`S3Storage`] at `location = "s3://bucket/prefix"` (one object
//!   per block, a manifest checked on open), reached with
//!   [`BuildOptions::s3`] or the AWS environment variables — endpoints and
//!   keys are never part of a schema.
//! * `source { … }`: the device overlays a base built from the nested schema
//!   copy-on-write; the overlay map is persisted to the `source` label's file;
//!   `sourceshared` marks the base as present on the destination too.
//! * `binlog`: every write is recorded; `writecache { … }`: write-back cache.
//!
//! On any error everything built so far is closed. The migration stack
//! (lockable, volatility monitor, dirty tracker, metrics, waiting cache) is
//! added by the device group, not here.

use std::path::Path;
use std::sync::Arc;

use silo_storage::modules::binlog::{Binlog, BinlogOptions};
use silo_storage::modules::binlog_replay::{BinlogReplay, ReplaySpeed};
use silo_storage::modules::cow::{CopyOnWrite, CowConfig};
use silo_storage::modules::sharded::Sharded;
use silo_storage::modules::write_cache::{WriteCache, WriteCacheConfig};
use silo_storage::sources::{Engine, FileStorage, SparseFile};
use silo_storage::{DynProvider, MemoryStorage, Provider};

use crate::error::{Error, Result};
use crate::s3::S3Access;
use crate::schema::{DeviceSchema, System};
use silo_s3::S3Storage;

/// Options of device construction.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct BuildOptions {
    /// I/O engine of `file` devices (default: io_uring when available).
    pub file_engine: Engine,
    /// How `system = "s3"` devices reach S3 (default: from the environment,
    /// see [`S3Access::from_env`]).
    pub s3: Option<S3Access>,
}

impl BuildOptions {
    /// Sets the file engine.
    pub fn with_file_engine(mut self, engine: Engine) -> Self {
        self.file_engine = engine;
        self
    }
    /// Sets the S3 access of `system = "s3"` devices.
    pub fn with_s3(mut self, access: S3Access) -> Self {
        self.s3 = Some(access);
        self
    }
}

/// A built device chain (without the migration stack).
pub struct BuiltDevice {
    /// The top of the chain.
    pub provider: DynProvider,
    /// The copy-on-write layer, if the device overlays a `source`.
    pub cow: Option<Arc<CopyOnWrite>>,
    /// The write cache, if configured.
    pub write_cache: Option<Arc<WriteCache>>,
    /// Providers closing the top does not close (copy-on-write bases), in
    /// the order they must be closed after it.
    pub extra: Vec<DynProvider>,
}

impl std::fmt::Debug for BuiltDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuiltDevice")
            .field("size", &self.provider.size())
            .field("cow", &self.cow.is_some())
            .field("write_cache", &self.write_cache.is_some())
            .finish()
    }
}

impl BuiltDevice {
    /// Closes the chain and the bases below it; returns the first error.
    pub async fn close(&self) -> silo_storage::Result<()> {
        let mut first = self.provider.close().await.err();
        for p in &self.extra {
            if let Err(e) = p.close().await {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// Builds the provider chain of `schema` (see the module docs).
pub async fn build_device(schema: &DeviceSchema, opts: &BuildOptions) -> Result<BuiltDevice> {
    build_at_depth(schema, opts, 0).await
}

fn build_at_depth<'a>(
    schema: &'a DeviceSchema,
    opts: &'a BuildOptions,
    depth: usize,
) -> futures::future::BoxFuture<'a, Result<BuiltDevice>> {
    Box::pin(async move {
        if depth > crate::schema::MAX_SOURCE_DEPTH {
            return Err(Error::State(format!(
                "device {:?}: copy-on-write sources nested deeper than {}",
                schema.name,
                crate::schema::MAX_SOURCE_DEPTH
            )));
        }
        let name = schema.name.as_str();
        let bs = schema.block_size_bytes();
        let base = build_base(schema, opts).await?;
        let mut built = BuiltDevice {
            provider: base,
            cow: None,
            write_cache: None,
            extra: Vec::new(),
        };
        match layer(&mut built, schema, opts, depth, bs).await {
            Ok(()) => Ok(built),
            Err(e) => {
                if let Err(ce) = built.close().await {
                    tracing::warn!(device = name, error = %ce, "closing a partly built device failed");
                }
                Err(e)
            }
        }
    })
}

async fn layer(
    built: &mut BuiltDevice,
    schema: &DeviceSchema,
    opts: &BuildOptions,
    depth: usize,
    bs: u64,
) -> Result<()> {
    let name = schema.name.as_str();
    if let Some(src) = schema.source.as_deref() {
        let base = build_at_depth(src, opts, depth + 1).await?;
        if base.provider.size() != built.provider.size() {
            let _ = base.close().await;
            return Err(Error::State(format!(
                "device {name:?}: source size {} differs from the device size {}",
                base.provider.size(),
                built.provider.size()
            )));
        }
        let cfg = CowConfig::new(bs)
            .with_state_path(&src.name)
            .with_shared_base(schema.source_shared);
        let base_top = base.provider.clone();
        match CopyOnWrite::open(base_top.clone(), built.provider.clone(), cfg).await {
            Ok(cow) => {
                let cow = Arc::new(cow);
                built.provider = cow.clone();
                built.cow = Some(cow);
                built.extra.push(base_top);
                built.extra.extend(base.extra);
            }
            Err(e) => {
                let _ = base.close().await;
                return Err(Error::storage(name, "opening the copy-on-write overlay", e));
            }
        }
    }
    if let Some(path) = &schema.binlog {
        let b = Binlog::create(built.provider.clone(), path, BinlogOptions::default())
            .await
            .map_err(|e| Error::storage(name, format!("creating binlog {}", path.display()), e))?;
        built.provider = Arc::new(b);
    }
    if let Some(wc) = &schema.write_cache {
        let cfg = WriteCacheConfig {
            block_size: wc.block_size.unwrap_or(bs),
            min_data: wc.min_size,
            max_data: wc.max_size,
            flush_period: Some(wc.flush_period),
        };
        let c = Arc::new(
            WriteCache::new(built.provider.clone(), cfg)
                .map_err(|e| Error::storage(name, "creating the write cache", e))?,
        );
        built.provider = c.clone();
        built.write_cache = Some(c);
    }
    Ok(())
}

/// Builds the storage system of `schema` (no modules).
pub async fn build_base(schema: &DeviceSchema, opts: &BuildOptions) -> Result<DynProvider> {
    let name = schema.name.as_str();
    let size = schema.size_bytes();
    let bs = schema.block_size_bytes();
    let location = || {
        schema.location.as_deref().ok_or_else(|| {
            Error::State(format!(
                "device {name:?}: system {} needs a location",
                schema.system
            ))
        })
    };
    match schema.system {
        // One chunk per block (at least the default 64 KiB, at most 4 MiB):
        // a migrated block then lands as one chunk, and a block received
        // into its own buffer becomes that chunk without a copy.
        System::Memory => Ok(Arc::new(MemoryStorage::with_chunk_size(
            size,
            (bs as usize).clamp(silo_storage::sources::memory::DEFAULT_CHUNK, 4 << 20),
        ))),
        System::File => {
            let path = location()?;
            if path.is_dir() {
                let engine = opts.file_engine;
                let sharded = Sharded::new(size, bs, |i, len| {
                    open_or_create_file(&path.join(format!("file_{i}")), len, engine)
                        .map(|(f, _)| Arc::new(f) as DynProvider)
                })
                .map_err(|e| {
                    Error::storage(name, format!("opening shards in {}", path.display()), e)
                })?;
                return Ok(Arc::new(sharded));
            }
            let (file, created) = open_or_create_file(path, size, opts.file_engine)
                .map_err(|e| Error::storage(name, format!("opening {}", path.display()), e))?;
            let file: DynProvider = Arc::new(file);
            if created {
                if let Some(log) = &schema.load_binlog {
                    if let Err(e) = replay(log, &file).await {
                        let _ = file.close().await;
                        return Err(Error::storage(
                            name,
                            format!("replaying {}", log.display()),
                            e,
                        ));
                    }
                }
            }
            Ok(file)
        }
        System::SparseFile => {
            let path = location()?;
            let sparse = if path.exists() {
                let s = SparseFile::open(path)
                    .map_err(|e| Error::storage(name, format!("opening {}", path.display()), e))?;
                if s.size() != size {
                    let _ = s.close().await;
                    return Err(Error::State(format!(
                        "device {name:?}: sparse file {} holds {} bytes, the schema says {size}",
                        path.display(),
                        s.size()
                    )));
                }
                s
            } else {
                SparseFile::create(path, size, bs)
                    .map_err(|e| Error::storage(name, format!("creating {}", path.display()), e))?
            };
            Ok(Arc::new(sparse))
        }
        System::S3 => {
            let location = location()?.to_string_lossy().into_owned();
            crate::s3::parse_s3_location(&location)
                .map_err(|why| Error::State(format!("device {name:?}: {why}")))?;
            let access = match &opts.s3 {
                Some(a) => a.clone(),
                None => S3Access::from_env()
                    .map_err(|e| Error::s3(name, "S3 access for system s3 (environment)", e))?,
            };
            let cfg = access.device_config(schema).map_err(Error::State)?;
            let what = format!(
                "opening s3://{}/{} at {}",
                cfg.bucket,
                cfg.prefix,
                cfg.endpoint_name()
            );
            let dev = S3Storage::open_or_create(&cfg)
                .await
                .map_err(|e| Error::s3(name, what, e))?;
            Ok(Arc::new(dev))
        }
    }
}

/// Opens `path` (its size must be `size`) or creates it; returns whether it
/// was created.
fn open_or_create_file(
    path: &Path,
    size: u64,
    engine: Engine,
) -> silo_storage::Result<(FileStorage, bool)> {
    if path.exists() {
        let f = FileStorage::open(path, engine)?;
        if f.size() != size {
            return Err(silo_storage::Error::Invalid(format!(
                "{} holds {} bytes, the schema says {size}",
                path.display(),
                f.size()
            )));
        }
        Ok((f, false))
    } else {
        Ok((FileStorage::create(path, size, engine)?, true))
    }
}

async fn replay(log: &Path, target: &DynProvider) -> silo_storage::Result<()> {
    let mut r = BinlogReplay::open(log).await?;
    let stats = r
        .replay_all(target.as_ref(), ReplaySpeed::AsFastAsPossible)
        .await?;
    tracing::debug!(log = %log.display(), records = stats.records, "binlog replayed");
    Ok(())
}
