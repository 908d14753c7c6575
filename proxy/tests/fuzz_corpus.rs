//! Replays the saved fuzz corpus (`fuzz/corpus/<target>/`, see fuzz/README.md) through the
//! functions the fuzz targets run, so CI checks every input the fuzzer kept. A missing or
//! empty corpus folder fails the test: it cannot pass by finding nothing.

use devloop_proxy::fuzzing;

fn replay(target: &str, run: impl Fn(&[u8])) {
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let n = devloop_proxy::fuzzing::replay_corpus(&corpus, target, run);
    eprintln!("{target}: {n} inputs replayed");
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

#[test]
fn route_filter() {
    replay("route_filter", fuzzing::route_filter);
}
