//! Test-only TLS material made with rcgen: one CA per test and certificates
//! it signs, as the PEM text a Secret holds.

use prism_proto::Resource;
use prism_proto::pb::config::v1::{CaBundle, Secret, TlsCertificate, secret};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, Issuer, KeyPair};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// A certificate authority for one test.
pub(crate) struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate signed by a [`TestCa`], with its key, in PEM.
#[derive(Clone, Debug)]
pub(crate) struct Leaf {
    pub chain: String,
    pub key: String,
}

impl TestCa {
    pub(crate) fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "Prism Test CA");
        let issuer =
            CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("ca");
        Self { issuer }
    }

    /// The CA certificate, PEM.
    pub(crate) fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `names` (DNS names or IP addresses).
    pub(crate) fn issue(&self, names: &[&str]) -> Leaf {
        let key = KeyPair::generate().expect("key");
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("params");
        let issuer: &Issuer<'_, KeyPair> = &self.issuer;
        let cert = params.signed_by(&key, issuer).expect("sign");
        Leaf {
            chain: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A root store trusting only this CA.
    pub(crate) fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.issuer.der().clone()).expect("root");
        roots
    }

    /// Secret `name` holding this CA as a bundle.
    pub(crate) fn secret(&self, name: &str) -> Resource {
        Resource::Secret(Secret {
            name: name.into(),
            kind: Some(secret::Kind::CaBundle(CaBundle {
                certificates: self.pem(),
            })),
        })
    }
}

impl Leaf {
    /// Secret `name` holding this certificate and key.
    pub(crate) fn secret(&self, name: &str) -> Resource {
        Resource::Secret(Secret {
            name: name.into(),
            kind: Some(secret::Kind::TlsCertificate(TlsCertificate {
                certificate_chain: self.chain.clone(),
                private_key: self.key.clone(),
            })),
        })
    }

    /// The leaf certificate, DER, as a peer presents it.
    pub(crate) fn der(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(self.chain.as_bytes()).expect("pem")
    }
}
