//! DNS discovery (hickory-resolver): a host name resolved to all its A and
//! AAAA records with a configured port, or its SRV records (port and
//! weight from each record, each SRV target resolved in turn; only the
//! lowest priority is used). Re-resolved every `interval`; the resolver's
//! cache is off so each round asks the server. A failed or empty answer
//! keeps the last good set.

use std::net::{IpAddr, SocketAddr};
use std::sync::Weak;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use http::uri::Authority;

use super::Pool;
use super::config::MAX_WEIGHT;
use super::discovery::{alive, apply};

/// What to resolve.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub port: u16,
    pub srv: bool,
    pub resolver: Option<SocketAddr>,
    pub interval: Duration,
}

fn resolver(server: Option<SocketAddr>) -> Result<TokioResolver, String> {
    let mut builder = match server {
        Some(addr) => {
            let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
            for c in &mut ns.connections {
                c.port = addr.port();
            }
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![ns]),
                TokioRuntimeProvider::default(),
            )
        }
        None => TokioResolver::builder_tokio()
            .map_err(|e| format!("cannot read the system DNS configuration: {e}"))?,
    };
    let opts: &mut ResolverOpts = builder.options_mut();
    opts.cache_size = 0;
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 2;
    // Both A and AAAA, in parallel; one family failing or empty is fine.
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    builder
        .build()
        .map_err(|e| format!("cannot build the DNS resolver: {e}"))
}

/// Resolves `src` once.
pub async fn resolve(r: &TokioResolver, src: &Source) -> Result<Vec<(Authority, u32)>, String> {
    let mut out = Vec::new();
    if src.srv {
        let lookup = r
            .lookup(src.name.as_str(), RecordType::SRV)
            .await
            .map_err(|e| format!("SRV {}: {e}", src.name))?;
        let records: Vec<_> = lookup
            .answers()
            .iter()
            .filter_map(|rec| match &rec.data {
                RData::SRV(s) => Some(s.clone()),
                _ => None,
            })
            .collect();
        let best = records.iter().map(|s| s.priority).min();
        // A target that does not resolve (a pod gone, the "." of "no
        // service") is skipped, so one stale record cannot freeze the set;
        // only when none resolves does the round fail (and the last good
        // set stays).
        let mut failed = None;
        for s in records.iter().filter(|s| Some(s.priority) == best) {
            let ips = match r.lookup_ip(s.target.clone()).await {
                Ok(ips) => ips,
                Err(e) => {
                    tracing::debug!(srv = %src.name, target = %s.target, "SRV target does not resolve: {e}");
                    failed = Some(format!("{}: {e}", s.target));
                    continue;
                }
            };
            let weight = u32::from(s.weight).clamp(1, MAX_WEIGHT);
            for ip in ips.iter() {
                push(&mut out, ip, s.port, weight);
            }
        }
        if out.is_empty()
            && let Some(e) = failed
        {
            return Err(e);
        }
    } else {
        let ips = r
            .lookup_ip(src.name.as_str())
            .await
            .map_err(|e| format!("{}: {e}", src.name))?;
        for ip in ips.iter() {
            push(&mut out, ip, src.port, 1);
        }
    }
    out.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
    out.dedup_by(|a, b| a.0 == b.0);
    Ok(out)
}

fn push(out: &mut Vec<(Authority, u32)>, ip: IpAddr, port: u16, weight: u32) {
    if let Ok(a) = SocketAddr::new(ip, port).to_string().parse() {
        out.push((a, weight));
    }
}

/// Resolves every `interval` until the pool is dropped. `first` is told
/// when the first round is over (whatever its result). If the resolver
/// cannot be built (e.g. an unreadable system DNS configuration), building
/// it is retried every `interval`; the failure is reported (logged and
/// counted) once per outage, and the last good targets stay meanwhile.
pub async fn run(pool: Weak<Pool>, src: Source, first: std::sync::mpsc::Sender<()>) {
    let mut first = Some(first);
    let mut r: Option<TokioResolver> = None;
    let mut build_failed = false;
    let mut tick = tokio::time::interval(src.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if pool.strong_count() == 0 {
            return;
        }
        if r.is_none() {
            match resolver(src.resolver) {
                Ok(built) => {
                    build_failed = false;
                    r = Some(built);
                }
                Err(e) => {
                    if !build_failed {
                        build_failed = true;
                        let Some(p) = alive(&pool) else {
                            return;
                        };
                        apply(&p, Err(e));
                    }
                    if let Some(tx) = first.take() {
                        let _ = tx.send(());
                    }
                    continue;
                }
            }
        }
        let Some(res) = r.as_ref() else {
            continue;
        };
        let found = resolve(res, &src).await;
        let Some(p) = alive(&pool) else {
            return;
        };
        apply(&p, found);
        drop(p);
        if let Some(tx) = first.take() {
            let _ = tx.send(());
        }
    }
}
