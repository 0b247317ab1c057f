//! The admin page (src/admin/page.html) driven in a real headless Chromium: the owner sees a
//! stranger as pending, approves it through the permissions form sharing one model, edits it,
//! and revokes it; the mesh enforces each decision. A second test goes through Nginx at
//! `/arknet/`, where changes need the admin token typed into the page.
//!
//! The browser side is tests/browser/admin_flow.mjs (playwright-core, pinned in
//! tests/browser/package-lock.json, driving Debian's /usr/bin/chromium). It needs Node.js >= 18,
//! npm (the registry, once, for `npm ci`) and the Debian packages `chromium chromium-driver`
//! (`bash .ci/run` installs them). Missing any of these fails the tests; they never skip.
//! Screenshots of every step go to `<target>/admin-page-screenshots/<test>/`.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::fake_backend::{FakeBackend, FakeConfig};
use support::grid::{assert_eventually, free_port, loopback_ip, BackendSpec, NodeProc, NodeSpec};
use support::mesh::{self, As};
use support::nginx::Nginx;
use support::process::try_run_bounded;

/// The browser binary (Debian package `chromium`); `ARKNET_CHROMIUM` overrides it.
const DEFAULT_CHROMIUM: &str = "/usr/bin/chromium";
/// How long one browser step may take before it is killed by its PID.
const STEP_LIMIT: Duration = Duration::from_secs(120);

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// What the browser steps need, checked (and `npm ci` run) once per test binary.
struct Browser {
    chromium: PathBuf,
}

fn browser() -> &'static Browser {
    static BROWSER: OnceLock<Result<Browser, String>> = OnceLock::new();
    match BROWSER.get_or_init(setup_browser) {
        Ok(b) => b,
        Err(e) => panic!("{e}"),
    }
}

fn setup_browser() -> Result<Browser, String> {
    let chromium = std::env::var_os("ARKNET_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CHROMIUM));
    if !chromium.is_file() {
        return Err(format!(
            "{} is missing: the admin page test drives a real Chromium. On Debian install it with\n    \
             apt-get install -y chromium chromium-driver\n(bash .ci/run does), or point \
             ARKNET_CHROMIUM at a Chromium binary.",
            chromium.display()
        ));
    }
    let node = try_run_bounded(
        {
            let mut c = Command::new("node");
            c.arg("--version");
            c
        },
        Duration::from_secs(20),
    )
    .map_err(|e| {
        format!("Node.js is needed to drive the browser (`node --version`: {e}); install Node.js >= 18 and npm (Debian: apt-get install -y nodejs npm)")
    })?;
    let major: u32 = node
        .stdout
        .trim()
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if !node.status.success() || major < 18 {
        return Err(format!(
            "Node.js >= 18 is needed (playwright-core requires it); `node --version` said {:?}",
            node.stdout.trim()
        ));
    }

    // `npm ci` only when node_modules does not already hold the pinned playwright-core.
    let dir = browser_dir();
    let lock: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("package-lock.json"))
            .map_err(|e| format!("tests/browser/package-lock.json: {e}"))?,
    )
    .map_err(|e| format!("tests/browser/package-lock.json: {e}"))?;
    let pinned = lock["packages"]["node_modules/playwright-core"]["version"]
        .as_str()
        .ok_or("tests/browser/package-lock.json does not pin playwright-core")?
        .to_string();
    let installed = std::fs::read_to_string(dir.join("node_modules/playwright-core/package.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<Value>(&s).ok())
        .and_then(|v| v["version"].as_str().map(str::to_string));
    if installed.as_deref() != Some(pinned.as_str()) {
        let started = Instant::now();
        let mut npm = Command::new("npm");
        npm.args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir);
        let out = try_run_bounded(npm, Duration::from_secs(300)).map_err(|e| {
            format!("npm ci in tests/browser: {e}; install npm (Debian: apt-get install -y npm)")
        })?;
        if !out.status.success() {
            return Err(format!(
                "`npm ci` in tests/browser failed ({}): it needs the npm registry the first time.\nstdout:\n{}\nstderr:\n{}",
                out.status, out.stdout, out.stderr
            ));
        }
        eprintln!(
            "tests/browser: npm ci (playwright-core {pinned}) in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(Browser { chromium })
}

/// `<target>/admin-page-screenshots/<test>`, emptied.
fn screenshots_dir(test: &str) -> PathBuf {
    // <target>/<profile>/arknet -> <target>
    let target = Path::new(support::grid::ARKNET)
        .parent()
        .and_then(Path::parent)
        .expect("target dir of the arknet binary");
    let dir = target.join("admin-page-screenshots").join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    eprintln!("admin page screenshots: {}", dir.display());
    dir
}

/// One step of tests/browser/admin_flow.mjs in a fresh browser profile; panics with its output
/// (and the nodes' logs) when the page is not as expected.
fn browser_step(shots: &Path, mut args: Value, logs: &[&NodeProc]) {
    let browser = browser();
    let profile = tempfile::tempdir().expect("browser profile dir");
    let step = args["step"].as_str().expect("step").to_string();
    args["shots"] = json!(shots);
    args["profile"] = json!(profile.path());
    args["chromium"] = json!(browser.chromium);
    let mut cmd = Command::new("node");
    cmd.arg(browser_dir().join("admin_flow.mjs"))
        .arg(args.to_string())
        .current_dir(browser_dir());
    // Loopback only: no proxy from the environment.
    for var in [
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("NO_PROXY", "*").env("no_proxy", "*");
    let started = Instant::now();
    let out =
        try_run_bounded(cmd, STEP_LIMIT).unwrap_or_else(|e| panic!("browser step {step}: {e}"));
    eprint!("{}", out.stdout);
    let node_logs: String = logs
        .iter()
        .map(|n| format!("\n--- node {} log ---\n{}", n.api, n.log()))
        .collect();
    assert!(
        out.status.success(),
        "browser step {step} failed ({}); screenshots in {}\n{}{}",
        out.status,
        shots.display(),
        out.stderr,
        node_logs
    );
    eprintln!(
        "browser step {step}: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

fn node_with_backend(models: &[&str], extra_toml: &str) -> (FakeBackend, NodeProc) {
    let backend = FakeBackend::start_in_thread(IpAddr::V4(loopback_ip()), FakeConfig::both(models));
    let mut spec = NodeSpec::with_backend(BackendSpec::ollama(backend.url()));
    spec.extra_toml.push_str(extra_toml);
    let node = NodeProc::start(&spec);
    (backend, node)
}

/// The sighting of `key` on `node`, once it matches `ready`.
fn wait_for_sighting(
    node: &NodeProc,
    key: &str,
    what: &str,
    ready: impl Fn(&Value) -> bool,
) -> Value {
    let mut found = Value::Null;
    assert_eventually(Duration::from_secs(10), what, || {
        found = node.get("/peers/discovered").json()["peers"]
            .as_array()
            .and_then(|p| p.iter().find(|s| s["public_key"] == key).cloned())
            .unwrap_or(Value::Null);
        ready(&found)
    });
    found
}

fn approval_of(node: &NodeProc, node_id: &str) -> Option<Value> {
    node.get("/peers/approved").json()["peers"]
        .as_array()
        .and_then(|p| p.iter().find(|a| a["node_id"] == node_id).cloned())
}

#[test]
fn owner_approves_edits_and_revokes_a_peer_through_the_page() {
    browser(); // fail before starting anything when the browser cannot run
    let shots = screenshots_dir("approve_edit_revoke");
    let local_models = ["llama3.1:8b", "qwen3.5:35b"];
    let (backend_a, a) = node_with_backend(&local_models, "");
    // B knows A's address (a static peer, as `--peer` would give it): it says hello to A every
    // second, announcing its node id and mesh port, like any real node.
    let (_backend_b, b) = node_with_backend(
        &["mistral"],
        &format!("\n[discovery]\nstatic = [\"{}\"]\n", a.mesh),
    );
    let (b_id, b_key) = (b.node_id(), b.public_key());
    // B's owner already trusts A and shares one model with it.
    b.approve(&a, &["mistral"], 1);
    let as_b = As::node(&b);

    // A stranger is refused, before any backend is touched, and listed as pending.
    let (status, body) = mesh::chat(a.mesh, as_b.as_ref(), "llama3.1:8b");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("peer_not_approved"), "{body}");
    let sighting = wait_for_sighting(&a, &b_key, "B pending on A with its node id", |s| {
        s["state"] == "pending" && s["node_id"] == b_id.as_str() && s["endpoint"].is_string()
    });
    // Where A saw B's connection come from: B's source address plus its announced mesh port.
    // B does not bind its outgoing connections to its mesh address, so on this one-host grid
    // (every node on its own 127.x address) that is 127.0.0.1, where nothing listens; on a LAN
    // it is B's address. The owner corrects it in the form, as the page allows.
    let seen_at = sighting["endpoint"].as_str().expect("endpoint").to_string();
    let endpoint = b.mesh.to_string();
    assert_eq!(backend_a.hits(), 0);

    let peer = json!({"node_id": b_id, "public_key": b_key, "endpoint": seen_at});
    let url = format!("http://{}/", a.api);
    browser_step(
        &shots,
        json!({
            "step": "approve", "prefix": "1-", "url": url, "self_node_id": a.node_id(),
            "peer": peer, "local_models": local_models, "share": ["llama3.1:8b"],
            "name": "Ark B", "endpoint": endpoint, "expect_shared_with_us": ["mistral"],
        }),
        &[&a, &b],
    );
    let approval = approval_of(&a, &b_id).expect("B approved on A");
    assert_eq!(approval["public_key"], b_key.as_str(), "{approval}");
    assert_eq!(approval["name"], "Ark B", "{approval}");
    assert_eq!(approval["endpoint"], endpoint.as_str(), "{approval}");
    assert_eq!(
        approval["permissions"],
        json!({"can_request_inference": true, "can_pull_models": false,
               "models_shared": ["llama3.1:8b"], "max_concurrent_requests": 1}),
        "{approval}"
    );

    // What the page granted is what the mesh enforces.
    let (status, body) = mesh::chat(a.mesh, as_b.as_ref(), "llama3.1:8b");
    assert_eq!(status, 200, "{body}");
    assert_eq!(backend_a.hits(), 1);
    let (status, body) = mesh::chat(a.mesh, as_b.as_ref(), "qwen3.5:35b");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("not shared with you"), "{body}");
    assert_eq!(backend_a.hits(), 1);

    browser_step(
        &shots,
        json!({
            "step": "edit", "prefix": "2-", "url": url, "self_node_id": a.node_id(),
            "peer": peer, "local_models": local_models, "share": ["llama3.1:8b"],
            "max_concurrent": 2,
        }),
        &[&a, &b],
    );
    let approval = approval_of(&a, &b_id).expect("B still approved on A");
    assert_eq!(
        approval["permissions"]["max_concurrent_requests"], 2,
        "{approval}"
    );
    assert_eq!(
        approval["permissions"]["models_shared"],
        json!(["llama3.1:8b"]),
        "{approval}"
    );

    browser_step(
        &shots,
        json!({
            "step": "revoke", "prefix": "3-", "url": url, "self_node_id": a.node_id(),
            "peer": peer, "expect_audit": [{"model": "llama3.1:8b", "status": 200}],
            "also_url": format!("http://{}/admin", a.api),
        }),
        &[&a, &b],
    );
    assert!(approval_of(&a, &b_id).is_none(), "B revoked on A");
    let (status, body) = mesh::chat(a.mesh, as_b.as_ref(), "llama3.1:8b");
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        backend_a.hits(),
        1,
        "nothing after the revocation reached the backend"
    );
}

/// The shipped Nginx snippets, included as their comments say, prefix kept, pointed at `api`.
fn nginx_in_front(api: SocketAddr, listen: SocketAddr) -> Nginx {
    support::nginx::in_front_of_arknet(api, &[(listen, false)])
}

#[test]
fn through_nginx_the_page_needs_the_admin_token_and_warns_about_a_corrupt_approvals_file() {
    browser();
    let shots = screenshots_dir("nginx_token_and_banner");
    let (_backend, a) = node_with_backend(&["llama3.1:8b"], "");
    // A peer approved earlier (from the node itself, no token needed there).
    let (peer_id, peer_key) = ("dave-ark", "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=");
    let rsp = a.post(
        "/peers/approve",
        &json!({"node_id": peer_id, "public_key": peer_key, "name": "Dave's Ark",
                "permissions": {"models_shared": ["llama3.1:8b"]}}),
    );
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    let ip = loopback_ip();
    let front = SocketAddr::from((ip, free_port(ip)));
    let _nginx = nginx_in_front(a.api, front);
    let url = format!("http://{front}/arknet/");
    let token = std::fs::read_to_string(a.data_dir.join("admin.token"))
        .expect("admin.token in the data dir")
        .trim()
        .to_string();

    browser_step(
        &shots,
        json!({
            "step": "token", "prefix": "1-", "url": url, "self_node_id": a.node_id(),
            "peer": {"node_id": peer_id, "public_key": peer_key},
            "admin_token": token,
            "expect_401_message": "Authorization: Bearer <token>",
        }),
        &[&a],
    );
    assert!(
        approval_of(&a, peer_id).is_none(),
        "revoked through nginx with the token"
    );

    // A hand edit breaks the approvals file: the page says so, with the parser's error.
    let file = a.data_dir.join("approved_peers.json");
    let good = std::fs::read_to_string(&file).expect("approved_peers.json");
    std::fs::write(&file, "{ \"peers\": [ oops").expect("corrupt the file");
    assert_eventually(
        Duration::from_secs(5),
        "/status reports the file invalid",
        || a.get("/status").json()["approvals_file"]["valid"] == false,
    );
    let error = a.get("/status").json()["approvals_file"]["error"]
        .as_str()
        .expect("error text")
        .to_string();
    let shown = error.chars().take(30).collect::<String>();
    browser_step(
        &shots,
        json!({"step": "banner", "prefix": "2-", "url": url, "expect_visible": true, "expect_text": shown, "preset_token": token}),
        &[&a],
    );
    std::fs::write(&file, good).expect("restore the file");
    assert_eventually(
        Duration::from_secs(5),
        "/status reports the file valid",
        || a.get("/status").json()["approvals_file"]["valid"] == true,
    );
    browser_step(
        &shots,
        json!({"step": "banner", "prefix": "3-", "url": url, "expect_visible": false, "preset_token": token}),
        &[&a],
    );
}

/// The attacker's page: fetch() and a `text/plain` form against the node's admin API.
const HOSTILE_PAGE: &str = r#"<!doctype html><html><head><title>cute cats</title></head><body>
<pre id="report"></pre>
<form id="f" method="POST" action="TARGET/peers/approve" enctype="text/plain" target="sink">
<input name='{"node_id":"form-mallory","public_key":"AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=","x":"' value='"}'>
</form>
<iframe name="sink"></iframe>
<script>
const T = "TARGET";
const out = [];
const log = (s) => { out.push(s); document.getElementById("report").textContent = out.join("\n"); };
(async () => {
  const body = JSON.stringify({node_id: "fetch-mallory", public_key: "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=", endpoint: "127.0.0.1:1"});
  try { await fetch(T + "/peers/approve", {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"}, body}); log("simple POST: sent"); }
  catch (e) { log("simple POST: " + e.name); }
  try { const r = await fetch(T + "/peers/approve", {method: "POST", headers: {"Content-Type": "application/json"}, body}); log("JSON POST: status " + r.status); }
  catch (e) { log("JSON POST: blocked (" + e.name + ")"); }
  try { const r = await fetch(T + "/peers/approved"); log("read: " + (await r.text()).slice(0, 200)); }
  catch (e) { log("read: blocked (" + e.name + ")"); }
  document.getElementById("f").submit();
  log("form: submitted");
  await new Promise((r) => setTimeout(r, 1500));
  const d = document.createElement("div"); d.id = "done"; document.body.appendChild(d);
})();
</script></body></html>"#;

/// Serves `page` for every request on a fresh loopback address, until the test ends.
fn serve_page(page: String) -> SocketAddr {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind((loopback_ip(), 0)).expect("bind page server");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                page.len()
            );
            let _ = conn.write_all(head.as_bytes());
            let _ = conn.write_all(page.as_bytes());
        }
    });
    addr
}

/// Requests the node answered on admin routes with `status`, from its metrics.
fn admin_answers(node: &NodeProc, status: u16) -> f64 {
    let want = format!("status=\"{status}\"");
    node.get("/metrics")
        .text()
        .lines()
        .filter(|l| {
            l.starts_with("arknet_http_requests_total{")
                && l.contains("route=\"admin\"")
                && l.contains(&want)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_hostile_page_in_the_owners_browser_changes_and_reads_nothing() {
    let (_backend, node) = node_with_backend(&["llama3.1:8b"], "");
    let target = format!("http://{}", node.api);
    let evil = serve_page(HOSTILE_PAGE.replace("TARGET", &target));
    let shots = screenshots_dir("hostile_page");
    let served_before = admin_answers(&node, 200);
    browser_step(
        &shots,
        json!({
            "step": "attack",
            "url": format!("{target}/"),
            "evil_url": format!("http://{evil}/"),
            "rebind_url": format!("http://evil.example:{}/peers/approved", node.api.port()),
            "resolver_rules": format!("MAP evil.example {}", node.api.ip()),
        }),
        &[&node],
    );
    assert_eq!(
        admin_answers(&node, 200),
        served_before,
        "an admin call from the page succeeded"
    );
    let approved = node.get("/peers/approved").json();
    assert_eq!(
        approved["peers"],
        json!([]),
        "the page approved someone: {approved}"
    );
    assert!(
        node.get("/peers/discovered").json()["peers"]
            .as_array()
            .is_none_or(|p| p.is_empty()),
        "no endpoint was dialled"
    );
    // The attempts did reach the node (the browser sent them) and were refused there.
    assert!(
        admin_answers(&node, 403) >= 2.0,
        "the simple POST and the form were refused with 403"
    );
    assert!(
        admin_answers(&node, 421) >= 1.0,
        "the rebound name was refused with 421"
    );
}
