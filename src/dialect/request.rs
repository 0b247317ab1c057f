//! What a request to the API listener asks for, decided from its method, path and body alone.
//!
//! Pure functions: no sockets, no state. The gateway calls [`classify`] on the header and
//! [`model_of`] on the body, then routes.

use http::Method;

use crate::error::{ApiError, Dialect};

/// What the client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET /health`.
    Health,
    /// `GET /metrics`.
    Metrics,
    /// `GET /v1/models` or `GET /api/tags`: the models this node serves.
    ListModels(Dialect),
    /// `GET /api/ps`: models loaded in memory on the node's Ollama backends.
    OllamaPs,
    /// `GET /api/version`.
    OllamaVersion,
    /// A POST naming a model in its JSON body; routed by that model.
    Model(Dialect),
    /// `/peers/*`, `/status`, `/audit`: the owner's admin API.
    Admin,
    /// `GET /` (or `/admin`): the admin page.
    AdminPage,
    /// `POST /api/pull`: Ollama's model download, served from the grid when a peer shares the
    /// model, else passed to the local Ollama.
    Pull,
}

/// Paths that take a JSON body with a `model` field, per dialect.
const OPENAI_MODEL_PATHS: [&str; 3] = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"];
const OLLAMA_MODEL_PATHS: [&str; 5] = [
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
    "/api/show",
];

/// Strips the Nginx prefix (`/arknet`) when present, so both forwarding styles work.
pub fn strip_prefix<'a>(path: &'a str, prefix: &str) -> &'a str {
    if prefix.is_empty() {
        return path;
    }
    match path.strip_prefix(prefix) {
        Some("") => "/",
        Some(rest) if rest.starts_with('/') => rest,
        _ => path,
    }
}

/// The dialect a path belongs to, for error bodies even when the route is unknown.
pub fn dialect_of(path: &str) -> Dialect {
    if path.starts_with("/api/") {
        Dialect::Ollama
    } else {
        Dialect::OpenAi
    }
}

/// Maps a (prefix-stripped, query-less) path and method to an endpoint.
pub fn classify(method: &Method, path: &str) -> Result<Endpoint, ApiError> {
    let get = |e: Endpoint| {
        if method == Method::GET || method == Method::HEAD {
            Ok(e)
        } else {
            Err(ApiError::method_not_allowed("GET"))
        }
    };
    match path {
        "/health" | "/healthz" => get(Endpoint::Health),
        "/" | "/admin" => get(Endpoint::AdminPage),
        "/metrics" => get(Endpoint::Metrics),
        "/v1/models" => get(Endpoint::ListModels(Dialect::OpenAi)),
        "/api/tags" => get(Endpoint::ListModels(Dialect::Ollama)),
        "/api/ps" => get(Endpoint::OllamaPs),
        "/api/version" => get(Endpoint::OllamaVersion),
        "/status" | "/peers" | "/audit" => Ok(Endpoint::Admin),
        "/api/pull" if method == Method::POST => Ok(Endpoint::Pull),
        "/api/pull" => Err(ApiError::method_not_allowed("POST")),
        p if p.starts_with("/peers/") => Ok(Endpoint::Admin),
        p if OPENAI_MODEL_PATHS.contains(&p) || OLLAMA_MODEL_PATHS.contains(&p) => {
            if method == Method::POST {
                Ok(Endpoint::Model(dialect_of(p)))
            } else {
                Err(ApiError::method_not_allowed("POST"))
            }
        }
        p => Err(ApiError::no_route(p)),
    }
}

/// The model a JSON request body names (`model`, or `name` as older Ollama clients send).
pub fn model_of(body: &[u8]) -> Result<String, ApiError> {
    #[derive(serde::Deserialize)]
    struct Named {
        model: Option<serde_json::Value>,
        name: Option<serde_json::Value>,
    }
    if body.is_empty() {
        return Err(ApiError::bad_request("the request needs a JSON body"));
    }
    // The body goes to a backend or a peer as it is: it must be JSON through and through, not
    // just around the `model` field (serde skips the strings it ignores without checking them).
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::bad_request(format!("the body is not UTF-8 (byte {})", e.valid_up_to()))
    })?;
    let named: Named = serde_json::from_str(text)
        .map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))?;
    match named.model.or(named.name) {
        Some(serde_json::Value::String(m)) if !m.trim().is_empty() => Ok(m),
        Some(serde_json::Value::String(_)) | None | Some(serde_json::Value::Null) => {
            Err(ApiError::missing_model())
        }
        Some(_) => Err(ApiError::bad_request("\"model\" must be a string")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_post_to_api_pull_is_a_pull() {
        assert_eq!(
            classify(&Method::POST, "/api/pull").ok(),
            Some(Endpoint::Pull)
        );
        let e = classify(&Method::GET, "/api/pull").expect_err("refused");
        assert_eq!(e.status, 405);
    }

    #[test]
    fn a_body_that_is_not_utf8_json_is_refused_whole() {
        let mut body = br#"{"model":"m","messages":[{"role":"user","content":"x"#.to_vec();
        body.extend_from_slice(&[0xff, 0xfe]);
        body.extend_from_slice(br#""}]}"#);
        let e = model_of(&body).expect_err("invalid UTF-8 in an ignored field");
        assert_eq!(e.status, 400);
        assert!(model_of(br#"{"model":"m"} trailing"#).is_err());
        assert_eq!(
            model_of(br#"{"model":"m","x":[1,{"y":"\u00e9"}]}"#)
                .ok()
                .as_deref(),
            Some("m")
        );
    }

    #[test]
    fn nginx_prefix_is_stripped_only_on_a_segment_boundary() {
        assert_eq!(strip_prefix("/arknet/v1/models", "/arknet"), "/v1/models");
        assert_eq!(strip_prefix("/arknet", "/arknet"), "/");
        assert_eq!(strip_prefix("/arknetx/v1", "/arknet"), "/arknetx/v1");
        assert_eq!(strip_prefix("/v1/models", "/arknet"), "/v1/models");
        assert_eq!(strip_prefix("/v1/models", ""), "/v1/models");
    }

    #[test]
    fn inference_paths_need_post_and_listings_need_get() {
        assert_eq!(
            classify(&Method::POST, "/api/chat"),
            Ok(Endpoint::Model(Dialect::Ollama))
        );
        assert_eq!(
            classify(&Method::POST, "/v1/embeddings"),
            Ok(Endpoint::Model(Dialect::OpenAi))
        );
        assert_eq!(
            classify(&Method::GET, "/api/chat").map_err(|e| e.status),
            Err(405)
        );
        assert_eq!(
            classify(&Method::POST, "/v1/models").map_err(|e| e.status),
            Err(405)
        );
        assert_eq!(
            classify(&Method::GET, "/api/tags"),
            Ok(Endpoint::ListModels(Dialect::Ollama))
        );
        assert_eq!(
            classify(&Method::GET, "/nope").map_err(|e| e.status),
            Err(404)
        );
    }

    #[test]
    fn model_is_read_from_model_or_name() {
        assert_eq!(
            model_of(br#"{"model":"llama3.1:8b","messages":[]}"#),
            Ok("llama3.1:8b".into())
        );
        assert_eq!(model_of(br#"{"name":"qwen"}"#), Ok("qwen".into()));
    }

    #[test]
    fn bad_bodies_get_400_with_a_reason() {
        for body in [
            &b""[..],
            b"{",
            b"[1,2]",
            b"null",
            br#"{"model":""}"#,
            br#"{"model":7}"#,
            br#"{"messages":[]}"#,
        ] {
            let err = model_of(body).expect_err("must be refused");
            assert_eq!(err.status, 400, "{body:?}");
        }
        assert_eq!(
            model_of(br#"{"x":1}"#).map_err(|e| e.code),
            Err("missing_model")
        );
    }
}
