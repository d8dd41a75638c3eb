//! The userspace fallback: the same allow/deny lists, default policy and
//! per-source rate limit as the XDP program, checked once per accepted
//! connection. Used when XDP cannot be (no privilege, no BPF, `--no-xdp`, no
//! interfaces configured). A refused connection has already cost an accept;
//! the caller closes it at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use crate::xdp::config::{Policy as DefaultPolicy, RateLimit, XdpSettings};
use crate::xdp::rules::{Matcher, Rules, Verdict, canonical, mask4, mask6, now_ns};

/// A snapshot of the policy, swapped whole on every change.
#[derive(Debug)]
pub struct Policy {
    matcher: Matcher,
    default_deny: bool,
    limiter: Option<Limiter>,
}

/// Why `Policy::check` refused a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    DenyList,
    DefaultDeny,
    RateLimit,
}

impl Refusal {
    /// The `reason` label of `gateway_connections_rejected_total`.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::DenyList => "denied",
            Refusal::DefaultDeny => "default_deny",
            Refusal::RateLimit => "rate_limited",
        }
    }
}

impl Policy {
    /// The policy of `settings` over `rules` (config and run-time entries).
    /// `previous` hands over its rate-limit state when the limit is unchanged.
    pub fn new(settings: &XdpSettings, rules: &Rules, previous: Option<&Policy>) -> Policy {
        let limiter = settings.rate_limit.map(|rl| {
            let reuse = previous
                .and_then(|p| p.limiter.as_ref())
                .filter(|l| l.cfg == rl);
            match reuse {
                Some(l) => l.clone_state(),
                None => Limiter::new(rl, settings.max_sources as usize),
            }
        });
        Policy {
            matcher: rules.matcher(),
            default_deny: settings.default_policy == DefaultPolicy::Deny,
            limiter,
        }
    }

    /// Whether a new connection from `peer` may be served.
    pub fn check(&self, peer: IpAddr) -> Result<(), Refusal> {
        let now = now_ns();
        match self.matcher.verdict(peer, now) {
            Verdict::Allow => return Ok(()),
            Verdict::Deny => return Err(Refusal::DenyList),
            Verdict::None => {}
        }
        if self.default_deny {
            return Err(Refusal::DefaultDeny);
        }
        match &self.limiter {
            Some(l) if l.over(peer, now) => Err(Refusal::RateLimit),
            _ => Ok(()),
        }
    }
}

const SHARDS: usize = 16;

/// Theoretical arrival times by (IPv6?, masked source).
type Shard = Mutex<HashMap<(bool, u128), u64>>;

/// Per-source GCRA buckets (the same algorithm as the kernel's), sharded to
/// keep lock hold times short.
#[derive(Debug)]
struct Limiter {
    cfg: RateLimit,
    interval: u64,
    tolerance: u64,
    per_shard: usize,
    shards: std::sync::Arc<[Shard; SHARDS]>,
}

impl Limiter {
    fn new(cfg: RateLimit, max_sources: usize) -> Limiter {
        let interval = 1_000_000_000 / cfg.rate.max(1);
        Limiter {
            cfg,
            interval,
            tolerance: interval.saturating_mul(cfg.burst),
            per_shard: (max_sources / SHARDS).max(16),
            shards: std::sync::Arc::new(std::array::from_fn(|_| Mutex::new(HashMap::new()))),
        }
    }

    fn clone_state(&self) -> Limiter {
        Limiter {
            cfg: self.cfg,
            interval: self.interval,
            tolerance: self.tolerance,
            per_shard: self.per_shard,
            shards: self.shards.clone(),
        }
    }

    /// The bucket key: the family and the source's prefix.
    fn key(&self, ip: IpAddr) -> (bool, u128) {
        match canonical(ip) {
            IpAddr::V4(a) => (
                false,
                u128::from(u32::from(a) & mask4(self.cfg.ipv4_prefix)),
            ),
            IpAddr::V6(a) => (true, u128::from(a) & mask6(self.cfg.ipv6_prefix)),
        }
    }

    fn over(&self, ip: IpAddr, now: u64) -> bool {
        let key = self.key(ip);
        let shard = &self.shards[(key.1 as usize ^ (key.1 >> 64) as usize) % SHARDS];
        let mut m = shard.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= self.per_shard && !m.contains_key(&key) {
            // Forget sources whose bucket is full again; if none, forget all
            // (the kernel's LRU map evicts the same way, more finely).
            m.retain(|_, tat| *tat > now);
            if m.len() >= self.per_shard {
                m.clear();
            }
        }
        let tat = m.entry(key).or_insert(0);
        let next = (*tat).max(now) + self.interval;
        if next - now > self.tolerance {
            return true;
        }
        *tat = next;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xdp::config::Count;
    use crate::xdp::rules::{Entry, List};

    fn settings(rl: Option<RateLimit>, deny_default: bool) -> XdpSettings {
        XdpSettings {
            enabled: true,
            rate_limit: rl,
            default_policy: if deny_default {
                DefaultPolicy::Deny
            } else {
                DefaultPolicy::Allow
            },
            ..XdpSettings::default()
        }
    }

    #[test]
    fn lists_and_default() {
        let mut r = Rules::default();
        let conf = Entry {
            from_config: true,
            cli_until: 0,
        };
        r.set(List::Deny, &"10.0.0.0/8".parse().unwrap(), conf);
        r.set(List::Allow, &"10.0.0.1/32".parse().unwrap(), conf);
        let p = Policy::new(&settings(None, false), &r, None);
        assert_eq!(p.check("10.0.0.2".parse().unwrap()), Err(Refusal::DenyList));
        assert_eq!(p.check("10.0.0.1".parse().unwrap()), Ok(()));
        assert_eq!(p.check("11.0.0.1".parse().unwrap()), Ok(()));
        let p = Policy::new(&settings(None, true), &r, None);
        assert_eq!(
            p.check("11.0.0.1".parse().unwrap()),
            Err(Refusal::DefaultDeny)
        );
        assert_eq!(p.check("10.0.0.1".parse().unwrap()), Ok(()));
    }

    #[test]
    fn burst_then_refill_per_prefix() {
        let rl = RateLimit {
            rate: 10,
            burst: 3,
            count: Count::Syn,
            ipv4_prefix: 24,
            ipv6_prefix: 64,
        };
        let l = Limiter::new(rl, 1000);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.200".parse().unwrap();
        let c: IpAddr = "198.51.100.1".parse().unwrap();
        let t0 = 1_000_000_000;
        assert!(!l.over(a, t0));
        assert!(!l.over(b, t0));
        assert!(!l.over(a, t0));
        assert!(l.over(b, t0), "a and b share a /24 bucket of 3");
        assert!(!l.over(c, t0), "another source is unaffected");
        assert!(l.over(a, t0 + 50_000_000));
        assert!(!l.over(a, t0 + 100_000_000), "one token back after 1/rate");
        assert!(l.over(a, t0 + 100_000_000));
    }

    #[test]
    fn full_shards_forget_idle_sources() {
        let rl = RateLimit {
            rate: 1,
            burst: 1,
            count: Count::Syn,
            ipv4_prefix: 32,
            ipv6_prefix: 64,
        };
        let l = Limiter::new(rl, 16 * 16);
        for i in 0..10_000u32 {
            l.over(
                IpAddr::V4(i.into()),
                5_000_000_000 + u64::from(i) * 1_000_000_000,
            );
        }
        let total: usize = l.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(total <= 16 * 16);
    }
}
