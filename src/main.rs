//! `arknet` command line: parses arguments, loads the config, and hands over to the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use arknet::config::{BackendConfig, BackendKind, BackendUrl, Config};
use arknet::Node;
use clap::{Args, Parser, Subcommand, ValueEnum};

/// Config file used when `--config` is not given and it exists.
const DEFAULT_CONFIG_PATH: &str = "conf/arknet.toml";
/// `sysexits.h` EX_USAGE: a bad command line or config.
const EX_USAGE: u8 = 64;

#[derive(Parser)]
#[command(
    name = "arknet",
    version,
    about = "Pool home AI servers into a cooperative grid"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node (or, with --check, validate its config and exit).
    Serve(ServeArgs),
    /// Print this node's id and public key (creating the identity on first use).
    Id(ConfigArgs),
}

#[derive(Args)]
struct ConfigArgs {
    /// Config file [default: conf/arknet.toml if it exists, else built-in defaults].
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Data dir (identity, approvals, logs); overrides `data_dir`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Node id; overrides `node_id`.
    #[arg(long)]
    node_id: Option<String>,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Validate the config and exit: 0 when valid, 64 with file:line: key: message otherwise.
    #[arg(long)]
    check: bool,
    /// API listener address; overrides `api.listen`.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Backend base URL (repeatable); replaces the config's `[[backends]]`.
    #[arg(long = "backend", value_name = "URL")]
    backends: Vec<String>,
    /// Dialect of --backend URLs [default: ollama for port 11434, openai otherwise].
    #[arg(long, value_enum)]
    backend_kind: Option<KindArg>,
    /// Concurrency limit of each --backend.
    #[arg(long, default_value_t = 4)]
    backend_max_concurrent: usize,
}

#[derive(Clone, Copy, ValueEnum)]
enum KindArg {
    Ollama,
    Openai,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Id(args) => id(args),
    }
}

fn load(args: &ConfigArgs) -> Result<Config, String> {
    let mut config = match &args.config {
        Some(path) => Config::load(path).map_err(|e| e.to_string())?,
        None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
            Config::load(Path::new(DEFAULT_CONFIG_PATH)).map_err(|e| e.to_string())?
        }
        None => Config::default(),
    };
    if let Some(dir) = &args.data_dir {
        config.data_dir = dir.clone();
    }
    if let Some(id) = &args.node_id {
        if !arknet::config::valid_node_id(id) {
            return Err(format!(
                "--node-id `{id}`: use 1-64 characters from a-z, A-Z, 0-9, '-', '_', '.'"
            ));
        }
        config.node_id = Some(id.clone());
    }
    Ok(config)
}

fn apply_serve_flags(config: &mut Config, args: &ServeArgs) -> Result<(), String> {
    if let Some(listen) = args.listen {
        config.api_listen = listen;
    }
    if args.backend_max_concurrent == 0 {
        return Err("--backend-max-concurrent must be at least 1".to_string());
    }
    if !args.backends.is_empty() {
        config.backends = args
            .backends
            .iter()
            .enumerate()
            .map(|(i, url)| {
                let url =
                    BackendUrl::try_from(url.clone()).map_err(|e| format!("--backend {e}"))?;
                let kind = match args.backend_kind {
                    Some(KindArg::Ollama) => BackendKind::Ollama,
                    Some(KindArg::Openai) => BackendKind::Openai,
                    None if url.addr.port() == 11434 => BackendKind::Ollama,
                    None => BackendKind::Openai,
                };
                Ok(BackendConfig {
                    name: format!("{kind}-{}", i + 1),
                    kind,
                    url,
                    api_key: None,
                    max_concurrent: args.backend_max_concurrent,
                })
            })
            .collect::<Result<_, String>>()?;
    }
    Ok(())
}

fn serve(args: ServeArgs) -> ExitCode {
    let config = match load(&args.config).and_then(|mut c| {
        apply_serve_flags(&mut c, &args)?;
        Ok(c)
    }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("arknet: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    if args.check {
        let source = args
            .config
            .config
            .clone()
            .or_else(|| Some(PathBuf::from(DEFAULT_CONFIG_PATH)).filter(|p| p.exists()));
        match source {
            Some(p) => eprintln!("arknet: {} is valid", p.display()),
            None => eprintln!("arknet: built-in defaults are valid"),
        }
        return ExitCode::SUCCESS;
    }
    init_tracing(&config.log_level);
    let node = match Node::prepare(config) {
        Ok(n) => n,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("arknet: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = node.run() {
        eprintln!("arknet: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn id(args: ConfigArgs) -> ExitCode {
    let config = match load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("arknet: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    match Node::prepare(config) {
        Ok(node) => {
            // The one place stdout is the product: scripts read these two lines.
            #[allow(clippy::print_stdout)]
            {
                println!("node_id: {}", node.node_id());
                println!("public_key: {}", node.identity().public_key());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("arknet: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(default_level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
