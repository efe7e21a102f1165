//! Child processes and what /proc says about them: a guard that kills a child
//! when dropped, CPU seconds and resident memory of a process tree, CPU sets.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A running child process, killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    /// Spawns `command` with stdin closed; `what` names it in errors.
    pub fn spawn(what: &str, command: &mut Command) -> Result<Self> {
        let child = command
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {what} ({command:?})"))?;
        Ok(Self {
            name: what.to_string(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// An error if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!("{} exited: {status}", self.name),
            Err(error) => bail!("cannot check on {}: {error}", self.name),
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    pub fn stop(mut self, grace: Duration) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Drop kills what is left.
    }

    /// CPU seconds (user + system) of this process and every descendant.
    pub fn cpu_seconds(&self) -> f64 {
        tree(self.pid())
            .iter()
            .filter_map(|pid| stat_fields(*pid))
            .map(|fields| {
                // Fields 14 and 15 of /proc/<pid>/stat (utime, stime), counted
                // from the state field, which is the first after the name.
                let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
                ticks(11).unwrap_or(0) + ticks(12).unwrap_or(0)
            })
            .sum::<u64>() as f64
            / clock_ticks() as f64
    }

    /// Resident memory of this process tree now (`VmRSS`), in bytes.
    pub fn rss_bytes(&self) -> u64 {
        self.status_sum("VmRSS:")
    }

    /// Highest resident memory of this process tree so far (`VmHWM`), in bytes.
    /// Summed over processes, so an upper bound for a tree of several.
    pub fn peak_rss_bytes(&self) -> u64 {
        self.status_sum("VmHWM:")
    }

    fn status_sum(&self, key: &str) -> u64 {
        tree(self.pid())
            .iter()
            .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
            .filter_map(|status| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            })
            .sum::<u64>()
            * 1024
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `pid` and all its descendants.
fn tree(pid: u32) -> Vec<u32> {
    let mut parents: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            // Field 4 of /proc/<pid>/stat is the parent's pid.
            if let Some(parent) = stat_fields(child).and_then(|f| f.get(1)?.parse().ok()) {
                parents.entry(parent).or_default().push(child);
            }
        }
    }
    let mut all = vec![pid];
    let mut next = 0;
    while next < all.len() {
        if let Some(children) = parents.get(&all[next]) {
            all.extend(children);
        }
        next += 1;
    }
    all
}

/// The fields of /proc/<pid>/stat after the command name, which may itself
/// hold spaces and parentheses: index 0 is the state (field 3).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// Clock ticks per second of /proc/<pid>/stat times (`getconf CLK_TCK`).
fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
            .filter(|t| *t > 0)
            // Linux has used 100 on every mainstream architecture for decades.
            .unwrap_or(100)
    })
}

/// A set of CPU numbers, written like `taskset -c` takes it: `0,2-5`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuSet(pub BTreeSet<u32>);

impl CpuSet {
    pub fn parse(text: &str) -> Result<Self> {
        let mut cpus = BTreeSet::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (low, high) = part.split_once('-').unwrap_or((part, part));
            let low: u32 = low
                .trim()
                .parse()
                .with_context(|| format!("`{text}` is not a CPU list such as `0,2-3`"))?;
            let high: u32 = high
                .trim()
                .parse()
                .with_context(|| format!("`{text}` is not a CPU list such as `0,2-3`"))?;
            if high < low {
                bail!("`{part}` in `{text}`: the range runs backwards");
            }
            cpus.extend(low..=high);
        }
        if cpus.is_empty() {
            bail!("the CPU list `{text}` is empty");
        }
        Ok(Self(cpus))
    }

    /// The CPUs this process may run on (`Cpus_allowed_list`).
    pub fn allowed() -> Result<Self> {
        let status = std::fs::read_to_string("/proc/self/status")?;
        let list = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .context("/proc/self/status has no Cpus_allowed_list")?;
        Self::parse(list)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn without(&self, other: &CpuSet) -> CpuSet {
        CpuSet(self.0.difference(&other.0).copied().collect())
    }

    pub fn is_subset(&self, other: &CpuSet) -> bool {
        self.0.is_subset(&other.0)
    }

    pub fn is_disjoint(&self, other: &CpuSet) -> bool {
        self.0.is_disjoint(&other.0)
    }
}

impl std::fmt::Display for CpuSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list: Vec<String> = self.0.iter().map(u32::to_string).collect();
        f.write_str(&list.join(","))
    }
}

/// A command that runs `program` pinned to `cpus` (through `taskset -c`).
pub fn pinned(taskset: &Path, cpus: &CpuSet, program: &Path) -> Command {
    let mut command = Command::new(taskset);
    command.arg("-c").arg(cpus.to_string()).arg(program);
    command
}

/// Pins every thread of this process to `cpus`; threads and children started
/// afterwards inherit it.
pub fn pin_self(taskset: &Path, cpus: &CpuSet) -> Result<()> {
    let output = Command::new(taskset)
        .args(["-a", "-p", "-c", &cpus.to_string()])
        .arg(std::process::id().to_string())
        .output()
        .context("cannot run taskset")?;
    if !output.status.success() {
        bail!(
            "taskset could not pin the harness to CPUs {cpus}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}
