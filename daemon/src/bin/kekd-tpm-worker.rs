//! `kekd-tpm-worker --tenant NAME`: the worker of a tenant whose root key is in a TPM.
//!
//! The same worker as `kekd worker`, with the TPM backend linked in. The supervisor
//! starts it (from the directory of the `kekd` binary) with the control channel as stdin.

fn main() -> std::process::ExitCode {
    kekd::worker::main(kekd::worker::Backends::ALL)
}
