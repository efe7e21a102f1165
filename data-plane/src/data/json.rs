//! The data APIs over HTTP/JSON, as gRPC transcoding would map them, so that
//! curl works:
//!
//! | request | operation |
//! |---|---|
//! | `GET /v1/kv/{namespace}/{key}` | Get: the value itself as the body; its version in `x-prism-version` and `etag` |
//! | `PUT /v1/kv/{namespace}/{key}` | Put: the body is the value; `?ttl=30s`, `?if_version=N` (0: only if absent), header `idempotency-key` |
//! | `DELETE /v1/kv/{namespace}/{key}` | Delete; `?if_version=N` |
//! | `GET /v1/kv/{namespace}?prefix=P&page_token=T&page_size=N&page_bytes=N` | Scan |
//! | `POST /v1/kv/{namespace}:batchGet` `{"keys": [...]}` | BatchGet |
//! | `POST /v1/kv/{namespace}:batchPut` `{"writes": [{"key", "value", "ttl", "expected_version", "idempotency_key"}]}` | BatchPut |
//!
//! And PubSub:
//!
//! | request | operation |
//! |---|---|
//! | `POST /v1/pubsub/{namespace}/{topic}` | Publish: the body is the payload; header `idempotency-key`; answers `{"id"}` |
//! | `GET /v1/pubsub/{namespace}/{topic}?group=G&max_in_flight=N` | Subscribe, as Server-Sent Events: first `event: subscription` with the id Ack takes, then one `event: message` each, its data `{"id", "topic", "attempt", "payload"}` (`payload_base64` instead for a payload that is not UTF-8) |
//! | `POST /v1/pubsub/{namespace}:ack` `{"subscription", "ids": [...]}` | Ack |
//!
//! A key is the rest of the path, percent-decoded (so it may hold `/`).
//! JSON follows the proto3 mapping: bytes as base64, 64-bit integers as
//! strings. Errors are `{"error": {"code", "status", "message"}}` with the
//! HTTP status of [`super::error`].

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use futures::StreamExt as _;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::Frame;
use percent_encoding::percent_decode_str;
use serde_json::{Value, json};

use super::kv::{self, Write};
use super::pubsub;
use super::{Caller, DataBody, DataError, json_response};
use crate::http::body::RequestBody;
use crate::runtime::Runtime;

/// The path prefix of the KeyValue API.
pub(crate) const KV_PREFIX: &str = "/v1/kv/";
/// The path prefix of the PubSub API.
pub(crate) const PUBSUB_PREFIX: &str = "/v1/pubsub/";
/// The largest JSON body of a batch call.
const MAX_JSON_BYTES: usize = 16 * 1024 * 1024;

/// Answers one HTTP/JSON data call.
pub(crate) async fn serve(
    runtime: &Runtime,
    caller: &Caller,
    request: Request<RequestBody>,
) -> Response<DataBody> {
    let path = request.uri().path().to_string();
    let answer = if let Some(rest) = path.strip_prefix(PUBSUB_PREFIX) {
        pubsub_call(runtime, caller, &path, rest, request).await
    } else if let Some(rest) = path.strip_prefix(KV_PREFIX) {
        kv_call(runtime, caller, &path, rest, request).await
    } else {
        Err(DataError::UnknownPath(path.clone()))
    };
    answer.unwrap_or_else(DataError::into_response)
}

/// A PubSub call; `rest` is its path after [`PUBSUB_PREFIX`].
async fn pubsub_call(
    runtime: &Runtime,
    caller: &Caller,
    path: &str,
    rest: &str,
    request: Request<RequestBody>,
) -> Result<Response<DataBody>, DataError> {
    let method = request.method().clone();
    match (rest.split_once('/'), rest.split_once(':'), &method) {
        (None, Some((namespace, "ack")), &Method::POST) => {
            let namespace = decode(namespace)?;
            pubsub::admit(runtime, caller, &namespace)?;
            let body = read_json(request.into_body()).await?;
            let subscription = body
                .get("subscription")
                .and_then(Value::as_str)
                .ok_or_else(|| DataError::invalid("subscription", "is required"))?;
            pubsub::ack(&namespace, subscription, &strings(&body, "ids")?).await?;
            Ok(json_response(StatusCode::OK, &json!({})))
        }
        (Some((namespace, topic)), _, &Method::POST) => {
            let (namespace, topic) = (decode(namespace)?, decode(topic)?);
            let bus = pubsub::admit(runtime, caller, &namespace)?;
            let key = header_text(&request, "idempotency-key")?;
            let payload = read_body(
                request.into_body(),
                bus.settings.max_value_bytes,
                "the payload",
            )
            .await?;
            let id = pubsub::publish(&bus, &topic, payload, &key).await?;
            Ok(json_response(StatusCode::OK, &json!({ "id": id })))
        }
        (Some((namespace, topic)), _, &Method::GET) => {
            let (namespace, topic) = (decode(namespace)?, decode(topic)?);
            let bus = pubsub::admit(runtime, caller, &namespace)?;
            let query = Query::of(request.uri().query());
            let group = query.get("group").unwrap_or_default();
            let open = pubsub::subscribe(
                &bus,
                &namespace,
                &topic,
                &group,
                query.number("max_in_flight")?.unwrap_or_default(),
            )
            .await?;
            Ok(server_sent_events(open))
        }
        (Some(_), _, method) => Err(DataError::Method {
            method: method.clone(),
            allowed: "GET, POST",
        }),
        _ => Err(DataError::UnknownPath(path.to_string())),
    }
}

/// A subscription as Server-Sent Events; the stream owns it, so a client
/// that goes away drops it.
fn server_sent_events(open: pubsub::Open) -> Response<DataBody> {
    let first = Bytes::from(format!("event: subscription\ndata: {}\n\n", open.id));
    let events = futures::stream::unfold(open, |mut open| async move {
        let event = match open.next().await? {
            Ok(delivery) => {
                let mut data = json!({
                    "id": delivery.id,
                    "topic": delivery.topic,
                    "attempt": delivery.attempt,
                });
                match std::str::from_utf8(&delivery.payload) {
                    Ok(text) => data["payload"] = json!(text),
                    Err(_) => data["payload_base64"] = json!(STANDARD.encode(&delivery.payload)),
                }
                format!("event: message\nid: {}\ndata: {data}\n\n", delivery.id)
            }
            Err(error) => format!(
                "event: error\ndata: {}\n\n",
                json!({ "message": error.to_string() })
            ),
        };
        Some((
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(event))),
            open,
        ))
    });
    let frames = futures::stream::once(async move { Ok(Frame::data(first)) }).chain(events);
    let mut response = Response::new(DataBody::new(StreamBody::new(frames)));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// A header's value as text; empty when absent.
fn header_text(request: &Request<RequestBody>, name: &'static str) -> Result<String, DataError> {
    match request.headers().get(name) {
        Some(v) => Ok(v
            .to_str()
            .map_err(|_| DataError::invalid(name, "must be text"))?
            .to_string()),
        None => Ok(String::new()),
    }
}

/// A KeyValue call; `rest` is its path after [`KV_PREFIX`].
async fn kv_call(
    runtime: &Runtime,
    caller: &Caller,
    path: &str,
    rest: &str,
    request: Request<RequestBody>,
) -> Result<Response<DataBody>, DataError> {
    let query = Query::of(request.uri().query());
    let method = request.method().clone();
    let (namespace, key) = match rest.split_once('/') {
        Some((namespace, key)) => (namespace, Some(decode(key)?)),
        None => (rest, None),
    };
    // `{namespace}:batchGet` and `{namespace}:batchPut`: transcoding's
    // custom methods.
    let (namespace, verb) = match (key.as_ref(), namespace.split_once(':')) {
        (None, Some((namespace, verb))) => (namespace, Some(verb)),
        _ => (namespace, None),
    };
    let namespace = decode(namespace)?;
    let store = kv::admit(runtime, caller, &namespace)?;
    match (key, verb, &method) {
        (Some(key), None, &Method::GET | &Method::HEAD) => {
            let item = kv::get(&store, &key).await?;
            let mut response = Response::new(DataBody::new(Full::new(item.value)));
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            headers.insert("x-prism-version", HeaderValue::from(item.version));
            headers.insert(header::ETAG, etag(item.version));
            if let Some(at) = item.expires_at {
                headers.insert("x-prism-expires-at", HeaderValue::from(kv::unix_ms(at)));
            }
            Ok(response)
        }
        (Some(key), None, &Method::PUT) => {
            let limit = store.settings.max_value_bytes;
            let idempotency_key = header_text(&request, "idempotency-key")?;
            let value = read_body(request.into_body(), limit, "the value").await?;
            let write = Write {
                key,
                value,
                ttl: query.duration("ttl")?,
                expected_version: query.number("if_version")?,
                idempotency_key,
            };
            let version = kv::put(&store, write).await?;
            Ok(json_response(
                StatusCode::OK,
                &json!({ "version": version.to_string() }),
            ))
        }
        (Some(key), None, &Method::DELETE) => {
            let deleted = kv::delete(&store, &key, query.number("if_version")?).await?;
            Ok(json_response(
                StatusCode::OK,
                &json!({ "deleted": deleted }),
            ))
        }
        (Some(_), None, method) => Err(DataError::Method {
            method: method.clone(),
            allowed: "GET, HEAD, PUT, DELETE",
        }),
        (None, None, &Method::GET) => {
            let prefix = query.get("prefix").unwrap_or_default();
            let page_token = query.get("page_token").unwrap_or_default();
            let page_size = query.number("page_size")?.unwrap_or_default();
            let page_bytes = query.number("page_bytes")?.unwrap_or_default();
            let (items, next) =
                kv::scan(&store, &prefix, &page_token, page_size, page_bytes).await?;
            let items: Vec<Value> = items.into_iter().map(|i| item_json(kv::to_pb(i))).collect();
            Ok(json_response(
                StatusCode::OK,
                &json!({ "items": items, "next_page_token": next }),
            ))
        }
        (None, None, method) => Err(DataError::Method {
            method: method.clone(),
            allowed: "GET",
        }),
        (None, Some(verb @ ("batchGet" | "batchPut")), &Method::POST) => {
            let body = read_json(request.into_body()).await?;
            if verb == "batchGet" {
                let keys = strings(&body, "keys")?;
                let found = kv::batch_get(&store, &keys).await?;
                let items: Vec<Value> = keys
                    .into_iter()
                    .zip(found)
                    .map(|(key, item)| match item {
                        Some(item) => item_json(kv::to_pb(item)),
                        None => json!({ "key": key, "version": "0" }),
                    })
                    .collect();
                Ok(json_response(StatusCode::OK, &json!({ "items": items })))
            } else {
                let writes = body
                    .get("writes")
                    .and_then(Value::as_array)
                    .ok_or_else(|| DataError::invalid("writes", "must be a list"))?
                    .iter()
                    .map(write_json)
                    .collect::<Result<Vec<_>, _>>()?;
                let versions = kv::batch_put(&store, writes).await?;
                let versions: Vec<String> = versions.iter().map(u64::to_string).collect();
                Ok(json_response(
                    StatusCode::OK,
                    &json!({ "versions": versions }),
                ))
            }
        }
        (None, Some("batchGet" | "batchPut"), method) => Err(DataError::Method {
            method: method.clone(),
            allowed: "POST",
        }),
        (_, _, _) => Err(DataError::UnknownPath(path.to_string())),
    }
}

/// Reads a JSON body of at most [`MAX_JSON_BYTES`].
async fn read_json(body: RequestBody) -> Result<Value, DataError> {
    let body = read_body(body, MAX_JSON_BYTES, "the request body").await?;
    serde_json::from_slice(&body).map_err(|e| DataError::invalid("body", format!("not JSON: {e}")))
}

/// Reads a body of at most `limit` bytes.
async fn read_body(
    body: RequestBody,
    limit: usize,
    what: &'static str,
) -> Result<Bytes, DataError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => Err(DataError::TooLarge {
            what,
            // At least one byte past the limit: the true size is unknown.
            size: limit.saturating_add(1),
            limit,
        }),
        Err(_) => Err(DataError::invalid(
            "body",
            "the request body could not be read",
        )),
    }
}

fn decode(segment: &str) -> Result<String, DataError> {
    percent_decode_str(segment)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| DataError::invalid("path", "not UTF-8 once percent-decoded"))
}

fn etag(version: u64) -> HeaderValue {
    // Digits and quotes only: always a valid header value.
    HeaderValue::from_str(&format!("\"{version}\"")).unwrap_or(HeaderValue::from_static("\"\""))
}

fn item_json(item: super::pb::Item) -> Value {
    let mut value = json!({
        "key": item.key,
        "value": STANDARD.encode(&item.value),
        "version": item.version.to_string(),
    });
    if item.expires_at_unix_ms > 0 {
        value["expires_at_unix_ms"] = json!(item.expires_at_unix_ms.to_string());
    }
    value
}

fn strings(body: &Value, field: &'static str) -> Result<Vec<String>, DataError> {
    body.get(field)
        .and_then(Value::as_array)
        .and_then(|list| {
            list.iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .ok_or_else(|| DataError::invalid(field, "must be a list of strings"))
}

/// One write of a batchPut body.
fn write_json(write: &Value) -> Result<Write, DataError> {
    let text = |field| write.get(field).and_then(Value::as_str);
    let value = STANDARD
        .decode(text("value").unwrap_or_default())
        .map_err(|_| DataError::invalid("writes.value", "must be base64"))?;
    Ok(Write {
        key: text("key").unwrap_or_default().to_string(),
        value: value.into(),
        ttl: text("ttl")
            .map(|t| parse_duration(t, "writes.ttl"))
            .transpose()?,
        expected_version: write
            .get("expected_version")
            .map(|v| json_u64(v, "writes.expected_version"))
            .transpose()?,
        idempotency_key: text("idempotency_key").unwrap_or_default().to_string(),
    })
}

/// A 64-bit integer as proto3 JSON writes it (a string) or as a number.
fn json_u64(value: &Value, field: &'static str) -> Result<u64, DataError> {
    value
        .as_u64()
        .or_else(|| value.as_str().and_then(|s| s.parse().ok()))
        .ok_or_else(|| DataError::invalid(field, "must be an unsigned integer"))
}

/// A duration such as `30s`, `1.5s`, `500ms`, `5m` or `2h`.
fn parse_duration(text: &str, field: &'static str) -> Result<Duration, DataError> {
    let bad = || {
        DataError::invalid(
            field,
            format!("`{text}` is not a duration such as 30s, 500ms, 5m or 2h"),
        )
    };
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(bad)?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return Err(bad()),
    };
    Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(bad)
}

/// A request's query parameters.
struct Query(Vec<(String, String)>);

impl Query {
    fn of(query: Option<&str>) -> Self {
        Query(
            form_urlencoded::parse(query.unwrap_or_default().as_bytes())
                .into_owned()
                .collect(),
        )
    }

    fn get(&self, name: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }

    /// An unsigned integer parameter, if given.
    fn number<T: std::str::FromStr>(&self, name: &'static str) -> Result<Option<T>, DataError> {
        self.get(name)
            .map(|v| {
                v.parse().map_err(|_| {
                    DataError::invalid(name, format!("`{v}` is not an unsigned integer"))
                })
            })
            .transpose()
    }

    fn duration(&self, name: &'static str) -> Result<Option<Duration>, DataError> {
        self.get(name).map(|v| parse_duration(&v, name)).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_the_usual_units_and_refuse_the_rest() {
        for (text, millis) in [
            ("30s", 30_000),
            ("1.5s", 1500),
            ("500ms", 500),
            ("2h", 7_200_000),
        ] {
            assert_eq!(
                parse_duration(text, "ttl").ok(),
                Some(Duration::from_millis(millis)),
                "{text}"
            );
        }
        for bad in ["", "30", "s", "0s", "-1s", "1d", "1e9999s"] {
            assert!(parse_duration(bad, "ttl").is_err(), "{bad}");
        }
    }
}
