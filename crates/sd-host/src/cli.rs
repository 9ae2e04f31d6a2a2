//! The `sd-host` command line (SPEC §10). Exit status: 0 ok, 2 usage error, 1 failure (one line on stderr).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{CliOverrides, Config};

#[derive(Parser)]
#[command(
    name = "sd-host",
    version,
    about = "Self-hosted Stable Diffusion server"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the HTTP API, queue and engine worker.
    Serve(ServeArgs),
    /// Generate images from the command line (no server).
    Generate(Box<crate::generate::GenerateArgs>),
    /// Manage the model library.
    Models {
        #[arg(long, env = "SDHOST_CONFIG")]
        config: Option<PathBuf>,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[command(subcommand)]
        command: crate::models::cli::ModelsCommand,
    },
    /// Developer tools (tiny test checkpoints and LoRAs).
    #[command(subcommand)]
    Dev(crate::generate::DevCommand),
    /// Time text encoding, a UNet step, a VAE decode and peak RSS on the real architecture.
    Bench(crate::generate::BenchArgs),
}

#[derive(clap::Args)]
pub struct ServeArgs {
    #[arg(long, env = "SDHOST_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub host: Option<String>,
    #[arg(long)]
    pub port: Option<u16>,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// May be repeated.
    #[arg(long = "api-key")]
    pub api_keys: Vec<String>,
    /// Allow a non-loopback address without API keys.
    #[arg(long)]
    pub insecure_no_auth: bool,
}

pub fn main() -> ExitCode {
    // clap exits with 2 on usage errors, as SPEC §10 asks.
    let cli = Cli::parse();
    init_tracing();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("sd-host: {msg}");
            ExitCode::from(1)
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SDHOST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(a) => {
            let config = Config::load(
                a.config.as_deref(),
                &CliOverrides {
                    host: a.host,
                    port: a.port,
                    data_dir: a.data_dir,
                    api_keys: a.api_keys,
                },
            )?;
            if config.engine.threads > 0 {
                // The engine's kernels size their pools from this; set before any thread starts.
                std::env::set_var("RAYON_NUM_THREADS", config.engine.threads.to_string());
            }
            runtime()?.block_on(crate::server::serve(config, a.insecure_no_auth))
        }
        Command::Generate(a) => crate::generate::generate(*a),
        Command::Models {
            config,
            data_dir,
            command,
        } => {
            let config = Config::load(
                config.as_deref(),
                &CliOverrides {
                    data_dir,
                    ..Default::default()
                },
            )?;
            crate::models::cli::run(config, command)
        }
        Command::Dev(d) => crate::generate::dev(d),
        Command::Bench(b) => crate::generate::bench(b),
    }
}
