//! Benchmarks of the engine group (not written yet).

use crate::report::Report;
use crate::Opts;

/// Runs the engine benchmarks.
pub fn run(_opts: &Opts, _report: &mut Report, _rt: &tokio::runtime::Runtime) {}
