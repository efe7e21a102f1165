//! TLS material compiled from the snapshot's Secrets: what the TLS listener
//! does for each namespace's hosts (its certificate and, with a
//! `client_ca_secret`, the client certificates it asks for), chosen by SNI,
//! and each TLS backend's rustls client configuration.
//!
//! Everything is parsed and checked here, when a snapshot is compiled, so a
//! bad certificate or a key that does not match its certificate is a NACK,
//! never a failed handshake.

use std::collections::HashMap;
use std::sync::Arc;

use prism_proto::pb::config::v1::{Namespace, UpstreamTls, secret};
use prism_proto::{Kind, Resource, Snapshot};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::CompileError;

/// TLS 1.2 and 1.3 only: older versions are refused on both sides.
pub(crate) const PROTOCOL_VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The TLS listener's handshake for each host, matched like the route
/// table's hosts: exact, then the longest wildcard, then the catch-all `*`.
#[derive(Debug, Default)]
pub(crate) struct Certificates {
    exact: HashMap<String, Arc<Handshake>>,
    /// `(".suffix", handshake)`, longest suffix first.
    wildcards: Vec<(String, Arc<Handshake>)>,
    any: Option<Arc<Handshake>>,
}

/// How the TLS listener completes a handshake for one namespace's hosts.
#[derive(Debug)]
pub(crate) struct Handshake {
    /// The namespace whose hosts these are: the one whose `client_ca_secret`
    /// verified the client's certificate, if it sent one.
    pub namespace: Arc<str>,
    /// Its certificate, ALPN `h2` and `http/1.1`, and its client
    /// certificate verifier, if any.
    pub config: Arc<ServerConfig>,
}

/// A backend's upstream TLS: its client configuration and the server name
/// it sends and verifies (`None`: the endpoint's host).
#[derive(Clone, Debug)]
pub(crate) struct UpstreamParams {
    pub config: Arc<ClientConfig>,
    pub server_name: Option<ServerName<'static>>,
}

/// The crypto provider of every TLS configuration the proxy builds: ring,
/// passed explicitly rather than installed process-wide, so nothing depends on
/// which provider another crate in the process happens to install.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Certificates {
    /// The handshake of every namespace of `snapshot` that names a
    /// `tls_secret`, for each of its hosts.
    pub(crate) fn compile(snapshot: &Snapshot) -> Result<Self, CompileError> {
        let provider = provider();
        let mut certificates = Certificates::default();
        for entry in snapshot.of_kind(Kind::Namespace) {
            let Resource::Namespace(ns) = &entry.resource else {
                continue;
            };
            if ns.tls_secret.is_empty() {
                continue;
            }
            let handshake = Arc::new(Handshake::compile(snapshot, ns, &provider).map_err(
                |(field, reason)| CompileError::Tls {
                    resource: entry.resource.key().to_string(),
                    field,
                    reason,
                },
            )?);
            for host in &ns.hosts {
                let host = host.to_ascii_lowercase();
                if host == "*" {
                    certificates.any = Some(Arc::clone(&handshake));
                } else if let Some(suffix) = host.strip_prefix('*') {
                    certificates
                        .wildcards
                        .push((suffix.to_string(), Arc::clone(&handshake)));
                } else {
                    certificates.exact.insert(host, Arc::clone(&handshake));
                }
            }
        }
        certificates
            .wildcards
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        Ok(certificates)
    }

    /// The handshake for a client naming `server_name` (SNI); the
    /// catch-all's when the client sent none or no host matches.
    pub(crate) fn resolve(&self, server_name: Option<&str>) -> Option<&Arc<Handshake>> {
        let found = server_name.and_then(|name| {
            // rustls hands over SNI already lowercased and without a trailing dot.
            self.exact.get(name).or_else(|| {
                self.wildcards
                    .iter()
                    .find(|(suffix, _)| name.len() > suffix.len() && name.ends_with(suffix))
                    .map(|(_, handshake)| handshake)
            })
        });
        found.or(self.any.as_ref())
    }
}

impl Handshake {
    /// Namespace `ns`'s handshake; on error, the field at fault and why.
    fn compile(
        snapshot: &Snapshot,
        ns: &Namespace,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, (&'static str, String)> {
        let secret = format!("{}/{}", ns.name, ns.tls_secret);
        let key = certified_key(snapshot, &secret, provider).map_err(|e| ("tls_secret", e))?;
        let builder = ServerConfig::builder_with_provider(Arc::clone(provider))
            .with_protocol_versions(PROTOCOL_VERSIONS)
            .map_err(|e| ("tls_secret", e.to_string()))?;
        let builder = if ns.client_ca_secret.is_empty() {
            builder.with_no_client_auth()
        } else {
            let name = format!("{}/{}", ns.name, ns.client_ca_secret);
            let roots = ca_bundle(snapshot, &name).map_err(|e| ("client_ca_secret", e))?;
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider));
            let verifier = if ns.require_client_certificate {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier
                .build()
                .map_err(|e| ("client_ca_secret", format!("`{name}`: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        };
        let mut config = builder.with_cert_resolver(Arc::new(ServerCertificate(Arc::new(key))));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            namespace: Arc::from(ns.name.as_str()),
            config: Arc::new(config),
        })
    }
}

/// Always presents one server certificate: the SNI was matched before.
#[derive(Debug)]
struct ServerCertificate(Arc<CertifiedKey>);

impl ResolvesServerCert for ServerCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

/// The certificates of CA bundle Secret `name`, as a root store.
fn ca_bundle(snapshot: &Snapshot, name: &str) -> Result<RootCertStore, String> {
    let Some(secret::Kind::CaBundle(ca)) = secret(snapshot, name) else {
        return Err(format!("`{name}` is not a CA bundle"));
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.certificates.as_bytes()) {
        let cert = cert.map_err(|e| format!("`{name}`: {e}"))?;
        roots.add(cert).map_err(|e| format!("`{name}`: {e}"))?;
    }
    Ok(roots)
}

impl UpstreamParams {
    /// The client configuration of backend `spec` in `namespace`, with ALPN
    /// `h2` for HTTP/2 backends and `http/1.1` otherwise.
    pub(crate) fn compile(
        snapshot: &Snapshot,
        namespace: &str,
        tls: &UpstreamTls,
        http2: bool,
    ) -> Result<Self, (&'static str, String)> {
        let provider = provider();
        let roots = if tls.ca_secret.is_empty() {
            let mut roots = RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            roots
        } else {
            ca_bundle(snapshot, &format!("{namespace}/{}", tls.ca_secret))
                .map_err(|e| ("tls.ca_secret", e))?
        };
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(PROTOCOL_VERSIONS)
            .map_err(|e| ("tls", e.to_string()))?
            .with_root_certificates(roots);
        let mut config = if tls.client_certificate_secret.is_empty() {
            builder.with_no_client_auth()
        } else {
            let name = format!("{namespace}/{}", tls.client_certificate_secret);
            let key = certified_key(snapshot, &name, &provider)
                .map_err(|e| ("tls.client_certificate_secret", e))?;
            builder.with_client_cert_resolver(Arc::new(ClientCertificate(Arc::new(key))))
        };
        config.alpn_protocols = vec![if http2 {
            b"h2".to_vec()
        } else {
            b"http/1.1".to_vec()
        }];
        let server_name = if tls.sni.is_empty() {
            None
        } else {
            Some(
                ServerName::try_from(tls.sni.clone())
                    .map_err(|e| ("tls.sni", format!("`{}`: {e}", tls.sni)))?,
            )
        };
        Ok(Self {
            config: Arc::new(config),
            server_name,
        })
    }
}

/// Always presents one client certificate.
#[derive(Debug)]
struct ClientCertificate(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for ClientCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The content versions of the Secrets a backend's `tls` refers to, so a
/// rotated CA bundle or client certificate rebuilds the backend's client.
pub(crate) fn secret_versions(snapshot: &Snapshot, namespace: &str, tls: &UpstreamTls) -> String {
    [&tls.ca_secret, &tls.client_certificate_secret]
        .iter()
        .filter(|name| !name.is_empty())
        .map(|name| {
            let key = prism_proto::ResourceKey::new(Kind::Secret, format!("{namespace}/{name}"));
            snapshot
                .get(&key)
                .map_or("", |entry| entry.version.as_str())
                .to_string()
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn secret<'a>(snapshot: &'a Snapshot, name: &str) -> Option<&'a secret::Kind> {
    let entry = snapshot.get(&prism_proto::ResourceKey::new(Kind::Secret, name))?;
    match &entry.resource {
        Resource::Secret(s) => s.kind.as_ref(),
        _ => None,
    }
}

/// The certificate chain and key of Secret `name`, parsed, with the key
/// checked against the leaf certificate.
fn certified_key(
    snapshot: &Snapshot,
    name: &str,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, String> {
    let Some(secret::Kind::TlsCertificate(tls)) = secret(snapshot, name) else {
        return Err(format!("`{name}` is not a TLS certificate"));
    };
    let chain = CertificateDer::pem_slice_iter(tls.certificate_chain.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("`{name}`: certificate_chain: {e}"))?;
    if chain.is_empty() {
        return Err(format!("`{name}`: certificate_chain: no certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(tls.private_key.as_bytes())
        .map_err(|e| format!("`{name}`: private_key: {e}"))?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| format!("`{name}`: {e}"))
}

#[cfg(test)]
mod tests {
    use prism_proto::pb::config::v1::Namespace;

    use super::*;
    use crate::runtime::tests::{backend, compile, namespace, prefix, route};
    use crate::runtime::{OwnAddresses, Runtime};
    use crate::test_ca::{Leaf, TestCa};

    fn with_certificate(name: &str, hosts: &[&str], leaf: &Leaf) -> [Resource; 2] {
        [
            leaf.secret(&format!("{name}/cert")),
            Resource::Namespace(Namespace {
                name: name.into(),
                hosts: hosts.iter().map(|h| h.to_string()).collect(),
                tls_secret: "cert".into(),
                ..Default::default()
            }),
        ]
    }

    #[test]
    fn certificates_are_matched_exact_then_longest_wildcard_then_catch_all() {
        let ca = TestCa::new();
        let (exact, wide, narrow, any) = (
            ca.issue(&["a.demo.test"]),
            ca.issue(&["*.demo.test"]),
            ca.issue(&["*.api.demo.test"]),
            ca.issue(&["fallback.test"]),
        );
        let snapshot = Snapshot::from_resources(
            1,
            [
                with_certificate("exact", &["a.demo.test"], &exact),
                with_certificate("wide", &["*.demo.test"], &wide),
                with_certificate("narrow", &["*.api.demo.test"], &narrow),
                with_certificate("any", &["*"], &any),
            ]
            .into_iter()
            .flatten(),
        );
        let certificates = Certificates::compile(&snapshot).expect("compiles");
        let served = |name: Option<&str>| {
            certificates
                .resolve(name)
                .map(|handshake| handshake.namespace.to_string())
                .expect("a handshake")
        };
        assert_eq!(served(Some("a.demo.test")), "exact");
        assert_eq!(served(Some("b.demo.test")), "wide");
        assert_eq!(served(Some("x.api.demo.test")), "narrow");
        assert_eq!(served(Some("elsewhere.test")), "any");
        assert_eq!(served(None), "any");
        assert!(
            Certificates::default()
                .resolve(Some("a.demo.test"))
                .is_none()
        );
    }

    /// Why `snapshot` does not compile.
    fn refusal(snapshot: &Snapshot) -> String {
        Runtime::compile(snapshot, &Runtime::unconfigured(), &OwnAddresses::default())
            .map(|_| ())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_key_that_does_not_match_its_certificate_is_refused() {
        let ca = TestCa::new();
        let (one, two) = (ca.issue(&["demo.local"]), ca.issue(&["demo.local"]));
        let mismatched = Leaf {
            chain: one.chain,
            key: two.key,
        };
        let snapshot =
            Snapshot::from_resources(1, with_certificate("demo", &["demo.local"], &mismatched));
        let error = refusal(&snapshot);
        assert!(
            error.starts_with("Namespace demo: tls_secret: `demo/cert`:"),
            "{error}"
        );
    }

    #[test]
    fn a_client_ca_without_a_certificate_is_refused() {
        let ca = TestCa::new();
        let leaf = ca.issue(&["demo.local"]);
        let [cert, Resource::Namespace(mut ns)] = with_certificate("demo", &["demo.local"], &leaf)
        else {
            unreachable!()
        };
        ns.client_ca_secret = "clients".into();
        let empty = Resource::Secret(prism_proto::pb::config::v1::Secret {
            name: "demo/clients".into(),
            kind: Some(secret::Kind::CaBundle(
                prism_proto::pb::config::v1::CaBundle {
                    certificates: "no PEM here".into(),
                },
            )),
        });
        let snapshot = Snapshot::from_resources(1, [cert, Resource::Namespace(ns), empty]);
        let error = refusal(&snapshot);
        assert!(
            error.starts_with("Namespace demo: client_ca_secret: `demo/clients`:"),
            "{error}"
        );
    }

    #[test]
    fn a_backend_is_rebuilt_when_a_secret_its_tls_uses_changes() {
        let ca = TestCa::new();
        let tls_backend = |_: ()| {
            let Resource::Backend(mut spec) = backend("demo/web", &["127.0.0.1:1"]) else {
                unreachable!()
            };
            spec.tls = Some(UpstreamTls {
                ca_secret: "ca".into(),
                ..Default::default()
            });
            Resource::Backend(spec)
        };
        let snapshot = |revision, ca: &TestCa| {
            Snapshot::from_resources(
                revision,
                [
                    namespace("demo", &["demo.local"]),
                    ca.secret("demo/ca"),
                    tls_backend(()),
                    route("demo/root", "", prefix("/"), "web"),
                ],
            )
        };
        let first = compile(&snapshot(1, &ca), &Runtime::unconfigured());
        let same = compile(&snapshot(2, &ca), &first);
        let web = first.backend("demo/web").expect("backend");
        assert!(Arc::ptr_eq(web, same.backend("demo/web").expect("backend")));
        let rotated = compile(&snapshot(3, &TestCa::new()), &same);
        assert!(!Arc::ptr_eq(
            web,
            rotated.backend("demo/web").expect("backend")
        ));
    }
}
