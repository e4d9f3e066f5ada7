//! The silo command-line tool (work in progress).
fn main() {}
