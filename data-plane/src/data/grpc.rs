//! `prism.data.v1` over gRPC: tonic's generated services, each call one
//! operation of [`super::kv`] or [`super::pubsub`] on the runtime the call
//! loaded.

use std::pin::Pin;
use std::sync::Arc;

use arc_swap::ArcSwap;
use futures::{Stream, StreamExt as _};
use tonic::{Request, Response, Status, Streaming};

use super::kv::{self, Write};
use super::pb::key_value_server::{KeyValue, KeyValueServer};
use super::pb::pub_sub_server::{PubSub, PubSubServer};
use super::pb::{self, Item};
use super::pubsub;
use super::{Caller, DataError};
use crate::runtime::Runtime;

/// The largest gRPC message a data call may send: the largest value a
/// binding may take, and room for the rest of the message.
const MAX_MESSAGE_BYTES: usize = 5 * 1024 * 1024;

/// Messages of one PublishStream being published at once.
const PUBLISH_IN_FLIGHT: usize = 64;

/// The KeyValue service over the proxy's runtime.
#[derive(Clone, Debug)]
pub(crate) struct KvService {
    runtime: Arc<ArcSwap<Runtime>>,
}

/// The PubSub service over the proxy's runtime.
#[derive(Clone, Debug)]
pub(crate) struct BusService {
    runtime: Arc<ArcSwap<Runtime>>,
}

/// The KeyValue server for `runtime`.
pub(crate) fn key_value(runtime: Arc<ArcSwap<Runtime>>) -> KeyValueServer<KvService> {
    KeyValueServer::new(KvService { runtime }).max_decoding_message_size(MAX_MESSAGE_BYTES)
}

/// The PubSub server for `runtime`.
pub(crate) fn pub_sub(runtime: Arc<ArcSwap<Runtime>>) -> PubSubServer<BusService> {
    PubSubServer::new(BusService { runtime }).max_decoding_message_size(MAX_MESSAGE_BYTES)
}

/// Who is calling, as the gate recorded it.
fn caller<T>(request: &Request<T>) -> Caller {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or_default()
}

impl KvService {
    /// The namespace's binding for a call of `request`.
    fn admit<T>(&self, request: &Request<T>, namespace: &str) -> Result<kv::Store, DataError> {
        kv::admit(&self.runtime.load(), &caller(request), namespace)
    }
}

impl BusService {
    /// The namespace's binding for a call of `request`.
    fn admit<T>(&self, request: &Request<T>, namespace: &str) -> Result<pubsub::Bus, DataError> {
        pubsub::admit(&self.runtime.load(), &caller(request), namespace)
    }
}

#[tonic::async_trait]
impl PubSub for BusService {
    type SubscribeStream = Pin<Box<dyn Stream<Item = Result<pb::Message, Status>> + Send>>;

    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let bus = self.admit(&request, &request.get_ref().namespace)?;
        let r = request.into_inner();
        let id = pubsub::publish(&bus, &r.topic, r.payload, &r.idempotency_key).await?;
        Ok(Response::new(pb::PublishResponse { id }))
    }

    type PublishStreamStream =
        Pin<Box<dyn Stream<Item = Result<pb::PublishResponse, Status>> + Send>>;

    async fn publish_stream(
        &self,
        request: Request<Streaming<pb::PublishRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let caller = caller(&request);
        let runtime = Arc::clone(&self.runtime);
        // Each message is admitted on its own (its namespace's binding and
        // rate limits, in the runtime live when it arrives) and published;
        // `buffered` keeps PUBLISH_IN_FLIGHT going and answers in order.
        let answers = request
            .into_inner()
            .map(move |message| {
                let (runtime, caller) = (Arc::clone(&runtime), caller.clone());
                async move {
                    let r = message?;
                    let bus = pubsub::admit(&runtime.load(), &caller, &r.namespace)?;
                    let id = pubsub::publish(&bus, &r.topic, r.payload, &r.idempotency_key).await?;
                    Ok(pb::PublishResponse { id })
                }
            })
            .buffered(PUBLISH_IN_FLIGHT);
        Ok(Response::new(Box::pin(answers)))
    }

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let bus = self.admit(&request, &request.get_ref().namespace)?;
        let r = request.into_inner();
        let open =
            pubsub::subscribe(&bus, &r.namespace, &r.topic, &r.group, r.max_in_flight).await?;
        let first = pb::Message {
            subscription: open.id.clone(),
            ..Default::default()
        };
        // The stream owns the subscription: when the client goes away, tonic
        // drops the stream, and with it everything the subscription held.
        let deliveries = futures::stream::unfold(open, |mut open| async move {
            let next = open.next().await?;
            let message = next
                .map(|d| pb::Message {
                    subscription: open.id.clone(),
                    id: d.id,
                    topic: d.topic,
                    payload: d.payload,
                    attempt: d.attempt,
                })
                .map_err(Status::from);
            Some((message, open))
        });
        let stream = futures::stream::once(async { Ok(first) }).chain(deliveries);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn ack(
        &self,
        request: Request<pb::AckRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        self.admit(&request, &request.get_ref().namespace)?;
        let r = request.into_inner();
        pubsub::ack(&r.namespace, &r.subscription, &r.ids).await?;
        Ok(Response::new(pb::AckResponse {}))
    }
}

#[tonic::async_trait]
impl KeyValue for KvService {
    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<Item>, Status> {
        let store = self.admit(&request, &request.get_ref().namespace)?;
        let item = kv::get(&store, &request.get_ref().key).await?;
        Ok(Response::new(kv::to_pb(item)))
    }

    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        let store = self.admit(&request, &request.get_ref().namespace)?;
        let write = request
            .into_inner()
            .write
            .ok_or_else(|| DataError::invalid("write", "is required"))?;
        let version = kv::put(&store, from_pb(write)?).await?;
        Ok(Response::new(pb::PutResponse { version }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let store = self.admit(&request, &request.get_ref().namespace)?;
        let pb::DeleteRequest {
            key,
            expected_version,
            ..
        } = request.into_inner();
        let deleted = kv::delete(&store, &key, expected_version).await?;
        Ok(Response::new(pb::DeleteResponse { deleted }))
    }

    async fn batch_get(
        &self,
        request: Request<pb::BatchGetRequest>,
    ) -> Result<Response<pb::BatchGetResponse>, Status> {
        let store = self.admit(&request, &request.get_ref().namespace)?;
        let keys = request.into_inner().keys;
        let found = kv::batch_get(&store, &keys).await?;
        let items = keys
            .into_iter()
            .zip(found)
            .map(|(key, item)| {
                item.map_or_else(
                    || Item {
                        key,
                        ..Default::default()
                    },
                    kv::to_pb,
                )
            })
            .collect();
        Ok(Response::new(pb::BatchGetResponse { items }))
    }

    async fn batch_put(
        &self,
        request: Request<pb::BatchPutRequest>,
    ) -> Result<Response<pb::BatchPutResponse>, Status> {
        let store = self.admit(&request, &request.get_ref().namespace)?;
        let writes = request
            .into_inner()
            .writes
            .into_iter()
            .map(from_pb)
            .collect::<Result<Vec<_>, _>>()?;
        let versions = kv::batch_put(&store, writes).await?;
        Ok(Response::new(pb::BatchPutResponse { versions }))
    }

    async fn scan(
        &self,
        request: Request<pb::ScanRequest>,
    ) -> Result<Response<pb::ScanResponse>, Status> {
        let store = self.admit(&request, &request.get_ref().namespace)?;
        let r = request.into_inner();
        let (items, next_page_token) =
            kv::scan(&store, &r.prefix, &r.page_token, r.page_size, r.page_bytes).await?;
        Ok(Response::new(pb::ScanResponse {
            items: items.into_iter().map(kv::to_pb).collect(),
            next_page_token,
        }))
    }
}

fn from_pb(write: pb::Write) -> Result<Write, DataError> {
    let ttl = write
        .ttl
        .map(|d| {
            std::time::Duration::try_from(d)
                .map_err(|_| DataError::invalid("ttl", "must be a positive duration"))
        })
        .transpose()?;
    Ok(Write {
        key: write.key,
        value: write.value,
        ttl,
        expected_version: write.expected_version,
        idempotency_key: write.idempotency_key,
    })
}
