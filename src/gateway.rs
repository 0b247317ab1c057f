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
//! Why not `ProxyHttp`: routing needs the model from the JSON body before an upstream is
//! chosen, and Pingora's proxy only replays a body read in `request_filter` when it fits its
//! 64 KiB retry buffer (pingora issues #349, #780); long chats exceed that. This app keeps
//! Pingora's listener, HTTP/1 and HTTP/2 sessions, connector and pool, and owns only the
//! request/response relay.

pub mod request;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName};
use http::Method;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use serde_json::{json, Value};

use crate::catalog::Catalog;
use crate::error::{ApiError, Dialect};
use crate::identity::PublicKey;
use crate::metrics::Metrics;
use crate::routing::{self, BackendView, NoRoute};
use crate::upstream::{Backend, SendError, Upstream, UpstreamResponse};
use request::{classify, dialect_of, model_of, strip_prefix, Endpoint};

/// Seconds an idle client connection is kept open between requests.
const KEEPALIVE_SECS: u64 = 60;
/// A miss in the catalog triggers a refresh unless the last one is younger than this: a model
/// pulled a moment ago should work at once, a flood of unknown names must not hammer backends.
const MISS_REFRESH_MIN_AGE: Duration = Duration::from_secs(2);
/// Longest pause allowed between two pieces of a request body; a client that stalls longer is
/// dropped rather than holding a connection open forever.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Headers that describe one hop and must not be forwarded (RFC 9110 §7.6.1), plus the ones
/// this hop recomputes.
const NOT_FORWARDED: [&str; 12] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "expect",
];

/// Who this node is, for `/health`.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// Node id.
    pub node_id: String,
    /// Public key.
    pub public_key: PublicKey,
}

/// The API listener's HTTP app.
pub struct Gateway {
    node: NodeInfo,
    path_prefix: String,
    max_body_bytes: usize,
    backends: Arc<Vec<Backend>>,
    upstream: Arc<Upstream>,
    catalog: Arc<Catalog>,
    metrics: Arc<Metrics>,
}

/// What happened to one request, for metrics and connection reuse.
struct Outcome {
    status: u16,
    model: Option<String>,
    first_byte: Option<Instant>,
    reusable: bool,
}

impl Outcome {
    fn answered(status: u16, written: bool) -> Self {
        Outcome {
            status,
            model: None,
            first_byte: Some(Instant::now()),
            reusable: written,
        }
    }
}

#[async_trait]
impl HttpServerApp for Gateway {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        match session.read_request().await {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                tracing::debug!(error = %e, "unreadable request");
                let _ = session.respond_error(400).await;
                return None;
            }
        }
        let keepalive = (!*shutdown.borrow()).then_some(KEEPALIVE_SECS);
        session.set_keepalive(keepalive);
        if !self.serve(&mut session).await {
            return None;
        }
        let settings = HttpPersistentSettings::for_session(&session);
        match session.finish().await {
            Ok(Some(stream)) => Some(ReusedHttpStream::from_reusable_stream(stream, settings)),
            _ => None,
        }
    }
}

impl Gateway {
    /// Assembles the app from the node's shared parts.
    pub fn new(
        node: NodeInfo,
        config: &crate::config::Config,
        backends: Arc<Vec<Backend>>,
        upstream: Arc<Upstream>,
        catalog: Arc<Catalog>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Gateway {
            node,
            path_prefix: config.path_prefix.clone(),
            max_body_bytes: config.max_body_bytes,
            backends,
            upstream,
            catalog,
            metrics,
        }
    }

    /// Serves one request; returns whether the connection may carry another.
    async fn serve(&self, s: &mut ServerSession) -> bool {
        let started = Instant::now();
        self.metrics.in_flight.inc();
        let path = strip_prefix(s.req_header().uri.path(), &self.path_prefix).to_string();
        let route = route_label(&path);
        let dialect = dialect_of(&path);
        let outcome = match classify(&s.req_header().method, &path) {
            Err(e) => self.reply_error(s, dialect, &e).await,
            Ok(Endpoint::Health) => self.reply_json(s, 200, &self.health()).await,
            Ok(Endpoint::Metrics) => {
                let body = Bytes::from(self.metrics.render());
                let ok = reply(s, 200, "text/plain; version=0.0.4", body, None).await;
                Outcome::answered(200, ok)
            }
            Ok(Endpoint::ListModels(d)) => {
                self.reply_json(s, 200, &self.catalog.snapshot().listing(d))
                    .await
            }
            Ok(Endpoint::OllamaPs) => self.reply_json(s, 200, &self.ollama_ps().await).await,
            Ok(Endpoint::OllamaVersion) => {
                self.reply_json(s, 200, &self.ollama_version().await).await
            }
            Ok(Endpoint::Model(d)) => self.forward_model(s, d, &path, started).await,
        };
        self.record(route, &outcome, started);
        self.metrics.in_flight.dec();
        outcome.reusable
    }

    fn record(&self, route: &str, outcome: &Outcome, started: Instant) {
        let model = match &outcome.model {
            None => "",
            Some(m) if self.catalog.snapshot().knows(m) => m.as_str(),
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

    /// A POST that names a model: read the body, route, relay.
    async fn forward_model(
        &self,
        s: &mut ServerSession,
        dialect: Dialect,
        path: &str,
        started: Instant,
    ) -> Outcome {
        let body = match read_body(s, self.max_body_bytes).await {
            Ok(body) => body,
            Err(e) => {
                // The rest of an oversized or broken body is still on the wire: close after.
                s.set_keepalive(None);
                let mut out = self.reply_error(s, dialect, &e).await;
                out.reusable = false;
                return out;
            }
        };
        let model = match model_of(&body) {
            Ok(m) => m,
            Err(e) => return self.reply_error(s, dialect, &e).await,
        };
        let mut outcome = self
            .route_and_relay(s, dialect, path, &model, body, started)
            .await;
        outcome.model = Some(model);
        outcome
    }

    async fn route_and_relay(
        &self,
        s: &mut ServerSession,
        dialect: Dialect,
        path: &str,
        model: &str,
        body: Bytes,
        started: Instant,
    ) -> Outcome {
        let mut ranked = self.rank(model, dialect, &self.catalog.snapshot());
        if ranked == Err(NoRoute::UnknownModel) {
            let fresh = self.catalog.refresh_if_older(MISS_REFRESH_MIN_AGE).await;
            ranked = self.rank(model, dialect, &fresh);
        }
        let order = match ranked {
            Ok(order) => order,
            Err(no_route) => {
                let e = self.no_route_error(model, no_route);
                return self.reply_error(s, dialect, &e).await;
            }
        };
        let mut busy = false;
        let mut last_failure = None;
        for i in order {
            let backend = &self.backends[i];
            let Some(permit) = backend.try_slot() else {
                busy = true;
                continue;
            };
            let gauge = self
                .metrics
                .backend_in_flight
                .with_label_values(&[&backend.config.name]);
            gauge.set(backend.in_flight() as i64);
            let header = match upstream_request(s.req_header(), backend, path, body.len()) {
                Ok(h) => h,
                Err(e) => return self.reply_error(s, dialect, &e).await,
            };
            let sent = self.upstream.send(backend.peer(), &header, &body).await;
            let outcome = match sent {
                Ok(rsp) => Some(self.relay(s, rsp, started).await),
                Err(SendError::Timeout { .. }) => {
                    let e = ApiError::timeout(format!(
                        "backend \"{}\" sent no response in time",
                        backend.config.name
                    ));
                    Some(self.reply_error(s, dialect, &e).await)
                }
                Err(e) => {
                    tracing::warn!(backend = %backend.config.name, error = %e, "backend failed before responding");
                    if matches!(e, SendError::Connect { .. }) {
                        self.metrics
                            .upstream_connect_errors
                            .with_label_values(&[&backend.config.name])
                            .inc();
                    }
                    last_failure = Some(format!("backend \"{}\": {e}", backend.config.name));
                    None
                }
            };
            drop(permit);
            gauge.set(backend.in_flight() as i64);
            if let Some(outcome) = outcome {
                return outcome;
            }
        }
        let e = match last_failure {
            Some(detail) => ApiError::backend_unreachable(detail),
            None if busy => ApiError::busy(model),
            None => ApiError::model_not_found(model),
        };
        self.reply_error(s, dialect, &e).await
    }

    fn rank(
        &self,
        model: &str,
        dialect: Dialect,
        snapshot: &crate::catalog::Snapshot,
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

    fn no_route_error(&self, model: &str, no_route: NoRoute) -> ApiError {
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

    /// Relays a backend response to the client as it arrives.
    async fn relay(
        &self,
        s: &mut ServerSession,
        mut rsp: UpstreamResponse,
        started: Instant,
    ) -> Outcome {
        let status = rsp.header().status.as_u16();
        let stream_dialect = stream_dialect(rsp.header());
        let header = downstream_response(rsp.header());
        let chunked = !header.headers.contains_key(header::CONTENT_LENGTH);
        let mut outcome = Outcome {
            status,
            model: None,
            first_byte: None,
            reusable: false,
        };
        if s.write_response_header(Box::new(header)).await.is_err() {
            return outcome;
        }
        outcome.first_byte = Some(Instant::now());
        loop {
            match rsp.next_chunk().await {
                Ok(Some(chunk)) => {
                    if s.write_response_body(chunk, false).await.is_err() {
                        // The client left; dropping `rsp` closes the backend connection, which
                        // makes the backend stop generating.
                        tracing::debug!(elapsed = ?started.elapsed(), "client went away mid-response");
                        return outcome;
                    }
                }
                Ok(None) => {
                    outcome.reusable = s.write_response_body(Bytes::new(), true).await.is_ok();
                    self.upstream.release(rsp).await;
                    return outcome;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "backend stream broke mid-response");
                    if let (Some(d), true) = (stream_dialect, chunked) {
                        let event = ApiError::backend_unreachable(format!(
                            "the backend stopped mid-response: {e}"
                        ))
                        .stream_event(d);
                        let _ = s.write_response_body(event, false).await;
                        let _ = s.write_response_body(Bytes::new(), true).await;
                    }
                    return outcome;
                }
            }
        }
    }

    async fn reply_error(&self, s: &mut ServerSession, dialect: Dialect, e: &ApiError) -> Outcome {
        let retry = e.retry_after.map(|secs| ("retry-after", secs.to_string()));
        let ok = reply(s, e.status, "application/json", e.body(dialect), retry).await;
        Outcome::answered(e.status, ok)
    }

    async fn reply_json(&self, s: &mut ServerSession, status: u16, value: &Value) -> Outcome {
        let ok = reply(
            s,
            status,
            "application/json",
            Bytes::from(value.to_string()),
            None,
        )
        .await;
        Outcome::answered(status, ok)
    }

    fn health(&self) -> Value {
        let snapshot = self.catalog.snapshot();
        let backends: Vec<Value> = self
            .backends
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
            if let Ok(v) = self
                .upstream
                .get_json(b.peer(), &b.config.url.authority, &path)
                .await
            {
                models.extend(v["models"].as_array().into_iter().flatten().cloned());
            }
        }
        json!({ "models": models })
    }

    /// The first Ollama backend's version, or ours when none answers.
    async fn ollama_version(&self) -> Value {
        for b in self.ollama_backends() {
            let path = b.upstream_path("/api/version");
            if let Ok(v) = self
                .upstream
                .get_json(b.peer(), &b.config.url.authority, &path)
                .await
            {
                return v;
            }
        }
        json!({ "version": env!("CARGO_PKG_VERSION") })
    }

    fn ollama_backends(&self) -> impl Iterator<Item = &Backend> {
        self.backends
            .iter()
            .filter(|b| b.config.kind == crate::config::BackendKind::Ollama)
    }
}

/// A stable metric label for a path (a closed set, whatever clients send).
fn route_label(path: &str) -> &'static str {
    const KNOWN: [&str; 14] = [
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
        "/api/version",
    ];
    KNOWN.into_iter().find(|k| *k == path).unwrap_or("other")
}

/// Reads the request body, refusing more than `limit` bytes (by `Content-Length` before reading
/// anything, and by count for chunked bodies).
async fn read_body(s: &mut ServerSession, limit: usize) -> Result<Bytes, ApiError> {
    let declared = s
        .get_header(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::too_large(limit));
    }
    let expects_continue = s
        .get_header(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue {
        s.write_continue_response()
            .await
            .map_err(|e| ApiError::bad_request(format!("writing 100 Continue: {e}")))?;
    }
    s.set_read_timeout(Some(BODY_READ_TIMEOUT));
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(1024).min(limit as u64) as usize);
    while let Some(chunk) = s
        .read_request_body()
        .await
        .map_err(|e| ApiError::bad_request(format!("reading the request body: {e}")))?
    {
        if buf.len() + chunk.len() > limit {
            return Err(ApiError::too_large(limit));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// The request sent to a local backend: the client's headers minus hop-by-hop ones, with the
/// backend's `Host`, the exact body length and, when configured, the backend's API key.
fn upstream_request(
    client: &RequestHeader,
    backend: &Backend,
    path: &str,
    body_len: usize,
) -> Result<RequestHeader, ApiError> {
    let path_and_query = match client.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let target = backend.upstream_path(&path_and_query);
    let internal = |e: pingora::BError| ApiError::bad_request(format!("cannot forward: {e}"));
    let mut h = RequestHeader::build(
        client.method.clone(),
        target.as_bytes(),
        Some(client.headers.len() + 2),
    )
    .map_err(internal)?;
    let api_key = backend.config.api_key.as_ref();
    for (name, value) in client.headers.iter() {
        let n = name.as_str();
        // Identity encoding upstream: the relay may need to read the stream it forwards.
        if NOT_FORWARDED.contains(&n)
            || name == header::ACCEPT_ENCODING
            || (api_key.is_some() && name == header::AUTHORIZATION)
        {
            continue;
        }
        h.append_header(name.clone(), value.clone())
            .map_err(internal)?;
    }
    h.insert_header(header::HOST, backend.config.url.authority.as_str())
        .map_err(internal)?;
    h.insert_header(header::CONTENT_LENGTH, body_len.to_string())
        .map_err(internal)?;
    if let Some(key) = api_key {
        h.insert_header(header::AUTHORIZATION, format!("Bearer {}", key.0))
            .map_err(internal)?;
    }
    Ok(h)
}

/// The response header sent to the client: the backend's, minus hop-by-hop headers, chunked
/// when the backend gave no length.
fn downstream_response(up: &ResponseHeader) -> ResponseHeader {
    let mut h = ResponseHeader::build_no_case(up.status, Some(up.headers.len() + 1))
        .expect("invariant: a status the backend sent is valid");
    for (name, value) in up.headers.iter() {
        if !NOT_FORWARDED.contains(&name.as_str()) || name == header::CONTENT_LENGTH {
            let _ = h.append_header(name.clone(), value.clone());
        }
    }
    if !h.headers.contains_key(header::CONTENT_LENGTH) {
        let _ = h.insert_header(header::TRANSFER_ENCODING, "chunked");
    }
    h
}

/// The stream framing of a response, if it is a stream: SSE or NDJSON.
fn stream_dialect(h: &ResponseHeader) -> Option<Dialect> {
    let ct = h.headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    if ct.starts_with("text/event-stream") {
        Some(Dialect::OpenAi)
    } else if ct.starts_with("application/x-ndjson") {
        Some(Dialect::Ollama)
    } else {
        None
    }
}

/// Writes a complete small response; returns whether it was written whole.
async fn reply(
    s: &mut ServerSession,
    status: u16,
    content_type: &str,
    body: Bytes,
    extra: Option<(&'static str, String)>,
) -> bool {
    let Ok(mut h) = ResponseHeader::build(status, Some(4)) else {
        return false;
    };
    let head = s.req_header().method == Method::HEAD;
    let mut set = |name: HeaderName, value: String| h.insert_header(name, value).is_ok();
    let ok = set(header::CONTENT_TYPE, content_type.to_string())
        && set(header::CONTENT_LENGTH, body.len().to_string())
        && set(header::CACHE_CONTROL, "no-store".to_string())
        && extra.is_none_or(|(n, v)| set(HeaderName::from_static(n), v));
    if !ok || s.write_response_header(Box::new(h)).await.is_err() {
        return false;
    }
    let body = if head { Bytes::new() } else { body };
    s.write_response_body(body, true).await.is_ok()
}
