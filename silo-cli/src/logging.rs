//! `--log-level` / `--log-format` through `tracing-subscriber`. Logs go to
//! stderr so that stdout stays for results and progress.

use tracing_subscriber::EnvFilter;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber. `level` is a level name or any
/// `EnvFilter` directive (`silo_storage=debug,info`). `RUST_LOG` wins when set.
pub fn init(level: &str, format: Format) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(f) if !f.is_empty() => EnvFilter::try_new(f),
        _ => EnvFilter::try_new(level),
    }
    .map_err(|e| format!("bad --log-level {level:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let res = match format {
        Format::Text => builder.try_init(),
        Format::Json => builder.json().try_init(),
    };
    res.map_err(|e| format!("cannot install the logger: {e}"))
}
