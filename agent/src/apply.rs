//! File operations confined to the sync root.
//!
//! Confinement has two halves. [`RelPath`] already guarantees that a path cannot name anything
//! outside the root by its spelling (no `..`, not absolute, no empty components). This module
//! adds the other half: it never writes, creates, deletes or chmods *through* a symlink. For an
//! operation on `a/b/c`, every parent (`a`, `a/b`) must be a real directory (checked with
//! `symlink_metadata`, which does not follow links) or be absent, in which case it is created as
//! a real directory. A symlink parent is refused even when it points inside the root. The last
//! component may be a symlink for put, symlink and delete: those replace or remove the link
//! itself, never its target. Chmod opens its target with `O_NOFOLLOW` and refuses links.
//!
//! The checks are path based, so a process inside the container that swaps a checked directory
//! for a symlink between the check and the write could still redirect one write. The agent's
//! threat is the network peer, which can only reach the tree through these operations.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use devloop_proxy::msg::{FileOp, Outcome};
use devloop_proxy::tree::MODE_MASK;
use devloop_proxy::RelPath;
use nix::fcntl::OFlag;

use crate::error::AgentError;

/// Names of the agent's own temporary files start with this; the index skips them.
pub const TEMP_PREFIX: &str = ".devloop-tmp-";

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The sync root, with the confined operations on it.
#[derive(Debug, Clone)]
pub struct Root {
    dir: PathBuf,
}

impl Root {
    /// `dir` should be absolute and canonical (the agent canonicalises it at start).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Root { dir: dir.into() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Applies one operation.
    pub fn apply(&self, op: &FileOp) -> Result<(), AgentError> {
        match op {
            FileOp::Put { path, mode, data } => self.put_with(path, *mode, |f| f.write_all(data)),
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
        const OP: &str = "put";
        let (dir, name) = self
            .parent_dir(OP, path, true)?
            .ok_or_else(|| not_found(OP, path))?;
        let target = dir.join(name);
        // A path nothing holds yet (the bulk of a first sync) is written in place: no reader
        // can be looking for an old version of it, and create + rename would cost twice.
        // O_EXCL refuses a path that appeared meanwhile (a symlink included), which then
        // takes the careful way below.
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&target)
        {
            Ok(mut file) => {
                let written = fill(&mut file)
                    .and_then(|()| file.set_permissions(Permissions::from_mode(mode & MODE_MASK)));
                if let Err(e) = written {
                    drop(file);
                    let _ = fs::remove_file(&target);
                    return Err(AgentError::io(OP, path, e));
                }
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(AgentError::io(OP, path, e)),
        }
        let (tmp, mut file) = create_temp_file(&dir).map_err(|e| AgentError::io(OP, path, e))?;
        let written = fill(&mut file)
            .and_then(|()| file.set_permissions(Permissions::from_mode(mode & MODE_MASK)));
        drop(file);
        let renamed = written
            .and_then(|()| remove_if_dir(&target))
            .and_then(|()| fs::rename(&tmp, &target));
        if let Err(e) = renamed {
            let _ = fs::remove_file(&tmp);
            return Err(AgentError::io(OP, path, e));
        }
        Ok(())
    }

    /// Creates the directory (and missing parents as real directories) and sets its mode. A
    /// file or symlink in its place is replaced.
    pub fn mkdir(&self, path: &RelPath, mode: u32) -> Result<(), AgentError> {
        const OP: &str = "mkdir";
        let (dir, name) = self
            .parent_dir(OP, path, true)?
            .ok_or_else(|| not_found(OP, path))?;
        let target = dir.join(name);
        let io_err = |e| AgentError::io(OP, path, e);
        match fs::symlink_metadata(&target) {
            Ok(m) if m.file_type().is_dir() => {}
            Ok(_) => {
                fs::remove_file(&target).map_err(io_err)?;
                create_real_dir(&target).map_err(io_err)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                create_real_dir(&target).map_err(io_err)?
            }
            Err(e) => return Err(io_err(e)),
        }
        set_mode_nofollow(&target, mode).map_err(io_err)
    }

    /// Creates or replaces a symlink (made aside, then renamed over the target). The target
    /// text is stored as given and never followed.
    pub fn symlink(&self, path: &RelPath, link_target: &str) -> Result<(), AgentError> {
        const OP: &str = "symlink";
        let (dir, name) = self
            .parent_dir(OP, path, true)?
            .ok_or_else(|| not_found(OP, path))?;
        let target = dir.join(name);
        let mut attempt = 0;
        let tmp = loop {
            let tmp = dir.join(temp_name());
            match std::os::unix::fs::symlink(link_target, &tmp) {
                Ok(()) => break tmp,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 100 => attempt += 1,
                Err(e) => return Err(AgentError::io(OP, path, e)),
            }
        };
        let renamed = remove_if_dir(&target).and_then(|()| fs::rename(&tmp, &target));
        if let Err(e) = renamed {
            let _ = fs::remove_file(&tmp);
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
        let target = dir.join(name);
        let removed = match fs::symlink_metadata(&target) {
            // std's remove_dir_all does not follow symlinks inside the tree.
            Ok(m) if m.file_type().is_dir() => fs::remove_dir_all(&target),
            Ok(_) => fs::remove_file(&target),
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
        let target = dir.join(name);
        match fs::symlink_metadata(&target) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(AgentError::ChmodSymlink {
                    path: path.to_string(),
                })
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_found(OP, path)),
            Err(e) => return Err(AgentError::io(OP, path, e)),
        }
        set_mode_nofollow(&target, mode).map_err(|e| {
            if e.raw_os_error() == Some(nix::libc::ELOOP) {
                AgentError::ChmodSymlink {
                    path: path.to_string(),
                }
            } else {
                AgentError::io(OP, path, e)
            }
        })
    }

    /// Checks every parent of `path` and returns the parent directory and the last component.
    /// Parents must be real directories; absent ones are created when `create` is set, and
    /// otherwise the answer is `None` (nothing to act on).
    fn parent_dir<'p>(
        &self,
        op: &'static str,
        path: &'p RelPath,
        create: bool,
    ) -> Result<Option<(PathBuf, &'p str)>, AgentError> {
        let components: Vec<&str> = path.components().collect();
        let Some((name, parents)) = components.split_last() else {
            // RelPath is never empty, so there is always a last component.
            return Err(not_found(op, path));
        };
        let mut dir = self.dir.clone();
        for (i, component) in parents.iter().enumerate() {
            dir.push(component);
            let parent = || components[..=i].join("/");
            match fs::symlink_metadata(&dir) {
                Ok(m) => check_parent_type(op, path, &m, parent)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(None);
                    }
                    match create_real_dir(&dir) {
                        Ok(()) => {}
                        // Created by someone else meanwhile: check what it is.
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                            let m = fs::symlink_metadata(&dir)
                                .map_err(|e| AgentError::io(op, path, e))?;
                            check_parent_type(op, path, &m, parent)?;
                        }
                        Err(e) => return Err(AgentError::io(op, path, e)),
                    }
                }
                Err(e) => return Err(AgentError::io(op, path, e)),
            }
        }
        Ok(Some((dir, name)))
    }
}

/// Applies `ops` in order, stopping at the first failure.
pub fn apply_ops(root: &Root, ops: &[FileOp]) -> Outcome {
    for (i, op) in ops.iter().enumerate() {
        if let Err(e) = root.apply(op) {
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

fn check_parent_type(
    op: &'static str,
    path: &RelPath,
    meta: &fs::Metadata,
    parent: impl Fn() -> String,
) -> Result<(), AgentError> {
    let ft = meta.file_type();
    if ft.is_symlink() {
        Err(AgentError::ParentIsSymlink {
            op,
            path: path.to_string(),
            parent: parent(),
        })
    } else if !ft.is_dir() {
        Err(AgentError::ParentNotDir {
            op,
            path: path.to_string(),
            parent: parent(),
        })
    } else {
        Ok(())
    }
}

fn not_found(op: &'static str, path: &RelPath) -> AgentError {
    AgentError::NotFound {
        op,
        path: path.to_string(),
    }
}

fn temp_name() -> String {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{TEMP_PREFIX}{}-{n}", std::process::id())
}

fn create_temp_file(dir: &Path) -> io::Result<(PathBuf, File)> {
    let mut attempt = 0;
    loop {
        let tmp = dir.join(temp_name());
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            // A leftover of an earlier agent with the same pid: take the next name.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 100 => attempt += 1,
            Err(e) => return Err(e),
        }
    }
}

fn create_real_dir(path: &Path) -> io::Result<()> {
    fs::create_dir(path)
}

/// Removes `path` if it is a real directory (so a file or link can be renamed over it).
fn remove_if_dir(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_dir() => fs::remove_dir_all(path),
        _ => Ok(()),
    }
}

/// chmod without following a symlink: open with O_NOFOLLOW (O_NONBLOCK so a FIFO cannot hang
/// the open), then fchmod.
fn set_mode_nofollow(path: &Path, mode: u32) -> io::Result<()> {
    let flags = OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits())
        .open(path)?;
    file.set_permissions(Permissions::from_mode(mode & MODE_MASK))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn setup() -> (tempfile::TempDir, tempfile::TempDir, Root) {
        let root_dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = Root::new(root_dir.path().canonicalize().unwrap());
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
}
