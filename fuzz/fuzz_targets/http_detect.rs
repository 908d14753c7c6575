#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devloop_agent::fuzzing::http_detect(data));
