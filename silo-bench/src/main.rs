//! `cargo xtask bench`: runs each benchmark beside its reference in the same
//! run and writes the ratios to BENCHMARKS.md.
fn main() {}
