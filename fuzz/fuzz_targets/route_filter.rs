#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devloop_proxy::fuzzing::route_filter(data));
