//! What xtask commands share: make sure an external tool is present,
//! installing it when it is not and saying so, one line per thing installed.
//!
//! - [`ensure_python_venv`]: a project-local virtual environment holding the
//!   exact PyPI pins of a requirements file; reused while they are satisfied.
//! - [`ensure_debian_packages`]: Debian packages, installed with apt-get only
//!   when missing and only as root; otherwise the command to run, and an error.
//! - [`ensure_npm_ci`]: an npm package's `node_modules`, installed from its
//!   lockfile (`npm ci`) when missing or older than the lockfile.
//! - [`find_tool`]: a program in a venv, else on PATH.
//!
//! Unix only, like the project.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

mod debian;
mod npm;
mod venv;

pub use debian::{DebianPackage, Provides, ensure_debian_packages};
pub use npm::ensure_npm_ci;
pub use venv::{Venv, ensure_python_venv};

/// Errors are messages for the person at the terminal; `main` prints them.
pub type Result<T, E = Box<dyn std::error::Error>> = std::result::Result<T, E>;

/// `name` from the venv's `bin/` when there is one with it, else the first
/// executable `name` on PATH.
pub fn find_tool(name: &str, venv: Option<&Venv>) -> Option<PathBuf> {
    venv.map(|venv| venv.bin().join(name))
        .filter(|path| is_executable(path))
        .or_else(|| find_on_path(name))
}

/// Runs `command` with the terminal's stdin, stdout and stderr; an error
/// names the command and how it ended.
pub fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .map_err(|error| format!("cannot run {}: {error}", display(command)))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{} failed ({status})", display(command)).into())
    }
}

/// `command` as one would type it, for messages.
pub fn display(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// `path` relative to the current directory when it is below it, for messages.
fn shown(path: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| path.to_path_buf())
        .display()
        .to_string()
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_reads_like_the_typed_command() {
        let mut command = Command::new("cargo");
        command.args(["test", "--workspace", "--locked"]);
        assert_eq!(display(&command), "cargo test --workspace --locked");
    }

    #[test]
    fn finds_a_program_on_path_and_not_a_missing_one() {
        // `sh` is on PATH wherever these tests can run at all.
        assert!(find_tool("sh", None).is_some_and(|path| path.ends_with("sh")));
        assert_eq!(find_tool("no-such-tool-for-prism-xtask", None), None);
    }
}
