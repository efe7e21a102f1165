//! The admin API driven through its router, as a client sees it.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tempfile::TempDir;
use tower::ServiceExt;

use super::*;
use crate::fleet::NodeInfo;

struct Harness {
    _dir: TempDir,
    state: AdminState,
    /// An admin token of subject `tester`, sent unless a request has one.
    token: String,
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

const QUICKSTART: &str = r#"
namespaces:
  - name: demo
    hosts: [demo.local]
backends:
  - name: demo/web
    endpoints:
      - address: 127.0.0.1:8081
routes:
  - name: demo/root
    match: { prefix: / }
    backend: web
"#;

/// What the handlers share, over `store`, with nobody connected.
fn state(store: Store) -> AdminState {
    AdminState {
        store,
        fleet: Fleet::default(),
        traffic: crate::traffic::Traffic::new(crate::traffic::DEFAULT_INTERVAL),
        shutdown: tokio::sync::watch::channel(false).1,
    }
}

impl Harness {
    async fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("opens");
        let (record, token) = auth::mint("tester", auth::Role::Admin, Vec::new(), "test");
        store.put_token(&record).await.expect("token stored");
        Self {
            _dir: dir,
            state: state(store),
            token,
        }
    }

    /// Sends `request` with the `tester` token unless it carries a token
    /// (or an empty `Authorization` header, which is then removed).
    async fn send(&self, mut request: Request<Body>) -> Answer {
        let headers = request.headers_mut();
        match headers.get(header::AUTHORIZATION) {
            None => {
                let bearer = format!("Bearer {}", self.token);
                headers.insert(header::AUTHORIZATION, bearer.parse().expect("header"));
            }
            Some(value) if value.is_empty() => {
                headers.remove(header::AUTHORIZATION);
            }
            Some(_) => {}
        }
        let response = router(self.state.clone())
            .oneshot(request)
            .await
            .expect("infallible");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Answer {
            status,
            headers,
            body,
        }
    }

    async fn call(&self, method: Method, uri: &str, body: impl Into<Body>) -> Answer {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .body(body.into())
            .expect("request");
        self.send(request).await
    }

    async fn get(&self, uri: &str) -> Answer {
        self.call(Method::GET, uri, Body::empty()).await
    }

    async fn json(&self, method: Method, uri: &str, body: Value) -> Answer {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .expect("request");
        self.send(request).await
    }

    async fn apply(&self, document: &str, dry_run: bool) -> Answer {
        self.call(
            Method::POST,
            &format!("/v1/apply?dry_run={dry_run}"),
            document.to_string(),
        )
        .await
    }

    fn revision(&self) -> u64 {
        self.state.store.revision()
    }
}

fn error(answer: &Answer) -> &Value {
    &answer.body["error"]
}

fn ns(name: &str) -> Value {
    json!({"name": name, "hosts": [format!("{name}.local")]})
}

fn backend(name: &str, address: &str) -> Value {
    json!({"name": name, "endpoints": [{"address": address}]})
}

fn route(name: &str, prefix: &str, backend: &str) -> Value {
    json!({"name": name, "match": {"prefix": prefix}, "backend": backend})
}

#[tokio::test]
async fn each_kind_can_be_created_read_listed_replaced_and_deleted() {
    let h = Harness::new().await;
    let cases = [
        (
            "namespaces",
            "demo",
            ns("demo"),
            json!({"name": "demo", "hosts": ["other.local"]}),
        ),
        (
            "backends",
            "demo/web",
            backend("demo/web", "127.0.0.1:8081"),
            backend("demo/web", "127.0.0.1:9090"),
        ),
        (
            "routes",
            "demo/root",
            route("demo/root", "/", "web"),
            route("demo/root", "/api", "web"),
        ),
    ];
    for (i, (kind, name, created, replaced)) in cases.iter().enumerate() {
        let base = u64::try_from(i * 2).expect("small");
        let answer = h
            .json(Method::POST, &format!("/v1/{kind}"), created.clone())
            .await;
        assert_eq!(
            answer.status,
            StatusCode::CREATED,
            "{kind}: {}",
            answer.body
        );
        assert_eq!(answer.body["revision"], base + 1);
        assert_eq!(answer.body["resource"]["name"], *name);

        let again = h
            .json(Method::POST, &format!("/v1/{kind}"), created.clone())
            .await;
        assert_eq!(again.status, StatusCode::CONFLICT, "{kind}");
        assert_eq!(error(&again)["code"], "conflict");

        let read = h.get(&format!("/v1/{kind}/{name}")).await;
        assert_eq!(read.status, StatusCode::OK);
        assert_eq!(read.body["name"], *name);
        assert_eq!(
            read.headers[REVISION_HEADER].to_str().expect("ascii"),
            (base + 1).to_string()
        );

        let listed = h.get(&format!("/v1/{kind}")).await;
        assert_eq!(listed.status, StatusCode::OK);
        assert_eq!(listed.body["items"].as_array().map(Vec::len), Some(1));
        assert_eq!(listed.body["revision"], base + 1);

        // The name may be left out of a PUT body: the path gives it.
        let mut body = replaced.clone();
        body["name"] = json!("");
        let put = h
            .json(Method::PUT, &format!("/v1/{kind}/{name}"), body)
            .await;
        assert_eq!(put.status, StatusCode::OK, "{kind}: {}", put.body);
        assert_eq!(put.body["revision"], base + 2);
        assert_eq!(put.body["resource"]["name"], *name);
        assert_eq!(h.get(&format!("/v1/{kind}/{name}")).await.body, *replaced);
    }

    // Deleting in reverse dependency order works, one revision each.
    for (kind, name) in [
        ("routes", "demo/root"),
        ("backends", "demo/web"),
        ("namespaces", "demo"),
    ] {
        let before = h.revision();
        let answer = h
            .call(Method::DELETE, &format!("/v1/{kind}/{name}"), Body::empty())
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{kind}: {}", answer.body);
        assert_eq!(answer.body["revision"], before + 1);
        let gone = h.get(&format!("/v1/{kind}/{name}")).await;
        assert_eq!(gone.status, StatusCode::NOT_FOUND);
        assert_eq!(
            error(&gone)["resource"],
            format!("{} {name}", kind_of(kind))
        );
    }
    let missing = h
        .call(Method::DELETE, "/v1/namespaces/demo", Body::empty())
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(error(&missing)["code"], "not_found");

    let history = h.get("/v1/history?limit=2").await;
    assert_eq!(history.status, StatusCode::OK);
    let items = history.body["items"].as_array().expect("items");
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["actor"], "tester");
    assert_eq!(items[0]["action"], "delete");
    assert_eq!(h.get("/v1/revision").await.body, json!({"revision": 9}));
}

fn kind_of(plural: &str) -> &'static str {
    match plural {
        "namespaces" => "Namespace",
        "backends" => "Backend",
        _ => "Route",
    }
}

#[tokio::test]
async fn put_with_another_name_in_the_body_names_the_field() {
    let h = Harness::new().await;
    let answer = h
        .json(Method::PUT, "/v1/namespaces/demo", ns("other"))
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(error(&answer)["field"], "name");
    assert_eq!(h.revision(), 0);
}

#[tokio::test]
async fn malformed_json_is_a_400_with_serde_s_message() {
    let h = Harness::new().await;
    let request = Request::builder()
        .method(Method::POST)
        .uri("/v1/namespaces")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{\"name\": \"demo\",\n  \"hosts\": [oops]}"))
        .expect("request");
    let answer = h.send(request).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(error(&answer)["code"], "invalid_argument");
    let message = error(&answer)["message"].as_str().expect("message");
    assert!(message.contains("line 2"), "{message}");

    let unknown_field = h
        .json(
            Method::POST,
            "/v1/namespaces",
            json!({"name": "demo", "hostz": []}),
        )
        .await;
    assert_eq!(unknown_field.status, StatusCode::BAD_REQUEST);
    let message = error(&unknown_field)["message"].as_str().expect("message");
    assert!(message.contains("hostz"), "{message}");
}

#[tokio::test]
async fn a_non_json_content_type_is_refused() {
    let h = Harness::new().await;
    let request = Request::builder()
        .method(Method::POST)
        .uri("/v1/namespaces")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from("name=demo"))
        .expect("request");
    let answer = h.send(request).await;
    assert_eq!(answer.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(error(&answer)["code"], "unsupported_media_type");
}

#[tokio::test]
async fn malformed_yaml_and_empty_documents_are_400s() {
    let h = Harness::new().await;
    let answer = h.apply("namespaces: [name: {", false).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.body);
    assert_eq!(error(&answer)["code"], "invalid_argument");
    assert!(
        error(&answer)["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );

    let answer = h.apply("   \n", false).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(error(&answer)["message"], "the document is empty");
    assert_eq!(h.revision(), 0);
}

#[tokio::test]
async fn an_unknown_kind_is_a_404_naming_it() {
    let h = Harness::new().await;
    for uri in ["/v1/widgets", "/v1/widgets/a/b"] {
        let answer = h.get(uri).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{uri}");
        let message = error(&answer)["message"].as_str().expect("message");
        assert!(message.contains("`widgets`"), "{message}");
        assert!(message.contains("backends"), "{message}");
    }
    let nowhere = h.get("/nowhere").await;
    assert_eq!(nowhere.status, StatusCode::NOT_FOUND);
    assert_eq!(error(&nowhere)["code"], "not_found");
}

#[tokio::test]
async fn a_missing_required_field_is_named() {
    let h = Harness::new().await;
    h.json(Method::POST, "/v1/namespaces", ns("demo")).await;
    let answer = h
        .json(Method::POST, "/v1/backends", json!({"name": "demo/web"}))
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(error(&answer)["field"], "endpoints");

    let answer = h
        .json(
            Method::POST,
            "/v1/routes",
            json!({"name": "demo/root", "backend": "web"}),
        )
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(error(&answer)["field"], "match");

    let answer = h
        .apply(
            "backends:\n  - name: demo/web\n    endpoints: [{address: nope}]\n",
            false,
        )
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(error(&answer)["field"], "backends[0].endpoints[0].address");
    assert_eq!(h.revision(), 1);
}

#[tokio::test]
async fn a_dangling_backend_reference_is_refused_and_nothing_changes() {
    let h = Harness::new().await;
    h.json(Method::POST, "/v1/namespaces", ns("demo")).await;
    let answer = h
        .json(Method::POST, "/v1/routes", route("demo/root", "/", "web"))
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(error(&answer)["field"], "backend");
    assert_eq!(error(&answer)["resource"], "Route demo/root");
    assert_eq!(h.revision(), 1);

    // Nor can a backend a route points at be deleted.
    assert_eq!(h.apply(QUICKSTART, false).await.status, StatusCode::OK);
    let revision = h.revision();
    let answer = h
        .call(Method::DELETE, "/v1/backends/demo/web", Body::empty())
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(error(&answer)["field"], "backend");
    assert_eq!(error(&answer)["resource"], "Route demo/root");
    assert_eq!(h.revision(), revision);
    assert_eq!(h.get("/v1/backends/demo/web").await.status, StatusCode::OK);
}

#[tokio::test]
async fn apply_reports_changes_and_dry_run_writes_nothing() {
    let h = Harness::new().await;
    let dry = h.apply(QUICKSTART, true).await;
    assert_eq!(dry.status, StatusCode::OK, "{}", dry.body);
    assert_eq!(dry.body["dry_run"], true);
    assert_eq!(dry.body["revision"], 0);
    assert_eq!(dry.body["unchanged"], false);
    let changes: Vec<(&str, &str, &str)> = dry.body["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|c| {
            (
                c["op"].as_str().unwrap_or_default(),
                c["kind"].as_str().unwrap_or_default(),
                c["name"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        changes,
        [
            ("create", "Namespace", "demo"),
            ("create", "Backend", "demo/web"),
            ("create", "Route", "demo/root"),
        ]
    );
    assert_eq!(h.revision(), 0);
    assert_eq!(
        h.get("/v1/namespaces/demo").await.status,
        StatusCode::NOT_FOUND
    );

    // Each change of a dry run carries its diff: a create is all `+`.
    let diff = dry.body["changes"][0]["diff"].as_str().expect("a diff");
    assert!(
        diff.starts_with("--- Namespace demo @ r0\n+++ Namespace demo @ dry run\n@@ -0,0 +1,")
            && diff.contains("\n+- name: demo\n"),
        "{diff}"
    );

    let applied = h.apply(QUICKSTART, false).await;
    assert_eq!(applied.status, StatusCode::OK);
    assert_eq!(applied.body["revision"], 1);
    assert_eq!(applied.body["dry_run"], false);
    let mut planned = dry.body["changes"].clone();
    for change in planned.as_array_mut().expect("changes") {
        change.as_object_mut().expect("an object").remove("diff");
    }
    assert_eq!(applied.body["changes"], planned);

    // Re-applying is a no-op that does not bump the revision.
    let again = h.apply(QUICKSTART, false).await;
    assert_eq!(again.body["revision"], 1);
    assert_eq!(again.body["unchanged"], true);
    assert_eq!(again.body["changes"], json!([]));

    let changed = QUICKSTART.replace("8081", "8082");
    let dry = h.apply(&changed, true).await;
    assert_eq!(dry.body["changes"][0]["op"], "update");
    assert_eq!(dry.body["changes"][0]["name"], "demo/web");
    let diff = dry.body["changes"][0]["diff"].as_str().expect("a diff");
    assert!(
        diff.contains("\n-  - address: 127.0.0.1:8081\n+  - address: 127.0.0.1:8082\n"),
        "{diff}"
    );
    assert_eq!(h.revision(), 1);

    // The change log records who applied what.
    let history = h.get("/v1/history").await;
    assert_eq!(history.body["items"][0]["action"], "apply");
    assert_eq!(history.body["items"][0]["actor"], "tester");
}

#[tokio::test]
async fn apply_is_all_or_nothing() {
    let h = Harness::new().await;
    // The namespace and backend are fine; the route points nowhere.
    let document = QUICKSTART.replace("backend: web", "backend: missing");
    let answer = h.apply(&document, false).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(error(&answer)["field"], "backend");
    assert_eq!(h.revision(), 0);
    assert_eq!(h.get("/v1/namespaces").await.body["items"], json!([]));
    assert_eq!(h.get("/v1/backends").await.body["items"], json!([]));
}

#[tokio::test]
async fn bodies_over_the_limit_are_413_in_the_error_shape() {
    let h = Harness::new().await;
    let big = "#".repeat(MAX_BODY_BYTES + 1);
    let answer = h.apply(&big, false).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error(&answer)["code"], "payload_too_large");
}

#[tokio::test]
async fn proxies_and_health_are_served() {
    let h = Harness::new().await;
    h.apply(QUICKSTART, false).await;
    h.state.fleet.connected(NodeInfo {
        id: "proxy-1".into(),
        zone: "eu-west-1a".into(),
        region: "eu-west-1".into(),
        address: "10.0.0.1:8080".into(),
    });
    h.state.fleet.batch_acked("proxy-1", 1);
    let answer = h.get("/v1/proxies").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body["revision"], 1);
    assert_eq!(answer.body["proxies"][0]["id"], "proxy-1");
    assert_eq!(answer.body["proxies"][0]["lag"], 0);

    let health = h.get("/healthz").await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.body, Value::String("ok".into()));
}

#[tokio::test]
async fn the_author_of_a_write_is_its_token_s_subject() {
    let h = Harness::new().await;
    h.json(Method::POST, "/v1/namespaces", ns("demo")).await;
    let history = h.state.store.history(1, |_| true).expect("history");
    assert_eq!(history[0].actor, "tester");
    assert_eq!(history[0].action, "create");
}

const CERT: &str = include_str!("../../../tests/support/tls/server.pem");
const KEY: &str = include_str!("../../../tests/support/tls/server.key");

fn tls_secret(name: &str) -> Value {
    json!({"name": name, "tls_certificate": {"certificate_chain": CERT, "private_key": KEY}})
}

/// Fails when `text` holds any of the PEM material of the test secret.
fn assert_redacted(what: &str, text: &str) {
    assert!(
        !text.contains("BEGIN") && !text.contains(&KEY[40..80]) && !text.contains(&CERT[40..80]),
        "{what} shows key material: {text}"
    );
}

#[tokio::test]
async fn secrets_are_served_redacted_everywhere() {
    let h = Harness::new().await;
    assert_eq!(h.apply(QUICKSTART, false).await.status, StatusCode::OK);

    let created = h
        .json(Method::POST, "/v1/secrets", tls_secret("demo/tls"))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    assert_redacted("create", &created.body.to_string());
    assert_eq!(created.body["resource"]["kind"], "tls_certificate");
    assert_eq!(
        created.body["resource"]["subject_alt_names"],
        json!(["shop.test", "*.shop.test"])
    );

    let read = h.get("/v1/secrets/demo/tls").await;
    assert_eq!(read.status, StatusCode::OK);
    assert_redacted("read", &read.body.to_string());
    assert_eq!(
        read.body,
        json!({
            "name": "demo/tls",
            "kind": "tls_certificate",
            "subject": "CN=shop.test",
            "subject_alt_names": ["shop.test", "*.shop.test"],
            "not_after": "2126-11-03T14:52:27Z",
            "certificates": 1,
        })
    );
    let listed = h.get("/v1/secrets").await;
    assert_eq!(listed.body["items"][0], read.body);
    assert_redacted("list", &listed.body.to_string());

    let mut body = tls_secret("demo/tls");
    body["name"] = json!("");
    let put = h.json(Method::PUT, "/v1/secrets/demo/tls", body).await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.body);
    assert_redacted("replace", &put.body.to_string());

    // A document with a secret: the dry run and the change log name it only.
    let indent = |pem: &str| pem.trim_end().replace('\n', "\n          ");
    let document = format!(
        "secrets:\n  - name: demo/other\n    tls_certificate:\n      certificate_chain: |\n          {}\n      private_key: |\n          {}\n",
        indent(CERT),
        indent(KEY)
    );
    let dry = h.apply(&document, true).await;
    assert_eq!(dry.status, StatusCode::OK, "{}", dry.body);
    assert_eq!(dry.body["changes"][0]["kind"], "Secret");
    assert_redacted("dry run", &dry.body.to_string());
    let applied = h.apply(&document, false).await;
    assert_eq!(applied.status, StatusCode::OK, "{}", applied.body);
    assert_redacted("apply", &applied.body.to_string());
    let history = h.get("/v1/history").await.body.to_string();
    assert_redacted("history", &history);
    // The before-images the change log keeps are never served.
    assert!(!history.contains("previous"), "{history}");

    // A bad secret is refused without quoting it.
    let bad = h
        .json(
            Method::POST,
            "/v1/secrets",
            json!({"name": "demo/bad", "tls_certificate": {"certificate_chain": CERT, "private_key": CERT}}),
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(error(&bad)["field"], "tls_certificate.private_key");
    assert_redacted("error", &bad.body.to_string());
}

#[tokio::test]
async fn a_referenced_secret_cannot_be_deleted() {
    let h = Harness::new().await;
    h.apply(QUICKSTART, false).await;
    h.json(Method::POST, "/v1/secrets", tls_secret("demo/tls"))
        .await;
    let answer = h
        .json(
            Method::PUT,
            "/v1/namespaces/demo",
            json!({"name": "demo", "hosts": ["demo.local"], "tls_secret": "tls"}),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);

    let revision = h.revision();
    let refused = h
        .call(Method::DELETE, "/v1/secrets/demo/tls", Body::empty())
        .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{}", refused.body);
    assert_eq!(error(&refused)["field"], "tls_secret");
    assert_eq!(error(&refused)["resource"], "Namespace demo");
    assert_eq!(h.revision(), revision);

    // A namespace cannot point at a secret that is not there either.
    let dangling = h
        .json(
            Method::PUT,
            "/v1/namespaces/demo",
            json!({"name": "demo", "hosts": ["demo.local"], "tls_secret": "nope"}),
        )
        .await;
    assert_eq!(dangling.status, StatusCode::BAD_REQUEST);
    assert_eq!(error(&dangling)["field"], "tls_secret");

    // Once nothing refers to it, it goes.
    h.json(Method::PUT, "/v1/namespaces/demo", ns("demo")).await;
    let deleted = h
        .call(Method::DELETE, "/v1/secrets/demo/tls", Body::empty())
        .await;
    assert_eq!(deleted.status, StatusCode::OK, "{}", deleted.body);
}

impl Harness {
    /// `method` on `uri` with header `If-Match: if_match` and a JSON or
    /// YAML body.
    async fn if_match(&self, method: Method, uri: &str, if_match: &str, body: String) -> Answer {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::IF_MATCH, if_match)
            .body(Body::from(body))
            .expect("request");
        self.send(request).await
    }
}

fn etag(answer: &Answer) -> String {
    answer.headers[header::ETAG]
        .to_str()
        .expect("an ETag")
        .to_string()
}

#[tokio::test]
async fn a_write_with_a_stale_if_match_is_412_and_changes_nothing() {
    let h = Harness::new().await;
    h.apply(QUICKSTART, false).await;
    let uri = "/v1/backends/demo/web";
    let read = h.get(uri).await;
    let first = etag(&read);
    assert!(first.starts_with('"') && first.ends_with('"'), "{first}");

    // A write based on the version read applies, and answers the new tag.
    let moved = backend("demo/web", "127.0.0.1:9001").to_string();
    let put = h.if_match(Method::PUT, uri, &first, moved).await;
    assert_eq!(put.status, StatusCode::OK, "{:?}", put.body);
    let second = etag(&put);
    assert_ne!(second, first);
    assert_eq!(etag(&h.get(uri).await), second);

    // A second writer still holding the first tag loses, and learns why.
    let revision = h.revision();
    let late = backend("demo/web", "127.0.0.1:9002").to_string();
    let stale = h.if_match(Method::PUT, uri, &first, late).await;
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(error(&stale)["code"], "failed_precondition");
    assert_eq!(etag(&stale), second, "the current tag comes back");
    let deleted = h.if_match(Method::DELETE, uri, &first, String::new()).await;
    assert_eq!(deleted.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(h.revision(), revision, "nothing was written");
    assert_eq!(
        h.get(uri).await.body["endpoints"][0]["address"],
        "127.0.0.1:9001"
    );

    // `*` needs the resource to exist; a list matches any of its tags; a
    // weak tag matches nothing; a malformed header is a 400 naming it.
    let absent = h
        .if_match(
            Method::PUT,
            "/v1/backends/demo/new",
            "*",
            backend("demo/new", "127.0.0.1:1").to_string(),
        )
        .await;
    assert_eq!(absent.status, StatusCode::PRECONDITION_FAILED);
    let listed = h
        .if_match(
            Method::PUT,
            uri,
            &format!("{first}, {second}"),
            backend("demo/web", "127.0.0.1:9003").to_string(),
        )
        .await;
    assert_eq!(listed.status, StatusCode::OK, "{:?}", listed.body);
    let weak = h
        .if_match(
            Method::DELETE,
            uri,
            &format!("W/{}", etag(&listed)),
            String::new(),
        )
        .await;
    assert_eq!(weak.status, StatusCode::PRECONDITION_FAILED);
    let garbled = h.if_match(Method::DELETE, uri, "r7", String::new()).await;
    assert_eq!(garbled.status, StatusCode::BAD_REQUEST);
    assert_eq!(error(&garbled)["field"], "If-Match");
    let gone = h
        .if_match(Method::DELETE, "/v1/routes/demo/root", "*", String::new())
        .await;
    assert_eq!(gone.status, StatusCode::OK, "{:?}", gone.body);
}

#[tokio::test]
async fn apply_with_if_match_needs_the_policy_at_that_revision() {
    let h = Harness::new().await;
    let first = h.apply(QUICKSTART, false).await;
    let tag = etag(&first);
    assert_eq!(tag, format!("\"r{}\"", h.revision()));
    assert_eq!(etag(&h.get("/v1/revision").await), tag);
    assert_eq!(etag(&h.get("/v1/routes").await), tag);

    // Someone else writes in between: the apply (and its dry run) based on
    // the old revision is refused, naming where the policy is now.
    h.json(Method::PUT, "/v1/namespaces/other", ns("other"))
        .await;
    let now = h.revision();
    let document = QUICKSTART.replace("127.0.0.1:8081", "127.0.0.1:8082");
    for dry_run in [true, false] {
        let uri = format!("/v1/apply?dry_run={dry_run}");
        let refused = h.if_match(Method::POST, &uri, &tag, document.clone()).await;
        assert_eq!(
            refused.status,
            StatusCode::PRECONDITION_FAILED,
            "dry run: {dry_run}"
        );
        let message = error(&refused)["message"].as_str().unwrap_or_default();
        assert!(message.contains(&format!("revision {now}")), "{message}");
        assert_eq!(etag(&refused), format!("\"r{now}\""));
    }
    assert_eq!(h.revision(), now, "nothing was written");
    // With the current tag, or `*`, it applies.
    let current = format!("\"r{now}\"");
    let applied = h
        .if_match(Method::POST, "/v1/apply", &current, document.clone())
        .await;
    assert_eq!(applied.status, StatusCode::OK, "{:?}", applied.body);
    assert_eq!(etag(&applied), format!("\"r{}\"", now + 1));
    let any = h
        .if_match(Method::POST, "/v1/apply", "*", QUICKSTART.to_string())
        .await;
    assert_eq!(any.status, StatusCode::OK, "{:?}", any.body);
}

#[tokio::test]
async fn history_is_filtered_by_namespace_and_author() {
    let h = Harness::new().await;
    let ops = h.token("ops", "editor", &[]).await;
    h.apply(QUICKSTART, false).await; // tester: demo
    h.as_token(&ops, Method::POST, "/v1/namespaces", ns("demos"))
        .await; // ops: demos
    h.as_token(
        &ops,
        Method::POST,
        "/v1/backends",
        backend("demos/api", "127.0.0.1:1"),
    )
    .await; // ops: demos
    let h = &h;
    let revisions = |uri: &'static str| async move {
        let answer = h.get(uri).await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        answer.body["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|item| item["revision"].as_str().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(revisions("/v1/history").await, ["3", "2", "1"]);
    // `demo` is not a prefix match of `demos`.
    assert_eq!(revisions("/v1/history?namespace=demo").await, ["1"]);
    assert_eq!(revisions("/v1/history?namespace=demos").await, ["3", "2"]);
    assert_eq!(revisions("/v1/history?author=ops").await, ["3", "2"]);
    assert_eq!(
        revisions("/v1/history?author=ops&namespace=demos&limit=1").await,
        ["3"]
    );
    assert!(revisions("/v1/history?author=nobody").await.is_empty());
}

/// The `(op, kind, name)` of each change in an answer.
fn summary(answer: &Answer) -> Vec<(String, String, String)> {
    answer.body["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|c| {
            let text = |k: &str| c[k].as_str().unwrap_or_default().to_string();
            (text("op"), text("kind"), text("name"))
        })
        .collect()
}

fn triple(op: &str, kind: &str, name: &str) -> (String, String, String) {
    (op.into(), kind.into(), name.into())
}

#[tokio::test]
async fn diff_shows_each_changed_resource_as_a_unified_diff() {
    let h = Harness::new().await;
    h.apply(QUICKSTART, false).await; // 1
    h.apply(&QUICKSTART.replace("8081", "8082"), false).await; // 2
    h.json(Method::PUT, "/v1/namespaces/other", ns("other"))
        .await; // 3

    let answer = h.get("/v1/diff?from=1&to=2").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(answer.body["from"], 1);
    assert_eq!(answer.body["to"], 2);
    assert_eq!(summary(&answer), [triple("update", "Backend", "demo/web")]);
    assert_eq!(
        answer.body["changes"][0]["diff"],
        "--- Backend demo/web @ r1\n+++ Backend demo/web @ r2\n@@ -1,4 +1,4 @@\n backends:\n \
         - name: demo/web\n   endpoints:\n-  - address: 127.0.0.1:8081\n+  - address: 127.0.0.1:8082\n"
    );

    // Backwards is the same diff the other way round.
    let back = h.get("/v1/diff?from=2&to=1").await;
    let diff = back.body["changes"][0]["diff"].as_str().unwrap_or_default();
    assert!(
        diff.contains("-  - address: 127.0.0.1:8082\n+  - address: 127.0.0.1:8081\n"),
        "{diff}"
    );

    // `to` is the current revision by default; from 0, everything is new.
    let all = h.get("/v1/diff?from=0").await;
    assert_eq!(all.status, StatusCode::OK, "{}", all.body);
    assert_eq!(all.body["to"], 3);
    assert_eq!(
        summary(&all),
        [
            triple("create", "Namespace", "demo"),
            triple("create", "Namespace", "other"),
            triple("create", "Backend", "demo/web"),
            triple("create", "Route", "demo/root"),
        ]
    );
    let same = h.get("/v1/diff?from=3&to=3").await;
    assert_eq!(same.status, StatusCode::OK);
    assert_eq!(same.body["changes"], json!([]));
}

#[tokio::test]
async fn diff_and_rollback_errors_name_the_parameter() {
    let h = Harness::new().await;
    h.apply(QUICKSTART, false).await;
    h.apply(&QUICKSTART.replace("8081", "8082"), false).await;
    let post = |uri: &'static str| h.call(Method::POST, uri, Body::empty());
    for (answer, status, field) in [
        (h.get("/v1/diff").await, StatusCode::BAD_REQUEST, "from"),
        (
            h.get("/v1/diff?to=1").await,
            StatusCode::BAD_REQUEST,
            "from",
        ),
        (
            h.get("/v1/diff?from=one").await,
            StatusCode::BAD_REQUEST,
            "from",
        ),
        (
            h.get("/v1/diff?from=1&to=-2").await,
            StatusCode::BAD_REQUEST,
            "to",
        ),
        (
            h.get("/v1/diff?from=3").await,
            StatusCode::NOT_FOUND,
            "from",
        ),
        (
            h.get("/v1/diff?from=1&to=9").await,
            StatusCode::NOT_FOUND,
            "to",
        ),
        (post("/v1/rollback").await, StatusCode::BAD_REQUEST, "to"),
        (
            post("/v1/rollback?to=r1").await,
            StatusCode::BAD_REQUEST,
            "to",
        ),
        (post("/v1/rollback?to=3").await, StatusCode::NOT_FOUND, "to"),
    ] {
        assert_eq!(answer.status, status, "{}", answer.body);
        assert_eq!(error(&answer)["field"], field, "{}", answer.body);
    }
    assert_eq!(
        error(&h.get("/v1/diff?from=one").await)["message"],
        "`one` is not a revision number such as 7"
    );
    let newest = h.get("/v1/diff?from=1&to=9").await;
    assert_eq!(
        error(&newest)["message"],
        "revision 9 does not exist: the newest is 2"
    );
    assert_eq!(h.revision(), 2, "nothing was written");

    // Revision 1 as an older Prism wrote it, without content: revision 0
    // cannot be rebuilt; 1 and later still can.
    h.state.store.forget_content(1);
    for answer in [
        h.get("/v1/diff?from=0&to=2").await,
        h.get("/v1/diff?from=2&to=0").await,
        post("/v1/rollback?to=0").await,
        post("/v1/rollback?to=0&dry_run=true").await,
    ] {
        assert_eq!(
            answer.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{}",
            answer.body
        );
        assert_eq!(error(&answer)["code"], "revision_unavailable");
        assert_eq!(
            error(&answer)["message"],
            "revision 0 predates recorded content; diff and rollback reach back to revision 1"
        );
    }
    assert_eq!(error(&h.get("/v1/diff?from=2&to=0").await)["field"], "to");
    assert_eq!(h.get("/v1/diff?from=1").await.status, StatusCode::OK);
    assert_eq!(h.revision(), 2, "nothing was written");
}

#[tokio::test]
async fn rollback_commits_a_revision_equal_to_the_one_named() {
    let h = Harness::new().await;
    h.apply(QUICKSTART, false).await; // 1
    let moved = QUICKSTART.replace("8081", "8082")
        + "  - name: demo/api\n    match: { prefix: /api }\n    backend: web\n";
    h.apply(&moved, false).await; // 2
    let listing = |h: &Harness| {
        let snapshot = h.state.store.snapshot();
        snapshot
            .iter()
            .map(|entry| resource_view(&entry.resource))
            .collect::<Vec<_>>()
    };
    let first = h.state.store.policy_at(1).expect("revision 1");
    let first: Vec<Value> = first.iter().map(|e| resource_view(&e.resource)).collect();

    let dry = h
        .call(
            Method::POST,
            "/v1/rollback?to=1&dry_run=true",
            Body::empty(),
        )
        .await;
    assert_eq!(dry.status, StatusCode::OK, "{}", dry.body);
    assert_eq!(dry.body["dry_run"], true);
    assert_eq!(dry.body["revision"], 2);
    assert_eq!(dry.body["unchanged"], false);
    assert_eq!(
        summary(&dry),
        [
            triple("update", "Backend", "demo/web"),
            triple("delete", "Route", "demo/api"),
        ]
    );
    let diff = dry.body["changes"][0]["diff"].as_str().unwrap_or_default();
    assert!(
        diff.starts_with("--- Backend demo/web @ r2\n+++ Backend demo/web @ r1\n")
            && diff.contains("-  - address: 127.0.0.1:8082\n+  - address: 127.0.0.1:8081\n"),
        "{diff}"
    );
    assert_eq!(h.revision(), 2, "a dry run writes nothing");
    assert_eq!(etag(&dry), "\"r2\"");

    let done = h
        .call(Method::POST, "/v1/rollback?to=1", Body::empty())
        .await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);
    assert_eq!(done.body["revision"], 3);
    assert_eq!(done.body["dry_run"], false);
    assert_eq!(done.body["changes"], dry.body["changes"]);
    assert_eq!(etag(&done), "\"r3\"");
    assert_eq!(listing(&h), first, "the policy is revision 1's again");
    let history = h.get("/v1/history?limit=1").await;
    assert_eq!(history.body["items"][0]["action"], "rollback");
    assert_eq!(history.body["items"][0]["actor"], "tester");
    // Nothing changed between revision 1 and the rollback.
    let diff = h.get("/v1/diff?from=1&to=3").await;
    assert_eq!(diff.body["changes"], json!([]));

    // Rolling back to the policy there is, is "unchanged".
    for to in ["1", "3"] {
        let again = h
            .call(
                Method::POST,
                &format!("/v1/rollback?to={to}"),
                Body::empty(),
            )
            .await;
        assert_eq!(again.status, StatusCode::OK, "{}", again.body);
        assert_eq!(again.body["unchanged"], true);
        assert_eq!(again.body["revision"], 3);
        assert_eq!(again.body["changes"], json!([]));
    }
    assert_eq!(h.revision(), 3);
}

#[tokio::test]
async fn rollback_honours_if_match_on_the_policy() {
    let h = Harness::new().await;
    h.apply(QUICKSTART, false).await;
    h.apply(&QUICKSTART.replace("8081", "8082"), false).await;
    for dry_run in [true, false] {
        let uri = format!("/v1/rollback?to=1&dry_run={dry_run}");
        let stale = h
            .if_match(Method::POST, &uri, "\"r1\"", String::new())
            .await;
        assert_eq!(
            stale.status,
            StatusCode::PRECONDITION_FAILED,
            "{}",
            stale.body
        );
        assert_eq!(error(&stale)["code"], "failed_precondition");
        assert_eq!(etag(&stale), "\"r2\"");
    }
    let garbled = h
        .if_match(Method::POST, "/v1/rollback?to=1", "r2", String::new())
        .await;
    assert_eq!(garbled.status, StatusCode::BAD_REQUEST);
    assert_eq!(error(&garbled)["field"], "If-Match");
    assert_eq!(h.revision(), 2, "nothing was written");

    let current = h
        .if_match(Method::POST, "/v1/rollback?to=1", "\"r2\"", String::new())
        .await;
    assert_eq!(current.status, StatusCode::OK, "{}", current.body);
    assert_eq!(current.body["revision"], 3);
    assert_eq!(
        h.get("/v1/backends/demo/web").await.body["endpoints"][0]["address"],
        "127.0.0.1:8081"
    );
}

#[tokio::test]
async fn rollback_to_a_policy_todays_rules_refuse_writes_nothing() {
    let h = Harness::new().await;
    h.apply(QUICKSTART, false).await;
    h.apply(&QUICKSTART.replace("8081", "8082"), false).await;
    // Revision 1's backend as a Prism with looser rules stored it.
    let loose = Resource::Backend(Backend {
        name: "demo/web".into(),
        endpoints: vec![prism_proto::Endpoint {
            address: "not an address".into(),
            ..Default::default()
        }],
        ..Default::default()
    });
    h.state.store.rewrite_changelog(2, |record| {
        record.changes[0].previous = Some(loose.encode_to_vec());
    });
    for dry_run in [true, false] {
        let answer = h
            .call(
                Method::POST,
                &format!("/v1/rollback?to=1&dry_run={dry_run}"),
                Body::empty(),
            )
            .await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.body);
        assert_eq!(error(&answer)["field"], "endpoints[0].address");
        assert_eq!(error(&answer)["resource"], "Backend demo/web");
    }
    assert_eq!(h.revision(), 2, "nothing was written");
}

#[tokio::test]
async fn diffs_and_rollbacks_never_show_key_material() {
    let h = Harness::new().await;
    h.apply(QUICKSTART, false).await; // 1
    let created = h
        .json(Method::POST, "/v1/secrets", tls_secret("demo/tls"))
        .await; // 2
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    // The same certificate with another key: nothing the view shows changes.
    let mut rekeyed = tls_secret("demo/tls");
    let other_key = KEY.replace("LBXxiY89", "LBXxiY8Z");
    assert_ne!(other_key, KEY);
    rekeyed["tls_certificate"]["private_key"] = json!(other_key);
    let put = h.json(Method::PUT, "/v1/secrets/demo/tls", rekeyed).await; // 3
    assert_eq!(put.status, StatusCode::OK, "{}", put.body);
    let deleted = h
        .call(Method::DELETE, "/v1/secrets/demo/tls", Body::empty())
        .await; // 4
    assert_eq!(deleted.status, StatusCode::OK, "{}", deleted.body);
    assert_eq!(h.revision(), 4);

    let mut shown = Vec::new();
    for uri in [
        "/v1/diff?from=1&to=2",
        "/v1/diff?from=2&to=3",
        "/v1/diff?from=3&to=4",
    ] {
        let answer = h.get(uri).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        assert_eq!(summary(&answer)[0].1, "Secret", "{}", answer.body);
        shown.push(answer);
    }
    let created = shown[0].body["changes"][0]["diff"]
        .as_str()
        .unwrap_or_default();
    assert!(created.contains("+  subject: CN=shop.test"), "{created}");
    let rekeyed = shown[1].body["changes"][0]["diff"]
        .as_str()
        .unwrap_or_default();
    assert!(rekeyed.ends_with(crate::diff::HIDDEN_CHANGE), "{rekeyed}");
    for uri in ["/v1/rollback?to=3&dry_run=true", "/v1/rollback?to=2"] {
        let answer = h.call(Method::POST, uri, Body::empty()).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        assert_eq!(summary(&answer)[0], triple("create", "Secret", "demo/tls"));
        shown.push(answer);
    }
    for answer in &shown {
        assert_redacted("a diff", &answer.body.to_string());
        assert!(
            !answer.body.to_string().contains(&other_key[40..80]),
            "{}",
            answer.body
        );
    }
    // The rollback brought the key back, which only discovery ever serves.
    let snapshot = h.state.store.snapshot();
    let key = ResourceKey::new(Kind::Secret, "demo/tls");
    let Some(Resource::Secret(secret)) = snapshot.get(&key).map(|e| &e.resource) else {
        panic!("the secret is back");
    };
    let Some(prism_proto::pb::config::v1::secret::Kind::TlsCertificate(tls)) = &secret.kind else {
        panic!("a certificate");
    };
    assert_eq!(tls.private_key, KEY);
}

impl Harness {
    /// A new token made through the API by the `tester` admin.
    async fn token(&self, subject: &str, role: &str, namespaces: &[&str]) -> String {
        let answer = self
            .json(
                Method::POST,
                "/v1/tokens",
                json!({"subject": subject, "role": role, "namespaces": namespaces}),
            )
            .await;
        assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
        answer.body["token"]
            .as_str()
            .expect("the token")
            .to_string()
    }

    /// `method` on `uri` with `token` (none when empty) and a JSON body
    /// unless it is null.
    async fn as_token(&self, token: &str, method: Method, uri: &str, body: Value) -> Answer {
        let authorization = if token.is_empty() {
            String::new()
        } else {
            format!("Bearer {token}")
        };
        let body = if body.is_null() {
            Body::empty()
        } else {
            Body::from(body.to_string())
        };
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, authorization)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .expect("request");
        self.send(request).await
    }
}

#[tokio::test]
async fn no_token_or_a_bad_one_is_401_and_health_needs_none() {
    let h = Harness::new().await;
    let viewer = h.token("watcher", "viewer", &[]).await;
    let id = viewer.split('_').nth(1).expect("an id").to_string();
    let forged = format!("prism_{id}_{}", "0".repeat(64));
    for token in ["", "nonsense", "prism_nope_nope", forged.as_str()] {
        let answer = h
            .as_token(token, Method::GET, "/v1/revision", Value::Null)
            .await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "token {token:?}");
        assert_eq!(error(&answer)["code"], "unauthenticated");
        assert_eq!(
            answer.headers[header::WWW_AUTHENTICATE],
            "Bearer realm=\"prism\""
        );
    }
    let ok = h
        .as_token(&viewer, Method::GET, "/v1/revision", Value::Null)
        .await;
    assert_eq!(ok.status, StatusCode::OK);
    let health = h.as_token("", Method::GET, "/healthz", Value::Null).await;
    assert_eq!(health.status, StatusCode::OK);

    // Revoked: refused from the next request on.
    let revoked = h
        .call(Method::DELETE, &format!("/v1/tokens/{id}"), Body::empty())
        .await;
    assert_eq!(revoked.status, StatusCode::OK, "{}", revoked.body);
    let after = h
        .as_token(&viewer, Method::GET, "/v1/revision", Value::Null)
        .await;
    assert_eq!(after.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_viewer_reads_but_cannot_write() {
    let h = Harness::new().await;
    h.apply(QUICKSTART, false).await;
    let viewer = h.token("watcher", "viewer", &[]).await;
    let read = h
        .as_token(&viewer, Method::GET, "/v1/routes/demo/root", Value::Null)
        .await;
    assert_eq!(read.status, StatusCode::OK);
    for (method, uri, body) in [
        (Method::POST, "/v1/namespaces", ns("other")),
        (Method::PUT, "/v1/namespaces/demo", ns("demo")),
        (Method::DELETE, "/v1/routes/demo/root", Value::Null),
        (Method::POST, "/v1/apply", Value::Null),
        (Method::GET, "/v1/tokens", Value::Null),
    ] {
        let answer = h.as_token(&viewer, method.clone(), uri, body).await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN, "{method} {uri}");
        assert_eq!(error(&answer)["code"], "permission_denied");
    }
    assert_eq!(h.revision(), 1, "nothing was written");
}

#[tokio::test]
async fn an_editor_of_one_namespace_touches_only_that_one() {
    let h = Harness::new().await;
    h.apply(QUICKSTART, false).await;
    h.json(Method::POST, "/v1/namespaces", ns("other")).await;
    let editor = h.token("dev", "editor", &["demo"]).await;

    let own = h
        .as_token(
            &editor,
            Method::POST,
            "/v1/backends",
            backend("demo/api", "127.0.0.1:1"),
        )
        .await;
    assert_eq!(own.status, StatusCode::CREATED, "{}", own.body);
    let before = h.revision();
    for (method, uri, body) in [
        (
            Method::POST,
            "/v1/backends",
            backend("other/api", "127.0.0.1:1"),
        ),
        (Method::PUT, "/v1/namespaces/other", ns("other")),
        (Method::DELETE, "/v1/namespaces/other", Value::Null),
        (Method::GET, "/v1/namespaces/other", Value::Null),
    ] {
        let answer = h.as_token(&editor, method.clone(), uri, body).await;
        assert_eq!(
            answer.status,
            StatusCode::FORBIDDEN,
            "{method} {uri}: {}",
            answer.body
        );
        assert!(
            error(&answer)["message"]
                .as_str()
                .is_some_and(|m| m.contains("`other`")),
            "{}",
            answer.body
        );
    }
    // A document that touches another namespace is refused whole.
    let document = "namespaces:\n  - name: demo\n    hosts: [demo.local, www.demo.local]\n  - name: other\n    hosts: [o.local]\n";
    let request = Request::builder()
        .method(Method::POST)
        .uri("/v1/apply")
        .header(header::AUTHORIZATION, format!("Bearer {editor}"))
        .body(Body::from(document))
        .expect("request");
    let applied = h.send(request).await;
    assert_eq!(applied.status, StatusCode::FORBIDDEN, "{}", applied.body);
    assert_eq!(h.revision(), before, "nothing was written");

    // It sees only its namespace, in lists and in the history.
    let list = h
        .as_token(&editor, Method::GET, "/v1/namespaces", Value::Null)
        .await;
    let names: Vec<&str> = list.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|item| item["name"].as_str())
        .collect();
    assert_eq!(names, ["demo"]);
    let history = h
        .as_token(&editor, Method::GET, "/v1/history", Value::Null)
        .await;
    for item in history.body["items"].as_array().expect("items") {
        for change in item["changes"].as_array().expect("changes") {
            let name = change["name"].as_str().unwrap_or_default();
            assert!(name == "demo" || name.starts_with("demo/"), "{name}");
        }
    }
    assert_eq!(history.body["items"][0]["actor"], "dev");
}

#[tokio::test]
async fn only_admins_manage_tokens_and_the_last_admin_stays() {
    let h = Harness::new().await;
    let editor = h.token("dev", "editor", &[]).await;
    let refused = h
        .as_token(
            &editor,
            Method::POST,
            "/v1/tokens",
            json!({"subject": "me", "role": "admin"}),
        )
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);

    for (body, field) in [
        (json!({"subject": "x", "role": "root"}), "role"),
        (json!({"subject": " ", "role": "viewer"}), "subject"),
        (
            json!({"subject": "x", "role": "viewer", "namespaces": ["a/b"]}),
            "namespaces[0]",
        ),
    ] {
        let answer = h.json(Method::POST, "/v1/tokens", body).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST);
        assert_eq!(error(&answer)["field"], field, "{}", answer.body);
    }
    let unknown = h
        .json(
            Method::POST,
            "/v1/tokens",
            json!({"subject": "x", "role": "viewer", "scope": "all"}),
        )
        .await;
    assert_eq!(unknown.status, StatusCode::BAD_REQUEST);
    assert!(
        unknown.body.to_string().contains("scope"),
        "{}",
        unknown.body
    );

    // The list shows who holds what, and no secret.
    let list = h.get("/v1/tokens").await;
    let text = list.body.to_string();
    assert!(
        text.contains("\"dev\"") && text.contains("\"tester\""),
        "{text}"
    );
    assert!(!text.contains(&editor[editor.len() - 64..]), "{text}");
    assert!(!text.contains("digest"), "{text}");

    let tester = list.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|t| t["subject"] == "tester")
        .expect("tester's token");
    let id = tester["id"].as_str().expect("id");
    let last = h
        .call(Method::DELETE, &format!("/v1/tokens/{id}"), Body::empty())
        .await;
    assert_eq!(last.status, StatusCode::CONFLICT, "{}", last.body);
    let missing = h
        .call(Method::DELETE, "/v1/tokens/feedface", Body::empty())
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_first_admin_token_is_written_once_for_its_owner_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("opens");
    let path = auth::bootstrap(&store, dir.path())
        .await
        .expect("bootstrap")
        .expect("a token file");
    let token = std::fs::read_to_string(&path).expect("readable");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path)
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let h = Harness {
        _dir: dir,
        state: state(store),
        token: token.trim().to_string(),
    };
    let tokens = h.get("/v1/tokens").await;
    assert_eq!(tokens.status, StatusCode::OK, "{}", tokens.body);
    assert_eq!(tokens.body["items"][0]["role"], "admin");
    // A store with a token gets no second one.
    let again = auth::bootstrap(&h.state.store, h._dir.path())
        .await
        .expect("bootstrap");
    assert_eq!(again, None);
}

#[tokio::test]
async fn cross_origin_requests_are_refused_and_same_origin_ones_served() {
    let h = Harness::new().await;
    let with = |headers: &[(&str, &str)], method: Method| {
        let mut request = Request::builder().method(method).uri("/v1/revision");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(Body::empty()).expect("request")
    };
    let same = h
        .send(with(
            &[
                ("host", "127.0.0.1:9000"),
                ("origin", "http://127.0.0.1:9000"),
            ],
            Method::GET,
        ))
        .await;
    assert_eq!(same.status, StatusCode::OK, "{}", same.body);
    assert_eq!(same.headers["x-content-type-options"], "nosniff");
    assert!(!same.headers.contains_key("access-control-allow-origin"));
    for headers in [
        &[
            ("host", "127.0.0.1:9000"),
            ("origin", "https://evil.example"),
        ][..],
        &[("host", "127.0.0.1:9000"), ("origin", "null")][..],
        &[("host", "127.0.0.1:9000"), ("sec-fetch-site", "cross-site")][..],
    ] {
        for method in [Method::GET, Method::POST, Method::OPTIONS] {
            let answer = h.send(with(headers, method.clone())).await;
            assert_eq!(answer.status, StatusCode::FORBIDDEN, "{method} {headers:?}");
            assert!(!answer.headers.contains_key("access-control-allow-origin"));
        }
    }
    assert_eq!(h.revision(), 0);
}

/// The OpenAPI document as served, without a token.
async fn served_document(h: &Harness) -> Value {
    let request = Request::builder()
        .uri("/v1/openapi.json")
        .header(header::AUTHORIZATION, "")
        .body(Body::empty())
        .expect("request");
    let answer = h.send(request).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(answer.headers[header::CONTENT_TYPE], "application/json");
    answer.body
}

#[tokio::test]
async fn the_openapi_document_is_served_without_a_token_and_says_3_1() {
    let h = Harness::new().await;
    let body = served_document(&h).await;
    assert_eq!(body["openapi"], "3.1.0");
    let parsed: utoipa::openapi::OpenApi =
        serde_json::from_value(body.clone()).expect("the document parses as OpenAPI");
    assert!(parsed.paths.paths.contains_key("/v1/{kind}/{name}"));
    let scheme = &body["components"]["securitySchemes"][openapi::BEARER];
    assert_eq!(scheme["type"], "http");
    assert_eq!(scheme["scheme"], "bearer");
    assert_eq!(body["security"], json!([{ openapi::BEARER: [] }]));
    // Open paths need no token, and say so; every other operation answers
    // 401 without one, and says so.
    for (path, item) in body["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("path item") {
            let open = auth::OPEN_PATHS.contains(&path.as_str());
            assert_eq!(
                operation.get("security") == Some(&json!([{}])),
                open,
                "{method} {path}: security"
            );
            assert_eq!(
                operation["responses"].get("401").is_some(),
                !open,
                "{method} {path}: 401"
            );
        }
    }
    // The error shape is the one ApiError writes.
    let error = &body["components"]["schemas"]["ErrorDetail"];
    assert_eq!(error["required"], json!(["code", "message"]));
    // Every reference resolves: a schema left out of `components` would
    // leave a client unable to read the operations that name it.
    let mut refs = Vec::new();
    collect_refs(&body, &mut refs);
    assert!(!refs.is_empty());
    for reference in refs {
        let pointer = reference.strip_prefix('#').expect("a local reference");
        assert!(
            body.pointer(pointer).is_some(),
            "{reference} does not resolve"
        );
    }
}

/// Every `$ref` in `value`.
fn collect_refs(value: &Value, refs: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match value {
                    Value::String(target) if key == "$ref" => refs.push(target.clone()),
                    _ => collect_refs(value, refs),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| collect_refs(item, refs)),
        _ => {}
    }
}

/// A concrete path for an OpenAPI path template.
fn concrete(template: &str) -> String {
    template
        .replace("{kind}", "routes")
        .replace("{name}", "demo/root")
        .replace("{id}", "0123456789abcdef")
}

#[tokio::test]
async fn every_documented_operation_is_routed_and_every_route_documented() {
    let h = Harness::new().await;
    let body = served_document(&h).await;
    let documented: std::collections::BTreeMap<String, Vec<String>> = body["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .map(|(path, item)| {
            let methods = item.as_object().expect("path item").keys().cloned();
            (path.clone(), methods.collect())
        })
        .collect();
    // axum writes a catch-all `{*name}`; OpenAPI a plain `{name}`.
    let routed: std::collections::BTreeSet<String> = routes()
        .into_iter()
        .map(|(path, _)| path.replace("{*", "{"))
        .collect();
    let documented_paths: std::collections::BTreeSet<String> = documented.keys().cloned().collect();
    assert_eq!(routed, documented_paths, "routed paths vs documented paths");
    h.apply(QUICKSTART, false).await;
    let methods = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
    ];
    for (path, documented_methods) in &documented {
        let uri = concrete(path);
        for method in &methods {
            let is_documented = documented_methods.contains(&method.as_str().to_lowercase());
            let answer = h.call(method.clone(), &uri, Body::empty()).await;
            let fell_through = answer.status == StatusCode::METHOD_NOT_ALLOWED
                || answer.body["error"]["message"] == NO_SUCH_PATH;
            assert_eq!(
                fell_through, !is_documented,
                "{method} {uri} (documented: {is_documented}): {} {}",
                answer.status, answer.body
            );
        }
    }
}

#[tokio::test]
async fn whoami_names_the_token_s_subject_role_and_namespaces() {
    let h = Harness::new().await;
    let viewer = h.token("watcher", "viewer", &["demo", "shop"]).await;
    let editor = h.token("dev", "editor", &[]).await;
    for (token, expected) in [
        (
            viewer.as_str(),
            json!({"subject": "watcher", "role": "viewer", "namespaces": ["demo", "shop"]}),
        ),
        (
            editor.as_str(),
            json!({"subject": "dev", "role": "editor", "namespaces": []}),
        ),
        (
            h.token.as_str(),
            json!({"subject": "tester", "role": "admin", "namespaces": []}),
        ),
    ] {
        let answer = h
            .as_token(token, Method::GET, "/v1/whoami", Value::Null)
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        assert_eq!(answer.body, expected);
    }
    // Like every API path, it needs a token.
    let anonymous = h.as_token("", Method::GET, "/v1/whoami", Value::Null).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
}

/// `GET uri` without a token, with `headers`.
async fn anonymous(h: &Harness, uri: &str, headers: &[(&str, &str)]) -> Answer {
    let mut request = Request::builder()
        .uri(uri)
        .header(header::AUTHORIZATION, "");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    h.send(request.body(Body::empty()).expect("request")).await
}

#[tokio::test]
async fn the_console_is_served_without_a_token_and_the_api_stays_closed() {
    let h = Harness::new().await;
    for uri in ["/ui", "/ui/", "/ui/routes", "/ui/some/client/route"] {
        let answer = anonymous(&h, uri, &[]).await;
        assert_eq!(answer.status, StatusCode::OK, "{uri}");
        assert_eq!(
            answer.headers[header::CONTENT_TYPE],
            "text/html; charset=utf-8",
            "{uri}"
        );
        let html = answer.body.as_str().expect("HTML");
        assert!(html.contains("/ui/app.js"), "{uri}: {html}");
    }
    for (uri, content_type, sample) in [
        (
            "/ui/app.js",
            "text/javascript; charset=utf-8",
            "prism.token",
        ),
        ("/ui/app.css", "text/css; charset=utf-8", ".cm-"),
    ] {
        let answer = anonymous(&h, uri, &[]).await;
        assert_eq!(answer.status, StatusCode::OK, "{uri}");
        assert_eq!(answer.headers[header::CONTENT_TYPE], content_type);
        let text = answer.body.as_str().expect("text");
        assert!(text.contains(sample), "{uri} holds {sample}");
    }
    // Every file: a strict policy, no sniffing, revalidated by its ETag.
    for uri in ["/ui/", "/ui/app.js", "/ui/app.css"] {
        let answer = anonymous(&h, uri, &[]).await;
        let csp = answer.headers[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .expect("text");
        assert!(csp.starts_with("default-src 'self'"), "{csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert!(!csp.contains("unsafe-eval"), "{csp}");
        assert!(!csp.contains("script-src 'self' 'unsafe-inline'"), "{csp}");
        assert_eq!(answer.headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(answer.headers[header::CACHE_CONTROL], "no-cache");
        let etag = answer.headers[header::ETAG].to_str().expect("text");
        let again = anonymous(&h, uri, &[("if-none-match", etag)]).await;
        assert_eq!(again.status, StatusCode::NOT_MODIFIED, "{uri}");
        assert_eq!(again.body, Value::String(String::new()));
        let stale = anonymous(&h, uri, &[("if-none-match", "\"0\"")]).await;
        assert_eq!(stale.status, StatusCode::OK, "{uri}");
    }
    // A file the console does not have is a 404, not the page.
    let missing = anonymous(&h, "/ui/missing.js", &[]).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    // `/` sends a browser to the console.
    let root = anonymous(&h, "/", &[]).await;
    assert!(root.status.is_redirection(), "{}", root.status);
    assert_eq!(root.headers[header::LOCATION], "/ui/");
    // A link from another site opens the console, but the API still
    // refuses a cross-site request, and a path merely starting with `/ui`
    // or under /v1 still needs a token.
    let linked = anonymous(&h, "/ui/", &[("sec-fetch-site", "cross-site")]).await;
    assert_eq!(linked.status, StatusCode::OK);
    let forged = anonymous(&h, "/v1/whoami", &[("sec-fetch-site", "cross-site")]).await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    for uri in ["/v1/routes", "/v1/whoami", "/uix", "/v1/ui/app.js"] {
        let answer = anonymous(&h, uri, &[]).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{uri}");
    }
}
