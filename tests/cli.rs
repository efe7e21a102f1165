//! The operator commands and `prism up`, run as the real binary.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::{ControlPlane, KillOnDrop, PrismUp, eventually, get};

/// `prism args` against the admin API at `admin`, with `token`.
fn prism(admin: &str, token: &str, args: &[&str]) -> (bool, String, String) {
    prism_with(&[("PRISM_ADMIN_URL", admin), ("PRISM_TOKEN", token)], args)
}

/// `prism args` with `env` set; whether it succeeded, its stdout and stderr.
fn prism_with(env: &[(&str, &str)], args: &[&str]) -> (bool, String, String) {
    prism_in(std::path::Path::new("."), env, args)
}

/// `prism args` run in `dir` with `env` set.
fn prism_in(dir: &std::path::Path, env: &[(&str, &str)], args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_prism"))
        .args(args)
        .current_dir(dir)
        .env_remove("PRISM_TOKEN")
        .envs(env.iter().copied())
        .output()
        .expect("prism runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_get_delete_through_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path()).await;
    let quickstart = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/examples/quickstart.yaml"
    );
    let (admin, token) = (cp.admin.clone(), cp.token.clone());

    let run = move |args: Vec<&'static str>| {
        let (admin, token) = (admin.clone(), token.clone());
        tokio::task::spawn_blocking(move || prism(&admin, &token, &args))
    };
    let (ok, out, err) = run(vec!["apply", "-f", quickstart, "--dry-run"])
        .await
        .expect("join");
    assert!(ok, "{err}");
    assert!(
        out.contains("would apply") && out.contains("Backend demo/upstream"),
        "{out}"
    );
    let (ok, out, err) = run(vec!["apply", "-f", quickstart]).await.expect("join");
    assert!(ok, "{err}");
    assert!(out.contains("revision 1"), "{out}");

    let (ok, out, _) = run(vec!["get", "backends"]).await.expect("join");
    assert!(ok);
    assert!(
        out.contains("name: demo/upstream") && out.contains("127.0.0.1:8081"),
        "{out}"
    );
    let (ok, out, _) = run(vec!["get", "route", "demo/root", "-o", "json"])
        .await
        .expect("join");
    assert!(ok && out.contains("\"backend\": \"upstream\""), "{out}");

    let (ok, _, err) = run(vec!["delete", "backends", "demo/upstream"])
        .await
        .expect("join");
    assert!(!ok, "a referenced backend cannot go");
    assert!(err.contains("backend") && err.contains("HTTP 400"), "{err}");
    let (ok, out, err) = run(vec!["delete", "routes", "demo/root"])
        .await
        .expect("join");
    assert!(ok, "{err}");
    assert!(out.contains("revision 2"), "{out}");
    let (ok, _, err) = run(vec!["get", "widgets"]).await.expect("join");
    assert!(!ok && err.contains("unknown kind `widgets`"), "{err}");

    // An apply based on revision 1 after the delete at 2: nothing applied,
    // and the error says what changed underneath, and who changed it.
    let (ok, _, err) = run(vec!["apply", "-f", quickstart, "--if-match", "1"])
        .await
        .expect("join");
    assert!(!ok, "a stale apply is refused");
    assert!(
        err.contains("HTTP 412")
            && err.contains("changed since revision 1")
            && err.contains("revision 2 by")
            && err.contains("delete  Route demo/root"),
        "{err}"
    );
    let (ok, out, err) = run(vec!["apply", "-f", quickstart, "--if-match", "2"])
        .await
        .expect("join");
    assert!(ok && out.contains("applied at revision 3"), "{out}{err}");

    // The change log, newest first, filtered by namespace and author.
    let (ok, out, err) = run(vec!["history", "--namespace", "demo", "--limit", "2"])
        .await
        .expect("join");
    assert!(ok, "{err}");
    let revision_lines: Vec<&str> = out.lines().filter(|l| l.starts_with("revision")).collect();
    assert_eq!(revision_lines.len(), 2, "{out}");
    assert!(
        revision_lines[0].starts_with("revision 3 by ")
            && revision_lines[0].contains("(apply) at 20")
            && revision_lines[1].starts_with("revision 2 by ")
            && out.contains("delete  Route demo/root"),
        "{out}"
    );
    let (ok, out, _) = run(vec!["history", "--author", "nobody"])
        .await
        .expect("join");
    assert!(ok && out == "no revisions\n", "{out}");

    // Tokens: a viewer made through the CLI reads but cannot write, and
    // once revoked is refused; no token at all is refused with a hint.
    let (ok, out, err) = run(vec!["token", "create", "ci-bot", "--role", "viewer"])
        .await
        .expect("join");
    assert!(ok, "{err}");
    let viewer = out.lines().next().unwrap_or_default().to_string();
    let id = out
        .split_once("(token ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .expect("the token's id")
        .to_string();
    let as_viewer = |args: Vec<&'static str>| {
        let (admin, viewer) = (cp.admin.clone(), viewer.clone());
        tokio::task::spawn_blocking(move || prism(&admin, &viewer, &args))
    };
    let (ok, out, err) = as_viewer(vec!["get", "routes"]).await.expect("join");
    assert!(ok && out.contains("demo/root"), "{out}{err}");
    let (ok, _, err) = as_viewer(vec!["apply", "-f", quickstart])
        .await
        .expect("join");
    assert!(
        !ok && err.contains("HTTP 403") && err.contains("viewer"),
        "{err}"
    );
    let (ok, out, _) = run(vec!["token", "list"]).await.expect("join");
    assert!(
        ok && out.contains("ci-bot") && out.contains("admin"),
        "{out}"
    );
    let (ok, _, err) = tokio::task::spawn_blocking({
        let (admin, token) = (cp.admin.clone(), cp.token.clone());
        move || prism(&admin, &token, &["token", "revoke", &id])
    })
    .await
    .expect("join");
    assert!(ok, "{err}");
    let (ok, _, err) = as_viewer(vec!["get", "routes"]).await.expect("join");
    assert!(!ok && err.contains("HTTP 401"), "{err}");
    let admin = cp.admin.clone();
    let (ok, _, err) = tokio::task::spawn_blocking(move || {
        prism_with(
            &[
                ("PRISM_ADMIN_URL", &admin),
                ("PRISM_TOKEN_FILE", "/nonexistent"),
            ],
            &["status"],
        )
    })
    .await
    .expect("join");
    assert!(
        !ok && err.contains("HTTP 401") && err.contains("--token"),
        "{err}"
    );
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_and_rollback_through_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path()).await;
    let quickstart = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/examples/quickstart.yaml"
    );
    let moved = dir.path().join("moved.yaml");
    let text = std::fs::read_to_string(quickstart).expect("quickstart");
    std::fs::write(&moved, text.replace("127.0.0.1:8081", "127.0.0.1:8082")).expect("write");
    let moved = moved.to_string_lossy().into_owned();
    let (admin, token) = (cp.admin.clone(), cp.token.clone());
    let run = move |args: Vec<String>| {
        let (admin, token) = (admin.clone(), token.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                prism(&admin, &token, &args)
            })
            .await
            .expect("join")
        }
    };
    let args = |line: &str| line.split(' ').map(str::to_string).collect::<Vec<_>>();

    let (ok, _, err) = run(args(&format!("apply -f {quickstart}"))).await;
    assert!(ok, "{err}");
    // A dry run prints the changes, then their diffs.
    let (ok, out, err) = run(args(&format!("apply -f {moved} --dry-run"))).await;
    assert!(ok, "{err}");
    assert!(
        out.starts_with("would apply at revision 1:\n  update  Backend demo/upstream\n")
            && out
                .contains("--- Backend demo/upstream @ r1\n+++ Backend demo/upstream @ dry run\n")
            && out.contains("\n-  - address: 127.0.0.1:8081\n+  - address: 127.0.0.1:8082\n"),
        "{out}"
    );
    let (ok, _, err) = run(args(&format!("apply -f {moved}"))).await;
    assert!(ok, "{err}");

    let (ok, out, err) = run(args("diff 1 2")).await;
    assert!(ok, "{err}");
    assert!(
        out.starts_with("--- Backend demo/upstream @ r1\n+++ Backend demo/upstream @ r2\n@@ ")
            && out.contains("\n-  - address: 127.0.0.1:8081\n+  - address: 127.0.0.1:8082\n"),
        "{out}"
    );
    // A created resource's diff adds what `prism get` prints, line for line.
    let (ok, out, err) = run(args("diff 0")).await;
    assert!(ok, "{err}");
    let (_, shown, _) = run(args("get route demo/root")).await;
    let added: String = shown.lines().map(|line| format!("+{line}\n")).collect();
    assert!(
        out.contains(&format!(
            "+++ Route demo/root @ r2\n@@ -0,0 +1,{} @@\n{added}",
            shown.lines().count()
        )),
        "{out}\n{shown}"
    );

    let (ok, out, err) = run(args("rollback 1 --dry-run")).await;
    assert!(ok, "{err}");
    assert!(
        out.starts_with(
            "would roll back to revision 1 at revision 2:\n  update  Backend demo/upstream\n"
        ) && out.contains("--- Backend demo/upstream @ r2\n+++ Backend demo/upstream @ r1\n"),
        "{out}"
    );
    let (ok, out, err) = run(args("rollback 1 --if-match 1")).await;
    assert!(!ok, "a stale rollback is refused: {out}");
    assert!(
        err.contains("HTTP 412") && err.contains("revision 2"),
        "{err}"
    );
    let (ok, out, err) = run(args("rollback 1")).await;
    assert!(ok, "{err}");
    assert!(
        out.starts_with("rolled back to revision 1 at revision 3:\n"),
        "{out}"
    );
    let (_, shown, _) = run(args("get backend demo/upstream")).await;
    assert!(shown.contains("address: 127.0.0.1:8081"), "{shown}");
    let (ok, out, err) = run(args("rollback 3")).await;
    assert!(ok, "{err}");
    assert_eq!(
        out,
        "unchanged: the policy is revision 3's already (revision 3)\n"
    );
    let (ok, out, err) = run(args("diff 1 3")).await;
    assert!(ok, "{err}");
    assert_eq!(out, "no changes from revision 1 to revision 3\n");

    let (ok, out, err) = run(args("history --limit 1")).await;
    assert!(ok, "{err}");
    assert!(
        out.starts_with("revision 3 by admin (rollback) at "),
        "{out}"
    );
    let (ok, _, err) = run(args("diff 7")).await;
    assert!(!ok);
    assert!(
        err.contains("from: revision 7 does not exist: the newest is 3 (HTTP 404)"),
        "{err}"
    );
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_secrets_shows_expiry_and_names_never_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path()).await;
    let tls = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/tls");
    let pem = |file: &str| {
        std::fs::read_to_string(format!("{tls}/{file}"))
            .expect("fixture")
            .trim_end()
            .replace('\n', "\n          ")
    };
    let document = dir.path().join("secret.yaml");
    std::fs::write(
        &document,
        format!(
            "namespaces:\n  - name: shop\n    hosts: [shop.test]\n    tls_secret: tls\n\
             secrets:\n  - name: shop/tls\n    tls_certificate:\n      certificate_chain: |\n          {}\n      \
             private_key: |\n          {}\n",
            pem("server.pem"),
            pem("server.key")
        ),
    )
    .expect("write");
    let (admin, token) = (cp.admin.clone(), cp.token.clone());
    let path = document.to_string_lossy().into_owned();
    let (ok, out, err) =
        tokio::task::spawn_blocking(move || prism(&admin, &token, &["apply", "-f", &path]))
            .await
            .expect("join");
    assert!(ok, "{err}");
    assert!(out.contains("Secret shop/tls"), "{out}");

    for output in ["yaml", "json"] {
        let (admin, token) = (cp.admin.clone(), cp.token.clone());
        let (ok, out, err) = tokio::task::spawn_blocking(move || {
            prism(&admin, &token, &["get", "secrets", "-o", output])
        })
        .await
        .expect("join");
        assert!(ok, "{err}");
        assert!(
            out.contains("shop/tls")
                && out.contains("tls_certificate")
                && out.contains("2126-11-03T14:52:27Z")
                && out.contains("*.shop.test"),
            "{out}"
        );
        assert!(!out.contains("BEGIN") && !out.contains("PRIVATE"), "{out}");
    }
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prism_up_serves_the_quickstart() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Killed on drop: a failing assertion below must not orphan `prism up`.
    let mut up = PrismUp::start(dir.path(), &[], &[]);
    let urls = &up.urls;
    let (admin, proxy) = (up.admin(), &urls["proxy"]);
    let demo_addr = up.demo_addr();
    let quickstart = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/examples/quickstart.yaml"
    ))
    .expect("quickstart")
    .replace("127.0.0.1:8081", demo_addr);
    let file = dir.path().join("quickstart.yaml");
    std::fs::write(&file, quickstart).expect("write");

    let path = file.to_string_lossy().into_owned();
    let here = dir.path().to_path_buf();
    let operator = move |args: Vec<String>| {
        let (admin, here) = (admin.clone(), here.clone());
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            prism_in(&here, &[("PRISM_ADMIN_URL", &admin)], &args)
        })
    };
    let (ok, _, err) = operator(vec!["apply".into(), "-f".into(), path])
        .await
        .expect("join");
    assert!(ok, "{err}");
    let http = reqwest::Client::new();
    let answer = eventually("the quickstart answers through the proxy", || async {
        let answer = get(&http, proxy, "demo.local", "/").await;
        (answer.status == 200).then_some(answer)
    })
    .await;
    assert!(answer.body.contains("Prism demo upstream"), "{answer:?}");

    // The README's TLS step: deploy/examples/tls.yaml, then https with the demo CA.
    let tls_example = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/examples/tls.yaml");
    let (ok, _, err) = operator(vec!["apply".into(), "-f".into(), tls_example.into()])
        .await
        .expect("join");
    assert!(ok, "{err}");
    let tls_addr = urls["proxy TLS"].trim_start_matches("https://").to_string();
    let answer = eventually("the quickstart answers over TLS", || async {
        get_over_tls(&tls_addr, "demo.local")
            .await
            .filter(|answer| answer.starts_with("HTTP/1.1 200"))
    })
    .await;
    assert!(answer.contains("Prism demo upstream"), "{answer}");

    let (ok, out, _) = operator(vec!["status".into()]).await.expect("join");
    assert!(ok && out.contains("local"), "{out}");

    // The README's data gateway steps: the quickstart binds `demo` to the
    // embedded SQLite store and the in-memory bus.
    let data = |args: &'static [&'static str]| {
        let proxy = proxy.clone();
        tokio::task::spawn_blocking(move || prism_with(&[("PRISM_PROXY_URL", &proxy)], args))
    };
    let (ok, out, err) = data(&["kv", "put", "demo", "greeting", "hello"])
        .await
        .expect("join");
    assert!(ok, "{err}");
    assert_eq!(out, "version 1\n");
    let (ok, out, err) = data(&["kv", "get", "demo", "greeting"])
        .await
        .expect("join");
    assert!(ok, "{err}");
    assert_eq!(out, "hello\n", "the value alone");
    let (ok, out, _) = data(&["kv", "scan", "demo", "greet"]).await.expect("join");
    assert!(ok);
    assert_eq!(out, "greeting\t1\thello\n");
    let (ok, out, _) = data(&["kv", "del", "demo", "greeting"])
        .await
        .expect("join");
    assert!(ok && out == "deleted\n", "{out}");
    let (ok, _, err) = data(&["kv", "get", "demo", "greeting"])
        .await
        .expect("join");
    assert!(
        !ok && err.contains("key `greeting` not found (HTTP 404)"),
        "{err}"
    );

    let mut subscriber = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_prism"))
            .args(["pubsub", "sub", "demo", "news"])
            .env("PRISM_PROXY_URL", proxy)
            .stdout(Stdio::piped())
            .spawn()
            .expect("prism pubsub sub starts"),
    );
    let proxy_admin = urls["proxy admin"]
        .trim_end_matches("/config_dump")
        .to_string();
    eventually("the subscriber is subscribed", || async {
        let data: serde_json::Value = reqwest::get(format!("{proxy_admin}/data"))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (data["subscriptions"].as_u64()? >= 1).then_some(())
    })
    .await;
    let (ok, out, err) = data(&["pubsub", "pub", "demo", "news", "hi there"])
        .await
        .expect("join");
    assert!(ok && !out.trim().is_empty(), "{err}");
    let mut received = BufReader::new(subscriber.stdout.take().expect("stdout")).lines();
    let line = tokio::task::spawn_blocking(move || received.next())
        .await
        .expect("join")
        .expect("a line")
        .expect("text");
    assert_eq!(line, "hi there");
    let _ = subscriber.kill();

    // SIGTERM: everything drains and the process exits cleanly, in bounded time.
    let term = Command::new("kill")
        .args(["-TERM", &up.child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(term.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(status) = up.child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = up.child.kill();
            panic!("prism up did not exit on SIGTERM");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}");
}

/// `GET /` for `host` over TLS to `addr`, trusting only the demo CA of
/// deploy/examples/tls: the raw HTTP/1.1 answer, or `None` if the handshake
/// or the exchange failed.
async fn get_over_tls(addr: &str, host: &str) -> Option<String> {
    let ca = include_bytes!("../deploy/examples/tls/demo-ca.pem");
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca) {
        roots.add(cert.expect("demo CA")).expect("root");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let name = ServerName::try_from(host.to_string()).expect("server name");
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .ok()?;
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.ok()?;
    let mut answer = Vec::new();
    tls.read_to_end(&mut answer).await.ok()?;
    Some(String::from_utf8_lossy(&answer).into_owned())
}
