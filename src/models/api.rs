//! `POST /api/pull` on the API listener: what `ollama pull`, the `ollama` Python client and
//! Open WebUI send. When an approved peer offers the model to us, the pull is served from the
//! grid and answered in Ollama's NDJSON progress format (`status`, `digest`, `total`,
//! `completed`); otherwise the request goes to the local Ollama unchanged.
//!
//! Two optional fields only ArkNet reads (`arknet models pull` sends them): `"arknet":
//! {"from": "<node id>", "grid_only": true}`. Progress lines carry `"arknet": {"peers": {...}}`
//! (bytes by peer) and the last one the pull's summary; Ollama clients ignore both.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method};
use pingora::connectors::http::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::ServerSession;
use pingora::upstreams::peer::HttpPeer;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::pull::{Event, PullError, Puller, Summary};
use crate::config::{BackendConfig, BackendKind};
use crate::error::{ApiError, Dialect};
use crate::session::{
    read_body_or_reply, reply_error, reply_json, BodyLimits, Outcome, OWN_HEADERS,
};

/// The route.
pub const PULL_PATH: &str = "/api/pull";

#[derive(Debug, Deserialize)]
struct PullBody {
    model: Option<String>,
    name: Option<String>,
    stream: Option<bool>,
    #[serde(default)]
    arknet: ArknetFields,
}

#[derive(Debug, Default, Deserialize)]
struct ArknetFields {
    from: Option<String>,
    #[serde(default)]
    grid_only: bool,
}

/// Serves `POST /api/pull`.
pub struct PullApi {
    puller: Arc<Puller>,
    ollama: Option<BackendConfig>,
    bodies: BodyLimits,
    connector: Connector,
    hosts: crate::admin::trust::HostPolicy,
}

impl PullApi {
    /// The handler: grid pulls through `puller`, the rest to the first Ollama backend.
    pub fn new(
        puller: Arc<Puller>,
        backends: &[BackendConfig],
        bodies: BodyLimits,
        hosts: crate::admin::trust::HostPolicy,
    ) -> Self {
        PullApi {
            puller,
            ollama: backends
                .iter()
                .find(|b| b.kind == BackendKind::Ollama)
                .cloned(),
            bodies,
            connector: Connector::new(None),
            hosts,
        }
    }

    /// Serves one `/api/pull` request.
    pub async fn serve(&self, s: &mut ServerSession) -> Outcome {
        if s.req_header().method != Method::POST {
            return reply_error(s, Dialect::Ollama, &ApiError::method_not_allowed("POST")).await;
        }
        // Pulling fills the owner's disk: a page on another site may not start one.
        if let Some(why) = crate::admin::trust::cross_site(&s.req_header().headers, &self.hosts) {
            let e = ApiError::not_owner(format!(
                "refused: another site's page sent this pull ({why})"
            ));
            return reply_error(s, Dialect::Ollama, &e).await;
        }
        let body = match read_body_or_reply(s, &self.bodies, Dialect::Ollama).await {
            Ok(b) => b.bytes,
            Err(out) => return out,
        };
        let parsed: PullBody = match serde_json::from_slice(&body) {
            Ok(p) => p,
            Err(e) => {
                let e = ApiError::bad_request(format!("malformed JSON body: {e}"));
                return reply_error(s, Dialect::Ollama, &e).await;
            }
        };
        let Some(model) = parsed
            .model
            .or(parsed.name)
            .filter(|m| !m.trim().is_empty())
        else {
            return reply_error(s, Dialect::Ollama, &ApiError::missing_model()).await;
        };
        let offers = self.puller.offers(&model, parsed.arknet.from.as_deref());
        let mut out = if !offers.is_empty() {
            self.pull_from_grid(s, &model, offers, parsed.stream.unwrap_or(true))
                .await
        } else if parsed.arknet.grid_only || parsed.arknet.from.is_some() {
            let e = ApiError::new(
                404,
                "model_not_offered",
                PullError::NotOffered(model.clone()).to_string(),
            );
            reply_error(s, Dialect::Ollama, &e).await
        } else {
            self.pass_through(s, body).await
        };
        out.model = Some(model);
        out
    }

    async fn pull_from_grid(
        &self,
        s: &mut ServerSession,
        model: &str,
        offers: Vec<super::pull::Offer>,
        stream: bool,
    ) -> Outcome {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let pull = self.puller.pull(model, offers, tx);
        tokio::pin!(pull);
        if !stream {
            let result = pull.await;
            return match result {
                Ok(summary) => reply_json(s, 200, &success(&summary)).await,
                Err(e) => reply_error(s, Dialect::Ollama, &as_api_error(&e)).await,
            };
        }
        if !write_stream_head(s).await {
            return Outcome::answered(200, false);
        }
        let result = loop {
            tokio::select! {
                result = &mut pull => break result,
                Some(event) = rx.recv() => {
                    if !write_line(s, &event_json(&event)).await {
                        // The client left: the pull stops here, its parts stay for a resume.
                        return Outcome::answered(200, false);
                    }
                }
            }
        };
        while let Ok(event) = rx.try_recv() {
            if !write_line(s, &event_json(&event)).await {
                return Outcome::answered(200, false);
            }
        }
        let (last, status) = match &result {
            Ok(summary) => (success(summary), 200),
            Err(e) => (json!({ "error": e.to_string() }), as_api_error(e).status),
        };
        let ok =
            write_line(s, &last).await && s.write_response_body(Bytes::new(), true).await.is_ok();
        let mut out = Outcome::answered(status, ok);
        out.first_byte = None;
        out
    }

    /// The request as it came, to the local Ollama (which pulls from its registry), and its
    /// answer back as it streams.
    async fn pass_through(&self, s: &mut ServerSession, body: Bytes) -> Outcome {
        let Some(b) = &self.ollama else {
            let e = ApiError::new(
                404,
                "model_not_offered",
                "no approved peer offers this model, and this node has no Ollama backend to pull it",
            );
            return reply_error(s, Dialect::Ollama, &e).await;
        };
        let fail = |e: &dyn std::fmt::Display| {
            ApiError::backend_unreachable(format!("{} ({}): {e}", b.name, b.url))
        };
        let path = format!("{}{PULL_PATH}", b.url.base_path);
        let Ok(mut req) = RequestHeader::build("POST", path.as_bytes(), Some(4)) else {
            return reply_error(s, Dialect::Ollama, &ApiError::internal("request header")).await;
        };
        let _ = req.insert_header("host", b.url.authority.as_str());
        let _ = req.insert_header("content-type", "application/json");
        let _ = req.insert_header("content-length", body.len().to_string());
        if let Some(k) = &b.api_key {
            let _ = req.insert_header("authorization", format!("Bearer {}", k.0));
        }
        let mut peer = HttpPeer::new(b.url.addr, false, String::new());
        peer.options.connection_timeout = Some(Duration::from_secs(2));
        let mut session = match self.connector.get_http_session(&peer).await {
            Ok((session, _)) => session,
            Err(e) => return reply_error(s, Dialect::Ollama, &fail(&e)).await,
        };
        let sent = async {
            session.write_request_header(Box::new(req)).await?;
            session.write_request_body(body, true).await?;
            session.finish_request_body().await?;
            session.read_response_header().await
        }
        .await;
        if let Err(e) = sent {
            return reply_error(s, Dialect::Ollama, &fail(&e)).await;
        }
        let status = session.response_header().map_or(502, |h| h.status.as_u16());
        let ndjson = session
            .response_header()
            .and_then(|h| h.headers.get(header::CONTENT_TYPE))
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("ndjson"));
        let Ok(mut h) = ResponseHeader::build(status, Some(4)) else {
            return Outcome::answered(status, false);
        };
        let content_type = if ndjson {
            "application/x-ndjson"
        } else {
            "application/json"
        };
        let _ = h.insert_header(header::CONTENT_TYPE, content_type);
        let _ = h.insert_header(header::TRANSFER_ENCODING, "chunked");
        for (n, v) in OWN_HEADERS {
            let _ = h.insert_header(n, v);
        }
        if s.write_response_header(Box::new(h)).await.is_err() {
            return Outcome::answered(status, false);
        }
        loop {
            match session.read_response_body().await {
                Ok(Some(chunk)) => {
                    if s.write_response_body(chunk, false).await.is_err() {
                        return Outcome::answered(status, false);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let line =
                        ApiError::backend_unreachable(e.to_string()).stream_event(Dialect::Ollama);
                    let _ = s.write_response_body(line, true).await;
                    return Outcome::answered(status, false);
                }
            }
        }
        let ok = s.write_response_body(Bytes::new(), true).await.is_ok();
        Outcome::answered(status, ok)
    }
}

fn success(summary: &Summary) -> Value {
    json!({ "status": "success", "arknet": summary })
}

/// The status a failed pull answers with when it is not streamed.
fn as_api_error(e: &PullError) -> ApiError {
    let (status, code) = match e {
        PullError::NotOffered(_) => (404, "model_not_offered"),
        PullError::Manifest { .. } | PullError::Peers { .. } => (502, "peers_failed"),
        PullError::Corrupt { .. } => (502, "layer_corrupt"),
        PullError::Disk(_) => (507, "insufficient_storage"),
        PullError::Install(_) => (502, "install_failed"),
        PullError::Busy(_) => (409, "pull_in_progress"),
    };
    ApiError::new(status, code, e.to_string())
}

/// One progress event in Ollama's shape.
pub fn event_json(event: &Event) -> Value {
    match event {
        Event::Status(s) => json!({ "status": s }),
        Event::Layer {
            digest,
            total,
            completed,
            peers,
        } => json!({
            "status": format!("pulling {}", &super::digest_hex(digest)[..12]),
            "digest": digest,
            "total": total,
            "completed": completed,
            "arknet": { "peers": peers },
        }),
    }
}

async fn write_stream_head(s: &mut ServerSession) -> bool {
    let Ok(mut h) = ResponseHeader::build(200, Some(4)) else {
        return false;
    };
    let _ = h.insert_header(header::CONTENT_TYPE, "application/x-ndjson");
    let _ = h.insert_header(header::TRANSFER_ENCODING, "chunked");
    for (n, v) in OWN_HEADERS {
        let _ = h.insert_header(n, v);
    }
    s.write_response_header(Box::new(h)).await.is_ok()
}

async fn write_line(s: &mut ServerSession, v: &Value) -> bool {
    let mut line = v.to_string().into_bytes();
    line.push(b'\n');
    s.write_response_body(Bytes::from(line), false)
        .await
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_in_ollama_s_shape() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        let v = event_json(&Event::Layer {
            digest: digest.clone(),
            total: 10,
            completed: 4,
            peers: [("b".to_string(), 4)].into(),
        });
        assert_eq!(v["status"], "pulling abababababab");
        assert_eq!(v["digest"], digest.as_str());
        assert_eq!(
            (v["total"].as_u64(), v["completed"].as_u64()),
            (Some(10), Some(4))
        );
        assert_eq!(
            event_json(&Event::Status("success".into()))["status"],
            "success"
        );
    }
}
