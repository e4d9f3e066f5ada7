//! Data sources: providers that store bytes themselves.

pub mod memory;

pub use memory::MemoryStorage;
