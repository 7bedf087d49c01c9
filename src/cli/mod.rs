//! The `segmentd` command line: `run`, `demo`, `replay`, `check`, `generate`.

mod check;
mod demo;
pub mod generate;
mod replay;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use crate::config::Config;

/// segmentd: a real-time customer segmenter.
#[derive(Debug, Parser)]
#[command(name = "segmentd", version, about, long_about = None)]
pub struct Cli {
    /// Log line format (logs go to stderr; RUST_LOG sets the level, default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// Log line formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service against the brokers in the config.
    Run {
        /// The config file.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Everything on one machine: an embedded broker, generated traffic, the service, a
    /// live summary and the HTTP endpoints.
    Demo(demo::DemoArgs),
    /// Run the rules over a recorded file of events, in event time.
    Replay(replay::ReplayArgs),
    /// Validate a config and print what each rule needs.
    Check {
        /// The config file.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Write realistic synthetic traffic to a topic or stdout.
    Generate(generate::GenerateArgs),
}

/// Parses the command line, sets up logging and runs the command. The binary's `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        // The demo's terminal is for its summary: only warnings and errors interrupt it.
        Command::Demo(_) => "warn",
        _ => "info",
    };
    init_tracing(cli.log_format, default_level);
    let result = match cli.command {
        Command::Run { config } => run(&config),
        Command::Demo(args) => demo::demo(args),
        Command::Replay(args) => replay::replay(args),
        Command::Check { config } => check::check(&config),
        Command::Generate(args) => generate::generate(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat, default_level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn run(path: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let rules = config.rule_set()?;
    runtime()?.block_on(crate::ingest::run(
        config,
        rules,
        crate::time::WallClock::system(),
        crate::ingest::shutdown_signal(),
        |started| {
            tracing::info!(http = %started.http_addr, "Serving HTTP.");
        },
    ))?;
    Ok(())
}
