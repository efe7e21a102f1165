//! The data gateway: what a namespace's DataBindings compile to
//! ([`bindings`]: an opened KeyValue store or PubSub bus) and the APIs that
//! reach them on the proxy's own port, `prism.data.v1` over gRPC ([`grpc`])
//! and the same operations over HTTP/JSON ([`json`]). Both enter through one
//! stage, [`gate`], which takes the data API paths off the request path
//! before routing; both call the same operations ([`kv`], [`pubsub`]) and
//! answer their errors through one table ([`error`]).
//!
//! A call goes namespace → binding → store: the request names its
//! namespace, the runtime it loaded holds that namespace's binding, and the
//! binding holds the store (prism-datastore's trait object: no sqlx, NATS or
//! Kafka type is seen here). The namespace's rate limits and the proxy-wide
//! concurrency limit apply to data calls as to routed requests.

pub(crate) mod bindings;
mod error;
pub(crate) mod gate;
mod grpc;
mod json;
mod kv;
mod pubsub;

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;
use prism_proto::{Kind, Snapshot};

use crate::http::tls::Peer;
use crate::runtime::Runtime;
use bindings::{Binding, Settings};

pub(crate) use bindings::{Bindings, OpenError};
pub(crate) use error::DataError;

/// The generated messages and services of `prism.data.v1`, clients included
/// (tests and tools call the proxy with them).
pub mod pb {
    #![allow(clippy::all, missing_docs, rust_2018_idioms, unreachable_pub)]
    tonic::include_proto!("prism.data.v1");
}

/// The body of every data API answer: tonic's, which its services give and
/// any other body can be boxed into.
pub(crate) type DataBody = tonic::body::Body;

/// Who is calling: the host it called (which names its namespace), its
/// address, and the certificate it gave the TLS listener. The gate puts it
/// into each data call's extensions.
#[derive(Clone, Debug, Default)]
pub(crate) struct Caller {
    pub host: String,
    pub ip: Option<std::net::IpAddr>,
    pub peer: Option<Arc<Peer>>,
}

/// A JSON answer.
pub(crate) fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<DataBody> {
    let mut text = body.to_string();
    text.push('\n');
    let mut response = Response::new(DataBody::new(Full::new(Bytes::from(text))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The bindings `snapshot` needs, given the runtime it replaces: that
/// runtime's own when no binding and no Secret changed (the common apply
/// costs a walk of the bindings), otherwise [`Bindings::open`].
pub(crate) async fn bindings_for(
    snapshot: &Snapshot,
    previous: &Runtime,
    data_dir: Option<&std::path::Path>,
) -> Result<Arc<Bindings>, OpenError> {
    let same = |kind| {
        let versions = |s: &'_ Snapshot| {
            s.of_kind(kind)
                .map(|v| (v.resource.name().to_string(), v.version.clone()))
                .collect::<Vec<_>>()
        };
        versions(snapshot) == versions(previous.snapshot())
    };
    if previous.is_configured() && same(Kind::DataBinding) && same(Kind::Secret) {
        return Ok(Arc::clone(previous.data()));
    }
    Ok(Arc::new(
        Bindings::open(snapshot, previous.data(), data_dir).await?,
    ))
}

/// The binding `pick` finds for `namespace`, if `caller` may call it now:
/// the namespace has one, it lets the caller's namespace in, and the
/// namespace's rate limits have a token for it.
fn admit<'r, T: ?Sized>(
    runtime: &'r Runtime,
    caller: &Caller,
    namespace: &str,
    api: &'static str,
    pick: impl FnOnce(&'r Bindings) -> Option<&'r Arc<Binding<T>>>,
) -> Result<&'r Arc<Binding<T>>, DataError> {
    if !runtime.is_configured() {
        return Err(DataError::NotConfigured);
    }
    if namespace.is_empty() {
        return Err(DataError::invalid("namespace", "is required"));
    }
    let binding = pick(runtime.data()).ok_or_else(|| DataError::NoBinding {
        namespace: namespace.to_string(),
        api,
    })?;
    if let Some(allow) = &binding.settings.allow {
        let from = caller_namespace(runtime, &caller.host);
        // A certificate's identities hold for the hosts of the namespace
        // whose CA verified it only: one namespace's CA cannot vouch for
        // callers of another's hosts.
        let identities = caller
            .peer
            .as_deref()
            .filter(|peer| Some(&*peer.namespace) == from)
            .map_or(&[][..], |peer| &peer.identities[..]);
        allow
            .admits(namespace, from, identities)
            .map_err(|caller| DataError::Denied {
                api,
                binding: binding.name.clone(),
                caller,
            })?;
    }
    if let Some(limits) = runtime.namespace_limits(namespace) {
        limits
            .acquire(caller.ip, tokio::time::Instant::now())
            .map_err(|retry_after| DataError::RateLimited { retry_after })?;
    }
    Ok(binding)
}

/// The longest idempotency key, in bytes.
const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;

/// A value or payload of `size` bytes within the binding's
/// `max_value_bytes`.
fn check_size(settings: &Settings, what: &'static str, size: usize) -> Result<(), DataError> {
    let limit = settings.max_value_bytes;
    if size > limit {
        return Err(DataError::TooLarge { what, size, limit });
    }
    Ok(())
}

/// An idempotency key as the stores take it: none when empty.
fn idempotency_key(key: &str) -> Result<Option<&str>, DataError> {
    if key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
        return Err(DataError::invalid(
            "idempotency_key",
            format!("longer than {MAX_IDEMPOTENCY_KEY_BYTES} bytes"),
        ));
    }
    Ok((!key.is_empty()).then_some(key))
}

/// A request's count `value`, or `default` when 0; refused past `max`.
fn bounded(
    value: u32,
    default: usize,
    max: usize,
    field: &'static str,
) -> Result<usize, DataError> {
    match usize::try_from(value).unwrap_or(usize::MAX) {
        0 => Ok(default),
        n if n > max => Err(DataError::invalid(field, format!("at most {max}"))),
        n => Ok(n),
    }
}

/// The namespace of a caller that called `host` (a Host header or
/// `:authority`, any case, with or without port): the one whose hosts hold
/// it, by the contract's rule.
fn caller_namespace<'r>(runtime: &'r Runtime, host: &str) -> Option<&'r str> {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    prism_proto::host_namespace(runtime.snapshot(), &name.to_ascii_lowercase())
}

/// What the data gateway holds now, for the proxy admin's `/data`: open
/// subscriptions (registered for acks, and held by buses), the tasks alive
/// on the proxy's runtime, and the process's resident memory.
pub(crate) fn stats() -> serde_json::Value {
    let tasks = tokio::runtime::Handle::try_current()
        .map(|h| h.metrics().num_alive_tasks())
        .ok();
    serde_json::json!({
        "subscriptions": pubsub::registered(),
        "bus_subscriptions": prism_datastore::open_subscriptions(),
        "tasks": tasks,
        "rss_bytes": rss_bytes(),
    })
}

/// Resident memory of this process, from `/proc/self/statm` (Linux); `None`
/// elsewhere.
fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // The page size of every Linux platform Prism builds for.
    Some(pages * 4096)
}
