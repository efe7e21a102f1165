//! The Load Reporting Service (`envoy.service.load_stats.v3`): Prism
//! proxies, and Envoys told to, report their traffic on the connection they
//! hold for discovery; each report goes into [`Traffic`].
//!
//! The first message of a stream names the node; the answer asks for every
//! cluster at the traffic window's interval. Reports are read as
//! prism-proto's `load` writes them: the backend in `cluster_name`, the
//! route in `cluster_service_name`, the latency in named load metrics (an
//! Envoy's reports have neither route nor latency, and count the same).
//! A proxy whose certificate scopes it to namespaces counts only there.

use envoy_types::pb::envoy::config::core::v3::{Address, address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterStats;
use envoy_types::pb::envoy::service::load_stats::v3::load_reporting_service_server::{
    LoadReportingService, LoadReportingServiceServer,
};
use envoy_types::pb::envoy::service::load_stats::v3::{LoadStatsRequest, LoadStatsResponse};
use envoy_types::pb::google::protobuf::value;
use prism_proto::load;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

use crate::envoy::envoy_duration;
use crate::tls::ProxyIdentity;
use crate::traffic::{EndpointKey, EndpointState, Load, Series, Traffic};

/// The LRS service, ready to be added to a tonic server.
#[derive(Clone, Debug)]
pub struct LoadReporting {
    traffic: Traffic,
    shutdown: watch::Receiver<bool>,
}

impl LoadReporting {
    /// Records reports into `traffic`; streams end when `shutdown` turns true.
    pub fn new(traffic: Traffic, shutdown: watch::Receiver<bool>) -> Self {
        Self { traffic, shutdown }
    }

    /// The tonic service for this server.
    pub fn into_service(self) -> LoadReportingServiceServer<Self> {
        LoadReportingServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl LoadReportingService for LoadReporting {
    type StreamLoadStatsStream = ReceiverStream<Result<LoadStatsResponse, Status>>;

    async fn stream_load_stats(
        &self,
        request: Request<Streaming<LoadStatsRequest>>,
    ) -> Result<Response<Self::StreamLoadStatsStream>, Status> {
        let identity = super::identity(&request);
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(1);
        let traffic = self.traffic.clone();
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let Some(mut report) = next(&mut inbound, &mut shutdown).await else {
                return;
            };
            let node = match report.node.take().map(|n| n.id) {
                Some(id) if !id.is_empty() => id,
                _ => {
                    let refusal = Status::invalid_argument(
                        "the first load report must name its node (node.id)",
                    );
                    let _ = tx.send(Err(refusal)).await;
                    return;
                }
            };
            let answer = LoadStatsResponse {
                send_all_clusters: true,
                load_reporting_interval: Some(envoy_duration(traffic.interval())),
                ..Default::default()
            };
            if tx.send(Ok(answer)).await.is_err() {
                return;
            }
            loop {
                let identity = identity.as_deref();
                traffic.record(entries(&node, identity, &report.cluster_stats));
                traffic.record_endpoints(&node, endpoints(&node, identity, &report.cluster_stats));
                match next(&mut inbound, &mut shutdown).await {
                    Some(next) => report = next,
                    None => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// The stream's next report; `None` once it ends, fails or the control
/// plane stops.
async fn next(
    inbound: &mut Streaming<LoadStatsRequest>,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<LoadStatsRequest> {
    let report = tokio::select! {
        report = inbound.message() => report,
        _ = shutdown.wait_for(|stop| *stop) => return None,
    };
    report
        .inspect_err(|status| debug!(error = %status, "Load report stream failed."))
        .ok()
        .flatten()
}

/// A report's entries that name a namespace the reporter may serve.
fn entries<'a>(
    node: &'a str,
    identity: Option<&'a ProxyIdentity>,
    stats: &'a [ClusterStats],
) -> impl Iterator<Item = (Series, Load)> + 'a {
    stats.iter().filter_map(move |cluster| {
        let route = load::route_of_service_name(&cluster.cluster_service_name).unwrap_or("");
        let named = if route.is_empty() {
            &cluster.cluster_name
        } else {
            route
        };
        let (namespace, _) = named.split_once('/')?;
        if !serves(identity, namespace) {
            return None;
        }
        let mut load = Load::default();
        for locality in &cluster.upstream_locality_stats {
            load.requests += locality.total_successful_requests + locality.total_error_requests;
            load.errors += locality.total_error_requests;
            for metric in &locality.load_metric_stats {
                if let Some(bucket) = load::latency_bucket(&metric.metric_name) {
                    load.latency[bucket] += metric.num_requests_finished_with_metric;
                }
            }
        }
        if load.requests == 0 {
            return None;
        }
        let series = Series {
            node: node.to_string(),
            namespace: namespace.to_string(),
            route: route.to_string(),
            backend: cluster.cluster_name.clone(),
        };
        Some((series, load))
    })
}

/// Each endpoint's state in a report, of backends the reporter may serve.
fn endpoints(
    node: &str,
    identity: Option<&ProxyIdentity>,
    stats: &[ClusterStats],
) -> Vec<(EndpointKey, EndpointState)> {
    let mut states = Vec::new();
    for cluster in stats {
        let Some((namespace, _)) = cluster.cluster_name.split_once('/') else {
            continue;
        };
        if !serves(identity, namespace) {
            continue;
        }
        let endpoints = cluster
            .upstream_locality_stats
            .iter()
            .flat_map(|locality| &locality.upstream_endpoint_stats);
        for endpoint in endpoints {
            let Some(Address {
                address: Some(address::Address::SocketAddress(socket)),
            }) = &endpoint.address
            else {
                continue;
            };
            let port = match socket.port_specifier {
                Some(socket_address::PortSpecifier::PortValue(port)) => port.to_string(),
                _ => continue,
            };
            let field = |key: &str| {
                endpoint
                    .metadata
                    .as_ref()
                    .and_then(|m| m.fields.get(key))
                    .and_then(|v| v.kind.as_ref())
            };
            let text = |key: &str| match field(key) {
                Some(value::Kind::StringValue(text)) => Some(text.clone()),
                _ => None,
            };
            let state = EndpointState {
                healthy: text(load::HEALTH).map(|verdict| verdict == "healthy"),
                breaker: text(load::BREAKER),
                ejected: matches!(field(load::EJECTED), Some(value::Kind::BoolValue(true))),
            };
            let key = EndpointKey {
                node: node.to_string(),
                backend: cluster.cluster_name.clone(),
                address: format!("{}:{port}", socket.address),
            };
            states.push((key, state));
        }
    }
    states
}

/// Whether `identity` lets its proxy serve `namespace` (every namespace
/// without a checked certificate).
fn serves(identity: Option<&ProxyIdentity>, namespace: &str) -> bool {
    identity
        .and_then(|identity| identity.namespaces.as_ref())
        .is_none_or(|namespaces| namespaces.contains(namespace))
}
