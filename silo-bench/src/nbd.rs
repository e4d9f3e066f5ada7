//! Benchmarks of the nbd group (not written yet).

use crate::report::Report;
use crate::Opts;

/// Runs the nbd benchmarks.
pub fn run(_opts: &Opts, _report: &mut Report, _rt: &tokio::runtime::Runtime) {}
