//! The node's side of the public registry: publish a signed record of this node, heartbeat
//! it, withdraw it, and read other nodes' records. Records are signed with the node's identity
//! key; every answer's registry signature is checked by [`RegistryClient`].

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::registry::client::{Answer, RegistryClient};
use crate::registry::record::{DeleteRequest, Record, Signer};
use crate::registry::store::Listed;

/// A sequence number no earlier write of this key can have reached: milliseconds since the
/// epoch, and above the last one this process used. Needs no state on disk, so a restarted
/// node's first write is above everything it wrote before (clocks going back by more than the
/// time between two writes is what NTP prevents).
pub fn next_seq(last: &AtomicU64) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let prev = last.fetch_max(now, Ordering::SeqCst);
    if prev >= now {
        last.fetch_add(1, Ordering::SeqCst) + 1
    } else {
        now
    }
}

fn unix_now() -> u64 {
    crate::registry::server::unix_now()
}

/// This node as the registry sees it.
pub struct Publisher {
    /// The node id.
    pub node_id: String,
    /// The node's identity key.
    pub signer: Signer,
    /// Where other nodes dial the mesh (`ip:port`).
    pub endpoint: String,
    /// Models the owner chose to advertise.
    pub models: Vec<String>,
    /// Lifetime of each record, seconds.
    pub ttl: u64,
    /// The registry.
    pub client: RegistryClient,
    seq: AtomicU64,
}

impl Publisher {
    /// A publisher for this node.
    pub fn new(
        node_id: String,
        signer: Signer,
        endpoint: String,
        models: Vec<String>,
        ttl: u64,
        client: RegistryClient,
    ) -> Self {
        Publisher {
            node_id,
            signer,
            endpoint,
            models,
            ttl,
            client,
            seq: AtomicU64::new(0),
        }
    }

    /// Registers (or heartbeats) a freshly signed record; the answer tells whether the
    /// registry reached the endpoint.
    pub async fn register(&self) -> Result<Answer, String> {
        let now = unix_now();
        let signed = Record {
            node_id: self.node_id.clone(),
            public_key: self.signer.public_key().to_string(),
            endpoint: self.endpoint.clone(),
            models: self.models.clone(),
            seq: next_seq(&self.seq),
            issued_at: now,
            expires: now + self.ttl,
        }
        .sign(&self.signer);
        let body = serde_json::to_vec(&signed).map_err(|e| e.to_string())?;
        self.client
            .call("POST", "/registry/v1/register", Some(&body))
            .await
    }

    /// Withdraws the record.
    pub async fn deregister(&self) -> Result<Answer, String> {
        let req =
            DeleteRequest::signed(&self.node_id, &self.signer, next_seq(&self.seq), unix_now());
        let body = serde_json::to_vec(&req).map_err(|e| e.to_string())?;
        self.client
            .call("POST", "/registry/v1/delete", Some(&body))
            .await
    }

    /// This node's record as the registry holds it (`None`: not registered or expired).
    pub async fn status(&self) -> Result<Option<Listed>, String> {
        let path = format!(
            "/registry/v1/record?key={}",
            crate::upstream::query_value(&self.signer.public_key().to_string())
        );
        let answer = self.client.call("GET", &path, None).await?;
        match answer.status {
            200 => serde_json::from_slice(&answer.body)
                .map(Some)
                .map_err(|e| e.to_string()),
            404 => Ok(None),
            s => Err(format!("registry answered {s}: {}", answer.json())),
        }
    }
}

/// Every listed record, all pages, checking each record's own signature (the registry signs
/// the answer; the node's signature shows the registry did not alter the record).
pub async fn fetch_all(client: &RegistryClient, max_pages: usize) -> Result<Vec<Listed>, String> {
    let mut out = Vec::new();
    let mut after = String::new();
    for _ in 0..max_pages {
        let path = format!(
            "/registry/v1/records?limit=500&after={}",
            crate::upstream::query_value(&after)
        );
        let answer = client.call("GET", &path, None).await?;
        if answer.status != 200 {
            return Err(format!(
                "registry answered {}: {}",
                answer.status,
                answer.json()
            ));
        }
        #[derive(serde::Deserialize)]
        struct Page {
            records: Vec<Listed>,
            next: Option<String>,
        }
        let page: Page = serde_json::from_slice(&answer.body).map_err(|e| e.to_string())?;
        for l in page.records {
            let Ok(key) = l.signed.record.public_key.parse() else {
                continue;
            };
            let genuine = crate::registry::record::verify(
                &key,
                &l.signed.record.canonical(),
                &l.signed.signature,
            );
            if genuine.is_ok() {
                out.push(l);
            } else {
                tracing::warn!(public_key = %key, "registry served a record its key did not sign; ignored");
            }
        }
        match page.next {
            Some(n) => after = n,
            None => break,
        }
    }
    Ok(out)
}

/// `arknet registry status` / `deregister` for `node`: (success, text to print).
pub async fn cli(
    node: &crate::Node,
    url: &str,
    ca_file: Option<&Path>,
    deregister: bool,
) -> Result<(bool, String), String> {
    let client = RegistryClient::new(url, ca_file, None)?;
    let signer = Signer::from_pkcs8_pem(node.identity().key_pem())?;
    let publisher = Publisher::new(
        node.node_id().to_string(),
        signer,
        String::new(),
        Vec::new(),
        0,
        client,
    );
    if deregister {
        let answer = publisher.deregister().await?;
        let ok = answer.status == 200;
        return Ok((ok, pretty(&answer.json())));
    }
    match publisher.status().await? {
        Some(l) => {
            let r = &l.signed.record;
            let now = unix_now();
            Ok((
                true,
                format!(
                    "registry: {url} (key {})\nnode_id: {}\npublic_key: {}\nendpoint: {}\nmodels: {}\nseq: {}\nissued_at: {}\nexpires: {} (in {} s)\nreachable from the registry: {}",
                    publisher.client_key().await.unwrap_or_default(),
                    r.node_id,
                    r.public_key,
                    r.endpoint,
                    if r.models.is_empty() { "(none)".to_string() } else { r.models.join(", ") },
                    r.seq,
                    r.issued_at,
                    r.expires,
                    r.expires.saturating_sub(now),
                    if l.reachable { "yes (listed)" } else { "no (not listed)" },
                ),
            ))
        }
        None => Ok((
            false,
            format!("registry: {url}\nthis node has no live record there"),
        )),
    }
}

impl Publisher {
    fn client_url(&self) -> &str {
        self.client.url()
    }

    async fn client_key(&self) -> Option<String> {
        self.client
            .call("GET", "/registry/v1/info", None)
            .await
            .ok()
            .map(|a| a.registry_key.to_string())
    }
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

/// The registry discovery source, run by Pingora as a background service: registers this
/// node, heartbeats at a third of the TTL (jittered), fetches the listed nodes and proves each
/// one's key with a pinned mutual-TLS hello before reporting it as a sighting; withdraws the
/// record at shutdown.
pub struct RegistryDiscovery {
    /// This node in the registry.
    pub publisher: Publisher,
    /// Period of peer fetches.
    pub fetch_interval: std::time::Duration,
    /// Proves listed keys (a mismatch is counted as a spoof and dropped).
    pub client: std::sync::Arc<crate::mesh::client::MeshClient>,
    /// Where sightings go.
    pub peers: std::sync::Arc<crate::peers::PeerTable>,
    /// Set once the record was withdrawn at shutdown, so the process may exit.
    pub stopped: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Registry look-ups stop after this many pages (500 records each) per fetch.
const MAX_PAGES: usize = 20;
/// Pinned hellos to registry-listed nodes in flight at once.
const PROVING_AT_ONCE: usize = 16;
/// Registry-listed nodes proved (and so listed as pending) per IP address and fetch. Anyone can
/// register many keys behind one machine's ports; a household behind one public address has a
/// few nodes.
pub const MAX_LISTED_PER_ADDRESS: usize = 4;

/// The registry-listed nodes worth a hello, in the registry's order: not ourselves, key and
/// endpoint well-formed, at most [`MAX_LISTED_PER_ADDRESS`] per IP address.
pub fn to_prove(
    listed: Vec<Listed>,
    own: &crate::identity::PublicKey,
) -> Vec<(crate::identity::PublicKey, std::net::SocketAddr)> {
    let mut per_address = std::collections::HashMap::new();
    listed
        .into_iter()
        .filter_map(|l| {
            let r = l.signed.record;
            let key = r.public_key.parse::<crate::identity::PublicKey>().ok()?;
            let addr = r.endpoint.parse::<std::net::SocketAddr>().ok()?;
            (key != *own).then_some((key, addr))
        })
        .filter(|(_, addr)| {
            let n = per_address.entry(addr.ip()).or_insert(0usize);
            *n += 1;
            *n <= MAX_LISTED_PER_ADDRESS
        })
        .collect()
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for RegistryDiscovery {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        tracing::info!(
            registry = %self.publisher.client_url(),
            endpoint = %self.publisher.endpoint,
            models = ?self.publisher.models,
            "registry discovery started"
        );
        let heartbeat = std::time::Duration::from_secs((self.publisher.ttl / 3).max(1));
        let mut beat_at = tokio::time::Instant::now();
        let mut fetch_at = tokio::time::Instant::now();
        // Whether a registration was ever sent: the registry may hold our record even when the
        // answer was lost or the latest heartbeat failed, so shutdown withdraws it whenever one
        // may exist.
        let mut attempted = false;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(beat_at) => {
                    // A failed registration is retried sooner than a heartbeat.
                    attempted = true;
                    let registered = self.beat().await;
                    let next = if registered { heartbeat } else { heartbeat.min(std::time::Duration::from_secs(5)) };
                    beat_at = tokio::time::Instant::now() + super::jittered(next);
                }
                _ = tokio::time::sleep_until(fetch_at) => {
                    self.fetch().await;
                    fetch_at = tokio::time::Instant::now() + super::jittered(self.fetch_interval);
                }
                _ = shutdown.changed() => break,
            }
        }
        if attempted {
            match tokio::time::timeout(
                std::time::Duration::from_secs(3),
                self.publisher.deregister(),
            )
            .await
            {
                Ok(Ok(a)) if a.status == 200 => tracing::info!("registry record withdrawn"),
                Ok(Ok(a)) if a.status == 404 => tracing::debug!("no registry record to withdraw"),
                Ok(Ok(a)) => {
                    tracing::warn!(status = a.status, answer = %a.json(), "registry refused the withdrawal")
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "registry withdrawal failed"),
                Err(_) => tracing::warn!("registry withdrawal timed out"),
            }
        }
        self.stopped.store(true, Ordering::SeqCst);
    }
}

impl RegistryDiscovery {
    async fn beat(&self) -> bool {
        match self.publisher.register().await {
            Ok(a) if a.status == 200 => {
                let v = a.json();
                let reach = &v["reachability"];
                if reach["reachable"].as_bool() == Some(true) {
                    tracing::debug!(expires = %v["expires"], "registry heartbeat accepted");
                } else {
                    tracing::warn!(detail = %reach["detail"], "registered, but the registry could not reach this node: not listed");
                }
                true
            }
            Ok(a) => {
                tracing::warn!(status = a.status, answer = %a.json(), "registry refused our record");
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "registry unreachable");
                false
            }
        }
    }

    async fn fetch(&self) {
        let listed = match fetch_all(&self.publisher.client, MAX_PAGES).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "registry look-up failed");
                return;
            }
        };
        let own = self.publisher.signer.public_key();
        // A registry may list thousands of records (or a hostile one, any addresses it likes):
        // the node proves them a few at a time, never dialling them all at once.
        let dials = std::sync::Arc::new(tokio::sync::Semaphore::new(PROVING_AT_ONCE));
        let mut proving = tokio::task::JoinSet::new();
        for (key, addr) in to_prove(listed, &own) {
            let client = self.client.clone();
            let dials = dials.clone();
            proving.spawn(async move {
                let _dial = dials.acquire_owned().await;
                (key, addr, client.hello(addr, Some(&key)).await)
            });
        }
        while let Some(done) = proving.join_next().await {
            let Ok((key, addr, verdict)) = done else {
                continue;
            };
            match verdict {
                // The pinned hello proved the key: now it is a candidate, pending approval.
                Ok(hello) => self.peers.sighted(
                    hello.key,
                    crate::peers::Source::Registry,
                    hello.node_id,
                    Some(addr.to_string()),
                ),
                // Spoofs are counted by the client; the unreachable are tried next fetch.
                Err(e) => {
                    tracing::debug!(public_key = %key, %addr, error = %e, "registry-listed node not proven")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::record::SignedRecord;

    #[test]
    fn at_most_a_few_listed_nodes_per_address_are_proved_and_never_ourselves() {
        let signer = |n: u8| Signer::from_seed(&[n; 32]).expect("seed");
        let listed = |n: u8, endpoint: &str| Listed {
            signed: SignedRecord {
                record: Record {
                    node_id: format!("ark-{n}"),
                    public_key: signer(n).public_key().to_string(),
                    endpoint: endpoint.into(),
                    models: vec![],
                    seq: 1,
                    issued_at: 1,
                    expires: 2,
                },
                signature: String::new(),
            },
            reachable: true,
        };
        let mut all: Vec<Listed> = (1..=7)
            .map(|n| listed(n, &format!("203.0.113.9:{}", 9000 + u16::from(n))))
            .collect();
        all.push(listed(8, "198.51.100.2:8911"));
        all.push(listed(9, "not an endpoint"));
        all.push(listed(10, "[2001:db8::1]:8911"));
        all.push(listed(11, "203.0.113.10:8911"));
        let own = signer(2).public_key();
        let proved = to_prove(all, &own);
        let shown: Vec<String> = proved.iter().map(|(_, a)| a.to_string()).collect();
        assert_eq!(
            shown,
            [
                "203.0.113.9:9001",
                "203.0.113.9:9003",
                "203.0.113.9:9004",
                "203.0.113.9:9005",
                "198.51.100.2:8911",
                "[2001:db8::1]:8911",
                "203.0.113.10:8911"
            ]
        );
        assert!(proved.iter().all(|(k, _)| *k != own));
        assert_eq!(proved[0].0, signer(1).public_key());
    }

    #[test]
    fn seq_is_strictly_increasing_even_within_a_millisecond() {
        let last = AtomicU64::new(0);
        let mut prev = 0;
        for _ in 0..10_000 {
            let s = next_seq(&last);
            assert!(s > prev, "{s} after {prev}");
            prev = s;
        }
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(crate::upstream::query_value("a+b/c="), "a%2Bb%2Fc%3D");
    }
}
