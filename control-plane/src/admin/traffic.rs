//! Live traffic for the console and `prism top`: the fleet's load reports
//! as summed up by [`crate::traffic`], once (`GET /v1/traffic`) or as
//! Server-Sent Events, one `traffic` event per reporting interval
//! (`GET /v1/traffic/stream`). A caller sees the namespaces its token
//! covers.

use std::convert::Infallible;

use axum::Json;
use axum::extract::{Extension, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use futures::StreamExt as _;
use tokio_stream::wrappers::IntervalStream;

use super::{AdminState, Caller};
use crate::traffic::Summary;

/// The fleet's traffic now.
#[utoipa::path(get, path = "/v1/traffic", tag = "fleet",
    responses((status = 200, description = "Requests, errors and latency per namespace (with a chart point per interval), route, backend and proxy, from the proxies' load reports.",
        body = Summary)))]
pub(super) async fn traffic(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
) -> Json<Summary> {
    Json(state.traffic.summary(|namespace| caller.covers(namespace)))
}

/// The fleet's traffic, once per reporting interval, until the client goes
/// or the control plane stops.
#[utoipa::path(get, path = "/v1/traffic/stream", tag = "fleet",
    responses((status = 200, description = "Server-Sent Events: one `traffic` event per reporting interval, its data what `GET /v1/traffic` answers.",
        content_type = "text/event-stream", body = String)))]
pub(super) async fn traffic_stream(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut stopping = state.shutdown.clone();
    let ticks = IntervalStream::new(tokio::time::interval(state.traffic.interval()));
    let events = ticks
        .map(move |_| {
            let summary = state.traffic.summary(|namespace| caller.covers(namespace));
            let event = Event::default().event("traffic");
            // A summary is numbers and names: it always serializes.
            Ok(event
                .json_data(summary)
                .unwrap_or_else(|_| Event::default()))
        })
        .take_until(async move {
            let _ = stopping.wait_for(|stop| *stop).await;
        });
    Sse::new(events).keep_alive(KeepAlive::default())
}
