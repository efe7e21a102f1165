//! The `prism` package: the one binary's command-line surface (`prism up`,
//! `control-plane`, `proxy`, the operator commands that talk to the admin
//! API, and `kv`, which talks to a proxy's data APIs), the `up` composition,
//! and the demo upstream.
//!
//! It only wires crates together: policy logic lives in prism-proto, the
//! control plane in prism-control-plane, the proxy in prism-data-plane.

pub mod cli;
pub mod client;
pub mod data_client;
pub mod demo;
pub mod telemetry;
pub mod up;
