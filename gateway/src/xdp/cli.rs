//! `gateway deny|allow|xdp ...`: commands acting on the pinned maps of a
//! running gateway.

use clap::Subcommand;

/// `gateway deny ...` / `gateway allow ...`.
#[derive(Debug, Subcommand)]
pub enum RuleCmd {
    /// Add a CIDR (e.g. 203.0.113.0/24, 2001:db8::/32, or a single address).
    Add {
        cidr: String,
        /// Expire the entry after this long (e.g. 10m).
        #[arg(long)]
        ttl: Option<String>,
    },
    /// Remove a CIDR.
    Del { cidr: String },
    /// List entries.
    List,
}

/// `gateway xdp ...`.
#[derive(Debug, Subcommand)]
pub enum XdpCmd {
    /// Kernel counters and the top dropped sources.
    Stats,
    /// Detach the program and remove pinned maps and links.
    Detach,
}

/// Which list a `RuleCmd` acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum List {
    Allow,
    Deny,
}

/// Runs `gateway deny|allow ...`.
pub fn run_rule(_list: List, _cmd: RuleCmd) -> anyhow::Result<()> {
    anyhow::bail!("rule commands are not available yet")
}

/// Runs `gateway xdp ...`.
pub fn run_xdp(_cmd: XdpCmd) -> anyhow::Result<()> {
    anyhow::bail!("xdp commands are not available yet")
}
