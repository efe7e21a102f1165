//! The data gateway's overhead: each operation through the proxy against the
//! same operation done directly, in one run.
//!
//! Starts the real `prism control-plane` and `prism proxy` binaries, binds a
//! namespace to an SQLite file in the proxy's data directory and two more to
//! NATS on 127.0.0.1:4222 (core, and JetStream with a stream), then measures:
//!
//! - SQLite Get and Put at a fixed request rate (open loop: requests are sent
//!   on a schedule whatever the answers do, and each latency counts from the
//!   scheduled send, so a stall is not hidden by sending less), through the
//!   proxy (gRPC on one HTTP/2 connection) and through the proxy's own
//!   SQLite store (prism-datastore, over sqlx) opened in the bench on the same
//!   file: what the proxy adds is all that differs;
//! - NATS publish throughput with concurrent publishers (closed loop), through
//!   the proxy and through async-nats, core against core and JetStream
//!   against JetStream;
//! - publish → deliver latency at a moderate fixed rate, through the proxy's
//!   Subscribe stream and through an async-nats subscription.
//!
//! It prints a markdown table (and writes it to `--out FILE` if given):
//! `cargo bench --bench data -- --rate 10000 --seconds 3`. Puts run at
//! `--rate` too unless `--put-rate` says otherwise: SQLite writes one at a
//! time, and past the rate it sustains a Put's latency is its wait in line.
//! NATS must be running: the bench fails, saying so, when it is not.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use futures::{Stream, StreamExt as _};
use prism_data_plane::data::pb::key_value_client::KeyValueClient;
use prism_data_plane::data::pb::pub_sub_client::PubSubClient;
use prism_data_plane::data::pb::{GetRequest, PublishRequest, PutRequest, SubscribeRequest, Write};
use prism_datastore::{KeyValue, KvParams, KvStore, Put};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tonic::transport::Channel;

use support::Prism;

mod support;

const NATS_URL: &str = "nats://127.0.0.1:4222";
/// The JetStream stream of the `js` namespace, deleted when the bench ends.
const STREAM: &str = "PRISM_BENCH_DATA";
/// Keys the Get and Put runs spread over, written before they start.
const KEYS: u64 = 1_000;
const VALUE: [u8; 100] = [b'v'; 100];
const PAYLOAD: [u8; 128] = [b'p'; 128];
/// Publishes one streaming publisher keeps unanswered, through the proxy's
/// PublishStream (which publishes 64 at once) and directly alike.
const WINDOW: usize = 64;
/// How long to wait for a process, a binding or the last delivery.
const DEADLINE: Duration = Duration::from_secs(30);

/// The namespace `kv` keeps its items in SQLite, `core` and `js` publish to
/// NATS without and with a stream.
fn policy() -> String {
    format!(
        "namespaces:\n\
         \x20 - {{name: kv, hosts: [kv.bench]}}\n\
         \x20 - {{name: core, hosts: [core.bench]}}\n\
         \x20 - {{name: js, hosts: [js.bench]}}\n\
         bindings:\n\
         \x20 - {{name: kv/store, sqlite: {{path: kv.db}}}}\n\
         \x20 - {{name: core/bus, nats: {{url: \"{NATS_URL}\"}}}}\n\
         \x20 - {{name: js/bus, nats: {{url: \"{NATS_URL}\", stream: {STREAM}}}}}\n"
    )
}

#[derive(Parser)]
struct Args {
    /// KeyValue requests per second, proxied and direct alike.
    #[arg(long, default_value_t = 10_000.0)]
    rate: f64,
    /// Puts per second; `--rate` unless given. SQLite takes one writer at a
    /// time: past the rate it sustains, a Put's latency is its wait in line.
    #[arg(long)]
    put_rate: Option<f64>,
    /// Seconds each measurement runs.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Requests in flight at most in the fixed-rate runs; a request past it
    /// waits, and its wait counts in its latency.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Concurrent publishers in the throughput runs.
    #[arg(long, default_value_t = 32)]
    publishers: usize,
    /// Messages per second in the publish → deliver runs.
    #[arg(long, default_value_t = 1_000.0)]
    latency_rate: f64,
    /// The proxy's `--workers`: its runtime's threads. 1, one event loop,
    /// as the load harness runs it.
    #[arg(long, default_value_t = 1)]
    proxy_workers: usize,
    /// Also write the table to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// A control plane and one proxy serving [`policy`].
struct Gateway {
    _control_plane: Prism,
    _proxy: Prism,
    channel: Channel,
    /// The proxy's data directory, where the SQLite file is.
    data_dir: PathBuf,
}

impl Gateway {
    async fn start(dir: &Path, workers: usize) -> Self {
        let data_dir = dir.join("proxy");
        let control_plane = Prism::control_plane(&dir.join("control-plane"));
        let admin = control_plane.address("admin");
        let token = Prism::admin_token(&dir.join("control-plane"));
        let http = reqwest::Client::new();
        let answer: serde_json::Value = eventually("the admin API applies the policy", || {
            let request = http
                .post(format!("{admin}/v1/apply"))
                .bearer_auth(&token)
                .header("content-type", "application/yaml")
                .body(policy());
            async move { request.send().await.ok()?.json().await.ok() }
        })
        .await;
        let revision = answer["revision"]
            .as_u64()
            .unwrap_or_else(|| panic!("the policy is refused: {answer}"));
        let (xds, data_dir_arg) = (control_plane.address("xds"), data_dir.display().to_string());
        let mut args = vec![
            "proxy",
            "--control-plane",
            &xds,
            "--listen",
            "127.0.0.1:0",
            "--tls-listen",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--node-id",
            "bench",
            "--data-dir",
            &data_dir_arg,
        ];
        let workers = workers.to_string();
        args.extend(["--workers", &workers]);
        let proxy = Prism::start(&args);
        let proxy_admin = proxy.address("admin");
        eventually("the proxy serves the bindings", || {
            let request = http.get(format!("{proxy_admin}/config_dump"));
            async move {
                let dump: serde_json::Value = request.send().await.ok()?.json().await.ok()?;
                dump["revision"].as_u64().filter(|r| *r >= revision)
            }
        })
        .await;
        let channel = Channel::from_shared(proxy.address("proxy"))
            .expect("the proxy's URL")
            .connect()
            .await
            .expect("connect to the proxy");
        Self {
            _control_plane: control_plane,
            _proxy: proxy,
            channel,
            data_dir,
        }
    }

    fn kv(&self) -> KeyValueClient<Channel> {
        KeyValueClient::new(self.channel.clone())
    }

    fn bus(&self) -> PubSubClient<Channel> {
        PubSubClient::new(self.channel.clone())
    }
}

/// Polls `check` until it answers, for at most [`DEADLINE`].
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{what}: not within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Latencies of a fixed-rate run, sorted, and the rate it achieved.
struct Latencies {
    sorted: Vec<Duration>,
    errors: usize,
    rate: f64,
}

impl Latencies {
    fn new(mut sorted: Vec<Duration>, errors: usize, elapsed: Duration) -> Self {
        sorted.sort();
        let rate = sorted.len() as f64 / elapsed.as_secs_f64();
        Self {
            sorted,
            errors,
            rate,
        }
    }

    fn percentile(&self, p: f64) -> Duration {
        if self.sorted.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * self.sorted.len() as f64).ceil() as usize;
        self.sorted[rank.clamp(1, self.sorted.len()) - 1]
    }

    fn max(&self) -> Duration {
        self.sorted.last().copied().unwrap_or_default()
    }
}

/// When request `i` of a run at `rate` per second starting at `start` is due.
fn scheduled(start: Instant, rate: f64, i: u64) -> Instant {
    start + Duration::from_secs_f64(i as f64 / rate)
}

/// Calls `op(i, due)` for `i` in `0..rate × seconds`, each when it is due,
/// with at most `concurrency` in flight, and times each from when it was due.
///
/// A thread of its own paces the sends: tokio's timer ticks in milliseconds,
/// too coarse for 10,000 a second, while a thread's sleep is exact to tens
/// of microseconds.
async fn open_loop<F, Fut, T, E>(rate: f64, seconds: f64, concurrency: usize, op: F) -> Latencies
where
    F: Fn(u64, Instant) -> Fut,
    Fut: Future<Output = Result<T, E>> + Send + 'static,
    T: Send + 'static,
    E: Send + 'static,
{
    let count = (rate * seconds) as u64;
    let start = Instant::now() + Duration::from_millis(10);
    let (due, mut sends) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for i in 0..count {
            let at = scheduled(start, rate, i);
            if let Some(wait) = at.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if due.send(i).is_err() {
                return;
            }
        }
    });
    let limit = Arc::new(Semaphore::new(concurrency));
    let mut calls = JoinSet::new();
    while let Some(i) = sends.recv().await {
        let permit = limit.clone().acquire_owned().await;
        let at = scheduled(start, rate, i);
        let call = op(i, at);
        calls.spawn(async move {
            let ok = call.await.is_ok();
            drop(permit);
            (Instant::now().saturating_duration_since(at), ok)
        });
    }
    let results = calls.join_all().await;
    let elapsed = start.elapsed();
    let errors = results.iter().filter(|(_, ok)| !ok).count();
    let latencies = results
        .into_iter()
        .filter_map(|(latency, ok)| ok.then_some(latency))
        .collect();
    Latencies::new(latencies, errors, elapsed)
}

/// Runs `op` in a loop on `workers` tasks for `seconds`, then `finish`;
/// answers the successful calls per second, `finish` included.
async fn closed_loop<F, Fut, T, E, Done>(workers: usize, seconds: f64, op: F, finish: Done) -> f64
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<T, E>> + Send,
    Done: Future<Output = ()>,
{
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(seconds);
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..workers {
        let op = op.clone();
        let done = done.clone();
        tasks.spawn(async move {
            while Instant::now() < end {
                if op().await.is_ok() {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    tasks.join_all().await;
    finish.await;
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// Publishes `each` on `workers` tasks for `seconds`, each keeping up to
/// [`WINDOW`] unanswered: `publish` sends one and gives the future of its
/// answer, awaited in order. Answered publishes per second.
async fn windowed<P, A, E>(workers: usize, seconds: f64, publish: P) -> f64
where
    P: Fn() -> A + Clone + Send + 'static,
    A: Future<Output = Result<(), E>> + Send + 'static,
    E: Send + 'static,
{
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(seconds);
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..workers {
        let (publish, done) = (publish.clone(), done.clone());
        tasks.spawn(async move {
            let mut pending = futures::stream::FuturesOrdered::new();
            while Instant::now() < end || !pending.is_empty() {
                if Instant::now() < end && pending.len() < WINDOW {
                    pending.push_back(publish());
                    continue;
                }
                if let Some(Ok(())) = pending.next().await {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    tasks.join_all().await;
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// Publishes through the proxy's PublishStream on `streams` streams for
/// `seconds`, each keeping up to [`WINDOW`] messages unanswered. Answered
/// messages per second.
async fn streamed(
    bus: PubSubClient<Channel>,
    namespace: &'static str,
    streams: usize,
    seconds: f64,
) -> f64 {
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(seconds);
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..streams {
        let (mut bus, done) = (bus.clone(), done.clone());
        tasks.spawn(async move {
            let window = Arc::new(Semaphore::new(WINDOW));
            let (messages, outgoing) = mpsc::channel(WINDOW);
            let sender = {
                let window = window.clone();
                tokio::spawn(async move {
                    while Instant::now() < end {
                        let Ok(permit) = window.acquire().await else {
                            break;
                        };
                        permit.forget();
                        let message =
                            publish_request(namespace, "streamed", Bytes::from_static(&PAYLOAD));
                        if messages.send(message).await.is_err() {
                            break;
                        }
                    }
                })
            };
            let mut answers = bus
                .publish_stream(tokio_stream::wrappers::ReceiverStream::new(outgoing))
                .await
                .expect("a publish stream through the proxy")
                .into_inner();
            while let Ok(Some(_)) = answers.message().await {
                done.fetch_add(1, Ordering::Relaxed);
                window.add_permits(1);
            }
            sender.abort();
        });
    }
    tasks.join_all().await;
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

fn key(i: u64) -> String {
    format!("key/{}", i % KEYS)
}

/// The proxy's own SQLite store, opened in this process on the proxy's file
/// and namespace: the same statements, pool and reads, without the proxy.
async fn sqlite(path: &Path) -> Arc<dyn KeyValue> {
    let params = KvParams {
        namespace: "kv".into(),
        store: KvStore::Sqlite {
            path: path.to_path_buf(),
        },
        pool_size: 4,
        connect_timeout: Duration::from_secs(5),
    };
    prism_datastore::open_kv(&params)
        .await
        .expect("open the proxy's SQLite file")
}

async fn proxy_put(kv: KeyValueClient<Channel>, i: u64) -> Result<u64, tonic::Status> {
    let mut kv = kv;
    let write = Write {
        key: key(i),
        value: VALUE.to_vec().into(),
        ..Default::default()
    };
    let request = PutRequest {
        namespace: "kv".into(),
        write: Some(write),
    };
    Ok(kv.put(request).await?.into_inner().version)
}

async fn proxy_get(kv: KeyValueClient<Channel>, i: u64) -> Result<u64, tonic::Status> {
    let mut kv = kv;
    let request = GetRequest {
        namespace: "kv".into(),
        key: key(i),
    };
    Ok(kv.get(request).await?.into_inner().version)
}

async fn direct_get(store: Arc<dyn KeyValue>, i: u64) -> Result<u64, prism_datastore::Error> {
    let item = store.get(&key(i)).await?;
    Ok(item.map_or(0, |item| item.version))
}

async fn direct_put(store: Arc<dyn KeyValue>, i: u64) -> Result<u64, prism_datastore::Error> {
    store
        .put(Put {
            key: key(i),
            value: Bytes::from_static(&VALUE),
            ttl: None,
            expected_version: None,
            idempotency_key: None,
        })
        .await
}

/// One row of the table.
struct Row {
    what: String,
    proxy: String,
    direct: String,
    added: String,
    target: String,
    met: &'static str,
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn met(ok: bool) -> &'static str {
    if ok { "yes" } else { "**no**" }
}

/// p50, p99 and max rows for one operation, proxied and direct; `targets`
/// are the most the proxy may add at p50 and p99.
fn latency_rows(
    what: &str,
    proxy: &Latencies,
    direct: &Latencies,
    targets: Option<(Duration, Duration)>,
) -> Vec<Row> {
    let mut rows = Vec::new();
    for (name, p, target) in [
        ("p50", 50.0, targets.map(|t| t.0)),
        ("p99", 99.0, targets.map(|t| t.1)),
    ] {
        let (a, b) = (proxy.percentile(p), direct.percentile(p));
        let added = a.as_secs_f64() - b.as_secs_f64();
        rows.push(Row {
            what: format!("{what} {name}"),
            proxy: ms(a),
            direct: ms(b),
            added: format!("{:+.3} ms", added * 1e3),
            target: target.map_or("–".into(), |t| format!("adds < {}", ms(t))),
            met: target.map_or("–", |t| met(added < t.as_secs_f64())),
        });
    }
    rows.push(Row {
        what: format!("{what} max"),
        proxy: ms(proxy.max()),
        direct: ms(direct.max()),
        added: format!(
            "{:+.3} ms",
            (proxy.max().as_secs_f64() - direct.max().as_secs_f64()) * 1e3
        ),
        target: "–".into(),
        met: "–",
    });
    rows.push(Row {
        what: format!("{what} achieved rate (errors)"),
        proxy: format!("{:.0}/s ({})", proxy.rate, proxy.errors),
        direct: format!("{:.0}/s ({})", direct.rate, direct.errors),
        added: "–".into(),
        target: "–".into(),
        met: "–",
    });
    rows
}

/// Throughput row: the proxy's rate as a share of the direct one.
fn throughput_row(what: &str, proxy: f64, direct: f64, target: bool) -> Row {
    let ratio = proxy / direct;
    Row {
        what: what.into(),
        proxy: format!("{proxy:.0} msg/s"),
        direct: format!("{direct:.0} msg/s"),
        added: format!("{:.1} %", ratio * 100.0),
        target: if target { "≥ 90 %" } else { "–" }.into(),
        met: if target { met(ratio >= 0.9) } else { "–" },
    }
}

/// SQLite Get and Put at `args.rate`, proxied and direct.
async fn key_value(gateway: &Gateway, args: &Args) -> Vec<Row> {
    let kv = gateway.kv();
    // Every key exists before the Gets, written through the proxy.
    let written = open_loop(5_000.0, KEYS as f64 / 5_000.0, 64, |i, _| {
        proxy_put(kv.clone(), i)
    })
    .await;
    assert_eq!(written.errors, 0, "the keys are written");
    let store = sqlite(&gateway.data_dir.join("kv.db")).await;

    let proxy = open_loop(args.rate, args.seconds, args.concurrency, |i, _| {
        proxy_get(kv.clone(), i)
    })
    .await;
    let direct = open_loop(args.rate, args.seconds, args.concurrency, |i, _| {
        direct_get(store.clone(), i)
    })
    .await;
    let mut rows = latency_rows(
        &format!("SQLite Get @ {:.0}/s", args.rate),
        &proxy,
        &direct,
        Some((Duration::from_micros(300), Duration::from_millis(2))),
    );
    let put_rate = args.put_rate.unwrap_or(args.rate);
    let proxy = open_loop(put_rate, args.seconds, args.concurrency, |i, _| {
        proxy_put(kv.clone(), i)
    })
    .await;
    let direct = open_loop(put_rate, args.seconds, args.concurrency, |i, _| {
        direct_put(store.clone(), i)
    })
    .await;
    rows.extend(latency_rows(
        &format!("SQLite Put @ {put_rate:.0}/s"),
        &proxy,
        &direct,
        None,
    ));
    store.close().await;
    rows
}

/// A publish payload of [`PAYLOAD`]'s size that starts with `due`, in
/// nanoseconds since `epoch`.
fn stamped(epoch: Instant, due: Instant) -> Bytes {
    let mut payload = PAYLOAD.to_vec();
    let nanos = due.saturating_duration_since(epoch).as_nanos() as u64;
    payload[..8].copy_from_slice(&nanos.to_be_bytes());
    payload.into()
}

/// Publishes with `publish` at `args.latency_rate` and times each message
/// from when it was due to when it arrives on `deliveries`. A message that
/// never arrives counts as an error.
async fn delivery_latency<S, F, Fut, T, E>(args: &Args, deliveries: S, publish: F) -> Latencies
where
    S: Stream<Item = Bytes> + Send + 'static,
    F: Fn(Bytes) -> Fut,
    Fut: Future<Output = Result<T, E>> + Send + 'static,
    T: Send + 'static,
    E: Send + 'static,
{
    let epoch = Instant::now();
    let count = (args.latency_rate * args.seconds) as usize;
    let receiver = tokio::spawn(async move {
        let mut deliveries = Box::pin(deliveries);
        let mut latencies = Vec::with_capacity(count);
        while latencies.len() < count {
            let Ok(Some(payload)) = tokio::time::timeout(DEADLINE, deliveries.next()).await else {
                break;
            };
            let mut nanos = [0; 8];
            nanos.copy_from_slice(&payload[..8]);
            let due = epoch + Duration::from_nanos(u64::from_be_bytes(nanos));
            latencies.push(Instant::now().saturating_duration_since(due));
        }
        latencies
    });
    let sent = open_loop(
        args.latency_rate,
        args.seconds,
        args.concurrency,
        |_, due| publish(stamped(epoch, due)),
    )
    .await;
    assert_eq!(sent.errors, 0, "every message is published");
    let latencies = receiver.await.expect("the receiver runs to its end");
    let lost = count - latencies.len();
    Latencies::new(latencies, lost, Duration::from_secs_f64(args.seconds))
}

fn publish_request(namespace: &str, topic: &str, payload: Bytes) -> PublishRequest {
    PublishRequest {
        namespace: namespace.into(),
        topic: topic.into(),
        payload,
        idempotency_key: String::new(),
    }
}

/// NATS publish throughput, core and JetStream, and core publish → deliver
/// latency, proxied and direct.
async fn pubsub(gateway: &Gateway, nats: &async_nats::Client, args: &Args) -> Vec<Row> {
    let bus = gateway.bus();
    let proxy_publish = |namespace: &'static str, topic: &'static str| {
        let bus = bus.clone();
        move || {
            let mut bus = bus.clone();
            async move {
                let payload = Bytes::from_static(&PAYLOAD);
                bus.publish(publish_request(namespace, topic, payload))
                    .await
            }
        }
    };
    let direct_publish = |flush: bool| {
        let nats = nats.clone();
        move || {
            let nats = nats.clone();
            async move {
                nats.publish("bench.direct", Bytes::from_static(&PAYLOAD))
                    .await?;
                if flush {
                    nats.flush().await?;
                }
                Ok::<_, async_nats::Error>(())
            }
        }
    };
    let js = async_nats::jetstream::new(nats.clone());
    let stream_publish = move || {
        let js = js.clone();
        async move {
            js.publish("prism.js.direct", Bytes::from_static(&PAYLOAD))
                .await?
                .await?;
            Ok::<_, async_nats::Error>(())
        }
    };
    let n = args.publishers;
    let seconds = args.seconds;
    let proxied_core = closed_loop(n, seconds, proxy_publish("core", "throughput"), async {}).await;
    let flushed = nats.clone();
    let direct_core = closed_loop(n, seconds, direct_publish(false), async move {
        let _ = flushed.flush().await;
    })
    .await;
    let direct_core_each = closed_loop(n, seconds, direct_publish(true), async {}).await;
    let proxied_stream = closed_loop(n, seconds, proxy_publish("js", "throughput"), async {}).await;
    let direct_stream = closed_loop(n, seconds, stream_publish, async {}).await;
    let streams = n.div_ceil(WINDOW).max(1);
    let streamed_core = streamed(bus.clone(), "core", streams, seconds).await;
    let streamed_js = streamed(bus.clone(), "js", streams, seconds).await;
    let js = async_nats::jetstream::new(nats.clone());
    let direct_js_windowed = windowed(streams, seconds, move || {
        let js = js.clone();
        async move {
            let ack = js
                .publish("prism.js.direct", Bytes::from_static(&PAYLOAD))
                .await?;
            ack.await?;
            Ok::<_, async_nats::Error>(())
        }
    })
    .await;
    let mut rows = vec![
        throughput_row(
            &format!("NATS core publish, {n} publishers (direct: flush at end)"),
            proxied_core,
            direct_core,
            true,
        ),
        throughput_row(
            &format!("NATS core publish, {n} publishers (direct: flush each, as the proxy does)"),
            proxied_core,
            direct_core_each,
            true,
        ),
        throughput_row(
            &format!("JetStream publish, {n} publishers (each waits for its ack)"),
            proxied_stream,
            direct_stream,
            true,
        ),
        throughput_row(
            &format!(
                "NATS core publish, {streams} PublishStream(s) of {WINDOW} in flight (direct: flush at end)"
            ),
            streamed_core,
            direct_core,
            true,
        ),
        throughput_row(
            &format!(
                "JetStream publish, {streams} PublishStream(s) of {WINDOW} in flight (direct: {WINDOW} acks pending)"
            ),
            streamed_js,
            direct_js_windowed,
            true,
        ),
    ];

    let mut subscription = gateway
        .bus()
        .subscribe(SubscribeRequest {
            namespace: "core".into(),
            topic: "latency".into(),
            ..Default::default()
        })
        .await
        .expect("subscribe through the proxy")
        .into_inner();
    // The first message names the subscription; deliveries follow.
    subscription
        .message()
        .await
        .expect("the subscription opens")
        .expect("the stream is open");
    let deliveries = subscription.filter_map(|m| async move { m.ok().map(|m| m.payload) });
    let publish = |payload: Bytes| {
        let mut bus = gateway.bus();
        async move {
            bus.publish(publish_request("core", "latency", payload))
                .await
        }
    };
    let proxy = delivery_latency(args, deliveries, publish).await;
    let subscriber = nats
        .subscribe("bench.latency")
        .await
        .expect("subscribe to NATS");
    nats.flush().await.expect("the subscription reaches NATS");
    let publish = |payload: Bytes| {
        let nats = nats.clone();
        async move {
            nats.publish("bench.latency", payload).await?;
            nats.flush().await?;
            Ok::<_, async_nats::Error>(())
        }
    };
    let direct = delivery_latency(args, subscriber.map(|m| m.payload), publish).await;
    rows.extend(latency_rows(
        &format!("NATS core publish → deliver @ {:.0}/s", args.latency_rate),
        &proxy,
        &direct,
        None,
    ));
    rows
}

fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| what | proxy | direct | added / proxy ÷ direct | target | met? |\n\
         |---|---|---|---|---|---|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            r.what, r.proxy, r.direct, r.added, r.target, r.met
        ));
    }
    out
}

async fn run(args: Args) {
    let nats = tokio::time::timeout(Duration::from_secs(5), async_nats::connect(NATS_URL))
        .await
        .map_err(|elapsed| elapsed.to_string())
        .and_then(|connected| connected.map_err(|e| e.to_string()))
        .unwrap_or_else(|error| {
            panic!("NATS is not reachable at {NATS_URL} ({error}): start nats-server -js there")
        });
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = Gateway::start(dir.path(), args.proxy_workers).await;
    let mut rows = key_value(&gateway, &args).await;
    rows.extend(pubsub(&gateway, &nats, &args).await);
    drop(gateway);
    let _ = async_nats::jetstream::new(nats.clone())
        .delete_stream(STREAM)
        .await;

    let table = format!(
        "{}\n{} CPUs; proxy (`--workers {}`) and bench on the same machine; {:.0} s per \
         measurement, at most {} requests in flight in the fixed-rate runs.\n",
        table(&rows),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.proxy_workers,
        args.seconds,
        args.concurrency,
    );
    print!("{table}");
    if let Some(out) = &args.out {
        std::fs::write(out, &table).expect("write --out");
    }
}

fn main() {
    let args = Args::parse();
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(run(args));
}
