//! The receiver's trust policy for sender-supplied device schemas.
//!
//! In a migration the sender describes each device with a schema (see
//! [`decode_device_hcl`](crate::schema::decode_device_hcl)). Go silo builds
//! whatever that schema says; a hostile sender could then write any file the
//! receiver can write, read any file as a copy-on-write base, expose NBD
//! devices as root or point S3 sync at its own endpoint. [`sanitize`] applies
//! a [`ReceivePolicy`] instead:
//!
//! * every path (`location`, `binlog`, `loadbinlog`, `sourcehashes`, the
//!   copy-on-write state file of each `source` block, recursively) must
//!   resolve inside [`ReceivePolicy::base_dir`]: relative paths are joined to
//!   it, `..` may not climb out of it, absolute paths elsewhere are refused,
//!   and existing symlinks along the path must not lead out of it;
//! * `expose` is the receiver's decision: the sender's value is kept only if
//!   [`ReceivePolicy::allow_expose`] is set, otherwise it is forced off;
//! * S3 endpoint, bucket and credentials come from [`ReceivePolicy::s3`];
//!   the sender's are dropped. Without receiver S3 settings the `sync` block
//!   is removed (S3 assist is an optimisation; the data still arrives over
//!   the migration connection);
//! * systems outside [`ReceivePolicy::allowed_systems`] and sizes above
//!   [`ReceivePolicy::max_device_size`] / [`ReceivePolicy::max_memory_device_size`]
//!   are refused;
//! * `pid` is dropped.
//!
//! Recommended order on the receiver: `decode_device_hcl` → `sanitize` →
//! the application's `tweak` (trusted; may rewrite paths with
//! [`rewrite_paths_into`], set `expose`, …) → [`DeviceSchema::validate`].
//!
//! Symlink checks look at the file system when `sanitize` runs; a local
//! attacker who can create symlinks inside `base_dir` later can still race
//! it, so `base_dir` should be writable only by the receiver.

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

use crate::schema::{DeviceSchema, PathField, SchemaError, System};

/// Receiver-side S3 settings that replace whatever the sender sent.
///
/// `Debug` redacts the secret key.
#[derive(Clone, PartialEq, Eq)]
pub struct ReceiverS3 {
    /// S3 endpoint (host:port).
    pub endpoint: String,
    /// Bucket.
    pub bucket: String,
    /// Access key.
    pub access_key: String,
    /// Secret key.
    pub secret_key: String,
    /// Use HTTPS.
    pub secure: bool,
    /// Prefix of the keys this receiver uploads (so hops don't overwrite
    /// each other's objects).
    pub prefix: String,
    /// Prefix to grab the sender's blocks from; `None` uses the sender's
    /// `prefix` (where the sender uploaded them).
    pub grab_prefix: Option<String>,
    /// Whether the receiver starts its own continuous sync.
    pub auto_start: bool,
}

impl std::fmt::Debug for ReceiverS3 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiverS3")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("access_key", &self.access_key)
            .field("secret_key", &"<redacted>")
            .field("secure", &self.secure)
            .field("prefix", &self.prefix)
            .field("grab_prefix", &self.grab_prefix)
            .field("auto_start", &self.auto_start)
            .finish()
    }
}

/// What a receiver accepts from sender-supplied schemas. See the
/// [module documentation](self).
#[derive(Debug, Clone)]
pub struct ReceivePolicy {
    /// Every path must resolve inside this directory.
    pub base_dir: PathBuf,
    /// Keep the sender's `expose` (default `false`: never expose).
    pub allow_expose: bool,
    /// The receiver's S3 settings (default `None`: drop `sync` blocks).
    pub s3: Option<ReceiverS3>,
    /// Largest accepted device (default 4 TiB).
    pub max_device_size: u64,
    /// Largest accepted `memory` device (default 16 GiB), since it is RAM.
    pub max_memory_device_size: u64,
    /// Accepted systems (default `memory`, `file`, `sparsefile`).
    pub allowed_systems: Vec<System>,
}

impl ReceivePolicy {
    /// The default policy for paths under `base_dir`.
    pub fn new(base_dir: impl Into<PathBuf>) -> Self {
        ReceivePolicy {
            base_dir: base_dir.into(),
            allow_expose: false,
            s3: None,
            max_device_size: 4 << 40,
            max_memory_device_size: 16 << 30,
            allowed_systems: vec![System::Memory, System::File, System::SparseFile],
        }
    }
}

/// Why a sender-supplied schema was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The schema itself is invalid.
    #[error("invalid schema from sender: {0}")]
    Schema(Box<SchemaError>),
    /// The system is not in [`ReceivePolicy::allowed_systems`].
    #[error("device {device:?}: {field}: system {system} is not allowed by the receiver")]
    SystemNotAllowed {
        /// Device name.
        device: String,
        /// The field (`system`, or a nested source's `system`).
        field: String,
        /// The refused system.
        system: System,
    },
    /// The size is above the receiver's limit.
    #[error("device {device:?}: {field}: size {bytes} bytes exceeds the receiver's limit of {max} bytes")]
    SizeTooLarge {
        /// Device name.
        device: String,
        /// The field.
        field: String,
        /// The requested size.
        bytes: u64,
        /// The limit.
        max: u64,
    },
    /// A path resolves outside the base directory.
    #[error("device {device:?}: {field}: path {path:?} is outside the receiver's base directory {base:?}")]
    PathOutsideBase {
        /// Device name.
        device: String,
        /// The field (e.g. `location`, `source.binlog`).
        field: String,
        /// The path as sent (joined to the base if relative).
        path: PathBuf,
        /// The base directory.
        base: PathBuf,
    },
    /// A path cannot be checked (a dangling symlink, an unreadable directory, …).
    #[error("device {device:?}: {field}: path {path:?} cannot be checked: {reason}")]
    PathUnresolvable {
        /// Device name.
        device: String,
        /// The field.
        field: String,
        /// The path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

impl From<SchemaError> for PolicyError {
    fn from(e: SchemaError) -> Self {
        PolicyError::Schema(Box::new(e))
    }
}

/// Applies `policy` to a sender-supplied schema and returns the schema the
/// receiver may build. See the [module documentation](self) for the rules.
pub fn sanitize(policy: &ReceivePolicy, schema: DeviceSchema) -> Result<DeviceSchema, PolicyError> {
    schema.validate()?;
    let mut schema = schema;
    let device = schema.name.clone();
    check_limits(policy, &device, &schema, String::new())?;
    let base = lexical_normalize(&absolute(&policy.base_dir));
    let canonical_base = std::fs::canonicalize(&base).unwrap_or_else(|_| base.clone());
    schema.try_visit_paths_mut::<PolicyError>(&mut |field, depth, path| {
        let name = field_name(field, depth);
        *path = confine(&base, &canonical_base, path).map_err(|e| match e {
            Confine::Outside(p) => PolicyError::PathOutsideBase {
                device: device.clone(),
                field: name,
                path: p,
                base: policy.base_dir.clone(),
            },
            Confine::Unresolvable(p, reason) => PolicyError::PathUnresolvable {
                device: device.clone(),
                field: name,
                path: p,
                reason,
            },
        })?;
        Ok(())
    })?;
    apply_receiver_settings(policy, &mut schema, 0);
    schema.validate()?;
    Ok(schema)
}

fn field_name(field: PathField, depth: usize) -> String {
    let mut s = "source.".repeat(depth);
    s.push_str(field.key());
    if field == PathField::CowStateFile {
        s.push_str(" (copy-on-write state file)");
    }
    s
}

fn check_limits(
    policy: &ReceivePolicy,
    device: &str,
    d: &DeviceSchema,
    prefix: String,
) -> Result<(), PolicyError> {
    if !policy.allowed_systems.contains(&d.system) {
        return Err(PolicyError::SystemNotAllowed {
            device: device.to_string(),
            field: format!("{prefix}system"),
            system: d.system,
        });
    }
    let max = if d.system == System::Memory {
        policy.max_memory_device_size.min(policy.max_device_size)
    } else {
        policy.max_device_size
    };
    if d.size > max {
        return Err(PolicyError::SizeTooLarge {
            device: device.to_string(),
            field: format!("{prefix}size"),
            bytes: d.size,
            max,
        });
    }
    if let Some(w) = &d.write_cache {
        if w.max_size > policy.max_memory_device_size {
            return Err(PolicyError::SizeTooLarge {
                device: device.to_string(),
                field: format!("{prefix}writecache.maxsize"),
                bytes: w.max_size,
                max: policy.max_memory_device_size,
            });
        }
    }
    if let Some(src) = d.source.as_deref() {
        check_limits(policy, device, src, format!("{prefix}source."))?;
    }
    Ok(())
}

fn apply_receiver_settings(policy: &ReceivePolicy, d: &mut DeviceSchema, depth: usize) {
    if d.system == System::S3 {
        // Never the sender's bucket: the receiver's own, under its prefix
        // (without receiver S3 settings the device has no location and is
        // refused).
        d.location = policy.s3.as_ref().map(|s3| {
            PathBuf::from(format!(
                "s3://{}/{}",
                s3.bucket,
                crate::s3::device_prefix(&s3.prefix, &d.name)
            ))
        });
    }
    if d.expose && (!policy.allow_expose || depth > 0) {
        tracing::info!(device = %d.name, "ignoring the sender's expose = true (receiver policy)");
        d.expose = false;
    }
    d.pid = None;
    match (&policy.s3, d.sync.take()) {
        (_, None) => {}
        (None, Some(_)) => {
            tracing::info!(
                device = %d.name,
                "dropping the sender's sync block: the receiver has no S3 settings"
            );
        }
        (Some(s3), Some(mut sync)) => {
            sync.grab_prefix = s3.grab_prefix.clone().unwrap_or(sync.prefix);
            sync.prefix = s3.prefix.clone();
            sync.endpoint = s3.endpoint.clone();
            sync.bucket = s3.bucket.clone();
            sync.access_key = s3.access_key.clone();
            sync.secret_key = s3.secret_key.clone();
            sync.secure = s3.secure;
            sync.auto_start = s3.auto_start;
            d.sync = Some(sync);
        }
    }
    if let Some(src) = d.source.as_deref_mut() {
        apply_receiver_settings(policy, src, depth + 1);
    }
}

enum Confine {
    Outside(PathBuf),
    Unresolvable(PathBuf, String),
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Resolves `.` and `..` without touching the file system. Returns `None`
/// if `..` climbs above the root.
fn lexical_normalize_checked(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Prefix(_) | Component::RootDir => out.push(c.as_os_str()),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() || out.as_os_str().is_empty() {
                    return None;
                }
            }
            Component::Normal(n) => out.push(n),
        }
    }
    Some(out)
}

fn lexical_normalize(p: &Path) -> PathBuf {
    lexical_normalize_checked(p).unwrap_or_else(|| p.to_path_buf())
}

/// Joins `p` to `base` if relative, normalises it, and checks that it and
/// the real location of its longest existing ancestor stay inside the base.
fn confine(base: &Path, canonical_base: &Path, p: &Path) -> Result<PathBuf, Confine> {
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    };
    let Some(norm) = lexical_normalize_checked(&joined) else {
        return Err(Confine::Outside(joined));
    };
    if !norm.starts_with(base) || norm == base {
        return Err(Confine::Outside(joined));
    }
    // Symlinks: find the longest prefix that exists and resolve it.
    let mut existing = norm.as_path();
    let mut rest: Vec<&std::ffi::OsStr> = Vec::new();
    loop {
        match std::fs::symlink_metadata(existing) {
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else {
                    break;
                };
                rest.push(name);
                existing = parent;
            }
            Err(e) => return Err(Confine::Unresolvable(norm.clone(), e.to_string())),
        }
    }
    let real = std::fs::canonicalize(existing).map_err(|e| {
        Confine::Unresolvable(
            norm.clone(),
            format!("cannot resolve {}: {e}", existing.display()),
        )
    })?;
    let real = rest.iter().rev().fold(real, |acc, n| acc.join(n));
    if !real.starts_with(canonical_base) || real == canonical_base {
        return Err(Confine::Outside(norm));
    }
    Ok(norm)
}

/// Rewrites every path of `schema` (and of its `source` chain, including the
/// copy-on-write state files) to `dir/<file name>`; the CLI's
/// `connect --dir DIR` uses this as its `tweak`. Two paths of one schema
/// that would land on the same file get `.1`, `.2`, … appended, so an
/// overlay never shares a file with its base. Paths without a file name
/// (`/`, `..`) become `dir/<device>.<field>`. Different devices with equal
/// file names still collide; callers with such groups should use a
/// directory per device.
pub fn rewrite_paths_into(mut schema: DeviceSchema, dir: &Path) -> DeviceSchema {
    let device: String = schema
        .name
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut used: HashSet<PathBuf> = HashSet::new();
    let _ = schema.try_visit_paths_mut::<()>(&mut |field, _, path| {
        let file = match path.file_name() {
            Some(f) => PathBuf::from(f),
            None => PathBuf::from(format!("{device}.{}", field.key())),
        };
        let mut candidate = dir.join(&file);
        let mut n = 1;
        while used.contains(&candidate) {
            let mut name = file.clone().into_os_string();
            name.push(format!(".{n}"));
            candidate = dir.join(name);
            n += 1;
        }
        used.insert(candidate.clone());
        *path = candidate;
        Ok(())
    });
    schema
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize() {
        assert_eq!(
            lexical_normalize_checked(Path::new("/a/./b/../c")),
            Some(PathBuf::from("/a/c"))
        );
        assert_eq!(lexical_normalize_checked(Path::new("/a/../..")), None);
        assert_eq!(lexical_normalize_checked(Path::new("/..")), None);
    }
}
