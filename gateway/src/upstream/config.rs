//! The `[[upstreams]]` and `[[routes]]` keys this module owns: the sections
//! as written (serde structs referenced from `config::file`) and their
//! compiled form. Compiled settings are plain data compared with `==` on
//! reload: a pool whose settings did not change is carried over with its
//! health, ejection, breaker and discovery state.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use serde::Deserialize;
use toml::Spanned;

use crate::config::Problem;
use crate::config::units::{ByteSize, Secs};

// ---------------------------------------------------------------------------
// As written.

/// One static target: `"HOST:PORT"` or `{ address = "HOST:PORT", weight = 2 }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TargetSpec {
    Address(String),
    Weighted {
        address: String,
        #[serde(default = "one")]
        weight: u32,
    },
}

impl TargetSpec {
    pub fn address(&self) -> &str {
        match self {
            TargetSpec::Address(a) | TargetSpec::Weighted { address: a, .. } => a,
        }
    }

    pub fn weight(&self) -> u32 {
        match self {
            TargetSpec::Address(_) => 1,
            TargetSpec::Weighted { weight, .. } => *weight,
        }
    }
}

/// `balance`: how a target is chosen for each request.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Each target in turn; weights ignored.
    #[default]
    RoundRobin,
    /// Each target in turn, `weight` times as often (smooth interleaving).
    WeightedRoundRobin,
    /// Power of two choices: two random targets, the one with fewer
    /// requests in flight (per unit of weight) wins.
    LeastRequest,
    /// A uniformly random target.
    Random,
    /// Consistent hashing on a ring of virtual nodes (`100 × weight` each).
    RingHash,
    /// Consistent hashing with Google's Maglev lookup table.
    Maglev,
}

impl Balance {
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::WeightedRoundRobin => "weighted_round_robin",
            Balance::LeastRequest => "least_request",
            Balance::Random => "random",
            Balance::RingHash => "ring_hash",
            Balance::Maglev => "maglev",
        }
    }

    pub fn is_hash(self) -> bool {
        matches!(self, Balance::RingHash | Balance::Maglev)
    }
}

/// `[upstreams.health]`: active checks.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Health {
    /// `"http"` (GET `path`) or `"tcp"` (connect only).
    pub kind: HealthKind,
    pub path: Spanned<String>,
    /// `Host` header of the check; the target's address when absent.
    pub host: Option<Spanned<String>>,
    pub interval: Secs,
    pub timeout: Secs,
    /// Statuses that count as healthy; empty means 200–399.
    pub expected_statuses: Vec<Spanned<u16>>,
    /// Consecutive successes that bring an unhealthy target back.
    pub healthy_threshold: u32,
    /// Consecutive failures that take a target out of rotation.
    pub unhealthy_threshold: u32,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            kind: HealthKind::Http,
            path: Spanned::new(0..0, "/".to_string()),
            host: None,
            interval: Secs(Duration::from_secs(5)),
            timeout: Secs(Duration::from_secs(1)),
            expected_statuses: Vec::new(),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    #[default]
    Http,
    Tcp,
}

/// `[upstreams.outlier]`: passive checks (on by default).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Outlier {
    pub enabled: bool,
    /// Consecutive connect failures, resets and timeouts that eject; 0 = never.
    pub consecutive_failures: u32,
    /// Consecutive 5xx responses that eject; 0 = never.
    pub consecutive_5xx: u32,
    /// First ejection; the n-th in a row lasts n times as long.
    pub base_ejection: Secs,
    pub max_ejection: Secs,
    /// At most this share of the pool's targets is ejected at once.
    pub max_ejected_percent: u32,
    /// A response head slower than this counts as slow; absent = off.
    pub slow_threshold: Option<Secs>,
    /// Consecutive slow responses that eject.
    pub consecutive_slow: u32,
}

impl Default for Outlier {
    fn default() -> Self {
        Self {
            enabled: true,
            consecutive_failures: 5,
            consecutive_5xx: 0,
            base_ejection: Secs(Duration::from_secs(10)),
            max_ejection: Secs(Duration::from_secs(300)),
            max_ejected_percent: 50,
            slow_threshold: None,
            consecutive_slow: 3,
        }
    }
}

/// `[upstreams.breaker]` / `[routes.breaker]`: circuit breaker.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Breaker {
    /// Open when the share of failed tries in `window` reaches this (0–1)...
    pub error_rate: Spanned<f64>,
    /// ...over at least this many tries.
    pub min_requests: u32,
    pub window: Secs,
    /// Also open after this many failures in a row; 0 = off.
    pub consecutive_failures: u32,
    /// How long the circuit stays open before probing.
    pub open_for: Secs,
    /// Probes let through while half-open; that many successes close it.
    pub half_open_probes: u32,
    /// Whether 5xx responses count as failures (connect errors, resets and
    /// timeouts always do).
    pub count_5xx: bool,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            error_rate: Spanned::new(0..0, 0.5),
            min_requests: 20,
            window: Secs(Duration::from_secs(10)),
            consecutive_failures: 0,
            open_for: Secs(Duration::from_secs(5)),
            half_open_probes: 3,
            count_5xx: true,
        }
    }
}

/// `[upstreams.retry]` / `[routes.retry]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retry {
    /// Retries after the first try; 0 = none.
    pub max_retries: u32,
    /// Response statuses that are retried (idempotent methods only unless
    /// `non_idempotent`).
    pub on_status: Vec<Spanned<u16>>,
    /// Retry a try that hit `per_try_timeout` (idempotent methods only
    /// unless `non_idempotent`).
    pub on_timeout: bool,
    /// Allow status and timeout retries for POST, PATCH, ...
    pub non_idempotent: bool,
    /// Time for each try; the route's (or upstream's) `timeout` bounds all.
    pub per_try_timeout: Option<Secs>,
    pub backoff: Secs,
    pub max_backoff: Secs,
    /// Read request bodies up to this size whole before the first try, so
    /// that they can be sent again (requests with a known length only);
    /// 0 = stream every body, never retry it.
    pub buffer_body: ByteSize,
    /// Upstream only: retries may add at most this share of requests.
    pub budget_percent: u32,
    /// Upstream only: retries always allowed per second, whatever the share.
    pub budget_min_per_sec: u32,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            max_retries: 1,
            on_status: Vec::new(),
            on_timeout: false,
            non_idempotent: false,
            per_try_timeout: None,
            backoff: Secs(Duration::from_millis(25)),
            max_backoff: Secs(Duration::from_millis(250)),
            buffer_body: ByteSize(0),
            budget_percent: 20,
            budget_min_per_sec: 3,
        }
    }
}

/// `[upstreams.concurrency]` / `[routes.concurrency]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Concurrency {
    /// Requests in flight at once.
    pub max: Spanned<usize>,
    /// Requests that may wait for a slot; beyond it, 503 at once.
    pub queue: usize,
    /// Longest wait for a slot; then 503 with `Retry-After`.
    pub queue_timeout: Secs,
}

impl Default for Concurrency {
    fn default() -> Self {
        Self {
            max: Spanned::new(0..0, 0),
            queue: 0,
            queue_timeout: Secs(Duration::from_secs(1)),
        }
    }
}

/// `[upstreams.dns]`: targets from DNS.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dns {
    /// Host name resolved to all its A/AAAA records (or SRV records).
    pub name: Spanned<String>,
    /// Port for A/AAAA targets; required unless `srv`.
    #[serde(default)]
    pub port: Option<u16>,
    /// Query SRV records: port and weight come from each record.
    #[serde(default)]
    pub srv: bool,
    /// `IP:PORT` of the DNS server; the system's (`/etc/resolv.conf`) when absent.
    #[serde(default)]
    pub resolver: Option<Spanned<String>>,
    #[serde(default = "default_dns_interval")]
    pub interval: Secs,
}

/// `[upstreams.file]`: targets from a watched TOML or JSON file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSource {
    pub path: Spanned<String>,
    /// The key in the file listing this pool's targets (default: the
    /// upstream's name).
    #[serde(default)]
    pub key: Option<String>,
    /// Poll interval, as a fallback to change notifications.
    #[serde(default = "default_file_interval")]
    pub interval: Secs,
}

fn one() -> u32 {
    1
}
fn default_dns_interval() -> Secs {
    Secs(Duration::from_secs(30))
}
fn default_file_interval() -> Secs {
    Secs(Duration::from_secs(5))
}

// ---------------------------------------------------------------------------
// Compiled.

/// One static target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticTarget {
    pub address: String,
    pub weight: u32,
}

/// What the request hash of consistent hashing is computed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    ClientIp,
    Header(HeaderName),
    Cookie(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSettings {
    pub kind: HealthKind,
    pub path: String,
    pub host: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    pub expected_statuses: Vec<u16>,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierSettings {
    pub consecutive_failures: u32,
    pub consecutive_5xx: u32,
    /// (threshold, count): `count` responses slower than `threshold` in a row eject.
    pub slow: Option<(Duration, u32)>,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    pub max_ejected_percent: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BreakerSettings {
    pub error_rate: f64,
    pub min_requests: u32,
    pub window: Duration,
    pub consecutive_failures: u32,
    pub open_for: Duration,
    pub half_open_probes: u32,
    pub count_5xx: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySettings {
    pub max_retries: u32,
    pub on_status: Vec<u16>,
    pub on_timeout: bool,
    pub non_idempotent: bool,
    pub per_try_timeout: Option<Duration>,
    pub backoff: Duration,
    pub max_backoff: Duration,
    pub buffer_body: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetSettings {
    pub percent: u32,
    pub min_per_sec: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConcurrencySettings {
    pub max: usize,
    pub queue: usize,
    pub queue_timeout: Duration,
}

/// Where a pool's targets come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    Static,
    Dns {
        name: String,
        port: u16,
        srv: bool,
        resolver: Option<std::net::SocketAddr>,
        interval: Duration,
    },
    File {
        path: PathBuf,
        key: String,
        interval: Duration,
    },
}

/// Everything about an upstream beyond its connection settings.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSettings {
    pub balance: Balance,
    pub hash_key: Option<HashKey>,
    pub health: Option<HealthSettings>,
    pub outlier: Option<OutlierSettings>,
    pub breaker: Option<BreakerSettings>,
    pub retry: RetrySettings,
    pub budget: BudgetSettings,
    pub concurrency: Option<ConcurrencySettings>,
    pub max_connections_per_target: usize,
    pub discovery: Discovery,
}

/// A route's own upstream policy: overrides and per-route state (built per
/// config load; `reload` keeps the previous breaker and limiter when their
/// settings did not change).
#[derive(Debug, Default)]
pub struct RouteUpstream {
    pub retry: Option<RetrySettings>,
    pub breaker: Option<Arc<super::breaker::Breaker>>,
    pub concurrency: Option<Arc<super::limit::Limiter>>,
}

// ---------------------------------------------------------------------------
// Compilation.

/// The `[[upstreams]]` keys of this module, as read from one entry.
pub struct UpstreamKeys<'a> {
    pub name: &'a str,
    pub name_span: std::ops::Range<usize>,
    pub targets: Option<&'a Spanned<Vec<Spanned<TargetSpec>>>>,
    pub balance: Balance,
    pub hash_key: Option<&'a Spanned<String>>,
    pub health: Option<&'a Health>,
    pub outlier: Option<&'a Outlier>,
    pub breaker: Option<&'a Breaker>,
    pub retry: Option<&'a Retry>,
    pub concurrency: Option<&'a Concurrency>,
    pub max_connections_per_target: usize,
    pub dns: Option<&'a Dns>,
    pub file: Option<&'a FileSource>,
}

/// Checks and compiles one upstream's keys: its static targets and the rest.
pub fn compile_upstream(
    base: &Path,
    k: &UpstreamKeys<'_>,
    problems: &mut Vec<Problem>,
) -> (Vec<StaticTarget>, UpstreamSettings) {
    let name = k.name;
    let sources = usize::from(k.targets.is_some())
        + usize::from(k.dns.is_some())
        + usize::from(k.file.is_some());
    if sources != 1 {
        problems.push(Problem::at(
            k.name_span.clone(),
            format!(
                "upstream {name:?} needs exactly one target source: `targets`, `[upstreams.dns]` or `[upstreams.file]`"
            ),
        ));
    }
    let mut targets = Vec::new();
    if let Some(ts) = k.targets {
        if ts.get_ref().is_empty() {
            problems.push(Problem::at(
                ts.span(),
                format!("upstream {name:?} has no targets"),
            ));
        }
        for t in ts.get_ref() {
            let spec = t.get_ref();
            if let Err(msg) = check_authority(spec.address()) {
                problems.push(Problem::at(t.span(), msg));
            }
            if spec.weight() == 0 || spec.weight() > MAX_WEIGHT {
                problems.push(Problem::at(
                    t.span(),
                    format!("target weight must be between 1 and {MAX_WEIGHT}"),
                ));
            }
            targets.push(StaticTarget {
                address: spec.address().to_string(),
                weight: spec.weight().clamp(1, MAX_WEIGHT),
            });
        }
    }

    let hash_key = match k.hash_key {
        Some(h) => match parse_hash_key(h.get_ref()) {
            Ok(key) => {
                if !k.balance.is_hash() {
                    problems.push(Problem::at(
                        h.span(),
                        "hash_key needs balance = \"ring_hash\" or \"maglev\"",
                    ));
                }
                Some(key)
            }
            Err(msg) => {
                problems.push(Problem::at(h.span(), msg));
                None
            }
        },
        None if k.balance.is_hash() => Some(HashKey::ClientIp),
        None => None,
    };

    let health = k.health.map(|h| {
        if !h.path.get_ref().starts_with('/') {
            problems.push(Problem::at(
                h.path.span(),
                "health check path must start with '/'",
            ));
        } else if h.path.get_ref().parse::<http::uri::PathAndQuery>().is_err() {
            problems.push(Problem::at(
                h.path.span(),
                format!(
                    "health check path {:?} is not a valid request target (escape spaces and the like)",
                    h.path.get_ref()
                ),
            ));
        }
        if let Some(host) = &h.host
            && (host.get_ref().is_empty()
                || host.get_ref().parse::<http::uri::Authority>().is_err())
        {
            problems.push(Problem::at(
                host.span(),
                format!(
                    "health check host {:?} is not a host name or host:port",
                    host.get_ref()
                ),
            ));
        }
        let mut expected = Vec::new();
        for s in &h.expected_statuses {
            if !(100..=599).contains(s.get_ref()) {
                problems.push(Problem::at(
                    s.span(),
                    format!("invalid status {}", s.get_ref()),
                ));
            }
            expected.push(*s.get_ref());
        }
        if h.interval.0.is_zero() || h.timeout.0.is_zero() {
            problems.push(Problem::at(
                k.name_span.clone(),
                format!("upstream {name:?}: health interval and timeout must be above zero"),
            ));
        }
        HealthSettings {
            kind: h.kind,
            path: h.path.get_ref().clone(),
            host: h.host.as_ref().map(|h| h.get_ref().clone()),
            interval: h.interval.0.max(super::health::MIN_INTERVAL),
            timeout: h.timeout.0,
            expected_statuses: expected,
            healthy_threshold: h.healthy_threshold.max(1),
            unhealthy_threshold: h.unhealthy_threshold.max(1),
        }
    });

    let default_outlier = Outlier::default();
    let o = k.outlier.unwrap_or(&default_outlier);
    let slow = o
        .slow_threshold
        .filter(|_| o.consecutive_slow > 0)
        .map(|t| (t.0, o.consecutive_slow));
    let outlier = (o.enabled
        && (o.consecutive_failures > 0 || o.consecutive_5xx > 0 || slow.is_some()))
    .then(|| OutlierSettings {
        consecutive_failures: o.consecutive_failures,
        consecutive_5xx: o.consecutive_5xx,
        slow,
        base_ejection: o.base_ejection.0,
        max_ejection: o.max_ejection.0.max(o.base_ejection.0),
        max_ejected_percent: o.max_ejected_percent.min(100),
    });

    let breaker = k.breaker.map(|b| compile_breaker(b, problems));

    let default_retry = Retry::default();
    let r = k.retry.unwrap_or(&default_retry);
    let retry = compile_retry(r, problems);
    let budget = BudgetSettings {
        percent: r.budget_percent,
        min_per_sec: r.budget_min_per_sec,
    };

    let concurrency = k.concurrency.and_then(|c| compile_concurrency(c, problems));

    let discovery = match (k.dns, k.file) {
        (Some(d), _) => compile_dns(d, problems),
        (None, Some(f)) => Discovery::File {
            path: crate::config::compile_resolve(base, f.path.get_ref()),
            key: f.key.clone().unwrap_or_else(|| name.to_string()),
            interval: f.interval.0.max(Duration::from_millis(100)),
        },
        (None, None) => Discovery::Static,
    };

    (
        targets,
        UpstreamSettings {
            balance: k.balance,
            hash_key,
            health,
            outlier,
            breaker,
            retry,
            budget,
            concurrency,
            max_connections_per_target: k.max_connections_per_target,
            discovery,
        },
    )
}

/// Compiles a route's `[routes.retry]`, `[routes.breaker]` and
/// `[routes.concurrency]`.
pub fn compile_route(
    route: &str,
    retry: Option<&Retry>,
    breaker: Option<&Breaker>,
    concurrency: Option<&Concurrency>,
    problems: &mut Vec<Problem>,
) -> RouteUpstream {
    let label: Arc<str> = format!("route:{route}").into();
    RouteUpstream {
        retry: retry.map(|r| compile_retry(r, problems)),
        breaker: breaker.map(|b| {
            Arc::new(super::breaker::Breaker::new(
                label.clone(),
                compile_breaker(b, problems),
            ))
        }),
        concurrency: concurrency
            .and_then(|c| compile_concurrency(c, problems))
            .map(|c| Arc::new(super::limit::Limiter::new(label.clone(), &c))),
    }
}

/// Largest target weight.
pub const MAX_WEIGHT: u32 = 1000;

fn compile_breaker(b: &Breaker, problems: &mut Vec<Problem>) -> BreakerSettings {
    let rate = *b.error_rate.get_ref();
    if !(rate > 0.0 && rate <= 1.0) {
        problems.push(Problem::at(
            b.error_rate.span(),
            "error_rate must be above 0 and at most 1",
        ));
    }
    BreakerSettings {
        error_rate: rate.clamp(0.0, 1.0),
        min_requests: b.min_requests.max(1),
        window: b.window.0.max(Duration::from_millis(100)),
        consecutive_failures: b.consecutive_failures,
        open_for: b.open_for.0,
        half_open_probes: b.half_open_probes.max(1),
        count_5xx: b.count_5xx,
    }
}

fn compile_retry(r: &Retry, problems: &mut Vec<Problem>) -> RetrySettings {
    let mut on_status = Vec::new();
    for s in &r.on_status {
        if !(100..=599).contains(s.get_ref()) {
            problems.push(Problem::at(
                s.span(),
                format!("invalid status {}", s.get_ref()),
            ));
        }
        on_status.push(*s.get_ref());
    }
    RetrySettings {
        max_retries: r.max_retries.min(10),
        on_status,
        on_timeout: r.on_timeout,
        non_idempotent: r.non_idempotent,
        per_try_timeout: r.per_try_timeout.map(|t| t.0),
        backoff: r.backoff.0,
        max_backoff: r.max_backoff.0.max(r.backoff.0),
        buffer_body: r.buffer_body.0,
    }
}

fn compile_concurrency(
    c: &Concurrency,
    problems: &mut Vec<Problem>,
) -> Option<ConcurrencySettings> {
    if *c.max.get_ref() == 0 {
        problems.push(Problem::at(
            c.max.span(),
            "concurrency max must be at least 1",
        ));
        return None;
    }
    Some(ConcurrencySettings {
        max: *c.max.get_ref(),
        queue: c.queue,
        queue_timeout: c.queue_timeout.0,
    })
}

fn compile_dns(d: &Dns, problems: &mut Vec<Problem>) -> Discovery {
    let name = d.name.get_ref();
    if name.is_empty() || name.parse::<std::net::IpAddr>().is_ok() {
        problems.push(Problem::at(d.name.span(), "dns name must be a host name"));
    }
    if !d.srv && d.port.is_none() {
        problems.push(Problem::at(
            d.name.span(),
            "dns discovery needs `port` (or `srv = true`)",
        ));
    }
    let resolver = d.resolver.as_ref().and_then(|r| match r.get_ref().parse() {
        Ok(a) => Some(a),
        Err(_) => {
            problems.push(Problem::at(
                r.span(),
                format!(
                    "invalid resolver address {:?}: expected IP:PORT",
                    r.get_ref()
                ),
            ));
            None
        }
    });
    Discovery::Dns {
        name: name.clone(),
        port: d.port.unwrap_or(0),
        srv: d.srv,
        resolver,
        interval: d.interval.0.max(Duration::from_millis(100)),
    }
}

fn parse_hash_key(s: &str) -> Result<HashKey, String> {
    if s == "client_ip" {
        return Ok(HashKey::ClientIp);
    }
    if let Some(h) = s.strip_prefix("header:") {
        return HeaderName::from_bytes(h.as_bytes())
            .map(HashKey::Header)
            .map_err(|_| format!("invalid header name {h:?} in hash_key"));
    }
    if let Some(c) = s.strip_prefix("cookie:")
        && !c.is_empty()
    {
        return Ok(HashKey::Cookie(c.to_string()));
    }
    Err(format!(
        "invalid hash_key {s:?}: expected \"client_ip\", \"header:NAME\" or \"cookie:NAME\""
    ))
}

/// Checks a `host:port` upstream target.
pub fn check_authority(s: &str) -> Result<(), String> {
    let bad = || format!("invalid upstream target {s:?}: expected HOST:PORT");
    let auth: http::uri::Authority = s.parse().map_err(|_| bad())?;
    if auth.port_u16().is_none() || auth.host().is_empty() || auth.as_str().contains('@') {
        return Err(bad());
    }
    Ok(())
}
