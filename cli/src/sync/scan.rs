//! Reading the laptop's tree: what the filter lets through, with content hashes where a
//! comparison needs them.

use devloop_proxy::tree::{hash_bytes, Entry, Hash, Tree, MODE_MASK};
use devloop_proxy::RelPath;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::filter::Filter;

/// The hash of a file whose content has not been read yet ([`scan_meta`]). A real BLAKE3
/// hash of all zeros is as likely as guessing a 256-bit key, so it cannot be confused with
/// one; a diff against it always finds the file changed, which is right for the only files
/// left unhashed: those the other side lacks or holds at another size.
pub const UNHASHED: Hash = [0; 32];

/// Reads one path as the sync sees it: `None` when it is gone or ignored.
pub fn read_entry(root: &Path, rel: &Path, filter: &Filter) -> std::io::Result<Option<Entry>> {
    read_entry_with(root, rel, filter, true)
}

fn read_entry_with(
    root: &Path,
    rel: &Path,
    filter: &Filter,
    hash: bool,
) -> std::io::Result<Option<Entry>> {
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
    } else if ft.is_file() && !hash {
        Ok(Some(Entry::File {
            mode,
            size: meta.len(),
            hash: UNHASHED,
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

pub fn hash_file(path: &Path) -> std::io::Result<(u64, Hash)> {
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
/// files hashed, reading nested ignore files into `filter` on the way. Unreadable entries
/// are reported in `errors` and left out (a later event retries them).
pub fn scan_into(
    root: &Path,
    rel_dir: &Path,
    filter: &mut Filter,
    tree: &mut Tree,
    errors: &mut Vec<String>,
) {
    walk(root, rel_dir, filter, tree, errors, true)
}

fn walk(
    root: &Path,
    rel_dir: &Path,
    filter: &mut Filter,
    tree: &mut Tree,
    errors: &mut Vec<String>,
    hash: bool,
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
            match read_entry_with(root, &rel, filter, hash) {
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

/// The whole filtered tree under `root`, every file hashed (on all cores).
pub fn scan(root: &Path, filter: &mut Filter) -> (Tree, Vec<String>) {
    let (mut tree, mut errors) = scan_meta(root, filter);
    hash_where(root, &mut tree, &mut errors, |_, _| true);
    (tree, errors)
}

/// The whole filtered tree under `root` without reading any file: files carry [`UNHASHED`]
/// until [`hash_where`] fills in the ones that need comparing.
pub fn scan_meta(root: &Path, filter: &mut Filter) -> (Tree, Vec<String>) {
    let mut tree = Tree::new();
    let mut errors = Vec::new();
    walk(root, Path::new(""), filter, &mut tree, &mut errors, false);
    (tree, errors)
}

/// Hashes the unhashed files for which `need(path, size)` holds, on all cores. A file that
/// vanished meanwhile is dropped from the tree (the watcher reports its deletion).
pub fn hash_where(
    root: &Path,
    tree: &mut Tree,
    errors: &mut Vec<String>,
    need: impl Fn(&RelPath, u64) -> bool,
) {
    let todo: Vec<(RelPath, u64)> = tree
        .iter()
        .filter_map(|(p, e)| match e {
            Entry::File { size, hash, .. } if *hash == UNHASHED && need(p, *size) => {
                Some((p.clone(), *size))
            }
            _ => None,
        })
        .collect();
    if todo.is_empty() {
        return;
    }
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8);
    // Split by bytes (plus a per-file cost), so one thread does not get all the big files.
    let total: u64 = todo.iter().map(|(_, s)| s + 4096).sum();
    let share = total / threads as u64 + 1;
    let mut chunks: Vec<Vec<RelPath>> = vec![Vec::new()];
    let mut acc = 0;
    for (p, size) in todo {
        if acc >= share && chunks.len() < threads {
            chunks.push(Vec::new());
            acc = 0;
        }
        acc += size + 4096;
        if let Some(last) = chunks.last_mut() {
            last.push(p);
        }
    }
    type Hashed = Vec<(RelPath, std::io::Result<(u64, Hash)>)>;
    let results: Vec<Hashed> = std::thread::scope(|scope| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .into_iter()
                        .map(|p| {
                            let r = hash_file(&root.join(p.as_str()));
                            (p, r)
                        })
                        .collect::<Hashed>()
                })
            })
            .collect();
        // A hashing thread only panics on a bug; its files then stay unhashed, which a diff
        // treats as changed: they are sent again and nothing is lost.
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    for (p, r) in results.into_iter().flatten() {
        match r {
            Ok((size, hash)) => {
                if let Some(Entry::File {
                    size: s, hash: h, ..
                }) = tree.get_mut(&p)
                {
                    *s = size;
                    *h = hash;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tree.remove(&p);
            }
            Err(e) => errors.push(format!("{p}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::filter::FilterSettings;

    #[test]
    fn meta_scan_hashes_only_what_is_asked() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), "aaa").unwrap();
        std::fs::write(d.path().join("b"), "bb").unwrap();
        let mut f = Filter::new(
            d.path(),
            FilterSettings {
                excludes: vec![],
                include_node_modules: false,
            },
        )
        .unwrap();
        let (mut tree, mut errors) = scan_meta(d.path(), &mut f);
        assert!(tree
            .values()
            .all(|e| matches!(e, Entry::File { hash: UNHASHED, .. })));
        hash_where(d.path(), &mut tree, &mut errors, |p, size| {
            p.as_str() == "a" && size == 3
        });
        assert!(
            matches!(tree[&RelPath::new("a").unwrap()], Entry::File { size: 3, hash, .. } if hash == hash_bytes(b"aaa"))
        );
        assert!(matches!(
            tree[&RelPath::new("b").unwrap()],
            Entry::File { hash: UNHASHED, .. }
        ));
        let (full, _) = scan(d.path(), &mut f);
        assert!(full
            .values()
            .all(|e| !matches!(e, Entry::File { hash: UNHASHED, .. })));
    }

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
