//! silo-protocol: work in progress.
