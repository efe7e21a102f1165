use std::collections::HashMap;
use std::net::SocketAddr;

use proptest::prelude::*;

use super::*;

/// Endpoints as plain data: which are available, how many requests each has.
struct Fake {
    available: Vec<bool>,
    in_flight: Vec<u32>,
}

impl Fake {
    fn up(n: usize) -> Self {
        Self {
            available: vec![true; n],
            in_flight: vec![0; n],
        }
    }
}

impl Endpoints for Fake {
    fn available(&self, index: usize) -> bool {
        self.available[index]
    }

    fn in_flight(&self, index: usize) -> u32 {
        self.in_flight[index]
    }
}

fn specs(weights: &[u32]) -> Vec<EndpointSpec> {
    weights
        .iter()
        .enumerate()
        .map(|(i, w)| EndpointSpec {
            address: format!("10.0.{}.{}:80", i / 250, i % 250 + 1),
            weight: *w,
            ..Default::default()
        })
        .collect()
}

fn header_hash(name: &str) -> HashPolicy {
    HashPolicy {
        key: Some(hash_policy::Key::Header(name.into())),
    }
}

fn balancer(policy: LbPolicy, endpoints: &[EndpointSpec]) -> Balancer {
    let hash =
        matches!(policy, LbPolicy::RingHash | LbPolicy::Maglev).then(|| header_hash("x-key"));
    Balancer::new(policy, hash.as_ref(), None, endpoints, "")
}

fn counts(
    b: &Balancer,
    fake: &Fake,
    picks: usize,
    key: impl Fn(usize) -> Option<u64>,
) -> Vec<usize> {
    let mut counts = vec![0; fake.available.len()];
    for n in 0..picks {
        counts[b.pick(fake, key(n)).expect("available")] += 1;
    }
    counts
}

const ALL: [LbPolicy; 5] = [
    LbPolicy::RoundRobin,
    LbPolicy::LeastRequest,
    LbPolicy::Random,
    LbPolicy::RingHash,
    LbPolicy::Maglev,
];

#[test]
fn weighted_round_robin_is_exact_and_spread_out() {
    let b = balancer(LbPolicy::RoundRobin, &specs(&[3, 1]));
    let fake = Fake::up(2);
    let picked: Vec<usize> = (0..8).map(|_| b.pick(&fake, None).expect("up")).collect();
    assert_eq!(picked, [0, 0, 1, 0, 0, 0, 1, 0]);
}

#[test]
fn every_policy_skips_unavailable_endpoints_and_says_when_none_is_left() {
    for policy in ALL {
        let b = balancer(policy, &specs(&[1, 2, 3]));
        let mut fake = Fake::up(3);
        fake.available[1] = false;
        let seen = counts(&b, &fake, 600, |n| Some(hash(&n.to_le_bytes())));
        assert_eq!(seen[1], 0, "{policy:?}: {seen:?}");
        assert!(seen[0] > 0 && seen[2] > 0, "{policy:?}: {seen:?}");
        let down = Fake {
            available: vec![false; 3],
            in_flight: vec![0; 3],
        };
        assert_eq!(b.pick(&down, Some(1)), None, "{policy:?}");
    }
}

#[test]
fn least_request_avoids_the_busy_endpoint() {
    let b = balancer(LbPolicy::LeastRequest, &specs(&[1, 1, 1, 1]));
    let mut fake = Fake::up(4);
    fake.in_flight[2] = 100;
    let seen = counts(&b, &fake, 4000, |_| None);
    // The busy one wins only when both choices land on it: 1/16 of picks.
    assert!(seen[2] < 400, "{seen:?}");
    assert!(seen[0] > 900 && seen[1] > 900 && seen[3] > 900, "{seen:?}");
}

#[test]
fn consistent_hash_without_a_key_spreads_at_random() {
    for policy in [LbPolicy::RingHash, LbPolicy::Maglev] {
        let b = balancer(policy, &specs(&[1, 1]));
        let seen = counts(&b, &Fake::up(2), 1000, |_| None);
        assert!(seen[0] > 300 && seen[1] > 300, "{policy:?}: {seen:?}");
    }
}

#[test]
fn hash_keys_come_from_a_header_a_cookie_or_the_client_ip() {
    let eps = specs(&[1]);
    let by = |key: hash_policy::Key| {
        Balancer::new(
            LbPolicy::RingHash,
            Some(&HashPolicy { key: Some(key) }),
            None,
            &eps,
            "",
        )
    };
    let request = |f: fn(http::request::Builder) -> http::request::Builder| {
        f(Request::get("/")).body(()).expect("request")
    };
    let header = by(hash_policy::Key::Header("x-user".into()));
    let with = request(|r| r.header("x-user", "alice"));
    assert_eq!(header.hash(&with), Some(hash(b"alice")));
    assert_eq!(header.hash(&request(|r| r)), None);

    let cookie = by(hash_policy::Key::Cookie("session".into()));
    let with = request(|r| r.header("cookie", "a=1; session=s42 ;b=2"));
    assert_eq!(cookie.hash(&with), Some(hash(b"s42")));
    let without = request(|r| r.header("cookie", "sessionx=1"));
    assert_eq!(cookie.hash(&without), None);

    let ip = by(hash_policy::Key::ClientIp(true));
    let mut from = request(|r| r);
    let addr: SocketAddr = "192.0.2.7:4242".parse().expect("addr");
    from.extensions_mut().insert(ClientAddr(addr));
    assert_eq!(ip.hash(&from), Some(hash(&[192, 0, 2, 7])));
    // Another port of the same client hashes alike.
    from.extensions_mut()
        .insert(ClientAddr("192.0.2.7:5000".parse().expect("addr")));
    assert_eq!(ip.hash(&from), Some(hash(&[192, 0, 2, 7])));
}

#[test]
fn zone_aware_keeps_traffic_in_the_zone_while_enough_of_it_is_available() {
    let mut eps = specs(&[1, 1, 1, 1]);
    for (e, zone) in eps.iter_mut().zip(["a", "a", "a", "b"]) {
        e.zone = zone.into();
    }
    let zone_aware = ZoneAware {
        min_healthy_percent: 60,
    };
    let b = Balancer::new(LbPolicy::RoundRobin, None, Some(&zone_aware), &eps, "a");
    let mut fake = Fake::up(4);
    let seen = counts(&b, &fake, 30, |_| None);
    assert_eq!(seen, [10, 10, 10, 0]);
    // Two of three (67%) still hold the line...
    fake.available[0] = false;
    let seen = counts(&b, &fake, 30, |_| None);
    assert_eq!(seen, [0, 15, 15, 0]);
    // ...one of three (33%) does not: every available endpoint takes traffic.
    fake.available[1] = false;
    let seen = counts(&b, &fake, 30, |_| None);
    assert_eq!(seen, [0, 0, 15, 15]);
    // A proxy in another zone, or one without a zone, balances over all.
    let elsewhere = Balancer::new(LbPolicy::RoundRobin, None, Some(&zone_aware), &eps, "");
    assert_eq!(counts(&elsewhere, &Fake::up(4), 40, |_| None), [10; 4]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Every policy gives each endpoint its weighted share of the picks.
    #[test]
    fn weighted_shares(weights in proptest::collection::vec(1u32..6, 1..6)) {
        let total: u32 = weights.iter().sum();
        let eps = specs(&weights);
        for policy in ALL {
            let b = balancer(policy, &eps);
            let picks = 6000;
            let seen = counts(&b, &Fake::up(weights.len()), picks, |n| {
                Some(mix(n as u64 ^ 0x5555))
            });
            for (i, w) in weights.iter().enumerate() {
                let expected = picks as f64 * f64::from(*w) / f64::from(total);
                let got = seen[i] as f64;
                // Hash tables only approximate the weights.
                let slack = match policy {
                    LbPolicy::RoundRobin => 1.0,
                    _ => 0.25 * expected + 60.0,
                };
                prop_assert!(
                    (got - expected).abs() <= slack,
                    "{:?} weights {:?}: endpoint {} got {} of {}, expected {}",
                    policy, weights, i, got, picks, expected
                );
            }
        }
    }

    /// When an endpoint leaves, consistent hashing moves the keys that were
    /// on it, and (almost) only those.
    #[test]
    fn consistent_hash_moves_only_the_keys_of_a_leaving_endpoint(
        n in 3usize..12,
        leaving in 0usize..12,
    ) {
        let leaving = leaving % n;
        let before = specs(&vec![1; n]);
        let mut after = before.clone();
        after.remove(leaving);
        for policy in [LbPolicy::RingHash, LbPolicy::Maglev] {
            let old = balancer(policy, &before);
            let new = balancer(policy, &after);
            let (mut moved, mut stayed_elsewhere, keys) = (0, 0, 4000u64);
            for k in 0..keys {
                let key = Some(mix(k));
                let a = &before[old.pick(&Fake::up(n), key).expect("up")].address;
                let b = &after[new.pick(&Fake::up(n - 1), key).expect("up")].address;
                if *a == before[leaving].address {
                    continue;
                }
                stayed_elsewhere += 1;
                if a != b {
                    moved += 1;
                }
            }
            // Ring hash moves none; Maglev a few percent at most.
            let allowed = match policy {
                LbPolicy::RingHash => 0,
                _ => stayed_elsewhere / 10,
            };
            prop_assert!(moved <= allowed, "{:?}: {} of {} keys moved", policy, moved, stayed_elsewhere);
        }
    }
}

#[test]
fn one_endpoint_policies_always_pick_it() {
    let mut seen = HashMap::new();
    for policy in ALL {
        let b = balancer(policy, &specs(&[7]));
        *seen.entry(b.pick(&Fake::up(1), Some(3))).or_insert(0) += 1;
    }
    assert_eq!(seen.get(&Some(0)), Some(&5));
}
