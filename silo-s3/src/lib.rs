//! silo-s3: work in progress.
