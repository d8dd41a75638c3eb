//! The `[xdp]` config section: file form (`Xdp`), compiled settings
//! (`XdpSettings`) and the validation between them. Every key is described
//! in docs/xdp.md.

use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use crate::config::Problem;
use crate::config::units::Secs;

/// Where maps and links are pinned unless `pin_path` says otherwise.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/gateway";

/// `[xdp]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Xdp {
    /// Interfaces to attach to; empty means userspace enforcement only.
    #[serde(default)]
    pub interfaces: Vec<Spanned<String>>,
    /// `auto`, `native` or `skb`.
    #[serde(default)]
    pub mode: Mode,
    /// bpffs directory of the pinned maps and links.
    #[serde(default)]
    pub pin_path: Option<Spanned<String>>,
    /// `allow` or `deny`: what happens to sources on neither list.
    #[serde(default)]
    pub default_policy: Policy,
    /// CIDRs (or single addresses) always let through; wins over `deny`.
    #[serde(default)]
    pub allow: Vec<Spanned<String>>,
    /// CIDRs (or single addresses) dropped.
    #[serde(default)]
    pub deny: Vec<Spanned<String>>,
    /// Ports enforcement applies to (TCP and UDP); default: the listeners'.
    #[serde(default)]
    pub protected_ports: Option<Spanned<Vec<Spanned<u16>>>>,
    /// Enforce on every port (overrides `protected_ports`).
    #[serde(default)]
    pub all_ports: bool,
    /// Default expiry of `gateway deny add` without `--ttl`; 0 = never.
    #[serde(default)]
    pub ban_ttl: Option<Secs>,
    /// Capacity of each rule map.
    #[serde(default)]
    pub max_rules: Option<Spanned<u32>>,
    #[serde(default)]
    pub rate_limit: Option<Spanned<RateLimitFile>>,
}

/// `[xdp.rate_limit]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitFile {
    /// Per source, per second; 0 turns the limit off.
    #[serde(default)]
    pub rate: Option<Spanned<u64>>,
    /// Packets (or SYNs) a source may send at once; default: `rate`.
    #[serde(default)]
    pub burst: Option<Spanned<u64>>,
    /// `syn` (new TCP connections) or `packets` (every packet).
    #[serde(default)]
    pub count: Count,
    /// Sources sharing a bucket, IPv4: prefix length (default 32).
    #[serde(default)]
    pub ipv4_prefix: Option<Spanned<u8>>,
    /// Sources sharing a bucket, IPv6: prefix length (default 64).
    #[serde(default)]
    pub ipv6_prefix: Option<Spanned<u8>>,
    /// Sources tracked at once (least recently seen evicted first).
    #[serde(default)]
    pub max_sources: Option<Spanned<u32>>,
}

/// XDP attach mode.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Native where the driver supports it, else generic.
    #[default]
    Auto,
    /// Driver (native) mode only.
    Native,
    /// Generic (skb) mode.
    Skb,
}

/// What happens to a source on neither list.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    #[default]
    Allow,
    Deny,
}

/// What the rate limit counts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Count {
    /// TCP SYNs without ACK: new connections.
    #[default]
    Syn,
    /// Every packet to a protected port.
    Packets,
}

/// Which ports are enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ports {
    All,
    /// Sorted, deduplicated.
    List(Vec<u16>),
}

/// `[xdp.rate_limit]` compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Per second, > 0.
    pub rate: u64,
    /// >= 1.
    pub burst: u64,
    pub count: Count,
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
}

/// `[xdp]` compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdpSettings {
    /// The section is present: enforce it (else nothing is enforced).
    pub enabled: bool,
    pub interfaces: Vec<String>,
    pub mode: Mode,
    pub pin_path: PathBuf,
    pub default_policy: Policy,
    /// Normalized (host bits zero), deduplicated.
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
    pub ports: Ports,
    pub ban_ttl: Duration,
    pub rate_limit: Option<RateLimit>,
    pub max_rules: u32,
    pub max_sources: u32,
}

impl Default for XdpSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            interfaces: Vec::new(),
            mode: Mode::Auto,
            pin_path: PathBuf::from(DEFAULT_PIN_PATH),
            default_policy: Policy::Allow,
            allow: Vec::new(),
            deny: Vec::new(),
            ports: Ports::List(Vec::new()),
            ban_ttl: Duration::ZERO,
            rate_limit: None,
            max_rules: gateway_common::DEFAULT_MAX_RULES,
            max_sources: gateway_common::DEFAULT_MAX_SOURCES,
        }
    }
}

impl XdpSettings {
    /// Whether anything would ever be dropped.
    pub fn enforces_anything(&self) -> bool {
        self.enabled
            && (!self.deny.is_empty()
                || self.default_policy == Policy::Deny
                || self.rate_limit.is_some())
    }
}

/// Parses a CIDR or a single address; host bits must be zero.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    let net: IpNet = s.parse().map_err(|_| {
        format!("invalid CIDR {s:?}: expected an address (192.0.2.7, 2001:db8::1) or a prefix (192.0.2.0/24, 2001:db8::/32)")
    })?;
    if net.trunc() != net {
        return Err(format!(
            "invalid CIDR {s:?}: host bits are set (did you mean {}?)",
            net.trunc()
        ));
    }
    Ok(net)
}

/// Validates the `[xdp]` section. `listener_ports` are the default
/// protected ports.
pub fn compile(
    x: Option<&Spanned<Xdp>>,
    listener_ports: &[u16],
) -> Result<XdpSettings, Vec<Problem>> {
    let Some(x) = x else {
        return Ok(XdpSettings::default());
    };
    let mut problems = Vec::new();
    let f = x.get_ref();
    let d = XdpSettings::default();

    let mut interfaces = Vec::new();
    for i in &f.interfaces {
        let name = i.get_ref();
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) {
            problems.push(Problem::at(
                i.span(),
                format!("invalid interface name {name:?}"),
            ));
        } else if interfaces.contains(name) {
            problems.push(Problem::at(
                i.span(),
                format!("interface {name:?} is listed twice"),
            ));
        } else {
            interfaces.push(name.clone());
        }
    }

    let pin_path = match &f.pin_path {
        Some(p) => {
            let path = PathBuf::from(p.get_ref());
            if !path.is_absolute() || path.parent().is_none() {
                problems.push(Problem::at(
                    p.span(),
                    "pin_path must be an absolute path below a bpffs mount (e.g. /sys/fs/bpf/gateway)",
                ));
            }
            path
        }
        None => d.pin_path.clone(),
    };

    let mut lists = [Vec::new(), Vec::new()];
    for (list, items) in lists.iter_mut().zip([&f.allow, &f.deny]) {
        for item in items {
            match parse_cidr(item.get_ref()) {
                Ok(net) if !list.contains(&net) => list.push(net),
                Ok(_) => {}
                Err(msg) => problems.push(Problem::at(item.span(), msg)),
            }
        }
    }
    let [allow, deny] = lists;

    let ports = if f.all_ports {
        Ports::All
    } else {
        let mut ports: Vec<u16> = match &f.protected_ports {
            Some(list) => {
                for p in list.get_ref() {
                    if *p.get_ref() == 0 {
                        problems.push(Problem::at(p.span(), "port 0 cannot be protected"));
                    }
                }
                list.get_ref().iter().map(|p| *p.get_ref()).collect()
            }
            None => listener_ports.to_vec(),
        };
        ports.retain(|&p| p != 0);
        ports.sort_unstable();
        ports.dedup();
        Ports::List(ports)
    };

    let max_rules = match &f.max_rules {
        Some(m) if *m.get_ref() == 0 => {
            problems.push(Problem::at(m.span(), "max_rules must be at least 1"));
            d.max_rules
        }
        Some(m) => *m.get_ref(),
        None => d.max_rules,
    };

    let mut max_sources = d.max_sources;
    let rate_limit = match &f.rate_limit {
        None => None,
        Some(rl) => {
            let r = rl.get_ref();
            let rate = r.rate.as_ref().map_or(0, |v| *v.get_ref());
            let burst = r.burst.as_ref().map_or(rate.max(1), |v| *v.get_ref());
            if let Some(b) = &r.burst
                && *b.get_ref() == 0
            {
                problems.push(Problem::at(b.span(), "burst must be at least 1"));
            }
            if let Some(v) = &r.rate
                && *v.get_ref() > 1_000_000_000
            {
                problems.push(Problem::at(
                    v.span(),
                    "rate must be at most 1000000000 per second",
                ));
            }
            let ipv4_prefix = r.ipv4_prefix.as_ref().map_or(32, |v| *v.get_ref());
            if let Some(v) = &r.ipv4_prefix
                && *v.get_ref() > 32
            {
                problems.push(Problem::at(v.span(), "ipv4_prefix must be 0..=32"));
            }
            let ipv6_prefix = r.ipv6_prefix.as_ref().map_or(64, |v| *v.get_ref());
            if let Some(v) = &r.ipv6_prefix
                && *v.get_ref() > 128
            {
                problems.push(Problem::at(v.span(), "ipv6_prefix must be 0..=128"));
            }
            if let Some(m) = &r.max_sources {
                if *m.get_ref() == 0 {
                    problems.push(Problem::at(m.span(), "max_sources must be at least 1"));
                } else {
                    max_sources = *m.get_ref();
                }
            }
            if rate > 0 && burst.checked_mul(1_000_000_000 / rate).is_none() {
                problems.push(Problem::at(rl.span(), "burst is too large for this rate"));
            }
            (rate > 0).then_some(RateLimit {
                rate,
                burst: burst.max(1),
                count: r.count,
                ipv4_prefix,
                ipv6_prefix,
            })
        }
    };

    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(XdpSettings {
        enabled: true,
        interfaces,
        mode: f.mode,
        pin_path,
        default_policy: f.default_policy,
        allow,
        deny,
        ports,
        ban_ttl: f.ban_ttl.map_or(Duration::ZERO, |s| s.0),
        rate_limit,
        max_rules,
        max_sources,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile_str(text: &str) -> Result<XdpSettings, Vec<Problem>> {
        #[derive(Deserialize)]
        struct F {
            xdp: Option<Spanned<Xdp>>,
        }
        let f: F = toml::from_str(text).expect("parse");
        compile(f.xdp.as_ref(), &[8080])
    }

    #[test]
    fn absent_section_enforces_nothing() {
        let s = compile_str("").unwrap();
        assert!(!s.enabled);
        assert!(!s.enforces_anything());
    }

    #[test]
    fn defaults() {
        let s = compile_str("[xdp]\n").unwrap();
        assert!(s.enabled);
        assert_eq!(s.ports, Ports::List(vec![8080]));
        assert_eq!(s.pin_path, PathBuf::from(DEFAULT_PIN_PATH));
        assert_eq!(s.default_policy, Policy::Allow);
        assert_eq!(s.rate_limit, None);
        assert_eq!(s.ban_ttl, Duration::ZERO);
    }

    #[test]
    fn full_section() {
        let s = compile_str(
            r#"
            [xdp]
            interfaces = ["eth0", "eth1"]
            mode = "native"
            default_policy = "deny"
            allow = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"]
            deny = ["203.0.113.0/24"]
            protected_ports = [443, 80, 443]
            ban_ttl = "10m"
            [xdp.rate_limit]
            rate = 100
            count = "packets"
            ipv6_prefix = 56
            "#,
        )
        .unwrap();
        assert_eq!(s.interfaces, ["eth0", "eth1"]);
        assert_eq!(s.mode, Mode::Native);
        assert_eq!(s.default_policy, Policy::Deny);
        assert_eq!(s.allow.len(), 3);
        assert_eq!(s.allow[2].to_string(), "192.0.2.7/32");
        assert_eq!(s.ports, Ports::List(vec![80, 443]));
        assert_eq!(s.ban_ttl, Duration::from_secs(600));
        let rl = s.rate_limit.unwrap();
        assert_eq!((rl.rate, rl.burst, rl.count), (100, 100, Count::Packets));
        assert_eq!((rl.ipv4_prefix, rl.ipv6_prefix), (32, 56));
    }

    #[test]
    fn problems_have_spans() {
        let text = "[xdp]\ndeny = [\"10.0.0.1/8\", \"nonsense\"]\n[xdp.rate_limit]\nrate = 5\nburst = 0\nipv4_prefix = 40\n";
        let ps = compile_str(text).unwrap_err();
        let msgs: Vec<String> = ps
            .iter()
            .map(|p| {
                let span = p.span.clone().unwrap();
                format!("{}: {}", &text[span], p.message)
            })
            .collect();
        assert_eq!(ps.len(), 4, "{msgs:?}");
        assert!(msgs[0].contains("host bits are set (did you mean 10.0.0.0/8?)"));
        assert!(msgs[1].starts_with("\"nonsense\": invalid CIDR"));
        assert!(msgs[2].starts_with("0: burst"));
        assert!(msgs[3].starts_with("40: ipv4_prefix"));
    }

    #[test]
    fn zero_rate_turns_the_limit_off() {
        let s = compile_str("[xdp.rate_limit]\nrate = 0\n").unwrap();
        assert_eq!(s.rate_limit, None);
    }

    #[test]
    fn cidrs() {
        assert_eq!(parse_cidr("::1").unwrap().to_string(), "::1/128");
        assert_eq!(
            parse_cidr(" 10.1.0.0/16 ").unwrap().to_string(),
            "10.1.0.0/16"
        );
        assert!(parse_cidr("10.1.0.0/33").is_err());
        assert!(
            parse_cidr("2001:db8::1/32")
                .unwrap_err()
                .contains("2001:db8::/32")
        );
    }
}
