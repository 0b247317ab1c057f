//! A real PostgreSQL server for one test: `initdb` in a temp dir, `postgres` on a loopback port,
//! both as the unprivileged `nobody` (PostgreSQL refuses to run as root), stopped by its PID.
//! Nothing is installed here: the Debian `postgresql` package comes from `scripts/deps.sh test`,
//! and a machine without it fails the test with that message rather than skipping it.

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::grid::free_port;
use super::process::run_bounded;

const UID: u32 = 65534;
const GID: u32 = 65534;

/// A running PostgreSQL server.
pub struct Postgres {
    /// `postgres://postgres@127.0.0.1:PORT/postgres?sslmode=disable`.
    pub url: String,
    pub port: u16,
    child: Option<Child>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// The newest `/usr/lib/postgresql/<version>/bin` holding `initdb` and `postgres`.
fn bin_dir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").exists() && bin.join("postgres").exists()).then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b).unwrap_or_else(|| {
        panic!(
            "PostgreSQL server binaries not found under /usr/lib/postgresql: install the Debian \
             package `postgresql` (scripts/deps.sh test does)"
        )
    })
}

fn as_nobody(program: &Path) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        &format!("--reuid={UID}"),
        &format!("--regid={GID}"),
        "--clear-groups",
        "--",
    ])
    .arg(program);
    cmd
}

impl Postgres {
    pub fn start() -> Postgres {
        let bin = bin_dir();
        let dir = tempfile::tempdir().expect("tempdir");
        // nobody must reach its data dir through the temp dir.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod tempdir");
        let home = dir.path().join("pg");
        std::fs::create_dir(&home).expect("mkdir pg");
        std::os::unix::fs::chown(&home, Some(UID), Some(GID)).expect("chown pg dir");
        let data = home.join("data");
        let mut init = as_nobody(&bin.join("initdb"));
        init.arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"])
            .env("LC_ALL", "C");
        let out = run_bounded(init, Duration::from_secs(120));
        assert!(out.status.success(), "initdb failed: {}", out.stderr);
        let ip = Ipv4Addr::LOCALHOST;
        let port = free_port(ip);
        let log = dir.path().join("postgres.log");
        let mut postgres = as_nobody(&bin.join("postgres"));
        postgres
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", home.display()))
            .args(["-c", "max_connections=100"]);
        let child =
            super::child::spawn_into_log(&mut postgres, &log, false).expect("spawn postgres");
        let mut pg = Postgres {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres?sslmode=disable"),
            port,
            child: Some(child),
            log,
            _dir: dir,
        };
        let ready = bin.join("pg_isready");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = Command::new(&ready)
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                break;
            }
            if let Some(status) = pg.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("postgres exited ({status}): {}", pg.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "postgres not ready: {}",
                pg.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        pg
    }

    /// A fresh database on this server; its URL.
    pub fn create_db(&self, name: &str) -> String {
        let mut cmd = Command::new(bin_dir().join("createdb"));
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
            name,
        ]);
        let out = run_bounded(cmd, Duration::from_secs(30));
        assert!(out.status.success(), "createdb {name}: {}", out.stderr);
        format!(
            "postgres://postgres@127.0.0.1:{}/{name}?sslmode=disable",
            self.port
        )
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGINT: PostgreSQL's fast shutdown; by PID, then reaped (SIGKILL if it lingers).
            let pid = child.id().to_string();
            let _ = Command::new("kill").args(["-INT", &pid]).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
