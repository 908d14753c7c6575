//! File operations confined to the sync root.
//!
//! Confinement has two halves. [`RelPath`] already guarantees that a path cannot name anything
//! outside the root by its spelling (no `..`, not absolute, no empty components). This module
//! adds the other half: it never writes, creates, deletes or chmods *through* a symlink, and it
//! holds that against a process in the container that changes the tree while the agent works.
//!
//! Nothing is done by path name. [`Root`] holds a descriptor of the root directory; for an
//! operation on `a/b/c` the parent `a/b` is opened relative to it with `openat2`
//! (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), or, where the kernel lacks `openat2` (before 5.6)
//! or a parent is missing, one component at a time with `openat(O_NOFOLLOW | O_DIRECTORY)`.
//! Every parent must be a real directory or be absent, in which case it is created as a real
//! directory (`mkdirat`); a symlink parent is refused even when it points inside the root. The
//! operation itself is then done relative to the parent's descriptor (`openat` with
//! `O_NOFOLLOW`, `renameat`, `unlinkat`, `mkdirat`, `symlinkat`, `fchmod` on an opened file),
//! so swapping a checked directory for a symlink afterwards changes nothing: the descriptor
//! still names the directory that was checked. The last component may be a symlink for put,
//! symlink, mkdir and delete: those replace or remove the link itself, never its target. Chmod
//! opens its target with `O_NOFOLLOW` and refuses links. Tree removal descends by descriptor too.
//!
//! A run of operations (one tar stream, one batch) keeps the folder of the last put open for
//! the next put in the same folder ([`Parents`]), instead of resolving it again: a first sync
//! is thousands of files, most of them beside the one before. The kept descriptor is checked
//! exactly as a fresh one is and stays as safe against symlink swaps; see [`Parents`] for what
//! moving the folder does.

use std::ffi::{CStr, OsStr, OsString};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use devloop_proxy::msg::{FileOp, Outcome};
use devloop_proxy::tree::MODE_MASK;
use devloop_proxy::RelPath;
use nix::errno::Errno;
use nix::fcntl::{openat, openat2, renameat, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fchmod, fstatat, mkdirat, FileStat, Mode, SFlag};
use nix::unistd::{symlinkat, unlinkat, UnlinkatFlags};

use crate::error::AgentError;

/// Names of the agent's own temporary files start with this; the index skips them.
pub const TEMP_PREFIX: &str = ".devloop-tmp-";

/// Attempts at a free temporary name before giving up (a leftover of an earlier agent with the
/// same pid takes a name; a hundred of them in one folder means something else is wrong).
const TEMP_ATTEMPTS: u32 = 100;

/// Times a tree removal starts over on a folder that something refilled meanwhile.
const RMDIR_ATTEMPTS: u32 = 10;

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Set once `openat2` answered ENOSYS (a kernel before 5.6): every later parent is then
/// opened one component at a time.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// How parents are resolved; `Walk` only for tests of the fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resolve {
    /// `openat2` on the whole parent path, the component walk when it fails.
    Openat2,
    /// The component walk only (what a kernel without `openat2` gets).
    #[cfg_attr(not(test), allow(dead_code))]
    Walk,
}

/// The folder of the last file put in one run of operations (a tar stream, a batch), kept
/// open for the next put in the same folder: a first sync puts thousands of files, most of
/// them beside the one before, and resolving the parent again for each was 8 % of its time.
///
/// A kept descriptor is exactly as safe as the one a single put resolves and then works
/// through: it names the directory that was checked, and swapping that directory (or any
/// above it) for a symlink changes nothing. A service that *moves* the directory elsewhere
/// takes the next files with it, but only to a place where it may create entries itself
/// (moving a directory needs write permission on both ends), within the same mount. Any
/// operation other than a put forgets the kept folder first, since it may remove or replace
/// it; a folder removed by the service is resolved (and created) again.
#[derive(Debug, Default)]
pub struct Parents {
    folder: String,
    fd: Option<OwnedFd>,
}

impl Parents {
    /// The kept descriptor if it is `folder`'s; the cache is empty afterwards.
    fn take(&mut self, folder: &str) -> Option<OwnedFd> {
        if self.folder == folder {
            self.fd.take()
        } else {
            None
        }
    }

    fn keep(&mut self, folder: &str, fd: OwnedFd) {
        if self.folder != folder {
            self.folder.clear();
            self.folder.push_str(folder);
        }
        self.fd = Some(fd);
    }

    /// Drops the kept folder (before an operation that may remove or replace it).
    pub fn forget(&mut self) {
        self.fd = None;
    }
}

/// The sync root, with the confined operations on it.
#[derive(Debug, Clone)]
pub struct Root {
    dir: PathBuf,
    /// The root directory, opened once: every operation resolves beneath it.
    fd: Arc<OwnedFd>,
    resolve: Resolve,
}

impl Root {
    /// Opens the root directory. `dir` should be absolute and canonical (the agent
    /// canonicalises it at start); it must be a directory, not a symlink to one.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, AgentError> {
        let dir = dir.into();
        let fd = nix::fcntl::open(
            &dir,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| AgentError::io("open root", dir.display(), e.into()))?;
        Ok(Root {
            dir,
            fd: Arc::new(fd),
            resolve: Resolve::Openat2,
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Applies one operation.
    pub fn apply(&self, op: &FileOp) -> Result<(), AgentError> {
        self.apply_in(&mut Parents::default(), op)
    }

    /// Applies one operation of a run, keeping the last put's folder in `parents`.
    pub fn apply_in(&self, parents: &mut Parents, op: &FileOp) -> Result<(), AgentError> {
        if !matches!(op, FileOp::Put { .. }) {
            parents.forget();
        }
        match op {
            FileOp::Put { path, mode, data } => {
                self.put_in(parents, path, *mode, |f| f.write_all(data))
            }
            FileOp::Mkdir { path, mode } => self.mkdir(path, *mode),
            FileOp::Symlink { path, target } => self.symlink(path, target),
            FileOp::Delete { path } => self.delete(path),
            FileOp::Chmod { path, mode } => self.chmod(path, *mode),
        }
    }

    /// Creates or replaces the regular file at `path`: the content is written to a temporary
    /// file in the same directory by `fill`, given `mode`, and renamed over the target, so a
    /// reader sees the old or the new file, never a half-written one.
    pub fn put_with(
        &self,
        path: &RelPath,
        mode: u32,
        fill: impl FnOnce(&mut File) -> io::Result<()>,
    ) -> Result<(), AgentError> {
        self.put_in(&mut Parents::default(), path, mode, fill)
    }

    /// [`Root::put_with`], reusing the parent folder `parents` holds when `path` is in it,
    /// and leaving this put's parent there for the next one.
    pub fn put_in(
        &self,
        parents: &mut Parents,
        path: &RelPath,
        mode: u32,
        fill: impl FnOnce(&mut File) -> io::Result<()>,
    ) -> Result<(), AgentError> {
        const OP: &str = "put";
        let io_err = |e| AgentError::io(OP, path, e);
        let folder = path.as_str().rsplit_once('/').map_or("", |(p, _)| p);
        let name = OsStr::new(path.components().next_back().unwrap_or_default());
        let mut kept = parents.take(folder);
        let (dir, target) = loop {
            let was_kept = kept.is_some();
            let dir = match kept.take() {
                Some(dir) => dir,
                None => {
                    self.parent_dir(OP, path, true)?
                        .ok_or_else(|| not_found(OP, path))?
                        .0
                }
            };
            match open_target(&dir, name) {
                Ok(target) => break (dir, target),
                // The kept folder was removed since (by the service: the agent's own
                // operations forget it first): resolve it again, which creates it.
                Err(e) if was_kept && e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(e)),
            }
        };
        let written = match target {
            // A path nothing holds yet (the bulk of a first sync) is written in place: no
            // reader can be looking for an old version of it, and create + rename would cost
            // twice. O_EXCL refused a path that appeared meanwhile (a symlink included, never
            // followed), which then took the careful way below.
            Target::New(mut file) => {
                let written = fill(&mut file).and_then(|()| set_mode(&file, mode));
                if written.is_err() {
                    drop(file);
                    let _ = unlinkat(&dir, name, UnlinkatFlags::NoRemoveDir);
                }
                written
            }
            Target::Temp(tmp, mut file) => {
                let written = fill(&mut file).and_then(|()| set_mode(&file, mode));
                drop(file);
                let renamed = written
                    .and_then(|()| remove_if_dir(&dir, name))
                    .and_then(|()| {
                        renameat(&dir, tmp.as_os_str(), &dir, name).map_err(io::Error::from)
                    });
                if renamed.is_err() {
                    let _ = unlinkat(&dir, tmp.as_os_str(), UnlinkatFlags::NoRemoveDir);
                }
                renamed
            }
        };
        parents.keep(folder, dir);
        written.map_err(io_err)
    }

    /// Creates the directory (and missing parents as real directories) and sets its mode. A
    /// file or symlink in its place is replaced.
    pub fn mkdir(&self, path: &RelPath, mode: u32) -> Result<(), AgentError> {
        const OP: &str = "mkdir";
        let (dir, name) = self
            .parent_dir(OP, path, true)?
            .ok_or_else(|| not_found(OP, path))?;
        let io_err = |e| AgentError::io(OP, path, e);
        match lstat_at(&dir, name) {
            Ok(Some(st)) if is_dir(&st) => {}
            Ok(Some(_)) => {
                unlinkat(&dir, name, UnlinkatFlags::NoRemoveDir).map_err(|e| io_err(e.into()))?;
                create_dir_at(&dir, name).map_err(io_err)?;
            }
            Ok(None) => create_dir_at(&dir, name).map_err(io_err)?,
            Err(e) => return Err(io_err(e)),
        }
        let opened = open_nofollow(&dir, name).map_err(io_err)?;
        set_mode(&opened, mode).map_err(io_err)
    }

    /// Creates or replaces a symlink (made aside, then renamed over the target). The target
    /// text is stored as given and never followed.
    pub fn symlink(&self, path: &RelPath, link_target: &str) -> Result<(), AgentError> {
        const OP: &str = "symlink";
        let (dir, name) = self
            .parent_dir(OP, path, true)?
            .ok_or_else(|| not_found(OP, path))?;
        let mut attempt = 0;
        let tmp = loop {
            let tmp = temp_name();
            match symlinkat(link_target, &dir, tmp.as_os_str()) {
                Ok(()) => break tmp,
                Err(Errno::EEXIST) if attempt < TEMP_ATTEMPTS => attempt += 1,
                Err(e) => return Err(AgentError::io(OP, path, e.into())),
            }
        };
        let renamed = remove_if_dir(&dir, name)
            .and_then(|()| renameat(&dir, tmp.as_os_str(), &dir, name).map_err(io::Error::from));
        if let Err(e) = renamed {
            let _ = unlinkat(&dir, tmp.as_os_str(), UnlinkatFlags::NoRemoveDir);
            return Err(AgentError::io(OP, path, e));
        }
        Ok(())
    }

    /// Removes a file, a symlink (not its target) or a directory tree. Absent is success.
    pub fn delete(&self, path: &RelPath) -> Result<(), AgentError> {
        const OP: &str = "delete";
        let Some((dir, name)) = self.parent_dir(OP, path, false)? else {
            return Ok(());
        };
        let removed = match lstat_at(&dir, name) {
            Ok(Some(st)) if is_dir(&st) => remove_tree_at(&dir, name),
            Ok(Some(_)) => {
                unlinkat(&dir, name, UnlinkatFlags::NoRemoveDir).map_err(io::Error::from)
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        match removed {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(AgentError::io(OP, path, e)),
            _ => Ok(()),
        }
    }

    /// Sets the permission bits of a file or directory; refuses symlinks.
    pub fn chmod(&self, path: &RelPath, mode: u32) -> Result<(), AgentError> {
        const OP: &str = "chmod";
        let (dir, name) = self
            .parent_dir(OP, path, false)?
            .ok_or_else(|| not_found(OP, path))?;
        let opened = open_nofollow(&dir, name).map_err(|e| match e.raw_os_error() {
            Some(nix::libc::ELOOP) => AgentError::ChmodSymlink {
                path: path.to_string(),
            },
            Some(nix::libc::ENOENT) => not_found(OP, path),
            _ => AgentError::io(OP, path, e),
        })?;
        set_mode(&opened, mode).map_err(|e| AgentError::io(OP, path, e))
    }

    /// Opens the parent directory of `path` beneath the root and returns it with the last
    /// component. Parents must be real directories; absent ones are created when `create` is
    /// set, and otherwise the answer is `None` (nothing to act on).
    fn parent_dir<'p>(
        &self,
        op: &'static str,
        path: &'p RelPath,
        create: bool,
    ) -> Result<Option<(OwnedFd, &'p OsStr)>, AgentError> {
        let components: Vec<&str> = path.components().collect();
        let Some((name, parents)) = components.split_last() else {
            // RelPath is never empty, so there is always a last component.
            return Err(not_found(op, path));
        };
        let name = OsStr::new(*name);
        let dir_flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        if parents.is_empty() {
            let fd = openat(&*self.fd, ".", dir_flags, Mode::empty())
                .map_err(|e| AgentError::io(op, path, e.into()))?;
            return Ok(Some((fd, name)));
        }
        if self.resolve == Resolve::Openat2 && !NO_OPENAT2.load(Ordering::Relaxed) {
            let how = OpenHow::new().flags(dir_flags).resolve(
                ResolveFlag::RESOLVE_BENEATH
                    | ResolveFlag::RESOLVE_NO_SYMLINKS
                    | ResolveFlag::RESOLVE_NO_MAGICLINKS,
            );
            match openat2(&*self.fd, parents.join("/").as_str(), how) {
                Ok(fd) => return Ok(Some((fd, name))),
                Err(Errno::ENOSYS) => {
                    NO_OPENAT2.store(true, Ordering::Relaxed);
                    tracing::info!("the kernel has no openat2 (before 5.6); resolving paths one component at a time");
                }
                // A missing, symlinked or non-directory parent: the walk creates the missing
                // ones and names the one at fault.
                Err(_) => {}
            }
        }
        let mut dir = openat(&*self.fd, ".", dir_flags, Mode::empty())
            .map_err(|e| AgentError::io(op, path, e.into()))?;
        for (i, component) in parents.iter().enumerate() {
            let parent = || components[..=i].join("/");
            let mut created = false;
            dir = loop {
                match openat(&dir, *component, dir_flags, Mode::empty()) {
                    Ok(fd) => break fd,
                    Err(Errno::ENOENT) if create && !created => {
                        match mkdirat(&dir, *component, Mode::from_bits_truncate(0o777)) {
                            // Created by someone else meanwhile: the next open checks it.
                            Ok(()) | Err(Errno::EEXIST) => created = true,
                            Err(e) => return Err(AgentError::io(op, path, e.into())),
                        }
                    }
                    Err(Errno::ENOENT) if !create => return Ok(None),
                    // O_NOFOLLOW | O_DIRECTORY refuses a symlink (ENOTDIR, or ELOOP) as well
                    // as a file: tell them apart for the message.
                    Err(Errno::ENOTDIR | Errno::ELOOP) => {
                        let symlink = lstat_at(&dir, OsStr::new(*component))
                            .ok()
                            .flatten()
                            .is_some_and(|st| file_kind(&st) == SFlag::S_IFLNK);
                        return Err(if symlink {
                            AgentError::ParentIsSymlink {
                                op,
                                path: path.to_string(),
                                parent: parent(),
                            }
                        } else {
                            AgentError::ParentNotDir {
                                op,
                                path: path.to_string(),
                                parent: parent(),
                            }
                        });
                    }
                    Err(e) => return Err(AgentError::io(op, path, e.into())),
                }
            };
        }
        Ok(Some((dir, name)))
    }

    /// The same root resolving parents one component at a time, as on a kernel without
    /// `openat2`.
    #[cfg(test)]
    fn walk_only(mut self) -> Self {
        self.resolve = Resolve::Walk;
        self
    }
}

/// Applies `ops` in order, stopping at the first failure.
pub fn apply_ops(root: &Root, ops: &[FileOp]) -> Outcome {
    let mut parents = Parents::default();
    for (i, op) in ops.iter().enumerate() {
        if let Err(e) = root.apply_in(&mut parents, op) {
            return Outcome::Failed {
                error: format!(
                    "operation {} of {} failed, the {} before it were applied: {e}",
                    i + 1,
                    ops.len(),
                    i
                ),
            };
        }
    }
    Outcome::Ok {
        applied: ops.len() as u64,
    }
}

fn not_found(op: &'static str, path: &RelPath) -> AgentError {
    AgentError::NotFound {
        op,
        path: path.to_string(),
    }
}

fn temp_name() -> OsString {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{TEMP_PREFIX}{}-{n}", std::process::id()).into()
}

fn file_kind(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

fn is_dir(st: &FileStat) -> bool {
    file_kind(st) == SFlag::S_IFDIR
}

/// What `name` in `dir` is, without following a symlink; `None` when absent.
fn lstat_at(dir: &OwnedFd, name: &OsStr) -> io::Result<Option<FileStat>> {
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// A new regular file `name` in `dir` (mode 0600 until filled); fails if anything is there.
fn create_file(dir: &OwnedFd, name: &OsStr) -> io::Result<File> {
    let flags =
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = openat(dir, name, flags, Mode::from_bits_truncate(0o600))?;
    Ok(File::from(fd))
}

fn create_temp_file(dir: &OwnedFd) -> io::Result<(OsString, File)> {
    let mut attempt = 0;
    loop {
        let tmp = temp_name();
        match create_file(dir, &tmp) {
            Ok(f) => return Ok((tmp, f)),
            // A leftover of an earlier agent with the same pid: take the next name.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < TEMP_ATTEMPTS => {
                attempt += 1
            }
            Err(e) => return Err(e),
        }
    }
}

/// Where a put writes: the file itself when nothing is at its name yet, else a temporary file
/// beside it, renamed over it once filled.
enum Target {
    New(File),
    Temp(OsString, File),
}

fn open_target(dir: &OwnedFd, name: &OsStr) -> io::Result<Target> {
    match create_file(dir, name) {
        Ok(file) => Ok(Target::New(file)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let (tmp, file) = create_temp_file(dir)?;
            Ok(Target::Temp(tmp, file))
        }
        Err(e) => Err(e),
    }
}

fn create_dir_at(dir: &OwnedFd, name: &OsStr) -> io::Result<()> {
    mkdirat(dir, name, Mode::from_bits_truncate(0o777)).map_err(io::Error::from)
}

/// Opens `name` in `dir` for fchmod without following a symlink (ELOOP for one); O_NONBLOCK
/// so that a FIFO cannot hang the open.
fn open_nofollow(dir: &OwnedFd, name: &OsStr) -> io::Result<File> {
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    Ok(File::from(openat(dir, name, flags, Mode::empty())?))
}

fn set_mode(file: &File, mode: u32) -> io::Result<()> {
    fchmod(file.as_fd(), Mode::from_bits_truncate(mode & MODE_MASK)).map_err(io::Error::from)
}

/// Removes `name` in `dir` if it is a real directory (so a file or link can be renamed over it).
fn remove_if_dir(dir: &OwnedFd, name: &OsStr) -> io::Result<()> {
    match lstat_at(dir, name)? {
        Some(st) if is_dir(&st) => remove_tree_at(dir, name),
        _ => Ok(()),
    }
}

/// Removes the directory `name` in `dir` and everything in it, descending by descriptor and
/// never following a symlink: an entry swapped for a link meanwhile is removed as a link.
fn remove_tree_at(dir: &OwnedFd, name: &OsStr) -> io::Result<()> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let sub = match openat(dir, name, flags, Mode::empty()) {
        Ok(fd) => fd,
        // Not a directory (any more): remove whatever the name is now.
        Err(Errno::ENOTDIR | Errno::ELOOP) => {
            return unlinkat(dir, name, UnlinkatFlags::NoRemoveDir).map_err(io::Error::from)
        }
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let mut attempt = 0;
    loop {
        for entry in list_dir(&sub)? {
            let entry = entry.as_os_str();
            match unlinkat(&sub, entry, UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => {}
                // A directory: unlink(2) says EISDIR on Linux (EPERM by POSIX).
                Err(Errno::EISDIR | Errno::EPERM) => remove_tree_at(&sub, entry)?,
                Err(e) => return Err(e.into()),
            }
        }
        match unlinkat(dir, name, UnlinkatFlags::RemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => return Ok(()),
            // Refilled meanwhile: empty it again.
            Err(Errno::ENOTEMPTY | Errno::EEXIST) if attempt < RMDIR_ATTEMPTS => attempt += 1,
            Err(e) => return Err(e.into()),
        }
    }
}

/// The names in the directory `dir` (without `.` and `..`).
fn list_dir(dir: &OwnedFd) -> io::Result<Vec<OsString>> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    // A fresh descriptor: its own read position, from the start.
    let fd = openat(dir, ".", flags, Mode::empty())?;
    let mut listing = nix::dir::Dir::from_fd(fd)?;
    let mut names = Vec::new();
    for entry in listing.iter() {
        let entry = entry?;
        let name: &CStr = entry.file_name();
        let bytes = name.to_bytes();
        if bytes != b"." && bytes != b".." {
            names.push(OsStr::from_bytes(bytes).to_os_string());
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{self, Permissions};
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn setup() -> (tempfile::TempDir, tempfile::TempDir, Root) {
        let root_dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = Root::open(root_dir.path().canonicalize().unwrap()).unwrap();
        (root_dir, outside, root)
    }

    fn put(path: &str, data: &[u8]) -> FileOp {
        FileOp::Put {
            path: p(path),
            mode: 0o644,
            data: data.to_vec(),
        }
    }

    fn mode_of(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn escaping_paths_cannot_be_built() {
        for bad in ["../x", "a/../../x", "/etc/passwd", "..", "a//b", ""] {
            assert!(RelPath::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn put_creates_parents_and_content() {
        let (_r, _o, root) = setup();
        root.apply(&put("a/b/c.txt", b"hello")).unwrap();
        assert_eq!(fs::read(root.path().join("a/b/c.txt")).unwrap(), b"hello");
        root.apply(&put("a/b/c.txt", b"again")).unwrap();
        assert_eq!(fs::read(root.path().join("a/b/c.txt")).unwrap(), b"again");
        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(root.path().join("a/b"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("c.txt")]);
    }

    #[test]
    fn put_through_symlinked_dir_pointing_outside_is_refused() {
        let (_r, outside, root) = setup();
        symlink(outside.path(), root.path().join("out")).unwrap();
        let err = root.apply(&put("out/evil", b"x")).unwrap_err();
        assert!(matches!(err, AgentError::ParentIsSymlink { .. }), "{err}");
        let err = root.apply(&put("out/deeper/evil", b"x")).unwrap_err();
        assert!(matches!(err, AgentError::ParentIsSymlink { .. }), "{err}");
        assert!(!outside.path().join("evil").exists());
        assert!(!outside.path().join("deeper").exists());
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
    }

    #[test]
    fn ops_through_symlinked_dir_are_refused_even_inside_root() {
        let (_r, outside, root) = setup();
        fs::create_dir(root.path().join("real")).unwrap();
        fs::write(root.path().join("real/keep"), b"keep").unwrap();
        symlink("real", root.path().join("alias")).unwrap();
        symlink(outside.path(), root.path().join("out")).unwrap();
        fs::write(outside.path().join("x"), b"outside").unwrap();
        let outside_mode = mode_of(&outside.path().join("x"));

        for op in [
            put("alias/new", b"x"),
            FileOp::Mkdir {
                path: p("alias/d"),
                mode: 0o755,
            },
            FileOp::Symlink {
                path: p("alias/l"),
                target: "/etc".into(),
            },
            FileOp::Delete {
                path: p("alias/keep"),
            },
            FileOp::Chmod {
                path: p("alias/keep"),
                mode: 0o777,
            },
            FileOp::Delete { path: p("out/x") },
            FileOp::Chmod {
                path: p("out/x"),
                mode: 0o777,
            },
        ] {
            let err = root.apply(&op).unwrap_err();
            assert!(
                matches!(err, AgentError::ParentIsSymlink { .. }),
                "{op:?}: {err}"
            );
        }
        assert_eq!(fs::read(root.path().join("real/keep")).unwrap(), b"keep");
        assert!(!root.path().join("real/new").exists());
        assert_eq!(fs::read(outside.path().join("x")).unwrap(), b"outside");
        assert_eq!(mode_of(&outside.path().join("x")), outside_mode);
    }

    #[test]
    fn parent_that_is_a_file_is_refused() {
        let (_r, _o, root) = setup();
        root.apply(&put("f", b"x")).unwrap();
        let err = root.apply(&put("f/g", b"x")).unwrap_err();
        assert!(matches!(err, AgentError::ParentNotDir { .. }), "{err}");
    }

    #[test]
    fn put_onto_a_symlink_replaces_the_link_not_its_target() {
        let (_r, outside, root) = setup();
        let victim = outside.path().join("victim");
        fs::write(&victim, b"original").unwrap();
        symlink(&victim, root.path().join("link")).unwrap();
        root.apply(&put("link", b"new content")).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"original");
        let m = fs::symlink_metadata(root.path().join("link")).unwrap();
        assert!(m.file_type().is_file());
        assert_eq!(fs::read(root.path().join("link")).unwrap(), b"new content");
    }

    #[test]
    fn symlink_op_replaces_link_and_delete_removes_link_only() {
        let (_r, outside, root) = setup();
        let victim = outside.path().join("victim");
        fs::write(&victim, b"original").unwrap();
        root.apply(&FileOp::Symlink {
            path: p("l"),
            target: victim.to_string_lossy().into(),
        })
        .unwrap();
        root.apply(&FileOp::Symlink {
            path: p("l"),
            target: "elsewhere".into(),
        })
        .unwrap();
        assert_eq!(
            fs::read_link(root.path().join("l")).unwrap(),
            Path::new("elsewhere")
        );
        symlink(outside.path(), root.path().join("dirlink")).unwrap();
        root.apply(&FileOp::Delete { path: p("dirlink") }).unwrap();
        assert!(fs::symlink_metadata(root.path().join("dirlink")).is_err());
        assert_eq!(fs::read(&victim).unwrap(), b"original");
    }

    #[test]
    fn chmod_on_symlink_is_refused_and_target_untouched() {
        let (_r, outside, root) = setup();
        let victim = outside.path().join("victim");
        fs::write(&victim, b"x").unwrap();
        fs::set_permissions(&victim, Permissions::from_mode(0o600)).unwrap();
        symlink(&victim, root.path().join("l")).unwrap();
        let err = root
            .apply(&FileOp::Chmod {
                path: p("l"),
                mode: 0o777,
            })
            .unwrap_err();
        assert!(matches!(err, AgentError::ChmodSymlink { .. }), "{err}");
        assert_eq!(mode_of(&victim), 0o600);
    }

    #[test]
    fn exec_bit_round_trips() {
        let (_r, _o, root) = setup();
        root.apply(&FileOp::Put {
            path: p("run.sh"),
            mode: 0o755,
            data: b"#!/bin/sh\n".to_vec(),
        })
        .unwrap();
        assert_eq!(mode_of(&root.path().join("run.sh")), 0o755);
        root.apply(&FileOp::Chmod {
            path: p("run.sh"),
            mode: 0o640,
        })
        .unwrap();
        assert_eq!(mode_of(&root.path().join("run.sh")), 0o640);
        // Setuid and friends are never set from the wire.
        root.apply(&FileOp::Chmod {
            path: p("run.sh"),
            mode: 0o4755,
        })
        .unwrap();
        assert_eq!(
            fs::metadata(root.path().join("run.sh"))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777,
            0o755
        );
        root.apply(&FileOp::Mkdir {
            path: p("d/e"),
            mode: 0o700,
        })
        .unwrap();
        assert_eq!(mode_of(&root.path().join("d/e")), 0o700);
    }

    #[test]
    fn directory_replaced_by_file_and_back() {
        let (_r, _o, root) = setup();
        root.apply(&put("x/inner/f", b"1")).unwrap();
        root.apply(&put("x", b"now a file")).unwrap();
        assert_eq!(fs::read(root.path().join("x")).unwrap(), b"now a file");
        root.apply(&FileOp::Mkdir {
            path: p("x"),
            mode: 0o755,
        })
        .unwrap();
        assert!(fs::symlink_metadata(root.path().join("x"))
            .unwrap()
            .is_dir());
        root.apply(&put("x/y", b"2")).unwrap();
        root.apply(&FileOp::Symlink {
            path: p("x"),
            target: "y".into(),
        })
        .unwrap();
        assert!(fs::symlink_metadata(root.path().join("x"))
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn delete_missing_is_success_and_tree_removal_works() {
        let (_r, _o, root) = setup();
        root.apply(&FileOp::Delete {
            path: p("nothing/here"),
        })
        .unwrap();
        root.apply(&put("t/a/b", b"1")).unwrap();
        root.apply(&FileOp::Delete { path: p("t") }).unwrap();
        assert!(!root.path().join("t").exists());
    }

    #[test]
    fn batch_stops_at_first_failure_and_names_it() {
        let (_r, outside, root) = setup();
        symlink(outside.path(), root.path().join("out")).unwrap();
        let ops = vec![put("one", b"1"), put("out/two", b"2"), put("three", b"3")];
        match apply_ops(&root, &ops) {
            Outcome::Failed { error } => {
                assert!(error.contains("operation 2 of 3"), "{error}");
                assert!(error.contains("out/two"), "{error}");
            }
            other => panic!("{other:?}"),
        }
        assert!(root.path().join("one").exists());
        assert!(!root.path().join("three").exists());
        assert_eq!(
            apply_ops(&root, &[put("four", b"4")]),
            Outcome::Ok { applied: 1 }
        );
    }
    /// Everything under `dir`: path, kind, mode and content (or link text), for comparing.
    fn snapshot(dir: &Path) -> Vec<(PathBuf, String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut pending = vec![dir.to_path_buf()];
        while let Some(d) = pending.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let path = e.unwrap().path();
                let m = fs::symlink_metadata(&path).unwrap();
                let rel = path.strip_prefix(dir).unwrap().to_path_buf();
                let mode = m.permissions().mode() & 0o7777;
                if m.file_type().is_symlink() {
                    let text = fs::read_link(&path).unwrap();
                    out.push((
                        rel,
                        "link".into(),
                        0,
                        text.into_os_string().into_encoded_bytes(),
                    ));
                } else if m.is_dir() {
                    out.push((rel, "dir".into(), mode, Vec::new()));
                    pending.push(path);
                } else {
                    out.push((rel, "file".into(), mode, fs::read(&path).unwrap()));
                }
            }
        }
        out.sort();
        out
    }

    /// A process in the container swaps `d` between a real directory and a symlink to a
    /// directory outside the root (atomically, `RENAME_EXCHANGE`) as fast as it can, while
    /// operations into `d` run thousands of times. Nothing outside may change. Against the
    /// earlier path-based checks this failed within a few hundred rounds.
    fn race_swapped_parent(root: Root, kept: bool) {
        use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
        use std::sync::atomic::AtomicBool;

        let outside = tempfile::tempdir().unwrap();
        let o = outside.path();
        fs::write(o.join("victim"), b"outside").unwrap();
        fs::set_permissions(o.join("victim"), Permissions::from_mode(0o640)).unwrap();
        fs::create_dir(o.join("sub")).unwrap();
        fs::write(o.join("sub/keep"), b"keep").unwrap();
        fs::create_dir(o.join("m0")).unwrap();
        let before = snapshot(o);

        let r = root.path().to_path_buf();
        fs::create_dir(r.join("d")).unwrap();
        symlink(o, r.join("spare")).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let swapper = {
            let (stop, r) = (stop.clone(), r.clone());
            std::thread::spawn(move || {
                let mut swaps = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    renameat2(
                        AT_FDCWD,
                        &r.join("d"),
                        AT_FDCWD,
                        &r.join("spare"),
                        RenameFlags::RENAME_EXCHANGE,
                    )
                    .unwrap();
                    swaps += 1;
                }
                swaps
            })
        };
        let mut failures = 0u32;
        let mut parents = Parents::default();
        for i in 0..3000u32 {
            let n = i % 7;
            for op in [
                put(&format!("d/f{n}"), b"new"),
                put("d/victim", b"replaced"),
                FileOp::Mkdir {
                    path: p(&format!("d/m{n}")),
                    mode: 0o700,
                },
                FileOp::Chmod {
                    path: p("d/victim"),
                    mode: 0o777,
                },
                FileOp::Chmod {
                    path: p("d/m0"),
                    mode: 0o777,
                },
                FileOp::Symlink {
                    path: p(&format!("d/l{n}")),
                    target: "/etc/passwd".into(),
                },
                put("d/sub/x", b"x"),
                FileOp::Mkdir {
                    path: p("d/sub/y"),
                    mode: 0o755,
                },
                FileOp::Delete {
                    path: p("d/sub/keep"),
                },
                FileOp::Delete { path: p("d/sub") },
                FileOp::Delete {
                    path: p("d/victim"),
                },
                FileOp::Delete {
                    path: p(&format!("d/f{n}")),
                },
            ] {
                let applied = if kept {
                    root.apply_in(&mut parents, &op)
                } else {
                    root.apply(&op)
                };
                if applied.is_err() {
                    failures += 1;
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        let swaps = swapper.join().unwrap();
        assert!(swaps > 1000, "the swapper hardly ran: {swaps} swaps");
        assert!(
            failures > 0,
            "the race never showed: no operation was refused"
        );
        assert_eq!(snapshot(o), before, "something outside the root changed");
    }

    #[test]
    fn a_parent_swapped_for_a_symlink_mid_operation_never_leads_outside() {
        let (_r, _o, root) = setup();
        race_swapped_parent(root, false);
    }

    /// The same race through one run of operations, which keeps each put's folder for the
    /// next put in it (what a tar stream and a batch do).
    #[test]
    fn a_kept_parent_never_leads_outside_when_swapped() {
        let (_r, _o, root) = setup();
        race_swapped_parent(root, true);
    }

    #[test]
    fn a_run_of_puts_keeps_the_folder_and_resolves_it_again_when_it_changed() {
        let (_r, outside, root) = setup();
        let r = root.path().to_path_buf();
        let mut parents = Parents::default();
        let put_in = |parents: &mut Parents, path: &str, data: &[u8]| {
            root.put_in(parents, &p(path), 0o644, |f| f.write_all(data))
        };
        put_in(&mut parents, "a/b/one", b"1").unwrap();
        put_in(&mut parents, "a/b/two", b"2").unwrap();
        assert_eq!(fs::read(r.join("a/b/two")).unwrap(), b"2");

        // The service removes the kept folder: the next put creates it again.
        fs::remove_dir_all(r.join("a/b")).unwrap();
        put_in(&mut parents, "a/b/three", b"3").unwrap();
        assert_eq!(fs::read(r.join("a/b/three")).unwrap(), b"3");

        // The service moves the kept folder aside and puts a symlink to a folder outside
        // in its place: the next put goes into the folder it holds (inside the root, where
        // the service put it), never through the link.
        fs::rename(r.join("a/b"), r.join("a/moved")).unwrap();
        symlink(outside.path(), r.join("a/b")).unwrap();
        put_in(&mut parents, "a/b/four", b"4").unwrap();
        assert_eq!(fs::read(r.join("a/moved/four")).unwrap(), b"4");
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);

        // Another folder is resolved afresh, and so the symlink is refused there.
        put_in(&mut parents, "c/five", b"5").unwrap();
        let err = put_in(&mut parents, "a/b/six", b"6").unwrap_err();
        assert!(matches!(err, AgentError::ParentIsSymlink { .. }), "{err}");
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);

        // A file put over the kept folder's name: the next put into it is refused.
        put_in(&mut parents, "c/d/six", b"6").unwrap();
        put_in(&mut parents, "c/d", b"file now").unwrap();
        let err = put_in(&mut parents, "c/d/seven", b"7").unwrap_err();
        assert!(matches!(err, AgentError::ParentNotDir { .. }), "{err}");
    }

    #[test]
    fn without_openat2_a_swapped_parent_never_leads_outside_either() {
        let (_r, _o, root) = setup();
        race_swapped_parent(root.walk_only(), false);
    }
}
