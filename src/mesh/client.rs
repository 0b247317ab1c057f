//! Talking to other nodes' mesh listeners: hello, identity proof, and the background loop that
//! keeps `/peers/status` current and turns static endpoints into sightings.
//!
//! A node's identity certificate is public (it is sent in every handshake); learning it over an
//! unverified connection is harmless because it is then *pinned*: the next connection succeeds
//! only if the other side holds a leaf key issued by that identity. A certificate for another
//! key than the one expected, or a pinned handshake that fails, counts as a spoof.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::protocol::{
    self, SharedModel, HELLO_PATH, MESH_PORT_HEADER, NODE_ID_HEADER, PROTOCOL_HEADER,
    PROTOCOL_VERSION,
};
use super::tls::{parse_identity_cert, MeshTls, MESH_SNI};
use crate::discovery::jittered;
use crate::identity::PublicKey;
use crate::metrics::Metrics;
use crate::peers::{PeerStatus, PeerTable, Source};
use crate::timefmt::now_rfc3339;
use crate::upstream::{SendError, Upstream};
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::tls::x509::X509;
use pingora::upstreams::peer::Peer as _;
use tokio::task::JoinSet;

/// Why a hello failed.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    /// Could not talk to it at all.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// It answered with something that is not a hello.
    #[error("bad hello: {0}")]
    Protocol(String),
    /// Its certificate is not the identity expected there.
    #[error("spoof: {0}")]
    Spoof(String),
    /// It is reachable and proved its key, but has not approved us (yet).
    #[error("the peer has not approved this node")]
    NotApproved,
}

/// A verified hello answer.
#[derive(Debug, Clone)]
pub struct Hello {
    /// The peer's key, proven by the pinned TLS handshake.
    pub key: PublicKey,
    /// The node id it goes by.
    pub node_id: Option<String>,
    /// Models it shares with us, with free slots for us (empty when it has not approved us).
    pub models: Vec<SharedModel>,
    /// Whether the peer has approved us.
    pub approved_us: bool,
    /// Requests the peer lets us have in flight there.
    pub grant: u32,
    /// Round trip of the pinned request.
    pub latency: Duration,
    /// Models whose weights we may pull from it.
    pub pullable: Vec<String>,
}

/// The longest a hello may take, from connect to the last byte of the answer.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Outbound side of the mesh.
pub struct MeshClient {
    tls: Arc<MeshTls>,
    upstream: Arc<Upstream>,
    metrics: Arc<Metrics>,
    own_headers: Vec<(&'static str, String)>,
    /// The header lines every forwarded request carries after its request line, on the wire.
    request_lines: Vec<u8>,
    pins: Mutex<HashMap<PublicKey, X509>>,
    /// Connection settings per pinned peer and address, built once per pin (building them and
    /// hashing them for the pool was a dozen allocations per forwarded request).
    pinned: Mutex<HashMap<(SocketAddr, PublicKey), Arc<PinnedPeer>>>,
}

/// A peer whose identity is pinned, ready for requests.
pub struct PinnedPeer {
    /// Connection settings: mutual TLS, the pinned certificate as the only trust anchor.
    pub peer: pingora::upstreams::peer::HttpPeer,
    /// Its connection-pool key (`peer.reuse_hash()`).
    pub pool_key: u64,
}

/// Pinned peers kept at most; the map is emptied beyond this (addresses change over time).
const MAX_PINNED: usize = 1024;

impl MeshClient {
    /// A client presenting this node's certificate and announcing `node_id` and `mesh_port`.
    pub fn new(
        tls: Arc<MeshTls>,
        upstream: Arc<Upstream>,
        metrics: Arc<Metrics>,
        node_id: &str,
        mesh_port: u16,
    ) -> Self {
        let own_headers = vec![
            (NODE_ID_HEADER, node_id.to_string()),
            (MESH_PORT_HEADER, mesh_port.to_string()),
            (PROTOCOL_HEADER, PROTOCOL_VERSION.to_string()),
        ];
        let mut request_lines = format!("host: {MESH_SNI}\r\ncontent-type: application/json\r\n");
        for (name, value) in &own_headers {
            // A node id is checked when configured; a value that could break the header out
            // is left out rather than written.
            if value.bytes().all(|b| b.is_ascii_graphic()) {
                request_lines.push_str(&format!("{name}: {value}\r\n"));
            }
        }
        MeshClient {
            tls,
            upstream,
            metrics,
            own_headers,
            request_lines: request_lines.into_bytes(),
            pins: Mutex::new(HashMap::new()),
            pinned: Mutex::new(HashMap::new()),
        }
    }

    /// The head of a forwarded request (`POST path`, our own headers, the body's length), on
    /// the wire; `None` for a path that cannot go on a request line.
    pub fn request_head(&self, path: &str, body_len: usize) -> Option<bytes::BytesMut> {
        use std::fmt::Write as _;
        if path.is_empty() || !path.bytes().all(|b| b.is_ascii_graphic()) {
            return None;
        }
        let mut w =
            crate::upstream::wire_buffer(64 + path.len() + self.request_lines.len(), body_len);
        w.extend_from_slice(b"POST ");
        w.extend_from_slice(path.as_bytes());
        w.extend_from_slice(b" HTTP/1.1\r\n");
        w.extend_from_slice(&self.request_lines);
        let _ = write!(w, "content-length: {body_len}\r\n\r\n");
        Some(w)
    }

    /// The pinned peer for `key` at `addr` with its pool key, once its identity certificate is
    /// known; built once per pin and address.
    pub fn pinned(&self, addr: SocketAddr, key: &PublicKey) -> Option<Arc<PinnedPeer>> {
        // Locks in the order `learn` takes them: pins, then pinned.
        let pins = self.pins.lock().unwrap_or_else(PoisonError::into_inner);
        let pin = pins.get(key)?;
        let mut pinned = self.pinned.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(p) = pinned.get(&(addr, *key)) {
            return Some(p.clone());
        }
        let peer = self.tls.peer(addr, pin, key);
        let p = Arc::new(PinnedPeer {
            pool_key: peer.reuse_hash(),
            peer,
        });
        if pinned.len() >= MAX_PINNED {
            pinned.clear();
        }
        pinned.insert((addr, *key), p.clone());
        Some(p)
    }

    /// Hello to whoever listens at `addr`; `expected` pins the key when known. Returns the
    /// verified identity. Gives up after [`HELLO_TIMEOUT`], handshake and body included.
    pub async fn hello(
        &self,
        addr: SocketAddr,
        expected: Option<&PublicKey>,
    ) -> Result<Hello, HelloError> {
        // The upstream's own limits are sized for inference (minutes to a first byte); a peer
        // that takes the connection and then stalls must not hold a hello that long.
        tokio::time::timeout(HELLO_TIMEOUT, self.exchange(addr, expected))
            .await
            .unwrap_or_else(|_| {
                Err(HelloError::Unreachable(format!(
                    "{addr}: no hello within {HELLO_TIMEOUT:?}"
                )))
            })
    }

    async fn exchange(
        &self,
        addr: SocketAddr,
        expected: Option<&PublicKey>,
    ) -> Result<Hello, HelloError> {
        let pinned = expected.and_then(|k| self.pin(k).map(|c| (*k, c)));
        let (key, pin) = match pinned {
            Some(p) => p,
            None => self.learn(addr, expected).await?,
        };
        let peer = self.tls.peer(addr, &pin, &key);
        let started = Instant::now();
        let answer = self
            .upstream
            .get_raw(&peer, MESH_SNI, HELLO_PATH, &self.own_headers)
            .await;
        let latency = started.elapsed();
        let (status, body) = answer.map_err(|e| {
            if e.is_tls_rejection() {
                self.spoof(format!("{addr} could not prove key {key}: {e}"))
            } else {
                HelloError::Unreachable(e.to_string())
            }
        })?;
        let body = body.map_err(HelloError::Protocol)?;
        match protocol::parse_hello(status, &body)
            .map_err(|e| HelloError::Protocol(e.to_string()))?
        {
            protocol::Hello::Approved(answer) => Ok(Hello {
                key,
                node_id: Some(answer.node_id),
                models: answer.models,
                approved_us: true,
                grant: answer.you.grant,
                latency,
                pullable: answer.pullable,
            }),
            protocol::Hello::NotApproved(stranger) => Ok(Hello {
                key,
                node_id: Some(stranger.node_id).filter(|id| !id.is_empty()),
                models: Vec::new(),
                approved_us: false,
                grant: 0,
                latency,
                pullable: Vec::new(),
            }),
        }
    }

    /// A pinned upstream peer for `key` at `addr`, once its identity certificate is known.
    pub fn pinned_peer(
        &self,
        addr: SocketAddr,
        key: &PublicKey,
    ) -> Option<pingora::upstreams::peer::HttpPeer> {
        self.pin(key).map(|pin| self.tls.peer(addr, &pin, key))
    }

    /// Headers this node sends on every mesh request.
    pub fn own_headers(&self) -> &[(&'static str, String)] {
        &self.own_headers
    }

    /// Counts a spoof seen outside of hello (e.g. a forwarded request's handshake).
    pub fn count_spoof(&self, what: String) {
        let _ = self.spoof(what);
    }

    fn pin(&self, key: &PublicKey) -> Option<X509> {
        self.pins
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    /// Fetches the identity certificate `addr` claims, checks it against `expected`, and keeps
    /// it as the pin for that key.
    async fn learn(
        &self,
        addr: SocketAddr,
        expected: Option<&PublicKey>,
    ) -> Result<(PublicKey, X509), HelloError> {
        let peer = self.tls.unverified_peer(addr);
        let (status, body) = self
            .upstream
            .get_raw(&peer, MESH_SNI, HELLO_PATH, &self.own_headers)
            .await
            .map_err(|e: SendError| HelloError::Unreachable(e.to_string()))?;
        let body = body.map_err(HelloError::Protocol)?;
        let hello = protocol::parse_hello(status, &body)
            .map_err(|e| HelloError::Protocol(e.to_string()))?;
        let pem = match &hello {
            protocol::Hello::Approved(a) => a.identity_cert.as_str(),
            protocol::Hello::NotApproved(s) => s.identity_cert.as_str(),
        };
        let (cert, key) = parse_identity_cert(pem).ok_or_else(|| {
            HelloError::Protocol(
                "identity certificate is not a self-signed Ed25519 certificate".into(),
            )
        })?;
        if expected.is_some_and(|e| *e != key) {
            return Err(self.spoof(format!(
                "{addr} claims key {key}, expected {}",
                expected.map(ToString::to_string).unwrap_or_default()
            )));
        }
        let mut pins = self.pins.lock().unwrap_or_else(PoisonError::into_inner);
        // A new pin (a peer that re-keyed its certificate) replaces the settings built on the
        // old one, under both locks (in the order `pinned()` takes them too).
        self.pinned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|(_, k), _| *k != key);
        pins.insert(key, cert.clone());
        Ok((key, cert))
    }

    fn spoof(&self, what: String) -> HelloError {
        self.metrics.mesh_spoofs.inc();
        tracing::warn!(%what, "identity mismatch on the mesh");
        HelloError::Spoof(what)
    }
}

/// Background loop: re-reads `approved_peers.json` when edited, probes static endpoints, and
/// says hello to every approved peer with a known endpoint.
///
/// Each target (a static endpoint, an approved peer) has its own schedule: a hello is started
/// when the target is due, runs concurrently with the others, and the next one is due a
/// jittered [`MeshPoller::hello_interval`] after it ends. A dead peer costs only its own
/// hellos their timeout; the others keep their period.
pub struct MeshPoller {
    /// Outbound client.
    pub client: Arc<MeshClient>,
    /// The peer table it reports into.
    pub peers: Arc<PeerTable>,
    /// Metrics (approvals file validity).
    pub metrics: Arc<Metrics>,
    /// Configured peer endpoints.
    pub static_peers: Vec<SocketAddr>,
    /// Period of hellos.
    pub hello_interval: Duration,
}

/// How often the approvals file is checked for hand edits.
const FILE_CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// Whom a hello goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Target {
    /// A configured endpoint, key unknown until it answers.
    Static(SocketAddr),
    /// An approved peer, at its current endpoint.
    Approved(PublicKey),
}

/// A finished hello: to whom, and what came back.
type Outcome = (Target, Result<Hello, HelloError>);

/// When each target is due, and which hellos are under way; no I/O.
#[derive(Debug, Default)]
struct Schedule {
    next: HashMap<Target, Instant>,
    in_flight: HashSet<Target>,
}

impl Schedule {
    /// The targets to dial now, out of `targets` (the current list): due ones not already
    /// being dialed. They count as in flight from here on; targets no longer listed are
    /// forgotten.
    fn due(&mut self, targets: &[Target], now: Instant) -> Vec<Target> {
        self.next.retain(|t, _| targets.contains(t));
        let due: Vec<Target> = targets
            .iter()
            .filter(|t| !self.in_flight.contains(t))
            .filter(|t| self.next.get(t).is_none_or(|at| *at <= now))
            .copied()
            .collect();
        self.in_flight.extend(due.iter().copied());
        due
    }

    /// `target`'s hello ended at `now`; its next one is due `period` later.
    fn done(&mut self, target: Target, now: Instant, period: Duration) {
        self.in_flight.remove(&target);
        self.next.insert(target, now + period);
    }

    /// The earliest time a target not in flight falls due.
    fn next_due(&self) -> Option<Instant> {
        self.next
            .iter()
            .filter(|(t, _)| !self.in_flight.contains(t))
            .map(|(_, at)| *at)
            .min()
    }
}

#[async_trait]
impl BackgroundService for MeshPoller {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut schedule = Schedule::default();
        let mut hellos: JoinSet<Outcome> = JoinSet::new();
        loop {
            self.peers.reload_if_changed();
            self.metrics
                .approvals_file_valid
                .set(i64::from(self.peers.file_error().is_none()));
            for target in schedule.due(&self.targets(), Instant::now()) {
                self.spawn_hello(target, &mut hellos);
            }
            let file_check = tokio::time::Instant::now() + FILE_CHECK_INTERVAL;
            let wake = schedule
                .next_due()
                .map_or(file_check, |at| file_check.min(at.into()));
            tokio::select! {
                Some(done) = hellos.join_next(), if !hellos.is_empty() => {
                    if let Ok((target, result)) = done {
                        self.record(target, result);
                        schedule.done(target, Instant::now(), jittered(self.hello_interval));
                    }
                }
                _ = tokio::time::sleep_until(wake) => {}
                _ = shutdown.changed() => {
                    hellos.abort_all();
                    return;
                }
            }
        }
    }
}

impl MeshPoller {
    /// Everyone to say hello to now: static endpoints, and approved peers with an endpoint.
    fn targets(&self) -> Vec<Target> {
        let approvals = self.peers.approvals();
        let approved = approvals
            .file
            .peers
            .iter()
            .filter(|p| self.peers.endpoint_of(&p.public_key).is_some())
            .map(|p| Target::Approved(p.public_key));
        self.static_peers
            .iter()
            .map(|a| Target::Static(*a))
            .chain(approved)
            .collect()
    }

    fn spawn_hello(&self, target: Target, hellos: &mut JoinSet<Outcome>) {
        let client = self.client.clone();
        let (addr, expected) = match target {
            Target::Static(addr) => (Ok(addr), None),
            Target::Approved(key) => {
                let endpoint = self.peers.endpoint_of(&key).unwrap_or_default();
                let addr = endpoint
                    .parse::<SocketAddr>()
                    .map_err(|_| HelloError::Unreachable(format!("bad endpoint `{endpoint}`")));
                (addr, Some(key))
            }
        };
        hellos.spawn(async move {
            let result = match addr {
                Ok(addr) => client.hello(addr, expected.as_ref()).await,
                Err(e) => Err(e),
            };
            (target, result)
        });
    }

    /// Reports a finished hello: a sighting for a static endpoint, a status for a peer.
    fn record(&self, target: Target, result: Result<Hello, HelloError>) {
        let key = match target {
            Target::Static(addr) => {
                match result {
                    Ok(h) => {
                        self.peers
                            .sighted(h.key, Source::Static, h.node_id, Some(addr.to_string()))
                    }
                    Err(e) => tracing::debug!(%addr, error = %e, "static peer probe failed"),
                }
                return;
            }
            Target::Approved(key) => key,
        };
        if self.peers.approvals().get(&key).is_none() {
            // Revoked while the hello ran: no status for a stranger.
            return;
        }
        let mut status = self.peers.status(&key);
        if let Some(p) = self.peers.approvals().get(&key) {
            log_hello_changes(&p.node_id, &status, result.as_ref().ok());
        }
        match result {
            Ok(h) => {
                status.reachable = true;
                status.last_hello = Some(now_rfc3339());
                status.latency_ms = Some(h.latency.as_secs_f64() * 1000.0);
                status.models = h.models;
                status.grant = h.grant;
                status.pullable = h.pullable;
                status.error = (!h.approved_us).then(|| HelloError::NotApproved.to_string());
            }
            Err(e) => {
                status.reachable = false;
                status.error = Some(e.to_string());
            }
        }
        self.peers.set_status(key, status);
    }
}

/// INFO event lines for what a hello changed about a peer's view of us: it approved us (or no
/// longer does), it shares a model with us or withdrew one.
fn log_hello_changes(node_id: &str, before: &PeerStatus, hello: Option<&Hello>) {
    let Some(h) = hello else {
        return;
    };
    let approved_before = before.reachable && before.error.is_none();
    if h.approved_us && !approved_before {
        tracing::info!(node_id, "peer approved us");
    } else if !h.approved_us && approved_before {
        tracing::info!(node_id, "peer no longer approves us");
    }
    let names = |models: &[super::protocol::SharedModel]| -> Vec<String> {
        models.iter().map(|m| m.name.clone()).collect()
    };
    let (was, now) = (names(&before.models), names(&h.models));
    for m in now.iter().filter(|m| !was.contains(m)) {
        tracing::info!(node_id, model = %m, "peer shares a model with us");
    }
    for m in was.iter().filter(|m| !now.contains(m)) {
        tracing::info!(node_id, model = %m, "peer withdrew a model from us");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(i: u8) -> Target {
        Target::Static(SocketAddr::from(([127, 0, 0, i], 8911)))
    }

    #[test]
    fn a_hello_still_under_way_does_not_hold_back_the_others() {
        let period = Duration::from_secs(1);
        let (dead, live) = (target(2), target(3));
        let mut schedule = Schedule::default();
        let t0 = Instant::now();
        assert_eq!(schedule.due(&[dead, live], t0), vec![dead, live]);
        // The live peer answers at once, the dead one hangs for many periods.
        schedule.done(live, t0, period);
        let mut dialed_live = 0;
        for tick in 1..=10u32 {
            let now = t0 + period * tick;
            for t in schedule.due(&[dead, live], now) {
                assert_eq!(
                    t, live,
                    "the dead peer is dialed again while its hello hangs"
                );
                dialed_live += 1;
                schedule.done(live, now, period);
            }
        }
        assert_eq!(dialed_live, 10, "the live peer keeps its period");
        // Once the dead peer's hello gives up, it is due again a period later, not at once.
        let end = t0 + period * 10;
        schedule.done(dead, end, period);
        assert!(schedule.due(&[dead], end).is_empty());
        assert_eq!(schedule.due(&[dead], end + period), vec![dead]);
    }

    #[test]
    fn targets_no_longer_listed_are_forgotten() {
        let mut schedule = Schedule::default();
        let now = Instant::now();
        schedule.due(&[target(2)], now);
        schedule.done(target(2), now, Duration::from_secs(1));
        assert_eq!(schedule.next_due(), Some(now + Duration::from_secs(1)));
        assert!(schedule.due(&[], now).is_empty());
        assert_eq!(schedule.next_due(), None);
    }
}
