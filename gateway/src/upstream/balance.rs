//! Choosing a target: round robin, weighted round robin (a precomputed
//! smooth schedule), least outstanding requests (power of two choices),
//! random, and consistent hashing on a ring or a Maglev table.
//!
//! Everything that depends only on the target set (schedule, ring, table) is
//! built when the set changes (`TargetSet::new`); a pick is then an atomic
//! counter or a random number, a lookup, and availability checks on the
//! chosen targets. A target that is unhealthy or ejected is skipped. With
//! consistent hashing the next one on the ring (or table) takes its
//! requests, so only the keys of the missing target move. The others
//! spread its share over all available targets instead of handing it to
//! its neighbour: round robin and the schedule move on to the next turn
//! (the skipped turn is used up), random picks draw among available ones.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::HeaderMap;
use http::header::COOKIE;

use super::config::{Balance, HashKey};
use super::target::Target;

/// Virtual nodes per unit of weight on the hash ring.
const RING_REPLICAS: u32 = 100;
/// Maglev lookup table size: a prime well above 100 × targets.
const MAGLEV_SIZE: usize = 65_537;
/// Longest weighted round-robin schedule (weights are scaled down beyond).
const MAX_SCHEDULE: u64 = 10_000;

/// A pool's targets and the lookup structures built from them.
#[derive(Debug)]
pub struct TargetSet {
    pub targets: Vec<Arc<Target>>,
    plan: Plan,
}

#[derive(Debug)]
enum Plan {
    Simple,
    /// Target indexes in smooth weighted round-robin order.
    Schedule(Box<[u32]>),
    /// (point, target index), sorted by point.
    Ring(Box<[(u64, u32)]>),
    /// `MAGLEV_SIZE` target indexes.
    Maglev(Box<[u32]>),
}

impl TargetSet {
    pub fn new(targets: Vec<Arc<Target>>, balance: Balance) -> TargetSet {
        let plan = if targets.is_empty() {
            Plan::Simple
        } else {
            match balance {
                Balance::WeightedRoundRobin => Plan::Schedule(schedule(&targets)),
                Balance::RingHash => Plan::Ring(ring(&targets)),
                Balance::Maglev => Plan::Maglev(maglev(&targets)),
                _ => Plan::Simple,
            }
        };
        TargetSet { targets, plan }
    }

    pub fn len(&self) -> usize {
        self.targets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// Chooses a target index. `hash` is the request's key for consistent
    /// hashing (`None` spreads keyless requests at random); `avoid` is a
    /// target already tried, skipped when another is available.
    pub fn pick(
        &self,
        balance: Balance,
        next: &AtomicUsize,
        hash: Option<u64>,
        avoid: Option<usize>,
        now: u64,
    ) -> Option<usize> {
        let n = self.targets.len();
        if n == 0 {
            return None;
        }
        let ok = |i: usize| Some(i) != avoid && self.targets[i].available(now);
        let choice = match (&self.plan, hash) {
            // Each skipped turn is used up, so the turns of a missing
            // target go to whoever's turn comes next, not all to the one
            // after it. When a heavy target is out its turns run longer
            // than the search: a draw by weight among the available ones
            // keeps their shares.
            (Plan::Schedule(s), _) => (0..s.len().min(64))
                .map(|_| s[next.fetch_add(1, Ordering::Relaxed) % s.len()] as usize)
                .find(|&i| ok(i))
                .or_else(|| weighted_pick(&self.targets, ok)),
            (Plan::Ring(r), Some(h)) => {
                let start = r.partition_point(|&(p, _)| p < h);
                (0..r.len())
                    .map(|k| r[(start + k) % r.len()].1 as usize)
                    .find(|&i| ok(i))
            }
            (Plan::Maglev(t), Some(h)) => (0..8u64)
                .map(|k| t[(mix(h.wrapping_add(k)) % MAGLEV_SIZE as u64) as usize] as usize)
                .find(|&i| ok(i)),
            (Plan::Ring(_) | Plan::Maglev(_), None) => random_pick(n, ok),
            (Plan::Simple, _) => match balance {
                Balance::LeastRequest if n > 1 => {
                    let a = fastrand::usize(..n);
                    let b = (a + 1 + fastrand::usize(..n - 1)) % n;
                    match (ok(a), ok(b)) {
                        (true, true) => {
                            let (ta, tb) = (&self.targets[a], &self.targets[b]);
                            // Compare in_flight / weight without dividing.
                            let la = ta.in_flight() as u64 * u64::from(tb.weight);
                            let lb = tb.in_flight() as u64 * u64::from(ta.weight);
                            Some(if lb < la { b } else { a })
                        }
                        (true, false) => Some(a),
                        (false, true) => Some(b),
                        (false, false) => random_pick(n, ok),
                    }
                }
                Balance::Random | Balance::LeastRequest => random_pick(n, ok),
                _ => (0..n)
                    .map(|_| next.fetch_add(1, Ordering::Relaxed) % n)
                    .find(|&i| ok(i)),
            },
        };
        // Fall back to any available target, then to the avoided one.
        choice
            .or_else(|| (0..n).find(|&i| ok(i)))
            .or_else(|| avoid.filter(|&i| i < n && self.targets[i].available(now)))
    }
}

/// A uniformly random available target (walking on from an unavailable
/// one would give its share to its neighbour).
fn random_pick(n: usize, ok: impl Fn(usize) -> bool) -> Option<usize> {
    let first = fastrand::usize(..n);
    if ok(first) {
        return Some(first);
    }
    let available = (0..n).filter(|&i| ok(i)).count();
    if available == 0 {
        return None;
    }
    (0..n).filter(|&i| ok(i)).nth(fastrand::usize(..available))
}

/// An available target drawn with probability in proportion to its weight.
fn weighted_pick(targets: &[Arc<Target>], ok: impl Fn(usize) -> bool) -> Option<usize> {
    let weight = |i: usize| {
        if ok(i) {
            u64::from(targets[i].weight)
        } else {
            0
        }
    };
    let total: u64 = (0..targets.len()).map(weight).sum();
    if total == 0 {
        return None;
    }
    let mut draw = fastrand::u64(..total);
    (0..targets.len()).find(|&i| {
        let w = weight(i);
        if draw < w {
            return true;
        }
        draw -= w;
        false
    })
}

/// Smooth weighted round robin (as nginx), unrolled into a schedule.
fn schedule(targets: &[Arc<Target>]) -> Box<[u32]> {
    let total: u64 = targets.iter().map(|t| u64::from(t.weight)).sum();
    let scale = total.div_ceil(MAX_SCHEDULE).max(1);
    let weights: Vec<i64> = targets
        .iter()
        .map(|t| i64::try_from((u64::from(t.weight) / scale).max(1)).unwrap_or(1))
        .collect();
    let sum: i64 = weights.iter().sum();
    let mut current = vec![0i64; targets.len()];
    let mut out = Vec::with_capacity(usize::try_from(sum).unwrap_or(0));
    for _ in 0..sum {
        let mut best = 0;
        for (i, w) in weights.iter().enumerate() {
            current[i] += w;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= sum;
        out.push(u32::try_from(best).unwrap_or(0));
    }
    out.into_boxed_slice()
}

fn ring(targets: &[Arc<Target>]) -> Box<[(u64, u32)]> {
    let mut points = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        let base = hash_bytes(t.addr.as_str().as_bytes());
        for r in 0..RING_REPLICAS * t.weight {
            points.push((
                mix(base ^ mix(u64::from(r) + 1)),
                u32::try_from(i).unwrap_or(0),
            ));
        }
    }
    points.sort_unstable();
    points.into_boxed_slice()
}

/// Maglev (Eisenbud et al., NSDI 2016) table population. Weights are not
/// used: each target gets an equal share of the table.
fn maglev(targets: &[Arc<Target>]) -> Box<[u32]> {
    let m = MAGLEV_SIZE as u64;
    // Sort by address so the table does not depend on discovery order.
    let mut order: Vec<usize> = (0..targets.len()).collect();
    order.sort_by(|&a, &b| targets[a].addr.as_str().cmp(targets[b].addr.as_str()));
    let perms: Vec<(u64, u64)> = order
        .iter()
        .map(|&i| {
            let h = hash_bytes(targets[i].addr.as_str().as_bytes());
            let offset = mix(h) % m;
            let skip = mix(h ^ 0x9e37_79b9_7f4a_7c15) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; order.len()];
    let mut table = vec![u32::MAX; MAGLEV_SIZE];
    let mut filled = 0;
    'fill: loop {
        for (k, &i) in order.iter().enumerate() {
            let (offset, skip) = perms[k];
            let mut c = (offset + next[k] * skip) % m;
            while table[c as usize] != u32::MAX {
                next[k] += 1;
                c = (offset + next[k] * skip) % m;
            }
            table[c as usize] = u32::try_from(i).unwrap_or(0);
            next[k] += 1;
            filled += 1;
            if filled == MAGLEV_SIZE {
                break 'fill;
            }
        }
    }
    table.into_boxed_slice()
}

/// FNV-1a, finished with `mix`.
pub fn hash_bytes(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &x in b {
        h ^= u64::from(x);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// The splitmix64 finalizer.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The request's consistent-hashing key, hashed; `None` when the request
/// has no such key (it then goes to a random target).
pub fn request_hash(key: &HashKey, client: std::net::IpAddr, headers: &HeaderMap) -> Option<u64> {
    match key {
        HashKey::ClientIp => Some(match client {
            std::net::IpAddr::V4(v4) => hash_bytes(&v4.octets()),
            std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => hash_bytes(&v4.octets()),
                None => hash_bytes(&v6.octets()),
            },
        }),
        HashKey::Header(name) => headers.get(name).map(|v| hash_bytes(v.as_bytes())),
        HashKey::Cookie(name) => headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|pair| {
                let (k, v) = pair.trim().split_once('=')?;
                (k == name).then(|| hash_bytes(v.as_bytes()))
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(n: usize) -> Vec<Arc<Target>> {
        (0..n)
            .map(|i| {
                Arc::new(Target::new(
                    "t",
                    format!("10.0.0.{}:80", i + 1).parse().unwrap(),
                    1,
                    0,
                ))
            })
            .collect()
    }

    fn owner(set: &TargetSet, balance: Balance, key: u64) -> String {
        let i = set
            .pick(balance, &AtomicUsize::new(0), Some(key), None, 1)
            .unwrap();
        set.targets[i].addr.to_string()
    }

    /// Removing one of five targets moves only its own keys (ring: exactly;
    /// Maglev: nearly), and adding it back moves about a fifth.
    fn minimal_movement(balance: Balance, tolerance: f64) {
        let all = targets(5);
        let full = TargetSet::new(all.clone(), balance);
        let less = TargetSet::new(all[..4].to_vec(), balance);
        let keys: Vec<u64> = (0..20_000u64)
            .map(|k| hash_bytes(&k.to_le_bytes()))
            .collect();
        let before: Vec<String> = keys.iter().map(|&k| owner(&full, balance, k)).collect();
        let after: Vec<String> = keys.iter().map(|&k| owner(&less, balance, k)).collect();
        let removed = all[4].addr.to_string();
        let on_removed = before.iter().filter(|o| **o == removed).count();
        let moved_others = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| **b != removed && b != a)
            .count();
        let share = on_removed as f64 / keys.len() as f64;
        assert!(
            (0.12..0.28).contains(&share),
            "{balance:?}: the removed target had {share:.3} of the keys"
        );
        assert!(
            (moved_others as f64) <= tolerance * keys.len() as f64,
            "{balance:?}: {moved_others} keys of the remaining targets moved"
        );
        // Spread: every remaining target gets a fair share.
        for t in &all[..4] {
            let a = t.addr.to_string();
            let n = after.iter().filter(|o| **o == a).count() as f64 / keys.len() as f64;
            assert!((0.15..0.35).contains(&n), "{balance:?}: {a} has {n:.3}");
        }
    }

    #[test]
    fn ring_hash_moves_only_the_removed_targets_keys() {
        minimal_movement(Balance::RingHash, 0.0);
    }

    #[test]
    fn maglev_moves_few_keys_of_other_targets() {
        minimal_movement(Balance::Maglev, 0.02);
    }

    #[test]
    fn unavailable_target_moves_only_its_keys() {
        for balance in [Balance::RingHash, Balance::Maglev] {
            let all = targets(3);
            let set = TargetSet::new(all.clone(), balance);
            let keys: Vec<u64> = (0..3000u64).map(|k| mix(k + 7)).collect();
            let before: Vec<String> = keys.iter().map(|&k| owner(&set, balance, k)).collect();
            all[1].healthy.store(false, Ordering::Relaxed);
            let dead = all[1].addr.to_string();
            for (k, b) in keys.iter().zip(&before) {
                let a = owner(&set, balance, *k);
                assert_ne!(a, dead);
                if *b != dead {
                    assert_eq!(&a, b, "{balance:?}: a live target's key moved");
                }
            }
        }
    }

    #[test]
    fn weighted_round_robin_follows_weights_smoothly() {
        let ts: Vec<Arc<Target>> = [5u32, 1, 1]
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                Arc::new(Target::new(
                    "t",
                    format!("10.0.0.{}:80", i + 1).parse().unwrap(),
                    w,
                    0,
                ))
            })
            .collect();
        let set = TargetSet::new(ts, Balance::WeightedRoundRobin);
        let next = AtomicUsize::new(0);
        let picks: Vec<usize> = (0..7)
            .map(|_| {
                set.pick(Balance::WeightedRoundRobin, &next, None, None, 1)
                    .unwrap()
            })
            .collect();
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn round_robin_skips_unavailable_and_avoided() {
        let all = targets(3);
        let set = TargetSet::new(all.clone(), Balance::RoundRobin);
        let next = AtomicUsize::new(0);
        all[1].ejected_until.store(100, Ordering::Relaxed);
        let picks: Vec<usize> = (0..4)
            .map(|_| {
                set.pick(Balance::RoundRobin, &next, None, None, 50)
                    .unwrap()
            })
            .collect();
        // The ejected target's turns are shared, not all handed to 2.
        assert_eq!(picks, [0, 2, 0, 2]);
        // Ejection over.
        let picks: Vec<usize> = (0..3)
            .map(|_| {
                set.pick(Balance::RoundRobin, &next, None, None, 100)
                    .unwrap()
            })
            .collect();
        assert_eq!(picks, [0, 1, 2]);
        // Avoid the target just tried when another one can take it.
        for _ in 0..10 {
            assert_ne!(
                set.pick(Balance::Random, &next, None, Some(2), 100),
                Some(2)
            );
        }
        // Nothing else available: the avoided target is better than none.
        let one = TargetSet::new(all[..1].to_vec(), Balance::RoundRobin);
        assert_eq!(
            one.pick(Balance::RoundRobin, &next, None, Some(0), 100),
            Some(0)
        );
    }

    /// With one target out, the others share its requests evenly (by
    /// weight) whatever the balancer; before, its successor took them all.
    #[test]
    fn a_missing_targets_share_is_spread_over_the_others() {
        fastrand::seed(0xba1a);
        let weighted = |ws: &[u32]| -> Vec<Arc<Target>> {
            ws.iter()
                .enumerate()
                .map(|(i, &w)| {
                    Arc::new(Target::new(
                        "t",
                        format!("10.0.0.{}:80", i + 1).parse().unwrap(),
                        w,
                        0,
                    ))
                })
                .collect()
        };
        for (balance, ws, down, n, fair) in [
            (Balance::RoundRobin, &[1, 1, 1][..], 1, 600, 300..=300),
            (Balance::WeightedRoundRobin, &[1, 1, 1], 1, 600, 300..=300),
            (Balance::WeightedRoundRobin, &[5, 1, 1], 0, 700, 350..=350),
            // The out target's turns are longer than the 64-turn search:
            // the two left still share by weight (1:1), not first-found.
            (
                Balance::WeightedRoundRobin,
                &[1000, 1, 1],
                0,
                3000,
                1350..=1650,
            ),
            (Balance::Random, &[1, 1, 1], 1, 3000, 1350..=1650),
            (Balance::RingHash, &[1, 1, 1], 1, 3000, 1350..=1650),
        ] {
            let all = weighted(ws);
            let set = TargetSet::new(all.clone(), balance);
            all[down].healthy.store(false, Ordering::Relaxed);
            let next = AtomicUsize::new(0);
            let mut counts = vec![0; all.len()];
            for _ in 0..n {
                // No hash key: consistent hashing spreads at random.
                counts[set.pick(balance, &next, None, None, 1).unwrap()] += 1;
            }
            assert_eq!(counts[down], 0, "{balance:?} {ws:?}: {counts:?}");
            for (i, c) in counts.iter().enumerate() {
                if i != down {
                    assert!(fair.contains(c), "{balance:?} {ws:?}: {counts:?}");
                }
            }
        }
    }

    /// The draw that replaces a heavy missing target's turns follows the
    /// weights of those left (1:3 here).
    #[test]
    fn a_heavy_missing_targets_turns_go_by_weight() {
        fastrand::seed(7);
        let all: Vec<Arc<Target>> = [1000, 1, 3]
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let addr = format!("10.0.0.{}:80", i + 1).parse().unwrap();
                Arc::new(Target::new("t", addr, w, 0))
            })
            .collect();
        let set = TargetSet::new(all.clone(), Balance::WeightedRoundRobin);
        all[0].healthy.store(false, Ordering::Relaxed);
        let next = AtomicUsize::new(0);
        let mut counts = [0; 3];
        for _ in 0..4000 {
            let i = set.pick(Balance::WeightedRoundRobin, &next, None, None, 1);
            counts[i.unwrap()] += 1;
        }
        assert_eq!(counts[0], 0, "{counts:?}");
        assert!((850..=1150).contains(&counts[1]), "{counts:?}");
        assert!((2850..=3150).contains(&counts[2]), "{counts:?}");
    }

    #[test]
    fn least_request_prefers_the_idle_target() {
        let all = targets(2);
        let set = TargetSet::new(all.clone(), Balance::LeastRequest);
        all[0].in_flight.store(10, Ordering::Relaxed);
        for _ in 0..20 {
            assert_eq!(
                set.pick(Balance::LeastRequest, &AtomicUsize::new(0), None, None, 1),
                Some(1)
            );
        }
    }

    #[test]
    fn hash_keys() {
        let mut h = HeaderMap::new();
        h.insert(COOKIE, "a=1; session=abc; b=2".parse().unwrap());
        h.insert("x-user", "42".parse().unwrap());
        let ip = "192.0.2.1".parse().unwrap();
        assert_eq!(
            request_hash(&HashKey::Cookie("session".into()), ip, &h),
            Some(hash_bytes(b"abc"))
        );
        assert_eq!(
            request_hash(&HashKey::Header("x-user".parse().unwrap()), ip, &h),
            Some(hash_bytes(b"42"))
        );
        assert_eq!(request_hash(&HashKey::Cookie("nope".into()), ip, &h), None);
        assert!(request_hash(&HashKey::ClientIp, ip, &h).is_some());
    }
}
