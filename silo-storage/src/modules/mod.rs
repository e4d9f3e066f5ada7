//! Modules: providers that wrap another provider (work in progress).
