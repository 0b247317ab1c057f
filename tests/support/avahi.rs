//! A real avahi-daemon inside one namespace of a test LAN, with its own dbus-daemon, for
//! interoperability checks (`avahi-browse`, `avahi-publish`). Nothing is shared with the host:
//! the bus lives at a private socket, avahi's runtime dir is a private bind mount.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use super::netns::{Host, NsProc, LAN_IF};

pub struct Avahi {
    _dbus: NsProc,
    _daemon: NsProc,
    bus: String,
    dir: tempfile::TempDir,
}

impl Avahi {
    /// Starts dbus and avahi in `host`, or panics with what is missing (`.ci/run` installs
    /// avahi-daemon, avahi-utils and dbus).
    pub fn start(host: &Host) -> Avahi {
        for bin in [
            "/usr/sbin/avahi-daemon",
            "/usr/bin/avahi-browse",
            "/usr/bin/dbus-daemon",
        ] {
            assert!(
                std::path::Path::new(bin).exists(),
                "{bin} missing: apt-get install avahi-daemon avahi-utils dbus"
            );
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let socket = d.join("bus");
        std::fs::write(
            d.join("bus.conf"),
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/><allow own="*"/><allow send_destination="*"/><allow receive_sender="*"/>
  </policy>
</busconfig>
"#,
                socket.display()
            ),
        )
        .expect("bus.conf");
        std::fs::write(
            d.join("avahi.conf"),
            format!(
                "[server]\nuse-ipv4=yes\nuse-ipv6=no\nallow-interfaces={LAN_IF}\nenable-dbus=yes\nratelimit-interval-usec=0\n\
                 [wide-area]\nenable-wide-area=no\n[publish]\npublish-addresses=yes\npublish-hinfo=no\npublish-workstation=no\n"
            ),
        )
        .expect("avahi.conf");
        std::fs::create_dir_all(d.join("run")).expect("run dir");
        std::fs::create_dir_all("/run/avahi-daemon").expect("mount point");
        let bus = format!("unix:path={}", socket.display());
        let dbus = NsProc::spawn(
            host,
            std::path::Path::new("dbus-daemon"),
            &[
                &format!("--config-file={}", d.join("bus.conf").display()),
                "--nofork",
                "--nopidfile",
            ],
            d.join("dbus.log"),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "dbus did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        // avahi keeps its pid file and socket in the fixed /run/avahi-daemon: give it a private
        // one through a bind mount in its own mount namespace (unshare and sh exec in place, so
        // the PID is avahi's).
        let script = format!(
            "mount --bind {} /run/avahi-daemon && exec avahi-daemon --no-chroot --no-drop-root --no-rlimits -f {}",
            d.join("run").display(),
            d.join("avahi.conf").display()
        );
        let mut daemon_cmd = host.command("unshare");
        daemon_cmd
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .env("DBUS_SYSTEM_BUS_ADDRESS", &bus);
        let log = d.join("avahi.log");
        let child =
            super::child::spawn_into_log(&mut daemon_cmd, &log, false).expect("spawn avahi-daemon");
        let daemon = NsProc { child, log };
        let avahi = Avahi {
            _dbus: dbus,
            _daemon: daemon,
            bus,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let out = avahi.run(host, "avahi-browse", &["-t", "-p", "_arknet._tcp"]);
            if out.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "avahi did not come up: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(avahi.dir.path().join("avahi.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        avahi
    }

    fn command(&self, host: &Host, program: &str) -> Command {
        let mut c = host.command(program);
        c.env("DBUS_SYSTEM_BUS_ADDRESS", &self.bus);
        c
    }

    /// Runs an avahi client in the namespace and waits for it.
    pub fn run(&self, host: &Host, program: &str, args: &[&str]) -> Output {
        self.command(host, program)
            .args(args)
            .output()
            .expect("avahi client")
    }

    /// `avahi-browse -t -r -p _arknet._tcp` until `found` accepts its output (bounded).
    pub fn browse_until(
        &self,
        host: &Host,
        within: Duration,
        found: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + within;
        loop {
            let out = self.run(host, "avahi-browse", &["-t", "-r", "-p", "_arknet._tcp"]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if found(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "avahi-browse never showed it; last output:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Publishes a `_arknet._tcp` record until the returned process is dropped.
    pub fn publish(&self, host: &Host, name: &str, port: u16, txt: &[String]) -> NsProc {
        let log: PathBuf = self.dir.path().join(format!("publish-{name}.log"));
        let port = port.to_string();
        let mut c = self.command(host, "avahi-publish");
        c.args(["-s", name, "_arknet._tcp", &port]).args(txt);
        let child = super::child::spawn_into_log(&mut c, &log, false).expect("avahi-publish");
        NsProc { child, log }
    }
}
