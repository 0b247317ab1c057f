//! mDNS on the LAN (`_arknet._tcp`): advertise this node, browse for the others.
//!
//! The record carries only what identifies the node: instance name = node id, port = mesh port,
//! TXT `id` (node id), `pk` (public key), `v` (protocol version). No model list, no user data.
//! A resolved record is a *claim*: the node is listed only after a pinned mTLS hello to the
//! advertised address proves the advertised key; a mismatch is counted as a spoof.
//!
//! Creating an `mdns-sd` daemon joins the multicast groups on every interface that is up, so
//! with `discovery.mdns = false` this module is never started and no multicast socket exists.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use mdns_sd::{IfKind, ResolvedService, ScopedIp, ServiceDaemon, ServiceEvent, ServiceInfo};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{jittered, SERVICE_TYPE};
use crate::identity::PublicKey;
use crate::mesh::client::{Hello, HelloError, MeshClient};
use crate::mesh::PROTOCOL_VERSION;
use crate::peers::{PeerTable, Source};

/// Interface name prefixes treated as tunnels: not used for mDNS unless named explicitly
/// (WireGuard peers are found through the tunnel's peer list instead).
const TUNNEL_PREFIXES: [&str; 4] = ["wg", "tun", "tap", "utun"];
/// How often advertised nodes that did not answer their hello yet are tried again (jittered).
const RETRY_UNVERIFIED: Duration = Duration::from_secs(2);
/// Hellos in flight at once. A LAN full of nodes starting together would otherwise ask for
/// one TLS handshake per node in the same instant; the rest wait their turn, not a period.
const MAX_VERIFYING: usize = 4;
/// How often the browse is restarted anyway (jittered). mdns-sd spaces its own queries 1, 2,
/// 4 … s apart up to an hour, so a node whose announcements and answers were all lost (a
/// congested LAN, a Wi-Fi hiccup) would stay unknown that long. A restart sends a query that
/// lists every record already known, so only nodes missing from it answer. It also happens
/// at once when a node we have no record of connects to our mesh: it found us, we missed it.
const REBROWSE: Duration = Duration::from_secs(300);
/// How long a node may be connected to us without an mDNS record before we browse again.
const MISSED_AFTER: Duration = Duration::from_secs(3);

/// The mDNS discovery source, run by Pingora as a background service.
pub struct MdnsDiscovery {
    /// This node's id (instance name, TXT `id`).
    pub node_id: String,
    /// This node's key (TXT `pk`); our own record is ignored when browsing.
    pub public_key: PublicKey,
    /// Address of the mesh listener: its port is advertised, and its family decides which
    /// families mDNS runs on.
    pub mesh_listen: SocketAddr,
    /// Interfaces to use; empty means every interface except loopback and tunnels.
    pub interfaces: Vec<String>,
    /// Proves advertised keys.
    pub client: Arc<MeshClient>,
    /// Where sightings go.
    pub peers: Arc<PeerTable>,
    /// Set once the goodbye was sent at shutdown (or discovery never started), so the process
    /// may exit without waiting for the grace period.
    pub stopped: Arc<std::sync::atomic::AtomicBool>,
}

#[async_trait]
impl BackgroundService for MdnsDiscovery {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.run(shutdown).await;
        self.stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl MdnsDiscovery {
    async fn run(&self, mut shutdown: ShutdownWatch) {
        let daemon = match self.daemon() {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "mDNS discovery could not start; static peers still work");
                return;
            }
        };
        let mut events = match daemon.browse(SERVICE_TYPE) {
            Ok(rx) => rx,
            Err(e) => {
                tracing::error!(error = %e, "mDNS browse failed");
                return;
            }
        };
        tracing::info!(service = SERVICE_TYPE, interfaces = ?self.interfaces, "mDNS discovery started");
        let mut state = Records::default();
        let mut verifying = JoinSet::new();
        let mut retry_at = Instant::now() + jittered(RETRY_UNVERIFIED);
        let mut rebrowse_at = Instant::now() + jittered(REBROWSE);
        loop {
            tokio::select! {
                event = events.recv_async() => match event {
                    Ok(event) => self.on_event(event, &mut state),
                    Err(_) => break,
                },
                Some(done) = verifying.join_next(), if !verifying.is_empty() => {
                    if let Ok((fullname, record, verdict)) = done {
                        self.on_verdict(fullname, record, verdict, &mut state);
                    }
                }
                _ = tokio::time::sleep_until(retry_at) => {
                    retry_at = Instant::now() + jittered(RETRY_UNVERIFIED);
                    state.due.extend(state.unverified.keys().cloned());
                    if self.missed_a_node(&mut state) {
                        rebrowse_at = Instant::now();
                    }
                }
                _ = tokio::time::sleep_until(rebrowse_at) => {
                    rebrowse_at = Instant::now() + jittered(REBROWSE);
                    // A new browse replaces the old listener (whose channel then closes) and
                    // replays the cache into the new one; proven records are skipped.
                    match daemon.browse(SERVICE_TYPE) {
                        Ok(rx) => events = rx,
                        Err(e) => tracing::debug!(error = %e, "mDNS browse restart failed"),
                    }
                }
                _ = shutdown.changed() => break,
            }
            self.dispatch(&mut state, &mut verifying);
        }
        verifying.abort_all();
        // Goodbye packets, so the others notice at once rather than at TTL expiry.
        let fullname = format!("{}.{SERVICE_TYPE}", self.node_id);
        if let Ok(done) = daemon.unregister(&fullname) {
            let _ = tokio::time::timeout(Duration::from_secs(1), done.recv_async()).await;
        }
        if let Ok(done) = daemon.shutdown() {
            let _ = tokio::time::timeout(Duration::from_secs(1), done.recv_async()).await;
        }
        tracing::info!("mDNS discovery stopped; goodbye sent");
    }

    fn daemon(&self) -> Result<ServiceDaemon, mdns_sd::Error> {
        let daemon = ServiceDaemon::new()?;
        if self.interfaces.is_empty() {
            daemon.disable_interface(vec![IfKind::LoopbackV4, IfKind::LoopbackV6])?;
            for name in tunnel_interfaces() {
                daemon.disable_interface(IfKind::Name(name))?;
            }
        } else {
            daemon.disable_interface(IfKind::All)?;
            for name in &self.interfaces {
                let kind = match name.as_str() {
                    // mdns-sd models loopback separately from named interfaces.
                    "lo" => IfKind::LoopbackV4,
                    _ => IfKind::Name(name.clone()),
                };
                daemon.enable_interface(kind)?;
            }
        }
        // Advertise (and ask for) only addresses the mesh accepts connections on. mdns-sd
        // answers a query with the addresses of the query's own family only, so a peer that
        // heard just the IPv6 answers would be left with addresses it cannot dial, and
        // known-answer suppression keeps the IPv4 answers from being sent again. Running only
        // the family we listen on also halves the multicast a crowded LAN must carry.
        match self.mesh_listen.ip() {
            IpAddr::V4(_) => daemon.disable_interface(IfKind::IPv6)?,
            IpAddr::V6(ip) if !ip.is_unspecified() => daemon.disable_interface(IfKind::IPv4)?,
            // `[::]` takes both families (Linux's default, `net.ipv6.bindv6only = 0`).
            IpAddr::V6(_) => {}
        }
        let key = self.public_key.to_string();
        let version = PROTOCOL_VERSION.to_string();
        let txt = [
            ("id", self.node_id.as_str()),
            ("pk", key.as_str()),
            ("v", version.as_str()),
        ];
        let host = format!("{}.local.", self.node_id);
        let info = ServiceInfo::new(
            SERVICE_TYPE,
            &self.node_id,
            &host,
            (),
            self.mesh_listen.port(),
            &txt[..],
        )?
        .enable_addr_auto();
        daemon.register(info)?;
        Ok(daemon)
    }

    fn on_event(&self, event: ServiceEvent, state: &mut Records) {
        match event {
            ServiceEvent::ServiceResolved(info) => {
                let Some(record) = Record::from_resolved(&info) else {
                    return;
                };
                if record.key == self.public_key || state.seen.get(&info.fullname) == Some(&record)
                {
                    return;
                }
                // A record resolved again (another address, a new key) is proven again.
                state.due.insert(info.fullname.clone());
                state.unverified.insert(info.fullname.clone(), record);
            }
            ServiceEvent::ServiceRemoved(_, fullname) => {
                state.unverified.remove(&fullname);
                state.due.remove(&fullname);
                if let Some(record) = state.seen.remove(&fullname) {
                    tracing::info!(record = %fullname, "mDNS peer said goodbye");
                    self.peers.gone(&record.key, Source::Mdns);
                }
            }
            _ => {}
        }
    }

    /// Whether a node connected to our mesh that mDNS has given us no record of for
    /// [`MISSED_AFTER`]. Each such node counts once: one that does not advertise at all (a
    /// static peer across a router) must not make us query forever.
    fn missed_a_node(&self, state: &mut Records) -> bool {
        let known: HashSet<String> = state
            .seen
            .values()
            .chain(state.unverified.values())
            .map(|r| r.key.to_string())
            .collect();
        state.unexplained_since.retain(|k, _| !known.contains(k));
        let now = Instant::now();
        let mut missed = false;
        for sighting in self.peers.discovered() {
            let unexplained = sighting.sources.contains(&Source::Connect)
                && !sighting.sources.contains(&Source::Mdns)
                && !known.contains(&sighting.public_key);
            if !unexplained || state.asked_about.contains(&sighting.public_key) {
                continue;
            }
            // Its announcement may simply be on its way: a new node says hello as soon as it
            // has heard of us, which can be before we heard of it.
            let since = *state
                .unexplained_since
                .entry(sighting.public_key.clone())
                .or_insert(now);
            if now - since >= MISSED_AFTER {
                state.unexplained_since.remove(&sighting.public_key);
                state.asked_about.insert(sighting.public_key);
                missed = true;
            }
        }
        missed
    }

    /// Starts a hello for each record due, as long as fewer than [`MAX_VERIFYING`] are in
    /// flight; one that does not answer holds up no other.
    fn dispatch(&self, state: &mut Records, verifying: &mut JoinSet<Verification>) {
        let due: Vec<String> = state.due.iter().cloned().collect();
        for fullname in due {
            if state.in_flight.len() >= MAX_VERIFYING {
                return;
            }
            state.due.remove(&fullname);
            if state.in_flight.contains(&fullname) {
                // Its hello is under way; the verdict re-queues it if the record changed since.
                continue;
            }
            let Some(record) = state.unverified.get(&fullname).cloned() else {
                continue;
            };
            state.in_flight.insert(fullname.clone());
            let client = self.client.clone();
            verifying.spawn(async move {
                let verdict = verify(&client, &fullname, &record).await;
                (fullname, record, verdict)
            });
        }
    }

    /// Lists a node whose key was proven; drops a spoof; leaves the rest for the next retry.
    fn on_verdict(&self, fullname: String, record: Record, verdict: Verdict, state: &mut Records) {
        state.in_flight.remove(&fullname);
        if state.unverified.get(&fullname) != Some(&record) {
            // Removed, or resolved anew while the hello ran: this verdict is about the past.
            if state.unverified.contains_key(&fullname) {
                state.due.insert(fullname);
            }
            return;
        }
        match verdict {
            Verdict::Proven(hello, endpoint) => {
                self.peers.sighted(
                    hello.key,
                    Source::Mdns,
                    record.node_id.clone(),
                    Some(endpoint.to_string()),
                );
                state.unverified.remove(&fullname);
                state.seen.insert(fullname, record);
            }
            Verdict::Spoof(what) => {
                tracing::warn!(record = %fullname, %what, "mDNS record refused as a spoof");
                state.unverified.remove(&fullname);
            }
            Verdict::Unreachable => {}
        }
    }
}

/// A finished hello: the record it was about and what it found.
type Verification = (String, Record, Verdict);

/// What a hello to an advertised node found.
enum Verdict {
    /// The key was proven at this address.
    Proven(Box<Hello>, SocketAddr),
    /// An address answered with another identity.
    Spoof(String),
    /// No address answered (yet).
    Unreachable,
}

/// Says hello at each advertised address in turn (IPv4 first) until one proves the key.
async fn verify(client: &MeshClient, fullname: &str, record: &Record) -> Verdict {
    for endpoint in &record.addrs {
        match client.hello(*endpoint, Some(&record.key)).await {
            Ok(hello) => return Verdict::Proven(Box::new(hello), *endpoint),
            Err(HelloError::Spoof(what)) => return Verdict::Spoof(what),
            Err(e) => {
                tracing::debug!(record = %fullname, %endpoint, error = %e, "mDNS peer not reachable there (yet)")
            }
        }
    }
    Verdict::Unreachable
}

/// A resolved `_arknet._tcp` record: what it claims.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    key: PublicKey,
    node_id: Option<String>,
    /// Where to dial, best first.
    addrs: Vec<SocketAddr>,
}

impl Record {
    /// The claim in a resolved record; `None` without a well-formed key.
    fn from_resolved(info: &ResolvedService) -> Option<Record> {
        let claimed = info.txt_properties.get_property_val_str("pk")?;
        let Ok(key) = claimed.parse::<PublicKey>() else {
            tracing::debug!(record = %info.fullname, "mDNS record with a malformed key");
            return None;
        };
        let node_id = info
            .txt_properties
            .get_property_val_str("id")
            .map(str::to_string)
            .filter(|id| crate::config::valid_node_id(id));
        Some(Record {
            key,
            node_id,
            addrs: dial_order(info.addresses.iter().filter_map(|a| endpoint(a, info.port))),
        })
    }
}

/// The socket address to dial for an advertised address. An IPv6 link-local address keeps
/// the index of the interface it was heard on: without it the kernel cannot route it, and
/// mdns-sd answers a query with the addresses of the query's own family only, so a node
/// whose IPv4 answers were lost is reachable by its link-local IPv6 address alone.
fn endpoint(addr: &ScopedIp, port: u16) -> Option<SocketAddr> {
    match addr {
        ScopedIp::V4(v4) => Some(SocketAddr::new(IpAddr::V4(*v4.addr()), port)),
        ScopedIp::V6(v6) => {
            let ip = *v6.addr();
            let scope = if is_link_local(&ip) {
                v6.scope_id().index
            } else {
                0
            };
            Some(SocketAddr::V6(SocketAddrV6::new(ip, port, 0, scope)))
        }
        _ => None,
    }
}

/// IPv4 first (what most home LANs route best), then routable IPv6, then link-local IPv6.
fn dial_order(addrs: impl Iterator<Item = SocketAddr>) -> Vec<SocketAddr> {
    let mut addrs: Vec<SocketAddr> = addrs.collect();
    addrs.sort_by_key(|a| match a {
        SocketAddr::V4(v4) => (0, IpAddr::V4(*v4.ip())),
        SocketAddr::V6(v6) => (1 + u8::from(is_link_local(v6.ip())), IpAddr::V6(*v6.ip())),
    });
    addrs.dedup();
    addrs
}

fn is_link_local(ip: &Ipv6Addr) -> bool {
    ip.segments()[0] & 0xffc0 == 0xfe80
}

/// Records by mDNS full name: proven ones and ones still to prove (with those due a hello
/// and those whose hello is under way).
#[derive(Default)]
struct Records {
    seen: HashMap<String, Record>,
    unverified: HashMap<String, Record>,
    due: HashSet<String>,
    in_flight: HashSet<String>,
    /// Keys of nodes that connected without an mDNS record, and since when.
    unexplained_since: HashMap<String, Instant>,
    /// Keys of such nodes already browsed again for.
    asked_about: HashSet<String>,
}

/// Names of the tunnel interfaces present now.
/// The interfaces mDNS runs on for `configured` (`discovery.mdns_interfaces`): those named, or
/// when none are, every interface but loopback and tunnels, as the system lists them now.
pub fn effective_interfaces(configured: &[String]) -> Vec<String> {
    if !configured.is_empty() {
        return configured.to_vec();
    }
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n != "lo" && !TUNNEL_PREFIXES.iter().any(|p| n.starts_with(p)))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn tunnel_interfaces() -> Vec<String> {
    interface_names()
        .into_iter()
        .filter(|n| is_tunnel(n))
        .collect()
}

/// Interfaces mDNS uses when `discovery.mdns_interfaces` is empty: every interface of this
/// machine except loopback and tunnels (what `arknet doctor` reports; the daemon itself
/// excludes those by kind and name).
pub fn default_interfaces() -> Vec<String> {
    let mut names: Vec<String> = interface_names()
        .into_iter()
        .filter(|n| n != "lo" && !is_tunnel(n))
        .collect();
    names.sort();
    names
}

fn is_tunnel(name: &str) -> bool {
    TUNNEL_PREFIXES.iter().any(|p| name.starts_with(p))
}

fn interface_names() -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_is_dialed_first_then_routable_then_link_local_ipv6() {
        let v4: SocketAddr = "10.0.0.7:8911".parse().expect("v4");
        let global: SocketAddr = "[2001:db8::7]:8911".parse().expect("v6");
        let link_local: SocketAddr = "[fe80::7%2]:8911".parse().expect("scoped v6");
        let order = dial_order([link_local, global, v4, v4].into_iter());
        assert_eq!(order, vec![v4, global, link_local]);
    }

    #[test]
    fn a_link_local_endpoint_keeps_its_scope_through_the_peer_table() {
        // Endpoints are stored as text and parsed back when dialed: the interface index must
        // survive the round trip, or the address cannot be routed.
        let scoped = SocketAddr::V6(SocketAddrV6::new(
            "fe80::7".parse().expect("ip"),
            8911,
            0,
            2,
        ));
        let text = scoped.to_string();
        assert_eq!(text, "[fe80::7%2]:8911");
        assert_eq!(text.parse::<SocketAddr>().expect("parses back"), scoped);
        let plain = endpoint(&ScopedIp::from(IpAddr::V4([10, 0, 0, 7].into())), 8911);
        assert_eq!(plain, Some("10.0.0.7:8911".parse().expect("v4")));
    }
}
