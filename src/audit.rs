//! The audit log: one JSON line per peer request, in either direction, in
//! `<data_dir>/audit.log`. Never any prompt or response text: [`AuditRecord`] has no field that
//! could hold it.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};

pub use crate::dialect::meter::TokenSource;

/// File name inside the data dir.
pub const FILE_NAME: &str = "audit.log";
/// Size at which the log is rotated to `audit.log.1`.
pub const DEFAULT_MAX_BYTES: u64 = 10 * 1024 * 1024;
/// Entries kept in memory for `GET /audit`.
const RECENT: usize = 1000;

/// Which way a request went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// A peer asked us.
    Inbound,
    /// We asked a peer.
    Outbound,
}

/// One audited request: who, what model, how it went; no content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// RFC 3339 time the request started.
    pub timestamp: String,
    /// Inbound or outbound.
    pub direction: Direction,
    /// The peer's node id (from its approval).
    pub peer: String,
    /// The model requested.
    pub model: String,
    /// The request's real outcome as an HTTP status: the status answered, except for a
    /// response cut short (403 revoked, 502 upstream broke, 499 client left) and a request that
    /// got no answer (504 timeout, 502 unreachable).
    pub status: u16,
    /// What went wrong, when something did (a refusal's code, a timeout, a cut stream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Prompt tokens: the backend's count, or an estimate from the request text.
    pub prompt_tokens: Option<u64>,
    /// `prompt_tokens` is an estimate (the response carried no count).
    #[serde(default, skip_serializing_if = "is_false")]
    pub prompt_tokens_estimated: bool,
    /// Generated tokens.
    pub completion_tokens: Option<u64>,
    /// Where the token counts come from: our backend, a peer's claim, or our own count.
    #[serde(default)]
    pub token_source: TokenSource,
    /// The peer claimed counts its output cannot back; ours are recorded instead.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub claim_refused: bool,
    /// Milliseconds to the first response byte.
    pub ttft_ms: Option<f64>,
    /// Milliseconds to the end of the response.
    pub latency_ms: f64,
    /// Model weight bytes moved, for model transfers (pulls).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
}

/// Append-only writer with size rotation and a window of recent entries.
pub struct AuditLog {
    path: PathBuf,
    max_bytes: u64,
    inner: Mutex<Inner>,
}

struct Inner {
    file: Option<File>,
    written: u64,
    recent: VecDeque<AuditRecord>,
}

impl AuditLog {
    /// Opens (appending) `<data_dir>/audit.log`, remembering its last entries.
    pub fn open(data_dir: &Path, max_bytes: u64) -> std::io::Result<Self> {
        let path = data_dir.join(FILE_NAME);
        let mut recent = VecDeque::with_capacity(RECENT);
        if let Ok(f) = File::open(&path) {
            for line in BufReader::new(f).lines().map_while(Result::ok) {
                if let Ok(r) = serde_json::from_str(&line) {
                    if recent.len() == RECENT {
                        recent.pop_front();
                    }
                    recent.push_back(r);
                }
            }
        }
        let file = open_append(&path)?;
        let written = file.metadata().map_or(0, |m| m.len());
        Ok(AuditLog {
            path,
            max_bytes,
            inner: Mutex::new(Inner {
                file: Some(file),
                written,
                recent,
            }),
        })
    }

    /// Appends `record`. Failures are logged, never returned: auditing must not fail a request
    /// that already happened.
    pub fn write(&self, record: AuditRecord) {
        let mut line = match serde_json::to_vec(&record) {
            Ok(l) => l,
            Err(_) => return,
        };
        line.push(b'\n');
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.written + line.len() as u64 > self.max_bytes {
            inner.file = None;
            let rotated = self.path.with_extension("log.1");
            if let Err(e) = std::fs::rename(&self.path, &rotated) {
                tracing::warn!(error = %e, "audit log rotation failed");
            }
            inner.file = open_append(&self.path).ok();
            inner.written = 0;
        }
        if let Some(f) = inner.file.as_mut() {
            if let Err(e) = f.write_all(&line) {
                tracing::warn!(error = %e, "audit log write failed");
            }
        }
        inner.written += line.len() as u64;
        if inner.recent.len() == RECENT {
            inner.recent.pop_front();
        }
        inner.recent.push_back(record);
    }

    /// The last `limit` entries, newest last.
    pub fn recent(&self, limit: usize) -> Vec<AuditRecord> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let skip = inner.recent.len().saturating_sub(limit);
        inner.recent.iter().skip(skip).cloned().collect()
    }
}

fn is_false(b: &bool) -> bool {
    !b
}

fn open_append(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: u16) -> AuditRecord {
        AuditRecord {
            timestamp: "2026-01-01T00:00:00Z".into(),
            direction: Direction::Inbound,
            peer: "dave".into(),
            model: "m".into(),
            status: 200 + i,
            error: None,
            prompt_tokens: Some(3),
            prompt_tokens_estimated: false,
            completion_tokens: Some(5),
            token_source: TokenSource::Backend,
            claim_refused: false,
            ttft_ms: Some(1.5),
            latency_ms: 9.0,
            bytes: None,
        }
    }

    #[test]
    fn records_are_json_lines_and_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = AuditLog::open(dir.path(), DEFAULT_MAX_BYTES).expect("open");
        log.write(record(0));
        log.write(record(1));
        let text = std::fs::read_to_string(dir.path().join(FILE_NAME)).expect("read");
        assert_eq!(text.lines().count(), 2);
        let v: serde_json::Value =
            serde_json::from_str(text.lines().next().expect("line")).expect("json");
        assert_eq!(v["direction"], "inbound");
        assert_eq!(v["prompt_tokens"], 3);
        let again = AuditLog::open(dir.path(), DEFAULT_MAX_BYTES).expect("reopen");
        assert_eq!(again.recent(10), vec![record(0), record(1)]);
        assert_eq!(again.recent(1), vec![record(1)]);
    }

    #[test]
    fn the_log_rotates_by_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = AuditLog::open(dir.path(), 600).expect("open");
        for i in 0..10 {
            log.write(record(i));
        }
        assert!(dir.path().join("audit.log.1").exists());
        let size = std::fs::metadata(dir.path().join(FILE_NAME))
            .expect("meta")
            .len();
        assert!(size <= 600, "{size}");
    }
}
