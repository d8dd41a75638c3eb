//! The authentication sections as written: top-level `[[consumers]]`,
//! `consumers_file` and `[[identity_providers]]`, and `[routes.auth]`.
//! `deny_unknown_fields` everywhere; `super::compile` checks them.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::config::units::Secs;

/// `[[consumers]]`, in the config file or in the consumers file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Consumer {
    /// Unique; forwarded upstream and logged.
    pub name: Spanned<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    /// Scopes granted to this consumer's API keys and Basic credentials.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// API keys, each stored as `sha256:<64 hex digits>` of the key.
    #[serde(default)]
    pub api_keys: Vec<Spanned<String>>,
    /// HTTP Basic user name; defaults to `name`.
    #[serde(default)]
    pub username: Option<Spanned<String>>,
    /// HTTP Basic password hash: bcrypt (`$2b$...`) or argon2 (`$argon2id$...`).
    #[serde(default)]
    pub password_hash: Option<Spanned<String>>,
    /// Names this consumer's client certificates carry (mutual TLS): a URI
    /// or DNS subject alternative name, or the subject's common name.
    #[serde(default)]
    pub cert_names: Vec<Spanned<String>>,
    /// The consumer's own limits: one budget across every route that
    /// authenticates it, on top of each route's `[routes.rate_limit]`.
    #[serde(default)]
    pub rate_limit: Option<Spanned<crate::policy::ratelimit::RateLimitSection>>,
}

/// The consumers file: `[[consumers]]` tables only.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumersFile {
    #[serde(default)]
    pub consumers: Vec<Consumer>,
}

/// `[[identity_providers]]`: an OpenID Connect / OAuth 2 issuer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityProvider {
    pub name: Spanned<String>,
    /// Must equal the tokens' `iss`; discovery reads
    /// `{issuer}/.well-known/openid-configuration`.
    pub issuer: Spanned<String>,
    /// JWKS URL; when absent it comes from discovery.
    #[serde(default)]
    pub jwks_uri: Option<Spanned<String>>,
    /// PEM file of the CA certificates to trust for an `https` provider
    /// (only these); the system's roots when absent.
    #[serde(default)]
    pub ca_file: Option<Spanned<String>>,
    /// Accepted `aud` values (any of); routes may override.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Accepted signature algorithms.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<Spanned<String>>,
    /// Shared secrets for HS256 tokens (HS256 must also be in `algorithms`).
    #[serde(default)]
    pub hs256_secrets: Vec<Spanned<String>>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(default = "default_leeway")]
    pub leeway: Secs,
    /// Claims every token must have.
    #[serde(default)]
    pub required_claims: Vec<String>,
    /// How old the cached keys may get before a refresh.
    #[serde(default = "default_refresh_interval")]
    pub refresh_interval: Secs,
    /// Least time between two refreshes caused by an unknown `kid`.
    #[serde(default = "default_min_refresh_interval")]
    pub min_refresh_interval: Secs,
    /// Time limit for each call to the provider.
    #[serde(default = "default_timeout")]
    pub timeout: Secs,
    /// The claim whose value names the consumer.
    #[serde(default = "default_consumer_claim")]
    pub consumer_claim: String,
    #[serde(default)]
    pub introspection: Option<Spanned<Introspection>>,
}

/// `[identity_providers.introspection]`: RFC 7662 token introspection.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Introspection {
    /// When absent it comes from discovery (`introspection_endpoint`).
    #[serde(default)]
    pub endpoint: Option<Spanned<String>>,
    pub client_id: String,
    pub client_secret: String,
    /// How long an active answer is reused (never past the token's `exp`).
    #[serde(default = "default_cache_ttl")]
    pub cache_ttl: Secs,
    /// How long an inactive answer is reused.
    #[serde(default = "default_negative_cache_ttl")]
    pub negative_cache_ttl: Secs,
    #[serde(default = "default_cache_size")]
    pub cache_size: usize,
}

/// `[routes.auth]`: the credentials a route accepts (any one of the given
/// kinds) and what the caller must then be allowed.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteAuth {
    #[serde(default)]
    pub api_key: Option<ApiKey>,
    #[serde(default)]
    pub basic: Option<Basic>,
    #[serde(default)]
    pub jwt: Option<Jwt>,
    #[serde(default)]
    pub introspection: Option<ProviderRef>,
    #[serde(default)]
    pub forward: Option<Forward>,
    /// The client certificate verified on the connection (a listener with
    /// `client_ca`), matched to a consumer by `cert_names`.
    #[serde(default)]
    pub client_cert: Option<ClientCert>,
    /// `realm` of the `WWW-Authenticate` challenges.
    #[serde(default = "default_realm")]
    pub realm: Spanned<String>,
    /// The caller needs at least one of these scopes.
    #[serde(default)]
    pub scopes_any: Vec<String>,
    /// The caller needs all of these scopes.
    #[serde(default)]
    pub scopes_all: Vec<String>,
    /// Claim conditions, all of which must hold.
    #[serde(default)]
    pub claims: Vec<Spanned<ClaimRule>>,
    /// The consumer must be in one of these groups.
    #[serde(default)]
    pub groups: Vec<String>,
    /// The consumer must be one of these.
    #[serde(default)]
    pub consumers: Vec<String>,
    /// Methods an authenticated caller may use; empty means any.
    #[serde(default)]
    pub methods: Vec<Spanned<String>>,
    /// Request header carrying the consumer name upstream; `""` for none.
    #[serde(default = "default_consumer_header")]
    pub consumer_header: Spanned<String>,
    /// Request headers set from claims: `{ "x-user-email" = "email" }`.
    #[serde(default)]
    pub claim_headers: BTreeMap<String, Spanned<String>>,
    /// Remove the credentials before the request goes upstream.
    #[serde(default = "yes")]
    pub strip_credentials: bool,
}

/// `[routes.auth.api_key]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    #[serde(default = "default_api_key_header")]
    pub header: Spanned<String>,
    /// Query parameter also accepted; none by default.
    #[serde(default)]
    pub query: Option<Spanned<String>>,
}

/// `[routes.auth.basic]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Basic {}

/// `[routes.auth.client_cert]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCert {}

/// `[routes.auth.jwt]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Jwt {
    pub provider: Spanned<String>,
    /// Overrides the provider's `audiences`.
    #[serde(default)]
    pub audiences: Vec<String>,
}

/// `[routes.auth.introspection]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderRef {
    pub provider: Spanned<String>,
}

/// `[routes.auth.forward]`: ask an external service.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Forward {
    /// `http://host:port/path`; called with GET.
    pub url: Spanned<String>,
    #[serde(default = "default_timeout")]
    pub timeout: Secs,
    /// Client request headers passed to the service.
    #[serde(default = "default_forward_request_headers")]
    pub request_headers: Vec<Spanned<String>>,
    /// Headers of the service's 2xx answer copied onto the upstream request.
    #[serde(default)]
    pub response_headers: Vec<Spanned<String>>,
    /// Header of the service's answer that names the consumer.
    #[serde(default)]
    pub consumer_from: Option<Spanned<String>>,
}

/// `[[routes.auth.claims]]`: `name` must hold one of `any_of` (or all of
/// `all_of`); a claim that is an array or a space-separated string holds each
/// of its items.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimRule {
    pub name: String,
    #[serde(default)]
    pub any_of: Vec<String>,
    #[serde(default)]
    pub all_of: Vec<String>,
}

fn yes() -> bool {
    true
}
fn default_algorithms() -> Vec<Spanned<String>> {
    ["RS256", "ES256", "EdDSA"]
        .into_iter()
        .map(|a| Spanned::new(0..0, a.to_string()))
        .collect()
}
fn default_leeway() -> Secs {
    Secs(Duration::from_secs(30))
}
fn default_refresh_interval() -> Secs {
    Secs(Duration::from_secs(600))
}
fn default_min_refresh_interval() -> Secs {
    Secs(Duration::from_secs(10))
}
fn default_timeout() -> Secs {
    Secs(Duration::from_secs(5))
}
fn default_consumer_claim() -> String {
    "sub".to_string()
}
fn default_cache_ttl() -> Secs {
    Secs(Duration::from_secs(60))
}
fn default_negative_cache_ttl() -> Secs {
    Secs(Duration::from_secs(10))
}
fn default_cache_size() -> usize {
    10_000
}
fn default_realm() -> Spanned<String> {
    Spanned::new(0..0, "gateway".to_string())
}
fn default_consumer_header() -> Spanned<String> {
    Spanned::new(0..0, "x-consumer".to_string())
}
fn default_api_key_header() -> Spanned<String> {
    Spanned::new(0..0, "x-api-key".to_string())
}
fn default_forward_request_headers() -> Vec<Spanned<String>> {
    ["authorization", "cookie"]
        .into_iter()
        .map(|h| Spanned::new(0..0, h.to_string()))
        .collect()
}
