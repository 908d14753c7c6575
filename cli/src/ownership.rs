//! Who holds a service: one ownership record per resource (a Docker container, a Kubernetes
//! Deployment) in the state folder, listing its holders. A `replace` holder (today's
//! intercept) is exclusive; `shared` holders (a filtered intercept) may be several, and
//! never beside a replace one. Taking and dropping a claim is one read-modify-write under a
//! lock, so two clis starting at the same moment cannot both win; each holder keeps a
//! [`LiveLock`] for as long as it runs, so a holder whose process died is told from a live
//! one without trusting pids.
//!
//! The claim is taken before anything changes and is the guard's first step: a cli that
//! loses never touches what the winner made.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::state::{now_ms, write_atomic, LiveLock};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Takes every connection: no other holder at the same time.
    Replace,
    /// Takes the requests its filter names; shares the resource with other shared holders.
    Shared { filter: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// Unique per claim (the intercept's session).
    pub session: String,
    /// user@host pid N, for messages.
    pub who: String,
    pub pid: u32,
    pub started_ms: u64,
    pub kind: Kind,
}

impl Holder {
    pub fn new(session: &str, kind: Kind) -> Holder {
        Holder {
            session: session.to_string(),
            who: whoami(),
            pid: std::process::id(),
            started_ms: now_ms(),
            kind,
        }
    }
}

/// user@host pid N.
pub fn whoami() -> String {
    format!("{}@{} pid {}", user_name(), host_name(), std::process::id())
}

/// The login: `USER`, else the account of this process's user id, else the id.
pub fn user_name() -> String {
    match std::env::var("USER") {
        Ok(u) if !u.is_empty() => u,
        _ => {
            let uid = nix::unistd::getuid();
            nix::unistd::User::from_uid(uid)
                .ok()
                .flatten()
                .map(|u| u.name)
                .unwrap_or_else(|| format!("uid{uid}"))
        }
    }
}

pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    holders: Vec<Holder>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("{resource} is already held by {} (since {}); end that first", .holder.who, crate::ui::ago(.holder.started_ms))]
    Held { resource: String, holder: Holder },
    #[error("cannot record who holds {resource} in {path}: {source}")]
    Io {
        resource: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A held claim. Dropping it without [`Claim::release`] keeps the record (the holder's
/// changes may still be in place): the holder then reads as gone, and the next claim of the
/// resource drops it.
pub struct Claim {
    dir: PathBuf,
    session: String,
    _alive: LiveLock,
}

/// The folder of a resource's record: `key` made safe as one file name.
fn dir_of(root: &Path, key: &str) -> PathBuf {
    let safe: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let hash = blake3::hash(key.as_bytes()).to_hex();
    root.join(format!("{safe}.{}", &hash.as_str()[..8]))
}

pub fn root() -> PathBuf {
    crate::state::state_dir().join("owners")
}

fn alive_path(dir: &Path, session: &str) -> PathBuf {
    dir.join(format!("{session}.alive"))
}

/// The record's lock: held for the few microseconds of one read-modify-write.
fn locked<T>(dir: &Path, f: impl FnOnce(&mut Record) -> T) -> std::io::Result<T> {
    crate::state::ensure_private_dir(dir)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(".lock"))?;
    let _lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| std::io::Error::from(e))?;
    let path = dir.join("holders.json");
    let mut record: Record = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let out = f(&mut record);
    write_atomic(
        &path,
        &serde_json::to_vec_pretty(&record).map_err(std::io::Error::other)?,
        0o600,
    )?;
    Ok(out)
}

impl Claim {
    /// Claims `key` (a resource, named in messages as `resource`) for `holder`, in the
    /// default state folder.
    pub fn acquire(key: &str, resource: &str, holder: Holder) -> Result<Claim, ClaimError> {
        Self::acquire_in(&root(), key, resource, holder)
    }

    pub fn acquire_in(
        root: &Path,
        key: &str,
        resource: &str,
        holder: Holder,
    ) -> Result<Claim, ClaimError> {
        let dir = dir_of(root, key);
        let io = |source| ClaimError::Io {
            resource: resource.to_string(),
            path: dir.clone(),
            source,
        };
        let session = holder.session.clone();
        // The liveness lock is taken first, so the holder is alive from the moment it is in
        // the record.
        crate::state::ensure_private_dir(&dir).map_err(io)?;
        let alive = LiveLock::try_hold(&alive_path(&dir, &session))
            .map_err(io)?
            .ok_or_else(|| io(std::io::Error::other("session already in use")))?;
        let outcome = locked(&dir, |record| {
            // Holders whose process is gone changed nothing that still stands (else the
            // caller's own checks of the resource refuse first): they are dropped.
            record.holders.retain(|h| {
                h.session == session || LiveLock::is_held(&alive_path(&dir, &h.session))
            });
            let conflict = record.holders.iter().find(|h| {
                h.session != session && (h.kind == Kind::Replace || holder.kind == Kind::Replace)
            });
            match conflict {
                Some(h) => Err(h.clone()),
                None => {
                    record.holders.retain(|h| h.session != session);
                    record.holders.push(holder.clone());
                    Ok(())
                }
            }
        })
        .map_err(io)?;
        match outcome {
            Ok(()) => Ok(Claim {
                dir,
                session,
                _alive: alive,
            }),
            Err(holder) => {
                drop(alive);
                let _ = std::fs::remove_file(alive_path(&dir, &session));
                Err(ClaimError::Held {
                    resource: resource.to_string(),
                    holder,
                })
            }
        }
    }

    /// Drops this holder. Returns how many holders remain: the last one out (0) undoes what
    /// the holders shared.
    pub fn release(self) -> std::io::Result<usize> {
        let session = self.session.clone();
        let left = locked(&self.dir, |record| {
            record.holders.retain(|h| h.session != session);
            record.holders.len()
        })?;
        let _ = std::fs::remove_file(alive_path(&self.dir, &self.session));
        Ok(left)
    }
}

/// The holders of `key` with whether each one's process is alive, for `list` and `leave`.
pub fn holders(key: &str) -> Vec<(Holder, bool)> {
    holders_in(&root(), key)
}

pub fn holders_in(root: &Path, key: &str) -> Vec<(Holder, bool)> {
    let dir = dir_of(root, key);
    let record: Record = std::fs::read(dir.join("holders.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    record
        .holders
        .into_iter()
        .map(|h| {
            let alive = LiveLock::is_held(&alive_path(&dir, &h.session));
            (h, alive)
        })
        .collect()
}

/// Forgets every holder of `key` (`leave`, which ends them all; a live holder notices its
/// intercept ended elsewhere and exits).
pub fn clear(key: &str) {
    let dir = dir_of(&root(), key);
    let _ = locked(&dir, |record| record.holders.clear());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(session: &str, kind: Kind) -> Holder {
        Holder::new(session, kind)
    }

    #[test]
    fn a_replace_claim_is_exclusive_and_released_for_the_next() {
        let root = tempfile::tempdir().unwrap();
        let a = Claim::acquire_in(root.path(), "api", "api", holder("a", Kind::Replace)).unwrap();
        match Claim::acquire_in(root.path(), "api", "api", holder("b", Kind::Replace)) {
            Err(ClaimError::Held { holder, .. }) => assert_eq!(holder.session, "a"),
            other => panic!("second replace claim: {:?}", other.map(|_| ())),
        }
        let shared = Kind::Shared {
            filter: "x-dev=bob".into(),
        };
        assert!(Claim::acquire_in(root.path(), "api", "api", holder("c", shared)).is_err());
        assert_eq!(a.release().unwrap(), 0);
        assert!(holders_in(root.path(), "api").is_empty());
        Claim::acquire_in(root.path(), "api", "api", holder("b", Kind::Replace)).unwrap();
    }

    #[test]
    fn shared_claims_coexist_and_the_last_one_out_is_told() {
        let root = tempfile::tempdir().unwrap();
        let k = |f: &str| Kind::Shared { filter: f.into() };
        let a = Claim::acquire_in(root.path(), "api", "api", holder("a", k("alice"))).unwrap();
        let b = Claim::acquire_in(root.path(), "api", "api", holder("b", k("bob"))).unwrap();
        assert!(Claim::acquire_in(root.path(), "api", "api", holder("c", Kind::Replace)).is_err());
        assert_eq!(holders_in(root.path(), "api").len(), 2);
        assert_eq!(a.release().unwrap(), 1);
        assert_eq!(b.release().unwrap(), 0);
    }

    #[test]
    fn a_holder_whose_process_is_gone_is_dropped_by_the_next_claim() {
        let root = tempfile::tempdir().unwrap();
        let a = Claim::acquire_in(root.path(), "api", "api", holder("a", Kind::Replace)).unwrap();
        // As if the process died: its liveness lock goes with it, its record entry stays.
        drop(a);
        let listed = holders_in(root.path(), "api");
        assert_eq!(listed.len(), 1);
        assert!(!listed[0].1, "the dead holder reads as gone");
        Claim::acquire_in(root.path(), "api", "api", holder("b", Kind::Replace)).unwrap();
    }

    #[test]
    fn of_many_racing_replace_claims_exactly_one_wins() {
        let root = tempfile::tempdir().unwrap();
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let (root, barrier) = (root.path().to_path_buf(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    Claim::acquire_in(&root, "api", "api", holder(&format!("s{i}"), Kind::Replace))
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let winners = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(winners, 1, "exactly one of eight concurrent claims wins");
        let listed = holders_in(root.path(), "api");
        assert_eq!(listed.len(), 1);
        assert!(listed[0].1);
    }
}
