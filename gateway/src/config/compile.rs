//! Validation and compilation of a parsed file into `Config`. Every problem is
//! collected (not just the first) with the span it is about.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use toml::Spanned;

use super::file::{self, File};
use super::{
    AccessLogTarget, Config, HeaderEdits, ListenerConfig, Problem, RouteAction, RouteConfig,
    UpstreamConfig,
};
use crate::router::{Matcher, Rewrite, Router};

pub(super) fn compile(path: &Path, f: &File) -> Result<Config, Vec<Problem>> {
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut problems = Vec::new();

    // Addresses bound by this process, to find port clashes.
    let mut bound: HashMap<SocketAddr, String> = HashMap::new();
    let mut bind = |addr: SocketAddr,
                    what: String,
                    span: std::ops::Range<usize>,
                    problems: &mut Vec<Problem>| {
        let clash = bound
            .iter()
            .find(|(a, _)| {
                a.port() == addr.port()
                    && (a.ip() == addr.ip()
                        || a.ip().is_unspecified()
                        || addr.ip().is_unspecified())
            })
            .map(|(_, w)| w.clone());
        match clash {
            Some(other) => problems.push(Problem::at(
                span,
                format!("{what} port {} clashes with {other}", addr.port()),
            )),
            None => {
                bound.insert(addr, what);
            }
        }
    };

    let admin = f.admin.listen.as_ref().and_then(|l| match parse_addr(l) {
        Ok(a) => {
            bind(a, "admin listener".into(), l.span(), &mut problems);
            Some(a)
        }
        Err(p) => {
            problems.push(p);
            None
        }
    });

    let access_log = f
        .access_log
        .enabled
        .then(|| match f.access_log.path.get_ref().as_str() {
            "stdout" | "-" => AccessLogTarget::Stdout,
            p => AccessLogTarget::File(resolve(&base, p)),
        });

    // Upstreams.
    let mut upstreams = Vec::new();
    let mut upstream_index: HashMap<&str, usize> = HashMap::new();
    for u in &f.upstreams {
        let name = u.name.get_ref().as_str();
        if name.is_empty() {
            problems.push(Problem::at(
                u.name.span(),
                "upstream name must not be empty",
            ));
        }
        if upstream_index.insert(name, upstreams.len()).is_some() {
            problems.push(Problem::at(
                u.name.span(),
                format!("duplicate upstream name {name:?}"),
            ));
        }
        let (targets, settings) = crate::upstream::config::compile_upstream(
            &base,
            &crate::upstream::config::UpstreamKeys {
                name,
                name_span: u.name.span(),
                targets: u.targets.as_ref(),
                balance: u.balance,
                hash_key: u.hash_key.as_ref(),
                health: u.health.as_ref(),
                outlier: u.outlier.as_ref(),
                breaker: u.breaker.as_ref(),
                retry: u.retry.as_ref(),
                concurrency: u.concurrency.as_ref(),
                max_connections_per_target: u.max_connections_per_target,
                dns: u.dns.as_ref(),
                file: u.file.as_ref(),
            },
            &mut problems,
        );
        let tls = u.tls.as_ref().and_then(|t| {
            let dns_name = u
                .dns
                .as_ref()
                .filter(|d| !d.srv)
                .map(|d| d.name.get_ref().as_str());
            crate::upstream::tls::compile(&base, t, u.protocol, dns_name, &mut problems)
        });
        let http2_keepalive = u
            .http2_keepalive_interval
            .as_ref()
            .map(|i| (i.0, u.http2_keepalive_timeout.0));
        if let Some((interval, timeout)) = http2_keepalive {
            if u.protocol != super::file::UpstreamProtocol::Http2 {
                problems.push(Problem::at(
                    u.name.span(),
                    format!(
                        "upstream {name:?}: http2_keepalive_interval needs protocol = \"http2\""
                    ),
                ));
            }
            for (key, d) in [
                ("http2_keepalive_interval", interval),
                ("http2_keepalive_timeout", timeout),
            ] {
                if d.is_zero() {
                    problems.push(Problem::at(
                        u.name.span(),
                        format!("upstream {name:?}: {key} must be positive"),
                    ));
                }
            }
        }
        if u.http2_max_concurrent_streams == 0 {
            problems.push(Problem::at(
                u.name.span(),
                format!("upstream {name:?}: http2_max_concurrent_streams must be positive"),
            ));
        }
        upstreams.push(UpstreamConfig {
            name: name.into(),
            tls,
            targets,
            protocol: u.protocol,
            connect_timeout: u.connect_timeout.0,
            timeout: u.timeout.0,
            pool_idle_timeout: u.pool_idle_timeout.0,
            pool_max_idle_per_target: u.pool_max_idle_per_target,
            http2_keepalive,
            http2_max_concurrent_streams: u.http2_max_concurrent_streams,
            settings,
        });
    }

    // Listener names first, so routes can refer to them.
    let mut listener_names: HashSet<&str> = HashSet::new();
    for l in &f.listeners {
        let name = l.name.get_ref().as_str();
        if !listener_names.insert(name) {
            problems.push(Problem::at(
                l.name.span(),
                format!("duplicate listener name {name:?}"),
            ));
        }
    }

    let policy_globals = crate::policy::Globals::compile(f, &mut problems);
    let auth = crate::auth::compile(
        &base,
        &f.consumers,
        f.consumers_file.as_ref(),
        &f.identity_providers,
        policy_globals.redis.as_ref(),
        &mut problems,
    );

    // Routes.
    let mut routes = Vec::new();
    let mut matchers: Vec<Option<Arc<Matcher>>> = Vec::new();
    let mut route_names: HashSet<&str> = HashSet::new();
    for r in &f.routes {
        let name = r.name.get_ref().as_str();
        if !route_names.insert(name) {
            problems.push(Problem::at(
                r.name.span(),
                format!("duplicate route name {name:?}"),
            ));
        }
        // A client-certificate credential needs a listener that asks for one.
        if let Some(a) = &r.auth
            && a.get_ref().client_cert.is_some()
            && !f
                .listeners
                .iter()
                .filter(|l| {
                    r.listeners.is_empty()
                        || r.listeners.iter().any(|n| n.get_ref() == l.name.get_ref())
                })
                .any(|l| {
                    l.tls
                        .as_ref()
                        .is_some_and(|t| t.get_ref().client_ca.is_some())
                })
        {
            problems.push(Problem::at(
                a.span(),
                format!(
                    "route {name:?} takes client_cert, but none of its listeners verifies client certificates (set tls.client_ca)"
                ),
            ));
        }
        for l in &r.listeners {
            if !listener_names.contains(l.get_ref().as_str()) {
                problems.push(Problem::at(
                    l.span(),
                    format!("route {name:?} names unknown listener {:?}", l.get_ref()),
                ));
            }
        }
        let matcher = match Matcher::compile(&r.matcher) {
            Ok(m) => Some(Arc::new(m)),
            Err(ps) => {
                problems.extend(ps);
                None
            }
        };
        let action = match (&r.upstream, &r.respond, &r.redirect) {
            (Some(u), None, None) => match upstream_index.get(u.get_ref().as_str()) {
                Some(&i) => Some(RouteAction::Upstream(i)),
                None => {
                    problems.push(Problem::at(
                        u.span(),
                        format!(
                            "route {name:?} points at unknown upstream {:?}",
                            u.get_ref()
                        ),
                    ));
                    None
                }
            },
            (None, Some(resp), None) => respond_action(resp, &mut problems),
            (None, None, Some(rd)) => redirect_action(rd, &mut problems),
            (None, None, None) => {
                problems.push(Problem::at(
                    r.name.span(),
                    format!("route {name:?} needs `upstream`, `respond` or `redirect`"),
                ));
                None
            }
            _ => {
                problems.push(Problem::at(
                    r.name.span(),
                    format!(
                        "route {name:?} gives more than one of `upstream`, `respond` and `redirect`; give one"
                    ),
                ));
                None
            }
        };
        if let Some(p) = &r.strip_prefix
            && !p.get_ref().starts_with('/')
        {
            problems.push(Problem::at(p.span(), "strip_prefix must start with '/'"));
        }
        let rewrite = match (&r.rewrite, &matcher) {
            (Some(rw), Some(m)) => match Rewrite::compile(rw, m) {
                Ok(rw) => Some(rw),
                Err(p) => {
                    problems.push(p);
                    None
                }
            },
            _ => None,
        };
        let request_headers = header_edits(&r.request_headers, &mut problems);
        let response_headers = header_edits(&r.response_headers, &mut problems);
        matchers.push(matcher);
        routes.push(RouteConfig {
            name: name.into(),
            action: action.unwrap_or(RouteAction::Respond {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                body: Bytes::new(),
                content_type: HeaderValue::from_static("text/plain"),
            }),
            strip_prefix: r.strip_prefix.as_ref().map(|s| s.get_ref().clone()),
            rewrite,
            timeout: r.timeout.map(|t| t.0),
            max_body_bytes: r.max_body_bytes.map(|b| b.0),
            request_headers,
            response_headers,
            upstream_policy: crate::upstream::config::compile_route(
                name,
                r.retry.as_ref(),
                r.breaker.as_ref(),
                r.concurrency.as_ref(),
                &mut problems,
            ),
            policy: {
                let mut p = crate::policy::compile_route(r, &policy_globals, &base, &mut problems);
                p.auth = crate::auth::compile_route(r.auth.as_ref(), &auth, &mut problems);
                p
            },
        });
    }

    // Listeners.
    let mut listeners = Vec::new();
    for l in &f.listeners {
        let name = l.name.get_ref().as_str();
        let addr = match parse_addr(&l.listen) {
            Ok(a) => {
                bind(
                    a,
                    format!("listener {name:?}"),
                    l.listen.span(),
                    &mut problems,
                );
                a
            }
            Err(p) => {
                problems.push(p);
                continue;
            }
        };
        let tls = match &l.tls {
            Some(t) => match crate::listener::tls::server_config(&base, t, l.http2) {
                Ok(c) => Some(c),
                Err(ps) => {
                    problems.extend(ps);
                    None
                }
            },
            None => None,
        };
        let entries = f
            .routes
            .iter()
            .zip(&matchers)
            .enumerate()
            .filter(|(_, (r, _))| {
                r.listeners.is_empty() || r.listeners.iter().any(|n| n.get_ref() == name)
            })
            .filter_map(|(i, (_, m))| m.clone().map(|m| (i, m)))
            .collect();
        if l.http2_max_concurrent_streams == 0 {
            problems.push(Problem::at(
                l.name.span(),
                format!("listener {name:?}: http2_max_concurrent_streams must be positive"),
            ));
        }
        for (key, d) in [
            ("header_read_timeout", l.header_read_timeout.0),
            ("idle_timeout", l.idle_timeout.0),
            ("body_read_timeout", l.body_read_timeout.0),
            ("send_timeout", l.send_timeout.0),
            ("http2_keepalive_timeout", l.http2_keepalive_timeout.0),
            (
                "http2_keepalive_interval",
                l.http2_keepalive_interval
                    .as_ref()
                    .map_or(std::time::Duration::MAX, |t| t.0),
            ),
            (
                "request_timeout",
                l.request_timeout
                    .as_ref()
                    .map_or(std::time::Duration::MAX, |t| t.0),
            ),
        ] {
            if d.is_zero() {
                problems.push(Problem::at(
                    l.name.span(),
                    format!("listener {name:?}: {key} must be positive"),
                ));
            }
        }
        let max_header_bytes = usize::try_from(l.max_header_bytes.0).unwrap_or(usize::MAX);
        listeners.push(ListenerConfig {
            name: name.into(),
            addr,
            tls,
            http2: l.http2,
            http2_max_concurrent_streams: l.http2_max_concurrent_streams,
            http2_keepalive: l
                .http2_keepalive_interval
                .as_ref()
                .map(|i| (i.0, l.http2_keepalive_timeout.0)),
            proxy_protocol: l.proxy_protocol,
            trusted_proxies: crate::policy::access::cidrs(&l.trusted_proxies, &mut problems),
            max_connections: l.max_connections,
            max_requests_per_connection: l.max_requests_per_connection,
            header_read_timeout: l.header_read_timeout.0,
            idle_timeout: l.idle_timeout.0,
            body_read_timeout: l.body_read_timeout.0,
            request_timeout: l.request_timeout.as_ref().map(|t| t.0),
            send_timeout: l.send_timeout.0,
            ignore_client_abort: l.ignore_client_abort,

            max_header_bytes,
            max_headers: l.max_headers,
            headers_with_underscores: l.headers_with_underscores,
            forward_client_cert: l.forward_client_cert,
            max_body_bytes: l.max_body_bytes.0,
            router: Router::new(entries),
            auto_ban: l
                .auto_ban
                .as_ref()
                .and_then(|a| crate::policy::autoban::AutoBan::compile(name, a, &mut problems)),
        });
    }

    let listener_ports: Vec<u16> = listeners.iter().map(|l| l.addr.port()).collect();
    let xdp = match crate::xdp::config::compile(f.xdp.as_ref(), &listener_ports) {
        Ok(x) => x,
        Err(ps) => {
            problems.extend(ps);
            Default::default()
        }
    };

    if !problems.is_empty() {
        return Err(problems);
    }
    let workers = match f.server.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    Ok(Config {
        path: path.to_path_buf(),
        workers,
        shutdown_timeout: f.server.shutdown_timeout.0,
        watch_config: f.server.watch_config,
        admin,
        access_log,
        listeners,
        upstreams,
        routes,
        xdp,
        auth,
    })
}

/// Resolves `p` against the config file's directory unless absolute.
pub(crate) fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn parse_addr(s: &Spanned<String>) -> Result<SocketAddr, Problem> {
    s.get_ref().parse().map_err(|_| {
        Problem::at(
            s.span(),
            format!("invalid listen address {:?}: expected IP:PORT", s.get_ref()),
        )
    })
}

fn redirect_action(
    rd: &Spanned<file::Redirect>,
    problems: &mut Vec<Problem>,
) -> Option<RouteAction> {
    let r = rd.get_ref();
    let before = problems.len();
    let status = match r.status.as_ref().map_or(301, |s| *s.get_ref()) {
        s @ (301 | 302 | 303 | 307 | 308) => StatusCode::from_u16(s).ok(),
        s => {
            problems.push(Problem::at(
                r.status.as_ref().map_or(rd.span(), Spanned::span),
                format!("redirect status {s}: expected 301, 302, 303, 307 or 308"),
            ));
            None
        }
    };
    let scheme = match r.scheme.as_ref().map(|s| (s, s.get_ref().as_str())) {
        None => None,
        Some((_, "http")) => Some("http"),
        Some((_, "https")) => Some("https"),
        Some((s, other)) => {
            problems.push(Problem::at(
                s.span(),
                format!("redirect scheme {other:?}: expected \"http\" or \"https\""),
            ));
            None
        }
    };
    if let Some(h) = &r.host {
        let ok = !h.get_ref().is_empty()
            && !h.get_ref().contains([':', '/', '?', '#', '@'])
            && h.get_ref().parse::<http::uri::Authority>().is_ok();
        if !ok {
            problems.push(Problem::at(
                h.span(),
                format!("redirect host {:?} is not a host name", h.get_ref()),
            ));
        }
    }
    if problems.len() > before {
        return None;
    }
    Some(RouteAction::Redirect(crate::config::Redirect {
        status: status?,
        scheme,
        host: r.host.as_ref().map(|h| h.get_ref().to_ascii_lowercase()),
        port: r.port,
        strip_query: r.strip_query,
    }))
}

fn respond_action(
    resp: &Spanned<file::Respond>,
    problems: &mut Vec<Problem>,
) -> Option<RouteAction> {
    let r = resp.get_ref();
    let status = match StatusCode::from_u16(r.status) {
        Ok(s) => s,
        Err(_) => {
            problems.push(Problem::at(
                resp.span(),
                format!("invalid status {}", r.status),
            ));
            return None;
        }
    };
    let content_type = match HeaderValue::from_str(&r.content_type) {
        Ok(v) => v,
        Err(_) => {
            problems.push(Problem::at(
                resp.span(),
                format!("invalid content_type {:?}", r.content_type),
            ));
            return None;
        }
    };
    Some(RouteAction::Respond {
        status,
        body: Bytes::from(r.body.clone()),
        content_type,
    })
}

fn header_edits(ops: &file::HeaderOps, problems: &mut Vec<Problem>) -> HeaderEdits {
    let mut edits = HeaderEdits::default();
    for name in &ops.remove {
        match HeaderName::from_bytes(name.get_ref().as_bytes()) {
            Ok(n) => edits.remove.push(n),
            Err(_) => problems.push(Problem::at(
                name.span(),
                format!("invalid header name {:?}", name.get_ref()),
            )),
        }
    }
    for (list, out) in [(&ops.set, &mut edits.set), (&ops.add, &mut edits.add)] {
        for (name, value) in list {
            let n = HeaderName::from_bytes(name.as_bytes());
            let v = HeaderValue::from_str(value.get_ref());
            match (n, v) {
                (Ok(n), Ok(v)) => out.push((n, v)),
                (Err(_), _) => problems.push(Problem::at(
                    value.span(),
                    format!("invalid header name {name:?}"),
                )),
                (_, Err(_)) => problems.push(Problem::at(
                    value.span(),
                    format!("invalid value for header {name:?}"),
                )),
            }
        }
    }
    edits
}
