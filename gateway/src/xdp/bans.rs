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
        let until = Instant::now() + ttl;
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
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
