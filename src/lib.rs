//! The `prism` package: the one binary's command-line surface (`prism up`,
//! `control-plane`, `proxy`, and the operator commands that talk to the admin
//! API), the `up` composition, and the demo upstream.
//!
//! It only wires crates together: policy logic lives in prism-proto, the
//! control plane in prism-control-plane, the proxy in prism-data-plane.

pub mod cli;
pub mod client;
pub mod demo;
pub mod up;
