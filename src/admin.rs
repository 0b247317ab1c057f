//! The owner's admin API, served on the API listener.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/status` | this node, approvals file state, counts |
//! | GET | `/peers/discovered` | every node seen or approved, with state and how it was seen |
//! | GET | `/peers/pending` | seen or refused, not approved |
//! | GET | `/peers/approved` | the approvals (the file's content) |
//! | GET | `/peers/status` | per approved peer: reachable, last hello, latency, in flight, models |
//! | POST | `/peers/approve` | `{"node_id","public_key","name"?,"permissions"?,"endpoint"?}` |
//! | POST | `/peers/revoke` | `{"node_id"}` or `{"public_key"}` |
//! | PATCH | `/peers/{node_id or key}` | merge `{"permissions":{...}}` into the peer's |
//! | PUT | `/peers/{node_id or key}` | replace the peer's permissions |
//! | GET | `/audit?limit=N` | the last N audit entries (default 100, at most 1000) |
//!
//! Every route, reads included, is private ([`trust`], DESIGN §7): the owner (a program on the
//! node talking to it directly, not on behalf of another site) needs nothing; anybody else
//! (through Nginx, from the LAN) needs `Authorization: Bearer <admin.token>`. Changes take a
//! JSON body only and are refused when a browser says another site sent them.
//! Handlers are an axum [`Router`] so tests can drive them without sockets.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use serde::Deserialize;
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::identity::NodeInfo;
use crate::identity::PublicKey;
use crate::peers::store::{ApprovedPeer, Permissions};
use crate::peers::{ChangeError, PeerTable, Selector};
use crate::session::{read_body_or_reply, BodyLimits, Outcome};
use trust::{HostPolicy, Refusal};

pub mod trust;

/// The admin page: one self-contained HTML file (no CDN, no build step), embedded in the
/// binary. It calls the admin API with relative URLs, so it works at `/` and behind Nginx at
/// `/arknet/`.
pub const PAGE: &str = include_str!("admin/page.html");

/// Largest admin request body.
pub const MAX_ADMIN_BODY: usize = 1024 * 1024;

/// Where a request came from, attached by the listener.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub Option<SocketAddr>);

/// What the handlers share.
pub struct AdminState {
    /// The peer table.
    pub peers: Arc<PeerTable>,
    /// This node.
    pub node: NodeInfo,
    /// Bearer token for callers other than the owner.
    pub token: String,
    /// The `Host` names we answer to, and the names an admin page may be served from.
    pub hosts: HostPolicy,
    /// Body limits for admin requests (small; the node-wide budget).
    pub bodies: BodyLimits,
    /// The audit log, for `/audit`.
    pub audit: Arc<crate::audit::AuditLog>,
}

/// The admin API as mounted on the API listener.
#[derive(Clone)]
pub struct Admin {
    router: Router,
    bodies: BodyLimits,
    hosts: HostPolicy,
}

impl Admin {
    /// Builds the router over `state`.
    pub fn new(state: Arc<AdminState>) -> Self {
        Admin {
            bodies: state.bodies.clone(),
            hosts: state.hosts.clone(),
            router: router(state),
        }
    }

    /// The `Host` names the node answers to (the gateway checks every request against them).
    pub fn hosts(&self) -> &HostPolicy {
        &self.hosts
    }

    /// Serves one admin request from a Pingora session through the router.
    pub async fn serve(&self, s: &mut ServerSession, path: &str) -> Outcome {
        serve_router(s, &self.router, &self.bodies, path).await
    }
}

/// Serves one request from a Pingora session through an axum `router`: the body is read under
/// `bodies`, the client address is put in the request's extensions as [`ClientAddr`], and the
/// answer is written whole. Shared by the admin API and the registry.
pub async fn serve_router(
    s: &mut ServerSession,
    router: &Router,
    bodies: &BodyLimits,
    path: &str,
) -> Outcome {
    let body = match read_body_or_reply(s, bodies, crate::error::Dialect::OpenAi).await {
        Ok(b) => b,
        Err(outcome) => return outcome,
    };
    let req_header = s.req_header();
    let uri = match req_header.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let mut builder = axum::http::Request::builder()
        .method(req_header.method.clone())
        .uri(uri);
    for (name, value) in req_header.headers.iter() {
        builder = builder.header(name, value);
    }
    let client = ClientAddr(s.client_addr().and_then(|a| a.as_inet()).copied());
    let request = match builder.extension(client).body(Body::from(body.bytes)) {
        Ok(r) => r,
        Err(e) => return reply(s, error(StatusCode::BAD_REQUEST, &e.to_string())).await,
    };
    let response = match router.clone().oneshot(request).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    reply(s, response).await
}

async fn reply(s: &mut ServerSession, response: Response) -> Outcome {
    let (parts, body) = response.into_parts();
    let status = parts.status.as_u16();
    let bytes: Bytes = axum::body::to_bytes(body, 16 * 1024 * 1024)
        .await
        .unwrap_or_default();
    let Ok(mut h) = ResponseHeader::build(status, Some(parts.headers.len() + 1)) else {
        return Outcome::answered(status, false);
    };
    for (name, value) in parts.headers.iter() {
        let _ = h.append_header(name.clone(), value.clone());
    }
    let _ = h.insert_header(header::CONTENT_LENGTH, bytes.len().to_string());
    for (name, value) in crate::session::OWN_HEADERS {
        let _ = h.insert_header(name, value);
    }
    let ok = s.write_response_header(Box::new(h)).await.is_ok()
        && s.write_response_body(bytes, true).await.is_ok();
    Outcome::answered(status, ok)
}

/// The admin routes over `state`; `ClientAddr` must be in each request's extensions.
pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/peers", get(approved))
        .route("/peers/approved", get(approved))
        .route("/peers/discovered", get(discovered))
        .route("/peers/pending", get(pending))
        .route("/peers/status", get(peer_status))
        .route("/peers/approve", post(approve))
        .route("/peers/revoke", post(revoke))
        .route("/peers/{id}", patch(patch_peer).put(put_peer))
        .route("/audit", get(audit))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such admin route") })
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Reads (or creates, mode 0600) the admin token in the data dir.
pub fn load_or_create_token(path: &Path) -> std::io::Result<String> {
    let exists_empty = match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    };
    use ring::rand::SecureRandom;
    let mut raw = [0u8; 24];
    ring::rand::SystemRandom::new()
        .fill(&mut raw)
        .map_err(|_| std::io::Error::other("no system randomness"))?;
    let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let line = format!("{token}\n");
    if exists_empty {
        crate::fsutil::write_atomic(path, line.as_bytes(), 0o600)?;
        return Ok(token);
    }
    if crate::fsutil::create_new_atomic(path, line.as_bytes(), 0o600)? {
        return Ok(token);
    }
    // Created meanwhile by another process: the token on disk is the one clients will read.
    Ok(std::fs::read_to_string(path)?.trim().to_string())
}

fn error(status: StatusCode, message: &str) -> Response {
    let code = match status {
        StatusCode::BAD_REQUEST => "invalid_request",
        StatusCode::UNAUTHORIZED => "admin_token_required",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::CONFLICT => "conflict",
        StatusCode::FORBIDDEN => "cross_site_request",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        _ => "internal_error",
    };
    (
        status,
        Json(json!({"error": {"message": message, "type": "invalid_request_error", "code": code}})),
    )
        .into_response()
}

/// The trust boundary in front of every admin route (see [`trust`]).
async fn guard(State(state): State<Arc<AdminState>>, req: Request, next: Next) -> Response {
    let facts = trust::RequestFacts {
        method: req.method(),
        headers: req.headers(),
        client_ip: req
            .extensions()
            .get::<ClientAddr>()
            .and_then(|c| c.0)
            .map(|a| a.ip()),
        token_ok: bearer_matches(req.headers(), &state.token),
    };
    match trust::check_admin(&facts, &state.hosts) {
        Ok(_) => next.run(req).await,
        Err(Refusal::TokenRequired) => error(
            StatusCode::UNAUTHORIZED,
            "the admin API needs `Authorization: Bearer <token>` from here (the token is in the node's data dir, admin.token); only a program on the node itself, talking to it directly, needs none",
        ),
        Err(Refusal::CrossSite(why)) => error(
            StatusCode::FORBIDDEN,
            &format!("refused: another site sent this change ({why}); change approvals from the admin page or with curl on the node"),
        ),
        Err(Refusal::NotJson) => error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "admin changes take a JSON body with `Content-Type: application/json`",
        ),
    }
}

fn bearer_matches(headers: &HeaderMap, token: &str) -> bool {
    // Auth schemes are case-insensitive (RFC 9110 §11.1).
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token)
    else {
        return false;
    };
    // Compare every byte whatever the first difference: the token must not leak through timing.
    let (given, token) = (given.trim().as_bytes(), token.as_bytes());
    given.len() == token.len()
        && given
            .iter()
            .zip(token)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn status(State(state): State<Arc<AdminState>>) -> Json<Value> {
    let approvals = state.peers.approvals();
    Json(json!({
        "node_id": state.node.node_id,
        "public_key": state.node.public_key.to_string(),
        "version": env!("CARGO_PKG_VERSION"),
        "approved_peers": approvals.file.peers.len(),
        "pending_peers": state.peers.pending().len(),
        "approvals_file": {
            "path": state.peers.path().display().to_string(),
            "valid": state.peers.file_error().is_none(),
            "error": state.peers.file_error(),
        },
    }))
}

/// `GET /audit` query.
#[derive(Debug, Deserialize)]
struct AuditQuery {
    limit: Option<usize>,
}

async fn audit(
    State(state): State<Arc<AdminState>>,
    axum::extract::Query(q): axum::extract::Query<AuditQuery>,
) -> Json<Value> {
    let limit = q.limit.unwrap_or(100).min(1000);
    Json(json!({ "entries": state.audit.recent(limit) }))
}

async fn approved(State(state): State<Arc<AdminState>>) -> Json<Value> {
    Json(serde_json::to_value(&state.peers.approvals().file).unwrap_or(Value::Null))
}

async fn discovered(State(state): State<Arc<AdminState>>) -> Json<Value> {
    Json(json!({ "peers": state.peers.discovered() }))
}

async fn pending(State(state): State<Arc<AdminState>>) -> Json<Value> {
    Json(json!({ "peers": state.peers.pending() }))
}

async fn peer_status(State(state): State<Arc<AdminState>>) -> Json<Value> {
    let approvals = state.peers.approvals();
    let now = crate::peers::reputation::unix_now();
    let peers: Vec<Value> = approvals
        .file
        .peers
        .iter()
        .map(|p| {
            let status = state.peers.status(&p.public_key);
            let runtime = state.peers.runtime(&p.public_key);
            json!({
                "node_id": p.node_id,
                "name": p.name,
                "public_key": p.public_key.to_string(),
                "permissions": p.permissions,
                "endpoint": state.peers.endpoint_of(&p.public_key),
                "reachable": status.reachable,
                "last_hello": status.last_hello,
                "latency_ms": status.latency_ms,
                "models_shared_with_us": status.models,
                "models_we_share": p.permissions.models_shared,
                "models_pullable_by_us": status.pullable,
                "in_flight": runtime.as_ref().map_or(0, |r| r.in_flight()),
                "max_concurrent_requests": p.permissions.max_concurrent_requests,
                "error": status.error,
                "reputation": state.peers.reputations().get(&p.public_key).summary(now),
            })
        })
        .collect();
    Json(json!({
        "peers": peers,
        "approvals_file": {"valid": state.peers.file_error().is_none(), "error": state.peers.file_error()},
    }))
}

/// `POST /peers/approve` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApproveBody {
    node_id: String,
    public_key: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    permissions: Option<PermissionsBody>,
    #[serde(default)]
    endpoint: Option<String>,
}

/// Permissions as sent by clients: every field optional (defaults, or the current value for
/// PATCH).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PermissionsBody {
    can_request_inference: Option<bool>,
    can_pull_models: Option<bool>,
    models_shared: Option<Vec<String>>,
    max_concurrent_requests: Option<u32>,
}

impl PermissionsBody {
    fn apply(self, p: &mut Permissions) {
        if let Some(v) = self.can_request_inference {
            p.can_request_inference = v;
        }
        if let Some(v) = self.can_pull_models {
            p.can_pull_models = v;
        }
        if let Some(v) = self.models_shared {
            p.models_shared = v;
        }
        if let Some(v) = self.max_concurrent_requests {
            p.max_concurrent_requests = v;
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PermissionsOnly {
    permissions: PermissionsBody,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    #[serde(default)]
    node_id: Option<String>,
    #[serde(default)]
    public_key: Option<String>,
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("request body: {e}"))
}

fn parse_key(field: &str, s: &str) -> Result<PublicKey, String> {
    s.parse().map_err(|e| format!("{field}: {e}"))
}

fn bad_request(message: String) -> Response {
    error(StatusCode::BAD_REQUEST, &message)
}

fn change_error(e: ChangeError) -> Response {
    let status = match &e {
        ChangeError::FileCorrupt(_) | ChangeError::Conflict(_) => StatusCode::CONFLICT,
        ChangeError::NotFound(_) => StatusCode::NOT_FOUND,
        ChangeError::Write(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, &e.to_string())
}

fn peer_json(p: &ApprovedPeer) -> Json<Value> {
    Json(serde_json::to_value(p).unwrap_or(Value::Null))
}

async fn approve(State(state): State<Arc<AdminState>>, body: Bytes) -> Response {
    let b: ApproveBody = match parse_body(&body) {
        Ok(b) => b,
        Err(m) => return bad_request(m),
    };
    if !crate::config::valid_node_id(&b.node_id) {
        return error(
            StatusCode::BAD_REQUEST,
            "node_id: use 1-64 characters from a-z, A-Z, 0-9, '-', '_', '.'",
        );
    }
    let key = match parse_key("public_key", &b.public_key) {
        Ok(k) => k,
        Err(m) => return bad_request(m),
    };
    if key == state.node.public_key {
        return error(
            StatusCode::BAD_REQUEST,
            "public_key: that is this node's own key",
        );
    }
    if let Some(ep) = &b.endpoint {
        if ep.parse::<SocketAddr>().is_err() {
            return error(StatusCode::BAD_REQUEST, "endpoint: expected ip:port");
        }
    }
    let mut permissions = Permissions::default();
    b.permissions.unwrap_or_default().apply(&mut permissions);
    let peer = ApprovedPeer {
        node_id: b.node_id,
        public_key: key,
        name: b.name.unwrap_or_default(),
        approved_at: String::new(),
        permissions,
        endpoint: b.endpoint,
        extra: Default::default(),
    };
    match state.peers.approve(peer).await {
        Ok(p) => {
            tracing::info!(node_id = %p.node_id, public_key = %p.public_key, "peer approved");
            peer_json(&p).into_response()
        }
        Err(e) => change_error(e),
    }
}

async fn revoke(State(state): State<Arc<AdminState>>, body: Bytes) -> Response {
    let b: RevokeBody = match parse_body(&body) {
        Ok(b) => b,
        Err(m) => return bad_request(m),
    };
    let selector = match (b.node_id, b.public_key) {
        (Some(id), None) => Selector::NodeId(id),
        (None, Some(k)) => match parse_key("public_key", &k) {
            Ok(k) => Selector::Key(k),
            Err(m) => return bad_request(m),
        },
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "give exactly one of node_id or public_key",
            )
        }
    };
    match state.peers.revoke(&selector).await {
        Ok(p) => {
            tracing::info!(node_id = %p.node_id, public_key = %p.public_key, "peer revoked");
            Json(json!({"revoked": serde_json::to_value(&p).unwrap_or(Value::Null)}))
                .into_response()
        }
        Err(e) => change_error(e),
    }
}

fn selector_of(id: &str) -> Selector {
    match id.parse::<PublicKey>() {
        Ok(k) if id.len() == 44 => Selector::Key(k),
        _ => Selector::NodeId(id.to_string()),
    }
}

async fn patch_peer(
    State(state): State<Arc<AdminState>>,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> Response {
    let b: PermissionsOnly = match parse_body(&body) {
        Ok(b) => b,
        Err(m) => return bad_request(m),
    };
    match state
        .peers
        .update(&selector_of(&id), |p| b.permissions.apply(p))
        .await
    {
        Ok(p) => peer_json(&p).into_response(),
        Err(e) => change_error(e),
    }
}

async fn put_peer(
    State(state): State<Arc<AdminState>>,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> Response {
    let b: PermissionsOnly = match parse_body(&body) {
        Ok(b) => b,
        Err(m) => return bad_request(m),
    };
    let mut fresh = Permissions::default();
    b.permissions.apply(&mut fresh);
    match state.peers.update(&selector_of(&id), |p| *p = fresh).await {
        Ok(p) => peer_json(&p).into_response(),
        Err(e) => change_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request as HttpRequest;

    fn state(dir: &Path) -> Arc<AdminState> {
        Arc::new(AdminState {
            peers: Arc::new(PeerTable::open(dir)),
            node: NodeInfo {
                node_id: "me".into(),
                public_key: PublicKey::from_bytes([0; 32]),
            },
            token: "secret".into(),
            hosts: HostPolicy::default(),
            bodies: BodyLimits {
                max_bytes: MAX_ADMIN_BODY,
                budget: crate::session::BodyBudget::new(1 << 20),
            },
            audit: Arc::new(crate::audit::AuditLog::open(dir, 1 << 20).expect("audit")),
        })
    }

    async fn call(
        state: &Arc<AdminState>,
        method: &str,
        uri: &str,
        from: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, Value) {
        let mut b = HttpRequest::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        // Changes carry JSON, as every real client of the API sends it.
        if method != "GET"
            && !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            b = b.header("content-type", "application/json");
        }
        let req = b
            .extension(ClientAddr(Some(from.parse().expect("addr"))))
            .body(Body::from(body.to_string()))
            .expect("request");
        let rsp = router(state.clone())
            .oneshot(req)
            .await
            .expect("infallible");
        let status = rsp.status().as_u16();
        let bytes = axum::body::to_bytes(rsp.into_body(), 1 << 20)
            .await
            .expect("body");
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    const KEY: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";

    #[tokio::test]
    async fn loopback_without_forwarding_headers_may_approve() {
        let dir = tempfile::tempdir().expect("tempdir");
        let st = state(dir.path());
        let body = format!(
            r#"{{"node_id":"dave","public_key":"{KEY}","permissions":{{"models_shared":["m"],"max_concurrent_requests":2}}}}"#
        );
        let (status, v) = call(&st, "POST", "/peers/approve", "127.0.0.1:5000", &[], &body).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["permissions"]["max_concurrent_requests"], 2);
        assert_eq!(v["permissions"]["can_request_inference"], true);
        let (_, listed) = call(&st, "GET", "/peers/approved", "127.0.0.1:1", &[], "").await;
        assert_eq!(listed["peers"][0]["node_id"], "dave");
        let (status, _) = call(&st, "GET", "/peers/approved", "10.0.0.9:1", &[], "").await;
        assert_eq!(status, 401, "reads from elsewhere need the token");
        let token = [("authorization", "Bearer secret")];
        let (status, _) = call(&st, "GET", "/peers/approved", "10.0.0.9:1", &token, "").await;
        assert_eq!(status, 200);
    }

    #[tokio::test]
    async fn forwarded_or_remote_mutations_need_the_token() {
        let dir = tempfile::tempdir().expect("tempdir");
        let st = state(dir.path());
        let body = format!(r#"{{"node_id":"dave","public_key":"{KEY}"}}"#);
        let (s1, _) = call(
            &st,
            "POST",
            "/peers/approve",
            "127.0.0.1:5000",
            &[("x-forwarded-for", "1.2.3.4")],
            &body,
        )
        .await;
        let (s2, _) = call(
            &st,
            "POST",
            "/peers/approve",
            "192.168.1.5:5000",
            &[],
            &body,
        )
        .await;
        let (s3, _) = call(
            &st,
            "POST",
            "/peers/approve",
            "192.168.1.5:5000",
            &[("authorization", "Bearer wrong")],
            &body,
        )
        .await;
        assert_eq!((s1, s2, s3), (401, 401, 401));
        assert!(st.peers.approvals().file.peers.is_empty());
        let (s4, _) = call(
            &st,
            "POST",
            "/peers/approve",
            "192.168.1.5:5000",
            &[("authorization", "bearer secret")],
            &body,
        )
        .await;
        assert_eq!(s4, 200);
    }

    #[tokio::test]
    async fn bad_bodies_get_400_naming_the_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let st = state(dir.path());
        for (body, field) in [
            (r#"{"public_key":"x"}"#.to_string(), "node_id"),
            (
                format!(r#"{{"node_id":"a b","public_key":"{KEY}"}}"#),
                "node_id",
            ),
            (
                r#"{"node_id":"a","public_key":"short"}"#.to_string(),
                "public_key",
            ),
            (
                format!(r#"{{"node_id":"a","public_key":"{KEY}","permisions":{{}}}}"#),
                "permisions",
            ),
            (
                format!(r#"{{"node_id":"a","public_key":"{KEY}","endpoint":"nowhere"}}"#),
                "endpoint",
            ),
            ("not json".to_string(), "body"),
        ] {
            let (status, v) = call(&st, "POST", "/peers/approve", "127.0.0.1:1", &[], &body).await;
            assert_eq!(status, 400, "{body}");
            let msg = v["error"]["message"].as_str().unwrap_or_default();
            assert!(msg.contains(field), "{body}: {msg}");
        }
    }

    #[tokio::test]
    async fn patch_merges_and_put_replaces_and_revoke_removes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let st = state(dir.path());
        let body = format!(
            r#"{{"node_id":"dave","public_key":"{KEY}","permissions":{{"models_shared":["a","b"],"max_concurrent_requests":3}}}}"#
        );
        assert_eq!(
            call(&st, "POST", "/peers/approve", "127.0.0.1:1", &[], &body)
                .await
                .0,
            200
        );
        let (s, v) = call(
            &st,
            "PATCH",
            "/peers/dave",
            "127.0.0.1:1",
            &[],
            r#"{"permissions":{"models_shared":["a"]}}"#,
        )
        .await;
        assert_eq!(s, 200);
        assert_eq!(
            v["permissions"]["max_concurrent_requests"], 3,
            "PATCH keeps what it does not name"
        );
        let (s, v) = call(
            &st,
            "PUT",
            "/peers/dave",
            "127.0.0.1:1",
            &[],
            r#"{"permissions":{"models_shared":["c"]}}"#,
        )
        .await;
        assert_eq!(s, 200);
        assert_eq!(
            v["permissions"]["max_concurrent_requests"], 1,
            "PUT starts from defaults"
        );
        let (s, _) = call(
            &st,
            "POST",
            "/peers/revoke",
            "127.0.0.1:1",
            &[],
            r#"{"node_id":"nobody"}"#,
        )
        .await;
        assert_eq!(s, 404);
        let (s, _) = call(
            &st,
            "POST",
            "/peers/revoke",
            "127.0.0.1:1",
            &[],
            &format!(r#"{{"public_key":"{KEY}"}}"#),
        )
        .await;
        assert_eq!(s, 200);
        assert!(st.peers.approvals().file.peers.is_empty());
    }
}
