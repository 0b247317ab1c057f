//! `arknet registry serve`: the registry's HTTPS service (Pingora, BoringSSL), its routes, rate
//! limits and metrics. Connections go through the node's own [`crate::session::App`] (short
//! header and handshake deadlines, per-address bounds) and requests through the admin API's
//! axum plumbing ([`crate::admin::serve_router`]); every answer is signed by the registry's key.
//!
//! | route | body | answer |
//! |---|---|---|
//! | `POST /registry/v1/register` (also `/heartbeat`, `/update`) | `SignedRecord` | 200 `{"stored","listed","reachability":{"checked","reachable","detail"},"seq","expires"}` |
//! | `POST /registry/v1/delete` | `DeleteRequest` | 200 `{"deleted":true}` |
//! | `GET /registry/v1/records?model=&after=&limit=` | | 200 `{"records":[...],"next"}` |
//! | `GET /registry/v1/record?key=` or `?node_id=` | | 200 the record with `reachable`; 404 |
//! | `GET /registry/v1/info` | | 200 `{"public_key","policy"}` |
//! | `GET /metrics` | | Prometheus text |

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use pingora::protocols::http::ServerSession;
use prometheus::{Encoder as _, IntCounterVec, IntGauge, Opts, Registry as PromRegistry};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::OnceCell;

use super::config::RegistryConfig;
use super::record::{
    answer_signed_bytes, validate_binding, validate_delete, validate_write, DeleteRequest, Policy,
    Refusal, SignedRecord, Signer,
};
use super::store::{PutOutcome, Store, StoreError};
use crate::admin::ClientAddr;
use crate::identity::PublicKey;
use crate::mesh::client::{HelloError, MeshClient};
use crate::session::{BodyBudget, BodyLimits, Handler};

/// Answer header: the registry's Ed25519 public key.
pub const KEY_HEADER: &str = "x-arknet-registry-key";
/// Answer header: base64 signature of [`answer_signed_bytes`] of the body.
pub const SIGNATURE_HEADER: &str = "x-arknet-registry-signature";

/// Unix seconds now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Writes per key and per source address in fixed one-minute windows.
pub struct RateLimiter {
    per_key: u32,
    per_addr: u32,
    windows: Mutex<Windows>,
}

/// (minute, writes in it) per source address and per key. Two maps rather than one keyed by a
/// formatted string: a heartbeat looks its key up twice (room, then count) without allocating.
#[derive(Default)]
struct Windows {
    addrs: HashMap<IpAddr, (u64, u32)>,
    keys: HashMap<String, (u64, u32)>,
}

impl Windows {
    /// Old windows go in one sweep when a map grows: memory stays bounded by the writers of the
    /// current minute.
    fn sweep(&mut self, minute: u64) {
        if self.addrs.len() + self.keys.len() > 100_000 {
            self.addrs.retain(|_, (m, _)| *m == minute);
            self.keys.retain(|_, (m, _)| *m == minute);
        }
    }
}

/// Counts one write in `slot` for `minute`; false when that makes it over `limit`.
fn count(slot: &mut (u64, u32), minute: u64, limit: u32) -> bool {
    if slot.0 != minute {
        *slot = (minute, 0);
    }
    slot.1 += 1;
    slot.1 <= limit
}

impl RateLimiter {
    /// Limits per minute; 0 means unlimited.
    pub fn new(per_key: u32, per_addr: u32) -> Self {
        RateLimiter {
            per_key,
            per_addr,
            windows: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Windows> {
        self.windows.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a write from `ip`; false when over the limit.
    pub fn hit_addr(&self, ip: IpAddr, now: u64) -> bool {
        if self.per_addr == 0 {
            return true;
        }
        let minute = now / 60;
        let mut w = self.lock();
        w.sweep(minute);
        count(
            w.addrs.entry(ip).or_insert((minute, 0)),
            minute,
            self.per_addr,
        )
    }

    /// Counts a verified write by `key`; false when over the limit.
    pub fn hit_key(&self, key: &str, now: u64) -> bool {
        if self.per_key == 0 {
            return true;
        }
        let minute = now / 60;
        let mut w = self.lock();
        w.sweep(minute);
        if let Some(slot) = w.keys.get_mut(key) {
            return count(slot, minute, self.per_key);
        }
        let slot = w.keys.entry(key.to_owned()).or_insert((minute, 0));
        count(slot, minute, self.per_key)
    }

    /// Whether `key` may write once more this minute, without counting.
    pub fn key_has_room(&self, key: &str, now: u64) -> bool {
        if self.per_key == 0 {
            return true;
        }
        self.lock()
            .keys
            .get(key)
            .is_none_or(|(minute, n)| *minute != now / 60 || *n < self.per_key)
    }
}

/// The registry's Prometheus counters.
pub struct RegistryMetrics {
    registry: PromRegistry,
    writes: IntCounterVec,
    refusals: IntCounterVec,
    lookups: IntCounterVec,
    reachability: IntCounterVec,
    live: IntGauge,
}

impl RegistryMetrics {
    /// Registers every series, with each refusal reason present from the start.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = PromRegistry::new();
        let writes = IntCounterVec::new(
            Opts::new(
                "arknet_registry_writes_total",
                "Accepted writes by operation",
            ),
            &["op"],
        )?;
        let refusals = IntCounterVec::new(
            Opts::new("arknet_registry_refusals_total", "Refused writes by reason"),
            &["reason"],
        )?;
        let lookups = IntCounterVec::new(
            Opts::new("arknet_registry_lookups_total", "Look-ups by kind"),
            &["kind"],
        )?;
        let reachability = IntCounterVec::new(
            Opts::new(
                "arknet_registry_reachability_total",
                "Reachability checks by verdict",
            ),
            &["verdict"],
        )?;
        let live = IntGauge::new(
            "arknet_registry_records_live",
            "Live records at the last purge",
        )?;
        registry.register(Box::new(writes.clone()))?;
        registry.register(Box::new(refusals.clone()))?;
        registry.register(Box::new(lookups.clone()))?;
        registry.register(Box::new(reachability.clone()))?;
        registry.register(Box::new(live.clone()))?;
        for code in Refusal::CODES {
            refusals.with_label_values(&[code]);
        }
        Ok(RegistryMetrics {
            registry,
            writes,
            refusals,
            lookups,
            reachability,
            live,
        })
    }

    fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// What the routes share.
pub struct RegistryState {
    /// The records.
    pub store: Store,
    /// Write rules.
    pub policy: Policy,
    /// The registry's key, signing every answer.
    pub signer: Signer,
    /// Write rate limits.
    pub limiter: RateLimiter,
    /// Counters.
    pub metrics: RegistryMetrics,
    /// Dials endpoints before listing them; `None` when the check is off.
    pub checker: Option<Arc<MeshClient>>,
    /// Next purge of expired records, Unix seconds.
    pub next_purge: Mutex<u64>,
}

fn refusal(state: &RegistryState, r: &Refusal) -> Response {
    state.metrics.refusals.with_label_values(&[r.code()]).inc();
    let kind = match r.status() {
        401 => "authentication_error",
        429 => "rate_limit_error",
        _ => "invalid_request_error",
    };
    let status = StatusCode::from_u16(r.status()).unwrap_or(StatusCode::BAD_REQUEST);
    let body = json!({"error": {"message": r.to_string(), "type": kind, "code": r.code()}});
    let mut rsp = (status, Json(body)).into_response();
    if matches!(r, Refusal::RateLimited(_)) {
        rsp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
    }
    rsp
}

fn failure(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": "server_error", "code": code}});
    (status, Json(body)).into_response()
}

fn store_failure(e: &StoreError) -> Response {
    tracing::error!(error = %e, "registry database");
    failure(
        StatusCode::SERVICE_UNAVAILABLE,
        "storage_unavailable",
        "the registry's database is unavailable; retry later",
    )
}

/// The verdict of the reachability check, as the register answer reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Reachability {
    /// Whether the registry dialled the endpoint.
    pub checked: bool,
    /// Whether the endpoint answered a mutual-TLS hello with the record's key.
    pub reachable: bool,
    /// What happened, for the owner.
    pub detail: String,
}

async fn check_reachable(state: &RegistryState, endpoint: &str, key: &str) -> Reachability {
    let Some(client) = &state.checker else {
        return Reachability {
            checked: false,
            reachable: true,
            detail: "reachability check disabled on this registry".into(),
        };
    };
    let (Ok(addr), Ok(key)) = (endpoint.parse::<SocketAddr>(), key.parse::<PublicKey>()) else {
        return Reachability {
            checked: false,
            reachable: false,
            detail: "unparsable endpoint or key".into(),
        };
    };
    let (reachable, detail) = match client.hello(addr, Some(&key)).await {
        Ok(_) => (true, format!("{endpoint} answered a hello proving the key")),
        Err(HelloError::Spoof(e)) => (false, format!("{endpoint} did not prove the key: {e}")),
        Err(e) => (false, format!("{endpoint}: {e}")),
    };
    let verdict = if reachable {
        "reachable"
    } else {
        "unreachable"
    };
    state
        .metrics
        .reachability
        .with_label_values(&[verdict])
        .inc();
    Reachability {
        checked: true,
        reachable,
        detail,
    }
}

fn client_ip(addr: &ClientAddr) -> IpAddr {
    addr.0
        .map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip().to_canonical())
}

async fn purge_if_due(state: &Arc<RegistryState>, now: u64) {
    {
        let mut next = state
            .next_purge
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if now < *next {
            return;
        }
        *next = now + 30;
    }
    let state = state.clone();
    tokio::spawn(async move {
        match state.store.purge_expired(now).await {
            Ok(n) if n > 0 => tracing::info!(purged = n, "expired registry records removed"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "registry purge failed"),
        }
        if let Ok(live) = state.store.count_live(now).await {
            state
                .metrics
                .live
                .set(i64::try_from(live).unwrap_or(i64::MAX));
        }
    });
}

async fn register(
    State(state): State<Arc<RegistryState>>,
    Extension(addr): Extension<ClientAddr>,
    body: Bytes,
) -> Response {
    let now = unix_now();
    purge_if_due(&state, now).await;
    if !state.limiter.hit_addr(client_ip(&addr), now) {
        return refusal(&state, &Refusal::RateLimited("address"));
    }
    let signed: SignedRecord = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(e) => return refusal(&state, &Refusal::Malformed(e.to_string())),
    };
    let r = &signed.record;
    // Everything that does not depend on what is stored, the signature included, before the
    // database is touched: an unsigned or forged write learns nothing and costs no read.
    if let Err(refused) = validate_write(&signed, None, None, now, &state.policy) {
        return refusal(&state, &refused);
    }
    let reached_before = || Reachability {
        checked: state.checker.is_some(),
        reachable: true,
        detail: "unchanged endpoint, reached before".into(),
    };
    // The common write, a heartbeat of an unchanged record, is one conditional update in the
    // writer's next group commit; anything else (a replay included) takes the full path.
    if state.limiter.key_has_room(&r.public_key, now) {
        match state.store.heartbeat(&signed).await {
            Ok(true) => {
                state.limiter.hit_key(&r.public_key, now);
                return stored_answer(&state, r, &reached_before());
            }
            Ok(false) => {}
            Err(e) => return store_failure(&e),
        }
    }
    let (stored, owner) = match state.store.binding(&r.public_key, &r.node_id).await {
        Ok(b) => b,
        Err(e) => return store_failure(&e),
    };
    // The signature was verified above; only the stored-state checks are left.
    if let Err(refused) = validate_binding(&signed, stored.as_ref(), owner.as_deref()) {
        return refusal(&state, &refused);
    }
    // Counted only once the signature and the binding checked out: forged writes and replays
    // of a node's published record cannot spend its quota.
    if !state.limiter.hit_key(&r.public_key, now) {
        return refusal(&state, &Refusal::RateLimited("key"));
    }
    // A heartbeat from where the registry already reached the node needs no new dial.
    let reach = match &stored {
        Some(s) if s.reachable && s.endpoint == r.endpoint => reached_before(),
        _ => check_reachable(&state, &r.endpoint, &r.public_key).await,
    };
    match state
        .store
        .put(
            &signed,
            reach.reachable,
            stored.as_ref().map(|s| s.models.as_str()),
        )
        .await
    {
        Ok(PutOutcome::Stored) => {}
        Ok(PutOutcome::Replay) => {
            let stored_seq = stored.map_or(0, |s| s.seq);
            return refusal(
                &state,
                &Refusal::Replay {
                    stored: stored_seq,
                    got: r.seq,
                },
            );
        }
        Ok(PutOutcome::NodeIdTaken) => {
            return refusal(&state, &Refusal::NodeIdTaken(r.node_id.clone()))
        }
        Err(e) => return store_failure(&e),
    }
    stored_answer(&state, r, &reach)
}

/// The answer to a stored register/heartbeat.
fn stored_answer(
    state: &RegistryState,
    r: &super::record::Record,
    reach: &Reachability,
) -> Response {
    state.metrics.writes.with_label_values(&["register"]).inc();
    Json(json!({
        "stored": true,
        "listed": reach.reachable,
        "reachability": reach,
        "node_id": r.node_id,
        "seq": r.seq,
        "expires": r.expires,
    }))
    .into_response()
}

async fn delete(
    State(state): State<Arc<RegistryState>>,
    Extension(addr): Extension<ClientAddr>,
    body: Bytes,
) -> Response {
    let now = unix_now();
    if !state.limiter.hit_addr(client_ip(&addr), now) {
        return refusal(&state, &Refusal::RateLimited("address"));
    }
    let req: DeleteRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return refusal(&state, &Refusal::Malformed(e.to_string())),
    };
    let stored = match state.store.binding(&req.public_key, &req.node_id).await {
        Ok((stored, _)) => stored,
        Err(e) => return store_failure(&e),
    };
    if let Err(refused) = validate_delete(&req, stored.as_ref(), now, &state.policy) {
        return refusal(&state, &refused);
    }
    if !state.limiter.hit_key(&req.public_key, now) {
        return refusal(&state, &Refusal::RateLimited("key"));
    }
    let keep_until = now + state.policy.clock_window + 1;
    match state
        .store
        .delete(&req.public_key, req.seq, keep_until)
        .await
    {
        Ok(true) => {
            state.metrics.writes.with_label_values(&["delete"]).inc();
            Json(json!({"deleted": true, "node_id": req.node_id})).into_response()
        }
        Ok(false) => refusal(
            &state,
            &Refusal::Replay {
                stored: stored.map_or(0, |s| s.seq),
                got: req.seq,
            },
        ),
        Err(e) => store_failure(&e),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    after: Option<String>,
    #[serde(default)]
    limit: Option<u32>,
}

async fn records(State(state): State<Arc<RegistryState>>, Query(q): Query<ListQuery>) -> Response {
    let now = unix_now();
    let after = q.after.unwrap_or_default();
    let limit = q.limit.unwrap_or(100).clamp(1, super::store::MAX_PAGE);
    let (kind, found) = match &q.model {
        Some(m) => ("model", state.store.by_model(m, &after, limit, now).await),
        None => ("all", state.store.list(&after, limit, now).await),
    };
    let found = match found {
        Ok(f) => f,
        Err(e) => return store_failure(&e),
    };
    state.metrics.lookups.with_label_values(&[kind]).inc();
    let full = u32::try_from(found.len()).unwrap_or(u32::MAX) >= limit;
    let next = found
        .last()
        .filter(|_| full)
        .map(|l| l.signed.record.public_key.clone());
    Json(json!({"records": found, "next": next, "registry_time": now})).into_response()
}

#[derive(Deserialize)]
struct OneQuery {
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    node_id: Option<String>,
}

async fn record(State(state): State<Arc<RegistryState>>, Query(q): Query<OneQuery>) -> Response {
    let Some(what) = q.key.or(q.node_id) else {
        return failure(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "give ?key=<public key> or ?node_id=<id>",
        );
    };
    state.metrics.lookups.with_label_values(&["key"]).inc();
    match state.store.get(&what, unix_now()).await {
        Ok(Some(l)) => Json(l).into_response(),
        Ok(None) => failure(StatusCode::NOT_FOUND, "not_found", "no live record"),
        Err(e) => store_failure(&e),
    }
}

async fn info(State(state): State<Arc<RegistryState>>) -> Response {
    Json(json!({
        "public_key": state.signer.public_key().to_string(),
        "policy": {
            "allow_private": state.policy.allow_private,
            "clock_window_secs": state.policy.clock_window,
            "max_ttl_secs": state.policy.max_ttl,
            "max_models": state.policy.max_models,
            "max_record_bytes": state.policy.max_record_bytes,
            "reachability_check": state.checker.is_some(),
        },
    }))
    .into_response()
}

async fn metrics(State(state): State<Arc<RegistryState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn not_found() -> Response {
    failure(StatusCode::NOT_FOUND, "not_found", "no such registry route")
}

/// Signs every answer: the registry's key and a signature over the domain line and the body.
async fn sign_answer(
    State(state): State<Arc<RegistryState>>,
    req: Request,
    next: Next,
) -> Response {
    let (mut parts, body) = next.run(req).await.into_parts();
    let bytes = axum::body::to_bytes(body, 64 * 1024 * 1024)
        .await
        .unwrap_or_default();
    let signature = state.signer.sign_b64(&answer_signed_bytes(&bytes));
    for (name, value) in [
        (KEY_HEADER, state.signer.public_key().to_string()),
        (SIGNATURE_HEADER, signature),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            parts.headers.insert(name, v);
        }
    }
    Response::from_parts(parts, Body::from(bytes))
}

/// The registry's routes over `state`; [`ClientAddr`] must be in each request's extensions.
pub fn router(state: Arc<RegistryState>) -> Router {
    Router::new()
        .route("/registry/v1/register", post(register))
        .route("/registry/v1/heartbeat", post(register))
        .route("/registry/v1/update", post(register))
        .route("/registry/v1/delete", post(delete))
        .route("/registry/v1/records", get(records))
        .route("/registry/v1/record", get(record))
        .route("/registry/v1/info", get(info))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), sign_answer))
        .with_state(state)
}

/// What the registry needs to build its state once it runs on the service's runtime.
pub struct Parts {
    /// The validated config.
    pub config: RegistryConfig,
    /// The registry's key (PKCS#8 PEM of its identity).
    pub key_pem: String,
    /// The reachability checker, when on.
    pub checker: Option<Arc<MeshClient>>,
}

/// The Pingora handler: opens the store on the service's own runtime at the first request
/// (a database connection belongs to the runtime that opened it), then serves the router.
pub struct RegistryHandler {
    parts: Parts,
    signer: Option<Signer>,
    router: OnceCell<(Router, Arc<RegistryState>)>,
    bodies: BodyLimits,
}

impl RegistryHandler {
    /// A handler over `parts`.
    pub fn new(parts: Parts) -> Self {
        let bodies = BodyLimits {
            max_bytes: parts.config.max_body_bytes,
            budget: BodyBudget::new(64 * 1024 * 1024),
        };
        RegistryHandler {
            signer: Signer::from_pkcs8_pem(&parts.key_pem).ok(),
            parts,
            router: OnceCell::new(),
            bodies,
        }
    }

    async fn router(&self) -> Result<&Router, String> {
        self.router
            .get_or_try_init(|| async {
                let store = Store::open(&self.parts.config.database)
                    .await
                    .map_err(|e| e.to_string())?;
                let state = Arc::new(build_state(&self.parts, store)?);
                Ok((router(state.clone()), state))
            })
            .await
            .map(|(r, _)| r)
    }
}

/// The shared state over an opened store.
pub fn build_state(parts: &Parts, store: Store) -> Result<RegistryState, String> {
    let c = &parts.config;
    Ok(RegistryState {
        store,
        policy: c.policy.clone(),
        signer: Signer::from_pkcs8_pem(&parts.key_pem)?,
        limiter: RateLimiter::new(c.writes_per_key_per_minute, c.writes_per_address_per_minute),
        metrics: RegistryMetrics::new().map_err(|e| e.to_string())?,
        checker: parts.checker.clone(),
        next_purge: Mutex::new(0),
    })
}

#[async_trait]
impl Handler for RegistryHandler {
    async fn handle(&self, session: &mut ServerSession) -> bool {
        let path = session.req_header().uri.path().to_string();
        let declared = session
            .req_header()
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<usize>().ok());
        if declared.is_some_and(|n| n > self.bodies.max_bytes) {
            // Refused before reading a byte of it, and signed like every answer.
            let r = Refusal::Oversized(format!(
                "body of {} bytes, at most {}",
                declared.unwrap_or_default(),
                self.bodies.max_bytes
            ));
            if let Some((_, state)) = self.router.get() {
                state.metrics.refusals.with_label_values(&[r.code()]).inc();
            }
            let body = json!({"error": {"message": r.to_string(),
                "type": "invalid_request_error", "code": r.code()}});
            let bytes = body.to_string().into_bytes();
            let mut headers = Vec::new();
            if let Some(signer) = &self.signer {
                headers.push((KEY_HEADER, signer.public_key().to_string()));
                headers.push((
                    SIGNATURE_HEADER,
                    signer.sign_b64(&answer_signed_bytes(&bytes)),
                ));
            }
            session.set_keepalive(None);
            crate::session::reply_with(
                session,
                r.status(),
                "application/json",
                bytes.into(),
                &headers,
            )
            .await;
            return false;
        }
        let router = match self.router().await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "registry cannot open its database");
                let body = json!({"error": {"message": "the registry's database is unavailable",
                    "type": "server_error", "code": "storage_unavailable"}});
                return crate::session::reply_json(session, 503, &body)
                    .await
                    .reusable;
            }
        };
        crate::admin::serve_router(session, router, &self.bodies, &path)
            .await
            .reusable
    }
}

/// How long the registry's own hello to a node may take.
pub const REACH_TIMEOUT: Duration = crate::mesh::client::HELLO_TIMEOUT;

#[cfg(test)]
mod tests {
    use super::RateLimiter;
    use std::net::{IpAddr, Ipv4Addr};

    #[test]
    fn limits_count_per_key_and_per_address_in_minute_windows() {
        let l = RateLimiter::new(2, 3);
        let now = 600;
        assert!(l.key_has_room("k1", now));
        assert!(l.hit_key("k1", now) && l.hit_key("k1", now + 1));
        // Room is checked without counting: asking twice changes nothing.
        assert!(!l.key_has_room("k1", now) && !l.key_has_room("k1", now));
        assert!(!l.hit_key("k1", now + 2), "third write of the minute");
        assert!(l.hit_key("k2", now), "another key has its own window");
        assert!(
            l.key_has_room("k1", now + 60) && l.hit_key("k1", now + 60),
            "next minute"
        );
        let ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        assert!((0..3).all(|_| l.hit_addr(ip, now)));
        assert!(!l.hit_addr(ip, now), "fourth write from the address");
        assert!(l.hit_addr(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)), now));
        let unlimited = RateLimiter::new(0, 0);
        assert!((0..1000).all(|_| unlimited.hit_key("k", now) && unlimited.hit_addr(ip, now)));
    }
}
