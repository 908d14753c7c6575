#![no_main]

use std::sync::OnceLock;

use devloop_agent::fuzzing::{tar_stream, TarScratch, TAR_SCRATCH};

// One scratch folder per process, emptied before each run (run one fuzzing process at a
// time: the folder is fixed, see devloop_agent::fuzzing::TAR_SCRATCH).
static SCRATCH: OnceLock<TarScratch> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tar_stream(SCRATCH.get_or_init(|| TarScratch::new(TAR_SCRATCH)), data)
});
