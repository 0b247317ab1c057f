//! What routing reads about the approved peers: one immutable snapshot, swapped whole when a
//! hello, an approval, a sighting or a request outcome changes it, so that a grid request
//! reads it with one atomic load instead of locking and cloning per peer.

use std::net::SocketAddr;

use crate::identity::PublicKey;
use crate::mesh::protocol::SharedModel;
use crate::peers::reputation::Standing;

/// One approved peer as routing sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingPeer {
    /// Its key.
    pub key: PublicKey,
    /// Its node id (from its approval).
    pub node_id: String,
    /// Where to reach its mesh listener (approval first, then the latest sighting).
    pub addr: Option<SocketAddr>,
    /// Whether it answered the last hello.
    pub reachable: bool,
    /// Models it shares with us, from its last hello.
    pub models: Vec<SharedModel>,
    /// Requests it lets us have in flight there.
    pub grant: u32,
    /// Round trip of its last hello (ms).
    pub hello_latency_ms: Option<f64>,
    /// Time to first byte of our requests, moving average (ms).
    pub ttfb_ewma_ms: Option<f64>,
    /// Share of our requests it answered (1.0 before any).
    pub reliability: f64,
    /// Unix seconds until which it is ejected.
    pub ejected_until: Option<u64>,
}

impl RoutingPeer {
    /// Whether routing may use it at `now` (Unix seconds).
    pub fn standing(&self, now: u64) -> Standing {
        crate::peers::reputation::standing(self.ejected_until, now)
    }
}

/// Every approved peer, in approval order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeerSnapshot {
    /// The peers.
    pub peers: Vec<RoutingPeer>,
}
