//! Device schemas in Go silo's configuration format.
//!
//! A configuration is a list of `device "<name>" { … }` blocks (HCL, exactly
//! as Go silo's `silo.example.conf`); the same schema can also be written as
//! TOML (`[[device]]` tables) or JSON (`{"device": [ … ]}`) with the same
//! keys plus a `name` key.
//!
//! Parsed values are normalised: sizes are bytes (`u64`), durations are
//! [`Duration`]s, empty path strings are `None`. [`encode_device_hcl`] turns a
//! [`DeviceSchema`] back into a `device "<name>" { … }` block that both this
//! crate and Go silo parse to the same value; that text travels over the wire
//! in the device information of a migration.
//!
//! Every parse entry point validates (see [`SiloSchema::validate`]) and
//! returns a [`SchemaError`] naming the file, line and field. Nothing here
//! panics on any input.
//!
//! Unknown attributes and blocks are **errors** (as in Go silo, whose HCL
//! decoder rejects unexpected arguments): a misspelt `blocksize` must not
//! silently fall back to the default. Values must be literals (strings,
//! numbers, bools); expressions and `${…}` interpolation are refused by a
//! lexical pre-check before the HCL parser runs, because `hcl-edit` parses
//! expressions recursively and a hostile `1+1+1+…` would exhaust the stack.
//!
//! ```
//! use silo_devicegroup::schema::{decode_device_hcl, encode_device_hcl, SiloSchema, System};
//!
//! let conf = "device disk0 {\n  system = \"sparsefile\"\n  size = \"4g\"\n  location = \"d.img\"\n}\n";
//! let schema = SiloSchema::parse_hcl(conf, "silo.conf")?;
//! let dev = &schema.devices[0];
//! assert_eq!(dev.system, System::SparseFile);
//! assert_eq!(dev.size_bytes(), 4 << 30);
//! assert_eq!(dev.block_size_bytes(), 1 << 20); // the default
//! assert_eq!(&decode_device_hcl(&encode_device_hcl(dev), "<peer>")?, dev);
//!
//! let err = SiloSchema::parse_hcl("device d {\n  system = \"tape\"\n  size = \"1g\"\n}\n", "bad.conf")
//!     .unwrap_err();
//! assert_eq!(err.to_string(),
//!     "bad.conf:2:3: device \"d\".system: unknown system \"tape\" (expected memory, file, sparsefile or s3)");
//! # Ok::<(), silo_devicegroup::SchemaError>(())
//! ```

mod error;
mod hcl;
pub mod units;
mod validate;

pub use error::{FieldPath, Location, SchemaError};
pub use hcl::{decode_device_hcl, encode_device_hcl};

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use units::serde_impl;

/// Default block size of a device (and of its migration): 1 MiB.
///
/// Go silo is inconsistent here: its device layer defaults to 4 KiB while its
/// device group migrates in 1 MiB blocks, so with `blocksize` unset S3 assist
/// silently does nothing. This crate uses **one** default, 1 MiB, for the
/// device, its dirty tracking, its S3 sync and its migration. Write
/// `blocksize` explicitly when a Go peer must agree.
pub const DEFAULT_BLOCK_SIZE: u64 = 1 << 20;
/// Smallest accepted block size (one sector).
pub const MIN_BLOCK_SIZE: u64 = 512;
/// Largest accepted block size.
pub const MAX_BLOCK_SIZE: u64 = 64 << 20;
/// Largest accepted device size (1 PiB). Receivers usually set a much lower
/// limit in their [`ReceivePolicy`](crate::policy::ReceivePolicy).
pub const MAX_DEVICE_SIZE: u64 = 1 << 50;
/// Deepest accepted chain of copy-on-write `source` blocks.
pub const MAX_SOURCE_DEPTH: usize = 8;
/// Largest accepted schema text (1 MiB); larger input is refused before parsing.
pub const MAX_SCHEMA_TEXT: usize = 1 << 20;
/// Largest accepted `concurrency` / `grabconcurrency`.
pub const MAX_CONCURRENCY: u32 = 4096;

/// The storage system backing a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum System {
    /// In memory.
    Memory,
    /// A file (or, if `location` is a directory, sharded files), created if missing.
    File,
    /// A sparse file, created or resumed.
    #[serde(rename = "sparsefile")]
    SparseFile,
    /// Object storage (accepted by the schema; construction decides support).
    S3,
}

impl System {
    /// All systems.
    pub const ALL: [System; 4] = [System::Memory, System::File, System::SparseFile, System::S3];

    /// The keyword used in configurations.
    pub fn as_str(self) -> &'static str {
        match self {
            System::Memory => "memory",
            System::File => "file",
            System::SparseFile => "sparsefile",
            System::S3 => "s3",
        }
    }

    /// Parses the configuration keyword (exact, lower case, as Go silo).
    pub fn from_keyword(s: &str) -> Option<System> {
        System::ALL.into_iter().find(|sys| sys.as_str() == s)
    }

    /// Whether this system stores its data at `location`.
    pub fn needs_location(self) -> bool {
        matches!(self, System::File | System::SparseFile | System::S3)
    }
}

impl std::fmt::Display for System {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A whole configuration: any number of devices.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiloSchema {
    /// The devices, in file order.
    #[serde(rename = "device", default)]
    pub devices: Vec<DeviceSchema>,
}

/// One device (`device "<name>" { … }`), or the copy-on-write base inside a
/// `source "<state-file>" { … }` block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSchema {
    /// The block label. For a nested `source` block this is the path of the
    /// copy-on-write state file (see [`DeviceSchema::cow_state_file`]).
    pub name: String,
    /// `system` (required).
    pub system: System,
    /// `size` in bytes (required; written as `"1g"`, `"4096"`, …).
    #[serde(with = "serde_impl::size")]
    pub size: u64,
    /// `blocksize` in bytes; `None` means [`DEFAULT_BLOCK_SIZE`].
    #[serde(
        rename = "blocksize",
        default,
        skip_serializing_if = "Option::is_none",
        with = "serde_impl::size_opt"
    )]
    pub block_size: Option<u64>,
    /// `expose`: attach the device to a kernel NBD device.
    #[serde(default, skip_serializing_if = "is_false")]
    pub expose: bool,
    /// `location`: file, sparse file or shard directory. Required for
    /// `file` and `sparsefile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<PathBuf>,
    /// `source "<state-file>" { … }`: a read-only base this device overlays
    /// copy-on-write (recursive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Box<DeviceSchema>>,
    /// `sourcehashes`: file of per-block SHA-256 values of the base.
    #[serde(
        rename = "sourcehashes",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub source_hashes: Option<PathBuf>,
    /// `sourceshared`: the base is identical on the destination.
    #[serde(rename = "sourceshared", default, skip_serializing_if = "is_false")]
    pub source_shared: bool,
    /// `loadbinlog`: a binary log replayed into a newly created file device.
    #[serde(
        rename = "loadbinlog",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub load_binlog: Option<PathBuf>,
    /// `binlog`: log every write to this file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binlog: Option<PathBuf>,
    /// `pid`: accepted for Go compatibility and carried along, unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i64>,
    /// `sync { … }`: continuous S3 sync / S3-assisted migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncSchema>,
    /// `migration { anyorder }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationSchema>,
    /// `writecache { … }`.
    #[serde(
        rename = "writecache",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub write_cache: Option<WriteCacheSchema>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `sync { … }`: S3 endpoint, credentials and sync tuning.
///
/// `Debug` redacts the secret key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncSchema {
    /// `secure`: use HTTPS.
    pub secure: bool,
    /// `accesskey`.
    #[serde(rename = "accesskey")]
    pub access_key: String,
    /// `secretkey`.
    #[serde(rename = "secretkey")]
    pub secret_key: String,
    /// `endpoint` (host:port).
    pub endpoint: String,
    /// `bucket`.
    pub bucket: String,
    /// `prefix` of the keys this device uploads (optional, default empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
    /// `grabprefix`: prefix of the keys a receiver grabs from (optional).
    #[serde(
        rename = "grabprefix",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub grab_prefix: String,
    /// `autostart`: start syncing when the device is built.
    #[serde(rename = "autostart")]
    pub auto_start: bool,
    /// `grabconcurrency`: parallel S3 reads when grabbing on the receiver.
    #[serde(rename = "grabconcurrency")]
    pub grab_concurrency: u32,
    /// `config { … }`.
    pub config: SyncConfigSchema,
}

impl std::fmt::Debug for SyncSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncSchema")
            .field("secure", &self.secure)
            .field("access_key", &self.access_key)
            .field("secret_key", &"<redacted>")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("grab_prefix", &self.grab_prefix)
            .field("auto_start", &self.auto_start)
            .field("grab_concurrency", &self.grab_concurrency)
            .field("config", &self.config)
            .finish()
    }
}

/// `sync { config { … } }`: which dirty blocks are uploaded when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfigSchema {
    /// `onlydirty`: assume S3 already holds the device; upload only changes.
    #[serde(rename = "onlydirty")]
    pub only_dirty: bool,
    /// `blockshift`: dirty tracking granularity is `blocksize >> blockshift`.
    #[serde(rename = "blockshift")]
    pub block_shift: u32,
    /// `maxage`: upload a dirty block at the latest this long after its first write.
    #[serde(rename = "maxage", with = "serde_impl::duration")]
    pub max_age: Duration,
    /// `minchanged`: upload a block as soon as this many of its sub-blocks are dirty.
    #[serde(rename = "minchanged")]
    pub min_changed: u32,
    /// `checkperiod`: how often to look for dirty blocks.
    #[serde(rename = "checkperiod", with = "serde_impl::duration")]
    pub check_period: Duration,
    /// `limit`: at most this many blocks per check.
    pub limit: u32,
    /// `concurrency`: parallel uploads.
    pub concurrency: u32,
}

/// `migration { anyorder = … }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationSchema {
    /// `anyorder`: migrate blocks in any order instead of least-volatile first.
    #[serde(rename = "anyorder")]
    pub any_order: bool,
}

/// `writecache { … }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteCacheSchema {
    /// `minsize`: flush down to this many cached bytes.
    #[serde(rename = "minsize", with = "serde_impl::size")]
    pub min_size: u64,
    /// `maxsize`: start flushing above this many cached bytes.
    #[serde(rename = "maxsize", with = "serde_impl::size")]
    pub max_size: u64,
    /// `flushperiod`: flush at least this often.
    #[serde(rename = "flushperiod", with = "serde_impl::duration")]
    pub flush_period: Duration,
    /// `blocksize` of the cache (optional; default: the device's block size).
    #[serde(
        rename = "blocksize",
        default,
        skip_serializing_if = "Option::is_none",
        with = "serde_impl::size_opt"
    )]
    pub block_size: Option<u64>,
}

impl DeviceSchema {
    /// A device with the required fields set and everything else absent.
    pub fn new(name: impl Into<String>, system: System, size: u64) -> Self {
        DeviceSchema {
            name: name.into(),
            system,
            size,
            block_size: None,
            expose: false,
            location: None,
            source: None,
            source_hashes: None,
            source_shared: false,
            load_binlog: None,
            binlog: None,
            pid: None,
            sync: None,
            migration: None,
            write_cache: None,
        }
    }

    /// The device size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size
    }

    /// The block size in bytes: `blocksize`, or [`DEFAULT_BLOCK_SIZE`] (1 MiB).
    /// This is also the block size of the device's migration and S3 sync.
    pub fn block_size_bytes(&self) -> u64 {
        self.block_size.unwrap_or(DEFAULT_BLOCK_SIZE)
    }

    /// The number of blocks (the last one may be partial).
    pub fn num_blocks(&self) -> u64 {
        self.size.div_ceil(self.block_size_bytes())
    }

    /// The copy-on-write state file of this device's base (the label of its
    /// `source` block), if it overlays one.
    pub fn cow_state_file(&self) -> Option<&Path> {
        self.source.as_deref().map(|s| Path::new(s.name.as_str()))
    }

    /// Whether blocks are migrated in any order (`migration { anyorder = true }`).
    pub fn any_order(&self) -> bool {
        self.migration.is_some_and(|m| m.any_order)
    }

    /// The granularity of the device's S3 dirty tracking
    /// (`blocksize >> blockshift`), if it has a `sync` block.
    pub fn sync_tracking_block_size(&self) -> Option<u64> {
        self.sync.as_ref().map(|s| {
            self.block_size_bytes()
                .checked_shr(s.config.block_shift)
                .unwrap_or(0)
        })
    }

    /// Checks this device's schema (see [`SiloSchema::validate`]).
    pub fn validate(&self) -> Result<(), SchemaError> {
        validate::validate_device(self, &validate::NoPositions("<schema>"), 0)
    }

    /// Start-up check for S3-assisted migration: the blocks stored in S3
    /// (one object per `blocksize`) must be the blocks the migration moves.
    /// Returns [`SchemaError::SyncBlockSize`] if the device has a `sync` block
    /// and `migration_block_size` differs from its block size.
    pub fn check_sync_block_size(&self, migration_block_size: u64) -> Result<(), SchemaError> {
        if self.sync.is_some() && migration_block_size != self.block_size_bytes() {
            return Err(SchemaError::SyncBlockSize {
                at: Location::origin("<start-up>"),
                field: FieldPath::device(&self.name).child("blocksize"),
                message: format!(
                    "S3 sync block size {} differs from migration block size {}; \
                     S3-assisted migration needs them equal",
                    self.block_size_bytes(),
                    migration_block_size
                ),
            });
        }
        Ok(())
    }

    /// Calls `f` on every path-valued field of this device and of its nested
    /// `source` chain (with the nesting depth, 0 for this device), including
    /// the copy-on-write state file labels. Stops at the first error.
    pub fn try_visit_paths_mut<E>(
        &mut self,
        f: &mut dyn FnMut(PathField, usize, &mut PathBuf) -> Result<(), E>,
    ) -> Result<(), E> {
        self.visit_paths_at(0, f)
    }

    fn visit_paths_at<E>(
        &mut self,
        depth: usize,
        f: &mut dyn FnMut(PathField, usize, &mut PathBuf) -> Result<(), E>,
    ) -> Result<(), E> {
        // An S3 device's `location` is an `s3://` URL, not a path.
        let location = if self.system == System::S3 {
            None
        } else {
            Some(&mut self.location)
        };
        if let Some(Some(p)) = location {
            f(PathField::Location, depth, p)?;
        }
        for (field, slot) in [
            (PathField::SourceHashes, &mut self.source_hashes),
            (PathField::LoadBinlog, &mut self.load_binlog),
            (PathField::Binlog, &mut self.binlog),
        ] {
            if let Some(p) = slot {
                f(field, depth, p)?;
            }
        }
        if let Some(src) = self.source.as_deref_mut() {
            let mut state = PathBuf::from(std::mem::take(&mut src.name));
            let r = f(PathField::CowStateFile, depth, &mut state);
            src.name = state.to_string_lossy().into_owned();
            r?;
            src.visit_paths_at(depth + 1, f)?;
        }
        Ok(())
    }

    /// This device as a `device "<name>" { … }` HCL block.
    pub fn to_hcl(&self) -> String {
        encode_device_hcl(self)
    }
}

/// A path-valued field of a [`DeviceSchema`] (see
/// [`DeviceSchema::try_visit_paths_mut`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PathField {
    /// `location`.
    Location,
    /// `sourcehashes`.
    SourceHashes,
    /// `loadbinlog`.
    LoadBinlog,
    /// `binlog`.
    Binlog,
    /// The label of a `source "<state-file>"` block: where the copy-on-write
    /// overlay's block list is persisted.
    CowStateFile,
}

impl PathField {
    /// The configuration key (`"source"` for the state-file label).
    pub fn key(self) -> &'static str {
        match self {
            PathField::Location => "location",
            PathField::SourceHashes => "sourcehashes",
            PathField::LoadBinlog => "loadbinlog",
            PathField::Binlog => "binlog",
            PathField::CowStateFile => "source",
        }
    }
}

/// The text formats a [`SiloSchema`] can be read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Format {
    /// Go silo's HCL.
    Hcl,
    /// TOML: `[[device]]` tables with a `name` key.
    Toml,
    /// JSON: `{"device": [ { "name": …, … } ]}`.
    Json,
}

impl Format {
    /// Guesses the format from a file name: `.toml` → TOML, `.json` → JSON,
    /// anything else (`.hcl`, `.conf`, …) → HCL.
    pub fn from_path(path: &Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("toml") => Format::Toml,
            Some(e) if e.eq_ignore_ascii_case("json") => Format::Json,
            _ => Format::Hcl,
        }
    }
}

impl SiloSchema {
    /// Parses and validates Go silo HCL. `origin` names the text in errors
    /// (usually the file name).
    pub fn parse_hcl(text: &str, origin: &str) -> Result<SiloSchema, SchemaError> {
        let (schema, positions) = hcl::parse_schema(text, origin)?;
        validate::validate_schema(&schema, &positions)?;
        Ok(schema)
    }

    /// Parses and validates the TOML form.
    pub fn parse_toml(text: &str, origin: &str) -> Result<SiloSchema, SchemaError> {
        check_len(text, origin)?;
        let schema: SiloSchema = toml::from_str(text).map_err(|e| {
            let at = match e.span() {
                Some(span) => validate::offset_location(text, origin, span.start),
                None => Location::origin(origin),
            };
            SchemaError::Syntax {
                at,
                message: e.message().to_string(),
            }
        })?;
        validate::validate_schema(&schema, &validate::TextSearch::new(text, origin, &schema))?;
        Ok(schema)
    }

    /// Parses and validates the JSON form.
    pub fn parse_json(text: &str, origin: &str) -> Result<SiloSchema, SchemaError> {
        check_len(text, origin)?;
        let schema: SiloSchema = serde_json::from_str(text).map_err(|e| SchemaError::Syntax {
            at: Location::at(origin, e.line(), e.column()),
            message: e.to_string(),
        })?;
        validate::validate_schema(&schema, &validate::TextSearch::new(text, origin, &schema))?;
        Ok(schema)
    }

    /// Parses and validates text in the given format.
    pub fn parse(text: &str, origin: &str, format: Format) -> Result<SiloSchema, SchemaError> {
        match format {
            Format::Hcl => Self::parse_hcl(text, origin),
            Format::Toml => Self::parse_toml(text, origin),
            Format::Json => Self::parse_json(text, origin),
        }
    }

    /// Reads, parses and validates a configuration file; the format follows
    /// the extension ([`Format::from_path`]).
    pub fn from_file(path: impl AsRef<Path>) -> Result<SiloSchema, SchemaError> {
        let path = path.as_ref();
        let origin = path.display().to_string();
        let io = |source| SchemaError::Io {
            path: origin.clone(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        if meta.len() > MAX_SCHEMA_TEXT as u64 {
            return Err(too_long(&origin, meta.len()));
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        Self::parse(&text, &origin, Format::from_path(path))
    }

    /// Checks every device: sizes (non-zero, at most [`MAX_DEVICE_SIZE`]),
    /// block sizes (powers of two in `[512 B, 64 MiB]`), `location` for
    /// `file`/`sparsefile`, unique device names, copy-on-write chains (at
    /// most [`MAX_SOURCE_DEPTH`] deep, base size equal to the overlay's),
    /// `sync` (explicit `blocksize`, `blocksize >> blockshift` at least 512,
    /// non-empty bucket, concurrencies in `1..=4096`, non-zero check period)
    /// and `writecache` (`minsize <= maxsize`, non-zero flush period).
    pub fn validate(&self) -> Result<(), SchemaError> {
        validate::validate_schema(self, &validate::NoPositions("<schema>"))
    }

    /// The whole configuration as HCL (`device` blocks separated by blank lines).
    pub fn to_hcl(&self) -> String {
        self.devices
            .iter()
            .map(encode_device_hcl)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The whole configuration as TOML. Non-UTF-8 paths are written lossily.
    pub fn to_toml(&self) -> Result<String, SchemaError> {
        toml::to_string(&self.lossy()).map_err(|e| SchemaError::Encode {
            format: "TOML",
            message: e.to_string(),
        })
    }

    /// The whole configuration as pretty JSON. Non-UTF-8 paths are written lossily.
    pub fn to_json(&self) -> Result<String, SchemaError> {
        serde_json::to_string_pretty(&self.lossy()).map_err(|e| SchemaError::Encode {
            format: "JSON",
            message: e.to_string(),
        })
    }

    fn lossy(&self) -> SiloSchema {
        let mut s = self.clone();
        for d in &mut s.devices {
            let _ = d.try_visit_paths_mut::<()>(&mut |_, _, p| {
                if p.to_str().is_none() {
                    *p = PathBuf::from(p.to_string_lossy().into_owned());
                }
                Ok(())
            });
        }
        s
    }

    /// The device with this name.
    pub fn device(&self, name: &str) -> Option<&DeviceSchema> {
        self.devices.iter().find(|d| d.name == name)
    }
}

fn too_long(origin: &str, len: u64) -> SchemaError {
    SchemaError::TooComplex {
        at: Location::origin(origin),
        reason: format!("{len} bytes is more than the {MAX_SCHEMA_TEXT}-byte limit"),
    }
}

pub(crate) fn check_len(text: &str, origin: &str) -> Result<(), SchemaError> {
    if text.len() > MAX_SCHEMA_TEXT {
        return Err(too_long(origin, text.len() as u64));
    }
    Ok(())
}
