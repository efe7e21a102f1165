//! prism-datastore owns the data gateway's backends: the KeyValue stores
//! (SQLite and Postgres through sqlx) and the PubSub buses (in memory,
//! NATS through async-nats, Kafka through rdkafka), each behind a cargo
//! feature. It is the only crate that knows sqlx, async-nats or rdkafka:
//! the proxy sees the [`KeyValue`] and [`PubSub`] traits and the
//! [`Error`] they return, opened from small [`KvParams`] and [`BusParams`]
//! and never a driver type.
//!
//! It knows nothing of policy, HTTP or gRPC: the proxy translates a
//! DataBinding into params, calls the traits, and turns their errors into
//! statuses.

mod error;
pub mod kv;
pub mod pubsub;

pub use error::{BoxError, Error};
pub use kv::{Item, KeyValue, KvParams, KvStore, Page, Put, ScanLimit, open_kv};
pub use pubsub::{
    Acker, BusKind, BusParams, Delivery, MemoryBus, PubSub, Subscription, open_bus,
    open_subscriptions,
};
