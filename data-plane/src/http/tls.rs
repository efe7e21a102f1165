//! The TLS listener's handshake: rustls with the certificate chosen by SNI
//! from the live runtime, ALPN `h2` and `http/1.1`, TLS 1.2 and 1.3 only.
//!
//! The certificate is looked up on every handshake in the runtime that is
//! live at that moment, so a rotated Secret reaches the next handshake as soon
//! as its snapshot is applied, with no listener restart; connections already
//! open keep the session they negotiated.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::runtime::Runtime;
use crate::runtime::tls::{PROTOCOL_VERSIONS, provider};

/// Why a TLS connection was not served.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("TLS handshake timed out")]
    TimedOut,
    #[error("TLS handshake failed: {0}")]
    Failed(#[source] std::io::Error),
}

/// Marks a request that arrived over TLS, in its extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Tls;

/// Picks the certificate of a handshake from the live runtime.
#[derive(Debug)]
struct Resolver(Arc<ArcSwap<Runtime>>);

/// The acceptor of the TLS listener: certificates from `runtime`.
pub(crate) fn acceptor(runtime: Arc<ArcSwap<Runtime>>) -> Result<TlsAcceptor, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Resolver(runtime)));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Completes the server side of the handshake within `timeout`.
pub(crate) async fn handshake(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    timeout: Duration,
) -> Result<TlsStream<TcpStream>, HandshakeError> {
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(result) => result.map_err(HandshakeError::Failed),
        Err(_) => Err(HandshakeError::TimedOut),
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // A handshake is not the request path: one `load` of the runtime per
        // new connection costs nothing next to the handshake's cryptography.
        self.0
            .load()
            .certificates()
            .resolve(client_hello.server_name())
    }
}
