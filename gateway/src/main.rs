//! The `gateway` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use gateway::config::{self, Config};

mod alloc;

#[global_allocator]
static ALLOC: alloc::Mimalloc = alloc::Mimalloc;

#[derive(Parser)]
#[command(
    name = "gateway",
    version,
    about = "eBPF-accelerated API gateway",
    after_help = "Examples:\n  gateway run -c conf/gateway.toml\n  gateway check -c conf/gateway.toml\n  gateway reload -c conf/gateway.toml\n  gateway deny add 203.0.113.7 --ttl 10m\n\nEvery command has --help with examples."
)]
struct Cli {
    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    #[command(
        after_help = "Examples:\n  gateway run\n  gateway run -c /etc/gateway/gateway.toml --no-xdp"
    )]
    Run {
        /// Config file.
        #[arg(short, long, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
        /// Do not load the XDP program; enforce allow/deny and limits in userspace.
        #[arg(long)]
        no_xdp: bool,
    },
    /// Validate a config file and print a summary, or every problem as FILE:LINE:COL.
    #[command(
        after_help = "Examples:\n  gateway check\n  gateway check -c conf/gateway.toml\n\nExit status: 0 when valid, 2 when not."
    )]
    Check {
        #[arg(short, long, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Print the compiled routing table of each listener.
    #[command(after_help = "Examples:\n  gateway routes -c conf/gateway.toml")]
    Routes {
        #[arg(short, long, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Ask the running gateway (through its admin listener) to reload its config.
    #[command(after_help = "Examples:\n  gateway reload -c conf/gateway.toml")]
    Reload {
        #[arg(short, long, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Manage the deny list (kernel maps of a running gateway).
    #[command(
        subcommand,
        after_help = "Examples:\n  gateway deny add 203.0.113.7 --ttl 10m\n  gateway deny del 203.0.113.0/24\n  gateway deny list"
    )]
    Deny(gateway::xdp::cli::RuleCmd),
    /// Manage the allow list (kernel maps of a running gateway).
    #[command(
        subcommand,
        after_help = "Examples:\n  gateway allow add 10.0.0.0/8\n  gateway allow list"
    )]
    Allow(gateway::xdp::cli::RuleCmd),
    /// XDP program status: counters, top dropped sources, detach.
    #[command(
        subcommand,
        after_help = "Examples:\n  gateway xdp stats\n  gateway xdp detach"
    )]
    Xdp(gateway::xdp::cli::XdpCmd),
    /// Print version and build information.
    #[command(after_help = "Examples:\n  gateway version")]
    Version,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    gateway::observe::init_tracing(cli.verbose);
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Run { config, no_xdp } => {
            gateway::server::run(&config, gateway::server::Options { no_xdp })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { config } => Ok(match Config::load(&config) {
            Ok(c) => {
                println!("{}", c.summary());
                ExitCode::SUCCESS
            }
            Err(e) => {
                for line in e.lines() {
                    println!("{line}");
                }
                ExitCode::from(2)
            }
        }),
        Command::Routes { config } => match Config::load(&config) {
            Ok(c) => {
                for l in &c.listeners {
                    println!("listener {} ({})", l.name, l.addr);
                    print!("{}", l.router.display(&c.routes, &c.upstreams));
                }
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                for line in e.lines() {
                    eprintln!("{line}");
                }
                Ok(ExitCode::from(2))
            }
        },
        Command::Reload { config } => {
            gateway::admin::request_reload(&config)?;
            println!("reloaded");
            Ok(ExitCode::SUCCESS)
        }
        Command::Deny(c) => {
            gateway::xdp::cli::run_rule(gateway::xdp::cli::List::Deny, c)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Allow(c) => {
            gateway::xdp::cli::run_rule(gateway::xdp::cli::List::Allow, c)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Xdp(c) => {
            gateway::xdp::cli::run_xdp(c)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Version => {
            println!("gateway {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
    }
}
