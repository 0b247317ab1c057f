//! Configuration: the TOML file users edit, turned into a validated [`Config`].
//!
//! Two layers, as in River: [`FileConfig`] is the serde surface (every key has a default,
//! unknown keys are errors) and [`Config`] is what the rest of the node reads, with nothing left
//! to unwrap. Errors name the file, the line and the key, because a user fixing a config reads
//! nothing else.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// Default API listener: loopback only, the owner's clients live on this machine.
pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:8910";
/// Default data dir when none is configured: relative to the working directory, so a checkout
/// runs without root. Packaged installs set `/opt/ark/data/arknet`.
pub const DEFAULT_DATA_DIR: &str = "data";
/// Default largest request body accepted on the API listener (16 MiB: long chats and images).
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// Default mesh listener: all interfaces, peers come from the LAN and tunnels.
pub const DEFAULT_MESH_LISTEN: &str = "0.0.0.0:8911";
/// Default admin token file, relative to the data dir.
pub const DEFAULT_ADMIN_TOKEN_FILE: &str = "admin.token";
const DEFAULT_HELLO_INTERVAL_SECS: u64 = 5;
/// mDNS is off unless the config turns it on: a node started by a test, a benchmark or a
/// script must never multicast on an interface nobody chose. The shipped config turns it on.
const DEFAULT_MDNS: bool = false;
/// Default path prefix Nginx uses when it forwards `/arknet/` with the prefix kept.
pub const DEFAULT_PATH_PREFIX: &str = "/arknet";
/// Default backend when the config declares none: a local Ollama.
pub const DEFAULT_BACKEND_URL: &str = "http://127.0.0.1:11434";
const DEFAULT_MAX_CONCURRENT: usize = 4;
const DEFAULT_RESERVED_LOCAL_SLOTS: usize = 1;
const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 2_000;
const DEFAULT_FIRST_BYTE_TIMEOUT_SECS: u64 = 300;
const DEFAULT_IDLE_CHUNK_TIMEOUT_SECS: u64 = 300;
const DEFAULT_MODELS_REFRESH_SECS: u64 = 15;
const DEFAULT_POOL_IDLE_SECS: u64 = 60;
const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 5;
const DEFAULT_LOG_LEVEL: &str = "info";
/// Host names the API answers to besides IP literals, `localhost` and this machine's names:
/// `arknet` is the upstream name in the shipped Nginx snippet (nginx sends it as `Host`).
const DEFAULT_ALLOWED_HOSTS: [&str; 1] = ["arknet"];
/// A client has this long to send a whole request header (slowloris defence).
const DEFAULT_HEADER_TIMEOUT_SECS: u64 = 10;
/// An idle keep-alive connection is closed after this long without a new request.
const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 15;
/// A mesh client has this long to finish the TLS handshake.
const DEFAULT_HANDSHAKE_TIMEOUT_SECS: u64 = 10;
/// Connections one client address may hold open on a listener at once.
const DEFAULT_MAX_CONNECTIONS_PER_CLIENT: usize = 256;
/// Request-body bytes held in memory across all requests at once; beyond it, 503.
const DEFAULT_MAX_BODIES_IN_FLIGHT_BYTES: usize = 256 * 1024 * 1024;

/// A problem with a configuration file, phrased for the person editing it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("{path}: cannot read config: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file was read but a key is wrong; `line` is 1-based.
    #[error("{path}:{line}: key `{key}`: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line of the offending key or value (0 when the whole file is at fault).
        line: usize,
        /// Dotted key path, such as `backends.url`.
        key: String,
        /// What is wrong, in the parser's words or ours.
        message: String,
    },
}

/// Which API family a backend speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Ollama: `/api/*` NDJSON, and also `/v1/*` OpenAI compatibility.
    Ollama,
    /// Any OpenAI-compatible server (llama.cpp, vLLM, LM Studio): `/v1/*` only.
    Openai,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Ollama => "ollama",
            BackendKind::Openai => "openai",
        })
    }
}

/// A plain-HTTP backend base URL, split into what the upstream connector needs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct BackendUrl {
    /// Socket address to connect to (`host:port`; host must be an IP literal or `localhost`).
    pub addr: SocketAddr,
    /// `Host` header value sent upstream.
    pub authority: String,
    /// Path prefix of the API on that server, without trailing slash (usually empty).
    pub base_path: String,
}

impl TryFrom<String> for BackendUrl {
    type Error = String;

    fn try_from(url: String) -> Result<Self, Self::Error> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            format!("`{url}` is not an http:// URL (backends are reached over plain HTTP on this host or LAN)")
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let with_port = if authority.contains(':') && !authority.ends_with(']') {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        let resolvable = with_port.replacen("localhost:", "127.0.0.1:", 1);
        let addr: SocketAddr = resolvable.parse().map_err(|_| {
            format!("`{url}`: host must be an IP address or localhost, with an optional port")
        })?;
        Ok(BackendUrl {
            addr,
            authority: authority.to_string(),
            base_path: path.to_string(),
        })
    }
}

impl fmt::Display for BackendUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.authority, self.base_path)
    }
}

/// On-disk shape of `arknet.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileConfig {
    node_id: Option<Spanned<String>>,
    data_dir: Option<PathBuf>,
    log_level: Spanned<String>,
    api: FileApi,
    mesh: FileMesh,
    discovery: FileDiscovery,
    upstream: FileUpstream,
    backends: Option<Vec<FileBackend>>,
    models: crate::models::FileSharing,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileMesh {
    listen: SocketAddr,
    hello_interval_secs: u64,
    handshake_timeout_secs: u64,
}

impl Default for FileMesh {
    fn default() -> Self {
        FileMesh {
            listen: DEFAULT_MESH_LISTEN
                .parse()
                .expect("default mesh address is valid"),
            hello_interval_secs: DEFAULT_HELLO_INTERVAL_SECS,
            handshake_timeout_secs: DEFAULT_HANDSHAKE_TIMEOUT_SECS,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileDiscovery {
    #[serde(rename = "static")]
    static_peers: Vec<SocketAddr>,
    mdns: Option<bool>,
    mdns_interfaces: Vec<String>,
    wireguard: FileWireguard,
    registry: FileRegistryDiscovery,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileRegistryDiscovery {
    enabled: bool,
    url: Spanned<String>,
    ca_file: Option<PathBuf>,
    registry_key: Option<Spanned<String>>,
    advertise_models: Vec<String>,
    public_endpoint: Option<SocketAddr>,
    ttl_secs: u64,
    fetch_interval_secs: u64,
}

impl Default for FileRegistryDiscovery {
    fn default() -> Self {
        FileRegistryDiscovery {
            enabled: false,
            url: Spanned::new(0..0, String::new()),
            ca_file: None,
            registry_key: None,
            advertise_models: Vec::new(),
            public_endpoint: None,
            ttl_secs: 600,
            fetch_interval_secs: 30,
        }
    }
}

/// `[discovery.registry]`: publish this node in a public registry and learn peers from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryDiscovery {
    /// `https://host:port` of the registry.
    pub url: String,
    /// CA certificates (PEM) for the registry's certificate; `None`: the system's.
    pub ca_file: Option<PathBuf>,
    /// The registry's answer-signing key, when pinned.
    pub registry_key: Option<crate::identity::PublicKey>,
    /// Models listed in our record (default none: the owner chooses what strangers see).
    pub advertise_models: Vec<String>,
    /// Mesh endpoint published (port-forwarded setups); default `mesh.listen`.
    pub public_endpoint: SocketAddr,
    /// Lifetime of each record; heartbeats come at a third of it, jittered.
    pub ttl: Duration,
    /// Period of peer fetches.
    pub fetch_interval: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileWireguard {
    enabled: bool,
    interface: String,
    mesh_port: Option<u16>,
}

impl Default for FileWireguard {
    fn default() -> Self {
        FileWireguard {
            enabled: false,
            interface: "wg0".to_string(),
            mesh_port: None,
        }
    }
}

impl Default for FileConfig {
    fn default() -> Self {
        FileConfig {
            node_id: None,
            data_dir: None,
            log_level: Spanned::new(0..0, DEFAULT_LOG_LEVEL.to_string()),
            api: FileApi::default(),
            mesh: FileMesh::default(),
            discovery: FileDiscovery::default(),
            upstream: FileUpstream::default(),
            backends: None,
            models: crate::models::FileSharing::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileApi {
    listen: SocketAddr,
    max_body_bytes: NonZeroUsize,
    path_prefix: Spanned<String>,
    threads: Option<NonZeroUsize>,
    shutdown_grace_secs: u64,
    admin_token_file: PathBuf,
    allowed_hosts: Vec<String>,
    header_timeout_secs: u64,
    idle_timeout_secs: u64,
    max_connections_per_client: usize,
    max_bodies_in_flight_bytes: NonZeroUsize,
}

impl Default for FileApi {
    fn default() -> Self {
        FileApi {
            listen: DEFAULT_API_LISTEN
                .parse()
                .expect("default listen address is valid"),
            max_body_bytes: NonZeroUsize::new(DEFAULT_MAX_BODY_BYTES).expect("non-zero const"),
            path_prefix: Spanned::new(0..0, DEFAULT_PATH_PREFIX.to_string()),
            threads: None,
            shutdown_grace_secs: DEFAULT_SHUTDOWN_GRACE_SECS,
            admin_token_file: PathBuf::from(DEFAULT_ADMIN_TOKEN_FILE),
            allowed_hosts: DEFAULT_ALLOWED_HOSTS.map(String::from).to_vec(),
            header_timeout_secs: DEFAULT_HEADER_TIMEOUT_SECS,
            idle_timeout_secs: DEFAULT_IDLE_TIMEOUT_SECS,
            max_connections_per_client: DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
            max_bodies_in_flight_bytes: NonZeroUsize::new(DEFAULT_MAX_BODIES_IN_FLIGHT_BYTES)
                .expect("non-zero const"),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileUpstream {
    connect_timeout_ms: u64,
    first_byte_timeout_secs: u64,
    idle_chunk_timeout_secs: u64,
    pool_idle_secs: u64,
    models_refresh_secs: u64,
}

impl Default for FileUpstream {
    fn default() -> Self {
        FileUpstream {
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            first_byte_timeout_secs: DEFAULT_FIRST_BYTE_TIMEOUT_SECS,
            idle_chunk_timeout_secs: DEFAULT_IDLE_CHUNK_TIMEOUT_SECS,
            pool_idle_secs: DEFAULT_POOL_IDLE_SECS,
            models_refresh_secs: DEFAULT_MODELS_REFRESH_SECS,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBackend {
    name: toml::Spanned<String>,
    kind: BackendKind,
    url: BackendUrl,
    #[serde(default)]
    api_key: Option<String>,
    #[serde(default = "default_max_concurrent")]
    max_concurrent: NonZeroUsize,
    #[serde(default = "default_reserved_local_slots")]
    reserved_local_slots: Spanned<usize>,
    #[serde(default)]
    guest_vram_budget_mb: Option<u64>,
    #[serde(default)]
    model_vram_mb: std::collections::BTreeMap<String, u64>,
    #[serde(default)]
    models_dir: Option<Spanned<PathBuf>>,
    #[serde(default)]
    gguf: std::collections::BTreeMap<String, crate::models::OneOrMany>,
    #[serde(default)]
    gguf_dir: Option<Spanned<PathBuf>>,
}

fn default_reserved_local_slots() -> Spanned<usize> {
    Spanned::new(0..0, DEFAULT_RESERVED_LOCAL_SLOTS)
}

fn default_max_concurrent() -> NonZeroUsize {
    NonZeroUsize::new(DEFAULT_MAX_CONCURRENT).expect("non-zero const")
}

/// A secret that never shows up in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Redacted<T>(pub T);

impl<T> fmt::Debug for Redacted<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// One of the node's own model servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// Unique name, used in logs and metric labels.
    pub name: String,
    /// API family.
    pub kind: BackendKind,
    /// Where it listens.
    pub url: BackendUrl,
    /// Sent upstream as `Authorization: Bearer ...` when set.
    pub api_key: Option<Redacted<String>>,
    /// Requests in flight to this backend at most; beyond it the node answers 503.
    pub max_concurrent: usize,
    /// Slots only local clients may use; peers get `max_concurrent - reserved_local_slots`.
    pub reserved_local_slots: usize,
    /// VRAM (MB) that loaded models may occupy when a peer's request would load another;
    /// `None`: peers may make the backend load anything.
    pub guest_vram_budget_mb: Option<u64>,
    /// Static model sizes (MB) for backends that cannot report them (OpenAI-compatible ones).
    pub model_vram_mb: std::collections::BTreeMap<String, u64>,
    /// Where its weights live, for model sharing (`models_dir`, `gguf`, `gguf_dir`).
    pub weights: crate::models::Weights,
}

/// Timeouts and pool settings for talking to backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Longest wait for the response header (a cold model may take minutes to load).
    pub first_byte_timeout: Duration,
    /// Longest silence between two body chunks of a streamed response.
    pub idle_chunk_timeout: Duration,
    /// How long an idle pooled connection is kept.
    pub pool_idle: Duration,
    /// Period of the background model-list refresh.
    pub models_refresh: Duration,
}

/// How long and how many connections clients may hold, on both listeners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Time to read a whole request header on a new connection.
    pub header_timeout: Duration,
    /// Time a keep-alive connection may sit idle between requests.
    pub idle_timeout: Duration,
    /// Time to finish a TLS handshake (mesh listener).
    pub handshake_timeout: Duration,
    /// Open connections per client IP address; 0 means no limit.
    pub max_per_client: usize,
}

/// The validated configuration a node runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Configured node id; `None` derives one from the hostname and key at start.
    pub node_id: Option<String>,
    /// Where identity, approvals and logs live.
    pub data_dir: PathBuf,
    /// Default tracing filter when `RUST_LOG` is unset.
    pub log_level: String,
    /// API listener address.
    pub api_listen: SocketAddr,
    /// Largest request body accepted (bytes).
    pub max_body_bytes: usize,
    /// Prefix stripped from request paths when present (Nginx `/arknet/`).
    pub path_prefix: String,
    /// Worker threads for the listener; `None` means one per core.
    pub threads: Option<usize>,
    /// Seconds in-flight requests get to finish on shutdown.
    pub shutdown_grace_secs: u64,
    /// Admin token file; relative paths are inside the data dir.
    pub admin_token_file: PathBuf,
    /// Extra `Host` names the API listener answers to (Nginx upstream names, LAN names).
    pub allowed_hosts: Vec<String>,
    /// Timeouts and per-client bounds of client connections.
    pub connections: ConnectionLimits,
    /// Request-body bytes held in memory at once across all requests.
    pub max_bodies_in_flight_bytes: usize,
    /// Mesh listener address.
    pub mesh_listen: SocketAddr,
    /// Period of hellos to approved peers.
    pub hello_interval: Duration,
    /// Peer endpoints dialed without discovery (`discovery.static`, `--peer`).
    pub static_peers: Vec<SocketAddr>,
    /// Advertise and browse `_arknet._tcp` by mDNS.
    pub mdns: bool,
    /// Interfaces for mDNS; empty: all but loopback and tunnels.
    pub mdns_interfaces: Vec<String>,
    /// WireGuard interface whose peers are probed, when enabled.
    pub wireguard_interface: Option<String>,
    /// Mesh port of the nodes behind the tunnel (default: our own mesh port).
    pub wireguard_mesh_port: Option<u16>,
    /// The public registry, when enabled (off by default).
    pub registry: Option<RegistryDiscovery>,
    /// Upstream timeouts.
    pub upstream: UpstreamConfig,
    /// The node's own model servers, in preference order.
    pub backends: Vec<BackendConfig>,
    /// Model sharing: transfer caps, pull parts (`[models]`).
    pub sharing: crate::models::SharingConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config::from_file(FileConfig::default(), Path::new("<defaults>"), "")
            .expect("built-in defaults are valid")
    }
}

impl Config {
    /// The admin token file's full path.
    pub fn admin_token_path(&self) -> PathBuf {
        self.data_dir.join(&self.admin_token_file)
    }

    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::parse(&read_config(path)?, path)
    }

    /// Validates `text` as if read from `path` (which only labels errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let file: FileConfig = parse_toml(text, path)?;
        Self::from_file(file, path, text)
    }

    fn from_file(file: FileConfig, path: &Path, text: &str) -> Result<Self, ConfigError> {
        let invalid = |key: &str, span: Option<std::ops::Range<usize>>, message: String| {
            ConfigError::Invalid {
                path: path.to_path_buf(),
                line: span.map_or(0, |s| line_of(text, s.start)),
                key: key.to_string(),
                message,
            }
        };
        if let Some(id) = &file.node_id {
            if !valid_node_id(id.get_ref()) {
                let id = id.get_ref();
                return Err(invalid(
                    "node_id",
                    file.node_id.as_ref().map(Spanned::span),
                    format!("`{id}`: use 1-64 characters from a-z, A-Z, 0-9, '-', '_', '.'"),
                ));
            }
        }
        let prefix = file.api.path_prefix.get_ref();
        if !prefix.is_empty() && (!prefix.starts_with('/') || prefix.ends_with('/')) {
            return Err(invalid(
                "api.path_prefix",
                Some(file.api.path_prefix.span()),
                "must start with '/' and not end with '/' (or be empty)".to_string(),
            ));
        }
        if let Err(e) = check_log_level(file.log_level.get_ref()) {
            return Err(invalid("log_level", Some(file.log_level.span()), e));
        }
        let file_backends = file.backends.unwrap_or_else(|| {
            vec![FileBackend {
                name: toml::Spanned::new(0..0, "ollama".to_string()),
                kind: BackendKind::Ollama,
                url: BackendUrl::try_from(DEFAULT_BACKEND_URL.to_string())
                    .expect("default backend URL is valid"),
                api_key: None,
                max_concurrent: default_max_concurrent(),
                reserved_local_slots: default_reserved_local_slots(),
                guest_vram_budget_mb: None,
                model_vram_mb: Default::default(),
                models_dir: None,
                gguf: Default::default(),
                gguf_dir: None,
            }]
        });
        let mut names = HashSet::new();
        let mut backends = Vec::with_capacity(file_backends.len());
        for b in file_backends {
            let span = b.name.span();
            let name = b.name.into_inner();
            if name.is_empty() || !names.insert(name.clone()) {
                return Err(invalid(
                    "backends.name",
                    Some(span),
                    format!("`{name}`: backend names must be non-empty and unique"),
                ));
            }
            if *b.reserved_local_slots.get_ref() > b.max_concurrent.get() {
                return Err(invalid(
                    "backends.reserved_local_slots",
                    Some(b.reserved_local_slots.span()),
                    format!(
                        "{} is more than max_concurrent ({})",
                        b.reserved_local_slots, b.max_concurrent
                    ),
                ));
            }
            let weights = backend_weights(b.kind, &span, b.models_dir, b.gguf, b.gguf_dir)
                .map_err(|(key, span, message)| invalid(key, Some(span), message))?;
            backends.push(BackendConfig {
                weights,
                name,
                kind: b.kind,
                url: b.url,
                api_key: b.api_key.filter(|k| !k.is_empty()).map(Redacted),
                max_concurrent: b.max_concurrent.get(),
                reserved_local_slots: b.reserved_local_slots.into_inner(),
                guest_vram_budget_mb: b.guest_vram_budget_mb,
                model_vram_mb: b.model_vram_mb,
            });
        }
        let sharing = file.models.validate().map_err(|(key, message)| {
            let field = key.rsplit('.').next().unwrap_or(key);
            let at = text
                .find(&format!("{field} "))
                .or_else(|| text.find(&format!("{field}=")));
            invalid(key, at.map(|a| a..a), message)
        })?;
        let u = file.upstream;
        let r = &file.discovery.registry;
        let registry = if r.enabled {
            let url = r.url.get_ref();
            if !url.starts_with("https://") {
                return Err(invalid(
                    "discovery.registry.url",
                    Some(r.url.span()).filter(|s| !s.is_empty()),
                    format!("`{url}`: the registry is reached over HTTPS only (https://host:port)"),
                ));
            }
            let registry_key = match &r.registry_key {
                Some(k) => Some(k.get_ref().parse().map_err(
                    |e: crate::identity::IdentityError| {
                        invalid(
                            "discovery.registry.registry_key",
                            Some(k.span()),
                            e.to_string(),
                        )
                    },
                )?),
                None => None,
            };
            let public_endpoint = match r.public_endpoint {
                Some(e) => e,
                None if file.mesh.listen.ip().is_unspecified() => {
                    return Err(invalid(
                        "discovery.registry.public_endpoint",
                        Some(r.url.span()),
                        "required when mesh.listen is the wildcard address: the ip:port other \
                         nodes dial"
                            .to_string(),
                    ))
                }
                None => file.mesh.listen,
            };
            Some(RegistryDiscovery {
                url: url.trim_end_matches('/').to_string(),
                ca_file: r.ca_file.clone(),
                registry_key,
                advertise_models: r.advertise_models.clone(),
                public_endpoint,
                ttl: Duration::from_secs(r.ttl_secs.max(30)),
                fetch_interval: Duration::from_secs(r.fetch_interval_secs.max(1)),
            })
        } else {
            None
        };
        Ok(Config {
            sharing,
            node_id: file.node_id.map(Spanned::into_inner),
            data_dir: file
                .data_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            log_level: file.log_level.into_inner(),
            api_listen: file.api.listen,
            max_body_bytes: file.api.max_body_bytes.get(),
            path_prefix: file.api.path_prefix.into_inner(),
            threads: file.api.threads.map(NonZeroUsize::get),
            shutdown_grace_secs: file.api.shutdown_grace_secs,
            admin_token_file: file.api.admin_token_file,
            allowed_hosts: file
                .api
                .allowed_hosts
                .iter()
                .map(|h| h.trim().to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect(),
            connections: ConnectionLimits {
                header_timeout: Duration::from_secs(file.api.header_timeout_secs.max(1)),
                idle_timeout: Duration::from_secs(file.api.idle_timeout_secs.max(1)),
                handshake_timeout: Duration::from_secs(file.mesh.handshake_timeout_secs.max(1)),
                max_per_client: file.api.max_connections_per_client,
            },
            max_bodies_in_flight_bytes: file.api.max_bodies_in_flight_bytes.get(),
            mesh_listen: file.mesh.listen,
            hello_interval: Duration::from_secs(file.mesh.hello_interval_secs.max(1)),
            static_peers: file.discovery.static_peers,
            mdns: file.discovery.mdns.unwrap_or(DEFAULT_MDNS),
            mdns_interfaces: file.discovery.mdns_interfaces,
            wireguard_interface: file
                .discovery
                .wireguard
                .enabled
                .then(|| file.discovery.wireguard.interface.clone()),
            wireguard_mesh_port: file.discovery.wireguard.mesh_port,
            registry,
            upstream: UpstreamConfig {
                connect_timeout: Duration::from_millis(u.connect_timeout_ms.max(1)),
                first_byte_timeout: Duration::from_secs(u.first_byte_timeout_secs.max(1)),
                idle_chunk_timeout: Duration::from_secs(u.idle_chunk_timeout_secs.max(1)),
                pool_idle: Duration::from_secs(u.pool_idle_secs),
                models_refresh: Duration::from_secs(u.models_refresh_secs.max(1)),
            },
            backends,
        })
    }
}

/// A backend's weight locations, checked against its kind: `(key, span, message)` on error.
fn backend_weights(
    kind: BackendKind,
    name_span: &std::ops::Range<usize>,
    models_dir: Option<Spanned<PathBuf>>,
    gguf: std::collections::BTreeMap<String, crate::models::OneOrMany>,
    gguf_dir: Option<Spanned<PathBuf>>,
) -> Result<crate::models::Weights, (&'static str, std::ops::Range<usize>, String)> {
    if let Some(dir) = &models_dir {
        if kind != BackendKind::Ollama {
            return Err((
                "backends.models_dir",
                dir.span(),
                "only an ollama backend has a models dir; give an openai backend `gguf = { \"model\" = \"/path/file.gguf\" }`".into(),
            ));
        }
        if dir.get_ref().as_os_str().is_empty() {
            return Err((
                "backends.models_dir",
                dir.span(),
                "must not be empty".into(),
            ));
        }
    }
    if kind == BackendKind::Ollama && (!gguf.is_empty() || gguf_dir.is_some()) {
        return Err((
            "backends.gguf",
            gguf_dir.as_ref().map_or(name_span.clone(), Spanned::span),
            "`gguf` and `gguf_dir` are for openai backends (llama.cpp); an ollama backend has `models_dir`".into(),
        ));
    }
    let mut map = std::collections::BTreeMap::new();
    for (model, files) in gguf {
        let files = files.into_vec();
        if model.trim().is_empty()
            || files.is_empty()
            || files.iter().any(|f| f.as_os_str().is_empty())
        {
            return Err((
                "backends.gguf",
                name_span.clone(),
                format!("`{model}`: a model name and at least one non-empty file path"),
            ));
        }
        map.insert(model, files);
    }
    Ok(crate::models::Weights {
        models_dir: models_dir.map(Spanned::into_inner),
        gguf: map,
        gguf_dir: gguf_dir.map(Spanned::into_inner),
    })
}

/// Node ids appear in mDNS instance names, logs and file names: keep them boring.
pub fn valid_node_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A config file's text; a read error names the file.
pub(crate) fn read_config(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// `text` (read from `path`, which labels errors) deserialized as `T`. serde_path_to_error
/// names the key being read when an error strikes; toml gives the span (and so the line). A
/// syntax error has no key yet: the table above names it.
/// Checks a config's `log_level`: comma-separated `level` and `target=level` directives, as
/// `RUST_LOG` takes them, but no span or field filters (`target[span{field=value}]=level`).
/// Those compile each field value into a regular expression, and a line of them can take
/// minutes to compile (found by fuzzing), hanging `serve` and `--check` before a word is said.
pub(crate) fn check_log_level(level: &str) -> Result<(), String> {
    const MAX: usize = 1024;
    if level.len() > MAX {
        return Err(format!("{} bytes long, at most {MAX}", level.len()));
    }
    if level.contains(['[', ']', '{', '}']) {
        return Err(format!(
            "`{level}`: span and field filters (`[...]`, `{{...}}`) are not supported here; \
             use levels and targets, e.g. \"info\" or \"arknet=debug,pingora=warn\" \
             (RUST_LOG takes the full syntax)"
        ));
    }
    tracing_subscriber::EnvFilter::try_new(level)
        .map(drop)
        .map_err(|e| format!("`{level}` is not a log filter: {e}"))
}

pub(crate) fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &Path,
) -> Result<T, ConfigError> {
    let de = toml::Deserializer::parse(text).map_err(|e| parse_error(path, text, &e, None))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = dotted(e.path());
        parse_error(path, text, e.inner(), Some(key).filter(|k| !k.is_empty()))
    })
}

pub(crate) fn parse_error(
    path: &Path,
    text: &str,
    e: &toml::de::Error,
    key: Option<String>,
) -> ConfigError {
    let span = e.span();
    let line = span.as_ref().map_or(0, |s| line_of(text, s.start));
    let key = key
        .or_else(|| span.as_ref().map(|s| key_at(text, s.clone())))
        .unwrap_or_default();
    ConfigError::Invalid {
        path: path.to_path_buf(),
        line,
        key,
        message: e.message().trim().to_string(),
    }
}

/// A serde path as the dotted key a user edits: `backends[1].url` is `backends.url` in TOML.
pub(crate) fn dotted(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    path.iter()
        .filter_map(|segment| match segment {
            Segment::Map { key } | Segment::Enum { variant: key } => Some(key.as_str()),
            Segment::Seq { .. } | Segment::Unknown => None,
        })
        .collect::<Vec<_>>()
        .join(".")
}

pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The dotted key an error span points into: the table header above it plus the key on its line.
fn key_at(text: &str, span: std::ops::Range<usize>) -> String {
    let start = span.start.min(text.len());
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let line = &text[line_start..line_end];
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    let leaf = match line.split_once('=') {
        Some((k, _)) => k.trim().to_string(),
        None if line.trim_start().starts_with('[') => {
            return line
                .trim()
                .trim_matches(|c| c == '[' || c == ']')
                .to_string();
        }
        None => text[start..span.end.min(text.len())].trim().to_string(),
    };
    match table {
        Some(t) if !leaf.is_empty() => format!("{t}.{leaf}"),
        Some(t) => t,
        None => leaf,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    fn invalid(text: &str) -> (usize, String, String) {
        match parse(text) {
            Err(ConfigError::Invalid {
                line, key, message, ..
            }) => (line, key, message),
            other => panic!("expected an Invalid error, got {other:?}"),
        }
    }

    #[test]
    fn empty_file_gives_the_defaults() {
        let c = parse("").expect("empty config is valid");
        assert_eq!(c, Config::default());
        assert_eq!(c.api_listen.to_string(), DEFAULT_API_LISTEN);
        assert_eq!(c.data_dir, PathBuf::from("data"));
        assert_eq!(c.backends.len(), 1);
        assert_eq!(c.backends[0].kind, BackendKind::Ollama);
        assert_eq!(c.backends[0].url.addr.to_string(), "127.0.0.1:11434");
    }

    #[test]
    fn weights_keys_fit_the_backend_kind() {
        let c = parse(
            "[[backends]]\nname = \"o\"\nkind = \"ollama\"\nurl = \"http://127.0.0.1:1\"\nmodels_dir = \"/m\"\n\n[[backends]]\nname = \"l\"\nkind = \"openai\"\nurl = \"http://127.0.0.1:2\"\ngguf = { \"tiny\" = \"/g/t.gguf\", \"two\" = [\"/a\", \"/b\"] }\ngguf_dir = \"/g\"\n\n[models]\nmax_transfers = 2\npeer_rate_mb_per_sec = 10\n",
        )
        .expect("valid");
        assert_eq!(c.backends[0].weights.models_dir, Some(PathBuf::from("/m")));
        assert_eq!(c.backends[1].weights.gguf["two"].len(), 2);
        assert_eq!(c.sharing.max_transfers, 2);
        assert_eq!(c.sharing.peer_rate, Some(10_000_000));
        let (line, key, message) = invalid(
            "[[backends]]\nname = \"l\"\nkind = \"openai\"\nurl = \"http://127.0.0.1:2\"\nmodels_dir = \"/m\"\n",
        );
        assert_eq!((line, key.as_str()), (5, "backends.models_dir"));
        assert!(message.contains("gguf"), "{message}");
        let (_, key, _) = invalid(
            "[[backends]]\nname = \"o\"\nkind = \"ollama\"\nurl = \"http://127.0.0.1:2\"\ngguf_dir = \"/m\"\n",
        );
        assert_eq!(key, "backends.gguf");
        let (line, key, _) = invalid("[models]\n\nmax_transfers = 0\n");
        assert_eq!((line, key.as_str()), (3, "models.max_transfers"));
        let (_, key, _) = invalid("[models]\nbogus = 1\n");
        assert_eq!(key, "models.bogus");
    }

    #[test]
    fn unknown_key_names_line_and_dotted_key() {
        let (line, key, message) = invalid("[api]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n");
        assert_eq!(line, 3);
        assert_eq!(key, "api.lisen");
        assert!(message.contains("unknown field"), "{message}");
    }

    #[test]
    fn bad_value_names_the_key_of_its_line() {
        let (line, key, _) =
            invalid("[[backends]]\nname = \"a\"\nkind = \"ollama\"\nurl = \"ftp://x\"\n");
        assert_eq!((line, key.as_str()), (4, "backends.url"));
        let (line, key, message) =
            invalid("[[backends]]\nname = \"a\"\nkind = \"vllm\"\nurl = \"http://127.0.0.1:1\"\n");
        assert_eq!((line, key.as_str()), (3, "backends.kind"));
        assert!(message.contains("unknown variant"), "{message}");
    }

    #[test]
    fn log_levels_take_targets_but_not_span_and_field_filters() {
        for good in [
            "info",
            "warn,arknet=debug",
            "arknet::mesh=trace,pingora=warn",
        ] {
            let config = parse(&format!("log_level = \"{good}\"\n")).expect(good);
            assert_eq!(config.log_level, good);
        }
        // What the fuzzer found: a field filter whose value compiles for minutes. It is refused
        // before anything compiles it, at its line.
        let slow = "node_id = \"ark-a\"\nlog_level = \"l WW/[W {WW1.3l WWWWWWWW=hp............................E..5.5WWWWWWW}}}}}}}}}eac}}}}}}}0W=%g\"\n";
        let (line, key, message) = invalid(slow);
        assert_eq!((line, key.as_str()), (2, "log_level"));
        assert!(message.contains("span and field filters"), "{message}");
        let (_, key, message) = invalid(&format!("log_level = \"{}\"\n", "a,".repeat(600)));
        assert_eq!(key, "log_level");
        assert!(message.contains("at most 1024"), "{message}");
        let (_, _, message) = invalid("log_level = \"arknet=loud\"\n");
        assert!(message.contains("not a log filter"), "{message}");
    }

    #[test]
    fn zero_concurrency_and_duplicate_names_are_refused() {
        let (line, key, _) = invalid(
            "[[backends]]\nname = \"a\"\nkind = \"ollama\"\nurl = \"http://127.0.0.1:1\"\nmax_concurrent = 0\n",
        );
        assert_eq!((line, key.as_str()), (5, "backends.max_concurrent"));
        let two = "[[backends]]\nname = \"a\"\nkind = \"ollama\"\nurl = \"http://127.0.0.1:1\"\n";
        let (line, key, _) = invalid(&format!("{two}{two}"));
        assert_eq!((line, key.as_str()), (6, "backends.name"));
    }

    #[test]
    fn semantic_errors_point_at_their_key() {
        let (line, key, _) = invalid("log_level = \"info\"\nnode_id = \"has space\"\n");
        assert_eq!((line, key.as_str()), (2, "node_id"));
        let (line, key, _) = invalid("[api]\npath_prefix = \"arknet/\"\n");
        assert_eq!((line, key.as_str()), (2, "api.path_prefix"));
    }

    #[test]
    fn a_semantic_error_in_the_second_table_points_at_that_table() {
        let ok = "[[backends]]\nname = \"a\"\nkind = \"ollama\"\nurl = \"http://127.0.0.1:1\"\nreserved_local_slots = 1\n";
        let bad = "[[backends]]\nname = \"b\"\nkind = \"ollama\"\nurl = \"http://127.0.0.1:2\"\nmax_concurrent = 2\nreserved_local_slots = 5\n";
        let (line, key, message) = invalid(&format!("{ok}{bad}"));
        assert_eq!((line, key.as_str()), (11, "backends.reserved_local_slots"));
        assert!(message.contains("more than max_concurrent"), "{message}");
    }

    #[test]
    fn backend_urls_accept_ip_and_localhost_with_optional_path() {
        let u = BackendUrl::try_from("http://localhost:8080/v2/".to_string()).expect("valid");
        assert_eq!(u.addr.to_string(), "127.0.0.1:8080");
        assert_eq!(u.authority, "localhost:8080");
        assert_eq!(u.base_path, "/v2");
        let u = BackendUrl::try_from("http://[::1]".to_string()).expect("valid");
        assert_eq!(u.addr.to_string(), "[::1]:80");
        assert!(BackendUrl::try_from("https://127.0.0.1".to_string()).is_err());
        assert!(BackendUrl::try_from("http://ollama.lan:1".to_string()).is_err());
    }

    #[test]
    fn api_key_is_redacted_in_debug_output() {
        let c = parse("[[backends]]\nname = \"a\"\nkind = \"openai\"\nurl = \"http://127.0.0.1:1\"\napi_key = \"sk-secret\"\n")
            .expect("valid");
        assert!(!format!("{c:?}").contains("sk-secret"));
        assert_eq!(
            c.backends[0].api_key.as_ref().map(|k| k.0.as_str()),
            Some("sk-secret")
        );
    }

    #[test]
    fn registry_discovery_is_off_by_default_and_validated_when_on() {
        assert_eq!(parse("").expect("defaults").registry, None);
        let on = parse(
            "[mesh]\nlisten = \"192.0.2.1:8911\"\n[discovery.registry]\nenabled = true\n\
             url = \"https://registry.example:8443/\"\nadvertise_models = [\"qwen3:8b\"]\n",
        )
        .expect("valid");
        let r = on.registry.expect("enabled");
        assert_eq!(r.url, "https://registry.example:8443");
        assert_eq!(r.public_endpoint.to_string(), "192.0.2.1:8911");
        assert_eq!(r.advertise_models, ["qwen3:8b"]);
        assert_eq!(r.ttl, Duration::from_secs(600));
        let (line, key, _) =
            invalid("[discovery.registry]\nenabled = true\nurl = \"http://plain:80\"\n");
        assert_eq!((line, key.as_str()), (3, "discovery.registry.url"));
        let (_, key, msg) =
            invalid("[discovery.registry]\nenabled = true\nurl = \"https://r:1\"\n");
        assert_eq!(key, "discovery.registry.public_endpoint", "{msg}");
        let (line, key, _) = invalid(
            "[discovery.registry]\nenabled = true\nurl = \"https://r:1\"\n\
             public_endpoint = \"192.0.2.1:1\"\nregistry_key = \"nope\"\n",
        );
        assert_eq!((line, key.as_str()), (5, "discovery.registry.registry_key"));
        let (line, key, _) = invalid("[discovery.registry]\nenabeld = true\n");
        assert_eq!((line, key.as_str()), (2, "discovery.registry.enabeld"));
    }
}
