//! The audit log: one JSON line per peer request, in either direction, in
//! `<data_dir>/audit.log`. Never any prompt or response text: [`AuditRecord`] has no field that
//! could hold it.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

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

impl AuditRecord {
    /// A line with no token counts (a refusal before the model was read, a weight transfer):
    /// `latency_ms` from `started`, the time from `started_at`.
    pub fn without_tokens(
        started_at: std::time::SystemTime,
        started: std::time::Instant,
        direction: Direction,
        peer: String,
        model: String,
        status: u16,
        error: Option<String>,
    ) -> Self {
        AuditRecord {
            timestamp: crate::timefmt::rfc3339(started_at),
            direction,
            peer,
            model,
            status,
            error,
            prompt_tokens: None,
            prompt_tokens_estimated: false,
            completion_tokens: None,
            token_source: TokenSource::Counted,
            claim_refused: false,
            ttft_ms: None,
            latency_ms: started.elapsed().as_secs_f64() * 1000.0,
            bytes: None,
        }
    }
}

/// Append-only writer with size rotation and a window of recent entries.
///
/// A request only serialises its line into a shared buffer; a background thread appends the
/// buffer to the file every [`FLUSH_EVERY`] (sooner once [`FLUSH_AT`] bytes wait), so a busy
/// node pays one `write` per batch instead of one per request. [`AuditLog::flush`] (called at
/// shutdown, and on drop) writes what is buffered at once: a clean shutdown loses no line; a
/// process killed outright (SIGKILL, a crash) loses the lines of at most the last
/// [`FLUSH_EVERY`]. Nothing is ever synced to disk per line (the kernel's page cache keeps
/// written lines across a crash of the process, not of the machine), as before.
pub struct AuditLog {
    shared: Arc<Shared>,
}

struct Shared {
    path: PathBuf,
    max_bytes: u64,
    /// Lines not yet written, and the recent window. Requests hold it only to append.
    buffer: Mutex<Buffer>,
    /// Wakes the writer early (a large batch, or closing).
    wake: Condvar,
    /// The file; held for a whole batch so that batches land in order.
    file: Mutex<FileState>,
}

struct Buffer {
    pending: Vec<u8>,
    recent: VecDeque<AuditRecord>,
    closed: bool,
}

struct FileState {
    file: Option<File>,
    written: u64,
}

/// How long a line may wait in memory before the writer appends it.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// Buffered bytes that wake the writer before [`FLUSH_EVERY`] is up.
const FLUSH_AT: usize = 64 * 1024;

impl AuditLog {
    /// Opens (appending) `<data_dir>/audit.log`, remembering its last entries, and starts the
    /// thread that writes the lines.
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
        let shared = Arc::new(Shared {
            path,
            max_bytes,
            buffer: Mutex::new(Buffer {
                pending: Vec::with_capacity(FLUSH_AT),
                recent,
                closed: false,
            }),
            wake: Condvar::new(),
            file: Mutex::new(FileState {
                file: Some(file),
                written,
            }),
        });
        let writer = shared.clone();
        std::thread::Builder::new()
            .name("arknet audit".to_string())
            .spawn(move || writer.run())?;
        Ok(AuditLog { shared })
    }

    /// Appends `record` (written to the file within [`FLUSH_EVERY`]). Failures are logged,
    /// never returned: auditing must not fail a request that already happened.
    pub fn write(&self, record: AuditRecord) {
        let wake = {
            let mut buffer = self.shared.lock_buffer();
            let start = buffer.pending.len();
            if serde_json::to_writer(&mut buffer.pending, &record).is_err() {
                buffer.pending.truncate(start);
                return;
            }
            buffer.pending.push(b'\n');
            if buffer.recent.len() == RECENT {
                buffer.recent.pop_front();
            }
            buffer.recent.push_back(record);
            // The writer sleeps while nothing waits: the first line of a batch wakes it (to
            // start the batch's clock), and so does a full batch.
            start == 0 || buffer.pending.len() >= FLUSH_AT
        };
        if wake {
            self.shared.wake.notify_one();
        }
    }

    /// Writes every buffered line to the file now.
    pub fn flush(&self) {
        self.shared.flush();
    }

    /// The last `limit` entries, newest last.
    pub fn recent(&self, limit: usize) -> Vec<AuditRecord> {
        let buffer = self.shared.lock_buffer();
        let skip = buffer.recent.len().saturating_sub(limit);
        buffer.recent.iter().skip(skip).cloned().collect()
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        self.shared.lock_buffer().closed = true;
        self.shared.wake.notify_one();
        self.shared.flush();
    }
}

impl Shared {
    fn lock_buffer(&self) -> std::sync::MutexGuard<'_, Buffer> {
        self.buffer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The writer thread: asleep while nothing is buffered (an idle node does not wake it),
    /// then a batch at most [`FLUSH_EVERY`] after its first line (or as soon as [`FLUSH_AT`]
    /// bytes wait), until the log is closed.
    fn run(&self) {
        loop {
            let closed = {
                let buffer = self
                    .wake
                    .wait_while(self.lock_buffer(), |b| !b.closed && b.pending.is_empty())
                    .unwrap_or_else(PoisonError::into_inner);
                let (buffer, _) = self
                    .wake
                    .wait_timeout_while(buffer, FLUSH_EVERY, |b| {
                        !b.closed && b.pending.len() < FLUSH_AT
                    })
                    .unwrap_or_else(PoisonError::into_inner);
                buffer.closed
            };
            self.flush();
            if closed {
                return;
            }
        }
    }

    /// Appends the buffered lines, rotating the file at a line boundary whenever the next line
    /// would take it past `max_bytes`.
    fn flush(&self) {
        // The file lock is taken first and held through the write: a batch taken later cannot
        // be written before one taken earlier.
        let mut state = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        let batch = {
            let mut buffer = self.lock_buffer();
            if buffer.pending.is_empty() {
                return;
            }
            std::mem::replace(&mut buffer.pending, Vec::with_capacity(FLUSH_AT))
        };
        let mut rest = &batch[..];
        while !rest.is_empty() {
            // The longest run of whole lines that fits before the size limit (at least one line,
            // so that a line longer than the limit still gets written, alone, after a rotation).
            let mut take = 0;
            for line in rest.split_inclusive(|b| *b == b'\n') {
                if state.written + (take + line.len()) as u64 > self.max_bytes {
                    break;
                }
                take += line.len();
            }
            if take == 0 {
                if state.written > 0 {
                    self.rotate(&mut state);
                    continue;
                }
                take = rest
                    .iter()
                    .position(|b| *b == b'\n')
                    .map_or(rest.len(), |i| i + 1);
            }
            if let Some(f) = state.file.as_mut() {
                if let Err(e) = f.write_all(&rest[..take]) {
                    tracing::warn!(error = %e, "audit log write failed");
                }
            }
            state.written += take as u64;
            rest = &rest[take..];
        }
    }

    fn rotate(&self, state: &mut FileState) {
        state.file = None;
        let rotated = self.path.with_extension("log.1");
        if let Err(e) = std::fs::rename(&self.path, &rotated) {
            tracing::warn!(error = %e, "audit log rotation failed");
        }
        state.file = open_append(&self.path).ok();
        state.written = 0;
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
        log.flush();
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
    fn buffered_lines_reach_the_file_without_a_flush_and_at_close() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(FILE_NAME);
        let lines = || {
            std::fs::read_to_string(&path)
                .expect("read")
                .lines()
                .count()
        };
        let log = AuditLog::open(dir.path(), DEFAULT_MAX_BYTES).expect("open");
        log.write(record(0));
        // The writer thread appends it within FLUSH_EVERY; bounded wait, not a timing test.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while lines() < 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(lines(), 1);
        // Closing (a clean shutdown) writes what is still buffered.
        for i in 1..50 {
            log.write(record(i));
        }
        drop(log);
        assert_eq!(lines(), 50);
    }

    #[test]
    fn the_log_rotates_by_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = AuditLog::open(dir.path(), 600).expect("open");
        for i in 0..10 {
            log.write(record(i));
        }
        log.flush();
        assert!(dir.path().join("audit.log.1").exists());
        let size = std::fs::metadata(dir.path().join(FILE_NAME))
            .expect("meta")
            .len();
        assert!(size <= 600, "{size}");
    }
}
