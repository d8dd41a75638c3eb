//! Configuration: the file as written (`file`), its units (`units`), problems
//! with their locations (`error`), and the compiled, immutable runtime form
//! (`Config`) that the data path reads. A `Config` is built once per load and
//! swapped atomically on reload (see `crate::reload`); nothing in it is
//! parsed or compiled per request.

mod compile;
pub mod error;
pub mod file;
pub mod units;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

pub use error::{ConfigError, Problem};

use crate::router::{Rewrite, Router};

/// Default config path, relative to the working directory.
pub const DEFAULT_PATH: &str = "conf/gateway.toml";

/// The compiled configuration.
#[derive(Debug)]
pub struct Config {
    /// The file it was loaded from.
    pub path: PathBuf,
    /// Worker threads (resolved: never 0).
    pub workers: usize,
    pub shutdown_timeout: Duration,
    pub watch_config: bool,
    pub admin: Option<SocketAddr>,
    pub access_log: Option<AccessLogTarget>,
    pub listeners: Vec<ListenerConfig>,
    pub upstreams: Vec<UpstreamConfig>,
    /// Every route, indexed by the route ids the routers return.
    pub routes: Vec<RouteConfig>,
    pub xdp: crate::xdp::config::XdpSettings,
    /// Consumers and identity providers (routes hold what they use).
    pub auth: crate::auth::AuthConfig,
}

/// Where access log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    Stdout,
    File(PathBuf),
}

/// One listener.
#[derive(Debug)]
pub struct ListenerConfig {
    pub name: Arc<str>,
    pub addr: SocketAddr,
    /// rustls configuration with SNI resolution; `None` for plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub http2: bool,
    pub http2_max_concurrent_streams: u32,
    /// HTTP/2 keep-alive PINGs: interval and answer timeout.
    pub http2_keepalive: Option<(Duration, Duration)>,
    /// Connections start with a PROXY protocol header.
    pub proxy_protocol: bool,
    /// Peers whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub max_connections: usize,
    pub max_requests_per_connection: u64,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_read_timeout: Duration,
    /// Longest a streamed request body may take in all.
    pub request_timeout: Option<Duration>,
    /// Longest a response waits for the client to take a write, or for the
    /// upstream's next body bytes.
    pub send_timeout: Duration,
    /// Keep serving requests whose client closed its side (HTTP/1.1).
    pub ignore_client_abort: bool,

    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub headers_with_underscores: file::Underscores,
    pub forward_client_cert: file::ForwardClientCert,
    pub max_body_bytes: u64,
    /// Routes served on this listener.
    pub router: Router,
    /// `[listeners.auto_ban]`.
    pub auto_ban: Option<Arc<crate::policy::autoban::AutoBan>>,
}

/// One upstream pool as configured.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub name: Arc<str>,
    /// Static `host:port` targets (empty with DNS or file discovery).
    pub targets: Vec<crate::upstream::config::StaticTarget>,
    pub protocol: file::UpstreamProtocol,
    /// `[upstreams.tls]`, compiled; plain TCP when `None`.
    pub tls: Option<crate::upstream::tls::Tls>,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_target: usize,
    /// HTTP/2 keep-alive PINGs: interval and timeout.
    pub http2_keepalive: Option<(Duration, Duration)>,
    /// HTTP/2: streams in flight on one connection before another is dialed.
    pub http2_max_concurrent_streams: usize,
    /// Balancing, health, discovery, breaker, retries, limits.
    pub settings: crate::upstream::config::UpstreamSettings,
}

/// What a matched route does.
#[derive(Debug)]
pub enum RouteAction {
    /// Proxy to `Config::upstreams[index]`.
    Upstream(usize),
    /// Answer directly.
    Respond {
        status: StatusCode,
        body: Bytes,
        content_type: HeaderValue,
    },
    /// Answer with a redirect.
    Redirect(Redirect),
}

/// A compiled `[routes.redirect]`; the path is the route's (after
/// `strip_prefix` or `rewrite`).
#[derive(Debug)]
pub struct Redirect {
    pub status: StatusCode,
    pub scheme: Option<&'static str>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub strip_query: bool,
}

/// One route's behaviour once matched.
#[derive(Debug)]
pub struct RouteConfig {
    pub name: Arc<str>,
    pub action: RouteAction,
    pub strip_prefix: Option<String>,
    pub rewrite: Option<Rewrite>,
    pub timeout: Option<Duration>,
    pub max_body_bytes: Option<u64>,
    pub request_headers: HeaderEdits,
    pub response_headers: HeaderEdits,
    /// Phase-4 steps (access, CORS, auth, rate limits, validation).
    pub policy: crate::policy::RoutePolicy,
    /// Phase-6 overrides: retries, breaker, concurrency limit.
    pub upstream_policy: crate::upstream::config::RouteUpstream,
}

/// Precompiled header edits: remove, then set, then add.
#[derive(Debug, Default)]
pub struct HeaderEdits {
    pub remove: Vec<HeaderName>,
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderEdits {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

impl Config {
    /// Reads, parses, validates and compiles the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(
                path,
                String::new(),
                vec![Problem::whole(format!("cannot read config file: {e}"))],
            )
        })?;
        Self::from_text(path, text)
    }

    /// Parses and compiles `text` as if read from `path` (relative paths in
    /// it resolve against `path`'s directory).
    pub fn from_text(path: &Path, text: String) -> Result<Config, ConfigError> {
        let parsed = match file::parse(&text) {
            Ok(f) => f,
            Err(problems) => return Err(ConfigError::new(path, text, problems)),
        };
        compile::compile(path, &parsed).map_err(|problems| ConfigError::new(path, text, problems))
    }

    /// The one-line summary `gateway check` prints.
    pub fn summary(&self) -> String {
        format!(
            "config OK: {} listeners, {} routes, {} upstreams",
            self.listeners.len(),
            self.routes.len(),
            self.upstreams.len()
        )
    }
}

/// The methods a config list names (in any case), each problem at its
/// place: spelled as requests must spell them, upper-case letters, `-`
/// and `_` (`proxy::validate` refuses other requests, so a route for
/// `M1` could never match).
pub fn methods(list: &[toml::Spanned<String>], problems: &mut Vec<Problem>) -> Vec<http::Method> {
    let mut out = Vec::new();
    for m in list {
        let name = m.get_ref().to_ascii_uppercase();
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_');
        match http::Method::from_bytes(name.as_bytes()) {
            Ok(x) if valid => out.push(x),
            _ => problems.push(Problem::at(
                m.span(),
                format!("invalid method {:?}", m.get_ref()),
            )),
        }
    }
    out
}

/// Resolves a path written in the config against the config file's directory.
pub(crate) fn compile_resolve(base: &Path, p: &str) -> PathBuf {
    compile::resolve(base, p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped example and a config with every section, mutated line by
    /// line and byte by byte: never a panic; a refusal names each problem
    /// at a place inside the file (`FILE:LINE:COL: message`), and one
    /// problem with the whole file is only an unreadable one.
    #[test]
    fn mutated_configs_are_refused_at_their_places_or_accepted() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        for path in [
            dir.join("../conf/gateway.toml"),
            dir.join("src/config/testdata/every_section.toml"),
        ] {
            mutate_config(&path);
        }
    }

    fn mutate_config(path: &Path) {
        let text = std::fs::read_to_string(path).expect("seed config");
        if let Err(e) = Config::from_text(path, text.clone()) {
            panic!("the seed is valid: {e}");
        }
        let lines: Vec<&str> = text.lines().collect();
        // Values of other types and odd spellings to put in place of one.
        const VALUES: &[&str] = &[
            "\"\"",
            "0",
            "-1",
            "1e400",
            "\"1x\"",
            "[]",
            "{}",
            "[\"a\", 1]",
            "true",
            "\"::\"",
            "\"999.0.0.1/40\"",
            "\"a(\"",
            "\"/\"",
            "\"0s\"",
            "\"9999999999999d\"",
            "\"-5s\"",
        ];
        let mut rng = fastrand::Rng::with_seed(51);
        let (mut refused, mut accepted) = (0, 0);
        for i in 0..3_000 {
            let mutated = if i % 3 == 0 {
                let bytes = crate::mutate::mutate(&mut rng, text.as_bytes());
                String::from_utf8_lossy(&bytes).into_owned()
            } else {
                let mut ls: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
                for _ in 0..rng.usize(1..=3) {
                    let at = rng.usize(0..ls.len());
                    match rng.u8(0..4) {
                        // Another value for a key.
                        0 | 1 => {
                            if let Some((key, _)) = ls[at].split_once(" = ") {
                                ls[at] = format!("{key} = {}", VALUES[rng.usize(0..VALUES.len())]);
                            }
                        }
                        // A line twice, or gone.
                        2 => {
                            let copy = ls[at].clone();
                            ls.insert(at, copy);
                        }
                        _ => {
                            ls.remove(at);
                        }
                    }
                }
                ls.join("\n")
            };
            match Config::from_text(path, mutated.clone()) {
                Ok(_) => accepted += 1,
                Err(e) => {
                    refused += 1;
                    assert!(!e.problems.is_empty(), "{mutated}");
                    for p in &e.problems {
                        assert!(!p.message.is_empty(), "{mutated}");
                        let span = p.span.clone().unwrap_or_else(|| {
                            panic!("a problem without a place: {}\n{mutated}", p.message)
                        });
                        assert!(span.start <= mutated.len(), "{}\n{mutated}", p.message);
                    }
                    let prefix = format!("{}:", path.display());
                    for l in e.lines() {
                        let (line, col) = l[prefix.len()..]
                            .split_once(": ")
                            .and_then(|(at, _)| at.split_once(':'))
                            .unwrap_or_else(|| panic!("not FILE:LINE:COL: {l}"));
                        assert!(
                            line.parse::<usize>().is_ok() && col.parse::<usize>().is_ok(),
                            "{l}"
                        );
                    }
                }
            }
        }
        assert!(
            refused > 500 && accepted > 100,
            "refused {refused}, accepted {accepted}"
        );
    }
}
