//! gRPC through the real proxy: a tonic client and a tonic server (messages
//! written by hand, no codegen) in all four call kinds, trailers, a client
//! that cancels mid-stream, and deadlines (`grpc-timeout`).

use std::pin::Pin;

use futures::Stream;
use prism_proto::pb::config::v1::Protocol;
use tonic::codec::Streaming;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tonic_prost::ProstCodec;

use super::*;

/// The one message of the test service.
#[derive(Clone, PartialEq, prost::Message)]
struct Msg {
    #[prost(string, tag = "1")]
    text: String,
    /// Server streaming: how many answers; 0 for one, then wait for the
    /// client to go away.
    #[prost(uint32, tag = "2")]
    count: u32,
}

type MsgStream = Pin<Box<dyn Stream<Item = Result<Msg, Status>> + Send>>;
type Grpc = tonic::client::Grpc<Channel>;

fn msg(text: &str, count: u32) -> Msg {
    Msg {
        text: text.into(),
        count,
    }
}

fn codec() -> ProstCodec<Msg, Msg> {
    ProstCodec::default()
}

/// The upstream's `test.Echo` service. It reports on `cancelled` each call
/// whose client went away while it was still answering.
#[derive(Clone)]
struct Echo {
    cancelled: mpsc::UnboundedSender<&'static str>,
}

impl Echo {
    async fn handle(self, request: Request<RequestBody>) -> Response<BoxBody> {
        let mut server = tonic::server::Grpc::new(codec());
        let response = match request.uri().path() {
            "/test.Echo/Unary" => server.unary(self.unary(), request).await,
            "/test.Echo/ServerStream" => server.server_streaming(self.listing(), request).await,
            "/test.Echo/ClientStream" => server.client_streaming(self.joining(), request).await,
            "/test.Echo/Bidi" => server.streaming(self.echoing(), request).await,
            _ => Status::unimplemented("no such method").into_http(),
        };
        response.map(boxed)
    }

    /// Echoes the text; tells in its metadata the `grpc-timeout` it was
    /// given; `hold` never answers.
    fn unary(
        &self,
    ) -> impl tower::Service<
        tonic::Request<Msg>,
        Response = tonic::Response<Msg>,
        Error = Status,
        Future = impl Future<Output = Result<tonic::Response<Msg>, Status>> + Send,
    > + Clone
    + Send
    + 'static {
        tower::service_fn(|request: tonic::Request<Msg>| async move {
            let timeout = request.metadata().get("grpc-timeout").cloned();
            let text = request.into_inner().text;
            if text == "hold" {
                std::future::pending::<()>().await;
            }
            let mut response = tonic::Response::new(msg(&format!("unary:{text}"), 0));
            if let Some(timeout) = timeout {
                response
                    .metadata_mut()
                    .insert("x-seen-grpc-timeout", timeout);
            }
            Ok(response)
        })
    }

    /// `count` answers then trailers carrying custom metadata; with `count`
    /// 0, one answer, then it waits for the client to cancel.
    fn listing(
        &self,
    ) -> impl tower::Service<
        tonic::Request<Msg>,
        Response = tonic::Response<MsgStream>,
        Error = Status,
        Future = impl Future<Output = Result<tonic::Response<MsgStream>, Status>> + Send,
    > + Clone
    + Send
    + 'static {
        let cancelled = self.cancelled.clone();
        tower::service_fn(move |request: tonic::Request<Msg>| {
            let cancelled = cancelled.clone();
            async move {
                let Msg { text, count } = request.into_inner();
                let (tx, rx) = mpsc::channel(4);
                tokio::spawn(async move {
                    for i in 0..count.max(1) {
                        let _ = tx.send(Ok(msg(&format!("{text}#{i}"), 0))).await;
                    }
                    if count == 0 {
                        tx.closed().await;
                        let _ = cancelled.send("server streaming");
                        return;
                    }
                    let mut trailers = MetadataMap::new();
                    trailers.insert("x-total", MetadataValue::from(count));
                    let _ = tx
                        .send(Err(Status::with_metadata(
                            Code::DataLoss,
                            "listed, then lost",
                            trailers,
                        )))
                        .await;
                });
                let stream: MsgStream = Box::pin(ReceiverStream::new(rx));
                Ok(tonic::Response::new(stream))
            }
        })
    }

    /// Joins every text the client streamed.
    fn joining(
        &self,
    ) -> impl tower::Service<
        tonic::Request<Streaming<Msg>>,
        Response = tonic::Response<Msg>,
        Error = Status,
        Future = impl Future<Output = Result<tonic::Response<Msg>, Status>> + Send,
    > + Clone
    + Send
    + 'static {
        tower::service_fn(|request: tonic::Request<Streaming<Msg>>| async move {
            let mut stream = request.into_inner();
            let mut texts = Vec::new();
            while let Some(m) = stream.message().await? {
                texts.push(m.text);
            }
            Ok(tonic::Response::new(msg(&texts.join("+"), 0)))
        })
    }

    /// Echoes each message as it comes, until the client ends; after `hold`,
    /// it waits for the client to cancel.
    fn echoing(
        &self,
    ) -> impl tower::Service<
        tonic::Request<Streaming<Msg>>,
        Response = tonic::Response<MsgStream>,
        Error = Status,
        Future = impl Future<Output = Result<tonic::Response<MsgStream>, Status>> + Send,
    > + Clone
    + Send
    + 'static {
        let cancelled = self.cancelled.clone();
        tower::service_fn(move |request: tonic::Request<Streaming<Msg>>| {
            let cancelled = cancelled.clone();
            async move {
                let mut incoming = request.into_inner();
                let (tx, rx) = mpsc::channel(4);
                tokio::spawn(async move {
                    while let Ok(Some(m)) = incoming.message().await {
                        let echo = msg(&format!("echo:{}", m.text), 0);
                        if tx.send(Ok(echo)).await.is_err() {
                            break;
                        }
                        if m.text == "hold" {
                            // Answered; now the call stays open until the
                            // client goes away.
                            tx.closed().await;
                            let _ = cancelled.send("bidi");
                            return;
                        }
                    }
                });
                let stream: MsgStream = Box::pin(ReceiverStream::new(rx));
                Ok(tonic::Response::new(stream))
            }
        })
    }
}

/// The proxy in front of a `test.Echo` upstream spoken to over HTTP/2, with
/// `route_timeout` on its route; and the upstream's cancellation reports.
async fn grpc_proxy(
    route_timeout: Option<Duration>,
) -> (Proxy, mpsc::UnboundedReceiver<&'static str>) {
    let (cancelled, cancelled_rx) = mpsc::unbounded_channel();
    let echo = Echo { cancelled };
    let up = upstream(move |request| echo.clone().handle(request)).await;
    let proxy = start_proxy().await;
    let mut snapshot = policy(&[("/test.Echo/", "echo", &[up])], route_timeout);
    let key = prism_proto::ResourceKey::new(prism_proto::Kind::Backend, "demo/echo");
    let Some(Resource::Backend(mut backend)) = snapshot.get(&key).map(|e| e.resource.clone())
    else {
        panic!("no backend");
    };
    backend.protocol = Protocol::Grpc.into();
    snapshot.insert(Resource::Backend(backend));
    proxy.apply(&snapshot);
    (proxy, cancelled_rx)
}

/// A tonic client of the proxy, calling host `demo.local`.
async fn grpc_client(proxy: &Proxy) -> Grpc {
    let channel = Endpoint::from_shared(format!("http://{}", proxy.addr))
        .expect("endpoint")
        .origin(http::Uri::from_static("http://demo.local"))
        .connect()
        .await
        .expect("connect");
    Grpc::new(channel)
}

fn path(method: &'static str) -> http::uri::PathAndQuery {
    http::uri::PathAndQuery::from_static(method)
}

async fn in_time<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, future)
        .await
        .unwrap_or_else(|_| panic!("{what} in time"))
}

#[tokio::test]
async fn unary_and_client_streaming_calls_go_through() {
    let (proxy, _) = grpc_proxy(None).await;
    let mut grpc = grpc_client(&proxy).await;
    grpc.ready().await.expect("ready");
    let answer = grpc
        .unary(
            tonic::Request::new(msg("hi", 0)),
            path("/test.Echo/Unary"),
            codec(),
        )
        .await
        .expect("unary");
    assert_eq!(answer.get_ref().text, "unary:hi");

    grpc.ready().await.expect("ready");
    let upload = tokio_stream::iter([msg("a", 0), msg("b", 0), msg("c", 0)]);
    let answer = grpc
        .client_streaming(
            tonic::Request::new(upload),
            path("/test.Echo/ClientStream"),
            codec(),
        )
        .await
        .expect("client streaming");
    assert_eq!(answer.get_ref().text, "a+b+c");
}

#[tokio::test]
async fn server_streaming_carries_every_message_then_the_trailers() {
    let (proxy, _) = grpc_proxy(None).await;
    let mut grpc = grpc_client(&proxy).await;
    grpc.ready().await.expect("ready");
    let mut stream = grpc
        .server_streaming(
            tonic::Request::new(msg("item", 3)),
            path("/test.Echo/ServerStream"),
            codec(),
        )
        .await
        .expect("server streaming")
        .into_inner();
    for i in 0..3 {
        let m = in_time("a message", stream.message())
            .await
            .expect("message")
            .expect("not ended yet");
        assert_eq!(m.text, format!("item#{i}"));
    }
    // The upstream's status and custom metadata came as trailers.
    let status = in_time("the trailers", stream.message())
        .await
        .expect_err("the stream ends with the upstream's status");
    assert_eq!(status.code(), Code::DataLoss);
    assert_eq!(status.message(), "listed, then lost");
    assert_eq!(
        status.metadata().get("x-total").map(|v| v.to_str().ok()),
        Some(Some("3"))
    );
}

#[tokio::test]
async fn bidi_streaming_echoes_each_message_as_it_comes() {
    let (proxy, _) = grpc_proxy(None).await;
    let mut grpc = grpc_client(&proxy).await;
    grpc.ready().await.expect("ready");
    let (tx, rx) = mpsc::channel(1);
    let mut replies = grpc
        .streaming(
            tonic::Request::new(ReceiverStream::new(rx)),
            path("/test.Echo/Bidi"),
            codec(),
        )
        .await
        .expect("bidi")
        .into_inner();
    // Each answer comes before the next message is sent: a real conversation.
    for text in ["one", "two", "three"] {
        tx.send(msg(text, 0)).await.expect("send");
        let reply = in_time("a reply", replies.message())
            .await
            .expect("reply")
            .expect("open");
        assert_eq!(reply.text, format!("echo:{text}"));
    }
    drop(tx);
    assert!(
        in_time("the end", replies.message())
            .await
            .expect("clean end")
            .is_none()
    );
}

#[tokio::test]
async fn a_client_that_cancels_mid_stream_cancels_the_upstream_call() {
    let (proxy, mut cancelled) = grpc_proxy(None).await;
    let mut grpc = grpc_client(&proxy).await;

    grpc.ready().await.expect("ready");
    let mut stream = grpc
        .server_streaming(
            tonic::Request::new(msg("forever", 0)),
            path("/test.Echo/ServerStream"),
            codec(),
        )
        .await
        .expect("server streaming")
        .into_inner();
    let first = in_time("the first message", stream.message()).await;
    assert_eq!(first.expect("message").expect("open").text, "forever#0");
    drop(stream);
    assert_eq!(
        in_time(
            "the upstream sees the server streaming cancel",
            cancelled.recv()
        )
        .await,
        Some("server streaming")
    );

    // A bidi call cancelled while both ways are open (RST_STREAM CANCEL).
    grpc.ready().await.expect("ready");
    let (tx, rx) = mpsc::channel(1);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    let cancel = request.cancellation_handle();
    let mut replies = grpc
        .streaming(request, path("/test.Echo/Bidi"), codec())
        .await
        .expect("bidi")
        .into_inner();
    tx.send(msg("hold", 0)).await.expect("send");
    let reply = in_time("a reply", replies.message()).await;
    assert_eq!(reply.expect("reply").expect("open").text, "echo:hold");
    cancel.cancel();
    assert_eq!(
        in_time("the upstream sees the bidi cancel", cancelled.recv()).await,
        Some("bidi")
    );
    drop((tx, replies));
}

/// A raw gRPC call over h2c with `grpc-timeout: timeout`, so that the proxy's
/// answer is seen as it is (a tonic client would enforce the deadline too).
fn raw_call(method: &str, timeout: &str, message: &Msg) -> Request<Full<Bytes>> {
    let encoded = prost::Message::encode_to_vec(message);
    let mut framed = vec![0u8];
    framed.extend_from_slice(&u32::try_from(encoded.len()).expect("short").to_be_bytes());
    framed.extend_from_slice(&encoded);
    Request::post(format!("http://demo.local{method}"))
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers")
        .header("grpc-timeout", timeout)
        .body(Full::new(Bytes::from(framed)))
        .expect("request")
}

#[tokio::test]
async fn grpc_timeout_is_carried_upstream_lowered_to_the_route_timeout() {
    let (proxy, _) = grpc_proxy(Some(Duration::from_secs(2))).await;
    let mut grpc = grpc_client(&proxy).await;
    for (asked, seen) in [
        (Duration::from_secs(1), Duration::from_secs(1)),
        (Duration::from_secs(60), Duration::from_secs(2)),
    ] {
        grpc.ready().await.expect("ready");
        let mut request = tonic::Request::new(msg("hi", 0));
        request.set_timeout(asked);
        let answer = grpc
            .unary(request, path("/test.Echo/Unary"), codec())
            .await
            .expect("unary");
        let value = answer
            .metadata()
            .get("x-seen-grpc-timeout")
            .expect("the upstream got a grpc-timeout")
            .to_str()
            .expect("ascii")
            .to_string();
        let parsed = timeout::grpc_timeout(value.as_bytes()).expect("a valid grpc-timeout");
        // tonic sends what is left of the caller's deadline.
        assert!(
            parsed <= seen && parsed > seen - Duration::from_millis(500),
            "{value}"
        );
    }
}

#[tokio::test]
async fn a_call_past_its_grpc_timeout_gets_deadline_exceeded() {
    let (proxy, _) = grpc_proxy(Some(Duration::from_secs(2))).await;
    let mut sender = h2c(&proxy).await;

    // No answer in time: trailers-only DEADLINE_EXCEEDED, well before the
    // route timeout.
    let started = tokio::time::Instant::now();
    let response = in_time(
        "the proxy's answer",
        sender.send_request(raw_call("/test.Echo/Unary", "200m", &msg("hold", 0))),
    )
    .await
    .expect("response");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(200), "{waited:?}");
    assert!(waited < Duration::from_secs(2), "{waited:?}");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header_str(response.headers(), "grpc-status"), "4");
    assert_eq!(
        header_str(response.headers(), "grpc-message"),
        "upstream request timeout"
    );

    // A stream already answering is ended with DEADLINE_EXCEEDED trailers.
    let response = in_time(
        "the response head",
        sender.send_request(raw_call("/test.Echo/ServerStream", "300m", &msg("slow", 0))),
    )
    .await
    .expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(!response.headers().contains_key("grpc-status"));
    let body = in_time("the end of the stream", response.into_body().collect())
        .await
        .expect("a clean end, not a reset");
    let trailers = body.trailers().cloned().expect("trailers");
    assert_eq!(header_str(&trailers, "grpc-status"), "4");
    assert!(
        !body.to_bytes().is_empty(),
        "the first message came through"
    );
}
