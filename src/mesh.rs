//! The mesh listener: approved peers only, mutual TLS, served by this node's own backends.
//!
//! Phases of one peer request, each refusing before any backend is touched:
//!
//! ```text
//! TLS identity (tls.rs) -> approved key? (authz::admit, 403; unknown keys become pending)
//!   GET  /mesh/v1/hello            -> who we are, models shared with you, your free slots
//!   GET  /v1/models, /api/tags     -> only the models shared with you
//!   GET  /mesh/v1/models/*         -> may pull this model? (403) -> models::serve
//!   POST model routes -> may infer? (403) -> body (413/400) -> model shared? (403)
//!                     -> peer slot (429) -> local relay, ended at once if the peer is revoked
//! ```
//!
//! Requests from peers are served by local backends only: this listener never forwards to a
//! third node (no open relay), and no header of the peer's reaches the backend.

pub mod authz;
pub mod client;
pub mod protocol;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use pingora::protocols::http::ServerSession;

use crate::audit::{AuditLog, Direction};
use crate::dialect::meter::TokenMeter;
use crate::dialect::request::{classify, dialect_of, Endpoint};
use crate::error::{ApiError, Dialect};
use crate::grid::record_peer_request;
use crate::identity::NodeInfo;
use crate::metrics::Metrics;
use crate::peers::store::ApprovedPeer;
use crate::peers::PeerTable;
use crate::relay::{LocalRelay, ModelRequest};
use crate::session::{read_model_request, reply_error, reply_json, BodyLimits, Handler, Outcome};
use authz::Denied;
use tls::PeerIdentity;

use protocol::{
    ErrorBody, HelloAnswer, SharedModel, Stranger, WrongVersion, YourGrant, MAX_HELLO_MODELS,
};
pub use protocol::{
    HELLO_PATH, MESH_PORT_HEADER, NODE_ID_HEADER, PROTOCOL_HEADER, PROTOCOL_VERSION,
};

/// The mesh listener's request handler.
pub struct Mesh {
    node: NodeInfo,
    identity_pem: String,
    peers: Arc<PeerTable>,
    relay: Arc<LocalRelay>,
    audit: Arc<AuditLog>,
    metrics: Arc<Metrics>,
    bodies: BodyLimits,
    models: Option<Arc<crate::models::serve::ModelServer>>,
}

#[async_trait]
impl Handler for Mesh {
    async fn handle(&self, s: &mut ServerSession) -> bool {
        let started = Instant::now();
        let path = s.req_header().uri.path().to_string();
        let dialect = dialect_of(&path);
        let key = s
            .digest()
            .and_then(|d| d.ssl_digest.as_ref())
            .and_then(|d| d.extension.get::<PeerIdentity>())
            .map(|p| p.0);
        let announced = s
            .req_header()
            .headers
            .get(PROTOCOL_HEADER)
            .map(|v| v.to_str().unwrap_or("?"));
        if !protocol::announced_version(announced).is_some_and(protocol::speaks) {
            let refusal = WrongVersion {
                error: ErrorBody {
                    message: format!(
                        "this node speaks mesh protocol {PROTOCOL_VERSION}, not {}",
                        announced.unwrap_or("1")
                    ),
                    kind: "invalid_request_error".into(),
                    code: "protocol_version".into(),
                },
                supported: vec![PROTOCOL_VERSION],
            };
            return reply_typed(s, 400, &refusal).await.reusable;
        }
        let approvals = self.peers.approvals();
        let peer = match authz::admit(&approvals, key.as_ref()) {
            Ok(peer) => peer,
            Err(denied) => {
                if let Some(key) = key {
                    self.record_stranger(s, key);
                }
                let outcome = self.deny(s, dialect, &denied).await;
                // Refusals are peer requests too (DESIGN §4); hellos are not requests for
                // work, and would flood the log from every stranger that dials us.
                if path != HELLO_PATH {
                    self.audit_refused(key, &denied, started, &outcome);
                }
                return outcome.reusable;
            }
        };
        if let Some(models) = self
            .models
            .as_ref()
            .filter(|_| path.starts_with(crate::models::MESH_PREFIX))
        {
            return models.serve(s, peer, &path).await.reusable;
        }
        if path == HELLO_PATH {
            let hello = self.hello(peer).await;
            return reply_typed(s, 200, &hello).await.reusable;
        }
        let started_at = std::time::SystemTime::now();
        let mut meter = TokenMeter::default();
        let outcome = match classify(&s.req_header().method, &path) {
            Ok(Endpoint::ListModels(d)) => {
                let listing = self
                    .relay
                    .catalog()
                    .snapshot()
                    .listing_where(d, |m| authz::shares(peer, m));
                reply_json(s, 200, &listing).await
            }
            Ok(Endpoint::Model(d)) => self.infer(s, peer, d, &path, started, &mut meter).await,
            Ok(_) => reply_error(s, dialect, &ApiError::no_route(&path)).await,
            Err(e) => reply_error(s, dialect, &e).await,
        };
        let model = outcome.model.clone().unwrap_or_default();
        let error = (outcome.status >= 400).then(|| format!("answered {}", outcome.status));
        record_peer_request(
            &self.audit,
            &self.metrics,
            Direction::Inbound,
            &peer.node_id,
            &model,
            &outcome,
            meter.finish(),
            started,
            started_at,
            error,
        );
        outcome.reusable
    }
}

impl Mesh {
    /// Assembles the handler.
    pub fn new(
        node: NodeInfo,
        identity_pem: String,
        peers: Arc<PeerTable>,
        relay: Arc<LocalRelay>,
        audit: Arc<AuditLog>,
        metrics: Arc<Metrics>,
        bodies: BodyLimits,
    ) -> Self {
        Mesh {
            node,
            identity_pem,
            peers,
            relay,
            audit,
            metrics,
            bodies,
            models: None,
        }
    }

    /// Serves shared models' weights to peers allowed to pull them (`/mesh/v1/models/*`).
    pub fn with_models(mut self, models: Arc<crate::models::serve::ModelServer>) -> Self {
        self.models = Some(models);
        self
    }

    /// An approved peer's model request.
    async fn infer(
        &self,
        s: &mut ServerSession,
        peer: &ApprovedPeer,
        dialect: Dialect,
        path: &str,
        started: Instant,
        meter: &mut TokenMeter,
    ) -> Outcome {
        if let Err(denied) = authz::may_infer(peer) {
            return self.deny(s, dialect, &denied).await;
        }
        let Some(runtime) = self.peers.runtime(&peer.public_key) else {
            return self.deny(s, dialect, &Denied::Unknown).await;
        };
        let (body, model) = match read_model_request(s, &self.bodies, dialect).await {
            Ok(read) => read,
            Err(outcome) => return outcome,
        };
        let crate::session::Body {
            bytes: body,
            lease: _lease,
        } = body;
        *meter = TokenMeter::for_request(&body);
        let permit = match authz::authorize(peer, &model) {
            Ok(permit) => permit,
            Err(denied) => {
                let mut out = self.deny(s, dialect, &denied).await;
                out.model = Some(model);
                return out;
            }
        };
        let Some(_slot) = runtime.try_slot() else {
            self.metrics
                .mesh_refused
                .with_label_values(&["peer_limit"])
                .inc();
            let mut out = reply_error(s, dialect, &ApiError::peer_limit(runtime.grant())).await;
            out.model = Some(permit.model);
            return out;
        };
        let req = ModelRequest {
            dialect,
            path,
            model: &permit.model,
            body,
            started,
            forward_client_headers: false,
            stop: Some(runtime.stop_signal()),
            from_peer: true,
        };
        let mut outcome = self.relay.serve(s, req, Some(meter)).await;
        outcome.model = Some(permit.model);
        outcome
    }

    async fn deny(&self, s: &mut ServerSession, dialect: Dialect, denied: &Denied) -> Outcome {
        self.metrics
            .mesh_refused
            .with_label_values(&[denied.code()])
            .inc();
        let mut e = ApiError::forbidden(denied.code(), denied.to_string());
        if matches!(denied, Denied::Unknown | Denied::NoCertificate) {
            // Strangers learn who we are (public anyway: it is in every TLS handshake and mDNS
            // record), so that their owner can approve us in return.
            e.message = format!(
                "{} (node {} key {})",
                e.message, self.node.node_id, self.node.public_key
            );
            let body = Stranger {
                error: ErrorBody {
                    message: e.message,
                    kind: "permission_error".into(),
                    code: e.code.into(),
                },
                node_id: self.node.node_id.clone(),
                public_key: self.node.public_key.to_string(),
                identity_cert: self.identity_pem.clone(),
            };
            return reply_typed(s, 403, &body).await;
        }
        reply_error(s, dialect, &e).await
    }

    /// Audit line for a request refused before we knew who sent it: the peer is named by its
    /// key (it has no approved node id), the model is not read.
    fn audit_refused(
        &self,
        key: Option<crate::identity::PublicKey>,
        denied: &Denied,
        started: Instant,
        outcome: &Outcome,
    ) {
        self.audit.write(crate::audit::AuditRecord::without_tokens(
            std::time::SystemTime::now() - started.elapsed(),
            started,
            Direction::Inbound,
            key.map_or_else(|| "no certificate".to_string(), |k| k.to_string()),
            String::new(),
            outcome.status,
            Some(denied.code().to_string()),
        ));
    }

    /// An unapproved key connected: list it as pending so its owner's request can be approved.
    fn record_stranger(&self, s: &ServerSession, key: crate::identity::PublicKey) {
        let header = |name: &str| {
            s.req_header()
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let node_id = header(NODE_ID_HEADER).filter(|id| crate::config::valid_node_id(id));
        let Some(client_ip) = s.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip()) else {
            return;
        };
        let endpoint = header(MESH_PORT_HEADER)
            .and_then(|p| p.parse::<u16>().ok())
            .map(|port| SocketAddr::new(client_ip, port).to_string());
        if !self.peers.stranger(key, client_ip, node_id, endpoint) {
            self.metrics.mesh_strangers_unlisted.inc();
            tracing::debug!(public_key = %key, from = %client_ip, "stranger not listed: too many pending from that address or in all");
        }
    }

    /// Hello for one approved peer: only what is shared with it.
    async fn hello(&self, peer: &ApprovedPeer) -> HelloAnswer {
        let loaded = self.relay.loaded_models().await;
        let (in_flight, grant) = self
            .peers
            .runtime(&peer.public_key)
            .map_or((0, 0), |r| (r.in_flight(), r.grant()));
        let own_free = (grant as usize).saturating_sub(in_flight);
        let models = if peer.permissions.can_request_inference {
            self.relay
                .catalog()
                .snapshot()
                .model_names()
                .into_iter()
                .filter(|m| protocol::shareable_name(m) && authz::shares(peer, m))
                .take(MAX_HELLO_MODELS)
                .map(|m| SharedModel {
                    free_slots: own_free.min(self.relay.free_slots(&m)),
                    loaded: loaded.iter().any(|l| crate::routing::model_matches(l, &m)),
                    dialects: self
                        .relay
                        .dialects_of(&m)
                        .into_iter()
                        .map(String::from)
                        .collect(),
                    name: m,
                })
                .collect()
        } else {
            Vec::new()
        };
        HelloAnswer {
            node_id: self.node.node_id.clone(),
            public_key: self.node.public_key.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            protocol: PROTOCOL_VERSION,
            identity_cert: self.identity_pem.clone(),
            you: YourGrant { grant, in_flight },
            models,
            pullable: self
                .models
                .as_ref()
                .map_or_else(Vec::new, |m| m.pullable_by(peer))
                .into_iter()
                .filter(|m| protocol::shareable_name(m))
                .take(MAX_HELLO_MODELS)
                .collect(),
        }
    }
}

/// Answers a protocol message as JSON.
async fn reply_typed<T: serde::Serialize>(
    s: &mut ServerSession,
    status: u16,
    message: &T,
) -> Outcome {
    match serde_json::to_value(message) {
        Ok(v) => reply_json(s, status, &v).await,
        Err(e) => reply_error(s, Dialect::OpenAi, &ApiError::internal(e.to_string())).await,
    }
}

#[cfg(test)]
mod tests;
