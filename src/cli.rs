//! Flags and subcommands of `prism`, and their dispatch.

use std::collections::BTreeMap;
use std::io::{Read, Write as _};
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::client::{AdminClient, Output};
use crate::data_client::{DataClient, printable};
use crate::telemetry::{self, TraceArgs};
use crate::up::{UpConfig, bind};

/// Prism: a control plane and a fleet of data-plane proxies.
#[derive(Debug, Parser)]
#[command(name = "prism", version, about)]
pub struct Cli {
    /// Admin API used by the operator commands.
    #[arg(
        long,
        global = true,
        env = "PRISM_ADMIN_URL",
        default_value = "http://127.0.0.1:9000"
    )]
    pub admin_url: String,
    /// Bearer token for the admin API; by default the one in `--token-file`.
    #[arg(long, global = true, env = "PRISM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the admin API token, read when `--token` is not given:
    /// where `prism up` and `prism control-plane` write the first admin token.
    #[arg(
        long,
        global = true,
        env = "PRISM_TOKEN_FILE",
        default_value = "./prism-data/admin-token"
    )]
    pub token_file: PathBuf,
    /// CA (PEM) to trust for an `https://` admin API, besides the web PKI
    /// roots.
    #[arg(long, global = true, env = "PRISM_ADMIN_CA")]
    pub admin_ca: Option<PathBuf>,
    /// Proxy whose data APIs `prism kv` calls.
    #[arg(
        long,
        global = true,
        env = "PRISM_PROXY_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub proxy_url: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Control plane, one proxy and a demo upstream in one process.
    Up {
        /// Where the control plane keeps its sled store; the proxy keeps its
        /// last-known-good snapshot in `<data dir>/proxy`.
        #[arg(long, env = "PRISM_DATA_DIR", default_value = "./prism-data")]
        data_dir: PathBuf,
        #[arg(long, env = "PRISM_ADMIN_ADDR", default_value = "127.0.0.1:9000")]
        admin_addr: SocketAddr,
        #[arg(long, env = "PRISM_XDS_ADDR", default_value = "127.0.0.1:18000")]
        xds_addr: SocketAddr,
        #[arg(long, env = "PRISM_PROXY_ADDR", default_value = "127.0.0.1:8080")]
        proxy_addr: SocketAddr,
        /// The proxy's TLS listener (certificates from namespaces' `tls_secret`).
        #[arg(long, env = "PRISM_PROXY_TLS_ADDR", default_value = "127.0.0.1:8443")]
        proxy_tls_addr: SocketAddr,
        #[arg(long, env = "PRISM_PROXY_ADMIN_ADDR", default_value = "127.0.0.1:9901")]
        proxy_admin_addr: SocketAddr,
        #[arg(long, env = "PRISM_DEMO_ADDR", default_value = "127.0.0.1:8081")]
        demo_addr: SocketAddr,
        /// How often proxies report their traffic (Load Reporting Service),
        /// and the step of the console's charts and `prism top`.
        #[arg(long, env = "PRISM_LOAD_REPORT_INTERVAL", default_value = "2s", value_parser = parse_duration)]
        load_report_interval: Duration,
        #[command(flatten)]
        limits: LimitFlags,
        #[command(flatten)]
        traces: TraceArgs,
    },
    /// The control plane: sled store, admin API, xDS discovery server.
    ControlPlane {
        #[arg(long, env = "PRISM_DATA_DIR", default_value = "./prism-data")]
        data_dir: PathBuf,
        #[arg(long, env = "PRISM_ADMIN_ADDR", default_value = "127.0.0.1:9000")]
        admin_addr: SocketAddr,
        #[arg(long, env = "PRISM_XDS_ADDR", default_value = "0.0.0.0:18000")]
        xds_addr: SocketAddr,
        /// Listen address put in the Envoy Listener `prism-http` served to Envoy proxies.
        #[arg(
            long,
            env = "PRISM_ENVOY_LISTENER_ADDR",
            default_value = "0.0.0.0:10000"
        )]
        envoy_listener_addr: SocketAddr,
        /// Where the Envoy TLS Listener `prism-https` binds (served while some
        /// namespace has a `tls_secret`).
        #[arg(
            long,
            env = "PRISM_ENVOY_TLS_LISTENER_ADDR",
            default_value = "0.0.0.0:10443"
        )]
        envoy_tls_listener_addr: SocketAddr,
        /// Serve the admin API over TLS with this certificate chain (PEM);
        /// without one it serves plain HTTP, on a loopback address only.
        #[arg(long, env = "PRISM_ADMIN_TLS_CERT", requires = "admin_tls_key")]
        admin_tls_cert: Option<PathBuf>,
        /// The private key of `--admin-tls-cert` (PEM).
        #[arg(long, env = "PRISM_ADMIN_TLS_KEY", requires = "admin_tls_cert")]
        admin_tls_key: Option<PathBuf>,
        /// Serve discovery over TLS with this certificate chain (PEM).
        #[arg(long, env = "PRISM_XDS_TLS_CERT", requires = "xds_tls_key")]
        xds_tls_cert: Option<PathBuf>,
        /// The private key of `--xds-tls-cert` (PEM).
        #[arg(long, env = "PRISM_XDS_TLS_KEY", requires = "xds_tls_cert")]
        xds_tls_key: Option<PathBuf>,
        /// Require discovery clients to present a certificate signed by this
        /// CA (PEM); a proxy then gets only the namespaces its certificate's
        /// SPIFFE IDs name (`spiffe://…/ns/<namespace>/…`, `ns/*` for all).
        #[arg(long, env = "PRISM_XDS_CLIENT_CA", requires = "xds_tls_cert")]
        xds_client_ca: Option<PathBuf>,
        /// How often proxies report their traffic (Load Reporting Service),
        /// and the step of the console's charts and `prism top`.
        #[arg(long, env = "PRISM_LOAD_REPORT_INTERVAL", default_value = "2s", value_parser = parse_duration)]
        load_report_interval: Duration,
        #[command(flatten)]
        traces: TraceArgs,
    },
    /// A data-plane proxy that subscribes to a control plane.
    Proxy {
        #[arg(
            long,
            env = "PRISM_CONTROL_PLANE",
            default_value = "http://127.0.0.1:18000"
        )]
        control_plane: String,
        #[arg(long, env = "PRISM_PROXY_ADDR", default_value = "0.0.0.0:8080")]
        listen: SocketAddr,
        /// The TLS listener: each namespace's `tls_secret` certificate, by SNI.
        #[arg(long, env = "PRISM_PROXY_TLS_ADDR", default_value = "0.0.0.0:8443")]
        tls_listen: SocketAddr,
        #[arg(long, env = "PRISM_PROXY_ADMIN_ADDR", default_value = "127.0.0.1:9901")]
        admin_addr: SocketAddr,
        /// Unique id of this proxy in the fleet; host name and pid by default.
        #[arg(long, env = "PRISM_NODE_ID")]
        node_id: Option<String>,
        #[arg(long, env = "PRISM_ZONE", default_value = "")]
        zone: String,
        #[arg(long, env = "PRISM_REGION", default_value = "")]
        region: String,
        /// Address clients use to reach this proxy; the listen address by default.
        #[arg(long, env = "PRISM_ADVERTISE_ADDRESS")]
        advertise_address: Option<String>,
        /// Where the proxy keeps its last-known-good snapshot, served at startup
        /// when the control plane is unreachable.
        #[arg(
            long,
            env = "PRISM_PROXY_DATA_DIR",
            default_value = "./prism-proxy-data"
        )]
        data_dir: PathBuf,
        /// Serve only these namespaces, e.g. `a,b`; all by default.
        // The fully qualified `Vec` keeps clap from treating the flag as repeated:
        // one value, parsed whole.
        #[arg(long, env = "PRISM_NAMESPACES", value_parser = prism_data_plane::parse_namespaces)]
        namespaces: Option<::std::vec::Vec<String>>,
        /// Serve only namespaces whose labels match every pair, e.g. `env=prod,tier=web`.
        #[arg(long, env = "PRISM_SELECTOR", value_parser = prism_data_plane::parse_selector)]
        selector: Option<BTreeMap<String, String>>,
        /// Worker threads serving traffic; by default one per CPU this process
        /// may run on (its affinity mask and cgroup quota count). One runs
        /// everything on the main thread.
        #[arg(long, env = "PRISM_WORKERS")]
        workers: Option<NonZeroUsize>,
        /// CA (PEM) that signed an `https://` control plane's certificate;
        /// the web PKI roots by default.
        #[arg(long, env = "PRISM_CONTROL_PLANE_CA")]
        control_plane_ca: Option<PathBuf>,
        /// This proxy's certificate chain (PEM) for a control plane that
        /// requires one: its SPIFFE IDs name the namespaces it is sent.
        #[arg(long, env = "PRISM_CONTROL_PLANE_CERT", requires = "control_plane_key")]
        control_plane_cert: Option<PathBuf>,
        /// The private key of `--control-plane-cert` (PEM).
        #[arg(long, env = "PRISM_CONTROL_PLANE_KEY", requires = "control_plane_cert")]
        control_plane_key: Option<PathBuf>,
        #[command(flatten)]
        limits: LimitFlags,
        /// Keep Prometheus metrics, served at the admin address's `/metrics`;
        /// `--metrics=false` records nothing on the request path.
        #[arg(long, env = "PRISM_PROXY_METRICS", default_value_t = true, action = clap::ArgAction::Set)]
        metrics: bool,
        /// Where access log lines go: a file (appended to) or `-` for
        /// stdout. A line is written per request only for namespaces whose
        /// policy sets `access_log: {enabled: true}`.
        #[arg(long, env = "PRISM_PROXY_ACCESS_LOG", default_value = prism_data_plane::ACCESS_LOG_STDOUT)]
        access_log: PathBuf,
        #[command(flatten)]
        traces: TraceArgs,
    },
    /// A small HTTP server that names itself in every answer.
    DemoUpstream {
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
        #[arg(long, default_value = "demo")]
        name: String,
    },
    /// Apply a policy document (YAML or JSON): all of it, or nothing.
    Apply {
        /// The document; `-` reads standard input.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Show what would change without changing it.
        #[arg(long)]
        dry_run: bool,
        /// Apply only if the policy is still at this revision (the one a
        /// `--dry-run` showed); by default, the revision of a dry run made
        /// just before.
        #[arg(long, value_name = "REVISION")]
        if_match: Option<u64>,
    },
    /// Show resources of a kind (secrets, namespaces, backends, routes,
    /// bindings), or one by name. Secrets show name, kind, expiry and names
    /// only.
    Get {
        kind: String,
        name: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value = "yaml")]
        output: Output,
    },
    /// Delete one resource.
    Delete { kind: String, name: String },
    /// The change log, newest first: each revision's author, action, time
    /// and changes.
    History {
        /// Only revisions that changed this namespace or a resource in it.
        #[arg(long)]
        namespace: Option<String>,
        /// Only revisions by this author.
        #[arg(long)]
        author: Option<String>,
        /// At most this many revisions (1000 at most).
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// What changed between two revisions: a unified diff of each changed
    /// resource's YAML as `prism get` prints it (secrets redacted).
    Diff {
        /// The revision to diff from.
        from: u64,
        /// The revision to diff to; the current one by default.
        to: Option<u64>,
    },
    /// Make the policy equal an earlier revision's again, as one new
    /// revision; refused, changing nothing, when that policy breaks today's
    /// validation rules. Prints the changes and their diffs.
    Rollback {
        /// The revision whose policy to restore.
        revision: u64,
        /// Show what would change without changing it.
        #[arg(long)]
        dry_run: bool,
        /// Roll back only if the policy is still at this revision (the one
        /// a `--dry-run` showed).
        #[arg(long, value_name = "REVISION")]
        if_match: Option<u64>,
    },
    /// The proxy fleet: revision ACKed, lag, last NACK.
    Status,
    /// Live traffic from the fleet's load reports: requests per second,
    /// errors and latency per namespace and route, redrawn every reporting
    /// interval.
    Top {
        /// Print the table once and exit.
        #[arg(long)]
        once: bool,
    },
    /// Bearer tokens of the admin API (needs an admin token).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// A namespace's KeyValue store, through a proxy (`--proxy-url`).
    Kv {
        #[command(subcommand)]
        command: KvCommand,
    },
    /// A namespace's PubSub bus, through a proxy (`--proxy-url`).
    Pubsub {
        #[command(subcommand)]
        command: PubsubCommand,
    },
}

/// `prism token`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token; prints it, once: it is stored only as a digest.
    Create {
        /// Who holds it: the author recorded for its writes.
        subject: String,
        /// viewer (reads), editor (reads and writes) or admin (also tokens).
        #[arg(long, default_value = "viewer")]
        role: String,
        /// Limit it to this namespace; repeat for more. Every namespace by
        /// default.
        #[arg(long = "namespace", value_name = "NAMESPACE")]
        namespaces: Vec<String>,
    },
    /// Every token: id, subject, role, namespaces, creation.
    List,
    /// Revoke a token by id, at once.
    Revoke { id: String },
}

/// `prism pubsub`.
#[derive(Debug, Subcommand)]
pub enum PubsubCommand {
    /// Publish a message; prints its id.
    Pub {
        namespace: String,
        topic: String,
        message: String,
    },
    /// Print each message as it arrives, one line each, until interrupted.
    Sub {
        namespace: String,
        topic: String,
        /// Share the topic with the group's other members and acknowledge
        /// each message once printed; without it, every message published
        /// from now on.
        #[arg(long)]
        group: Option<String>,
    },
}

/// `prism kv`.
#[derive(Debug, Subcommand)]
pub enum KvCommand {
    /// Write a value; prints its new version.
    Put {
        namespace: String,
        key: String,
        value: String,
        /// Expire it after this long, e.g. `30s`, `5m`, `2h`.
        #[arg(long)]
        ttl: Option<String>,
        /// Write only if the key is at this version (0: only if absent).
        #[arg(long)]
        if_version: Option<u64>,
    },
    /// Print the value alone.
    Get { namespace: String, key: String },
    /// Delete a key.
    Del {
        namespace: String,
        key: String,
        /// Delete only if the key is at this version.
        #[arg(long)]
        if_version: Option<u64>,
    },
    /// Keys under a prefix, with their versions and values, in key order.
    Scan {
        namespace: String,
        #[arg(default_value = "")]
        prefix: String,
        /// Stop after this many items.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
}

/// Runs the command; the process exit code says whether it worked.
pub fn main(cli: Cli) -> ExitCode {
    let (default_level, otlp) = match &cli.command {
        Command::Up { traces, .. } => ("info", traces.otlp("prism")),
        Command::ControlPlane { traces, .. } => ("info", traces.otlp("prism-control-plane")),
        Command::Proxy { traces, .. } => ("info", traces.otlp("prism-proxy")),
        Command::DemoUpstream { .. } => ("info", None),
        _ => ("warn", None),
    };
    let traces = match telemetry::init(default_level, otlp) {
        Ok(traces) => traces,
        Err(error) => {
            eprintln!("error: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let workers = match &cli.command {
        Command::Proxy { workers, .. } => workers.map(NonZeroUsize::get),
        _ => None,
    };
    // One worker is one event loop on the main thread, like nginx's worker:
    // the load harness measured 10-25% more requests per CPU second than a
    // one-worker multi-thread runtime, which hands work between threads.
    let mut builder = match workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all();
    let runtime = match builder.build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(dispatch(cli));
    // After the runtime: the last spans may still be coming in from it.
    drop(runtime);
    traces.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let token = match cli.token {
        Some(token) => Some(token),
        None => std::fs::read_to_string(&cli.token_file)
            .ok()
            .map(|text| text.trim().to_string()),
    };
    let admin_ca = match &cli.admin_ca {
        Some(path) => Some(
            std::fs::read(path)
                .with_context(|| format!("cannot read --admin-ca {}", path.display()))?,
        ),
        None => None,
    };
    let client = AdminClient::new(&cli.admin_url, token, admin_ca.as_deref())?;
    match cli.command {
        Command::Up {
            data_dir,
            admin_addr,
            xds_addr,
            proxy_addr,
            proxy_tls_addr,
            proxy_admin_addr,
            demo_addr,
            load_report_interval,
            limits,
            traces: _,
        } => {
            let config = UpConfig {
                data_dir,
                admin_addr,
                xds_addr,
                proxy_addr,
                proxy_tls_addr,
                proxy_admin_addr,
                demo_addr,
                node_id: default_node_id(),
                zone: "local".into(),
                load_report_interval,
                limits: limits.into(),
            };
            crate::up::run(config, shutdown_signal()).await
        }
        Command::ControlPlane {
            data_dir,
            admin_addr,
            xds_addr,
            envoy_listener_addr,
            envoy_tls_listener_addr,
            admin_tls_cert,
            admin_tls_key,
            xds_tls_cert,
            xds_tls_key,
            xds_client_ca,
            load_report_interval,
            traces: _,
        } => {
            let files = |cert: Option<PathBuf>, key: Option<PathBuf>| {
                Some(prism_control_plane::TlsFiles {
                    cert: cert?,
                    key: key?,
                })
            };
            let scheme = |tls: bool| if tls { "https" } else { "http" };
            let schemes = (
                scheme(admin_tls_cert.is_some()),
                scheme(xds_tls_cert.is_some()),
            );
            let admin = bind("admin API", admin_addr).await?;
            let xds = bind("discovery server", xds_addr).await?;
            let control_plane =
                prism_control_plane::ControlPlane::open(prism_control_plane::Config {
                    data_dir,
                    envoy_listener: envoy_listener_addr,
                    envoy_tls_listener: envoy_tls_listener_addr,
                    admin_tls: files(admin_tls_cert, admin_tls_key),
                    xds_tls: files(xds_tls_cert, xds_tls_key),
                    xds_client_ca,
                    load_report_interval,
                })
                .await
                .context("control plane")?;
            // Tests and scripts read this line to learn ports chosen by the
            // OS; printed once the store is open, so the admin token file
            // is there too.
            println!(
                "listening: admin={}://{} xds={}://{}",
                schemes.0,
                admin.local_addr()?,
                schemes.1,
                xds.local_addr()?
            );
            control_plane
                .serve(
                    prism_control_plane::Listeners { admin, xds },
                    shutdown_signal(),
                )
                .await
                .context("control plane")
        }
        Command::Proxy {
            control_plane,
            listen,
            tls_listen,
            admin_addr,
            node_id,
            zone,
            region,
            advertise_address,
            data_dir,
            namespaces,
            selector,
            workers: _,
            control_plane_ca,
            control_plane_cert,
            control_plane_key,
            limits,
            metrics,
            access_log,
            traces: _,
        } => {
            let proxy = bind("proxy", listen).await?;
            let tls = bind("proxy TLS", tls_listen).await?;
            let admin = bind("proxy admin", admin_addr).await?;
            let proxy_addr = proxy.local_addr()?;
            println!(
                "listening: proxy=http://{proxy_addr} admin=http://{} tls=https://{}",
                admin.local_addr()?,
                tls.local_addr()?
            );
            let config = prism_data_plane::Config {
                control_plane,
                node_id: node_id.unwrap_or_else(default_node_id),
                zone,
                region,
                advertise_address: advertise_address.unwrap_or_else(|| proxy_addr.to_string()),
                data_dir: Some(data_dir),
                namespaces: namespaces.unwrap_or_default(),
                selector: selector.unwrap_or_default(),
                limits: limits.into(),
                metrics,
                access_log: Some(access_log),
                control_plane_tls: (control_plane_ca.is_some() || control_plane_cert.is_some())
                    .then(|| prism_data_plane::ControlPlaneTls {
                        ca: control_plane_ca,
                        identity: control_plane_cert.zip(control_plane_key),
                    }),
            };
            prism_data_plane::run(
                config,
                prism_data_plane::Listeners {
                    proxy,
                    tls: Some(tls),
                    admin,
                },
                shutdown_signal(),
            )
            .await
            .context("proxy")
        }
        Command::DemoUpstream { listen, name } => {
            let listener = bind("demo upstream", listen).await?;
            println!("listening: demo=http://{}", listener.local_addr()?);
            crate::demo::serve(listener, name, shutdown_signal()).await;
            Ok(())
        }
        Command::Apply {
            file,
            dry_run,
            if_match,
        } => {
            let document = if file.as_os_str() == "-" {
                let mut text = String::new();
                std::io::stdin()
                    .read_to_string(&mut text)
                    .context("cannot read standard input")?;
                text
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?
            };
            print!("{}", client.apply(document, dry_run, if_match).await?);
            Ok(())
        }
        Command::Get { kind, name, output } => {
            print!("{}", client.get(&kind, name.as_deref(), output).await?);
            Ok(())
        }
        Command::Delete { kind, name } => {
            print!("{}", client.delete(&kind, &name).await?);
            Ok(())
        }
        Command::History {
            namespace,
            author,
            limit,
        } => {
            let history = client.history(limit, namespace.as_deref(), author.as_deref());
            print!("{}", history.await?);
            Ok(())
        }
        Command::Diff { from, to } => {
            print!("{}", client.diff(from, to).await?);
            Ok(())
        }
        Command::Rollback {
            revision,
            dry_run,
            if_match,
        } => {
            print!("{}", client.rollback(revision, dry_run, if_match).await?);
            Ok(())
        }
        Command::Status => {
            print!("{}", client.status().await?);
            Ok(())
        }
        Command::Top { once: true } => {
            print!("{}", crate::client::traffic_table(&client.traffic().await?));
            Ok(())
        }
        Command::Top { once: false } => {
            // On a terminal each table replaces the last; piped, they follow
            // one another.
            let clear = if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                "\x1b[H\x1b[2J"
            } else {
                "\n"
            };
            client
                .traffic_stream(|summary| {
                    print!("{clear}{}", crate::client::traffic_table(summary));
                    let _ = std::io::Write::flush(&mut std::io::stdout());
                })
                .await
        }
        Command::Token { command } => {
            let out = match command {
                TokenCommand::Create {
                    subject,
                    role,
                    namespaces,
                } => client.create_token(&subject, &role, &namespaces).await?,
                TokenCommand::List => client.tokens().await?,
                TokenCommand::Revoke { id } => client.revoke_token(&id).await?,
            };
            print!("{out}");
            Ok(())
        }
        Command::Kv { command } => kv(&DataClient::new(&cli.proxy_url), command).await,
        Command::Pubsub { command } => pubsub(&DataClient::new(&cli.proxy_url), command).await,
    }
}

async fn pubsub(client: &DataClient, command: PubsubCommand) -> anyhow::Result<()> {
    match command {
        PubsubCommand::Pub {
            namespace,
            topic,
            message,
        } => println!(
            "{}",
            client
                .publish(&namespace, &topic, message.into_bytes())
                .await?
        ),
        PubsubCommand::Sub {
            namespace,
            topic,
            group,
        } => {
            let print = |message: &serde_json::Value| {
                let payload = match (
                    message["payload"].as_str(),
                    message["payload_base64"].as_str(),
                ) {
                    (Some(text), _) => text.to_string(),
                    (None, Some(base64)) => format!("base64:{base64}"),
                    (None, None) => String::new(),
                };
                println!("{payload}");
                // Each line as it comes, also into a pipe.
                let _ = std::io::stdout().flush();
            };
            client
                .subscribe(&namespace, &topic, group.as_deref(), print)
                .await?;
        }
    }
    Ok(())
}

async fn kv(client: &DataClient, command: KvCommand) -> anyhow::Result<()> {
    match command {
        KvCommand::Put {
            namespace,
            key,
            value,
            ttl,
            if_version,
        } => {
            let version = client
                .put(
                    &namespace,
                    &key,
                    value.into_bytes(),
                    ttl.as_deref(),
                    if_version,
                )
                .await?;
            println!("version {version}");
        }
        KvCommand::Get { namespace, key } => {
            let value = client.get(&namespace, &key).await?;
            // The value alone, as it is: a script gets exactly its bytes,
            // with a newline after text that has none.
            let mut out = std::io::stdout().lock();
            out.write_all(&value)?;
            if std::str::from_utf8(&value).is_ok() && !value.ends_with(b"\n") {
                out.write_all(b"\n")?;
            }
        }
        KvCommand::Del {
            namespace,
            key,
            if_version,
        } => {
            let deleted = client.delete(&namespace, &key, if_version).await?;
            println!("{}", if deleted { "deleted" } else { "not found" });
        }
        KvCommand::Scan {
            namespace,
            prefix,
            limit,
        } => {
            for item in client.scan(&namespace, &prefix, limit).await? {
                println!("{}\t{}\t{}", item.key, item.version, printable(&item.value));
            }
        }
    }
    Ok(())
}

/// The proxy listener's wire limits, timeouts and drain
/// ([`prism_data_plane::Limits`], whose defaults these repeat and a test holds
/// them to).
#[derive(Args, Clone, Copy, Debug)]
pub struct LimitFlags {
    /// How long a client may take to send a request's headers, e.g. `10s`
    /// or `500ms`, from their first byte (or the connection's accept).
    #[arg(
        long,
        env = "PRISM_HEADER_READ_TIMEOUT",
        default_value = "10s",
        value_parser = parse_duration
    )]
    header_read_timeout: Duration,
    /// How long a client connection with no request in flight is kept open.
    #[arg(
        long,
        env = "PRISM_IDLE_TIMEOUT",
        default_value = "60s",
        value_parser = parse_duration
    )]
    idle_timeout: Duration,
    /// The largest request header block in bytes (431 beyond it); at least 8192.
    #[arg(
        long,
        env = "PRISM_MAX_REQUEST_HEADER_BYTES",
        default_value_t = 65536,
        value_parser = clap::value_parser!(u32).range(i64::from(prism_data_plane::MIN_MAX_REQUEST_HEADER_BYTES)..)
    )]
    max_request_header_bytes: u32,
    /// The most headers an HTTP/1 request may have (431 beyond it).
    #[arg(
        long,
        env = "PRISM_MAX_REQUEST_HEADERS",
        default_value_t = 100,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    max_request_headers: u32,
    /// HTTP/2 streams a client connection may have open at once.
    #[arg(
        long,
        env = "PRISM_MAX_CONCURRENT_STREAMS",
        default_value_t = 100,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    max_concurrent_streams: u32,
    /// Requests in flight across the proxy; beyond it clients get 503 at once.
    #[arg(
        long,
        env = "PRISM_MAX_CONCURRENT_REQUESTS",
        default_value_t = 10_000,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    max_concurrent_requests: u32,
    /// On SIGTERM or Ctrl-C, how long in-flight requests may take to finish.
    #[arg(
        long,
        env = "PRISM_DRAIN_TIMEOUT",
        default_value = "20s",
        value_parser = parse_duration
    )]
    drain_timeout: Duration,
}

impl From<LimitFlags> for prism_data_plane::Limits {
    fn from(flags: LimitFlags) -> Self {
        prism_data_plane::Limits {
            header_read_timeout: flags.header_read_timeout,
            idle_timeout: flags.idle_timeout,
            max_request_header_bytes: flags.max_request_header_bytes,
            max_request_headers: flags.max_request_headers,
            max_concurrent_streams: flags.max_concurrent_streams,
            max_concurrent_requests: flags.max_concurrent_requests,
            drain_timeout: flags.drain_timeout,
        }
    }
}

/// A positive duration such as `10s`, `2.5s`, `500ms` or `1m`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let seconds_per_unit = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        _ => {
            return Err(format!(
                "`{text}` is not a duration such as `10s` or `500ms`"
            ));
        }
    };
    number
        .parse::<f64>()
        .ok()
        .and_then(|n| Duration::try_from_secs_f64(n * seconds_per_unit).ok())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("`{text}` is not a positive duration such as `10s` or `500ms`"))
}

/// `<host name>-<pid>`: unique enough for a proxy that was given no id.
fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "prism".into());
    format!("{host}-{}", std::process::id())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("Shutting down.");
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn proxy_flags(args: &[&str]) -> Result<Command, clap::Error> {
        let argv = ["prism", "proxy"].iter().chain(args).copied();
        Cli::try_parse_from(argv).map(|cli| cli.command)
    }

    #[test]
    fn proxy_subset_and_data_dir_flags_parse() {
        let Ok(Command::Proxy {
            data_dir,
            namespaces,
            selector,
            ..
        }) = proxy_flags(&[
            "--data-dir",
            "/tmp/p",
            "--namespaces",
            "b,a",
            "--selector",
            "env=prod,tier=web",
        ])
        else {
            panic!("the flags parse");
        };
        assert_eq!(data_dir, PathBuf::from("/tmp/p"));
        assert_eq!(namespaces, Some(vec!["a".to_string(), "b".to_string()]));
        let selector = selector.expect("a selector");
        assert_eq!(selector.get("env").map(String::as_str), Some("prod"));
        assert_eq!(selector.get("tier").map(String::as_str), Some("web"));
    }

    fn proxy_limits(args: &[&str]) -> Result<prism_data_plane::Limits, clap::Error> {
        match proxy_flags(args)? {
            Command::Proxy { limits, .. } => Ok(limits.into()),
            other => panic!("a proxy command: {other:?}"),
        }
    }

    #[test]
    fn limit_flags_default_to_the_proxy_defaults_in_proxy_and_up() {
        assert_eq!(
            proxy_limits(&[]).expect("parse"),
            prism_data_plane::Limits::default()
        );
        match Cli::try_parse_from(["prism", "up"]).map(|cli| cli.command) {
            Ok(Command::Up { limits, .. }) => assert_eq!(
                prism_data_plane::Limits::from(limits),
                prism_data_plane::Limits::default()
            ),
            other => panic!("up parses: {other:?}"),
        }
    }

    #[test]
    fn limit_flags_parse_and_refuse_what_cannot_work() {
        let limits = proxy_limits(&[
            "--idle-timeout",
            "5m",
            "--max-request-header-bytes",
            "8192",
            "--max-request-headers",
            "20",
            "--max-concurrent-streams",
            "7",
            "--max-concurrent-requests",
            "3",
            "--drain-timeout",
            "2.5s",
        ])
        .expect("parse");
        assert_eq!(limits.idle_timeout, Duration::from_secs(300));
        assert_eq!(limits.max_request_header_bytes, 8192);
        assert_eq!(limits.max_request_headers, 20);
        assert_eq!(limits.max_concurrent_streams, 7);
        assert_eq!(limits.max_concurrent_requests, 3);
        assert_eq!(limits.drain_timeout, Duration::from_millis(2500));
        for (flag, bad) in [
            ("--max-request-header-bytes", "8191"),
            ("--max-request-headers", "0"),
            ("--max-concurrent-streams", "0"),
            ("--max-concurrent-requests", "0"),
            ("--drain-timeout", "0s"),
            ("--idle-timeout", "0s"),
        ] {
            let error = proxy_limits(&[flag, bad]).expect_err(flag);
            assert!(error.to_string().contains(bad), "{error}");
        }
    }

    #[test]
    fn header_read_timeout_defaults_to_10s_and_takes_units() {
        let timeout = |args: &[&str]| proxy_limits(args).expect("parse").header_read_timeout;
        assert_eq!(timeout(&[]), prism_data_plane::DEFAULT_HEADER_READ_TIMEOUT);
        assert_eq!(
            timeout(&["--header-read-timeout", "250ms"]),
            Duration::from_millis(250)
        );
        assert_eq!(
            timeout(&["--header-read-timeout", "2.5s"]),
            Duration::from_millis(2500)
        );
        assert_eq!(
            timeout(&["--header-read-timeout", "1m"]),
            Duration::from_secs(60)
        );
        for bad in ["0s", "10", "ten", "1h"] {
            let error = proxy_flags(&["--header-read-timeout", bad]).expect_err(bad);
            assert!(error.to_string().contains(bad), "{error}");
        }
    }

    #[test]
    fn proxy_workers_flag_parses_and_refuses_zero() {
        let Ok(Command::Proxy { workers, .. }) = proxy_flags(&["--workers", "1"]) else {
            panic!("the flag parses");
        };
        assert_eq!(workers.map(NonZeroUsize::get), Some(1));
        let Ok(Command::Proxy { workers, .. }) = proxy_flags(&[]) else {
            panic!("no flags parse");
        };
        assert_eq!(workers, None, "unset means one per available CPU");
        assert!(proxy_flags(&["--workers", "0"]).is_err());
    }

    #[test]
    fn a_malformed_selector_is_a_clear_error() {
        let error = proxy_flags(&["--selector", "foo"]).expect_err("refused");
        let message = error.to_string();
        assert!(
            message.contains("--selector") && message.contains("`foo` is not key=value"),
            "{message}"
        );
        let error = proxy_flags(&["--namespaces", "Not_A_Name"]).expect_err("refused");
        assert!(error.to_string().contains("Not_A_Name"), "{error}");
    }
}
