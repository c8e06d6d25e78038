#![no_main]
//! See `kekd_fuzz::connection`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| kekd_fuzz::connection(data));
