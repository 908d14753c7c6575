//! What a sync root holds, as both sides describe it: the laptop from its disk, the agent from
//! the container's. Equal trees give equal [`tree_hash`]es.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::RelPath;

/// A content hash (BLAKE3).
pub type Hash = [u8; 32];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    File { mode: u32, size: u64, hash: Hash },
    Dir { mode: u32 },
    Symlink { target: String },
}

/// Entries by path; a directory's children sort right after it.
pub type Tree = BTreeMap<RelPath, Entry>;

/// Permission bits that sync carries: all nine rwx bits (the exec bit is what matters).
pub const MODE_MASK: u32 = 0o777;

pub fn hash_bytes(data: &[u8]) -> Hash {
    *blake3::hash(data).as_bytes()
}

/// One hash over paths, kinds, modes and contents; directory modes are left out, because the
/// two sides create directories with their own umask.
pub fn tree_hash(tree: &Tree) -> Hash {
    let mut h = blake3::Hasher::new();
    for (path, entry) in tree {
        h.update(path.as_str().as_bytes());
        h.update(&[0]);
        match entry {
            Entry::File { mode, size, hash } => {
                h.update(b"f");
                h.update(&(mode & MODE_MASK).to_le_bytes());
                h.update(&size.to_le_bytes());
                h.update(hash);
            }
            Entry::Dir { .. } => {
                h.update(b"d");
            }
            Entry::Symlink { target } => {
                h.update(b"l");
                h.update(target.as_bytes());
            }
        }
        h.update(&[0]);
    }
    *h.finalize().as_bytes()
}

pub fn hex(hash: &Hash) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}
