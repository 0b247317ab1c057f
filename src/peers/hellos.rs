//! What the last hello to each approved peer found: reachable or not, the models it shares with
//! us and its free slots. Owned here; written by the hello loop (and by a busy answer), read by
//! the status pages and folded into the routing snapshot.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::Serialize;

use crate::identity::PublicKey;
use crate::mesh::protocol::SharedModel;

/// What the last hello to an approved peer found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PeerStatus {
    /// Answered the last hello.
    pub reachable: bool,
    /// RFC 3339 time of the last successful hello.
    pub last_hello: Option<String>,
    /// Round trip of the last hello, in milliseconds.
    pub latency_ms: Option<f64>,
    /// Models the peer shares with us, with its free slots for us.
    pub models: Vec<SharedModel>,
    /// Requests the peer lets us have in flight there.
    pub grant: u32,
    /// Last error talking to it.
    pub error: Option<String>,
    /// Models whose weights we may pull from it.
    pub pullable: Vec<String>,
}

/// The last hello result of every peer we said hello to.
#[derive(Default)]
pub struct Hellos {
    status: Mutex<HashMap<PublicKey, PeerStatus>>,
}

impl Hellos {
    fn lock(&self) -> MutexGuard<'_, HashMap<PublicKey, PeerStatus>> {
        self.status.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores what the last hello to `key` found.
    pub fn set(&self, key: PublicKey, status: PeerStatus) {
        self.lock().insert(key, status);
    }

    /// What the last hello to `key` found (nothing yet: unreachable, no models).
    pub fn get(&self, key: &PublicKey) -> PeerStatus {
        self.lock().get(key).cloned().unwrap_or_default()
    }

    /// Applies `f` to the stored status of each key in `keys`, in that order (`None` where
    /// no hello went out yet), under one lock.
    pub fn each<'a, T>(
        &self,
        keys: impl Iterator<Item = &'a PublicKey>,
        mut f: impl FnMut(&PublicKey, Option<&PeerStatus>) -> T,
    ) -> Vec<T> {
        let status = self.lock();
        keys.map(|k| f(k, status.get(k))).collect()
    }

    /// A peer just turned a request for `model` away as busy: until its next hello says
    /// otherwise, it has no free slot for that model. Returns whether anything changed.
    pub fn note_busy(&self, key: &PublicKey, model: &str) -> bool {
        let mut changed = false;
        if let Some(status) = self.lock().get_mut(key) {
            for m in &mut status.models {
                if crate::routing::model_matches(&m.name, model) && m.free_slots != 0 {
                    m.free_slots = 0;
                    changed = true;
                }
            }
        }
        changed
    }
}
