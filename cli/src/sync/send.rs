//! Turning planned changes into what goes on the wire: small sets as one batch of file
//! operations, large ones as a tar stream (deletions first, in a batch, since tar cannot say
//! "remove"). Reports the entries the agent now holds, as they were read at send time.

use devloop_proxy::msg::FileOp;
use devloop_proxy::tree::{hash_bytes, Entry};
use devloop_proxy::RelPath;
use std::io::Write;
use std::path::{Path, PathBuf};
use tokio::sync::mpsc;

use super::diff::Change;
use crate::agent_link::{AgentLink, LinkError};

/// Above either of these a plan goes as a tar stream.
const BATCH_MAX_BYTES: u64 = 4 * 1024 * 1024;
const BATCH_MAX_FILES: usize = 512;

/// What was sent, with the entries as read (content may have moved on since the scan).
#[derive(Debug, Default)]
pub struct Sent {
    pub applied: Vec<(Change, Option<Entry>)>,
    pub files: u64,
    pub bytes: u64,
}

pub async fn send_changes(
    link: &AgentLink,
    root: &Path,
    changes: Vec<Change>,
    mut progress: impl FnMut(u64, u64),
) -> Result<Sent, LinkError> {
    let put_bytes: u64 = changes
        .iter()
        .map(|c| if let Change::Put(_, _, s) = c { *s } else { 0 })
        .sum();
    let put_count = changes
        .iter()
        .filter(|c| matches!(c, Change::Put(..)))
        .count();
    if put_bytes <= BATCH_MAX_BYTES
        && put_count <= BATCH_MAX_FILES
        && !changes
            .iter()
            .any(|c| matches!(c, Change::Put(_, _, s) if *s > devloop_proxy::MAX_INLINE_FILE))
    {
        let root = root.to_path_buf();
        let (ops, sent) = tokio::task::spawn_blocking(move || build_ops(&root, changes))
            .await
            .map_err(|e| LinkError::Failed(format!("reading laptop files: {e}")))?;
        if !ops.is_empty() {
            link.batch(ops).await?;
        }
        return Ok(sent);
    }

    // Large: deletions and chmods as batches around one tar stream of everything else.
    let (deletes, rest): (Vec<Change>, Vec<Change>) = changes
        .into_iter()
        .partition(|c| matches!(c, Change::Delete(_)));
    let (chmods, creates): (Vec<Change>, Vec<Change>) = rest
        .into_iter()
        .partition(|c| matches!(c, Change::Chmod(..)));
    let mut sent = Sent::default();
    if !deletes.is_empty() {
        let ops = deletes
            .iter()
            .map(|c| FileOp::Delete {
                path: c.path().clone(),
            })
            .collect();
        link.batch(ops).await?;
        sent.applied.extend(deletes.into_iter().map(|c| (c, None)));
    }
    let (chunk_tx, chunk_rx) = mpsc::channel::<std::io::Result<Vec<u8>>>(8);
    let root_buf = root.to_path_buf();
    let builder = tokio::task::spawn_blocking(move || write_tar(&root_buf, creates, chunk_tx));
    let mut done = 0u64;
    let result = link
        .tar(chunk_rx, |n| {
            done += n as u64;
            progress(done, put_bytes);
        })
        .await;
    let tar_sent = builder
        .await
        .map_err(|e| LinkError::Failed(format!("building the tar stream: {e}")))?;
    result?;
    sent.files += tar_sent.files;
    sent.bytes += tar_sent.bytes;
    sent.applied.extend(tar_sent.applied);
    if !chmods.is_empty() {
        let root = root.to_path_buf();
        let (ops, s) = tokio::task::spawn_blocking(move || build_ops(&root, chmods))
            .await
            .map_err(|e| LinkError::Failed(format!("reading laptop files: {e}")))?;
        link.batch(ops).await?;
        sent.applied.extend(s.applied);
    }
    Ok(sent)
}

/// Reads what the changes need from the laptop. A file that vanished since the scan is left
/// out: the watcher reports its deletion next.
fn build_ops(root: &Path, changes: Vec<Change>) -> (Vec<FileOp>, Sent) {
    let mut ops = Vec::with_capacity(changes.len());
    let mut sent = Sent::default();
    for change in changes {
        let entry = match &change {
            Change::Delete(p) => {
                ops.push(FileOp::Delete { path: p.clone() });
                None
            }
            Change::Mkdir(p, mode) => {
                ops.push(FileOp::Mkdir {
                    path: p.clone(),
                    mode: *mode,
                });
                Some(Entry::Dir { mode: *mode })
            }
            Change::Symlink(p, target) => {
                ops.push(FileOp::Symlink {
                    path: p.clone(),
                    target: target.clone(),
                });
                Some(Entry::Symlink {
                    target: target.clone(),
                })
            }
            Change::Chmod(p, mode) => {
                ops.push(FileOp::Chmod {
                    path: p.clone(),
                    mode: *mode,
                });
                None
            }
            Change::Put(p, mode, _) => match std::fs::read(abs(root, p)) {
                Ok(data) => {
                    let e = Entry::File {
                        mode: *mode,
                        size: data.len() as u64,
                        hash: hash_bytes(&data),
                    };
                    sent.files += 1;
                    sent.bytes += data.len() as u64;
                    ops.push(FileOp::Put {
                        path: p.clone(),
                        mode: *mode,
                        data,
                    });
                    Some(e)
                }
                Err(_) => continue,
            },
        };
        sent.applied.push((change, entry));
    }
    (ops, sent)
}

fn abs(root: &Path, p: &RelPath) -> PathBuf {
    root.join(p.as_str())
}

/// Cuts what tar writes into chunks for the WebSocket.
struct ChunkWriter {
    buf: Vec<u8>,
    tx: mpsc::Sender<std::io::Result<Vec<u8>>>,
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= devloop_proxy::TAR_CHUNK_BYTES {
            self.flush()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            let chunk = std::mem::replace(
                &mut self.buf,
                Vec::with_capacity(devloop_proxy::TAR_CHUNK_BYTES + 64 * 1024),
            );
            self.tx.blocking_send(Ok(chunk)).map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::BrokenPipe,
                    "connection to the agent closed",
                )
            })?;
        }
        Ok(())
    }
}

fn write_tar(
    root: &Path,
    creates: Vec<Change>,
    tx: mpsc::Sender<std::io::Result<Vec<u8>>>,
) -> Sent {
    let err_tx = tx.clone();
    let mut sent = Sent::default();
    let mut b = tar::Builder::new(ChunkWriter {
        buf: Vec::with_capacity(devloop_proxy::TAR_CHUNK_BYTES + 64 * 1024),
        tx,
    });
    b.mode(tar::HeaderMode::Deterministic);
    let run = || -> std::io::Result<()> {
        for change in creates {
            let entry = match &change {
                Change::Mkdir(p, mode) => {
                    let mut h = tar::Header::new_gnu();
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(*mode);
                    h.set_size(0);
                    b.append_data(&mut h, p.as_str(), std::io::empty())?;
                    Entry::Dir { mode: *mode }
                }
                Change::Symlink(p, target) => {
                    let mut h = tar::Header::new_gnu();
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    h.set_mode(0o777);
                    b.append_link(&mut h, p.as_str(), target)?;
                    Entry::Symlink {
                        target: target.clone(),
                    }
                }
                Change::Put(p, mode, _) => {
                    let Ok(data) = std::fs::read(abs(root, p)) else {
                        continue;
                    };
                    let mut h = tar::Header::new_gnu();
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, p.as_str(), &data[..])?;
                    sent.files += 1;
                    sent.bytes += data.len() as u64;
                    Entry::File {
                        mode: *mode,
                        size: data.len() as u64,
                        hash: hash_bytes(&data),
                    }
                }
                Change::Delete(_) | Change::Chmod(..) => continue,
            };
            sent.applied.push((change, Some(entry)));
        }
        b.finish()?;
        b.get_mut().flush()
    };
    if let Err(e) = run() {
        let _ = err_tx.blocking_send(Err(e));
        sent.applied.clear();
    }
    sent
}
