//! Who has been seen, by which discovery source, where: the sightings, owned here alone.
//!
//! Discovery sources (mDNS, WireGuard, the registry, connect attempts, static configuration)
//! report what they see; nothing here grants anything. Approval and revocation live with the
//! approvals; this module only lists.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::identity::PublicKey;
use crate::timefmt::rfc3339;

/// How a node was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// It connected to our mesh listener.
    Connect,
    /// Configured or given on the command line / approve body.
    Static,
    /// mDNS on the LAN.
    Mdns,
    /// A WireGuard peer.
    Wireguard,
    /// The public registry.
    Registry,
}

/// Where a peer stands with us.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerState {
    /// Seen, not approved.
    Pending,
    /// In `approved_peers.json`.
    Approved,
    /// Was approved, then revoked.
    Revoked,
}

impl PeerState {
    /// The state of a node that is (or is not) approved and was (or was not) revoked.
    pub fn of(approved: bool, revoked: bool) -> Self {
        match (approved, revoked) {
            (true, _) => PeerState::Approved,
            (false, true) => PeerState::Revoked,
            (false, false) => PeerState::Pending,
        }
    }
}

/// A node seen by some source, as `/peers/discovered` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct Sighting {
    /// Its key (verified by TLS for `connect` and hello sightings).
    pub public_key: String,
    /// The node id it claimed.
    pub node_id: Option<String>,
    /// Where it was seen (`ip:port`).
    pub endpoint: Option<String>,
    /// How it was seen.
    pub sources: Vec<Source>,
    /// RFC 3339.
    pub first_seen: String,
    /// RFC 3339.
    pub last_seen: String,
    /// Pending, approved or revoked.
    pub state: PeerState,
    /// The WireGuard peer key it was found behind, when seen through a tunnel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wireguard_key: Option<String>,
}

/// One node's sighting, as stored.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The node id it claimed.
    pub node_id: Option<String>,
    /// The WireGuard peer key it was found behind.
    pub wireguard_key: Option<String>,
    /// Where it was last seen.
    pub endpoint: Option<String>,
    /// The sources that see it.
    pub sources: Vec<Source>,
    /// Wall-clock time of the first sighting.
    pub first_seen: SystemTime,
    /// Wall-clock time of the latest sighting.
    pub last_seen: SystemTime,
    last_seen_at: Instant,
    /// The address a stranger connected from, for [`MAX_STRANGERS_PER_ADDRESS`].
    from: Option<IpAddr>,
}

impl Seen {
    /// Listed only because it connected (no discovery source vouches for it), and seen within
    /// [`SIGHTING_TTL`] of `now`.
    fn is_recent_stranger(&self, now: Instant) -> bool {
        self.sources == [Source::Connect]
            && now.saturating_duration_since(self.last_seen_at) < SIGHTING_TTL
    }
}

impl Seen {
    /// The listing entry, with the state the approvals give it.
    pub fn listed(&self, key: &PublicKey, state: PeerState) -> Sighting {
        Sighting {
            public_key: key.to_string(),
            node_id: self.node_id.clone(),
            endpoint: self.endpoint.clone(),
            sources: self.sources.clone(),
            first_seen: rfc3339(self.first_seen),
            last_seen: rfc3339(self.last_seen),
            state,
            wireguard_key: self.wireguard_key.clone(),
        }
    }
}

/// Sightings not refreshed for this long are dropped (approved peers stay, as approvals).
pub const SIGHTING_TTL: Duration = Duration::from_secs(600);

/// Most nodes listed at once only because they connected to the mesh listener. Anyone can make
/// a key and connect with it; without a bound, a loop of fresh keys would grow this table and
/// bury the owner's pending list. Discovery sources are not bounded here: each of their
/// sightings is a node that proved its key in a hello we made.
pub const MAX_STRANGERS: usize = 256;
/// Of those, most from one address (a household behind one public address has a few nodes).
pub const MAX_STRANGERS_PER_ADDRESS: usize = 4;

/// The sightings of every node some source reported.
#[derive(Default)]
pub struct Sightings {
    seen: Mutex<HashMap<PublicKey, Seen>>,
}

/// What a sighting changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    /// The node was not known before.
    pub new: bool,
    /// Its endpoint changed (routing must learn the new address).
    pub moved: bool,
}

impl Sightings {
    fn lock(&self) -> MutexGuard<'_, HashMap<PublicKey, Seen>> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records that `key` was seen by `source`.
    pub fn sighted(
        &self,
        key: PublicKey,
        source: Source,
        node_id: Option<String>,
        endpoint: Option<String>,
    ) -> Change {
        Self::record(&mut self.lock(), key, source, node_id, endpoint)
    }

    /// Records that the unapproved `key` connected from `from`, unless that would list more
    /// than [`MAX_STRANGERS`] such nodes, or [`MAX_STRANGERS_PER_ADDRESS`] from one address
    /// (`None`: not listed). A node already listed is always updated.
    pub fn stranger(
        &self,
        key: PublicKey,
        from: IpAddr,
        node_id: Option<String>,
        endpoint: Option<String>,
    ) -> Option<Change> {
        self.stranger_at(key, from, node_id, endpoint, Instant::now())
    }

    fn stranger_at(
        &self,
        key: PublicKey,
        from: IpAddr,
        node_id: Option<String>,
        endpoint: Option<String>,
        now: Instant,
    ) -> Option<Change> {
        let mut seen = self.lock();
        if !seen.contains_key(&key) {
            let (mut all, mut same) = (0, 0);
            for e in seen.values().filter(|e| e.is_recent_stranger(now)) {
                all += 1;
                same += usize::from(e.from == Some(from));
            }
            if all >= MAX_STRANGERS || same >= MAX_STRANGERS_PER_ADDRESS {
                return None;
            }
        }
        let change = Self::record(&mut seen, key, Source::Connect, node_id, endpoint);
        if let Some(e) = seen.get_mut(&key) {
            e.from = Some(from);
        }
        Some(change)
    }

    fn record(
        seen: &mut HashMap<PublicKey, Seen>,
        key: PublicKey,
        source: Source,
        node_id: Option<String>,
        endpoint: Option<String>,
    ) -> Change {
        let now = SystemTime::now();
        let new = !seen.contains_key(&key);
        let e = seen.entry(key).or_insert_with(|| Seen {
            node_id: None,
            wireguard_key: None,
            endpoint: None,
            sources: Vec::new(),
            first_seen: now,
            last_seen: now,
            last_seen_at: Instant::now(),
            from: None,
        });
        if node_id.is_some() {
            e.node_id = node_id;
        }
        let moved = endpoint.is_some() && e.endpoint != endpoint;
        if endpoint.is_some() {
            e.endpoint = endpoint;
        }
        if !e.sources.contains(&source) {
            e.sources.push(source);
        }
        e.last_seen = now;
        e.last_seen_at = Instant::now();
        Change { new, moved }
    }

    /// `source` no longer sees `key`: the sighting drops that source, and disappears when no
    /// discovery source is left.
    pub fn gone(&self, key: &PublicKey, source: Source) {
        let mut seen = self.lock();
        if let Some(e) = seen.get_mut(key) {
            e.sources.retain(|s| *s != source);
            // A past connect attempt says nothing about presence now: only another discovery
            // source keeps the node listed.
            if e.sources.iter().all(|s| *s == Source::Connect) {
                seen.remove(key);
            }
        }
    }

    /// Records the WireGuard peer key `key` was found behind.
    pub fn set_wireguard_key(&self, key: &PublicKey, wg_key: &str) {
        if let Some(e) = self.lock().get_mut(key) {
            e.wireguard_key = Some(wg_key.to_string());
        }
    }

    /// Where `key` was last seen.
    pub fn endpoint(&self, key: &PublicKey) -> Option<String> {
        self.lock().get(key).and_then(|e| e.endpoint.clone())
    }

    /// The current sightings, after dropping those older than [`SIGHTING_TTL`] unless `keep`
    /// says otherwise (approved peers stay).
    pub fn current(&self, keep: impl Fn(&PublicKey) -> bool) -> Vec<(PublicKey, Seen)> {
        let mut seen = self.lock();
        seen.retain(|k, e| e.last_seen_at.elapsed() < SIGHTING_TTL || keep(k));
        seen.iter().map(|(k, e)| (*k, e.clone())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: usize) -> PublicKey {
        let mut b = [0u8; 32];
        b[..8].copy_from_slice(&(n as u64).to_le_bytes());
        PublicKey::from_bytes(b)
    }

    #[test]
    fn strangers_are_listed_within_bounds_per_address_and_in_all() {
        let s = Sightings::default();
        let here: IpAddr = "10.0.0.5".parse().expect("ip");
        for n in 0..MAX_STRANGERS_PER_ADDRESS {
            assert!(s.stranger(key(n), here, None, None).is_some(), "{n}");
        }
        assert_eq!(s.stranger(key(99), here, None, None), None);
        // One already listed is still updated; another address has its own share.
        let again = s.stranger(key(0), here, Some("n0".into()), Some("10.0.0.5:7".into()));
        assert_eq!(
            again,
            Some(Change {
                new: false,
                moved: true
            })
        );
        let there: IpAddr = "10.0.0.6".parse().expect("ip");
        assert!(s.stranger(key(100), there, None, None).is_some());
        // Discovery sources are not bounded, and a node a discovery source vouches for no
        // longer counts as a stranger.
        assert!(s.sighted(key(101), Source::Mdns, None, None).new);
        s.sighted(key(1), Source::Mdns, None, None);
        assert!(s.stranger(key(102), here, None, None).is_some());

        // In all: fill up from many addresses, then nobody new gets in.
        let mut n = 1000;
        let strangers = || {
            let now = Instant::now();
            s.lock()
                .values()
                .filter(|e| e.is_recent_stranger(now))
                .count()
        };
        while strangers() < MAX_STRANGERS {
            let ip = IpAddr::from([10, 1, (n / 250) as u8, (n % 250) as u8]);
            assert!(s.stranger(key(n), ip, None, None).is_some());
            n += 1;
        }
        assert_eq!(
            s.stranger(key(n), "10.9.9.9".parse().expect("ip"), None, None),
            None
        );
        assert!(s.sighted(key(n + 1), Source::Registry, None, None).new);

        // Strangers not seen for the sighting TTL free their places.
        let later = Instant::now() + SIGHTING_TTL;
        assert!(s
            .stranger_at(key(n), "10.9.9.9".parse().expect("ip"), None, None, later)
            .is_some());
    }

    #[test]
    fn a_node_stays_listed_while_a_discovery_source_sees_it() {
        let s = Sightings::default();
        let key = PublicKey::from_bytes([7; 32]);
        let first = s.sighted(
            key,
            Source::Mdns,
            Some("n".into()),
            Some("10.0.0.2:1".into()),
        );
        assert_eq!(
            first,
            Change {
                new: true,
                moved: true
            }
        );
        let again = s.sighted(key, Source::Connect, None, Some("10.0.0.2:1".into()));
        assert_eq!(
            again,
            Change {
                new: false,
                moved: false
            }
        );
        assert_eq!(s.endpoint(&key).as_deref(), Some("10.0.0.2:1"));
        s.gone(&key, Source::Mdns);
        assert!(
            s.current(|_| false).is_empty(),
            "a connect attempt alone does not keep a node listed"
        );
    }

    #[test]
    fn states_follow_approval_then_revocation() {
        assert_eq!(PeerState::of(true, true), PeerState::Approved);
        assert_eq!(PeerState::of(false, true), PeerState::Revoked);
        assert_eq!(PeerState::of(false, false), PeerState::Pending);
    }
}
