//! Compilation of the auth sections into their runtime form: consumers,
//! identity providers (with their key caches and HTTP clients) and each
//! route's `RouteAuth`. Every problem is collected with its span.

use std::path::Path;
use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};
use toml::Spanned;

use super::consumers::ConsumerStore;
use super::oidc::{self, Provider};
use super::{
    ApiKeyIn, AuthConfig, ClaimRule, RouteAuth, client, config, crypto, forward, introspect, jwt,
};
use crate::config::Problem;

/// Compiles the top-level consumers, consumers file and identity providers.
pub fn compile(
    base: &Path,
    consumers: &[config::Consumer],
    consumers_file: Option<&Spanned<String>>,
    providers: &[config::IdentityProvider],
    redis: Option<&Arc<crate::policy::ratelimit::redis::Redis>>,
    problems: &mut Vec<Problem>,
) -> AuthConfig {
    crypto::install();
    let file = consumers_file.map(|f| (f, crate::config::compile_resolve(base, f.get_ref())));
    let consumers = match ConsumerStore::compile(consumers, file, redis) {
        Ok(s) => Arc::new(s),
        Err(ps) => {
            problems.extend(ps);
            Arc::new(ConsumerStore::empty())
        }
    };
    let mut compiled: Vec<Arc<Provider>> = Vec::new();
    for p in providers {
        if compiled.iter().any(|c| *c.name == **p.name.get_ref()) {
            problems.push(Problem::at(
                p.name.span(),
                format!("duplicate identity provider name {:?}", p.name.get_ref()),
            ));
            continue;
        }
        if let Some(p) = compile_provider(base, p, problems) {
            compiled.push(Arc::new(p));
        }
    }
    AuthConfig {
        consumers,
        providers: compiled,
    }
}

fn compile_provider(
    base: &Path,
    p: &config::IdentityProvider,
    problems: &mut Vec<Problem>,
) -> Option<Provider> {
    let before = problems.len();
    let issuer = p.issuer.get_ref().clone();
    let mut algorithms = Vec::new();
    for a in &p.algorithms {
        match jwt::parse_algorithm(a.get_ref()) {
            Some(alg) => algorithms.push(alg),
            None => problems.push(Problem::at(
                a.span(),
                format!(
                    "unsupported algorithm {:?}: use RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA or HS256",
                    a.get_ref()
                ),
            )),
        }
    }
    let mut hmac = jwt::KeySet::default();
    for s in &p.hs256_secrets {
        if s.get_ref().len() < 32 {
            problems.push(Problem::at(
                s.span(),
                "an HS256 secret must be at least 32 bytes",
            ));
        }
        hmac.add_hs256(s.get_ref().as_bytes());
    }
    let has_hs = algorithms.contains(&jsonwebtoken::Algorithm::HS256);
    if has_hs == p.hs256_secrets.is_empty() {
        problems.push(Problem::at(
            p.name.span(),
            "HS256 in `algorithms` and `hs256_secrets` go together: give both or neither",
        ));
    }
    let source = match &p.jwks_uri {
        Some(u) => match client::parse_url(u.get_ref()) {
            Ok(u) => Some(oidc::Source::Jwks(u)),
            Err(m) => {
                problems.push(Problem::at(u.span(), m));
                None
            }
        },
        None => {
            let url = format!(
                "{}/.well-known/openid-configuration",
                issuer.trim_end_matches('/')
            );
            match client::parse_url(&url) {
                Ok(u) => Some(oidc::Source::Discovery(u)),
                Err(m) => {
                    problems.push(Problem::at(
                        p.issuer.span(),
                        format!("issuer: {m} (or give `jwks_uri`)"),
                    ));
                    None
                }
            }
        }
    };
    let introspection = match &p.introspection {
        Some(i) => {
            let cfg = i.get_ref();
            let endpoint = match &cfg.endpoint {
                Some(e) => match client::parse_url(e.get_ref()) {
                    Ok(u) => Some(u),
                    Err(m) => {
                        problems.push(Problem::at(e.span(), m));
                        None
                    }
                },
                None => {
                    if p.jwks_uri.is_some() {
                        problems.push(Problem::at(
                            i.span(),
                            "without discovery (`jwks_uri` is given) introspection needs an `endpoint`",
                        ));
                    }
                    None
                }
            };
            match introspect::Introspector::new(
                endpoint,
                &cfg.client_id,
                &cfg.client_secret,
                cfg.cache_ttl.0,
                cfg.negative_cache_ttl.0,
                cfg.cache_size,
            ) {
                Ok(i) => Some(i),
                Err(m) => {
                    problems.push(Problem::at(i.span(), m));
                    None
                }
            }
        }
        None => None,
    };
    if p.timeout.0.is_zero() {
        problems.push(Problem::at(p.name.span(), "`timeout` must be positive"));
    }
    if p.min_refresh_interval.0 < std::time::Duration::from_secs(1) {
        problems.push(Problem::at(
            p.name.span(),
            "`min_refresh_interval` must be at least 1s (it bounds how often tokens with unknown keys make the gateway fetch the JWKS)",
        ));
    }
    if p.leeway.0 > std::time::Duration::from_secs(3600) {
        problems.push(Problem::at(p.name.span(), "`leeway` must be at most 1h"));
    }
    let ca_file = p
        .ca_file
        .as_ref()
        .map(|f| (f, crate::config::compile_resolve(base, f.get_ref())));
    let client = match &ca_file {
        Some((span, path)) => client::HttpClient::with_ca_file(path)
            .map_err(|m| problems.push(Problem::at(span.span(), m))),
        None => {
            client::HttpClient::system().map_err(|m| problems.push(Problem::at(p.name.span(), m)))
        }
    };
    let source = source?;
    let client = client.ok()?;
    if problems.len() != before {
        return None;
    }
    let keys = oidc::KeyCache::shared(
        oidc::Fetch {
            source,
            issuer: issuer.clone(),
            algorithms: algorithms
                .iter()
                .copied()
                .filter(|a| *a != jsonwebtoken::Algorithm::HS256)
                .collect(),
            timeout: p.timeout.0,
            ca_file: ca_file.map(|(_, path)| path),
        },
        &client,
    );
    Some(Provider {
        name: p.name.get_ref().as_str().into(),
        issuer: issuer.into(),
        algorithms,
        audiences: p.audiences.clone(),
        leeway: p.leeway.0,
        required_claims: p.required_claims.clone(),
        consumer_claim: p.consumer_claim.clone(),
        refresh_interval: p.refresh_interval.0,
        min_refresh_interval: p.min_refresh_interval.0,
        timeout: p.timeout.0,
        hmac,
        keys,
        client,
        introspection,
    })
}

/// Compiles a route's `[routes.auth]`.
pub fn compile_route(
    auth: Option<&Spanned<config::RouteAuth>>,
    global: &AuthConfig,
    problems: &mut Vec<Problem>,
) -> Option<Box<RouteAuth>> {
    let spanned = auth?;
    let a = spanned.get_ref();
    let span = spanned.span();
    let before = problems.len();
    let header_name = |s: &Spanned<String>, problems: &mut Vec<Problem>| {
        HeaderName::from_bytes(s.get_ref().as_bytes())
            .map_err(|_| {
                problems.push(Problem::at(
                    s.span(),
                    format!("invalid header name {:?}", s.get_ref()),
                ))
            })
            .ok()
    };
    let provider = |name: &Spanned<String>, problems: &mut Vec<Problem>| {
        let p = global
            .providers
            .iter()
            .find(|p| *p.name == **name.get_ref())
            .cloned();
        if p.is_none() {
            problems.push(Problem::at(
                name.span(),
                format!("unknown identity provider {:?}", name.get_ref()),
            ));
        }
        p
    };
    let api_key = a.api_key.as_ref().and_then(|k| {
        Some(ApiKeyIn {
            header: header_name(&k.header, problems)?,
            query: k.query.as_ref().map(|q| q.get_ref().as_str().into()),
        })
    });
    let jwt = a.jwt.as_ref().and_then(|j| {
        let p = provider(&j.provider, problems)?;
        let audiences = if j.audiences.is_empty() {
            p.audiences.clone()
        } else {
            j.audiences.clone()
        };
        if audiences.is_empty() {
            problems.push(Problem::at(
                j.provider.span(),
                "JWT needs the audiences to accept: set `audiences` on the identity provider or here",
            ));
            return None;
        }
        let v = p.validations(&audiences);
        Some((p, v))
    });
    let introspection = a.introspection.as_ref().and_then(|i| {
        let p = provider(&i.provider, problems)?;
        if p.introspection.is_none() {
            problems.push(Problem::at(
                i.provider.span(),
                format!(
                    "identity provider {:?} has no [identity_providers.introspection] section",
                    i.provider.get_ref()
                ),
            ));
            return None;
        }
        let audiences = p.audiences.clone();
        Some((p, audiences))
    });
    let forward = a.forward.as_ref().and_then(|f| {
        let uri = client::parse_url(f.url.get_ref())
            .map_err(|m| problems.push(Problem::at(f.url.span(), m)))
            .ok()?;
        let request_headers = f
            .request_headers
            .iter()
            .filter_map(|h| header_name(h, problems))
            .collect();
        let response_headers = f
            .response_headers
            .iter()
            .filter_map(|h| header_name(h, problems))
            .collect();
        let consumer_from = f
            .consumer_from
            .as_ref()
            .and_then(|h| header_name(h, problems));
        if f.timeout.0.is_zero() {
            problems.push(Problem::at(
                f.url.span(),
                "forward auth `timeout` must be positive",
            ));
        }
        let client = client::HttpClient::system()
            .map_err(|m| problems.push(Problem::at(f.url.span(), m)))
            .ok()?;
        Some(forward::ForwardAuth {
            uri,
            client,
            timeout: f.timeout.0,
            request_headers,
            response_headers,
            consumer_from,
        })
    });
    if a.api_key.is_none()
        && a.basic.is_none()
        && a.jwt.is_none()
        && a.introspection.is_none()
        && a.forward.is_none()
        && a.client_cert.is_none()
    {
        problems.push(Problem::at(
            span.clone(),
            "[routes.auth] accepts no credentials: add api_key, basic, jwt, introspection, client_cert or forward",
        ));
    }
    let realm = a.realm.get_ref();
    if realm.contains(['"', '\\']) || HeaderValue::from_str(realm).is_err() {
        problems.push(Problem::at(
            a.realm.span(),
            "realm must be printable and contain no quotes",
        ));
    }
    let mut challenges = Vec::new();
    if let Some(k) = &api_key {
        challenges.push(format!("ApiKey realm=\"{realm}\", header=\"{}\"", k.header));
    }
    if a.basic.is_some() {
        challenges.push(format!("Basic realm=\"{realm}\", charset=\"UTF-8\""));
    }
    if a.jwt.is_some() || a.introspection.is_some() {
        challenges.push(format!("Bearer realm=\"{realm}\""));
    }
    let challenges = challenges
        .into_iter()
        .filter_map(|c| HeaderValue::from_str(&c).ok())
        .collect();
    let methods = crate::config::methods(&a.methods, problems);
    let claims = a
        .claims
        .iter()
        .filter_map(|c| {
            let r = c.get_ref();
            if r.any_of.is_empty() && r.all_of.is_empty() {
                problems.push(Problem::at(
                    c.span(),
                    "a claim rule needs `any_of` or `all_of`",
                ));
                return None;
            }
            Some(ClaimRule {
                name: r.name.as_str().into(),
                any_of: r.any_of.iter().map(|s| s.as_str().into()).collect(),
                all_of: r.all_of.iter().map(|s| s.as_str().into()).collect(),
            })
        })
        .collect();
    let consumer_header = if a.consumer_header.get_ref().is_empty() {
        None
    } else {
        header_name(&a.consumer_header, problems)
    };
    let claim_headers: Vec<(HeaderName, Box<str>)> = a
        .claim_headers
        .iter()
        .filter_map(|(h, claim)| match HeaderName::from_bytes(h.as_bytes()) {
            Ok(n) => Some((n, claim.get_ref().as_str().into())),
            Err(_) => {
                problems.push(Problem::at(
                    claim.span(),
                    format!("invalid header name {h:?}"),
                ));
                None
            }
        })
        .collect();
    let boxed = |v: &[String]| {
        v.iter()
            .map(|s| s.as_str().into())
            .collect::<Vec<Box<str>>>()
    };
    if problems.len() != before {
        return None;
    }
    let scrub = scrub_list(
        consumer_header.iter(),
        claim_headers.iter().map(|(n, _)| n),
        forward.iter().flat_map(|f| f.response_headers.iter()),
    );
    Some(Box::new(RouteAuth {
        consumers: global.consumers.clone(),
        api_key,
        basic: a.basic.is_some(),
        client_cert: a.client_cert.is_some(),
        jwt,
        introspection,
        forward,
        realm: realm.as_str().into(),
        challenges,
        methods,
        groups: boxed(&a.groups),
        allowed_consumers: boxed(&a.consumers),
        scopes_any: boxed(&a.scopes_any),
        scopes_all: boxed(&a.scopes_all),
        claims,
        consumer_header,
        claim_headers,
        scrub,
        strip_credentials: a.strip_credentials,
    }))
}

/// Names removed from every authenticated request before the gateway sets
/// its own: the forward-auth service's response headers (only the service
/// may set them, whichever credential admitted the request), and the
/// underscore spelling of every identity header (`x_consumer` for
/// `x-consumer`), which some frameworks read as the same header.
fn scrub_list<'a>(
    consumer: impl Iterator<Item = &'a HeaderName>,
    claims: impl Iterator<Item = &'a HeaderName>,
    forward: impl Iterator<Item = &'a HeaderName>,
) -> Vec<HeaderName> {
    let forward: Vec<&HeaderName> = forward.collect();
    let mut out: Vec<HeaderName> = forward.iter().map(|n| (*n).clone()).collect();
    for n in consumer.chain(claims).chain(forward.iter().copied()) {
        if n.as_str().contains('-')
            && let Ok(shadow) = HeaderName::from_bytes(n.as_str().replace('-', "_").as_bytes())
        {
            out.push(shadow);
        }
    }
    out.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    out.dedup();
    out
}
