//! The configuration file as written: serde structs with `deny_unknown_fields`.
//! Nothing here is validated beyond its type; `config::compile` checks
//! cross-field rules and builds the runtime form. Fields whose problems must
//! be reported with a location are `Spanned`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::error::Problem;
use super::units::{ByteSize, Secs};
use crate::upstream::config as up;

/// Parses `text` into a `File`, reporting every type problem (wrong type,
/// unknown key, missing key, bad duration ...) it can, not only the first:
/// each top-level section and each entry of an array of tables
/// (`[[listeners]]`, `[[routes]]` ...) is deserialised on its own, so a
/// problem in one does not hide those in the others. Within one table
/// serde stops at its first problem; a syntax error stops everything (the
/// rest of the file cannot be read reliably).
pub fn parse(text: &str) -> Result<File, Vec<Problem>> {
    parse_sections(text)
}

/// serde's words for a type mismatch in TOML's: arrays and tables, not
/// sequences, maps and structs; integers and numbers, not `u16` and `f64`.
fn in_toml_words(message: &str) -> String {
    let (head, expected) = match message.split_once(", expected ") {
        Some((h, e)) => (h, Some(e)),
        None => (message, None),
    };
    let head = head
        .replace("invalid type: sequence", "invalid type: array")
        .replace("invalid type: map", "invalid type: table");
    let expected = expected.map(|e| match e {
        "a sequence" => "an array".to_string(),
        "a map" => "a table".to_string(),
        "usize" | "u64" => "a non-negative integer".to_string(),
        "u32" => "an integer from 0 to 4294967295".to_string(),
        "u16" => "an integer from 0 to 65535".to_string(),
        "u8" => "an integer from 0 to 255".to_string(),
        "i64" | "i32" => "an integer".to_string(),
        "f64" | "f32" => "a number".to_string(),
        e if e.starts_with("struct ") => "a table".to_string(),
        e => e.to_string(),
    });
    match expected {
        Some(e) => format!("{head}, expected {e}"),
        None => head,
    }
}

/// `parse` for any file of top-level sections and arrays of tables (the
/// config file, the consumers file).
pub fn parse_sections<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, Vec<Problem>> {
    use toml::de::{DeArray, DeTable, DeValue, Deserializer};
    let problem = |e: toml::de::Error| match e.span() {
        // toml says "duplicate key" at the key: name it.
        Some(span) if e.message() == "duplicate key" => {
            let key = text.get(span.clone()).unwrap_or("").trim();
            Problem::at(span, format!("key `{key}` is given more than once"))
        }
        Some(span) => Problem::at(span, in_toml_words(e.message())),
        None => Problem::whole(in_toml_words(e.message())),
    };
    let root = DeTable::parse(text).map_err(|e| vec![problem(e)])?;
    let span = root.span();
    let root = root.into_inner();
    let mut problems = Vec::new();
    for (key, value) in &root {
        // One top-level key (one entry, for an array) as a file of its own.
        let parts: Vec<Spanned<DeValue<'_>>> = match value.get_ref() {
            DeValue::Array(items) => items
                .iter()
                .map(|item| {
                    let mut one = DeArray::new();
                    one.push(item.clone());
                    Spanned::new(value.span(), DeValue::Array(one))
                })
                .collect(),
            _ => vec![value.clone()],
        };
        for part in parts {
            let mut one = DeTable::new();
            one.insert(key.clone(), part);
            if let Err(e) = T::deserialize(Deserializer::from(Spanned::new(span.clone(), one))) {
                // A key that is no array but given one fails once per element.
                let p = problem(e);
                if !problems.contains(&p) {
                    problems.push(p);
                }
            }
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    T::deserialize(Deserializer::from(Spanned::new(span, root))).map_err(|e| vec![problem(e)])
}

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    #[serde(default)]
    pub server: Server,
    #[serde(default)]
    pub admin: Admin,
    #[serde(default)]
    pub access_log: AccessLog,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub upstreams: Vec<Upstream>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub xdp: Option<Spanned<crate::xdp::config::Xdp>>,
    /// CORS for routes without their own `[routes.cors]`.
    #[serde(default)]
    pub cors: Option<crate::policy::cors::CorsSection>,
    /// Redis for rate limits with `backend = "redis"`.
    #[serde(default)]
    pub redis: Option<crate::policy::ratelimit::redis::RedisSection>,
    /// `[[consumers]]`: clients and their credentials (see `crate::auth`).
    #[serde(default)]
    pub consumers: Vec<crate::auth::config::Consumer>,
    /// A file of more `[[consumers]]`, watched and reloaded on change.
    #[serde(default)]
    pub consumers_file: Option<Spanned<String>>,
    #[serde(default)]
    pub identity_providers: Vec<crate::auth::config::IdentityProvider>,
}

/// `[server]`: process-wide settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    /// Worker threads, each with its own runtime and SO_REUSEPORT sockets;
    /// 0 means one per CPU.
    pub workers: usize,
    /// How long in-flight requests may take to finish on SIGTERM/SIGINT.
    pub shutdown_timeout: Secs,
    /// Watch the config file and reload when it changes.
    pub watch_config: bool,
}

impl Default for Server {
    fn default() -> Self {
        Self {
            workers: 0,
            shutdown_timeout: Secs(Duration::from_secs(30)),
            watch_config: true,
        }
    }
}

/// `[admin]`: the admin/metrics listener.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    /// Address of the admin listener; absent means no admin listener.
    pub listen: Option<Spanned<String>>,
}

/// `[access_log]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLog {
    pub enabled: bool,
    /// `"stdout"` or a file path (appended to).
    pub path: Spanned<String>,
}

impl Default for AccessLog {
    fn default() -> Self {
        Self {
            enabled: true,
            path: Spanned::new(0..0, "stdout".to_string()),
        }
    }
}

/// `[[listeners]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub name: Spanned<String>,
    /// `IP:PORT`.
    pub listen: Spanned<String>,
    #[serde(default)]
    pub tls: Option<Spanned<Tls>>,
    /// Accept HTTP/2 (h2c with prior knowledge on plain listeners, ALPN on TLS).
    #[serde(default = "yes")]
    pub http2: bool,
    /// Streams a client may have open at once on one HTTP/2 connection.
    #[serde(default = "default_http2_max_concurrent_streams")]
    pub http2_max_concurrent_streams: u32,
    /// HTTP/2 PINGs to a client that has sent nothing for this long; one
    /// not answered within `http2_keepalive_timeout` closes the connection.
    #[serde(default)]
    pub http2_keepalive_interval: Option<Secs>,
    #[serde(default = "default_http2_keepalive_timeout")]
    pub http2_keepalive_timeout: Secs,
    /// Every connection starts with a PROXY protocol header (v1 or v2)
    /// from a load balancer, naming the client.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Peers (CIDRs) whose `X-Forwarded-For` names the client: proxies in
    /// front of the gateway (as nginx's `set_real_ip_from`).
    #[serde(default)]
    pub trusted_proxies: Vec<Spanned<String>>,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Requests served on one connection before it is closed (HTTP/1.1:
    /// `Connection: close` on the last answer; HTTP/2: GOAWAY); 0: no limit.
    #[serde(default)]
    pub max_requests_per_connection: u64,
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout: Secs,
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: Secs,
    /// Longest pause allowed between two chunks of a request body.
    #[serde(default = "default_body_read_timeout")]
    pub body_read_timeout: Secs,
    /// Longest a streamed request body may take in all, from the start of
    /// the request (none by default, as Envoy's `request_timeout`).
    #[serde(default)]
    pub request_timeout: Option<Secs>,
    /// Longest pause allowed while the client takes a response (HTTP/1.1).
    #[serde(default = "default_send_timeout")]
    pub send_timeout: Secs,
    /// HTTP/1.1: keep serving a request whose client closed its side of the
    /// connection (nginx's `proxy_ignore_client_abort`); by default it is
    /// given up, and its upstream exchange with it.
    #[serde(default)]
    pub ignore_client_abort: bool,
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: ByteSize,
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    /// What to do with request header fields whose names contain `_`.
    #[serde(default)]
    pub headers_with_underscores: Underscores,
    /// What becomes of `X-Forwarded-Client-Cert` on the way upstream.
    #[serde(default)]
    pub forward_client_cert: ForwardClientCert,
    /// Default request body limit for routes on this listener.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: ByteSize,
    /// Ban sources that keep failing authentication or limits.
    #[serde(default)]
    pub auto_ban: Option<Spanned<crate::policy::autoban::AutoBanSection>>,
}

/// `X-Forwarded-Client-Cert` (Envoy's format) on requests to upstreams
/// (Envoy's `forward_client_cert_details`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForwardClientCert {
    /// A client's own is removed (it could claim any certificate); a
    /// client certificate verified on this connection (`client_ca`) is
    /// described in a new one.
    #[default]
    Sanitize,
    /// Passed on as it came, for a listener behind a proxy that terminates
    /// mutual TLS and writes it; nothing is added.
    Forward,
}

/// A listener's answer to request header fields whose names contain `_`
/// (`X_Consumer`), which CGI-style frameworks read as `-` and so as another
/// field than the gateway sees (Envoy's `headers_with_underscores_action`,
/// nginx's `underscores_in_headers`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Underscores {
    /// Passed on as sent.
    #[default]
    Allow,
    /// Removed before routing (nginx's default).
    Drop,
    /// The request is refused with `400`.
    Reject,
}

/// `[listeners.tls]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// Certificates chosen by SNI; the first is served when no name matches.
    pub certificates: Vec<Certificate>,
    /// PEM CA certificates that client certificates must chain to (mutual
    /// TLS); without it clients are not asked for one.
    #[serde(default)]
    pub client_ca: Option<Spanned<String>>,
    /// Whether a client certificate is required (`require`, the default)
    /// or only verified when one is presented (`optional`).
    #[serde(default)]
    pub client_auth: Option<Spanned<ClientAuth>>,
    /// PEM certificate revocation lists of the `client_ca` CAs: revoked
    /// client certificates are refused.
    #[serde(default)]
    pub client_crl: Option<Spanned<String>>,
}

/// `[listeners.tls] client_auth`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    #[default]
    Require,
    Optional,
}

/// One certificate chain and key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    /// PEM certificate chain, relative to the config file's directory.
    pub cert: Spanned<String>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Spanned<String>,
    /// SNI names this certificate answers (exact or `*.example.com`).
    #[serde(default)]
    pub server_names: Vec<Spanned<String>>,
}

/// `[[upstreams]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub name: Spanned<String>,
    /// Static targets: `"HOST:PORT"` or `{ address = "HOST:PORT", weight = 2 }`;
    /// exactly one of `targets`, `dns` and `file`.
    #[serde(default)]
    pub targets: Option<Spanned<Vec<Spanned<up::TargetSpec>>>>,
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Secs,
    /// Default time for a whole upstream exchange (until response headers).
    #[serde(default = "default_upstream_timeout")]
    pub timeout: Secs,
    #[serde(default = "default_pool_idle_timeout")]
    pub pool_idle_timeout: Secs,
    #[serde(default = "default_pool_max_idle")]
    pub pool_max_idle_per_target: usize,
    /// HTTP/2 upstreams: PING a connection that has received nothing for
    /// this long; one not answered within `http2_keepalive_timeout` closes
    /// it (its streams fail, the next request dials anew).
    #[serde(default)]
    pub http2_keepalive_interval: Option<Secs>,
    #[serde(default = "default_http2_keepalive_timeout")]
    pub http2_keepalive_timeout: Secs,
    /// HTTP/2 upstreams: streams in flight on one connection to a target
    /// (per worker) before another connection is dialed.
    #[serde(default = "default_upstream_http2_streams")]
    pub http2_max_concurrent_streams: usize,
    /// How a target is chosen (see `upstream::balance`).
    #[serde(default)]
    pub balance: up::Balance,
    /// Consistent-hashing key: `"client_ip"`, `"header:NAME"`, `"cookie:NAME"`.
    #[serde(default)]
    pub hash_key: Option<Spanned<String>>,
    #[serde(default)]
    pub health: Option<up::Health>,
    #[serde(default)]
    pub outlier: Option<up::Outlier>,
    #[serde(default)]
    pub breaker: Option<up::Breaker>,
    #[serde(default)]
    pub retry: Option<up::Retry>,
    #[serde(default)]
    pub concurrency: Option<up::Concurrency>,
    /// Requests in flight to one target at once; 0 = no limit.
    #[serde(default)]
    pub max_connections_per_target: usize,
    #[serde(default)]
    pub dns: Option<up::Dns>,
    #[serde(default)]
    pub file: Option<up::FileSource>,
    /// TLS to the targets (HTTPS, mutual TLS); plain TCP when absent.
    #[serde(default)]
    pub tls: Option<Spanned<UpstreamTls>>,
}

/// `[upstreams.tls]`: how the gateway speaks TLS to an upstream's targets.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// Server name sent as SNI and verified in the target's certificate;
    /// by default the DNS name (`dns` discovery) or the target's host.
    #[serde(default)]
    pub sni: Option<Spanned<String>>,
    /// PEM CA certificates trusted instead of the system's roots.
    #[serde(default)]
    pub ca_file: Option<Spanned<String>>,
    /// Verify the target's certificate chain and name (default `true`).
    #[serde(default = "yes")]
    pub verify: bool,
    /// Client certificate chain (PEM) presented to targets that ask for
    /// one (mutual TLS); needs `key`.
    #[serde(default)]
    pub cert: Option<Spanned<String>>,
    /// Private key of `cert` (PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub key: Option<Spanned<String>>,
}

/// Protocol spoken to an upstream.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (h2c), or over TLS with ALPN `h2`.
    Http2,
}

/// `[[routes]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub name: Spanned<String>,
    /// Listener names this route serves; empty means all.
    #[serde(default)]
    pub listeners: Vec<Spanned<String>>,
    #[serde(rename = "match", default)]
    pub matcher: Match,
    /// Upstream pool name; exactly one of `upstream`, `respond` and
    /// `redirect`.
    #[serde(default)]
    pub upstream: Option<Spanned<String>>,
    /// A response the gateway gives itself.
    #[serde(default)]
    pub respond: Option<Spanned<Respond>>,
    /// A redirect the gateway answers with.
    #[serde(default)]
    pub redirect: Option<Spanned<Redirect>>,
    /// Remove this prefix from the path before forwarding.
    #[serde(default)]
    pub strip_prefix: Option<Spanned<String>>,
    /// Replace the path; `{name}` refers to a template parameter.
    #[serde(default)]
    pub rewrite: Option<Spanned<String>>,
    /// Upstream timeout for this route (overrides the upstream's).
    #[serde(default)]
    pub timeout: Option<Secs>,
    /// Request body limit (overrides the listener's).
    #[serde(default)]
    pub max_body_bytes: Option<ByteSize>,
    #[serde(default)]
    pub request_headers: HeaderOps,
    #[serde(default)]
    pub response_headers: HeaderOps,
    /// Retry policy for this route (overrides the upstream's).
    #[serde(default)]
    pub retry: Option<up::Retry>,
    /// A circuit breaker of this route's own.
    #[serde(default)]
    pub breaker: Option<up::Breaker>,
    /// A concurrency limit of this route's own.
    #[serde(default)]
    pub concurrency: Option<up::Concurrency>,
    /// Phase 4a: route IP allow/deny.
    #[serde(default)]
    pub access: Option<crate::policy::access::AccessSection>,
    /// Phase 4b: CORS (replaces the global `[cors]` for this route).
    #[serde(default)]
    pub cors: Option<crate::policy::cors::CorsSection>,
    /// Phase 4d: rate limits, quota, concurrency.
    #[serde(default)]
    pub rate_limit: Option<Spanned<crate::policy::ratelimit::RateLimitSection>>,
    /// Phase 4e: request (and response) validation.
    #[serde(default)]
    pub validate: Option<crate::policy::validate::ValidateSection>,
    /// `[routes.auth]`: authentication and authorization (see `crate::auth`).
    #[serde(default)]
    pub auth: Option<Spanned<crate::auth::config::RouteAuth>>,
}

/// `[routes.match]`: all given predicates must hold.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    /// Host names, exact or `*.example.com`; empty means any host.
    #[serde(default)]
    pub hosts: Vec<Spanned<String>>,
    /// Exact path, or a template when it has `{name}` segments
    /// (`{name...}` as the last segment takes the rest of the path).
    #[serde(default)]
    pub path: Option<Spanned<String>>,
    /// Path prefix, matched on segment boundaries when it ends with `/`,
    /// else on characters.
    #[serde(default)]
    pub path_prefix: Option<Spanned<String>>,
    /// Methods; empty means any.
    #[serde(default)]
    pub methods: Vec<Spanned<String>>,
    #[serde(default)]
    pub headers: Vec<Spanned<Predicate>>,
    #[serde(default)]
    pub query: Vec<Spanned<Predicate>>,
}

/// A header or query parameter predicate: exactly one of `value`, `regex`,
/// `present`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Predicate {
    pub name: Spanned<String>,
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub regex: Option<Spanned<String>>,
    #[serde(default)]
    pub present: Option<bool>,
}

/// `[routes.respond]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Respond {
    #[serde(default = "default_status")]
    pub status: u16,
    #[serde(default)]
    pub body: String,
    #[serde(default = "default_content_type")]
    pub content_type: String,
}

/// Header edits, applied in the order remove, set, add.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderOps {
    #[serde(default)]
    pub set: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    pub add: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    pub remove: Vec<Spanned<String>>,
}

fn yes() -> bool {
    true
}
fn default_max_connections() -> usize {
    10_000
}
fn default_header_read_timeout() -> Secs {
    Secs(Duration::from_secs(10))
}
fn default_idle_timeout() -> Secs {
    Secs(Duration::from_secs(60))
}
fn default_send_timeout() -> Secs {
    Secs(Duration::from_secs(60))
}
fn default_upstream_http2_streams() -> usize {
    100
}

fn default_http2_keepalive_timeout() -> Secs {
    Secs(Duration::from_secs(20))
}

fn default_http2_max_concurrent_streams() -> u32 {
    128
}

fn default_body_read_timeout() -> Secs {
    Secs(Duration::from_secs(30))
}
fn default_max_header_bytes() -> ByteSize {
    ByteSize(64 * 1024)
}
fn default_max_headers() -> usize {
    100
}
fn default_max_body_bytes() -> ByteSize {
    ByteSize(10 * 1024 * 1024)
}
fn default_connect_timeout() -> Secs {
    Secs(Duration::from_secs(2))
}
fn default_upstream_timeout() -> Secs {
    Secs(Duration::from_secs(30))
}
fn default_pool_idle_timeout() -> Secs {
    Secs(Duration::from_secs(90))
}
fn default_pool_max_idle() -> usize {
    256
}
fn default_status() -> u16 {
    200
}

/// `[routes.redirect]`: the request is sent elsewhere, keeping what is
/// not replaced (nginx's `return 301 https://$host$request_uri`, Envoy's
/// `redirect`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redirect {
    /// `"http"` or `"https"`; default: the request's.
    #[serde(default)]
    pub scheme: Option<Spanned<String>>,
    /// Host name; default: the request's.
    #[serde(default)]
    pub host: Option<Spanned<String>>,
    /// Port; default: the request's when neither scheme nor host changes,
    /// else none (the scheme's).
    #[serde(default)]
    pub port: Option<u16>,
    /// Leave the query string out.
    #[serde(default)]
    pub strip_query: bool,
    /// 301 (default), 302, 303, 307 or 308.
    #[serde(default)]
    pub status: Option<Spanned<u16>>,
}
fn default_content_type() -> String {
    "text/plain; charset=utf-8".to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_mismatches_are_told_in_toml_words() {
        for (serde, ours) in [
            (
                "invalid type: sequence, expected struct Breaker",
                "invalid type: array, expected a table",
            ),
            (
                "invalid type: string \"x\", expected a sequence",
                "invalid type: string \"x\", expected an array",
            ),
            (
                "invalid value: integer `70000`, expected u16",
                "invalid value: integer `70000`, expected an integer from 0 to 65535",
            ),
            (
                "invalid type: map, expected f64",
                "invalid type: table, expected a number",
            ),
            ("missing field `name`", "missing field `name`"),
            (
                "unknown variant `x`, expected `http1` or `http2`",
                "unknown variant `x`, expected `http1` or `http2`",
            ),
        ] {
            assert_eq!(in_toml_words(serde), ours);
        }
    }
}
