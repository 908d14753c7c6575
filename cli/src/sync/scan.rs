//! Reading the laptop's tree: what the filter lets through, with content hashes.

use devloop_proxy::tree::{hash_bytes, Entry, Tree, MODE_MASK};
use devloop_proxy::RelPath;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::filter::Filter;

/// Reads one path as the sync sees it: `None` when it is gone or ignored.
pub fn read_entry(root: &Path, rel: &Path, filter: &Filter) -> std::io::Result<Option<Entry>> {
    let abs = root.join(rel);
    let meta = match std::fs::symlink_metadata(&abs) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let ft = meta.file_type();
    if filter.is_ignored(rel, ft.is_dir()) {
        return Ok(None);
    }
    let mode = meta.permissions().mode() & MODE_MASK;
    if ft.is_dir() {
        Ok(Some(Entry::Dir { mode }))
    } else if ft.is_symlink() {
        let target = std::fs::read_link(&abs)?;
        Ok(Some(Entry::Symlink {
            target: target.to_string_lossy().into_owned(),
        }))
    } else if ft.is_file() {
        match hash_file(&abs) {
            Ok((size, hash)) => Ok(Some(Entry::File { mode, size, hash })),
            // Deleted between stat and open: the watcher reports the delete next.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    } else {
        // Sockets, fifos and devices are not synced.
        Ok(None)
    }
}

pub fn hash_file(path: &Path) -> std::io::Result<(u64, devloop_proxy::tree::Hash)> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    if len <= 256 * 1024 {
        let mut buf = Vec::with_capacity(len as usize);
        f.read_to_end(&mut buf)?;
        Ok((buf.len() as u64, hash_bytes(&buf)))
    } else {
        let mut h = blake3::Hasher::new();
        let n = std::io::copy(&mut f, &mut h)?;
        Ok((n, *h.finalize().as_bytes()))
    }
}

/// Walks `rel_dir` (relative; empty for the whole root) and adds what it holds to `tree`,
/// reading nested ignore files into `filter` on the way. Unreadable entries are reported in
/// `errors` and left out (a later event retries them).
pub fn scan_into(
    root: &Path,
    rel_dir: &Path,
    filter: &mut Filter,
    tree: &mut Tree,
    errors: &mut Vec<String>,
) {
    let mut stack = vec![rel_dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        filter.load_dir(&dir);
        let rd = match std::fs::read_dir(root.join(&dir)) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                errors.push(format!("{}: {e}", root.join(&dir).display()));
                continue;
            }
        };
        for item in rd.flatten() {
            let rel = dir.join(item.file_name());
            match read_entry(root, &rel, filter) {
                Ok(Some(entry)) => {
                    let Ok(path) = RelPath::from_path(&rel) else {
                        errors.push(format!(
                            "{}: name is not valid UTF-8, not synced",
                            rel.display()
                        ));
                        continue;
                    };
                    if matches!(entry, Entry::Dir { .. }) {
                        stack.push(rel);
                    }
                    tree.insert(path, entry);
                }
                Ok(None) => {}
                Err(e) => errors.push(format!("{}: {e}", rel.display())),
            }
        }
    }
}

/// The whole filtered tree under `root`.
pub fn scan(root: &Path, filter: &mut Filter) -> (Tree, Vec<String>) {
    let mut tree = Tree::new();
    let mut errors = Vec::new();
    scan_into(root, Path::new(""), filter, &mut tree, &mut errors);
    (tree, errors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::filter::FilterSettings;

    #[test]
    fn scan_sees_files_dirs_links_modes_and_skips_ignored() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("src/empty")).unwrap();
        std::fs::write(r.join("src/app.py"), "x").unwrap();
        std::fs::write(r.join("run.sh"), "#!/bin/sh").unwrap();
        std::fs::set_permissions(r.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("src/app.py", r.join("link")).unwrap();
        std::fs::create_dir_all(r.join(".git")).unwrap();
        std::fs::write(r.join(".git/HEAD"), "ref").unwrap();
        std::fs::write(r.join("x.pyc"), "").unwrap();
        let mut f = Filter::new(
            r,
            FilterSettings {
                excludes: vec!["*.pyc".into()],
                include_node_modules: false,
            },
        )
        .unwrap();
        let (tree, errors) = scan(r, &mut f);
        assert!(errors.is_empty(), "{errors:?}");
        let keys: Vec<&str> = tree.keys().map(|k| k.as_str()).collect();
        assert_eq!(keys, ["link", "run.sh", "src", "src/app.py", "src/empty"]);
        assert!(matches!(
            tree[&RelPath::new("run.sh").unwrap()],
            Entry::File { mode: 0o755, .. }
        ));
        assert_eq!(
            tree[&RelPath::new("link").unwrap()],
            Entry::Symlink {
                target: "src/app.py".into()
            }
        );
        match &tree[&RelPath::new("src/app.py").unwrap()] {
            Entry::File { size, hash, .. } => {
                assert_eq!(*size, 1);
                assert_eq!(*hash, hash_bytes(b"x"));
            }
            e => panic!("{e:?}"),
        }
    }
}
