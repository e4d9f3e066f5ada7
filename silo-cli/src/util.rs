//! Helpers shared by the commands: schema loading, signals, hooks that count
//! dirty rounds, hashing and formatting.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use silo_devicegroup::hooks::default_continue;
use silo_devicegroup::{DeviceGroup, MigrateDirtyHooks, SiloSchema, ToProtocol};
use silo_storage::{DynProvider, Provider};

/// Exit code of a command interrupted by SIGINT/SIGTERM.
pub const EXIT_INTERRUPTED: u8 = 130;

/// Reads and validates a schema file (HCL, TOML or JSON by extension).
pub fn load_schema(path: &Path) -> anyhow::Result<SiloSchema> {
    // A separate read first gives "cannot read" errors a clear shape
    // (missing file, permission denied) before any parsing.
    std::fs::metadata(path).with_context(|| format!("cannot read config {}", path.display()))?;
    // Schema errors name the file, line and field themselves.
    let schema = SiloSchema::from_file(path)?;
    if schema.devices.is_empty() {
        anyhow::bail!("config {} defines no device", path.display());
    }
    Ok(schema)
}

/// Resolves when SIGINT or SIGTERM arrives.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// Counters of a run, shared with the metrics endpoint and the summary.
#[derive(Debug, Default)]
pub struct RunStats {
    /// Dirty rounds run (one per device and round).
    pub dirty_rounds: AtomicU64,
    /// Blocks re-sent by dirty rounds.
    pub dirty_blocks: AtomicU64,
    /// Cut-over duration in microseconds (0 before the cut-over).
    pub cutover_us: AtomicU64,
    /// 1 once the migration completed.
    pub completed: AtomicU64,
}

/// Dirty-loop hooks: the default convergence policy, counting rounds.
#[derive(Debug)]
pub struct CountingHooks(pub Arc<RunStats>);

#[async_trait]
impl MigrateDirtyHooks for CountingHooks {
    async fn post_migrate_dirty(
        &self,
        _index: usize,
        _to: &ToProtocol,
        dirty_history: &[usize],
    ) -> silo_devicegroup::Result<bool> {
        self.0.dirty_rounds.fetch_add(1, Ordering::Relaxed);
        let last = dirty_history.last().copied().unwrap_or(0) as u64;
        self.0.dirty_blocks.fetch_add(last, Ordering::Relaxed);
        Ok(default_continue(dirty_history))
    }
}

/// The cut-over, step by step (so the dirty rounds are counted): pause the
/// writers, last dirty rounds, authority transfer, completed. Returns its
/// duration and records it in `stats`.
pub async fn cut_over(
    group: &DeviceGroup,
    stats: &Arc<RunStats>,
    authority: &'static [u8],
) -> anyhow::Result<Duration> {
    let t0 = std::time::Instant::now();
    group.lock_all().await;
    group
        .migrate_dirty(&CountingHooks(stats.clone()))
        .await
        .context("last dirty round")?;
    group
        .send_custom_data(bytes::Bytes::from_static(authority))
        .await
        .context("authority transfer")?;
    group
        .completed()
        .await
        .context("completing the migration")?;
    let took = t0.elapsed();
    stats
        .cutover_us
        .store(took.as_micros() as u64, Ordering::Relaxed);
    stats.completed.store(1, Ordering::Relaxed);
    Ok(took)
}

/// Closes a sending group after its cut-over: the source devices stay
/// locked, so writes paused by the cut-over fail instead of landing on the
/// now stale source; files are flushed first.
pub async fn close_after_cutover(group: &DeviceGroup) {
    for name in group.names() {
        if let Some(p) = group.unlocked_provider(&name) {
            if let Err(e) = p.flush().await {
                tracing::warn!(device = %name, error = %e, "flush after the cut-over");
            }
        }
        if let Some(l) = group.lockable(&name) {
            // Fails the paused operations (Closed) while still locked.
            if let Err(e) = l.close().await {
                tracing::warn!(device = %name, error = %e, "closing after the cut-over");
            }
        }
    }
    if let Err(e) = group.close_all().await {
        tracing::debug!(error = %e, "close_all after the cut-over");
    }
}

/// Flushes every device, then closes the group; returns the first error.
pub async fn flush_and_close(group: &DeviceGroup) -> anyhow::Result<()> {
    let mut first: Option<anyhow::Error> = None;
    for name in group.names() {
        if let Some(p) = group.unlocked_provider(&name) {
            if let Err(e) = p.flush().await {
                first.get_or_insert(anyhow::Error::new(e).context(format!("flushing {name}")));
            }
        }
    }
    if let Err(e) = group.close_all().await {
        first.get_or_insert(anyhow::Error::new(e).context("closing the devices"));
    }
    first.map_or(Ok(()), Err)
}

/// SHA-256 of a whole provider, hex.
pub async fn sha256_hex(p: &DynProvider) -> anyhow::Result<String> {
    let d = silo_storage::hash::sha256(p.as_ref())
        .await
        .context("hashing")?;
    Ok(silo_storage::hash::to_hex(&d))
}

/// `12.3 MiB`.
pub fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A file-name-safe version of a device name.
pub fn file_name_for(device: &str) -> String {
    let s: String = device
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let s = s.trim_start_matches('.').to_string();
    if s.is_empty() {
        "device".into()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_safe() {
        assert_eq!(file_name_for("disk0"), "disk0");
        assert_eq!(file_name_for("../etc/passwd"), "_etc_passwd");
        assert_eq!(file_name_for(""), "device");
        assert_eq!(file_name_for("a b/c"), "a_b_c");
    }

    #[test]
    fn bytes_are_human() {
        assert_eq!(human_bytes(512.0), "512 B");
        assert_eq!(human_bytes(1536.0), "1.5 KiB");
        assert_eq!(human_bytes(3.0 * 1024.0 * 1024.0 * 1024.0), "3.0 GiB");
    }
}
