//! Serving a model request with this node's own backends: rank them, take a slot, send, and
//! relay the response chunk by chunk. Used by the API listener for local clients and by the
//! mesh listener for approved peers; it never sends anything to another node (no open relay).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::ServerSession;
use tokio::sync::watch;

use crate::catalog::{Catalog, Snapshot};
use crate::dialect::meter::TokenMeter;
use crate::dialect::translate::{self, ResponseTranslator};
use crate::error::{ApiError, Dialect};
use crate::health::WarnLimiter;
use crate::metrics::Metrics;
use crate::routing::{self, BackendView, NoRoute};
use crate::session::{reply_error, Cut, Outcome};
use crate::upstream::{Backend, SendError, Upstream, UpstreamResponse};

/// A miss in the catalog triggers a refresh unless the last one is younger than this: a model
/// pulled a moment ago should work at once, a flood of unknown names must not hammer backends.
const MISS_REFRESH_MIN_AGE: Duration = Duration::from_secs(2);

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
        let sent = self.upstream.send(backend.peer(), &header, &body).await;
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

/// Relays a backend (or peer) response to the client as it arrives, until it ends, the client
/// leaves, the backend breaks, or `stop` flips.
pub async fn relay_response(
    upstream: &Upstream,
    s: &mut ServerSession,
    mut rsp: UpstreamResponse,
    mut stop: Option<watch::Receiver<bool>>,
    mut meter: Option<&mut TokenMeter>,
    mut translate: Option<ResponseTranslator>,
) -> Outcome {
    let status = rsp.header().status.as_u16();
    let mut header = downstream_response(rsp.header());
    let stream_dialect = match translate.as_mut() {
        Some(t) => {
            t.upstream_status(status);
            // The body changes length and shape: chunked, in the client's dialect.
            header.remove_header(&header::CONTENT_LENGTH);
            let _ = header.insert_header(header::CONTENT_TYPE, t.content_type());
            let _ = header.insert_header(header::TRANSFER_ENCODING, "chunked");
            Some(Dialect::Ollama)
        }
        None => stream_dialect(rsp.header()),
    };
    let chunked = !header.headers.contains_key(header::CONTENT_LENGTH);
    let mut outcome = Outcome {
        status,
        model: None,
        first_byte: None,
        reusable: false,
        cut: None,
    };
    if s.write_response_header(Box::new(header)).await.is_err() {
        return outcome;
    }
    outcome.first_byte = Some(Instant::now());
    // What a gathering pass read past its batch (the end, or an error), handled next.
    let mut pending = None;
    loop {
        let next = tokio::select! {
            next = async { match pending.take() { Some(p) => p, None => rsp.next_chunk().await } } => next,
            () = stopped(&mut stop) => {
                end_with_error(s, stream_dialect, chunked, REVOKED_MESSAGE).await;
                outcome.cut = Some(Cut::Revoked);
                return outcome;
            }
        };
        match next {
            Ok(Some(chunk)) => {
                let chunk = gather(&mut rsp, chunk, &mut pending);
                if let Some(m) = meter.as_deref_mut() {
                    m.observe(&chunk);
                }
                let chunk = match translate.as_mut() {
                    Some(t) => t.chunk(&chunk),
                    None => chunk,
                };
                if s.write_response_body(chunk, false).await.is_err() {
                    // The client left; dropping `rsp` closes the backend connection, which
                    // makes the backend stop generating.
                    tracing::debug!("client went away mid-response");
                    outcome.cut = Some(Cut::ClientLeft);
                    return outcome;
                }
            }
            Ok(None) => {
                // A peer that cut a stream ended it with an error event and a clean end: the
                // event, not the framing, says how the request went. (An error *answer*, say a
                // 400 with a JSON error body, is no cut: its status already tells.)
                let streamed_ok = (200..300).contains(&status) && stream_dialect.is_some();
                if let Some(error) = meter
                    .as_deref()
                    .filter(|_| streamed_ok)
                    .and_then(TokenMeter::stream_error)
                {
                    outcome.cut = Some(if error.contains(REVOKED_MESSAGE) {
                        Cut::Revoked
                    } else {
                        Cut::UpstreamBroke
                    });
                }
                let tail = translate
                    .as_mut()
                    .map_or_else(Bytes::new, ResponseTranslator::finish);
                outcome.reusable = s.write_response_body(tail, true).await.is_ok();
                upstream.release(rsp).await;
                return outcome;
            }
            Err(e) => {
                tracing::warn!(error = %e, "backend stream broke mid-response");
                let why = format!("the backend stopped mid-response: {e}");
                end_with_error(s, stream_dialect, chunked, &why).await;
                outcome.cut = Some(Cut::UpstreamBroke);
                return outcome;
            }
        }
    }
}

/// Largest batch of already-arrived chunks written to the client in one go.
const GATHER_LIMIT: usize = 64 * 1024;

/// Appends to `first` whatever further chunks have already arrived, without waiting, so that a
/// burst of small events costs one write to the client instead of one each (every body write
/// is flushed). Stops at the limit, at the first chunk not yet here, or at the end or an error,
/// which it leaves in `pending`.
fn gather(
    rsp: &mut UpstreamResponse,
    first: Bytes,
    pending: &mut Option<pingora::Result<Option<Bytes>>>,
) -> Bytes {
    let mut batch: Option<bytes::BytesMut> = None;
    let mut len = first.len();
    while len < GATHER_LIMIT {
        match poll_now(rsp.next_chunk()) {
            Some(Ok(Some(more))) => {
                let b = batch.get_or_insert_with(|| bytes::BytesMut::from(&first[..]));
                b.extend_from_slice(&more);
                len = b.len();
            }
            Some(end_or_error) => {
                *pending = Some(end_or_error);
                break;
            }
            None => break,
        }
    }
    batch.map_or(first, bytes::BytesMut::freeze)
}

/// Polls `f` once. Pingora's body reads keep their progress in the session, so dropping a read
/// that is not ready loses nothing (its own proxy cancels them in `select!` the same way).
fn poll_now<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

/// Resolves when `stop` flips to true; never when there is no stop signal.
async fn stopped(stop: &mut Option<watch::Receiver<bool>>) {
    match stop {
        Some(rx) => {
            if rx.wait_for(|s| *s).await.is_err() {
                // The sender is gone with its peer entry: that is a stop too.
            }
        }
        None => std::future::pending().await,
    }
}

/// Ends a response already under way: a last error event when it is a stream in a known
/// dialect, then the end of the chunked body. Unframed bodies are just cut.
async fn end_with_error(s: &mut ServerSession, dialect: Option<Dialect>, chunked: bool, why: &str) {
    if let (Some(d), true) = (dialect, chunked) {
        let event = ApiError::backend_unreachable(why).stream_event(d);
        let _ = s.write_response_body(event, false).await;
        let _ = s.write_response_body(Bytes::new(), true).await;
    }
}

/// The request sent to a local backend: the client's headers minus hop-by-hop ones (or none,
/// for peers), with the backend's `Host`, the exact body length and, when configured, the
/// backend's API key.
fn upstream_request(
    client: &RequestHeader,
    backend: &Backend,
    req: &ModelRequest<'_>,
    path: &str,
    body_len: usize,
) -> Result<RequestHeader, ApiError> {
    let path_and_query = match client.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let target = backend.upstream_path(&path_and_query);
    // Our own header failed to build: our fault, not the client's.
    let internal = |e: pingora::BError| ApiError::internal(format!("cannot forward: {e}"));
    let mut h = RequestHeader::build(
        client.method.clone(),
        target.as_bytes(),
        Some(client.headers.len() + 3),
    )
    .map_err(internal)?;
    let api_key = backend.config.api_key.as_ref();
    if req.forward_client_headers {
        for (name, value) in client.headers.iter() {
            // Identity encoding upstream: the relay may need to read the stream it forwards.
            // The gateway is the trust boundary: a client's credentials (perhaps a real
            // provider key) never travel further; the backend gets its configured key.
            if NOT_FORWARDED.contains(&name.as_str())
                || named_by_connection(client, name)
                || name == header::ACCEPT_ENCODING
                || name == header::AUTHORIZATION
                || name == header::COOKIE
            {
                continue;
            }
            h.append_header(name.clone(), value.clone())
                .map_err(internal)?;
        }
    } else {
        h.insert_header(header::CONTENT_TYPE, "application/json")
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

/// Whether the client's `Connection` header names `name`: such headers are hop-by-hop too
/// (RFC 9110 §7.6.1) and stop here, as in Pingora's own proxy.
fn named_by_connection(client: &RequestHeader, name: &http::HeaderName) -> bool {
    client
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case(name.as_str()))
}

/// The response header sent to the client, rebuilt from an allow-list (DESIGN §6 in the other
/// direction): the status, the dialect's own content type, the framing (length or chunked),
/// `Retry-After` on 429/503, and our own `no-store`/`nosniff`. Nothing else a backend or a peer
/// sends (cookies, CORS grants, redirects, its `Server`) reaches a client that shares an origin
/// with the admin page.
pub fn downstream_response(up: &ResponseHeader) -> ResponseHeader {
    // A status outside the final range (an upgrade, an interim answer) is not a model answer.
    let status = match up.status.as_u16() {
        200..=599 => up.status,
        _ => http::StatusCode::BAD_GATEWAY,
    };
    let mut h = ResponseHeader::build_no_case(status, Some(6))
        .expect("invariant: a status in 200..=599 is valid");
    let content_type = match stream_dialect(up) {
        Some(Dialect::OpenAi) => "text/event-stream",
        Some(Dialect::Ollama) => "application/x-ndjson",
        None => "application/json",
    };
    let _ = h.insert_header(header::CONTENT_TYPE, content_type);
    let length = up
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match length {
        Some(n) => {
            let _ = h.insert_header(header::CONTENT_LENGTH, n.to_string());
        }
        None => {
            let _ = h.insert_header(header::TRANSFER_ENCODING, "chunked");
        }
    }
    let retry_after = up
        .headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok());
    if let (Some(secs), 429 | 503) = (retry_after, status.as_u16()) {
        let _ = h.insert_header(header::RETRY_AFTER, secs.min(3600).to_string());
    }
    let _ = h.insert_header(header::CACHE_CONTROL, "no-store");
    let _ = h.insert_header(header::X_CONTENT_TYPE_OPTIONS, "nosniff");
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

#[cfg(test)]
mod tests;
