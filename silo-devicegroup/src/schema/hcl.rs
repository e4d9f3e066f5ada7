//! HCL: a position-keeping reader over `hcl-edit`'s syntax tree, and the
//! encoder for `device "<name>" { … }` blocks.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use hcl::edit::expr::Expression;
use hcl::edit::structure::{Attribute, Block, Body, Structure};
use hcl::edit::Span;

use super::error::{
    FieldPath, Location, SchemaError, CONFIG_KEYS, DEVICE_KEYS, MIGRATION_KEYS, SYNC_KEYS,
    WRITECACHE_KEYS,
};
use super::units::{format_duration, format_size, parse_duration, parse_size};
use super::validate::{self, Locate};
use super::{
    check_len, DeviceSchema, MigrationSchema, SiloSchema, SyncConfigSchema, SyncSchema, System,
    WriteCacheSchema, MAX_SOURCE_DEPTH,
};

/// Deepest block nesting accepted before the text reaches the HCL parser
/// (a real configuration needs about a dozen levels).
const MAX_NESTING: usize = 32;

/// Positions of every attribute and block seen, keyed by device index and
/// field path.
pub(crate) struct Positions {
    origin: String,
    map: HashMap<(usize, String), (usize, usize)>,
}

impl Locate for Positions {
    fn locate(&self, index: usize, path: &FieldPath) -> Location {
        let mut segs = path.0.clone();
        while !segs.is_empty() {
            if let Some(&(line, col)) = self.map.get(&(index, segs.join("."))) {
                return Location::at(&self.origin, line, col);
            }
            segs.pop();
        }
        Location::origin(&self.origin)
    }
}

/// Refuses text that is too long, nested too deeply, or uses anything but
/// the literal subset of HCL a schema needs: blocks, labels, attributes and
/// literal values (strings without interpolation, numbers, bools, bare
/// identifiers), plus comments.
///
/// `hcl-edit` parses expressions by recursive descent, so a hostile
/// `a = 1+1+1+…` exhausts the stack and aborts the process; this lexical
/// allow-list runs first so such text never reaches it.
fn precheck(text: &str, origin: &str) -> Result<(), SchemaError> {
    check_len(text, origin)?;
    let b = text.as_bytes();
    let fail = |i: usize, reason: String| {
        Err(SchemaError::Syntax {
            at: validate::offset_location(text, origin, i),
            message: reason,
        })
    };
    let mut depth = 0usize;
    let mut i = 0;
    let mut after_equals = false;
    while i < b.len() {
        let c = b[i];
        let value_start = after_equals;
        if !c.is_ascii_whitespace() {
            after_equals = c == b'=';
        }
        match c {
            b' ' | b'\t' | b'\r' | b'\n' | b'=' => i += 1,
            b'{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err(SchemaError::TooComplex {
                        at: validate::offset_location(text, origin, i),
                        reason: format!("blocks nested more than {MAX_NESTING} deep"),
                    });
                }
                i += 1;
            }
            b'}' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b'#' => i = skip_line(b, i),
            b'/' if b.get(i + 1) == Some(&b'/') => i = skip_line(b, i),
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i = match text[i + 2..].find("*/") {
                    Some(off) => i + 2 + off + 2,
                    None => b.len(),
                }
            }
            b'"' => {
                i += 1;
                loop {
                    match b.get(i) {
                        None | Some(b'\n') => break,
                        Some(b'"') => {
                            i += 1;
                            break;
                        }
                        Some(b'\\') => i += 2,
                        Some(&m @ (b'$' | b'%')) => {
                            if b.get(i + 1) == Some(&m) && b.get(i + 2) == Some(&b'{') {
                                i += 3; // `$${` / `%%{`: a literal `${` / `%{`
                            } else if b.get(i + 1) == Some(&b'{') {
                                return fail(
                                    i,
                                    "template interpolation is not supported in a schema \
                                     (write `$${` for a literal `${`)"
                                        .into(),
                                );
                            } else {
                                i += 1;
                            }
                        }
                        Some(_) => i += 1,
                    }
                }
            }
            // A sign only directly after `=`: `1-1-1…` would be an expression.
            b'-' if value_start && b.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                i = skip_number(b, i + 1)
            }
            b'0'..=b'9' => i = skip_number(b, i),
            _ => {
                let ch = text[i..].chars().next().unwrap_or('?');
                if ch.is_alphabetic() || ch == '_' {
                    i += ch.len_utf8();
                    while let Some(ch) = text[i..].chars().next() {
                        if ch.is_alphanumeric() || ch == '_' || ch == '-' {
                            i += ch.len_utf8();
                        } else {
                            break;
                        }
                    }
                } else {
                    return fail(
                        i,
                        format!(
                            "unexpected `{ch}`: a schema holds only blocks and literal values \
                             (strings, numbers, true/false), no expressions"
                        ),
                    );
                }
            }
        }
    }
    Ok(())
}

/// Skips `digits[.digits][(e|E)[+|-]digits]` starting at `i`.
fn skip_number(b: &[u8], mut i: usize) -> usize {
    let digits = |mut i: usize| {
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        i
    };
    i = digits(i);
    if b.get(i) == Some(&b'.') && b.get(i + 1).is_some_and(u8::is_ascii_digit) {
        i = digits(i + 1);
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        let mut j = i + 1;
        if matches!(b.get(j), Some(b'+' | b'-')) {
            j += 1;
        }
        if b.get(j).is_some_and(u8::is_ascii_digit) {
            i = digits(j);
        }
    }
    i
}

fn skip_line(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i] != b'\n' {
        i += 1;
    }
    i
}

/// Parses HCL into a schema and the positions of its fields (not yet validated).
pub(crate) fn parse_schema(
    text: &str,
    origin: &str,
) -> Result<(SiloSchema, Positions), SchemaError> {
    precheck(text, origin)?;
    let body = hcl::edit::parser::parse_body(text).map_err(|e| {
        let line: String = e.line().trim().chars().take(120).collect();
        SchemaError::Syntax {
            at: Location::at(origin, e.location().line(), e.location().column()),
            message: format!("{} in `{line}`", e.message()),
        }
    })?;
    let mut r = Reader {
        text,
        origin,
        index: 0,
        positions: Positions {
            origin: origin.to_string(),
            map: HashMap::new(),
        },
    };
    let mut devices = Vec::new();
    for s in body.iter() {
        match s {
            Structure::Block(b) if b.ident.as_str() == "device" => {
                r.index = devices.len();
                let name = r.single_label(b, &FieldPath::default().child("device"))?;
                let path = FieldPath::device(&name);
                r.record(&path, b.span());
                devices.push(r.device(&b.body, name, &path, 0, b.span())?);
            }
            Structure::Block(b) => {
                return Err(r.unknown(&FieldPath::default(), "block", b.ident.as_str(), b.span()))
            }
            Structure::Attribute(a) => {
                return Err(r.unknown(&FieldPath::default(), "attribute", a.key.as_str(), a.span()))
            }
        }
    }
    Ok((SiloSchema { devices }, r.positions))
}

/// Decodes one `device "<name>" { … }` block — e.g. the schema text of a
/// peer's device information — and validates it. `origin` names the text in
/// errors. Exactly one device block is accepted.
pub fn decode_device_hcl(text: &str, origin: &str) -> Result<DeviceSchema, SchemaError> {
    let (mut schema, positions) = parse_schema(text, origin)?;
    if schema.devices.len() != 1 {
        return Err(SchemaError::InvalidValue {
            at: Location::origin(origin),
            field: FieldPath::default().child("device"),
            message: format!(
                "expected exactly one device block, found {}",
                schema.devices.len()
            ),
        });
    }
    validate::validate_schema(&schema, &positions)?;
    Ok(schema.devices.remove(0))
}

struct Reader<'a> {
    text: &'a str,
    origin: &'a str,
    index: usize,
    positions: Positions,
}

/// Tracks which keys a body has used, to refuse duplicates.
#[derive(Default)]
struct Seen<'b>(HashSet<&'b str>);

impl Reader<'_> {
    fn loc(&self, span: Option<Range<usize>>) -> Location {
        match span {
            Some(s) => validate::offset_location(self.text, self.origin, s.start),
            None => Location::origin(self.origin),
        }
    }

    fn record(&mut self, path: &FieldPath, span: Option<Range<usize>>) {
        if let Location {
            line: Some(l),
            column: Some(c),
            ..
        } = self.loc(span)
        {
            self.positions
                .map
                .entry((self.index, path.to_string()))
                .or_insert((l, c));
        }
    }

    fn unknown(
        &self,
        parent: &FieldPath,
        kind: &'static str,
        name: &str,
        span: Option<Range<usize>>,
    ) -> SchemaError {
        SchemaError::UnknownField {
            at: self.loc(span),
            field: if parent.0.is_empty() {
                FieldPath::default().child("<top level>")
            } else {
                parent.clone()
            },
            kind,
            name: name.to_string(),
        }
    }

    fn invalid(
        &self,
        path: &FieldPath,
        span: Option<Range<usize>>,
        message: String,
    ) -> SchemaError {
        SchemaError::InvalidValue {
            at: self.loc(span),
            field: path.clone(),
            message,
        }
    }

    /// Registers a key of `parent`'s body; refuses a second occurrence.
    fn key<'b>(
        &mut self,
        seen: &mut Seen<'b>,
        parent: &FieldPath,
        key: &'b str,
        span: Option<Range<usize>>,
    ) -> Result<FieldPath, SchemaError> {
        let path = parent.child(key);
        if !seen.0.insert(key) {
            return Err(SchemaError::DuplicateField {
                at: self.loc(span),
                field: path,
            });
        }
        self.record(&path, span);
        Ok(path)
    }

    fn single_label(&self, b: &Block, path: &FieldPath) -> Result<String, SchemaError> {
        match b.labels.as_slice() {
            [l] => Ok(l.as_str().to_string()),
            ls => Err(self.invalid(
                path,
                b.span(),
                format!(
                    "`{}` block needs exactly one label (its name), found {}",
                    b.ident.as_str(),
                    ls.len()
                ),
            )),
        }
    }

    fn no_labels(&self, b: &Block, path: &FieldPath) -> Result<(), SchemaError> {
        if b.labels.is_empty() {
            Ok(())
        } else {
            Err(self.invalid(
                path,
                b.span(),
                format!("`{}` block takes no labels", b.ident.as_str()),
            ))
        }
    }

    fn missing(
        &self,
        parent: &FieldPath,
        span: Option<Range<usize>>,
        kind: &'static str,
        name: &str,
    ) -> SchemaError {
        SchemaError::MissingField {
            at: self.loc(span),
            field: parent.clone(),
            kind,
            name: name.to_string(),
        }
    }

    // ----- literal values ---------------------------------------------------

    /// A literal string; numbers are converted to their text (as HCL does).
    fn string(&self, a: &Attribute, path: &FieldPath) -> Result<String, SchemaError> {
        match &a.value {
            Expression::String(s) => Ok(s.value().clone()),
            Expression::Number(n) => Ok(n.value().to_string()),
            Expression::Bool(b) => Ok(b.value().to_string()),
            other => Err(self.invalid(
                path,
                a.span(),
                format!("expected a literal string, found {}", describe(other)),
            )),
        }
    }

    fn bool(&self, a: &Attribute, path: &FieldPath) -> Result<bool, SchemaError> {
        match &a.value {
            Expression::Bool(b) => Ok(*b.value()),
            Expression::String(s) if s.value() == "true" => Ok(true),
            Expression::String(s) if s.value() == "false" => Ok(false),
            other => Err(self.invalid(
                path,
                a.span(),
                format!("expected true or false, found {}", describe(other)),
            )),
        }
    }

    fn int<T: TryFrom<i128>>(&self, a: &Attribute, path: &FieldPath) -> Result<T, SchemaError> {
        let v: Option<i128> = match &a.value {
            Expression::Number(n) => {
                let n = n.value();
                n.as_i64()
                    .map(i128::from)
                    .or_else(|| n.as_u64().map(i128::from))
            }
            Expression::String(s) => s.value().trim().parse::<i128>().ok(),
            _ => None,
        };
        v.and_then(|v| T::try_from(v).ok()).ok_or_else(|| {
            self.invalid(
                path,
                a.span(),
                format!("expected an integer in range, found {}", describe(&a.value)),
            )
        })
    }

    fn size(&self, a: &Attribute, path: &FieldPath) -> Result<u64, SchemaError> {
        let text = match &a.value {
            Expression::Number(n) => n.value().to_string(),
            Expression::String(s) => s.value().clone(),
            other => {
                return Err(self.invalid(
                    path,
                    a.span(),
                    format!("expected a size such as \"1g\", found {}", describe(other)),
                ))
            }
        };
        parse_size(&text).map_err(|e| SchemaError::BadSize {
            at: self.loc(a.span()),
            field: path.clone(),
            message: e.to_string(),
        })
    }

    fn duration(&self, a: &Attribute, path: &FieldPath) -> Result<Duration, SchemaError> {
        let text = self.string(a, path)?;
        parse_duration(&text).map_err(|e| SchemaError::BadDuration {
            at: self.loc(a.span()),
            field: path.clone(),
            message: e.to_string(),
        })
    }

    fn path_value(&self, a: &Attribute, path: &FieldPath) -> Result<Option<PathBuf>, SchemaError> {
        let s = self.string(a, path)?;
        // Go treats "" as unset.
        Ok((!s.is_empty()).then(|| PathBuf::from(s)))
    }

    // ----- blocks -----------------------------------------------------------

    /// Splits a body into its attributes and blocks with their paths,
    /// refusing unknown keys (attributes must be in `keys` but not in
    /// `blocks`, blocks must be in `blocks`) and duplicates.
    #[allow(clippy::type_complexity)]
    fn entries<'b>(
        &mut self,
        body: &'b Body,
        path: &FieldPath,
        keys: &str,
        blocks: &[&str],
    ) -> Result<(Vec<(&'b Attribute, FieldPath)>, Vec<(&'b Block, FieldPath)>), SchemaError> {
        let mut seen = Seen::default();
        let (mut attrs, mut blks) = (Vec::new(), Vec::new());
        for s in body.iter() {
            match s {
                Structure::Attribute(a) => {
                    let key = a.key.as_str();
                    if blocks.contains(&key) || !keys.split(", ").any(|k| k == key) {
                        return Err(self.unknown(path, "attribute", key, a.span()));
                    }
                    let p = self.key(&mut seen, path, key, a.span())?;
                    attrs.push((a, p));
                }
                Structure::Block(b) => {
                    let key = b.ident.as_str();
                    if !blocks.contains(&key) {
                        return Err(self.unknown(path, "block", key, b.span()));
                    }
                    let p = self.key(&mut seen, path, key, b.span())?;
                    blks.push((b, p));
                }
            }
        }
        Ok((attrs, blks))
    }

    fn device(
        &mut self,
        body: &Body,
        name: String,
        path: &FieldPath,
        depth: usize,
        block_span: Option<Range<usize>>,
    ) -> Result<DeviceSchema, SchemaError> {
        let mut dev = DeviceSchema::new(name, System::Memory, 0);
        let (mut system, mut size) = (None, None);
        let (attrs, blocks) = self.entries(
            body,
            path,
            DEVICE_KEYS,
            &["source", "sync", "migration", "writecache"],
        )?;
        for (a, p) in attrs {
            match p.leaf() {
                "system" => {
                    let v = self.string(a, &p)?;
                    system = Some(System::from_keyword(&v).ok_or_else(|| {
                        SchemaError::UnknownSystem {
                            at: self.loc(a.span()),
                            field: p.clone(),
                            value: v,
                        }
                    })?);
                }
                "size" => size = Some(self.size(a, &p)?),
                "blocksize" => dev.block_size = Some(self.size(a, &p)?),
                "expose" => dev.expose = self.bool(a, &p)?,
                "location" => dev.location = self.path_value(a, &p)?,
                "sourcehashes" => dev.source_hashes = self.path_value(a, &p)?,
                "sourceshared" => dev.source_shared = self.bool(a, &p)?,
                "loadbinlog" => dev.load_binlog = self.path_value(a, &p)?,
                "binlog" => dev.binlog = self.path_value(a, &p)?,
                _ => dev.pid = Some(self.int(a, &p)?),
            }
        }
        for (b, p) in blocks {
            if p.leaf() == "source" {
                let label = self.single_label(b, &p)?;
                if depth + 1 > MAX_SOURCE_DEPTH {
                    return Err(self.invalid(
                        &p,
                        b.span(),
                        format!("copy-on-write sources nested more than {MAX_SOURCE_DEPTH} deep"),
                    ));
                }
                let sp = path.child(format!("source {}", super::error::quote(&label)));
                self.record(&sp, b.span());
                dev.source = Some(Box::new(self.device(
                    &b.body,
                    label,
                    &sp,
                    depth + 1,
                    b.span(),
                )?));
                continue;
            }
            self.no_labels(b, &p)?;
            match p.leaf() {
                "sync" => dev.sync = Some(self.sync(b, &p)?),
                "migration" => dev.migration = Some(self.migration(b, &p)?),
                _ => dev.write_cache = Some(self.write_cache(b, &p)?),
            }
        }
        let m = |name| self.missing(path, block_span.clone(), "attribute", name);
        dev.system = system.ok_or_else(|| m("system"))?;
        dev.size = size.ok_or_else(|| m("size"))?;
        Ok(dev)
    }

    fn sync(&mut self, b: &Block, path: &FieldPath) -> Result<SyncSchema, SchemaError> {
        let (mut secure, mut access, mut secret, mut endpoint, mut bucket) =
            (None, None, None, None, None);
        let (mut prefix, mut grab_prefix) = (String::new(), String::new());
        let (mut auto_start, mut grab_conc, mut config) = (None, None, None);
        let (attrs, blocks) = self.entries(&b.body, path, SYNC_KEYS, &["config"])?;
        for (a, p) in attrs {
            match p.leaf() {
                "secure" => secure = Some(self.bool(a, &p)?),
                "accesskey" => access = Some(self.string(a, &p)?),
                "secretkey" => secret = Some(self.string(a, &p)?),
                "endpoint" => endpoint = Some(self.string(a, &p)?),
                "bucket" => bucket = Some(self.string(a, &p)?),
                "prefix" => prefix = self.string(a, &p)?,
                "grabprefix" => grab_prefix = self.string(a, &p)?,
                "autostart" => auto_start = Some(self.bool(a, &p)?),
                _ => grab_conc = Some(self.int(a, &p)?),
            }
        }
        for (cb, p) in blocks {
            self.no_labels(cb, &p)?;
            config = Some(self.sync_config(cb, &p)?);
        }
        let sp = b.span();
        let m = |kind, name| self.missing(path, sp.clone(), kind, name);
        Ok(SyncSchema {
            secure: secure.ok_or_else(|| m("attribute", "secure"))?,
            access_key: access.ok_or_else(|| m("attribute", "accesskey"))?,
            secret_key: secret.ok_or_else(|| m("attribute", "secretkey"))?,
            endpoint: endpoint.ok_or_else(|| m("attribute", "endpoint"))?,
            bucket: bucket.ok_or_else(|| m("attribute", "bucket"))?,
            prefix,
            grab_prefix,
            auto_start: auto_start.ok_or_else(|| m("attribute", "autostart"))?,
            grab_concurrency: grab_conc.ok_or_else(|| m("attribute", "grabconcurrency"))?,
            config: config.ok_or_else(|| m("block", "config"))?,
        })
    }

    fn sync_config(
        &mut self,
        b: &Block,
        path: &FieldPath,
    ) -> Result<SyncConfigSchema, SchemaError> {
        let (mut only_dirty, mut shift, mut max_age, mut min_changed) = (None, None, None, None);
        let (mut check, mut limit, mut conc) = (None, None, None);
        for (a, p) in self.entries(&b.body, path, CONFIG_KEYS, &[])?.0 {
            match p.leaf() {
                "onlydirty" => only_dirty = Some(self.bool(a, &p)?),
                "blockshift" => shift = Some(self.int(a, &p)?),
                "maxage" => max_age = Some(self.duration(a, &p)?),
                "minchanged" => min_changed = Some(self.int(a, &p)?),
                "checkperiod" => check = Some(self.duration(a, &p)?),
                "limit" => limit = Some(self.int(a, &p)?),
                _ => conc = Some(self.int(a, &p)?),
            }
        }
        let sp = b.span();
        let m = |name| self.missing(path, sp.clone(), "attribute", name);
        Ok(SyncConfigSchema {
            only_dirty: only_dirty.ok_or_else(|| m("onlydirty"))?,
            block_shift: shift.ok_or_else(|| m("blockshift"))?,
            max_age: max_age.ok_or_else(|| m("maxage"))?,
            min_changed: min_changed.ok_or_else(|| m("minchanged"))?,
            check_period: check.ok_or_else(|| m("checkperiod"))?,
            limit: limit.ok_or_else(|| m("limit"))?,
            concurrency: conc.ok_or_else(|| m("concurrency"))?,
        })
    }

    fn migration(&mut self, b: &Block, path: &FieldPath) -> Result<MigrationSchema, SchemaError> {
        let mut any_order = None;
        for (a, p) in self.entries(&b.body, path, MIGRATION_KEYS, &[])?.0 {
            any_order = Some(self.bool(a, &p)?);
        }
        Ok(MigrationSchema {
            any_order: any_order
                .ok_or_else(|| self.missing(path, b.span(), "attribute", "anyorder"))?,
        })
    }

    fn write_cache(
        &mut self,
        b: &Block,
        path: &FieldPath,
    ) -> Result<WriteCacheSchema, SchemaError> {
        let (mut min, mut max, mut flush, mut bs) = (None, None, None, None);
        for (a, p) in self.entries(&b.body, path, WRITECACHE_KEYS, &[])?.0 {
            match p.leaf() {
                "minsize" => min = Some(self.size(a, &p)?),
                "maxsize" => max = Some(self.size(a, &p)?),
                "flushperiod" => flush = Some(self.duration(a, &p)?),
                _ => bs = Some(self.size(a, &p)?),
            }
        }
        let sp = b.span();
        let m = |name| self.missing(path, sp.clone(), "attribute", name);
        Ok(WriteCacheSchema {
            min_size: min.ok_or_else(|| m("minsize"))?,
            max_size: max.ok_or_else(|| m("maxsize"))?,
            flush_period: flush.ok_or_else(|| m("flushperiod"))?,
            block_size: bs,
        })
    }
}

fn describe(e: &Expression) -> &'static str {
    match e {
        Expression::Null(_) => "null",
        Expression::Bool(_) => "a bool",
        Expression::Number(_) => "a number",
        Expression::String(_) => "a string",
        Expression::Array(_) => "a list",
        Expression::Object(_) => "an object",
        Expression::StringTemplate(_) | Expression::HeredocTemplate(_) => {
            "a template (interpolation is not supported)"
        }
        _ => "an expression (only literals are supported)",
    }
}

// ----- encoding ----------------------------------------------------------------

/// Quotes a string as an HCL string literal, escaping quotes, backslashes,
/// control characters and template sequences (`${`, `%{`).
fn hcl_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '$' | '%' if chars.peek() == Some(&'{') => {
                out.push(c);
                out.push(c);
            }
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn path_str(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Encodes a device as a `device "<name>" { … }` HCL block that parses back
/// (with this crate or Go silo) to the same schema. Sizes are written with
/// `g`/`m`/`k` suffixes where exact, durations as Go duration strings.
/// Non-UTF-8 paths are written lossily.
pub fn encode_device_hcl(dev: &DeviceSchema) -> String {
    let mut out = String::new();
    encode_block(&mut out, "device", dev, 0);
    out
}

fn encode_block(out: &mut String, ident: &str, dev: &DeviceSchema, indent: usize) {
    let pad = "  ".repeat(indent);
    let _ = writeln!(out, "{pad}{ident} {} {{", hcl_quote(&dev.name));
    let pad = "  ".repeat(indent + 1);
    let mut attr = |k: &str, v: String| {
        let _ = writeln!(out, "{pad}{k} = {v}");
    };
    attr("system", hcl_quote(dev.system.as_str()));
    attr("size", hcl_quote(&format_size(dev.size)));
    if let Some(bs) = dev.block_size {
        attr("blocksize", hcl_quote(&format_size(bs)));
    }
    if dev.expose {
        attr("expose", "true".into());
    }
    if let Some(p) = &dev.location {
        attr("location", hcl_quote(&path_str(p)));
    }
    if let Some(p) = &dev.source_hashes {
        attr("sourcehashes", hcl_quote(&path_str(p)));
    }
    if dev.source_shared {
        attr("sourceshared", "true".into());
    }
    if let Some(p) = &dev.load_binlog {
        attr("loadbinlog", hcl_quote(&path_str(p)));
    }
    if let Some(p) = &dev.binlog {
        attr("binlog", hcl_quote(&path_str(p)));
    }
    if let Some(pid) = dev.pid {
        attr("pid", pid.to_string());
    }
    if let Some(src) = &dev.source {
        encode_block(out, "source", src, indent + 1);
    }
    if let Some(s) = &dev.sync {
        let p1 = "  ".repeat(indent + 1);
        let p2 = "  ".repeat(indent + 2);
        let p3 = "  ".repeat(indent + 3);
        let _ = writeln!(out, "{p1}sync {{");
        let _ = writeln!(out, "{p2}secure = {}", s.secure);
        let _ = writeln!(out, "{p2}accesskey = {}", hcl_quote(&s.access_key));
        let _ = writeln!(out, "{p2}secretkey = {}", hcl_quote(&s.secret_key));
        let _ = writeln!(out, "{p2}endpoint = {}", hcl_quote(&s.endpoint));
        let _ = writeln!(out, "{p2}bucket = {}", hcl_quote(&s.bucket));
        if !s.prefix.is_empty() {
            let _ = writeln!(out, "{p2}prefix = {}", hcl_quote(&s.prefix));
        }
        if !s.grab_prefix.is_empty() {
            let _ = writeln!(out, "{p2}grabprefix = {}", hcl_quote(&s.grab_prefix));
        }
        let _ = writeln!(out, "{p2}autostart = {}", s.auto_start);
        let _ = writeln!(out, "{p2}grabconcurrency = {}", s.grab_concurrency);
        let c = &s.config;
        let _ = writeln!(out, "{p2}config {{");
        let _ = writeln!(out, "{p3}onlydirty = {}", c.only_dirty);
        let _ = writeln!(out, "{p3}blockshift = {}", c.block_shift);
        let _ = writeln!(
            out,
            "{p3}maxage = {}",
            hcl_quote(&format_duration(c.max_age))
        );
        let _ = writeln!(out, "{p3}minchanged = {}", c.min_changed);
        let _ = writeln!(
            out,
            "{p3}checkperiod = {}",
            hcl_quote(&format_duration(c.check_period))
        );
        let _ = writeln!(out, "{p3}limit = {}", c.limit);
        let _ = writeln!(out, "{p3}concurrency = {}", c.concurrency);
        let _ = writeln!(out, "{p2}}}");
        let _ = writeln!(out, "{p1}}}");
    }
    let p1 = "  ".repeat(indent + 1);
    let p2 = "  ".repeat(indent + 2);
    if let Some(m) = &dev.migration {
        let _ = writeln!(out, "{p1}migration {{");
        let _ = writeln!(out, "{p2}anyorder = {}", m.any_order);
        let _ = writeln!(out, "{p1}}}");
    }
    if let Some(w) = &dev.write_cache {
        let _ = writeln!(out, "{p1}writecache {{");
        let _ = writeln!(out, "{p2}minsize = {}", hcl_quote(&format_size(w.min_size)));
        let _ = writeln!(out, "{p2}maxsize = {}", hcl_quote(&format_size(w.max_size)));
        let _ = writeln!(
            out,
            "{p2}flushperiod = {}",
            hcl_quote(&format_duration(w.flush_period))
        );
        if let Some(bs) = w.block_size {
            let _ = writeln!(out, "{p2}blocksize = {}", hcl_quote(&format_size(bs)));
        }
        let _ = writeln!(out, "{p1}}}");
    }
    let _ = writeln!(out, "{}}}", "  ".repeat(indent));
}
