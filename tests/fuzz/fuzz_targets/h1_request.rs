#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| prism_data_plane::fuzz::h1_request(data));
