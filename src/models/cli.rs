//! `arknet models pull|list`: the command line side. It asks the running node through its API
//! (`POST /api/pull`, the same path `ollama pull` takes, and `/peers/status`, `/api/tags`), so
//! there is one pull code path, run by the node with its identity; this only draws progress.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pingora::http::RequestHeader;
use pingora::upstreams::peer::HttpPeer;
use serde_json::{json, Value};

use crate::config::UpstreamConfig;
use crate::upstream::Upstream;

/// How often plain (non-terminal) progress lines are printed.
const PLAIN_EVERY: Duration = Duration::from_secs(1);

fn loopback(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    }
}

/// Sends one request to the node's API and hands each body line to `line` as it arrives.
async fn request(
    api: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
    mut line: impl FnMut(&str),
) -> Result<u16, String> {
    let api = loopback(api);
    let err = |e: &dyn std::fmt::Display| format!("node API at {api}: {e}");
    let body = Bytes::from(body.map(|b| b.to_string()).unwrap_or_default());
    let mut req = RequestHeader::build(method, path.as_bytes(), Some(4)).map_err(|e| err(&e))?;
    req.insert_header("host", api.to_string())
        .map_err(|e| err(&e))?;
    req.insert_header("content-type", "application/json")
        .map_err(|e| err(&e))?;
    req.insert_header("content-length", body.len().to_string())
        .map_err(|e| err(&e))?;
    if let Some(t) = token {
        req.insert_header("authorization", format!("Bearer {}", t.trim()))
            .map_err(|e| err(&e))?;
    }
    let timeouts = UpstreamConfig {
        connect_timeout: Duration::from_secs(5),
        first_byte_timeout: Duration::from_secs(600),
        idle_chunk_timeout: Duration::from_secs(600),
        pool_idle: Duration::ZERO,
        models_refresh: Duration::from_secs(1),
    };
    let mut peer = HttpPeer::new(api, false, String::new());
    peer.options.connection_timeout = Some(timeouts.connect_timeout);
    let upstream = Upstream::new(&timeouts);
    let mut rsp = upstream
        .send(&peer, &req, &body)
        .await
        .map_err(|e| err(&e))?;
    let status = rsp.header().status.as_u16();
    let mut pending = Vec::new();
    while let Some(chunk) = rsp.next_chunk().await.map_err(|e| err(&e))? {
        pending.extend_from_slice(&chunk);
        while let Some(i) = pending.iter().position(|b| *b == b'\n') {
            let l: Vec<u8> = pending.drain(..=i).collect();
            line(String::from_utf8_lossy(&l).trim());
        }
    }
    if !pending.is_empty() {
        line(String::from_utf8_lossy(&pending).trim());
    }
    Ok(status)
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

fn mb(n: u64) -> String {
    format!("{:.1} MB", n as f64 / 1_000_000.0)
}

/// Draws progress: a redrawn bar on a terminal, a plain line every few seconds otherwise.
struct Progress {
    tty: bool,
    started: Instant,
    last_plain: Option<Instant>,
    /// Per layer: (total, completed).
    layers: BTreeMap<String, (u64, u64)>,
    first_completed: Option<u64>,
    peers: BTreeMap<String, u64>,
}

impl Progress {
    fn new() -> Self {
        Progress {
            tty: std::io::stderr().is_terminal(),
            started: Instant::now(),
            last_plain: None,
            layers: BTreeMap::new(),
            first_completed: None,
            peers: BTreeMap::new(),
        }
    }

    fn event(&mut self, v: &Value) {
        let mut err = std::io::stderr().lock();
        if let (Some(digest), Some(total)) = (v["digest"].as_str(), v["total"].as_u64()) {
            let completed = v["completed"].as_u64().unwrap_or(0);
            let layer_total = total;
            if self.layers.get(digest) == Some(&(total, completed)) && completed == total {
                // A finished layer is reported once.
                return;
            }
            self.layers.insert(digest.to_string(), (total, completed));
            if let Some(peers) = v["arknet"]["peers"].as_object() {
                for (p, n) in peers {
                    // Per layer the node reports its running count; keep the largest seen.
                    let key = format!("{digest} {p}");
                    self.peers.insert(key, n.as_u64().unwrap_or(0));
                }
            }
            let total: u64 = self.layers.values().map(|l| l.0).sum();
            let done: u64 = self.layers.values().map(|l| l.1).sum();
            let base = *self.first_completed.get_or_insert(done);
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            let rate = done.saturating_sub(base) as f64 / secs;
            let eta = if rate > 0.0 {
                format!("{:.0}s", total.saturating_sub(done) as f64 / rate)
            } else {
                "?".into()
            };
            let mut by_peer: BTreeMap<&str, u64> = BTreeMap::new();
            for (k, n) in &self.peers {
                let peer = k.split_once(' ').map_or(k.as_str(), |(_, p)| p);
                *by_peer.entry(peer).or_default() += n;
            }
            let moved: u64 = by_peer.values().sum::<u64>().max(1);
            let split: Vec<String> = by_peer
                .iter()
                .map(|(p, n)| format!("{p} {:.0}%", *n as f64 * 100.0 / moved as f64))
                .collect();
            let text = format!(
                "{} / {}  {}/s  ETA {eta}  {}",
                mb(done),
                mb(total),
                mb(rate as u64),
                split.join(", ")
            );
            if self.tty {
                let width = 30usize;
                let filled = (done as f64 / total.max(1) as f64 * width as f64) as usize;
                let bar: String =
                    "#".repeat(filled.min(width)) + &".".repeat(width - filled.min(width));
                let _ = write!(err, "\r\x1b[2K[{bar}] {text}");
            } else if completed == layer_total
                || self.last_plain.is_none_or(|t| t.elapsed() >= PLAIN_EVERY)
            {
                self.last_plain = Some(Instant::now());
                let _ = writeln!(err, "progress: {text}");
            }
        } else if let Some(status) = v["status"].as_str() {
            if self.tty {
                let _ = writeln!(err);
            }
            let _ = writeln!(err, "{status}");
        }
        let _ = err.flush();
    }
}

/// `arknet models pull MODEL [--from NODE]`: the summary line on success.
pub fn pull(api: SocketAddr, model: &str, from: Option<&str>) -> Result<String, String> {
    let body = json!({
        "model": model,
        "stream": true,
        "arknet": { "from": from, "grid_only": true },
    });
    let mut progress = Progress::new();
    let mut last = Value::Null;
    let mut error = None;
    let status =
        runtime()?.block_on(request(api, "POST", "/api/pull", None, Some(&body), |l| {
            let Ok(v) = serde_json::from_str::<Value>(l) else {
                return;
            };
            if let Some(e) = v["error"].as_str() {
                error = Some(e.to_string());
                return;
            }
            progress.event(&v);
            last = v;
        }))?;
    if let Some(e) = error {
        return Err(e);
    }
    if status != 200 || last["status"] != "success" {
        return Err(format!(
            "the node answered {status} without finishing the pull"
        ));
    }
    let s = &last["arknet"];
    let peers: Vec<String> = s["peers"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(p, n)| format!("{p} {}", mb(n.as_u64().unwrap_or(0))))
        .collect();
    Ok(format!(
        "pulled {model}: {} total, {} downloaded ({}), {} already here; installed in {}",
        mb(s["total"].as_u64().unwrap_or(0)),
        mb(s["downloaded"].as_u64().unwrap_or(0)),
        if peers.is_empty() {
            "from no peer".to_string()
        } else {
            peers.join(", ")
        },
        mb(s["reused"].as_u64().unwrap_or(0)),
        s["installed"].as_str().unwrap_or("?"),
    ))
}

/// `arknet models list`: the node's own models, and which peers offer which for pulling.
pub fn list(api: SocketAddr, token: Option<&str>) -> Result<String, String> {
    let rt = runtime()?;
    let mut tags = String::new();
    let status = rt.block_on(request(api, "GET", "/api/tags", token, None, |l| {
        tags.push_str(l)
    }))?;
    if status != 200 {
        return Err(format!("/api/tags answered {status}: {tags}"));
    }
    let mut peers = String::new();
    let status = rt.block_on(request(api, "GET", "/peers/status", token, None, |l| {
        peers.push_str(l)
    }))?;
    if status != 200 {
        return Err(format!("/peers/status answered {status}: {peers}"));
    }
    let tags: Value = serde_json::from_str(&tags).map_err(|e| e.to_string())?;
    let peers: Value = serde_json::from_str(&peers).map_err(|e| e.to_string())?;
    let mut out = String::from("local models:\n");
    let local: Vec<&str> = tags["models"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["arknet"]["local"] != false)
        .filter_map(|m| m["name"].as_str())
        .collect();
    if local.is_empty() {
        out.push_str("  (none)\n");
    }
    for m in local {
        out.push_str(&format!("  {m}\n"));
    }
    let mut offers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in peers["peers"].as_array().into_iter().flatten() {
        let id = p["node_id"].as_str().unwrap_or("?").to_string();
        for m in p["models_pullable_by_us"].as_array().into_iter().flatten() {
            if let Some(m) = m.as_str() {
                offers.entry(m.to_string()).or_default().push(id.clone());
            }
        }
    }
    out.push_str("offered by peers (arknet models pull MODEL):\n");
    if offers.is_empty() {
        out.push_str("  (none)\n");
    }
    for (m, ids) in offers {
        out.push_str(&format!("  {m}  from {}\n", ids.join(", ")));
    }
    Ok(out.trim_end().to_string())
}
