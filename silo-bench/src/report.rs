//! Collects benchmark rows (ours beside a reference measured in the same run)
//! and renders them as BENCHMARKS.md.

use std::fmt::Write as _;
use std::path::Path;

/// One measurement beside its reference.
#[derive(Debug, Clone)]
pub struct Row {
    /// Group (storage, engine, protocol, nbd, s3, devicegroup).
    pub group: String,
    /// What was measured, e.g. "file/io_uring 4 KiB randread QD32".
    pub name: String,
    /// Our figure.
    pub ours: f64,
    /// The reference, e.g. "raw pread".
    pub reference: String,
    /// The reference's figure (same unit).
    pub theirs: f64,
    /// Unit, e.g. "MB/s", "IOPS", "µs".
    pub unit: String,
    /// Higher is better (throughput) or lower is better (latency, bytes).
    pub higher_is_better: bool,
    /// Target, as text (e.g. "≥ 0.9×"), empty if none.
    pub target: String,
}

impl Row {
    /// ours/theirs for higher-is-better, theirs/ours otherwise: > 1 means we win.
    pub fn ratio(&self) -> f64 {
        if self.higher_is_better {
            self.ours / self.theirs
        } else {
            self.theirs / self.ours
        }
    }
}

/// All rows of a run.
#[derive(Debug, Default)]
pub struct Report {
    /// Rows in measurement order.
    pub rows: Vec<Row>,
    /// Free-form notes per group (method, sizes, caveats).
    pub notes: Vec<(String, String)>,
}

#[allow(dead_code)] // used as the groups are filled in
impl Report {
    /// Adds a row and prints it.
    #[allow(clippy::too_many_arguments)]
    pub fn add(
        &mut self,
        group: &str,
        name: &str,
        ours: f64,
        reference: &str,
        theirs: f64,
        unit: &str,
        higher_is_better: bool,
        target: &str,
    ) {
        let row = Row {
            group: group.into(),
            name: name.into(),
            ours,
            reference: reference.into(),
            theirs,
            unit: unit.into(),
            higher_is_better,
            target: target.into(),
        };
        println!(
            "{:<12} {:<48} ours {:>12.2} {:<6} | {:<24} {:>12.2} | ratio {:.3}",
            row.group,
            row.name,
            row.ours,
            row.unit,
            row.reference,
            row.theirs,
            row.ratio()
        );
        self.rows.push(row);
    }

    /// Adds a note shown under the group's table.
    pub fn note(&mut self, group: &str, text: &str) {
        self.notes.push((group.into(), text.into()));
    }

    /// Writes BENCHMARKS.md. When only some groups ran, the sections of the
    /// other groups already in the file are kept.
    pub fn write_markdown(
        &self,
        path: &Path,
        command: &str,
        groups: &[&str],
    ) -> std::io::Result<()> {
        let old = std::fs::read_to_string(path).unwrap_or_default();
        let mut kept = String::new();
        if !groups.is_empty() {
            for section in old.split("\n## ").skip(1) {
                let name = section.lines().next().unwrap_or("").trim();
                if !groups.contains(&name) {
                    kept.push_str("\n## ");
                    kept.push_str(section.trim_end());
                    kept.push('\n');
                }
            }
        }
        let mut out = String::new();
        out.push_str("# Benchmarks\n\n");
        out.push_str(
            "Each row is measured beside its reference in the same run on the same machine \
(2 cores, 24 GiB). Ratio > 1 means silo is better (faster, or fewer bytes/less time \
for lower-is-better rows). Regenerate with `cargo xtask bench`.\n",
        );
        let mut seen: Vec<&str> = Vec::new();
        for r in &self.rows {
            if !seen.contains(&r.group.as_str()) {
                seen.push(&r.group);
            }
        }
        for g in seen {
            let _ = write!(out, "\n## {g}\n\nCommand: `{command}`\n\n");
            out.push_str("| benchmark | silo | reference | reference value | unit | ratio | target |\n|---|---:|---|---:|---|---:|---|\n");
            for r in self.rows.iter().filter(|r| r.group == g) {
                let _ = writeln!(
                    out,
                    "| {} | {:.2} | {} | {:.2} | {} | {:.3} | {} |",
                    r.name,
                    r.ours,
                    r.reference,
                    r.theirs,
                    r.unit,
                    r.ratio(),
                    r.target
                );
            }
            for (_, n) in self.notes.iter().filter(|(ng, _)| ng == g) {
                let _ = writeln!(out, "\n{n}");
            }
        }
        out.push_str(&kept);
        std::fs::write(path, out)
    }
}
