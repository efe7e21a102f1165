//! The targets: the origin itself and four proxies, each with one worker on
//! the proxy CPUs and an equivalent configuration — keep-alive to the origin
//! (HTTP/1.1 for plain requests, HTTP/2 for gRPC under `/bench.Echo/`), no
//! access logs, a 5 s connect timeout and a 30 s request timeout, no request
//! or connection count that closes a keep-alive connection.
//!
//! Each start is timed from exec to the first `200` answered through the
//! proxy. Prism starts from its on-disk last-good snapshot with the control
//! plane running, as a restarted proxy in a fleet does.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::ValueEnum;
use tempfile::TempDir;

use crate::drive::get_once;
use crate::origin::GRPC_PREFIX;
use crate::process::{CpuSet, Proc, pinned};
use crate::tools::Tools;

/// How long a target may take from exec to its first proxied `200`.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// Pause between two polls of a starting target.
const POLL_EVERY: Duration = Duration::from_millis(1);
/// Timeout of one poll's connect and read.
const POLL_TIMEOUT: Duration = Duration::from_secs(1);
/// Upstream connect timeout of every proxy.
const CONNECT_TIMEOUT_S: u32 = 5;
/// Request timeout of every proxy.
const REQUEST_TIMEOUT_S: u32 = 30;
/// Worker threads (processes, for nginx) of every proxy.
pub const WORKERS: usize = 1;
/// Client connections nginx (`worker_connections`) and HAProxy (`maxconn`)
/// accept unless [`Launcher::allow_clients`] asks for more.
const DEFAULT_MAX_CLIENTS: usize = 8192;
/// Connections beyond the clients: nginx counts its upstream connections
/// (a keep-alive pool of up to 2 × 1024) against `worker_connections`.
const UPSTREAM_HEADROOM: usize = 2048;
/// Open files HAProxy needs besides two per connection (listeners, logs,
/// its own pipes), so its `maxconn` fits the inherited limit.
const HAPROXY_SPARE_FDS: u64 = 200;
/// Client connections left free below a limit, for start probes.
const PROBE_ROOM: usize = 100;
/// Node id of the Prism proxy in its control plane's fleet.
const PRISM_NODE: &str = "load-harness";

/// Where load is sent: the origin directly, or a proxy in front of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum)]
pub enum Target {
    /// The origin with no proxy: the ceiling of the load generator and origin.
    Direct,
    Prism,
    Nginx,
    Haproxy,
    Envoy,
}

/// A started target. Its process (if any) is killed when this is dropped.
pub struct Started {
    /// Where HTTP/1.1 clients connect.
    pub h1: SocketAddr,
    /// Where HTTP/2 (h2c and gRPC) clients connect.
    pub h2: SocketAddr,
    pub process: Option<Proc>,
    /// Prism's own admin listener (`/status`, `/config_dump`); `None` for
    /// the other targets.
    pub admin: Option<SocketAddr>,
    /// Exec → first `200` answered through the proxy.
    pub start_to_200: Option<Duration>,
    /// Its configuration and logs; removed after the process is gone
    /// (fields drop in order).
    dir: Option<TempDir>,
    /// A fresh Prism's own data directory, removed likewise.
    extra: Option<TempDir>,
}

/// Starts targets: knows the tools, the origin, the CPUs and Prism's
/// control plane.
pub struct Launcher {
    tools: Tools,
    origin: SocketAddr,
    proxy_cpus: CpuSet,
    scratch: PathBuf,
    prism: Option<PrismPlane>,
    /// Connections nginx is configured for (`worker_connections`).
    max_clients: usize,
    /// HAProxy's `maxconn`: it refuses to start unless the open-file limit
    /// covers two sockets per connection.
    haproxy_maxconn: usize,
}

/// Prism's control plane, running for the whole harness with the bench
/// policy applied, and the proxy data directory holding its last-good
/// snapshot.
struct PrismPlane {
    _control_plane: Proc,
    /// The control plane's admin API, `http://…`.
    admin: String,
    /// Its admin token.
    token: String,
    xds: String,
    proxy_data: PathBuf,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Prism => "prism",
            Target::Nginx => "nginx",
            Target::Haproxy => "haproxy",
            Target::Envoy => "envoy",
        }
    }

    pub fn is_proxy(self) -> bool {
        self != Target::Direct
    }
}

impl Launcher {
    /// Prepares the launcher; with Prism among `targets`, starts its control
    /// plane (pinned to `load_cpus`, away from the proxy), applies the bench
    /// policy and starts the proxy once so it writes its last-good snapshot.
    pub fn new(
        tools: Tools,
        origin: SocketAddr,
        proxy_cpus: CpuSet,
        load_cpus: &CpuSet,
        scratch: PathBuf,
        targets: &[Target],
    ) -> Result<Self> {
        let mut launcher = Self {
            tools,
            origin,
            proxy_cpus,
            scratch,
            prism: None,
            max_clients: DEFAULT_MAX_CLIENTS,
            haproxy_maxconn: DEFAULT_MAX_CLIENTS,
        };
        if targets.contains(&Target::Prism) {
            launcher.prism = Some(launcher.start_prism_plane(load_cpus)?);
            // The first start has no snapshot on disk: it waits for the
            // control plane, then saves one. Stop it gracefully once saved.
            let first = launcher.start(Target::Prism)?;
            let snapshot = launcher
                .prism
                .as_ref()
                .map(|p| p.proxy_data.join(prism_data_plane::LAST_GOOD_FILE))
                .context("the Prism plane is running")?;
            wait_for(&snapshot, START_DEADLINE).with_context(|| {
                format!(
                    "the Prism proxy did not write {} (log: {})",
                    snapshot.display(),
                    first.log_tail()
                )
            })?;
            if let Some(process) = first.process {
                process.stop(Duration::from_secs(5));
            }
        }
        Ok(launcher)
    }

    /// Configures nginx and HAProxy started from now on to accept `clients`
    /// idle client connections besides their upstream ones (at least the
    /// default 8192), HAProxy within what `open_files` (the limit every
    /// proxy inherits) allows. Envoy and Prism have no such setting.
    pub fn allow_clients(&mut self, clients: usize, open_files: u64) {
        let wanted = DEFAULT_MAX_CLIENTS.max(clients + UPSTREAM_HEADROOM);
        self.max_clients = wanted;
        let haproxy_fits =
            usize::try_from(open_files.saturating_sub(HAPROXY_SPARE_FDS) / 2).unwrap_or(usize::MAX);
        self.haproxy_maxconn = wanted.min(haproxy_fits).max(DEFAULT_MAX_CLIENTS);
    }

    /// The most client connections `target` accepts as configured, if it
    /// has such a limit (with room for a probe beside them).
    pub fn client_limit(&self, target: Target) -> Option<usize> {
        match target {
            Target::Nginx => Some(self.max_clients - UPSTREAM_HEADROOM),
            Target::Haproxy => Some(self.haproxy_maxconn.saturating_sub(PROBE_ROOM)),
            Target::Direct | Target::Prism | Target::Envoy => None,
        }
    }

    /// Starts `target` and waits for its first proxied `200`.
    pub fn start(&self, target: Target) -> Result<Started> {
        self.start_in(target, None)
    }

    /// Starts a Prism proxy with an empty data directory of its own, so it
    /// has no snapshot and waits for the control plane (a fresh
    /// subscription), and waits for its first proxied `200`.
    pub fn start_prism_fresh(&self) -> Result<Started> {
        let data = tempfile::Builder::new()
            .prefix("prism-fresh")
            .tempdir_in(&self.scratch)
            .context("cannot create a temp dir")?;
        let mut started = self.start_in(Target::Prism, Some(data.path()))?;
        started.extra = Some(data);
        Ok(started)
    }

    /// The admin API of Prism's control plane and its admin token, when
    /// Prism is a target.
    pub fn prism_admin(&self) -> Option<(&str, &str)> {
        self.prism
            .as_ref()
            .map(|p| (p.admin.as_str(), p.token.as_str()))
    }

    /// Starts `target`, a Prism proxy with `data_dir` instead of the shared
    /// one holding the last-good snapshot, and waits for its first `200`.
    fn start_in(&self, target: Target, data_dir: Option<&Path>) -> Result<Started> {
        if target == Target::Direct {
            return Ok(Started {
                h1: self.origin,
                h2: self.origin,
                process: None,
                admin: None,
                start_to_200: None,
                dir: None,
                extra: None,
            });
        }
        let dir = tempfile::Builder::new()
            .prefix(target.name())
            .tempdir_in(&self.scratch)
            .context("cannot create a temp dir")?;
        // nginx 1.22 serves HTTP/2 without TLS only on a listener of its
        // own; the others detect the HTTP/2 preface on one port. Both are
        // found at once: two ports found one after the other can be the
        // same one ("duplicate listen" from nginx).
        let [h1, second, third] = free_ports()?;
        let h2 = if target == Target::Nginx { second } else { h1 };
        // Prism's admin listener, and its TLS listener: not the default
        // 0.0.0.0:8443, which something else on the machine may hold.
        let prism = (target == Target::Prism).then_some((second, third));
        let admin = prism.map(|(admin, _)| admin);
        let mut command = self.command(target, dir.path(), h1, h2, prism, data_dir)?;
        let log = File::create(dir.path().join("output.log"))?;
        command
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        let exec = Instant::now();
        let mut process = Proc::spawn(target.name(), &mut command)?;
        let start_to_200 = loop {
            if let Err(error) = process.check_alive() {
                bail!("{error}; log: {}", tail(&dir.path().join("output.log")));
            }
            if let Ok(true) = get_once(h1, POLL_TIMEOUT) {
                break exec.elapsed();
            }
            if exec.elapsed() > START_DEADLINE {
                bail!(
                    "{} answered no 200 within {START_DEADLINE:?} of its start; log: {}",
                    target.name(),
                    tail(&dir.path().join("output.log"))
                );
            }
            std::thread::sleep(POLL_EVERY);
        };
        Ok(Started {
            h1,
            h2,
            process: Some(process),
            admin,
            start_to_200: Some(start_to_200),
            dir: Some(dir),
            extra: None,
        })
    }

    /// The command line of `target` listening on `h1` and `h2`, pinned to
    /// the proxy CPUs, with its configuration written to `dir` (Prism: its
    /// admin and TLS listeners at `prism`, its data in `data_dir` or the
    /// shared one).
    fn command(
        &self,
        target: Target,
        dir: &Path,
        h1: SocketAddr,
        h2: SocketAddr,
        prism: Option<(SocketAddr, SocketAddr)>,
        data_dir: Option<&Path>,
    ) -> Result<Command> {
        let tool = |path: &Option<PathBuf>| -> Result<PathBuf> {
            path.clone()
                .with_context(|| format!("{} is not installed", target.name()))
        };
        let command = match target {
            Target::Direct => bail!("the origin has no command"),
            Target::Prism => {
                let plane = self.prism.as_ref().context("Prism's control plane")?;
                let (admin, tls) = prism.context("Prism's admin and TLS addresses")?;
                let mut command = pinned(&self.tools.taskset, &self.proxy_cpus, &self.tools.prism);
                command
                    .arg("proxy")
                    .args(["--control-plane", &plane.xds])
                    .args(["--listen", &h1.to_string()])
                    .args(["--tls-listen", &tls.to_string()])
                    .args(["--admin-addr", &admin.to_string()])
                    .arg("--data-dir")
                    .arg(data_dir.unwrap_or(&plane.proxy_data))
                    .args(["--node-id", PRISM_NODE])
                    .args(["--workers", &WORKERS.to_string()])
                    .env("RUST_LOG", "warn");
                command
            }
            Target::Nginx => {
                let config = dir.join("nginx.conf");
                std::fs::write(
                    &config,
                    nginx_config(dir, h1, h2, self.origin, WORKERS, self.max_clients),
                )?;
                let mut command = pinned(
                    &self.tools.taskset,
                    &self.proxy_cpus,
                    &tool(&self.tools.nginx)?,
                );
                command
                    .arg("-p")
                    .arg(dir)
                    .arg("-e")
                    .arg(dir.join("error.log"))
                    .arg("-c")
                    .arg(config);
                command
            }
            Target::Haproxy => {
                let config = dir.join("haproxy.cfg");
                std::fs::write(
                    &config,
                    haproxy_config(h1, self.origin, WORKERS, self.haproxy_maxconn),
                )?;
                let mut command = pinned(
                    &self.tools.taskset,
                    &self.proxy_cpus,
                    &tool(&self.tools.haproxy)?,
                );
                command.arg("-db").arg("-f").arg(config);
                command
            }
            Target::Envoy => {
                let config = dir.join("envoy.yaml");
                std::fs::write(&config, envoy_config(h1, self.origin))?;
                let mut command = pinned(
                    &self.tools.taskset,
                    &self.proxy_cpus,
                    &tool(&self.tools.envoy)?,
                );
                command
                    .arg("-c")
                    .arg(config)
                    .args(["--concurrency", &WORKERS.to_string()])
                    .args(["--disable-hot-restart", "--log-level", "warn"]);
                command
            }
        };
        Ok(command)
    }

    fn start_prism_plane(&self, load_cpus: &CpuSet) -> Result<PrismPlane> {
        let data = self.scratch.join("prism-control-plane");
        let log = File::create(self.scratch.join("prism-control-plane.log"))?;
        let mut command = pinned(&self.tools.taskset, load_cpus, &self.tools.prism);
        command
            .arg("control-plane")
            .args(["--admin-addr", "127.0.0.1:0", "--xds-addr", "127.0.0.1:0"])
            .args(["--envoy-listener-addr", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        let mut control_plane = Proc::spawn("prism control-plane", &mut command)?;
        let stdout = control_plane
            .child_mut()
            .stdout
            .take()
            .context("the control plane's stdout")?;
        // It prints one line with its addresses once bound, then nothing.
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
                .map(str::to_string)
                .with_context(|| {
                    format!(
                        "the control plane did not print its {name} address: `{}`; log: {}",
                        line.trim(),
                        tail(&self.scratch.join("prism-control-plane.log"))
                    )
                })
        };
        let admin = field("admin")?;
        let xds = field("xds")?;
        // Written before the line above was printed.
        let token = std::fs::read_to_string(data.join("admin-token"))
            .context("the control plane's admin token")?
            .trim()
            .to_string();
        let policy = self.scratch.join("prism-policy.yaml");
        std::fs::write(&policy, prism_policy(self.origin))?;
        let applied = Command::new(&self.tools.prism)
            .args(["--admin-url", &admin, "apply", "-f"])
            .env("PRISM_TOKEN", &token)
            .arg(&policy)
            .output()
            .context("cannot run prism apply")?;
        ensure!(
            applied.status.success(),
            "prism apply failed: {}",
            String::from_utf8_lossy(&applied.stderr).trim()
        );
        Ok(PrismPlane {
            _control_plane: control_plane,
            admin,
            token,
            xds,
            proxy_data: self.scratch.join("prism-proxy"),
        })
    }
}

impl Started {
    fn log_tail(&self) -> String {
        self.dir
            .as_ref()
            .map(|d| tail(&d.path().join("output.log")))
            .unwrap_or_default()
    }
}

/// `N` distinct loopback addresses that were free a moment ago: each one's
/// listener is held until all are found.
fn free_ports<const N: usize>() -> Result<[SocketAddr; N]> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").context("cannot find a free port"))
        .collect::<Result<Vec<_>>>()?;
    let addresses = listeners
        .iter()
        .map(|l| l.local_addr().context("a bound port"))
        .collect::<Result<Vec<_>>>()?;
    Ok(addresses
        .try_into()
        .unwrap_or_else(|_| unreachable!("N listeners give N addresses")))
}

/// Waits until `path` exists.
fn wait_for(path: &Path, deadline: Duration) -> Result<()> {
    let start = Instant::now();
    while !path.exists() {
        ensure!(start.elapsed() < deadline, "not within {deadline:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// The last lines of a log, for error messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(5);
    let tail = lines[start..].join(" | ");
    if tail.is_empty() {
        "(empty)".into()
    } else {
        tail
    }
}

/// Prism's policy: host `127.0.0.1` (clients send `127.0.0.1:<port>`; the
/// port is not matched), gRPC to an HTTP/2 backend, the rest to HTTP/1.1.
fn prism_policy(origin: SocketAddr) -> String {
    format!(
        r#"namespaces:
  - name: bench
    hosts: ["127.0.0.1"]
    default_timeout: {REQUEST_TIMEOUT_S}s
backends:
  - name: bench/origin-http1
    protocol: HTTP1
    connect_timeout: {CONNECT_TIMEOUT_S}s
    endpoints: [{{address: "{origin}"}}]
  - name: bench/origin-grpc
    protocol: GRPC
    connect_timeout: {CONNECT_TIMEOUT_S}s
    endpoints: [{{address: "{origin}"}}]
routes:
  - name: bench/grpc
    match: {{prefix: "{GRPC_PREFIX}"}}
    backend: origin-grpc
    timeout: {REQUEST_TIMEOUT_S}s
  - name: bench/root
    match: {{prefix: /}}
    backend: origin-http1
    timeout: {REQUEST_TIMEOUT_S}s
"#
    )
}

/// nginx in the foreground as one process (`master_process off`): the worker
/// is the whole of nginx. Upstream keepalive pools large enough for every
/// stream in flight (nginx opens one upstream connection per gRPC stream).
/// `connections` counts client and upstream connections alike; with
/// `master_process off` nginx keeps the open-file limit it inherits, but
/// `worker_rlimit_nofile` says what it needs.
fn nginx_config(
    dir: &Path,
    h1: SocketAddr,
    h2: SocketAddr,
    origin: SocketAddr,
    workers: usize,
    connections: usize,
) -> String {
    let dir = dir.display();
    let files = 2 * connections;
    format!(
        r#"daemon off;
master_process off;
worker_processes {workers};
worker_rlimit_nofile {files};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{
    worker_connections {connections};
}}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_timeout 60s;
    keepalive_requests 1000000000;
    upstream origin_http1 {{
        server {origin};
        keepalive 1024;
        keepalive_requests 1000000000;
        keepalive_timeout 60s;
    }}
    upstream origin_grpc {{
        server {origin};
        keepalive 1024;
        keepalive_requests 1000000000;
        keepalive_timeout 60s;
    }}
    server {{
        listen {h1};
        listen {h2} http2;
        location / {{
            proxy_pass http://origin_http1;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_connect_timeout {CONNECT_TIMEOUT_S}s;
            proxy_send_timeout {REQUEST_TIMEOUT_S}s;
            proxy_read_timeout {REQUEST_TIMEOUT_S}s;
        }}
        location {GRPC_PREFIX} {{
            grpc_pass grpc://origin_grpc;
            grpc_connect_timeout {CONNECT_TIMEOUT_S}s;
            grpc_send_timeout {REQUEST_TIMEOUT_S}s;
            grpc_read_timeout {REQUEST_TIMEOUT_S}s;
        }}
    }}
}}
"#
    )
}

/// HAProxy in the foreground (`-db`), one thread. One bind serves HTTP/1.1
/// and h2c (HAProxy detects the HTTP/2 preface); `http-reuse always` shares
/// idle upstream connections like the other proxies' pools.
fn haproxy_config(
    listen: SocketAddr,
    origin: SocketAddr,
    workers: usize,
    maxconn: usize,
) -> String {
    format!(
        r#"global
    nbthread {workers}
    maxconn {maxconn}
defaults
    mode http
    timeout connect {CONNECT_TIMEOUT_S}s
    timeout client {REQUEST_TIMEOUT_S}s
    timeout server {REQUEST_TIMEOUT_S}s
    http-reuse always
frontend bench
    bind {listen}
    use_backend origin_grpc if {{ path_beg {GRPC_PREFIX} }}
    default_backend origin_http1
backend origin_http1
    server origin {origin}
backend origin_grpc
    server origin {origin} proto h2
"#
    )
}

/// Envoy from a static bootstrap, no admin listener. `codec_type: AUTO`
/// serves HTTP/1.1 and h2c on one port; request ids are off (no other
/// target generates one).
fn envoy_config(listen: SocketAddr, origin: SocketAddr) -> String {
    let endpoint = |cluster: &str| {
        format!(
            r#"    load_assignment:
      cluster_name: {cluster}
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: "{ip}", port_value: {port} }}"#,
            ip = origin.ip(),
            port = origin.port()
        )
    };
    format!(
        r#"static_resources:
  listeners:
  - name: bench
    address:
      socket_address: {{ address: "{ip}", port_value: {port} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          codec_type: AUTO
          generate_request_id: false
          route_config:
            name: bench
            virtual_hosts:
            - name: bench
              domains: ["*"]
              routes:
              - match: {{ prefix: "{GRPC_PREFIX}" }}
                route: {{ cluster: origin_grpc, timeout: {REQUEST_TIMEOUT_S}s }}
              - match: {{ prefix: "/" }}
                route: {{ cluster: origin_http1, timeout: {REQUEST_TIMEOUT_S}s }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: origin_http1
    type: STATIC
    connect_timeout: {CONNECT_TIMEOUT_S}s
{http1_endpoint}
  - name: origin_grpc
    type: STATIC
    connect_timeout: {CONNECT_TIMEOUT_S}s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
{grpc_endpoint}
"#,
        ip = listen.ip(),
        port = listen.port(),
        http1_endpoint = endpoint("origin_http1"),
        grpc_endpoint = endpoint("origin_grpc"),
    )
}
