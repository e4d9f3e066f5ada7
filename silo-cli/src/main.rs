//! `silo`: live migration of block devices from the command line.
//!
//! Library crates return typed errors; this binary is the one place that
//! turns them into one-line messages and exit codes.

mod cmd;
mod logging;
mod metrics_http;
mod observe;
mod progress;
mod timeline;
mod util;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Live migration of block devices.
#[derive(Debug, Parser)]
#[command(name = "silo", version, about, propagate_version = true)]
struct Cli {
    /// Log level (error, warn, info, debug, trace) or a tracing filter
    /// (`silo_devicegroup=debug,warn`). Logs go to stderr.
    #[arg(long, global = true, default_value = "warn")]
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
        /// Export the synced devices over NBD at this address (continuous
        /// mode uploads the blocks written through it).
        #[arg(long)]
        nbd_listen: Option<SocketAddr>,
    },
    /// Migrate an embedded demo device group over loopback TCP, with a
    /// background writer, and verify the result.
    Demo {
        /// Also draw the migration timeline to this SVG file.
        #[arg(long)]
        timeline: Option<PathBuf>,
        /// Size of the memory device (e.g. 256m).
        #[arg(long, default_value = "256m", value_parser = parse_size)]
        memory_size: u64,
        /// Size of the file device (e.g. 64m).
        #[arg(long, default_value = "64m", value_parser = parse_size)]
        file_size: u64,
        /// Migration block size (a power of two, e.g. 256k).
        #[arg(long, default_value = "256k", value_parser = parse_size)]
        block_size: u64,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => return usage_error(e),
    };
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
                // Some errors repeat their source in their own message.
                let c = cause.to_string();
                if !msg.contains(&c) {
                    msg.push_str(": ");
                    msg.push_str(&c);
                }
            }
            let msg = msg.replace('\n', " ");
            eprintln!("silo: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// Help and version go to stdout as clap renders them; usage errors become
/// one line on stderr (exit code 2).
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        };
    }
    let text = e.render().to_string();
    let parts: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect();
    let line = parts.join(" ");
    let line = line.strip_prefix("error: ").unwrap_or(&line);
    eprintln!("silo: {line} (see silo --help)");
    ExitCode::from(2)
}

fn parse_size(s: &str) -> Result<u64, String> {
    let v = silo_devicegroup::schema::units::parse_size(s).map_err(|e| e.to_string())?;
    if v == 0 {
        return Err("must not be zero".into());
    }
    Ok(v)
}

/// Prints one line of command output to stdout (logs go to stderr).
pub(crate) fn out(line: impl std::fmt::Display) {
    use std::io::Write as _;
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{line}");
    let _ = o.flush();
}

async fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Serve {
            config,
            listen,
            nbd_listen,
            concurrency,
            metrics,
            continuous,
        } => {
            cmd::serve::run(cmd::serve::Args {
                config,
                listen,
                nbd_listen,
                concurrency,
                metrics,
                continuous,
            })
            .await
        }
        Command::Connect {
            addr,
            dir,
            nbd_listen,
            keep_serving,
            metrics,
        } => {
            cmd::connect::run(cmd::connect::Args {
                addr,
                dir,
                nbd_listen,
                keep_serving,
                metrics,
            })
            .await
        }
        Command::Nbd {
            config,
            listen,
            unix,
        } => {
            cmd::nbd::run(cmd::nbd::Args {
                config,
                listen,
                unix,
            })
            .await
        }
        Command::Sync {
            config,
            once,
            nbd_listen,
        } => {
            cmd::sync::run(cmd::sync::Args {
                config,
                once,
                nbd_listen,
            })
            .await
        }
        Command::Demo {
            timeline,
            memory_size,
            file_size,
            block_size,
        } => {
            if !block_size.is_power_of_two() || !(512..=(64 << 20)).contains(&block_size) {
                anyhow::bail!("--block-size must be a power of two between 512 and 64m");
            }
            cmd::demo::run(cmd::demo::Args {
                timeline,
                memory_size,
                file_size,
                block_size,
            })
            .await
        }
    }
}
