//! Replays the saved fuzz corpus (`fuzz/corpus/<target>/`, see fuzz/README.md) through the
//! functions the fuzz targets run, so CI checks every input the fuzzer kept. A missing or
//! empty corpus folder fails the test: it cannot pass by finding nothing.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use devloop_proxy::fuzzing;

fn replay(target: &str, run: impl Fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("the corpus {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    assert!(!files.is_empty(), "the corpus {} is empty", dir.display());
    let mut failed = Vec::new();
    for file in &files {
        let data = std::fs::read(file).unwrap();
        if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
            failed.push(file.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: these inputs fail: {failed:#?}"
    );
    eprintln!("{target}: {} inputs replayed", files.len());
}

#[test]
fn laptop_msg() {
    replay("laptop_msg", fuzzing::laptop_msg);
}

#[test]
fn agent_msg() {
    replay("agent_msg", fuzzing::agent_msg);
}

#[test]
fn rel_path() {
    replay("rel_path", fuzzing::rel_path);
}

#[test]
fn tunnel_frame() {
    replay("tunnel_frame", fuzzing::tunnel_frame);
}

#[test]
fn tunnel_mux() {
    replay("tunnel_mux", fuzzing::tunnel_mux);
}

#[test]
fn handoff() {
    replay("handoff", fuzzing::handoff);
}
