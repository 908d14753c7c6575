//! Replays the saved fuzz corpus (`fuzz/corpus/<target>/`, see fuzz/README.md) through the
//! functions the fuzz targets run, so CI checks every input the fuzzer kept. A missing or
//! empty corpus folder fails the test: it cannot pass by finding nothing.

use devloop_agent::fuzzing::{self, TarScratch};

fn replay(target: &str, run: impl Fn(&[u8])) {
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let n = devloop_proxy::fuzzing::replay_corpus(&corpus, target, run);
    eprintln!("{target}: {n} inputs replayed");
}

#[test]
fn tar_stream() {
    // A folder of this test's own (the fuzz target uses a fixed one).
    let dir = tempfile::tempdir().unwrap();
    let scratch = TarScratch::new(dir.path().join("scratch"));
    replay("tar_stream", |data| fuzzing::tar_stream(&scratch, data));
}

#[test]
fn lease_answer() {
    replay("lease_answer", fuzzing::lease_answer);
}

#[test]
fn http_detect() {
    replay("http_detect", fuzzing::http_detect);
}
