//! Serving a model request with this node's own backends: rank them, take a slot, send, and
//! hand the answer to the streaming relay. Used by the API listener for local clients and by
//! the mesh listener for approved peers; it never sends anything to another node (no open
//! relay).
//!
//! One job per file: this one is the local-backend policy (ranking, slots, VRAM budget,
//! backend health); [`stream`] relays an answer as it arrives (peers' answers too);
//! [`headers`] is the header policy in both directions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pingora::protocols::http::ServerSession;
use tokio::sync::watch;

use crate::catalog::{Catalog, Snapshot};
use crate::dialect::meter::TokenMeter;
use crate::dialect::translate;
use crate::error::{ApiError, Dialect};
use crate::health::WarnLimiter;
use crate::metrics::Metrics;
use crate::routing::{self, BackendView, NoRoute};
use crate::session::{reply_error, Outcome};
use crate::upstream::{Backend, SendError, Upstream};

/// A miss in the catalog triggers a refresh unless the last one is younger than this: a model
/// pulled a moment ago should work at once, a flood of unknown names must not hammer backends.
const MISS_REFRESH_MIN_AGE: Duration = Duration::from_secs(2);

/// The last event of a stream cut because its peer was revoked; the requesting node reads it
/// to audit the request as refused rather than served.
pub const REVOKED_MESSAGE: &str = "access to this node was revoked";

/// A model request ready to be served: the body is read and the model known.
pub struct ModelRequest<'a> {
    /// Dialect of the route (error shapes).
    pub dialect: Dialect,
    /// Prefix-stripped path.
    pub path: &'a str,
    /// The model named in the body.
    pub model: &'a str,
    /// The whole request body.
    pub body: Bytes,
    /// When the request header arrived.
    pub started: Instant,
    /// Headers from the client that may go to the backend: all of them for the owner's own
    /// clients; none for peers (their requests carry no identity of theirs past this node).
    pub forward_client_headers: bool,
    /// Flips to `true` when the request must end now (its peer was revoked).
    pub stop: Option<watch::Receiver<bool>>,
    /// A peer's request: it may only use backend slots beyond `reserved_local_slots`.
    pub from_peer: bool,
}

/// A local backend to try, and whether the request must be translated for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// Index of the backend.
    pub index: usize,
    /// The backend speaks OpenAI only and the request is Ollama-dialect.
    pub translate: bool,
}

/// How one attempt at a candidate went.
pub enum Attempt {
    /// A response went to the client (relayed, or an error answered here).
    Done(Outcome),
    /// The candidate had no free slot; nothing was sent anywhere.
    Busy,
    /// The candidate failed before answering; nothing reached the client, try the next.
    Failed(String),
    /// The candidate took the request but sent no header within the first-byte timeout;
    /// nothing reached the client, try the next (and answer 504 if none answers).
    TimedOut(String),
}

/// The node's own backends and what is needed to serve them.
pub struct LocalRelay {
    backends: Arc<Vec<Backend>>,
    upstream: Arc<Upstream>,
    catalog: Arc<Catalog>,
    metrics: Arc<Metrics>,
    warnings: WarnLimiter,
}

impl LocalRelay {
    /// Assembles the relay.
    pub fn new(
        backends: Arc<Vec<Backend>>,
        upstream: Arc<Upstream>,
        catalog: Arc<Catalog>,
        metrics: Arc<Metrics>,
    ) -> Self {
        LocalRelay {
            backends,
            upstream,
            catalog,
            metrics,
            warnings: WarnLimiter::default(),
        }
    }

    /// The backends.
    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// The model catalog.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The pooled client.
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// The API families in which this node can serve `model`: Ollama backends speak both.
    pub fn dialects_of(&self, model: &str) -> Vec<&'static str> {
        let snapshot = self.catalog.snapshot();
        let mut openai = false;
        let mut ollama = false;
        for (b, m) in self.backends.iter().zip(&snapshot.backends) {
            if m.models
                .iter()
                .flatten()
                .any(|l| routing::model_matches(&l.name, model))
            {
                openai = true;
                ollama |= b.config.kind == crate::config::BackendKind::Ollama;
            }
        }
        let mut out = Vec::new();
        if openai {
            out.push("openai");
        }
        if ollama {
            out.push("ollama");
        }
        out
    }

    /// Slots a peer could use now on the backends that list `model` (beyond the reserved
    /// local slots; 0 when none lists it).
    pub fn free_slots(&self, model: &str) -> usize {
        let snapshot = self.catalog.snapshot();
        self.backends
            .iter()
            .zip(&snapshot.backends)
            .filter(|(_, m)| {
                m.models
                    .iter()
                    .flatten()
                    .any(|l| routing::model_matches(&l.name, model))
            })
            .map(|(b, _)| {
                (b.config.max_concurrent - b.config.reserved_local_slots)
                    .saturating_sub(b.in_flight())
            })
            .sum()
    }

    /// Serves `req` with a local backend, or answers why not (the mesh listener's path).
    pub async fn serve(
        &self,
        s: &mut ServerSession,
        mut req: ModelRequest<'_>,
        mut meter: Option<&mut TokenMeter>,
    ) -> Outcome {
        let dialect = req.dialect;
        let order = match self.ranked(req.model, dialect, req.path).await {
            Ok(order) => order,
            Err(no_route) => {
                let e = self.no_route_error(req.model, no_route);
                return reply_error(s, dialect, &e).await;
            }
        };
        let mut busy = false;
        let mut last_failure = None;
        let mut timed_out = false;
        for target in order {
            match self
                .attempt(s, target, &mut req, meter.as_deref_mut())
                .await
            {
                Attempt::Done(outcome) => return outcome,
                Attempt::Busy => busy = true,
                Attempt::Failed(why) => last_failure = Some(why),
                Attempt::TimedOut(why) => {
                    timed_out = true;
                    last_failure = Some(why);
                }
            }
        }
        reply_error(
            s,
            dialect,
            &ApiError::exhausted(req.model, busy, last_failure, timed_out),
        )
        .await
    }

    /// Tries backend `i` for `req`.
    pub async fn attempt(
        &self,
        s: &mut ServerSession,
        target: Target,
        req: &mut ModelRequest<'_>,
        meter: Option<&mut TokenMeter>,
    ) -> Attempt {
        let backend = &self.backends[target.index];
        // A backend that refused a connection is left to the background probe: trying it on
        // every request would cost each one a connect timeout and a log line.
        if let Some(retry_in) = backend.health.retry_in() {
            return Attempt::Failed(format!(
                "backend \"{}\" is down (next probe in {} ms)",
                backend.config.name,
                retry_in.as_millis()
            ));
        }
        // The owner comes first: peers only get the slots beyond the reserved ones, and never
        // wait for one, so a local burst turns peers away at once.
        if req.from_peer
            && backend.in_flight() + backend.config.reserved_local_slots
                >= backend.config.max_concurrent
        {
            return Attempt::Busy;
        }
        if req.from_peer && !self.vram_allows(backend, req.model).await {
            let e = ApiError::vram_reserved(req.model);
            return Attempt::Done(reply_error(s, req.dialect, &e).await);
        }
        let Some(permit) = backend.try_slot() else {
            return Attempt::Busy;
        };
        let gauge = self
            .metrics
            .backend_in_flight
            .with_label_values(&[&backend.config.name]);
        gauge.set(backend.in_flight() as i64);
        let (path, body, translator) = if target.translate {
            match translate::ollama_to_openai(req.path, &req.body) {
                Ok(t) => (t.path, t.body, Some(t.response)),
                Err(e) => return Attempt::Done(reply_error(s, req.dialect, &e).await),
            }
        } else {
            (req.path, req.body.clone(), None)
        };
        let header = match upstream_request(s.req_header(), backend, req, path, body.len()) {
            Ok(h) => h,
            Err(e) => return Attempt::Done(reply_error(s, req.dialect, &e).await),
        };
        let sent = self
            .upstream
            .send_wire(backend.peer(), backend.pool_key(), header, &body)
            .await;
        let attempt = match sent {
            Ok(rsp) => {
                if backend.health.succeeded() {
                    tracing::info!(backend = %backend.config.name, "backend is up again; using it");
                }
                let stop = req.stop.take();
                Attempt::Done(relay_response(&self.upstream, s, rsp, stop, meter, translator).await)
            }
            Err(SendError::Timeout { .. }) => {
                let e = ApiError::timeout(format!(
                    "backend \"{}\" sent no response in time",
                    backend.config.name
                ));
                Attempt::Done(reply_error(s, req.dialect, &e).await)
            }
            Err(e) => {
                if matches!(e, SendError::Connect { .. }) {
                    self.metrics
                        .upstream_connect_errors
                        .with_label_values(&[&backend.config.name])
                        .inc();
                    if let Some(backoff) = backend.health.failed() {
                        tracing::warn!(
                            backend = %backend.config.name,
                            error = %e,
                            first_probe_ms = backoff.as_millis() as u64,
                            "backend unreachable; requests skip it until a background probe reaches it"
                        );
                    }
                } else {
                    crate::warn_limited!(
                        self.warnings,
                        &backend.config.name,
                        backend = %backend.config.name,
                        error = %e,
                        "backend failed before responding"
                    );
                }
                Attempt::Failed(format!("backend \"{}\": {e}", backend.config.name))
            }
        };
        drop(permit);
        gauge.set(backend.in_flight() as i64);
        attempt
    }

    /// Models loaded in memory now on the Ollama backends (`/api/ps`); OpenAI-compatible servers
    /// do not say, so their models count as not loaded.
    pub async fn loaded_models(&self) -> Vec<String> {
        let mut names = Vec::new();
        // A down backend is skipped: every peer's hello asks, and each would wait for a
        // connect that the background probe already knows fails.
        for b in self
            .backends
            .iter()
            .filter(|b| b.config.kind == crate::config::BackendKind::Ollama && b.health.is_up())
        {
            let path = b.upstream_path("/api/ps");
            if let Ok(ps) = self
                .upstream
                .get_json(b.peer(), &b.config.url.authority, &path)
                .await
            {
                names.extend(
                    ps["models"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|m| m["name"].as_str().map(str::to_string)),
                );
            }
        }
        names
    }

    /// Whether a peer may make `backend` serve `model` under the owner's VRAM budget for guests:
    /// yes when the model is already loaded, or when loading it keeps the loaded total within
    /// the budget (sizes from `/api/ps` and `/api/tags`, else the config's static table).
    async fn vram_allows(&self, backend: &Backend, model: &str) -> bool {
        let Some(budget_mb) = backend.config.guest_vram_budget_mb else {
            return true;
        };
        let mb = |bytes: u64| bytes.div_ceil(1024 * 1024);
        let mut loaded: Vec<(String, u64)> = Vec::new();
        if backend.config.kind == crate::config::BackendKind::Ollama {
            let path = backend.upstream_path("/api/ps");
            let authority = &backend.config.url.authority;
            let Ok(ps) = self
                .upstream
                .get_json(backend.peer(), authority, &path)
                .await
            else {
                // Cannot tell what is loaded: the owner's reservation wins.
                return false;
            };
            for m in ps["models"].as_array().into_iter().flatten() {
                if let Some(name) = m["name"].as_str() {
                    loaded.push((name.to_string(), mb(m["size_vram"].as_u64().unwrap_or(0))));
                }
            }
        }
        if loaded.iter().any(|(n, _)| routing::model_matches(n, model)) {
            return true;
        }
        let listed_size = self
            .catalog
            .snapshot()
            .backends
            .iter()
            .flat_map(|b| b.models.iter().flatten())
            .find(|m| routing::model_matches(&m.name, model))
            .and_then(|m| m.entry["size"].as_u64())
            .map(mb);
        let need = backend
            .config
            .model_vram_mb
            .get(model)
            .copied()
            .or(listed_size)
            .unwrap_or(0);
        let used: u64 = loaded.iter().map(|(_, s)| s).sum();
        used + need <= budget_mb
    }

    /// Local backends for `model`, best first, refreshing the catalog once on a miss.
    ///
    /// An Ollama-dialect request for a model only OpenAI-compatible backends have is served by
    /// them through [`translate`], after the backends that speak Ollama natively.
    pub async fn ranked(
        &self,
        model: &str,
        dialect: Dialect,
        path: &str,
    ) -> Result<Vec<Target>, NoRoute> {
        let mut snapshot = self.catalog.snapshot();
        if !snapshot.knows(model) {
            // Nobody lists it (yet): the model may have been pulled a moment ago, or the first
            // listing may still be on its way. Never route on a guess when a refresh can tell.
            snapshot = self.catalog.refresh_if_older(MISS_REFRESH_MIN_AGE).await;
        }
        let native = self.rank(model, dialect, &snapshot);
        let native_targets = |r: &Result<Vec<usize>, NoRoute>| -> Vec<Target> {
            r.as_ref()
                .map(|v| {
                    v.iter()
                        .map(|&index| Target {
                            index,
                            translate: false,
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        if dialect != Dialect::Ollama || !translate::translatable(path) {
            return native.map(|v| {
                v.into_iter()
                    .map(|index| Target {
                        index,
                        translate: false,
                    })
                    .collect()
            });
        }
        let mut targets = native_targets(&native);
        if let Ok(openai) = self.rank(model, Dialect::OpenAi, &snapshot) {
            targets.extend(
                openai
                    .into_iter()
                    .filter(|&i| self.backends[i].config.kind == crate::config::BackendKind::Openai)
                    .map(|index| Target {
                        index,
                        translate: true,
                    }),
            );
        }
        match native {
            Err(e) if targets.is_empty() => Err(e),
            _ => Ok(targets),
        }
    }

    fn rank(
        &self,
        model: &str,
        dialect: Dialect,
        snapshot: &Snapshot,
    ) -> Result<Vec<usize>, NoRoute> {
        let views: Vec<BackendView<'_>> = self
            .backends
            .iter()
            .zip(&snapshot.backends)
            .map(|(b, m)| BackendView {
                kind: b.config.kind,
                models: m.models.as_deref(),
                in_flight: b.in_flight(),
                capacity: b.config.max_concurrent,
            })
            .collect();
        routing::rank(model, dialect, &views)
    }

    /// The error for a model no local backend can serve.
    pub fn no_route_error(&self, model: &str, no_route: NoRoute) -> ApiError {
        match no_route {
            NoRoute::UnknownModel => ApiError::model_not_found(model),
            NoRoute::OtherDialect(i) => ApiError {
                message: format!(
                    "model \"{model}\" is served by the OpenAI-compatible backend \"{}\"; call it through /v1/*",
                    self.backends[i].config.name
                ),
                ..ApiError::model_not_found(model)
            },
        }
    }
}

pub mod headers;
pub mod stream;

pub use headers::downstream_response;
use headers::upstream_request;
pub use stream::relay_response;

#[cfg(test)]
mod tests;
