//! silo-devicegroup: work in progress.
