//! `arknet` command line: parses arguments, loads the config, and hands over to the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use arknet::config::{BackendConfig, BackendKind, BackendUrl, Config};
use arknet::Node;
use clap::{Args, Parser, Subcommand, ValueEnum};

/// The request path makes about fifty small, short-lived allocations per request (most in
/// Pingora's header parsing and building); mimalloc's per-thread free lists serve them for less
/// CPU than glibc's malloc (see `benches/README.md`, "Allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Config file used when `--config` is not given and it exists.
const DEFAULT_CONFIG_PATH: &str = "conf/arknet.toml";
/// `sysexits.h` EX_USAGE: a bad command line or config.
const EX_USAGE: u8 = 64;
/// `arknet --version`: the crate version and the commit it was built from (see build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("ARKNET_COMMIT"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "arknet",
    version = VERSION,
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
    /// Report what a node with these options would find (backends, ports, discovery, files,
    /// clock) and what is wrong; exit 1 when something is. Takes `serve`'s options.
    Doctor(ServeArgs),
    /// Manage peers through the running node's admin API.
    Peers {
        #[command(flatten)]
        config: ConfigArgs,
        /// The node's API address [default: `api.listen` from the config].
        #[arg(long, global = true)]
        api: Option<std::net::SocketAddr>,
        #[command(subcommand)]
        action: PeersAction,
    },
    /// The public registry: run one, or see and withdraw this node's record in one.
    Registry {
        #[command(subcommand)]
        action: RegistryAction,
    },
    /// Model sharing: pull a model's weights from approved peers, list what they offer.
    Models {
        #[command(flatten)]
        config: ConfigArgs,
        /// The node's API address [default: `api.listen` from the config].
        #[arg(long, global = true)]
        api: Option<std::net::SocketAddr>,
        #[command(subcommand)]
        action: ModelsAction,
    },
}

#[derive(Subcommand)]
enum RegistryAction {
    /// Run a registry (or, with --check, validate its config and exit).
    Serve {
        /// Registry config file [default: conf/registry.toml].
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Validate the config and exit: 0 when valid, 64 with file:line: key: message.
        #[arg(long)]
        check: bool,
    },
    /// What this node published in a registry: endpoint, models, expiry, reachability.
    Status(RegistryNodeArgs),
    /// Withdraw this node's record from a registry (signed with its key).
    Deregister(RegistryNodeArgs),
}

#[derive(Args)]
struct RegistryNodeArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Registry URL, https://host:port.
    #[arg(long)]
    url: String,
    /// CA certificates (PEM) that issued the registry's certificate [default: the system's].
    #[arg(long)]
    ca_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ModelsAction {
    /// Pull MODEL from the approved peers that offer it (verified, resumable) and install it
    /// into this node's backend.
    Pull {
        /// The model, as the peers share it.
        model: String,
        /// Only from this peer (node id).
        #[arg(long)]
        from: Option<String>,
    },
    /// This node's models, and which peers offer which for pulling.
    List,
}

#[derive(Subcommand)]
enum PeersAction {
    /// Every node seen or approved, with its state.
    List,
    /// Nodes seen or refused that are not approved.
    Pending,
    /// Approved peers: reachable, latency, in flight, models.
    Status,
    /// Approve a peer (or change an approved one).
    Approve {
        /// The peer's node id.
        #[arg(long)]
        node_id: String,
        /// The peer's public key (44-character base64, from `arknet id` on that node).
        #[arg(long)]
        public_key: String,
        /// Display name.
        #[arg(long)]
        name: Option<String>,
        /// Models shared with the peer (comma-separated).
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        /// Requests the peer may have in flight here.
        #[arg(long, default_value_t = 1)]
        max_concurrent: u32,
        /// Do not allow inference (approve for hello/status only).
        #[arg(long)]
        no_inference: bool,
        /// Allow model pulls.
        #[arg(long)]
        pulls: bool,
        /// The peer's mesh endpoint, ip:port.
        #[arg(long)]
        endpoint: Option<String>,
    },
    /// Revoke a peer: its requests are refused at once and its streams end.
    Revoke {
        /// By node id.
        #[arg(
            long,
            conflicts_with = "public_key",
            required_unless_present = "public_key"
        )]
        node_id: Option<String>,
        /// By key.
        #[arg(long)]
        public_key: Option<String>,
    },
}

#[derive(Args)]
struct ConfigArgs {
    // `global`: accepted after a subcommand too (`arknet peers status --api X --data-dir D`),
    // where users type them.
    /// Config file [default: conf/arknet.toml if it exists, else built-in defaults].
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Data dir (identity, approvals, logs); overrides `data_dir`.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Node id; overrides `node_id`. (Not global: `peers approve --node-id` names the peer.)
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
    /// Mesh listener address; overrides `mesh.listen`.
    #[arg(long)]
    mesh_listen: Option<std::net::SocketAddr>,
    /// A peer's mesh endpoint to dial (repeatable); added to `discovery.static`.
    #[arg(long = "peer", value_name = "ADDR")]
    peers: Vec<std::net::SocketAddr>,
    /// No mDNS at all (no multicast socket), whatever the config says.
    #[arg(long, conflicts_with = "mdns")]
    no_mdns: bool,
    /// mDNS discovery on, whatever the config says (interfaces from `discovery.mdns_interfaces`
    /// or --mdns-interface).
    #[arg(long)]
    mdns: bool,
    /// Interface for mDNS (repeatable); replaces `discovery.mdns_interfaces`.
    #[arg(long = "mdns-interface", value_name = "IFACE")]
    mdns_interfaces: Vec<String>,
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
        Command::Doctor(args) => doctor(args),
        Command::Peers {
            config,
            api,
            action,
        } => peers(&config, api, action),
        Command::Registry { action } => registry(action),
        Command::Models {
            config,
            api,
            action,
        } => models(&config, api, action),
    }
}

fn models(args: &ConfigArgs, api: Option<std::net::SocketAddr>, action: ModelsAction) -> ExitCode {
    let config = match load(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("arknet: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let api = api.unwrap_or(config.api_listen);
    let result = match action {
        ModelsAction::Pull { model, from } => {
            arknet::models::cli::pull(api, &model, from.as_deref())
        }
        ModelsAction::List => {
            let token = std::fs::read_to_string(config.admin_token_path()).ok();
            arknet::models::cli::list(api, token.as_deref())
        }
    };
    match result {
        Ok(text) => print_out(&text),
        Err(e) => {
            eprintln!("arknet: {e}");
            ExitCode::FAILURE
        }
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
    if let Some(listen) = args.mesh_listen {
        config.mesh_listen = listen;
    }
    config.static_peers.extend(args.peers.iter().copied());
    if args.no_mdns {
        config.mdns = false;
    }
    if args.mdns {
        config.mdns = true;
    }
    if !args.mdns_interfaces.is_empty() {
        config.mdns_interfaces = args.mdns_interfaces.clone();
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
                    reserved_local_slots: 1.min(args.backend_max_concurrent - 1),
                    guest_vram_budget_mb: None,
                    model_vram_mb: Default::default(),
                    weights: Default::default(),
                })
            })
            .collect::<Result<_, String>>()?;
    }
    Ok(())
}

/// The config `serve` and `doctor` run with: the file, then the command-line overrides.
fn serve_config(args: &ServeArgs) -> Result<Config, String> {
    let mut config = load(&args.config)?;
    apply_serve_flags(&mut config, args)?;
    Ok(config)
}

fn serve(args: ServeArgs) -> ExitCode {
    let config = match serve_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("arknet: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    if args.check {
        match config_file(&args.config) {
            Some(p) => eprintln!("arknet: {} is valid", p.display()),
            None => eprintln!("arknet: built-in defaults are valid"),
        }
        return ExitCode::SUCCESS;
    }
    init_tracing(&config.log_level);
    let node = match Node::prepare(config).map(|n| n.with_config_file(config_file(&args.config))) {
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

/// The config file `load` reads, or `None` for the built-in defaults.
fn config_file(args: &ConfigArgs) -> Option<PathBuf> {
    args.config
        .clone()
        .or_else(|| Some(PathBuf::from(DEFAULT_CONFIG_PATH)).filter(|p| p.exists()))
}

fn doctor(args: ServeArgs) -> ExitCode {
    let config = match serve_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("arknet: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let source = config_file(&args.config)
        .map_or("built-in defaults".to_string(), |p| p.display().to_string());
    let report = arknet::doctor::examine(&config, &source);
    // The report is the product of this command: it goes to stdout, for the owner and scripts
    // (`arknet doctor | head` included, hence no panic on a closed pipe).
    let printed = print_out(report.to_string().trim_end());
    if report.problems() == 0 {
        printed
    } else {
        ExitCode::FAILURE
    }
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
            print_out(&format!(
                "node_id: {}\npublic_key: {}",
                node.node_id(),
                node.identity().public_key()
            ))
        }
        Err(e) => {
            eprintln!("arknet: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes `text` and a newline to stdout. A reader that went away (`arknet peers list | head`)
/// is normal use, not an error worth a panic: the output is just cut, as with any Unix tool.
fn registry(action: RegistryAction) -> ExitCode {
    use arknet::registry::config::{RegistryConfig, DEFAULT_REGISTRY_CONFIG};
    let args = match action {
        RegistryAction::Serve { config, check } => {
            let path = config.unwrap_or_else(|| PathBuf::from(DEFAULT_REGISTRY_CONFIG));
            let config = match RegistryConfig::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("arknet: {e}");
                    return ExitCode::from(EX_USAGE);
                }
            };
            if check {
                eprintln!("arknet: {} is valid", path.display());
                return ExitCode::SUCCESS;
            }
            init_tracing(&config.log_level);
            if let Err(e) = arknet::registry::serve(config) {
                tracing::error!("{e}");
                eprintln!("arknet: {e}");
                return ExitCode::FAILURE;
            }
            return ExitCode::SUCCESS;
        }
        RegistryAction::Status(args) => (args, false),
        RegistryAction::Deregister(args) => (args, true),
    };
    let (args, deregister) = args;
    let config = match load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("arknet: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let node = match Node::prepare(config) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("arknet: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| {
            rt.block_on(arknet::discovery::registry::cli(
                &node,
                &args.url,
                args.ca_file.as_deref(),
                deregister,
            ))
        });
    match result {
        Ok((ok, text)) => {
            let printed = print_out(&text);
            if ok {
                printed
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("arknet: registry: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_out(text: &str) -> ExitCode {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("arknet: writing to stdout: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(default_level: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(default_level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal; in a file or journal they are noise.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn peers(args: &ConfigArgs, api: Option<std::net::SocketAddr>, action: PeersAction) -> ExitCode {
    let mut config = match load(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("arknet: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let (method, path, body) = match action {
        PeersAction::List => ("GET", "/peers/discovered", None),
        PeersAction::Pending => ("GET", "/peers/pending", None),
        PeersAction::Status => ("GET", "/peers/status", None),
        PeersAction::Approve {
            node_id,
            public_key,
            name,
            models,
            max_concurrent,
            no_inference,
            pulls,
            endpoint,
        } => {
            let mut body = serde_json::json!({
                "node_id": node_id,
                "public_key": public_key,
                "permissions": {
                    "can_request_inference": !no_inference,
                    "can_pull_models": pulls,
                    "models_shared": models,
                    "max_concurrent_requests": max_concurrent,
                },
            });
            if let Some(n) = name {
                body["name"] = n.into();
            }
            if let Some(e) = endpoint {
                body["endpoint"] = e.into();
            }
            ("POST", "/peers/approve", Some(body))
        }
        PeersAction::Revoke {
            node_id,
            public_key,
        } => {
            let body = match (node_id, public_key) {
                (Some(id), _) => serde_json::json!({ "node_id": id }),
                (None, Some(k)) => serde_json::json!({ "public_key": k }),
                (None, None) => {
                    eprintln!("arknet: give --node-id or --public-key");
                    return ExitCode::from(EX_USAGE);
                }
            };
            ("POST", "/peers/revoke", Some(body))
        }
    };
    if let Some(api) = api {
        config.api_listen = api;
    }
    let token = std::fs::read_to_string(config.admin_token_path()).ok();
    match admin_call(
        config.api_listen,
        method,
        path,
        token.as_deref(),
        body.as_ref(),
    ) {
        Ok((status, text)) => {
            let pretty = serde_json::from_str::<serde_json::Value>(&text)
                .and_then(|v| serde_json::to_string_pretty(&v))
                .unwrap_or(text);
            let printed = print_out(&pretty);
            if (200..300).contains(&status) {
                printed
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!(
                "arknet: cannot reach the node's admin API at {}: {e}",
                config.api_listen
            );
            ExitCode::FAILURE
        }
    }
}

/// One request to the admin API, through the same Pingora client the node uses for its
/// backends; returns status and body.
fn admin_call(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&serde_json::Value>,
) -> std::io::Result<(u16, String)> {
    use std::time::Duration;
    // A node listening on the wildcard address is reached on loopback.
    let addr = if addr.ip().is_unspecified() {
        std::net::SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    };
    let body = bytes::Bytes::from(body.map(|b| b.to_string()).unwrap_or_default());
    let io = |e: &dyn std::fmt::Display| std::io::Error::other(e.to_string());
    let mut header = pingora::http::RequestHeader::build(method, path.as_bytes(), Some(4))
        .map_err(|e| io(&e))?;
    let mut headers = vec![
        ("host", addr.to_string()),
        ("content-type", "application/json".to_string()),
        ("content-length", body.len().to_string()),
    ];
    if let Some(t) = token {
        headers.push(("authorization", format!("Bearer {}", t.trim())));
    }
    for (name, value) in headers {
        header.insert_header(name, value).map_err(|e| io(&e))?;
    }
    let timeouts = arknet::config::UpstreamConfig {
        connect_timeout: Duration::from_secs(5),
        first_byte_timeout: Duration::from_secs(30),
        idle_chunk_timeout: Duration::from_secs(30),
        pool_idle: Duration::ZERO,
        models_refresh: Duration::from_secs(1),
    };
    let mut peer = pingora::upstreams::peer::HttpPeer::new(addr, false, String::new());
    peer.options.connection_timeout = Some(timeouts.connect_timeout);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let upstream = arknet::upstream::Upstream::new(&timeouts);
            let mut rsp = upstream
                .send(&peer, &header, &body)
                .await
                .map_err(|e| io(&e))?;
            let status = rsp.header().status.as_u16();
            let mut out = Vec::new();
            while let Some(chunk) = rsp.next_chunk().await.map_err(|e| io(&e))? {
                out.extend_from_slice(&chunk);
            }
            Ok((status, String::from_utf8_lossy(&out).into_owned()))
        })
}
