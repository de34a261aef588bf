//! The `duplex-gateway` command: read the config, then run the Pingora server.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use duplex_gateway::config::{self, Config, ConfigError, BUILTIN_TOKEN_VAR};
use duplex_gateway::gateway::App;
use tracing_subscriber::EnvFilter;

/// Publishes private Duplex RPC services on the web.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// The YAML config file (without it: the built-in default, loopback only).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate the config and exit: 0 if it is valid, 1 (with what is wrong) if not.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();

    let loaded: Result<Config, ConfigError> = match &args.config {
        Some(path) => config::load_file(path),
        None => {
            let generated = if std::env::var_os(BUILTIN_TOKEN_VAR).is_none() && !args.check {
                let token = random_token();
                println!("publish token (random; set {BUILTIN_TOKEN_VAR} to choose one): {token}");
                token
            } else {
                random_token()
            };
            config::load_builtin(&generated)
        }
    };
    let config = match loaded {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    if args.check {
        println!("config is valid");
        return ExitCode::SUCCESS;
    }

    let app = App::new(config.clone());
    match duplex_gateway::server::run(app, &config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// 256 random bits as 64 hex digits.
fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
