//! Step 4d: rate limits (GCRA, several windows at once), quotas per day or
//! month, and per-key concurrency, keyed by client IP, route, consumer or a
//! header. Limits run in process (`local`) or shared by every gateway
//! through Redis (`redis`), falling back as configured when Redis is
//! unreachable.
//!
//! Every response of a limited route carries `RateLimit-Limit`,
//! `RateLimit-Remaining` and `RateLimit-Reset` (seconds) for the window, or
//! quota, closest to refusing; a refusal is `429` problem+json with
//! `Retry-After`.

pub mod concurrency;
pub mod local;
pub mod quota;
pub mod redis;

use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use toml::Spanned;

use crate::config::Problem;
use crate::config::units::Secs;
use crate::error::{ErrorKind, ProxyError};

/// `[routes.rate_limit]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSection {
    /// `"ip"` (default), `"route"`, `"consumer"`, `"api_key"` or
    /// `"header:NAME"`.
    #[serde(default)]
    pub key: Option<Spanned<String>>,
    /// GCRA windows; all must admit a request.
    #[serde(default)]
    pub limits: Vec<Spanned<WindowSection>>,
    #[serde(default)]
    pub quota: Option<Spanned<QuotaSection>>,
    /// Requests of one key in flight at once (per gateway process).
    #[serde(default)]
    pub max_in_flight: Option<Spanned<u32>>,
    /// Where windows and quotas are counted.
    #[serde(default)]
    pub backend: Backend,
    /// What to do while Redis is unreachable.
    #[serde(default)]
    pub on_redis_error: OnRedisError,
    /// Send `RateLimit-*` headers.
    #[serde(default = "yes")]
    pub headers: bool,
    /// Client addresses counted as one (`ip` keys and the fallbacks to
    /// them): IPv4 prefix length (default 32).
    #[serde(default)]
    pub ipv4_prefix: Option<Spanned<u8>>,
    /// ... IPv6 prefix length (default 64).
    #[serde(default)]
    pub ipv6_prefix: Option<Spanned<u8>>,
}

fn yes() -> bool {
    true
}

/// One window: `requests` per `per`, with up to `burst` at once.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowSection {
    pub requests: u32,
    pub per: Secs,
    /// Requests allowed back to back; default `requests`.
    #[serde(default)]
    pub burst: Option<u32>,
}

/// `quota = { requests = N, per = "day" | "month" }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaSection {
    pub requests: u64,
    pub per: quota::Period,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Local,
    Redis,
}

/// Fail-open, fail-closed, or keep limiting per process.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnRedisError {
    /// Limit in process with the same settings (each gateway then admits up
    /// to the whole limit).
    #[default]
    Local,
    /// Admit everything.
    Allow,
    /// Refuse everything with `503`.
    Deny,
}

/// One compiled window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WindowSpec {
    pub requests: u32,
    pub per: Duration,
    pub burst: u32,
}

impl WindowSpec {
    /// Time to earn one request.
    pub fn emission_interval(&self) -> Duration {
        self.per / self.requests.max(1)
    }
}

/// What a request is counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeySource {
    Ip,
    Route,
    /// The authenticated consumer (set by step 4c); the client IP for
    /// anonymous requests.
    Consumer,
    /// The API key the request authenticated with (step 4c), by its
    /// SHA-256; the client IP when it authenticated otherwise.
    ApiKey,
    /// A request header's value; the client IP when the header is absent.
    Header(HeaderName),
}

/// A request's key, borrowed from the request.
#[derive(Debug, Clone, Copy, Hash)]
pub enum Key<'a> {
    Ip(IpAddr),
    Route,
    /// A consumer name: written as it is in Redis key names.
    Named(&'a [u8]),
    /// A client-chosen value (a header): hashed before it goes into a Redis
    /// key name, so that its length and bytes are not the client's.
    Value(&'a [u8]),
    /// An API key's SHA-256.
    Digest(&'a [u8; 32]),
}

impl KeySource {
    fn parse(s: &str) -> Option<KeySource> {
        Some(match s {
            "ip" => KeySource::Ip,
            "route" => KeySource::Route,
            "consumer" => KeySource::Consumer,
            "api_key" => KeySource::ApiKey,
            _ => KeySource::Header(
                HeaderName::from_bytes(s.strip_prefix("header:")?.as_bytes()).ok()?,
            ),
        })
    }
}

/// The outcome of one check, and what the `RateLimit-*` headers report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u64,
    pub remaining: u64,
    /// Until the window (or quota) is whole again.
    pub reset: Duration,
    /// Until the refused request could pass (zero when allowed).
    pub retry_after: Duration,
    /// Whether the quota, not a window, is the limit reported.
    pub quota: bool,
}

impl Decision {
    /// No limit applies.
    pub const UNLIMITED: Decision = Decision {
        allowed: true,
        limit: u64::MAX,
        remaining: u64::MAX,
        reset: Duration::ZERO,
        retry_after: Duration::ZERO,
        quota: false,
    };

    /// The tighter of two decisions: a refusal; else fewer remaining; on a
    /// tie, the later reset (the constraint that lasts longer).
    pub fn tighter(self, other: Decision) -> Decision {
        match (self.allowed, other.allowed) {
            (true, false) => other,
            (false, true) => self,
            _ if (other.remaining, std::cmp::Reverse(other.reset))
                < (self.remaining, std::cmp::Reverse(self.reset)) =>
            {
                other
            }
            _ => self,
        }
    }
}

/// One route's compiled `[routes.rate_limit]`, or a consumer's own
/// `[consumers.rate_limit]`.
#[derive(Debug)]
pub struct RateLimit {
    /// What the counters belong to: `route:NAME`, or `consumer` (one budget
    /// per consumer across every route).
    scope: Arc<str>,
    source: KeySource,
    /// How much of a client address is one key.
    prefix: crate::policy::access::SourcePrefix,
    windows: Vec<WindowSpec>,
    local: Option<Arc<local::Local>>,
    /// Counts and limit.
    quota: Option<(Arc<quota::LocalQuota>, u64)>,
    in_flight: Option<Arc<concurrency::InFlight>>,
    redis: Option<Arc<redis::Redis>>,
    on_redis_error: OnRedisError,
    pub headers: bool,
}

impl RateLimit {
    /// Compiles `s` for `scope` (see `RateLimit::scope`).
    pub fn compile(
        scope: &str,
        s: &RateLimitSection,
        redis: Option<&Arc<redis::Redis>>,
        span: std::ops::Range<usize>,
        problems: &mut Vec<Problem>,
    ) -> Option<RateLimit> {
        let before = problems.len();
        let source = match &s.key {
            None => KeySource::Ip,
            Some(k) => KeySource::parse(k.get_ref()).unwrap_or_else(|| {
                problems.push(Problem::at(
                    k.span(),
                    format!(
                        "invalid rate-limit key {:?}: expected \"ip\", \"route\", \"consumer\", \"api_key\" or \"header:NAME\"",
                        k.get_ref()
                    ),
                ));
                KeySource::Ip
            }),
        };
        let mut windows = Vec::new();
        for w in &s.limits {
            let ww = w.get_ref();
            let burst = ww.burst.unwrap_or(ww.requests);
            if ww.requests == 0 || burst == 0 || ww.per.0.is_zero() {
                problems.push(Problem::at(
                    w.span(),
                    "a limit needs requests > 0, burst > 0 and a non-zero period",
                ));
                continue;
            }
            windows.push(WindowSpec {
                requests: ww.requests,
                per: ww.per.0,
                burst,
            });
        }
        if let Some(q) = &s.quota
            && q.get_ref().requests == 0
        {
            problems.push(Problem::at(q.span(), "quota requests must be > 0"));
        }
        if let Some(m) = &s.max_in_flight
            && *m.get_ref() == 0
        {
            problems.push(Problem::at(m.span(), "max_in_flight must be > 0"));
        }
        if windows.is_empty() && s.quota.is_none() && s.max_in_flight.is_none() {
            problems.push(Problem::at(
                span.clone(),
                "rate_limit has no `limits`, `quota` or `max_in_flight`",
            ));
        }
        let redis = match s.backend {
            Backend::Local => None,
            Backend::Redis => match redis {
                Some(r) => Some(r.clone()),
                None => {
                    problems.push(Problem::at(
                        s.key.as_ref().map_or(span, |k| k.span()),
                        "backend = \"redis\" needs a top-level [redis] section",
                    ));
                    None
                }
            },
        };
        let prefix = crate::policy::access::SourcePrefix::compile(
            s.ipv4_prefix.as_ref(),
            s.ipv6_prefix.as_ref(),
            0,
            problems,
        );
        if problems.len() > before {
            return None;
        }
        // State is kept across reloads while the settings are the same.
        let state_key = format!("ratelimit\0{scope}\0{source:?}\0{prefix:?}\0");
        let local = (!windows.is_empty()).then(|| {
            crate::policy::shared::get_or_make(format!("{state_key}{windows:?}"), || {
                local::Local::new(&windows)
            })
        });
        let quota = s.quota.as_ref().map(|q| {
            let q = q.get_ref();
            let counts =
                crate::policy::shared::get_or_make(format!("{state_key}quota {:?}", q.per), || {
                    quota::LocalQuota::new(q.per)
                });
            (counts, q.requests)
        });
        let in_flight = s.max_in_flight.as_ref().map(|m| {
            crate::policy::shared::get_or_make(
                format!("{state_key}in-flight {}", m.get_ref()),
                || concurrency::InFlight::new(*m.get_ref()),
            )
        });
        Some(RateLimit {
            scope: scope.into(),
            source,
            prefix,
            windows,
            local,
            quota,
            in_flight,
            redis,
            on_redis_error: s.on_redis_error,
            headers: s.headers,
        })
    }

    pub fn source(&self) -> &KeySource {
        &self.source
    }

    /// The key of a request from `ip` with `headers`, sent by `identity`;
    /// a client address counts by its `SourcePrefix` network.
    pub fn key<'a>(
        &self,
        ip: IpAddr,
        headers: &'a HeaderMap,
        identity: Option<&'a crate::auth::Identity>,
    ) -> Key<'a> {
        let by_ip = || Key::Ip(self.prefix.key(ip));
        match &self.source {
            KeySource::Ip => by_ip(),
            KeySource::Route => Key::Route,
            KeySource::Consumer => identity.map_or_else(by_ip, |i| Key::Named(i.name.as_bytes())),
            KeySource::ApiKey => identity
                .and_then(|i| i.api_key.as_ref())
                .map_or_else(by_ip, Key::Digest),
            KeySource::Header(h) => headers
                .get(h)
                .map_or_else(by_ip, |v| Key::Value(v.as_bytes())),
        }
    }

    /// Step 4d: counts the request, or refuses it (`429`, or `503` when
    /// Redis is down and `on_redis_error = "deny"`). Returns the decision to
    /// report and, with `max_in_flight`, the permit to hold (taken first, so
    /// that a request refused for concurrency spends no window or quota).
    pub async fn check(
        &self,
        key: Key<'_>,
    ) -> Result<(Decision, Option<concurrency::Permit>), ProxyError> {
        let hashed = hasher().hash_one(key);
        // The concurrency slot first: a request it refuses spends nothing
        // of the windows or the quota.
        let permit = match &self.in_flight {
            Some(f) => match f.acquire(hashed) {
                Some(p) => Some(p),
                None => {
                    return Err(ProxyError::new(
                        ErrorKind::TooManyRequests,
                        format!("too many requests in flight: at most {} at once", f.max()),
                    )
                    .with_header(http::header::RETRY_AFTER, HeaderValue::from_static("1")));
                }
            },
            None => None,
        };
        let mut decision = Decision::UNLIMITED;
        if self.local.is_some() || self.quota.is_some() {
            decision = match &self.redis {
                Some(r) => match r
                    .check(
                        &self.scope,
                        key,
                        &self.windows,
                        self.quota.as_ref().map(|(q, limit)| (q.period, *limit)),
                    )
                    .await
                {
                    Ok(d) => d,
                    Err(()) => match self.on_redis_error {
                        OnRedisError::Local => self.check_local(hashed),
                        OnRedisError::Allow => Decision::UNLIMITED,
                        OnRedisError::Deny => {
                            return Err(ProxyError::new(
                                ErrorKind::Overloaded,
                                "the rate limiter is unavailable",
                            ));
                        }
                    },
                },
                None => self.check_local(hashed),
            };
        }
        if !decision.allowed {
            return Err(refusal(&decision, self.headers));
        }
        Ok((decision, permit))
    }

    /// Windows and quota in process.
    fn check_local(&self, key: u64) -> Decision {
        let q = self.quota.as_ref().map(|(q, limit)| q.take(key, *limit));
        if let Some(q) = q
            && !q.allowed
        {
            return q;
        }
        let w = self
            .local
            .as_ref()
            .map_or(Decision::UNLIMITED, |l| l.check(key));
        if !w.allowed {
            if let Some((qq, _)) = &self.quota {
                qq.refund(key);
            }
            return w;
        }
        q.map_or(w, |q| w.tighter(q))
    }
}

/// Hashes keys for the in-process maps: random per process (keys are
/// client-controlled), the same for every configuration so that state kept
/// across a reload is found again.
fn hasher() -> &'static std::hash::RandomState {
    static HASHER: std::sync::OnceLock<std::hash::RandomState> = std::sync::OnceLock::new();
    HASHER.get_or_init(std::hash::RandomState::new)
}

/// The 429 for a refused decision.
fn refusal(d: &Decision, headers: bool) -> ProxyError {
    let retry = ceil_secs(d.retry_after).max(1);
    let detail = if d.quota {
        format!(
            "quota of {} requests exhausted; it renews in {retry} s",
            d.limit
        )
    } else {
        format!("rate limit exceeded; retry in {retry} s")
    };
    let mut e = ProxyError::new(ErrorKind::TooManyRequests, detail)
        .with_header(http::header::RETRY_AFTER, HeaderValue::from(retry));
    if headers {
        e = e
            .with_header(LIMIT.clone(), HeaderValue::from(d.limit))
            .with_header(REMAINING.clone(), HeaderValue::from(0u64))
            .with_header(RESET.clone(), HeaderValue::from(ceil_secs(d.reset)));
    }
    e
}

/// Whole seconds, rounded up.
pub fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

static LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
static REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
static RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// Phase 7: the `RateLimit-*` headers for `d`.
pub fn add_headers(d: &Decision, out: &mut HeaderMap) {
    if d.limit == u64::MAX {
        return;
    }
    out.insert(LIMIT.clone(), number(&LAST_LIMIT, d.limit));
    out.insert(REMAINING.clone(), HeaderValue::from(d.remaining));
    out.insert(RESET.clone(), number(&LAST_RESET, ceil_secs(d.reset)));
}

thread_local! {
    /// The last `RateLimit-Limit` and `-Reset` values written on this
    /// thread: the limit of a route rarely changes and the reset is mostly
    /// the same few seconds, so most responses reuse one instead of
    /// formatting and allocating it again.
    static LAST_LIMIT: std::cell::RefCell<Option<(u64, HeaderValue)>> =
        const { std::cell::RefCell::new(None) };
    static LAST_RESET: std::cell::RefCell<Option<(u64, HeaderValue)>> =
        const { std::cell::RefCell::new(None) };
}

/// `v` as a header value, reused from `last` when it is the same number.
fn number(
    last: &'static std::thread::LocalKey<std::cell::RefCell<Option<(u64, HeaderValue)>>>,
    v: u64,
) -> HeaderValue {
    last.try_with(|l| {
        let mut l = l.borrow_mut();
        match &*l {
            Some((n, value)) if *n == v => value.clone(),
            _ => {
                let value = HeaderValue::from(v);
                *l = Some((v, value.clone()));
                value
            }
        }
    })
    .unwrap_or_else(|_| HeaderValue::from(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_carry_each_decisions_numbers() {
        let d = |limit, remaining, reset_ms| Decision {
            allowed: true,
            limit,
            remaining,
            reset: Duration::from_millis(reset_ms),
            retry_after: Duration::ZERO,
            quota: false,
        };
        for (limit, remaining, reset_ms, reset) in [
            (10, 9, 100, "1"),
            (10, 8, 200, "1"),
            (20, 8, 2500, "3"),
            (10, 0, 2500, "3"),
        ] {
            let mut h = HeaderMap::new();
            add_headers(&d(limit, remaining, reset_ms), &mut h);
            assert_eq!(h[&LIMIT], limit.to_string().as_str());
            assert_eq!(h[&REMAINING], remaining.to_string().as_str());
            assert_eq!(h[&RESET], reset);
        }
        let mut h = HeaderMap::new();
        add_headers(&Decision::UNLIMITED, &mut h);
        assert!(h.is_empty());
    }
}
