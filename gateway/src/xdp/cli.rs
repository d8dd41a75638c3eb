//! `gateway deny|allow|xdp ...`: commands acting on the pinned maps of a
//! running gateway. They need no running gateway beyond its pins, and take
//! effect at once (the next packet sees the change).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use gateway_common::stat;

use super::config::{DEFAULT_PIN_PATH, parse_cidr};
use super::kernel::{self, Maps, PinLock};
pub use super::rules::List;
use super::rules::{Entry, FOREVER, now_ns};

/// Where the pinned maps are.
#[derive(Debug, Args)]
pub struct Pins {
    /// The gateway's `[xdp] pin_path`.
    #[arg(long, env = "GATEWAY_XDP_PIN_PATH", default_value = DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,
}

/// `gateway deny ...` / `gateway allow ...`.
#[derive(Debug, Subcommand)]
pub enum RuleCmd {
    /// Add a CIDR (e.g. 203.0.113.0/24, 2001:db8::/32, or a single address).
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
    Del {
        cidr: String,
        #[command(flatten)]
        pins: Pins,
    },
    /// List entries.
    List {
        #[command(flatten)]
        pins: Pins,
    },
}

/// `gateway xdp ...`.
#[derive(Debug, Subcommand)]
pub enum XdpCmd {
    /// Kernel counters and the top dropped sources.
    Stats {
        /// How many sources to show.
        #[arg(long, default_value_t = 10)]
        top: usize,
        #[command(flatten)]
        pins: Pins,
    },
    /// Detach the program and remove pinned maps and links.
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
             only loaded with `[xdp] interfaces` set, as root, without --no-xdp; in userspace \
             mode the lists come from the config file: edit `[xdp] deny`/`allow` and reload)",
            dir.display()
        );
    }
    Maps::open_pinned(dir)
}

/// "in 9m 59s", "expired" or "never" for an expiry.
fn remaining(until: u64, now: u64) -> String {
    if until == FOREVER {
        "never".into()
    } else if until <= now {
        "expired".into()
    } else {
        let secs = (until - now).div_ceil(1_000_000_000);
        format!(
            "in {}",
            humantime::format_duration(Duration::from_secs(secs))
        )
    }
}

/// Runs `gateway deny|allow ...`.
pub fn run_rule(list: List, cmd: RuleCmd) -> anyhow::Result<()> {
    match cmd {
        RuleCmd::Add { cidr, ttl, pins } => {
            let net = parse_cidr(&cidr).map_err(anyhow::Error::msg)?;
            let mut maps = open(&pins)?;
            let ttl = match ttl {
                Some(t) => humantime::parse_duration(&t)
                    .with_context(|| format!("invalid --ttl {t:?} (e.g. 90s, 10m, 1h)"))?,
                None if list == List::Deny => Duration::from_nanos(maps.config()?.ban_ttl_ns),
                None => Duration::ZERO,
            };
            let now = now_ns();
            let until = if ttl.is_zero() {
                FOREVER
            } else {
                now.saturating_add(u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX))
            };
            let _lock = PinLock::acquire(&pins.pin_path)?;
            let old = maps.read_rules()?;
            let mut new = old.clone();
            let e = old.entry(list, &net);
            new.set(
                list,
                &net,
                Entry {
                    from_config: e.from_config,
                    cli_until: until,
                },
            );
            maps.apply(&old, &new, false)?;
            let note = if e.from_config {
                " (also listed in the config file)"
            } else {
                ""
            };
            println!(
                "{} {net}: added, expires {}{note}",
                list.name(),
                remaining(until, now)
            );
            Ok(())
        }
        RuleCmd::Del { cidr, pins } => {
            let net = parse_cidr(&cidr).map_err(anyhow::Error::msg)?;
            let mut maps = open(&pins)?;
            let _lock = PinLock::acquire(&pins.pin_path)?;
            let old = maps.read_rules()?;
            let e = old.entry(list, &net);
            if e.cli_until == 0 {
                if e.from_config {
                    bail!(
                        "{net} is in the config file's [xdp] {} list: remove it there and reload",
                        list.name()
                    );
                }
                bail!("{net} is not in the {} list", list.name());
            }
            let mut new = old.clone();
            new.set(
                list,
                &net,
                Entry {
                    from_config: e.from_config,
                    cli_until: 0,
                },
            );
            maps.apply(&old, &new, false)?;
            if e.from_config {
                println!(
                    "{} {net}: run-time entry removed; the config file still lists it",
                    list.name()
                );
            } else {
                println!("{} {net}: removed", list.name());
            }
            Ok(())
        }
        RuleCmd::List { pins } => {
            let maps = open(&pins)?;
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
            Ok(())
        }
    }
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
