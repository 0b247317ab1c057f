//! ArkNet: a cooperative grid of home inference servers, one `arknet` binary per node.
//!
//! The modules follow the data flow:
//! [`config`] and [`identity`] set a node up; [`peers`] holds who is known and approved (fed by
//! the admin API in [`admin`], the approvals file, and [`mesh::client`] hellos); [`catalog`]
//! learns what the backends serve. A local client request enters [`gateway`], a peer's enters
//! [`mesh`] (mutual TLS, [`mesh::authz`]); both are served by [`relay`], which asks [`routing`]
//! where to go and talks through [`upstream`]. [`session`] and [`error`] shape what clients
//! see; [`metrics`] counts it all. [`models`] shares model weights with peers allowed to pull
//! them (mesh side) and pulls them from peers (`POST /api/pull`). [`Node`] wires these together and hands them to Pingora; it
//! holds no logic of its own.

#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod catalog;
pub mod config;
pub mod dialect;
pub mod discovery;
pub mod doctor;
pub mod error;
pub mod fsutil;
pub mod gateway;
pub mod grid;
pub mod health;
pub mod identity;
pub mod mesh;
pub mod metrics;
pub mod models;
pub mod peers;
pub mod registry;
pub mod relay;
pub mod routing;
pub mod session;
pub mod shutdown;
#[cfg(test)]
mod testkit;
pub mod timefmt;
pub mod upstream;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;

use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::services::background::background_service;

use crate::admin::trust::HostPolicy;
use crate::admin::{Admin, AdminState};
use crate::audit::AuditLog;
use crate::catalog::{Catalog, CatalogRefresh};
use crate::config::Config;
use crate::gateway::Gateway;
use crate::grid::Grid;
use crate::identity::NodeInfo;
use crate::identity::{Identity, IdentityError};
use crate::mesh::client::{MeshClient, MeshPoller};
use crate::mesh::tls::{MeshTls, TlsError};
use crate::mesh::Mesh;
use crate::metrics::Metrics;
use crate::peers::PeerTable;
use crate::relay::LocalRelay;
use crate::session::{App, BodyBudget, BodyLimits};
use crate::upstream::{Backend, Upstream};

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data dir could not be created.
    #[error("data dir {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The identity could not be loaded or created.
    #[error("identity: {0}")]
    Identity(#[from] IdentityError),
    /// The registry client could not be set up (URL, CA file, identity key).
    #[error("discovery.registry: {0}")]
    Registry(String),
    /// The mesh TLS material could not be loaded.
    #[error("{0}")]
    Tls(#[from] TlsError),
    /// The admin token could not be read or created.
    #[error("admin token {path}: {source}")]
    AdminToken {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The audit log could not be opened.
    #[error("audit log in {path}: {source}")]
    Audit {
        /// The data dir.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another node runs on this data dir, or the lock file cannot be used.
    #[error("{0}")]
    Lock(#[from] crate::fsutil::LockError),
    /// A listener address is taken or not ours.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A configured node with its identity, ready to run.
pub struct Node {
    config: Config,
    identity: Identity,
    node_id: String,
    config_file: Option<PathBuf>,
}

impl Node {
    /// Creates the data dir and identity (first start) or loads them.
    pub fn prepare(config: Config) -> Result<Self, StartError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let identity = Identity::load_or_create(&config.data_dir)?;
        let node_id = config
            .node_id
            .clone()
            .unwrap_or_else(|| identity.default_node_id());
        Ok(Node {
            config,
            identity,
            node_id,
            config_file: None,
        })
    }

    /// Names the config file the node was configured from, for the start-up summary.
    pub fn with_config_file(mut self, path: Option<PathBuf>) -> Self {
        self.config_file = path;
        self
    }

    /// The node id (configured, or derived from hostname and key).
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The node's identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Starts every listener and background task and serves until SIGTERM/SIGINT.
    pub fn run(self) -> Result<(), StartError> {
        // One node per data dir: two would both write the approvals, the audit log and the TLS
        // leaf. Held (never dropped: `run_forever` does not return) until the process ends.
        let _data_dir_lock = crate::fsutil::DataDirLock::acquire(&self.config.data_dir)?;
        // Pingora reports a taken port deep inside its startup; checking here gives the user a
        // one-line error instead.
        for addr in [self.config.api_listen, self.config.mesh_listen] {
            TcpListener::bind(addr).map_err(|source| StartError::Bind { addr, source })?;
        }
        let config = &self.config;
        let token_path = config.admin_token_path();
        let token =
            admin::load_or_create_token(&token_path).map_err(|source| StartError::AdminToken {
                path: token_path.clone(),
                source,
            })?;
        let leaf = self.identity.issue_tls_leaf()?;
        let tls = Arc::new(MeshTls::new(&leaf, config.mesh_listen.ip())?);
        let metrics = Arc::new(Metrics::new());
        let upstream = Arc::new(Upstream::new(&config.upstream));
        let backends: Arc<Vec<Backend>> = Arc::new(
            config
                .backends
                .iter()
                .map(|b| Backend::new(b.clone(), &config.upstream))
                .collect(),
        );
        let catalog = Arc::new(Catalog::new(
            backends.clone(),
            Arc::new(Upstream::new(&config.upstream)),
            metrics.clone(),
            config.upstream.models_refresh,
        ));
        // One connection pool per runtime: Pingora runs each service on its own runtime, and a
        // pooled connection registered with one runtime's reactor wakes that runtime for every
        // response even when another runtime's task uses it.
        let mesh_upstream = Arc::new(Upstream::new(&config.upstream));
        let control_upstream = Arc::new(Upstream::new(&config.upstream));
        let relay = Arc::new(LocalRelay::new(
            backends.clone(),
            upstream.clone(),
            catalog.clone(),
            metrics.clone(),
        ));
        let probe = crate::health::BackendProbe {
            backends: backends.clone(),
            upstream: Arc::new(Upstream::new(&config.upstream)),
        };
        let mesh_relay = Arc::new(LocalRelay::new(
            backends,
            mesh_upstream,
            catalog.clone(),
            metrics.clone(),
        ));
        let peers = Arc::new(PeerTable::open(&config.data_dir));
        let audit = Arc::new(
            AuditLog::open(&config.data_dir, audit::DEFAULT_MAX_BYTES).map_err(|source| {
                StartError::Audit {
                    path: config.data_dir.clone(),
                    source,
                }
            })?,
        );
        // Buffered lines are written out before the process ends (see shutdown.rs).
        let audit_at_exit = audit.clone();
        let audit_at_end = audit.clone();
        let node = NodeInfo {
            node_id: self.node_id.clone(),
            public_key: self.identity.public_key(),
        };
        let budget = BodyBudget::new(config.max_bodies_in_flight_bytes);
        let bodies = BodyLimits {
            max_bytes: config.max_body_bytes,
            budget: budget.clone(),
        };
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").ok();
        let hosts = HostPolicy::new(&config.allowed_hosts, hostname.as_deref());
        let admin = Admin::new(Arc::new(AdminState {
            peers: peers.clone(),
            node: node.clone(),
            token,
            hosts,
            bodies: BodyLimits {
                max_bytes: admin::MAX_ADMIN_BODY,
                budget,
            },
            audit: audit.clone(),
        }));
        let client = Arc::new(MeshClient::new(
            tls.clone(),
            control_upstream,
            metrics.clone(),
            &self.node_id,
            config.mesh_listen.port(),
        ));
        let grid = Arc::new(Grid::new(
            relay.clone(),
            client.clone(),
            peers.clone(),
            upstream,
            audit.clone(),
            metrics.clone(),
        ));
        let transfer_metrics = crate::models::serve::TransferMetrics::register(&metrics);
        let puller = Arc::new(crate::models::pull::Puller::new(
            client.clone(),
            peers.clone(),
            Arc::new(Upstream::new(&config.upstream)),
            crate::models::install::Installer::new(config.backends.clone()),
            &config.data_dir,
            config.sharing.clone(),
            audit.clone(),
            transfer_metrics.clone(),
        ));
        let pull_api = crate::models::api::PullApi::new(
            puller,
            &config.backends,
            bodies.clone(),
            admin.hosts().clone(),
        );
        let gateway = Gateway::new(
            node.clone(),
            config,
            relay.clone(),
            grid,
            admin,
            metrics.clone(),
            bodies.clone(),
        )
        .with_models(Arc::new(pull_api));
        let weights = Arc::new(crate::models::store::WeightsStore::new(
            config.backends.iter().map(|b| b.weights.clone()).collect(),
        ));
        let model_server = Arc::new(crate::models::serve::ModelServer::new(
            weights,
            config.sharing.clone(),
            peers.clone(),
            audit.clone(),
            &metrics,
            transfer_metrics.clone(),
        ));
        let mesh = Mesh::new(
            node,
            leaf.identity_pem.clone(),
            peers.clone(),
            mesh_relay,
            audit,
            metrics.clone(),
            bodies,
        )
        .with_models(model_server);
        // Without mDNS there is no goodbye to wait for at shutdown.
        let background_done = Arc::new(std::sync::atomic::AtomicBool::new(!config.mdns));
        let mdns = config.mdns.then(|| crate::discovery::mdns::MdnsDiscovery {
            stopped: background_done.clone(),
            node_id: self.node_id.clone(),
            public_key: self.identity.public_key(),
            mesh_listen: config.mesh_listen,
            interfaces: config.mdns_interfaces.clone(),
            client: client.clone(),
            peers: peers.clone(),
        });
        let wireguard = config.wireguard_interface.clone().map(|iface| {
            crate::discovery::wireguard::WireguardDiscovery {
                interfaces: vec![iface],
                mesh_port: config
                    .wireguard_mesh_port
                    .unwrap_or(config.mesh_listen.port()),
                interval: config.hello_interval,
                client: client.clone(),
                peers: peers.clone(),
            }
        });
        // Without a registry there is no record to withdraw at shutdown.
        let registry_done = Arc::new(std::sync::atomic::AtomicBool::new(
            config.registry.is_none(),
        ));
        let registry = match &config.registry {
            Some(r) => {
                let registry_client = crate::registry::client::RegistryClient::new(
                    &r.url,
                    r.ca_file.as_deref(),
                    r.registry_key,
                )
                .map_err(StartError::Registry)?;
                let signer =
                    crate::registry::record::Signer::from_pkcs8_pem(self.identity.key_pem())
                        .map_err(StartError::Registry)?;
                Some(crate::discovery::registry::RegistryDiscovery {
                    publisher: crate::discovery::registry::Publisher::new(
                        self.node_id.clone(),
                        signer,
                        r.public_endpoint.to_string(),
                        r.advertise_models.clone(),
                        r.ttl.as_secs(),
                        registry_client,
                    ),
                    fetch_interval: r.fetch_interval,
                    client: client.clone(),
                    peers: peers.clone(),
                    stopped: registry_done.clone(),
                })
            }
            None => None,
        };
        let poller = MeshPoller {
            client,
            peers,
            metrics,
            static_peers: config.static_peers.clone(),
            hello_interval: config.hello_interval,
        };

        let mut server = Server::new_with_opt_and_conf(None, self.server_conf());
        server.bootstrap();
        let in_flight = Arc::new(crate::shutdown::InFlight::default());
        crate::shutdown::exit_when_drained(
            server.watch_execution_phase(),
            in_flight.clone(),
            vec![background_done, registry_done],
            std::time::Duration::from_secs(config.shutdown_grace_secs),
            move || audit_at_exit.flush(),
        );
        let limits = config.connections.clone();
        let api_app = App::new(gateway, limits.clone()).counting(in_flight.clone());
        let api = api_app.into_service("arknet api", config.api_listen);
        let mesh_app = App::with_tls(mesh, limits, tls.server_acceptor()?).counting(in_flight);
        let mesh_service = mesh_app.into_service("arknet mesh", config.mesh_listen);
        server.add_service(api);
        server.add_service(mesh_service);
        server.add_service(background_service("model catalog", CatalogRefresh(catalog)));
        server.add_service(background_service("mesh poller", poller));
        server.add_service(background_service("backend probe", probe));
        if let Some(mdns) = mdns {
            server.add_service(background_service("mdns discovery", mdns));
        }
        if let Some(wireguard) = wireguard {
            server.add_service(background_service("wireguard discovery", wireguard));
        }
        if let Some(registry) = registry {
            server.add_service(background_service("registry discovery", registry));
        }
        self.log_summary();
        server.run(pingora::server::RunArgs::default());
        // Pingora returns once its runtimes are gone (after a quick shutdown at once): what
        // the audit writer had not written out yet goes to disk before the process ends.
        audit_at_end.flush();
        std::process::exit(0)
    }

    /// The start-up summary: what an operator needs to know that the node runs as intended.
    /// The backends' models follow from the catalog once they answer.
    fn log_summary(&self) {
        let config = &self.config;
        let config_file = self.config_file.as_ref().map_or_else(
            || "none (built-in defaults)".to_string(),
            |p| p.display().to_string(),
        );
        let mdns = if config.mdns {
            let names = crate::discovery::mdns::effective_interfaces(&config.mdns_interfaces);
            format!("on ({})", names.join(", "))
        } else {
            // Said out loud: a node run outside the checkout has no conf/arknet.toml turning
            // it on, and silence here once looked like discovery was broken.
            "off (--mdns or discovery.mdns = true turns it on)".to_string()
        };
        let backends: Vec<String> = config
            .backends
            .iter()
            .map(|b| format!("{} ({} at {})", b.name, b.kind, b.url))
            .collect();
        let statics: Vec<String> = config.static_peers.iter().map(|a| a.to_string()).collect();
        tracing::info!(
            node_id = %self.node_id,
            public_key = %self.identity.public_key(),
            config = %config_file,
            data_dir = %config.data_dir.display(),
            api = %config.api_listen,
            mesh = %config.mesh_listen,
            mdns = %mdns,
            wireguard = %config.wireguard_interface.as_deref().unwrap_or("off"),
            static_peers = %statics.join(", "),
            backends = %backends.join(", "),
            "arknet node starting"
        );
    }

    fn server_conf(&self) -> ServerConf {
        let data = &self.config.data_dir;
        let threads = self
            .config
            .threads
            .or_else(|| std::thread::available_parallelism().ok().map(Into::into))
            .unwrap_or(1);
        ServerConf {
            threads,
            // Pingora's defaults live in /tmp and would collide between nodes on one host.
            pid_file: data.join("arknet.pid").to_string_lossy().into_owned(),
            upgrade_sock: data
                .join("arknet-upgrade.sock")
                .to_string_lossy()
                .into_owned(),
            // On SIGTERM the listeners stop accepting at once; in-flight requests get the grace
            // period and the goodbyes (mDNS, registry withdrawal) at least `GOODBYE_BUDGET`;
            // then the runtimes are dropped.
            grace_period_seconds: Some(
                crate::shutdown::pingora_grace(
                    std::time::Duration::from_secs(self.config.shutdown_grace_secs),
                    self.config.mdns || self.config.registry.is_some(),
                )
                .as_secs(),
            ),
            graceful_shutdown_timeout_seconds: Some(1),
            ..ServerConf::default()
        }
    }
}
