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
