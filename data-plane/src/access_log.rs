//! Access logs: one JSON line per request of a namespace whose policy
//! switches them on (`Namespace.access_log.enabled`), written to the
//! proxy's `--access-log` destination (a file, or stdout for `-`).
//!
//! The request path never waits for the log and never does IO for it. A
//! request of a logging namespace carries a [`Pending`] line (its route
//! compiled with the namespace's [`RouteLog`]: no lookup), which the
//! route stage's [`crate::metrics::Recorder`] finishes where it records
//! the request's metrics, as the response body ends, and pushes into a
//! bounded queue with `try_send`. A full queue drops the line and counts
//! it (`prism_proxy_access_log_dropped_total`) instead of stalling the
//! request. One writer thread drains the queue into a buffered writer,
//! formatting each line there, and flushes whenever the queue is empty.
//! A route of a namespace without access logs holds `None`, and its
//! requests cost one branch.
//!
//! What the stages below the route stage learn (the endpoint that
//! answered, its latency, the retries) reaches the line through
//! [`UpstreamLog`], a shared slot in the request's extensions that only
//! requests of logging routes carry.

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use http::uri::Authority;
use http::{HeaderMap, Method, Request, StatusCode, Version};
use prometheus_client::metrics::counter::Counter;
use serde_json::json;
use tracing::warn;

use crate::http::server::ClientAddr;
use crate::http::tls::Tls;

/// How many lines may wait for the writer; past it lines are dropped.
pub(crate) const QUEUE: usize = 4096;

/// The longest `path` a line carries (bytes of the path and query); a
/// longer one is cut at a character boundary below it.
pub(crate) const MAX_PATH: usize = 1024;

/// The destination `-`: the proxy's stdout.
pub const STDOUT: &str = "-";

/// The proxy's access log: the sending end of the writer's queue and the
/// count of lines it dropped.
#[derive(Debug)]
pub(crate) struct AccessLog {
    queue: SyncSender<Box<Line>>,
    dropped: Counter,
}

/// Why the access log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The file cannot be opened for appending.
    #[error("cannot open the access log {}: {source}", path.display())]
    File { path: PathBuf, source: io::Error },
    /// The writer thread cannot be started.
    #[error("cannot start the access log writer: {0}")]
    Thread(io::Error),
}

/// What a route of a namespace with access logs on is compiled with: the
/// log, and the names its lines carry, shared by all its requests.
#[derive(Debug)]
pub(crate) struct RouteLog {
    pub log: Arc<AccessLog>,
    pub namespace: Arc<str>,
    /// The route's name within its namespace.
    pub route: Arc<str>,
}

/// What the stages below the route stage tell a logged request's line:
/// the endpoint that answered, how long it took to the response head, and
/// how many times the request was sent again. In the request's extensions
/// (shared by every try's copy) for requests of logging routes only.
#[derive(Clone, Debug, Default)]
pub(crate) struct UpstreamLog(Arc<UpstreamState>);

#[derive(Debug, Default)]
struct UpstreamState {
    endpoint: Mutex<Option<Authority>>,
    nanos: AtomicU64,
    retries: AtomicU32,
}

/// A logged request's line from its start: what the request said, before
/// its outcome is known.
#[derive(Debug)]
pub(crate) struct Pending {
    log: Arc<AccessLog>,
    line: Box<Line>,
    upstream: UpstreamLog,
}

/// One line's values, formatted by the writer.
#[derive(Debug)]
struct Line {
    time: SystemTime,
    namespace: Arc<str>,
    route: Arc<str>,
    backend: Option<String>,
    method: Method,
    authority: String,
    path: String,
    protocol: Version,
    trace_id: Option<String>,
    client: Option<SocketAddr>,
    https: bool,
    status: u16,
    duration: Duration,
    upstream: Option<Duration>,
    endpoint: Option<Authority>,
    request_bytes: u64,
    response_bytes: u64,
    retries: u32,
}

impl AccessLog {
    /// The log writing to `destination` (a file, appended to, or stdout for
    /// [`STDOUT`]) from a thread of its own, counting dropped lines in
    /// `dropped`. The thread ends once the last handle is dropped and the
    /// queue is written out.
    pub(crate) fn open(destination: &Path, dropped: Counter) -> Result<Arc<Self>, OpenError> {
        let out: Box<dyn Write + Send> = if destination == Path::new(STDOUT) {
            Box::new(io::stdout())
        } else {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(destination)
                .map_err(|source| OpenError::File {
                    path: destination.to_path_buf(),
                    source,
                })?;
            Box::new(file)
        };
        let (log, queue) = Self::with_capacity(QUEUE, dropped);
        std::thread::Builder::new()
            .name("prism-access-log".into())
            .spawn(move || write_loop(&queue, BufWriter::new(out)))
            .map_err(OpenError::Thread)?;
        Ok(log)
    }

    /// A log whose queue holds `capacity` lines, and its receiving end.
    fn with_capacity(capacity: usize, dropped: Counter) -> (Arc<Self>, Receiver<Box<Line>>) {
        let (queue, receiver) = std::sync::mpsc::sync_channel(capacity);
        (Arc::new(Self { queue, dropped }), receiver)
    }

    /// Queues `line` for the writer, or counts it dropped when the queue is
    /// full: never waits.
    fn push(&self, line: Box<Line>) {
        match self.queue.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.inc();
            }
        }
    }
}

impl UpstreamLog {
    /// `endpoint` answered with its response head after `took`.
    pub(crate) fn answered(&self, endpoint: &Authority, took: Duration) {
        *self
            .0
            .endpoint
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(endpoint.clone());
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.0.nanos.store(nanos, Ordering::Relaxed);
    }

    /// The request was sent again.
    pub(crate) fn retried(&self) {
        self.0.retries.fetch_add(1, Ordering::Relaxed);
    }
}

impl Pending {
    /// The line of `request`, starting now, of a route logging into `log`
    /// and forwarding to `backend` (full name), if any. A forwarded
    /// request carries [`Pending::upstream`] in its extensions.
    pub(crate) fn start<B>(log: &RouteLog, backend: Option<&str>, request: &Request<B>) -> Self {
        let extensions = request.extensions();
        let client = extensions.get::<ClientAddr>().map(|c| c.0);
        let https = extensions.get::<Tls>().is_some();
        let path = request
            .uri()
            .path_and_query()
            .map_or_else(|| request.uri().path(), |p| p.as_str());
        let line = Box::new(Line {
            time: SystemTime::now(),
            namespace: Arc::clone(&log.namespace),
            route: Arc::clone(&log.route),
            backend: backend.map(|b| b.split_once('/').map_or(b, |(_, n)| n).to_string()),
            method: request.method().clone(),
            authority: crate::http::route::request_host(request).to_string(),
            path: capped(path, MAX_PATH).to_string(),
            protocol: request.version(),
            trace_id: trace_id(request.headers()),
            client,
            https,
            status: 0,
            duration: Duration::ZERO,
            upstream: None,
            endpoint: None,
            request_bytes: 0,
            response_bytes: 0,
            retries: 0,
        });
        Self {
            log: Arc::clone(&log.log),
            line,
            upstream: UpstreamLog::default(),
        }
    }

    /// The slot the stages below the route stage fill in for this line.
    pub(crate) fn upstream(&self) -> UpstreamLog {
        self.upstream.clone()
    }

    /// The request ended with `status` after `took`, with bodies of
    /// `request_bytes` and `response_bytes`: the line goes to the writer's
    /// queue.
    pub(crate) fn finish(
        self,
        status: StatusCode,
        took: Duration,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        let Pending {
            log,
            mut line,
            upstream,
        } = self;
        line.status = status.as_u16();
        line.duration = took;
        line.request_bytes = request_bytes;
        line.response_bytes = response_bytes;
        line.endpoint = upstream
            .0
            .endpoint
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        line.upstream = line
            .endpoint
            .is_some()
            .then(|| Duration::from_nanos(upstream.0.nanos.load(Ordering::Relaxed)));
        line.retries = upstream.0.retries.load(Ordering::Relaxed);
        log.push(line);
    }
}

impl Line {
    /// The JSON object of this line.
    fn to_json(&self) -> serde_json::Value {
        json!({
            "time": rfc3339_millis(self.time),
            "namespace": &*self.namespace,
            "route": &*self.route,
            "backend": self.backend,
            "endpoint": self.endpoint.as_ref().map(Authority::as_str),
            "method": self.method.as_str(),
            "authority": self.authority,
            "path": self.path,
            "protocol": protocol(self.protocol),
            "status": self.status,
            "duration_ms": millis(self.duration),
            "upstream_duration_ms": self.upstream.map(millis),
            "request_bytes": self.request_bytes,
            "response_bytes": self.response_bytes,
            "retries": self.retries,
            // The request's `traceparent` as the route stage left it: the
            // proxy's span's trace with traces on, else the client's.
            "trace_id": self.trace_id,
            "client_address": self.client.map(|c| c.to_string()),
            "listener": if self.https { "https" } else { "http" },
        })
    }
}

/// The writer: each line from `queue` into `out`, flushed whenever the
/// queue is empty; returns when every sender is gone.
fn write_loop(queue: &Receiver<Box<Line>>, mut out: impl Write) {
    let mut failing = false;
    while let Ok(mut line) = queue.recv() {
        loop {
            let written = serde_json::to_writer(&mut out, &line.to_json())
                .map_err(io::Error::from)
                .and_then(|()| out.write_all(b"\n"));
            report(&mut failing, written);
            match queue.try_recv() {
                Ok(next) => line = next,
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        report(&mut failing, out.flush());
    }
    report(&mut failing, out.flush());
}

/// Logs a write error once, until writes succeed again.
fn report(failing: &mut bool, result: io::Result<()>) {
    match result {
        Ok(()) => *failing = false,
        Err(error) if !*failing => {
            *failing = true;
            warn!(%error, "Failed to write the access log; lines are lost until it recovers.");
        }
        Err(_) => {}
    }
}

/// The trace id of a W3C `traceparent` header (`00-<32 hex>-<16 hex>-<2
/// hex>`), if it has a valid one: lowercase hex, not all zeros.
fn trace_id(headers: &HeaderMap) -> Option<String> {
    let value = headers.get("traceparent")?.to_str().ok()?;
    let mut parts = value.trim().split('-');
    let (version, id) = (parts.next()?, parts.next()?);
    let valid = version.len() == 2
        && version != "ff"
        && id.len() == 32
        && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        && id.bytes().any(|b| b != b'0');
    valid.then(|| id.to_string())
}

/// `text` cut to at most `max` bytes, at a character boundary.
fn capped(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// `time` as RFC 3339 in UTC with milliseconds: `2026-11-28T13:05:09.042Z`.
fn rfc3339_millis(time: SystemTime) -> String {
    let t = time::OffsetDateTime::from(time);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// `took` in milliseconds, to the microsecond.
fn millis(took: Duration) -> f64 {
    (took.as_micros() as f64) / 1000.0
}

fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

#[cfg(test)]
mod tests;
