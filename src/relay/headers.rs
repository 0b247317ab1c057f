//! Header policy at the gateway, both directions: what a backend receives of a client's
//! request (hop-by-hop headers and credentials stop here), and what a client receives of a
//! backend's or peer's answer (rebuilt from an allow-list).

use std::fmt::Write as _;

use bytes::BytesMut;
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

/// The request sent to a local backend, written straight to the wire (no `RequestHeader` is
/// built and then serialised: that was a dozen allocations per request): the client's headers
/// minus hop-by-hop ones (or none, for peers), with the backend's `Host`, the exact body length
/// and, when configured, the backend's API key.
pub(crate) fn upstream_request(
    client: &RequestHeader,
    backend: &Backend,
    req: &ModelRequest<'_>,
    path: &str,
    body_len: usize,
) -> Result<BytesMut, ApiError> {
    // Our own header is wrong: our fault, not the client's.
    let internal = |what: &str| ApiError::internal(format!("cannot forward: {what}"));
    let base = backend.config.url.base_path.as_bytes();
    let query = client.uri.query();
    let mut w = crate::upstream::wire_buffer(512, body_len);
    w.extend_from_slice(client.method.as_str().as_bytes());
    w.extend_from_slice(b" ");
    let target_start = w.len();
    w.extend_from_slice(base);
    w.extend_from_slice(path.as_bytes());
    if let Some(q) = query {
        w.extend_from_slice(b"?");
        w.extend_from_slice(q.as_bytes());
    }
    // The client's path and query come parsed and checked; the base path is the config's.
    if !w[target_start..].iter().all(u8::is_ascii_graphic) {
        return Err(internal("request target with a forbidden byte"));
    }
    w.extend_from_slice(b" HTTP/1.1\r\n");
    let line = |w: &mut BytesMut, name: &[u8], value: &[u8]| {
        w.extend_from_slice(name);
        w.extend_from_slice(b": ");
        w.extend_from_slice(value);
        w.extend_from_slice(b"\r\n");
    };
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
            // Parsed header values: no CR, LF or NUL.
            line(&mut w, name.as_str().as_bytes(), value.as_bytes());
        }
    } else {
        line(&mut w, b"content-type", b"application/json");
    }
    let authority = backend.config.url.authority.as_bytes();
    if !authority.iter().all(u8::is_ascii_graphic) {
        return Err(internal("backend authority with a forbidden byte"));
    }
    line(&mut w, b"host", authority);
    w.extend_from_slice(b"content-length: ");
    let _ = write!(w, "{body_len}\r\n");
    if let Some(key) = backend.config.api_key.as_ref() {
        if !valid_value(key.0.as_bytes()) {
            return Err(internal("backend API key with a forbidden byte"));
        }
        w.extend_from_slice(b"authorization: Bearer ");
        w.extend_from_slice(key.0.as_bytes());
        w.extend_from_slice(b"\r\n");
    }
    w.extend_from_slice(b"\r\n");
    Ok(w)
}

/// Whether `v` may be a header value as `http::HeaderValue` accepts it: visible ASCII, space,
/// tab and obs-text; no CR, LF, NUL or DEL.
fn valid_value(v: &[u8]) -> bool {
    v.iter().all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f))
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
