#![no_main]
//! See `kekd_fuzz::frame`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| kekd_fuzz::frame(data));
