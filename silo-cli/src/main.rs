//! `silo`: live migration of block devices from the command line.
//!
//! Library crates return typed errors; this binary is the one place that
//! turns them into one-line messages and exit codes.

mod logging;
#[allow(dead_code)] // wired in as the commands land
mod metrics_http;
#[allow(dead_code)] // wired in as the commands land
mod timeline;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Live migration of block devices.
#[derive(Debug, Parser)]
#[command(name = "silo", version, about, propagate_version = true)]
struct Cli {
    /// Log level (error, warn, info, debug, trace) or a tracing filter.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = logging::Format::Text)]
    log_format: logging::Format,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve a device group and migrate it to the first receiver that connects.
    Serve {
        /// Schema file (HCL, TOML or JSON).
        #[arg(long, short = 'c')]
        config: PathBuf,
        /// Address to accept the receiver on.
        #[arg(long, short = 'l', default_value = "127.0.0.1:5170")]
        listen: SocketAddr,
        /// Expose devices with `expose = true` over NBD at this address.
        #[arg(long)]
        nbd_listen: Option<SocketAddr>,
        /// Total migration concurrency shared by the devices.
        #[arg(long, default_value_t = 100)]
        concurrency: usize,
        /// Prometheus endpoint address (serves /metrics).
        #[arg(long)]
        metrics: Option<SocketAddr>,
        /// Keep syncing dirty blocks instead of cutting over.
        #[arg(long)]
        continuous: bool,
    },
    /// Receive a device group from `silo serve`.
    Connect {
        /// Address of the sender.
        #[arg(long, short = 'a', default_value = "127.0.0.1:5170")]
        addr: String,
        /// Directory where received devices are stored.
        #[arg(long, short = 'd')]
        dir: PathBuf,
        /// Expose received devices over NBD during the migration.
        #[arg(long)]
        nbd_listen: Option<SocketAddr>,
        /// Keep serving NBD after the migration completed (until Ctrl-C).
        #[arg(long)]
        keep_serving: bool,
        /// Prometheus endpoint address (serves /metrics).
        #[arg(long)]
        metrics: Option<SocketAddr>,
    },
    /// Expose the schema's devices as NBD exports named after the devices.
    Nbd {
        /// Schema file.
        #[arg(long, short = 'c')]
        config: PathBuf,
        /// TCP address to listen on.
        #[arg(long, short = 'l', conflicts_with = "unix")]
        listen: Option<SocketAddr>,
        /// Unix socket path to listen on.
        #[arg(long)]
        unix: Option<PathBuf>,
    },
    /// Continuously sync the devices that have a `sync` block to S3.
    Sync {
        /// Schema file.
        #[arg(long, short = 'c')]
        config: PathBuf,
        /// One pass, then exit.
        #[arg(long)]
        once: bool,
    },
    /// Migrate an embedded demo device group over loopback TCP, with a
    /// background writer, and verify the result.
    Demo {
        /// Also draw the migration timeline to this SVG file.
        #[arg(long)]
        timeline: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = logging::init(&cli.log_level, cli.log_format) {
        eprintln!("silo: {e}");
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("silo: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.cmd)) {
        Ok(code) => code,
        Err(e) => {
            // One line: the error and its causes, no backtrace.
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                msg.push_str(": ");
                msg.push_str(&cause.to_string());
            }
            eprintln!("silo: {msg}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Serve { .. }
        | Command::Connect { .. }
        | Command::Nbd { .. }
        | Command::Sync { .. }
        | Command::Demo { .. } => {
            anyhow::bail!("this command is not implemented yet (see issue 8)")
        }
    }
}
