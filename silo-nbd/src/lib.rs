//! silo-nbd: work in progress.
