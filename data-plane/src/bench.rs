//! Bench-only entry points (`data-plane/benches/`): not an API, hidden from
//! the docs, and free to change with the internals they wrap.

use http::{HeaderMap, Method};
use prism_proto::Snapshot;

use crate::runtime::{OwnAddresses, Probe, Runtime};

pub use crate::http::ratelimit::bench::Bucket;
pub use crate::runtime::bench::{Balancer, Breaker};

/// A compiled policy's route matcher.
#[derive(Debug)]
pub struct RouteTable {
    runtime: Runtime,
}

impl RouteTable {
    /// Compiles `snapshot` as a proxy would; the compile error's message if
    /// it is refused.
    pub fn compile(snapshot: &Snapshot) -> Result<RouteTable, String> {
        Runtime::compile(snapshot, &Runtime::unconfigured(), &OwnAddresses::default())
            .map(|runtime| RouteTable { runtime })
            .map_err(|e| e.to_string())
    }

    /// The name of the route a request takes, as the route stage looks it up.
    pub fn lookup<'a>(
        &'a self,
        host: &str,
        method: &Method,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Option<&'a str> {
        let probe = Probe {
            method,
            path,
            query,
            headers,
        };
        self.runtime.route(host, &probe).map(|r| r.name.as_str())
    }
}
