//! A write to the public registry from anyone on the Internet: a register/heartbeat record or a
//! delete, validated against a stored record. Half the inputs are re-signed with a fixed key so
//! the checks past the signature are reached too.
#![no_main]

use arknet::registry::record::{
    validate_delete, validate_write, DeleteRequest, Policy, Signer, SignedRecord, Stored,
};
use libfuzzer_sys::fuzz_target;

const NOW: u64 = 1_790_000_000;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, json)) = data.split_first() else {
        return;
    };
    let Ok(signer) = Signer::from_seed(&[7; 32]) else {
        return;
    };
    let policy = Policy {
        allow_private: flags & 4 != 0,
        ..Policy::default()
    };
    let stored = Stored {
        node_id: "ark-fuzz".into(),
        public_key: signer.public_key().to_string(),
        seq: 5,
        endpoint: "203.0.113.7:8911".into(),
        reachable: true,
        models: "llama3.1:8b".into(),
    };
    let stored = (flags & 2 != 0).then_some(&stored);
    if let Ok(mut signed) = serde_json::from_slice::<SignedRecord>(json) {
        if flags & 1 != 0 {
            signed.record.public_key = signer.public_key().to_string();
            signed = signed.record.sign(&signer);
        }
        let owner = stored.map(|s| s.public_key.as_str());
        if let Err(e) = validate_write(&signed, stored, owner, NOW, &policy) {
            let _ = (e.code(), e.status(), e.to_string());
        }
        let _ = signed.record.canonical_models();
    }
    if let Ok(mut delete) = serde_json::from_slice::<DeleteRequest>(json) {
        if flags & 1 != 0 {
            delete = DeleteRequest::signed(&delete.node_id, &signer, delete.seq, delete.issued_at);
        }
        if let Err(e) = validate_delete(&delete, stored, NOW, &policy) {
            let _ = (e.code(), e.status(), e.to_string());
        }
    }
});
