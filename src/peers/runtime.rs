//! Live state of each approved peer on this node: the concurrency it was granted here and the
//! signal that ends its in-flight requests. Owned here; rebuilt from each new set of approvals.
//!
//! The mesh listener looks a peer up on every request it serves, so readers take an immutable
//! map with one atomic load; only a change of approvals writes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::identity::PublicKey;
use crate::peers::store::ApprovedPeers;

/// Live state of one approved peer on this node: its concurrency grant and its revocation
/// signal, which in-flight streams watch.
pub struct PeerRuntime {
    grant: u32,
    slots: Arc<Semaphore>,
    revoked: watch::Sender<bool>,
}

impl PeerRuntime {
    fn new(grant: u32) -> Self {
        PeerRuntime {
            grant,
            slots: Arc::new(Semaphore::new(grant as usize)),
            revoked: watch::Sender::new(false),
        }
    }

    /// One of the peer's concurrency slots, or `None` when it is at its grant.
    pub fn try_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// Requests of this peer in flight here.
    pub fn in_flight(&self) -> usize {
        self.grant as usize - self.slots.available_permits()
    }

    /// The peer's grant.
    pub fn grant(&self) -> u32 {
        self.grant
    }

    /// Flips to `true` when the peer is revoked or its grant changes.
    pub fn stop_signal(&self) -> watch::Receiver<bool> {
        self.revoked.subscribe()
    }
}

/// The runtimes of all approved peers.
#[derive(Default)]
pub struct Runtimes {
    map: ArcSwap<HashMap<PublicKey, Arc<PeerRuntime>>>,
    /// Serializes rebuilds, so that two approval changes cannot both keep the same runtime.
    write: Mutex<()>,
}

impl Runtimes {
    /// Live state of an approved peer.
    pub fn get(&self, key: &PublicKey) -> Option<Arc<PeerRuntime>> {
        self.map.load().get(key).cloned()
    }

    /// Installs the runtimes for `file`: a peer whose grant and inference permission are
    /// unchanged keeps its runtime (and its requests in flight); every other old runtime is
    /// told to stop, which ends its streams.
    pub fn rebuild(&self, file: &ApprovedPeers) {
        let _serial = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        let old = self.map.load_full();
        let mut kept = HashMap::with_capacity(file.peers.len());
        for p in &file.peers {
            let grant = p.permissions.max_concurrent_requests;
            let keep = old
                .get(&p.public_key)
                .filter(|r| r.grant == grant && p.permissions.can_request_inference)
                .cloned();
            kept.insert(
                p.public_key,
                keep.unwrap_or_else(|| Arc::new(PeerRuntime::new(grant))),
            );
        }
        for (key, runtime) in old.iter() {
            let same = kept.get(key).is_some_and(|k| Arc::ptr_eq(k, runtime));
            if !same {
                // Revoked (or grant changed): in-flight streams of that peer end now.
                runtime.revoked.send_replace(true);
                tracing::debug!(public_key = %key, "peer's in-flight requests ended");
            }
        }
        self.map.store(Arc::new(kept));
    }
}
