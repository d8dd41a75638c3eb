//! The kernel feedback loop: a source that fails authentication (`401`,
//! `403`) `auth_failures` times, or is refused by limits (`429`)
//! `limit_exceeded` times, within `window`, is banned for `ttl` through
//! `xdp::Enforcer::ban` (the XDP deny map when XDP runs, the userspace
//! check at accept otherwise). Configured per listener; sources in `exempt`
//! are never banned. Counting state survives reloads while the settings do.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use crate::config::Problem;
use crate::config::units::Secs;
use crate::policy::access::SourcePrefix;
use crate::policy::shared::{self, Sweep};
use crate::xdp::Enforcer;

/// `[listeners.auto_ban]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoBanSection {
    /// `401`/`403` answers within `window` that ban a source; 0 = never.
    #[serde(default = "default_auth_failures")]
    pub auth_failures: u32,
    /// `429` answers within `window` that ban a source; 0 = never.
    #[serde(default = "default_limit_exceeded")]
    pub limit_exceeded: u32,
    #[serde(default = "default_window")]
    pub window: Secs,
    /// How long a ban lasts.
    #[serde(default = "default_ttl")]
    pub ttl: Secs,
    /// Sources never banned (CIDRs or addresses).
    #[serde(default)]
    pub exempt: Vec<Spanned<String>>,
    /// Sources counted and banned as one: IPv4 prefix length (default 32).
    #[serde(default)]
    pub ipv4_prefix: Option<Spanned<u8>>,
    /// ... IPv6 prefix length (default 64: a client that rotates through
    /// the addresses of its /64 is still one source).
    #[serde(default)]
    pub ipv6_prefix: Option<Spanned<u8>>,
}

fn default_auth_failures() -> u32 {
    10
}
fn default_limit_exceeded() -> u32 {
    100
}
fn default_window() -> Secs {
    Secs(Duration::from_secs(60))
}
fn default_ttl() -> Secs {
    Secs(Duration::from_secs(600))
}

#[derive(Debug, Clone, Copy)]
struct Counts {
    since: Instant,
    auth: u32,
    limit: u32,
}

/// One listener's auto-ban policy and counts.
#[derive(Debug)]
pub struct AutoBan {
    listener: Arc<str>,
    auth_failures: u32,
    limit_exceeded: u32,
    window: Duration,
    ttl: Duration,
    exempt: Vec<IpNet>,
    prefix: SourcePrefix,
    counts: DashMap<IpNet, Counts>,
    swept: AtomicBool,
}

impl AutoBan {
    pub fn compile(
        listener: &str,
        s: &Spanned<AutoBanSection>,
        problems: &mut Vec<Problem>,
    ) -> Option<Arc<AutoBan>> {
        let ss = s.get_ref();
        let before = problems.len();
        let exempt = crate::policy::access::cidrs(&ss.exempt, problems);
        // A ban of /0 would refuse everyone.
        let prefix = SourcePrefix::compile(
            ss.ipv4_prefix.as_ref(),
            ss.ipv6_prefix.as_ref(),
            1,
            problems,
        );
        if ss.window.0.is_zero() || ss.ttl.0.is_zero() {
            problems.push(Problem::at(
                s.span(),
                "auto_ban window and ttl must be non-zero",
            ));
        }
        if ss.auth_failures == 0 && ss.limit_exceeded == 0 {
            problems.push(Problem::at(
                s.span(),
                "auto_ban with auth_failures = 0 and limit_exceeded = 0 never bans; remove it",
            ));
        }
        if problems.len() > before {
            return None;
        }
        let key = format!(
            "autoban\0{listener}\0{}\0{}\0{:?}\0{:?}\0{exempt:?}\0{prefix:?}",
            ss.auth_failures, ss.limit_exceeded, ss.window.0, ss.ttl.0
        );
        Some(shared::get_or_make(key, || AutoBan {
            listener: listener.into(),
            auth_failures: ss.auth_failures,
            limit_exceeded: ss.limit_exceeded,
            window: ss.window.0,
            ttl: ss.ttl.0,
            exempt,
            prefix,
            counts: DashMap::new(),
            swept: AtomicBool::new(false),
        }))
    }

    /// Counts a response of `status` to `ip`, banning the source (the
    /// network of `ip` that `ipv4_prefix`/`ipv6_prefix` make one source)
    /// when it reaches a threshold. Cheap for every status but 401, 403
    /// and 429.
    pub fn observe(self: &Arc<Self>, enforcer: &Enforcer, ip: IpAddr, status: u16, proxied: bool) {
        let (auth, limit) = match status {
            401 | 403 if self.auth_failures > 0 => (1, 0),
            429 if self.limit_exceeded > 0 => (0, 1),
            _ => return,
        };
        let ip = crate::policy::access::canonical(ip);
        if self.exempt.iter().any(|n| n.contains(&ip)) {
            return;
        }
        if !self.swept.load(Ordering::Relaxed) && !self.swept.swap(true, Ordering::Relaxed) {
            let weak: std::sync::Weak<dyn Sweep> = Arc::downgrade(self) as _;
            shared::sweep_later(weak);
        }
        let net = self.prefix.net(ip);
        let now = Instant::now();
        let reason = {
            let mut c = self.counts.entry(net).or_insert(Counts {
                since: now,
                auth: 0,
                limit: 0,
            });
            if now.duration_since(c.since) > self.window {
                *c = Counts {
                    since: now,
                    auth: 0,
                    limit: 0,
                };
            }
            c.auth += auth;
            c.limit += limit;
            if self.auth_failures > 0 && c.auth >= self.auth_failures {
                "auth_failures"
            } else if self.limit_exceeded > 0 && c.limit >= self.limit_exceeded {
                "limit_exceeded"
            } else {
                return;
            }
        };
        self.counts.remove(&net);
        if !enforcer.ban(ip, net, self.ttl, proxied) {
            return;
        }
        metrics::counter!(
            "gateway_autoban_bans_total",
            "listener" => metrics::SharedString::from(self.listener.clone()),
            "reason" => reason,
        )
        .increment(1);
        tracing::warn!(
            listener = %self.listener,
            source = %crate::policy::access::display_net(&net),
            reason,
            ttl = ?self.ttl,
            "auto-ban: source banned"
        );
    }
}

/// Phase 8: feeds a response status to the listener's auto-ban, if any.
pub fn on_status(
    config: &crate::config::Config,
    conn: &crate::proxy::Conn,
    enforcer: &Enforcer,
    status: http::StatusCode,
) {
    if !matches!(status.as_u16(), 401 | 403 | 429) {
        return;
    }
    if let Some(ab) = config
        .listeners
        .iter()
        .find(|l| l.name == conn.listener)
        .and_then(|l| l.auto_ban.as_ref())
    {
        // A client a balancer or trusted proxy named (`source` is then the
        // network peer) is never a packet's source.
        ab.observe(
            enforcer,
            conn.peer.ip(),
            status.as_u16(),
            conn.source.is_some(),
        );
    }
}

impl Sweep for AutoBan {
    fn sweep(&self) {
        let now = Instant::now();
        self.counts
            .retain(|_, c| now.duration_since(c.since) <= self.window);
        self.counts.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn autoban(text: &str) -> Arc<AutoBan> {
        let s = Spanned::new(0..0, toml::from_str::<AutoBanSection>(text).unwrap());
        let mut p = Vec::new();
        let a = AutoBan::compile(&format!("l{}", fastrand::u64(..)), &s, &mut p).unwrap();
        assert!(p.is_empty());
        a
    }

    #[test]
    fn bans_after_threshold_within_window_and_spares_exempt() {
        let e = Enforcer::default();
        let a = autoban("auth_failures = 3\nlimit_exceeded = 2\nexempt = [\"10.0.0.0/8\"]");
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        a.observe(&e, ip, 401, false);
        a.observe(&e, ip, 200, false);
        a.observe(&e, ip, 403, false);
        assert!(e.admit(ip));
        a.observe(&e, ip, 401, false);
        assert!(!e.admit(ip));

        let other: IpAddr = "192.0.2.2".parse().unwrap();
        a.observe(&e, other, 429, false);
        assert!(e.admit(other));
        a.observe(&e, other, 429, false);
        assert!(!e.admit(other));

        let exempt: IpAddr = "10.1.2.3".parse().unwrap();
        for _ in 0..10 {
            a.observe(&e, exempt, 429, false);
        }
        assert!(e.admit(exempt));
    }

    #[test]
    fn an_ipv6_client_rotating_through_its_64_is_one_source() {
        let e = Enforcer::default();
        let a = autoban("auth_failures = 3");
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for (i, addr) in ["2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::3"]
            .into_iter()
            .enumerate()
        {
            assert!(e.admit(ip(addr)), "banned before failure {i}");
            a.observe(&e, ip(addr), 401, false);
        }
        // The whole /64 is banned, not only the three addresses used.
        assert!(!e.admit(ip("2001:db8:1:2:abcd::99")));
        assert!(e.admit(ip("2001:db8:1:3::1")));
        assert_eq!(
            e.bans()
                .iter()
                .map(|(n, _)| n.to_string())
                .collect::<Vec<_>>(),
            ["2001:db8:1:2::/64"]
        );

        // With ipv6_prefix = 128, each address is a source of its own.
        let e = Enforcer::default();
        let a = autoban("auth_failures = 2\nipv6_prefix = 128");
        a.observe(&e, ip("2001:db8::1"), 401, false);
        a.observe(&e, ip("2001:db8::2"), 401, false);
        assert!(e.admit(ip("2001:db8::1")));
        a.observe(&e, ip("2001:db8::1"), 401, false);
        assert!(!e.admit(ip("2001:db8::1")));
        assert!(e.admit(ip("2001:db8::2")));
    }

    #[test]
    fn a_zero_or_too_long_prefix_is_refused_at_its_place() {
        let text = "ipv4_prefix = 0\nipv6_prefix = 129";
        let s = Spanned::new(0..0, toml::from_str::<AutoBanSection>(text).unwrap());
        let mut p = Vec::new();
        assert!(AutoBan::compile("l", &s, &mut p).is_none());
        let msgs: Vec<&str> = p.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(msgs.len(), 2, "{msgs:?}");
        assert!(msgs[0].contains("ipv4_prefix must be 1..=32"), "{msgs:?}");
        assert!(msgs[1].contains("ipv6_prefix must be 1..=128"), "{msgs:?}");
    }
}
