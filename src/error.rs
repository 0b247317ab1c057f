//! Errors a client of the API listener can see, rendered in the dialect of the route it called.
//!
//! OpenAI clients parse `{"error":{"message","type","code"}}`; Ollama clients parse
//! `{"error":"..."}`. Both get the same status codes, so scripts can branch on the status alone.

use bytes::Bytes;
use serde_json::json;

/// Which API family a request or response belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `/v1/*`, SSE streams.
    OpenAi,
    /// `/api/*`, NDJSON streams.
    Ollama,
}

impl Dialect {
    /// The name hello and listings use: `openai` or `ollama`.
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::OpenAi => "openai",
            Dialect::Ollama => "ollama",
        }
    }
}

/// A failure answered to the client instead of a backend response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// Stable machine-readable code (`model_not_found`, `backend_busy`, ...).
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
    /// Seconds for `Retry-After`, when retrying later can help.
    pub retry_after: Option<u32>,
}

impl ApiError {
    /// An error with this status, machine-readable code and message (no `Retry-After`).
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 400: the body is not JSON, or a field has the wrong type.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request", message)
    }

    /// 400: the request names no model.
    pub fn missing_model() -> Self {
        Self::new(
            400,
            "missing_model",
            "the request body has no \"model\" field",
        )
    }

    /// 404: no backend serves the model.
    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            404,
            "model_not_found",
            format!("model \"{model}\" is not available on this node"),
        )
    }

    /// 404: an unknown path.
    pub fn no_route(path: &str) -> Self {
        Self::new(404, "not_found", format!("no route for {path}"))
    }

    /// 405: a known path with the wrong method.
    pub fn method_not_allowed(allowed: &'static str) -> Self {
        Self::new(
            405,
            "method_not_allowed",
            format!("method not allowed; use {allowed}"),
        )
    }

    /// 413: the body exceeds the configured limit.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            413,
            "request_too_large",
            format!("request body exceeds the limit of {limit} bytes"),
        )
    }

    /// 502: no backend could be reached.
    pub fn backend_unreachable(detail: impl Into<String>) -> Self {
        Self::new(502, "backend_unreachable", detail)
    }

    /// 503: every backend for the model is at its concurrency limit.
    pub fn busy(model: &str) -> Self {
        ApiError {
            retry_after: Some(1),
            ..Self::new(
                503,
                "backend_busy",
                format!(
                    "every backend serving \"{model}\" is at its concurrency limit; retry shortly"
                ),
            )
        }
    }

    /// 403: a mesh peer may not do this.
    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(403, code, message)
    }

    /// 429: a peer is at the concurrency its approval grants.
    pub fn peer_limit(grant: u32) -> Self {
        ApiError {
            retry_after: Some(1),
            ..Self::new(
                429,
                "peer_concurrency_limit",
                format!("you already have {grant} requests in flight here, the most your approval allows"),
            )
        }
    }

    /// 503: serving a peer would load a model beyond the VRAM the owner lets guests use.
    pub fn vram_reserved(model: &str) -> Self {
        ApiError {
            retry_after: Some(30),
            ..Self::new(
                503,
                "vram_reserved",
                format!("loading \"{model}\" for a peer would exceed this node's VRAM budget for guests"),
            )
        }
    }

    /// What to answer when every candidate was tried and none answered: busy ones mean a retry
    /// soon can succeed (503), otherwise one that took the request and sent no header in time
    /// (504), otherwise the last failure (502), otherwise nobody had it (404).
    pub fn exhausted(
        model: &str,
        busy: bool,
        last_failure: Option<String>,
        timed_out: bool,
    ) -> Self {
        match (busy, last_failure) {
            (true, _) => Self::busy(model),
            // A candidate took the request and never answered: that is the documented 504,
            // even when others could not be reached at all.
            (false, Some(detail)) if timed_out => Self::timeout(detail),
            (false, Some(detail)) => Self::backend_unreachable(detail),
            (false, None) => Self::model_not_found(model),
        }
    }

    /// 504: the backend accepted the request but sent no response header in time.
    pub fn timeout(detail: impl Into<String>) -> Self {
        Self::new(504, "backend_timeout", detail)
    }

    /// 500: something on our side failed (building our own headers, encoding our own message).
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(500, "internal_error", detail)
    }

    /// 503: the only peers that share `model` are ejected after repeated failures.
    pub fn peers_ejected(model: &str, secs: u64) -> Self {
        ApiError {
            retry_after: Some(u32::try_from(secs).unwrap_or(u32::MAX)),
            ..Self::new(
                503,
                "peers_ejected",
                format!("the peers that share \"{model}\" failed repeatedly and are left alone for {secs} s"),
            )
        }
    }

    /// 503: the node holds as many request bodies in memory as it allows; retry shortly.
    pub fn overloaded() -> Self {
        ApiError {
            retry_after: Some(1),
            ..Self::new(
                503,
                "overloaded",
                "the node is holding as many request bodies as it allows; retry shortly",
            )
        }
    }

    /// 503: this client address holds as many connections as one client may.
    pub fn too_many_connections(limit: usize) -> Self {
        ApiError {
            retry_after: Some(1),
            ..Self::new(
                503,
                "too_many_connections",
                format!("this address already holds {limit} connections to the node"),
            )
        }
    }

    /// 501: a `Transfer-Encoding` other than plain `chunked` (RFC 9112 §6.1).
    pub fn unsupported_transfer_coding(coding: &str) -> Self {
        Self::new(
            501,
            "unsupported_transfer_coding",
            format!(
                "Transfer-Encoding `{coding}` is not supported; send `chunked` or a Content-Length"
            ),
        )
    }

    /// 421: the `Host` is not a name this node answers to (DNS rebinding defence).
    pub fn misdirected(host: &str) -> Self {
        Self::new(
            421,
            "unknown_host",
            format!("this node does not answer to Host `{host}`; add it to api.allowed_hosts if it is yours"),
        )
    }

    /// 403: a change to approvals that the owner did not demonstrably make.
    pub fn not_owner(message: impl Into<String>) -> Self {
        Self::new(403, "cross_site_request", message)
    }

    /// OpenAI `error.type` for this status.
    fn openai_type(&self) -> &'static str {
        match self.status {
            400 | 404 | 405 | 413 | 415 | 421 | 501 => "invalid_request_error",
            403 => "permission_error",
            429 | 503 => "server_busy",
            _ => "api_error",
        }
    }

    /// The JSON body for `dialect`.
    pub fn body(&self, dialect: Dialect) -> Bytes {
        let value = match dialect {
            Dialect::OpenAi => json!({"error": {
                "message": self.message,
                "type": self.openai_type(),
                "code": self.code,
            }}),
            Dialect::Ollama => json!({"error": self.message}),
        };
        Bytes::from(value.to_string())
    }

    /// The error as one event of a stream already under way: an SSE `data:` event for OpenAI,
    /// one NDJSON line for Ollama.
    pub fn stream_event(&self, dialect: Dialect) -> Bytes {
        let body = self.body(dialect);
        let mut out = Vec::with_capacity(body.len() + 8);
        if dialect == Dialect::OpenAi {
            out.extend_from_slice(b"data: ");
        }
        out.extend_from_slice(&body);
        out.extend_from_slice(if dialect == Dialect::OpenAi {
            b"\n\n"
        } else {
            b"\n"
        });
        Bytes::from(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_error_body_has_message_type_and_code() {
        let body = ApiError::model_not_found("x").body(Dialect::OpenAi);
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("\"x\"")));
    }

    #[test]
    fn ollama_error_body_is_a_plain_string() {
        let body = ApiError::busy("m").body(Dialect::Ollama);
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert!(v["error"].is_string());
    }

    #[test]
    fn stream_events_are_framed_per_dialect() {
        let e = ApiError::backend_unreachable("gone");
        let sse = e.stream_event(Dialect::OpenAi);
        assert!(sse.starts_with(b"data: {") && sse.ends_with(b"\n\n"));
        let nd = e.stream_event(Dialect::Ollama);
        assert!(nd.starts_with(b"{") && nd.ends_with(b"}\n"));
    }
}
