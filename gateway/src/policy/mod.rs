//! Phase 4 of the pipeline (see `proxy/mod.rs`): what decides whether a
//! routed request may go on, in this order:
//!
//! - 4a. route-level IP allow/deny (`access`)
//! - 4b. CORS, preflights answered here (`cors`)
//! - 4c. authentication and authorization
//! - 4d. rate limits, quotas and per-consumer concurrency (`ratelimit`)
//! - 4e. request validation (`validate`)
//!
//! Each step is a module that owns its config section and compiles it into a
//! field of `RoutePolicy`; a route without the field skips the step at no
//! cost. `on_response` runs in phase 7 for the steps that add response
//! headers (CORS, rate-limit headers), check responses (validation) or hold
//! resources until the response (concurrency permits). `autoban` watches
//! the statuses phase 8 records and bans sources through `xdp::Enforcer`.

pub mod access;
pub mod autoban;
pub mod cors;
pub mod ratelimit;
pub mod shared;
pub mod validate;

use std::path::Path;
use std::sync::Arc;

use crate::proxy::body::Incoming;
use bytes::Bytes;
use http::{HeaderValue, Request, Response};

use crate::config::Problem;
use crate::config::file;
use crate::error::ProxyError;
use crate::proxy::Conn;
use crate::proxy::body::Body;

/// One route's compiled phase-4 policy.
#[derive(Debug, Default)]
pub struct RoutePolicy {
    pub access: Option<access::Access>,
    pub cors: Option<Arc<cors::Cors>>,
    pub rate_limit: Option<ratelimit::RateLimit>,
    pub validate: Option<validate::Validate>,
    /// 4c: `[routes.auth]`.
    pub auth: Option<Box<crate::auth::RouteAuth>>,
}

/// Per-request state shared by the phase-4 steps and phase 7.
#[derive(Debug, Default)]
pub struct PolicyCtx {
    /// 4b answered a CORS preflight (its headers are final).
    pub preflight: bool,
    /// A request body a step had to read whole (validation); sent upstream
    /// instead of the client's stream.
    pub buffered_body: Option<Bytes>,
    /// The request's `Origin` when CORS allows it (echoed in phase 7).
    pub cors_origin: Option<HeaderValue>,
    /// The rate-limit decision to report in `RateLimit-*` headers.
    pub rate: Option<ratelimit::Decision>,
    /// A concurrency slot, given back when this context is dropped.
    pub permit: Option<ratelimit::concurrency::Permit>,
    /// The consumer's own concurrency slot.
    pub consumer_permit: Option<ratelimit::concurrency::Permit>,
    /// The authenticated caller (4c): method, consumer, claims; for later
    /// steps, logs and metering.
    pub identity: Option<crate::auth::Identity>,
}

impl RoutePolicy {
    /// True when the route has no phase-4 step at all.
    pub fn is_empty(&self) -> bool {
        self.access.is_none()
            && self.auth.is_none()
            && self.cors.is_none()
            && self.rate_limit.is_none()
            && self.validate.is_none()
    }
}

/// Process-wide policy settings routes refer to.
#[derive(Debug, Default)]
pub struct Globals {
    /// `[cors]`: for routes without their own `[routes.cors]`.
    pub cors: Option<Arc<cors::Cors>>,
    /// `[redis]`: for limits with `backend = "redis"`.
    pub redis: Option<Arc<ratelimit::redis::Redis>>,
}

impl Globals {
    pub fn compile(f: &file::File, problems: &mut Vec<Problem>) -> Globals {
        Globals {
            cors: f
                .cors
                .as_ref()
                .map(|c| Arc::new(cors::Cors::compile(c, problems))),
            redis: f
                .redis
                .as_ref()
                .and_then(|r| ratelimit::redis::Redis::compile(r, problems)),
        }
    }
}

/// Compiles a route's phase-4 sections.
pub fn compile_route(
    r: &file::Route,
    globals: &Globals,
    base: &Path,
    problems: &mut Vec<Problem>,
) -> RoutePolicy {
    let name = r.name.get_ref().as_str();
    RoutePolicy {
        access: r
            .access
            .as_ref()
            .map(|a| access::Access::compile(a, problems)),
        cors: match &r.cors {
            Some(c) => Some(Arc::new(cors::Cors::compile(c, problems))),
            None => globals.cors.clone(),
        },
        rate_limit: r.rate_limit.as_ref().and_then(|s| {
            let rl = ratelimit::RateLimit::compile(
                &format!("route:{name}"),
                s.get_ref(),
                globals.redis.as_ref(),
                s.span(),
                problems,
            )?;
            key_needs_auth(
                rl.source(),
                s.get_ref(),
                r.auth.as_ref().map(|a| a.get_ref()),
                problems,
            );
            Some(rl)
        }),
        validate: r
            .validate
            .as_ref()
            .map(|v| validate::Validate::compile(name, v, base, problems)),
        auth: None,
    }
}

/// A rate-limit key that step 4c decides: `api_key` needs the route to
/// accept API keys, and a header that 4c strips before 4d is never seen.
fn key_needs_auth(
    source: &ratelimit::KeySource,
    s: &ratelimit::RateLimitSection,
    auth: Option<&crate::auth::config::RouteAuth>,
    problems: &mut Vec<Problem>,
) {
    let Some(k) = &s.key else { return };
    let api_key = auth.and_then(|a| a.api_key.as_ref());
    match source {
        ratelimit::KeySource::ApiKey if api_key.is_none() => problems.push(Problem::at(
            k.span(),
            "rate-limit key \"api_key\" needs [routes.auth.api_key] on this route",
        )),
        ratelimit::KeySource::Header(h)
            if auth.is_some_and(|a| a.strip_credentials)
                && api_key.is_some_and(|a| a.header.get_ref().eq_ignore_ascii_case(h.as_str())) =>
        {
            problems.push(Problem::at(
                k.span(),
                format!(
                    "header {h:?} carries this route's API key and is stripped before rate limiting; \
                     use key = \"api_key\" (counted by the key's hash)"
                ),
            ));
        }
        ratelimit::KeySource::Header(h)
            if h == http::header::AUTHORIZATION && auth.is_some_and(|a| a.strip_credentials) =>
        {
            problems.push(Problem::at(
                k.span(),
                "the Authorization header is stripped before rate limiting; \
                 use key = \"consumer\" or \"api_key\"",
            ));
        }
        _ => {}
    }
}

/// Runs the phase-4 steps. `Ok(Some(resp))` answers the request directly
/// (e.g. a CORS preflight); `Err` rejects it.
pub async fn on_request(
    policy: &RoutePolicy,
    conn: &Conn,
    ctx: &mut PolicyCtx,
    req: &mut Request<Incoming>,
) -> Result<Option<Response<Body>>, ProxyError> {
    // The allowed origin first: every answer, a 4a refusal included,
    // carries the CORS headers a browser needs to show it.
    if let Some(c) = &policy.cors {
        ctx.cors_origin = c.allowed_origin(req);
    }
    // 4a.
    if let Some(a) = &policy.access {
        a.check(conn.peer.ip())?;
    }
    // 4b.
    if let Some(c) = &policy.cors
        && let Some(resp) = c.preflight(req)
    {
        ctx.preflight = true;
        return Ok(Some(resp));
    }
    // 4c: authentication and authorization.
    if let Some(auth) = &policy.auth {
        let identity = auth.check(conn, req).await?;
        ctx.identity = Some(identity);
    }
    // 4d: the route's limits, then the consumer's own.
    if let Some(rl) = &policy.rate_limit {
        let key = rl.key(conn.peer.ip(), req.headers(), ctx.identity.as_ref());
        let (decision, permit) = rl.check(key).await?;
        if rl.headers {
            ctx.rate = Some(decision);
        }
        ctx.permit = permit;
    }
    if let Some(c) = ctx.identity.as_ref().and_then(|i| i.consumer.as_deref())
        && let Some(rl) = &c.rate_limit
    {
        let (decision, permit) = rl
            .check(ratelimit::Key::Named(c.name.as_bytes()))
            .await
            // The refusal carries the consumer limit's headers; the route's
            // decision must not overwrite them in phase 7.
            .inspect_err(|_| ctx.rate = None)?;
        if rl.headers {
            ctx.rate = Some(ctx.rate.map_or(decision, |d| d.tighter(decision)));
        }
        ctx.consumer_permit = permit;
    }
    // 4e.
    if let Some(v) = &policy.validate
        && let Some(body) = v.check(req).await?
    {
        ctx.buffered_body = Some(body);
    }
    Ok(None)
}

/// Phase-7 hook, for every response of a routed request (errors included):
/// checks the response (validation), adds the response headers the steps
/// owe and releases what they hold. `head`: the request was a HEAD (its
/// answer has no body to validate).
pub async fn on_response(
    policy: &RoutePolicy,
    ctx: &mut PolicyCtx,
    head: bool,
    resp: &mut Response<Body>,
    request_id: &HeaderValue,
) {
    if let Some(v) = &policy.validate
        && v.checks_responses()
        && !head
        && let Err(e) = v.check_response(resp).await
    {
        *resp = crate::respond::error_response(&e, request_id.to_str().unwrap_or(""));
    }
    ctx.permit = None;
    ctx.consumer_permit = None;
    if let Some(c) = &policy.cors
        && !ctx.preflight
    {
        c.respond(ctx.cors_origin.take(), resp.headers_mut());
    }
    if let Some(d) = &ctx.rate {
        ratelimit::add_headers(d, resp.headers_mut());
    }
}
