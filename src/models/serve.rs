//! The serving side on the mesh listener: a shared model's manifest and its blobs, with HTTP
//! Range, streamed from disk a chunk at a time under a per-peer bandwidth cap and a cap on
//! transfers at once.
//!
//! ```text
//! GET /mesh/v1/models/manifest?model=M          -> may_pull (403) -> 200 ModelManifest | 404
//! GET /mesh/v1/models/blob?model=M&digest=D     -> may_pull (403) -> digest well formed (400)
//!     [Range: bytes=a-b]                        -> a layer of M's manifest (404)
//!                                               -> transfer slot (429) -> 200 | 206 | 416
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use http::Method;
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use prometheus::{IntCounterVec, IntGauge, Opts};
use tokio::sync::Semaphore;

use super::store::{StoreError, WeightsStore};
use super::{valid_digest, SharingConfig, BLOB_PATH, MANIFEST_PATH};
use crate::audit::{AuditLog, AuditRecord, Direction};
use crate::error::{ApiError, Dialect};
use crate::identity::PublicKey;
use crate::mesh::authz;
use crate::metrics::Metrics;
use crate::peers::store::ApprovedPeer;
use crate::peers::PeerTable;
use crate::session::{reply_error, reply_json, Outcome, OWN_HEADERS};

/// Bytes read from disk and written to the peer at a time.
const CHUNK: usize = 512 * 1024;
/// Chunks read ahead of the network, per transfer (memory: `READ_AHEAD * CHUNK`).
const READ_AHEAD: usize = 4;

/// Transfer counters, shared by the serving and the pulling side.
pub struct TransferMetrics {
    /// Blob bytes sent (inbound requests) or received (outbound), by peer and direction.
    pub bytes: IntCounterVec,
    /// Blob transfers by peer, direction and status.
    pub transfers: IntCounterVec,
    /// Blob transfers being served now.
    pub in_flight: IntGauge,
}

impl TransferMetrics {
    /// Declares the metrics in the node's registry.
    pub fn register(metrics: &Metrics) -> Arc<Self> {
        let bytes = IntCounterVec::new(
            Opts::new(
                "arknet_model_transfer_bytes_total",
                "Model weight bytes sent to peers (inbound) or received from them (outbound)",
            ),
            &["peer", "direction"],
        )
        .expect("static metric definition");
        let transfers = IntCounterVec::new(
            Opts::new(
                "arknet_model_transfers_total",
                "Model blob transfers by peer, direction and status",
            ),
            &["peer", "direction", "status"],
        )
        .expect("static metric definition");
        let in_flight = IntGauge::new(
            "arknet_model_transfers_in_flight",
            "Model blob transfers being served to peers now",
        )
        .expect("static metric definition");
        for c in [
            Box::new(bytes.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(transfers.clone()),
            Box::new(in_flight.clone()),
        ] {
            // A second registration (tests building two servers on one registry) is harmless.
            let _ = metrics.registry().register(c);
        }
        Arc::new(TransferMetrics {
            bytes,
            transfers,
            in_flight,
        })
    }
}

/// Paces one peer's transfers to a byte rate, across all of them: each chunk is scheduled
/// after the previous one's share of time, so N parallel transfers share the cap.
#[derive(Default)]
struct Pacer {
    next: Mutex<HashMap<PublicKey, Instant>>,
}

impl Pacer {
    /// When `n` bytes for `key` may go out at `rate` bytes per second.
    fn slot(&self, key: &PublicKey, n: usize, rate: u64) -> Instant {
        let now = Instant::now();
        let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
        let at = next.get(key).copied().filter(|t| *t > now).unwrap_or(now);
        let cost = Duration::from_secs_f64(n as f64 / rate.max(1) as f64);
        next.insert(*key, at + cost);
        at
    }
}

/// Serves shared models' weights to approved peers.
pub struct ModelServer {
    store: Arc<WeightsStore>,
    config: SharingConfig,
    transfers: Arc<Semaphore>,
    pacer: Pacer,
    peers: Arc<PeerTable>,
    audit: Arc<AuditLog>,
    metrics: Arc<TransferMetrics>,
    refused: IntCounterVec,
}

/// A parsed `Range` header against a file of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAsk {
    /// No (usable) range: the whole file, 200.
    Whole,
    /// Bytes `start..end` (end exclusive), 206.
    Part(u64, u64),
    /// Not satisfiable, 416.
    Unsatisfiable,
}

/// Reads one `bytes=` range (`a-b`, `a-`, `-n`). Several ranges, other units or garbage are
/// ignored (the whole file, as RFC 9110 §14.2 allows), except a well-formed range that starts
/// past the end, which is 416.
pub fn parse_range(header: Option<&str>, size: u64) -> RangeAsk {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeAsk::Whole;
    };
    if spec.contains(',') {
        return RangeAsk::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeAsk::Whole;
    };
    let num = |s: &str| s.trim().parse::<u64>().ok();
    match (a.trim().is_empty(), num(a), num(b)) {
        (true, _, Some(n)) => {
            if n == 0 || size == 0 {
                RangeAsk::Unsatisfiable
            } else {
                RangeAsk::Part(size.saturating_sub(n), size)
            }
        }
        (false, Some(start), end) if b.trim().is_empty() || end.is_some() => {
            if start >= size {
                return RangeAsk::Unsatisfiable;
            }
            match end {
                Some(e) if e < start => RangeAsk::Whole,
                Some(e) => RangeAsk::Part(start, e.min(size - 1) + 1),
                None => RangeAsk::Part(start, size),
            }
        }
        _ => RangeAsk::Whole,
    }
}

/// Decodes a query component (`%XX`, `+`).
fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(h, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The value of `key` in a query string.
pub fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| decode(v))
}

impl ModelServer {
    /// A server over `store` with the node's sharing settings.
    pub fn new(
        store: Arc<WeightsStore>,
        config: SharingConfig,
        peers: Arc<PeerTable>,
        audit: Arc<AuditLog>,
        metrics: &Metrics,
        transfer_metrics: Arc<TransferMetrics>,
    ) -> Self {
        ModelServer {
            transfers: Arc::new(Semaphore::new(config.max_transfers)),
            store,
            config,
            pacer: Pacer::default(),
            peers,
            audit,
            metrics: transfer_metrics,
            refused: metrics.mesh_refused.clone(),
        }
    }

    /// The models `peer` may pull from us: shared with it and with weights on disk.
    pub fn pullable_by(&self, peer: &ApprovedPeer) -> Vec<String> {
        if !peer.permissions.can_pull_models {
            return Vec::new();
        }
        self.store
            .models()
            .into_iter()
            .filter(|m| authz::shares(peer, m))
            .collect()
    }

    /// Serves one model-sharing request of an approved `peer`.
    pub async fn serve(&self, s: &mut ServerSession, peer: &ApprovedPeer, path: &str) -> Outcome {
        let method = s.req_header().method.clone();
        if method != Method::GET && method != Method::HEAD {
            return reply_error(s, Dialect::OpenAi, &ApiError::method_not_allowed("GET")).await;
        }
        let query = s.req_header().uri.query().map(str::to_string);
        let Some(model) = query_param(query.as_deref(), "model") else {
            let e = ApiError::bad_request("`model` query parameter missing");
            return reply_error(s, Dialect::OpenAi, &e).await;
        };
        // Who may pull what is decided before anything on disk is looked at.
        if let Err(denied) = authz::may_pull(peer, &model) {
            let (started, started_at) = (Instant::now(), SystemTime::now());
            self.refused.with_label_values(&[denied.code()]).inc();
            let e = ApiError::forbidden(denied.code(), denied.to_string());
            let mut out = reply_error(s, Dialect::OpenAi, &e).await;
            // Refusals are audited like every peer request (DESIGN §4).
            let error = Some(denied.code().to_string());
            self.record(
                peer,
                &model,
                403,
                0,
                error,
                started,
                started_at,
                Direction::Inbound,
            );
            out.model = Some(model);
            return out;
        }
        let mut out = match path {
            MANIFEST_PATH => self.manifest(s, &model).await,
            BLOB_PATH => {
                let digest = query_param(query.as_deref(), "digest").unwrap_or_default();
                self.blob(s, peer, &model, &digest).await
            }
            _ => reply_error(s, Dialect::OpenAi, &ApiError::no_route(path)).await,
        };
        out.model = Some(model);
        out
    }

    async fn manifest(&self, s: &mut ServerSession, model: &str) -> Outcome {
        let store = self.store.clone();
        let name = model.to_string();
        match tokio::task::spawn_blocking(move || store.find(&name)).await {
            Ok(Ok(found)) => match serde_json::to_value(&found.manifest) {
                Ok(v) => reply_json(s, 200, &v).await,
                Err(e) => reply_error(s, Dialect::OpenAi, &ApiError::internal(e.to_string())).await,
            },
            Ok(Err(e)) => self.store_error(s, model, e).await,
            Err(e) => reply_error(s, Dialect::OpenAi, &ApiError::internal(e.to_string())).await,
        }
    }

    async fn store_error(&self, s: &mut ServerSession, model: &str, e: StoreError) -> Outcome {
        let err = match e {
            StoreError::NotFound(m) => ApiError::new(404, "model_not_found", m),
            StoreError::Broken(m) => {
                tracing::warn!(model, error = %m, "shared model's weights are unreadable");
                ApiError::new(
                    500,
                    "weights_unreadable",
                    format!("model \"{model}\": weights unreadable here"),
                )
            }
        };
        reply_error(s, Dialect::OpenAi, &err).await
    }

    async fn blob(
        &self,
        s: &mut ServerSession,
        peer: &ApprovedPeer,
        model: &str,
        digest: &str,
    ) -> Outcome {
        if !valid_digest(digest) {
            let e = ApiError::new(
                400,
                "invalid_digest",
                "`digest` must be sha256: and 64 lowercase hex digits",
            );
            return reply_error(s, Dialect::OpenAi, &e).await;
        }
        let store = self.store.clone();
        let (name, d) = (model.to_string(), digest.to_string());
        let (path, size) = match tokio::task::spawn_blocking(move || store.blob(&name, &d)).await {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => return self.store_error(s, model, e).await,
            Err(e) => {
                return reply_error(s, Dialect::OpenAi, &ApiError::internal(e.to_string())).await
            }
        };
        let Ok(_slot) = self.transfers.clone().try_acquire_owned() else {
            self.refused.with_label_values(&["transfer_limit"]).inc();
            let mut e = ApiError::new(
                429,
                "too_many_transfers",
                format!(
                    "this node serves {} model transfers at once; try again shortly",
                    self.config.max_transfers
                ),
            );
            e.retry_after = Some(1);
            return reply_error(s, Dialect::OpenAi, &e).await;
        };
        self.metrics.in_flight.inc();
        let started = Instant::now();
        let started_at = SystemTime::now();
        let (outcome, sent, error) = self.stream(s, peer, &path, size).await;
        self.metrics.in_flight.dec();
        let status = if error.is_some() { 499 } else { outcome.status };
        self.record(
            peer,
            model,
            status,
            sent,
            error,
            started,
            started_at,
            Direction::Inbound,
        );
        outcome
    }

    /// Writes the file (or the asked range), paced to the peer's cap; returns the outcome,
    /// the body bytes sent and why it stopped early.
    async fn stream(
        &self,
        s: &mut ServerSession,
        peer: &ApprovedPeer,
        path: &PathBuf,
        size: u64,
    ) -> (Outcome, u64, Option<String>) {
        let range = s
            .req_header()
            .headers
            .get(http::header::RANGE)
            .and_then(|v| v.to_str().ok());
        let (status, start, end) = match parse_range(range, size) {
            RangeAsk::Whole => (200, 0, size),
            RangeAsk::Part(a, b) => (206, a, b),
            RangeAsk::Unsatisfiable => {
                let ok = write_head(s, 416, 0, Some(format!("bytes */{size}"))).await
                    && s.write_response_body(Bytes::new(), true).await.is_ok();
                return (Outcome::answered(416, ok), 0, None);
            }
        };
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot open a shared blob");
                let e = ApiError::new(500, "weights_unreadable", "blob unreadable here");
                return (reply_error(s, Dialect::OpenAi, &e).await, 0, None);
            }
        };
        let content_range = (status == 206).then(|| format!("bytes {start}-{}/{size}", end - 1));
        if !write_head(s, status, end - start, content_range).await {
            return (
                Outcome::answered(status, false),
                0,
                Some("peer left".into()),
            );
        }
        if s.req_header().method == Method::HEAD {
            let ok = s.write_response_body(Bytes::new(), true).await.is_ok();
            return (Outcome::answered(status, ok), 0, None);
        }
        // Disk reads run ahead of the network writes (a few chunks, bounded), on a blocking
        // thread, so neither waits for the other; the reader stops when this side hangs up.
        let (tx, mut chunks) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(READ_AHEAD);
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            let mut at = start;
            while at < end {
                let n = ((end - at) as usize).min(CHUNK);
                let mut buf = BytesMut::zeroed(n);
                let read = file.read_exact_at(&mut buf, at).map(|()| buf.freeze());
                let failed = read.is_err();
                if tx.blocking_send(read).is_err() || failed {
                    return;
                }
                at += n as u64;
            }
        });
        let mut left = end - start;
        let mut sent = 0u64;
        while left > 0 {
            let chunk = match chunks.recv().await {
                Some(Ok(chunk)) => chunk,
                // The file shrank under us: the peer sees a short body, and the sha256 check
                // on its side refuses the layer.
                Some(Err(e)) => {
                    return (
                        Outcome::answered(status, false),
                        sent,
                        Some(format!("read: {e}")),
                    )
                }
                None => {
                    return (
                        Outcome::answered(status, false),
                        sent,
                        Some("reader stopped".into()),
                    )
                }
            };
            let want = chunk.len();
            // A peer revoked, or whose pull permission was withdrawn, stops getting bytes.
            let approvals = self.peers.approvals();
            let still = approvals
                .get(&peer.public_key)
                .is_some_and(|p| p.permissions.can_pull_models);
            if !still {
                return (
                    Outcome::answered(status, false),
                    sent,
                    Some("revoked".into()),
                );
            }
            if let Some(rate) = self.config.peer_rate {
                let at = self.pacer.slot(&peer.public_key, want, rate);
                tokio::time::sleep_until(at.into()).await;
            }
            left = left.saturating_sub(want as u64);
            if s.write_response_body(chunk, left == 0).await.is_err() {
                return (
                    Outcome::answered(status, false),
                    sent,
                    Some("peer left".into()),
                );
            }
            sent += want as u64;
            self.metrics
                .bytes
                .with_label_values(&[&peer.node_id, "inbound"])
                .inc_by(want as u64);
        }
        (Outcome::answered(status, true), sent, None)
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        peer: &ApprovedPeer,
        model: &str,
        status: u16,
        bytes: u64,
        error: Option<String>,
        started: Instant,
        started_at: SystemTime,
        direction: Direction,
    ) {
        record_transfer(
            &self.audit,
            &self.metrics,
            TransferRecord {
                peer: &peer.node_id,
                model,
                status,
                bytes,
                error,
                started,
                started_at,
                direction,
            },
        );
    }
}

/// One transfer for the audit log and metrics.
pub struct TransferRecord<'a> {
    /// The peer's approved node id.
    pub peer: &'a str,
    /// The model.
    pub model: &'a str,
    /// Its real outcome as a status (499 when cut short).
    pub status: u16,
    /// Body bytes moved.
    pub bytes: u64,
    /// Why it ended early, if it did.
    pub error: Option<String>,
    /// When it started.
    pub started: Instant,
    /// The same, as wall-clock time.
    pub started_at: SystemTime,
    /// Inbound: a peer pulled from us; outbound: we pulled from it.
    pub direction: Direction,
}

/// Writes `r` to the audit log and counts it.
pub fn record_transfer(audit: &AuditLog, metrics: &TransferMetrics, r: TransferRecord<'_>) {
    let dir = match r.direction {
        Direction::Inbound => "inbound",
        Direction::Outbound => "outbound",
    };
    metrics
        .transfers
        .with_label_values(&[r.peer, dir, &r.status.to_string()])
        .inc();
    audit.write(AuditRecord {
        bytes: Some(r.bytes),
        ..AuditRecord::without_tokens(
            r.started_at,
            r.started,
            r.direction,
            r.peer.to_string(),
            r.model.to_string(),
            r.status,
            r.error,
        )
    });
}

async fn write_head(
    s: &mut ServerSession,
    status: u16,
    length: u64,
    content_range: Option<String>,
) -> bool {
    let Ok(mut h) = ResponseHeader::build(status, Some(8)) else {
        return false;
    };
    let mut ok = h
        .insert_header(http::header::CONTENT_TYPE, "application/octet-stream")
        .is_ok()
        && h.insert_header(http::header::CONTENT_LENGTH, length.to_string())
            .is_ok()
        && h.insert_header(http::header::ACCEPT_RANGES, "bytes")
            .is_ok();
    if let Some(cr) = content_range {
        ok = ok && h.insert_header(http::header::CONTENT_RANGE, cr).is_ok();
    }
    for (n, v) in OWN_HEADERS {
        ok = ok && h.insert_header(n, v).is_ok();
    }
    ok && s.write_response_header(Box::new(h)).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_read_as_rfc_9110_says() {
        assert_eq!(parse_range(None, 100), RangeAsk::Whole);
        assert_eq!(parse_range(Some("bytes=0-9"), 100), RangeAsk::Part(0, 10));
        assert_eq!(parse_range(Some("bytes=90-"), 100), RangeAsk::Part(90, 100));
        assert_eq!(
            parse_range(Some("bytes=90-500"), 100),
            RangeAsk::Part(90, 100)
        );
        assert_eq!(parse_range(Some("bytes=-10"), 100), RangeAsk::Part(90, 100));
        assert_eq!(parse_range(Some("bytes=-500"), 100), RangeAsk::Part(0, 100));
        assert_eq!(
            parse_range(Some("bytes=100-"), 100),
            RangeAsk::Unsatisfiable
        );
        assert_eq!(parse_range(Some("bytes=-0"), 100), RangeAsk::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-"), 0), RangeAsk::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=5-2"), 100), RangeAsk::Whole);
        assert_eq!(parse_range(Some("bytes=0-1,5-6"), 100), RangeAsk::Whole);
        assert_eq!(parse_range(Some("items=0-1"), 100), RangeAsk::Whole);
        assert_eq!(parse_range(Some("bytes=x-1"), 100), RangeAsk::Whole);
    }

    #[test]
    fn query_values_are_decoded() {
        let q = Some("model=me%2Fm%3Aq4&digest=sha256%3Aab");
        assert_eq!(query_param(q, "model").as_deref(), Some("me/m:q4"));
        assert_eq!(query_param(q, "digest").as_deref(), Some("sha256:ab"));
        assert_eq!(query_param(q, "x"), None);
        assert_eq!(query_param(Some("model=%zz"), "model"), None);
    }

    #[test]
    fn a_peer_s_chunks_share_its_rate() {
        let pacer = Pacer::default();
        let key = PublicKey::from_bytes([1; 32]);
        let t0 = pacer.slot(&key, 1000, 1000);
        let t1 = pacer.slot(&key, 1000, 1000);
        let t2 = pacer.slot(&key, 1000, 1000);
        assert!(t1.duration_since(t0) >= Duration::from_millis(999));
        assert!(t2.duration_since(t1) >= Duration::from_millis(999));
        let other = pacer.slot(&PublicKey::from_bytes([2; 32]), 1000, 1000);
        assert!(other < t1, "another peer is not held back");
    }
}
