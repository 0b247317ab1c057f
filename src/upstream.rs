//! Talking to upstreams (the node's own model servers) through Pingora's pooled connector.
//!
//! [`Upstream::send`] writes a request and waits for the response header; what it returns is a
//! live [`UpstreamResponse`] whose body the caller pulls chunk by chunk, so nothing is buffered
//! here. A connection goes back to the pool only after its response was read to the end.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::connectors::ConnectorOptions;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::client::HttpSession;
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{BackendConfig, UpstreamConfig};

/// Idle connections kept per upstream pool.
const POOL_SIZE: usize = 256;

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

    /// Builds the upstream path for a client path (`base_path` + path + query).
    pub fn upstream_path(&self, path_and_query: &str) -> String {
        format!("{}{}", self.config.url.base_path, path_and_query)
    }
}

/// Pooled HTTP client shared by every request of a listener.
pub struct Upstream {
    connector: Connector,
    first_byte_timeout: Duration,
    idle_chunk_timeout: Duration,
    pool_idle: Duration,
}

impl Upstream {
    /// A client with a connection pool and the configured timeouts.
    pub fn new(config: &UpstreamConfig) -> Self {
        Upstream {
            connector: Connector::new(Some(ConnectorOptions::new(POOL_SIZE))),
            first_byte_timeout: config.first_byte_timeout,
            idle_chunk_timeout: config.idle_chunk_timeout,
            pool_idle: config.pool_idle,
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
        let addr = socket_addr(peer);
        let mut fresh_only = false;
        loop {
            let (mut session, reused) = if fresh_only {
                self.connector
                    .get_http_session(&fresh_peer(peer))
                    .await
                    .map_err(|source| SendError::Connect { addr, source })?
            } else {
                self.connector
                    .get_http_session(peer)
                    .await
                    .map_err(|source| SendError::Connect { addr, source })?
            };
            match self.exchange(&mut session, header, body).await {
                Ok(()) => {
                    session.set_read_timeout(Some(self.idle_chunk_timeout));
                    return Ok(UpstreamResponse {
                        session,
                        peer: peer.clone(),
                    });
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

    async fn exchange(
        &self,
        session: &mut HttpSession,
        header: &RequestHeader,
        body: &Bytes,
    ) -> pingora::Result<()> {
        session.set_read_timeout(Some(self.first_byte_timeout));
        session
            .write_request_header(Box::new(header.clone()))
            .await?;
        if !body.is_empty() {
            session.write_request_body(body.clone(), true).await?;
        }
        session.finish_request_body().await?;
        session.read_response_header().await
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

    /// Returns a fully read response's connection to the pool.
    pub async fn release(&self, rsp: UpstreamResponse) {
        let UpstreamResponse { mut session, peer } = rsp;
        if session.response_done() {
            session.set_read_timeout(None);
            self.connector
                .release_http_session(session, &peer, Some(self.pool_idle))
                .await;
        }
    }
}

/// A response whose header has arrived and whose body is still on the wire.
pub struct UpstreamResponse {
    session: HttpSession,
    peer: HttpPeer,
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

fn socket_addr(peer: &HttpPeer) -> SocketAddr {
    match &peer._address {
        pingora::protocols::l4::socket::SocketAddr::Inet(a) => *a,
        _ => SocketAddr::from(([0, 0, 0, 0], 0)),
    }
}

/// Same peer, but a pool key nothing was ever released under, so the connector dials anew.
fn fresh_peer(peer: &HttpPeer) -> HttpPeer {
    let mut p = peer.clone();
    p.group_key = p.group_key.wrapping_add(0x9e37_79b9_7f4a_7c15);
    p
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
