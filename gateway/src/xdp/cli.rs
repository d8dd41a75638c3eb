//! `gateway deny|allow|xdp ...`: commands acting on the pinned maps of a
//! running gateway. They need no running gateway beyond its pins, and take
//! effect at once (the next packet sees the change). Where no program is
//! attached, the rule commands go through the admin listener of the
//! gateway of `-c CONFIG` instead (a gateway enforcing in userspace).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use gateway_common::stat;

use super::api;
use super::config::{DEFAULT_PIN_PATH, parse_cidr};
use super::kernel::{self, Maps, PinLock};
pub use super::rules::List;
use super::rules::{Edit, expiry, now_ns, remaining};

/// Where the lists are: the pinned maps, or a gateway's admin listener.
#[derive(Debug, Args)]
pub struct Pins {
    /// The gateway's `[xdp] pin_path`.
    #[arg(long, env = "GATEWAY_XDP_PIN_PATH", default_value = DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,
    /// The gateway's config file: its admin listener is used when no XDP
    /// program is attached (a gateway enforcing in userspace).
    #[arg(short, long, default_value = crate::config::DEFAULT_PATH)]
    pub config: PathBuf,
}

/// `gateway deny ...` / `gateway allow ...`.
#[derive(Debug, Subcommand)]
pub enum RuleCmd {
    /// Add a CIDR (e.g. 203.0.113.0/24, 2001:db8::/32, or a single address).
    #[command(
        after_help = "Examples:\n  gateway deny add 203.0.113.7 --ttl 10m\n  gateway deny add 2001:db8:bad::/48\n  gateway allow add 10.0.0.0/8 -c /etc/gateway/gateway.toml"
    )]
    Add {
        cidr: String,
        /// Expire the entry after this long (e.g. 10m); deny entries default
        /// to `[xdp] ban_ttl`; 0 = never.
        #[arg(long)]
        ttl: Option<String>,
        #[command(flatten)]
        pins: Pins,
    },
    /// Remove a CIDR added at run time.
    #[command(
        after_help = "Examples:\n  gateway deny del 203.0.113.7\n  gateway allow del 10.0.0.0/8"
    )]
    Del {
        cidr: String,
        #[command(flatten)]
        pins: Pins,
    },
    /// List entries.
    #[command(after_help = "Examples:\n  gateway deny list\n  gateway allow list")]
    List {
        #[command(flatten)]
        pins: Pins,
    },
}

/// `gateway xdp ...`.
#[derive(Debug, Subcommand)]
pub enum XdpCmd {
    /// Kernel counters and the top dropped sources.
    #[command(after_help = "Examples:\n  gateway xdp stats\n  gateway xdp stats --top 50")]
    Stats {
        /// How many sources to show.
        #[arg(long, default_value_t = 10)]
        top: usize,
        #[command(flatten)]
        pins: Pins,
    },
    /// Detach the program and remove pinned maps and links.
    #[command(
        after_help = "Examples:\n  gateway xdp detach\n  gateway xdp detach --pin-path /sys/fs/bpf/gateway"
    )]
    Detach {
        #[command(flatten)]
        pins: Pins,
    },
    /// Per-packet cost of the program (BPF_PROG_TEST_RUN); used by
    /// `cargo xtask bench xdp`.
    #[command(hide = true)]
    Bench {
        /// Runs per measurement.
        #[arg(long, default_value_t = 1_000_000)]
        repeat: u32,
        /// Largest list and bucket-map size measured.
        #[arg(long, default_value_t = 100_000)]
        max_entries: u32,
    },
}

fn open(pins: &Pins) -> anyhow::Result<Maps> {
    let dir = &pins.pin_path;
    if !dir.join(gateway_common::maps::CONFIG).exists() {
        bail!(
            "no pinned XDP maps in {}: no gateway has run with XDP here (the XDP program is \
             only loaded with `[xdp] interfaces` set, as root, without --no-xdp)",
            dir.display()
        );
    }
    Maps::open_pinned(dir)
}

/// The admin listener named in `config`, if the file says.
fn admin_addr(config: &Path) -> Option<SocketAddr> {
    let text = std::fs::read_to_string(config).ok()?;
    let v: toml::Table = toml::from_str(&text).ok()?;
    v.get("admin")?.get("listen")?.as_str()?.parse().ok()
}

/// Where a rule command acts.
enum Target {
    Maps(Box<Maps>),
    Api(SocketAddr),
}

/// The pinned maps while a program is attached; else the admin listener
/// of the gateway of `--config`; else the pinned maps (they apply when a
/// gateway attaches them again).
fn target(pins: &Pins) -> anyhow::Result<Target> {
    let has_maps = pins.pin_path.join(gateway_common::maps::CONFIG).exists();
    if has_maps && !kernel::pinned_links(&pins.pin_path).is_empty() {
        return Ok(Target::Maps(Box::new(open(pins)?)));
    }
    if let Some(addr) = admin_addr(&pins.config) {
        return Ok(Target::Api(addr));
    }
    if has_maps {
        eprintln!(
            "note: no XDP program is attached from {}; the change applies when one is",
            pins.pin_path.display()
        );
        return Ok(Target::Maps(Box::new(open(pins)?)));
    }
    bail!(
        "no pinned XDP maps in {} and no admin listener in {}: pass --pin-path for a gateway \
         enforcing with XDP, or -c with the config of one enforcing in userspace",
        pins.pin_path.display(),
        pins.config.display()
    )
}

/// Runs `gateway deny|allow ...`.
pub fn run_rule(list: List, cmd: RuleCmd) -> anyhow::Result<()> {
    let (pins, edit) = match cmd {
        RuleCmd::Add { cidr, ttl, pins } => {
            let net = parse_cidr(&cidr).map_err(anyhow::Error::msg)?;
            let ttl = ttl
                .map(|t| {
                    humantime::parse_duration(&t)
                        .with_context(|| format!("invalid --ttl {t:?} (e.g. 90s, 10m, 1h)"))
                })
                .transpose()?;
            (pins, Some((net, Some(ttl))))
        }
        RuleCmd::Del { cidr, pins } => {
            let net = parse_cidr(&cidr).map_err(anyhow::Error::msg)?;
            (pins, Some((net, None)))
        }
        RuleCmd::List { pins } => (pins, None),
    };
    match (target(&pins)?, edit) {
        (Target::Maps(mut maps), Some((net, add))) => {
            let now = now_ns();
            let edit = match add {
                Some(ttl) => {
                    let ttl = match (ttl, list) {
                        (Some(t), _) => t,
                        (None, List::Deny) => Duration::from_nanos(maps.config()?.ban_ttl_ns),
                        (None, List::Allow) => Duration::ZERO,
                    };
                    Edit::Add {
                        until: expiry(ttl, now),
                    }
                }
                None => Edit::Del,
            };
            let _lock = PinLock::acquire(&pins.pin_path)?;
            let old = maps.read_rules()?;
            let (new, msg) = old
                .edit(list, &net, edit, now)
                .map_err(anyhow::Error::msg)?;
            maps.apply(&old, &new, false)?;
            println!("{msg}");
        }
        (Target::Maps(maps), None) => {
            let rules = maps.read_rules()?;
            let now = now_ns();
            let mut out = std::io::stdout().lock();
            for (net, e) in rules.list(list) {
                if !e.live(now) {
                    continue;
                }
                let origin = match (e.from_config, e.cli_until) {
                    (true, 0) => "config".to_string(),
                    (true, u) => format!("config, run time (expires {})", remaining(u, now)),
                    (false, u) => format!("run time (expires {})", remaining(u, now)),
                };
                writeln!(out, "{net:<43} {origin}")?;
            }
        }
        (Target::Api(addr), Some((net, add))) => {
            let mut path = format!(
                "/admin/xdp/{}?cidr={}",
                list.name(),
                api::encode(&net.to_string())
            );
            let method = match add {
                Some(ttl) => {
                    if let Some(t) = ttl {
                        path += &format!("&ttl={}ms", t.as_millis());
                    }
                    "POST"
                }
                None => "DELETE",
            };
            let v = api::request(addr, method, &path)?;
            println!("{}", v["message"].as_str().unwrap_or("done"));
        }
        (Target::Api(addr), None) => {
            let v = api::request(addr, "GET", &format!("/admin/xdp/{}", list.name()))?;
            let mut out = std::io::stdout().lock();
            for e in v["entries"].as_array().into_iter().flatten() {
                let cidr = e["cidr"].as_str().unwrap_or("?");
                let origin = match (e["config"].as_bool(), e["runtime"].as_bool()) {
                    (Some(true), Some(false)) => "config".to_string(),
                    (Some(true), _) => "config, run time".to_string(),
                    _ => match e["expires"].as_str() {
                        Some(x) => format!("run time (expires {x})"),
                        None => "run time (expires never)".to_string(),
                    },
                };
                writeln!(out, "{cidr:<43} {origin}")?;
            }
        }
    }
    Ok(())
}

/// Runs `gateway xdp ...`.
pub fn run_xdp(cmd: XdpCmd) -> anyhow::Result<()> {
    match cmd {
        XdpCmd::Stats { top, pins } => {
            let maps = open(&pins)?;
            stats(&maps, &pins.pin_path, top)
        }
        XdpCmd::Detach { pins } => {
            let dir = &pins.pin_path;
            if !dir.exists() {
                println!("nothing pinned at {}", dir.display());
                return Ok(());
            }
            let links = kernel::remove_all(dir)?;
            if links.is_empty() {
                println!("removed the pinned maps in {}", dir.display());
            } else {
                println!(
                    "detached from {} and removed the pinned maps in {}",
                    links.join(", "),
                    dir.display()
                );
            }
            Ok(())
        }
        XdpCmd::Bench {
            repeat,
            max_entries,
        } => super::bench::run(repeat, max_entries),
    }
}

fn stats(maps: &Maps, dir: &Path, top: usize) -> anyhow::Result<()> {
    let links = kernel::pinned_links(dir);
    let mut out = std::io::stdout().lock();
    if links.is_empty() {
        writeln!(out, "attached: nowhere (maps pinned in {})", dir.display())?;
    } else {
        writeln!(out, "attached: {}", links.join(", "))?;
    }
    writeln!(
        out,
        "{:<6} {:<12} {:>16} {:>18}",
        "action", "reason", "packets", "bytes"
    )?;
    for (i, c) in maps.stats()?.iter().enumerate() {
        let (action, reason) = stat::LABELS[i];
        writeln!(
            out,
            "{action:<6} {reason:<12} {:>16} {:>18}",
            c.packets, c.bytes
        )?;
    }
    let sources = maps.drop_sources();
    if sources.is_empty() {
        writeln!(out, "no dropped sources recorded")?;
    } else {
        writeln!(
            out,
            "top dropped sources (estimated: 1 in {} drops is sampled):",
            gateway_common::DROP_SAMPLE
        )?;
        for (ip, n) in sources.iter().take(top) {
            writeln!(out, "  {ip:<39} ~{n}")?;
        }
    }
    Ok(())
}
