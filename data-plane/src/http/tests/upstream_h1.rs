//! Prism's own HTTP/1.1 client (`endpoint/h1.rs`) against raw upstreams that
//! write exactly the bytes a case needs: reuse, closes, framings, early
//! answers, interim responses and malformed heads, seen through the proxy.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// A raw upstream: each connection it accepts goes to `handler`, which
/// reads and writes the bytes itself. Counts the connections.
struct Raw {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

async fn raw<F, Fut>(handler: F) -> Raw
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (listener, addr) = bind().await;
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(handler(stream));
        }
    });
    Raw { addr, accepted }
}

impl Raw {
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Reads one request (head, and a `content-length` body) off `stream`,
/// keeping what follows in `buf`; `None` once the proxy closed the connection.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            let length = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length: "))
                .map_or(0, |n| n.trim().parse::<usize>().expect("length"));
            while buf.len() < end + 4 + length {
                let mut more = [0; 4096];
                let n = stream.read(&mut more).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&more[..n]);
            }
            let body = buf[end + 4..end + 4 + length].to_vec();
            buf.drain(..end + 4 + length);
            return Some((head, body));
        }
        let mut more = [0; 4096];
        let n = stream.read(&mut more).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&more[..n]);
    }
}

/// An upstream answering every request on a connection with `answer`,
/// until the proxy closes it; reports each request head it read.
async fn answering(answer: &'static [u8]) -> (Raw, mpsc::UnboundedReceiver<String>) {
    let (heads, seen) = mpsc::unbounded_channel();
    let up = raw(move |mut stream| {
        let heads = heads.clone();
        async move {
            let mut buf = Vec::new();
            while let Some((head, _)) = read_request(&mut stream, &mut buf).await {
                let _ = heads.send(head);
                if stream.write_all(answer).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    (up, seen)
}

async fn proxy_to(up: &Raw) -> Proxy {
    let proxy = start_proxy().await;
    proxy.apply(&policy(&[("/", "web", &[up.addr])], None));
    proxy
}

#[tokio::test]
async fn sequential_requests_reuse_one_connection_with_origin_form_heads() {
    let (up, mut seen) = answering(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
    let proxy = proxy_to(&up).await;
    for i in 0..5 {
        let (status, _, body) = send(&proxy, "demo.local", "/a?b=c", "hello").await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, "ok"),
            "request {i}"
        );
    }
    assert_eq!(up.accepted(), 1, "one connection carried all five");
    let head = seen.recv().await.expect("a request");
    assert!(head.starts_with("POST /a?b=c HTTP/1.1\r\n"), "{head}");
    assert!(head.contains("\r\nhost: demo.local\r\n"), "{head}");
    assert!(head.contains("\r\ncontent-length: 5\r\n"), "{head}");
}

#[tokio::test]
async fn an_upstream_connection_close_is_not_reused() {
    let up = raw(|mut stream| async move {
        let mut buf = Vec::new();
        if read_request(&mut stream, &mut buf).await.is_some() {
            let answer = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok";
            let _ = stream.write_all(answer).await;
            // Left open: the proxy must not wait for, nor reuse, it.
            let _ = read_request(&mut stream, &mut buf).await;
        }
    })
    .await;
    let proxy = proxy_to(&up).await;
    for _ in 0..2 {
        let (status, _, body) = send(&proxy, "demo.local", "/", "").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
    }
    assert_eq!(up.accepted(), 2);
}

#[tokio::test]
async fn a_body_without_length_is_read_until_the_upstream_closes() {
    let up = raw(|mut stream| async move {
        let mut buf = Vec::new();
        if read_request(&mut stream, &mut buf).await.is_some() {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\n\r\nuntil ").await;
            let _ = stream.write_all(b"the end").await;
        }
    })
    .await;
    let proxy = proxy_to(&up).await;
    for _ in 0..2 {
        let (status, _, body) = send(&proxy, "demo.local", "/", "").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "until the end"));
    }
    assert_eq!(
        up.accepted(),
        2,
        "a close-delimited body ends its connection"
    );
}

#[tokio::test]
async fn a_chunked_response_streams_with_its_trailers_and_keeps_the_connection() {
    let (up, _seen) = answering(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n\
          5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-sum: 12\r\n\r\n",
    )
    .await;
    let proxy = proxy_to(&up).await;
    let mut h2 = h2c::<Full<Bytes>>(&proxy).await;
    for _ in 0..2 {
        let request = Request::get("http://demo.local/")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let response = h2.send_request(request).await.expect("response");
        assert_eq!(response.status(), StatusCode::OK);
        let collected = response.into_body().collect().await.expect("body");
        let trailers = collected.trailers().cloned().expect("trailers passed on");
        assert_eq!(header_str(&trailers, "x-sum"), "12");
        assert_eq!(collected.to_bytes(), "hello, world");
    }
    assert_eq!(up.accepted(), 1);
}

#[tokio::test]
async fn an_early_413_reaches_the_client_while_its_body_still_streams() {
    let (hold, held) = mpsc::unbounded_channel();
    let up = raw(move |mut stream| {
        let hold = hold.clone();
        async move {
            let mut buf = Vec::new();
            // The head only; the body is never read.
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let mut more = [0; 1024];
                match stream.read(&mut more).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&more[..n]),
                }
            }
            let answer = b"HTTP/1.1 413 Payload Too Large\r\nconnection: close\r\ncontent-length: 4\r\n\r\nbig!";
            let _ = stream.write_all(answer).await;
            let _ = hold.send(stream);
        }
    })
    .await;
    let proxy = proxy_to(&up).await;
    let (chunks, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
    chunks
        .send(Ok(Frame::data(Bytes::from(vec![b'x'; 64 * 1024]))))
        .await
        .expect("first chunk");
    let stream = TcpStream::connect(proxy.addr).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    let request = Request::post("/upload")
        .header(header::HOST, "demo.local")
        .body(StreamBody::new(ReceiverStream::new(rx)))
        .expect("request");
    let response = tokio::time::timeout(DEADLINE, sender.send_request(request))
        .await
        .expect("the answer comes while the body is unfinished")
        .expect("response");
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(body, "big!");
    // Only now does the client's body end, and the upstream let go.
    drop((chunks, held));
}

#[tokio::test]
async fn interim_responses_are_skipped() {
    let (up, _seen) = answering(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n\
          HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal",
    )
    .await;
    let proxy = proxy_to(&up).await;
    let (status, headers, body) = send(&proxy, "demo.local", "/", "").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "final"));
    assert_eq!(header_str(&headers, "link"), "", "no interim header leaks");
}

#[tokio::test]
async fn a_head_response_has_no_body_and_keeps_the_connection() {
    let (up, _seen) =
        answering(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\nx-kind: head\r\n\r\n").await;
    let proxy = proxy_to(&up).await;
    for _ in 0..2 {
        let request = Request::head(format!("http://{}/", proxy.addr))
            .header(header::HOST, "demo.local")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let response = tokio::time::timeout(DEADLINE, client().request(request))
            .await
            .expect("in time")
            .expect("response");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(header_str(response.headers(), "content-length"), "10");
        assert_eq!(header_str(response.headers(), "x-kind"), "head");
    }
    assert_eq!(up.accepted(), 1, "the bodiless answer left it reusable");
}

#[tokio::test]
async fn an_idle_connection_the_upstream_closed_is_not_used() {
    let (closed, mut closes) = mpsc::unbounded_channel();
    let up = raw(move |mut stream| {
        let closed = closed.clone();
        async move {
            let mut buf = Vec::new();
            if read_request(&mut stream, &mut buf).await.is_some() {
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                // An upstream's keep-alive timeout: closed once idle.
                drop(stream);
                let _ = closed.send(());
            }
        }
    })
    .await;
    let proxy = proxy_to(&up).await;
    for i in 0..3 {
        let (status, _, body) = send(&proxy, "demo.local", "/", "").await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, "ok"),
            "request {i}"
        );
        tokio::time::timeout(DEADLINE, closes.recv())
            .await
            .expect("the upstream closes")
            .expect("upstream running");
    }
    assert_eq!(up.accepted(), 3, "each request found the last one closed");
}

#[tokio::test]
async fn malformed_or_truncated_responses_are_502() {
    let long_header = format!("x-long: {}\r\n", "a".repeat(70 * 1024));
    let many_headers: String = (0..101).map(|i| format!("x-{i}: v\r\n")).collect();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"SSH-2.0-OpenSSH\r\n\r\n".to_vec()),
        ("bad status", b"HTTP/1.1 abc OK\r\n\r\n".to_vec()),
        ("closed first", Vec::new()),
        (
            "too long",
            format!("HTTP/1.1 200 OK\r\n{long_header}\r\n").into_bytes(),
        ),
        (
            "too many",
            format!("HTTP/1.1 200 OK\r\n{many_headers}\r\n").into_bytes(),
        ),
        (
            "bad length",
            b"HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\nx".to_vec(),
        ),
    ];
    for (case, answer) in cases {
        let answer: &'static [u8] = answer.leak();
        let up = raw(move |mut stream| async move {
            let mut buf = Vec::new();
            if read_request(&mut stream, &mut buf).await.is_some() {
                let _ = stream.write_all(answer).await;
            }
        })
        .await;
        let proxy = proxy_to(&up).await;
        let (status, _, body) = send(&proxy, "demo.local", "/", "").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{case}");
        assert_eq!(body, "upstream request failed\n", "{case}");
    }
}

#[tokio::test]
async fn a_body_cut_short_fails_the_response_and_its_connection() {
    let up = raw(|mut stream| async move {
        let mut buf = Vec::new();
        if read_request(&mut stream, &mut buf).await.is_some() {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort")
                .await;
        }
    })
    .await;
    let proxy = proxy_to(&up).await;
    let request = Request::get(format!("http://{}/", proxy.addr))
        .header(header::HOST, "demo.local")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let exchange = async {
        let response = client()
            .request(request)
            .await
            .map_err(error::BoxError::from)?;
        response
            .into_body()
            .collect()
            .await
            .map_err(error::BoxError::from)
    };
    let outcome = tokio::time::timeout(DEADLINE, exchange)
        .await
        .expect("in time");
    // Whether the proxy had flushed the head or not, the client sees the
    // response fail rather than end short.
    assert!(outcome.is_err(), "the client sees the response fail");
}

#[tokio::test]
async fn bytes_sent_with_a_101_reach_the_client_before_the_stream_goes_on() {
    let up = raw(|mut stream| async move {
        let mut buf = Vec::new();
        if read_request(&mut stream, &mut buf).await.is_none() {
            return;
        }
        // The switch and the new protocol's first bytes in one write.
        let answer = b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\nhello";
        if stream.write_all(answer).await.is_err() {
            return;
        }
        let mut echo = [0; 64];
        while let Ok(n @ 1..) = stream.read(&mut echo).await {
            if stream.write_all(&echo[..n]).await.is_err() {
                return;
            }
        }
    })
    .await;
    let proxy = proxy_to(&up).await;
    let mut client = TcpStream::connect(proxy.addr).await.expect("connect");
    client
        .write_all(b"GET /chat HTTP/1.1\r\nhost: demo.local\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n")
        .await
        .expect("request");
    let mut seen = Vec::new();
    let switched = async {
        while !seen.ends_with(b"hello") {
            let mut more = [0; 256];
            let n = client.read(&mut more).await.expect("read");
            assert_ne!(n, 0, "closed early: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&more[..n]);
        }
    };
    tokio::time::timeout(DEADLINE, switched)
        .await
        .expect("in time");
    let seen = String::from_utf8_lossy(&seen).into_owned();
    assert!(seen.starts_with("HTTP/1.1 101 "), "{seen}");
    assert!(seen.ends_with("\r\n\r\nhello"), "{seen}");
    client.write_all(b"ping").await.expect("write");
    let mut echoed = [0; 4];
    tokio::time::timeout(DEADLINE, client.read_exact(&mut echoed))
        .await
        .expect("in time")
        .expect("echo");
    assert_eq!(&echoed, b"ping");
}
