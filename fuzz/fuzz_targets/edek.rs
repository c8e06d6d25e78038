#![no_main]
//! See `kekd_fuzz::edek`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| kekd_fuzz::edek(data));
