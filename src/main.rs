//! The `prism` binary: parses flags, sets up tracing, and hands over to the
//! library. No logic lives here.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    prism::cli::main(prism::cli::Cli::parse())
}
