//! Header policy at the gateway, both directions: what a backend receives of a client's
//! request (hop-by-hop headers and credentials stop here), and what a client receives of a
//! backend's or peer's answer (rebuilt from an allow-list).

use http::header::{self, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};

use super::ModelRequest;
use crate::error::{ApiError, Dialect};
use crate::upstream::Backend;

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

/// The request sent to a local backend: the client's headers minus hop-by-hop ones (or none,
/// for peers), with the backend's `Host`, the exact body length and, when configured, the
/// backend's API key.
pub(crate) fn upstream_request(
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
pub(crate) fn named_by_connection(client: &RequestHeader, name: &http::HeaderName) -> bool {
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
    // Static values: a `&str` would be copied into a new allocation per response.
    let _ = h.insert_header(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    let length = up
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match length {
        Some(n) => {
            let _ = h.insert_header(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        None => {
            let _ = h.insert_header(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
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
    let _ = h.insert_header(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    let _ = h.insert_header(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h
}

/// The stream framing of a response, if it is a stream: SSE or NDJSON.
pub(crate) fn stream_dialect(h: &ResponseHeader) -> Option<Dialect> {
    let ct = h.headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    if ct.starts_with("text/event-stream") {
        Some(Dialect::OpenAi)
    } else if ct.starts_with("application/x-ndjson") {
        Some(Dialect::Ollama)
    } else {
        None
    }
}
