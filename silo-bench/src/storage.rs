//! Benchmarks of the storage group (not written yet).

use crate::report::Report;
use crate::Opts;

/// Runs the storage benchmarks.
pub fn run(_opts: &Opts, _report: &mut Report, _rt: &tokio::runtime::Runtime) {}
