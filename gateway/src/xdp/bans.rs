//! Bans with an expiry, enforced in userspace at accept: what auto-ban
//! (`crate::policy::autoban`) writes through `Enforcer::ban`. When the
//! kernel path runs, the same bans belong in the XDP deny map with a TTL;
//! this table is the fallback for `--no-xdp` and hosts without XDP.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Banned sources and when each ban ends.
#[derive(Debug, Default)]
pub struct Bans {
    /// Entries in `map`, read without the lock on every accept.
    len: AtomicUsize,
    map: Mutex<HashMap<IpAddr, Instant>>,
}

impl Bans {
    /// Bans `ip` for `ttl` (extending a shorter ban in force).
    pub fn insert(&self, ip: IpAddr, ttl: Duration) {
        let now = Instant::now();
        let until = now + ttl;
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        // Expired bans of sources that never came back go here, so many
        // sources banned once (rotating IPv6 addresses) cannot grow the
        // table past the bans in force by more than it had.
        if m.len() >= 64 {
            m.retain(|_, u| *u > now);
        }
        let e = m.entry(ip).or_insert(until);
        *e = (*e).max(until);
        self.len.store(m.len(), Ordering::Relaxed);
    }

    /// Whether `ip` is banned now; a ban found expired is lifted (and
    /// logged) here.
    pub fn contains(&self, ip: IpAddr) -> bool {
        if self.len.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let Some(&until) = m.get(&ip) else {
            return false;
        };
        if until > Instant::now() {
            return true;
        }
        m.remove(&ip);
        self.len.store(m.len(), Ordering::Relaxed);
        tracing::info!(%ip, "ban expired; source admitted again");
        false
    }

    /// Bans in force, with the time each has left; expired ones are lifted.
    pub fn list(&self) -> Vec<(IpAddr, Duration)> {
        let now = Instant::now();
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|ip, until| {
            let live = *until > now;
            if !live {
                tracing::info!(%ip, "ban expired; source admitted again");
            }
            live
        });
        self.len.store(m.len(), Ordering::Relaxed);
        let mut v: Vec<_> = m.iter().map(|(ip, u)| (*ip, *u - now)).collect();
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
            b.insert(IpAddr::from(i.to_be_bytes()), Duration::ZERO);
        }
        assert!(
            b.len.load(Ordering::Relaxed) <= 64,
            "{}",
            b.len.load(Ordering::Relaxed)
        );
        b.insert("192.0.2.1".parse().unwrap(), Duration::from_secs(60));
        assert!(b.contains("192.0.2.1".parse().unwrap()));
        assert!(!b.contains(IpAddr::from(5u32.to_be_bytes())));
    }
}
