//! The TLS listener's handshake: rustls, configured by the namespace whose
//! host the client names (SNI) in the runtime live at that moment — its
//! certificate, ALPN `h2` and `http/1.1`, TLS 1.2 and 1.3 only, and, with a
//! `client_ca_secret`, the client certificate it asks for and verifies.
//!
//! The ClientHello is read first ([`LazyConfigAcceptor`]), then the
//! namespace's configuration completes the handshake, as Envoy picks a
//! filter chain by SNI: a rotated Secret or CA reaches the next handshake as
//! soon as its snapshot is applied, with no listener restart; connections
//! already open keep the session they negotiated.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::server::Acceptor;
use tokio::net::TcpStream;
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;
use x509_parser::extensions::GeneralName;

use crate::runtime::Runtime;

/// Why a TLS connection was not served.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("TLS handshake timed out")]
    TimedOut,
    #[error("TLS handshake failed: {0}")]
    Failed(#[source] std::io::Error),
    #[error("no namespace serves TLS for server name {0:?}")]
    UnknownServerName(Option<String>),
}

/// Marks a request that arrived over TLS, in its extensions, with the
/// client's certificate if it sent one.
#[derive(Clone, Debug, Default)]
pub(crate) struct Tls {
    pub peer: Option<Arc<Peer>>,
}

/// A client whose certificate a namespace's `client_ca_secret` verified.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Peer {
    /// That namespace: the identities hold for requests to its hosts only.
    pub namespace: Arc<str>,
    /// The certificate's URI subject alt names (SPIFFE IDs).
    pub identities: Vec<String>,
}

/// Completes the server side of the handshake within `timeout`, configured
/// from the live `runtime` by the client's SNI.
pub(crate) async fn handshake(
    runtime: &ArcSwap<Runtime>,
    stream: TcpStream,
    timeout: Duration,
) -> Result<(TlsStream<TcpStream>, Tls), HandshakeError> {
    let accept = async {
        let start = LazyConfigAcceptor::new(Acceptor::default(), stream)
            .await
            .map_err(HandshakeError::Failed)?;
        // A handshake is not the request path: one `load` of the runtime per
        // new connection costs nothing next to the handshake's cryptography.
        let hello = start.client_hello();
        let server_name = hello.server_name();
        let found = runtime.load().certificates().resolve(server_name).cloned();
        let handshake = found
            .ok_or_else(|| HandshakeError::UnknownServerName(server_name.map(str::to_string)))?;
        let stream = start
            .into_stream(Arc::clone(&handshake.config))
            .await
            .map_err(HandshakeError::Failed)?;
        let peer = stream.get_ref().1.peer_certificates().map(|chain| {
            Arc::new(Peer {
                namespace: Arc::clone(&handshake.namespace),
                identities: chain
                    .first()
                    .map(|leaf| uri_names(leaf))
                    .unwrap_or_default(),
            })
        });
        Ok((stream, Tls { peer }))
    };
    tokio::time::timeout(timeout, accept)
        .await
        .unwrap_or(Err(HandshakeError::TimedOut))
}

/// The URI subject alt names of a certificate rustls has verified (so one
/// that parses).
fn uri_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(names)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    names
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(uri.to_string()),
            _ => None,
        })
        .collect()
}
