//! Step 4c of the pipeline (see `policy`): authentication and authorization.
//!
//! A route with `[routes.auth]` accepts any one of the credential kinds it
//! lists — API key (`apikey`), HTTP Basic (`basic`), JWT bearer tokens
//! verified on an identity provider's keys (`jwt`, `oidc`), opaque bearer
//! tokens checked by introspection (`introspect`), or the verdict of an
//! external service (`forward`) — and denies everything else (401 with
//! `WWW-Authenticate`). The caller it finds (an `Identity`: consumer name,
//! the consumer's groups and scopes, the token's claims) must then pass the
//! route's rules: methods, groups, consumers, scopes (any-of, all-of) and
//! claims (403 otherwise). On success the identity goes upstream in headers
//! (set by the gateway only: values the client sent under those names are
//! removed), into `PolicyCtx` for the later steps and the access log, and
//! the credentials are removed from the request unless configured otherwise.
//!
//! Consumers (`consumers`) come from the config file and a watched consumers
//! file. Everything is compiled at config load; nothing is parsed per
//! request but the credentials themselves.

pub mod basic;
mod client;
mod compile;
pub mod config;
pub mod consumers;
mod crypto;
pub mod forward;
pub mod introspect;
pub mod jwt;
pub mod oidc;

pub use compile::{compile, compile_route};

use std::sync::Arc;

use crate::proxy::body::Incoming;
use http::header::{AUTHORIZATION, HeaderName, HeaderValue, WWW_AUTHENTICATE};
use http::{Method, Request, Uri};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{ErrorKind, ProxyError};
use crate::proxy::Conn;
use consumers::{Consumer, ConsumerStore};
use jwt::Claims;
use oidc::Provider;

/// How a caller authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    ApiKey,
    Basic,
    Jwt,
    Introspection,
    Forward,
    ClientCert,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::ApiKey => "api_key",
            AuthMethod::Basic => "basic",
            AuthMethod::Jwt => "jwt",
            AuthMethod::Introspection => "introspection",
            AuthMethod::Forward => "forward",
            AuthMethod::ClientCert => "client_cert",
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The consumer name (for tokens: the provider's `consumer_claim`).
    pub name: Arc<str>,
    pub method: AuthMethod,
    /// The configured consumer of that name, if any: its groups and scopes.
    pub consumer: Option<Arc<Consumer>>,
    /// The token's claims (JWT, introspection).
    pub claims: Option<Arc<Claims>>,
    /// The SHA-256 of the API key presented, for `key = "api_key"` limits.
    pub api_key: Option<[u8; 32]>,
}

impl Identity {
    /// Whether the caller holds `scope`: for a token, the token carries it
    /// (`scope` as a space-separated string, or `scp` as a list) — a token's
    /// scopes are what was delegated, never widened by the consumer's; for
    /// an API key or Basic credentials, the consumer was granted it.
    pub fn has_scope(&self, scope: &str) -> bool {
        match &self.claims {
            Some(_) => self.claim_holds("scope", scope) || self.claim_holds("scp", scope),
            None => self
                .consumer
                .as_ref()
                .is_some_and(|c| c.scopes.iter().any(|s| &**s == scope)),
        }
    }

    pub fn in_group(&self, group: &str) -> bool {
        self.consumer
            .as_ref()
            .is_some_and(|c| c.groups.iter().any(|g| &**g == group))
    }

    /// Whether claim `name` is `value`, or a list or space-separated string
    /// containing it.
    pub fn claim_holds(&self, name: &str, value: &str) -> bool {
        match self.claims.as_ref().and_then(|c| c.get(name)) {
            Some(Value::String(s)) => s == value || s.split(' ').any(|p| p == value),
            Some(Value::Array(list)) => list.iter().any(|v| v.as_str() == Some(value)),
            Some(Value::Bool(b)) => value == if *b { "true" } else { "false" },
            Some(Value::Number(n)) => n.to_string() == value,
            _ => false,
        }
    }

    /// A claim as a header value: strings, numbers and booleans as they
    /// are, lists of strings joined with commas.
    fn claim_value(&self, name: &str) -> Option<HeaderValue> {
        let v = self.claims.as_ref()?.get(name)?;
        match v {
            Value::String(s) => HeaderValue::from_str(s).ok(),
            Value::Number(_) | Value::Bool(_) => HeaderValue::from_str(&v.to_string()).ok(),
            Value::Array(list) => {
                let items: Vec<&str> = list.iter().filter_map(Value::as_str).collect();
                HeaderValue::from_str(&items.join(",")).ok()
            }
            _ => None,
        }
    }
}

/// Authentication state shared by a configuration's routes.
#[derive(Debug)]
pub struct AuthConfig {
    pub consumers: Arc<ConsumerStore>,
    pub providers: Vec<Arc<Provider>>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            consumers: Arc::new(ConsumerStore::empty()),
            providers: Vec::new(),
        }
    }
}

/// Starts what a configuration's auth needs while it is in force (the
/// consumers file watcher). Called once per generation.
pub fn activate(auth: &AuthConfig) {
    auth.consumers.watch();
}

/// Where an API key is looked for.
#[derive(Debug)]
struct ApiKeyIn {
    header: HeaderName,
    query: Option<Box<str>>,
}

/// A `[[routes.auth.claims]]` rule.
#[derive(Debug)]
struct ClaimRule {
    name: Box<str>,
    any_of: Vec<Box<str>>,
    all_of: Vec<Box<str>>,
}

/// One route's compiled `[routes.auth]`.
#[derive(Debug)]
pub struct RouteAuth {
    consumers: Arc<ConsumerStore>,
    api_key: Option<ApiKeyIn>,
    basic: bool,
    /// The connection's verified client certificate names the consumer.
    client_cert: bool,
    jwt: Option<(Arc<Provider>, oidc::Validations)>,
    introspection: Option<(Arc<Provider>, Vec<String>)>,
    forward: Option<forward::ForwardAuth>,
    realm: Box<str>,
    /// `WWW-Authenticate` challenges for a request without credentials.
    challenges: Vec<HeaderValue>,
    methods: Vec<Method>,
    groups: Vec<Box<str>>,
    allowed_consumers: Vec<Box<str>>,
    scopes_any: Vec<Box<str>>,
    scopes_all: Vec<Box<str>>,
    claims: Vec<ClaimRule>,
    consumer_header: Option<HeaderName>,
    claim_headers: Vec<(HeaderName, Box<str>)>,
    /// Removed before identity headers are set (see `compile::scrub_list`).
    scrub: Vec<HeaderName>,
    strip_credentials: bool,
}

/// What authentication found, before authorization.
struct Found {
    identity: Identity,
    /// Headers a forward-auth service asked to pass on.
    extra: Vec<(HeaderName, HeaderValue)>,
}

impl RouteAuth {
    /// Authenticates and authorizes `req`; on success rewrites its headers
    /// (identity in, credentials out) and returns the identity.
    pub async fn check(
        &self,
        conn: &Conn,
        req: &mut Request<Incoming>,
    ) -> Result<Identity, ProxyError> {
        let found = self.authenticate(conn, req).await;
        let label = match &found {
            Ok(f) => f.identity.method.as_str(),
            Err(_) => "none",
        };
        use crate::observe::metrics::increment_static;
        let found = found.inspect_err(|_| {
            increment_static("gateway_auth_failures_total", "reason", "unauthenticated");
        })?;
        self.authorize(&found.identity, req.method())
            .inspect_err(|_| {
                increment_static("gateway_auth_failures_total", "reason", "forbidden");
            })?;
        increment_static("gateway_auth_success_total", "method", label);
        self.rewrite(&found, req);
        Ok(found.identity)
    }

    async fn authenticate(
        &self,
        conn: &Conn,
        req: &Request<Incoming>,
    ) -> Result<Found, ProxyError> {
        let found = |identity| Found {
            identity,
            extra: Vec::new(),
        };
        if let Some(v) = req.headers().get(AUTHORIZATION) {
            let v = v.as_bytes();
            if self.basic
                && let Some(creds) = strip_scheme(v, b"basic")
            {
                return self.basic(creds).await.map(found);
            }
            if (self.jwt.is_some() || self.introspection.is_some())
                && let Some(token) = strip_scheme(v, b"bearer")
            {
                return self.bearer(token).await.map(found);
            }
        }
        if let Some(k) = &self.api_key {
            if let Some(v) = req.headers().get(&k.header) {
                return self.api_key(v.as_bytes()).map(found);
            }
            if let Some(name) = &k.query
                && let Some(v) = query_param(req.uri(), name)
            {
                return self.api_key(&v).map(found);
            }
        }
        // A certificate is the connection's: a credential the request
        // carries (above) is the more specific.
        if self.client_cert
            && let Some(cert) = &conn.client_cert
        {
            return match self.consumers.load().by_cert_names(&cert.names) {
                Some(c) => Ok(found(Identity {
                    name: c.name.clone(),
                    method: AuthMethod::ClientCert,
                    consumer: Some(c.clone()),
                    claims: None,
                    api_key: None,
                })),
                None => Err(self.unauthorized(
                    format!(
                        "the client certificate ({}) names no consumer",
                        if cert.subject.is_empty() {
                            "no subject"
                        } else {
                            &cert.subject
                        }
                    ),
                    None,
                )),
            };
        }
        if let Some(f) = &self.forward {
            let admitted = f.check(conn, req).await?;
            return Ok(Found {
                identity: Identity {
                    name: admitted
                        .consumer
                        .unwrap_or_else(|| Arc::from("forward-auth")),
                    method: AuthMethod::Forward,
                    consumer: None,
                    claims: None,
                    api_key: None,
                },
                extra: admitted.headers,
            });
        }
        Err(self.unauthorized("this route needs credentials", None))
    }

    fn api_key(&self, key: &[u8]) -> Result<Identity, ProxyError> {
        let digest: [u8; 32] = Sha256::digest(key).into();
        let set = self.consumers.load();
        match set.by_api_key(&digest) {
            Some(c) => Ok(Identity {
                name: c.name.clone(),
                method: AuthMethod::ApiKey,
                consumer: Some(c.clone()),
                claims: None,
                api_key: Some(digest),
            }),
            None => Err(self.unauthorized("invalid API key", None)),
        }
    }

    async fn basic(&self, creds: &[u8]) -> Result<Identity, ProxyError> {
        let Some((user, password)) = basic::decode(creds) else {
            return Err(self.unauthorized("malformed Basic credentials", None));
        };
        let set = self.consumers.load_full();
        match basic::verify(&set, &user, password).await {
            Some(c) => Ok(Identity {
                name: c.name.clone(),
                method: AuthMethod::Basic,
                consumer: Some(c),
                claims: None,
                api_key: None,
            }),
            None => Err(self.unauthorized("invalid user name or password", None)),
        }
    }

    async fn bearer(&self, token: &[u8]) -> Result<Identity, ProxyError> {
        let Ok(token) = std::str::from_utf8(token) else {
            return Err(self.unauthorized("malformed bearer token", Some("malformed token")));
        };
        let token = token.trim();
        let looks_like_jwt = token.bytes().filter(|&b| b == b'.').count() == 2;
        let (provider, claims, method) = match (&self.jwt, &self.introspection) {
            (Some((p, validation)), intro) if looks_like_jwt || intro.is_none() => {
                let claims = p.verify(token, validation).await.map_err(|e| match e {
                    jwt::JwtError::KeysUnavailable => ProxyError::new(
                        ErrorKind::UpstreamConnect,
                        "cannot load the identity provider's keys to check the token",
                    ),
                    e => self
                        .unauthorized(format!("invalid bearer token: {e}"), Some(&e.to_string())),
                })?;
                (p, claims, AuthMethod::Jwt)
            }
            (_, Some((p, audiences))) => {
                let Some(intro) = &p.introspection else {
                    return Err(ProxyError::new(
                        ErrorKind::Internal,
                        "introspection is not configured",
                    ));
                };
                let claims = introspect::introspect(p, intro, audiences, token)
                    .await
                    .map_err(|e| match e {
                        introspect::Refused::Inactive(why) => {
                            self.unauthorized(format!("invalid bearer token: {why}"), Some(why))
                        }
                        introspect::Refused::Unavailable(msg) => ProxyError::new(
                            ErrorKind::UpstreamConnect,
                            "cannot reach the identity provider to check the token",
                        )
                        .with_source(msg),
                    })?;
                (p, claims, AuthMethod::Introspection)
            }
            _ => return Err(self.unauthorized("this route needs credentials", None)),
        };
        for c in &provider.required_claims {
            if !claims.contains_key(c) {
                return Err(self.unauthorized(
                    format!("invalid bearer token: it lacks the {c:?} claim"),
                    Some("required claim missing"),
                ));
            }
        }
        // `client_id` names the caller only when the configured claim is
        // absent: a present one that is not a name refuses the token rather
        // than letting another claim decide who the caller is.
        let name = match claims.get(provider.consumer_claim.as_str()) {
            None | Some(Value::Null) => claims.get("client_id"),
            named => named,
        }
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .map(Arc::<str>::from);
        let Some(name) = name else {
            return Err(self.unauthorized(
                format!(
                    "invalid bearer token: no {:?} claim names the caller",
                    provider.consumer_claim
                ),
                Some("no subject"),
            ));
        };
        let consumer = self.consumers.load().by_name(&name).cloned();
        Ok(Identity {
            name,
            method,
            consumer,
            claims: Some(claims),
            api_key: None,
        })
    }

    /// 401 with the route's challenges; a bad bearer token gets an
    /// RFC 6750 `invalid_token` challenge instead of the plain one.
    fn unauthorized(
        &self,
        detail: impl Into<std::borrow::Cow<'static, str>>,
        invalid_token: Option<&str>,
    ) -> ProxyError {
        let mut e = ProxyError::new(ErrorKind::Unauthorized, detail);
        match invalid_token {
            Some(why) => {
                let why: String = why.chars().filter(|c| *c != '"' && *c != '\\').collect();
                let v = format!(
                    "Bearer realm=\"{}\", error=\"invalid_token\", error_description=\"{why}\"",
                    self.realm
                );
                if let Ok(v) = HeaderValue::from_str(&v) {
                    e = e.with_header(WWW_AUTHENTICATE, v);
                }
            }
            None => {
                for c in &self.challenges {
                    e = e.with_header(WWW_AUTHENTICATE, c.clone());
                }
            }
        }
        e
    }

    fn authorize(&self, id: &Identity, method: &Method) -> Result<(), ProxyError> {
        let deny = |why: String| ProxyError::new(ErrorKind::Forbidden, why);
        if !self.methods.is_empty() && !self.methods.contains(method) {
            return Err(deny(format!("{} may not use {method} here", id.name)));
        }
        if !self.allowed_consumers.is_empty()
            && !self.allowed_consumers.iter().any(|c| **c == *id.name)
        {
            return Err(deny(format!("{} may not use this route", id.name)));
        }
        if !self.groups.is_empty() && !self.groups.iter().any(|g| id.in_group(g)) {
            return Err(deny(format!(
                "{} is in none of the groups this route allows",
                id.name
            )));
        }
        let missing = self.scopes_all.iter().find(|s| !id.has_scope(s));
        let none_of_any =
            !self.scopes_any.is_empty() && !self.scopes_any.iter().any(|s| id.has_scope(s));
        if missing.is_some() || none_of_any {
            let wanted: Vec<&str> = match missing {
                Some(s) => vec![&**s],
                None => self.scopes_any.iter().map(|s| &**s).collect(),
            };
            let mut e = deny(format!(
                "{} lacks the scope this route needs ({})",
                id.name,
                wanted.join(" or ")
            ));
            if matches!(id.method, AuthMethod::Jwt | AuthMethod::Introspection)
                && let Ok(v) = HeaderValue::from_str(&format!(
                    "Bearer realm=\"{}\", error=\"insufficient_scope\", scope=\"{}\"",
                    self.realm,
                    wanted.join(" ")
                ))
            {
                e = e.with_header(WWW_AUTHENTICATE, v);
            }
            return Err(e);
        }
        for rule in &self.claims {
            let ok = rule.all_of.iter().all(|v| id.claim_holds(&rule.name, v))
                && (rule.any_of.is_empty()
                    || rule.any_of.iter().any(|v| id.claim_holds(&rule.name, v)));
            if !ok {
                return Err(deny(format!(
                    "{}: claim {:?} does not allow this route",
                    id.name, rule.name
                )));
            }
        }
        Ok(())
    }

    /// Identity headers in (client-sent ones out first), credentials out.
    fn rewrite(&self, found: &Found, req: &mut Request<Incoming>) {
        let id = &found.identity;
        let h = req.headers_mut();
        for name in &self.scrub {
            h.remove(name);
        }
        // `insert` replaces every value the client sent; without a value of
        // ours, theirs are removed.
        if let Some(name) = &self.consumer_header {
            let value = match &id.consumer {
                Some(c) if c.name == id.name => Ok(c.name_header.clone()),
                _ => HeaderValue::from_str(&id.name),
            };
            match value {
                Ok(v) => {
                    h.insert(name.clone(), v);
                }
                Err(_) => {
                    h.remove(name);
                }
            }
        }
        for (name, claim) in &self.claim_headers {
            match id.claim_value(claim) {
                Some(v) => {
                    h.insert(name.clone(), v);
                }
                None => {
                    h.remove(name);
                }
            }
        }
        for (name, v) in &found.extra {
            h.append(name.clone(), v.clone());
        }
        if !self.strip_credentials {
            return;
        }
        // Every place this route reads a credential from is cleared, not
        // only the one that admitted the request: a second key in the query
        // string must not reach the upstream either.
        if self.basic
            || self.jwt.is_some()
            || self.introspection.is_some()
            || matches!(id.method, AuthMethod::Forward)
        {
            h.remove(AUTHORIZATION);
        }
        if let Some(k) = &self.api_key {
            h.remove(&k.header);
            if let Some(q) = &k.query
                && let Some(uri) = without_query_param(req.uri(), q)
            {
                *req.uri_mut() = uri;
            }
        }
    }
}

/// The credentials after `scheme ` in an `Authorization` value (scheme
/// matched without regard to case).
fn strip_scheme<'a>(v: &'a [u8], scheme: &[u8]) -> Option<&'a [u8]> {
    let (s, rest) = v.split_at_checked(scheme.len())?;
    if !s.eq_ignore_ascii_case(scheme) || rest.first() != Some(&b' ') {
        return None;
    }
    Some(rest.trim_ascii())
}

/// The first value of query parameter `name` (form-decoded).
fn query_param(uri: &Uri, name: &str) -> Option<Vec<u8>> {
    form_urlencoded::parse(uri.query()?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned().into_bytes())
}

/// `uri` without query parameter `name` (matched after decoding, as
/// `query_param` matches it).
fn without_query_param(uri: &Uri, name: &str) -> Option<Uri> {
    let q = uri.query()?;
    let mut all = 0;
    let kept: Vec<&str> = q
        .split('&')
        .inspect(|_| all += 1)
        .filter(|pair| {
            form_urlencoded::parse(pair.as_bytes())
                .next()
                .is_none_or(|(k, _)| k != name)
        })
        .collect();
    if kept.len() == all {
        return None;
    }
    let pq = if kept.is_empty() {
        uri.path().to_string()
    } else {
        format!("{}?{}", uri.path(), kept.join("&"))
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(pq.parse().ok()?);
    Uri::from_parts(parts).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes() {
        assert_eq!(strip_scheme(b"Bearer abc", b"bearer"), Some(&b"abc"[..]));
        assert_eq!(strip_scheme(b"bAsIc  x ", b"basic"), Some(&b"x"[..]));
        assert_eq!(strip_scheme(b"Bearerabc", b"bearer"), None);
        assert_eq!(strip_scheme(b"Bear", b"bearer"), None);
    }

    #[test]
    fn token_scopes_are_not_widened_by_the_consumer() {
        let consumer = Arc::new(Consumer {
            name: "svc".into(),
            name_header: HeaderValue::from_static("svc"),
            groups: vec!["services".into()].into(),
            scopes: vec!["admin".into()].into(),
            rate_limit: None,
        });
        let claims: Claims = serde_json::from_value(serde_json::json!({
            "scope": "read write", "scp": ["x"], "admin": true, "level": 3
        }))
        .unwrap();
        let token = Identity {
            name: "svc".into(),
            method: AuthMethod::Jwt,
            consumer: Some(consumer.clone()),
            claims: Some(Arc::new(claims)),
            api_key: None,
        };
        assert!(token.has_scope("read") && token.has_scope("write") && token.has_scope("x"));
        assert!(!token.has_scope("admin"));
        assert!(token.in_group("services"));
        assert!(token.claim_holds("admin", "true") && token.claim_holds("level", "3"));
        assert!(!token.claim_holds("scope", "rea"));
        let key = Identity {
            method: AuthMethod::ApiKey,
            claims: None,
            api_key: None,
            ..token
        };
        assert!(key.has_scope("admin") && !key.has_scope("read"));
    }

    #[test]
    fn query_params() {
        let u: Uri = "/p?a=1&api_key=k%2By+z&b=2".parse().unwrap();
        assert_eq!(query_param(&u, "api_key").unwrap(), b"k+y z");
        assert_eq!(
            without_query_param(&u, "api_key").unwrap().to_string(),
            "/p?a=1&b=2"
        );
        let u: Uri = "/p?api_key=k".parse().unwrap();
        assert_eq!(
            without_query_param(&u, "api_key").unwrap().to_string(),
            "/p"
        );
        // An encoded name is the same parameter: used, and stripped.
        let u: Uri = "/p?api%5Fkey=k&x=%zz".parse().unwrap();
        assert_eq!(query_param(&u, "api_key").unwrap(), b"k");
        assert_eq!(query_param(&u, "x").unwrap(), b"%zz");
        assert_eq!(
            without_query_param(&u, "api_key").unwrap().to_string(),
            "/p?x=%zz"
        );
    }
}
