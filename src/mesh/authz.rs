//! Who may do what on the mesh listener: pure functions over an approvals snapshot.
//!
//! The key comes from the TLS handshake (never from a header or a claimed node id); an answer
//! here is final for the request. The denial says what the peer may fix, nothing more.

use crate::identity::PublicKey;
use crate::peers::store::ApprovedPeer;
use crate::peers::Approvals;
use crate::routing::model_matches;

/// Why a peer request is refused (all 403).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// The TLS handshake carried no valid client identity.
    #[error("a client certificate issued by the node's identity is required")]
    NoCertificate,
    /// The key is not (or no longer) approved here.
    #[error("this node has not approved your key")]
    Unknown,
    /// Approved, but without inference permission.
    #[error("your approval does not include inference")]
    NoInference,
    /// The model is not shared with this peer.
    #[error("model \"{0}\" is not shared with you")]
    ModelNotShared(String),
    /// Approved, but not allowed to pull model weights.
    #[error("your approval does not include pulling models")]
    NoPulls,
}

impl Denied {
    /// Stable code for error bodies and metric labels.
    pub fn code(&self) -> &'static str {
        match self {
            Denied::NoCertificate => "no_client_certificate",
            Denied::Unknown => "peer_not_approved",
            Denied::NoInference => "inference_not_permitted",
            Denied::ModelNotShared(_) => "model_not_shared",
            Denied::NoPulls => "pulls_not_permitted",
        }
    }
}

/// Proof that a peer may run `model` here; carries the labels audit and metrics use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permit {
    /// The peer's key.
    pub key: PublicKey,
    /// The peer's node id, from the approval (not from anything it claimed).
    pub node_id: String,
    /// The model it may run.
    pub model: String,
}

/// The approved peer behind a TLS identity.
pub fn admit<'a>(
    approvals: &'a Approvals,
    key: Option<&PublicKey>,
) -> Result<&'a ApprovedPeer, Denied> {
    let key = key.ok_or(Denied::NoCertificate)?;
    approvals.get(key).ok_or(Denied::Unknown)
}

/// May this approved peer run inference at all (checked before its body is read)?
pub fn may_infer(peer: &ApprovedPeer) -> Result<(), Denied> {
    if peer.permissions.can_request_inference {
        Ok(())
    } else {
        Err(Denied::NoInference)
    }
}

/// May this approved peer run `model`?
pub fn authorize(peer: &ApprovedPeer, model: &str) -> Result<Permit, Denied> {
    may_infer(peer)?;
    permit_for_shared(peer, model)
}

/// May this approved peer pull the weights of `model`? Only with `can_pull_models` and only
/// for a model in its `models_shared`; decided before any file is looked at.
pub fn may_pull(peer: &ApprovedPeer, model: &str) -> Result<Permit, Denied> {
    if !peer.permissions.can_pull_models {
        return Err(Denied::NoPulls);
    }
    permit_for_shared(peer, model)
}

/// The permit for `model`, if it is among those shared with `peer` (the check inference and
/// pulls have in common).
fn permit_for_shared(peer: &ApprovedPeer, model: &str) -> Result<Permit, Denied> {
    if !shares(peer, model) {
        return Err(Denied::ModelNotShared(model.to_string()));
    }
    Ok(Permit {
        key: peer.public_key,
        node_id: peer.node_id.clone(),
        model: model.to_string(),
    })
}

/// Whether `model` is in the peer's `models_shared` (untagged names mean `:latest`).
pub fn shares(peer: &ApprovedPeer, model: &str) -> bool {
    peer.permissions
        .models_shared
        .iter()
        .any(|m| m == model || model_matches(m, model) || model_matches(model, m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peers::store::{ApprovedPeers, Permissions};

    fn approvals() -> Approvals {
        let peer = |id: &str, byte: u8, infer: bool| ApprovedPeer {
            node_id: id.into(),
            public_key: PublicKey::from_bytes([byte; 32]),
            name: String::new(),
            approved_at: String::new(),
            permissions: Permissions {
                can_request_inference: infer,
                can_pull_models: false,
                models_shared: vec!["llama3.1:8b".into(), "qwen".into()],
                max_concurrent_requests: 2,
            },
            endpoint: None,
            extra: Default::default(),
        };
        Approvals {
            file: ApprovedPeers {
                peers: vec![peer("dave", 1, true), peer("eve", 2, false)],
                extra: Default::default(),
            },
        }
    }

    #[test]
    fn no_certificate_and_unknown_keys_are_denied() {
        let a = approvals();
        assert_eq!(admit(&a, None).err(), Some(Denied::NoCertificate));
        assert_eq!(
            admit(&a, Some(&PublicKey::from_bytes([9; 32]))).err(),
            Some(Denied::Unknown)
        );
    }

    #[test]
    fn approved_peer_gets_a_permit_for_shared_models_only() {
        let a = approvals();
        let dave = admit(&a, Some(&PublicKey::from_bytes([1; 32]))).expect("approved");
        let permit = authorize(dave, "llama3.1:8b").expect("shared");
        assert_eq!(permit.node_id, "dave");
        assert!(
            authorize(dave, "qwen:latest").is_ok(),
            "untagged share covers :latest"
        );
        assert_eq!(
            authorize(dave, "mistral").err(),
            Some(Denied::ModelNotShared("mistral".into()))
        );
    }

    #[test]
    fn pulls_need_the_permission_and_a_shared_model() {
        let mut a = approvals();
        let key = PublicKey::from_bytes([1; 32]);
        let dave = admit(&a, Some(&key)).expect("approved");
        assert_eq!(may_pull(dave, "llama3.1:8b").err(), Some(Denied::NoPulls));
        a.file.peers[0].permissions.can_pull_models = true;
        let dave = admit(&a, Some(&key)).expect("approved");
        assert_eq!(
            may_pull(dave, "llama3.1:8b").expect("shared").node_id,
            "dave"
        );
        assert!(may_pull(dave, "qwen:latest").is_ok());
        assert_eq!(
            may_pull(dave, "mistral").err(),
            Some(Denied::ModelNotShared("mistral".into()))
        );
        // Pulling does not need inference permission, nor does it grant it.
        a.file.peers[0].permissions.can_request_inference = false;
        let dave = admit(&a, Some(&key)).expect("approved");
        assert!(may_pull(dave, "qwen").is_ok());
        assert_eq!(may_infer(dave).err(), Some(Denied::NoInference));
    }

    #[test]
    fn inference_permission_is_checked_before_models() {
        let a = approvals();
        let eve = admit(&a, Some(&PublicKey::from_bytes([2; 32]))).expect("approved");
        assert_eq!(may_infer(eve).err(), Some(Denied::NoInference));
        assert_eq!(
            authorize(eve, "llama3.1:8b").err(),
            Some(Denied::NoInference)
        );
    }
}
