//! HTTP session plumbing shared by the API and mesh listeners: the Pingora app wrapper that
//! handles keep-alive, a bounded request-body reader, and small JSON replies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName};
use http::Method;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use serde_json::Value;

use crate::error::{ApiError, Dialect};

/// Seconds an idle client connection is kept open between requests.
const KEEPALIVE_SECS: u64 = 60;
/// Longest pause allowed between two pieces of a request body; a client that stalls longer is
/// dropped rather than holding a connection open forever.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// What happened to one request, for metrics, audit and connection reuse.
#[derive(Debug)]
pub struct Outcome {
    /// Status sent (or that the backend sent).
    pub status: u16,
    /// The model the request named, if any.
    pub model: Option<String>,
    /// When the response header went out.
    pub first_byte: Option<Instant>,
    /// Whether the client connection may carry another request.
    pub reusable: bool,
    /// Why a response that had started did not reach its end, if it did not: its status line
    /// said 200, but the audit must not.
    pub cut: Option<Cut>,
}

/// Why a relayed response ended before its natural end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// The peer it was for (or from) lost its approval mid-stream.
    Revoked,
    /// The backend or peer sending it broke off, or ended it with an error event.
    UpstreamBroke,
    /// The client went away before the end.
    ClientLeft,
}

impl Cut {
    /// The status that describes the request's real outcome in the audit log: 403 for a
    /// revocation, 502 for a broken upstream, 499 (Nginx's "client closed request") for a
    /// client that left.
    pub fn audit_status(self) -> u16 {
        match self {
            Cut::Revoked => 403,
            Cut::UpstreamBroke => 502,
            Cut::ClientLeft => 499,
        }
    }

    /// A short word for the audit line's `error` field.
    pub fn reason(self) -> &'static str {
        match self {
            Cut::Revoked => "revoked mid-response",
            Cut::UpstreamBroke => "upstream broke mid-response",
            Cut::ClientLeft => "client left mid-response",
        }
    }
}

impl Outcome {
    /// A reply produced here (not relayed), written whole or not.
    pub fn answered(status: u16, written: bool) -> Self {
        Outcome {
            status,
            model: None,
            first_byte: Some(Instant::now()),
            reusable: written,
            cut: None,
        }
    }

    /// A request that got no response at all (nothing reached the client from it), for the
    /// audit of a peer that timed out, refused or could not be reached.
    pub fn failed(status: u16) -> Self {
        Outcome {
            status,
            model: None,
            first_byte: None,
            reusable: false,
            cut: None,
        }
    }
}

/// One listener's request handler.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Serves one request whose header has been read; returns whether the connection may be
    /// reused.
    async fn handle(&self, session: &mut ServerSession) -> bool;
}

/// Adapts a [`Handler`] to Pingora's [`HttpServerApp`]: reads the header, applies keep-alive,
/// counts the request as in flight (for a prompt shutdown) and hands reusable connections back
/// to Pingora.
pub struct App<H> {
    handler: H,
    in_flight: Arc<crate::shutdown::InFlight>,
}

impl<H> App<H> {
    /// Wraps `handler`, counting its requests in `in_flight`.
    pub fn new(handler: H, in_flight: Arc<crate::shutdown::InFlight>) -> Self {
        App { handler, in_flight }
    }
}

#[async_trait]
impl<H: Handler> HttpServerApp for App<H> {
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
        session.set_keepalive((!*shutdown.borrow()).then_some(KEEPALIVE_SECS));
        let _in_flight = self.in_flight.enter();
        if !self.handler.handle(&mut session).await {
            return None;
        }
        let settings = HttpPersistentSettings::for_session(&session);
        match session.finish().await {
            Ok(Some(stream)) => Some(ReusedHttpStream::from_reusable_stream(stream, settings)),
            _ => None,
        }
    }
}

/// Reads the request body, refusing more than `limit` bytes (by `Content-Length` before reading
/// anything, and by count for chunked bodies).
pub async fn read_body(s: &mut ServerSession, limit: usize) -> Result<Bytes, ApiError> {
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

/// Reads a body for a handler, answering the error itself when the body is refused. A refused
/// body may still be on the wire, so the connection is not reused after that.
pub async fn read_body_or_reply(
    s: &mut ServerSession,
    limit: usize,
    dialect: Dialect,
) -> Result<Bytes, Outcome> {
    match read_body(s, limit).await {
        Ok(body) => Ok(body),
        Err(e) => {
            s.set_keepalive(None);
            let mut out = reply_error(s, dialect, &e).await;
            out.reusable = false;
            Err(out)
        }
    }
}

/// Reads a model request's body and the model it names, answering the error itself when either
/// is refused (413/400).
pub async fn read_model_request(
    s: &mut ServerSession,
    limit: usize,
    dialect: Dialect,
) -> Result<(Bytes, String), Outcome> {
    let body = read_body_or_reply(s, limit, dialect).await?;
    match crate::gateway::request::model_of(&body) {
        Ok(model) => Ok((body, model)),
        Err(e) => Err(reply_error(s, dialect, &e).await),
    }
}

/// Answers `e` as JSON in `dialect`, with `Retry-After` when it has one.
pub async fn reply_error(s: &mut ServerSession, dialect: Dialect, e: &ApiError) -> Outcome {
    let retry = e.retry_after.map(|secs| ("retry-after", secs.to_string()));
    let ok = reply(s, e.status, "application/json", e.body(dialect), retry).await;
    Outcome::answered(e.status, ok)
}

/// Answers `value` as JSON.
pub async fn reply_json(s: &mut ServerSession, status: u16, value: &Value) -> Outcome {
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

/// Writes a complete small response; returns whether it was written whole.
pub async fn reply(
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
