//! The registry record, its canonical signed encoding, and the pure checks a write must pass.
//!
//! Nothing here does I/O or reads a clock: callers pass `now`, so every refusal is a plain
//! function of its inputs and is unit-tested as such. The byte layout is documented in the
//! README ("Public registry"), with the test vector [`tests::readme_test_vector`] checks.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use base64::Engine;
use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};

use crate::identity::PublicKey;

/// First line of a record's canonical encoding: binds a signature to this use and version.
pub const RECORD_DOMAIN: &str = "arknet-registry-record-v1";
/// First line of a delete request's canonical encoding.
pub const DELETE_DOMAIN: &str = "arknet-registry-delete-v1";
/// First line of the bytes the registry signs for each answer (the body follows it).
pub const ANSWER_DOMAIN: &str = "arknet-registry-answer-v1";

/// Largest seq and time a record may carry: databases store them as signed 64-bit integers.
pub const MAX_INT: u64 = i64::MAX as u64;

/// What a record holds: exactly who, where, which models, and the signing metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// The node's id (as in its config).
    pub node_id: String,
    /// The node's Ed25519 key, 44-character base64.
    pub public_key: String,
    /// The node's mesh endpoint, `ip:port`.
    pub endpoint: String,
    /// Model names the owner chose to advertise.
    pub models: Vec<String>,
    /// Monotonic sequence number: each write must carry one above the stored one.
    pub seq: u64,
    /// When the node signed it, Unix seconds.
    pub issued_at: u64,
    /// When it stops being listed without a newer heartbeat, Unix seconds.
    pub expires: u64,
}

/// A record with the node's signature over its canonical encoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedRecord {
    /// The record.
    pub record: Record,
    /// Base64 Ed25519 signature of [`Record::canonical`] by `record.public_key`; absent or empty
    /// is refused as unsigned.
    #[serde(default)]
    pub signature: String,
}

/// A request to remove a node's record, signed by its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteRequest {
    /// The node's id.
    pub node_id: String,
    /// The node's key.
    pub public_key: String,
    /// Above the stored record's, so a captured delete cannot remove a later registration.
    pub seq: u64,
    /// When the node signed it, Unix seconds.
    pub issued_at: u64,
    /// Base64 signature of [`DeleteRequest::canonical`].
    #[serde(default)]
    pub signature: String,
}

/// The registry's rules for writes.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Accept loopback, private, link-local and unique-local endpoints (tests, private grids).
    pub allow_private: bool,
    /// How far `issued_at` may be from the registry's clock, either way, in seconds.
    pub clock_window: u64,
    /// Longest lifetime a record may ask for (`expires - issued_at`), seconds.
    pub max_ttl: u64,
    /// Most models one record may advertise.
    pub max_models: usize,
    /// Longest model name, bytes.
    pub max_model_len: usize,
    /// Largest canonical encoding, bytes.
    pub max_record_bytes: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            allow_private: false,
            clock_window: 300,
            max_ttl: 3600,
            max_models: 64,
            max_model_len: 128,
            max_record_bytes: 4096,
        }
    }
}

/// What the registry holds for a key, as far as checking a write needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The stored record's node id.
    pub node_id: String,
    /// The stored record's key.
    pub public_key: String,
    /// The stored record's sequence number.
    pub seq: u64,
    /// The stored endpoint (empty for a deleted record's tombstone).
    pub endpoint: String,
    /// Whether the registry reached the stored endpoint.
    pub reachable: bool,
    /// The stored models, canonical (sorted, deduplicated, joined with `,`).
    pub models: String,
}

/// Why a write was refused; each has a stable code and an HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No signature.
    #[error("the write is not signed")]
    Unsigned,
    /// The signature does not verify under the record's key.
    #[error("the signature does not verify under the record's public key")]
    BadSignature,
    /// The node id is registered under another key.
    #[error("node_id `{0}` is bound to another key")]
    NodeIdTaken(String),
    /// Sequence number not above the stored one.
    #[error("seq {got} is not above the stored seq {stored}")]
    Replay {
        /// The stored seq.
        stored: u64,
        /// The write's seq.
        got: u64,
    },
    /// `issued_at` too far from the registry's clock.
    #[error("issued_at {issued_at} is more than {window} s from the registry's clock ({now})")]
    ClockWindow {
        /// The write's issued_at.
        issued_at: u64,
        /// The registry's clock.
        now: u64,
        /// The allowed distance.
        window: u64,
    },
    /// Already expired, or expires before it was issued.
    #[error("the record expired at {expires} (now {now})")]
    Expired {
        /// The record's expiry.
        expires: u64,
        /// The registry's clock.
        now: u64,
    },
    /// Asks to live longer than the registry allows.
    #[error("the record asks to live {asked} s, the registry allows at most {max} s")]
    TtlTooLong {
        /// `expires - issued_at`.
        asked: u64,
        /// The policy's maximum.
        max: u64,
    },
    /// The endpoint is not publicly routable and the policy does not allow private ones.
    #[error("endpoint {0} is not publicly routable")]
    Unroutable(String),
    /// Too large: too many models, a too-long name, or too many bytes.
    #[error("record too large: {0}")]
    Oversized(String),
    /// A field is not well formed.
    #[error("malformed record: {0}")]
    Malformed(String),
    /// Too many writes from this key or address this minute.
    #[error("too many writes from this {0} in the last minute")]
    RateLimited(&'static str),
    /// Nothing stored for this key (delete).
    #[error("no record for this key")]
    NotFound,
}

impl Refusal {
    /// Stable machine-readable code (the JSON error's `code`, the metrics label).
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Unsigned => "unsigned",
            Refusal::BadSignature => "bad_signature",
            Refusal::NodeIdTaken(_) => "node_id_taken",
            Refusal::Replay { .. } => "replay",
            Refusal::ClockWindow { .. } => "clock_window",
            Refusal::Expired { .. } => "expired",
            Refusal::TtlTooLong { .. } => "ttl_too_long",
            Refusal::Unroutable(_) => "unroutable_endpoint",
            Refusal::Oversized(_) => "oversized",
            Refusal::Malformed(_) => "malformed",
            Refusal::RateLimited(_) => "rate_limited",
            Refusal::NotFound => "not_found",
        }
    }

    /// HTTP status of the refusal.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::Unsigned | Refusal::BadSignature => 401,
            Refusal::NodeIdTaken(_) | Refusal::Replay { .. } => 409,
            Refusal::Oversized(_) => 413,
            Refusal::Unroutable(_) => 422,
            Refusal::RateLimited(_) => 429,
            Refusal::NotFound => 404,
            Refusal::ClockWindow { .. }
            | Refusal::Expired { .. }
            | Refusal::TtlTooLong { .. }
            | Refusal::Malformed(_) => 400,
        }
    }

    /// Every code, for metrics that list each reason from the start.
    pub const CODES: [&'static str; 12] = [
        "unsigned",
        "bad_signature",
        "node_id_taken",
        "replay",
        "clock_window",
        "expired",
        "ttl_too_long",
        "unroutable_endpoint",
        "oversized",
        "malformed",
        "rate_limited",
        "not_found",
    ];
}

impl Record {
    /// The models as the canonical encoding and the store hold them: sorted, deduplicated,
    /// joined with `,`.
    pub fn canonical_models(&self) -> String {
        let mut models: Vec<&str> = self.models.iter().map(String::as_str).collect();
        models.sort_unstable();
        models.dedup();
        models.join(",")
    }

    /// The exact bytes a node signs: UTF-8 lines `key=value\n` in this fixed order, after the
    /// domain line; models sorted, deduplicated and joined with `,`. Names may not contain `,`
    /// or control characters ([`validate_write`] refuses them), so the encoding is unambiguous.
    pub fn canonical(&self) -> Vec<u8> {
        let models = self.canonical_models();
        let mut out = String::with_capacity(256);
        // Writing to a String cannot fail.
        let _ = write!(
            out,
            "{RECORD_DOMAIN}\nnode_id={}\npublic_key={}\nendpoint={}\nmodels={}\nseq={}\nissued_at={}\nexpires={}\n",
            self.node_id,
            self.public_key,
            self.endpoint,
            models,
            self.seq,
            self.issued_at,
            self.expires
        );
        out.into_bytes()
    }

    /// Signs the record with `signer`, which must hold `self.public_key`'s private half.
    pub fn sign(self, signer: &Signer) -> SignedRecord {
        let signature = signer.sign_b64(&self.canonical());
        SignedRecord {
            record: self,
            signature,
        }
    }
}

impl DeleteRequest {
    /// The exact bytes a node signs to delete its record.
    pub fn canonical(&self) -> Vec<u8> {
        format!(
            "{DELETE_DOMAIN}\nnode_id={}\npublic_key={}\nseq={}\nissued_at={}\n",
            self.node_id, self.public_key, self.seq, self.issued_at
        )
        .into_bytes()
    }

    /// A delete request signed by `signer`.
    pub fn signed(node_id: &str, signer: &Signer, seq: u64, issued_at: u64) -> Self {
        let mut req = DeleteRequest {
            node_id: node_id.to_string(),
            public_key: signer.public_key().to_string(),
            seq,
            issued_at,
            signature: String::new(),
        };
        req.signature = signer.sign_b64(&req.canonical());
        req
    }
}

/// The bytes the registry signs for an answer: the domain line, then the body verbatim.
pub fn answer_signed_bytes(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ANSWER_DOMAIN.len() + 1 + body.len());
    out.extend_from_slice(ANSWER_DOMAIN.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(body);
    out
}

/// An Ed25519 private key that signs records, deletes or answers.
pub struct Signer {
    pair: Ed25519KeyPair,
    public_key: PublicKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({})", self.public_key)
    }
}

impl Signer {
    /// From a PKCS#8 PEM (v1 as the node's identity stores it, or v2).
    pub fn from_pkcs8_pem(pem_text: &str) -> Result<Self, String> {
        let doc = pem::parse(pem_text).map_err(|e| format!("not PEM: {e}"))?;
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(doc.contents())
            .map_err(|e| format!("not an Ed25519 PKCS#8 key: {e}"))?;
        Ok(Self::from_pair(pair))
    }

    /// From a 32-byte seed (test vectors, benches).
    pub fn from_seed(seed: &[u8; 32]) -> Result<Self, String> {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed).map_err(|e| format!("seed: {e}"))?;
        Ok(Self::from_pair(pair))
    }

    fn from_pair(pair: Ed25519KeyPair) -> Self {
        let mut raw = [0u8; 32];
        raw.copy_from_slice(pair.public_key().as_ref());
        Signer {
            pair,
            public_key: PublicKey::from_bytes(raw),
        }
    }

    /// The public half.
    pub fn public_key(&self) -> PublicKey {
        self.public_key
    }

    /// Base64 signature of `bytes`.
    pub fn sign_b64(&self, bytes: &[u8]) -> String {
        b64().encode(self.pair.sign(bytes).as_ref())
    }
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// Checks a base64 Ed25519 `signature` of `bytes` under `key`.
pub fn verify(key: &PublicKey, bytes: &[u8], signature: &str) -> Result<(), Refusal> {
    if signature.trim().is_empty() {
        return Err(Refusal::Unsigned);
    }
    let sig = b64()
        .decode(signature.trim())
        .map_err(|_| Refusal::BadSignature)?;
    UnparsedPublicKey::new(&ED25519, key.as_bytes())
        .verify(bytes, &sig)
        .map_err(|_| Refusal::BadSignature)
}

/// Whether `ip` may be listed under `allow_private`. Addresses nobody can dial (unspecified,
/// multicast, broadcast, documentation ranges) are never listed; loopback, private, CGNAT,
/// link-local and unique-local ones only on a private registry.
pub fn routable(ip: IpAddr, allow_private: bool) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            let never = v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || o[0] == 0
                || o[0] >= 240;
            let private = v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || (o[0] == 100 && (64..128).contains(&o[1]));
            !never && (allow_private || !private)
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let never =
                v6.is_unspecified() || v6.is_multicast() || (s[0] == 0x2001 && s[1] == 0x0db8);
            let private = v6.is_loopback()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80; // link local
            !never && (allow_private || !private)
        }
    }
}

fn check_models(models: &[String], policy: &Policy) -> Result<(), Refusal> {
    if models.len() > policy.max_models {
        return Err(Refusal::Oversized(format!(
            "{} models, at most {}",
            models.len(),
            policy.max_models
        )));
    }
    for m in models {
        if m.len() > policy.max_model_len {
            return Err(Refusal::Oversized(format!(
                "model name of {} bytes, at most {}",
                m.len(),
                policy.max_model_len
            )));
        }
        if m.is_empty() || m.chars().any(|c| c == ',' || c.is_control()) {
            return Err(Refusal::Malformed(format!(
                "model name {m:?}: empty, or holds a comma or control character"
            )));
        }
    }
    Ok(())
}

fn parse_key(s: &str) -> Result<PublicKey, Refusal> {
    s.parse::<PublicKey>()
        .map_err(|_| Refusal::Malformed(format!("public_key `{s}` is not 44-character base64")))
}

fn check_node_id(id: &str) -> Result<(), Refusal> {
    if crate::config::valid_node_id(id) {
        Ok(())
    } else {
        Err(Refusal::Malformed(format!(
            "node_id {id:?}: 1-64 of A-Z a-z 0-9 - _ ."
        )))
    }
}

fn check_fresh(issued_at: u64, now: u64, policy: &Policy) -> Result<(), Refusal> {
    if issued_at.abs_diff(now) > policy.clock_window {
        return Err(Refusal::ClockWindow {
            issued_at,
            now,
            window: policy.clock_window,
        });
    }
    Ok(())
}

/// `stored` is what the registry holds for the record's key, and `owner_of_id` the key the
/// node id is stored under, if any.
fn check_binding(
    node_id: &str,
    key: &str,
    seq: u64,
    stored: Option<&Stored>,
    owner_of_id: Option<&str>,
) -> Result<(), Refusal> {
    if owner_of_id.is_some_and(|owner| owner != key) {
        return Err(Refusal::NodeIdTaken(node_id.to_string()));
    }
    if let Some(s) = stored {
        if seq <= s.seq {
            return Err(Refusal::Replay {
                stored: s.seq,
                got: seq,
            });
        }
    }
    Ok(())
}

/// Checks a register/heartbeat/update write, in this order: shape and size, signature, then
/// freshness and binding against what is stored. The order makes an unsigned or forged write
/// learn nothing about what the registry holds.
pub fn validate_write(
    signed: &SignedRecord,
    stored: Option<&Stored>,
    owner_of_id: Option<&str>,
    now: u64,
    policy: &Policy,
) -> Result<(), Refusal> {
    let r = &signed.record;
    check_node_id(&r.node_id)?;
    let key = parse_key(&r.public_key)?;
    check_models(&r.models, policy)?;
    let endpoint: SocketAddr = r
        .endpoint
        .parse()
        .map_err(|_| Refusal::Malformed(format!("endpoint `{}` is not ip:port", r.endpoint)))?;
    // Only the canonical spelling, so the signed bytes and the listed endpoint are one string.
    if endpoint.to_string() != r.endpoint {
        return Err(Refusal::Malformed(format!(
            "endpoint `{}` is not in canonical form `{endpoint}`",
            r.endpoint
        )));
    }
    if [r.seq, r.issued_at, r.expires].iter().any(|v| *v > MAX_INT) {
        return Err(Refusal::Malformed(format!(
            "seq, issued_at and expires must be at most {MAX_INT}"
        )));
    }
    let canonical = r.canonical();
    if canonical.len() > policy.max_record_bytes {
        return Err(Refusal::Oversized(format!(
            "{} bytes, at most {}",
            canonical.len(),
            policy.max_record_bytes
        )));
    }
    verify(&key, &canonical, &signed.signature)?;
    check_fresh(r.issued_at, now, policy)?;
    if r.expires <= now || r.expires <= r.issued_at {
        return Err(Refusal::Expired {
            expires: r.expires,
            now,
        });
    }
    let asked = r.expires - r.issued_at;
    if asked > policy.max_ttl {
        return Err(Refusal::TtlTooLong {
            asked,
            max: policy.max_ttl,
        });
    }
    if endpoint.port() == 0 || !routable(endpoint.ip(), policy.allow_private) {
        return Err(Refusal::Unroutable(r.endpoint.clone()));
    }
    check_binding(&r.node_id, &r.public_key, r.seq, stored, owner_of_id)
}

/// The stored-state half of [`validate_write`], for a write whose other checks (signature
/// included) already passed with no stored state: the node id is not bound to another key and
/// the seq is above the stored one.
pub fn validate_binding(
    signed: &SignedRecord,
    stored: Option<&Stored>,
    owner_of_id: Option<&str>,
) -> Result<(), Refusal> {
    let r = &signed.record;
    check_binding(&r.node_id, &r.public_key, r.seq, stored, owner_of_id)
}

/// Checks a delete: signed by the key, fresh, above the stored seq, and naming the stored id.
pub fn validate_delete(
    req: &DeleteRequest,
    stored: Option<&Stored>,
    now: u64,
    policy: &Policy,
) -> Result<(), Refusal> {
    check_node_id(&req.node_id)?;
    let key = parse_key(&req.public_key)?;
    verify(&key, &req.canonical(), &req.signature)?;
    check_fresh(req.issued_at, now, policy)?;
    if req.seq > MAX_INT {
        return Err(Refusal::Malformed(format!("seq must be at most {MAX_INT}")));
    }
    let Some(stored) = stored else {
        return Err(Refusal::NotFound);
    };
    if stored.node_id != req.node_id {
        return Err(Refusal::NodeIdTaken(req.node_id.clone()));
    }
    check_binding(&req.node_id, &req.public_key, req.seq, Some(stored), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn signer(n: u8) -> Signer {
        Signer::from_seed(&[n; 32]).expect("seed")
    }

    /// A record with a public endpoint (never dialled: validation is pure).
    fn public_record(s: &Signer) -> Record {
        Record {
            node_id: "ark-test".into(),
            public_key: s.public_key().to_string(),
            endpoint: "8.8.4.4:7443".into(),
            models: vec!["qwen3:8b".into(), "llama3.2:3b".into()],
            seq: 5,
            issued_at: NOW,
            expires: NOW + 600,
        }
    }

    fn check(signed: &SignedRecord, stored: Option<&Stored>) -> Result<(), Refusal> {
        validate_write(signed, stored, None, NOW, &Policy::default())
    }

    /// The README's test vector: seed 32 bytes of 0x01, this record, these bytes, this
    /// signature. Ed25519 signatures are deterministic, so the vector is fixed.
    #[test]
    fn readme_test_vector() {
        let s = signer(1);
        let r = Record {
            node_id: "ark-example".into(),
            public_key: s.public_key().to_string(),
            endpoint: "192.0.2.10:7443".into(),
            models: vec!["qwen3:8b".into(), "llama3.2:3b".into()],
            seq: 7,
            issued_at: 1_767_225_600,
            expires: 1_767_226_200,
        };
        assert_eq!(
            s.public_key().to_string(),
            "iojj3XQJ8ZX9UtstPLpdcspnCb8dlBIb83SIAbQPb1w="
        );
        let expected = "arknet-registry-record-v1\n\
                        node_id=ark-example\n\
                        public_key=iojj3XQJ8ZX9UtstPLpdcspnCb8dlBIb83SIAbQPb1w=\n\
                        endpoint=192.0.2.10:7443\n\
                        models=llama3.2:3b,qwen3:8b\n\
                        seq=7\n\
                        issued_at=1767225600\n\
                        expires=1767226200\n";
        assert_eq!(String::from_utf8(r.canonical()).expect("utf8"), expected);
        let signed = r.sign(&s);
        assert_eq!(signed.signature, README_SIGNATURE);
        verify(&s.public_key(), expected.as_bytes(), &signed.signature).expect("verifies");
        let readme = include_str!("../../README.md");
        assert!(
            readme.contains(expected.trim_end()),
            "README lacks the bytes"
        );
        assert!(
            readme.contains(README_SIGNATURE),
            "README lacks the signature"
        );
    }

    const README_SIGNATURE: &str =
        "ZDF/fE8Vtbht5gWAbkDisWkBUPOhkBK5aSbCNSMd+RJxq6uSAi3/3F2dbooA7CV3CswwIMQhy3QSwGFnUttfDg==";

    #[test]
    fn a_well_formed_signed_record_passes() {
        let s = signer(2);
        check(&public_record(&s).sign(&s), None).expect("valid");
        let stored = Stored {
            node_id: "ark-test".into(),
            public_key: s.public_key().to_string(),
            seq: 4,
            endpoint: "8.8.4.4:7443".into(),
            reachable: true,
            models: String::new(),
        };
        check(&public_record(&s).sign(&s), Some(&stored)).expect("seq above stored");
    }

    #[test]
    fn unsigned_is_refused() {
        let s = signer(2);
        let mut w = public_record(&s).sign(&s);
        w.signature = String::new();
        assert_eq!(check(&w, None), Err(Refusal::Unsigned));
        assert_eq!(Refusal::Unsigned.status(), 401);
    }

    #[test]
    fn forged_and_tampered_are_refused() {
        let s = signer(2);
        let other = signer(3);
        // Signed by another key than the one it names.
        let forged = SignedRecord {
            record: public_record(&s),
            signature: other.sign_b64(&public_record(&s).canonical()),
        };
        assert_eq!(check(&forged, None), Err(Refusal::BadSignature));
        // Signed, then the endpoint changed.
        let mut tampered = public_record(&s).sign(&s);
        tampered.record.endpoint = "8.8.8.8:7443".into();
        assert_eq!(check(&tampered, None), Err(Refusal::BadSignature));
        let mut garbage = public_record(&s).sign(&s);
        garbage.signature = "not base64!".into();
        assert_eq!(check(&garbage, None), Err(Refusal::BadSignature));
    }

    #[test]
    fn replays_are_refused_by_seq_and_by_clock() {
        let s = signer(2);
        let stored = Stored {
            node_id: "ark-test".into(),
            public_key: s.public_key().to_string(),
            seq: 5,
            endpoint: "8.8.4.4:7443".into(),
            reachable: true,
            models: String::new(),
        };
        let same = public_record(&s).sign(&s);
        let err = check(&same, Some(&stored)).expect_err("same seq");
        assert_eq!(err, Refusal::Replay { stored: 5, got: 5 });
        assert_eq!(err.status(), 409);
        let old = Record {
            issued_at: NOW - 301,
            expires: NOW + 100,
            ..public_record(&s)
        }
        .sign(&s);
        assert_eq!(check(&old, None).map_err(|e| e.code()), Err("clock_window"));
        let future = Record {
            issued_at: NOW + 301,
            expires: NOW + 900,
            ..public_record(&s)
        }
        .sign(&s);
        assert_eq!(
            check(&future, None).map_err(|e| e.code()),
            Err("clock_window")
        );
    }

    #[test]
    fn expired_and_too_long_lived_are_refused() {
        let s = signer(2);
        let expired = Record {
            issued_at: NOW - 10,
            expires: NOW,
            ..public_record(&s)
        }
        .sign(&s);
        assert_eq!(
            check(&expired, None),
            Err(Refusal::Expired {
                expires: NOW,
                now: NOW
            })
        );
        let long = Record {
            expires: NOW + 3601,
            ..public_record(&s)
        }
        .sign(&s);
        assert_eq!(
            check(&long, None),
            Err(Refusal::TtlTooLong {
                asked: 3601,
                max: 3600
            })
        );
    }

    #[test]
    fn node_id_bound_to_another_key_is_refused() {
        let s = signer(2);
        let w = public_record(&s).sign(&s);
        let other = signer(3).public_key().to_string();
        let err =
            validate_write(&w, None, Some(&other), NOW, &Policy::default()).expect_err("taken");
        assert_eq!(err, Refusal::NodeIdTaken("ark-test".into()));
        assert_eq!(err.status(), 409);
        // The same key re-registering its own id is fine.
        let own = s.public_key().to_string();
        validate_write(&w, None, Some(&own), NOW, &Policy::default()).expect("own id");
    }

    #[test]
    fn private_endpoints_only_when_allowed() {
        let s = signer(2);
        for ep in [
            "127.0.0.1:7443",
            "10.1.2.3:7443",
            "192.168.1.5:7443",
            "100.64.0.1:7443",
            "[::1]:7443",
            "[fd00::1]:7443",
            "[fe80::1]:7443",
        ] {
            let w = Record {
                endpoint: ep.into(),
                ..public_record(&s)
            }
            .sign(&s);
            assert_eq!(
                check(&w, None),
                Err(Refusal::Unroutable(ep.into())),
                "{ep} public"
            );
            let open = Policy {
                allow_private: true,
                ..Policy::default()
            };
            validate_write(&w, None, None, NOW, &open).unwrap_or_else(|e| panic!("{ep}: {e}"));
        }
        for ep in [
            "0.0.0.0:7443",
            "224.0.0.1:7443",
            "255.255.255.255:7443",
            "8.8.4.4:0",
            "[::]:7443",
        ] {
            let w = Record {
                endpoint: ep.into(),
                ..public_record(&s)
            }
            .sign(&s);
            let open = Policy {
                allow_private: true,
                ..Policy::default()
            };
            assert_eq!(
                validate_write(&w, None, None, NOW, &open).map_err(|e| e.code()),
                Err("unroutable_endpoint"),
                "{ep}"
            );
        }
        assert!(routable("2606:4700::1111".parse().expect("ip"), false));
        assert!(!routable("::ffff:10.0.0.1".parse().expect("ip"), false));
    }

    #[test]
    fn oversized_and_malformed_are_refused() {
        let s = signer(2);
        let many = Record {
            models: (0..65).map(|i| format!("m{i}")).collect(),
            ..public_record(&s)
        }
        .sign(&s);
        assert_eq!(check(&many, None).map_err(|e| e.code()), Err("oversized"));
        assert_eq!(Refusal::Oversized(String::new()).status(), 413);
        let long = Record {
            models: vec!["x".repeat(129)],
            ..public_record(&s)
        }
        .sign(&s);
        assert_eq!(check(&long, None).map_err(|e| e.code()), Err("oversized"));
        let bytes = Record {
            models: (0..40).map(|i| format!("{i:0>120}")).collect(),
            ..public_record(&s)
        }
        .sign(&s);
        assert_eq!(check(&bytes, None).map_err(|e| e.code()), Err("oversized"));
        for bad in [
            Record {
                models: vec!["a,b".into()],
                ..public_record(&s)
            },
            Record {
                node_id: "bad id\n".into(),
                ..public_record(&s)
            },
            Record {
                endpoint: "example.com:7443".into(),
                ..public_record(&s)
            },
            Record {
                endpoint: "[2606:4700:0:0::1111]:7443".into(),
                ..public_record(&s)
            },
            Record {
                public_key: "short".into(),
                ..public_record(&s)
            },
        ] {
            let w = bad.clone().sign(&s);
            assert_eq!(
                check(&w, None).map_err(|e| e.code()),
                Err("malformed"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn deletes_are_signed_fresh_and_above_the_stored_seq() {
        let s = signer(2);
        let stored = Stored {
            node_id: "ark-test".into(),
            public_key: s.public_key().to_string(),
            seq: 5,
            endpoint: "8.8.4.4:7443".into(),
            reachable: true,
            models: String::new(),
        };
        let p = Policy::default();
        let ok = DeleteRequest::signed("ark-test", &s, 6, NOW);
        validate_delete(&ok, Some(&stored), NOW, &p).expect("valid delete");
        assert_eq!(validate_delete(&ok, None, NOW, &p), Err(Refusal::NotFound));
        let replay = DeleteRequest::signed("ark-test", &s, 5, NOW);
        assert_eq!(
            validate_delete(&replay, Some(&stored), NOW, &p).map_err(|e| e.code()),
            Err("replay")
        );
        let mut forged = DeleteRequest::signed("ark-test", &signer(3), 6, NOW);
        forged.public_key = s.public_key().to_string();
        assert_eq!(
            validate_delete(&forged, Some(&stored), NOW, &p),
            Err(Refusal::BadSignature)
        );
        let mut unsigned = ok.clone();
        unsigned.signature.clear();
        assert_eq!(
            validate_delete(&unsigned, Some(&stored), NOW, &p),
            Err(Refusal::Unsigned)
        );
        let stale = DeleteRequest::signed("ark-test", &s, 6, NOW - 1000);
        assert_eq!(
            validate_delete(&stale, Some(&stored), NOW, &p).map_err(|e| e.code()),
            Err("clock_window")
        );
        let other_id = DeleteRequest::signed("ark-other", &s, 6, NOW);
        assert_eq!(
            validate_delete(&other_id, Some(&stored), NOW, &p).map_err(|e| e.code()),
            Err("node_id_taken")
        );
    }

    #[test]
    fn the_node_identity_key_signs_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = crate::identity::Identity::load_or_create(dir.path()).expect("identity");
        let s = Signer::from_pkcs8_pem(id.key_pem()).expect("identity key");
        assert_eq!(s.public_key(), id.public_key());
        check(&public_record(&s).sign(&s), None).expect("valid");
    }

    #[test]
    fn every_refusal_code_is_listed_once() {
        let mut codes = Refusal::CODES.to_vec();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), Refusal::CODES.len());
    }
}
