//! mDNS on the LAN (`_arknet._tcp`): advertise this node, browse for the others.
//!
//! The record carries only what identifies the node: instance name = node id, port = mesh port,
//! TXT `id` (node id), `pk` (public key), `v` (protocol version). No model list, no user data.
//! A resolved record is a *claim*: the node is listed only after a pinned mTLS hello to the
//! advertised address proves the advertised key; a mismatch is counted as a spoof.
//!
//! Creating an `mdns-sd` daemon joins the multicast groups on every interface that is up, so
//! with `discovery.mdns = false` this module is never started and no multicast socket exists.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use async_trait::async_trait;
use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent, ServiceInfo};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use super::SERVICE_TYPE;
use crate::identity::PublicKey;
use crate::mesh::client::{HelloError, MeshClient};
use crate::mesh::PROTOCOL_VERSION;
use crate::peers::{PeerTable, Source};

/// Interface name prefixes treated as tunnels: not used for mDNS unless named explicitly
/// (WireGuard peers are found through the tunnel's peer list instead).
const TUNNEL_PREFIXES: [&str; 4] = ["wg", "tun", "tap", "utun"];
/// How often advertised nodes that did not answer their hello yet are tried again.
const RETRY_UNVERIFIED: std::time::Duration = std::time::Duration::from_secs(2);

/// The mDNS discovery source, run by Pingora as a background service.
pub struct MdnsDiscovery {
    /// This node's id (instance name, TXT `id`).
    pub node_id: String,
    /// This node's key (TXT `pk`); our own record is ignored when browsing.
    pub public_key: PublicKey,
    /// Port of the mesh listener.
    pub mesh_port: u16,
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
        let events = match daemon.browse(SERVICE_TYPE) {
            Ok(rx) => rx,
            Err(e) => {
                tracing::error!(error = %e, "mDNS browse failed");
                return;
            }
        };
        tracing::info!(service = SERVICE_TYPE, interfaces = ?self.interfaces, "mDNS discovery started");
        let mut state = Records::default();
        let mut retry = tokio::time::interval(RETRY_UNVERIFIED);
        loop {
            tokio::select! {
                event = events.recv_async() => match event {
                    Ok(event) => self.on_event(event, &mut state).await,
                    Err(_) => break,
                },
                _ = retry.tick() => self.retry_unverified(&mut state).await,
                _ = shutdown.changed() => break,
            }
        }
        // Goodbye packets, so the others notice at once rather than at TTL expiry.
        let fullname = format!("{}.{SERVICE_TYPE}", self.node_id);
        if let Ok(done) = daemon.unregister(&fullname) {
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(1), done.recv_async()).await;
        }
        if let Ok(done) = daemon.shutdown() {
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(1), done.recv_async()).await;
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
            self.mesh_port,
            &txt[..],
        )?
        .enable_addr_auto();
        daemon.register(info)?;
        Ok(daemon)
    }

    async fn on_event(&self, event: ServiceEvent, state: &mut Records) {
        match event {
            ServiceEvent::ServiceResolved(info) => {
                let Some(claimed) = info.txt_properties.get_property_val_str("pk") else {
                    return;
                };
                let Ok(key) = claimed.parse::<PublicKey>() else {
                    tracing::debug!(record = %info.fullname, "mDNS record with a malformed key");
                    return;
                };
                if key == self.public_key {
                    return;
                }
                let node_id = info
                    .txt_properties
                    .get_property_val_str("id")
                    .map(str::to_string)
                    .filter(|id| crate::config::valid_node_id(id));
                let mut addrs: Vec<IpAddr> =
                    info.addresses.iter().map(|a| a.to_ip_addr()).collect();
                addrs.sort_by_key(|a| (a.is_ipv6(), *a));
                let record = Record {
                    key,
                    node_id,
                    addrs,
                    port: info.port,
                };
                state.unverified.insert(info.fullname.clone(), record);
                self.verify(&info.fullname, state).await;
            }
            ServiceEvent::ServiceRemoved(_, fullname) => {
                state.unverified.remove(&fullname);
                if let Some(key) = state.seen.remove(&fullname) {
                    tracing::info!(record = %fullname, "mDNS peer said goodbye");
                    self.peers.gone(&key, Source::Mdns);
                }
            }
            _ => {}
        }
    }

    /// Says hello to an advertised node; lists it once its key is proven. A node that does not
    /// answer yet stays unverified and is tried again on the next tick; a spoof is dropped.
    async fn verify(&self, fullname: &str, state: &mut Records) {
        let Some(record) = state.unverified.get(fullname).cloned() else {
            return;
        };
        for ip in &record.addrs {
            let endpoint = SocketAddr::new(*ip, record.port);
            match self.client.hello(endpoint, Some(&record.key)).await {
                Ok(h) => {
                    self.peers.sighted(
                        h.key,
                        Source::Mdns,
                        record.node_id.clone(),
                        Some(endpoint.to_string()),
                    );
                    state.unverified.remove(fullname);
                    state.seen.insert(fullname.to_string(), h.key);
                    return;
                }
                Err(HelloError::Spoof(what)) => {
                    tracing::warn!(record = %fullname, %what, "mDNS record refused as a spoof");
                    state.unverified.remove(fullname);
                    return;
                }
                Err(e) => {
                    tracing::debug!(%endpoint, error = %e, "mDNS peer not reachable there (yet)")
                }
            }
        }
    }

    async fn retry_unverified(&self, state: &mut Records) {
        let names: Vec<String> = state.unverified.keys().cloned().collect();
        for name in names {
            self.verify(&name, state).await;
        }
    }
}

/// A resolved `_arknet._tcp` record: what it claims.
#[derive(Debug, Clone)]
struct Record {
    key: PublicKey,
    node_id: Option<String>,
    addrs: Vec<IpAddr>,
    port: u16,
}

/// Records by mDNS full name: proven ones (with the key proven) and ones still to prove.
#[derive(Default)]
struct Records {
    seen: HashMap<String, PublicKey>,
    unverified: HashMap<String, Record>,
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
    std::fs::read_dir("/sys/class/net")
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| TUNNEL_PREFIXES.iter().any(|p| n.starts_with(p)))
                .collect()
        })
        .unwrap_or_default()
}
