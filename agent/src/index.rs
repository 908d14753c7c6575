//! The agent's view of its root: every file, directory and symlink below it, with content
//! hashes, in the shape the laptop compares against ([`devloop_proxy::tree::Entry`]).

use std::fs;
use std::io::{self, Read};
use std::path::Path;

use devloop_proxy::tree::{Entry, Hash, MODE_MASK};
use devloop_proxy::RelPath;
use std::os::unix::fs::PermissionsExt;

use crate::apply::TEMP_PREFIX;

/// Files up to this size are read whole; larger ones are hashed as a stream.
const READ_WHOLE_BYTES: u64 = 1024 * 1024;

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

/// [`walk`] without collecting: each entry goes to `emit` as it is found (in no particular
/// order), so a large tree never sits in memory whole. `emit` returning false stops the walk.
pub fn walk_with(root: &Path, mut emit: impl FnMut((RelPath, Entry)) -> bool) -> io::Result<()> {
    let mut entries = Emitter {
        emit: &mut emit,
        stopped: false,
    };
    let mut pending: Vec<(std::path::PathBuf, Option<RelPath>)> = vec![(root.to_path_buf(), None)];
    while let Some((dir, rel)) = pending.pop() {
        if entries.stopped {
            break;
        }
        let read = match fs::read_dir(&dir) {
            Ok(read) => read,
            // The root itself must be readable; anything below may vanish meanwhile.
            Err(e) if rel.is_some() => {
                tracing::warn!(dir = %dir.display(), error = %e, "index: cannot read directory, skipped");
                continue;
            }
            Err(e) => return Err(e),
        };
        for item in read {
            let item = match item {
                Ok(item) => item,
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "index: cannot list directory entry, skipped");
                    continue;
                }
            };
            let name = item.file_name();
            let Some(name) = name.to_str() else {
                tracing::warn!(dir = %dir.display(), name = ?name, "index: name is not UTF-8, skipped");
                continue;
            };
            if name.starts_with(TEMP_PREFIX) {
                continue;
            }
            let path = match &rel {
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
            let full = item.path();
            let meta = match fs::symlink_metadata(&full) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    tracing::warn!(path = %path, error = %e, "index: cannot stat, skipped");
                    continue;
                }
            };
            let ft = meta.file_type();
            let mode = meta.permissions().mode() & MODE_MASK;
            if ft.is_symlink() {
                match fs::read_link(&full) {
                    Ok(target) => match target.into_os_string().into_string() {
                        Ok(target) => entries.push((path, Entry::Symlink { target })),
                        Err(_) => {
                            tracing::warn!(path = %path, "index: symlink target is not UTF-8, skipped")
                        }
                    },
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!(path = %path, error = %e, "index: cannot read symlink, skipped")
                    }
                }
            } else if ft.is_dir() {
                entries.push((path.clone(), Entry::Dir { mode }));
                pending.push((full, Some(path)));
            } else if ft.is_file() {
                match hash_file(&full, meta.len()) {
                    Ok((size, hash)) => entries.push((path, Entry::File { mode, size, hash })),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!(path = %path, error = %e, "index: cannot read file, skipped")
                    }
                }
            }
        }
    }
    Ok(())
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

/// Size and BLAKE3 hash of what was actually read (the file may change under us; the hash
/// then describes one consistent read, and the next reconcile catches up).
fn hash_file(path: &Path, len_hint: u64) -> io::Result<(u64, Hash)> {
    let mut file = fs::File::open(path)?;
    if len_hint <= READ_WHOLE_BYTES {
        let mut data = Vec::with_capacity(len_hint as usize);
        file.read_to_end(&mut data)?;
        Ok((data.len() as u64, *blake3::hash(&data).as_bytes()))
    } else {
        let mut hasher = blake3::Hasher::new();
        hasher.update_reader(&mut file)?;
        Ok((hasher.count(), *hasher.finalize().as_bytes()))
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
    use std::os::unix::fs::symlink;

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
