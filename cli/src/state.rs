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
        let path = self.dir.join(container);
        let tmp = self.dir.join(format!(".{container}.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(token.as_bytes())?;
        std::fs::rename(tmp, path)
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
    let tmp = dir.join(format!(".{service}.json.{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec_pretty(status).unwrap_or_default())?;
    std::fs::rename(tmp, dir.join(format!("{service}.json")))
}

pub fn remove_sync_status(project: &str, service: &str) {
    let dir = sync_dir(project);
    let _ = std::fs::remove_file(dir.join(format!("{service}.json")));
    let _ = std::fs::remove_file(dir.join(format!("{service}.lock")));
}

/// Held by the process that syncs a service; the kernel frees it when that process dies, so
/// a free lock means "nobody is syncing", crash or not.
pub struct SyncLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another devloop process is already syncing `{0}` (see `devloop status`)")]
    Busy(String),
    #[error("cannot create the sync lock {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

impl SyncLock {
    pub fn acquire(project: &str, service: &str) -> Result<SyncLock, LockError> {
        let dir = sync_dir(project);
        let path = dir.join(format!("{service}.lock"));
        std::fs::create_dir_all(&dir).map_err(|e| LockError::Io(path.clone(), e))?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| LockError::Io(path.clone(), e))?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(SyncLock { _lock: lock }),
            Err(_) => Err(LockError::Busy(service.to_string())),
        }
    }

    /// Whether some process holds the lock now.
    pub fn is_held(project: &str, service: &str) -> bool {
        let path = sync_dir(project).join(format!("{service}.lock"));
        let Ok(file) = std::fs::OpenOptions::new().write(true).open(&path) else {
            return false;
        };
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).is_err()
    }
}
