//! kekd: a hardware-backed key daemon.
#![deny(unsafe_code)]

mod backend;
mod config;
mod softhsm;

fn main() {}
