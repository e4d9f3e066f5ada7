//! The subcommands.

pub mod connect;
pub mod demo;
pub mod nbd;
pub mod serve;
pub mod sync;
