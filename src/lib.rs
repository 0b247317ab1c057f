//! ArkNet: a cooperative grid of home inference servers, one `arknet` binary per node.
//!
//! The modules follow the data flow of a request:
//! [`config`] and [`identity`] set a node up; [`catalog`] learns what the backends serve;
//! [`gateway`] takes a client request, asks [`routing`] where it goes, and relays it through
//! [`upstream`]; [`error`] shapes what clients see when it cannot; [`metrics`] counts it all.
//! [`Node`] wires these together and hands them to Pingora; it holds no logic of its own.

#![forbid(unsafe_code)]

pub mod catalog;
pub mod config;
pub mod error;
pub mod gateway;
pub mod identity;
pub mod metrics;
pub mod routing;
pub mod upstream;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;

use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::services::background::background_service;
use pingora::services::listening::Service;

use crate::catalog::{Catalog, CatalogRefresh};
use crate::config::Config;
use crate::gateway::{Gateway, NodeInfo};
use crate::identity::{Identity, IdentityError};
use crate::metrics::Metrics;
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
        })
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
        // Pingora reports a taken port deep inside its startup; checking here gives the user a
        // one-line error instead.
        TcpListener::bind(self.config.api_listen).map_err(|source| StartError::Bind {
            addr: self.config.api_listen,
            source,
        })?;
        let config = &self.config;
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
            upstream.clone(),
            metrics.clone(),
            config.upstream.models_refresh,
        ));
        let node = NodeInfo {
            node_id: self.node_id.clone(),
            public_key: self.identity.public_key(),
        };
        let gateway = Gateway::new(node, config, backends, upstream, catalog.clone(), metrics);

        let mut server = Server::new_with_opt_and_conf(None, self.server_conf());
        server.bootstrap();
        let mut api = Service::new("arknet api".to_string(), gateway);
        api.add_tcp(&config.api_listen.to_string());
        server.add_service(api);
        server.add_service(background_service("model catalog", CatalogRefresh(catalog)));
        tracing::info!(
            node_id = %self.node_id,
            public_key = %self.identity.public_key(),
            api = %config.api_listen,
            data_dir = %config.data_dir.display(),
            "arknet node starting"
        );
        server.run_forever()
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
            grace_period_seconds: Some(0),
            graceful_shutdown_timeout_seconds: Some(self.config.shutdown_grace_secs),
            ..ServerConf::default()
        }
    }
}
