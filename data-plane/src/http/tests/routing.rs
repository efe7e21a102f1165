//! Route actions through the real proxy: weighted splits, rewrites, header
//! changes both ways, redirects and direct responses.

use prism_proto::pb::config::v1::{
    DirectResponse, HeaderMutation, HeaderValue as PbHeader, Redirect, RegexRewrite, Rewrite,
    WeightedBackend, rewrite,
};

use super::*;

/// The demo policy with `web` behind `/`, plus `routes` (named `demo/...`).
fn with_routes(web: SocketAddr, routes: impl IntoIterator<Item = Route>) -> Snapshot {
    let mut snapshot = policy(&[("/", "web", &[web])], None);
    for route in routes {
        snapshot.insert(Resource::Route(route));
    }
    prism_proto::validate_snapshot(&snapshot).expect("valid policy");
    snapshot
}

fn at(name: &str, path: route_match::Path) -> Route {
    Route {
        name: format!("demo/{name}"),
        r#match: Some(RouteMatch {
            path: Some(path),
            ..Default::default()
        }),
        backend: "web".into(),
        ..Default::default()
    }
}

fn prefix(p: &str) -> route_match::Path {
    route_match::Path::Prefix(p.into())
}

fn pair(name: &str, value: &str) -> PbHeader {
    PbHeader {
        name: name.into(),
        value: value.into(),
    }
}

/// A GET through the proxy with extra request headers.
async fn get(
    proxy: &Proxy,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, String) {
    let mut request = Request::get(format!("http://{}{path}", proxy.addr))
        .header(header::HOST, "demo.local:8080");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(Bytes::new())).expect("request");
    let response = client().request(request).await.expect("response");
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn a_weighted_split_sends_each_backend_its_share() {
    let (stable, canary) = (echo_upstream("stable").await, echo_upstream("canary").await);
    let proxy = start_proxy().await;
    let mut snapshot = policy(
        &[
            ("/", "stable", &[stable]),
            ("/unused/", "canary", &[canary]),
        ],
        None,
    );
    let mut split = at("split", prefix("/app/"));
    split.backend = String::new();
    split.backends = vec![
        WeightedBackend {
            name: "stable".into(),
            weight: 3,
        },
        WeightedBackend {
            name: "canary".into(),
            weight: 1,
        },
    ];
    snapshot.insert(Resource::Route(split));
    prism_proto::validate_snapshot(&snapshot).expect("valid policy");
    proxy.apply(&snapshot);

    const N: usize = 800;
    let mut to_canary = 0;
    for _ in 0..N {
        let (status, headers, _) = get(&proxy, "/app/x", &[]).await;
        assert_eq!(status, StatusCode::OK);
        if header_str(&headers, "x-upstream") == "canary" {
            to_canary += 1;
        }
    }
    // Expected 200 (a quarter); the standard deviation is about 12.
    assert!(
        (140..=260).contains(&to_canary),
        "canary took {to_canary} of {N}"
    );
}

#[tokio::test]
async fn rewrites_are_what_the_upstream_sees() {
    let web = echo_upstream("web").await;
    let proxy = start_proxy().await;
    let mut by_prefix = at("by-prefix", prefix("/api/"));
    by_prefix.rewrite = Some(Rewrite {
        path: Some(rewrite::Path::Prefix("/v2/".into())),
        host: "internal.web".into(),
    });
    // A prefix, since the policy's `/` prefix comes before any regex path.
    let mut by_regex = at("by-regex", prefix("/users/"));
    by_regex.rewrite = Some(Rewrite {
        path: Some(rewrite::Path::Regex(RegexRewrite {
            pattern: "^/users/([0-9]+)/(.*)$".into(),
            substitution: r"/u/\1/p/\2".into(),
        })),
        host: String::new(),
    });
    proxy.apply(&with_routes(web, [by_prefix, by_regex]));

    let (_, headers, _) = get(&proxy, "/api/items?x=1", &[]).await;
    assert_eq!(header_str(&headers, "x-seen-path"), "/v2/items?x=1");
    assert_eq!(header_str(&headers, "x-seen-host"), "internal.web");
    let (_, headers, _) = get(&proxy, "/users/42/profile", &[]).await;
    assert_eq!(header_str(&headers, "x-seen-path"), "/u/42/p/profile");
    assert_eq!(header_str(&headers, "x-seen-host"), "demo.local:8080");
    // Other routes are left alone.
    let (_, headers, _) = get(&proxy, "/apix", &[]).await;
    assert_eq!(header_str(&headers, "x-seen-path"), "/apix");
}

#[tokio::test]
async fn header_changes_apply_on_the_way_up_and_back() {
    let web = echo_upstream("web").await;
    let proxy = start_proxy().await;
    let mut route = at("headers", prefix("/h"));
    route.request_headers = Some(HeaderMutation {
        remove: vec!["X-Hop".into()],
        add: vec![pair("x-hop", "from-proxy")],
        ..Default::default()
    });
    route.response_headers = Some(HeaderMutation {
        set: vec![pair("x-upstream", "hidden")],
        add: vec![pair("x-added", "yes")],
        remove: vec!["x-seen-xff".into()],
    });
    proxy.apply(&with_routes(web, [route]));

    let (_, headers, _) = get(&proxy, "/h", &[("x-hop", "from-client")]).await;
    // Removed first, then added: only the proxy's value goes up.
    assert_eq!(header_str(&headers, "x-seen-hop"), "from-proxy");
    assert_eq!(header_str(&headers, "x-upstream"), "hidden");
    assert_eq!(header_str(&headers, "x-added"), "yes");
    assert!(!headers.contains_key("x-seen-xff"));
    // Another route's responses are untouched.
    let (_, headers, _) = get(&proxy, "/other", &[]).await;
    assert_eq!(header_str(&headers, "x-upstream"), "web");
    assert!(!headers.contains_key("x-added"));
}

#[tokio::test]
async fn redirects_and_direct_responses_are_answered_by_the_proxy() {
    let web = echo_upstream("web").await;
    let proxy = start_proxy().await;
    let mut moved = at("moved", prefix("/old/"));
    moved.backend = String::new();
    moved.redirect = Some(Redirect {
        scheme: "https".into(),
        path: "/new/".into(),
        status: 301,
        ..Default::default()
    });
    let mut same = at("same", route_match::Path::Exact("/same".into()));
    same.backend = String::new();
    same.redirect = Some(Redirect::default());
    let mut hello = at("hello", route_match::Path::Exact("/hello".into()));
    hello.backend = String::new();
    hello.direct_response = Some(DirectResponse {
        status: 418,
        body: "short and stout\n".into(),
    });
    let mut json = at("json", route_match::Path::Exact("/json".into()));
    json.backend = String::new();
    json.direct_response = Some(DirectResponse {
        status: 200,
        body: "{}".into(),
    });
    json.response_headers = Some(HeaderMutation {
        set: vec![pair("content-type", "application/json")],
        ..Default::default()
    });
    proxy.apply(&with_routes(web, [moved, same, hello, json]));

    let (status, headers, body) = get(&proxy, "/old/page?q=1", &[]).await;
    assert_eq!(status, StatusCode::MOVED_PERMANENTLY);
    // The request's port stays, as Envoy keeps it (tests/envoy_parity.rs).
    assert_eq!(
        header_str(&headers, "location"),
        "https://demo.local:8080/new/?q=1"
    );
    assert_eq!(body, "");
    assert!(!headers.contains_key("x-upstream"));
    let (status, headers, _) = get(&proxy, "/same", &[]).await;
    assert_eq!(status, StatusCode::FOUND);
    assert_eq!(
        header_str(&headers, "location"),
        "http://demo.local:8080/same"
    );

    let (status, headers, body) = get(&proxy, "/hello", &[]).await;
    assert_eq!(status, StatusCode::IM_A_TEAPOT);
    assert_eq!(body, "short and stout\n");
    assert_eq!(
        header_str(&headers, "content-type"),
        "text/plain; charset=utf-8"
    );
    assert_eq!(header_str(&headers, "via"), "1.1 prism");
    let (status, headers, body) = get(&proxy, "/json", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "{}");
    assert_eq!(header_str(&headers, "content-type"), "application/json");
}
