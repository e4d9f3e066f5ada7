//! Exports: a named provider plus what the server advertises for it, the
//! optional allocation query behind `base:allocation`, and per-export metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use silo_storage::{Capabilities, DynProvider};

use crate::proto::*;

/// One extent of a `base:allocation` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (non-zero).
    pub len: u64,
    /// The range is not allocated (`NBD_STATE_HOLE`).
    pub hole: bool,
    /// The range reads as zeroes (`NBD_STATE_ZERO`).
    pub zero: bool,
}

impl Extent {
    /// Allocated data.
    pub const fn data(len: u64) -> Extent {
        Extent {
            len,
            hole: false,
            zero: false,
        }
    }

    /// A hole that reads as zeroes.
    pub const fn hole(len: u64) -> Extent {
        Extent {
            len,
            hole: true,
            zero: true,
        }
    }

    /// The `base:allocation` status bits.
    pub fn state(&self) -> u32 {
        (if self.hole { STATE_HOLE } else { 0 }) | (if self.zero { STATE_ZERO } else { 0 })
    }
}

/// Answers `NBD_CMD_BLOCK_STATUS` for `base:allocation`.
///
/// Implementations describe a *prefix* of `[offset, offset + len)` (which the
/// server has already checked lies inside the device) by pushing at most
/// `max` extents onto `out`; the server trims the answer to the request and
/// merges nothing, so an implementation may be coarse (e.g. per block). It is
/// called on the async runtime and must not block for long.
///
/// An export without an `Allocation` reports everything as data, which is
/// always correct.
pub trait Allocation: Send + Sync + 'static {
    /// Pushes extents covering (a prefix of) `[offset, offset + len)`.
    fn extents(&self, offset: u64, len: u64, max: usize, out: &mut Vec<Extent>);
}

/// Counters of one export, shared by all its connections.
#[derive(Debug, Default)]
pub struct ExportMetrics {
    pub(crate) reads: AtomicU64,
    pub(crate) writes: AtomicU64,
    pub(crate) flushes: AtomicU64,
    pub(crate) trims: AtomicU64,
    pub(crate) zeroes: AtomicU64,
    pub(crate) caches: AtomicU64,
    pub(crate) block_status: AtomicU64,
    pub(crate) bytes_read: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) in_flight: AtomicU64,
    pub(crate) connections: AtomicU64,
    pub(crate) connections_total: AtomicU64,
    pub(crate) busy_poll_hits: AtomicU64,
    pub(crate) busy_poll_misses: AtomicU64,
    pub(crate) sendfile_reads: AtomicU64,
}

/// A point-in-time copy of [`ExportMetrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExportStats {
    /// READ commands completed.
    pub reads: u64,
    /// WRITE commands completed.
    pub writes: u64,
    /// FLUSH commands completed (FUA flushes not included).
    pub flushes: u64,
    /// TRIM commands completed.
    pub trims: u64,
    /// WRITE_ZEROES commands completed.
    pub zeroes: u64,
    /// CACHE commands completed.
    pub caches: u64,
    /// BLOCK_STATUS commands completed.
    pub block_status: u64,
    /// Payload bytes sent to clients by READ.
    pub bytes_read: u64,
    /// Payload bytes received by WRITE.
    pub bytes_written: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Requests currently being executed.
    pub in_flight: u64,
    /// Connections currently in transmission on this export.
    pub connections: u64,
    /// Connections ever opened on this export.
    pub connections_total: u64,
    /// Requests an idle connection found by busy polling
    /// ([`ServerConfig::busy_poll`](crate::ServerConfig::busy_poll)).
    pub busy_poll_hits: u64,
    /// Busy-poll rounds that found nothing within the budget.
    pub busy_poll_misses: u64,
    /// READs (among `reads`) whose payload went out with `sendfile`
    /// ([`ServerConfig::sendfile_reads`](crate::ServerConfig::sendfile_reads)).
    pub sendfile_reads: u64,
}

impl ExportMetrics {
    /// A snapshot of the counters.
    pub fn snapshot(&self) -> ExportStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ExportStats {
            reads: g(&self.reads),
            writes: g(&self.writes),
            flushes: g(&self.flushes),
            trims: g(&self.trims),
            zeroes: g(&self.zeroes),
            caches: g(&self.caches),
            block_status: g(&self.block_status),
            bytes_read: g(&self.bytes_read),
            bytes_written: g(&self.bytes_written),
            errors: g(&self.errors),
            in_flight: g(&self.in_flight),
            connections: g(&self.connections),
            connections_total: g(&self.connections_total),
            busy_poll_hits: g(&self.busy_poll_hits),
            busy_poll_misses: g(&self.busy_poll_misses),
            sendfile_reads: g(&self.sendfile_reads),
        }
    }
}

/// NBD transmission flags for a provider with `caps`.
///
/// Derived, never hard-coded: `SEND_FLUSH` iff the provider flushes,
/// `SEND_FUA` iff it has FUA, `SEND_TRIM` iff it trims, `CAN_MULTI_CONN` iff
/// it is safe for concurrent writers. `WRITE_ZEROES` (and `FAST_ZERO`, which
/// then fails quickly when zeroing is not efficient) and `CACHE` are always
/// offered on writable exports. A read-only export (`read_only` or the
/// provider's own capability) advertises `READ_ONLY` and no write commands.
pub fn transmission_flags(caps: Capabilities, read_only: bool) -> u16 {
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_CACHE;
    if caps.flush {
        f |= TFLAG_SEND_FLUSH;
    }
    if caps.concurrent {
        f |= TFLAG_CAN_MULTI_CONN;
    }
    if read_only || caps.read_only {
        f |= TFLAG_READ_ONLY;
    } else {
        f |= TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
        if caps.fua {
            f |= TFLAG_SEND_FUA;
        }
        if caps.trim {
            f |= TFLAG_SEND_TRIM;
        }
    }
    f
}

/// What the handshake and request validation need to know about an export
/// (plain data, no provider): the sans-IO view of an [`Export`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export name.
    pub name: String,
    /// Optional human-readable description.
    pub description: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (see [`transmission_flags`]).
    pub flags: u16,
    /// Minimum block size (requests must be aligned to it).
    pub min_block: u32,
    /// Preferred block size.
    pub preferred_block: u32,
    /// Largest READ/WRITE payload accepted.
    pub max_payload: u32,
    /// Whether efficient write-zeroes is available (`FAST_ZERO` succeeds).
    pub fast_zero: bool,
}

impl ExportInfo {
    /// A writable export of `size` bytes with default block sizes and every
    /// optional command (handy for tests of the sans-IO layer).
    pub fn simple(name: &str, size: u64) -> ExportInfo {
        ExportInfo {
            name: name.into(),
            description: None,
            size,
            flags: transmission_flags(Capabilities::ALL, false),
            min_block: 1,
            preferred_block: 4096,
            max_payload: MAX_PAYLOAD,
            fast_zero: true,
        }
    }

    /// The export refuses writes.
    pub fn read_only(&self) -> bool {
        self.flags & TFLAG_READ_ONLY != 0
    }
}

/// A provider served under a name.
pub struct Export {
    pub(crate) info: ExportInfo,
    pub(crate) caps: Capabilities,
    pub(crate) provider: DynProvider,
    pub(crate) allocation: Option<Arc<dyn Allocation>>,
    pub(crate) metrics: Arc<ExportMetrics>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("info", &self.info)
            .field("caps", &self.caps)
            .field("allocation", &self.allocation.is_some())
            .finish()
    }
}

impl Export {
    /// Serves `provider` as `name`, with flags derived from its capabilities,
    /// block sizes 1 / 4096 / 32 MiB and no allocation information.
    pub fn new(name: impl Into<String>, provider: DynProvider) -> Export {
        let caps = provider.capabilities();
        let info = ExportInfo {
            name: name.into(),
            description: None,
            size: provider.size(),
            flags: transmission_flags(caps, false),
            min_block: 1,
            preferred_block: 4096,
            max_payload: MAX_PAYLOAD,
            fast_zero: caps.write_zeroes,
        };
        Export {
            info,
            caps,
            provider,
            allocation: None,
            metrics: Arc::new(ExportMetrics::default()),
        }
    }

    /// Sets the description shown by `NBD_OPT_LIST` / `NBD_INFO_DESCRIPTION`.
    pub fn with_description(mut self, description: impl Into<String>) -> Export {
        self.info.description = Some(description.into());
        self
    }

    /// Serves the export read-only even if the provider is writable.
    pub fn read_only(mut self, read_only: bool) -> Export {
        self.info.flags = transmission_flags(self.caps, read_only);
        self
    }

    /// Answers `base:allocation` block status with `allocation`.
    pub fn with_allocation(mut self, allocation: Arc<dyn Allocation>) -> Export {
        self.allocation = Some(allocation);
        self
    }

    /// Sets the advertised block sizes. `min` must be a power of two between
    /// 1 and 65536, `preferred` a power of two ≥ `min`, and `max_payload`
    /// between `preferred` and 32 MiB; out-of-range values are clamped.
    pub fn with_block_sizes(mut self, min: u32, preferred: u32, max_payload: u32) -> Export {
        let min = min.clamp(1, 65536).next_power_of_two();
        let preferred = preferred.clamp(min, 1 << 25).next_power_of_two().max(min);
        let max_payload = max_payload.clamp(preferred, MAX_PAYLOAD);
        self.info.min_block = min;
        self.info.preferred_block = preferred;
        self.info.max_payload = max_payload / min * min;
        self
    }

    /// The export's name.
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// What clients are told about this export.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// The provider behind the export.
    pub fn provider(&self) -> &DynProvider {
        &self.provider
    }

    /// The export's metrics (shared by all its connections).
    pub fn metrics(&self) -> &Arc<ExportMetrics> {
        &self.metrics
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_follow_capabilities() {
        let all = transmission_flags(Capabilities::ALL, false);
        for f in [
            TFLAG_HAS_FLAGS,
            TFLAG_SEND_FLUSH,
            TFLAG_SEND_FUA,
            TFLAG_SEND_TRIM,
            TFLAG_SEND_WRITE_ZEROES,
            TFLAG_CAN_MULTI_CONN,
        ] {
            assert_ne!(all & f, 0, "{f:#x}");
        }
        assert_eq!(all & TFLAG_READ_ONLY, 0);
        let none = transmission_flags(Capabilities::NONE, false);
        for f in [
            TFLAG_SEND_FLUSH,
            TFLAG_SEND_FUA,
            TFLAG_SEND_TRIM,
            TFLAG_CAN_MULTI_CONN,
        ] {
            assert_eq!(none & f, 0, "{f:#x}");
        }
        let ro = transmission_flags(Capabilities::ALL, true);
        assert_ne!(ro & TFLAG_READ_ONLY, 0);
        assert_eq!(
            ro & (TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FUA),
            0
        );
        let ro2 = transmission_flags(Capabilities::ALL.with_read_only(true), false);
        assert_eq!(ro, ro2);
    }

    #[test]
    fn block_sizes_are_clamped() {
        let p: DynProvider = Arc::new(silo_storage::MemoryStorage::new(1 << 20));
        let e = Export::new("x", p).with_block_sizes(3, 100, u32::MAX);
        assert_eq!(e.info().min_block, 4);
        assert_eq!(e.info().preferred_block, 128);
        assert_eq!(e.info().max_payload, MAX_PAYLOAD);
    }
}
