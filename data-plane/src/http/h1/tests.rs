//! The codec through [`crate::http::server::serve`], with raw TCP clients.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::Limits;
use crate::http::body::RequestBody;
use crate::http::error::BoxError;
use crate::http::server::{self, Params};

const DEADLINE: Duration = Duration::from_secs(10);

type TestBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Answers with the method, target and body it got; `/stream` answers with
/// a body of unknown length and a trailer.
async fn echo(request: Request<RequestBody>) -> Result<Response<TestBody>, Infallible> {
    let line = format!("{} {}|", request.method(), request.uri());
    let stream = request.uri().path() == "/stream";
    let body = match request.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) => Bytes::from(format!("body error: {error}")),
    };
    let text = Bytes::from(format!("{line}{}", String::from_utf8_lossy(&body)));
    let body = if stream {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-trailer", HeaderValue::from_static("t"));
        let frames = vec![
            Ok::<_, BoxError>(Frame::data(text)),
            Ok(Frame::trailers(trailers)),
        ];
        StreamBody::new(tokio_stream::iter(frames)).boxed_unsync()
    } else {
        Full::new(text).map_err(Into::into).boxed_unsync()
    };
    Ok(Response::new(body))
}

struct Server {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
}

async fn start(limits: Limits) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = watch::channel(false);
    let service = tower::service_fn(echo);
    tokio::spawn(server::serve(
        listener,
        None,
        Params { limits },
        stopped,
        service,
    ));
    Server { addr, stop }
}

/// Sends `input` and reads until the server closes the connection.
async fn exchange(addr: SocketAddr, input: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(input).await.expect("write");
    read_to_close(&mut stream).await
}

async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer))
        .await
        .expect("the server closes the connection")
        .ok();
    String::from_utf8_lossy(&answer).into_owned()
}

/// Reads one response whose body is `len` bytes long.
async fn read_response(stream: &mut TcpStream, body_len: usize) -> String {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = tokio::time::timeout(DEADLINE, stream.read(&mut byte))
            .await
            .expect("in time")
            .expect("read");
        assert_eq!(n, 1, "closed after {:?}", String::from_utf8_lossy(&got));
        got.push(byte[0]);
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n")
            && got.len() == end + 4 + body_len
        {
            return String::from_utf8_lossy(&got).into_owned();
        }
    }
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let server = start(Limits::default()).await;
    let answer = exchange(
        server.addr,
        b"GET /a HTTP/1.1\r\nhost: x\r\n\r\nPOST /b HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc\
          GET /c HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    let a = answer.find("GET /a|").expect("first");
    let b = answer.find("POST /b|abc").expect("second");
    let c = answer.find("GET /c|").expect("third");
    assert!(a < b && b < c, "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 200 OK\r\n").count(), 3);
    assert!(answer.contains("content-length: 7\r\n"), "{answer}");
    assert!(answer.contains("\r\nconnection: close\r\n"), "{answer}");
}

#[tokio::test]
async fn keep_alive_until_close_and_http10_closes_unless_kept_alive() {
    let server = start(Limits::default()).await;
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    for _ in 0..2 {
        stream
            .write_all(b"GET /k HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        let response = read_response(&mut stream, "GET /k|".len()).await;
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.contains("\r\ndate: "), "{response}");
    }
    let answer = exchange(server.addr, b"GET /old HTTP/1.0\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.0 200 OK\r\n"), "{answer}");
    assert!(answer.contains("connection: close\r\n"), "{answer}");
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    stream
        .write_all(b"GET /old HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
        .await
        .expect("write");
    let response = read_response(&mut stream, "GET /old|".len()).await;
    assert!(
        response.contains("connection: keep-alive\r\n"),
        "{response}"
    );
}

#[tokio::test]
async fn bad_heads_and_smuggling_attempts_are_400_and_closed() {
    let server = start(Limits::default()).await;
    for bad in [
        &b"GET / HTTP/1.1\r\nbad header\r\n\r\n"[..],
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\r\n\r\n",
        b"POST / HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd",
        b"POST / HTTP/1.1\r\ncontent-length: -1\r\n\r\n",
        b"POST / HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n",
    ] {
        let answer = exchange(server.addr, bad).await;
        assert!(
            answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{:?}: {answer}",
            String::from_utf8_lossy(bad)
        );
        assert!(
            answer.ends_with("\r\n\r\n"),
            "nothing after the refusal: {answer}"
        );
    }
}

#[tokio::test]
async fn too_many_headers_is_431() {
    let server = start(Limits {
        max_request_headers: 4,
        ..Default::default()
    })
    .await;
    let answer = exchange(
        server.addr,
        b"GET / HTTP/1.1\r\na: 1\r\nb: 1\r\nc: 1\r\nd: 1\r\ne: 1\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
}

#[tokio::test]
async fn a_chunked_request_streams_in_and_an_unsized_response_is_chunked_with_trailers() {
    let server = start(Limits::default()).await;
    let answer = exchange(
        server.addr,
        b"POST /stream HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nte: trailers\r\n\
          connection: close\r\n\r\n3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n",
    )
    .await;
    assert!(
        answer.contains("transfer-encoding: chunked\r\n"),
        "{answer}"
    );
    assert!(
        answer.ends_with("\r\n\r\n12\r\nPOST /stream|abcde\r\n0\r\nx-trailer: t\r\n\r\n"),
        "{answer}"
    );
    // Without `TE: trailers`, no trailers.
    let answer = exchange(
        server.addr,
        b"GET /stream HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(
        answer.ends_with("\r\n\r\nc\r\nGET /stream|\r\n0\r\n\r\n"),
        "{answer}"
    );
    // A broken chunked body: the service sees an error, the connection ends.
    let answer = exchange(
        server.addr,
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    )
    .await;
    assert!(
        answer.contains("body error: invalid chunked request body"),
        "{answer}"
    );
}

#[tokio::test]
async fn a_body_arriving_after_its_head_is_read_as_it_is_polled() {
    let server = start(Limits::default()).await;
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    stream
        .write_all(b"POST /late HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nhello")
        .await
        .expect("write");
    stream.write_all(b"world").await.expect("write");
    let response = read_response(&mut stream, "POST /late|helloworld".len()).await;
    assert!(response.ends_with("POST /late|helloworld"), "{response}");
}

#[tokio::test]
async fn a_head_response_has_no_body() {
    let server = start(Limits::default()).await;
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    stream
        .write_all(b"HEAD /h HTTP/1.1\r\nhost: x\r\n\r\nGET /g HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let answer = read_to_close(&mut stream).await;
    let second = answer.find("HTTP/1.1 200 OK\r\n").and_then(|first| {
        answer[first + 1..]
            .find("HTTP/1.1 200 OK\r\n")
            .map(|at| at + first + 1)
    });
    let second = second.expect("two responses");
    assert!(
        answer[..second].ends_with("\r\n\r\n"),
        "no body after HEAD: {answer}"
    );
    assert!(answer.ends_with("GET /g|"), "{answer}");
}

#[tokio::test(start_paused = true)]
async fn idle_and_header_read_timeouts() {
    let limits = Limits {
        idle_timeout: Duration::from_secs(30),
        header_read_timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let server = start(limits).await;
    // Silent from the accept: the header read timeout.
    let start = tokio::time::Instant::now();
    let mut silent = TcpStream::connect(server.addr).await.expect("connect");
    read_to_close(&mut silent).await;
    assert_eq!(start.elapsed().as_secs(), 5);
    // Idle after a response: the idle timeout, not the header read timeout.
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    read_response(&mut stream, "GET /|".len()).await;
    let idle = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(20)).await;
    // Part of a head after 20 s: 5 s more for the rest.
    stream.write_all(b"GET / HT").await.expect("write");
    read_to_close(&mut stream).await;
    assert_eq!(idle.elapsed().as_secs(), 25);
}

#[tokio::test]
async fn on_shutdown_idle_connections_close_at_once() {
    let server = start(Limits::default()).await;
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    read_response(&mut stream, "GET /|".len()).await;
    server.stop.send(true).expect("server running");
    assert_eq!(
        read_to_close(&mut stream).await,
        "",
        "closed without an answer"
    );
}

/// Memory per idle keep-alive connection, server and client in this process:
/// opens [`IDLE_CONNECTIONS`] connections, each sends one GET and reads its
/// answer, then the growth of the resident set is divided among them.
/// A measurement, not a check: `cargo test -p prism-data-plane --lib --
/// --ignored --nocapture idle_connection_memory`.
#[tokio::test]
#[ignore = "a measurement; run it on its own"]
async fn idle_connection_memory() {
    use std::io::{Read, Write};

    const IDLE_CONNECTIONS: usize = 2000;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (_stop, stopped) = watch::channel(false);
    let service = tower::service_fn(|_request| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
    });
    tokio::spawn(server::serve(
        listener,
        None,
        Params {
            limits: Limits::default(),
        },
        stopped,
        service,
    ));
    // Warm up the allocator and the runtime with a few connections first.
    let open = move |n: usize| {
        (0..n)
            .map(|_| {
                let mut stream = std::net::TcpStream::connect(addr).expect("connect");
                stream
                    .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                    .expect("write");
                let mut answer = Vec::new();
                let mut buf = [0u8; 512];
                while !answer.ends_with(b"\r\n\r\nok") {
                    let n = stream.read(&mut buf).expect("read");
                    assert!(n > 0, "closed early");
                    answer.extend_from_slice(&buf[..n]);
                }
                stream
            })
            .collect::<Vec<_>>()
    };
    let warm = tokio::task::spawn_blocking(move || open(50))
        .await
        .expect("warm up");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = resident_bytes();
    let idle = tokio::task::spawn_blocking(move || open(IDLE_CONNECTIONS))
        .await
        .expect("connections");
    // Let every connection get back to its idle wait.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = resident_bytes();
    println!(
        "{} bytes per idle keep-alive connection ({IDLE_CONNECTIONS} connections, resident {before} → {after} bytes)",
        (after.saturating_sub(before)) / IDLE_CONNECTIONS as u64
    );
    drop((warm, idle));
}

/// This process's resident set, from `/proc/self/statm`.
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("resident pages");
    pages * 4096
}

/// Switches to an echo of the raw bytes when asked to.
async fn switch(mut request: Request<RequestBody>) -> Result<Response<TestBody>, Infallible> {
    let upgrading = request
        .extensions_mut()
        .remove::<super::OnUpgrade>()
        .and_then(|on| on.take())
        .expect("an upgrade request");
    tokio::spawn(async move {
        let mut io = upgrading.await.expect("upgraded");
        let mut buf = [0u8; 64];
        loop {
            let n = io.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            io.write_all(&buf[..n]).await.expect("write");
        }
    });
    let response = Response::builder()
        .status(http::StatusCode::SWITCHING_PROTOCOLS)
        .header(http::header::CONNECTION, "upgrade")
        .header(http::header::UPGRADE, "echo")
        .body(Full::new(Bytes::new()).map_err(Into::into).boxed_unsync())
        .expect("response");
    Ok(response)
}

#[tokio::test]
async fn a_101_hands_over_the_connection_with_the_bytes_read_past_the_head() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (_stop, stopped) = watch::channel(false);
    let params = Params {
        limits: Limits::default(),
    };
    tokio::spawn(server::serve(
        listener,
        None,
        params,
        stopped,
        tower::service_fn(switch),
    ));
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            b"GET / HTTP/1.1\r\nhost: x\r\nupgrade: echo\r\nconnection: upgrade\r\n\r\nearly",
        )
        .await
        .expect("write");
    let head = read_response(&mut stream, 0).await;
    assert!(
        head.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
        "{head}"
    );
    assert!(head.contains("connection: upgrade\r\n"), "{head}");
    let mut echoed = [0u8; 5];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut echoed))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(&echoed, b"early", "the bytes sent with the head come first");
    stream.write_all(b"later").await.expect("write");
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut echoed))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(&echoed, b"later");
}

#[tokio::test]
async fn expect_100_continue_is_sent_when_the_body_is_first_polled() {
    let server = start(Limits::default()).await;
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    stream
        .write_all(
            b"POST /e HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n",
        )
        .await
        .expect("write");
    let interim = read_response(&mut stream, 0).await;
    assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(b"ok").await.expect("write");
    let response = read_response(&mut stream, "POST /e|ok".len()).await;
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    // A body that came with its head needs no invitation.
    stream
        .write_all(
            b"POST /e HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\nok",
        )
        .await
        .expect("write");
    let response = read_response(&mut stream, "POST /e|ok".len()).await;
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
}

#[tokio::test]
async fn a_client_that_closes_before_its_response_drops_the_request() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (_stop, stopped) = watch::channel(false);
    let (dropped_tx, dropped) = tokio::sync::oneshot::channel::<()>();
    let dropped_tx = std::sync::Arc::new(std::sync::Mutex::new(Some(dropped_tx)));
    let service = tower::service_fn(move |_request: Request<RequestBody>| {
        // Sends when the request's future is dropped unanswered.
        let guard = dropped_tx
            .lock()
            .expect("lock")
            .take()
            .map(|tx| DropSignal(Some(tx)));
        async move {
            let _guard = guard;
            std::future::pending::<Result<Response<TestBody>, Infallible>>().await
        }
    });
    let params = Params {
        limits: Limits::default(),
    };
    tokio::spawn(server::serve(listener, None, params, stopped, service));
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /long-poll HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    stream.shutdown().await.expect("half-close");
    drop(stream);
    tokio::time::timeout(DEADLINE, dropped)
        .await
        .expect("the request is dropped")
        .expect("signalled");
}

/// Signals when dropped.
struct DropSignal(Option<tokio::sync::oneshot::Sender<()>>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}
