//! A real nginx (Debian package) run for one test: its own prefix dir and config, no daemon, no
//! master process, ended by its own PID.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const NGINX: &str = "/usr/sbin/nginx";

/// The shipped snippet for inside `http { }`: the `arknet` upstream.
pub const UPSTREAM_SNIPPET: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/conf/nginx-arknet-upstream.conf"
);
/// The shipped snippet for inside `server { }`: the `/arknet/` location.
pub const LOCATION_SNIPPET: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/conf/nginx-arknet-location.conf"
);

pub struct Nginx {
    child: Child,
    dir: tempfile::TempDir,
    /// Edited copies of the shipped snippets, kept while nginx runs.
    _snippets: Option<tempfile::TempDir>,
}

/// nginx in front of the ArkNet API at `api`, set up as the shipped snippets' comments say:
/// the upstream file `include`d inside `http { }`, the location file `include`d inside each
/// `server { }`, one server per `(listen, strip_prefix)`. The only edits to the shipped files
/// are the upstream address and, for a stripping server, `proxy_pass http://arknet/;`.
pub fn in_front_of_arknet(api: SocketAddr, servers: &[(SocketAddr, bool)]) -> Nginx {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{p}: {e}"));
    let (upstream, location) = (read(UPSTREAM_SNIPPET), read(LOCATION_SNIPPET));
    assert!(
        upstream.contains("inside the `http { ... }` block"),
        "the upstream snippet says where it goes"
    );
    assert!(
        location.contains("inside your\n# `server { ... }` block"),
        "the location snippet says where it goes"
    );
    let snippets = tempfile::tempdir().expect("tempdir");
    let upstream_copy = snippets.path().join("nginx-arknet-upstream.conf");
    let edited = upstream.replace("127.0.0.1:8910", &api.to_string());
    assert_ne!(
        edited, upstream,
        "the shipped upstream points at 127.0.0.1:8910"
    );
    std::fs::write(&upstream_copy, edited).expect("write upstream copy");
    let stripping_copy = snippets.path().join("nginx-arknet-location-stripped.conf");
    let stripped = location.replace("proxy_pass http://arknet;", "proxy_pass http://arknet/;");
    assert_ne!(
        stripped, location,
        "the shipped location uses `proxy_pass http://arknet;`"
    );
    std::fs::write(&stripping_copy, stripped).expect("write stripping copy");
    let mut body = format!("include {};\n", upstream_copy.display());
    for (listen, strip) in servers {
        let include = if *strip {
            stripping_copy.display().to_string()
        } else {
            LOCATION_SNIPPET.to_string()
        };
        body.push_str(&format!(
            "server {{\n listen {listen};\n include {include};\n}}\n"
        ));
    }
    let probe = servers.last().expect("at least one server").0;
    let mut nginx = Nginx::start(&body, probe);
    nginx._snippets = Some(snippets);
    nginx
}

impl Nginx {
    /// Starts nginx with `http_body` inside `http { }` and waits until `probe` accepts TCP.
    /// Panics (never skips) when nginx is not installed: `.ci/run` installs it.
    pub fn start(http_body: &str, probe: SocketAddr) -> Nginx {
        assert!(
            std::path::Path::new(NGINX).exists(),
            "{NGINX} is missing: install Debian's nginx-light (bash .ci/run does)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().display().to_string();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {p}/nginx.pid;\nerror_log {p}/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n access_log off;\n client_body_temp_path {p}/body;\n proxy_temp_path {p}/proxy;\n\
             fastcgi_temp_path {p}/fastcgi;\n uwsgi_temp_path {p}/uwsgi;\n scgi_temp_path {p}/scgi;\n{http_body}\n}}\n"
        );
        let conf_path: PathBuf = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let child = Command::new(NGINX)
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nginx");
        let mut nginx = Nginx {
            child,
            dir,
            _snippets: None,
        };
        super::grid::assert_eventually(Duration::from_secs(10), "nginx listening", || {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                panic!("nginx exited ({status}): {}", nginx.error_log());
            }
            std::net::TcpStream::connect_timeout(&probe, Duration::from_millis(100)).is_ok()
        });
        nginx
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
