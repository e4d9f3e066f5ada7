//! # silo-nbd
//!
//! An NBD server (fixed-newstyle handshake, simple and structured replies,
//! `base:allocation` block status) for any silo [`Provider`], over TCP or
//! Unix sockets, plus attaching an export to a Linux `/dev/nbdN`.
//!
//! ```text
//!  qemu / nbdcopy / nbdfuse / kernel nbd ──TCP, Unix, socketpair──┐
//!                                                                  ▼
//!   ┌──────────────────────────── silo-nbd ─────────────────────────────┐
//!   │ server (tokio): accept, read buffer ─► sans-IO handshake          │
//!   │   ─► sans-IO request decoder ─► validate ─► one task per request  │
//!   │   ─► provider call ─► reply header + Bytes, vectored writes       │
//!   │ kernel: netlink NBD_CMD_CONNECT with socketpairs (ioctl fallback) │
//!   └────────────────────────────────┬──────────────────────────────────┘
//!                                    ▼
//!                  Arc<dyn Provider> (silo-storage stack)
//! ```
//!
//! * [`handshake`] and [`transmission`] are sans-IO: bytes in, events and
//!   bytes out; they are what the fuzz target and property tests drive.
//! * [`Server`] serves several named [`Export`]s; many requests per
//!   connection run concurrently (bounded) and are answered out of order,
//!   so a slow read (e.g. a lazy fetch through a migration's waiting cache)
//!   does not hold up others.
//! * Transmission flags come from [`silo_storage::Capabilities`]
//!   ([`transmission_flags`]); errors map to NBD errno values in one place
//!   ([`errno`]).
//! * [`kernel`] attaches an export to `/dev/nbdN`; its syscalls live in one
//!   small module. That and the `sendfile(2)` call of reads served from a
//!   cached file are the only `unsafe` code.
//!
//! See `README.md` for a runnable example (it is compiled and run as a doc
//! test) and `examples/serve_memory.rs`.
//!
//! [`Provider`]: silo_storage::Provider
#![deny(unsafe_code)]

mod busy_poll;
pub mod errno;
mod error;
pub mod export;
pub mod fuzz_support;
pub mod handshake;
pub mod kernel;
pub mod proto;
mod sendfile;
mod server;
pub mod tracked;
pub mod transmission;

pub use errno::Errno;
pub use error::{Error, Result};
pub use export::{
    transmission_flags, Allocation, Export, ExportInfo, ExportMetrics, ExportStats, Extent,
};
pub use server::{Server, ServerConfig};
pub use tracked::AllocationTracker;

/// The README's examples, compiled and run as doc tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
