//! Mutual TLS for the mesh: identity is a key, not a name.
//!
//! Every node presents `[P-256 leaf, Ed25519 identity cert]`. A chain is valid when the identity
//! certificate is self-signed by an Ed25519 key and signed the leaf; that Ed25519 key is the
//! peer. The TLS handshake itself proves the peer holds the leaf's private key.
//!
//! - Server: a client certificate is requested; a chain that is present but invalid fails the
//!   handshake; no certificate at all is let through so the HTTP layer can answer a clear 403.
//! - Client: the server is pinned by putting the expected identity certificate as the only CA,
//!   with a non-empty SNI (an empty SNI makes Pingora skip verification) and a pool key derived
//!   from the pin (so a pooled connection is never reused under another pin).

use std::any::Any;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
// Pingora re-exports BoringSSL without its asn1 module; the crate is the one Pingora links.
use boring::asn1::Asn1Time;
use pingora::listeners::TlsAccept;
use pingora::protocols::tls::TlsRef;
use pingora::tls::pkey::{Id, PKey, Private};
use pingora::tls::ssl::{SslAcceptor, SslAlert, SslMethod, SslRef, SslVerifyError, SslVerifyMode};
use pingora::tls::x509::{X509Ref, X509};
use pingora::upstreams::peer::HttpPeer;
use pingora::utils::tls::CertKey;

use crate::identity::{PublicKey, TlsLeaf};
use crate::session::TlsAcceptor;

/// SNI every node sends; only there so that Pingora verifies the pinned chain.
pub const MESH_SNI: &str = "arknet";

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("mesh TLS: {0}")]
pub struct TlsError(String);

fn tls_err(what: &str) -> impl Fn(pingora::tls::error::ErrorStack) -> TlsError + '_ {
    move |e| TlsError(format!("{what}: {e}"))
}

/// The verified identity of a mesh client, attached to its TLS session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerIdentity(pub PublicKey);

/// The Ed25519 identity a chain proves, if it is valid: some certificate in `chain` is a
/// self-signed Ed25519 certificate that signed `leaf`.
pub fn identity_of(leaf: &X509Ref, chain: &[&X509Ref]) -> Option<PublicKey> {
    chain.iter().find_map(|id_cert| {
        let key = id_cert.public_key().ok()?;
        if key.id() != Id::ED25519 {
            return None;
        }
        let self_signed = id_cert.verify(&key).ok()?;
        let issued_leaf = leaf.verify(&key).ok()?;
        if !(self_signed && issued_leaf) {
            return None;
        }
        let mut raw = [0u8; 32];
        let bytes = key.raw_public_key(&mut raw).ok()?;
        Some(PublicKey::from_bytes(bytes.try_into().ok()?))
    })
}

/// Clock difference between two nodes tolerated when checking a certificate's validity period.
pub const CLOCK_SKEW_SECS: i64 = 300;

/// Whether `cert` is within its validity period at `now` (Unix seconds), give or take
/// [`CLOCK_SKEW_SECS`].
pub fn valid_at(cert: &X509Ref, now: i64) -> bool {
    let (Ok(early), Ok(late)) = (
        Asn1Time::from_unix(now.saturating_add(CLOCK_SKEW_SECS) as _),
        Asn1Time::from_unix(now.saturating_sub(CLOCK_SKEW_SECS) as _),
    ) else {
        return false;
    };
    // Not yet valid even if our clock were `skew` ahead; expired even if it were behind.
    let started = cert.not_before().compare(&early).is_ok_and(|o| o.is_le());
    let not_over = cert.not_after().compare(&late).is_ok_and(|o| o.is_ge());
    started && not_over
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The identity a TLS session's peer proved (server side: the leaf plus the chain it sent).
/// The custom verify callback replaces BoringSSL's own chain checks, validity periods
/// included, so they are checked here.
fn session_identity(ssl: &SslRef) -> Option<PublicKey> {
    let leaf = ssl.peer_certificate()?;
    let now = unix_now();
    if !valid_at(&leaf, now) {
        return None;
    }
    let chain: Vec<&X509Ref> = ssl
        .peer_cert_chain()
        .map(|c| c.iter().collect())
        .unwrap_or_default();
    let key = identity_of(&leaf, &chain)?;
    // The identity certificate itself must be current too (it is the one that signed the leaf).
    let identity_current = chain
        .iter()
        .any(|c| valid_at(c, now) && identity_of(&leaf, &[*c]) == Some(key));
    identity_current.then_some(key)
}

struct IdentityCallbacks;

#[async_trait]
impl TlsAccept for IdentityCallbacks {
    async fn handshake_complete_callback(
        &self,
        ssl: &TlsRef,
    ) -> Option<Arc<dyn Any + Send + Sync>> {
        session_identity(ssl).map(|k| Arc::new(PeerIdentity(k)) as Arc<dyn Any + Send + Sync>)
    }
}

/// This node's TLS material, parsed once.
pub struct MeshTls {
    leaf: X509,
    identity: X509,
    key: PKey<Private>,
    client_cert: Arc<CertKey>,
    /// Source address for outgoing mesh connections: the mesh listener's IP when it is a
    /// specific one, so that a node we dial can dial us back at the address it saw.
    bind_ip: Option<std::net::IpAddr>,
}

impl MeshTls {
    /// Parses a leaf issued by this node's identity; outgoing connections leave from
    /// `listen_ip` when it is not the wildcard address.
    pub fn new(leaf: &TlsLeaf, listen_ip: std::net::IpAddr) -> Result<Self, TlsError> {
        let cert = X509::from_pem(leaf.cert_pem.as_bytes()).map_err(tls_err("leaf certificate"))?;
        let identity = X509::from_pem(leaf.identity_pem.as_bytes())
            .map_err(tls_err("identity certificate"))?;
        let key =
            PKey::private_key_from_pem(leaf.key_pem.as_bytes()).map_err(tls_err("leaf key"))?;
        let client_cert = Arc::new(CertKey::new(
            vec![cert.clone(), identity.clone()],
            key.clone(),
        ));
        Ok(MeshTls {
            leaf: cert,
            identity,
            key,
            client_cert,
            bind_ip: (!listen_ip.is_unspecified()).then_some(listen_ip),
        })
    }

    /// The listener's acceptor: our chain, a requested client certificate, identity extraction
    /// (Mozilla's intermediate profile, as Pingora's own listener uses).
    pub fn server_acceptor(&self) -> Result<TlsAcceptor, TlsError> {
        let mut builder = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls())
            .map_err(tls_err("TLS acceptor"))?;
        builder
            .set_certificate(&self.leaf)
            .map_err(tls_err("set certificate"))?;
        builder
            .add_extra_chain_cert(self.identity.clone())
            .map_err(tls_err("add identity to chain"))?;
        builder
            .set_private_key(&self.key)
            .map_err(tls_err("set key"))?;
        builder.set_custom_verify_callback(SslVerifyMode::PEER, |ssl| {
            match ssl.peer_certificate() {
                // No certificate: let the request through to a clear 403 at the HTTP layer.
                None => Ok(()),
                Some(_) if session_identity(ssl).is_some() => Ok(()),
                Some(_) => Err(SslVerifyError::Invalid(SslAlert::BAD_CERTIFICATE)),
            }
        });
        Ok(TlsAcceptor {
            acceptor: builder.build(),
            callbacks: Box::new(IdentityCallbacks),
        })
    }

    /// An upstream peer for the node whose identity certificate is `pin`, at `addr`.
    pub fn peer(&self, addr: SocketAddr, pin: &X509, pin_key: &PublicKey) -> HttpPeer {
        let mut peer = HttpPeer::new(addr, true, MESH_SNI.to_string());
        peer.client_cert_key = Some(self.client_cert.clone());
        peer.options.verify_cert = true;
        peer.options.verify_hostname = false;
        peer.options.ca = Some(Arc::new(vec![pin.clone()].into_boxed_slice()));
        let mut h = std::collections::hash_map::DefaultHasher::new();
        pin_key.hash(&mut h);
        peer.group_key = h.finish();
        self.bind(&mut peer);
        peer
    }

    fn bind(&self, peer: &mut HttpPeer) {
        if let Some(ip) = self.bind_ip {
            let mut bind = pingora::connectors::l4::BindTo::default();
            bind.addr = Some(SocketAddr::new(ip, 0));
            peer.options.bind_to = Some(bind);
        }
    }

    /// An upstream peer that does not verify the server, for learning an unknown node's claimed
    /// identity (its certificate is then pinned and checked on a second connection).
    pub fn unverified_peer(&self, addr: SocketAddr) -> HttpPeer {
        let mut peer = HttpPeer::new(addr, true, MESH_SNI.to_string());
        peer.client_cert_key = Some(self.client_cert.clone());
        peer.options.verify_cert = false;
        peer.options.verify_hostname = false;
        peer.group_key = u64::MAX;
        self.bind(&mut peer);
        peer
    }
}

/// Parses an identity certificate PEM and returns it with the key it proves (self-signed
/// Ed25519), for pinning.
pub fn parse_identity_cert(pem: &str) -> Option<(X509, PublicKey)> {
    let cert = X509::from_pem(pem.as_bytes()).ok()?;
    let key = identity_of(&cert, &[&cert])?;
    Some((cert, key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    #[test]
    fn a_leaf_issued_by_an_identity_proves_that_identity() {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = Identity::load_or_create(dir.path()).expect("identity");
        let leaf = id.issue_tls_leaf().expect("leaf");
        let cert = X509::from_pem(leaf.cert_pem.as_bytes()).expect("leaf pem");
        let idc = X509::from_pem(leaf.identity_pem.as_bytes()).expect("id pem");
        assert_eq!(identity_of(&cert, &[&idc]), Some(id.public_key()));
        assert_eq!(
            parse_identity_cert(&leaf.identity_pem).map(|(_, k)| k),
            Some(id.public_key())
        );
        MeshTls::new(&leaf, "0.0.0.0".parse().expect("ip")).expect("loads into BoringSSL");
    }

    #[test]
    fn a_leaf_from_another_identity_proves_nothing() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        let ia = Identity::load_or_create(a.path()).expect("a");
        let ib = Identity::load_or_create(b.path()).expect("b");
        let leaf_b =
            X509::from_pem(ib.issue_tls_leaf().expect("leaf").cert_pem.as_bytes()).expect("pem");
        let id_a = X509::from_pem(ia.cert_pem().as_bytes()).expect("pem");
        assert_eq!(
            identity_of(&leaf_b, &[&id_a]),
            None,
            "a's identity did not sign b's leaf"
        );
        assert_eq!(identity_of(&leaf_b, &[]), None);
    }
}
