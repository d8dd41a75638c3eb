//! Prometheus metrics. Names follow Prometheus conventions; every metric the
//! gateway exports is described here.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Request duration buckets, seconds.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Installs the global recorder (once) and returns the handle that renders
/// the exposition text.
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
