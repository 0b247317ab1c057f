//! A real `arknet registry serve` process on loopback, with a CA-signed test certificate.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use super::grid::{free_port, spawn_logged};

/// A registry process; killed by its PID when dropped.
pub struct RegistryProc {
    pub addr: SocketAddr,
    /// `https://localhost:PORT` (the certificate names `localhost`).
    pub url: String,
    pub ca_file: PathBuf,
    pub config_path: PathBuf,
    pub data_dir: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

/// A self-signed certificate for `localhost` (it is its own CA file).
pub fn write_cert(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().expect("key");
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("cert params");
    let cert = params.self_signed(&key).expect("self-signed");
    let cert_path = dir.join("registry.crt");
    let key_path = dir.join("registry.key");
    std::fs::write(&cert_path, cert.pem()).expect("write cert");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");
    (cert_path, key_path)
}

impl RegistryProc {
    /// Starts a registry whose config is the defaults for tests plus `extra` TOML lines, with
    /// `database` (None: SQLite in its temp dir).
    pub fn start(extra: &str, database: Option<&str>) -> RegistryProc {
        let dir = tempfile::tempdir().expect("tempdir");
        // `localhost` resolves to 127.0.0.1: the registry listens there.
        let ip = std::net::Ipv4Addr::LOCALHOST;
        let addr = SocketAddr::from((ip, free_port(ip)));
        let (cert, key) = write_cert(dir.path());
        let data_dir = dir.path().join("data");
        let db = database.map_or_else(
            || format!("sqlite:{}", dir.path().join("registry.db").display()),
            str::to_string,
        );
        let config_path = dir.path().join("registry.toml");
        std::fs::write(
            &config_path,
            format!(
                "listen = \"{addr}\"\ndata_dir = \"{}\"\ndatabase = \"{db}\"\n\
                 tls_cert = \"{}\"\ntls_key = \"{}\"\nallow_private = true\n\
                 header_timeout_secs = 1\nthreads = 2\n{extra}\n",
                data_dir.display(),
                cert.display(),
                key.display()
            ),
        )
        .expect("write config");
        let mut r = RegistryProc {
            addr,
            url: format!("https://localhost:{}", addr.port()),
            ca_file: cert,
            config_path,
            data_dir,
            log_path: dir.path().join("registry.log"),
            child: None,
            _dir: dir,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        self.child = Some(spawn_logged(
            &["registry", "serve"],
            &self.config_path,
            &self.log_path,
        ));
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_err()
        {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("registry exited early ({status}); log:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "registry not listening in 20 s; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn client(&self) -> arknet::registry::client::RegistryClient {
        arknet::registry::client::RegistryClient::new(&self.url, Some(&self.ca_file), None)
            .expect("registry client")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .expect("registry running")
    }

    /// SIGKILL by PID, and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kill -9 and start again on the same config and database.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RegistryProc {
    fn drop(&mut self) {
        self.kill();
    }
}
