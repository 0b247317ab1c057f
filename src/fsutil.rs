//! Writing the node's files so that neither a crash nor a second process (an `arknet id` while
//! the service starts, a second `serve` by mistake) ever leaves a torn, mixed or lost one; and
//! the data-dir lock that makes one running node the only writer of its data dir.

use std::fs;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{Flock, FlockArg};

/// Name of the lock file inside the data dir; it holds the PID of the node that locked it.
pub const LOCK_FILE: &str = "arknet.lock";

/// Temp files created by this process so far: with the PID, a name no other writer uses.
static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` via a temp file in the same directory, fsync, rename and an fsync
/// of the directory, with `mode` permissions from the moment the file exists. A crash leaves
/// the old file or the new one, never a mix; concurrent writers each use their own temp file,
/// so the last rename wins whole.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = write_temp(path, bytes, mode)?;
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_parent(path)
}

/// Creates `path` with `bytes` only if it does not exist yet, complete from the first moment
/// it is visible (written to a temp file, then hard-linked into place, which fails when the
/// name is taken). Returns `false`, writing nothing, when another writer got there first: the
/// caller then reads what is on disk, so every process ends up with the same file.
pub fn create_new_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<bool> {
    let tmp = write_temp(path, bytes, mode)?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => sync_parent(path).map(|()| true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// A unique, fully written and synced temp file next to `path`.
fn write_temp(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<PathBuf> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        TEMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    // `create_new`: a stale temp file of a crashed process with a recycled PID is an error,
    // never a file shared with someone else.
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    let written = (|| {
        // The umask may have narrowed `mode`; the file must have exactly the mode asked for.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(tmp)
}

fn sync_parent(path: &Path) -> std::io::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// The running node's exclusive hold on its data dir: an `flock` on `<data_dir>/arknet.lock`,
/// released by the kernel when the process ends (however it ends), so a crash never leaves a
/// stale lock behind. Keep it alive as long as the node runs.
#[derive(Debug)]
pub struct DataDirLock {
    _lock: Flock<fs::File>,
}

/// Why the data dir could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock.
    #[error(
        "data dir {dir} is in use by another arknet node ({holder}); stop it or use another --data-dir"
    )]
    Held {
        /// The data dir.
        dir: PathBuf,
        /// "PID n", or a note that the PID is not known yet.
        holder: String,
    },
    /// The lock file could not be opened or written.
    #[error("lock file {path}: {source}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl DataDirLock {
    /// Takes the lock without waiting and writes our PID into the lock file; fails with the
    /// holder's PID when another process has it.
    pub fn acquire(data_dir: &Path) -> Result<Self, LockError> {
        let path = data_dir.join(LOCK_FILE);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        // Not truncated on open: the file holds the current holder's PID until we own it.
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&path)
            .map_err(io)?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, errno)) if errno == nix::errno::Errno::EWOULDBLOCK => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = match text.trim().parse::<u32>() {
                    Ok(pid) => format!("PID {pid}"),
                    Err(_) => "PID not written yet".to_string(),
                };
                return Err(LockError::Held {
                    dir: data_dir.to_path_buf(),
                    holder,
                });
            }
            Err((_, errno)) => return Err(io(std::io::Error::from(errno))),
        };
        lock.set_len(0).map_err(io)?;
        lock.rewind().map_err(io)?;
        writeln!(lock, "{}", std::process::id()).map_err(io)?;
        lock.sync_all().map_err(io)?;
        Ok(DataDirLock { _lock: lock })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_writers_never_collide_on_a_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f.json");
        std::thread::scope(|s| {
            for i in 0..8u8 {
                let path = &path;
                s.spawn(move || {
                    for _ in 0..50 {
                        write_atomic(path, &[b'a' + i; 4096], 0o600).expect("write");
                    }
                });
            }
        });
        let bytes = fs::read(&path).expect("read");
        assert_eq!(bytes.len(), 4096);
        assert!(bytes.iter().all(|b| *b == bytes[0]), "one writer's content");
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .expect("ls")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn create_new_keeps_the_first_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k");
        assert!(create_new_atomic(&path, b"first", 0o600).expect("create"));
        assert!(!create_new_atomic(&path, b"second", 0o600).expect("create again"));
        assert_eq!(fs::read(&path).expect("read"), b"first");
        let mode = fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_second_lock_names_the_holder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let held = DataDirLock::acquire(dir.path()).expect("first lock");
        // flock locks belong to the open file description, so a second open in this process
        // conflicts just as another process would.
        let err = DataDirLock::acquire(dir.path()).expect_err("second lock must fail");
        assert!(
            err.to_string()
                .contains(&format!("PID {}", std::process::id())),
            "{err}"
        );
        drop(held);
        DataDirLock::acquire(dir.path()).expect("free again after drop");
    }
}
