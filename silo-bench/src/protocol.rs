//! Benchmarks of the protocol group (not written yet).

use crate::report::Report;
use crate::Opts;

/// Runs the protocol benchmarks.
pub fn run(_opts: &Opts, _report: &mut Report, _rt: &tokio::runtime::Runtime) {}
