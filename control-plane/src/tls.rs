//! TLS for the admin API and the discovery server (rustls), from PEM files.
//!
//! The discovery server may require client certificates (mTLS). A proxy's
//! identity is then its certificate's URI SANs (SPIFFE IDs), and the
//! namespaces it may serve come from them, as Istio lays its IDs out:
//! `spiffe://<trust domain>/ns/<namespace>/…` names namespace
//! `<namespace>`, and `ns/*` every namespace. A certificate that names no
//! namespace is served none.

use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::debug;
use x509_parser::extensions::GeneralName;

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress before accepting waits.
const PENDING_HANDSHAKES: usize = 64;

/// A certificate chain and its private key, PEM files.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key of the leaf.
    pub key: PathBuf,
}

/// Why a TLS setting could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {reason}")]
pub struct TlsError {
    what: &'static str,
    path: PathBuf,
    reason: String,
}

fn error(what: &'static str, path: &Path, reason: impl ToString) -> TlsError {
    TlsError {
        what,
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// A server configuration presenting `files`, asking every client for a
/// certificate signed by `client_ca` (and refusing one without) when given,
/// offering `alpn`.
pub fn server_config(
    files: &TlsFiles,
    client_ca: Option<&Path>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| error("certificate", &files.cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| error("certificate", &files.cert, e))?;
    if chain.is_empty() {
        return Err(error("certificate", &files.cert, "holds no certificate"));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| error("private key", &files.key, e))?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| error("certificate", &files.cert, e))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in
                CertificateDer::pem_file_iter(path).map_err(|e| error("client CA", path, e))?
            {
                let cert = cert.map_err(|e| error("client CA", path, e))?;
                roots.add(cert).map_err(|e| error("client CA", path, e))?;
            }
            if roots.is_empty() {
                return Err(error("client CA", path, "holds no certificate"));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| error("client CA", path, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| error("certificate", &files.cert, e))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// What a client certificate says about the proxy presenting it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyIdentity {
    /// Its URI SANs.
    pub uris: Vec<String>,
    /// The namespaces it may serve; `None`: every namespace (`ns/*`).
    pub namespaces: Option<BTreeSet<String>>,
}

impl ProxyIdentity {
    /// The identity of a verified leaf certificate (DER).
    pub fn of(leaf: &[u8]) -> Self {
        let uris: Vec<String> = match x509_parser::parse_x509_certificate(leaf) {
            Ok((_, cert)) => match cert.subject_alternative_name() {
                Ok(Some(san)) => san
                    .value
                    .general_names
                    .iter()
                    .filter_map(|name| match name {
                        GeneralName::URI(uri) => Some(uri.to_string()),
                        _ => None,
                    })
                    .collect(),
                _ => Vec::new(),
            },
            Err(_) => Vec::new(),
        };
        let mut namespaces = Some(BTreeSet::new());
        for uri in &uris {
            match namespace_of(uri) {
                Some("*") => namespaces = None,
                Some(ns) => {
                    if let Some(set) = namespaces.as_mut() {
                        set.insert(ns.to_string());
                    }
                }
                None => {}
            }
        }
        Self { uris, namespaces }
    }

    /// Whether the proxy may serve `namespace`.
    pub fn may_serve(&self, namespace: &str) -> bool {
        self.namespaces
            .as_ref()
            .is_none_or(|set| set.contains(namespace))
    }
}

/// `spiffe://td/ns/shop/sa/proxy` → `shop`.
fn namespace_of(uri: &str) -> Option<&str> {
    let path = uri.strip_prefix("spiffe://")?.split_once('/')?.1;
    let mut segments = path.split('/');
    while let Some(segment) = segments.next() {
        if segment == "ns" {
            return segments.next().filter(|ns| !ns.is_empty());
        }
    }
    None
}

/// A connection to the discovery server: plain TCP, or TLS with the
/// client's identity when it presented a certificate.
#[derive(Debug)]
pub enum Conn {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS.
    Tls(Box<TlsStream<TcpStream>>, Option<Arc<ProxyIdentity>>),
}

impl Conn {
    /// The identity the client proved, if it presented a certificate.
    pub fn identity(&self) -> Option<Arc<ProxyIdentity>> {
        match self {
            Conn::Plain(_) => None,
            Conn::Tls(_, identity) => identity.clone(),
        }
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = Option<Arc<ProxyIdentity>>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.identity()
    }
}

macro_rules! delegate {
    ($self:ident, $inner:ident => $call:expr) => {
        match $self.get_mut() {
            Conn::Plain($inner) => {
                let $inner = Pin::new($inner);
                $call
            }
            Conn::Tls($inner, _) => {
                let $inner = Pin::new(&mut **$inner);
                $call
            }
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_read(cx, buf))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, io => io.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, io => io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(io) => io.is_write_vectored(),
            Conn::Tls(io, _) => io.is_write_vectored(),
        }
    }
}

/// Accepted connections of `listener` with Nagle's algorithm off, through
/// TLS when `tls` is given: handshakes run each in a task of its own
/// (bounded in time and in number), so a slow client holds up no other.
/// The listener is closed once the receiver is dropped.
pub fn incoming(listener: TcpListener, tls: Option<Arc<ServerConfig>>) -> mpsc::Receiver<Conn> {
    let (tx, rx) = mpsc::channel(PENDING_HANDSHAKES);
    tokio::spawn(async move {
        let acceptor = tls.map(TlsAcceptor::from);
        loop {
            // Once the server drops its end, the listener goes too, so the
            // port is free for the next control plane at once.
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    debug!(error = %e, "Accept failed.");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let Some(acceptor) = acceptor.clone() else {
                if tx.send(Conn::Plain(stream)).await.is_err() {
                    return;
                }
                continue;
            };
            let Ok(permit) = tx.clone().reserve_owned().await else {
                return;
            };
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let identity = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|chain| chain.first())
                            .map(|leaf| Arc::new(ProxyIdentity::of(leaf)));
                        permit.send(Conn::Tls(Box::new(tls), identity));
                    }
                    Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed."),
                    Err(_) => debug!(%peer, "TLS handshake timed out."),
                }
            });
        }
    });
    rx
}

/// The admin API's listener for axum: `incoming` as an axum `Listener`.
pub struct AdminListener {
    connections: mpsc::Receiver<Conn>,
    addr: SocketAddr,
}

impl AdminListener {
    /// Serves `listener`, through TLS when `tls` is given.
    pub fn new(listener: TcpListener, tls: Option<Arc<ServerConfig>>) -> io::Result<Self> {
        let addr = listener.local_addr()?;
        Ok(Self {
            connections: incoming(listener, tls),
            addr,
        })
    }
}

impl axum::serve::Listener for AdminListener {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        match self.connections.recv().await {
            Some(conn) => (conn, self.addr),
            // The accept task ends only once this receiver is gone.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_port_is_free_once_the_connections_are_no_longer_taken() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(incoming(listener, None));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while TcpListener::bind(addr).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{addr} is still bound"
            );
            tokio::task::yield_now().await;
        }
    }

    #[test]
    fn namespaces_come_from_spiffe_ids() {
        assert_eq!(
            namespace_of("spiffe://prism.test/ns/shop/sa/proxy"),
            Some("shop")
        );
        assert_eq!(namespace_of("spiffe://prism.test/ns/shop"), Some("shop"));
        assert_eq!(namespace_of("spiffe://prism.test/ns/*"), Some("*"));
        assert_eq!(namespace_of("spiffe://prism.test/proxy/p1"), None);
        assert_eq!(namespace_of("spiffe://prism.test/ns/"), None);
        assert_eq!(namespace_of("https://prism.test/ns/shop"), None);
    }
}
