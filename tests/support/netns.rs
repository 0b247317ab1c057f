//! A LAN of network namespaces joined by veth pairs on a bridge in a namespace of its own: the
//! only place multicast tests may run (nothing here touches the machine's real interfaces).
//! Everything is created with unique names and deleted on drop, even when the test panics.
//!
//! What one kernel does not do like a LAN of separate machines: every frame of every host
//! crosses the same few CPUs. A veth hands each frame to the per-CPU input backlog
//! (`net.core.netdev_max_backlog`, 1000 frames, one setting for the whole machine, not per
//! namespace), and the bridge floods each multicast or broadcast frame into every other port.
//! With 50 hosts, the ~49 answers to one mDNS query become ~2400 frames within the answer
//! window; the backlog overflows (column 2 of `/proc/net/softnet_stat` counts the drops) and
//! some answers, announcements, ARP requests and TCP segments are lost. On a real LAN each
//! host receives only its own 49 copies. The product must (and does) ride out such losses
//! the way it rides out a lossy Wi-Fi; the harness changes no sysctl to hide them.
//!
//! The other shared limit is the ARP table: one table for all namespaces, whose size limit
//! (`net.ipv4.neigh.default.gc_thresh3`, 1024) exists only in the root namespace. A full mesh of
//! n hosts needs n*(n-1) entries: 32 hosts fit (992), 33 do not, and past that the kernel logs
//! "neighbour: arp_cache: neighbor table overflow!" and drops the packets that needed a new
//! entry: connects fail with "no route", hellos stall. That, not the product, capped the grid
//! at 32 nodes. A real LAN gives each host its own table with n-1 entries, so the harness does
//! what the kernel would do there: every host gets fixed MAC addresses and permanent neighbour
//! entries for the others, which the kernel does not count against that limit.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use super::grid::{assert_eventually, ARKNET};

/// One host of the LAN.
pub struct Host {
    pub ns: String,
    pub ip: Ipv4Addr,
}

/// The LAN; dropping it deletes its namespaces (and with them their interfaces).
pub struct Lan {
    pub hosts: Vec<Host>,
    bridge: String,
}

/// Interface name of each host's LAN port.
pub const LAN_IF: &str = "lan0";

fn ip(args: &[&str]) -> Output {
    Command::new("ip").args(args).output().expect("run ip")
}

fn ok(args: &[&str]) {
    let out = ip(args);
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Lan {
    /// Creates `n` hosts, or returns `None` after a loud message when this machine cannot
    /// (not root, no `ip`, no namespaces). CI runs as root and must not get `None`.
    pub fn create(n: usize) -> Option<Lan> {
        let root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout == b"0\n")
            .unwrap_or(false);
        let probe = format!("arkprobe{}", std::process::id());
        let usable = root && ip(&["netns", "add", &probe]).status.success();
        if !usable {
            eprintln!("\n!!!!! SKIPPED: network-namespace tests need root and `ip netns` (iproute2); nothing was tested !!!!!\n");
            return None;
        }
        ok(&["netns", "del", &probe]);
        let tag = std::process::id() % 100_000;
        let subnet = (std::process::id() % 200 + 20) as u8;
        let bridge = format!("ark{tag}br");
        let mut lan = Lan {
            hosts: Vec::new(),
            bridge: bridge.clone(),
        };
        ok(&["netns", "add", &bridge]);
        ok(&["-n", &bridge, "link", "add", "br0", "type", "bridge"]);
        ok(&["-n", &bridge, "link", "set", "br0", "up"]);
        for i in 0..n {
            let ns = format!("ark{tag}h{i}");
            let port = format!("p{i}");
            let addr = Ipv4Addr::new(10, 77, subnet, i as u8 + 1);
            ok(&["netns", "add", &ns]);
            lan.hosts.push(Host {
                ns: ns.clone(),
                ip: addr,
            });
            ok(&[
                "-n",
                &ns,
                "link",
                "add",
                LAN_IF,
                "address",
                &mac_of(addr),
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                &bridge,
            ]);
            ok(&["-n", &bridge, "link", "set", &port, "master", "br0"]);
            ok(&["-n", &bridge, "link", "set", &port, "up"]);
            ok(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                LAN_IF,
            ]);
            ok(&["-n", &ns, "link", "set", "lo", "up"]);
            ok(&["-n", &ns, "link", "set", LAN_IF, "up"]);
        }
        for h in &lan.hosts {
            let entries: String = lan
                .hosts
                .iter()
                .filter(|o| o.ip != h.ip)
                .map(|o| {
                    format!(
                        "neigh replace {} lladdr {} dev {LAN_IF} nud permanent\n",
                        o.ip,
                        mac_of(o.ip)
                    )
                })
                .collect();
            batch(&h.ns, &entries);
        }
        // mdns-sd only uses interfaces that are up when its daemon starts.
        for h in &lan.hosts {
            assert_eventually(Duration::from_secs(10), "veth up", || {
                String::from_utf8_lossy(&ip(&["-n", &h.ns, "link", "show", LAN_IF]).stdout)
                    .contains("state UP")
            });
        }
        Some(lan)
    }
}

/// The fixed MAC address of the host at `ip` (locally administered, unicast).
fn mac_of(ip: Ipv4Addr) -> String {
    let [_, _, c, d] = ip.octets();
    format!("02:77:00:00:{c:02x}:{d:02x}")
}

/// Runs `ip -batch` inside namespace `ns` with `commands`, one a line.
fn batch(ns: &str, commands: &str) {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ip -batch");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(commands.as_bytes())
        .expect("write ip batch");
    let out = child.wait_with_output().expect("ip -batch");
    assert!(
        out.status.success(),
        "ip -n {ns} -batch: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for Lan {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &h.ns]);
        }
        let _ = ip(&["netns", "del", &self.bridge]);
    }
}

impl Host {
    /// A command run inside this host's namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    /// `curl` inside the namespace against the node's API on the namespace's own loopback.
    pub fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut c = self.command("curl");
        c.args([
            "-sS",
            "--max-time",
            "20",
            "-X",
            method,
            "-w",
            "\n%{http_code}",
        ]);
        if let Some(b) = body {
            c.args(["-H", "content-type: application/json", "--data-binary"])
                .arg(b.to_string());
        }
        c.arg(format!("http://127.0.0.1:8910{path}"));
        let out = c.output().expect("curl in namespace");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (
            code.trim().parse().unwrap_or(0),
            serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
        )
    }
}

/// A process inside a namespace (`ip netns exec` keeps the PID when it execs), killed on drop.
pub struct NsProc {
    pub child: Child,
    pub log: PathBuf,
}

impl NsProc {
    pub fn spawn(host: &Host, program: &Path, args: &[&str], log: PathBuf) -> NsProc {
        let mut cmd = host.command(program);
        cmd.args(args).env("RUST_LOG", "info");
        let child =
            super::child::spawn_into_log(&mut cmd, &log, false).expect("spawn in namespace");
        NsProc { child, log }
    }

    /// Stops the process with SIGTERM (a graceful exit, so mDNS says goodbye) and waits.
    pub fn terminate(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// CPU time (user + system) the process has used so far, from `/proc/<pid>/stat`.
    pub fn cpu_time(&self) -> Duration {
        super::child::cpu_time(self.child.id())
    }
}

impl Drop for NsProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Path of the fake backend example binary (built by `cargo test` next to the test binaries).
pub fn fake_backend_bin() -> PathBuf {
    let arknet = Path::new(ARKNET);
    let dir = arknet.parent().expect("target dir");
    let bin = dir.join("examples").join("fake_backend");
    assert!(
        bin.exists(),
        "{} missing: `cargo test` builds examples; run it via cargo",
        bin.display()
    );
    bin
}

/// `[discovery]` body for mDNS on the LAN port only.
pub const MDNS_ON_LAN: &str = "mdns = true\nmdns_interfaces = [\"lan0\"]";

/// An arknet node inside `host`: API on the namespace's loopback :8910, mesh on :8911, the
/// given `[discovery]` table body, a fake backend serving `models` on the namespace's loopback.
pub struct NsNode {
    pub backend: NsProc,
    pub node: NsProc,
    _dir: tempfile::TempDir,
}

impl NsNode {
    pub fn start(host: &Host, models: &[&str], discovery: &str) -> NsNode {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = NsProc::spawn(
            host,
            &fake_backend_bin(),
            &["127.0.0.1", "11434", &models.join(",")],
            dir.path().join("backend.log"),
        );
        let config = format!(
            "data_dir = {:?}\n[api]\nlisten = \"127.0.0.1:8910\"\nthreads = 1\nshutdown_grace_secs = 2\n\
             [mesh]\nlisten = \"0.0.0.0:8911\"\nhello_interval_secs = 1\n\
             [discovery]\n{discovery}\n\
             [upstream]\nmodels_refresh_secs = 1\n\
             [[backends]]\nname = \"ollama\"\nkind = \"ollama\"\nurl = \"http://127.0.0.1:11434\"\n",
            dir.path().join("data").display().to_string()
        );
        let path = dir.path().join("arknet.toml");
        std::fs::write(&path, config).expect("config");
        let path_s = path.display().to_string();
        let node = NsProc::spawn(
            host,
            Path::new(ARKNET),
            &["serve", "--config", &path_s],
            dir.path().join("arknet.log"),
        );
        let n = NsNode {
            backend,
            node,
            _dir: dir,
        };
        assert_eventually(Duration::from_secs(20), "node in namespace ready", || {
            host.api("GET", "/health", None).0 == 200
        });
        n
    }
}
