//! `kekd-tpm-worker --tenant NAME`: the worker of a tenant whose root key is in a TPM.
//!
//! The same worker as `kekd worker`, with the TPM backend linked in. The supervisor
//! starts it (from the directory of the `kekd` binary) with the control channel as stdin.

use clap::Parser;

#[derive(Parser)]
#[command(name = "kekd-tpm-worker", version, about = "kekd's worker for TPM tenants; started by kekd")]
struct Cli {
    #[command(flatten)]
    args: kekd::worker::WorkerArgs,
}

fn main() -> std::process::ExitCode {
    kekd::worker::main(kekd::worker::Backends::ALL, Cli::parse().args)
}
