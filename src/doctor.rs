//! `arknet doctor`: what a node with this config would find on this machine, and what is
//! wrong, in plain words for the owner.
//!
//! It only looks: it binds and releases the listener addresses, asks the configured backends
//! for their model lists and a running node on the API address for `/health`, reads the data
//! dir, and runs `wg show` when WireGuard discovery is on. It never creates the identity or the
//! admin token, never opens a multicast socket, and dials nothing but the configured backends
//! and this machine's own listener addresses.

use std::fmt;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::catalog::{listing_path, parse_listing};
use crate::config::{BackendConfig, Config, UpstreamConfig};
use crate::identity::Identity;
use crate::peers::store::{ApprovedPeers, FILE_NAME as APPROVALS_FILE};
use crate::upstream::{Backend, Upstream};

/// Longest wait for one backend or one local probe: a doctor that hangs helps nobody.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// No clock showing a time before 2025 can be right for a binary of this age; certificates
/// issued at start would be "not yet valid" for peers with a correct clock.
const CLOCK_FLOOR_UNIX: u64 = 1_735_689_600;
/// Models named per backend line before "and N more".
const MODELS_SHOWN: usize = 8;

/// How a finding affects the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Works as configured.
    Ok,
    /// Worth knowing; the node runs.
    Note,
    /// Something the owner has to fix for the node (or this part of it) to work.
    Problem,
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Finding {
    /// Ok, note or problem.
    pub level: Level,
    /// What was examined (`backend`, `mesh port`, ...).
    pub topic: String,
    /// What was found, and for a problem what to do.
    pub text: String,
}

/// Everything the doctor found, in the order it looked.
#[derive(Debug, Default)]
pub struct Report {
    /// The findings.
    pub findings: Vec<Finding>,
}

impl Report {
    fn add(&mut self, level: Level, topic: impl Into<String>, text: impl Into<String>) {
        self.findings.push(Finding {
            level,
            topic: topic.into(),
            text: text.into(),
        });
    }

    /// How many findings are problems.
    pub fn problems(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.level == Level::Problem)
            .count()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for finding in &self.findings {
            let tag = match finding.level {
                Level::Ok => "ok",
                Level::Note => "note",
                Level::Problem => "PROBLEM",
            };
            writeln!(f, "  {tag:<8} {:<13} {}", finding.topic, finding.text)?;
        }
        match self.problems() {
            0 => writeln!(f, "No problems found."),
            1 => writeln!(f, "1 problem found."),
            n => writeln!(f, "{n} problems found."),
        }
    }
}

/// Examines what a node running with `config` (read from `source`, a label) would find.
pub fn examine(config: &Config, source: &str) -> Report {
    let mut r = Report::default();
    r.add(Level::Ok, "config", format!("{source}: valid"));
    if data_dir(config, &mut r) {
        files(config, &mut r);
    }
    listeners(config, &mut r);
    backends(config, &mut r);
    discovery(config, &mut r);
    clock(&mut r);
    r
}

/// Reports on the data dir; true when it exists, so that the files in it can be examined.
fn data_dir(config: &Config, r: &mut Report) -> bool {
    let dir = &config.data_dir;
    let shown = std::path::absolute(dir).unwrap_or_else(|_| dir.clone());
    if dir.is_dir() {
        match writable(dir) {
            Ok(()) => r.add(Level::Ok, "data dir", format!("{} (writable)", shown.display())),
            Err(e) => r.add(
                Level::Problem,
                "data dir",
                format!("{} is not writable ({e}): the node keeps its identity, approvals and audit log there; choose another with --data-dir", shown.display()),
            ),
        }
        true
    } else if dir.exists() {
        r.add(
            Level::Problem,
            "data dir",
            format!("{} exists but is not a directory", shown.display()),
        );
        false
    } else {
        // The first start creates it with its parents: the nearest existing one must let us.
        let parent = shown.ancestors().skip(1).find(|a| a.exists());
        match parent.map(|p| (p, writable(p))) {
            Some((_, Ok(()))) => r.add(
                Level::Note,
                "data dir",
                format!("{} does not exist yet; the first start creates it", shown.display()),
            ),
            Some((p, Err(e))) => r.add(
                Level::Problem,
                "data dir",
                format!("{} does not exist and cannot be created: {} is not writable ({e}); choose another with --data-dir", shown.display(), p.display()),
            ),
            None => r.add(
                Level::Problem,
                "data dir",
                format!("{}: no existing parent directory", shown.display()),
            ),
        }
        false
    }
}

/// The identity, admin token and approvals file in an existing data dir.
fn files(config: &Config, r: &mut Report) {
    let dir = &config.data_dir;
    let key = crate::identity::key_path(dir);
    if key.exists() {
        match Identity::load_or_create(dir) {
            Ok(id) => {
                let node_id = config
                    .node_id
                    .clone()
                    .unwrap_or_else(|| id.default_node_id());
                r.add(
                    Level::Ok,
                    "identity",
                    format!("node {node_id}, public key {}", id.public_key()),
                );
            }
            Err(e) => r.add(Level::Problem, "identity", format!("{e}: the node will not start until the key is readable; it never replaces a damaged key")),
        }
    } else {
        r.add(
            Level::Note,
            "identity",
            format!(
                "none yet; the first start (or `arknet id`) creates {}",
                key.display()
            ),
        );
    }

    let token = config.admin_token_path();
    match std::fs::metadata(&token) {
        Ok(meta) if meta.permissions().mode() & 0o077 != 0 => r.add(
            Level::Problem,
            "admin token",
            format!(
                "{} is readable by other users (mode {:o}); chmod 600 it",
                token.display(),
                meta.permissions().mode() & 0o777
            ),
        ),
        Ok(_) => r.add(
            Level::Ok,
            "admin token",
            format!(
                "{} (mode 600; needed for admin changes not made from this machine's loopback)",
                token.display()
            ),
        ),
        Err(_) => r.add(
            Level::Note,
            "admin token",
            format!(
                "{} does not exist yet; the first start creates it (mode 600)",
                token.display()
            ),
        ),
    }

    let approvals = dir.join(APPROVALS_FILE);
    match ApprovedPeers::load(&approvals) {
        Ok(_) if !approvals.exists() => r.add(
            Level::Ok,
            "approvals",
            format!("{} does not exist yet: no peer approved", approvals.display()),
        ),
        Ok(file) => {
            let names: Vec<&str> = file.peers.iter().map(|p| p.node_id.as_str()).collect();
            r.add(
                Level::Ok,
                "approvals",
                format!(
                    "{} is valid: {} approved peer(s){}{}",
                    approvals.display(),
                    names.len(),
                    if names.is_empty() { "" } else { ": " },
                    names.join(", ")
                ),
            );
        }
        Err(e) => r.add(Level::Problem, "approvals", format!("{e}; a running node keeps the last good approvals and never overwrites this file, so fix it by hand")),
    }
}

fn listeners(config: &Config, r: &mut Report) {
    let running = running_node(config.api_listen);
    match (TcpListener::bind(config.api_listen), &running) {
        (Ok(_), _) => r.add(
            Level::Ok,
            "API port",
            format!("{} is free", config.api_listen),
        ),
        (Err(_), Some(id)) => r.add(
            Level::Note,
            "API port",
            format!(
                "{} is in use by a running arknet node ({id})",
                config.api_listen
            ),
        ),
        (Err(e), None) => r.add(
            Level::Problem,
            "API port",
            format!("cannot listen on {} ({e}): another program has it; stop it or pick another with --listen", config.api_listen),
        ),
    }

    let mesh = config.mesh_listen;
    let who = if mesh.ip().is_unspecified() {
        format!("every interface: peers on the LAN and tunnels can connect to port {} (open it in a firewall if there is one)", mesh.port())
    } else if mesh.ip().is_loopback() {
        "loopback only: peers on other machines cannot connect".to_string()
    } else {
        format!("peers connect to {mesh}")
    };
    match TcpListener::bind(mesh) {
        Ok(_) => r.add(Level::Ok, "mesh port", format!("{mesh} is free; {who}")),
        Err(e) => {
            let local = local_addr(mesh);
            if running.is_some() && TcpStream::connect_timeout(&local, PROBE_TIMEOUT).is_ok() {
                r.add(
                    Level::Note,
                    "mesh port",
                    format!("{mesh} is in use by the running node (it accepts connections); {who}"),
                );
            } else {
                r.add(
                    Level::Problem,
                    "mesh port",
                    format!("cannot listen on {mesh} ({e}); pick another with --mesh-listen"),
                );
            }
        }
    }
}

fn backends(config: &Config, r: &mut Report) {
    if config.backends.is_empty() {
        r.add(
            Level::Note,
            "backend",
            "none configured: this node serves only models its peers share with it",
        );
        return;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            r.add(
                Level::Problem,
                "backend",
                format!("cannot start an async runtime to ask the backends: {e}"),
            );
            return;
        }
    };
    let upstream = Upstream::new(&config.upstream);
    for b in &config.backends {
        let (level, text) = runtime.block_on(backend(&upstream, b, &config.upstream));
        r.add(level, format!("backend {}", b.name), text);
    }
}

/// Asks one backend for its model list, as the node's catalog does.
async fn backend(
    upstream: &Upstream,
    config: &BackendConfig,
    timeouts: &UpstreamConfig,
) -> (Level, String) {
    let b = Backend::new(config.clone(), timeouts);
    let path = b.upstream_path(listing_path(config.kind));
    let asked = tokio::time::timeout(
        PROBE_TIMEOUT,
        upstream.get_json(b.peer(), &config.url.authority, &path),
    )
    .await;
    let what = format!("{} ({})", config.url, config.kind);
    let body = match asked {
        Ok(Ok(body)) => body,
        Ok(Err(e)) => {
            // Pingora's connect errors nest their context; the innermost cause is the plain
            // one ("Connection refused (os error 111)").
            let cause = e.rsplit("cause: ").next().unwrap_or(&e).trim();
            return (
                Level::Problem,
                format!("{what} does not answer {path}: {cause}. Start it, or point the node at a running server: --backend URL [--backend-kind openai|ollama]"),
            );
        }
        Err(_) => {
            return (
                Level::Problem,
                format!(
                    "{what} did not answer {path} within {}s",
                    PROBE_TIMEOUT.as_secs()
                ),
            )
        }
    };
    let Some(models) = parse_listing(config.kind, &body) else {
        return (
            Level::Problem,
            format!(
                "{what} answers {path} but not in the {} shape: is `kind` right?",
                config.kind
            ),
        );
    };
    if models.is_empty() {
        return (
            Level::Note,
            format!("{what} is reachable but lists no models"),
        );
    }
    let names: Vec<&str> = models
        .iter()
        .take(MODELS_SHOWN)
        .map(|m| m.name.as_str())
        .collect();
    let more = models.len().saturating_sub(MODELS_SHOWN);
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    (
        Level::Ok,
        format!(
            "{what} is reachable, {} model(s): {}{more}",
            models.len(),
            names.join(", ")
        ),
    )
}

fn discovery(config: &Config, r: &mut Report) {
    if config.static_peers.is_empty() {
        r.add(Level::Ok, "static peers", "none");
    } else {
        let list: Vec<String> = config.static_peers.iter().map(|p| p.to_string()).collect();
        r.add(
            Level::Ok,
            "static peers",
            format!("dialled at start: {}", list.join(", ")),
        );
    }

    if !config.mdns {
        r.add(
            Level::Ok,
            "mDNS",
            "off: no multicast at all; peers come from static endpoints, WireGuard or approvals with an endpoint",
        );
    } else if config.mdns_interfaces.is_empty() {
        let ifaces = crate::discovery::mdns::default_interfaces();
        if ifaces.is_empty() {
            r.add(Level::Problem, "mDNS", "on, but this machine has no interface besides loopback and tunnels: nobody will see it; use static peers");
        } else {
            r.add(
                Level::Ok,
                "mDNS",
                format!(
                    "on: advertises and browses _arknet._tcp on {}",
                    ifaces.join(", ")
                ),
            );
        }
    } else {
        let missing: Vec<&str> = config
            .mdns_interfaces
            .iter()
            .map(String::as_str)
            .filter(|i| !Path::new("/sys/class/net").join(i).exists())
            .collect();
        if missing.is_empty() {
            r.add(
                Level::Ok,
                "mDNS",
                format!("on, on {}", config.mdns_interfaces.join(", ")),
            );
        } else {
            r.add(
                Level::Problem,
                "mDNS",
                format!(
                    "on, but no such interface: {} (see `ip link`)",
                    missing.join(", ")
                ),
            );
        }
    }

    let Some(iface) = &config.wireguard_interface else {
        r.add(Level::Ok, "WireGuard", "discovery off");
        return;
    };
    match std::process::Command::new("wg")
        .args(["show", iface, "dump"])
        .output()
    {
        Ok(out) if out.status.success() => {
            let peers = crate::discovery::wireguard::parse_dump(&String::from_utf8_lossy(&out.stdout));
            r.add(
                Level::Ok,
                "WireGuard",
                format!("{iface} is readable: {} tunnel peer(s) to probe on the mesh port", peers.len()),
            );
        }
        Ok(out) => r.add(
            Level::Problem,
            "WireGuard",
            format!(
                "`wg show {iface} dump` failed: {}. Reading the peer list needs CAP_NET_ADMIN (see conf/arknet.service) and the interface must exist",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ),
        Err(e) => r.add(
            Level::Problem,
            "WireGuard",
            format!("cannot run `wg` ({e}): install wireguard-tools"),
        ),
    }
}

fn clock(r: &mut Report) {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let shown = crate::timefmt::rfc3339(now);
    if secs < CLOCK_FLOOR_UNIX {
        r.add(
            Level::Problem,
            "clock",
            format!("{shown} is in the past: peers will refuse this node's certificates as not yet valid; set the time (NTP)"),
        );
    } else {
        r.add(Level::Ok, "clock", format!("{shown} (UTC)"));
    }
}

/// Whether files can be created in `dir`. Creating one is the only honest test: permissions,
/// ACLs, read-only mounts and sandboxes all play a part. The probe is removed at once.
fn writable(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".arknet-doctor-probe-{}", std::process::id()));
    std::fs::write(&probe, b"")?;
    std::fs::remove_file(&probe)
}

/// The node id of an arknet node answering `/health` at `addr`, if one does.
fn running_node(addr: SocketAddr) -> Option<String> {
    use std::io::{Read, Write};
    let addr = local_addr(addr);
    let mut s = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).ok()?;
    s.set_read_timeout(Some(PROBE_TIMEOUT)).ok()?;
    write!(
        s,
        "GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    // Bounded: /health is small; a peer that streams forever is not an arknet node.
    s.take(64 * 1024).read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    let health: serde_json::Value = serde_json::from_str(body.trim()).ok()?;
    health["node_id"].as_str().map(str::to_string)
}

/// A listener address as a local client reaches it (the wildcard address via loopback).
fn local_addr(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_counts_problems_and_says_so() {
        let mut r = Report::default();
        r.add(Level::Ok, "config", "fine");
        r.add(Level::Problem, "backend x", "down");
        let text = r.to_string();
        assert_eq!(r.problems(), 1);
        assert!(text.contains("  PROBLEM  backend x     down\n"), "{text}");
        assert!(text.ends_with("1 problem found.\n"), "{text}");
    }

    #[test]
    fn wildcard_listener_is_probed_on_loopback() {
        let a: SocketAddr = "0.0.0.0:8911".parse().expect("addr");
        assert_eq!(local_addr(a).to_string(), "127.0.0.1:8911");
        let b: SocketAddr = "127.0.0.5:1".parse().expect("addr");
        assert_eq!(local_addr(b), b);
    }
}
