//! The data gate: the stage that takes data API calls off the request path
//! before routing. `/prism.data.v1.*` (gRPC) and `/v1/kv/`, `/v1/pubsub/`
//! (HTTP/JSON) are the proxy's own on every host, so a route never sees
//! them; every other request passes through untouched.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use arc_swap::ArcSwap;
use futures::future::BoxFuture;
use http::{Request, Response};
use http_body_util::Either;
use pin_project_lite::pin_project;
use tonic::server::NamedService;
use tower::{Layer, Service};

use super::grpc::{self, BusService, KvService};
use super::json::{self, KV_PREFIX, PUBSUB_PREFIX};
use super::pb::key_value_server::KeyValueServer;
use super::pb::pub_sub_server::PubSubServer;
use super::{Caller, DataBody, DataError};
use crate::http::body::RequestBody;
use crate::http::error::BoxError;
use crate::http::route::request_host;
use crate::http::server::ClientAddr;
use crate::http::tls::Tls;
use crate::runtime::Runtime;

/// The gRPC path prefix of every data API.
const GRPC_PREFIX: &str = "/prism.data.v1.";

#[derive(Clone, Debug)]
pub(crate) struct DataGateLayer {
    runtime: Arc<ArcSwap<Runtime>>,
}

#[derive(Clone, Debug)]
pub(crate) struct DataGate<S> {
    runtime: Arc<ArcSwap<Runtime>>,
    kv: KeyValueServer<KvService>,
    bus: PubSubServer<BusService>,
    inner: S,
}

pin_project! {
    #[project = ResponseFutureProj]
    pub(crate) enum ResponseFuture<F> {
        Passed { #[pin] inner: F },
        Data { call: BoxFuture<'static, Response<DataBody>> },
    }
}

impl DataGateLayer {
    pub(crate) fn new(runtime: Arc<ArcSwap<Runtime>>) -> Self {
        Self { runtime }
    }
}

impl<S> Layer<S> for DataGateLayer {
    type Service = DataGate<S>;

    fn layer(&self, inner: S) -> DataGate<S> {
        DataGate {
            runtime: Arc::clone(&self.runtime),
            kv: grpc::key_value(Arc::clone(&self.runtime)),
            bus: grpc::pub_sub(Arc::clone(&self.runtime)),
            inner,
        }
    }
}

impl<S, B> Service<Request<RequestBody>> for DataGate<S>
where
    S: Service<Request<RequestBody>, Response = Response<B>, Error = BoxError>,
{
    type Response = Response<Either<B, DataBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<RequestBody>) -> Self::Future {
        let path = request.uri().path();
        let grpc_call = path.starts_with(GRPC_PREFIX);
        if !(grpc_call || path.starts_with(KV_PREFIX) || path.starts_with(PUBSUB_PREFIX)) {
            return ResponseFuture::Passed {
                inner: self.inner.call(request),
            };
        }
        let caller = Caller {
            host: request_host(&request).to_string(),
            ip: request.extensions().get::<ClientAddr>().map(|c| c.0.ip()),
            peer: request
                .extensions()
                .get::<Tls>()
                .and_then(|tls| tls.peer.clone()),
        };
        let call: BoxFuture<'static, Response<DataBody>> = if grpc_call {
            let service = path[1..].split('/').next().unwrap_or_default();
            let kv = service == <KeyValueServer<KvService> as NamedService>::NAME;
            let bus = service == <PubSubServer<BusService> as NamedService>::NAME;
            let unknown = DataError::UnknownPath(path.to_string());
            request.extensions_mut().insert(caller);
            if kv {
                let mut kv = self.kv.clone();
                Box::pin(async move {
                    match kv.call(request).await {
                        Ok(response) => response,
                        Err(never) => match never {},
                    }
                })
            } else if bus {
                let mut bus = self.bus.clone();
                Box::pin(async move {
                    match bus.call(request).await {
                        Ok(response) => response,
                        Err(never) => match never {},
                    }
                })
            } else {
                Box::pin(async move { tonic::Status::from(unknown).into_http() })
            }
        } else {
            let runtime = self.runtime.load_full();
            Box::pin(async move { json::serve(&runtime, &caller, request).await })
        };
        ResponseFuture::Data { call }
    }
}

impl<F, B> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, BoxError>>,
{
    type Output = Result<Response<Either<B, DataBody>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ResponseFutureProj::Passed { inner } => {
                Poll::Ready(ready!(inner.poll(cx)).map(|r| r.map(Either::Left)))
            }
            ResponseFutureProj::Data { call } => {
                Poll::Ready(Ok(ready!(call.as_mut().poll(cx)).map(Either::Right)))
            }
        }
    }
}
