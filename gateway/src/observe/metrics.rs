//! Prometheus metrics. Names follow Prometheus conventions; every metric the
//! gateway exports is described here.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{Counter, Histogram, SharedString};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Request duration buckets, seconds.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How often histogram samples are folded into their buckets.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Installs the global recorder (once) and returns the handle that renders
/// the exposition text.
///
/// A recorder built with `build_recorder` keeps every histogram sample until
/// it is rendered; without a scraper that grows by some 20 bytes a request,
/// so a thread folds the samples in every `UPKEEP_INTERVAL`, as the
/// exporter's own `install` would.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed");
            }
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(UPKEEP_INTERVAL);
                        upkeep.run_upkeep();
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!("cannot start the metrics upkeep thread: {e}");
            }
            describe();
            metrics::gauge!("gateway_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "gateway_http_requests_total",
        "HTTP requests by listener, route, method and status class."
    );
    describe_histogram!(
        "gateway_http_request_duration_seconds",
        Unit::Seconds,
        "Time from request head to response head, by route."
    );
    describe_histogram!(
        "gateway_upstream_request_duration_seconds",
        Unit::Seconds,
        "Upstream exchange time (until response head), by upstream."
    );
    describe_counter!(
        "gateway_upstream_errors_total",
        "Failed upstream exchanges by upstream and error kind."
    );
    describe_gauge!(
        "gateway_active_connections",
        "Open client connections by listener."
    );
    describe_counter!(
        "gateway_connections_rejected_total",
        "Connections refused at accept by listener and reason."
    );
    describe_counter!(
        "gateway_config_reloads_total",
        "Config reloads by result (ok, failed)."
    );
    describe_gauge!("gateway_build_info", "Build information; always 1.");
    crate::upstream::describe_metrics();
    describe_counter!(
        "gateway_ratelimit_redis_errors_total",
        "Rate-limit checks that Redis failed or did not answer in time."
    );
    describe_counter!(
        "gateway_ratelimit_redis_fallbacks_total",
        "Rate-limit checks served by on_redis_error while Redis was down."
    );
    describe_gauge!(
        "gateway_ratelimit_redis_up",
        "Whether the rate limiter's Redis answers (0 during an outage)."
    );
    describe_counter!(
        "gateway_response_validation_failures_total",
        "Upstream responses that violate the route's response schema, by route."
    );
    describe_counter!(
        "gateway_autoban_bans_total",
        "Sources banned by auto-ban, by listener and reason."
    );
}

/// The status class label (`2xx` ...) of a status code.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Records one served request: `gateway_http_requests_total` and
/// `gateway_http_request_duration_seconds`.
///
/// `metrics::counter!` with dynamic labels builds, hashes and looks up a label
/// set on every call (about a tenth of the gateway's user time per proxied
/// request), so each worker thread keeps the handles it has used, keyed by
/// the addresses of the listener and route names. The cache holds those
/// names, so an address cannot be reused by another name while it is cached.
/// A handle stays valid because the recorder never removes series (no
/// `idle_timeout`); a counter is registered only when first incremented, as
/// before, so the exposition shows the same series.
pub fn record_request(
    listener: &Arc<str>,
    route: Option<&Arc<str>>,
    method: &'static str,
    status: u16,
    elapsed: Duration,
) {
    let class = status_class(status);
    let Some(m) = METHODS.iter().position(|x| *x == method) else {
        counter_for(listener, route, method, class).increment(1);
        histogram_for(route).record(elapsed.as_secs_f64());
        return;
    };
    let c = CLASSES.iter().position(|x| *x == class).unwrap_or(0);
    CACHE.with_borrow_mut(|cache| {
        let key = (addr(listener), route.map_or(0, addr));
        if cache.requests.len() >= MAX_CACHED && !cache.requests.contains_key(&key) {
            cache.requests.clear();
        }
        let h = cache.requests.entry(key).or_insert_with(|| RequestHandles {
            _listener: listener.clone(),
            _route: route.cloned(),
            duration: histogram_for(route),
            counters: std::array::from_fn(|_| None),
        });
        h.counters[m * CLASSES.len() + c]
            .get_or_insert_with(|| counter_for(listener, route, method, class))
            .increment(1);
        h.duration.record(elapsed.as_secs_f64());
    });
}

/// Records one upstream exchange in `gateway_upstream_request_duration_seconds`.
pub fn record_upstream(upstream: &Arc<str>, elapsed: Duration) {
    CACHE.with_borrow_mut(|cache| {
        let key = addr(upstream);
        if cache.upstreams.len() >= MAX_CACHED && !cache.upstreams.contains_key(&key) {
            cache.upstreams.clear();
        }
        cache
            .upstreams
            .entry(key)
            .or_insert_with(|| {
                let label = SharedString::from(upstream.clone());
                (
                    upstream.clone(),
                    metrics::histogram!("gateway_upstream_request_duration_seconds", "upstream" => label),
                )
            })
            .1
            .record(elapsed.as_secs_f64());
    });
}

fn counter_for(
    listener: &Arc<str>,
    route: Option<&Arc<str>>,
    method: &'static str,
    class: &'static str,
) -> Counter {
    metrics::counter!(
        "gateway_http_requests_total",
        "listener" => SharedString::from(listener.clone()),
        "route" => route_label(route),
        "method" => method,
        "status" => class,
    )
}

fn histogram_for(route: Option<&Arc<str>>) -> Histogram {
    metrics::histogram!("gateway_http_request_duration_seconds", "route" => route_label(route))
}

fn route_label(route: Option<&Arc<str>>) -> SharedString {
    route.map_or_else(
        || SharedString::const_str("none"),
        |r| SharedString::from(r.clone()),
    )
}

/// The method labels `proxy` uses, in the order of the cache's slots.
const METHODS: [&str; 10] = [
    "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE", "OTHER",
];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Entries per map before the cache starts over (reloads leave old names).
const MAX_CACHED: usize = 4096;

struct RequestHandles {
    // Kept so that the addresses in the key stay these names'.
    _listener: Arc<str>,
    _route: Option<Arc<str>>,
    duration: Histogram,
    counters: [Option<Counter>; METHODS.len() * CLASSES.len()],
}

#[derive(Default)]
struct Cache {
    requests: HashMap<(usize, usize), RequestHandles, BuildHasherDefault<AddrHasher>>,
    upstreams: HashMap<usize, (Arc<str>, Histogram), BuildHasherDefault<AddrHasher>>,
}

thread_local! {
    static CACHE: RefCell<Cache> = RefCell::default();
    static STATIC_COUNTERS: RefCell<Vec<(StaticKey, Counter)>> = const { RefCell::new(Vec::new()) };
}

/// A counter's name and one label, all `'static`, by address.
type StaticKey = (usize, usize, usize);

/// Increments `name{label=value}` where all three are `'static`, keeping
/// each worker's handles like `record_request` (a `counter!` lookup costs
/// more than the rest of an API-key check).
pub fn increment_static(name: &'static str, label: &'static str, value: &'static str) {
    let key = (
        name.as_ptr() as usize,
        label.as_ptr() as usize,
        value.as_ptr() as usize,
    );
    STATIC_COUNTERS.with_borrow_mut(|v| {
        if let Some((_, c)) = v.iter().find(|(k, _)| *k == key) {
            c.increment(1);
            return;
        }
        let c = metrics::counter!(name, label => value);
        c.increment(1);
        if v.len() < MAX_CACHED {
            v.push((key, c));
        }
    });
}

fn addr(s: &Arc<str>) -> usize {
    Arc::as_ptr(s).cast::<u8>() as usize
}

/// Hashes the addresses in cache keys (a multiply and a rotate; SipHash
/// would cost more than the lookup saves).
#[derive(Default)]
struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_handles_count_like_the_macros() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let listener: Arc<str> = Arc::from("public");
        let route: Arc<str> = Arc::from("api");
        let upstream: Arc<str> = Arc::from("demo");
        metrics::with_local_recorder(&recorder, || {
            for _ in 0..3 {
                record_request(
                    &listener,
                    Some(&route),
                    "GET",
                    200,
                    Duration::from_millis(1),
                );
            }
            record_request(
                &listener,
                Some(&route),
                "GET",
                503,
                Duration::from_millis(1),
            );
            record_request(&listener, None, "OTHER", 404, Duration::from_millis(1));
            record_upstream(&upstream, Duration::from_millis(1));
            record_upstream(&upstream, Duration::from_millis(1));
        });
        let text = handle.render();
        for line in [
            r#"gateway_http_requests_total{listener="public",route="api",method="GET",status="2xx"} 3"#,
            r#"gateway_http_requests_total{listener="public",route="api",method="GET",status="5xx"} 1"#,
            r#"gateway_http_requests_total{listener="public",route="none",method="OTHER",status="4xx"} 1"#,
            r#"gateway_http_request_duration_seconds_count{route="api"} 4"#,
            r#"gateway_upstream_request_duration_seconds_count{upstream="demo"} 2"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
    }
}
