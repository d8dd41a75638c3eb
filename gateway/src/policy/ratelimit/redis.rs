//! Limits and quotas shared by several gateways through Redis: one atomic
//! Lua script per check does GCRA on every window and the quota counter,
//! all or nothing (a refused request spends nothing), on Redis's own clock
//! so that gateways with skewed clocks agree.
//!
//! Connections: `pool_size` multiplexed connections (`ConnectionManager`,
//! which reconnects by itself), used round robin. When a call fails or
//! times out, Redis is marked down: the outage is logged once, every later
//! request goes straight to the route's fallback (`on_redis_error`) without
//! waiting on Redis, and one task probes with exponential backoff until
//! Redis answers again, which is logged too.

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::Deserialize;
use sha2::Digest as _;
use toml::Spanned;

use super::quota;
use super::{Decision, Key, WindowSpec};
use crate::config::Problem;
use crate::config::units::Secs;

/// `[redis]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSection {
    /// `redis://[:PASSWORD@]HOST:PORT[/DB]`.
    pub url: Spanned<String>,
    /// Multiplexed connections.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// Longest wait for one check before Redis counts as down.
    #[serde(default = "default_timeout")]
    pub timeout: Secs,
    /// Prefix of every key the gateway writes.
    #[serde(default = "default_prefix")]
    pub key_prefix: String,
}

fn default_pool_size() -> usize {
    2
}
fn default_timeout() -> Secs {
    Secs(Duration::from_millis(250))
}
fn default_prefix() -> String {
    "gateway:".into()
}

/// The GCRA + quota script. KEYS: one per window, then the quota key if
/// any. ARGV: number of windows; per window its emission interval (ms) and
/// burst; then the quota limit (0 = none), its expiry (unix s) and the
/// seconds until its period ends. Returns {allowed, limit, remaining,
/// reset_ms, retry_ms, is_quota}.
const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local nw = tonumber(ARGV[1])
local tats = {}
local limit, remaining, reset = -1, -1, 0
for i = 1, nw do
  local em = tonumber(ARGV[2 * i])
  local burst = tonumber(ARGV[2 * i + 1])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat < now then tat = now end
  local new_tat = tat + em
  local allow_at = new_tat - em * burst
  if now < allow_at then
    return {0, burst, 0, math.ceil(tat - now), math.ceil(allow_at - now), 0}
  end
  tats[i] = new_tat
  local rem = math.floor((now + em * burst - new_tat) / em)
  if remaining < 0 or rem < remaining or (rem == remaining and new_tat - now > reset) then
    limit, remaining, reset = burst, rem, new_tat - now
  end
end
local qlimit = tonumber(ARGV[2 * nw + 2])
local qleft = -1
if qlimit > 0 then
  local qreset = tonumber(ARGV[2 * nw + 4]) * 1000
  local used = tonumber(redis.call('GET', KEYS[nw + 1]) or '0')
  if used >= qlimit then
    return {0, qlimit, 0, qreset, qreset, 1}
  end
  used = redis.call('INCR', KEYS[nw + 1])
  if used == 1 then redis.call('EXPIREAT', KEYS[nw + 1], tonumber(ARGV[2 * nw + 3])) end
  qleft = qlimit - used
  if remaining < 0 or qleft <= remaining then
    limit, remaining, reset = qlimit, qleft, qreset
    for i = 1, nw do
      redis.call('SET', KEYS[i], tostring(tats[i]), 'PX', math.ceil(tats[i] - now) + 1000)
    end
    return {1, limit, remaining, math.ceil(reset), 0, 1}
  end
end
for i = 1, nw do
  redis.call('SET', KEYS[i], tostring(tats[i]), 'PX', math.ceil(tats[i] - now) + 1000)
end
return {1, limit, remaining, math.ceil(reset), 0, 0}
";

/// `h:` and the 64 hex digits of `d`.
fn hex_digest(out: &mut Vec<u8>, d: &[u8; 32]) {
    out.extend_from_slice(b"h:");
    let mut digits = [0u8; 64];
    crate::hex::encode_into(d, &mut digits);
    out.extend_from_slice(&digits);
}

/// A Redis server shared by the routes that use it.
pub struct Redis {
    url: String,
    client: redis::Client,
    pool_size: usize,
    timeout: Duration,
    prefix: String,
    script: redis::Script,
    /// Made on first use, inside a runtime.
    conns: std::sync::OnceLock<Vec<ConnectionManager>>,
    next: AtomicUsize,
    down: AtomicBool,
    /// Whether `gateway_ratelimit_redis_up` has been set to 1.
    reported_up: AtomicBool,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis").field("url", &self.url).finish()
    }
}

impl Redis {
    /// Compiles `[redis]`; connections are made on first use. The same
    /// settings give the same `Redis` across reloads.
    pub fn compile(s: &RedisSection, problems: &mut Vec<Problem>) -> Option<Arc<Redis>> {
        let client = match redis::Client::open(s.url.get_ref().as_str()) {
            Ok(c) => c,
            Err(e) => {
                problems.push(Problem::at(s.url.span(), format!("invalid redis url: {e}")));
                return None;
            }
        };
        if s.pool_size == 0 {
            problems.push(Problem::at(s.url.span(), "redis pool_size must be > 0"));
            return None;
        }
        let key = format!(
            "redis\0{}\0{}\0{:?}\0{}",
            s.url.get_ref(),
            s.pool_size,
            s.timeout.0,
            s.key_prefix
        );
        Some(crate::policy::shared::get_or_make(key, || Redis {
            url: s.url.get_ref().clone(),
            client,
            pool_size: s.pool_size,
            timeout: s.timeout.0,
            prefix: s.key_prefix.clone(),
            script: redis::Script::new(SCRIPT),
            conns: std::sync::OnceLock::new(),
            next: AtomicUsize::new(0),
            down: AtomicBool::new(false),
            reported_up: AtomicBool::new(false),
        }))
    }

    fn conn(&self) -> Option<ConnectionManager> {
        let conns = self.conns.get_or_init(|| {
            let cfg = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(self.timeout))
                .set_response_timeout(Some(self.timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_secs(1));
            (0..self.pool_size)
                .filter_map(|_| {
                    ConnectionManager::new_lazy_with_config(self.client.clone(), cfg.clone())
                        .inspect_err(|e| tracing::error!("cannot set up redis connections: {e}"))
                        .ok()
                })
                .collect()
        });
        if conns.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % conns.len();
        Some(conns[i].clone())
    }

    /// Checks `key` of `scope` (`route:NAME`, or `consumer`) against
    /// `windows` and `quota` in Redis. `Err` means
    /// Redis could not answer (now, or it is known to be down): the caller
    /// falls back.
    pub async fn check(
        self: &Arc<Self>,
        scope: &str,
        key: Key<'_>,
        windows: &[WindowSpec],
        quota: Option<(quota::Period, u64)>,
    ) -> Result<Decision, ()> {
        if self.down.load(Ordering::Relaxed) {
            metrics::counter!("gateway_ratelimit_redis_fallbacks_total").increment(1);
            return Err(());
        }
        let Some(mut conn) = self.conn() else {
            return Err(());
        };
        let mut inv = self.script.prepare_invoke();
        let mut base = Vec::with_capacity(self.prefix.len() + scope.len() + 72);
        base.extend_from_slice(self.prefix.as_bytes());
        base.extend_from_slice(scope.as_bytes());
        base.push(b':');
        match key {
            Key::Ip(ip) => {
                let _ = write!(base, "ip:{ip}");
            }
            Key::Route => base.extend_from_slice(b"route"),
            Key::Named(n) => {
                base.extend_from_slice(b"k:");
                base.extend_from_slice(n);
            }
            Key::Value(v) => hex_digest(&mut base, &sha2::Sha256::digest(v).into()),
            Key::Digest(d) => hex_digest(&mut base, d),
        }
        inv.arg(windows.len());
        for w in windows {
            let mut wk = base.clone();
            let _ = write!(wk, ":w{}/{}/{}", w.requests, w.per.as_millis(), w.burst);
            inv.key(wk);
            inv.arg(w.emission_interval().as_secs_f64() * 1000.0);
            inv.arg(w.burst);
        }
        match quota {
            Some((period, limit)) => {
                let now = quota::unix_now();
                let (id, end) = quota::period_of(period, now);
                let mut qk = base.clone();
                // Not keyed by the limit: a changed limit keeps the count.
                let p = match period {
                    quota::Period::Day => "day",
                    quota::Period::Month => "month",
                };
                let _ = write!(qk, ":quota:{p}:{id}");
                inv.key(qk);
                inv.arg(limit);
                inv.arg(end + 86_400);
                inv.arg(end.saturating_sub(now));
            }
            None => {
                inv.arg(0).arg(0).arg(0);
            }
        }
        let call = inv.invoke_async::<(u8, u64, u64, u64, u64, u8)>(&mut conn);
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok((allowed, limit, remaining, reset_ms, retry_ms, is_quota))) => {
                if !self.reported_up.load(Ordering::Relaxed)
                    && !self.reported_up.swap(true, Ordering::Relaxed)
                {
                    metrics::gauge!("gateway_ratelimit_redis_up").set(1.0);
                }
                Ok(Decision {
                    allowed: allowed == 1,
                    limit,
                    remaining,
                    reset: Duration::from_millis(reset_ms),
                    retry_after: Duration::from_millis(retry_ms),
                    quota: is_quota == 1,
                })
            }
            Ok(Err(e)) => {
                self.outage(&e.to_string());
                Err(())
            }
            Err(_) => {
                self.outage(&format!("no answer within {:?}", self.timeout));
                Err(())
            }
        }
    }

    /// Marks Redis down (logging once per outage) and starts the probe.
    fn outage(self: &Arc<Self>, why: &str) {
        metrics::counter!("gateway_ratelimit_redis_errors_total").increment(1);
        if self.down.swap(true, Ordering::AcqRel) {
            return;
        }
        metrics::gauge!("gateway_ratelimit_redis_up").set(0.0);
        tracing::warn!(
            url = %self.url,
            "redis unreachable ({why}); rate limits fall back to on_redis_error until it answers again"
        );
        let me = self.clone();
        tokio::spawn(async move {
            let since = Instant::now();
            let mut wait = Duration::from_millis(50);
            loop {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
                let Some(mut conn) = me.conn() else { continue };
                // A write, as the limit script makes: a read-only replica or
                // a server out of memory answers PING but refuses writes, and
                // would otherwise flip down and up every few milliseconds.
                let mut cmd = redis::cmd("SET");
                cmd.arg(format!("{}probe", me.prefix))
                    .arg(1)
                    .arg("PX")
                    .arg(1000);
                let probe = cmd.query_async::<()>(&mut conn);
                if let Ok(Ok(())) = tokio::time::timeout(me.timeout, probe).await {
                    me.down.store(false, Ordering::Release);
                    me.reported_up.store(true, Ordering::Relaxed);
                    metrics::gauge!("gateway_ratelimit_redis_up").set(1.0);
                    tracing::info!(url = %me.url, "redis reachable again after {:?}; shared limits resume", since.elapsed());
                    return;
                }
            }
        });
    }

    /// Whether Redis is believed reachable.
    pub fn is_up(&self) -> bool {
        !self.down.load(Ordering::Relaxed)
    }
}
