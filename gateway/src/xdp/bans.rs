//! Bans with an expiry, enforced in userspace at accept: what auto-ban
//! (`crate::policy::autoban`) writes through `Enforcer::ban`. When the
//! kernel path runs, the same bans belong in the XDP deny map with a TTL;
//! this table is the fallback for `--no-xdp` and hosts without XDP.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::policy::access::display_net;

/// Banned sources (networks: a client banned by its /64 is banned from
/// every address in it) and when each ban ends.
#[derive(Debug, Default)]
pub struct Bans {
    /// Entries in `map`, read without the lock on every accept.
    len: AtomicUsize,
    map: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    bans: HashMap<IpNet, Instant>,
    /// The prefix lengths `bans` holds, longest first: an address is
    /// looked up once per length (there are one or two in practice).
    lens: Vec<(bool, u8)>,
}

impl Table {
    /// Forgets prefix lengths no ban has any more, so that lookups stop
    /// trying them.
    fn trim_lens(&mut self) {
        let bans = &self.bans;
        self.lens.retain(|&(v6, len)| {
            bans.keys()
                .any(|n| n.addr().is_ipv6() == v6 && n.prefix_len() == len)
        });
    }
}

impl Bans {
    /// Bans `net` for `ttl` (extending a shorter ban in force).
    pub fn insert(&self, net: IpNet, ttl: Duration) {
        let net = net.trunc();
        let now = Instant::now();
        let until = now + ttl;
        let mut t = self.map.lock().unwrap_or_else(|p| p.into_inner());
        // Expired bans of sources that never came back go here, so many
        // sources banned once (rotating addresses) cannot grow the table
        // past the bans in force by more than it had.
        if t.bans.len() >= 64 {
            t.bans.retain(|_, u| *u > now);
            t.trim_lens();
        }
        let len = (net.addr().is_ipv6(), net.prefix_len());
        if !t.lens.contains(&len) {
            t.lens.push(len);
            t.lens.sort_by_key(|l| std::cmp::Reverse(l.1));
        }
        let e = t.bans.entry(net).or_insert(until);
        *e = (*e).max(until);
        self.len.store(t.bans.len(), Ordering::Relaxed);
    }

    /// Whether `ip` is in a ban now; a ban found expired is lifted (and
    /// logged) here.
    pub fn contains(&self, ip: IpAddr) -> bool {
        if self.len.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let mut t = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        for i in 0..t.lens.len() {
            let (v6, len) = t.lens[i];
            if v6 != ip.is_ipv6() {
                continue;
            }
            let Ok(net) = IpNet::new(ip, len).map(|n| n.trunc()) else {
                continue;
            };
            let Some(&until) = t.bans.get(&net) else {
                continue;
            };
            if until > now {
                return true;
            }
            t.bans.remove(&net);
            t.trim_lens();
            self.len.store(t.bans.len(), Ordering::Relaxed);
            tracing::info!(source = %display_net(&net), "ban expired; source admitted again");
        }
        false
    }

    /// Bans in force, with the time each has left; expired ones are lifted.
    pub fn list(&self) -> Vec<(IpNet, Duration)> {
        let now = Instant::now();
        let mut t = self.map.lock().unwrap_or_else(|p| p.into_inner());
        t.bans.retain(|net, until| {
            let live = *until > now;
            if !live {
                tracing::info!(source = %display_net(net), "ban expired; source admitted again");
            }
            live
        });
        t.trim_lens();
        self.len.store(t.bans.len(), Ordering::Relaxed);
        let mut v: Vec<_> = t.bans.iter().map(|(n, u)| (*n, *u - now)).collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expired_bans_of_absent_sources_are_purged_as_bans_arrive() {
        let b = Bans::default();
        for i in 0..200u32 {
            b.insert(IpNet::from(IpAddr::from(i.to_be_bytes())), Duration::ZERO);
        }
        assert!(
            b.len.load(Ordering::Relaxed) <= 64,
            "{}",
            b.len.load(Ordering::Relaxed)
        );
        b.insert("192.0.2.1/32".parse().unwrap(), Duration::from_secs(60));
        assert!(b.contains("192.0.2.1".parse().unwrap()));
        assert!(!b.contains(IpAddr::from(5u32.to_be_bytes())));
    }

    #[test]
    fn lookups_try_only_the_prefix_lengths_of_bans_in_force() {
        let b = Bans::default();
        b.insert("2001:db8::/64".parse().unwrap(), Duration::from_secs(60));
        b.insert("198.51.100.0/24".parse().unwrap(), Duration::ZERO);
        b.insert("192.0.2.1/32".parse().unwrap(), Duration::from_secs(60));
        assert!(b.contains("2001:db8::7".parse().unwrap()));
        assert!(!b.contains("198.51.100.9".parse().unwrap()), "expired");
        let lens = |b: &Bans| b.map.lock().unwrap().lens.clone();
        assert_eq!(lens(&b), [(true, 64), (false, 32)]);
        assert_eq!(b.list().len(), 2);
    }
}
