//! An npm package's dependencies, installed exactly as its committed
//! lockfile says (`npm ci`), only when `node_modules` is missing or older
//! than the lockfile.

use std::path::Path;
use std::process::Command;
use std::time::SystemTime;

use super::{Result, find_tool, run, shown};

/// Runs `npm ci` in `package` (a directory with `package.json` and
/// `package-lock.json`) when its `node_modules` is missing, or was installed
/// before the lockfile last changed; says so on one line.
pub fn ensure_npm_ci(package: &Path) -> Result<()> {
    let lockfile = package.join("package-lock.json");
    // npm writes this file on every install: its age is the install's.
    let installed = package.join("node_modules/.package-lock.json");
    let why = match (modified(&installed), modified(&lockfile)) {
        (None, _) => "node_modules is missing",
        (Some(installed), Some(locked)) if installed < locked => {
            "node_modules is older than package-lock.json"
        }
        _ => return Ok(()),
    };
    if find_tool("npm", None).is_none() {
        return Err(format!(
            "{why} in {}, and there is no `npm` on PATH: install Node.js 20 or newer with npm",
            shown(package)
        )
        .into());
    }
    eprintln!("xtask: running npm ci in {} ({why})", shown(package));
    run(Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(package))
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}
