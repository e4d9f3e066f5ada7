//! The Prometheus families of a migration: per-device I/O, dirty tracking,
//! migration progress, waiting caches, protocol bytes by message kind, and
//! the run's dirty rounds and cut-over time. The names are documented in
//! the crate README.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use silo_devicegroup::DeviceGroup;
use silo_protocol::Connection;

use crate::metrics_http::{Encoder, Kind, Registry};
use crate::util::RunStats;

/// Every metric name this module can emit (documented in the README, and
/// checked by the tests).
#[cfg_attr(not(test), allow(dead_code))]
pub const NAMES: &[&str] = &[
    "silo_device_size_bytes",
    "silo_device_ops_total",
    "silo_device_bytes_total",
    "silo_device_errors_total",
    "silo_device_dirty_blocks",
    "silo_device_writes_total",
    "silo_migration_blocks_total",
    "silo_migration_blocks_migrated",
    "silo_migration_blocks_ready",
    "silo_migration_blocks_dirty",
    "silo_migration_blocks_pending",
    "silo_migration_blocks_sent_total",
    "silo_migration_bytes_sent_total",
    "silo_migration_dirty_rounds_total",
    "silo_migration_dirty_blocks_total",
    "silo_migration_cutover_seconds",
    "silo_migration_completed",
    "silo_receive_blocks_present",
    "silo_receive_waits_total",
    "silo_receive_wait_seconds_total",
    "silo_receive_needs_total",
    "silo_protocol_bytes_total",
    "silo_protocol_frames_total",
];

/// Registers the collectors of `group` (held weakly: a closed group stops
/// reporting), of its migration connection and of the run's counters.
pub fn register(
    registry: &Registry,
    group: &Arc<DeviceGroup>,
    conn: Option<Connection>,
    stats: Arc<RunStats>,
) {
    let weak: Weak<DeviceGroup> = Arc::downgrade(group);
    registry.register(move |e| {
        if let Some(g) = weak.upgrade() {
            group_samples(e, &g);
        }
        run_samples(e, &stats);
        if let Some(c) = &conn {
            protocol_samples(e, c);
        }
    });
}

fn group_samples(e: &mut Encoder, g: &DeviceGroup) {
    use Kind::{Counter, Gauge};
    for name in g.names() {
        let Some(m) = g.metrics(&name) else { continue };
        let dev = [("device", name.as_str())];
        let size = g.provider(&name).map(|p| p.size()).unwrap_or(0);
        e.sample(
            "silo_device_size_bytes",
            Gauge,
            "Device size in bytes",
            &dev,
            size as f64,
        );
        let p = &m.provider;
        for (op, s) in [
            ("read", &p.read),
            ("write", &p.write),
            ("flush", &p.flush),
            ("trim", &p.trim),
            ("write_zeroes", &p.write_zeroes),
        ] {
            let l = [("device", name.as_str()), ("op", op)];
            e.sample(
                "silo_device_ops_total",
                Counter,
                "Operations on the device storage (application and migration)",
                &l,
                s.ops as f64,
            );
            e.sample(
                "silo_device_bytes_total",
                Counter,
                "Bytes moved by successful operations",
                &l,
                s.bytes as f64,
            );
            e.sample(
                "silo_device_errors_total",
                Counter,
                "Failed operations",
                &l,
                s.errors as f64,
            );
        }
        e.sample(
            "silo_device_dirty_blocks",
            Gauge,
            "Blocks written since they were last sent (dirty tracker)",
            &dev,
            m.dirty.dirty_blocks as f64,
        );
        e.sample(
            "silo_device_writes_total",
            Counter,
            "Application writes seen by the volatility monitor",
            &dev,
            m.volatility_writes as f64,
        );
        if let Some(mp) = &m.migration {
            let pending = mp
                .total_blocks
                .saturating_sub(mp.migrated_blocks + mp.skipped_blocks);
            for (n, k, h, v) in [
                (
                    "silo_migration_blocks_total",
                    Gauge,
                    "Blocks of the device",
                    mp.total_blocks,
                ),
                (
                    "silo_migration_blocks_migrated",
                    Gauge,
                    "Blocks sent at least once",
                    mp.migrated_blocks,
                ),
                (
                    "silo_migration_blocks_ready",
                    Gauge,
                    "Blocks whose latest version is at the destination",
                    mp.ready_blocks,
                ),
                (
                    "silo_migration_blocks_dirty",
                    Gauge,
                    "Migrated blocks written since, awaiting a re-send",
                    mp.dirty_blocks,
                ),
                (
                    "silo_migration_blocks_pending",
                    Gauge,
                    "Blocks not sent yet",
                    pending,
                ),
                (
                    "silo_migration_blocks_sent_total",
                    Counter,
                    "Block transfers completed (with re-sends)",
                    mp.blocks_sent,
                ),
                (
                    "silo_migration_bytes_sent_total",
                    Counter,
                    "Bytes written to the destination",
                    mp.bytes_sent,
                ),
            ] {
                e.sample(n, k, h, &dev, v as f64);
            }
        }
        if let Some(w) = &m.waiting {
            let bs = g.schema(&name).map(|s| s.block_size_bytes()).unwrap_or(1);
            let total = size.div_ceil(bs.max(1));
            e.sample(
                "silo_receive_blocks_present",
                Gauge,
                "Blocks present at the destination",
                &dev,
                (w.remote_present + w.local_present).min(total) as f64,
            );
            e.sample(
                "silo_receive_waits_total",
                Counter,
                "Destination reads that waited for a missing block",
                &dev,
                w.waits as f64,
            );
            e.sample(
                "silo_receive_wait_seconds_total",
                Counter,
                "Time destination reads spent waiting",
                &dev,
                w.wait_time.as_secs_f64(),
            );
            e.sample(
                "silo_receive_needs_total",
                Counter,
                "Priority requests (need-at) sent to the source",
                &dev,
                w.needs as f64,
            );
        }
    }
}

fn run_samples(e: &mut Encoder, s: &RunStats) {
    use Kind::{Counter, Gauge};
    e.sample(
        "silo_migration_dirty_rounds_total",
        Counter,
        "Dirty rounds run (per device and round)",
        &[],
        s.dirty_rounds.load(Ordering::Relaxed) as f64,
    );
    e.sample(
        "silo_migration_dirty_blocks_total",
        Counter,
        "Blocks re-sent by dirty rounds",
        &[],
        s.dirty_blocks.load(Ordering::Relaxed) as f64,
    );
    e.sample(
        "silo_migration_cutover_seconds",
        Gauge,
        "Duration of the cut-over (0 before it)",
        &[],
        s.cutover_us.load(Ordering::Relaxed) as f64 / 1e6,
    );
    e.sample(
        "silo_migration_completed",
        Gauge,
        "1 once the migration completed",
        &[],
        s.completed.load(Ordering::Relaxed) as f64,
    );
}

fn protocol_samples(e: &mut Encoder, c: &Connection) {
    let m = c.metrics();
    for (kind, st) in &m.kinds {
        let k = kind.to_string();
        for (dir, bytes, frames) in [
            ("in", st.bytes_in, st.frames_in),
            ("out", st.bytes_out, st.frames_out),
        ] {
            let l = [("kind", k.as_str()), ("direction", dir)];
            e.sample(
                "silo_protocol_bytes_total",
                Kind::Counter,
                "Migration protocol bytes by message kind and direction",
                &l,
                bytes as f64,
            );
            e.sample(
                "silo_protocol_frames_total",
                Kind::Counter,
                "Migration protocol frames by message kind and direction",
                &l,
                frames as f64,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric name the endpoint can emit is documented in the README.
    #[test]
    fn every_name_is_documented() {
        let readme = include_str!("../README.md");
        for n in NAMES {
            assert!(
                readme.contains(&format!("`{n}`")),
                "{n} is not in README.md"
            );
        }
    }

    /// The run counters render under their documented names.
    #[test]
    fn run_counters_render() {
        let r = Registry::default();
        let s = Arc::new(RunStats::default());
        s.dirty_rounds.store(3, Ordering::Relaxed);
        s.cutover_us.store(1_500_000, Ordering::Relaxed);
        let s2 = s.clone();
        r.register(move |e| run_samples(e, &s2));
        let text = r.render();
        assert!(
            text.contains("silo_migration_dirty_rounds_total 3"),
            "{text}"
        );
        assert!(
            text.contains("silo_migration_cutover_seconds 1.5"),
            "{text}"
        );
        for n in [
            "silo_migration_dirty_rounds_total",
            "silo_migration_dirty_blocks_total",
            "silo_migration_cutover_seconds",
            "silo_migration_completed",
        ] {
            assert!(NAMES.contains(&n));
            assert!(text.contains(&format!("# TYPE {n} ")), "{n} missing");
        }
    }
}
