//! Load balancing over one backend's endpoints: round robin, least request
//! (power of two choices), random, ring hash and Maglev, each honouring
//! endpoint weights, optionally zone-aware.
//!
//! Everything a pick needs is built when the backend is compiled (schedules,
//! cumulative weights, the ring, the Maglev table), so a pick is a few atomic
//! loads and arithmetic: no allocation, no lock, no trait object. The policy
//! is an enum. A [`Balancer`] is owned by its backend, so it survives applies
//! that leave the backend unchanged.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::header::{self, HeaderName};
use http::request::Request;
use prism_proto::pb::config::v1::{HashPolicy, ZoneAware, hash_policy};
use prism_proto::{Endpoint as EndpointSpec, LbPolicy};

use crate::http::server::ClientAddr;

/// What a balancer asks of the endpoints it picks from. Implemented by a
/// backend's compiled endpoints and, in tests, by plain arrays.
pub(crate) trait Endpoints {
    /// Whether endpoint `index` may take a request now.
    fn available(&self, index: usize) -> bool;
    /// Requests in flight to endpoint `index`.
    fn in_flight(&self, index: usize) -> u32;
}

/// One backend's balancing state.
#[derive(Debug)]
pub(crate) struct Balancer {
    all: Picker,
    /// Set when the backend is zone-aware and some (not all) of its
    /// endpoints are in this proxy's zone.
    local: Option<Local>,
    key: Option<HashKey>,
}

/// Zone-aware balancing: the endpoints in the proxy's zone, preferred while
/// at least `min_available` of them are available.
#[derive(Debug)]
struct Local {
    picker: Picker,
    endpoints: Box<[u32]>,
    min_available: usize,
}

/// What a consistent-hash balancer hashes.
#[derive(Debug)]
enum HashKey {
    Header(HeaderName),
    Cookie(Box<str>),
    ClientIp,
}

#[derive(Debug)]
enum Picker {
    /// Smooth weighted round robin, precomputed as a schedule of endpoints.
    RoundRobin {
        next: AtomicUsize,
        schedule: Box<[u32]>,
    },
    /// Two weighted random choices; the one with fewer requests in flight
    /// per unit of weight wins.
    LeastRequest(Weights),
    Random(Weights),
    /// Points sorted by hash; a key goes to the first point at or after it.
    Ring {
        points: Box<[(u64, u32)]>,
        fallback: Weights,
    },
    /// Maglev's lookup table, indexed by the key's hash.
    Maglev {
        table: Box<[u32]>,
        fallback: Weights,
    },
}

/// A set of endpoints with their weights, for weighted random choices.
#[derive(Debug)]
struct Weights {
    endpoints: Box<[u32]>,
    /// Running sums of the weights; `None` when all weights are equal.
    cumulative: Option<Box<[u64]>>,
}

/// Most entries of a round-robin schedule: weights whose reduced sum is larger
/// are scaled down (keeping every endpoint at least once).
const MAX_SCHEDULE: u64 = 4096;
/// Ring points per endpoint at least, and the whole ring at most.
const MIN_RING_POINTS: u64 = 1024;
const MAX_RING_POINTS: u64 = 1 << 16;
/// Maglev table sizes (primes): the smallest with ≥ 100 entries per endpoint
/// is taken; Envoy's default, 65537, is the largest. Keys stay put when an
/// endpoint leaves or joins unless the count crosses 40 or 163, where the
/// table grows and every key is placed anew; a small table keeps an idle
/// proxy small (16 KiB per backend up to 40 endpoints).
const MAGLEV_SIZES: [u64; 3] = [4093, 16381, 65537];

impl Balancer {
    /// The balancer of a backend with `endpoints` (not empty) for a proxy in
    /// `zone` (empty when unknown).
    pub(crate) fn new(
        policy: LbPolicy,
        hash: Option<&HashPolicy>,
        zone_aware: Option<&ZoneAware>,
        endpoints: &[EndpointSpec],
        zone: &str,
    ) -> Self {
        let weighted: Vec<(u32, u32, &str)> = endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let weight = prism_proto::defaults::nonzero_or(
                    e.weight,
                    prism_proto::defaults::ENDPOINT_WEIGHT,
                );
                (index(i), weight, e.address.as_str())
            })
            .collect();
        let all = Picker::new(policy, &weighted);
        let local = zone_aware.filter(|_| !zone.is_empty()).and_then(|z| {
            let in_zone: Vec<(u32, u32, &str)> = weighted
                .iter()
                .copied()
                .filter(|(i, _, _)| endpoints[*i as usize].zone == zone)
                .collect();
            if in_zone.is_empty() || in_zone.len() == weighted.len() {
                return None;
            }
            let percent = prism_proto::defaults::nonzero_or(
                z.min_healthy_percent,
                prism_proto::defaults::ZONE_AWARE_MIN_HEALTHY_PERCENT,
            );
            let min_available = (in_zone.len() * percent as usize).div_ceil(100).max(1);
            Some(Local {
                picker: Picker::new(policy, &in_zone),
                endpoints: in_zone.iter().map(|(i, _, _)| *i).collect(),
                min_available,
            })
        });
        let key = match hash.and_then(|h| h.key.as_ref()) {
            Some(hash_policy::Key::Header(name)) => HeaderName::from_bytes(name.as_bytes())
                .ok()
                .map(HashKey::Header),
            Some(hash_policy::Key::Cookie(name)) => Some(HashKey::Cookie(name.as_str().into())),
            Some(hash_policy::Key::ClientIp(true)) => Some(HashKey::ClientIp),
            Some(hash_policy::Key::ClientIp(false)) | None => None,
        };
        Self { all, local, key }
    }

    /// The hash a consistent-hash balancer places `request` by; `None` when
    /// it balances otherwise or the request lacks the key.
    pub(crate) fn hash<B>(&self, request: &Request<B>) -> Option<u64> {
        match self.key.as_ref()? {
            HashKey::Header(name) => request.headers().get(name).map(|v| hash(v.as_bytes())),
            HashKey::Cookie(name) => request
                .headers()
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .find_map(|pair| {
                    let (n, value) = pair.trim().split_once('=')?;
                    (n == &**name).then(|| hash(value.as_bytes()))
                }),
            HashKey::ClientIp => request
                .extensions()
                .get::<ClientAddr>()
                .map(|c| match c.0.ip() {
                    std::net::IpAddr::V4(ip) => hash(&ip.octets()),
                    std::net::IpAddr::V6(ip) => hash(&ip.octets()),
                }),
        }
    }

    /// An available endpoint for a request with `key` (from [`Self::hash`]),
    /// or `None` when no endpoint is available.
    pub(crate) fn pick(
        &self,
        endpoints: &(impl Endpoints + ?Sized),
        key: Option<u64>,
    ) -> Option<usize> {
        if let Some(local) = &self.local {
            let available = local
                .endpoints
                .iter()
                .filter(|i| endpoints.available(**i as usize))
                .take(local.min_available)
                .count();
            if available >= local.min_available {
                return local.picker.pick(endpoints, key);
            }
        }
        self.all.pick(endpoints, key)
    }
}

impl Picker {
    fn new(policy: LbPolicy, endpoints: &[(u32, u32, &str)]) -> Self {
        match policy {
            LbPolicy::Unspecified | LbPolicy::RoundRobin => Picker::RoundRobin {
                next: AtomicUsize::new(0),
                schedule: schedule(endpoints),
            },
            LbPolicy::LeastRequest => Picker::LeastRequest(Weights::new(endpoints)),
            LbPolicy::Random => Picker::Random(Weights::new(endpoints)),
            LbPolicy::RingHash => Picker::Ring {
                points: ring(endpoints),
                fallback: Weights::new(endpoints),
            },
            LbPolicy::Maglev => Picker::Maglev {
                table: maglev(endpoints),
                fallback: Weights::new(endpoints),
            },
        }
    }

    fn pick(&self, endpoints: &(impl Endpoints + ?Sized), key: Option<u64>) -> Option<usize> {
        match self {
            Picker::RoundRobin { next, schedule } => {
                // Each try takes its own turn, so the turns of an unavailable
                // endpoint spread over the others instead of all going to
                // its neighbour in the schedule.
                (0..schedule.len())
                    .map(|_| {
                        schedule[next.fetch_add(1, Ordering::Relaxed) % schedule.len()] as usize
                    })
                    .find(|i| endpoints.available(*i))
            }
            Picker::Random(weights) => weights.pick(endpoints),
            Picker::LeastRequest(weights) => {
                let a = weights.choose(random());
                let b = weights.choose(random());
                let (ia, ib) = (weights.endpoint(a), weights.endpoint(b));
                match (endpoints.available(ia), endpoints.available(ib)) {
                    (true, true) => {
                        // Fewer in flight per unit of weight wins,
                        // in_b / w_b < in_a / w_a; on a tie the first
                        // (weighted) choice, so idle endpoints get their
                        // weighted shares.
                        let load_a = u64::from(endpoints.in_flight(ia)) * weights.weight(b);
                        let load_b = u64::from(endpoints.in_flight(ib)) * weights.weight(a);
                        Some(if load_b < load_a { ib } else { ia })
                    }
                    (true, false) => Some(ia),
                    (false, true) => Some(ib),
                    (false, false) => weights.pick(endpoints),
                }
            }
            Picker::Ring { points, fallback } => {
                let Some(key) = key else {
                    return fallback.pick(endpoints);
                };
                let start = points.partition_point(|(h, _)| *h < key);
                (0..points.len())
                    .map(|k| points[(start + k) % points.len()].1 as usize)
                    .find(|i| endpoints.available(*i))
            }
            Picker::Maglev { table, fallback } => {
                let Some(key) = key else {
                    return fallback.pick(endpoints);
                };
                // The table's size is a prime below 2^17: the cast is exact.
                let start = (key % table.len() as u64) as usize;
                (0..table.len())
                    .map(|k| table[(start + k) % table.len()] as usize)
                    .find(|i| endpoints.available(*i))
            }
        }
    }
}

impl Weights {
    fn new(endpoints: &[(u32, u32, &str)]) -> Self {
        let equal = endpoints.iter().all(|(_, w, _)| *w == endpoints[0].1);
        let cumulative = (!equal).then(|| {
            endpoints
                .iter()
                .scan(0u64, |sum, (_, w, _)| {
                    *sum += u64::from(*w);
                    Some(*sum)
                })
                .collect()
        });
        Self {
            endpoints: endpoints.iter().map(|(i, _, _)| *i).collect(),
            cumulative,
        }
    }

    /// The slot (position in `endpoints`) that `random` lands on, in
    /// proportion to the weights.
    fn choose(&self, random: u64) -> usize {
        match &self.cumulative {
            None => (random % self.endpoints.len() as u64) as usize,
            Some(cumulative) => {
                // Not empty: a backend has at least one endpoint.
                let total = cumulative[cumulative.len() - 1];
                let r = random % total;
                cumulative.partition_point(|c| *c <= r)
            }
        }
    }

    /// The endpoint index in `slot`.
    fn endpoint(&self, slot: usize) -> usize {
        self.endpoints[slot] as usize
    }

    /// The weight of the endpoint in `slot`.
    fn weight(&self, slot: usize) -> u64 {
        match &self.cumulative {
            None => 1,
            Some(c) => c[slot] - slot.checked_sub(1).map_or(0, |s| c[s]),
        }
    }

    /// A weighted random available endpoint: a few tries, then the first
    /// available one after a random start.
    fn pick(&self, endpoints: &(impl Endpoints + ?Sized)) -> Option<usize> {
        for _ in 0..4 {
            let i = self.endpoint(self.choose(random()));
            if endpoints.available(i) {
                return Some(i);
            }
        }
        let start = (random() % self.endpoints.len() as u64) as usize;
        (0..self.endpoints.len())
            .map(|k| self.endpoints[(start + k) % self.endpoints.len()] as usize)
            .find(|i| endpoints.available(*i))
    }
}

/// A round-robin schedule in which each endpoint appears in proportion to its
/// weight, spread out (nginx's smooth weighted round robin).
fn schedule(endpoints: &[(u32, u32, &str)]) -> Box<[u32]> {
    let gcd = endpoints
        .iter()
        .fold(0u64, |g, (_, w, _)| gcd(g, u64::from(*w)));
    let mut weights: Vec<u64> = endpoints
        .iter()
        .map(|(_, w, _)| u64::from(*w) / gcd.max(1))
        .collect();
    let sum: u64 = weights.iter().sum();
    if sum > MAX_SCHEDULE {
        for w in &mut weights {
            *w = (*w * MAX_SCHEDULE / sum).max(1);
        }
    }
    let total: i64 = weights.iter().map(|w| *w as i64).sum();
    let mut current = vec![0i64; weights.len()];
    let mut schedule = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (slot, w) in weights.iter().enumerate() {
            current[slot] += *w as i64;
            if current[slot] > current[best] {
                best = slot;
            }
        }
        current[best] -= total;
        schedule.push(endpoints[best].0);
    }
    schedule.into()
}

/// A hash ring with points in proportion to the weights, each placed by the
/// endpoint's address, so an endpoint keeps its points whatever the others do.
fn ring(endpoints: &[(u32, u32, &str)]) -> Box<[(u64, u32)]> {
    let total: u64 = endpoints.iter().map(|(_, w, _)| u64::from(*w)).sum();
    let size = (MIN_RING_POINTS * endpoints.len() as u64).clamp(MIN_RING_POINTS, MAX_RING_POINTS);
    let mut points = Vec::new();
    for (i, w, address) in endpoints {
        let count = (size * u64::from(*w) / total).max(1);
        for replica in 0..count {
            points.push((hash_pair(address.as_bytes(), replica), *i));
        }
    }
    points.sort_unstable();
    points.into()
}

/// Maglev's lookup table (Eisenbud et al., 2016), weighted as Envoy's: every
/// round each endpoint earns its weight and takes a slot per `max weight`.
fn maglev(endpoints: &[(u32, u32, &str)]) -> Box<[u32]> {
    let n = endpoints.len() as u64;
    let size = MAGLEV_SIZES
        .into_iter()
        .find(|m| *m >= 100 * n)
        .unwrap_or(MAGLEV_SIZES[MAGLEV_SIZES.len() - 1]);
    let permutation: Vec<(u64, u64)> = endpoints
        .iter()
        .map(|(_, _, address)| {
            let offset = hash_pair(address.as_bytes(), 0) % size;
            let skip = hash_pair(address.as_bytes(), 1) % (size - 1) + 1;
            (offset, skip)
        })
        .collect();
    let max_weight = endpoints
        .iter()
        .map(|(_, w, _)| u64::from(*w))
        .max()
        .unwrap_or(1);
    let mut next = vec![0u64; endpoints.len()];
    let mut credit = vec![0u64; endpoints.len()];
    let mut table = vec![u32::MAX; size as usize];
    let mut filled = 0;
    while filled < size {
        for (slot, (i, w, _)) in endpoints.iter().enumerate() {
            credit[slot] += u64::from(*w);
            if credit[slot] < max_weight {
                continue;
            }
            credit[slot] -= max_weight;
            let (offset, skip) = permutation[slot];
            let mut entry = (offset + next[slot] * skip) % size;
            while table[entry as usize] != u32::MAX {
                next[slot] += 1;
                entry = (offset + next[slot] * skip) % size;
            }
            table[entry as usize] = *i;
            next[slot] += 1;
            filled += 1;
            if filled == size {
                break;
            }
        }
    }
    table.into()
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// An endpoint's position as stored in the tables; a backend's endpoints
/// are far fewer than 2^32 (a snapshot that large could not be decoded).
fn index(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}

/// FNV-1a, then murmur3's finalizer so that close keys land far apart:
/// stable across processes, so every proxy places a key alike.
fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

fn hash_pair(bytes: &[u8], n: u64) -> u64 {
    mix(hash(bytes) ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// A fast per-thread random number (xorshift64*), seeded from the OS once
/// per thread: balancing needs spread, not secrecy.
fn random() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new(rand::random::<u64>() | 1);
    }
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

#[cfg(test)]
mod tests;
