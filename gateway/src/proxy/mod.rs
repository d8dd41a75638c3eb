//! The request pipeline. `handle` is the one driver: it runs the phases
//! below in order for every request, turns any error into a response through
//! `crate::respond`, and records the outcome (metrics, access log). Features
//! plug into a phase; phases not yet implemented are listed so the order is
//! visible here.
//!
//! 1. `identify`  – request id (kept from `X-Request-Id` or generated)
//! 2. `validate`  – the client behind trusted proxies, smuggling checks,
//!    header limits, underscored names, path normalization
//! 3. `route`     – host/path/method/header/query match → route or 404/405
//! 4. `policy`    – route IP allow/deny, CORS, authentication, rate limits,
//!    validation (see `crate::policy`)
//! 5. `transform` – direct response, redirect, or the upstream request: path rewrite,
//!    forwarding and hop-by-hop headers, header edits, body limit
//! 6. `upstream`  – pooled call with timeout
//! 7. `respond`   – response header hygiene and edits
//! 8. `record`    – metrics and access log

pub mod body;
pub mod forward;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::proxy::body::Incoming;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};

use crate::config::file::{ForwardClientCert, Underscores};
use crate::config::{ListenerConfig, RouteAction, RouteConfig};
use crate::error::{ErrorKind, ProxyError};
use crate::observe::access_log::{self, AccessLog};
use crate::policy::{self, PolicyCtx};
use crate::reload::{Generation, Live};
use crate::router::{self, Outcome};
use crate::upstream;
use body::Body;

/// `X-Request-Id`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What every connection shares.
#[derive(Debug)]
pub struct Shared {
    pub live: Arc<Live>,
    pub access_log: Option<AccessLog>,
}

/// One client connection.
#[derive(Debug, Clone)]
pub struct Conn {
    pub listener: Arc<str>,
    pub peer: SocketAddr,
    /// The network peer when `peer` is a client it speaks for (a balancer
    /// that sent a PROXY header, a trusted proxy).
    pub source: Option<SocketAddr>,
    /// The network peer's address as `X-Forwarded-For` writes it.
    pub forwarded_for: HeaderValue,
    pub tls: bool,
    /// The client certificate verified in the TLS handshake (listeners
    /// with `client_ca`).
    pub client_cert: Option<Arc<crate::listener::tls::ClientCert>>,
    /// The listener trusts some peers' `X-Forwarded-For`
    /// (`trusted_proxies`): each request's client is worked out from it.
    pub trusted_proxies: bool,
}

/// Per-request state carried through the phases.
struct Ctx {
    /// When the pipeline took the request (its head has arrived).
    started: Instant,
    request_id: HeaderValue,
    route: Option<Arc<str>>,
    upstream: Option<Arc<str>>,
    error: Option<ErrorKind>,
    route_id: Option<usize>,
    policy: PolicyCtx,
}

/// What `handle` watches for the client leaving (HTTP/1.1; hyper cancels
/// HTTP/2 streams itself).
pub type ClientGone<'a> = std::pin::Pin<&'a mut (dyn std::future::Future<Output = ()> + Send)>;

/// Serves one request. Never fails: every error becomes a response. When
/// `gone` is ready first, the request is given up (its upstream exchange
/// dropped) and recorded as `499`.
pub async fn handle(
    shared: &Shared,
    conn: &Conn,
    req: Request<Incoming>,
    gone: Option<ClientGone<'_>>,
) -> Response<Body> {
    let start = Instant::now();
    let generation = shared.live.load();
    let mut ctx = Ctx {
        started: start,
        request_id: identify(&req),
        route: None,
        upstream: None,
        error: None,
        route_id: None,
        policy: PolicyCtx::default(),
    };
    // Kept for the access log only.
    let logged = shared.access_log.as_ref().map(|_| {
        (
            req.method().clone(),
            req.uri().clone(),
            req.version(),
            req.headers().get(header::USER_AGENT).cloned(),
        )
    });
    let method = method_label(req.method());

    // Phase 2 (first): behind trusted proxies, the client their
    // `X-Forwarded-For` names stands for the peer from here on, and is
    // admitted as the accept loop admits peers.
    let behind;
    let mut refused = None;
    let conn = match conn
        .trusted_proxies
        .then(|| real_client(&generation, conn, req.headers()))
    {
        Some(Some(ip)) => {
            if !shared.live.enforcer().admit(ip) {
                refused = Some(ProxyError::new(
                    ErrorKind::Forbidden,
                    "requests from your address are refused",
                ));
            }
            behind = Conn {
                listener: conn.listener.clone(),
                peer: SocketAddr::new(ip, 0),
                source: conn.source.or(Some(conn.peer)),
                forwarded_for: conn.forwarded_for.clone(),
                tls: conn.tls,
                client_cert: conn.client_cert.clone(),
                trusted_proxies: true,
            };
            &behind
        }
        _ => conn,
    };

    let result = match (refused, gone) {
        (Some(e), _) => Err(e),
        (None, None) => process(&generation, conn, &mut ctx, req).await,
        (None, Some(mut gone)) => {
            let mut work = std::pin::pin!(process(&generation, conn, &mut ctx, req));
            std::future::poll_fn(|cx| {
                if let std::task::Poll::Ready(r) = work.as_mut().poll(cx) {
                    return std::task::Poll::Ready(r);
                }
                gone.as_mut().poll(cx).map(|()| {
                    Err(ProxyError::new(
                        ErrorKind::ClientClosed,
                        "the client closed the connection before the response",
                    ))
                })
            })
            .await
        }
    };
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => {
            ctx.error = Some(e.kind);
            if e.kind.side() != crate::error::Side::Downstream {
                tracing::warn!(request_id = ?ctx.request_id, "{e}");
            } else {
                tracing::debug!(request_id = ?ctx.request_id, "{e}");
            }
            crate::respond::error_response(&e, ctx.request_id.to_str().unwrap_or(""))
        }
    };
    if let Some(route) = ctx.route_id.and_then(|i| generation.config.routes.get(i))
        && !route.policy.is_empty()
    {
        policy::on_response(
            &route.policy,
            &mut ctx.policy,
            method == "HEAD",
            &mut resp,
            &ctx.request_id,
        )
        .await;
    }
    policy::autoban::on_status(
        &generation.config,
        conn,
        shared.live.enforcer(),
        resp.status(),
    );
    resp.headers_mut()
        .insert(X_REQUEST_ID.clone(), ctx.request_id.clone());

    // Phase 8: record.
    let status = resp.status().as_u16();
    let elapsed = start.elapsed();
    crate::observe::metrics::record_request(
        &conn.listener,
        ctx.route.as_ref(),
        method,
        status,
        elapsed,
    );
    if let (Some(log), Some((m, uri, version, ua))) = (&shared.access_log, logged) {
        log.log(&access_log::Entry {
            timestamp: access_log::timestamp(SystemTime::now() - elapsed),
            method: m.as_str(),
            path: uri.path(),
            query: uri.query(),
            version: version_label(version),
            status,
            duration_ns: u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
            client_ip: conn.peer.ip(),
            source_ip: conn.source.map(|s| s.ip()),
            user_agent: ua.as_ref().and_then(|v| v.to_str().ok()),
            request_id: ctx.request_id.to_str().unwrap_or(""),
            http_request_id: ctx.request_id.to_str().unwrap_or(""),
            listener: &conn.listener,
            route: ctx.route.as_deref(),
            upstream: ctx.upstream.as_deref(),
            error: ctx.error.map(ErrorKind::as_str),
            user_name: ctx.policy.identity.as_ref().map(|i| &*i.name),
            client_cert_sha256: conn.client_cert.as_ref().map(|c| &*c.sha256),
            client_cert_subject: conn.client_cert.as_ref().map(|c| &*c.subject),
        });
    }
    resp
}

async fn process(
    generation: &Generation,
    conn: &Conn,
    ctx: &mut Ctx,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, ProxyError> {
    let config = &generation.config;
    let Some(listener) = config.listeners.iter().find(|l| l.name == conn.listener) else {
        return Err(ProxyError::new(
            ErrorKind::NoRoute,
            "this listener was removed from the configuration",
        ));
    };

    // Phase 2: validate. Hop-by-hop headers (and those `Connection` names)
    // go now, before routing and policy look at the request: a header the
    // upstream will not see must not be the one a route matched or a rule
    // checked, and `Connection: x-consumer` must not remove what phase 4
    // sets.
    let content_length = validate(listener, &req)?;
    if listener.headers_with_underscores != Underscores::Allow {
        underscores(listener.headers_with_underscores, req.headers_mut())?;
    }
    // A client's own `X-Forwarded-Client-Cert` could claim any
    // certificate: only the one verified on this connection is described.
    let sanitize = listener.forward_client_cert == ForwardClientCert::Sanitize;
    forward::strip_hop_by_hop(req.headers_mut(), sanitize);
    if sanitize && let Some(c) = &conn.client_cert {
        req.headers_mut()
            .insert(forward::X_FORWARDED_CLIENT_CERT.clone(), c.xfcc.clone());
    }
    one_host(&mut req)?;
    let uri = req.uri().clone();
    let path = router::normalize::normalize(uri.path()).map_err(|e| {
        ProxyError::new(ErrorKind::BadRequest, format!("invalid request path: {e}"))
    })?;

    // Phase 3: route.
    let host = request_host(&req);
    let find = |method: &Method| {
        listener.router.find(&router::Request {
            method,
            host: host.as_deref(),
            path: &path,
            query: req.uri().query(),
            headers: req.headers(),
        })
    };
    // A CORS preflight is routed by the method it announces (as the request
    // it asks about would be), when the route found that way answers
    // preflights; otherwise like any request.
    let preflight = policy::cors::preflight_method(&req)
        .map(|m| find(&m))
        .filter(|o| match o {
            Outcome::Matched { route, .. } => config
                .routes
                .get(*route)
                .is_some_and(|r| r.policy.cors.is_some()),
            _ => false,
        });
    let outcome = preflight.unwrap_or_else(|| find(req.method()));
    let (route_id, params) = match outcome {
        Outcome::Matched { route, params } => (route, params),
        Outcome::MethodNotAllowed { allowed } => {
            let list = allowed
                .iter()
                .map(Method::as_str)
                .collect::<Vec<_>>()
                .join(", ");
            let mut e = ProxyError::new(
                ErrorKind::MethodNotAllowed,
                format!(
                    "method {} is not allowed here; allowed: {list}",
                    req.method()
                ),
            );
            if let Ok(v) = HeaderValue::from_str(&list) {
                e = e.with_header(header::ALLOW, v);
            }
            return Err(e);
        }
        Outcome::NotFound => {
            return Err(ProxyError::new(
                ErrorKind::NoRoute,
                format!("no route for {} {}", req.method(), path),
            ));
        }
    };
    let Some(route) = config.routes.get(route_id) else {
        return Err(ProxyError::new(
            ErrorKind::Internal,
            "route table out of step",
        ));
    };
    ctx.route = Some(route.name.clone());
    ctx.route_id = Some(route_id);

    // Phase 4: route IP rules, CORS, authentication and authorization, rate
    // limits, validation (see `policy`).
    if !route.policy.is_empty()
        && let Some(resp) =
            policy::on_request(&route.policy, conn, &mut ctx.policy, &mut req).await?
    {
        return Ok(resp);
    }

    // Phase 5: transform.
    let upstream_index = match &route.action {
        RouteAction::Respond {
            status,
            body,
            content_type,
        } => {
            return Ok(direct_response(
                route,
                *status,
                body.clone(),
                content_type.clone(),
            ));
        }
        RouteAction::Redirect(rd) => {
            return redirect_response(route, rd, conn, &req, &path, &params);
        }
        RouteAction::Upstream(i) => *i,
    };
    let Some(pool) = generation.upstreams.get(upstream_index) else {
        return Err(ProxyError::new(
            ErrorKind::Internal,
            "upstream table out of step",
        ));
    };
    ctx.upstream = Some(pool.config.name.clone());
    let upstream_req = upstream_request(
        req,
        conn,
        listener,
        route,
        &path,
        &params,
        &ctx.request_id,
        content_length,
        ctx.policy.buffered_body.take(),
        listener
            .request_timeout
            .map(|t| (tokio::time::Instant::from_std(ctx.started) + t, t)),
    )?;

    // Phase 6: upstream.
    let timeout = route.timeout.unwrap_or(pool.config.timeout);
    let started = Instant::now();
    let result = call_upstream(pool, route, conn, upstream_req, started, timeout).await;
    crate::observe::metrics::record_upstream(&pool.config.name, started.elapsed());
    let (resp, held) = result.inspect_err(|e| {
        // A client's body failing on its way (413, 408, 400) is not the
        // upstream's error.
        if e.kind.side() != crate::error::Side::Downstream {
            let upstream_label = metrics::SharedString::from(pool.config.name.clone());
            metrics::counter!("gateway_upstream_errors_total", "upstream" => upstream_label, "kind" => e.kind.as_str()).increment(1);
        }
    })?;

    // Phase 7: respond.
    let (mut parts, incoming) = resp.into_parts();
    forward::strip_hop_by_hop(&mut parts.headers, false);
    route.response_headers.apply(&mut parts.headers);
    Ok(Response::from_parts(
        parts,
        Body::Upstream(Box::new((incoming, held))),
    ))
}

/// Phase 6: admission (concurrency slots of the route, then the upstream,
/// held until the response body ends), then tries until one succeeds or
/// may not be retried. Each try passes the breakers and picks a target
/// (another one than the last when it can); a failed try is retried when
/// the policy allows it for this method and failure, the body can be sent
/// again, the pool's retry budget has room and `timeout` has time left.
async fn call_upstream(
    pool: &upstream::Pool,
    route: &RouteConfig,
    conn: &Conn,
    req: Request<Body>,
    started: Instant,
    timeout: std::time::Duration,
) -> Result<(Response<upstream::UpstreamBody>, upstream::Held), ProxyError> {
    // The clock is read once for the phase and the first try when nothing
    // waits in between (a read costs more than the rest of the bookkeeping
    // here).
    let deadline = tokio::time::Instant::from_std(started) + timeout;
    let rp = &route.upstream_policy;
    let policy = rp.retry.as_ref().unwrap_or(&pool.config.settings.retry);
    let mut held = upstream::Held::default();
    // `started` while nothing has waited since it was read.
    let mut clock = Some(started);
    // A body kept for retries is read before any slot is taken, within the
    // request's own deadline: a client trickling it holds neither.
    let req = if policy.max_retries > 0 && policy.buffer_body > 0 {
        clock = None;
        let deadline = tokio::time::Instant::from_std(started + timeout);
        match tokio::time::timeout_at(
            deadline,
            upstream::retry::buffer_body(req, policy.buffer_body),
        )
        .await
        {
            Ok(r) => r?,
            Err(_) => {
                return Err(ProxyError::new(
                    ErrorKind::RequestTimeout,
                    format!("the request body did not arrive within {timeout:?}"),
                )
                .closing());
            }
        }
    } else {
        req
    };
    if let Some(l) = &rp.concurrency {
        held.route_slot = Some(l.acquire().await?);
        clock = None;
    }
    if let Some(l) = &pool.limiter {
        held.pool_slot = Some(l.acquire().await?);
        clock = None;
    }
    pool.budget.deposit(upstream::window::ms_at(started));
    let hash = pool.request_hash(conn.peer.ip(), req.headers());
    let method = req.method().clone();
    let mut req = Recycled(req);
    let req = &mut req.0;
    let mut avoid = None;
    let mut retries = 0;
    loop {
        // A copy for the next try, when there may be one.
        let spare = if retries < policy.max_retries {
            upstream::retry::replay_body(req.body())
        } else {
            None
        };
        let now = clock.take().unwrap_or_else(Instant::now);
        let left = deadline.saturating_duration_since(tokio::time::Instant::from_std(now));
        let per_try = policy.per_try_timeout.map_or(left, |t| t.min(left));
        let (reason, target, failure) = match pool
            .try_once(req, rp.breaker.as_deref(), hash, avoid, now, per_try)
            .await
        {
            Ok(t) => {
                let status = t.response.status().as_u16();
                if spare.is_none() || !policy.on_status.contains(&status) {
                    held.in_flight = Some(t.in_flight);
                    return Ok((t.response, held));
                }
                (
                    Some(upstream::retry::Reason::Status),
                    Some(t.target),
                    Ok((t.response, t.in_flight)),
                )
            }
            Err(f) => (f.retry, f.target, Err(f.error)),
        };
        let retry = match (reason, spare) {
            (Some(reason), Some(spare))
                if upstream::retry::allowed(policy, &method, reason)
                    && deadline > tokio::time::Instant::now()
                    && pool.take_retry(reason) =>
            {
                Some(spare)
            }
            _ => None,
        };
        let Some(next) = retry else {
            // No retry: answer with what the last try gave.
            return match failure {
                Ok((response, in_flight)) => {
                    held.in_flight = Some(in_flight);
                    Ok((response, held))
                }
                Err(e) => Err(e),
            };
        };
        drop(failure);
        retries += 1;
        avoid = target;
        let pause = upstream::retry::backoff(policy, retries);
        tokio::time::sleep_until((tokio::time::Instant::now() + pause).min(deadline)).await;
        *req.body_mut() = next;
    }
}

/// The upstream request of `call_upstream`, whose header map goes back to
/// the spare maps (`crate::wire`) when the call is over.
struct Recycled(Request<Body>);

impl Drop for Recycled {
    fn drop(&mut self) {
        crate::wire::recycle_header_map(std::mem::take(self.0.headers_mut()));
    }
}

/// Phase 1: the request id, kept from the client when it is sane.
fn identify(req: &Request<Incoming>) -> HeaderValue {
    if let Some(v) = req.headers().get(&X_REQUEST_ID)
        && !v.is_empty()
        && v.len() <= 128
        && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
    {
        return v.clone();
    }
    new_request_id()
}

/// A fresh request id: 32 lowercase hex digits.
pub fn new_request_id() -> HeaderValue {
    let mut buf = [0u8; 32];
    crate::hex::encode_into(&fastrand::u128(..).to_be_bytes(), &mut buf);
    HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// Phase 2: rejects oversized heads and a malformed `Content-Length`;
/// returns the length, for phase 5.
fn validate(listener: &ListenerConfig, req: &Request<Incoming>) -> Result<Option<u64>, ProxyError> {
    // Methods are case-sensitive and every registered one is upper case: a
    // `post` that no route's `methods` names could reach, through a
    // catch-all route, an upstream that reads it as POST (nginx refuses
    // such methods too).
    let method = req.method().as_str();
    if !method
        .bytes()
        .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
    {
        return Err(ProxyError::new(
            ErrorKind::BadRequest,
            format!("invalid method {method:?}: methods are upper-case letters, '-' and '_'"),
        )
        .closing());
    }
    let h = req.headers();
    // Ambiguous HTTP/1 framing (Content-Length with Transfer-Encoding,
    // conflicting lengths, codings other than one `chunked`) never gets
    // here: the HTTP/1.1 server (`listener/h1.rs`) refuses it before a
    // request exists.
    if h.len() > listener.max_headers {
        return Err(ProxyError::new(
            ErrorKind::HeadersTooLarge,
            format!(
                "request has {} header fields; the limit is {}",
                h.len(),
                listener.max_headers
            ),
        )
        .closing());
    }
    let size: usize = h
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + req.uri().path_and_query().map_or(0, |p| p.as_str().len())
        + 16;
    if size > listener.max_header_bytes {
        return Err(ProxyError::new(
            ErrorKind::HeadersTooLarge,
            format!(
                "request head is {size} bytes; the limit is {}",
                listener.max_header_bytes
            ),
        )
        .closing());
    }
    match h.get(header::CONTENT_LENGTH) {
        None => Ok(None),
        Some(v) => match crate::wire::content_length(v.as_bytes()) {
            Some(n) => Ok(Some(n)),
            None => Err(ProxyError::new(ErrorKind::BadRequest, "invalid Content-Length").closing()),
        },
    }
}

/// The client a request from a trusted proxy names: walking
/// `X-Forwarded-For` from the right (the nearest hop first), the first
/// address that is not a trusted proxy (an entry may carry a port:
/// `203.0.113.7:4711`, `[2001:db8::1]:4711`); the leftmost when all are;
/// the last trusted one before an entry that is not an address. `None` when the
/// peer is not a trusted proxy or names nobody else.
fn real_client(generation: &Generation, conn: &Conn, h: &http::HeaderMap) -> Option<IpAddr> {
    let listener = generation
        .config
        .listeners
        .iter()
        .find(|l| l.name == conn.listener)?;
    let trusted = |ip: IpAddr| {
        let ip = policy::access::canonical(ip);
        listener.trusted_proxies.iter().any(|n| n.contains(&ip))
    };
    let mut client = conn.peer.ip();
    if !trusted(client) {
        return None;
    }
    'walk: for v in h.get_all(&forward::X_FORWARDED_FOR).iter().rev() {
        let Ok(v) = v.to_str() else { break };
        for entry in v.rsplit(',') {
            // Some proxies (Azure's, for one) add the client's port.
            let entry = entry.trim();
            let Ok(ip) = entry
                .parse::<IpAddr>()
                .or_else(|_| entry.parse::<SocketAddr>().map(|a| a.ip()))
            else {
                break 'walk;
            };
            client = ip;
            if !trusted(ip) {
                break 'walk;
            }
        }
    }
    (client != conn.peer.ip()).then_some(client)
}

/// Phase 2: header fields whose names contain `_`, dropped or refused as
/// the listener says (`Allow` never gets here).
fn underscores(action: Underscores, h: &mut http::HeaderMap) -> Result<(), ProxyError> {
    let Some(first) = h.keys().find(|n| n.as_str().contains('_')) else {
        return Ok(());
    };
    if action == Underscores::Reject {
        metrics::counter!("gateway_headers_with_underscores_total", "action" => "rejected")
            .increment(1);
        return Err(ProxyError::new(
            ErrorKind::BadRequest,
            format!(
                "header field {first:?} has '_' in its name, which this listener refuses (headers_with_underscores = \"reject\")"
            ),
        ));
    }
    let names: Vec<HeaderName> = h
        .keys()
        .filter(|n| n.as_str().contains('_'))
        .cloned()
        .collect();
    for n in &names {
        h.remove(n);
    }
    metrics::counter!("gateway_headers_with_underscores_total", "action" => "dropped")
        .increment(names.len() as u64);
    Ok(())
}

/// Phase 2: one host per request, the same for routing and the upstream.
/// Several `Host` fields, or none in HTTP/1.1, are refused (RFC 9112
/// §3.2); a request target with an authority (absolute form, HTTP/2
/// `:authority`) sets `Host`, whatever the client sent in it (§3.2.2), so
/// a route chosen for one host never forwards to another.
fn one_host(req: &mut Request<Incoming>) -> Result<(), ProxyError> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err(
            ProxyError::new(ErrorKind::BadRequest, "request has several Host fields").closing(),
        );
    }
    let Some(a) = req.uri().authority() else {
        return match first {
            None if req.version() == Version::HTTP_11 => Err(ProxyError::new(
                ErrorKind::BadRequest,
                "request without Host (required since HTTP 1.1)",
            )
            .closing()),
            // An upstream could read another host out of it (or none).
            Some(h) if !valid_host(h.as_bytes()) => Err(ProxyError::new(
                ErrorKind::BadRequest,
                "invalid Host (expected HOST or HOST:PORT)",
            )
            .closing()),
            _ => Ok(()),
        };
    };
    if first.is_some_and(|h| h.as_bytes() == a.as_str().as_bytes()) {
        return Ok(());
    }
    if a.as_str().contains('@') {
        return Err(ProxyError::new(
            ErrorKind::BadRequest,
            "request target carries user information",
        )
        .closing());
    }
    let v = HeaderValue::from_str(a.as_str())
        .map_err(|_| ProxyError::new(ErrorKind::BadRequest, "invalid request authority"))?;
    req.headers_mut().insert(header::HOST, v);
    Ok(())
}

/// Whether `h` is a `Host` value (RFC 9110 §7.2: `uri-host [ ":" port ]`,
/// or empty): the characters of a registered name, an IPv4 address or an
/// IPv6 literal in brackets, and a port. No user information, path,
/// whitespace or control bytes.
fn valid_host(h: &[u8]) -> bool {
    h.iter().all(|&b| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b'%'
                    | b':'
                    | b'['
                    | b']'
            )
    })
}

/// The request's host, without port, lowercased (borrowed when it already is).
fn request_host(req: &Request<Incoming>) -> Option<std::borrow::Cow<'_, str>> {
    let raw = match req.uri().authority() {
        Some(a) => a.host(),
        None => {
            let h = req.headers().get(header::HOST)?.to_str().ok()?;
            // Strip a port, keeping IPv6 literals whole.
            match h.rfind(':') {
                Some(i) if !h[i..].contains(']') => &h[..i],
                _ => h,
            }
        }
    };
    Some(if raw.bytes().any(|b| b.is_ascii_uppercase()) {
        raw.to_ascii_lowercase().into()
    } else {
        raw.into()
    })
}

fn direct_response(
    route: &RouteConfig,
    status: StatusCode,
    body: Bytes,
    content_type: HeaderValue,
) -> Response<Body> {
    let mut resp = Response::new(Body::full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, content_type);
    route.response_headers.apply(resp.headers_mut());
    resp
}

/// The path after the route's `rewrite` or `strip_prefix`.
fn route_path<'a>(
    route: &RouteConfig,
    path: &'a str,
    params: &router::Params,
) -> std::borrow::Cow<'a, str> {
    if let Some(rw) = &route.rewrite {
        rw.apply(path, params).into()
    } else if let Some(prefix) = &route.strip_prefix {
        match path.strip_prefix(prefix.trim_end_matches('/')) {
            Some("") => "/".into(),
            Some(rest) if rest.starts_with('/') => rest.into(),
            _ => path.into(),
        }
    } else {
        path.into()
    }
}

/// Phase 5 for `[routes.redirect]`: `Location` is the request's URL with
/// the redirect's scheme, host and port, and the route's path.
fn redirect_response(
    route: &RouteConfig,
    rd: &crate::config::Redirect,
    conn: &Conn,
    req: &Request<Incoming>,
    path: &str,
    params: &router::Params,
) -> Result<Response<Body>, ProxyError> {
    let scheme = rd.scheme.unwrap_or(if conn.tls { "https" } else { "http" });
    // Phase 2 (`one_host`) made `Host` the request's one host.
    let authority = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<http::uri::Authority>().ok());
    let mut location = String::with_capacity(64 + path.len());
    location.push_str(scheme);
    location.push_str("://");
    let host = match (&rd.host, &authority) {
        (Some(h), _) => h.as_str(),
        (None, Some(a)) => a.host(),
        (None, None) => {
            return Err(ProxyError::new(
                ErrorKind::BadRequest,
                "cannot redirect a request without a host",
            ));
        }
    };
    location.push_str(host);
    // The request's port stays only while scheme and host do.
    let port = match rd.port {
        Some(p) => Some(p),
        None if rd.scheme.is_none() && rd.host.is_none() => {
            authority.as_ref().and_then(http::uri::Authority::port_u16)
        }
        None => None,
    };
    if let Some(p) = port {
        location.push(':');
        location.push_str(itoa::Buffer::new().format(p));
    }
    location.push_str(&route_path(route, path, params));
    if !rd.strip_query
        && let Some(q) = req.uri().query()
    {
        location.push('?');
        location.push_str(q);
    }
    let location = HeaderValue::try_from(location).map_err(|e| {
        ProxyError::new(ErrorKind::BadRequest, "cannot build the redirect location").with_source(e)
    })?;
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = rd.status;
    resp.headers_mut().insert(header::LOCATION, location);
    route.response_headers.apply(resp.headers_mut());
    Ok(resp)
}

/// Phase 5: the request as the upstream will see it. `content_length` is
/// the one phase 2 read; `buffered` replaces the client's body when a
/// phase-4 step had to read it whole.
#[allow(clippy::too_many_arguments)]
fn upstream_request(
    req: Request<Incoming>,
    conn: &Conn,
    listener: &ListenerConfig,
    route: &RouteConfig,
    path: &str,
    params: &router::Params,
    request_id: &HeaderValue,
    content_length: Option<u64>,
    buffered: Option<Bytes>,
    whole: Option<(tokio::time::Instant, std::time::Duration)>,
) -> Result<Request<Body>, ProxyError> {
    let limit = route.max_body_bytes.unwrap_or(listener.max_body_bytes);
    let (mut parts, incoming) = req.into_parts();
    if let Some(len) = content_length
        && len > limit
    {
        return Err(ProxyError::new(
            ErrorKind::PayloadTooLarge,
            format!("request body is {len} bytes; the limit is {limit}"),
        )
        .closing());
    }
    let new_path = route_path(route, path, params);
    // Phase 2 (`one_host`) made `Host` the request's one host.
    let original_host = parts.headers.get(header::HOST).cloned();
    // An origin-form target whose path neither normalization nor the route
    // changed is sent as it came (no copy, no second parse).
    if parts.uri.scheme().is_some() || new_path != parts.uri.path() {
        let pq = match parts.uri.query() {
            Some(q) => format!("{new_path}?{q}"),
            None => new_path.into_owned(),
        };
        parts.uri = http::Uri::try_from(pq).map_err(|e| {
            ProxyError::new(ErrorKind::BadRequest, "cannot build the upstream path").with_source(e)
        })?;
    }
    let h = &mut parts.headers;
    let via = match parts.version {
        Version::HTTP_2 => "2 gateway",
        Version::HTTP_10 => "1.0 gateway",
        _ => "1.1 gateway",
    };
    forward::add_forwarding(
        h,
        &conn.forwarded_for,
        conn.tls,
        original_host.as_ref(),
        via,
    );
    h.insert(X_REQUEST_ID.clone(), request_id.clone());
    route.request_headers.apply(h);
    let body = if let Some(b) = buffered {
        // Read whole by validation up to its own limit: the route's still
        // holds for a body that came without a length (chunked, HTTP/2).
        if b.len() as u64 > limit {
            return Err(ProxyError::new(
                ErrorKind::PayloadTooLarge,
                format!("request body is over the limit of {limit} bytes"),
            )
            .closing());
        }
        Body::full(b)
    } else if incoming_is_empty(&incoming) {
        Body::empty()
    } else {
        Body::guarded(incoming, limit, listener.body_read_timeout, whole)
    };
    Ok(Request::from_parts(parts, body))
}

fn incoming_is_empty(b: &Incoming) -> bool {
    http_body::Body::is_end_stream(b)
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

fn version_label(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_11 => "1.1",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_values() {
        for ok in [
            "",
            "x",
            "api.example.com:8443",
            "127.0.0.1:80",
            "[2001:db8::1]:443",
            "a_b.local",
        ] {
            assert!(super::valid_host(ok.as_bytes()), "{ok:?}");
        }
        for bad in [
            "a b",
            "u@host",
            "host/path",
            "host?q",
            "host#f",
            "h\\x",
            "h\tx",
            "hé",
        ] {
            assert!(!super::valid_host(bad.as_bytes()), "{bad:?}");
        }
    }

    #[test]
    fn request_ids_are_32_lowercase_hex_digits_and_differ() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let id = new_request_id();
            let s = id.to_str().unwrap();
            assert_eq!(s.len(), 32);
            assert!(
                s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "{s}"
            );
            assert!(seen.insert(s.to_string()), "repeated id {s}");
        }
    }
}
