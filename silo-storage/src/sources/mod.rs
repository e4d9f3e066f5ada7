//! Data sources: providers that store bytes themselves.
//!
//! * [`MemoryStorage`]: in memory, per-chunk locks, lazily allocated.
//! * [`FileStorage`]: a file or block device, io_uring or positioned I/O
//!   ([`Engine`]), optional `O_DIRECT`.
//! * [`SparseFile`]: only written blocks are stored, in an append-mostly
//!   record file with checksums (format in [`sparse`]).
//!
//! All `unsafe` code of the crate lives in the private `sys` module
//! (fallocate, aligned buffers, the io_uring driver).

mod gate;
mod sys;

pub mod file;
pub mod memory;
pub mod sparse;

pub use file::{Engine, FileOptions, FileStorage, UringStats};
pub use memory::MemoryStorage;
pub use sparse::{RecoveryStats, SparseFile};
