#![no_main]
//! See `kekd_fuzz::request`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| kekd_fuzz::request(data));
