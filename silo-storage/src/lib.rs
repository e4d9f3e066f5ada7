//! # silo-storage
//!
//! Block-device building blocks for live migration:
//!
//! ```text
//!  application / NBD / protocol
//!             │
//!   ┌─────────▼──────────┐
//!   │ modules (lockable, │   each a Provider wrapping a Provider,
//!   │ metrics, tracking, │   forwarding data calls and capabilities
//!   │ cow, cache, …)     │
//!   └─────────┬──────────┘
//!   ┌─────────▼──────────┐
//!   │ sources (memory,   │
//!   │ file+io_uring,     │
//!   │ sparse file)       │
//!   └────────────────────┘
//! ```
//!
//! The [`Provider`] trait is the contract every layer follows; see its module
//! documentation. The migration engine (dirty tracking, volatility order,
//! waiting cache, migrator, syncer) is built from the same pieces.
#![deny(unsafe_code)]

mod barrier;
pub mod bitfield;
pub mod block;
mod clock;
pub mod dirty;
pub mod error;
pub mod hash;
pub mod migrator;
pub mod modules;
pub mod order;
pub mod provider;
mod shard;
pub mod sources;
pub mod syncer;
pub mod volatility;
pub mod waiting;

pub use block::BlockLayout;
pub use error::{check_range, Error, ErrorKind, Op, Result};
pub use provider::{Capabilities, DynProvider, FileRange, NotShared, Now, Provider, ProviderExt};
pub use sources::MemoryStorage;
