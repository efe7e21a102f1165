//! Normalize: the request and response as a proxy passes them on. Headers
//! that describe one connection are removed (RFC 9110 §7.6.1), the upstream
//! learns who asked (`x-forwarded-for`, `x-forwarded-proto`) and for which
//! host, and every response says it came `via` Prism.
//!
//! Two connection headers are passed on on purpose: an HTTP/1.1 request that
//! asks for a protocol switch keeps `Upgrade` (with `Connection: upgrade`),
//! and so does the upstream's `101` answer, so [`super::upgrade`] can join the
//! two upgraded streams. `Expect: 100-continue` is answered by the proxy
//! itself (hyper sends `100 Continue` when the body is first read, which is
//! once the request is on its way upstream) and not passed on, as Envoy does.

use std::future::Future;
use std::io::Write as _;
use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::respond::VIA;
use super::server::ClientAddr;
use super::tls::Tls;

/// Headers that describe one connection, never forwarded.
/// [`CONNECTION_AT`] and [`TE_AT`] say where two of them are.
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];
const UPGRADE: HeaderValue = HeaderValue::from_static("upgrade");
const CONNECTION_AT: usize = 0;
const TE_AT: usize = 3;
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const HTTP: HeaderValue = HeaderValue::from_static("http");
const HTTPS: HeaderValue = HeaderValue::from_static("https");

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct NormalizeLayer;

#[derive(Clone, Debug)]
pub(crate) struct Normalize<S> {
    inner: S,
}

pin_project! {
    pub(crate) struct ResponseFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<S> Layer<S> for NormalizeLayer {
    type Service = Normalize<S>;

    fn layer(&self, inner: S) -> Normalize<S> {
        Normalize { inner }
    }
}

impl<S, ReqB, B> Service<Request<ReqB>> for Normalize<S>
where
    S: Service<Request<ReqB>, Response = Response<B>>,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqB>) -> Self::Future {
        // HTTP/2 clients send `:authority`, not Host; keep what the client
        // asked for as the upstream Host rather than the endpoint address.
        if !request.headers().contains_key(header::HOST)
            && let Some(authority) = request.uri().authority()
            && let Ok(value) = HeaderValue::from_str(authority.as_str())
        {
            request.headers_mut().insert(header::HOST, value);
        }
        let client = request.extensions().get::<ClientAddr>().copied();
        let proto = if request.extensions().get::<Tls>().is_some() {
            HTTPS
        } else {
            HTTP
        };
        // HTTP/2 has no Upgrade (RFC 9113 §8.6); only an HTTP/1 request may ask.
        let upgrade = if request.version() <= Version::HTTP_11 {
            upgrade_of(request.headers())
        } else {
            None
        };
        let headers = request.headers_mut();
        strip_hop_by_hop(headers, true);
        headers.remove(header::EXPECT);
        if let Some(protocol) = upgrade {
            keep_upgrade(headers, protocol);
        }
        if let Some(ClientAddr(client)) = client {
            append_forwarded_for(headers, client.ip());
        }
        headers.insert(X_FORWARDED_PROTO, proto);
        ResponseFuture {
            inner: self.inner.call(request),
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut response = ready!(self.project().inner.poll(cx))?;
        let upgrade = if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            upgrade_of(response.headers())
        } else {
            None
        };
        let headers = response.headers_mut();
        strip_hop_by_hop(headers, false);
        if let Some(protocol) = upgrade {
            keep_upgrade(headers, protocol);
        }
        headers.append(header::VIA, VIA);
        Poll::Ready(Ok(response))
    }
}

/// Removes hop-by-hop headers and those the Connection header names. With
/// `keep_te_trailers`, `te: trailers` survives: gRPC over HTTP/2 requires it,
/// and the endpoint stage drops it again toward HTTP/1 upstreams.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_te_trailers: bool) {
    // Which of HOP_BY_HOP the message has, as bits: one look at the few
    // names a message has is cheaper than a hash lookup per hop-by-hop name,
    // and most messages have none of them.
    let mut present = 0u8;
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_at(name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // Names in Connection that are hop-by-hop anyway (`keep-alive` mostly)
    // are not parsed into names of their own.
    let named: Vec<HeaderName> = if present & 1 << CONNECTION_AT != 0 {
        headers
            .get_all(header::CONNECTION)
            .iter()
            // The usual values name nothing else; skip parsing them.
            .filter(|v| {
                let v = v.as_bytes();
                !v.eq_ignore_ascii_case(b"keep-alive") && !v.eq_ignore_ascii_case(b"close")
            })
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|name| {
                !HOP_BY_HOP
                    .iter()
                    .any(|hop| hop.as_str().eq_ignore_ascii_case(name))
            })
            .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
            .collect()
    } else {
        Vec::new()
    };
    let te_trailers = keep_te_trailers
        && present & 1 << TE_AT != 0
        && headers
            .get_all(header::TE)
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & 1 << i != 0 {
            headers.remove(name);
        }
    }
    for name in &named {
        headers.remove(name);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Where `name` is in [`HOP_BY_HOP`]: one match on the name's text, which
/// the compiler turns into a switch on its length, rather than seven
/// comparisons of `HeaderName`s for each field of every message.
fn hop_by_hop_at(name: &HeaderName) -> Option<usize> {
    match name.as_str() {
        "connection" => Some(0),
        "keep-alive" => Some(1),
        "proxy-connection" => Some(2),
        "te" => Some(3),
        "trailer" => Some(4),
        "transfer-encoding" => Some(5),
        "upgrade" => Some(6),
        _ => None,
    }
}

/// The protocol that `headers` ask to switch to: their `Upgrade`, when
/// `Connection` names it (RFC 9110 §7.8).
fn upgrade_of(headers: &HeaderMap) -> Option<HeaderValue> {
    let protocol = headers.get(header::UPGRADE)?;
    headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
        .then(|| protocol.clone())
}

/// Puts the protocol switch back after the connection headers went.
fn keep_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, UPGRADE);
    headers.insert(header::UPGRADE, protocol);
}

/// Adds `ip` to `x-forwarded-for`, after what earlier proxies wrote there.
fn append_forwarded_for(headers: &mut HeaderMap, ip: IpAddr) {
    let mut text = [0u8; MAX_IP_TEXT];
    let ip = ip_text(ip, &mut text);
    let value = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(existing) if !existing.trim().is_empty() => {
            let mut joined = Vec::with_capacity(existing.len() + 2 + ip.len());
            joined.extend_from_slice(existing.as_bytes());
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(ip);
            HeaderValue::from_bytes(&joined)
        }
        _ => HeaderValue::from_bytes(ip),
    };
    if let Ok(value) = value {
        headers.insert(X_FORWARDED_FOR, value);
    }
}

/// The longest text of an [`IpAddr`]: eight groups of four hex digits.
const MAX_IP_TEXT: usize = 39;

/// `ip` as text in `buf`, as its `Display` writes it. This runs for every
/// request, so an IPv4 address is written digit by digit rather than through
/// the formatting machinery, and nothing is allocated.
fn ip_text(ip: IpAddr, buf: &mut [u8; MAX_IP_TEXT]) -> &[u8] {
    match ip {
        IpAddr::V4(v4) => {
            let mut len = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[len] = b'.';
                    len += 1;
                }
                if octet >= 100 {
                    buf[len] = b'0' + octet / 100;
                    len += 1;
                }
                if octet >= 10 {
                    buf[len] = b'0' + octet / 10 % 10;
                    len += 1;
                }
                buf[len] = b'0' + octet % 10;
                len += 1;
            }
            &buf[..len]
        }
        IpAddr::V6(v6) => {
            let mut rest = &mut buf[..];
            // MAX_IP_TEXT holds the longest IPv6 text, so the write cannot
            // run out of room.
            let _ = write!(rest, "{v6}");
            let len = MAX_IP_TEXT - rest.len();
            &buf[..len]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hop_by_hop_name_is_found_where_the_list_has_it() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_at(name), Some(i), "{name}");
        }
        assert_eq!(hop_by_hop_at(&header::HOST), None);
        assert_eq!(hop_by_hop_at(&HeaderName::from_static("x-te")), None);
    }

    #[test]
    fn connection_named_and_hop_by_hop_headers_go_and_te_trailers_may_stay() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("x-hop, close"));
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert("x-end-to-end", HeaderValue::from_static("1"));
        let mut toward_upstream = headers.clone();
        strip_hop_by_hop(&mut toward_upstream, true);
        assert_eq!(
            toward_upstream
                .keys()
                .map(|k| k.as_str())
                .collect::<Vec<_>>(),
            ["x-end-to-end", "te"]
        );
        strip_hop_by_hop(&mut headers, false);
        assert_eq!(
            headers.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            ["x-end-to-end"]
        );
    }

    #[test]
    fn an_upgrade_is_asked_for_only_when_connection_names_it() {
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert_eq!(upgrade_of(&headers), None);
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        assert_eq!(upgrade_of(&headers), None);
        headers.append(header::CONNECTION, HeaderValue::from_static("x-a, Upgrade"));
        assert_eq!(
            upgrade_of(&headers),
            Some(HeaderValue::from_static("websocket"))
        );
        headers.insert("x-a", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers, true);
        keep_upgrade(&mut headers, HeaderValue::from_static("websocket"));
        assert_eq!(headers.len(), 2);
        assert_eq!(headers[header::CONNECTION], "upgrade");
        assert_eq!(headers[header::UPGRADE], "websocket");
    }

    #[test]
    fn forwarded_for_appends_to_what_earlier_proxies_wrote() {
        let mut headers = HeaderMap::new();
        append_forwarded_for(&mut headers, "10.0.0.1".parse().expect("ip"));
        assert_eq!(headers[X_FORWARDED_FOR], "10.0.0.1");
        append_forwarded_for(&mut headers, "2001:db8::1".parse().expect("ip"));
        assert_eq!(headers[X_FORWARDED_FOR], "10.0.0.1, 2001:db8::1");
    }

    #[test]
    fn ip_text_is_what_display_writes() {
        let ips = [
            "0.0.0.0",
            "9.10.99.100",
            "127.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:192.0.2.1",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ];
        for ip in ips {
            let ip: IpAddr = ip.parse().expect("ip");
            let mut buf = [0u8; MAX_IP_TEXT];
            assert_eq!(ip_text(ip, &mut buf), ip.to_string().as_bytes());
        }
    }

    #[test]
    fn a_message_without_hop_by_hop_headers_is_left_alone() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("h"));
        headers.insert("x-a", HeaderValue::from_static("1"));
        let before = headers.clone();
        strip_hop_by_hop(&mut headers, true);
        assert_eq!(headers, before);
    }
}
