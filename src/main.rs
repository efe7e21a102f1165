//! The `prism` binary: parses flags, sets up tracing, and hands over to the
//! library. No logic lives here.

use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of glibc's malloc: the request path allocates a few
/// small objects per request (header maps, boxed futures, channel nodes), and
/// mimalloc's thread-local free lists make those ~half as many instructions
/// (callgrind figures in README's Figures).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    prism::cli::main(prism::cli::Cli::parse())
}
