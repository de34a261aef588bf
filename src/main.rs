//! The `duplex-gateway` command: read the config, then run the Pingora server.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use duplex_gateway::app::App;
use duplex_gateway::config::{Config, ConfigError, Source, BUILTIN_TOKEN_VAR};
use tracing_subscriber::EnvFilter;

/// mimalloc instead of glibc's allocator: the HTTP path allocates and frees per request (Pingora's
/// request state, bodies, frames), and glibc's malloc and free were a quarter of the gateway's
/// CPU on some CPUs (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    let args = Args::parse();

    // SIGHUP's default action ends the process; take it over before anything else, so a reload
    // signal that comes early is never fatal (the reload service listens for it later).
    if let Err(e) = take_over_sighup() {
        eprintln!("error: cannot handle SIGHUP: {e}");
        return ExitCode::from(1);
    }

    let generated_token = random_token();
    let source = match &args.config {
        Some(path) => Source::File {
            path: path.clone(),
            generated_token,
        },
        None => Source::Builtin { generated_token },
    };
    let loaded: Result<Config, ConfigError> = source.load();
    let config = match loaded {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let keys = match duplex_gateway::tls::load_all(&config) {
        Ok(keys) => keys,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    // The files `cluster.auth` and `cluster.tls` name are read now, so `--check` finds them.
    if let Some(cluster) = &config.cluster {
        if let Err(e) = duplex_gateway::cluster::link::check(cluster) {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    }
    init_logging(config.log.json);
    // Every connection is a descriptor: take all the system allows (10,000 idle clients need it).
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!("cannot raise the open-file limit: {e}");
    }
    if args.check {
        for warning in config.warnings() {
            println!("warning: {warning}");
        }
        println!("config is valid");
        return ExitCode::SUCCESS;
    }
    for warning in config.warnings() {
        tracing::warn!("config: {warning}");
    }
    // A config that names ${DUPLEX_GATEWAY_TOKEN} (the built-in one does) runs without it: on a
    // random token, printed once.
    if let Some(token) = source.generated_token_in_use() {
        println!("publish token (random; set {BUILTIN_TOKEN_VAR} to choose one): {token}");
    }

    if let Some(endpoint) = &config.otlp_endpoint {
        if let Err(e) = duplex_gateway::otlp::start(endpoint) {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    }
    let app = App::new(config, source, keys);
    let ran = duplex_gateway::server::run(app);
    duplex_gateway::otlp::flush();
    match ran {
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

/// Registers a SIGHUP handler for the life of the process (tokio keeps it installed once made).
fn take_over_sighup() -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).map(drop)
    })
}

/// Logs to standard error as `RUST_LOG` asks (default `info`), as text or (`log.format: json`)
/// one JSON object per line, with the caps that keep credentials out whatever it asks.
fn init_logging(json: bool) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::registry()
        .with((!json).then(|| {
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Colours only on a terminal: log files and journals get plain text.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        }))
        .with(json.then(|| {
            tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
                .with_writer(std::io::stderr)
        }))
        .with(filter)
        // Pingora's debug and trace lines print whole request headers (a request it cannot
        // parse, with its query string, Authorization and X-Duplex-Secret): never shown,
        // whatever RUST_LOG asks for.
        //
        // The NATS client's trace lines print its CONNECT, password and token included: its
        // lines stop at debug, whatever RUST_LOG asks for.
        //
        // tungstenite traces every message it frames, payloads included, and a payload may be a
        // credential (`$refresh` carries a signed token): its lines stop at debug too.
        .with(tracing_subscriber::filter::filter_fn(|meta| {
            let target = meta.target();
            !(*meta.level() > tracing::Level::INFO && target.starts_with("pingora")
                || *meta.level() > tracing::Level::DEBUG
                    && (target.starts_with("async_nats") || target.starts_with("tungstenite")))
        }))
        .init();
}
