//! State that outlives a cli process, in `$XDG_STATE_HOME/devloop` (default
//! `~/.local/state/devloop`), so any shell in any folder finds it: session tokens (readable by
//! the user only) and each service's sync status, with a lock held while a sync runs.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub fn state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("DEVLOOP_STATE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("devloop");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".local/state/devloop")
}

pub fn ensure_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// A random 32-byte token, hex encoded.
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    // getrandom fails only when the OS has no randomness source at all; the hash of the time
    // and pid is then still unguessable enough to tell sessions apart, and is logged.
    if getrandom::fill(&mut bytes).is_err() {
        tracing::warn!("no OS randomness; deriving the session token from time and pid");
        let seed = format!("{:?}{}", std::time::SystemTime::now(), std::process::id());
        bytes = devloop_proxy::tree::hash_bytes(seed.as_bytes());
    }
    devloop_proxy::tree::hex(&bytes)
}

/// Session tokens by container name, in files only the user can read.
pub struct TokenStore {
    dir: PathBuf,
}

impl TokenStore {
    pub fn new() -> Self {
        TokenStore {
            dir: state_dir().join("tokens"),
        }
    }

    pub fn read(&self, container: &str) -> Option<String> {
        std::fs::read_to_string(self.dir.join(container))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    }

    pub fn write(&self, container: &str, token: &str) -> std::io::Result<()> {
        ensure_private_dir(&self.dir)?;
        write_atomic(&self.dir.join(container), token.as_bytes(), 0o600)
    }

    pub fn remove(&self, container: &str) {
        let _ = std::fs::remove_file(self.dir.join(container));
    }
}

impl Default for TokenStore {
    fn default() -> Self {
        Self::new()
    }
}

/// What a sync reports about itself, for `devloop status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SyncStatus {
    pub pid: u32,
    pub started_at_ms: u64,
    pub connected: bool,
    pub route: String,
    pub files: u64,
    pub bytes: u64,
    pub last_sync_ms: Option<u64>,
    pub pending: u64,
    pub errors: Vec<String>,
    /// Set when the sync ended (cleanly); a crashed sync is told by its free lock.
    pub stopped_at_ms: Option<u64>,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn sync_dir(project: &str) -> PathBuf {
    state_dir().join("sync").join(project)
}

pub fn read_sync_status(project: &str, service: &str) -> Option<SyncStatus> {
    let text = std::fs::read_to_string(sync_dir(project).join(format!("{service}.json"))).ok()?;
    serde_json::from_str(&text).ok()
}

pub fn write_sync_status(project: &str, service: &str, status: &SyncStatus) -> std::io::Result<()> {
    let dir = sync_dir(project);
    std::fs::create_dir_all(&dir)?;
    write_atomic(
        &dir.join(format!("{service}.json")),
        &serde_json::to_vec_pretty(status).unwrap_or_default(),
        0o644,
    )
}

/// Forgets a service's sync status and lock, unless a sync still runs: its lock is never
/// removed from under it (a second sync would then lock a new file and run beside it).
/// Returns false when it left them because a sync holds the lock.
pub fn remove_sync_status(project: &str, service: &str) -> bool {
    if SyncLock::is_held(project, service) {
        return false;
    }
    let dir = sync_dir(project);
    let _ = std::fs::remove_file(dir.join(format!("{service}.json")));
    let _ = std::fs::remove_file(sync_lock_path(project, service));
    true
}

/// A lock that lives as long as the process (the open file) that holds it: an open-file-
/// description record lock on the whole file, which the kernel drops when the holder
/// exits, crash or not. Unlike `flock`, it can be probed without being taken
/// (`F_OFD_GETLK`), so a `status` looking at it never makes a starting holder fail.
pub struct LiveLock {
    _file: std::fs::File,
}

fn whole_file_lock(kind: i32) -> nix::libc::flock {
    // Plain old data: every field is set below or is zero (whole file, pid 0 as OFD wants).
    let mut l: nix::libc::flock = zeroed_flock();
    l.l_type = kind as i16;
    l.l_whence = nix::libc::SEEK_SET as i16;
    l
}

/// `flock` has only integer fields; building it field by field keeps this crate free of
/// `unsafe` (no `mem::zeroed`).
fn zeroed_flock() -> nix::libc::flock {
    nix::libc::flock {
        l_type: 0,
        l_whence: 0,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    }
}

impl LiveLock {
    /// Takes the lock on `path` (created if missing). `Ok(None)` when another live process
    /// holds it.
    pub fn try_hold(path: &Path) -> std::io::Result<Option<LiveLock>> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(path)?;
        let lock = whole_file_lock(nix::libc::F_WRLCK);
        match nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_OFD_SETLK(&lock)) {
            Ok(_) => Ok(Some(LiveLock { _file: file })),
            Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EACCES) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether a live process holds the lock on `path`, without taking it.
    pub fn is_held(path: &Path) -> bool {
        let Ok(file) = std::fs::OpenOptions::new().read(true).open(path) else {
            return false;
        };
        let mut probe = whole_file_lock(nix::libc::F_WRLCK);
        match nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_OFD_GETLK(&mut probe)) {
            Ok(_) => probe.l_type != nix::libc::F_UNLCK as i16,
            Err(_) => false,
        }
    }
}

/// Held by the process that syncs a service; the kernel frees it when that process dies, so
/// a free lock means "nobody is syncing", crash or not.
pub struct SyncLock {
    _lock: LiveLock,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another devloop process is already syncing `{0}` (see `devloop status`)")]
    Busy(String),
    #[error("cannot create the sync lock {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

fn sync_lock_path(project: &str, service: &str) -> PathBuf {
    sync_dir(project).join(format!("{service}.lock"))
}

impl SyncLock {
    pub fn acquire(project: &str, service: &str) -> Result<SyncLock, LockError> {
        let path = sync_lock_path(project, service);
        match LiveLock::try_hold(&path) {
            Ok(Some(lock)) => Ok(SyncLock { _lock: lock }),
            Ok(None) => Err(LockError::Busy(service.to_string())),
            Err(e) => Err(LockError::Io(path, e)),
        }
    }

    /// Whether some process holds the lock now (a probe: the lock is never taken).
    pub fn is_held(project: &str, service: &str) -> bool {
        LiveLock::is_held(&sync_lock_path(project, service))
    }
}

/// Writes `bytes` to `path` through a temporary file of a name no other writer uses (pid and
/// a counter), renamed into place: a reader sees the old content or the new, never a mix,
/// and two writers never share a temporary file.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_data()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_lock_is_probed_without_being_taken_and_freed_with_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        assert!(!LiveLock::is_held(&path), "no file: not held");
        let held = LiveLock::try_hold(&path)
            .unwrap()
            .expect("free lock is taken");
        assert!(LiveLock::is_held(&path));
        // Probing many times never takes it: the holder keeps it, a second taker is refused.
        for _ in 0..100 {
            assert!(LiveLock::is_held(&path));
        }
        assert!(LiveLock::try_hold(&path).unwrap().is_none());
        drop(held);
        assert!(!LiveLock::is_held(&path));
        assert!(LiveLock::try_hold(&path).unwrap().is_some());
    }

    #[test]
    fn atomic_writes_leave_no_temporary_file_and_keep_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "only the file itself remains");
    }
}
