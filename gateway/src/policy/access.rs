//! Step 4a: route-level IP allow/deny (CIDR), for rules that belong to one
//! route only. Listener-wide and kernel-enforced lists live in `crate::xdp`.
//!
//! A source matching `deny` is refused; when `allow` is not empty, a source
//! must also match it. Both refusals are `403`.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use crate::config::Problem;
use crate::error::{ErrorKind, ProxyError};

/// `[routes.access]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessSection {
    /// CIDRs (or single addresses) allowed; empty means every source.
    #[serde(default)]
    pub allow: Vec<Spanned<String>>,
    /// CIDRs (or single addresses) refused; wins over `allow`.
    #[serde(default)]
    pub deny: Vec<Spanned<String>>,
}

/// `[routes.access]` compiled.
#[derive(Debug, Default)]
pub struct Access {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

impl Access {
    pub fn compile(s: &AccessSection, problems: &mut Vec<Problem>) -> Access {
        Access {
            allow: cidrs(&s.allow, problems),
            deny: cidrs(&s.deny, problems),
        }
    }

    /// Whether `ip` may use the route.
    pub fn admits(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&ip))
    }

    /// Step 4a.
    pub fn check(&self, ip: IpAddr) -> Result<(), ProxyError> {
        if self.admits(ip) {
            Ok(())
        } else {
            Err(ProxyError::new(
                ErrorKind::Forbidden,
                "this route does not accept requests from your address",
            ))
        }
    }
}

/// How much of a source address names one client, for counting (`ip`
/// rate-limit keys, auto-ban) and banning: an IPv6 client usually holds a
/// whole /64 and can send from any address in it, so counting each address
/// on its own would let one client multiply its budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SourcePrefix {
    pub ipv4: u8,
    pub ipv6: u8,
}

impl SourcePrefix {
    /// IPv4 addresses one by one, IPv6 clients by their /64 (as the XDP
    /// rate limit).
    pub const DEFAULT: SourcePrefix = SourcePrefix { ipv4: 32, ipv6: 64 };

    /// Compiles `ipv4_prefix`/`ipv6_prefix` settings (defaults for absent
    /// ones); `min` is the shortest prefix accepted.
    pub fn compile(
        ipv4: Option<&Spanned<u8>>,
        ipv6: Option<&Spanned<u8>>,
        min: u8,
        problems: &mut Vec<Problem>,
    ) -> SourcePrefix {
        let mut check = |v: Option<&Spanned<u8>>, name: &str, max: u8, default: u8| match v {
            None => default,
            Some(v) if (min..=max).contains(v.get_ref()) => *v.get_ref(),
            Some(v) => {
                problems.push(Problem::at(
                    v.span(),
                    format!("{name} must be {min}..={max}"),
                ));
                default
            }
        };
        SourcePrefix {
            ipv4: check(ipv4, "ipv4_prefix", 32, Self::DEFAULT.ipv4),
            ipv6: check(ipv6, "ipv6_prefix", 128, Self::DEFAULT.ipv6),
        }
    }

    /// The network of `ip` (IPv4-mapped addresses count as IPv4).
    pub fn net(self, ip: IpAddr) -> IpNet {
        let (ip, len) = match canonical(ip) {
            v4 @ IpAddr::V4(_) => (v4, self.ipv4),
            v6 => (v6, self.ipv6),
        };
        // The lengths are checked at load; a full-length network otherwise.
        IpNet::new(ip, len)
            .unwrap_or_else(|_| IpNet::from(ip))
            .trunc()
    }

    /// `net(ip)` as one address (its first), for keys.
    pub fn key(self, ip: IpAddr) -> IpAddr {
        self.net(ip).network()
    }
}

/// A network as an address when it is a single one, else as a CIDR.
pub fn display_net(net: &IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

/// An IPv4-mapped IPv6 address as IPv4, so that IPv4 rules apply to it
/// (dual-stack listeners see IPv4 clients as `::ffff:a.b.c.d`).
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Parses CIDRs or single addresses, reporting each bad one at its span.
pub fn cidrs(list: &[Spanned<String>], problems: &mut Vec<Problem>) -> Vec<IpNet> {
    list.iter()
        .filter_map(|s| match parse_cidr(s.get_ref()) {
            Some(n) => Some(n),
            None => {
                problems.push(Problem::at(
                    s.span(),
                    format!(
                        "invalid CIDR {:?}: expected an address or ADDRESS/PREFIX",
                        s.get_ref()
                    ),
                ));
                None
            }
        })
        .collect()
}

/// `10.0.0.0/8`, `2001:db8::/32` or a single address.
///
/// An IPv4-mapped net (`::ffff:192.0.2.7`, `::ffff:10.0.0.0/104`) becomes
/// the IPv4 net it maps, since peers are matched as `canonical` addresses.
pub fn parse_cidr(s: &str) -> Option<IpNet> {
    let net = s
        .parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))?
        .trunc();
    if let IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.addr().to_ipv4_mapped()
        && let Ok(n) = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
    {
        return Some(IpNet::V4(n));
    }
    Some(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_prefixes_group_addresses() {
        let p = SourcePrefix::DEFAULT;
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(p.net(ip("192.0.2.7")).to_string(), "192.0.2.7/32");
        assert_eq!(p.net(ip("::ffff:192.0.2.7")).to_string(), "192.0.2.7/32");
        assert_eq!(
            p.net(ip("2001:db8:1:2:aaaa::1")).to_string(),
            "2001:db8:1:2::/64"
        );
        assert_eq!(p.key(ip("2001:db8:1:2:ffff::9")), ip("2001:db8:1:2::"));
        let wide = SourcePrefix { ipv4: 24, ipv6: 48 };
        assert_eq!(wide.key(ip("192.0.2.7")), ip("192.0.2.0"));
        assert_eq!(wide.key(ip("2001:db8:1:2::1")), ip("2001:db8:1::"));
        assert_eq!(display_net(&p.net(ip("192.0.2.7"))), "192.0.2.7");
        assert_eq!(display_net(&p.net(ip("2001:db8::1"))), "2001:db8::/64");
    }

    fn access(allow: &[&str], deny: &[&str]) -> Access {
        let sp = |v: &[&str]| {
            v.iter()
                .map(|s| Spanned::new(0..0, s.to_string()))
                .collect::<Vec<_>>()
        };
        let mut p = Vec::new();
        let a = Access::compile(
            &AccessSection {
                allow: sp(allow),
                deny: sp(deny),
            },
            &mut p,
        );
        assert!(p.is_empty(), "{p:?}");
        a
    }

    #[test]
    fn deny_wins_and_allow_restricts() {
        let a = access(&["10.0.0.0/8", "2001:db8::/32"], &["10.1.0.0/16"]);
        assert!(a.admits("10.2.3.4".parse().unwrap()));
        assert!(!a.admits("10.1.3.4".parse().unwrap()));
        assert!(!a.admits("192.0.2.1".parse().unwrap()));
        assert!(a.admits("2001:db8::1".parse().unwrap()));
        assert!(a.admits("::ffff:10.2.3.4".parse().unwrap()));
        let open = access(&[], &["192.0.2.7"]);
        assert!(open.admits("192.0.2.8".parse().unwrap()));
        assert!(!open.admits("192.0.2.7".parse().unwrap()));
    }

    #[test]
    fn ipv4_mapped_rules_match_ipv4_peers() {
        let a = access(&[], &["::ffff:192.0.2.7", "::ffff:10.0.0.0/104"]);
        assert!(!a.admits("192.0.2.7".parse().unwrap()));
        assert!(!a.admits("::ffff:192.0.2.7".parse().unwrap()));
        assert!(!a.admits("10.9.9.9".parse().unwrap()));
        assert!(a.admits("192.0.2.8".parse().unwrap()));
        assert_eq!(
            parse_cidr("::ffff:10.0.0.0/104").unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(parse_cidr("::/0").unwrap().to_string(), "::/0");
    }

    #[test]
    fn bad_cidrs_are_reported() {
        let mut p = Vec::new();
        Access::compile(
            &AccessSection {
                allow: vec![Spanned::new(3..9, "10.0.0.0/33".into())],
                deny: vec![Spanned::new(12..15, "nope".into())],
            },
            &mut p,
        );
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].span, Some(3..9));
    }
}
