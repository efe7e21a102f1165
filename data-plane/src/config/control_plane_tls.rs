//! TLS to the control plane: the discovery client's connector when the
//! control plane's URL is `https://`. The server is verified against the
//! CA given (or the web PKI roots without one); a client certificate, when
//! given, is how a control plane that requires mTLS knows this proxy, and
//! which namespaces it sends it.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Files of the proxy's TLS to the control plane, PEM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ControlPlaneTls {
    /// CA that signed the control plane's certificate; the web PKI roots
    /// when `None`.
    pub ca: Option<PathBuf>,
    /// This proxy's certificate chain and private key, for mTLS.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// Why the TLS files could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {reason}")]
pub struct TlsFileError {
    what: &'static str,
    path: PathBuf,
    reason: String,
}

impl ControlPlaneTls {
    /// The client configuration these files make, offering HTTP/2 only.
    pub(crate) fn client_config(&self) -> Result<Arc<ClientConfig>, TlsFileError> {
        let error = |what, path: &PathBuf, reason: &dyn std::fmt::Display| TlsFileError {
            what,
            path: path.clone(),
            reason: reason.to_string(),
        };
        let mut roots = RootCertStore::empty();
        match &self.ca {
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            Some(path) => {
                let certs =
                    CertificateDer::pem_file_iter(path).map_err(|e| error("CA", path, &e))?;
                for cert in certs {
                    let cert = cert.map_err(|e| error("CA", path, &e))?;
                    roots.add(cert).map_err(|e| error("CA", path, &e))?;
                }
                if roots.is_empty() {
                    return Err(error("CA", path, &"holds no certificate"));
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| error("CA", &PathBuf::new(), &e))?
            .with_root_certificates(roots);
        let mut config = match &self.identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                    .map_err(|e| error("certificate", cert, &e))?
                    .collect::<Result<_, _>>()
                    .map_err(|e| error("certificate", cert, &e))?;
                let key =
                    PrivateKeyDer::from_pem_file(key).map_err(|e| error("private key", key, &e))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| error("certificate", cert, &e))?
            }
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// Dials the control plane over TLS: tonic's connector for `https://`.
#[derive(Clone)]
pub(crate) struct Connector(pub(crate) Arc<ClientConfig>);

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = Arc::clone(&self.0);
        Box::pin(async move {
            let invalid = |what: &str| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_string())
            };
            let host = uri
                .host()
                .ok_or_else(|| invalid("the control plane URL has no host"))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(host)
                .map_err(|_| invalid("the control plane's host is not a valid TLS server name"))?;
            let tls = TlsConnector::from(config).connect(name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}
