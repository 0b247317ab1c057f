//! Talking to upstreams (the node's own model servers, and peers' mesh listeners over mutual
//! TLS): Pingora's transport connector dials, Pingora's HTTP/1 client reads the answers, and a
//! keep-alive pool of our own holds the idle connections.
//!
//! [`Upstream::send`] writes a request and waits for the response header; what it returns is a
//! live [`UpstreamResponse`] whose body the caller pulls chunk by chunk, so nothing is buffered
//! here. A connection goes back to the pool only after its response was read to the end.
//!
//! Why not Pingora's HTTP connector and its pool: its pool hands every released connection to a
//! task it spawns to watch it while idle, and taking the connection back waits for that task
//! to let go of it, so each request paid a task spawn, a timer and a hand-off between tasks;
//! and its HTTP/1 client flushes the request header before the body, so each request cost two
//! sends (two TLS records on the mesh). Here an idle connection is checked when it is taken
//! (one non-blocking read: closed, or data nobody asked for, and it is dropped), and a request
//! with a body up to [`COALESCE_MAX`] goes out in one write.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pingora::connectors::{ConnectorOptions, TransportConnector};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::client::HttpSession;
use pingora::protocols::http::v1::client::{http_req_header_to_wire, HttpSession as Http1Session};
use pingora::protocols::Stream;
use pingora::upstreams::peer::{HttpPeer, Peer};
use pingora::{Error, ErrorType, OrErr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{BackendConfig, UpstreamConfig};

/// Idle connections kept per upstream (backend or peer).
const POOL_SIZE: usize = 256;
/// Largest request body sent in the same write as the header; a larger one is written after
/// it rather than copied.
const COALESCE_MAX: usize = 64 * 1024;

/// A buffer for a request head of about `head_len` bytes, with room for the body when
/// [`Upstream::send_wire`] sends it in the same write (appending it then does not reallocate;
/// a larger body is written on its own and gets no room).
pub fn wire_buffer(head_len: usize, body_len: usize) -> BytesMut {
    let body_room = if body_len > COALESCE_MAX { 0 } else { body_len };
    BytesMut::with_capacity(head_len + body_room)
}

/// Why a request got no response header.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Nothing reached the backend (refused, unroutable, connect timeout): safe to try elsewhere.
    #[error("connect to {addr}: {source}")]
    Connect {
        /// Where we tried.
        addr: SocketAddr,
        /// Pingora's error.
        source: Box<Error>,
    },
    /// The backend took the request but sent no header within the first-byte timeout.
    #[error("no response header from {addr} within {timeout:?}")]
    Timeout {
        /// Where we waited.
        addr: SocketAddr,
        /// How long.
        timeout: Duration,
    },
    /// The connection failed after the request was (partly) written.
    #[error("{addr}: {source}")]
    Io {
        /// Where.
        addr: SocketAddr,
        /// Pingora's error.
        source: Box<Error>,
    },
}

/// A backend the gateway can route to: its config, its pool key and its concurrency slots.
#[derive(Debug)]
pub struct Backend {
    /// As configured.
    pub config: BackendConfig,
    peer: HttpPeer,
    /// `peer.reuse_hash()`, computed once.
    pool_key: u64,
    slots: Arc<Semaphore>,
    /// Up, or down until a background probe finds it answering again.
    pub health: crate::health::Health,
}

impl Backend {
    /// Prepares a backend; no I/O.
    pub fn new(config: BackendConfig, upstream: &UpstreamConfig) -> Self {
        let mut peer = HttpPeer::new(config.url.addr, false, String::new());
        peer.options.connection_timeout = Some(upstream.connect_timeout);
        peer.options.idle_timeout = Some(upstream.pool_idle);
        let slots = Arc::new(Semaphore::new(config.max_concurrent));
        Backend {
            config,
            pool_key: peer.reuse_hash(),
            peer,
            slots,
            health: crate::health::Health::default(),
        }
    }

    /// A concurrency slot, or `None` when the backend is at its limit. Never waits: a full
    /// backend is answered with 503 at once rather than queueing without bound.
    pub fn try_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.config.max_concurrent - self.slots.available_permits()
    }

    /// The connection-pool peer for this backend.
    pub fn peer(&self) -> &HttpPeer {
        &self.peer
    }

    /// The pool key of [`Backend::peer`].
    pub fn pool_key(&self) -> u64 {
        self.pool_key
    }

    /// Builds the upstream path for a client path (`base_path` + path + query).
    pub fn upstream_path(&self, path_and_query: &str) -> String {
        format!("{}{}", self.config.url.base_path, path_and_query)
    }
}

/// Pooled HTTP client shared by every request of a listener.
pub struct Upstream {
    connector: TransportConnector,
    idle: IdlePool,
    first_byte_timeout: Duration,
    idle_chunk_timeout: Duration,
}

impl Upstream {
    /// A client with a connection pool and the configured timeouts.
    pub fn new(config: &UpstreamConfig) -> Self {
        Upstream {
            // Pingora's own pool stays empty: nothing is released to it.
            connector: TransportConnector::new(Some(ConnectorOptions::new(0))),
            idle: IdlePool::new(POOL_SIZE, config.pool_idle),
            first_byte_timeout: config.first_byte_timeout,
            idle_chunk_timeout: config.idle_chunk_timeout,
        }
    }

    /// Sends `header` + `body` to `peer` and waits for the response header.
    ///
    /// A pooled connection the server closed while idle fails on first use; that failure is
    /// retried once on a fresh connection, since the request cannot have been processed.
    pub async fn send(
        &self,
        peer: &HttpPeer,
        header: &RequestHeader,
        body: &Bytes,
    ) -> Result<UpstreamResponse, SendError> {
        let head = http_req_header_to_wire(header).ok_or_else(|| SendError::Io {
            addr: socket_addr(peer),
            source: Error::explain(
                ErrorType::InvalidHTTPHeader,
                "request line with a forbidden byte",
            ),
        })?;
        self.send_wire(peer, peer.reuse_hash(), head, body).await
    }

    /// [`Upstream::send`] for a request header already on the wire (`head`, from the request
    /// line to the empty line; it must carry the body's `Content-Length`), to the pool of `key`
    /// (`peer.reuse_hash()`, which callers on the hot path compute once per upstream).
    pub async fn send_wire(
        &self,
        peer: &HttpPeer,
        key: u64,
        mut head: BytesMut,
        body: &Bytes,
    ) -> Result<UpstreamResponse, SendError> {
        let addr = socket_addr(peer);
        let separate = body.len() > COALESCE_MAX;
        if !separate {
            head.extend_from_slice(body);
        }
        let (wire, rest) = (&head[..], separate.then_some(body));
        let mut fresh_only = false;
        loop {
            let pooled = if fresh_only {
                None
            } else {
                self.idle.take(key)
            };
            let reused = pooled.is_some();
            let stream = match pooled {
                Some(stream) => stream,
                None => self
                    .connector
                    .new_stream(peer)
                    .await
                    .map_err(|source| SendError::Connect { addr, source })?,
            };
            match self.exchange(stream, peer, wire, rest).await {
                Ok(mut session) => {
                    session.set_read_timeout(Some(self.idle_chunk_timeout));
                    return Ok(UpstreamResponse { session, key });
                }
                Err(e) if reused && !fresh_only && is_stale_connection(&e) => fresh_only = true,
                Err(e) if *e.etype() == ErrorType::ReadTimedout => {
                    return Err(SendError::Timeout {
                        addr,
                        timeout: self.first_byte_timeout,
                    })
                }
                Err(source) => return Err(SendError::Io { addr, source }),
            }
        }
    }

    /// Writes the request on `stream` (`wire`: the header and a small body, in one write; then
    /// a large `body` on its own) and reads the response header.
    async fn exchange(
        &self,
        mut stream: Stream,
        peer: &HttpPeer,
        wire: &[u8],
        body: Option<&Bytes>,
    ) -> pingora::Result<HttpSession> {
        stream
            .write_all(wire)
            .await
            .or_err(ErrorType::WriteError, "writing the request")?;
        if let Some(body) = body {
            stream
                .write_all(body)
                .await
                .or_err(ErrorType::WriteError, "writing the request body")?;
        }
        stream
            .flush()
            .await
            .or_err(ErrorType::WriteError, "flushing the request")?;
        let mut session = HttpSession::H1(Http1Session::new_with_options(stream, peer));
        session.set_read_timeout(Some(self.first_byte_timeout));
        session.read_response_header().await?;
        Ok(session)
    }

    /// `GET path` on `peer`, parsed as JSON; for small control calls such as model listings.
    pub async fn get_json(
        &self,
        peer: &HttpPeer,
        authority: &str,
        path: &str,
    ) -> Result<serde_json::Value, String> {
        match self.get(peer, authority, path, &[]).await {
            Ok((200, Ok(v))) => Ok(v),
            Ok((200, Err(e))) => Err(format!("{path}: {e}")),
            Ok((status, _)) => Err(format!("{path}: HTTP {status}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// `GET path` on `peer` with extra headers: the status and the body parsed as JSON (bodies
    /// over 8 MiB are refused).
    pub async fn get(
        &self,
        peer: &HttpPeer,
        authority: &str,
        path: &str,
        headers: &[(&'static str, String)],
    ) -> Result<(u16, Result<serde_json::Value, String>), SendError> {
        let (status, body) = self.get_raw(peer, authority, path, headers).await?;
        let parsed = body.and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()));
        Ok((status, parsed))
    }

    /// `GET path` on `peer` with extra headers: the status and the body bytes (bodies over
    /// 8 MiB are refused).
    pub async fn get_raw(
        &self,
        peer: &HttpPeer,
        authority: &str,
        path: &str,
        headers: &[(&'static str, String)],
    ) -> Result<(u16, Result<Vec<u8>, String>), SendError> {
        let addr = socket_addr(peer);
        let io = |source| SendError::Io { addr, source };
        let mut req =
            RequestHeader::build("GET", path.as_bytes(), Some(2 + headers.len())).map_err(io)?;
        req.insert_header("host", authority).map_err(io)?;
        req.insert_header("accept", "application/json")
            .map_err(io)?;
        for (name, value) in headers {
            req.insert_header(*name, value.as_str()).map_err(io)?;
        }
        let mut rsp = self.send(peer, &req, &Bytes::new()).await?;
        let status = rsp.header().status.as_u16();
        let mut body = Vec::new();
        while let Some(chunk) = rsp.next_chunk().await.map_err(io)? {
            if body.len() + chunk.len() > 8 * 1024 * 1024 {
                return Ok((status, Err("response larger than 8 MiB".to_string())));
            }
            body.extend_from_slice(&chunk);
        }
        self.release(rsp).await;
        Ok((status, Ok(body)))
    }

    /// Returns a fully read response's connection to the pool, unless the response said (or
    /// its framing means) the connection ends with it.
    pub async fn release(&self, rsp: UpstreamResponse) {
        let UpstreamResponse { mut session, key } = rsp;
        if !session.response_done() {
            return;
        }
        if let HttpSession::H1(mut h1) = session {
            h1.respect_keepalive();
            if let Some(stream) = h1.reuse().await {
                self.idle.put(key, stream);
            }
        }
    }
}

/// A response whose header has arrived and whose body is still on the wire.
pub struct UpstreamResponse {
    session: HttpSession,
    /// The pool key of the upstream it came from.
    key: u64,
}

impl UpstreamResponse {
    /// The response header.
    pub fn header(&self) -> &ResponseHeader {
        self.session
            .response_header()
            .expect("invariant: send() returns only after the header was read")
    }

    /// The next body chunk as it arrives; `None` at the end.
    pub async fn next_chunk(&mut self) -> pingora::Result<Option<Bytes>> {
        self.session.read_response_body().await
    }
}

/// Percent-encodes a query value: everything but RFC 3986's unreserved characters (base64
/// keys hold `+`, `/` and `=`; model names `:` and `/`).
pub fn query_value(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn socket_addr(peer: &HttpPeer) -> SocketAddr {
    match &peer._address {
        pingora::protocols::l4::socket::SocketAddr::Inet(a) => *a,
        _ => SocketAddr::from(([0, 0, 0, 0], 0)),
    }
}

/// Idle keep-alive connections per upstream key (Pingora's reuse hash of the peer: address,
/// TLS identity, pin), newest last: the most recently used connection is taken first, and the
/// oldest ones age out after `max_idle` (checked whenever the key's pool is touched).
struct IdlePool {
    idle: Mutex<HashMap<u64, VecDeque<(Stream, Instant)>>>,
    max_per_key: usize,
    max_idle: Duration,
}

impl IdlePool {
    fn new(max_per_key: usize, max_idle: Duration) -> Self {
        IdlePool {
            idle: Mutex::new(HashMap::new()),
            max_per_key,
            max_idle,
        }
    }

    /// The newest idle connection to `key` that is still open and quiet, if any.
    fn take(&self, key: u64) -> Option<Stream> {
        loop {
            let (mut stream, expired) = {
                let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
                let queue = idle.get_mut(&key)?;
                let expired = self.expire(queue);
                match queue.pop_back() {
                    Some((stream, _)) => (stream, expired),
                    None => {
                        idle.remove(&key);
                        return None;
                    }
                }
            };
            // Closed outside the lock.
            drop(expired);
            if still_open(&mut stream) {
                return Some(stream);
            }
        }
    }

    /// Keeps `stream` for the next request to `key`.
    fn put(&self, key: u64, stream: Stream) {
        if self.max_per_key == 0 {
            return;
        }
        let expired = {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            let queue = idle.entry(key).or_default();
            let mut expired = self.expire(queue);
            if queue.len() >= self.max_per_key {
                expired.extend(queue.pop_front().map(|(s, _)| s));
            }
            queue.push_back((stream, Instant::now()));
            expired
        };
        drop(expired);
    }

    /// Takes the connections idle longer than `max_idle` off the front of `queue`.
    fn expire(&self, queue: &mut VecDeque<(Stream, Instant)>) -> Vec<Stream> {
        let mut expired = Vec::new();
        while queue
            .front()
            .is_some_and(|(_, since)| since.elapsed() > self.max_idle)
        {
            expired.extend(queue.pop_front().map(|(s, _)| s));
        }
        expired
    }
}

/// Whether an idle connection can carry a request: a read that does not wait finds nothing to
/// read. End of stream (the server closed it), an error, or bytes nobody asked for all mean it
/// is dropped. Run unconstrained: tokio's cooperative budget could otherwise report "not ready"
/// for a read that is.
fn still_open(stream: &mut Stream) -> bool {
    let mut byte = [0u8; 1];
    let read = tokio::task::unconstrained(stream.read(&mut byte));
    let mut read = std::pin::pin!(read);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    read.as_mut().poll(&mut cx).is_pending()
}

impl SendError {
    /// Whether the failure was the TLS handshake refusing the other side's certificate.
    pub fn is_tls_rejection(&self) -> bool {
        let source = match self {
            SendError::Connect { source, .. } | SendError::Io { source, .. } => source,
            SendError::Timeout { .. } => return false,
        };
        matches!(
            source.etype(),
            ErrorType::InvalidCert | ErrorType::TLSHandshakeFailure | ErrorType::HandshakeError
        )
    }
}

fn is_stale_connection(e: &Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ConnectionClosed
            | ErrorType::ReadError
            | ErrorType::WriteError
            | ErrorType::H1Error
    )
}

#[cfg(test)]
mod tests;
