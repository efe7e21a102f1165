//! `prism up`: control plane, one proxy and the demo upstream in one process,
//! on embedded defaults.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::demo;

/// The proxy's access log under the data directory: `prism up` prints its
/// banner on stdout, so its access log lines go to a file instead.
pub const ACCESS_LOG: &str = "access.log";

/// Addresses and data directory of a `prism up` instance.
#[derive(Clone, Debug)]
pub struct UpConfig {
    pub data_dir: PathBuf,
    pub admin_addr: SocketAddr,
    pub xds_addr: SocketAddr,
    pub proxy_addr: SocketAddr,
    pub proxy_tls_addr: SocketAddr,
    pub proxy_admin_addr: SocketAddr,
    pub demo_addr: SocketAddr,
    pub node_id: String,
    pub zone: String,
    /// How often the proxy reports its traffic.
    pub load_report_interval: std::time::Duration,
    /// The proxy listener's wire limits, timeouts and drain.
    pub limits: prism_data_plane::Limits,
}

/// Binds `addr`, naming what it is for when that fails (most often: in use).
pub async fn bind(what: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} for the {what} (pass another address with its flag)")
    })
}

/// Runs everything until `shutdown` resolves.
pub async fn run(
    config: UpConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let admin = bind("admin API", config.admin_addr).await?;
    let xds = bind("discovery server", config.xds_addr).await?;
    let proxy = bind("proxy", config.proxy_addr).await?;
    let proxy_tls = bind("proxy TLS", config.proxy_tls_addr).await?;
    let proxy_admin = bind("proxy admin", config.proxy_admin_addr).await?;
    let demo_listener = bind("demo upstream", config.demo_addr).await?;
    let (admin_addr, xds_addr) = (admin.local_addr()?, xds.local_addr()?);
    let (proxy_addr, proxy_tls_addr, proxy_admin_addr, demo_addr) = (
        proxy.local_addr()?,
        proxy_tls.local_addr()?,
        proxy_admin.local_addr()?,
        demo_listener.local_addr()?,
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let control_plane = prism_control_plane::ControlPlane::open(prism_control_plane::Config {
        load_report_interval: config.load_report_interval,
        ..prism_control_plane::Config::new(config.data_dir.clone())
    })
    .await
    .context("control plane")?;
    let token_file = control_plane.token_file().to_path_buf();
    let control_plane = tokio::spawn(control_plane.serve(
        prism_control_plane::Listeners { admin, xds },
        stopped(stop_rx.clone()),
    ));
    let proxy_task = tokio::spawn(prism_data_plane::run(
        prism_data_plane::Config {
            control_plane: format!("http://{xds_addr}"),
            node_id: config.node_id.clone(),
            zone: config.zone.clone(),
            region: String::new(),
            advertise_address: proxy_addr.to_string(),
            data_dir: Some(config.data_dir.join("proxy")),
            namespaces: Vec::new(),
            selector: Default::default(),
            limits: config.limits,
            metrics: true,
            // Not stdout, which the banner is on.
            access_log: Some(config.data_dir.join(ACCESS_LOG)),
            control_plane_tls: None,
        },
        prism_data_plane::Listeners {
            proxy,
            tls: Some(proxy_tls),
            admin: proxy_admin,
        },
        stopped(stop_rx.clone()),
    ));
    let demo_task = tokio::spawn(demo::serve(demo_listener, "demo".into(), stopped(stop_rx)));

    println!("Prism is up (data in {}).", config.data_dir.display());
    println!("  admin API      http://{admin_addr}/v1/");
    println!(
        "  admin token    {}  (the CLI reads it from there)",
        token_file.display()
    );
    println!("  console        http://{admin_addr}/ui/  (sign in with the admin token)");
    println!("  discovery      http://{xds_addr}  (xDS v3, gRPC)");
    println!("  proxy          http://{proxy_addr}");
    println!("  proxy TLS      https://{proxy_tls_addr}");
    println!("  proxy admin    http://{proxy_admin_addr}/config_dump");
    println!(
        "  access log     {}  (namespaces with access_log: {{enabled: true}})",
        config.data_dir.join(ACCESS_LOG).display()
    );
    println!("  demo upstream  http://{demo_addr}");
    println!();
    println!("Next: prism apply -f deploy/examples/quickstart.yaml");
    println!("      curl -H 'Host: demo.local' http://{proxy_addr}/");

    shutdown.await;
    let _ = stop_tx.send(true);
    control_plane.await?.context("control plane")?;
    proxy_task.await?.context("proxy")?;
    demo_task.await?;
    Ok(())
}
