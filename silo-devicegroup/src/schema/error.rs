//! Errors from parsing and validating device schemas.

use std::fmt;

/// Where in a configuration something was found: the file (or another
/// origin such as `"<device info from peer>"`) and, when known, the
/// one-based line and column.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Location {
    /// File name or other origin of the text.
    pub origin: String,
    /// One-based line, if known.
    pub line: Option<usize>,
    /// One-based column, if known.
    pub column: Option<usize>,
}

impl Location {
    /// A location with a known line and column.
    pub fn at(origin: &str, line: usize, column: usize) -> Self {
        Location {
            origin: origin.to_string(),
            line: Some(line),
            column: Some(column),
        }
    }

    /// A location that only names the origin.
    pub fn origin(origin: &str) -> Self {
        Location {
            origin: origin.to_string(),
            line: None,
            column: None,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.origin)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        Ok(())
    }
}

/// A path to a field inside a schema, e.g. `device "disk0".sync.config.maxage`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash)]
pub struct FieldPath(pub(crate) Vec<String>);

impl FieldPath {
    /// The path of a top-level device block.
    pub(crate) fn device(name: &str) -> Self {
        FieldPath(vec![format!("device {}", quote(name))])
    }

    /// This path extended by one segment.
    pub(crate) fn child(&self, segment: impl Into<String>) -> Self {
        let mut v = self.0.clone();
        v.push(segment.into());
        FieldPath(v)
    }

    /// The path segments.
    pub fn segments(&self) -> &[String] {
        &self.0
    }

    /// The last segment (the field's own key), or `""` for an empty path.
    pub fn leaf(&self) -> &str {
        self.0.last().map_or("", String::as_str)
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("."))
    }
}

/// Quotes a label for messages, escaping control characters.
pub(crate) fn quote(s: &str) -> String {
    format!("{s:?}")
}

/// The keys accepted inside the block at `parent`.
pub(crate) fn expected_keys(parent: &FieldPath) -> &'static str {
    match parent.leaf() {
        "<top level>" => "device",
        "sync" => SYNC_KEYS,
        "config" => CONFIG_KEYS,
        "migration" => MIGRATION_KEYS,
        "writecache" => WRITECACHE_KEYS,
        _ => DEVICE_KEYS,
    }
}

pub(crate) const DEVICE_KEYS: &str =
    "system, size, blocksize, expose, location, source, sourcehashes, \
     sourceshared, loadbinlog, binlog, pid, sync, migration, writecache";
pub(crate) const SYNC_KEYS: &str = "secure, accesskey, secretkey, endpoint, bucket, prefix, \
                                    grabprefix, autostart, grabconcurrency, config";
pub(crate) const CONFIG_KEYS: &str =
    "onlydirty, blockshift, maxage, minchanged, checkperiod, limit, concurrency";
pub(crate) const MIGRATION_KEYS: &str = "anyorder";
pub(crate) const WRITECACHE_KEYS: &str = "minsize, maxsize, flushperiod, blocksize";

/// Everything that can be wrong with a schema.
///
/// Every variant names the location (file, line, column where known) and
/// the field, and its `Display` starts with `file:line:column: field:`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaError {
    /// The text is not valid HCL/TOML/JSON.
    #[error("{at}: syntax error: {message}")]
    Syntax {
        /// Where.
        at: Location,
        /// The parser's message.
        message: String,
    },
    /// The text is larger or more deeply nested than a schema can sensibly be.
    #[error("{at}: schema text refused: {reason}")]
    TooComplex {
        /// Where.
        at: Location,
        /// What limit was exceeded.
        reason: String,
    },
    /// An attribute or block this schema does not know.
    #[error("{at}: {field}: unknown {kind} `{name}` (expected one of: {})", expected_keys(.field))]
    UnknownField {
        /// Where.
        at: Location,
        /// The enclosing block.
        field: FieldPath,
        /// `"attribute"` or `"block"`.
        kind: &'static str,
        /// The unknown key.
        name: String,
    },
    /// A required attribute or block is missing.
    #[error("{at}: {field}: missing required {kind} `{name}`")]
    MissingField {
        /// Where (the enclosing block).
        at: Location,
        /// The enclosing block.
        field: FieldPath,
        /// `"attribute"` or `"block"`.
        kind: &'static str,
        /// The missing key.
        name: String,
    },
    /// The same attribute or block appears twice.
    #[error("{at}: {field}: given more than once")]
    DuplicateField {
        /// Where the second occurrence is.
        at: Location,
        /// The duplicated field.
        field: FieldPath,
    },
    /// A value has the wrong type or shape (e.g. a number where a bool belongs,
    /// a block with the wrong number of labels, an expression that is not a literal).
    #[error("{at}: {field}: {message}")]
    InvalidValue {
        /// Where.
        at: Location,
        /// The field.
        field: FieldPath,
        /// What is wrong.
        message: String,
    },
    /// `system` is not one of `memory`, `file`, `sparsefile`, `s3`.
    #[error("{at}: {field}: unknown system {value:?} (expected memory, file, sparsefile or s3)")]
    UnknownSystem {
        /// Where.
        at: Location,
        /// The field.
        field: FieldPath,
        /// The value given.
        value: String,
    },
    /// A size string could not be parsed.
    #[error("{at}: {field}: {message}")]
    BadSize {
        /// Where.
        at: Location,
        /// The field.
        field: FieldPath,
        /// Parser message, including the value.
        message: String,
    },
    /// A duration string could not be parsed.
    #[error("{at}: {field}: {message}")]
    BadDuration {
        /// Where.
        at: Location,
        /// The field.
        field: FieldPath,
        /// Parser message, including the value.
        message: String,
    },
    /// A device size of zero.
    #[error("{at}: {field}: size must not be zero")]
    ZeroSize {
        /// Where.
        at: Location,
        /// The field.
        field: FieldPath,
    },
    /// A size above the allowed maximum.
    #[error("{at}: {field}: size {bytes} bytes exceeds the maximum of {max} bytes")]
    SizeTooLarge {
        /// Where.
        at: Location,
        /// The field.
        field: FieldPath,
        /// The size given.
        bytes: u64,
        /// The limit.
        max: u64,
    },
    /// A block size that is not a power of two in `[512 B, 64 MiB]`.
    #[error("{at}: {field}: invalid block size {bytes}: {reason}")]
    BadBlockSize {
        /// Where.
        at: Location,
        /// The field.
        field: FieldPath,
        /// The block size given.
        bytes: u64,
        /// Why it is refused.
        reason: String,
    },
    /// `file`/`sparsefile` without `location`.
    #[error("{at}: {field}: missing, but required for system {system}")]
    MissingLocation {
        /// Where (the device's `system` attribute).
        at: Location,
        /// The missing `location` field.
        field: FieldPath,
        /// The system.
        system: String,
    },
    /// Two devices with the same name.
    #[error("{at}: {field}: duplicate device name (first defined {})", first_line.map_or_else(String::new, |l| format!("at line {l}")))]
    DuplicateDevice {
        /// Where the second definition is.
        at: Location,
        /// The device.
        field: FieldPath,
        /// The line of the first definition, if known.
        first_line: Option<usize>,
    },
    /// A `sync` block whose block size disagrees with the migration block size,
    /// or whose block size is left implicit.
    #[error("{at}: {field}: {message}")]
    SyncBlockSize {
        /// Where.
        at: Location,
        /// The field.
        field: FieldPath,
        /// What is inconsistent.
        message: String,
    },
    /// The schema could not be written in the requested format.
    #[error("cannot encode schema as {format}: {message}")]
    Encode {
        /// `"TOML"` or `"JSON"`.
        format: &'static str,
        /// The serializer's message.
        message: String,
    },
    /// The configuration file could not be read.
    #[error("{path}: cannot read schema: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl SchemaError {
    /// The location the error refers to, if it has one.
    pub fn location(&self) -> Option<&Location> {
        use SchemaError::*;
        match self {
            Syntax { at, .. }
            | TooComplex { at, .. }
            | UnknownField { at, .. }
            | MissingField { at, .. }
            | DuplicateField { at, .. }
            | InvalidValue { at, .. }
            | UnknownSystem { at, .. }
            | BadSize { at, .. }
            | BadDuration { at, .. }
            | ZeroSize { at, .. }
            | SizeTooLarge { at, .. }
            | BadBlockSize { at, .. }
            | MissingLocation { at, .. }
            | DuplicateDevice { at, .. }
            | SyncBlockSize { at, .. } => Some(at),
            Io { .. } | Encode { .. } => None,
        }
    }

    /// The one-based line the error refers to, if known.
    pub fn line(&self) -> Option<usize> {
        self.location().and_then(|l| l.line)
    }
}
