//! The packaged install path (scripts/install.sh, conf/arknet.service) as root on this machine:
//! install into a temporary prefix with a user of its own, check the unit with
//! `systemd-analyze`, run the unit's ExecStart as that user (systemd itself is absent here),
//! re-install without losing config edits, uninstall. The user is deleted even if the test
//! fails; the files live in a temporary dir.

mod support;

use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::grid::{assert_eventually, free_port, loopback_ip, ARKNET};
use support::http;
use support::process::{run_bounded, signal, Output};

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout == b"0\n")
}

/// The temporary install: its paths, and a user deleted on drop.
struct Install {
    dir: tempfile::TempDir,
    user: String,
}

impl Install {
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn script(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("bash");
        cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install.sh"))
            .args(args)
            .env("BIN", ARKNET)
            .env("PREFIX", self.path("usr"))
            .env("SYSCONFDIR", self.path("etc"))
            .env("DATA_DIR", self.path("data"))
            .env("UNITDIR", self.path("systemd"))
            .env("DEBUGDIR", self.path("debug"))
            .env("ARKNET_USER", &self.user)
            .env("NO_START", "1");
        run_bounded(cmd, Duration::from_secs(120))
    }
}

impl Drop for Install {
    fn drop(&mut self) {
        let _ = Command::new("userdel")
            .arg(&self.user)
            .stderr(Stdio::null())
            .status();
    }
}

/// A process started from the unit's ExecStart, ended by its own PID.
struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn user_exists(user: &str) -> bool {
    Command::new("id")
        .arg(user)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `readelf -S -W`: the section table, one section a line, names never shortened.
fn section_names(elf: &Path) -> String {
    let out = Command::new("readelf")
        .args(["-S", "-W"])
        .arg(elf)
        .output()
        .expect("readelf (binutils)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The size of one section of an ELF file, from `readelf -S -W`.
fn section_size(elf: &Path, name: &str) -> u64 {
    let text = section_names(elf);
    // `[Nr] Name Type Address Off Size ...`; the index may be written `[ 1]`, so columns are
    // counted from the name.
    text.lines()
        .filter_map(|line| line.split_once(']').map(|(_, rest)| rest))
        .map(|rest| rest.split_whitespace().collect::<Vec<_>>())
        .find(|cols| cols.first() == Some(&name))
        .and_then(|cols| cols.get(4).and_then(|s| u64::from_str_radix(s, 16).ok()))
        .unwrap_or_else(|| panic!("no section {name} in {}:\n{text}", elf.display()))
}

#[test]
fn install_script_installs_a_service_that_runs_as_its_user() {
    if !is_root() {
        eprintln!("\n!!!!! SKIPPED: the install test creates a system user and needs root; nothing was tested !!!!!\n");
        return;
    }
    let install = Install {
        dir: tempfile::tempdir().expect("tempdir"),
        user: format!("arkt{}", std::process::id() % 1_000_000),
    };
    // The service user must be able to reach its files under the (root-only) temp dir.
    std::fs::set_permissions(install.dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");

    let out = install.script(&[]);
    assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
    eprintln!("{}", out.stdout);
    assert!(user_exists(&install.user));

    // The installed binary: no DWARF, symbols kept, a debuglink to the split-off debug info.
    let bin = install.path("usr/bin/arknet");
    let sections = section_names(&bin);
    assert!(
        !sections.contains(".debug_info")
            && !sections.contains(".debug_line")
            && sections.contains(".gnu_debuglink"),
        "{sections}"
    );
    assert!(sections.contains(".symtab"), "symbols stay for backtraces");
    let debug = install.path(&format!(
        "debug{}/bin/arknet.debug",
        install.path("usr").display()
    ));
    assert!(
        section_names(&debug).contains(".debug_line"),
        "{}",
        debug.display()
    );
    // What was split off is what left: the built binary had DWARF, and the installed one is
    // smaller by at least the debug file's line tables.
    assert!(section_names(Path::new(ARKNET)).contains(".debug_line"));
    let original = std::fs::metadata(ARKNET).expect("binary").len();
    let installed = std::fs::metadata(&bin).expect("installed").len();
    let line_tables = section_size(&debug, ".debug_line");
    assert!(
        line_tables > 0 && installed + line_tables <= original,
        "installed {installed} bytes + {line_tables} of line tables vs built {original}"
    );

    let config = install.path("etc/arknet/arknet.toml");
    let meta = std::fs::metadata(&config).expect("config installed");
    assert_eq!(meta.permissions().mode() & 0o777, 0o640);
    let data_meta = std::fs::metadata(install.path("data")).expect("data dir");
    assert_eq!(data_meta.permissions().mode() & 0o777, 0o750);
    assert_ne!(
        data_meta.uid(),
        0,
        "the data dir belongs to the service user"
    );

    let unit_path = install.path("systemd/arknet.service");
    let unit = std::fs::read_to_string(&unit_path).expect("unit installed");
    assert!(
        unit.contains(&format!("\nUser={}\n", install.user)),
        "{unit}"
    );
    let exec_start = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    assert!(
        exec_start.starts_with(&bin.display().to_string())
            && exec_start.contains(&config.display().to_string()),
        "{exec_start}"
    );

    // The hardening, checked by systemd's own tools (the unit is not run by systemd here).
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_path)
        .output()
        .expect("systemd-analyze (Debian package systemd; scripts/deps.sh installs it)");
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=25"])
        .arg(&unit_path)
        .output()
        .expect("systemd-analyze security");
    let report = String::from_utf8_lossy(&security.stdout);
    assert!(security.status.success(), "exposure above 2.5:\n{report}");
    for line in [
        "✓ NoNewPrivileges=",
        "✓ ProtectSystem=",
        "✓ CapabilityBoundingSet=~CAP_SYS_ADMIN",
    ] {
        assert!(report.contains(line), "{line} missing:\n{report}");
    }

    // Run the unit's command as its user. Options a test needs on top: its own loopback
    // address, and no mDNS (the shipped config turns it on for a LAN).
    let ip = loopback_ip();
    let api = SocketAddr::from((ip, free_port(ip)));
    let mesh = SocketAddr::from((ip, free_port(ip)));
    let argv: Vec<&str> = exec_start.split_whitespace().collect();
    let child = Command::new("setpriv")
        .args([
            &format!("--reuid={}", install.user),
            &format!("--regid={}", install.user),
            "--init-groups",
            "--",
        ])
        .args(&argv)
        .args(["--no-mdns", "--listen", &api.to_string()])
        .args(["--mesh-listen", &mesh.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(install.path("serve.log")).expect("log"))
        .spawn()
        .expect("setpriv (util-linux)");
    let mut service = Service(child);
    let log = || std::fs::read_to_string(install.path("serve.log")).unwrap_or_default();
    assert_eventually(
        Duration::from_secs(20),
        "the service answers /health",
        || {
            assert!(
                service.0.try_wait().expect("try_wait").is_none(),
                "the service exited:\n{}",
                log()
            );
            let probe = b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
            http::try_send_raw(api, probe, Duration::from_secs(2)).is_ok_and(|r| r.status == 200)
        },
    );
    let key = std::fs::metadata(install.path("data/identity/node.key")).expect("identity");
    assert_eq!(key.uid(), data_meta.uid(), "created by the service user");
    assert_eq!(key.permissions().mode() & 0o777, 0o600);
    // SIGTERM, as systemctl stop sends: a clean exit within TimeoutStopSec.
    assert!(signal(service.0.id(), "TERM"));
    assert_eventually(
        Duration::from_secs(15),
        "the service stops on SIGTERM",
        || service.0.try_wait().expect("try_wait").is_some(),
    );

    // Re-installing keeps the owner's config edits.
    let edited = std::fs::read_to_string(&config).expect("config") + "\n# edited by the owner\n";
    std::fs::write(&config, &edited).expect("edit config");
    let out = install.script(&[]);
    assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
    assert_eq!(std::fs::read_to_string(&config).expect("config"), edited);

    let out = install.script(&["--uninstall"]);
    assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
    assert!(!bin.exists() && !unit_path.exists() && !debug.exists());
    assert!(!user_exists(&install.user), "the user is removed");
    assert!(config.exists(), "config is kept");
}
