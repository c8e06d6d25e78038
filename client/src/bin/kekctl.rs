//! `kekctl`: the command-line client of kekd, and a scripting contract: its output formats
//! and exit codes (see `exit`) are relied on by scripts and tests.
#![forbid(unsafe_code)]

// The crate root sits beside its module directory, so the paths are spelled out.
#[path = "kekctl/anchors.rs"]
mod anchors;
#[path = "kekctl/cli.rs"]
mod cli;
#[path = "kekctl/exit.rs"]
mod exit;
#[path = "kekctl/output.rs"]
mod output;
#[path = "kekctl/run.rs"]
mod run;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let settings = cli.global.settings().unwrap_or_else(|e| e.exit());
    // One connection and strictly sequential work: a thread pool would only add threads.
    // Except for `bench`, which drives many connections at once: one thread per core.
    let built = match cli.command {
        cli::Command::Bench(_) => {
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
        }
        _ => tokio::runtime::Builder::new_current_thread().enable_all().build(),
    };
    let runtime = match built {
        Ok(rt) => rt,
        Err(error) => return fail(exit::CliError::Local { what: "cannot start the async runtime", error }),
    };
    match runtime.block_on(run::run(cli.command, settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn fail(e: exit::CliError) -> ExitCode {
    eprintln!("kekctl: {e}");
    e.exit_code()
}
