use super::*;

fn headers(fields: &[(&'static str, &'static str)]) -> HeaderMap {
    fields
        .iter()
        .map(|&(name, value)| {
            (
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            )
        })
        .collect()
}

fn head(raw: &[u8]) -> Result<Option<Head>, Error> {
    parse_head(&mut BytesMut::from(raw))
}

#[test]
fn the_request_head_is_origin_form_with_the_headers_as_given() {
    let mut wire = Vec::new();
    let fields = headers(&[("host", "demo.local"), ("x-a", "1"), ("x-a", "2")]);
    let uri = Uri::from_static("/a/b?c=d");
    assert!(!encode_head(&Method::PUT, &uri, &fields, &mut wire));
    assert_eq!(
        wire,
        b"PUT /a/b?c=d HTTP/1.1\r\nhost: demo.local\r\nx-a: 1\r\nx-a: 2\r\n\r\n"
    );
}

#[test]
fn request_bodies_are_framed_as_hyper_framed_them() {
    let frame = |method: Method, mut fields: HeaderMap, empty: bool, hint: SizeHint| {
        let encode = request_framing(&method, &mut fields, empty, hint);
        let encode = encode.map(|e| match e {
            Encode::Length(n) => format!("length {n}"),
            Encode::Chunked(names) => format!("chunked {names:?}"),
        });
        let header = |name| {
            fields
                .get(name)
                .map(|v| v.to_str().expect("ascii").to_string())
        };
        (
            encode,
            header(header::CONTENT_LENGTH),
            header(header::TRANSFER_ENCODING),
        )
    };
    let unknown = SizeHint::default();
    // No body: nothing added, a stray transfer-encoding removed.
    assert_eq!(
        frame(
            Method::POST,
            headers(&[("transfer-encoding", "chunked")]),
            true,
            unknown
        ),
        (None, None, None)
    );
    // A known length becomes the content-length.
    assert_eq!(
        frame(
            Method::POST,
            HeaderMap::new(),
            false,
            SizeHint::with_exact(5)
        ),
        (Some("length 5".into()), Some("5".into()), None)
    );
    // The request's own content-length is kept.
    assert_eq!(
        frame(
            Method::POST,
            headers(&[("content-length", "7")]),
            false,
            unknown
        ),
        (Some("length 7".into()), Some("7".into()), None)
    );
    // Unknown: chunked, with the announced trailers.
    assert_eq!(
        frame(
            Method::POST,
            headers(&[("trailer", "x-sum, x-b")]),
            false,
            unknown
        ),
        (
            Some(r#"chunked ["x-sum", "x-b"]"#.into()),
            None,
            Some("chunked".into())
        )
    );
    // ...except for a GET, which goes without one.
    assert_eq!(
        frame(Method::GET, HeaderMap::new(), false, unknown),
        (None, None, None)
    );
}

#[test]
fn only_announced_request_trailers_are_sent() {
    let trailers = headers(&[("x-sum", "1"), ("x-secret", "2")]);
    let kept = announced(trailers, &[HeaderName::from_static("x-sum")]);
    assert_eq!(kept, headers(&[("x-sum", "1")]));
}

#[test]
fn a_response_head_parses_into_status_version_and_headers() {
    let raw = b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nX-A: 1\r\nx-a: 2\r\n\r\nok";
    let mut read = BytesMut::from(&raw[..]);
    let parsed = parse_head(&mut read).expect("valid").expect("complete");
    assert_eq!(
        (parsed.status, parsed.version),
        (StatusCode::CREATED, Version::HTTP_11)
    );
    assert_eq!(parsed.headers.get_all("x-a").iter().count(), 2);
    assert_eq!(
        parsed
            .headers
            .get(header::CONTENT_LENGTH)
            .map(|v| v.as_bytes()),
        Some(&b"2"[..])
    );
    assert!(matches!(parsed.fields.length, Ok(Some(2))));
    assert_eq!(&read[..], b"ok", "the body stays in the buffer");
    assert!(
        head(b"HTTP/1.0 200 OK\r\n")
            .expect("valid so far")
            .is_none()
    );
    let old = head(b"HTTP/1.0 200 OK\r\n\r\n")
        .expect("valid")
        .expect("complete");
    assert_eq!(old.version, Version::HTTP_10);
}

#[test]
fn malformed_or_oversized_response_heads_are_errors() {
    assert!(matches!(
        head(b"HTTP/1.1 abc\r\n\r\n"),
        Err(Error::InvalidHead(_))
    ));
    assert!(matches!(
        head(b"SSH-2.0-OpenSSH\r\n\r\n"),
        Err(Error::InvalidHead(_))
    ));
    assert!(matches!(
        head(b"HTTP/1.1 099 Low\r\n\r\n"),
        Err(Error::InvalidStatus)
    ));
    let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
    for i in 0..=MAX_HEADERS {
        many.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    assert!(matches!(head(&many), Err(Error::TooManyHeaders)));
    let mut long = b"HTTP/1.1 200 OK\r\nx-long: ".to_vec();
    long.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES));
    long.extend_from_slice(b"\r\n\r\n");
    assert!(matches!(head(&long), Err(Error::HeadTooLarge)));
}

#[test]
fn response_bodies_are_delimited_as_rfc_9112_says() {
    // The framing of a response head with `fields`, as they are read off
    // the wire.
    let framing = |head_request, status: u16, fields: &[(&str, &str)]| {
        let mut raw = format!("HTTP/1.1 {status} Reason\r\n");
        for (name, value) in fields {
            raw.push_str(&format!("{name}: {value}\r\n"));
        }
        raw.push_str("\r\n");
        let head = head(raw.as_bytes()).expect("valid").expect("complete");
        response_framing(head_request, head.status, &head.fields).map(|f| format!("{f:?}"))
    };
    let length = [("content-length", "10")];
    assert_eq!(framing(true, 200, &length).expect("valid"), "Empty");
    for status in [101, 204, 304] {
        assert_eq!(framing(false, status, &length).expect("valid"), "Empty");
    }
    assert_eq!(framing(false, 200, &length).expect("valid"), "Length(10)");
    assert_eq!(
        framing(false, 200, &[("content-length", "10, 10")]).expect("valid"),
        "Length(10)"
    );
    assert!(
        framing(
            false,
            200,
            &[
                ("transfer-encoding", "gzip, chunked"),
                ("content-length", "3")
            ]
        )
        .expect("valid")
        .starts_with("Chunked")
    );
    assert_eq!(
        framing(false, 200, &[("transfer-encoding", "gzip")]).expect("valid"),
        "Close"
    );
    assert_eq!(framing(false, 200, &[]).expect("valid"), "Close");
    for bad in ["10, 11", "-1", "+5", "ten", ""] {
        let fields = [("content-length", bad)];
        assert!(
            matches!(
                framing(false, 200, &fields),
                Err(Error::InvalidContentLength)
            ),
            "{bad}"
        );
    }
}

#[test]
fn connection_close_is_found_among_the_tokens() {
    let close = |fields| {
        encode_head(
            &Method::GET,
            &Uri::from_static("/"),
            &fields,
            &mut Vec::new(),
        )
    };
    assert!(close(headers(&[("connection", "keep-alive, Close")])));
    assert!(!close(headers(&[("connection", "keep-alive")])));
    assert!(!close(HeaderMap::new()));
    let response = b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nconnection: close\r\n\r\n";
    let response = head(response).expect("valid").expect("complete");
    assert!(response.fields.close);
}
