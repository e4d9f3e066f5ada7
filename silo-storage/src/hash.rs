//! Hashing helpers: whole-device SHA-256, per-block hashes, equality and difference of providers (work in progress).
