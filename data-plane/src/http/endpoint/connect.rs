//! Opening one upstream connection: TCP (with `TCP_NODELAY`) and, for a TLS
//! backend, the TLS handshake, together within the backend's connect timeout.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tower::Service;

use crate::http::error::BoxError;
use crate::runtime::tls;

/// Opens a backend's upstream connections.
#[derive(Clone, Debug)]
pub(crate) struct Connector {
    tcp: HttpConnector,
    tls: Option<tls::UpstreamParams>,
    timeout: Duration,
}

/// An upstream connection, plain or TLS.
#[derive(Debug)]
pub(crate) enum Upstream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// The endpoint's host is not a valid TLS server name (and the backend's
/// `tls.sni` names none).
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a valid TLS server name; set the backend's tls.sni")]
struct InvalidServerName(String);

/// The upstream connect timed out (the backend's `connect_timeout`).
#[derive(Debug, thiserror::Error)]
#[error("connect timed out")]
pub(crate) struct ConnectTimedOut;

impl Connector {
    pub(crate) fn new(tls: Option<tls::UpstreamParams>, timeout: Duration) -> Self {
        let mut tcp = HttpConnector::new();
        tcp.set_nodelay(true);
        // The timeout is the connector's own, below, so it can be told apart.
        tcp.set_connect_timeout(None);
        Self { tcp, tls, timeout }
    }

    #[cfg(test)]
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Connects to the endpoint `uri` names (`http://host:port`).
    pub(crate) async fn connect(&self, uri: Uri) -> Result<Upstream, BoxError> {
        let host = uri.host().unwrap_or_default().to_string();
        // The HttpConnector is a handle on shared state: cloning it is cheap,
        // and it is ready at once (it resolves and connects in `call`).
        let connecting = self.tcp.clone().call(uri);
        let tls = self.tls.clone();
        let connect = async move {
            let tcp = connecting.await?.into_inner();
            let Some(tls) = tls else {
                return Ok(Upstream::Plain(tcp));
            };
            let server_name = match tls.server_name {
                Some(name) => name,
                None => server_name_of(&host)?,
            };
            let stream = TlsConnector::from(tls.config)
                .connect(server_name, tcp)
                .await?;
            Ok::<_, BoxError>(Upstream::Tls(Box::new(stream)))
        };
        match tokio::time::timeout(self.timeout, connect).await {
            Ok(result) => result,
            Err(_) => Err(ConnectTimedOut.into()),
        }
    }
}

/// The server name of an endpoint host: a DNS name or an IP address (an IPv6
/// one without its brackets).
fn server_name_of(host: &str) -> Result<ServerName<'static>, BoxError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(bare.to_string()).map_err(|_| InvalidServerName(host.to_string()).into())
}

impl AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Upstream::Plain(s) => s.is_write_vectored(),
            Upstream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_flush(cx),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
