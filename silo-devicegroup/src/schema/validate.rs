//! Semantic validation of parsed schemas, with positions where known.

use std::collections::HashMap;

use super::error::{FieldPath, Location, SchemaError};
use super::{
    DeviceSchema, SiloSchema, MAX_BLOCK_SIZE, MAX_CONCURRENCY, MAX_DEVICE_SIZE, MAX_SOURCE_DEPTH,
    MIN_BLOCK_SIZE,
};

/// Maps a field of a device to a position in the source text.
pub(crate) trait Locate {
    /// The position of `path` within the `index`-th device (falling back to
    /// the nearest enclosing block, then to the origin alone).
    fn locate(&self, index: usize, path: &FieldPath) -> Location;
}

/// No positions: schemas built in code.
pub(crate) struct NoPositions(pub(crate) &'static str);

impl Locate for NoPositions {
    fn locate(&self, _: usize, _: &FieldPath) -> Location {
        Location::origin(self.0)
    }
}

/// Best-effort positions for TOML/JSON: the `index`-th device's name string
/// is found in the text, then the field's key after it.
pub(crate) struct TextSearch<'a> {
    pub(crate) text: &'a str,
    pub(crate) origin: &'a str,
    /// Device names in order, to find the right one of duplicated names.
    pub(crate) names: Vec<String>,
}

impl<'a> TextSearch<'a> {
    pub(crate) fn new(text: &'a str, origin: &'a str, schema: &SiloSchema) -> Self {
        TextSearch {
            text,
            origin,
            names: schema.devices.iter().map(|d| d.name.clone()).collect(),
        }
    }
}

impl Locate for TextSearch<'_> {
    fn locate(&self, index: usize, path: &FieldPath) -> Location {
        // The device segment is `device "<name>"`; search for `"<name>"`,
        // skipping the occurrences that belong to earlier devices of the same name.
        let Some(first) = path.0.first() else {
            return Location::origin(self.origin);
        };
        let needle = first.strip_prefix("device ").unwrap_or(first);
        let nth = match self.names.get(index) {
            Some(name) => self.names[..index].iter().filter(|n| *n == name).count(),
            None => 0,
        };
        let Some((mut pos, _)) = self.text.match_indices(needle).nth(nth) else {
            return Location::origin(self.origin);
        };
        for seg in &path.0[1..] {
            // `source "<label>"` segments: the label appears as a name value.
            let key = match seg.strip_prefix("source ") {
                Some(label) => label.to_string(),
                None => format!("\"{seg}\""),
            };
            let key_toml = seg.as_str();
            let rest = &self.text[pos..];
            let found = rest.find(&key).or_else(|| find_toml_key(rest, key_toml));
            match found {
                Some(off) => pos += off,
                None => break,
            }
        }
        offset_location(self.text, self.origin, pos)
    }
}

/// Finds `key` as a bare TOML key (`key =` or `.key` in a table header).
fn find_toml_key(hay: &str, key: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(off) = hay[from..].find(key) {
        let at = from + off;
        let before = hay[..at].chars().next_back();
        let after = hay[at + key.len()..].trim_start().chars().next();
        let starts = matches!(before, None | Some('\n' | ' ' | '\t' | '.' | '['));
        let ends = matches!(after, Some('=' | ']' | '.'));
        if starts && ends {
            return Some(at);
        }
        from = at + key.len();
    }
    None
}

/// The line and column (one-based, columns in characters) of a byte offset.
pub(crate) fn offset_location(text: &str, origin: &str, offset: usize) -> Location {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = text[line_start..offset].chars().count() + 1;
    Location::at(origin, line, column)
}

/// Validates every device and the uniqueness of names.
pub(crate) fn validate_schema(schema: &SiloSchema, loc: &dyn Locate) -> Result<(), SchemaError> {
    let mut first: HashMap<&str, usize> = HashMap::new();
    for (i, dev) in schema.devices.iter().enumerate() {
        let path = FieldPath::device(&dev.name);
        if let Some(&j) = first.get(dev.name.as_str()) {
            return Err(SchemaError::DuplicateDevice {
                at: loc.locate(i, &path),
                field: path.clone(),
                first_line: loc.locate(j, &path).line,
            });
        }
        first.insert(&dev.name, i);
        check_device(dev, loc, i, &path, 0)?;
    }
    Ok(())
}

/// Validates one device (used for a single schema, e.g. from the wire).
pub(crate) fn validate_device(
    dev: &DeviceSchema,
    loc: &dyn Locate,
    index: usize,
) -> Result<(), SchemaError> {
    check_device(dev, loc, index, &FieldPath::device(&dev.name), 0)
}

fn check_block_size(
    bs: u64,
    loc: &dyn Locate,
    index: usize,
    path: &FieldPath,
) -> Result<(), SchemaError> {
    let reason = if !bs.is_power_of_two() {
        "not a power of two"
    } else if bs < MIN_BLOCK_SIZE {
        "smaller than 512 bytes"
    } else if bs > MAX_BLOCK_SIZE {
        "larger than 64 MiB"
    } else {
        return Ok(());
    };
    Err(SchemaError::BadBlockSize {
        at: loc.locate(index, path),
        field: path.clone(),
        bytes: bs,
        reason: reason.to_string(),
    })
}

fn check_text(
    s: &str,
    what: &str,
    loc: &dyn Locate,
    index: usize,
    path: &FieldPath,
) -> Result<(), SchemaError> {
    let msg = if s.is_empty() {
        format!("{what} must not be empty")
    } else if s.len() > 4096 {
        format!("{what} is longer than 4096 bytes")
    } else if s.contains('\0') {
        format!("{what} contains a NUL byte")
    } else {
        return Ok(());
    };
    Err(SchemaError::InvalidValue {
        at: loc.locate(index, path),
        field: path.clone(),
        message: msg,
    })
}

fn check_device(
    dev: &DeviceSchema,
    loc: &dyn Locate,
    index: usize,
    path: &FieldPath,
    depth: usize,
) -> Result<(), SchemaError> {
    let invalid = |p: &FieldPath, message: String| SchemaError::InvalidValue {
        at: loc.locate(index, p),
        field: p.clone(),
        message,
    };
    if depth > MAX_SOURCE_DEPTH {
        return Err(invalid(
            path,
            format!("copy-on-write sources nested more than {MAX_SOURCE_DEPTH} deep"),
        ));
    }
    let what = if depth == 0 {
        "device name"
    } else {
        "copy-on-write state file (source label)"
    };
    check_text(&dev.name, what, loc, index, path)?;
    if dev.name.chars().any(char::is_control) {
        return Err(invalid(path, format!("{what} contains control characters")));
    }

    let size_path = path.child("size");
    if dev.size == 0 {
        return Err(SchemaError::ZeroSize {
            at: loc.locate(index, &size_path),
            field: size_path,
        });
    }
    if dev.size > MAX_DEVICE_SIZE {
        return Err(SchemaError::SizeTooLarge {
            at: loc.locate(index, &size_path),
            field: size_path,
            bytes: dev.size,
            max: MAX_DEVICE_SIZE,
        });
    }
    if let Some(bs) = dev.block_size {
        check_block_size(bs, loc, index, &path.child("blocksize"))?;
    }

    if dev.system.needs_location() && dev.location.is_none() {
        return Err(SchemaError::MissingLocation {
            at: loc.locate(index, &path.child("system")),
            field: path.child("location"),
            system: dev.system.to_string(),
        });
    }
    for (key, p) in [
        ("location", &dev.location),
        ("sourcehashes", &dev.source_hashes),
        ("loadbinlog", &dev.load_binlog),
        ("binlog", &dev.binlog),
    ] {
        if let Some(p) = p {
            let fp = path.child(key);
            let Some(s) = p.to_str() else {
                return Err(invalid(&fp, "path is not valid UTF-8".into()));
            };
            check_text(s, "path", loc, index, &fp)?;
        }
    }
    if dev.system == super::System::S3 {
        if let Some(l) = &dev.location {
            let l = l.to_string_lossy();
            if let Err(why) = crate::s3::parse_s3_location(&l) {
                return Err(invalid(&path.child("location"), why));
            }
        }
    }

    if let Some(src) = dev.source.as_deref() {
        let sp = path.child(format!("source {}", super::error::quote(&src.name)));
        check_device(src, loc, index, &sp, depth + 1)?;
        if src.size != dev.size {
            return Err(invalid(
                &sp.child("size"),
                format!(
                    "copy-on-write base size {} differs from the device size {}",
                    src.size, dev.size
                ),
            ));
        }
    }

    if let Some(sync) = &dev.sync {
        let sp = path.child("sync");
        let Some(bs) = dev.block_size else {
            return Err(SchemaError::SyncBlockSize {
                at: loc.locate(index, &sp),
                field: path.child("blocksize"),
                message: "a device with a `sync` block must set `blocksize` explicitly: S3 \
                          objects, dirty tracking and migration all use it, and Go silo's \
                          defaults disagree (4 KiB vs 1 MiB)"
                    .into(),
            });
        };
        check_text(&sync.bucket, "bucket", loc, index, &sp.child("bucket"))?;
        let cp = sp.child("config");
        let c = &sync.config;
        let shift_path = cp.child("blockshift");
        let tracked = bs.checked_shr(c.block_shift).unwrap_or(0);
        if tracked < MIN_BLOCK_SIZE {
            return Err(SchemaError::SyncBlockSize {
                at: loc.locate(index, &shift_path),
                field: shift_path,
                message: format!(
                    "blocksize {bs} >> blockshift {} = {tracked}: dirty tracking blocks must be \
                     at least {MIN_BLOCK_SIZE} bytes",
                    c.block_shift
                ),
            });
        }
        for (key, v) in [
            ("grabconcurrency", sync.grab_concurrency, &sp),
            ("concurrency", c.concurrency, &cp),
        ]
        .map(|(k, v, p)| (p.child(k), v))
        {
            if v == 0 || v > MAX_CONCURRENCY {
                return Err(invalid(
                    &key,
                    format!("{v} is outside 1..={MAX_CONCURRENCY}"),
                ));
            }
        }
        if c.check_period.is_zero() {
            let p = cp.child("checkperiod");
            return Err(invalid(&p, "check period must not be zero".into()));
        }
    }

    if let Some(w) = &dev.write_cache {
        let wp = path.child("writecache");
        if w.max_size == 0 {
            let p = wp.child("maxsize");
            return Err(SchemaError::ZeroSize {
                at: loc.locate(index, &p),
                field: p,
            });
        }
        if w.min_size > w.max_size {
            let p = wp.child("minsize");
            return Err(invalid(
                &p,
                format!(
                    "minsize {} is larger than maxsize {}",
                    w.min_size, w.max_size
                ),
            ));
        }
        if w.max_size > MAX_DEVICE_SIZE {
            let p = wp.child("maxsize");
            return Err(SchemaError::SizeTooLarge {
                at: loc.locate(index, &p),
                field: p,
                bytes: w.max_size,
                max: MAX_DEVICE_SIZE,
            });
        }
        if w.flush_period.is_zero() {
            let p = wp.child("flushperiod");
            return Err(invalid(&p, "flush period must not be zero".into()));
        }
        if let Some(bs) = w.block_size {
            check_block_size(bs, loc, index, &wp.child("blocksize"))?;
        }
    }
    Ok(())
}
