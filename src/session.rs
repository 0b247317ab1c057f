//! HTTP session plumbing shared by the API and mesh listeners: the Pingora app that owns each
//! client connection (per-address bounds, TLS handshake and header deadlines, framing checks,
//! keep-alive), a request-body reader whose memory follows the bytes that arrive, and small
//! JSON replies.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName};
use http::Method;
use pingora::apps::ServerApp;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::listeners::{L4BufferSettings, ListenerConfig, TlsAccept};
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::tls::server as tls_server;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use pingora::services::listening::Service;
use pingora::tls::ssl::SslAcceptor;
use serde_json::Value;

use crate::config::ConnectionLimits;
use crate::error::{ApiError, Dialect};

/// Longest pause allowed between two pieces of a request body; a client that stalls longer is
/// dropped rather than holding a connection open forever.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// First allocation for a body whose length is unknown or large: memory grows with the bytes
/// that arrive, never with what `Content-Length` claims.
const BODY_INITIAL_CAPACITY: usize = 16 * 1024;

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

/// A listener's connection handling around a [`Handler`]: per-client connection bounds, the
/// TLS handshake (mesh) under a deadline, header and idle deadlines, framing checks and
/// HTTP/1.1 keep-alive.
///
/// This is a Pingora [`ServerApp`] rather than an `HttpServerApp` because the bounds belong to
/// the connection, which outlives each request: the per-address count is held from accept to
/// close, and Pingora's own listener gives TLS handshakes 60 s with no way to shorten it.
pub struct App<H> {
    handler: H,
    limits: ConnectionLimits,
    clients: ClientConnections,
    tls: Option<TlsAcceptor>,
    /// Requests being handled now, across listeners: a node with none exits at once on
    /// SIGTERM.
    in_flight: Arc<crate::shutdown::InFlight>,
}

/// Read buffer under a TLS listener: a whole TLS record (16 KiB of data plus header, padding
/// and tag) in one read.
const TLS_READ_BUFFER: usize = 16 * 1024 + 512;

/// A server-side TLS configuration and the callbacks run at handshake time.
pub struct TlsAcceptor {
    /// The built BoringSSL acceptor.
    pub acceptor: SslAcceptor,
    /// Called during and after the handshake (identity extraction).
    pub callbacks: Box<dyn TlsAccept + Send + Sync>,
}

impl<H: Handler> App<H> {
    /// Plain-HTTP connections to `handler` under `limits`.
    pub fn new(handler: H, limits: ConnectionLimits) -> Self {
        let clients = ClientConnections::new(limits.max_per_client);
        App {
            handler,
            limits,
            clients,
            tls: None,
            in_flight: Arc::default(),
        }
    }

    /// Counts this listener's requests in `in_flight` (shared with the other listener).
    pub fn counting(mut self, in_flight: Arc<crate::shutdown::InFlight>) -> Self {
        self.in_flight = in_flight;
        self
    }

    /// TLS connections: each is handshaken with `tls` within the handshake deadline.
    pub fn with_tls(handler: H, limits: ConnectionLimits, tls: TlsAcceptor) -> Self {
        App {
            tls: Some(tls),
            ..Self::new(handler, limits)
        }
    }

    /// A Pingora service running this app on a TCP listener at `addr`.
    ///
    /// Plain HTTP gets no read buffer under Pingora's HTTP/1 session, which reads into buffers
    /// of its own: Pingora's default one (64 KiB, zero-filled at accept) would only add a copy
    /// per read and 64 KiB per connection, which is most of a held stream's memory. Under TLS a
    /// buffer of one record stays, because BoringSSL reads each record in two reads (its
    /// 5-byte header, then the rest) and has no read-ahead of its own.
    pub fn into_service(self, name: &str, addr: SocketAddr) -> Service<Self> {
        let read = if self.tls.is_some() {
            TLS_READ_BUFFER
        } else {
            0
        };
        let mut service = Service::new(name.to_string(), self);
        service.add_listener(
            ListenerConfig::tcp(addr.to_string()).l4_buffer(L4BufferSettings::default().read(read)),
        );
        service
    }

    async fn handshake(&self, stream: Stream) -> Option<Stream> {
        let Some(tls) = &self.tls else {
            return Some(stream);
        };
        // Pingora's listener hands plain TCP connections over as its L4 stream type; the TLS
        // stream must wrap that concrete type to carry the socket digest (client address).
        let Ok(l4) = stream.into_any().downcast::<L4Stream>() else {
            tracing::error!("mesh listener got a stream that is not plain TCP");
            return None;
        };
        let handshake = tls_server::handshake_with_callback(&tls.acceptor, *l4, &*tls.callbacks);
        match tokio::time::timeout(self.limits.handshake_timeout, handshake).await {
            Ok(Ok(tls_stream)) => Some(Box::new(tls_stream)),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!("TLS handshake not finished in time; connection dropped");
                None
            }
        }
    }
}

#[async_trait]
impl<H: Handler> ServerApp for App<H> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let client_ip = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let admitted = self.clients.admit(client_ip);
        if admitted.is_none() && self.tls.is_some() {
            // Over the bound on a TLS listener: not even a handshake's worth of CPU.
            return None;
        }
        let mut stream = self.handshake(stream).await?;
        let Some(_connection) = admitted else {
            let mut session = ServerSession::new_http1(stream);
            let limit = self.limits.max_per_client;
            if read_header(&mut session, self.limits.header_timeout).await {
                session.set_keepalive(None);
                let dialect = Dialect::OpenAi;
                reply_error(
                    &mut session,
                    dialect,
                    &ApiError::too_many_connections(limit),
                )
                .await;
            }
            return None;
        };
        let mut deadline = self.limits.header_timeout;
        loop {
            let mut session = ServerSession::new_http1(stream);
            // Set before reading: Pingora turns keep-alive off while parsing a request with
            // ambiguous framing (both Transfer-Encoding and Content-Length), and that must
            // stand (RFC 9112 §6.1).
            let idle = self.limits.idle_timeout.as_secs();
            session.set_keepalive((!*shutdown.borrow()).then_some(idle));
            if !read_header(&mut session, deadline).await {
                return None;
            }
            if let Err(e) = check_framing(session.req_header()) {
                session.set_keepalive(None);
                reply_error(&mut session, Dialect::OpenAi, &e).await;
                return None;
            }
            if *shutdown.borrow() {
                session.set_keepalive(None);
            }
            let in_flight = self.in_flight.enter();
            let reusable = self.handler.handle(&mut session).await;
            drop(in_flight);
            if !reusable {
                return None;
            }
            match session.finish().await {
                Ok(Some(reused)) => match reused.into_parts() {
                    // Pipelining is off: nothing was read past this request.
                    (next, None) => stream = next,
                    (next, Some(ahead)) if ahead.is_empty() => stream = next,
                    (_, Some(_)) => return None,
                },
                _ => return None,
            }
            // The wait for the next request on a kept-alive connection is the idle time, plus
            // the header deadline once it starts arriving (Pingora's keep-alive timeout bounds
            // each read, this bounds them all).
            deadline = self.limits.idle_timeout + self.limits.header_timeout;
        }
    }
}

/// Reads a request header within `deadline`; false when the client went away, sent garbage
/// (answered 400) or was too slow.
async fn read_header(session: &mut ServerSession, deadline: Duration) -> bool {
    match tokio::time::timeout(deadline, session.read_request()).await {
        Ok(Ok(true)) => true,
        Ok(Ok(false)) => false,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "unreadable request");
            let _ = session.respond_error(400).await;
            false
        }
        Err(_) => {
            tracing::debug!(?deadline, "request header not received in time; closing");
            false
        }
    }
}

/// Refuses transfer codings other than a single `chunked` (RFC 9112 §6.1: a server that does
/// not understand a coding answers 501; accepting `gzip, chunked` as if it were plain chunked
/// would hand a backend bytes it never agreed to).
pub fn check_framing(req: &RequestHeader) -> Result<(), ApiError> {
    let mut codings = req
        .headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(|c| String::from_utf8_lossy(c).trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty());
    match (codings.next(), codings.next()) {
        (None, _) => Ok(()),
        (Some(c), None) if c == "chunked" => Ok(()),
        (Some(c), None) => Err(ApiError::unsupported_transfer_coding(&c)),
        (Some(c), Some(d)) => Err(ApiError::unsupported_transfer_coding(&format!("{c}, {d}"))),
    }
}

/// Open connections per client address, bounded.
struct ClientConnections {
    max: usize,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One admitted connection; gives its place back when dropped.
struct ConnectionGuard {
    ip: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl ClientConnections {
    fn new(max: usize) -> Self {
        ClientConnections {
            max,
            open: Arc::default(),
        }
    }

    /// A place for one more connection from `ip`, unless it holds `max` already. Connections
    /// without an IP (Unix sockets) are not counted.
    fn admit(&self, ip: Option<IpAddr>) -> Option<Option<ConnectionGuard>> {
        let (Some(ip), true) = (ip, self.max > 0) else {
            return Some(None);
        };
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Some(ConnectionGuard {
            ip,
            open: self.open.clone(),
        }))
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Node-wide budget of request-body bytes held in memory, so that many large or slow bodies
/// turn into 503s instead of exhausting memory.
#[derive(Debug)]
pub struct BodyBudget {
    limit: usize,
    used: AtomicUsize,
}

/// Bytes of the [`BodyBudget`] held by one request body; returned when dropped.
#[derive(Debug)]
pub struct BodyLease {
    budget: Arc<BodyBudget>,
    held: usize,
}

impl BodyBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(BodyBudget {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// An empty lease on this budget.
    pub fn lease(self: &Arc<Self>) -> BodyLease {
        BodyLease {
            budget: self.clone(),
            held: 0,
        }
    }

    /// Bytes currently held.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

impl BodyLease {
    /// Takes `n` more bytes, or refuses when the budget would be exceeded.
    pub fn grow(&mut self, n: usize) -> Result<(), ApiError> {
        let budget = &self.budget;
        budget
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|total| *total <= budget.limit)
            })
            .map_err(|_| ApiError::overloaded())?;
        self.held += n;
        Ok(())
    }
}

impl Drop for BodyLease {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.held, Ordering::AcqRel);
    }
}

/// How request bodies are read on a listener: the per-request limit and the node-wide budget.
#[derive(Debug, Clone)]
pub struct BodyLimits {
    /// Largest body of one request (413 beyond).
    pub max_bytes: usize,
    /// Shared by every request of the node (503 beyond).
    pub budget: Arc<BodyBudget>,
}

/// A request body read whole, with the budget it holds until dropped.
#[derive(Debug)]
pub struct Body {
    /// The bytes.
    pub bytes: Bytes,
    /// Keeps the bytes counted against the node's budget while the request lives.
    pub lease: BodyLease,
}

/// Reads the request body, refusing more than `limits.max_bytes` (by `Content-Length` before
/// reading anything, and by count for chunked bodies) and more than the node's budget.
pub async fn read_body(s: &mut ServerSession, limits: &BodyLimits) -> Result<Body, ApiError> {
    let limit = limits.max_bytes;
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
    let mut lease = limits.budget.lease();
    let mut buf = BytesMut::new();
    while let Some(chunk) = s
        .read_request_body()
        .await
        .map_err(|e| ApiError::bad_request(format!("reading the request body: {e}")))?
    {
        if buf.len() + chunk.len() > limit {
            return Err(ApiError::too_large(limit));
        }
        if buf.is_empty() && declared.is_none_or(|n| n as usize == chunk.len()) {
            // The whole body in one piece: keep Pingora's buffer, no copy.
            lease.grow(chunk.len())?;
            buf = BytesMut::from(chunk);
            continue;
        }
        let wanted = buf.len() + chunk.len();
        if wanted > buf.capacity() {
            // Grow by doubling what has arrived, capped by what was declared: a header
            // promising 16 MiB reserves nothing until the bytes come.
            let target = wanted
                .max(BODY_INITIAL_CAPACITY)
                .max(buf.capacity() * 2)
                .min(declared.map_or(limit, |n| n as usize).max(wanted));
            lease.grow(target - buf.capacity())?;
            buf.reserve(target - buf.len());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Body {
        bytes: buf.freeze(),
        lease,
    })
}

/// Reads a body for a handler, answering the error itself when the body is refused. A refused
/// body may still be on the wire, so the connection is not reused after that.
pub async fn read_body_or_reply(
    s: &mut ServerSession,
    limits: &BodyLimits,
    dialect: Dialect,
) -> Result<Body, Outcome> {
    match read_body(s, limits).await {
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
    limits: &BodyLimits,
    dialect: Dialect,
) -> Result<(Body, String), Outcome> {
    let body = read_body_or_reply(s, limits, dialect).await?;
    match crate::dialect::request::model_of(&body.bytes) {
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

/// Headers on every response this node writes itself: no caching, no content sniffing.
pub const OWN_HEADERS: [(&str, &str); 2] = [
    ("cache-control", "no-store"),
    ("x-content-type-options", "nosniff"),
];

/// Writes a complete small response; returns whether it was written whole.
pub async fn reply(
    s: &mut ServerSession,
    status: u16,
    content_type: &str,
    body: Bytes,
    extra: Option<(&'static str, String)>,
) -> bool {
    reply_with(s, status, content_type, body, extra.as_slice()).await
}

/// [`reply`] with any number of extra headers.
pub async fn reply_with(
    s: &mut ServerSession,
    status: u16,
    content_type: &str,
    body: Bytes,
    extra: &[(&'static str, String)],
) -> bool {
    let Ok(mut h) = ResponseHeader::build(status, Some(4 + extra.len())) else {
        return false;
    };
    let head = s.req_header().method == Method::HEAD;
    let mut set = |name: HeaderName, value: &str| h.insert_header(name, value).is_ok();
    let ok = set(header::CONTENT_TYPE, content_type)
        && set(header::CONTENT_LENGTH, &body.len().to_string())
        && OWN_HEADERS
            .iter()
            .all(|(n, v)| set(HeaderName::from_static(n), v))
        && extra
            .iter()
            .all(|(n, v)| set(HeaderName::from_static(n), v));
    if !ok || s.write_response_header(Box::new(h)).await.is_err() {
        return false;
    }
    let body = if head { Bytes::new() } else { body };
    s.write_response_body(body, true).await.is_ok()
}

#[cfg(test)]
mod tests;
