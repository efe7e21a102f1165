//! The origin every target forwards to: one small hyper server on loopback
//! serving HTTP/1.1 keep-alive and h2c (prior knowledge) on one port.
//!
//! Plain requests get `200` and the fixed [`BODY`]. A request with
//! `content-type: application/grpc` is a unary gRPC call: its framed message
//! is echoed back with `grpc-status: 0` in the trailers; a call of
//! [`STREAM_PATH`] is a bidirectional stream whose every message is echoed
//! (see `stream`). The origin counts the requests (stream messages) it
//! answers, so the harness can tell that every 2xx a load generator counted
//! really went through the proxy to the origin.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Either};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::runtime::Handle;

use crate::stream::{self, ChannelBody, STREAM_PATH};

/// The body of every plain answer: 128 bytes, the same through every target.
pub const BODY: &[u8; 128] = b"Prism load harness origin. This body is 128 bytes long, the same for every target and scenario of the run......................\n";

/// The unary method the gRPC scenario calls.
pub const GRPC_PATH: &str = "/bench.Echo/Unary";

/// The path prefix every target routes to its HTTP/2 (gRPC) upstream.
pub const GRPC_PREFIX: &str = "/bench.Echo/";

/// HTTP/2 streams the origin allows per connection: more than any scenario
/// keeps in flight, so the origin never queues a proxy's multiplexed streams.
const MAX_STREAMS: u32 = 1024;

/// The gRPC request message: a length-prefixed frame (flag 0: not
/// compressed; big-endian length) holding a protobuf message whose field 1 is
/// a 32-byte string.
pub fn grpc_request() -> Vec<u8> {
    let text = b"prism-load-harness-unary-request";
    let mut message = vec![0x0a, text.len() as u8];
    message.extend_from_slice(text);
    let mut frame = vec![0];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    frame
}

/// A running origin.
pub struct Origin {
    addr: SocketAddr,
    answered: Arc<AtomicU64>,
}

impl Origin {
    /// Binds `127.0.0.1:0` and serves on `runtime` until it shuts down.
    pub fn start(runtime: &Handle) -> Result<Self> {
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .context("the origin cannot bind a loopback port")?;
        let addr = listener.local_addr()?;
        let answered = Arc::new(AtomicU64::new(0));
        runtime.spawn(serve(listener, Arc::clone(&answered)));
        Ok(Self { addr, answered })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests answered since the last [`Origin::reset`].
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    pub fn reset(&self) {
        self.answered.store(0, Ordering::Relaxed);
    }
}

async fn serve(listener: TcpListener, answered: Arc<AtomicU64>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(MAX_STREAMS);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of file descriptors, most likely: back off, do not spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let answered = Arc::clone(&answered);
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| answer(request, Arc::clone(&answered)));
            // A client closing its connection mid-request is not our concern.
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    request: Request<Incoming>,
    answered: Arc<AtomicU64>,
) -> Result<Response<Either<OriginBody, ChannelBody>>, Infallible> {
    if request.uri().path() == STREAM_PATH {
        return Ok(stream::echo(request, answered).map(Either::Right));
    }
    Ok(answer_whole(request, answered).await?.map(Either::Left))
}

/// Plain requests and unary gRPC calls: the whole body read, one answer.
async fn answer_whole(
    request: Request<Incoming>,
    answered: Arc<AtomicU64>,
) -> Result<Response<OriginBody>, Infallible> {
    let grpc = request
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            let mut response = Response::new(OriginBody::plain(Bytes::new()));
            *response.status_mut() = StatusCode::BAD_REQUEST;
            return Ok(response);
        }
    };
    answered.fetch_add(1, Ordering::Relaxed);
    if !grpc {
        let mut response = Response::new(OriginBody::plain(Bytes::from_static(BODY)));
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        return Ok(response);
    }
    // A well-formed single frame is echoed; anything else is INVALID_ARGUMENT.
    let framed = body.len() >= 5
        && body[0] == 0
        && u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize == body.len() - 5;
    let (message, status) = if framed {
        (body, "0")
    } else {
        (Bytes::new(), "3")
    };
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static(status));
    let mut response = Response::new(OriginBody {
        data: Some(message).filter(|m| !m.is_empty()),
        trailers: Some(trailers),
    });
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    Ok(response)
}

/// A body of at most one data frame, then optional trailers.
struct OriginBody {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl OriginBody {
    fn plain(data: Bytes) -> Self {
        Self {
            data: Some(data),
            trailers: None,
        }
    }
}

impl Body for OriginBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(data) = this.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}
