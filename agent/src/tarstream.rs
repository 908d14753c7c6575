//! Tar streams: chunks arrive over the connection, a blocking task reads them as one tar
//! archive and applies each entry through the same confined code as file operations
//! ([`crate::apply::Root`]). tar's own `unpack` is never used.

use std::cell::Cell;
use std::io::{self, Read};
use std::path::{Component, Path};
use std::rc::Rc;

use devloop_proxy::msg::Outcome;
use devloop_proxy::tree::MODE_MASK;
use devloop_proxy::RelPath;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::apply::{Parents, Root};
use crate::error::AgentError;

/// Chunks buffered between the connection and the blocking reader.
const CHUNKS_IN_FLIGHT: usize = 4;

/// The most the tar reader may read between two entries: headers, GNU long names and pax
/// extensions (which tar holds in memory whole), and the data of entries that are skipped.
/// A peer cannot make the agent hold more than this for one entry's name; the cli sends
/// names of at most 4 KiB and no data in the entries the agent skips.
pub const MAX_BETWEEN_ENTRIES: u64 = 1024 * 1024;

/// Counts the bytes read while `armed` (between two entries) and fails the read beyond
/// [`MAX_BETWEEN_ENTRIES`].
struct Metered<R> {
    inner: R,
    between: Rc<Cell<Option<u64>>>,
}

impl<R: Read> Read for Metered<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        if let Some(read) = self.between.get() {
            let read = read + n as u64;
            if read > MAX_BETWEEN_ENTRIES {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "more than {MAX_BETWEEN_ENTRIES} bytes of headers, long names or skipped data between two entries"
                    ),
                ));
            }
            self.between.set(Some(read));
        }
        Ok(n)
    }
}

/// A blocking `Read` over chunks sent through a tokio channel; end of stream when the
/// sending side is dropped. Before it waits for a chunk it publishes how many chunks it has
/// fully consumed, so the connection can tell when everything sent so far is applied.
pub struct ChunkReader {
    chunk_rx: mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
    taken: u64,
    consumed_tx: watch::Sender<u64>,
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        while self.pos >= self.buf.len() {
            self.consumed_tx.send_replace(self.taken);
            match self.chunk_rx.blocking_recv() {
                Some(chunk) => {
                    self.buf = chunk;
                    self.pos = 0;
                    self.taken += 1;
                }
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Reads a tar archive from `reader` and applies regular files, directories and symlinks
/// (other kinds are skipped) under `root`, stopping at the first refused or failed entry.
/// Returns the number of entries applied. After the end-of-archive marker the rest of the
/// stream is read and dropped, so the sender never waits on a reader that stopped.
pub fn apply_tar(root: &Root, reader: impl Read) -> Result<u64, AgentError> {
    let between = Rc::new(Cell::new(None));
    let mut archive = tar::Archive::new(Metered {
        inner: reader,
        between: between.clone(),
    });
    let mut applied = 0u64;
    let mut parents = Parents::default();
    let mut entries = archive.entries().map_err(AgentError::Tar)?;
    loop {
        // Finding the next entry reads what is left of this one, then headers and names.
        between.set(Some(0));
        let Some(entry) = entries.next() else {
            break;
        };
        between.set(None);
        let mut entry = entry.map_err(AgentError::Tar)?;
        let raw = entry.path().map_err(AgentError::Tar)?.into_owned();
        let Some(path) = entry_path(&raw)? else {
            continue;
        };
        let kind = entry.header().entry_type();
        let mode = || {
            entry
                .header()
                .mode()
                .map(|m| m & MODE_MASK)
                .map_err(AgentError::Tar)
        };
        if kind.is_file() || kind == tar::EntryType::Continuous {
            let size = entry.size();
            let mode = mode()?;
            root.put_in(&mut parents, &path, mode, |file| {
                // tar's entry reader ends quietly at the end of the stream: a short copy
                // means the stream was cut inside this entry.
                let copied = io::copy(&mut entry, file)?;
                if copied == size {
                    Ok(())
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "tar stream ended inside this entry",
                    ))
                }
            })?;
        } else if kind.is_dir() {
            parents.forget();
            root.mkdir(&path, mode()?)?;
        } else if kind.is_symlink() {
            let refuse = |reason: &str| AgentError::TarEntry {
                entry: path.to_string(),
                reason: reason.into(),
            };
            let target = entry
                .link_name()
                .map_err(AgentError::Tar)?
                .ok_or_else(|| refuse("symlink without a target"))?;
            let target = target
                .to_str()
                .ok_or_else(|| refuse("symlink target is not UTF-8"))?
                .to_string();
            parents.forget();
            root.symlink(&path, &target)?;
        } else {
            tracing::debug!(entry = %path, kind = ?kind, "tar: entry kind not synced, skipped");
            continue;
        }
        applied += 1;
    }
    between.set(None);
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(AgentError::Tar)?;
    Ok(applied)
}

/// The entry's path as a [`RelPath`]; `None` for the archive's root (`.` or `./`). Anything
/// that is absolute or climbs with `..` is refused.
fn entry_path(raw: &Path) -> Result<Option<RelPath>, AgentError> {
    let refuse = |reason: &str| AgentError::TarEntry {
        entry: raw.to_string_lossy().into_owned(),
        reason: reason.into(),
    };
    let mut parts = Vec::new();
    for c in raw.components() {
        match c {
            Component::Normal(s) => {
                parts.push(s.to_str().ok_or_else(|| refuse("name is not UTF-8"))?)
            }
            Component::CurDir => {}
            Component::ParentDir => return Err(refuse("`..` leaves the root")),
            Component::RootDir | Component::Prefix(_) => return Err(refuse("absolute path")),
        }
    }
    if parts.is_empty() {
        return Ok(None);
    }
    RelPath::new(parts.join("/"))
        .map(Some)
        .map_err(|e| refuse(&e.to_string()))
}

/// One open tar stream of a connection.
pub struct TarSession {
    pub req: u64,
    chunk_tx: mpsc::Sender<Vec<u8>>,
    consumed_rx: watch::Receiver<u64>,
    sent: u64,
    task: JoinHandle<Result<u64, AgentError>>,
}

impl TarSession {
    pub fn start(root: Root, req: u64) -> Self {
        let (chunk_tx, chunk_rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
        let (consumed_tx, consumed_rx) = watch::channel(0);
        let reader = ChunkReader {
            chunk_rx,
            buf: Vec::new(),
            pos: 0,
            taken: 0,
            consumed_tx,
        };
        let task = tokio::task::spawn_blocking(move || apply_tar(&root, reader));
        TarSession {
            req,
            chunk_tx,
            consumed_rx,
            sent: 0,
            task,
        }
    }

    /// Hands a chunk to the reader (waits while it is behind). When the reader has already
    /// stopped on an error, the chunk is dropped; the error is reported by [`TarSession::finish`].
    pub async fn feed(&mut self, data: Vec<u8>) {
        if self.chunk_tx.send(data).await.is_ok() {
            self.sent += 1;
        }
    }

    /// Waits until every chunk sent so far has been read and its complete entries applied,
    /// so an operation that arrives after them applies after them too.
    pub async fn settle(&mut self) {
        let sent = self.sent;
        // An error means the reader is gone: nothing more will be applied.
        let _ = self.consumed_rx.wait_for(|&n| n >= sent).await;
    }

    /// Ends the stream and waits for the reader's result.
    pub async fn finish(self) -> Outcome {
        drop(self.chunk_tx);
        match self.task.await {
            Ok(Ok(applied)) => Outcome::Ok { applied },
            Ok(Err(e)) => Outcome::Failed {
                error: e.to_string(),
            },
            Err(e) => Outcome::Failed {
                error: format!("tar stream task failed: {e}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h
    }

    fn sample_tar() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        b.append_data(&mut h, "./", io::empty()).unwrap();
        let mut h = header(tar::EntryType::Directory, 0o750, 0);
        b.append_data(&mut h, "bin", io::empty()).unwrap();
        let data = b"#!/bin/sh\necho hi\n";
        let mut h = header(tar::EntryType::Regular, 0o755, data.len() as u64);
        b.append_data(&mut h, "bin/run.sh", &data[..]).unwrap();
        let big: Vec<u8> = (0..700_000u32).map(|i| (i % 253) as u8).collect();
        let mut h = header(tar::EntryType::Regular, 0o644, big.len() as u64);
        b.append_data(&mut h, "data/big.bin", &big[..]).unwrap();
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, "run", "bin/run.sh").unwrap();
        let mut h = header(tar::EntryType::Fifo, 0o644, 0);
        b.append_data(&mut h, "fifo", io::empty()).unwrap();
        b.into_inner().unwrap()
    }

    /// A tar entry whose name is written straight into the header bytes, past tar's checks.
    fn raw_named_entry(name: &[u8], data: &[u8]) -> Vec<u8> {
        let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
        let old = h.as_old_mut();
        old.name = [0; 100];
        old.name[..name.len()].copy_from_slice(name);
        h.set_cksum();
        let mut b = tar::Builder::new(Vec::new());
        b.append(&h, data).unwrap();
        b.into_inner().unwrap()
    }

    fn root() -> (tempfile::TempDir, Root) {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("root")).unwrap();
        let root = Root::open(dir.path().join("root")).unwrap();
        (dir, root)
    }

    #[test]
    fn applies_files_dirs_and_symlinks_with_modes() {
        let (_d, root) = root();
        let applied = apply_tar(&root, &sample_tar()[..]).unwrap();
        assert_eq!(applied, 4, "root entry and fifo are skipped");
        let r = root.path();
        assert_eq!(
            fs::read(r.join("bin/run.sh")).unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
        assert_eq!(
            fs::metadata(r.join("bin/run.sh"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o755
        );
        assert_eq!(
            fs::metadata(r.join("bin")).unwrap().permissions().mode() & 0o777,
            0o750
        );
        assert_eq!(fs::read(r.join("data/big.bin")).unwrap().len(), 700_000);
        assert_eq!(
            fs::read_link(r.join("run")).unwrap(),
            Path::new("bin/run.sh")
        );
        assert!(!r.join("fifo").exists());
    }

    #[test]
    fn dotdot_entry_is_refused_and_nothing_escapes() {
        let (dir, root) = root();
        let evil = raw_named_entry(b"../evil", b"pwned");
        // Check the raw entry really says `../evil`, so the test cannot pass vacuously.
        let mut a = tar::Archive::new(&evil[..]);
        let first = a.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(first.path().unwrap(), Path::new("../evil"));
        drop(first);

        let err = apply_tar(&root, &evil[..]).unwrap_err();
        assert!(matches!(err, AgentError::TarEntry { .. }), "{err}");
        assert!(!dir.path().join("evil").exists());

        let abs = raw_named_entry(b"/tmp/devloop-evil-abs", b"pwned");
        assert!(matches!(
            apply_tar(&root, &abs[..]).unwrap_err(),
            AgentError::TarEntry { .. }
        ));
        assert!(!Path::new("/tmp/devloop-evil-abs").exists());
    }

    #[test]
    fn entry_through_symlinked_dir_is_refused() {
        let (dir, root) = root();
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.path().join("out")).unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = header(tar::EntryType::Regular, 0o644, 1);
        b.append_data(&mut h, "out/x", &b"x"[..]).unwrap();
        let t = b.into_inner().unwrap();
        assert!(matches!(
            apply_tar(&root, &t[..]).unwrap_err(),
            AgentError::ParentIsSymlink { .. }
        ));
        assert!(!outside.join("x").exists());
    }

    /// A GNU long name (which tar reads into memory whole) above the limit is refused
    /// once the limit is read, not held.
    #[test]
    fn a_huge_long_name_is_refused() {
        struct Counting<'a, R>(R, &'a std::cell::Cell<u64>);
        impl<R: Read> Read for Counting<'_, R> {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                let n = self.0.read(out)?;
                self.1.set(self.1.get() + n as u64);
                Ok(n)
            }
        }
        let (_d, root) = root();
        let size = 64 * MAX_BETWEEN_ENTRIES;
        let mut h = header(tar::EntryType::GNULongName, 0o644, size);
        h.set_cksum();
        let read = std::cell::Cell::new(0u64);
        let stream = Counting(h.as_bytes().chain(io::repeat(b'a').take(size)), &read);
        let err = apply_tar(&root, stream).unwrap_err();
        assert!(err.to_string().contains("between two entries"), "{err}");
        assert!(
            read.get() <= MAX_BETWEEN_ENTRIES + 64 * 1024,
            "{}",
            read.get()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn session_applies_a_chunked_stream() {
        let (_d, root) = root();
        let t = sample_tar();
        let mut session = TarSession::start(root.clone(), 7);
        for chunk in t.chunks(1000) {
            session.feed(chunk.to_vec()).await;
        }
        session.settle().await;
        // Everything sent is applied before the stream is finished.
        assert!(root.path().join("run").symlink_metadata().is_ok());
        assert_eq!(session.finish().await, Outcome::Ok { applied: 4 });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn truncated_stream_fails() {
        let (_d, root) = root();
        let t = sample_tar();
        let mut session = TarSession::start(root.clone(), 7);
        session.feed(t[..5000].to_vec()).await;
        assert!(matches!(session.finish().await, Outcome::Failed { .. }));
    }
}
