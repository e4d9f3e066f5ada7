//! Benchmarks of the s3 group.
//!
//! The benchmark is an S3-assisted vs unassisted migration of the
//! same 1 GiB device (90 % already in S3): bytes over the wire and total
//! time, in the same run. It needs the device group's assisted migration,
//! which does not exist yet, so this group only leaves a note — no figures
//! are made up.

use crate::report::Report;
use crate::Opts;

/// Runs the s3 benchmarks (a note until assisted migration exists).
pub fn run(_opts: &Opts, report: &mut Report, _rt: &tokio::runtime::Runtime) {
    report.note(
        "s3",
        "not measured yet: assisted vs unassisted migration of a 1 GiB device (90 % in S3) \
         needs S3-assisted migration in silo-devicegroup, which is not built yet. The S3 side \
         (S3Sync, hash index, fetch_blocks_by_hash) is in silo-s3 and tested against s3s-fs.",
    );
}
