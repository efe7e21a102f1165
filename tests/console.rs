//! The web console in a real browser: `prism up` (the real binary, on free
//! ports), the quickstart applied, a viewer token made through the API,
//! then `node --test` runs the console's unit tests
//! (`admin-ui/tests/unit.test.mjs`) and `admin-ui/tests/console.spec.mjs`, which drives
//! Debian's Chromium (headless, through playwright-core) against the
//! console at `/ui`: sign-in, an edit through the editor that the proxy then
//! serves, a rollback from the history page, an endpoint's live health on
//! the backends page, a live chart, a viewer's read-only console, and
//! screenshots of the main pages.
//!
//! Chromium (`/usr/bin/chromium`, or `PRISM_CHROMIUM`), Node and
//! `admin-ui/node_modules` must be there; `cargo xtask test` installs what
//! is missing. Without them this test fails and says so: it never skips.
//! The screenshots go to `PRISM_CONSOLE_SCREENSHOTS` when set (e.g.
//! `admin-ui/screenshots`, to update the README's), else under the target
//! directory.

mod support;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::{Admin, PrismUp, admin_token, eventually, get};

/// Debian's Chromium, which `cargo xtask test` installs.
const CHROMIUM: &str = "/usr/bin/chromium";

/// The bound on the whole browser run: its own waits are bounded (20 s
/// each), this catches a browser that hangs outright.
const BROWSER_RUN: Duration = Duration::from_secs(300);

/// The fix to name when something the browser tests need is missing.
const INSTALL: &str = "run `cargo xtask test` once: it installs what the console's browser \
     tests need (`npm ci` in admin-ui; Debian's chromium, as root)";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Fails the test, naming the fix, unless the browser tests can run.
fn require_tools(chromium: &Path) {
    assert!(
        chromium.is_file(),
        "{} is missing: the console's browser tests drive Debian's Chromium; {INSTALL}, or \
         `sudo apt-get install -y chromium`",
        chromium.display()
    );
    let node = std::process::Command::new("node").arg("--version").output();
    assert!(
        node.as_ref().is_ok_and(|o| o.status.success()),
        "`node` does not run ({node:?}): the console's browser tests need Node.js 20 or newer"
    );
    let playwright = repo().join("admin-ui/node_modules/playwright-core");
    assert!(
        playwright.is_dir(),
        "{} is missing: {INSTALL}, or `cd admin-ui && npm ci`",
        playwright.display()
    );
}

fn screenshots_dir() -> PathBuf {
    match std::env::var_os("PRISM_CONSOLE_SCREENSHOTS") {
        Some(dir) => repo().join(dir),
        None => Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_works_in_chromium() {
    let chromium =
        PathBuf::from(std::env::var_os("PRISM_CHROMIUM").unwrap_or_else(|| CHROMIUM.into()));
    require_tools(&chromium);

    let dir = tempfile::tempdir().expect("tempdir");
    // Load reports every 500 ms: the charts move within the test's waits.
    let up = PrismUp::start(dir.path(), &["--load-report-interval", "500ms"], &[]);
    let admin_url = up.admin();
    let proxy = up.urls["proxy"].clone();
    assert_eq!(
        up.urls.get("console").map(String::as_str),
        Some(format!("{admin_url}/ui/").as_str()),
        "the banner names the console"
    );
    let token = admin_token(&dir.path().join("prism-data/admin-token"));
    let admin = Admin::new(&admin_url, &token);

    let quickstart = std::fs::read_to_string(repo().join("deploy/examples/quickstart.yaml"))
        .expect("quickstart")
        .replace("127.0.0.1:8081", up.demo_addr());
    admin.apply(&quickstart).await;
    let http = reqwest::Client::new();
    eventually("the quickstart answers through the proxy", || async {
        let answer = get(&http, &proxy, "demo.local", "/").await;
        (answer.status == 200).then_some(answer)
    })
    .await;
    let viewer = admin.token("console-viewer", "viewer").await;

    let started = Instant::now();
    let mut node = tokio::process::Command::new("node");
    node.args(["--test", "--test-reporter=spec"])
        .args(["tests/unit.test.mjs", "tests/console.spec.mjs"])
        .current_dir(repo().join("admin-ui"))
        .env("PRISM_ADMIN_URL", &admin_url)
        .env("PRISM_PROXY_URL", &proxy)
        .env("PRISM_ADMIN_TOKEN", &token)
        .env("PRISM_VIEWER_TOKEN", &viewer)
        .env("PRISM_SCREENSHOTS", screenshots_dir())
        .env("PRISM_CHROMIUM", &chromium)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(BROWSER_RUN, node.output())
        .await
        .unwrap_or_else(|_| panic!("the browser tests did not finish in {BROWSER_RUN:?}"))
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the console's browser tests failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    // node's test runner passes a run with skipped tests: none may be.
    let skipped: Vec<&str> = stdout.lines().filter(|l| l.contains("# SKIP")).collect();
    assert!(
        skipped.is_empty(),
        "browser tests skipped: {skipped:?}\n{stdout}"
    );
    let _ = writeln!(
        std::io::stderr().lock(),
        "tests/console.rs: browser tests passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
