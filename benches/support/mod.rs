//! What the benches share: the real `prism` binary as a child process.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A `prism` child process, killed when dropped, and the line of addresses
/// it printed first (`listening: admin=http://… xds=http://…`).
pub struct Prism {
    pub child: Child,
    line: String,
}

impl Prism {
    /// Starts `prism ARGS` with errors-only logs and reads its first line.
    pub fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_prism"))
            .args(args)
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .spawn()
            .expect("prism starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout is piped"))
            .read_line(&mut line)
            .expect("prism prints its addresses");
        Self { child, line }
    }

    /// `prism control-plane` on free loopback ports, its data in `dir`.
    pub fn control_plane(dir: &Path) -> Self {
        Self::start(&[
            "control-plane",
            "--admin-addr",
            "127.0.0.1:0",
            "--xds-addr",
            "127.0.0.1:0",
            "--data-dir",
            &dir.display().to_string(),
        ])
    }

    /// The admin token a control plane with its data in `dir` wrote there
    /// (by the time it printed its addresses).
    pub fn admin_token(dir: &Path) -> String {
        let file = dir.join("admin-token");
        std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("the admin token in {}: {e}", file.display()))
            .trim()
            .to_string()
    }

    /// The address printed as `name=ADDRESS`.
    pub fn address(&self, name: &str) -> String {
        self.line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name}= in {:?}", self.line))
            .to_string()
    }
}

impl Drop for Prism {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
