//! An HTTPS client for the registry (the node, the CLI and the tests use it): the registry's
//! certificate is checked against a CA file, and every answer's signature is verified before
//! its body is trusted.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pingora::tls::x509::X509;
use pingora::upstreams::peer::HttpPeer;

use super::record::{answer_signed_bytes, verify};
use super::server::{KEY_HEADER, SIGNATURE_HEADER};
use crate::config::UpstreamConfig;
use crate::identity::PublicKey;
use crate::upstream::Upstream;

/// A verified answer from the registry.
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Body bytes.
    pub body: Vec<u8>,
    /// The key that signed it.
    pub registry_key: PublicKey,
}

impl Answer {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// A client for one registry URL.
pub struct RegistryClient {
    upstream: Upstream,
    peer: HttpPeer,
    authority: String,
    pinned: Option<PublicKey>,
    url: String,
}

impl RegistryClient {
    /// A client for `url` (`https://host:port`), trusting the CAs in `ca_file` (the system's
    /// when `None`), and requiring answers signed by `pinned` when given. Resolves the host
    /// once, preferring IPv4.
    pub fn new(
        url: &str,
        ca_file: Option<&Path>,
        pinned: Option<PublicKey>,
    ) -> Result<Self, String> {
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| format!("registry url `{url}`: must start with https://"))?;
        let authority = rest.trim_end_matches('/').to_string();
        if authority.contains('/') {
            return Err(format!("registry url `{url}`: no path expected"));
        }
        let host = match authority.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => h.trim_matches(['[', ']']).to_string(),
            _ => return Err(format!("registry url `{url}`: expected https://host:port")),
        };
        let mut addrs: Vec<SocketAddr> = authority
            .to_socket_addrs()
            .map_err(|e| format!("registry url `{url}`: {e}"))?
            .collect();
        addrs.sort_by_key(|a| !a.is_ipv4());
        let addr = *addrs
            .first()
            .ok_or_else(|| format!("registry url `{url}`: host has no address"))?;
        let mut peer = HttpPeer::new(addr, true, host);
        peer.options.verify_cert = true;
        peer.options.verify_hostname = true;
        peer.options.connection_timeout = Some(Duration::from_secs(5));
        peer.options.total_connection_timeout = Some(Duration::from_secs(10));
        if let Some(path) = ca_file {
            let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let certs = X509::stack_from_pem(&pem)
                .map_err(|e| format!("{}: not PEM certificates: {e}", path.display()))?;
            peer.options.ca = Some(Arc::new(certs.into_boxed_slice()));
        }
        let timeouts = UpstreamConfig {
            connect_timeout: Duration::from_secs(5),
            first_byte_timeout: Duration::from_secs(30),
            idle_chunk_timeout: Duration::from_secs(30),
            pool_idle: Duration::from_secs(30),
            models_refresh: Duration::from_secs(15),
        };
        Ok(RegistryClient {
            upstream: Upstream::new(&timeouts),
            peer,
            authority,
            pinned,
            url: url.to_string(),
        })
    }

    /// The registry's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// One request; the answer must carry a valid registry signature (and the pinned key).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Answer, String> {
        let body = Bytes::copy_from_slice(body.unwrap_or_default());
        let mut req = pingora::http::RequestHeader::build(method, path.as_bytes(), Some(4))
            .map_err(|e| e.to_string())?;
        for (name, value) in [
            ("host", self.authority.clone()),
            ("content-type", "application/json".to_string()),
            ("content-length", body.len().to_string()),
            ("accept", "application/json".to_string()),
        ] {
            req.insert_header(name, value).map_err(|e| e.to_string())?;
        }
        let mut rsp = self
            .upstream
            .send(&self.peer, &req, &body)
            .await
            .map_err(|e| e.to_string())?;
        let status = rsp.header().status.as_u16();
        let header = |name: &str| {
            rsp.header()
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let key = header(KEY_HEADER);
        let signature = header(SIGNATURE_HEADER);
        let mut out = Vec::new();
        while let Some(chunk) = rsp.next_chunk().await.map_err(|e| e.to_string())? {
            if out.len() + chunk.len() > 16 * 1024 * 1024 {
                return Err("registry answer larger than 16 MiB".into());
            }
            out.extend_from_slice(&chunk);
        }
        self.upstream.release(rsp).await;
        let key: PublicKey = key
            .ok_or("registry answer not signed (no key header)")?
            .parse()
            .map_err(|e| format!("registry key header: {e}"))?;
        if self.pinned.is_some_and(|p| p != key) {
            return Err(format!(
                "registry answer signed by {key}, not the pinned key"
            ));
        }
        verify(
            &key,
            &answer_signed_bytes(&out),
            signature.as_deref().unwrap_or_default(),
        )
        .map_err(|e| format!("registry answer signature: {e}"))?;
        Ok(Answer {
            status,
            body: out,
            registry_key: key,
        })
    }
}
