//! Parts shared by the in-process tests of the request path (grid, mesh): configuration
//! builders and a scripted backend on loopback. Test-only.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::catalog::Catalog;
use crate::config::{BackendConfig, BackendKind, BackendUrl, UpstreamConfig};
use crate::metrics::Metrics;
use crate::relay::LocalRelay;
use crate::upstream::{Backend, Upstream};

/// The chat answer of [`answering_backend`].
pub const ANSWER: &str =
    r#"{"model":"m","message":{"role":"assistant","content":"hi"},"done":true,"eval_count":1}"#;

/// Short timeouts, a long catalog period (tests refresh nothing in the background).
pub fn upstream_config() -> UpstreamConfig {
    UpstreamConfig {
        connect_timeout: Duration::from_secs(2),
        first_byte_timeout: Duration::from_secs(5),
        idle_chunk_timeout: Duration::from_secs(5),
        pool_idle: Duration::from_secs(30),
        models_refresh: Duration::from_secs(3600),
    }
}

/// An Ollama backend at `addr` taking `max_concurrent` requests.
pub fn backend(addr: SocketAddr, max_concurrent: usize) -> BackendConfig {
    BackendConfig {
        name: "local".into(),
        kind: BackendKind::Ollama,
        url: BackendUrl {
            addr,
            authority: addr.to_string(),
            base_path: String::new(),
        },
        api_key: None,
        max_concurrent,
        reserved_local_slots: 0,
        guest_vram_budget_mb: None,
        model_vram_mb: Default::default(),
        weights: Default::default(),
    }
}

/// A backend that lists `m:latest` and answers every chat with [`ANSWER`], adding a header no
/// client may see; with the count of connections it accepted.
pub async fn answering_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut seen = Vec::new();
                loop {
                    let complete = seen.windows(4).position(|w| w == b"\r\n\r\n").map(|end| {
                        let head = String::from_utf8_lossy(&seen[..end]).to_ascii_lowercase();
                        let length = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        (head, seen.len() >= end + 4 + length)
                    });
                    if let Some((head, true)) = complete {
                        let body = if head.starts_with("get /api/tags") {
                            r#"{"models":[{"name":"m:latest"}]}"#
                        } else {
                            ANSWER
                        };
                        let rsp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nset-cookie: session=backend\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = c.write_all(rsp.as_bytes()).await;
                        return;
                    }
                    match c.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// A server session reading `raw` (one whole HTTP/1.1 request) from an in-memory client, with
/// its header already read; the client half reads the answer.
pub async fn session(
    raw: &[u8],
) -> (
    tokio::io::DuplexStream,
    pingora::protocols::http::ServerSession,
) {
    let (mut client, server) = tokio::io::duplex(1 << 20);
    client.write_all(raw).await.expect("write request");
    let mut s = pingora::protocols::http::ServerSession::new_http1(Box::new(server));
    assert!(s.read_request().await.expect("request header"));
    (client, s)
}

/// Ends the session and returns everything the client received.
pub async fn answer(
    mut client: tokio::io::DuplexStream,
    s: pingora::protocols::http::ServerSession,
) -> String {
    drop(s);
    let mut raw = String::new();
    client.read_to_string(&mut raw).await.expect("read answer");
    raw
}

/// The local side of a node over `backends`: its relay, the pooled client it uses and its
/// metrics (the catalog starts with every model list unknown and never refreshes by itself).
pub fn local_relay(backends: Vec<BackendConfig>) -> (Arc<LocalRelay>, Arc<Upstream>, Arc<Metrics>) {
    let config = upstream_config();
    let metrics = Arc::new(Metrics::new());
    let upstream = Arc::new(Upstream::new(&config));
    let backends: Arc<Vec<Backend>> = Arc::new(
        backends
            .into_iter()
            .map(|b| Backend::new(b, &config))
            .collect(),
    );
    let catalog = Arc::new(Catalog::new(
        backends.clone(),
        upstream.clone(),
        metrics.clone(),
        config.models_refresh,
    ));
    let relay = Arc::new(LocalRelay::new(
        backends,
        upstream.clone(),
        catalog,
        metrics.clone(),
    ));
    (relay, upstream, metrics)
}
