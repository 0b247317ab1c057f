//! The API listener: local clients' inference entry, built as a Pingora HTTP app.
//!
//! Phases of one request, in order:
//!
//! ```text
//! read header -> strip /arknet prefix -> classify (request.rs)
//!   GET  listings, /health, /metrics          -> answered here
//!   POST model routes -> read body (bounded, 413) -> model from JSON (400)
//!                     -> rank backends (routing.rs; 404) -> take a slot (503)
//!                     -> send via the pooled connector; connect failure -> next backend (502)
//!                     -> relay the response chunk by chunk as it arrives
//! record metrics
//! ```
//!
//! Admin routes (`/peers/*`, `/status`) go to [`crate::admin`].
//!
//! Why not `ProxyHttp`: routing needs the model from the JSON body before an upstream is
//! chosen, and Pingora's proxy only replays a body read in `request_filter` when it fits its
//! 64 KiB retry buffer (pingora issues #349, #780); long chats exceed that. This app keeps
//! Pingora's listener, HTTP/1 and HTTP/2 sessions, connector and pool, and owns only the
//! request/response relay.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use http::header;
use pingora::protocols::http::ServerSession;
use serde_json::{json, Value};

use crate::admin::trust::HostPolicy;
use crate::admin::Admin;
use crate::dialect::request::{classify, dialect_of, strip_prefix, Endpoint};
use crate::error::{ApiError, Dialect};
use crate::grid::Grid;
use crate::identity::NodeInfo;
use crate::metrics::Metrics;
use crate::relay::{LocalRelay, ModelRequest};
use crate::session::{
    read_model_request, reply, reply_error, reply_json, reply_with, BodyLimits, Handler, Outcome,
};
use crate::upstream::Backend;

/// The API listener's request handler.
pub struct Gateway {
    node: NodeInfo,
    path_prefix: String,
    bodies: BodyLimits,
    relay: Arc<LocalRelay>,
    grid: Arc<Grid>,
    admin: Admin,
    metrics: Arc<Metrics>,
    hosts: HostPolicy,
    models: Option<Arc<crate::models::api::PullApi>>,
}

#[async_trait]
impl Handler for Gateway {
    async fn handle(&self, s: &mut ServerSession) -> bool {
        let started = Instant::now();
        self.metrics.in_flight.inc();
        let path = strip_prefix(s.req_header().uri.path(), &self.path_prefix).to_string();
        let route = route_label(&path);
        let dialect = dialect_of(&path);
        let host = s.req_header().headers.get(header::HOST);
        let host = host.map(|h| h.to_str().unwrap_or("\u{fffd}"));
        let endpoint = match self.hosts.allows(host) {
            true => classify(&s.req_header().method, &path),
            false => Err(ApiError::misdirected(host.unwrap_or_default())),
        }
        .and_then(|e| self.same_site_or_safe(s, e));
        let outcome = match endpoint {
            Err(e) => reply_error(s, dialect, &e).await,
            Ok(Endpoint::Admin) => self.admin.serve(s, &path).await,
            Ok(Endpoint::AdminPage) => {
                let page = Bytes::from_static(crate::admin::PAGE.as_bytes());
                // No other site may frame the page and trick the owner into clicking Approve.
                let framing = [
                    (
                        "content-security-policy",
                        "frame-ancestors 'none'".to_string(),
                    ),
                    ("x-frame-options", "DENY".to_string()),
                ];
                let ok = reply_with(s, 200, "text/html; charset=utf-8", page, &framing).await;
                Outcome::answered(200, ok)
            }
            Ok(Endpoint::Health) => reply_json(s, 200, &self.health()).await,
            Ok(Endpoint::Metrics) => {
                let body = Bytes::from(self.metrics.render());
                let ok = reply(s, 200, "text/plain; version=0.0.4", body, None).await;
                Outcome::answered(200, ok)
            }
            Ok(Endpoint::ListModels(d)) => reply_json(s, 200, &self.grid.listing(d)).await,
            Ok(Endpoint::OllamaPs) => reply_json(s, 200, &self.ollama_ps().await).await,
            Ok(Endpoint::OllamaVersion) => reply_json(s, 200, &self.ollama_version().await).await,
            Ok(Endpoint::Model(d)) => self.forward_model(s, d, &path, started).await,
            Ok(Endpoint::Pull) => match &self.models {
                Some(models) => models.serve(s).await,
                None => reply_error(s, dialect, &ApiError::no_route(&path)).await,
            },
        };
        self.record(route, &outcome, started);
        self.metrics.in_flight.dec();
        outcome.reusable
    }
}

impl Gateway {
    /// Assembles the handler from the node's shared parts.
    pub fn new(
        node: NodeInfo,
        config: &crate::config::Config,
        relay: Arc<LocalRelay>,
        grid: Arc<Grid>,
        admin: Admin,
        metrics: Arc<Metrics>,
        bodies: BodyLimits,
    ) -> Self {
        Gateway {
            node,
            path_prefix: config.path_prefix.clone(),
            bodies,
            hosts: admin.hosts().clone(),
            relay,
            grid,
            admin,
            metrics,
            models: None,
        }
    }

    /// Serves `POST /api/pull` from the grid when a peer offers the model (model sharing).
    pub fn with_models(mut self, models: Arc<crate::models::api::PullApi>) -> Self {
        self.models = Some(models);
        self
    }

    /// A browser may only send requests with effects (any method but GET and HEAD) from the
    /// node's own pages: another site's page cannot spend the owner's GPU with a no-CORS POST
    /// any more than it can change approvals. Browser UIs on other origins could not read our
    /// answers anyway (no CORS grants), so nothing legitimate is lost.
    fn same_site_or_safe(&self, s: &ServerSession, e: Endpoint) -> Result<Endpoint, ApiError> {
        let req = s.req_header();
        if req.method == http::Method::GET || req.method == http::Method::HEAD {
            return Ok(e);
        }
        match crate::admin::trust::cross_site(&req.headers, &self.hosts) {
            Some(why) => Err(ApiError::not_owner(format!(
                "refused: another site's page sent this request ({why})"
            ))),
            None => Ok(e),
        }
    }

    fn record(&self, route: &str, outcome: &Outcome, started: Instant) {
        let model = match &outcome.model {
            None => "",
            Some(m) if self.relay.catalog().snapshot().knows(m) => m.as_str(),
            Some(_) => "unknown",
        };
        let status = outcome.status.to_string();
        self.metrics
            .requests
            .with_label_values(&[route, model, &status])
            .inc();
        self.metrics
            .duration
            .with_label_values(&[route])
            .observe(started.elapsed().as_secs_f64());
        if let Some(t) = outcome.first_byte {
            self.metrics
                .ttfb
                .with_label_values(&[route])
                .observe(t.duration_since(started).as_secs_f64());
        }
    }

    /// A POST that names a model: read the body, then let the relay route it.
    async fn forward_model(
        &self,
        s: &mut ServerSession,
        dialect: Dialect,
        path: &str,
        started: Instant,
    ) -> Outcome {
        let (body, model) = match read_model_request(s, &self.bodies, dialect).await {
            Ok(read) => read,
            Err(outcome) => return outcome,
        };
        let crate::session::Body {
            bytes: body,
            lease: _lease,
        } = body;
        let req = ModelRequest {
            dialect,
            path,
            model: &model,
            body,
            started,
            forward_client_headers: true,
            stop: None,
            from_peer: false,
        };
        let mut outcome = self.grid.serve(s, req).await;
        outcome.model = Some(model);
        outcome
    }

    fn health(&self) -> Value {
        let snapshot = self.relay.catalog().snapshot();
        let backends: Vec<Value> = self
            .relay
            .backends()
            .iter()
            .zip(&snapshot.backends)
            .map(|(b, m)| {
                json!({
                    "name": b.config.name,
                    "kind": b.config.kind.to_string(),
                    "url": b.config.url.to_string(),
                    "up": m.up,
                    "models": m.models.as_ref().map(Vec::len),
                    "in_flight": b.in_flight(),
                    "max_concurrent": b.config.max_concurrent,
                })
            })
            .collect();
        json!({
            "status": "ok",
            "node_id": self.node.node_id,
            "public_key": self.node.public_key.to_string(),
            "version": env!("CARGO_PKG_VERSION"),
            "backends": backends,
        })
    }

    /// `/api/ps` merged across the Ollama backends that answer.
    async fn ollama_ps(&self) -> Value {
        let mut models = Vec::new();
        for b in self.ollama_backends() {
            let path = b.upstream_path("/api/ps");
            let up = self.relay.upstream();
            if let Ok(v) = up.get_json(b.peer(), &b.config.url.authority, &path).await {
                models.extend(v["models"].as_array().into_iter().flatten().cloned());
            }
        }
        json!({ "models": models })
    }

    /// The first Ollama backend's version, or ours when none answers.
    async fn ollama_version(&self) -> Value {
        for b in self.ollama_backends() {
            let path = b.upstream_path("/api/version");
            let up = self.relay.upstream();
            if let Ok(v) = up.get_json(b.peer(), &b.config.url.authority, &path).await {
                return v;
            }
        }
        json!({ "version": env!("CARGO_PKG_VERSION") })
    }

    fn ollama_backends(&self) -> impl Iterator<Item = &Backend> {
        self.relay
            .backends()
            .iter()
            .filter(|b| b.config.kind == crate::config::BackendKind::Ollama)
    }
}

/// A stable metric label for a path (a closed set, whatever clients send).
fn route_label(path: &str) -> &'static str {
    const KNOWN: [&str; 15] = [
        "/health",
        "/metrics",
        "/v1/models",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/api/chat",
        "/api/generate",
        "/api/embed",
        "/api/embeddings",
        "/api/show",
        "/api/tags",
        "/api/ps",
        "/api/pull",
        "/api/version",
    ];
    if path.starts_with("/peers") || ["/status", "/audit", "/", "/admin"].contains(&path) {
        return "admin";
    }
    KNOWN.into_iter().find(|k| *k == path).unwrap_or("other")
}
