//! Prism exposed safely: the admin API over TLS, and discovery over mTLS
//! where each proxy's certificate decides the namespaces it is sent.

mod support;

use std::path::Path;

use support::{Authority, ControlPlane, Proxy, Scrape, eventually};

/// Writes the CA and a server certificate for `localhost` into `dir`.
fn server_files(ca: &Authority, dir: &Path) -> prism_control_plane::TlsFiles {
    let (cert, key) = ca.server(&["localhost"]).write(dir, "server");
    prism_control_plane::TlsFiles { cert, key }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_gets_only_the_namespaces_its_certificate_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mesh = Authority::new("mesh");
    std::fs::write(dir.path().join("ca.pem"), mesh.pem()).expect("write the CA");
    let ca = dir.path().join("ca.pem");
    let config = prism_control_plane::Config {
        xds_tls: Some(server_files(&mesh, dir.path())),
        xds_client_ca: Some(ca.clone()),
        ..prism_control_plane::Config::new(dir.path().join("store"))
    };
    let cp = ControlPlane::start_with_config(config).await;
    let admin = cp.client();
    let xds = cp.xds.replace("http://127.0.0.1", "https://localhost");
    let revision = admin
        .apply(
            "namespaces:\n  - name: shop\n    hosts: [shop.test]\n  - name: bank\n    hosts: [bank.test]\n",
        )
        .await;

    let proxy_for = |identity: &str, name: &str| {
        let identity = mesh.client(identity).write(dir.path(), name);
        prism_data_plane::ControlPlaneTls {
            ca: Some(ca.clone()),
            identity: Some(identity),
        }
    };
    let namespaces = |proxy: &Proxy| {
        let proxy_admin = proxy.admin.clone();
        async move {
            let dump: serde_json::Value = reqwest::get(format!("{proxy_admin}/config_dump"))
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let mut names: Vec<String> = dump["resources"]
                .as_array()?
                .iter()
                .filter(|r| r["kind"] == "Namespace")
                .filter_map(|r| r["name"].as_str().map(str::to_string))
                .collect();
            names.sort();
            (dump["revision"].as_u64() == Some(revision)).then_some(names)
        }
    };

    let shop = Proxy::start_secure(
        &xds,
        "proxy-shop",
        proxy_for("spiffe://prism.test/ns/shop/sa/proxy", "shop"),
    )
    .await;
    let everything = Proxy::start_secure(
        &xds,
        "proxy-all",
        proxy_for("spiffe://prism.test/ns/*", "all"),
    )
    .await;
    let shop_sees = eventually("the shop proxy converges", || namespaces(&shop)).await;
    assert_eq!(shop_sees, ["shop"], "namespace bank never reaches it");
    let all_sees = eventually("the fleet-wide proxy converges", || namespaces(&everything)).await;
    assert_eq!(all_sees, ["bank", "shop"]);

    // No certificate, or one from another CA: no stream at all.
    let rogue = Authority::new("rogue");
    let strangers = [
        Proxy::start_secure(
            &xds,
            "proxy-anonymous",
            prism_data_plane::ControlPlaneTls {
                ca: Some(ca.clone()),
                identity: None,
            },
        )
        .await,
        Proxy::start_secure(
            &xds,
            "proxy-rogue",
            prism_data_plane::ControlPlaneTls {
                ca: Some(ca.clone()),
                identity: Some(
                    rogue
                        .client("spiffe://prism.test/ns/*")
                        .write(dir.path(), "rogue"),
                ),
            },
        )
        .await,
    ];
    // The two good proxies are served; wait until the two strangers have
    // tried, then see that the fleet never counted them.
    eventually("the strangers were refused", || async {
        let fleet = admin.proxies().await;
        let ids: Vec<String> = fleet["proxies"]
            .as_array()?
            .iter()
            .filter_map(|p| p["id"].as_str().map(str::to_string))
            .collect();
        (ids == ["proxy-all", "proxy-shop"]).then_some(())
    })
    .await;
    for stranger in &strangers {
        assert_eq!(
            stranger.revision().await,
            None,
            "{} got nothing",
            stranger.node_id
        );
    }
    let scrape = Scrape::of(&format!("{}/metrics", cp.admin)).await;
    assert_eq!(scrape.get("prism_control_plane_proxies_connected"), 2.0);

    for proxy in strangers.into_iter().chain([shop, everything]) {
        proxy.stop().await;
    }
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_serves_tls_and_plain_http_only_on_loopback() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Authority::new("admin");
    // Plain HTTP on an address beyond loopback is refused at start.
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0")
        .await
        .expect("bind");
    let xds = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let refused = prism_control_plane::run(
        prism_control_plane::Config::new(dir.path().join("plain")),
        prism_control_plane::Listeners {
            admin: listener,
            xds,
        },
        std::future::pending(),
    )
    .await
    .expect_err("plain HTTP on 0.0.0.0 is refused");
    assert!(
        refused.to_string().contains("loopback")
            && refused.to_string().contains("--admin-tls-cert"),
        "{refused}"
    );

    let config = prism_control_plane::Config {
        admin_tls: Some(server_files(&ca, dir.path())),
        ..prism_control_plane::Config::new(dir.path().join("store"))
    };
    let control_plane = prism_control_plane::ControlPlane::open(config)
        .await
        .expect("opens");
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let xds = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = admin.local_addr().expect("addr").port();
    let token = std::fs::read_to_string(control_plane.token_file()).expect("the admin token");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(control_plane.serve(
        prism_control_plane::Listeners { admin, xds },
        async {
            let _ = stopped.await;
        },
    ));
    let ca_pem = ca.pem();
    let answer = eventually("the admin API answers over TLS", || {
        https_get(&ca_pem, port, "/v1/revision", token.trim())
    })
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#"{"revision":0}"#), "{answer}");
    let refused = https_get(&ca_pem, port, "/v1/revision", "prism_bad_token").await;
    assert!(
        refused.is_some_and(|a| a.starts_with("HTTP/1.1 401")),
        "a bad token is refused over TLS too"
    );
    let plain = reqwest::get(format!("http://127.0.0.1:{port}/healthz")).await;
    assert!(plain.is_err() || !plain.expect("answer").status().is_success());
    // The CLI trusts the CA it is given, and reads the token file.
    std::fs::write(dir.path().join("admin-ca.pem"), &ca_pem).expect("write the CA");
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_prism"))
        .args([
            "--admin-url",
            &format!("https://localhost:{port}"),
            "--admin-ca",
        ])
        .arg(dir.path().join("admin-ca.pem"))
        .arg("--token-file")
        .arg(dir.path().join("store").join("admin-token"))
        .arg("status")
        .env_remove("PRISM_TOKEN")
        .output()
        .expect("prism runs");
    assert!(
        cli.status.success() && String::from_utf8_lossy(&cli.stdout).starts_with("revision 0"),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let _ = stop.send(());
    task.await.expect("joins").expect("serves and stops");
}

/// `GET path` over TLS to `localhost:port`, trusting only `ca`, with a
/// bearer `token`: the raw HTTP/1.1 answer, or `None` if it failed.
async fn https_get(ca: &str, port: u16, path: &str, token: &str) -> Option<String> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, ServerName};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(cert.expect("the CA")).expect("a root");
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let name = ServerName::try_from("localhost").expect("a server name");
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .ok()?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    tls.write_all(request.as_bytes()).await.ok()?;
    let mut answer = Vec::new();
    tls.read_to_end(&mut answer).await.ok()?;
    Some(String::from_utf8_lossy(&answer).into_owned())
}
