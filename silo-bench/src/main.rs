//! `cargo xtask bench`: runs each benchmark beside its reference in the same
//! run and writes the ratios to BENCHMARKS.md.
//!
//! Usage: `cargo xtask bench [--quick] [GROUP...]` where GROUP is one of
//! `storage`, `engine`, `protocol`, `nbd`, `s3`, `devicegroup` (default: all).
//! `--quick` shrinks sizes for a smoke run; the published figures come from a
//! full run on an otherwise idle machine.
#![allow(clippy::print_stdout)]

mod devicegroup;
mod engine;
mod nbd;
mod protocol;
mod report;
mod s3;
mod storage;

use report::Report;

/// Options every benchmark group receives.
#[derive(Debug, Clone)]
pub struct Opts {
    /// Smaller sizes and fewer iterations (smoke test of the harness).
    pub quick: bool,
}

/// A benchmark group's entry point.
type Group = fn(&Opts, &mut Report, &tokio::runtime::Runtime);

/// The benchmark groups by name, in run order.
const GROUPS: [(&str, Group); 6] = [
    ("storage", storage::run),
    ("engine", engine::run),
    ("protocol", protocol::run),
    ("nbd", nbd::run),
    ("s3", s3::run),
    ("devicegroup", devicegroup::run),
];

fn usage() -> String {
    let names: Vec<&str> = GROUPS.iter().map(|g| g.0).collect();
    format!(
        "usage: cargo xtask bench [--quick] [GROUP...]\n\
         GROUP: {} (default: all)\n\
         --quick: smaller sizes, for a smoke run of the harness",
        names.join(", ")
    )
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(nbd::SERVE_ARG) {
        if let Err(e) = nbd::serve_child(&args[1..]) {
            eprintln!("silo-bench {}: {e}", nbd::SERVE_ARG);
            std::process::exit(1);
        }
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let groups: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with('-'))
        .map(String::as_str)
        .collect();
    // Checked before anything runs: a mistyped argument must not start a
    // full run that overwrites BENCHMARKS.md.
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{}", usage());
        return;
    }
    let unknown: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "--quick" && !GROUPS.iter().any(|g| g.0 == *a))
        .collect();
    if !unknown.is_empty() {
        eprintln!(
            "silo-bench: unknown argument(s): {}\n{}",
            unknown.join(" "),
            usage()
        );
        std::process::exit(2);
    }
    let want = |g: &str| groups.is_empty() || groups.contains(&g);
    let opts = Opts { quick };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut report = Report::default();
    for (name, f) in GROUPS {
        if want(name) {
            println!("== {name}");
            f(&opts, &mut report, &rt);
        }
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("BENCHMARKS.md");
    let cmd = format!("cargo xtask bench {}", args.join(" "));
    report
        .write_markdown(&path, cmd.trim(), &groups)
        .expect("write BENCHMARKS.md");
    println!("wrote {}", path.display());
}
