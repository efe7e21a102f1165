//! TLS in the Envoy view: Prism Secrets as SDS secrets, the TLS listener
//! `prism-https` (one filter chain per namespace with a `tls_secret`, chosen
//! by SNI), and upstream TLS to backends.
//!
//! Certificates and keys travel as SDS Secrets over the same ADS stream,
//! referred to by name, rather than inline in Listeners and Clusters: a key
//! then goes only to the Envoys whose listeners or clusters name it (Secrets
//! are served by name, never to a wildcard subscription), it is not repeated
//! in every Listener every LDS subscriber gets, and a renewed certificate
//! replaces one Secret without replacing (and draining) the listener.

use envoy_types::pb::envoy::config::core::v3::{
    DataSource, TransportSocket, data_source, transport_socket,
};
use envoy_types::pb::envoy::config::listener::v3::{
    FilterChain, FilterChainMatch, Listener, ListenerFilter, listener_filter,
};
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig,
    Secret as EnvoySecret, SubjectAltNameMatcher, TlsCertificate, UpstreamTlsContext,
    common_tls_context, secret as envoy_secret_type, subject_alt_name_matcher,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::BoolValue;
use envoy_types::util::pack_any;
use prism_proto::pb::config::v1::secret;
use prism_proto::{Backend, Secret};
use std::net::SocketAddr;

use super::clusters::is_http2;
use super::{HTTPS_LISTENER, Policy, ads, hcm_filter, socket_address, split_host_port};

/// Well-known name of the TLS inspector listener filter (reads the SNI).
const TLS_INSPECTOR: &str = "envoy.filters.listener.tls_inspector";
/// Well-known name of the TLS transport socket.
const TLS_TRANSPORT_SOCKET: &str = "envoy.transport_sockets.tls";
/// The trust store of a backend that names no `ca_secret`: the system's, at
/// the path Debian and its kin (and Envoy's own images) keep it.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The SDS Secret of a Prism Secret, under the same name: a certificate with
/// its key, or a validation context trusting a CA bundle.
pub(super) fn envoy_secret(secret: &Secret) -> Option<EnvoySecret> {
    let inline = |text: &str| DataSource {
        specifier: Some(data_source::Specifier::InlineString(text.to_string())),
        ..Default::default()
    };
    let kind = match secret.kind.as_ref()? {
        secret::Kind::TlsCertificate(tls) => {
            envoy_secret_type::Type::TlsCertificate(TlsCertificate {
                certificate_chain: Some(inline(&tls.certificate_chain)),
                private_key: Some(inline(&tls.private_key)),
                ..Default::default()
            })
        }
        // A credential is for Prism's own proxies (a data binding's
        // connection string): Envoy has no use for it and never sees it.
        secret::Kind::Credential(_) => return None,
        secret::Kind::CaBundle(ca) => {
            envoy_secret_type::Type::ValidationContext(CertificateValidationContext {
                trusted_ca: Some(inline(&ca.certificates)),
                ..Default::default()
            })
        }
    };
    Some(EnvoySecret {
        name: secret.name.clone(),
        r#type: Some(kind),
    })
}

/// A reference to SDS Secret `name` over ADS.
fn sds(name: String) -> SdsSecretConfig {
    SdsSecretConfig {
        name,
        sds_config: Some(ads()),
    }
}

/// Listener `prism-https` at `at`: the TLS inspector reads the SNI, and one
/// filter chain per namespace with a `tls_secret` presents its certificate
/// (ALPN h2 and http/1.1) for its hosts, exact and wildcard, verifies client
/// certificates against its `client_ca_secret` (SDS) if it has one, and
/// requires them with `require_client_certificate`, before the same
/// HttpConnectionManager as `prism-http`. A namespace holding the catch-all
/// `*` also gets a chain without server names: the one Envoy takes for any
/// other SNI, or none. `None` when no namespace serves TLS: Envoy rejects a
/// listener without filter chains.
pub(super) fn https_listener(policy: &Policy<'_>, at: SocketAddr) -> Option<Listener> {
    let mut filter_chains = Vec::new();
    for ns in policy
        .namespaces
        .iter()
        .filter(|ns| !ns.tls_secret.is_empty())
    {
        let secret = format!("{}/{}", ns.name, ns.tls_secret);
        let client_ca = (!ns.client_ca_secret.is_empty())
            .then(|| format!("{}/{}", ns.name, ns.client_ca_secret));
        let chain = |name: String, server_names: Vec<String>| FilterChain {
            name,
            filter_chain_match: Some(FilterChainMatch {
                server_names,
                ..Default::default()
            }),
            filters: vec![hcm_filter()],
            transport_socket: Some(transport(pack_any(DownstreamTlsContext {
                common_tls_context: Some(CommonTlsContext {
                    tls_certificate_sds_secret_configs: vec![sds(secret.clone())],
                    validation_context_type: client_ca.clone().map(|ca| {
                        common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(
                            sds(ca),
                        )
                    }),
                    alpn_protocols: vec!["h2".to_string(), "http/1.1".to_string()],
                    ..Default::default()
                }),
                require_client_certificate: ns
                    .require_client_certificate
                    .then_some(BoolValue { value: true }),
                ..Default::default()
            }))),
            ..Default::default()
        };
        let named: Vec<String> = ns.hosts.iter().filter(|h| *h != "*").cloned().collect();
        if !named.is_empty() {
            filter_chains.push(chain(ns.name.clone(), named));
        }
        if ns.hosts.iter().any(|h| h == "*") {
            filter_chains.push(chain(format!("{}/*", ns.name), Vec::new()));
        }
    }
    if filter_chains.is_empty() {
        return None;
    }
    Some(Listener {
        name: HTTPS_LISTENER.to_string(),
        address: Some(socket_address(&at.ip().to_string(), at.port())),
        listener_filters: vec![ListenerFilter {
            name: TLS_INSPECTOR.to_string(),
            config_type: Some(listener_filter::ConfigType::TypedConfig(pack_any(
                TlsInspector::default(),
            ))),
            ..Default::default()
        }],
        filter_chains,
        ..Default::default()
    })
}

/// TLS from Envoy to the backend's endpoints: verified against the backend's
/// `ca_secret` (SDS) or the system's trust store, presenting
/// `client_certificate_secret` (SDS) when set, ALPN `h2` for HTTP/2 backends.
///
/// The name sent (SNI) and verified (a DNS subject alt name) is `sni`, or
/// the endpoints' host name when they all share one. Envoy cannot take it
/// from each endpoint in turn, so with IP endpoints or several host names
/// and no `sni`, it sends none and verifies the chain only.
pub(super) fn upstream_tls(backend: &Backend) -> Option<TransportSocket> {
    let tls = backend.tls.as_ref()?;
    let namespace = backend.name.split_once('/').map_or("", |(ns, _)| ns);
    let sni = if tls.sni.is_empty() {
        shared_host(backend).unwrap_or_default()
    } else {
        tls.sni.clone()
    };
    let mut validation = CertificateValidationContext {
        match_typed_subject_alt_names: (!sni.is_empty())
            .then(|| SubjectAltNameMatcher {
                san_type: subject_alt_name_matcher::SanType::Dns as i32,
                matcher: Some(StringMatcher {
                    match_pattern: Some(string_matcher::MatchPattern::Exact(sni.clone())),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .into_iter()
            .collect(),
        ..Default::default()
    };
    let validation = if tls.ca_secret.is_empty() {
        validation.trusted_ca = Some(DataSource {
            specifier: Some(data_source::Specifier::Filename(
                SYSTEM_CA_BUNDLE.to_string(),
            )),
            ..Default::default()
        });
        common_tls_context::ValidationContextType::ValidationContext(validation)
    } else {
        common_tls_context::ValidationContextType::CombinedValidationContext(
            common_tls_context::CombinedCertificateValidationContext {
                default_validation_context: Some(validation),
                validation_context_sds_secret_config: Some(sds(format!(
                    "{namespace}/{}",
                    tls.ca_secret
                ))),
                ..Default::default()
            },
        )
    };
    let client_certificate = (!tls.client_certificate_secret.is_empty())
        .then(|| sds(format!("{namespace}/{}", tls.client_certificate_secret)));
    Some(transport(pack_any(UpstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_sds_secret_configs: client_certificate.into_iter().collect(),
            validation_context_type: Some(validation),
            alpn_protocols: if is_http2(backend) {
                vec!["h2".to_string()]
            } else {
                Vec::new()
            },
            ..Default::default()
        }),
        sni,
        ..Default::default()
    })))
}

/// The one DNS host name every endpoint of `backend` has, if they share one.
fn shared_host(backend: &Backend) -> Option<String> {
    let mut hosts = backend
        .endpoints
        .iter()
        .map(|e| split_host_port(&e.address).map(|(host, _)| host));
    let first = hosts.next()??;
    let is_name = first.parse::<std::net::IpAddr>().is_err();
    (is_name && hosts.all(|h| h.as_deref() == Some(first.as_str())))
        .then(|| first.to_ascii_lowercase())
}

fn transport(config: envoy_types::pb::google::protobuf::Any) -> TransportSocket {
    TransportSocket {
        name: TLS_TRANSPORT_SOCKET.to_string(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(config)),
    }
}
