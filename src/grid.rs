//! Grid routing of a local client's request: this node's own backends first while they have a
//! free slot, then approved peers that share the model with us, failing over before the first
//! response byte (DESIGN §5).
//!
//! ```text
//! local backends (relay.rs, ranked) -> busy/failed -> peers (routing::rank_peers over the
//! last hellos) -> pinned mTLS request with an allow-listed body (dialect/sanitize.rs)
//!   -> connect/TLS failure, timeout to headers, 403/404/429/502/503/504 -> next peer
//!   -> response relayed as it arrives; token counts audited (audit.rs)
//! ```
//!
//! We never have more requests in flight to a peer than its approval of us grants.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use pingora::protocols::http::ServerSession;
use serde_json::{json, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::audit::{AuditLog, AuditRecord, Direction};
use crate::catalog::synthesized_entry;
use crate::dialect::meter::{TokenMeter, Tokens};
use crate::dialect::sanitize;
use crate::dialect::translate;
use crate::error::{ApiError, Dialect};
use crate::identity::PublicKey;
use crate::mesh::client::MeshClient;
use crate::mesh::protocol::SharedModel;
use crate::metrics::Metrics;
use crate::peers::reputation::{self, RequestOutcome, Standing};
use crate::peers::PeerTable;
use crate::relay::{relay_response, Attempt, LocalRelay, ModelRequest};
use crate::routing::{self, PeerView};
use crate::session::{reply_error, Cut, Outcome};
use crate::upstream::{SendError, Upstream};

/// Peer answers that mean "not here, not now": try the next candidate.
const FAILOVER_STATUSES: [u16; 6] = [403, 404, 429, 502, 503, 504];
/// Peers tried per request at most.
const PEER_ATTEMPTS: usize = 4;

/// Routes local requests across the node's backends and its peers.
pub struct Grid {
    relay: Arc<LocalRelay>,
    client: Arc<MeshClient>,
    peers: Arc<PeerTable>,
    upstream: Arc<Upstream>,
    audit: Arc<AuditLog>,
    metrics: Arc<Metrics>,
    outbound: Mutex<HashMap<PublicKey, Arc<Outbound>>>,
    warnings: crate::health::WarnLimiter,
}

/// Our side of one peer's grant.
struct Outbound {
    grant: u32,
    slots: Arc<Semaphore>,
    failures: AtomicU32,
}

/// A peer that could serve the request.
struct PeerCandidate {
    key: PublicKey,
    node_id: String,
    addr: SocketAddr,
    view: PeerView,
    /// The peer serves the model over the OpenAI API only: translate this Ollama request.
    translate: bool,
}

/// The entry for `key` in the outbound map, made (or remade for a new grant) as needed.
fn outbound_entry<'a>(
    map: &'a mut HashMap<PublicKey, Arc<Outbound>>,
    key: &PublicKey,
    grant: u32,
) -> &'a Arc<Outbound> {
    let entry = map
        .entry(*key)
        .or_insert_with(|| Arc::new(Outbound::new(grant)));
    if entry.grant != grant {
        *entry = Arc::new(Outbound::new(grant));
    }
    entry
}

impl Grid {
    /// Assembles the router.
    pub fn new(
        relay: Arc<LocalRelay>,
        client: Arc<MeshClient>,
        peers: Arc<PeerTable>,
        upstream: Arc<Upstream>,
        audit: Arc<AuditLog>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Grid {
            relay,
            client,
            peers,
            upstream,
            audit,
            metrics,
            outbound: Mutex::new(HashMap::new()),
            warnings: crate::health::WarnLimiter::default(),
        }
    }

    /// Serves a local client's model request from the best candidate that answers.
    pub async fn serve(&self, s: &mut ServerSession, mut req: ModelRequest<'_>) -> Outcome {
        let dialect = req.dialect;
        let local = self.relay.ranked(req.model, dialect, req.path).await;
        let mut tried = Tried::default();
        for &target in local.as_deref().unwrap_or_default() {
            if let Some(outcome) = tried.note(self.relay.attempt(s, target, &mut req, None).await) {
                return outcome;
            }
        }
        // Peers are looked at only when the node's own backends could not answer: most local
        // requests never touch the peer table.
        let (peers, ejected_for) = self.peer_candidates(req.model, dialect, req.path);
        let had_local = local.as_ref().is_ok_and(|v| !v.is_empty());
        if peers.is_empty() && !had_local {
            let e = match (local, ejected_for) {
                // The model is out there, on peers sitting out an ejection.
                (_, Some(secs)) => ApiError::peers_ejected(req.model, secs),
                (Err(no_route), None) => self.relay.no_route_error(req.model, no_route),
                (Ok(_), None) => ApiError::model_not_found(req.model),
            };
            return reply_error(s, dialect, &e).await;
        }
        if !peers.is_empty() {
            let body = match sanitize::for_peer(req.path, &req.body) {
                Ok(b) => b,
                Err(e) => return reply_error(s, dialect, &e).await,
            };
            for c in &peers {
                if let Some(outcome) = tried.note(self.attempt_peer(s, c, &req, &body).await) {
                    return outcome;
                }
                self.metrics
                    .peer_failovers
                    .with_label_values(&[&c.node_id])
                    .inc();
            }
        }
        reply_error(s, dialect, &tried.error(req.model)).await
    }

    /// The best few ([`PEER_ATTEMPTS`]) approved, reachable peers whose last hello offered
    /// `model` in `dialect`, best first; and,
    /// when some that offer it are ejected, the seconds until the first one is back.
    fn peer_candidates(
        &self,
        model: &str,
        dialect: Dialect,
        path: &str,
    ) -> (Vec<PeerCandidate>, Option<u64>) {
        let can_translate = dialect == Dialect::Ollama && translate::translatable(path);
        let speaks = |m: &SharedModel, d: Dialect| m.speaks(d.as_str());
        let snapshot = self.peers.routing();
        let now = reputation::unix_now();
        // Per request, for every peer: one view to rank and where it came from. Nothing per
        // peer is cloned until it is among the few that will be tried.
        let mut views = Vec::new();
        let mut picks = Vec::new();
        let mut ejected_for = None;
        let mut outbound = self.outbound.lock().unwrap_or_else(PoisonError::into_inner);
        for p in snapshot.peers.iter().filter(|p| p.reachable) {
            let Some(offer) = p.models.iter().find(|m| {
                routing::model_matches(&m.name, model)
                    && (speaks(m, dialect) || (can_translate && speaks(m, Dialect::OpenAi)))
            }) else {
                continue;
            };
            let (Some(addr), standing) = (p.addr, p.standing(now)) else {
                continue;
            };
            if standing == Standing::Ejected {
                let back_in = p.ejected_until.map_or(1, |t| t.saturating_sub(now).max(1));
                ejected_for = Some(ejected_for.map_or(back_in, |e: u64| e.min(back_in)));
                continue;
            }
            let out = outbound_entry(&mut outbound, &p.key, p.grant);
            views.push(PeerView {
                free_slots: offer.free_slots,
                hot: offer.loaded,
                our_in_flight: out.grant as usize - out.slots.available_permits(),
                grant: out.grant as usize,
                // What requests took beats what a hello took, once there is any.
                latency_ms: p.ttfb_ewma_ms.or(p.hello_latency_ms).unwrap_or(f64::MAX),
                failures: out.failures.load(Ordering::Relaxed),
                reliability: p.reliability,
                probation: standing == Standing::Probation,
            });
            picks.push((p, addr, !speaks(offer, dialect)));
        }
        drop(outbound);
        let ranked = routing::rank_peers(&views)
            .take(PEER_ATTEMPTS)
            .map(|i| {
                let (p, addr, translate) = picks[i];
                PeerCandidate {
                    key: p.key,
                    node_id: p.node_id.clone(),
                    addr,
                    view: views[i],
                    translate,
                }
            })
            .collect();
        (ranked, ejected_for)
    }

    /// Our concurrency bookkeeping for a peer, resized when its grant for us changes.
    fn outbound(&self, key: &PublicKey, grant: u32) -> Arc<Outbound> {
        let mut map = self.outbound.lock().unwrap_or_else(PoisonError::into_inner);
        outbound_entry(&mut map, key, grant).clone()
    }
    async fn attempt_peer(
        &self,
        s: &mut ServerSession,
        c: &PeerCandidate,
        req: &ModelRequest<'_>,
        body: &Bytes,
    ) -> Attempt {
        let out = self.outbound(&c.key, c.view.grant as u32);
        let Some(_slot): Option<OwnedSemaphorePermit> = out.slots.clone().try_acquire_owned().ok()
        else {
            return Attempt::Busy;
        };
        let Some(peer) = self.client.pinned(c.addr, &c.key) else {
            return Attempt::Failed(format!("peer {}: identity not verified yet", c.node_id));
        };
        let (path, body, translator) = if c.translate {
            match translate::ollama_to_openai(req.path, body) {
                Ok(t) => (t.path, t.body, Some(t.response)),
                Err(e) => return Attempt::Done(reply_error(s, req.dialect, &e).await),
            }
        } else {
            (req.path, body.clone(), None)
        };
        let Some(head) = self.client.request_head(path, body.len()) else {
            let e = ApiError::internal(format!("cannot forward to {path:?}"));
            return Attempt::Done(reply_error(s, req.dialect, &e).await);
        };
        let started_at = SystemTime::now();
        let started = Instant::now();
        // Every request that went out is audited here, whatever became of it (DESIGN §4).
        let audit_failure = |status: u16, error: String| {
            record_peer_request(
                &self.audit,
                &self.metrics,
                Direction::Outbound,
                &c.node_id,
                req.model,
                &Outcome::failed(status),
                TokenMeter::default().finish(),
                started,
                started_at,
                Some(error),
            );
        };
        let rsp = match self
            .upstream
            .send_wire(&peer.peer, peer.pool_key, head, &body)
            .await
        {
            Ok(rsp) => rsp,
            Err(e) => {
                if e.is_tls_rejection() {
                    self.client.count_spoof(format!(
                        "{} at {} failed the pinned handshake: {e}",
                        c.node_id, c.addr
                    ));
                }
                out.failures.fetch_add(1, Ordering::Relaxed);
                self.judge(c, RequestOutcome::failed());
                crate::warn_limited!(
                    self.warnings,
                    &c.node_id,
                    peer = %c.node_id,
                    error = %e,
                    "peer failed before responding"
                );
                if matches!(e, SendError::Timeout { .. }) {
                    audit_failure(504, "no response header in time".to_string());
                    return Attempt::TimedOut(describe(&c.node_id, &e));
                }
                audit_failure(502, "unreachable".to_string());
                return Attempt::Failed(describe(&c.node_id, &e));
            }
        };
        let status = rsp.header().status.as_u16();
        if FAILOVER_STATUSES.contains(&status) {
            // Unread body: dropping the response closes that connection instead of pooling it.
            // One line per peer and status per window, with the count of those held back: a
            // peer turning every request away must not flood the log.
            if let Some(repeated) = self.warnings.check(&format!("{}:{status}", c.node_id)) {
                tracing::info!(
                    peer = %c.node_id,
                    status,
                    repeated,
                    "peer declined; trying the next candidate"
                );
            }
            audit_failure(status, format!("peer answered {status}"));
            if status == 429 || status == 503 {
                self.peers.note_busy(&c.key, req.model);
                return Attempt::Busy;
            }
            out.failures.fetch_add(1, Ordering::Relaxed);
            self.judge(c, RequestOutcome::failed());
            return Attempt::Failed(format!("peer {} answered {status}", c.node_id));
        }
        let mut meter = TokenMeter::for_request(&req.body);
        let outcome =
            relay_response(&self.upstream, s, rsp, None, Some(&mut meter), translator).await;
        out.failures.store(0, Ordering::Relaxed);
        let tokens = meter.finish_claimed(body.len());
        let ttfb = outcome.first_byte.map(|t| t.duration_since(started));
        self.judge(
            c,
            RequestOutcome {
                // Answered and relayed to the end; a stream the peer broke is its failure, a
                // client that left is not.
                ok: outcome.status < 500 && outcome.cut.is_none_or(|c| c == Cut::ClientLeft),
                ttfb_ms: ttfb.map(|t| t.as_secs_f64() * 1000.0),
                tokens: tokens.completion,
                generation_secs: ttfb.map_or(0.0, |t| (started.elapsed() - t).as_secs_f64()),
            },
        );
        record_peer_request(
            &self.audit,
            &self.metrics,
            Direction::Outbound,
            &c.node_id,
            req.model,
            &outcome,
            tokens,
            started,
            started_at,
            None,
        );
        Attempt::Done(outcome)
    }

    /// Counts a request's outcome in the peer's reputation (which may eject it).
    fn judge(&self, c: &PeerCandidate, outcome: RequestOutcome) {
        let peers = self.peers.approvals().file.peers.len();
        let now = reputation::unix_now();
        let reputations = self.peers.reputations();
        let before = reputations.routing_facts(&c.key);
        let ejected = reputations.request(&c.key, outcome, now, peers);
        // Routing reads reputation from the peer snapshot: republish when the ranking can see
        // the change (ejection, a reliability step, a large TTFB move); the rest waits for the
        // next hello, which republishes anyway.
        if reputation::ranking_moved(before, reputations.routing_facts(&c.key)) {
            self.peers.reputation_changed();
        }
        if ejected {
            let record = self.peers.reputations().get(&c.key);
            tracing::warn!(
                peer = %c.node_id,
                consecutive_failures = record.consecutive_failures,
                for_secs = record.ejected_until.map_or(0, |t| t.saturating_sub(now)),
                "peer ejected from routing after repeated failures"
            );
        }
    }

    /// `/v1/models` or `/api/tags` for local clients: local models and the models peers share
    /// with us, each marked with where it is available (`arknet.local`, `arknet.peers`).
    pub fn listing(&self, dialect: Dialect) -> Value {
        let snapshot = self.relay.catalog().snapshot();
        let mut listing = snapshot.listing(dialect);
        let mut remote: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let snapshot = self.peers.routing();
        for p in snapshot.peers.iter().filter(|p| p.reachable) {
            for m in &p.models {
                // Ollama clients reach OpenAI-only models too, through translation.
                let speaks = m.speaks(dialect.as_str())
                    || (dialect == Dialect::Ollama && m.speaks(Dialect::OpenAi.as_str()));
                if speaks {
                    remote
                        .entry(m.name.clone())
                        .or_default()
                        .push(p.node_id.clone());
                }
            }
        }
        let (list_key, name_key) = match dialect {
            Dialect::OpenAi => ("data", "id"),
            Dialect::Ollama => ("models", "name"),
        };
        if let Some(list) = listing[list_key].as_array_mut() {
            for entry in list.iter_mut() {
                let name = entry[name_key].as_str().unwrap_or_default().to_string();
                let peers = remote.remove(&name).unwrap_or_default();
                entry["arknet"] = json!({"local": true, "peers": peers});
            }
            for (name, peers) in remote {
                let owner = format!("peer:{}", peers.first().map_or("", String::as_str));
                let mut entry = synthesized_entry(dialect, &name, &owner);
                entry["arknet"] = json!({"local": false, "peers": peers});
                list.push(entry);
            }
        }
        listing
    }
}

impl Outbound {
    fn new(grant: u32) -> Self {
        Outbound {
            grant,
            slots: Arc::new(Semaphore::new(grant as usize)),
            failures: AtomicU32::new(0),
        }
    }
}

/// What the candidates tried so far came to: the error the client gets when none answered.
#[derive(Default)]
struct Tried {
    busy: bool,
    failure: Option<String>,
    timed_out: bool,
}

impl Tried {
    /// Notes one attempt; returns the outcome when it answered the client.
    fn note(&mut self, attempt: Attempt) -> Option<Outcome> {
        match attempt {
            Attempt::Done(outcome) => return Some(outcome),
            Attempt::Busy => self.busy = true,
            Attempt::Failed(why) => self.failure = Some(why),
            Attempt::TimedOut(why) => {
                self.timed_out = true;
                self.failure = Some(why);
            }
        }
        None
    }

    fn error(self, model: &str) -> ApiError {
        ApiError::exhausted(model, self.busy, self.failure, self.timed_out)
    }
}

fn describe(node_id: &str, e: &SendError) -> String {
    format!("peer {node_id}: {e}")
}

/// Audit line and metrics for one peer request, either direction.
#[allow(clippy::too_many_arguments)]
pub fn record_peer_request(
    audit: &AuditLog,
    metrics: &Metrics,
    direction: Direction,
    peer: &str,
    model: &str,
    outcome: &Outcome,
    tokens: Tokens,
    started: Instant,
    started_at: SystemTime,
    error: Option<String>,
) {
    let (prompt, completion) = (tokens.prompt, tokens.completion);
    // A cut response went out as 200; what the peer got (or we got) was not a full answer.
    let (status, error) = match outcome.cut {
        Some(cut) => (cut.audit_status(), Some(cut.reason().to_string())),
        None => (outcome.status, error),
    };
    let dir = match direction {
        Direction::Inbound => "inbound",
        Direction::Outbound => "outbound",
    };
    let elapsed = started.elapsed();
    metrics
        .peer_requests
        .with_label_values(&[peer, dir, &status.to_string()])
        .inc();
    metrics
        .peer_duration
        .with_label_values(&[dir])
        .observe(elapsed.as_secs_f64());
    for (kind, n) in [("prompt", prompt), ("completion", completion)] {
        if let Some(n) = n {
            metrics
                .peer_tokens
                .with_label_values(&[peer, dir, kind])
                .inc_by(n);
        }
    }
    audit.write(AuditRecord {
        timestamp: crate::timefmt::rfc3339(started_at),
        direction,
        peer: peer.to_string(),
        model: model.to_string(),
        status,
        error,
        prompt_tokens: prompt,
        prompt_tokens_estimated: tokens.prompt_estimated,
        completion_tokens: completion,
        token_source: tokens.source,
        claim_refused: tokens.claim_refused,
        ttft_ms: outcome
            .first_byte
            .map(|t| t.duration_since(started).as_secs_f64() * 1000.0),
        latency_ms: elapsed.as_secs_f64() * 1000.0,
        bytes: None,
    });
}

#[cfg(test)]
mod tests;
