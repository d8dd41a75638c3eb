//! OAuth 2.0 token introspection (RFC 7662) for opaque tokens, with the
//! answers cached by a SHA-256 of the token: active answers for `cache_ttl`
//! (never past the token's `exp`), inactive ones for `negative_cache_ttl`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use http::{Request, Uri};
use http_body_util::Full;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::jwt::{Claims, numeric_date};
use super::oidc::Provider;

/// Introspection settings and cache of one provider.
pub struct Introspector {
    /// Configured; else from discovery.
    pub endpoint: Option<Uri>,
    /// `Basic` credentials of the gateway at the provider.
    pub authorization: HeaderValue,
    pub cache_ttl: Duration,
    pub negative_cache_ttl: Duration,
    cache: quick_cache::sync::Cache<[u8; 32], (Instant, Option<Arc<Claims>>)>,
}

impl std::fmt::Debug for Introspector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Introspector")
            .field("endpoint", &self.endpoint)
            .field("cached", &self.cache.len())
            .finish_non_exhaustive()
    }
}

/// Why a token was refused.
#[derive(Debug)]
pub enum Refused {
    /// The provider says the token is not active, or its claims do not fit.
    Inactive(&'static str),
    /// The provider could not be asked.
    Unavailable(String),
}

impl Introspector {
    pub fn new(
        endpoint: Option<Uri>,
        client_id: &str,
        client_secret: &str,
        cache_ttl: Duration,
        negative_cache_ttl: Duration,
        cache_size: usize,
    ) -> Result<Introspector, String> {
        // RFC 6749 §2.3.1: form-encode, then Basic.
        let creds = format!("{}:{}", form_encode(client_id), form_encode(client_secret));
        let b64 = base64::engine::general_purpose::STANDARD.encode(creds);
        let authorization = HeaderValue::from_str(&format!("Basic {b64}"))
            .map_err(|_| "invalid introspection client credentials".to_string())?;
        Ok(Introspector {
            endpoint,
            authorization,
            cache_ttl,
            negative_cache_ttl,
            cache: quick_cache::sync::Cache::new(cache_size.max(1)),
        })
    }
}

/// Asks `provider` (through its cache) whether `token` is active.
pub async fn introspect(
    provider: &Provider,
    intro: &Introspector,
    audiences: &[String],
    token: &str,
) -> Result<Arc<Claims>, Refused> {
    let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    if let Some((until, answer)) = intro.cache.get(&key)
        && Instant::now() < until
    {
        return answer.ok_or(Refused::Inactive("token is not active"));
    }
    let Some(endpoint) = provider
        .introspection_endpoint(intro.endpoint.as_ref())
        .await
    else {
        return Err(Refused::Unavailable(format!(
            "identity provider {:?} has no introspection endpoint",
            provider.name
        )));
    };
    let body = format!("token={}&token_type_hint=access_token", form_encode(token));
    let req = Request::post(endpoint)
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(http::header::ACCEPT, "application/json")
        .header(AUTHORIZATION, intro.authorization.clone())
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| Refused::Unavailable(e.to_string()))?;
    let resp = provider
        .client
        .call(req, provider.timeout)
        .await
        .map_err(Refused::Unavailable)?;
    if resp.status() != http::StatusCode::OK {
        return Err(Refused::Unavailable(format!(
            "introspection answered {}",
            resp.status()
        )));
    }
    let claims: Claims = serde_json::from_slice(resp.body())
        .map_err(|e| Refused::Unavailable(format!("invalid introspection answer: {e}")))?;
    let now = jsonwebtoken::get_current_timestamp();
    match check(provider, audiences, &claims, now) {
        Ok(()) => {
            let mut ttl = intro.cache_ttl;
            if let Some(exp) = claims.get("exp").and_then(numeric_date) {
                ttl = ttl.min(Duration::from_secs(exp.saturating_sub(now)));
            }
            let claims = Arc::new(claims);
            intro.cache.insert(key, (until(ttl), Some(claims.clone())));
            Ok(claims)
        }
        Err(why) => {
            intro
                .cache
                .insert(key, (until(intro.negative_cache_ttl), None));
            Err(Refused::Inactive(why))
        }
    }
}

/// `ttl` from now; TTLs are capped at a day (so no config makes the
/// addition overflow).
fn until(ttl: Duration) -> Instant {
    Instant::now() + ttl.min(Duration::from_secs(86_400))
}

/// The claim's NumericDate: `Ok(None)` when absent, `Err` when present but
/// not a number.
fn date_claim(claims: &Claims, name: &str) -> Result<Option<u64>, ()> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => numeric_date(v).map(Some).ok_or(()),
    }
}

/// Checks an introspection answer: active, in time, our issuer and audience.
fn check(
    provider: &Provider,
    audiences: &[String],
    claims: &Claims,
    now: u64,
) -> Result<(), &'static str> {
    if claims.get("active") != Some(&Value::Bool(true)) {
        return Err("token is not active");
    }
    let leeway = provider.leeway.as_secs();
    let exp = date_claim(claims, "exp").map_err(|()| "exp is not a number")?;
    if exp.is_some_and(|exp| exp.saturating_add(leeway) < now) {
        return Err("token expired");
    }
    let nbf = date_claim(claims, "nbf").map_err(|()| "nbf is not a number")?;
    if nbf.is_some_and(|nbf| nbf > now.saturating_add(leeway)) {
        return Err("token not valid yet");
    }
    if let Some(iss) = claims.get("iss")
        && iss.as_str() != Some(&*provider.issuer)
    {
        return Err("wrong issuer");
    }
    if !audiences.is_empty() {
        let ok = match claims.get("aud") {
            Some(Value::String(a)) => audiences.iter().any(|x| x == a),
            Some(Value::Array(list)) => list
                .iter()
                .filter_map(Value::as_str)
                .any(|a| audiences.iter().any(|x| x == a)),
            _ => false,
        };
        if !ok {
            return Err("wrong audience");
        }
    }
    Ok(())
}

/// `application/x-www-form-urlencoded` encoding of one value.
fn form_encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_answers() {
        let text = r#"
[[identity_providers]]
name = "p"
issuer = "http://idp.test"
audiences = ["api"]
leeway = "10s"
[identity_providers.introspection]
client_id = "gw"
client_secret = "s"
"#;
        let config =
            crate::config::Config::from_text(std::path::Path::new("t.toml"), text.to_string())
                .unwrap();
        let p = &config.auth.providers[0];
        let aud = vec!["api".to_string()];
        let now = 1_000_000;
        let ok = |v: serde_json::Value| {
            let claims: Claims = serde_json::from_value(v).unwrap();
            check(p, &aud, &claims, now)
        };
        use serde_json::json;
        assert_eq!(ok(json!({"active": true})), Err("wrong audience"));
        assert_eq!(ok(json!({"active": true, "aud": ["x", "api"]})), Ok(()));
        assert_eq!(
            ok(json!({"active": false, "aud": "api"})),
            Err("token is not active")
        );
        assert_eq!(
            ok(json!({"active": "true", "aud": "api"})),
            Err("token is not active")
        );
        assert_eq!(
            ok(json!({"active": true, "aud": "api", "exp": now - 5})),
            Ok(())
        );
        assert_eq!(
            ok(json!({"active": true, "aud": "api", "exp": now - 11})),
            Err("token expired")
        );
        assert_eq!(
            ok(json!({"active": true, "aud": "api", "nbf": now + 11})),
            Err("token not valid yet")
        );
        // Fractional NumericDates count (rounded down); other types refuse.
        assert_eq!(
            ok(json!({"active": true, "aud": "api", "exp": now as f64 - 9.5})),
            Ok(())
        );
        assert_eq!(
            ok(json!({"active": true, "aud": "api", "exp": now as f64 - 10.5})),
            Err("token expired")
        );
        assert_eq!(
            ok(json!({"active": true, "aud": "api", "nbf": now as f64 + 10.5})),
            Ok(())
        );
        assert_eq!(
            ok(json!({"active": true, "aud": "api", "exp": "tomorrow"})),
            Err("exp is not a number")
        );
        assert_eq!(
            ok(json!({"active": true, "aud": "api", "nbf": [1]})),
            Err("nbf is not a number")
        );
        assert_eq!(
            ok(json!({"active": true, "aud": "api", "exp": -5})),
            Err("token expired")
        );
        assert_eq!(
            ok(json!({"active": true, "aud": "api", "iss": "http://evil.test"})),
            Err("wrong issuer")
        );
        assert_eq!(
            check(
                p,
                &[],
                &serde_json::from_value(json!({"active": true})).unwrap(),
                now
            ),
            Ok(())
        );
    }

    #[test]
    fn form_encoding() {
        assert_eq!(form_encode("a b+c/=é"), "a+b%2Bc%2F%3D%C3%A9");
        assert_eq!(form_encode("AZaz09-._*"), "AZaz09-._*");
    }
}
