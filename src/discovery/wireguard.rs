//! WireGuard tunnel peers: "once a WireGuard peer is connected, ArkNet discovers them the same
//! way it discovers LAN peers". The node reads its tunnels' peer lists (`wg show <iface> dump`),
//! takes each peer's tunnel address from its allowed IPs, and says hello to the mesh port there.
//! Peers with a recent handshake are probed every round; stale ones are backed off.
//!
//! Reading a tunnel's peers needs CAP_NET_ADMIN (root, or the capability in the service unit).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::task::JoinSet;

use super::jittered;
use crate::mesh::client::MeshClient;
use crate::peers::{PeerTable, Source};

/// A handshake younger than this means the tunnel is live (WireGuard re-keys every 2 minutes).
const FRESH_HANDSHAKE: Duration = Duration::from_secs(180);
/// How often a peer without a fresh handshake is probed.
const STALE_PROBE_EVERY: Duration = Duration::from_secs(60);

/// One peer line of `wg show <iface> dump`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgPeer {
    /// The peer's WireGuard public key.
    pub wg_key: String,
    /// Its tunnel addresses (host addresses from allowed IPs).
    pub tunnel_ips: Vec<IpAddr>,
    /// Seconds since the epoch of the last handshake; 0 when never.
    pub latest_handshake: u64,
}

/// Parses `wg show <iface> dump`: the first line is the interface, then one tab-separated line
/// per peer: key, preshared key, endpoint, allowed IPs, latest handshake, rx, tx, keepalive.
pub fn parse_dump(dump: &str) -> Vec<WgPeer> {
    dump.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            if f.len() < 5 {
                return None;
            }
            let tunnel_ips = f[3]
                .split(',')
                .filter_map(|net| {
                    let (ip, len) = net.trim().split_once('/')?;
                    let ip: IpAddr = ip.parse().ok()?;
                    let len: u8 = len.parse().ok()?;
                    // A host route names the peer itself; a wider one is a network behind it.
                    let host = match ip {
                        IpAddr::V4(_) => len == 32,
                        IpAddr::V6(_) => len == 128,
                    };
                    host.then_some(ip)
                })
                .collect();
            Some(WgPeer {
                wg_key: f[0].to_string(),
                tunnel_ips,
                latest_handshake: f[4].parse().unwrap_or(0),
            })
        })
        .collect()
}

/// The WireGuard discovery source, run by Pingora as a background service.
pub struct WireguardDiscovery {
    /// Tunnel interfaces to read.
    pub interfaces: Vec<String>,
    /// Mesh port of the nodes behind the tunnels.
    pub mesh_port: u16,
    /// Period of a round.
    pub interval: Duration,
    /// Proves keys.
    pub client: Arc<MeshClient>,
    /// Where sightings go.
    pub peers: Arc<PeerTable>,
}

#[async_trait]
impl BackgroundService for WireguardDiscovery {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut last_probe: HashMap<IpAddr, Instant> = HashMap::new();
        // Tunnel addresses whose hello is under way: probed concurrently, so a stale tunnel
        // (whose hello ends only at its timeout) delays neither the others nor the next round.
        let mut in_flight: HashSet<IpAddr> = HashSet::new();
        let mut probes: JoinSet<IpAddr> = JoinSet::new();
        loop {
            for iface in &self.interfaces {
                self.round(iface, &mut last_probe, &mut in_flight, &mut probes)
                    .await;
            }
            let next_round = tokio::time::Instant::now() + jittered(self.interval);
            loop {
                tokio::select! {
                    Some(done) = probes.join_next(), if !probes.is_empty() => {
                        if let Ok(ip) = done {
                            in_flight.remove(&ip);
                        }
                    }
                    _ = tokio::time::sleep_until(next_round) => break,
                    _ = shutdown.changed() => {
                        probes.abort_all();
                        return;
                    }
                }
            }
        }
    }
}

impl WireguardDiscovery {
    async fn round(
        &self,
        iface: &str,
        last_probe: &mut HashMap<IpAddr, Instant>,
        in_flight: &mut HashSet<IpAddr>,
        probes: &mut JoinSet<IpAddr>,
    ) {
        let out = tokio::process::Command::new("wg")
            .args(["show", iface, "dump"])
            .output()
            .await;
        let dump = match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
            Ok(o) => {
                tracing::debug!(%iface, error = %String::from_utf8_lossy(&o.stderr).trim(), "wg show failed");
                return;
            }
            Err(e) => {
                tracing::warn!(%iface, error = %e, "cannot run `wg` (wireguard-tools)");
                return;
            }
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut peers = parse_dump(&dump);
        peers.sort_by_key(|p| std::cmp::Reverse(p.latest_handshake));
        for p in peers {
            let fresh = p.latest_handshake > 0
                && now.saturating_sub(p.latest_handshake) < FRESH_HANDSHAKE.as_secs();
            for ip in &p.tunnel_ips {
                let due = fresh
                    || last_probe
                        .get(ip)
                        .is_none_or(|t| t.elapsed() >= STALE_PROBE_EVERY);
                if !due || !in_flight.insert(*ip) {
                    continue;
                }
                last_probe.insert(*ip, Instant::now());
                let (ip, wg_key) = (*ip, p.wg_key.clone());
                let endpoint = SocketAddr::new(ip, self.mesh_port);
                let (client, peers) = (self.client.clone(), self.peers.clone());
                probes.spawn(async move {
                    match client.hello(endpoint, None).await {
                        Ok(h) => {
                            peers.sighted(
                                h.key,
                                Source::Wireguard,
                                h.node_id,
                                Some(endpoint.to_string()),
                            );
                            peers.set_wireguard_key(&h.key, &wg_key);
                        }
                        Err(e) => {
                            tracing::debug!(%endpoint, wg_peer = %wg_key, error = %e, "no arknet node behind this tunnel peer")
                        }
                    }
                    ip
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_lines_give_peer_keys_tunnel_hosts_and_handshakes() {
        let dump = "privkey\tpubkey\t51820\toff\n\
                    PEER1=\t(none)\t10.77.0.2:51820\t10.99.0.2/32,192.168.5.0/24\t1764000000\t10\t20\toff\n\
                    PEER2=\t(none)\t(none)\t10.99.0.3/32\t0\t0\t0\t25\n\
                    broken line\n";
        let peers = parse_dump(dump);
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[0].wg_key, "PEER1=");
        assert_eq!(
            peers[0].tunnel_ips,
            vec!["10.99.0.2".parse::<IpAddr>().expect("ip")],
            "networks behind a peer are not probed"
        );
        assert_eq!(peers[0].latest_handshake, 1_764_000_000);
        assert_eq!(peers[1].latest_handshake, 0);
    }
}
