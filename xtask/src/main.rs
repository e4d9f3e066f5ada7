//! Project automation for silo.
//!
//! * `cargo xtask setup` installs and checks what the tests need (Debian
//!   packages for the NBD clients and tools, the local S3 server).
//! * `cargo xtask test` runs setup, then `cargo fmt --check`, `cargo clippy
//!   -D warnings` and every test of the workspace. This is the command CI runs.
//! * `cargo xtask bench` runs every benchmark beside its reference and writes
//!   BENCHMARKS.md.
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

mod setup;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = args.first().map(String::as_str).unwrap_or("help");
    let rest = &args[args.len().min(1)..];
    let result = match cmd {
        "setup" => setup::run(),
        "test" => test(rest),
        "bench" => bench(rest),
        "ci" => setup::run().and_then(|_| test(rest)),
        _ => {
            eprintln!("usage: cargo xtask <setup|test|bench|ci> [args]");
            eprintln!("  setup   install/start what the tests need (apt packages, s3s-fs)");
            eprintln!("  test    setup + fmt --check + clippy -D warnings + all tests");
            eprintln!("  bench   run benchmarks beside their references, write BENCHMARKS.md");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask {cmd}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Root of the workspace.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs a command in the workspace root, failing on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<(), String> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .current_dir(root())
        .status()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed with {status}"))
    }
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn test(extra: &[String]) -> Result<(), String> {
    setup::run()?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    let mut t = cargo();
    t.args(["test", "--workspace", "--release", "--no-fail-fast"]);
    t.args(extra);
    t.env("SILO_TOOLS", setup::tools_dir());
    run(&mut t)
}

fn bench(extra: &[String]) -> Result<(), String> {
    setup::run()?;
    let mut b = cargo();
    b.args(["run", "--release", "-p", "silo-bench", "--"]);
    b.args(extra);
    b.env("SILO_TOOLS", setup::tools_dir());
    run(&mut b)
}
