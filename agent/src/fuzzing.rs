//! What the agent's fuzz targets in `fuzz/` run, one function per target, so that
//! `cargo test` replays the saved corpus through exactly the same code
//! (`tests/fuzz_corpus.rs`).
//!
//! Each function takes untrusted bytes and checks properties that must hold for *any* input;
//! it panics when one does not, since a panic is how a fuzzer or a test reports. Not part of
//! the agent's API.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::apply::Root;
use crate::tarstream::apply_tar;

/// The folder the `tar_stream` target works in: fixed, so that an absolute symlink target
/// aimed at the canary can be found by the fuzzer (and is in the seeds).
pub const TAR_SCRATCH: &str = "/tmp/devloop-fuzz-tar";

/// A scratch folder holding the sync `root` and, beside it, a `canary` folder with one file
/// that no tar stream may change, nor anything else beside them.
pub struct TarScratch {
    dir: PathBuf,
    canary: BTreeMap<PathBuf, (u32, Vec<u8>)>,
}

impl TarScratch {
    /// Makes (or takes over and resets) `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> TarScratch {
        let dir = dir.into();
        let _ = fs::remove_dir_all(&dir);
        let canary = dir.join("canary");
        if let Err(e) = fs::create_dir_all(&canary)
            .and_then(|()| fs::write(canary.join("keep"), b"unchanged\n"))
            .and_then(|()| fs::create_dir(dir.join("root")))
        {
            panic!("making the scratch folder {}: {e}", dir.display());
        }
        // The root of an agent is canonical (it canonicalises it at start).
        let dir = match dir.canonicalize() {
            Ok(dir) => dir,
            Err(e) => panic!("canonicalising {}: {e}", dir.display()),
        };
        let canary = snapshot(&dir.join("canary"));
        TarScratch { dir, canary }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// Empties the root for the next run.
    fn reset(&self) {
        let root = self.root();
        if let Err(e) = fs::remove_dir_all(&root).and_then(|()| fs::create_dir(&root)) {
            panic!("emptying {}: {e}", root.display());
        }
    }

    /// Panics when anything outside the root changed.
    fn check(&self, data: &[u8]) {
        let mut beside: Vec<_> = match fs::read_dir(&self.dir) {
            Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.file_name()).collect(),
            Err(e) => panic!("listing {}: {e}", self.dir.display()),
        };
        beside.sort();
        assert_eq!(
            beside,
            ["canary", "root"],
            "a tar stream wrote beside the root ({} input bytes)",
            data.len()
        );
        let root_meta = fs::symlink_metadata(self.root());
        assert!(
            root_meta.is_ok_and(|m| m.is_dir()),
            "the root is no longer a directory"
        );
        assert_eq!(
            snapshot(&self.dir.join("canary")),
            self.canary,
            "a tar stream changed the canary folder beside the root"
        );
    }
}

/// Every path below `dir` (not following symlinks) with its mode and, for files and
/// symlinks, its contents or target.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(at) = todo.pop() {
        let Ok(meta) = fs::symlink_metadata(&at) else {
            continue;
        };
        let rel = at.strip_prefix(dir).unwrap_or(&at).to_path_buf();
        let content = if meta.is_dir() {
            if let Ok(rd) = fs::read_dir(&at) {
                todo.extend(rd.filter_map(|e| e.ok()).map(|e| e.path()));
            }
            Vec::new()
        } else if meta.file_type().is_symlink() {
            fs::read_link(&at)
                .map(|t| t.into_os_string().into_encoded_bytes())
                .unwrap_or_default()
        } else {
            fs::read(&at).unwrap_or_default()
        };
        out.insert(rel, (meta.mode(), content));
    }
    out
}

/// Target `tar_stream`: the bytes as one tar stream applied under a fresh root, the way a
/// `TarChunk` stream is (the same [`apply_tar`]). Whatever it applies or refuses, nothing
/// beside the root may change.
pub fn tar_stream(scratch: &TarScratch, data: &[u8]) {
    scratch.reset();
    // The root was just made by `reset`: opening it fails only if the disk is gone, and a
    // fuzz run has nothing to check then.
    let Ok(root) = Root::open(scratch.root()) else {
        return;
    };
    let _ = apply_tar(&root, data);
    scratch.check(data);
}

/// Target `lease_answer`: the API server's answer to the lease's restore request.
pub fn lease_answer(data: &[u8]) {
    if let Ok(status) = crate::lease::answer_status(data) {
        assert!(matches!(status, 200 | 404 | 409 | 422), "status {status}");
    }
}

/// Target `http_detect`: a connection's first bytes. `classify` never panics, decides once
/// it has the preface's length, and never changes its mind: whatever a prefix of the input
/// decided, the whole input decides too.
pub fn http_detect(data: &[u8]) {
    use crate::http::detect::{classify, Detect, PREFACE};
    let whole = classify(data);
    if data.len() >= PREFACE.len() {
        assert_ne!(
            whole,
            Detect::NeedMore,
            "undecided after {} bytes",
            data.len()
        );
    }
    for n in 0..data.len() {
        if let Detect::Is(p) = classify(&data[..n]) {
            assert_eq!(
                whole,
                Detect::Is(p),
                "decided {p:?} after {n} bytes, then changed"
            );
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::panic::{catch_unwind, AssertUnwindSafe};

    /// The check can fail: a write beside the root, or into the canary, is caught.
    #[test]
    fn the_scratch_check_sees_writes_outside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let scratch = TarScratch::new(dir.path().join("s"));
        scratch.check(b"");
        fs::write(scratch.dir.join("evil"), b"x").unwrap();
        assert!(catch_unwind(AssertUnwindSafe(|| scratch.check(b""))).is_err());
        fs::remove_file(scratch.dir.join("evil")).unwrap();
        fs::write(scratch.dir.join("canary/keep"), b"changed").unwrap();
        assert!(catch_unwind(AssertUnwindSafe(|| scratch.check(b""))).is_err());
    }

    #[test]
    fn a_tar_stream_lands_in_the_root_and_is_emptied_before_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let scratch = TarScratch::new(dir.path().join("s"));
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o644);
        b.append_data(&mut h, "a/b", &b"hi"[..]).unwrap();
        let t = b.into_inner().unwrap();
        tar_stream(&scratch, &t);
        assert_eq!(fs::read(scratch.root().join("a/b")).unwrap(), b"hi");
        tar_stream(&scratch, b"");
        assert!(!scratch.root().join("a").exists());
    }
}
