//! `cargo xtask fuzz [--seconds N] [TARGET]`: the cargo-fuzz targets of
//! tests/fuzz, each run for a bounded time. Installs cargo-fuzz when it is
//! missing (saying so), builds every target once on the stable toolchain
//! (`RUSTC_BOOTSTRAP=1` lets cargo-fuzz pass its nightly-only flags), then
//! runs each with libFuzzer's `-max_total_time`, and fails naming the
//! reproducer file of each target that crashed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use crate::tools::{self, Result};

/// The fuzz crate, relative to the repository root.
pub const FUZZ_DIR: &str = "tests/fuzz";
/// Fuzzing time per target unless `--seconds` says otherwise.
const DEFAULT_SECONDS: u64 = 60;

/// What `cargo xtask fuzz` was asked to do.
#[derive(Debug, PartialEq, Eq)]
pub struct Args {
    pub seconds: u64,
    pub target: Option<String>,
}

impl Args {
    /// Parses `[--seconds N] [TARGET]`.
    pub fn parse(args: &[String]) -> Result<Args> {
        let mut parsed = Args {
            seconds: DEFAULT_SECONDS,
            target: None,
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let seconds = match arg.strip_prefix("--seconds") {
                Some("") => args.next().map(String::as_str),
                Some(rest) => rest.strip_prefix('='),
                None => None,
            };
            if arg.starts_with("--seconds") {
                parsed.seconds = seconds
                    .and_then(|s| s.parse().ok())
                    .filter(|&s| s > 0)
                    .ok_or("--seconds: expected a whole number of seconds above 0")?;
            } else if arg.starts_with('-') {
                return Err(format!("fuzz: unknown option `{arg}`; `cargo xtask help`").into());
            } else if parsed.target.replace(arg.clone()).is_some() {
                return Err("fuzz: at most one TARGET".into());
            }
        }
        Ok(parsed)
    }
}

/// Runs the fuzz targets as `args` says; fails if any crashed.
pub fn fuzz(root: &Path, args: Args) -> Result<ExitCode> {
    let fuzz_dir = root.join(FUZZ_DIR);
    let all = targets(&fuzz_dir)?;
    let chosen = match args.target {
        Some(target) if all.contains(&target) => vec![target],
        Some(target) => {
            return Err(format!(
                "fuzz: no target `{target}`; the targets are {}",
                all.join(", ")
            )
            .into());
        }
        None => all,
    };
    ensure_cargo_fuzz(root)?;

    tools::run(
        cargo_fuzz(root)
            .args(["build", "--fuzz-dir", FUZZ_DIR])
            .args(FLAGS),
    )?;
    let mut crashed = Vec::new();
    for target in &chosen {
        let artifacts = fuzz_dir.join("artifacts").join(target);
        let before = files(&artifacts);
        let corpus = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .map_err(|e| format!("cannot create {}: {e}", corpus.display()))?;
        let mut run = cargo_fuzz(root);
        run.args(["run", "--fuzz-dir", FUZZ_DIR])
            .args(FLAGS)
            .arg(target)
            .arg(&corpus);
        // Seeds are read, never written: libFuzzer adds to the first corpus.
        let seeds = fuzz_dir.join("seeds").join(target);
        if seeds.is_dir() {
            run.arg(&seeds);
        }
        run.arg("--")
            .arg(format!("-max_total_time={}", args.seconds))
            // An input this slow is a finding too.
            .arg("-timeout=30");
        eprintln!("xtask: fuzzing `{target}` for {} s", args.seconds);
        let status = run
            .status()
            .map_err(|error| format!("cannot run {}: {error}", tools::display(&run)))?;
        if !status.success() {
            let new: Vec<PathBuf> = files(&artifacts).difference(&before).cloned().collect();
            crashed.push((target.clone(), new));
        }
    }
    if crashed.is_empty() {
        eprintln!("xtask: no crashes in {}", chosen.join(", "));
        return Ok(ExitCode::SUCCESS);
    }
    for (target, reproducers) in &crashed {
        if reproducers.is_empty() {
            eprintln!("xtask: fuzz target `{target}` failed without writing a reproducer");
        }
        for file in reproducers {
            let file = file.strip_prefix(root).unwrap_or(file).display();
            eprintln!(
                "xtask: fuzz target `{target}` crashed; reproducer: {file}\n  \
                 replay: cargo fuzz run --fuzz-dir {FUZZ_DIR} {target} {file}\n  \
                 once fixed, keep it: cp {file} {FUZZ_DIR}/regressions/{target}/"
            );
        }
    }
    Ok(ExitCode::FAILURE)
}

/// cargo-fuzz flags for every build and run: no sanitizer (the code is safe
/// Rust; coverage guidance and panics are what find its bugs, and the build
/// is faster), with debug assertions and overflow checks on.
const FLAGS: [&str; 3] = ["--sanitizer=none", "--debug-assertions", "--release"];

/// `cargo fuzz` run from the repository root on the stable toolchain.
fn cargo_fuzz(root: &Path) -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command
        .current_dir(root)
        .env("RUSTC_BOOTSTRAP", "1")
        .arg("fuzz");
    command
}

/// Installs cargo-fuzz with `cargo install --locked` unless `cargo fuzz` runs.
fn ensure_cargo_fuzz(root: &Path) -> Result<()> {
    let present = cargo_fuzz(root)
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    if present {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz (cargo install cargo-fuzz --locked)");
    let mut install = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    tools::run(install.args(["install", "cargo-fuzz", "--locked"]))
}

/// The targets: the files of `<fuzz_dir>/fuzz_targets`, by name.
fn targets(fuzz_dir: &Path) -> Result<Vec<String>> {
    let dir = fuzz_dir.join("fuzz_targets");
    let mut names: Vec<String> = files(&dir)
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .filter_map(|p| p.file_stem()?.to_str().map(String::from))
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(format!("no fuzz targets in {}", dir.display()).into());
    }
    Ok(names)
}

/// The files directly in `dir`; none when it does not exist.
fn files(dir: &Path) -> BTreeSet<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.is_file())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Args> {
        let args: Vec<String> = line.split_whitespace().map(String::from).collect();
        Args::parse(&args)
    }

    #[test]
    fn seconds_and_target_are_read() {
        let args = parse("").expect("no arguments");
        assert_eq!((args.seconds, args.target), (DEFAULT_SECONDS, None));
        let args = parse("--seconds 5 stager").expect("both");
        assert_eq!((args.seconds, args.target.as_deref()), (5, Some("stager")));
        let args = parse("routes --seconds=7").expect("either order, = form");
        assert_eq!((args.seconds, args.target.as_deref()), (7, Some("routes")));
    }

    #[test]
    fn bad_arguments_are_named() {
        for line in [
            "--seconds",
            "--seconds 0",
            "--seconds x",
            "--minutes 1",
            "a b",
        ] {
            let error = parse(line).expect_err(line).to_string();
            assert!(
                error.contains("--seconds")
                    || error.contains("--minutes")
                    || error.contains("TARGET"),
                "{line}: {error}"
            );
        }
    }

    #[test]
    fn the_targets_are_the_files_of_fuzz_targets() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the root");
        assert_eq!(
            targets(&root.join(FUZZ_DIR)).expect("targets"),
            ["h1_request", "policy", "routes", "stager"]
        );
    }
}
