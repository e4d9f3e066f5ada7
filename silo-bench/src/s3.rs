//! Benchmarks of the s3 group (not written yet).

use crate::report::Report;
use crate::Opts;

/// Runs the s3 benchmarks.
pub fn run(_opts: &Opts, _report: &mut Report, _rt: &tokio::runtime::Runtime) {}
