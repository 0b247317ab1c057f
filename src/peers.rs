//! The peer table: every node this one knows of, approved or not, and the approvals that decide
//! what each may do.
//!
//! Writers: the admin API (approve, revoke, change permissions), the file watcher (hand edits of
//! `approved_peers.json`), and sightings (discovery sources, connect attempts, hello results).
//! Readers get immutable [`Approvals`] snapshots; the mesh authorizes against a snapshot and
//! never blocks on a writer. Discovery only reports sightings here; it never grants anything.

pub mod hellos;
pub mod reputation;
pub mod runtime;
pub mod sightings;
pub mod snapshot;
pub mod store;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::identity::PublicKey;
pub use hellos::PeerStatus;
pub use runtime::PeerRuntime;
pub use sightings::{PeerState, Sighting, Source};
use snapshot::{PeerSnapshot, RoutingPeer};
use store::{ApprovedPeer, ApprovedPeers, Permissions, StoreError};

/// An immutable view of the approvals, as last read or written.
#[derive(Debug, Default)]
pub struct Approvals {
    /// The file's content.
    pub file: ApprovedPeers,
}

impl Approvals {
    /// The approved peer holding `key`.
    pub fn get(&self, key: &PublicKey) -> Option<&ApprovedPeer> {
        self.file.by_key(key)
    }
}

/// Why an approval change was refused.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The approvals file does not parse; changing it through the API would overwrite the
    /// owner's hand edit.
    #[error("{0}; fix or remove the file before changing approvals through the API")]
    FileCorrupt(StoreError),
    /// Writing failed; nothing changed.
    #[error("{0}")]
    Write(StoreError),
    /// No approved peer matches.
    #[error("no approved peer matches {0}")]
    NotFound(String),
    /// The request conflicts with another approval.
    #[error("{0}")]
    Conflict(String),
}

/// The table: the approvals (owned here, with the file they come from) composed with the
/// parts that have their own owners: sightings, runtimes, hello results and reputations. Each
/// part locks alone; the routing snapshot is rebuilt from all of them when one changes.
pub struct PeerTable {
    path: PathBuf,
    approvals: watch::Sender<Arc<Approvals>>,
    /// Serializes changes: read file, change, write, publish.
    change: tokio::sync::Mutex<()>,
    /// The file on disk as last seen, and why it is not in force when it is not.
    file: Mutex<FileWatch>,
    /// Peers revoked since start, with when (RFC 3339), so that listings can say so.
    revoked: Mutex<HashMap<PublicKey, String>>,
    sightings: sightings::Sightings,
    runtimes: runtime::Runtimes,
    hellos: hellos::Hellos,
    reputations: reputation::Reputations,
    routing: ArcSwap<PeerSnapshot>,
}

#[derive(Default)]
struct FileWatch {
    stamp: Option<FileStamp>,
    error: Option<String>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What identifies a version of the file on disk, to notice hand edits cheaply.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode: m.ino(),
    })
}

/// INFO event lines for what changed between two approval sets: peers approved and revoked,
/// models shared with a peer or withdrawn from it. The owner sees each change once, whether it
/// came from the admin API or a hand edit of the file.
fn log_approval_changes(before: &ApprovedPeers, after: &ApprovedPeers) {
    for p in &after.peers {
        let shared = &p.permissions.models_shared;
        let Some(old) = before.peers.iter().find(|o| o.public_key == p.public_key) else {
            tracing::info!(
                node_id = %p.node_id,
                public_key = %p.public_key,
                models_shared = %shared.join(", "),
                max_concurrent = p.permissions.max_concurrent_requests,
                "peer approved"
            );
            continue;
        };
        let was = &old.permissions.models_shared;
        for m in shared.iter().filter(|m| !was.contains(m)) {
            tracing::info!(node_id = %p.node_id, model = %m, "model shared with peer");
        }
        for m in was.iter().filter(|m| !shared.contains(m)) {
            tracing::info!(node_id = %p.node_id, model = %m, "model withdrawn from peer");
        }
    }
    for old in &before.peers {
        if !after.peers.iter().any(|p| p.public_key == old.public_key) {
            tracing::info!(
                node_id = %old.node_id,
                public_key = %old.public_key,
                "peer revoked; its in-flight requests are ended"
            );
        }
    }
}

impl PeerTable {
    /// Loads `<data_dir>/approved_peers.json`. A corrupt file does not stop the node: it starts
    /// with no approvals and reports the file (log, `/peers/status`, metric).
    pub fn open(data_dir: &Path) -> Self {
        let path = data_dir.join(store::FILE_NAME);
        let table = PeerTable {
            approvals: watch::Sender::new(Arc::new(Approvals::default())),
            change: tokio::sync::Mutex::new(()),
            file: Mutex::default(),
            revoked: Mutex::default(),
            sightings: sightings::Sightings::default(),
            runtimes: runtime::Runtimes::default(),
            hellos: hellos::Hellos::default(),
            reputations: reputation::Reputations::open(data_dir),
            routing: ArcSwap::from_pointee(PeerSnapshot::default()),
            path,
        };
        table.reload_if_changed();
        table
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current approvals.
    pub fn approvals(&self) -> Arc<Approvals> {
        self.approvals.borrow().clone()
    }

    /// Why the file on disk is not in force, if it is not.
    pub fn file_error(&self) -> Option<String> {
        locked(&self.file).error.clone()
    }

    /// Live state (slots, stop signal) of an approved peer.
    pub fn runtime(&self, key: &PublicKey) -> Option<Arc<PeerRuntime>> {
        self.runtimes.get(key)
    }

    /// Re-reads the file when it changed on disk (hand edit). Returns whether approvals changed.
    pub fn reload_if_changed(&self) -> bool {
        let now = stamp(&self.path);
        if locked(&self.file).stamp == now && now.is_some() {
            return false;
        }
        match ApprovedPeers::load(&self.path) {
            Ok(file) => {
                let changed = file != self.approvals().file;
                {
                    let mut file = locked(&self.file);
                    if file.error.take().is_some() {
                        tracing::info!(path = %self.path.display(), "approvals file is valid again");
                    }
                    file.stamp = now;
                }
                if changed {
                    self.publish(file);
                }
                changed
            }
            Err(e) => {
                let mut file = locked(&self.file);
                if file.stamp != now || file.error.is_none() {
                    tracing::error!(error = %e, "approvals file is corrupt; the last good approvals stay in force");
                }
                file.error = Some(e.to_string());
                file.stamp = now;
                false
            }
        }
    }

    /// Approves (or re-approves with new data) a peer. Durable when this returns `Ok`.
    pub async fn approve(&self, mut peer: ApprovedPeer) -> Result<ApprovedPeer, ChangeError> {
        self.change(|file| {
            if let Some(other) = file.by_node_id(&peer.node_id) {
                if other.public_key != peer.public_key {
                    return Err(ChangeError::Conflict(format!(
                        "node_id `{}` is already approved with another public key; revoke it first",
                        peer.node_id
                    )));
                }
            }
            if peer.approved_at.is_empty() {
                peer.approved_at = crate::timefmt::now_rfc3339();
            }
            match file
                .peers
                .iter_mut()
                .find(|p| p.public_key == peer.public_key)
            {
                Some(existing) => {
                    let extra = std::mem::take(&mut existing.extra);
                    *existing = ApprovedPeer {
                        extra,
                        ..peer.clone()
                    };
                }
                None => file.peers.push(peer.clone()),
            }
            Ok(peer.clone())
        })
        .await
    }

    /// Revokes the peer matching `selector` (node id or key). Its in-flight requests are told
    /// to stop at once.
    pub async fn revoke(&self, selector: &Selector) -> Result<ApprovedPeer, ChangeError> {
        let removed = self
            .change(|file| {
                let i = file
                    .peers
                    .iter()
                    .position(|p| selector.matches(p))
                    .ok_or_else(|| ChangeError::NotFound(selector.to_string()))?;
                Ok(file.peers.remove(i))
            })
            .await?;
        locked(&self.revoked).insert(removed.public_key, crate::timefmt::now_rfc3339());
        Ok(removed)
    }

    /// Changes a peer's permissions with `edit`.
    pub async fn update(
        &self,
        selector: &Selector,
        edit: impl FnOnce(&mut Permissions),
    ) -> Result<ApprovedPeer, ChangeError> {
        self.change(|file| {
            let p = file
                .peers
                .iter_mut()
                .find(|p| selector.matches(p))
                .ok_or_else(|| ChangeError::NotFound(selector.to_string()))?;
            edit(&mut p.permissions);
            Ok(p.clone())
        })
        .await
    }

    /// Read the file fresh, apply `f`, write it, publish. The file on disk is the truth: a hand
    /// edit made since our last read is the base of the change, never overwritten by it.
    async fn change<T>(
        &self,
        f: impl FnOnce(&mut ApprovedPeers) -> Result<T, ChangeError>,
    ) -> Result<T, ChangeError> {
        let _serial = self.change.lock().await;
        let mut file = ApprovedPeers::load(&self.path).map_err(ChangeError::FileCorrupt)?;
        let out = f(&mut file)?;
        file.save(&self.path).map_err(ChangeError::Write)?;
        *locked(&self.file) = FileWatch {
            stamp: stamp(&self.path),
            error: None,
        };
        self.publish(file);
        Ok(out)
    }

    /// Installs new approvals: runtimes of removed peers or changed grants are stopped.
    fn publish(&self, file: ApprovedPeers) {
        log_approval_changes(&self.approvals().file, &file);
        self.runtimes.rebuild(&file);
        {
            let mut revoked = locked(&self.revoked);
            for p in &file.peers {
                revoked.remove(&p.public_key);
            }
        }
        self.approvals.send_replace(Arc::new(Approvals { file }));
        self.publish_routing();
    }

    /// What routing reads: the approved peers with their last hello and reputation.
    pub fn routing(&self) -> Arc<PeerSnapshot> {
        self.routing.load_full()
    }

    /// A request outcome changed a peer's reputation: routing must see it.
    pub fn reputation_changed(&self) {
        self.publish_routing();
    }

    /// Rebuilds the routing snapshot from the approvals, hellos, sightings and reputations.
    fn publish_routing(&self) {
        let approvals = self.approvals();
        let keys = approvals.file.peers.iter().map(|p| &p.public_key);
        let hellos = self.hellos.each(keys, |_, status| {
            status.map(|s| (s.reachable, s.models.clone(), s.grant, s.latency_ms))
        });
        let peers = approvals
            .file
            .peers
            .iter()
            .zip(hellos)
            .map(|(p, hello)| {
                let (reachable, models, grant, hello_latency_ms) =
                    hello.unwrap_or((false, Vec::new(), 0, None));
                let (ttfb_ewma_ms, reliability, ejected_until) =
                    self.reputations.routing_facts(&p.public_key);
                let endpoint = p
                    .endpoint
                    .clone()
                    .or_else(|| self.sightings.endpoint(&p.public_key));
                RoutingPeer {
                    key: p.public_key,
                    node_id: p.node_id.clone(),
                    addr: endpoint.and_then(|e| e.parse().ok()),
                    reachable,
                    models,
                    grant,
                    hello_latency_ms,
                    ttfb_ewma_ms,
                    reliability,
                    ejected_until,
                }
            })
            .collect();
        self.routing.store(Arc::new(PeerSnapshot { peers }));
    }

    /// Records that `key` was seen by `source`.
    pub fn sighted(
        &self,
        key: PublicKey,
        source: Source,
        node_id: Option<String>,
        endpoint: Option<String>,
    ) {
        let change = self
            .sightings
            .sighted(key, source, node_id.clone(), endpoint.clone());
        self.after_sighting(key, source, node_id, endpoint, change);
    }

    /// The unapproved `key` connected to the mesh listener from `from`: listed as pending
    /// unless the bounds on such sightings are reached ([`sightings::MAX_STRANGERS`]); returns
    /// whether it is listed.
    pub fn stranger(
        &self,
        key: PublicKey,
        from: std::net::IpAddr,
        node_id: Option<String>,
        endpoint: Option<String>,
    ) -> bool {
        let Some(change) = self
            .sightings
            .stranger(key, from, node_id.clone(), endpoint.clone())
        else {
            return false;
        };
        self.after_sighting(key, Source::Connect, node_id, endpoint, change);
        true
    }

    fn after_sighting(
        &self,
        key: PublicKey,
        source: Source,
        node_id: Option<String>,
        endpoint: Option<String>,
        change: sightings::Change,
    ) {
        if change.new {
            let state = if self.approvals().get(&key).is_some() {
                "approved"
            } else {
                "pending approval"
            };
            tracing::info!(
                public_key = %key,
                node_id = node_id.as_deref().unwrap_or("?"),
                endpoint = endpoint.as_deref().unwrap_or("?"),
                source = ?source,
                state,
                "node discovered"
            );
        }
        if change.moved {
            self.publish_routing();
        }
    }

    /// `source` no longer sees `key` (an mDNS goodbye, a TTL expiry): the sighting drops that
    /// source, and disappears when no discovery source is left (an approved peer stays listed
    /// through its approval, and its hellos tell whether it is reachable).
    pub fn gone(&self, key: &PublicKey, source: Source) {
        self.sightings.gone(key, source);
    }

    /// Records the WireGuard peer key `key` was found behind.
    pub fn set_wireguard_key(&self, key: &PublicKey, wg_key: &str) {
        self.sightings.set_wireguard_key(key, wg_key);
    }

    /// Every node seen or approved, with its state.
    pub fn discovered(&self) -> Vec<Sighting> {
        let approvals = self.approvals();
        let seen = self.sightings.current(|k| approvals.get(k).is_some());
        let revoked = locked(&self.revoked).clone();
        let mut out: Vec<Sighting> = seen
            .iter()
            .map(|(key, e)| {
                let approved = approvals.get(key);
                let mut s = e.listed(
                    key,
                    PeerState::of(approved.is_some(), revoked.contains_key(key)),
                );
                if let Some(p) = approved {
                    s.node_id = Some(p.node_id.clone());
                    s.endpoint = s.endpoint.or_else(|| p.endpoint.clone());
                }
                s
            })
            .collect();
        for p in &approvals.file.peers {
            if !seen.iter().any(|(k, _)| *k == p.public_key) {
                out.push(Sighting {
                    public_key: p.public_key.to_string(),
                    node_id: Some(p.node_id.clone()),
                    endpoint: p.endpoint.clone(),
                    sources: Vec::new(),
                    first_seen: p.approved_at.clone(),
                    last_seen: p.approved_at.clone(),
                    state: PeerState::Approved,
                    wireguard_key: None,
                });
            }
        }
        out.sort_by(|a, b| {
            a.node_id
                .cmp(&b.node_id)
                .then(a.public_key.cmp(&b.public_key))
        });
        out
    }

    /// Seen but not approved.
    pub fn pending(&self) -> Vec<Sighting> {
        self.discovered()
            .into_iter()
            .filter(|s| s.state != PeerState::Approved)
            .collect()
    }

    /// Stores what the last hello to `key` found, and counts it in the peer's uptime.
    pub fn set_status(&self, key: PublicKey, status: PeerStatus) {
        let now = reputation::unix_now();
        self.reputations.hello(&key, status.reachable, now);
        self.hellos.set(key, status);
        self.publish_routing();
        if let Err(e) = self.reputations.flush_if_due(now) {
            tracing::warn!(error = %e, "writing reputation.json failed");
        }
    }

    /// How reliably and how fast each approved peer has served us.
    pub fn reputations(&self) -> &reputation::Reputations {
        &self.reputations
    }

    /// A peer just turned a request for `model` away as busy: until its next hello says
    /// otherwise, rank it as having no free slot for that model.
    pub fn note_busy(&self, key: &PublicKey, model: &str) {
        if self.hellos.note_busy(key, model) {
            self.publish_routing();
        }
    }

    /// What the last hello to `key` found.
    pub fn status(&self, key: &PublicKey) -> PeerStatus {
        self.hellos.get(key)
    }

    /// The endpoint to reach `key` at: approval first, then the latest sighting.
    pub fn endpoint_of(&self, key: &PublicKey) -> Option<String> {
        let approved = self.approvals().get(key).and_then(|p| p.endpoint.clone());
        approved.or_else(|| self.sightings.endpoint(key))
    }
}

/// Names an approved peer by node id or by key.
#[derive(Debug, Clone)]
pub enum Selector {
    /// By node id.
    NodeId(String),
    /// By key.
    Key(PublicKey),
}

impl Selector {
    fn matches(&self, p: &ApprovedPeer) -> bool {
        match self {
            Selector::NodeId(id) => p.node_id == *id,
            Selector::Key(k) => p.public_key == *k,
        }
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::NodeId(id) => write!(f, "node_id `{id}`"),
            Selector::Key(k) => write!(f, "public_key `{k}`"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: &str, byte: u8, grant: u32) -> ApprovedPeer {
        ApprovedPeer {
            node_id: id.into(),
            public_key: PublicKey::from_bytes([byte; 32]),
            name: String::new(),
            approved_at: String::new(),
            permissions: Permissions {
                models_shared: vec!["m".into()],
                max_concurrent_requests: grant,
                ..Permissions::default()
            },
            endpoint: None,
            extra: Default::default(),
        }
    }

    #[tokio::test]
    async fn approve_is_durable_and_revoke_stops_in_flight_work() {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = PeerTable::open(dir.path());
        table.approve(peer("a", 1, 2)).await.expect("approve");
        let key = PublicKey::from_bytes([1; 32]);
        let reread = ApprovedPeers::load(table.path()).expect("file written");
        assert_eq!(reread.peers.len(), 1);
        let rt = table.runtime(&key).expect("runtime");
        let _slot = rt.try_slot().expect("slot");
        let mut stop = rt.stop_signal();
        table
            .revoke(&Selector::NodeId("a".into()))
            .await
            .expect("revoke");
        assert!(
            *stop.borrow_and_update(),
            "revocation reaches in-flight requests"
        );
        assert!(table.approvals().get(&key).is_none());
        assert!(table.runtime(&key).is_none());
        assert_eq!(
            table.discovered().len(),
            0,
            "revoked without sighting is not listed"
        );
    }

    #[tokio::test]
    async fn grants_limit_concurrency() {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = PeerTable::open(dir.path());
        table.approve(peer("a", 1, 2)).await.expect("approve");
        let rt = table
            .runtime(&PublicKey::from_bytes([1; 32]))
            .expect("runtime");
        let a = rt.try_slot();
        let b = rt.try_slot();
        assert!(a.is_some() && b.is_some());
        assert!(
            rt.try_slot().is_none(),
            "third request exceeds the grant of 2"
        );
        drop(a);
        assert!(rt.try_slot().is_some());
    }

    #[tokio::test]
    async fn a_corrupt_file_keeps_the_last_good_approvals_and_blocks_api_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = PeerTable::open(dir.path());
        table.approve(peer("a", 1, 2)).await.expect("approve");
        std::fs::write(table.path(), "{ \"peers\": [ {").expect("corrupt it");
        assert!(!table.reload_if_changed());
        assert!(table.file_error().is_some_and(|e| e.contains(":1:")));
        assert!(
            table
                .approvals()
                .get(&PublicKey::from_bytes([1; 32]))
                .is_some(),
            "last good stays"
        );
        let err = table
            .approve(peer("b", 2, 1))
            .await
            .expect_err("must refuse");
        assert!(matches!(err, ChangeError::FileCorrupt(_)));
        assert_eq!(
            std::fs::read_to_string(table.path()).expect("read"),
            "{ \"peers\": [ {",
            "never replaced"
        );
    }

    #[tokio::test]
    async fn a_hand_edit_is_picked_up_and_is_the_base_of_the_next_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = PeerTable::open(dir.path());
        table.approve(peer("a", 1, 2)).await.expect("approve");
        let mut file = ApprovedPeers::load(table.path()).expect("load");
        file.peers.push(peer("hand", 3, 1));
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(table.path(), serde_json::to_string(&file).expect("json")).expect("edit");
        assert!(table.reload_if_changed());
        assert!(table
            .approvals()
            .get(&PublicKey::from_bytes([3; 32]))
            .is_some());
        table.approve(peer("c", 4, 1)).await.expect("approve");
        let ids: Vec<String> = ApprovedPeers::load(table.path())
            .expect("load")
            .peers
            .into_iter()
            .map(|p| p.node_id)
            .collect();
        assert_eq!(ids, ["a", "hand", "c"]);
    }

    #[test]
    fn a_busy_answer_zeroes_the_free_slots_until_the_next_hello() {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = PeerTable::open(dir.path());
        let key = PublicKey::from_bytes([5; 32]);
        let shared = |name: &str, free_slots| crate::mesh::protocol::SharedModel {
            name: name.into(),
            free_slots,
            loaded: false,
            dialects: vec!["ollama".into()],
        };
        let models = vec![shared("m:latest", 3), shared("other", 2)];
        table.set_status(
            key,
            PeerStatus {
                reachable: true,
                models,
                ..PeerStatus::default()
            },
        );
        table.note_busy(&key, "m");
        let st = table.status(&key);
        assert_eq!(st.models[0].free_slots, 0);
        assert_eq!(st.models[1].free_slots, 2, "other models keep their count");
    }

    #[tokio::test]
    async fn a_node_id_cannot_be_taken_by_another_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = PeerTable::open(dir.path());
        table.approve(peer("a", 1, 2)).await.expect("approve");
        let err = table
            .approve(peer("a", 9, 2))
            .await
            .expect_err("spoofed node id");
        assert!(matches!(err, ChangeError::Conflict(_)));
    }
}
