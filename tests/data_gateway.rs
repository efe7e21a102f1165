//! The data gateway through public surfaces: a DataBinding applied through
//! the admin API, opened by the proxy before it serves, and KeyValue and
//! PubSub calls through the proxy's own port over gRPC and HTTP/JSON.

mod support;

use futures::StreamExt as _;
use prism_data_plane::data::pb::key_value_client::KeyValueClient;
use prism_data_plane::data::pb::pub_sub_client::PubSubClient;
use prism_data_plane::data::pb::{
    AckRequest, BatchGetRequest, BatchPutRequest, DeleteRequest, GetRequest, Message,
    PublishRequest, PutRequest, ScanRequest, SubscribeRequest, Write,
};
use serde_json::Value;
use support::{Authority, ControlPlane, Issued, Proxy, eventually};
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

/// A control plane and a proxy that serves its policy, with the directory
/// the control plane keeps.
struct Gateway {
    proxy: Proxy,
    _cp: ControlPlane,
    _dir: tempfile::TempDir,
}

/// [`Gateway`]: proxy `node` serving `policy`.
async fn gateway(node: &str, policy: &str) -> Gateway {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path()).await;
    let proxy = Proxy::start(&cp.xds, node).await;
    proxy.converge(cp.client().apply(policy).await).await;
    Gateway {
        proxy,
        _cp: cp,
        _dir: dir,
    }
}

async fn grpc(proxy: &Proxy) -> KeyValueClient<tonic::transport::Channel> {
    KeyValueClient::connect(proxy.url.clone())
        .await
        .expect("connect to the proxy")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_bound_to_sqlite_serves_key_value_over_grpc() {
    let gateway = gateway("proxy-kv-grpc", SQLITE).await;
    let proxy = &gateway.proxy;
    let mut kv = grpc(proxy).await;

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
    let gateway = gateway("proxy-kv-json", SQLITE).await;
    let proxy = &gateway.proxy;
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

/// The namespace `demo` with the proxy's in-memory bus; a group delivery
/// not acknowledged within a second is delivered again.
const MEMORY: &str = r#"
namespaces:
  - name: demo
    hosts: [demo.local]
bindings:
  - name: demo/bus
    memory: {}
    ack_wait: 1s
    max_value_bytes: 1024
"#;

async fn bus(proxy: &Proxy) -> PubSubClient<tonic::transport::Channel> {
    PubSubClient::connect(proxy.url.clone())
        .await
        .expect("connect to the proxy")
}

fn subscribe(topic: &str, group: &str) -> SubscribeRequest {
    SubscribeRequest {
        namespace: "demo".into(),
        topic: topic.into(),
        group: group.into(),
        max_in_flight: 0,
    }
}

fn publish(topic: &str, payload: &[u8], key: &str) -> PublishRequest {
    PublishRequest {
        namespace: "demo".into(),
        topic: topic.into(),
        payload: payload.to_vec().into(),
        idempotency_key: key.into(),
    }
}

async fn next(stream: &mut tonic::Streaming<Message>) -> Message {
    tokio::time::timeout(support::DEADLINE, stream.message())
        .await
        .expect("a message within the deadline")
        .expect("the stream is healthy")
        .expect("the stream is open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_gets_each_message_until_it_is_acknowledged() {
    let gateway = gateway("proxy-bus-grpc", MEMORY).await;
    let proxy = &gateway.proxy;
    let mut client = bus(proxy).await;

    let mut stream = client
        .subscribe(subscribe("orders", "billing"))
        .await
        .expect("subscribe")
        .into_inner();
    let subscription = next(&mut stream).await.subscription;
    assert!(!subscription.is_empty());

    let id = client
        .publish(publish("orders", b"order-1", "k1"))
        .await
        .expect("publish")
        .into_inner()
        .id;
    // A retried publish with its idempotency key publishes nothing new.
    let again = client
        .publish(publish("orders", b"order-1", "k1"))
        .await
        .expect("retry")
        .into_inner()
        .id;
    assert_eq!(id, again);
    let first = next(&mut stream).await;
    assert_eq!(
        (first.id.as_str(), first.payload.as_ref(), first.attempt),
        (id.as_str(), &b"order-1"[..], 1)
    );
    // Not acknowledged: delivered again after ack_wait, one attempt more.
    let redelivered = next(&mut stream).await;
    assert_eq!(
        (redelivered.id.as_str(), redelivered.attempt),
        (id.as_str(), 2)
    );
    client
        .ack(AckRequest {
            namespace: "demo".into(),
            subscription: subscription.clone(),
            ids: vec![id.clone()],
        })
        .await
        .expect("ack");
    let second = client
        .publish(publish("orders", b"order-2", ""))
        .await
        .expect("publish")
        .into_inner()
        .id;
    let after = next(&mut stream).await;
    assert_eq!((after.id.as_str(), after.attempt), (second.as_str(), 1));
    // The second is not acknowledged: it comes again after ack_wait. Had the
    // first not been acknowledged, its redelivery, due earlier, would come
    // before.
    let again = next(&mut stream).await;
    assert_eq!(
        (again.id, again.attempt),
        (second, 2),
        "the acknowledged message never comes back"
    );

    // Bad input, each a clear status.
    let big = client
        .publish(publish("orders", &[0; 1025], ""))
        .await
        .expect_err("oversize");
    assert_eq!(big.code(), Code::ResourceExhausted, "{big:?}");
    let topic = client
        .publish(publish("bad topic", b"x", ""))
        .await
        .expect_err("bad topic");
    assert_eq!(topic.code(), Code::InvalidArgument, "{topic:?}");
    let gone = client
        .ack(AckRequest {
            namespace: "demo".into(),
            subscription: "nope".into(),
            ids: vec![],
        })
        .await
        .expect_err("unknown subscription");
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    let unbound = client
        .publish(PublishRequest {
            namespace: "other".into(),
            ..publish("t", b"x", "")
        })
        .await
        .expect_err("no binding");
    assert_eq!(unbound.code(), Code::NotFound, "{unbound:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_over_http_publishes_with_post_and_subscribes_with_server_sent_events() {
    let gateway = gateway("proxy-bus-sse", MEMORY).await;
    let proxy = &gateway.proxy;
    let http = reqwest::Client::new();

    let mut events = http
        .get(format!("{}/v1/pubsub/demo/news?group=readers", proxy.url))
        .send()
        .await
        .expect("subscribe");
    assert_eq!(events.status(), 200);
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    let mut text = String::new();
    let mut read_until = async |needle: &str, text: &mut String| {
        while !text.contains(needle) {
            let chunk = tokio::time::timeout(support::DEADLINE, events.chunk())
                .await
                .expect("an event within the deadline")
                .expect("the stream is healthy")
                .expect("the stream is open");
            text.push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
        }
    };
    read_until("event: subscription\ndata: ", &mut text).await;

    let published: Value = http
        .post(format!("{}/v1/pubsub/demo/news", proxy.url))
        .body("hello, world")
        .send()
        .await
        .expect("publish")
        .json()
        .await
        .expect("json");
    let id = published["id"].as_str().expect("an id").to_string();
    let mut first = text.split_off(0);
    read_until("\n\n", &mut first).await;
    let subscription = first
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .expect("the subscription's id")
        .to_string();
    let mut message = String::new();
    read_until("hello, world", &mut message).await;
    assert!(message.starts_with("event: message\n"), "{message}");
    assert!(message.contains(&format!("id: {id}\n")), "{message}");
    let data: Value = serde_json::from_str(
        message
            .lines()
            .find_map(|l| l.strip_prefix("data: "))
            .expect("a data line"),
    )
    .expect("JSON data");
    assert_eq!(data["payload"], "hello, world");
    assert_eq!(data["attempt"], 1);

    let ack = |subscription: &str| {
        http.post(format!("{}/v1/pubsub/demo:ack", proxy.url))
            .json(&serde_json::json!({"subscription": subscription, "ids": [id]}))
            .send()
    };
    assert_eq!(ack(&subscription).await.expect("ack").status(), 200);
    let unknown = ack("nope").await.expect("ack");
    assert_eq!(unknown.status(), 404);
    let body: Value = unknown.json().await.expect("json");
    assert_eq!(body["error"]["status"], "NOT_FOUND", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_cancelled_subscriptions_leave_nothing_behind() {
    let gateway = gateway("proxy-bus-leak", MEMORY).await;
    let proxy = &gateway.proxy;
    let client = bus(proxy).await;
    let stats = || async {
        reqwest::get(format!("{}/data", proxy.admin))
            .await
            .expect("proxy admin")
            .json::<Value>()
            .await
            .expect("json")
    };
    let count = |v: &Value, field: &str| {
        v[field]
            .as_u64()
            .unwrap_or_else(|| panic!("{field} in {v}"))
    };
    let before = stats().await;

    // 10,000 subscriptions, 100 open at a time (the proxy's HTTP/2 stream
    // limit), each cancelled once it is open.
    let total: usize = 10_000;
    let mut open = futures::stream::iter(0..total)
        .map(|i| {
            let mut client = client.clone();
            async move {
                let group = if i % 2 == 0 {
                    String::new()
                } else {
                    format!("g{}", i % 7)
                };
                let mut stream = client
                    .subscribe(subscribe("leak", &group))
                    .await
                    .expect("subscribe")
                    .into_inner();
                next(&mut stream).await;
            }
        })
        .buffer_unordered(100);
    let mut done = 0;
    while open.next().await.is_some() {
        done += 1;
    }
    assert_eq!(done, total);
    drop(open);
    drop(client);

    let after = eventually("the proxy is back to its baseline", || async {
        let now = stats().await;
        let settled = count(&now, "subscriptions") == 0
            && count(&now, "bus_subscriptions") <= count(&before, "bus_subscriptions")
            && count(&now, "tasks") <= count(&before, "tasks") + 4;
        settled.then_some(now)
    })
    .await;
    let grown = count(&after, "rss_bytes").saturating_sub(count(&before, "rss_bytes"));
    assert!(
        grown < 64 << 20,
        "RSS grew by {grown} bytes: {before} → {after}"
    );
}

/// The PostgreSQL the tests use: `PRISM_TEST_POSTGRES_URL`, or the local
/// server's database `test`. Fails the test, saying so, when it is not up.
async fn postgres_url() -> String {
    let url = std::env::var("PRISM_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let host = url
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("a postgres://user@host:port/db URL");
    if let Err(error) = tokio::net::TcpStream::connect(host).await {
        panic!(
            "PostgreSQL is not reachable at {host} ({error}): start it, or set PRISM_TEST_POSTGRES_URL"
        );
    }
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_moves_from_sqlite_to_postgres_while_a_client_writes() {
    let url = postgres_url().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path()).await;
    let admin = cp.client();
    let proxy = Proxy::start(&cp.xds, "proxy-kv-move").await;
    // A namespace of its own in the shared test database.
    let ns = format!(
        "move-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("time")
            .as_nanos()
            % 1_000_000_000
    );
    proxy
        .converge(
            admin
                .apply(&format!(
                    "namespaces: [{{name: {ns}, hosts: [{ns}.local]}}]\n\
                     bindings: [{{name: {ns}/kv, sqlite: {{path: move.db}}}}]\n"
                ))
                .await,
        )
        .await;

    // A client writing one key after another, retrying what it is told to
    // retry and failing on anything else; it records what was acknowledged.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writer = {
        let (mut kv, ns, stop, acked) =
            (grpc(&proxy).await, ns.clone(), stop.clone(), acked.clone());
        tokio::spawn(async move {
            let mut retries = 0;
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let value = i.to_string();
                match kv
                    .put(put(&ns, write(&format!("k{i:06}"), value.as_bytes())))
                    .await
                {
                    Ok(_) => {
                        i += 1;
                        acked.store(i, std::sync::atomic::Ordering::SeqCst);
                    }
                    Err(status) if status.code() == Code::Unavailable => {
                        retries += 1;
                        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                    }
                    Err(status) => {
                        panic!("write {i} failed with an error not to retry: {status:?}")
                    }
                }
            }
            (i, retries)
        })
    };
    let at_least = |n: usize| {
        let acked = acked.clone();
        async move {
            eventually(&format!("{n} writes acknowledged"), || async {
                (acked.load(std::sync::atomic::Ordering::SeqCst) >= n).then_some(())
            })
            .await
        }
    };
    at_least(300).await;

    let moved = admin
        .apply(&format!(
            "secrets: [{{name: {ns}/db, credential: {{value: \"{url}\"}}}}]\n\
             bindings: [{{name: {ns}/kv, postgres: {{secret: db}}, move_items: true}}]\n"
        ))
        .await;
    proxy.converge(moved).await;
    let then = acked.load(std::sync::atomic::Ordering::SeqCst);
    at_least(then + 300).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (written, retries) = writer
        .await
        .expect("the writer saw no error it was not told to retry");

    // Every acknowledged write is there, now in PostgreSQL.
    let mut kv = grpc(&proxy).await;
    let keys: Vec<String> = (0..written).map(|i| format!("k{i:06}")).collect();
    for chunk in keys.chunks(500) {
        let items = kv
            .batch_get(BatchGetRequest {
                namespace: ns.clone(),
                keys: chunk.to_vec(),
            })
            .await
            .expect("batch get")
            .into_inner()
            .items;
        for item in items {
            let i: usize = item.key[1..].parse().expect("k + number");
            assert_eq!(item.version, 1, "{} was lost ({retries} retries)", item.key);
            assert_eq!(item.value.as_ref(), i.to_string().as_bytes());
        }
    }
    let dump = proxy.config_dump().await.expect("config dump");
    assert!(
        dump["resources"]
            .as_array()
            .expect("resources")
            .iter()
            .any(|r| r["name"] == format!("{ns}/db")),
        "the proxy serves the Postgres binding: {dump}"
    );
}

/// A TCP forwarder to `to`, on `at` (any free port when 0), that can be cut:
/// aborting its task drops every connection through it.
async fn forwarder(at: u16, to: &str) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", at))
        .await
        .expect("bind the forwarder");
    let port = listener.local_addr().expect("addr").port();
    let to = to.to_string();
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((mut client, _)) = listener.accept().await {
            let to = to.clone();
            connections.spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(&to).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    (port, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_goes_down_answers_unavailable_and_serves_again_when_back() {
    let url = postgres_url().await;
    let target = url
        .split('@')
        .nth(1)
        .and_then(|r| r.split('/').next())
        .expect("host:port")
        .to_string();
    let (port, cut) = forwarder(0, &target).await;
    let through = url.replace(&target, &format!("127.0.0.1:{port}"));
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path()).await;
    let proxy = Proxy::start(&cp.xds, "proxy-kv-down").await;
    let ns = format!("down-{}", std::process::id());
    proxy
        .converge(
            cp.client()
                .apply(&format!(
                    "namespaces: [{{name: {ns}, hosts: [{ns}.local]}}]\n\
                     secrets: [{{name: {ns}/db, credential: {{value: \"{through}\"}}}}]\n\
                     bindings: [{{name: {ns}/kv, postgres: {{secret: db}}, connect_timeout: 1s}}]\n"
                ))
                .await,
        )
        .await;
    let mut kv = grpc(&proxy).await;
    kv.put(put(&ns, write("kept", b"before")))
        .await
        .expect("put while the store is up");
    let get = GetRequest {
        namespace: ns.clone(),
        key: "kept".into(),
    };

    cut.abort();
    let _ = cut.await;
    let status = kv.get(get.clone()).await.expect_err("the store is down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("retry"), "{status:?}");
    assert!(!status.message().contains("postgres://"), "{status:?}");

    let (_, _back) = forwarder(port, &target).await;
    let item = eventually("the store serves again", || {
        let (mut kv, get) = (kv.clone(), get.clone());
        async move { kv.get(get).await.ok() }
    })
    .await
    .into_inner();
    assert_eq!(
        item.value.as_ref(),
        b"before",
        "nothing accepted before is lost"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_calls_obey_the_namespace_rate_limits_and_the_binding_callers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path()).await;
    let proxy = Proxy::start(&cp.xds, "proxy-kv-limits").await;
    let policy = r#"
namespaces:
  - name: demo
    hosts: [demo.local]
    rate_limits: [{requests_per_second: 1, burst: 3}]
  - name: web
    hosts: [web.local]
  - name: other
    hosts: [other.local]
bindings:
  - name: demo/kv
    sqlite: {path: limits.db}
    allow_namespaces: [web]
"#;
    proxy.converge(cp.client().apply(policy).await).await;
    let http = reqwest::Client::new();
    let call = |host: &'static str| {
        http.get(format!("{}/v1/kv/demo/k", proxy.url))
            .header("host", host)
            .send()
    };
    // Callers from `other`, or from no namespace at all, are refused.
    for host in ["other.local", "127.0.0.1"] {
        let refused = call(host).await.expect("answer");
        assert_eq!(refused.status(), 403, "{host}");
        let body: Value = refused.json().await.expect("json");
        assert_eq!(body["error"]["status"], "PERMISSION_DENIED", "{body}");
    }
    // `web` is let in, and so is `demo` itself, until the namespace's
    // bucket is empty.
    let mut statuses = Vec::new();
    for host in ["web.local", "demo.local", "web.local", "demo.local"] {
        statuses.push(call(host).await.expect("answer").status().as_u16());
    }
    assert_eq!(statuses[..3], [404, 404, 404], "allowed: no such key yet");
    assert_eq!(statuses[3], 429, "the burst of 3 is spent");
}

#[test]
fn the_compose_examples_validate_together() {
    let read = |name: &str| {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/examples")
            .join(name);
        prism_proto::parse_policy(&std::fs::read_to_string(&path).expect("example")).expect(name)
    };
    let resources = read("compose.yaml")
        .into_iter()
        .chain(read("compose-data.yaml"));
    let snapshot = prism_proto::Snapshot::from_resources(1, resources);
    assert_eq!(prism_proto::validate_snapshot(&snapshot), Ok(()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_makes_its_data_directory_for_its_sqlite_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path()).await;
    let data_dir = dir.path().join("not/yet/there");
    let proxy = Proxy::start_with(&cp.xds, "proxy-kv-dir", &data_dir).await;
    proxy.converge(cp.client().apply(SQLITE).await).await;
    let mut kv = grpc(&proxy).await;
    kv.put(put("demo", write("k", b"v"))).await.expect("put");
    assert!(data_dir.join("demo-kv.db").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_stream_answers_each_message_in_order_and_ends_at_the_first_failure() {
    let gateway = gateway("proxy-bus-stream", MEMORY).await;
    let proxy = &gateway.proxy;
    let mut client = bus(proxy).await;
    let mut subscription = client
        .subscribe(subscribe("ticks", "counter"))
        .await
        .expect("subscribe")
        .into_inner();
    next(&mut subscription).await;

    let messages: Vec<PublishRequest> = (0..200)
        .map(|i| publish("ticks", i.to_string().as_bytes(), ""))
        .collect();
    let answers: Vec<String> = client
        .publish_stream(futures::stream::iter(messages))
        .await
        .expect("publish stream")
        .into_inner()
        .map(|answer| answer.expect("published").id)
        .collect()
        .await;
    assert_eq!(answers.len(), 200);
    for (i, id) in answers.iter().enumerate() {
        let message = next(&mut subscription).await;
        assert_eq!(
            (&message.id, message.payload.as_ref()),
            (id, i.to_string().as_bytes())
        );
    }

    // An oversize message in the middle: the ones before it are answered,
    // then the stream ends with its status.
    let mut messages: Vec<PublishRequest> = (0..10).map(|_| publish("ticks", b"ok", "")).collect();
    messages[5].payload = vec![0u8; 2048].into();
    let mut answers = client
        .publish_stream(futures::stream::iter(messages))
        .await
        .expect("publish stream")
        .into_inner();
    for _ in 0..5 {
        answers.message().await.expect("answered").expect("an id");
    }
    let status = answers.message().await.expect_err("the oversize message");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
}

/// A request over a new TLS connection to the proxy's TLS listener, naming
/// `server_name` (SNI) and presenting `certificate`, in HTTP/2 (ALPN `h2`)
/// with `http2`, else HTTP/1.1: the status and body, or why it failed.
async fn over_tls(
    http2: bool,
    proxy: &Proxy,
    roots: &rustls::RootCertStore,
    server_name: &str,
    certificate: Option<&Issued>,
    request: hyper::Request<http_body_util::Full<bytes::Bytes>>,
) -> Result<(u16, bytes::Bytes), String> {
    use http_body_util::BodyExt as _;
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots.clone());
    let mut config = match certificate {
        None => builder.with_no_client_auth(),
        Some(issued) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(issued.chain.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .expect("chain"),
                PrivateKeyDer::from_pem_slice(issued.key.as_bytes()).expect("key"),
            )
            .expect("client certificate"),
    };
    config.alpn_protocols = vec![if http2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    let mut request = request;
    if http2 {
        // The host goes in `:authority`, from an absolute URI.
        let host = request.headers_mut().remove("host").expect("a host");
        let uri = format!("https://{}{}", host.to_str().expect("host"), request.uri());
        *request.uri_mut() = uri.parse().expect("uri");
    }
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(proxy.tls_addr.expect("a TLS listener"))
            .await
            .map_err(|e| e.to_string())?;
        let name = ServerName::try_from(server_name.to_string()).expect("server name");
        let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let io = hyper_util::rt::TokioIo::new(tls);
        let response = if http2 {
            let executor = hyper_util::rt::TokioExecutor::new();
            let (mut sender, connection) = hyper::client::conn::http2::handshake(executor, io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(connection);
            sender.send_request(request).await
        } else {
            let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(connection);
            sender.send_request(request).await
        };
        let response = response.map_err(|e| format!("request: {e}"))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), exchange)
        .await
        .expect("an answer or an error in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_are_admitted_by_the_identity_of_their_client_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path()).await;
    let proxy = Proxy::start_tls(&cp.xds, "proxy-kv-mtls").await;
    // `demo` verifies client certificates against the mesh's CA, `other`
    // against its own; demo's KeyValue binding lets in the `web` workloads
    // of the mesh only.
    let (mesh, rogue) = (Authority::new("mesh"), Authority::new("rogue"));
    let server = mesh.server(&["demo.local", "other.local"]);
    let web = mesh.client("spiffe://prism.test/ns/web/sa/api");
    let batch = mesh.client("spiffe://prism.test/ns/batch/sa/job");
    let forged = rogue.client("spiffe://prism.test/ns/web/sa/api");
    let policy = |require: bool| {
        serde_json::json!({
            "namespaces": [
                {"name": "demo", "hosts": ["demo.local"], "tls_secret": "cert",
                 "client_ca_secret": "mesh", "require_client_certificate": require},
                {"name": "other", "hosts": ["other.local"], "tls_secret": "cert",
                 "client_ca_secret": "rogue"},
            ],
            "secrets": [
                {"name": "demo/cert", "tls_certificate":
                    {"certificate_chain": server.chain, "private_key": server.key}},
                {"name": "other/cert", "tls_certificate":
                    {"certificate_chain": server.chain, "private_key": server.key}},
                {"name": "demo/mesh", "ca_bundle": {"certificates": mesh.pem()}},
                {"name": "other/rogue", "ca_bundle": {"certificates": rogue.pem()}},
            ],
            "bindings": [
                {"name": "demo/kv", "sqlite": {"path": "mtls.db"},
                 "allow_namespaces": ["*"],
                 "allow_identities": ["spiffe://prism.test/ns/web/*"]},
            ],
        })
        .to_string()
    };
    proxy
        .converge(cp.client().apply(&policy(false)).await)
        .await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(mesh.issuer.der().clone()).expect("root");
    let put = |value: &'static str, host: &str| {
        hyper::Request::put("/v1/kv/demo/greeting")
            .header("host", host)
            .body(http_body_util::Full::new(bytes::Bytes::from(value)))
            .expect("request")
    };
    let denied = |answer: Result<(u16, bytes::Bytes), String>| {
        let (status, body) = answer.expect("an answer");
        let body: Value = serde_json::from_slice(&body).expect("a JSON error");
        assert_eq!(status, 403, "{body}");
        assert_eq!(body["error"]["status"], "PERMISSION_DENIED", "{body}");
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };

    // The mesh's `web` workload is let in, over HTTP/1.1 and HTTP/2 alike;
    // another identity of the same mesh over neither.
    for http2 in [false, true] {
        let web = over_tls(
            http2,
            &proxy,
            &roots,
            "demo.local",
            Some(&web),
            put("hello", "demo.local"),
        );
        assert_eq!(web.await.expect("an answer").0, 200, "http2: {http2}");
        let batch = over_tls(
            http2,
            &proxy,
            &roots,
            "demo.local",
            Some(&batch),
            put("x", "demo.local"),
        );
        let message = denied(batch.await);
        assert!(
            message.contains("spiffe://prism.test/ns/batch/sa/job"),
            "{message}"
        );
    }
    // A client without a certificate, and one over plain HTTP, are refused
    // too.
    let message = denied(
        over_tls(
            false,
            &proxy,
            &roots,
            "demo.local",
            None,
            put("x", "demo.local"),
        )
        .await,
    );
    assert!(
        message.contains("without a client certificate"),
        "{message}"
    );
    let plain = reqwest::Client::new()
        .put(format!("{}/v1/kv/demo/greeting", proxy.url))
        .header("host", "demo.local")
        .body("x")
        .send()
        .await
        .expect("answer");
    assert_eq!(plain.status(), 403);
    // A certificate from another CA does not verify for demo's hosts...
    let forged_at_demo = over_tls(
        false,
        &proxy,
        &roots,
        "demo.local",
        Some(&forged),
        put("x", "demo.local"),
    )
    .await;
    assert!(forged_at_demo.is_err(), "{forged_at_demo:?}");
    // ...and the CA of `other`, which does verify it, vouches for callers
    // of other's hosts only: through other's handshake to demo's host, it is
    // no identity at all.
    denied(
        over_tls(
            false,
            &proxy,
            &roots,
            "other.local",
            Some(&forged),
            put("x", "demo.local"),
        )
        .await,
    );

    // Required: a client without a certificate no longer gets through the
    // handshake, and the mesh's `web` still does.
    proxy.converge(cp.client().apply(&policy(true)).await).await;
    let anonymous = over_tls(
        false,
        &proxy,
        &roots,
        "demo.local",
        None,
        put("x", "demo.local"),
    )
    .await;
    assert!(anonymous.is_err(), "{anonymous:?}");
    let get = hyper::Request::get("/v1/kv/demo/greeting")
        .header("host", "demo.local")
        .body(http_body_util::Full::default())
        .expect("request");
    let answer = over_tls(false, &proxy, &roots, "demo.local", Some(&web), get).await;
    // Nothing refused was written: the value is the one `web` put.
    assert_eq!(
        answer.expect("an answer"),
        (200, bytes::Bytes::from("hello"))
    );
}
