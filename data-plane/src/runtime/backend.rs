//! A compiled backend and everything it owns: its endpoints, its balancer
//! state and its own pooled upstream client. A backend whose version did not
//! change is carried into the next runtime as the same `Arc`, so an unchanged
//! backend keeps its pool, its balancer position and its health checker.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use http::uri::Authority;
use prism_proto::{LbPolicy, Protocol, Snapshot};

use super::balance::{self, Balancer};
use super::breaker::{self, Breaker};
use super::health::{self, Health, HealthCheck};
use super::outlier::{self, Outcome, Outlier};
use super::{CompileError, DEFAULT_CONNECT_TIMEOUT, tls};
use crate::http::{endpoint, retry};
use crate::metrics::{BackendSeries, Metrics};

/// An upstream cluster as the request path sees it.
#[derive(Debug)]
pub(crate) struct Backend {
    /// Full name, `namespace/name`.
    pub name: String,
    /// Content version of the backend resource.
    pub version: String,
    /// Content versions of the Secrets its upstream TLS uses
    /// ([`tls::secret_versions`]); empty without TLS.
    pub secrets: String,
    /// Never empty: [`Backend::compile`] refuses a backend without endpoints.
    pub endpoints: Vec<Endpoint>,
    pub balancer: Balancer,
    /// Requests and retries in flight, for the routes' retry budgets.
    pub retry_budget: retry::Budget,
    /// The pool of connections to this backend's endpoints.
    pub client: endpoint::Client,
    /// Set when the backend has a `health_check`; its task probes the
    /// endpoints until the backend is dropped.
    pub health_check: Option<HealthCheck>,
    /// Where what happens to it is recorded (shared by its versions, by
    /// name); `None` with metrics off.
    pub series: Option<Arc<BackendSeries>>,
}

/// One address of a backend.
#[derive(Debug)]
pub(crate) struct Endpoint {
    /// `host:port`, the authority of upstream requests.
    pub address: Authority,
    /// Requests sent to this endpoint whose response has not ended, for
    /// least-request balancing; see [`crate::http::endpoint::InFlight`].
    pub in_flight: AtomicU32,
    /// Set when the backend has a `circuit_breaker`.
    pub breaker: Option<Breaker>,
    /// Set when the backend has `outlier_detection`.
    pub outlier: Option<Outlier>,
    /// Set when the backend has a `health_check`; written by its checker.
    pub health: Option<Arc<Health>>,
}

/// A backend's endpoints as the balancer sees them at one instant.
pub(crate) struct Candidates<'a> {
    pub endpoints: &'a [Endpoint],
    /// `None` when no endpoint can be unavailable.
    pub now: Option<tokio::time::Instant>,
}

/// Who this proxy is, as compiling a backend needs to know: the addresses at
/// which it accepts client traffic (an endpoint there would loop) and its
/// zone (zone-aware balancing prefers endpoints in it).
#[derive(Clone, Debug, Default)]
pub(crate) struct OwnAddresses {
    listeners: Vec<SocketAddr>,
    advertised: String,
    zone: String,
}

impl Backend {
    /// Its endpoints as the balancer sees them now. The clock is read only
    /// when something can take an endpoint out of the balancer.
    pub(crate) fn candidates(&self) -> Candidates<'_> {
        // Every endpoint of a backend has the same guards: the first tells.
        let guarded = self
            .endpoints
            .first()
            .is_some_and(|e| e.breaker.is_some() || e.outlier.is_some() || e.health.is_some());
        Candidates {
            endpoints: &self.endpoints,
            now: guarded.then(tokio::time::Instant::now),
        }
    }

    /// Counts how a request to endpoint `index` went for outlier
    /// detection, and ejects the endpoint when it keeps failing and the
    /// backend's ejection cap allows.
    pub(crate) fn record_outcome(&self, index: usize, outcome: Outcome, now: tokio::time::Instant) {
        let Some(outlier) = self.endpoints[index].outlier.as_ref() else {
            return;
        };
        if !outlier.record(outcome) || outlier.is_ejected(now) {
            return;
        }
        // Rare (an ejection): a scan of the siblings beats a shared counter
        // that every expiry would have to keep right.
        let ejected = self
            .endpoints
            .iter()
            .filter(|e| e.outlier.as_ref().is_some_and(|o| o.is_ejected(now)))
            .count();
        if ejected < outlier.params().max_ejected(self.endpoints.len()) {
            outlier.eject(now);
            if let Some(series) = &self.series {
                series.ejected();
            }
        }
    }

    /// Compiles `spec`; the Secrets its `tls` names are read from `snapshot`.
    /// It records into its series of `metrics`, if any.
    pub(super) fn compile(
        snapshot: &Snapshot,
        spec: &prism_proto::Backend,
        version: &str,
        secrets: String,
        own: &OwnAddresses,
        metrics: Option<&Metrics>,
    ) -> Result<Backend, CompileError> {
        let series = metrics.map(|m| m.backend(&spec.name));
        let endpoints = spec
            .endpoints
            .iter()
            .enumerate()
            .map(|(index, e)| {
                e.address
                    .parse::<Authority>()
                    .ok()
                    .filter(|a| a.port_u16().is_some())
                    .map(|address| Endpoint {
                        address,
                        in_flight: AtomicU32::new(0),
                        breaker: spec.circuit_breaker.as_ref().map(|b| {
                            Breaker::new(breaker::Params::new(b)).with_series(series.clone())
                        }),
                        outlier: spec
                            .outlier_detection
                            .as_ref()
                            .map(|o| Outlier::new(outlier::Params::new(o))),
                        health: spec.health_check.as_ref().map(|_| Arc::new(Health::new())),
                    })
                    .ok_or_else(|| CompileError::Endpoint {
                        backend: spec.name.clone(),
                        index,
                        address: e.address.clone(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(CompileError::NoEndpoints {
                backend: spec.name.clone(),
            });
        }
        if let Some((index, endpoint)) = endpoints
            .iter()
            .enumerate()
            .find(|(_, e)| own.contains(&e.address))
        {
            return Err(CompileError::Loop {
                backend: spec.name.clone(),
                index,
                address: endpoint.address.to_string(),
            });
        }
        let protocol = Protocol::try_from(spec.protocol).unwrap_or(Protocol::Http1);
        let http2 = matches!(protocol, Protocol::Http2 | Protocol::Grpc);
        let tls = match &spec.tls {
            Some(tls) => {
                let namespace = spec.name.split_once('/').map_or("", |(ns, _)| ns);
                Some(
                    tls::UpstreamParams::compile(snapshot, namespace, tls, http2).map_err(
                        |(field, reason)| CompileError::Tls {
                            resource: format!("Backend {}", spec.name),
                            field,
                            reason,
                        },
                    )?,
                )
            }
            None => None,
        };
        let health_check = match &spec.health_check {
            Some(check) => Some(HealthCheck::new(
                health::Params::compile(check, http2, tls.clone()).map_err(|(field, reason)| {
                    CompileError::HealthCheck {
                        backend: spec.name.clone(),
                        field,
                        reason,
                    }
                })?,
            )),
            None => None,
        };
        let client = endpoint::Client::new(
            &endpoint::Params {
                http2,
                tls,
                connect_timeout: prism_proto::defaults::duration_or(
                    spec.connect_timeout.as_ref(),
                    DEFAULT_CONNECT_TIMEOUT,
                ),
                limits: endpoint::pool::Limits::compile(spec.limits.as_ref()),
            },
            endpoints.iter().map(|e| e.address.clone()),
        );
        Ok(Backend {
            name: spec.name.clone(),
            version: version.to_string(),
            secrets,
            endpoints,
            balancer: Balancer::new(
                LbPolicy::try_from(spec.lb_policy).unwrap_or(LbPolicy::RoundRobin),
                spec.hash_policy.as_ref(),
                spec.zone_aware.as_ref(),
                &spec.endpoints,
                &own.zone,
            ),
            retry_budget: retry::Budget::default(),
            client,
            health_check,
            series,
        })
    }

    /// Starts the health checker of a newly compiled backend, if it has
    /// one. An endpoint that `previous` (the backend's last version) also
    /// had keeps its health; the others start new.
    pub(super) fn start_health_check(&mut self, previous: Option<&Backend>) {
        let Some(check) = self.health_check.as_mut() else {
            return;
        };
        let mut targets = Vec::with_capacity(self.endpoints.len());
        for endpoint in &self.endpoints {
            let Some(health) = &endpoint.health else {
                continue;
            };
            if let Some(old) =
                previous.and_then(|p| p.endpoints.iter().find(|e| e.address == endpoint.address))
            {
                health.inherit(old.health.as_deref());
            }
            targets.push((endpoint.address.clone(), Arc::clone(health)));
        }
        check.start(&self.name, targets, self.series.clone());
    }
}

impl OwnAddresses {
    /// The proxy listening on `listener` and advertised as `advertised`.
    pub(crate) fn new(listener: SocketAddr, advertised: &str) -> Self {
        Self {
            listeners: vec![listener],
            advertised: advertised.to_ascii_lowercase(),
            zone: String::new(),
        }
    }

    /// The same proxy, running in availability zone `zone`.
    pub(crate) fn with_zone(mut self, zone: &str) -> Self {
        self.zone = zone.to_string();
        self
    }

    /// Whether `endpoint` reaches this proxy's own listener.
    pub(crate) fn contains(&self, endpoint: &Authority) -> bool {
        if !self.advertised.is_empty() && endpoint.as_str().eq_ignore_ascii_case(&self.advertised) {
            return true;
        }
        let Some(port) = endpoint.port_u16() else {
            return false;
        };
        let host = endpoint
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let ip = match host.parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) if host.eq_ignore_ascii_case("localhost") => Some(IpAddr::from([127, 0, 0, 1])),
            Err(_) => None,
        };
        let Some(ip) = ip else {
            return false;
        };
        self.listeners.iter().any(|own| {
            own.port() == port
                && (own.ip() == ip
                    || (own.ip().is_loopback() && ip.is_loopback())
                    || (own.ip().is_unspecified() && (ip.is_loopback() || ip.is_unspecified())))
        })
    }
}

impl Endpoint {
    /// Whether the balancer may pick this endpoint at `now`: healthy if
    /// health checked, not ejected as an outlier, and its circuit breaker,
    /// if any, lets requests through.
    pub(crate) fn is_available(&self, now: tokio::time::Instant) -> bool {
        self.health.as_ref().is_none_or(|h| h.is_healthy())
            && self.outlier.as_ref().is_none_or(|o| !o.is_ejected(now))
            && self.breaker.as_ref().is_none_or(|b| b.available(now))
    }
}

impl balance::Endpoints for Candidates<'_> {
    fn available(&self, index: usize) -> bool {
        self.now
            .is_none_or(|now| self.endpoints[index].is_available(now))
    }

    fn in_flight(&self, index: usize) -> u32 {
        self.endpoints[index].in_flight.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prism_proto::Snapshot;

    use super::*;
    use crate::runtime::Runtime;
    use crate::runtime::tests::{backend, compile, namespace, sample};

    #[test]
    fn round_robin_cycles_through_endpoints() {
        let snapshot = Snapshot::from_resources(
            1,
            [
                namespace("n", &["n.local"]),
                backend("n/b", &["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]),
            ],
        );
        let rt = compile(&snapshot, &Runtime::unconfigured());
        let b = rt.backend("n/b").expect("backend");
        let picked: Vec<&str> = (0..6)
            .map(|_| {
                let i = b.balancer.pick(&b.candidates(), None).expect("available");
                b.endpoints[i].address.as_str()
            })
            .collect();
        assert_eq!(
            picked,
            [
                "127.0.0.1:1",
                "127.0.0.1:2",
                "127.0.0.1:3",
                "127.0.0.1:1",
                "127.0.0.1:2",
                "127.0.0.1:3"
            ]
        );
    }

    #[test]
    fn each_backend_gets_its_own_client_with_its_connect_timeout_and_protocol() {
        let spec = |name: &str, protocol: Protocol, seconds: i64| prism_proto::Backend {
            name: name.into(),
            protocol: protocol.into(),
            connect_timeout: (seconds > 0).then_some(pbjson_types::Duration { seconds, nanos: 0 }),
            endpoints: vec![prism_proto::pb::config::v1::Endpoint {
                address: "127.0.0.1:1".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let own = OwnAddresses::default();
        let none = Snapshot::empty(1);
        let grpc = Backend::compile(
            &none,
            &spec("n/g", Protocol::Grpc, 2),
            "v1",
            String::new(),
            &own,
            None,
        )
        .expect("compiles");
        assert!(grpc.client.is_http2());
        assert_eq!(grpc.client.connect_timeout(), Duration::from_secs(2));
        let plain = Backend::compile(
            &none,
            &spec("n/p", Protocol::Http1, 0),
            "v1",
            String::new(),
            &own,
            None,
        )
        .expect("compiles");
        assert!(!plain.client.is_http2());
        assert_eq!(plain.client.connect_timeout(), DEFAULT_CONNECT_TIMEOUT);
    }

    #[test]
    fn a_backend_without_endpoints_is_refused() {
        let spec = prism_proto::Backend {
            name: "n/empty".into(),
            ..Default::default()
        };
        let error = Backend::compile(
            &Snapshot::empty(1),
            &spec,
            "v1",
            String::new(),
            &OwnAddresses::default(),
            None,
        )
        .map(|_| ())
        .unwrap_err();
        assert_eq!(
            error,
            CompileError::NoEndpoints {
                backend: "n/empty".into()
            }
        );
    }

    #[test]
    fn a_backend_pointing_at_the_proxy_itself_is_refused() {
        let own = OwnAddresses::new(
            "0.0.0.0:8080".parse().expect("addr"),
            "proxy-a.internal:8080",
        );
        for looping in [
            "127.0.0.1:8080",
            "localhost:8080",
            "PROXY-A.internal:8080",
            "0.0.0.0:8080",
        ] {
            assert!(
                own.contains(&looping.parse().expect("authority")),
                "{looping}"
            );
        }
        for fine in ["127.0.0.1:8081", "10.0.0.9:8080", "other.internal:8080"] {
            assert!(!own.contains(&fine.parse().expect("authority")), "{fine}");
        }
        let own = OwnAddresses::new("127.0.0.1:2001".parse().expect("addr"), "");
        let error = Runtime::compile(&sample(), &Runtime::unconfigured(), &own)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("127.0.0.1:2001") && error.contains("loop"),
            "{error}"
        );
    }
}
