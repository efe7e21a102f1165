//! The streaming gRPC scenario: long-lived bidirectional streams on
//! `/bench.Echo/Stream`, each carrying many small messages that the origin
//! echoes on the same stream.
//!
//! Both ends live here. The origin side ([`echo`]) answers `200` at once and
//! sends back every length-prefixed message of the request as soon as it is
//! whole, then `grpc-status: 0` when the client ends its side. The client
//! side ([`run`]) opens `connections` h2c connections with
//! `streams_per_connection` streams each (hyper's HTTP/2 client, no external
//! tool); every stream ping-pongs one message at a time, closed loop, until
//! the run or its lifetime is over, then ends its side and checks the
//! trailers. Each message's
//! round trip is timed from its send to its echo being whole.
//!
//! Every proxy routes `/bench.Echo/` to its HTTP/2 upstream. A stream lives
//! at most [`STREAM_LIFETIME`], then ends and another takes its place: Prism's
//! 30 s route timeout counts the whole exchange (nginx's, HAProxy's and
//! Envoy's count idleness or start at the end of the request), so a stream
//! longer than that would be cut by Prism alone.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::runtime::Handle;
use tokio::sync::mpsc;

/// The streaming method; under the prefix every target routes to HTTP/2.
pub const STREAM_PATH: &str = "/bench.Echo/Stream";

/// How long one stream lives before it ends and a new one replaces it;
/// well under every proxy's 30 s request timeout.
const STREAM_LIFETIME: Duration = Duration::from_secs(10);

/// Messages the probe sends on its one stream.
const PROBE_MESSAGES: u64 = 3;

/// How long after the end of the run every stream must have ended.
const DRAIN: Duration = Duration::from_secs(5);

/// The streaming load, the same for every target.
#[derive(Clone, Copy, Debug)]
pub struct StreamLoad {
    /// h2c connections.
    pub connections: u32,
    /// Streams kept open on each connection.
    pub streams_per_connection: u32,
}

/// What one streaming run saw.
#[derive(Clone, Debug)]
pub struct StreamRun {
    /// Messages echoed back whole and unchanged.
    pub messages: u64,
    /// From the start of the streams to the last echo.
    pub seconds: f64,
    /// Round trips, send to echo, sorted.
    pub latencies: Vec<Duration>,
}

/// One stream's share of a run.
struct Echoes {
    latencies: Vec<Duration>,
    last: Instant,
}

/// A body fed through a channel: the client's request, the origin's answer.
pub struct ChannelBody {
    frames: mpsc::Receiver<Frame<Bytes>>,
}

/// Collects bytes and hands out whole length-prefixed gRPC messages (the
/// 5-byte prefix included), however the proxy split or joined the frames.
#[derive(Default)]
struct Deframer {
    buffer: BytesMut,
}

/// The message every stream sends: a length-prefixed frame (not
/// compressed) holding a protobuf message whose field 1 is a 32-byte string.
pub fn stream_message() -> Bytes {
    let text = b"prism-load-harness-stream-echoed";
    let mut message = vec![0x0a, text.len() as u8];
    message.extend_from_slice(text);
    let mut frame = vec![0];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    Bytes::from(frame)
}

/// The origin's answer to a streaming call: `200` at once, then every whole
/// message of the request echoed as it arrives, counted in `answered`, and
/// `grpc-status: 0` once the client ends its side (`3`, INVALID_ARGUMENT,
/// if it left a partial message).
pub fn echo(request: Request<Incoming>, answered: Arc<AtomicU64>) -> Response<ChannelBody> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut body = request.into_body();
        let mut deframer = Deframer::default();
        loop {
            match body.frame().await {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    deframer.push(data);
                    while let Some(message) = deframer.next_message() {
                        if tx.send(Frame::data(message)).await.is_err() {
                            return;
                        }
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // The client reset the stream: there is no one to answer.
                Some(Err(_)) => return,
                None => break,
            }
        }
        let status = if deframer.buffer.is_empty() { "0" } else { "3" };
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static(status));
        let _ = tx.send(Frame::trailers(trailers)).await;
    });
    let mut response = Response::new(ChannelBody { frames: rx });
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    response
}

/// Drives `addr` with the streams of `load` for `seconds`, on `runtime`.
/// Any stream failing (reset, a status other than 200, a wrong echo,
/// trailers without `grpc-status: 0`) fails the run.
pub fn run(
    runtime: &Handle,
    load: StreamLoad,
    addr: SocketAddr,
    seconds: u64,
) -> Result<StreamRun> {
    ensure!(
        load.connections > 0 && load.streams_per_connection > 0,
        "the stream scenario needs at least one connection and one stream"
    );
    runtime.block_on(async {
        let mut senders = Vec::new();
        for _ in 0..load.connections {
            senders.push(connect(addr).await?);
        }
        let start = Instant::now();
        let stop_at = start + Duration::from_secs(seconds);
        let mut streams = tokio::task::JoinSet::new();
        for sender in &senders {
            for _ in 0..load.streams_per_connection {
                streams.spawn(streams_in_turn(sender.clone(), addr, stop_at));
            }
        }
        let deadline = tokio::time::Instant::from_std(stop_at + DRAIN);
        let mut run = StreamRun {
            messages: 0,
            seconds: 0.0,
            latencies: Vec::new(),
        };
        let mut last = start;
        while let Some(joined) = tokio::time::timeout_at(deadline, streams.join_next())
            .await
            .with_context(|| format!("streams still open {DRAIN:?} after the run"))?
        {
            let echoes = joined.context("a stream task failed")??;
            run.messages += echoes.latencies.len() as u64;
            run.latencies.extend(echoes.latencies);
            last = last.max(echoes.last);
        }
        run.seconds = last.duration_since(start).as_secs_f64();
        run.latencies.sort_unstable();
        ensure!(run.messages > 0, "no message came back");
        Ok(run)
    })
}

/// One stream with a few messages: `200`, each echoed unchanged, then
/// `grpc-status: 0` in the trailers.
pub async fn probe(addr: SocketAddr) -> Result<()> {
    let sender = connect(addr).await?;
    let far = Instant::now() + Duration::from_secs(3600);
    let echoes = one_stream(sender, addr, far, PROBE_MESSAGES).await?;
    ensure!(
        echoes.latencies.len() as u64 == PROBE_MESSAGES,
        "{} of {PROBE_MESSAGES} messages came back",
        echoes.latencies.len()
    );
    Ok(())
}

/// Streams one after the other, each at most [`STREAM_LIFETIME`], until
/// `stop_at`.
async fn streams_in_turn(
    sender: hyper::client::conn::http2::SendRequest<ChannelBody>,
    addr: SocketAddr,
    stop_at: Instant,
) -> Result<Echoes> {
    let mut all = one_stream(
        sender.clone(),
        addr,
        stop_at.min(Instant::now() + STREAM_LIFETIME),
        u64::MAX,
    )
    .await?;
    while all.last < stop_at {
        let end = stop_at.min(Instant::now() + STREAM_LIFETIME);
        let echoes = one_stream(sender.clone(), addr, end, u64::MAX).await?;
        all.latencies.extend(echoes.latencies);
        all.last = echoes.last;
    }
    Ok(all)
}

/// An h2c (prior knowledge) connection to `addr`.
async fn connect(addr: SocketAddr) -> Result<hyper::client::conn::http2::SendRequest<ChannelBody>> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .context("HTTP/2 handshake")?;
    tokio::spawn(connection);
    Ok(sender)
}

/// Ping-pongs one message at a time on a new stream until `stop_at` or
/// `limit` messages, then ends the request and reads the trailers.
async fn one_stream(
    mut sender: hyper::client::conn::http2::SendRequest<ChannelBody>,
    addr: SocketAddr,
    stop_at: Instant,
    limit: u64,
) -> Result<Echoes> {
    let message = stream_message();
    let (tx, rx) = mpsc::channel(2);
    let request = Request::post(format!("http://{addr}{STREAM_PATH}"))
        .header(CONTENT_TYPE, "application/grpc")
        .header("te", "trailers")
        .body(ChannelBody { frames: rx })?;
    // The first message goes with the request, so a proxy that waits for
    // body bytes before answering the head still sees one.
    let mut sent_at = Instant::now();
    let mut sent = 1;
    tx.send(Frame::data(message.clone()))
        .await
        .context("the request body closed")?;
    let mut tx = Some(tx);
    let response = sender.send_request(request).await?;
    let status = response.status();
    ensure!(status == 200, "the stream was answered {status}");
    let mut body = response.into_body();
    let mut deframer = Deframer::default();
    let mut echoes = Echoes {
        latencies: Vec::new(),
        last: sent_at,
    };
    loop {
        let frame = match body.frame().await {
            Some(frame) => frame.context("the stream failed")?,
            None => bail!("the stream ended without trailers"),
        };
        let frame = match frame.into_data() {
            Ok(data) => {
                deframer.push(data);
                while let Some(echo) = deframer.next_message() {
                    let now = Instant::now();
                    ensure!(echo == message, "a message came back changed");
                    ensure!(tx.is_some(), "a message came back that was not sent");
                    echoes.latencies.push(now.duration_since(sent_at));
                    echoes.last = now;
                    if now < stop_at && sent < limit {
                        sent_at = now;
                        sent += 1;
                        if let Some(tx) = &tx {
                            tx.send(Frame::data(message.clone()))
                                .await
                                .context("the request body closed")?;
                        }
                    } else {
                        // Ends the request body: END_STREAM on our side.
                        tx = None;
                    }
                }
                continue;
            }
            Err(frame) => frame,
        };
        let Ok(trailers) = frame.into_trailers() else {
            continue;
        };
        let grpc_status = trailers
            .get("grpc-status")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        ensure!(
            grpc_status.as_deref() == Some("0"),
            "the stream ended with grpc-status {grpc_status:?} in the trailers, not 0"
        );
        ensure!(
            tx.is_none(),
            "the stream ended before its last message came back"
        );
        ensure!(
            deframer.buffer.is_empty(),
            "the stream ended inside a message"
        );
        return Ok(echoes);
    }
}

impl Deframer {
    fn push(&mut self, data: Bytes) {
        self.buffer.extend_from_slice(&data);
    }

    fn next_message(&mut self) -> Option<Bytes> {
        if self.buffer.len() < 5 {
            return None;
        }
        let length = (&self.buffer[1..5]).get_u32() as usize;
        if self.buffer.len() < 5 + length {
            return None;
        }
        Some(self.buffer.split_to(5 + length).freeze())
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.get_mut().frames.poll_recv(cx).map(|f| f.map(Ok))
    }
}
