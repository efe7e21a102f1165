//! The data gateway through public surfaces: a DataBinding applied through
//! the admin API, opened by the proxy before it serves, and KeyValue calls
//! through the proxy's own port over gRPC and HTTP/JSON.

mod support;

use prism_data_plane::data::pb::key_value_client::KeyValueClient;
use prism_data_plane::data::pb::{
    BatchGetRequest, BatchPutRequest, DeleteRequest, GetRequest, PutRequest, ScanRequest, Write,
};
use serde_json::Value;
use support::{ControlPlane, Proxy, eventually};
use tonic::Code;

/// The namespace `demo` with its KeyValue store in SQLite, a file in the
/// proxy's data directory, values of at most 1 KiB.
const SQLITE: &str = r#"
namespaces:
  - name: demo
    hosts: [demo.local]
  - name: other
    hosts: [other.local]
bindings:
  - name: demo/kv
    sqlite: {path: demo-kv.db}
    max_value_bytes: 1024
"#;

fn write(key: &str, value: &[u8]) -> Write {
    Write {
        key: key.into(),
        value: value.to_vec().into(),
        ..Default::default()
    }
}

fn put(namespace: &str, write: Write) -> PutRequest {
    PutRequest {
        namespace: namespace.into(),
        write: Some(write),
    }
}

async fn grpc(proxy: &Proxy) -> KeyValueClient<tonic::transport::Channel> {
    KeyValueClient::connect(proxy.url.clone())
        .await
        .expect("connect to the proxy")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_bound_to_sqlite_serves_key_value_over_grpc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path()).await;
    let proxy = Proxy::start(&cp.xds, "proxy-kv-grpc").await;
    proxy.converge(cp.client().apply(SQLITE).await).await;
    let mut kv = grpc(&proxy).await;

    let first = kv
        .put(put("demo", write("users/1", b"ada")))
        .await
        .expect("put")
        .into_inner();
    assert_eq!(first.version, 1);
    let second = kv
        .put(put("demo", write("users/1", b"grace")))
        .await
        .expect("put")
        .into_inner();
    assert_eq!(second.version, 2);
    let item = kv
        .get(GetRequest {
            namespace: "demo".into(),
            key: "users/1".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!((item.value.as_ref(), item.version), (&b"grace"[..], 2));

    // Compare-and-set on a stale version changes nothing.
    let stale = Write {
        expected_version: Some(1),
        ..write("users/1", b"late")
    };
    let status = kv.put(put("demo", stale)).await.expect_err("stale write");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    // A retried write with its idempotency key applies once.
    let once = Write {
        idempotency_key: "req-7".into(),
        ..write("users/2", b"alan")
    };
    let a = kv
        .put(put("demo", once.clone()))
        .await
        .expect("put")
        .into_inner()
        .version;
    let b = kv
        .put(put("demo", once))
        .await
        .expect("retry")
        .into_inner()
        .version;
    assert_eq!((a, b), (1, 1));

    let batch = kv
        .batch_put(BatchPutRequest {
            namespace: "demo".into(),
            writes: vec![write("orders/1", b"x"), write("orders/2", b"y")],
        })
        .await
        .expect("batch put")
        .into_inner();
    assert_eq!(batch.versions, vec![1, 1]);
    let got = kv
        .batch_get(BatchGetRequest {
            namespace: "demo".into(),
            keys: vec!["orders/2".into(), "orders/9".into()],
        })
        .await
        .expect("batch get")
        .into_inner();
    assert_eq!(
        got.items
            .iter()
            .map(|i| (i.key.as_str(), i.version))
            .collect::<Vec<_>>(),
        vec![("orders/2", 1), ("orders/9", 0)]
    );

    // A scan in pages of one, following the opaque token.
    let mut keys = Vec::new();
    let mut token = String::new();
    loop {
        let page = kv
            .scan(ScanRequest {
                namespace: "demo".into(),
                prefix: "users/".into(),
                page_token: token.clone(),
                page_size: 1,
                ..Default::default()
            })
            .await
            .expect("scan")
            .into_inner();
        keys.extend(page.items.into_iter().map(|i| i.key));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(keys, ["users/1", "users/2"]);

    let deleted = kv
        .delete(DeleteRequest {
            namespace: "demo".into(),
            key: "users/1".into(),
            expected_version: None,
        })
        .await
        .expect("delete")
        .into_inner();
    assert!(deleted.deleted);

    // Bad input: each a clear status, and nothing written before is lost.
    let cases = [
        (
            kv.get(GetRequest {
                namespace: "demo".into(),
                key: "users/1".into(),
            })
            .await,
            Code::NotFound,
            "key `users/1` not found",
        ),
        (
            kv.get(GetRequest {
                namespace: "nowhere".into(),
                key: "k".into(),
            })
            .await,
            Code::NotFound,
            "namespace `nowhere` has no KeyValue binding",
        ),
        (
            kv.get(GetRequest {
                namespace: "demo".into(),
                key: String::new(),
            })
            .await,
            Code::InvalidArgument,
            "key: a key is required",
        ),
    ];
    for (result, code, message) in cases {
        let status = result.expect_err(message);
        assert_eq!((status.code(), status.message()), (code, message));
    }
    let big = kv
        .put(put("demo", write("big", &[7; 1025])))
        .await
        .expect_err("oversize");
    assert_eq!(big.code(), Code::ResourceExhausted, "{big:?}");
    assert!(big.message().contains("max_value_bytes (1024)"), "{big:?}");
    let token = kv
        .scan(ScanRequest {
            namespace: "demo".into(),
            prefix: "users/".into(),
            page_token: "garbage!".into(),
            ..Default::default()
        })
        .await
        .expect_err("malformed token");
    assert_eq!(
        (token.code(), token.message()),
        (Code::InvalidArgument, "page_token: malformed page token")
    );
    let item = kv
        .get(GetRequest {
            namespace: "demo".into(),
            key: "users/2".into(),
        })
        .await
        .expect("what was written before is still there")
        .into_inner();
    assert_eq!(item.value.as_ref(), b"alan");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_value_over_json_answers_as_transcoding_would() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path()).await;
    let proxy = Proxy::start(&cp.xds, "proxy-kv-json").await;
    proxy.converge(cp.client().apply(SQLITE).await).await;
    let http = reqwest::Client::new();
    let url = |path: &str| format!("{}/v1/kv/demo/{path}", proxy.url);

    let put = http
        .put(url("greeting/en"))
        .body("hello")
        .send()
        .await
        .expect("put");
    assert_eq!(put.status(), 200);
    let answer: Value = put.json().await.expect("json");
    assert_eq!(answer["version"], "1");
    // A key with a slash and a space, percent-encoded.
    let put = http
        .put(url("a%2Fb%20c"))
        .body("odd")
        .send()
        .await
        .expect("put");
    assert_eq!(put.status(), 200);

    let get = http.get(url("greeting/en")).send().await.expect("get");
    assert_eq!(get.status(), 200);
    assert_eq!(get.headers()["x-prism-version"], "1");
    assert_eq!(get.headers()["etag"], "\"1\"");
    assert_eq!(get.text().await.expect("body"), "hello");
    let odd = http.get(url("a%2Fb%20c")).send().await.expect("get");
    assert_eq!(odd.text().await.expect("body"), "odd");

    // Compare-and-set: `if_version=0` only creates.
    let exists = http
        .put(url("greeting/en?if_version=0"))
        .body("again")
        .send()
        .await
        .expect("put");
    assert_eq!(exists.status(), 412);
    let error: Value = exists.json().await.expect("json");
    assert_eq!(error["error"]["status"], "FAILED_PRECONDITION", "{error}");

    let scan: Value = http
        .get(format!("{}/v1/kv/demo?prefix=greeting/", proxy.url))
        .send()
        .await
        .expect("scan")
        .json()
        .await
        .expect("json");
    assert_eq!(scan["items"][0]["key"], "greeting/en", "{scan}");
    assert_eq!(scan["items"][0]["value"], "aGVsbG8=", "{scan}");
    assert_eq!(scan["next_page_token"], "", "{scan}");

    let batch: Value = http
        .post(format!("{}/v1/kv/demo:batchGet", proxy.url))
        .json(&serde_json::json!({"keys": ["greeting/en", "missing"]}))
        .send()
        .await
        .expect("batch")
        .json()
        .await
        .expect("json");
    assert_eq!(batch["items"][1]["version"], "0", "{batch}");

    // Errors: the status of the gRPC code, and a body that says why.
    let cases = [
        (http.get(url("missing")).send().await, 404, "NOT_FOUND"),
        (
            http.put(url("big")).body(vec![1u8; 1025]).send().await,
            413,
            "RESOURCE_EXHAUSTED",
        ),
        (
            http.put(url("k?ttl=forever")).body("v").send().await,
            400,
            "INVALID_ARGUMENT",
        ),
        (
            http.get(format!("{}/v1/kv/nowhere/k", proxy.url))
                .send()
                .await,
            404,
            "NOT_FOUND",
        ),
        (http.post(url("k")).send().await, 405, "UNIMPLEMENTED"),
        (
            http.get(format!("{}/v1/kv/demo?page_token=zz", proxy.url))
                .send()
                .await,
            400,
            "INVALID_ARGUMENT",
        ),
    ];
    for (response, status, code) in cases {
        let response = response.expect("answer");
        assert_eq!(response.status(), status);
        let body: Value = response.json().await.expect("a JSON error");
        assert_eq!(body["error"]["status"], code, "{body}");
        assert!(
            !body["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .is_empty()
        );
    }

    let deleted: Value = http
        .delete(url("greeting/en"))
        .send()
        .await
        .expect("delete")
        .json()
        .await
        .expect("json");
    assert_eq!(deleted["deleted"], true);
    assert_eq!(
        http.get(url("greeting/en"))
            .send()
            .await
            .expect("get")
            .status(),
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binding_that_cannot_connect_is_nacked_and_the_old_one_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path()).await;
    let admin = cp.client();
    let proxy = Proxy::start(&cp.xds, "proxy-kv-nack").await;
    proxy.converge(admin.apply(SQLITE).await).await;
    let http = reqwest::Client::new();
    let key = format!("{}/v1/kv/demo/kept", proxy.url);
    assert_eq!(
        http.put(&key)
            .body("safe")
            .send()
            .await
            .expect("put")
            .status(),
        200
    );

    // Move the namespace to a Postgres that is not there: the proxy cannot
    // open it within the binding's connect timeout and refuses the revision.
    let dead = support::free_local_addr();
    let moved = admin
        .apply(&format!(
            r#"
secrets:
  - name: demo/db
    credential: {{value: "postgres://prism@{dead}/test"}}
bindings:
  - name: demo/kv
    postgres: {{secret: db}}
    connect_timeout: 1s
"#
        ))
        .await;
    let nack = eventually("the proxy NACKs the binding it cannot open", || async {
        let fleet = admin.proxies().await;
        let nack = fleet["proxies"][0]["last_nack"].clone();
        (nack["revision"].as_u64() == Some(moved)).then_some(nack)
    })
    .await;
    let message = nack["message"].as_str().expect("message");
    assert!(
        message.starts_with("DataBinding demo/kv: postgres: "),
        "the NACK names the binding and the field: {message}"
    );
    assert!(
        !message.contains("postgres://"),
        "no connection string in a NACK: {message}"
    );
    // The SQLite binding still serves what it held.
    let kept = http.get(&key).send().await.expect("get");
    assert_eq!(kept.status(), 200);
    assert_eq!(kept.text().await.expect("body"), "safe");
}
