//! Debian packages: checked by what they provide (a program on PATH, or a
//! probe), installed with apt-get only when missing and only when running as
//! root. Anyone else gets the exact command to run, and an error.

use std::process::Command;

use super::{Result, find_tool, run};

/// A Debian package a command needs, and how to tell it is already there.
pub struct DebianPackage {
    /// The package name, as `apt-get install` takes it.
    pub name: &'static str,
    /// What the package gives us; when that is present, nothing is installed,
    /// however it got there.
    pub provides: Provides,
}

/// How to tell that what a Debian package provides is present.
pub enum Provides {
    /// A program on PATH, e.g. `h2load` from `nghttp2-client`.
    Command(&'static str),
    /// Something only running it can tell, e.g. `python3-venv`: whether
    /// `python3 -m venv` can work. `what` names it in messages.
    Probe {
        what: &'static str,
        check: fn() -> bool,
    },
}

impl DebianPackage {
    fn is_present(&self) -> bool {
        match &self.provides {
            Provides::Command(name) => find_tool(name, None).is_some(),
            Provides::Probe { check, .. } => check(),
        }
    }

    /// `name (what it provides)`, for messages.
    fn describe(&self) -> String {
        match &self.provides {
            Provides::Command(name) => format!("{} (for `{name}`)", self.name),
            Provides::Probe { what, .. } => format!("{} (for {what})", self.name),
        }
    }
}

/// Makes sure every package in `packages` is present. Those missing are
/// installed with `apt-get` when running as root, one line each saying so;
/// otherwise this fails with the command that installs them.
pub fn ensure_debian_packages(packages: &[DebianPackage]) -> Result<()> {
    let missing: Vec<&DebianPackage> = packages.iter().filter(|p| !p.is_present()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = missing.iter().map(|p| p.name).collect();
    let described: Vec<String> = missing.iter().map(|p| p.describe()).collect();
    let described = described.join(", ");
    if find_tool("apt-get", None).is_none() {
        return Err(format!(
            "missing: {described}. This machine has no apt-get: install the equivalent \
             with its package manager, then run this command again"
        )
        .into());
    }
    if !is_root() {
        return Err(format!(
            "missing Debian packages: {described}. Install them as root with\n    \
             {}\nthen run this command again",
            install_command("sudo ", &names)
        )
        .into());
    }

    for package in &missing {
        eprintln!(
            "xtask: installing {} from Debian (apt-get)",
            package.describe()
        );
    }
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&names)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;

    let still: Vec<String> = missing
        .iter()
        .filter(|p| !p.is_present())
        .map(|p| p.describe())
        .collect();
    if still.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "apt-get installed them, but still missing: {}",
            still.join(", ")
        )
        .into())
    }
}

/// `apt-get update && apt-get install …`, each prefixed with `sudo` (or not).
fn install_command(sudo: &str, names: &[&str]) -> String {
    format!(
        "{sudo}apt-get update && {sudo}apt-get install -y --no-install-recommends {}",
        names.join(" ")
    )
}

/// Whether this process runs with effective uid 0. Read from /proc, as std
/// has no `geteuid` and the workspace forbids `unsafe`; unknown means no.
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|status| effective_uid(&status) == Some(0))
}

/// The effective uid from the `Uid:` line of /proc/<pid>/status: real,
/// effective, saved set and filesystem uid, in that order.
fn effective_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_uid_is_the_second_field() {
        let status = "Name:\tcargo\nUmask:\t0022\nUid:\t1000\t0\t1000\t1000\nGid:\t1000\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Name:\tcargo\n"), None);
    }

    #[test]
    fn the_printed_command_installs_exactly_the_missing_packages() {
        assert_eq!(
            install_command("sudo ", &["python3", "python3-venv"]),
            "sudo apt-get update && sudo apt-get install -y --no-install-recommends \
             python3 python3-venv"
        );
    }

    #[test]
    fn nothing_is_installed_when_everything_is_present() {
        // `sh` is present, so this returns before it would look for apt-get
        // or ask for root.
        let packages = [
            DebianPackage {
                name: "dash",
                provides: Provides::Command("sh"),
            },
            DebianPackage {
                name: "probe",
                provides: Provides::Probe {
                    what: "a probe that passes",
                    check: || true,
                },
            },
        ];
        assert!(ensure_debian_packages(&packages).is_ok());
    }
}
