//! Speaking to a node's mesh listener as a given identity, with curl (a real TLS client).
//! The server is not verified here (`-k`): these helpers test the *server's* checks.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Client credentials: `None` means no client certificate at all.
#[derive(Clone, Debug)]
pub struct As {
    pub key: PathBuf,
    pub chain: PathBuf,
}

impl As {
    pub fn node(node: &super::grid::NodeProc) -> Option<As> {
        let (key, chain) = node.tls_files();
        Some(As { key, chain })
    }

    /// A throwaway identity made by `arknet id` in `dir` plus a leaf issued at node start: the
    /// only way to get a leaf is to run `serve`, so this runs `arknet id` and then issues one
    /// through a short-lived node. Callers normally use a real node instead.
    pub fn from_dir(dir: &Path) -> As {
        let id = dir.join("identity");
        As {
            key: id.join("tls.key"),
            chain: id.join("tls-chain.crt"),
        }
    }
}

/// An Ollama-dialect chat for `model`, not streamed, sent to the mesh listener `mesh` as `who`:
/// the request every permission test makes.
pub fn chat(mesh: SocketAddr, who: Option<&As>, model: &str) -> (u16, String) {
    let body = serde_json::json!({
        "model": model, "messages": [{"role": "user", "content": "hi"}], "stream": false
    });
    call(mesh, who, "POST", "/api/chat", Some(&body.to_string()))
}

/// One request; returns (status, body). Status 0 means curl got no HTTP answer (TLS refused).
pub fn call(
    mesh: SocketAddr,
    who: Option<&As>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "-k",
        "--max-time",
        "20",
        "-X",
        method,
        "-w",
        "\n%{http_code}",
    ]);
    if let Some(a) = who {
        cmd.arg("--cert").arg(&a.chain).arg("--key").arg(&a.key);
    }
    if let Some(b) = body {
        cmd.args(["-H", "content-type: application/json", "--data-binary", b]);
    }
    cmd.arg(format!("https://{mesh}{path}"));
    let out = cmd.output().expect("run curl");
    parse(&String::from_utf8_lossy(&out.stdout))
}

fn parse(stdout: &str) -> (u16, String) {
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", stdout));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Many requests in one curl process (`--next`), for large matrices: each item is
/// (method, path, body); returns one status per item in order.
pub fn batch(
    mesh: SocketAddr,
    who: Option<&As>,
    items: &[(&str, &str, Option<String>)],
) -> Vec<u16> {
    let mut cmd = Command::new("curl");
    for (i, (method, path, body)) in items.iter().enumerate() {
        if i > 0 {
            cmd.arg("--next");
        }
        cmd.args([
            "-s",
            "-k",
            "--max-time",
            "20",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}\n",
            "-X",
            method,
        ]);
        if let Some(a) = who {
            cmd.arg("--cert").arg(&a.chain).arg("--key").arg(&a.key);
        }
        if let Some(b) = body {
            cmd.args(["-H", "content-type: application/json", "--data-binary", b]);
        }
        cmd.arg(format!("https://{mesh}{path}"));
    }
    let out = cmd.output().expect("run curl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().parse().unwrap_or(0))
        .collect()
}
