//! The public registry (discovery layer 3, DESIGN §1.1): `arknet registry serve`.
//!
//! Nodes publish a signed [`record::Record`] (node id, key, mesh endpoint, advertised models)
//! and learn about nodes beyond their LAN. A listing grants nothing: a node found here is
//! pending on every other node until its owner approves it. [`record`] holds the wire format
//! and the pure checks of a write.

pub mod client;
pub mod config;
pub mod record;
pub mod server;
pub mod store;

use std::path::PathBuf;
use std::sync::Arc;

use pingora::listeners::TlsAccept;
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::tls::ssl::{SslAcceptor, SslFiletype, SslMethod};

use crate::identity::Identity;
use crate::mesh::client::MeshClient;
use crate::mesh::tls::MeshTls;
use crate::session::{App, TlsAcceptor};
use config::RegistryConfig;

/// Why the registry could not start.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The data dir could not be created.
    #[error("data dir {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The registry's identity could not be loaded or created.
    #[error("identity: {0}")]
    Identity(#[from] crate::identity::IdentityError),
    /// The certificate or key could not be used.
    #[error("TLS: {0}")]
    Tls(String),
    /// The database could not be opened.
    #[error("{0}")]
    Store(#[from] store::StoreError),
    /// Anything else at start.
    #[error("{0}")]
    Start(String),
}

/// No callbacks: registry clients are anonymous; writes are authenticated by signatures.
struct Anonymous;

#[async_trait::async_trait]
impl TlsAccept for Anonymous {}

fn tls_acceptor(config: &RegistryConfig) -> Result<TlsAcceptor, RegistryError> {
    let err = |what: &str, path: &std::path::Path, e: pingora::tls::error::ErrorStack| {
        RegistryError::Tls(format!("{what} {}: {e}", path.display()))
    };
    let mut builder = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls())
        .map_err(|e| RegistryError::Tls(e.to_string()))?;
    builder
        .set_certificate_chain_file(&config.tls_cert)
        .map_err(|e| err("certificate", &config.tls_cert, e))?;
    builder
        .set_private_key_file(&config.tls_key, SslFiletype::PEM)
        .map_err(|e| err("key", &config.tls_key, e))?;
    builder
        .check_private_key()
        .map_err(|e| err("key does not match the certificate", &config.tls_key, e))?;
    Ok(TlsAcceptor {
        acceptor: builder.build(),
        callbacks: Box::new(Anonymous),
    })
}

/// The registry's identity (its answer-signing key) from `<data_dir>/identity/`.
pub fn identity(config: &RegistryConfig) -> Result<Identity, RegistryError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| RegistryError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    Ok(Identity::load_or_create(&config.data_dir)?)
}

/// Opens the database once (creating its tables), so a bad URL or an unwritable file fails
/// at start with a clear message rather than at the first request.
pub fn check_database(config: &RegistryConfig) -> Result<(), RegistryError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| RegistryError::Start(e.to_string()))?;
    rt.block_on(async {
        let store = store::Store::open(&config.database).await?;
        store.close().await;
        Ok(())
    })
}

/// Runs `arknet registry serve` until SIGTERM/SIGINT.
pub fn serve(config: RegistryConfig) -> Result<(), RegistryError> {
    let identity = identity(&config)?;
    check_database(&config)?;
    std::net::TcpListener::bind(config.listen)
        .map_err(|e| RegistryError::Start(format!("listen {}: {e}", config.listen)))?;
    let tls = tls_acceptor(&config)?;
    let checker = if config.reachability_check {
        let leaf = identity.issue_tls_leaf()?;
        let mesh_tls = MeshTls::new(&leaf, std::net::IpAddr::from([0, 0, 0, 0]))
            .map_err(|e| RegistryError::Tls(e.to_string()))?;
        let upstream = crate::config::Config::default().upstream;
        Some(Arc::new(MeshClient::new(
            Arc::new(mesh_tls),
            Arc::new(crate::upstream::Upstream::new(&upstream)),
            Arc::new(crate::metrics::Metrics::new()),
            "arknet-registry",
            0,
        )))
    } else {
        None
    };
    tracing::info!(
        listen = %config.listen,
        public_key = %identity.public_key(),
        database = %redact(&config.database),
        reachability_check = config.reachability_check,
        allow_private = config.policy.allow_private,
        "registry starting"
    );
    let data = &config.data_dir;
    let threads = config
        .threads
        .or_else(|| std::thread::available_parallelism().ok().map(Into::into))
        .unwrap_or(1);
    let conf = ServerConf {
        threads,
        pid_file: data.join("registry.pid").to_string_lossy().into_owned(),
        upgrade_sock: data
            .join("registry-upgrade.sock")
            .to_string_lossy()
            .into_owned(),
        grace_period_seconds: Some(1),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let limits = config.connections.clone();
    let listen = config.listen;
    let handler = server::RegistryHandler::new(server::Parts {
        config,
        key_pem: identity.key_pem().to_string(),
        checker,
    });
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let service = App::with_tls(handler, limits, tls).into_service("arknet registry", listen);
    server.add_service(service);
    server.run_forever()
}

/// A database URL without its password, for logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}
