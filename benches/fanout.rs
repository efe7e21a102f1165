//! Fan-out: how long one admin write takes to reach N subscribed proxies.
//!
//! Starts the real `prism control-plane` binary, opens N simulated proxy
//! streams (Delta ADS, the three Prism kinds, ACKing every batch like a real
//! proxy) over loopback, makes one admin write, and reports the time from the
//! write's 2xx until each stream has the complete new revision and has ACKed
//! it (p50, p99, max), the control plane's RSS per stream, and its CPU time.
//!
//! `cargo bench --bench fanout` runs N = 1,000 and 10,000; pass other counts as
//! arguments: `cargo bench --bench fanout -- 100 2000`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use prism_proto::Kind;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use support::Prism;

mod support;

/// Streams multiplexed on one HTTP/2 connection.
const STREAMS_PER_CONNECTION: usize = 100;

struct ControlPlane {
    prism: Prism,
    admin: String,
    token: String,
    xds: String,
}

impl ControlPlane {
    fn start(dir: &std::path::Path) -> Self {
        let prism = Prism::control_plane(dir);
        Self {
            admin: prism.address("admin"),
            token: Prism::admin_token(dir),
            xds: prism.address("xds"),
            prism,
        }
    }

    /// (RSS in bytes, CPU seconds) of the control-plane process.
    fn usage(&self) -> (u64, f64) {
        let pid = self.prism.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rss_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks: u64 = [11, 12]
            .iter()
            .filter_map(|i| fields.get(*i)?.parse::<u64>().ok())
            .sum();
        (rss_kib * 1024, ticks as f64 / 100.0)
    }
}

fn policy(port: u16) -> String {
    format!(
        "namespaces:\n  - name: bench\n    hosts: [bench.test]\n\
         backends:\n  - name: bench/web\n    endpoints: [{{address: \"127.0.0.1:{port}\"}}]\n\
         routes:\n  - name: bench/root\n    match: {{prefix: /}}\n    backend: web\n"
    )
}

async fn apply(http: &reqwest::Client, cp: &ControlPlane, port: u16) -> u64 {
    let answer: serde_json::Value = http
        .post(format!("{}/v1/apply", cp.admin))
        .bearer_auth(&cp.token)
        .header("content-type", "application/yaml")
        .body(policy(port))
        .send()
        .await
        .expect("admin API answers")
        .json()
        .await
        .expect("json");
    answer["revision"].as_u64().expect("revision")
}

/// One simulated proxy: subscribes, ACKs every response, and reports each
/// revision once it holds all three kinds of it.
async fn proxy(channel: Channel, id: usize, done: mpsc::UnboundedSender<(usize, u64, Instant)>) {
    let (tx, rx) = mpsc::channel(8);
    let node = Node {
        id: format!("bench-{id}"),
        ..Default::default()
    };
    for kind in Kind::ALL {
        let request = DeltaDiscoveryRequest {
            node: Some(node.clone()),
            type_url: kind.type_url().into(),
            ..Default::default()
        };
        let _ = tx.send(request).await;
    }
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let Ok(response) = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
    else {
        return;
    };
    let mut responses = response.into_inner();
    let mut kinds_at: HashMap<u64, usize> = HashMap::new();
    while let Ok(Some(response)) = responses.message().await {
        let revision: u64 = response.system_version_info.parse().unwrap_or(0);
        let ack = DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            ..Default::default()
        };
        if tx.send(ack).await.is_err() {
            return;
        }
        let seen = kinds_at.entry(revision).or_default();
        *seen += 1;
        if *seen == Kind::ALL.len() {
            let _ = done.send((id, revision, Instant::now()));
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn run(n: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path());
    let http = reqwest::Client::new();
    for _ in 0..200 {
        if http
            .get(format!("{}/healthz", cp.admin))
            .send()
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let first = apply(&http, &cp, 1000).await;
    let (rss_before, _) = cp.usage();

    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let mut channels = Vec::new();
    for _ in 0..n.div_ceil(STREAMS_PER_CONNECTION) {
        let channel = Channel::from_shared(cp.xds.clone())
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        channels.push(channel);
    }
    let connect_start = Instant::now();
    for id in 0..n {
        let channel = channels[id / STREAMS_PER_CONNECTION].clone();
        tokio::spawn(proxy(channel, id, done_tx.clone()));
    }
    // Wait until every stream holds the first revision.
    let mut ready = 0;
    while ready < n {
        let (_, revision, _) = tokio::time::timeout(Duration::from_secs(120), done_rx.recv())
            .await
            .expect("streams subscribe in time")
            .expect("open");
        if revision == first {
            ready += 1;
        }
    }
    let subscribed_in = connect_start.elapsed();
    let (rss_streams, cpu_before) = cp.usage();

    let write = Instant::now();
    let next = apply(&http, &cp, 1001).await;
    let acked = Instant::now();
    let mut latencies = Vec::with_capacity(n);
    while latencies.len() < n {
        let (_, revision, at) = tokio::time::timeout(Duration::from_secs(120), done_rx.recv())
            .await
            .expect("the write reaches every stream in time")
            .expect("open");
        if revision == next {
            latencies.push(at.saturating_duration_since(acked));
        }
    }
    let (rss_after, cpu_after) = cp.usage();
    latencies.sort();
    println!(
        "fanout n={n}: write→all ACKed p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (admin write itself {:.1} ms); \
         {} streams subscribed in {:.2} s; control-plane RSS {:.1} MiB idle → {:.1} MiB with streams \
         ({:.1} KiB/stream), {:.1} MiB after push; control-plane CPU for the push {:.3} s",
        percentile(&latencies, 50.0).as_secs_f64() * 1e3,
        percentile(&latencies, 99.0).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        acked.duration_since(write).as_secs_f64() * 1e3,
        n,
        subscribed_in.as_secs_f64(),
        rss_before as f64 / 1048576.0,
        rss_streams as f64 / 1048576.0,
        rss_streams.saturating_sub(rss_before) as f64 / 1024.0 / n as f64,
        rss_after as f64 / 1048576.0,
        cpu_after - cpu_before,
    );
}

fn main() {
    let counts: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let counts = if counts.is_empty() {
        vec![1000, 10_000]
    } else {
        counts
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    for n in counts {
        runtime.block_on(run(n));
    }
}
