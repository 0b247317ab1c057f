//! The registry's own config file (`conf/registry.toml`), validated like the node's: unknown
//! keys are errors, and every error names the file, the line and the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::config::{line_of, parse_toml, read_config, ConfigError, ConnectionLimits};

use super::record::Policy;

/// Config file `arknet registry serve` reads when `--config` is not given and it exists.
pub const DEFAULT_REGISTRY_CONFIG: &str = "conf/registry.toml";

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8443))
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("data/registry")
}
fn default_database() -> Spanned<String> {
    Spanned::new(0..0, "sqlite:data/registry/registry.db".into())
}
fn default_true() -> bool {
    true
}
fn default_ttl() -> u64 {
    600
}
fn default_window() -> u64 {
    300
}
fn default_body() -> usize {
    16 * 1024
}
fn default_header_timeout() -> u64 {
    5
}
fn default_per_key() -> u32 {
    30
}
fn default_per_addr() -> u32 {
    120
}
fn default_log_level() -> String {
    "info".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRegistryConfig {
    #[serde(default = "default_listen")]
    listen: SocketAddr,
    #[serde(default = "default_data_dir")]
    data_dir: PathBuf,
    #[serde(default = "default_database")]
    database: Spanned<String>,
    tls_cert: Spanned<PathBuf>,
    tls_key: Spanned<PathBuf>,
    #[serde(default)]
    allow_private: bool,
    #[serde(default = "default_ttl")]
    max_ttl_secs: u64,
    #[serde(default = "default_window")]
    clock_window_secs: u64,
    #[serde(default = "default_body")]
    max_body_bytes: usize,
    #[serde(default = "default_header_timeout")]
    header_timeout_secs: u64,
    #[serde(default = "default_per_key")]
    writes_per_key_per_minute: u32,
    #[serde(default = "default_per_addr")]
    writes_per_address_per_minute: u32,
    #[serde(default = "default_true")]
    reachability_check: bool,
    #[serde(default = "default_log_level")]
    log_level: String,
    #[serde(default)]
    threads: Option<usize>,
}

/// The validated registry configuration.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// HTTPS listener.
    pub listen: SocketAddr,
    /// Where the registry's identity (its signing key) lives.
    pub data_dir: PathBuf,
    /// `sqlite:PATH` or `postgres://...`.
    pub database: String,
    /// PEM certificate chain served to clients.
    pub tls_cert: PathBuf,
    /// PEM private key of that certificate.
    pub tls_key: PathBuf,
    /// Write rules (routability, clock window, TTL, sizes).
    pub policy: Policy,
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
    /// Connection timeouts (short header deadline).
    pub connections: ConnectionLimits,
    /// Writes one key may make per minute.
    pub writes_per_key_per_minute: u32,
    /// Writes one source address may make per minute.
    pub writes_per_address_per_minute: u32,
    /// Dial each record's endpoint over mutual TLS before listing it.
    pub reachability_check: bool,
    /// Default tracing filter.
    pub log_level: String,
    /// Worker threads; `None`: one per core.
    pub threads: Option<usize>,
}

impl RegistryConfig {
    /// Reads and validates `path`; relative paths in it are relative to the working directory,
    /// as the node's are.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::parse(&read_config(path)?, path)
    }

    /// Validates `text` as if read from `path`; also checks that the certificate and key files
    /// can be read, so `--check` catches what `serve` would fail on.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let file: FileRegistryConfig = parse_toml(text, path)?;
        let invalid =
            |key: &str, span: std::ops::Range<usize>, message: String| ConfigError::Invalid {
                path: path.to_path_buf(),
                line: if span.is_empty() && span.start == 0 {
                    0
                } else {
                    line_of(text, span.start)
                },
                key: key.to_string(),
                message,
            };
        let db = file.database.get_ref();
        let scheme_ok = db.starts_with("postgres://")
            || db.starts_with("postgresql://")
            || db.strip_prefix("sqlite:").is_some_and(|p| !p.is_empty());
        if !scheme_ok {
            return Err(invalid(
                "database",
                file.database.span(),
                format!("`{db}`: expected sqlite:PATH or postgres://user@host/db"),
            ));
        }
        for (key, spanned) in [("tls_cert", &file.tls_cert), ("tls_key", &file.tls_key)] {
            let p = spanned.get_ref();
            if let Err(e) = std::fs::read(p) {
                return Err(invalid(
                    key,
                    spanned.span(),
                    format!("{}: {e}", p.display()),
                ));
            }
        }
        if file.max_ttl_secs == 0 || file.clock_window_secs == 0 {
            let key = if file.max_ttl_secs == 0 {
                "max_ttl_secs"
            } else {
                "clock_window_secs"
            };
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                line: line_of(text, text.find(key).unwrap_or(0)),
                key: key.into(),
                message: "must be above 0".into(),
            });
        }
        if let Err(message) = crate::config::check_log_level(&file.log_level) {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                line: line_of(text, text.find("log_level").unwrap_or(0)),
                key: "log_level".into(),
                message,
            });
        }
        Ok(RegistryConfig {
            listen: file.listen,
            data_dir: file.data_dir,
            database: file.database.into_inner(),
            tls_cert: file.tls_cert.into_inner(),
            tls_key: file.tls_key.into_inner(),
            policy: Policy {
                allow_private: file.allow_private,
                clock_window: file.clock_window_secs,
                max_ttl: file.max_ttl_secs,
                ..Policy::default()
            },
            max_body_bytes: file.max_body_bytes,
            connections: ConnectionLimits {
                header_timeout: Duration::from_secs(file.header_timeout_secs.max(1)),
                idle_timeout: Duration::from_secs(15),
                handshake_timeout: Duration::from_secs(file.header_timeout_secs.max(1)),
                max_per_client: 64,
            },
            writes_per_key_per_minute: file.writes_per_key_per_minute,
            writes_per_address_per_minute: file.writes_per_address_per_minute,
            reachability_check: file.reachability_check,
            log_level: file.log_level,
            threads: file.threads,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("c.pem"), "cert").expect("write");
        std::fs::write(dir.path().join("k.pem"), "key").expect("write");
        let head = format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
            dir.path().join("c.pem").display(),
            dir.path().join("k.pem").display()
        );
        (dir, head)
    }

    fn invalid(text: &str) -> (usize, String, String) {
        match RegistryConfig::parse(text, Path::new("registry.toml")) {
            Err(ConfigError::Invalid {
                line, key, message, ..
            }) => (line, key, message),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn minimal_config_gets_safe_defaults() {
        let (_dir, head) = files();
        let c = RegistryConfig::parse(&head, Path::new("registry.toml")).expect("valid");
        assert!(!c.policy.allow_private);
        assert!(c.reachability_check);
        assert_eq!(c.database, "sqlite:data/registry/registry.db");
        assert_eq!(c.connections.header_timeout, Duration::from_secs(5));
    }

    #[test]
    fn errors_name_line_and_key() {
        let (_dir, head) = files();
        let (line, key, _) = invalid(&format!("{head}allow_private = true\nlisen = 3\n"));
        assert_eq!((line, key.as_str()), (4, "lisen"));
        let (line, key, msg) = invalid(&format!("{head}database = \"mysql://x\"\n"));
        assert_eq!((line, key.as_str()), (3, "database"), "{msg}");
        let (line, key, _) = invalid(&format!("{head}max_ttl_secs = \"ten\"\n"));
        assert_eq!((line, key.as_str()), (3, "max_ttl_secs"));
        let (line, key, msg) = invalid("tls_cert = \"/nonexistent/c.pem\"\ntls_key = \"/x\"\n");
        assert_eq!((line, key.as_str()), (1, "tls_cert"), "{msg}");
        let (line, key, _) = invalid(&format!("{head}\nmax_ttl_secs = 0\n"));
        assert_eq!((line, key.as_str()), (4, "max_ttl_secs"));
    }

    #[test]
    fn the_shipped_config_is_valid_with_its_certificate_files_present() {
        let (dir, _) = files();
        let shipped = include_str!("../../conf/registry.toml")
            .replace(
                "/etc/arknet/registry.crt",
                &dir.path().join("c.pem").display().to_string(),
            )
            .replace(
                "/etc/arknet/registry.key",
                &dir.path().join("k.pem").display().to_string(),
            );
        let c = RegistryConfig::parse(&shipped, Path::new("conf/registry.toml")).expect("valid");
        assert!(c.reachability_check && !c.policy.allow_private);
        assert_eq!(c.writes_per_key_per_minute, 30);
    }
}
