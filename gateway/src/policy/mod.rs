//! Phase 4 of the pipeline (see `proxy/mod.rs`): what decides whether a
//! routed request may go on, in this order:
//!
//! - 4a. route-level IP allow/deny
//! - 4b. CORS (preflights answered here)
//! - 4c. authentication and authorization
//! - 4d. rate limits, quotas and per-consumer concurrency
//! - 4e. request validation
//!
//! Each step is a module that owns its config section and compiles it into a
//! field of `RoutePolicy`; a route without the field skips the step at no
//! cost. `on_response` runs in phase 7 for the steps that add response
//! headers (CORS, rate-limit headers) or hold resources until the response
//! (concurrency permits).

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;

use crate::error::ProxyError;
use crate::proxy::Conn;
use crate::proxy::body::Body;

/// One route's compiled phase-4 policy.
#[derive(Debug, Default)]
pub struct RoutePolicy {
    /// 4c: `[routes.auth]`.
    pub auth: Option<Box<crate::auth::RouteAuth>>,
}

/// Per-request state shared by the phase-4 steps and phase 7.
#[derive(Debug, Default)]
pub struct PolicyCtx {
    /// The authenticated consumer, for later steps, logs and metering.
    pub consumer: Option<std::sync::Arc<str>>,
    /// A request body a step had to read whole (validation); sent upstream
    /// instead of the client's stream.
    pub buffered_body: Option<Bytes>,
    /// The authenticated caller (4c): method, consumer, claims.
    pub identity: Option<crate::auth::Identity>,
}

impl RoutePolicy {
    /// True when the route has no phase-4 step at all.
    pub fn is_empty(&self) -> bool {
        self.auth.is_none()
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
    // 4c: authentication and authorization.
    if let Some(auth) = &policy.auth {
        let identity = auth.check(conn, req).await?;
        ctx.consumer = Some(identity.name.clone());
        ctx.identity = Some(identity);
    }
    Ok(None)
}

/// Phase-7 hook: adds the response headers the steps owe and releases what
/// they hold.
pub fn on_response(_policy: &RoutePolicy, _ctx: &mut PolicyCtx, _resp: &mut Response<Body>) {}
