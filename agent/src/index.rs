//! The agent's view of its root: every file, directory and symlink below it, with content
//! hashes, in the shape the laptop compares against ([`devloop_proxy::tree::Entry`]).
//!
//! The walk goes by descriptor, as `apply.rs` does: each directory is opened relative to its
//! parent's descriptor with `O_NOFOLLOW`, each entry is looked at with `fstatat` without
//! following links, and a file is hashed from a descriptor opened with `O_NOFOLLOW` whose own
//! `fstat` says it is a regular file. A process in the container that swaps a directory or a
//! file for a symlink meanwhile cannot make the agent list or hash anything outside the root.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use devloop_proxy::tree::{Entry, Hash, MODE_MASK};
use devloop_proxy::RelPath;
use nix::errno::Errno;
use nix::fcntl::{openat, readlinkat, AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, FileStat, Mode, SFlag};

use crate::apply::TEMP_PREFIX;

/// Files up to this size are read whole; larger ones are hashed as a stream.
const READ_WHOLE_BYTES: u64 = 1024 * 1024;

fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

/// Walks `root` without following symlinks and returns its entries sorted by path. The root
/// itself is not an entry. Entries that vanish during the walk, names that are not UTF-8, and
/// special files (sockets, FIFOs, devices) are skipped.
pub fn walk(root: &Path) -> io::Result<Vec<(RelPath, Entry)>> {
    let mut entries = Vec::new();
    walk_with(root, |e| {
        entries.push(e);
        true
    })?;
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(entries)
}

/// A directory still to read: opened from its parent's descriptor when its turn comes, so
/// the walk holds about one descriptor per level, not one per pending directory.
struct Pending {
    parent: Arc<OwnedFd>,
    name: OsString,
    rel: RelPath,
}

/// [`walk`] without collecting: each entry goes to `emit` as it is found (in no particular
/// order), so a large tree never sits in memory whole. `emit` returning false stops the walk.
pub fn walk_with(root: &Path, mut emit: impl FnMut((RelPath, Entry)) -> bool) -> io::Result<()> {
    let mut entries = Emitter {
        emit: &mut emit,
        stopped: false,
    };
    // The root itself must be readable; anything below may vanish meanwhile.
    let root_fd = Arc::new(nix::fcntl::open(root, dir_flags(), Mode::empty())?);
    let mut pending: Vec<Pending> = Vec::new();
    list_into(&root_fd, None, &mut entries, &mut pending)?;
    while let Some(next) = pending.pop() {
        if entries.stopped {
            break;
        }
        let dir = match openat(
            &*next.parent,
            next.name.as_os_str(),
            dir_flags(),
            Mode::empty(),
        ) {
            Ok(fd) => Arc::new(fd),
            Err(Errno::ENOENT) => continue,
            Err(e) => {
                tracing::warn!(dir = %next.rel, error = %e, "index: cannot read directory, skipped");
                continue;
            }
        };
        if let Err(e) = list_into(&dir, Some(&next.rel), &mut entries, &mut pending) {
            tracing::warn!(dir = %next.rel, error = %e, "index: cannot read directory, skipped");
        }
    }
    Ok(())
}

/// Emits the entries of the open directory `dir` (at `rel`, the root when `None`) and queues
/// its subdirectories.
fn list_into<F: FnMut((RelPath, Entry)) -> bool>(
    dir: &Arc<OwnedFd>,
    rel: Option<&RelPath>,
    entries: &mut Emitter<'_, F>,
    pending: &mut Vec<Pending>,
) -> io::Result<()> {
    let shown = || rel.map_or_else(|| ".".to_string(), |r| r.to_string());
    // A fresh descriptor for the listing: its own read position, from the start.
    let listing_fd = openat(&**dir, ".", dir_flags(), Mode::empty())?;
    let mut listing = nix::dir::Dir::from_fd(listing_fd)?;
    for item in listing.iter() {
        if entries.stopped {
            break;
        }
        let item = match item {
            Ok(item) => item,
            Err(e) => {
                tracing::warn!(dir = %shown(), error = %e, "index: cannot list directory entry, skipped");
                continue;
            }
        };
        let raw = OsStr::from_bytes(item.file_name().to_bytes());
        if raw == "." || raw == ".." {
            continue;
        }
        let Some(name) = raw.to_str() else {
            tracing::warn!(dir = %shown(), name = ?raw, "index: name is not UTF-8, skipped");
            continue;
        };
        if name.starts_with(TEMP_PREFIX) {
            continue;
        }
        let path = match rel {
            None => RelPath::new(name),
            Some(parent) => parent.join(name),
        };
        let path = match path {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "index: path skipped");
                continue;
            }
        };
        let st = match fstatat(&**dir, raw, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::ENOENT) => continue,
            Err(e) => {
                tracing::warn!(path = %path, error = %e, "index: cannot stat, skipped");
                continue;
            }
        };
        let mode = st.st_mode & MODE_MASK;
        match kind(&st) {
            SFlag::S_IFLNK => match readlinkat(&**dir, raw) {
                Ok(target) => match target.into_string() {
                    Ok(target) => entries.push((path, Entry::Symlink { target })),
                    Err(_) => {
                        tracing::warn!(path = %path, "index: symlink target is not UTF-8, skipped")
                    }
                },
                Err(Errno::ENOENT) => {}
                Err(e) => {
                    tracing::warn!(path = %path, error = %e, "index: cannot read symlink, skipped")
                }
            },
            SFlag::S_IFDIR => {
                entries.push((path.clone(), Entry::Dir { mode }));
                pending.push(Pending {
                    parent: dir.clone(),
                    name: raw.to_os_string(),
                    rel: path,
                });
            }
            SFlag::S_IFREG => match hash_file_at(dir, raw) {
                Ok(Some((mode, size, hash))) => {
                    entries.push((path, Entry::File { mode, size, hash }))
                }
                // Vanished, or no longer a regular file: the next reconcile sees what it is.
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(path = %path, error = %e, "index: cannot read file, skipped")
                }
            },
            _ => {}
        }
    }
    Ok(())
}

fn kind(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

/// Adapts `emit` to the `push` the walk calls.
struct Emitter<'a, F: FnMut((RelPath, Entry)) -> bool> {
    emit: &'a mut F,
    stopped: bool,
}

impl<F: FnMut((RelPath, Entry)) -> bool> Emitter<'_, F> {
    fn push(&mut self, e: (RelPath, Entry)) {
        if !self.stopped && !(self.emit)(e) {
            self.stopped = true;
        }
    }
}

/// Mode, size and BLAKE3 hash of the regular file `name` in `dir`, read from a descriptor
/// opened without following a symlink (O_NONBLOCK: a FIFO swapped in cannot hang the open);
/// `None` when it vanished or is not a regular file any more. The size is what was actually
/// read (the file may change under us; the hash then describes one consistent read, and the
/// next reconcile catches up).
fn hash_file_at(dir: &OwnedFd, name: &OsStr) -> io::Result<Option<(u32, u64, Hash)>> {
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    let fd = match openat(dir, name, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::ENOENT | Errno::ELOOP) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let st = fstat(&fd)?;
    if kind(&st) != SFlag::S_IFREG {
        return Ok(None);
    }
    let mode = st.st_mode & MODE_MASK;
    let mut file = File::from(fd);
    let len_hint = u64::try_from(st.st_size).unwrap_or(0);
    if len_hint <= READ_WHOLE_BYTES {
        let mut data = Vec::with_capacity(len_hint as usize);
        file.read_to_end(&mut data)?;
        Ok(Some((
            mode,
            data.len() as u64,
            *blake3::hash(&data).as_bytes(),
        )))
    } else {
        let mut hasher = blake3::Hasher::new();
        hasher.update_reader(&mut file)?;
        Ok(Some((mode, hasher.count(), *hasher.finalize().as_bytes())))
    }
}

/// Cuts `entries` into parts that each fit comfortably into one message.
pub fn parts(
    entries: Vec<(RelPath, Entry)>,
    max_entries: usize,
    max_bytes: usize,
) -> Vec<Vec<(RelPath, Entry)>> {
    let mut builder = PartBuilder::new(max_entries, max_bytes);
    let mut out: Vec<_> = entries
        .into_iter()
        .filter_map(|e| builder.push(e))
        .collect();
    let last = builder.finish();
    if !last.is_empty() || out.is_empty() {
        out.push(last);
    }
    out
}

/// Gathers entries into parts as they come; `push` hands back a part once it is full.
pub struct PartBuilder {
    max_entries: usize,
    max_bytes: usize,
    current: Vec<(RelPath, Entry)>,
    bytes: usize,
}

impl PartBuilder {
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        PartBuilder {
            max_entries,
            max_bytes,
            current: Vec::new(),
            bytes: 0,
        }
    }

    pub fn push(&mut self, entry: (RelPath, Entry)) -> Option<Vec<(RelPath, Entry)>> {
        let size = entry.0.as_str().len()
            + match &entry.1 {
                Entry::Symlink { target } => target.len(),
                _ => 0,
            }
            + 64;
        let full = (!self.current.is_empty()
            && (self.current.len() >= self.max_entries || self.bytes + size > self.max_bytes))
            .then(|| {
                self.bytes = 0;
                std::mem::take(&mut self.current)
            });
        self.bytes += size;
        self.current.push(entry);
        full
    }

    pub fn finish(self) -> Vec<(RelPath, Entry)> {
        self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{symlink, PermissionsExt};

    #[test]
    fn a_file_swapped_for_a_symlink_is_not_hashed_through_it() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), b"do not hash me").unwrap();
        symlink(outside.path().join("secret"), root.path().join("f")).unwrap();
        // What the walk does after fstatat said "regular file" and the file was swapped.
        let dir = nix::fcntl::open(root.path(), dir_flags(), Mode::empty()).unwrap();
        assert_eq!(hash_file_at(&dir, OsStr::new("f")).unwrap(), None);
        fs::remove_file(root.path().join("f")).unwrap();
        fs::write(root.path().join("f"), b"mine").unwrap();
        let (_, size, hash) = hash_file_at(&dir, OsStr::new("f")).unwrap().unwrap();
        assert_eq!((size, hash), (4, *blake3::hash(b"mine").as_bytes()));
    }

    #[test]
    fn lists_files_dirs_and_symlinks_without_following() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), b"do not list me").unwrap();
        let r = root.path();
        fs::create_dir_all(r.join("src/deep")).unwrap();
        fs::write(r.join("src/app.py"), b"print(1)\n").unwrap();
        fs::set_permissions(r.join("src/app.py"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(r.join("src/deep"), fs::Permissions::from_mode(0o700)).unwrap();
        let big: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        fs::write(r.join("big.bin"), &big).unwrap();
        symlink(outside.path(), r.join("out")).unwrap();
        symlink("src/app.py", r.join("app")).unwrap();
        fs::write(r.join(format!("{TEMP_PREFIX}1-2")), b"half written").unwrap();

        let entries = walk(r).unwrap();
        let names: Vec<&str> = entries.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            names,
            vec!["app", "big.bin", "out", "src", "src/app.py", "src/deep"]
        );
        let get = |n: &str| {
            entries
                .iter()
                .find(|(p, _)| p.as_str() == n)
                .unwrap()
                .1
                .clone()
        };
        assert_eq!(
            get("src/app.py"),
            Entry::File {
                mode: 0o755,
                size: 9,
                hash: devloop_proxy::tree::hash_bytes(b"print(1)\n")
            }
        );
        assert_eq!(
            get("big.bin"),
            Entry::File {
                mode: 0o644 & get_mode(&r.join("big.bin")),
                size: big.len() as u64,
                hash: *blake3::hash(&big).as_bytes()
            }
        );
        assert_eq!(get("src/deep"), Entry::Dir { mode: 0o700 });
        assert_eq!(
            get("out"),
            Entry::Symlink {
                target: outside.path().to_string_lossy().into()
            }
        );
        assert_eq!(
            get("app"),
            Entry::Symlink {
                target: "src/app.py".into()
            }
        );
    }

    fn get_mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn empty_root_gives_one_empty_part() {
        let root = tempfile::tempdir().unwrap();
        let entries = walk(root.path()).unwrap();
        assert!(entries.is_empty());
        assert_eq!(parts(entries, 10, 1000).len(), 1);
    }

    #[test]
    fn parts_respect_limits() {
        let entries: Vec<_> = (0..25)
            .map(|i| {
                (
                    RelPath::new(format!("f{i:02}")).unwrap(),
                    Entry::Dir { mode: 0o755 },
                )
            })
            .collect();
        let cut = parts(entries.clone(), 10, usize::MAX);
        assert_eq!(
            cut.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![10, 10, 5]
        );
        let cut = parts(entries, 1000, 3 * 67);
        assert!(cut.iter().all(|p| p.len() <= 3));
        assert_eq!(cut.iter().map(Vec::len).sum::<usize>(), 25);
    }
}
