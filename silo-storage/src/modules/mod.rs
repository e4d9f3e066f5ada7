//! Modules: providers that wrap another provider.
//!
//! Every module implements [`Provider`](crate::Provider) over one (or
//! several) inner providers, forwards every data call and every capability
//! query it does not change, and restricts the capabilities where its
//! behaviour differs. Modules are generic over the wrapped provider with
//! `P = `[`DynProvider`](crate::DynProvider) as the default, so a stack can be
//! built either statically (`Metrics<Lockable<MemoryStorage>>`) or at run time
//! from `Arc<dyn Provider>` values (what the device-group builder does).
//!
//! ```text
//!   Metrics ─► Lockable ─► BlockSplitter ─► CopyOnWrite ─┬─► base (read-only)
//!                                                        └─► overlay
//! ```
//!
//! Building a stack at run time and pausing it for a cut-over:
//!
//! ```
//! use std::sync::Arc;
//! use silo_storage::modules::{CopyOnWrite, CowConfig, Lockable, Metrics};
//! use silo_storage::{DynProvider, MemoryStorage, ProviderExt};
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let base: DynProvider = Arc::new(MemoryStorage::new(1 << 20));
//! let overlay: DynProvider = Arc::new(MemoryStorage::new(1 << 20));
//! let cow = Arc::new(CopyOnWrite::open(base, overlay, CowConfig::new(4096)).await?);
//! let lockable = Arc::new(Lockable::new(cow.clone() as DynProvider));
//! let device = Metrics::new(lockable.clone() as DynProvider);
//!
//! device.write_slice(10, b"hello").await?;
//! assert_eq!(&device.read_bytes(10, 5).await?[..], b"hello");
//! assert_eq!(cow.local_blocks(), vec![0]);
//!
//! lockable.lock().await; // no write is in progress below from here on
//! lockable.unlock();
//! assert_eq!(device.snapshot().write.ops, 1);
//! # Ok::<(), silo_storage::Error>(())
//! # }).unwrap();
//! ```
//!
//! | module | what it does |
//! |---|---|
//! | [`lockable::Lockable`] | pauses reads and writes between `lock()` and `unlock()` |
//! | [`read_only_gate::ReadOnlyGate`] | pauses only writes |
//! | [`sharded::Sharded`] | splits the address space into fixed shards |
//! | [`cow::CopyOnWrite`] | read-only base + persistent overlay |
//! | [`metrics::Metrics`] | counters and latency histograms |
//! | [`artificial_latency::ArtificialLatency`] | fixed + per-byte delays |
//! | [`filter_redundant_writes::FilterRedundantWrites`] | writes only changed runs |
//! | [`write_combinator::WriteCombinator`] | prioritised inputs into one provider |
//! | [`block_splitter::BlockSplitter`] | per-block concurrent I/O, aligned |
//! | [`hooks::Hooks`] | replaceable pre/post callbacks (fault injection) |
//! | [`logger::Logger`] | a `tracing` event per operation |
//! | [`raid::Raid`] | mirrored writes, compared reads |
//! | [`write_cache::WriteCache`] | write-back coalescing cache |
//! | [`mapped::MappedStorage`] | u64 ids → block slots (not a provider) |
//! | [`nothing::Nothing`] | `/dev/null` |
//! | [`binlog::Binlog`], [`binlog_replay::BinlogReplay`] | record and replay writes |

/// Implements [`Provider`](crate::Provider) methods by forwarding to a field,
/// without boxing the inner future a second time. Use inside an
/// `#[async_trait] impl Provider for …` block:
/// `forward!(inner; size, capabilities, flush, trim, write_zeroes, cancel_writes, close);`
macro_rules! forward {
    ($f:ident; $($m:ident),* $(,)?) => { $( forward!(@ $f $m); )* };
    (@ $f:ident size) => {
        fn size(&self) -> u64 { self.$f.size() }
    };
    (@ $f:ident capabilities) => {
        fn capabilities(&self) -> $crate::provider::Capabilities { self.$f.capabilities() }
    };
    (@ $f:ident read_at) => {
        fn read_at<'l, 'a>(&'l self, offset: u64, buf: ::bytes::BytesMut)
            -> ::futures::future::BoxFuture<'a, $crate::error::Result<::bytes::BytesMut>>
        where 'l: 'a, Self: 'a { self.$f.read_at(offset, buf) }
    };
    (@ $f:ident write_at) => {
        fn write_at<'l, 'a>(&'l self, offset: u64, data: ::bytes::Bytes)
            -> ::futures::future::BoxFuture<'a, $crate::error::Result<()>>
        where 'l: 'a, Self: 'a { self.$f.write_at(offset, data) }
    };
    (@ $f:ident flush) => {
        fn flush<'l, 'a>(&'l self) -> ::futures::future::BoxFuture<'a, $crate::error::Result<()>>
        where 'l: 'a, Self: 'a { self.$f.flush() }
    };
    (@ $f:ident trim) => {
        fn trim<'l, 'a>(&'l self, offset: u64, len: u64)
            -> ::futures::future::BoxFuture<'a, $crate::error::Result<()>>
        where 'l: 'a, Self: 'a { self.$f.trim(offset, len) }
    };
    (@ $f:ident write_zeroes) => {
        fn write_zeroes<'l, 'a>(&'l self, offset: u64, len: u64)
            -> ::futures::future::BoxFuture<'a, $crate::error::Result<()>>
        where 'l: 'a, Self: 'a { self.$f.write_zeroes(offset, len) }
    };
    (@ $f:ident cancel_writes) => {
        fn cancel_writes(&self, offset: u64, len: u64) { self.$f.cancel_writes(offset, len) }
    };
    (@ $f:ident close) => {
        fn close<'l, 'a>(&'l self) -> ::futures::future::BoxFuture<'a, $crate::error::Result<()>>
        where 'l: 'a, Self: 'a { self.$f.close() }
    };
}

pub mod artificial_latency;
pub mod binlog;
pub mod binlog_replay;
pub mod block_splitter;
pub mod cow;
pub mod filter_redundant_writes;
pub mod gate;
pub mod hooks;
pub mod lockable;
pub mod logger;
pub mod mapped;
pub mod metrics;
pub mod nothing;
pub mod raid;
pub mod read_only_gate;
pub mod sharded;
mod util;
pub mod write_cache;
pub mod write_combinator;

pub use artificial_latency::{ArtificialLatency, LatencyConfig};
pub use binlog::{create_binlog_from_device, Binlog, BinlogOptions};
pub use binlog_replay::{BinlogRecord, BinlogReplay, RecordKind, ReplaySpeed, ReplayStats};
pub use block_splitter::BlockSplitter;
pub use cow::{CopyOnWrite, CowConfig, CowPersist, CowStats};
pub use filter_redundant_writes::{changed_runs, FilterRedundantWrites, FilterStats};
pub use gate::{GateMode, Gated, ReadsAndWrites, WritesOnly};
pub use hooks::Hooks;
pub use lockable::Lockable;
pub use logger::Logger;
pub use mapped::MappedStorage;
pub use metrics::{Metrics, MetricsSnapshot, OpSnapshot, ProviderMetrics};
pub use nothing::Nothing;
pub use raid::Raid;
pub use read_only_gate::ReadOnlyGate;
pub use sharded::Sharded;
pub use write_cache::{WriteCache, WriteCacheConfig, WriteCacheStats};
pub use write_combinator::{CombinatorInput, CombinatorStats, WriteCombinator, WriteOutcome};

use async_trait::async_trait;

/// Pause / resume control shared by [`Lockable`] and [`ReadOnlyGate`], so the
/// migrator and syncer can hold either as `Arc<dyn LockControl>`.
///
/// `lock()` is not counted: several `lock()` calls are undone by one
/// `unlock()`.
#[async_trait]
pub trait LockControl: Send + Sync {
    /// Stops new gated operations (they wait, they do not fail) and returns
    /// once every gated operation already in progress has finished.
    async fn lock(&self);
    /// Lets waiting and new operations proceed.
    fn unlock(&self);
    /// Whether the gate is currently locked.
    fn is_locked(&self) -> bool;
}
