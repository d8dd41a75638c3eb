//! Identity providers: OIDC discovery → JWKS, cached and refreshed.
//!
//! Keys are fetched on first use, refreshed in the background when older
//! than `refresh_interval` (checked as requests arrive: there is no timer
//! task), and refreshed at once when a token names a key we do not have —
//! at most once per `min_refresh_interval`, so tokens with made-up `kid`s
//! cannot make us hammer the provider. A refresh is a task spawned on the
//! runtime of the request that needed it; only one runs at a time (an
//! atomic flag), and requests that need its result wait on a `watch`
//! channel with a deadline. No lock is held across an await.
//!
//! The cache outlives configuration reloads: caches are kept in a process
//! registry by what they fetch (discovery or JWKS URL, issuer, algorithms,
//! timeout), and a new generation with the same settings gets the same
//! cache, keys included.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use http::Uri;
use jsonwebtoken::{Algorithm, Validation};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::client::{self, HttpClient};
use super::introspect::Introspector;
use super::jwt::{self, Claims, JwtError, KeySet};

/// How long a verified token is reused at most (never past its `exp`).
const VERIFIED_TTL: Duration = Duration::from_secs(60);
/// Verified tokens remembered per route.
const VERIFIED_CAPACITY: usize = 4096;

/// One route's claim checks for one provider, one `Validation` per accepted
/// algorithm, and the tokens they have accepted.
///
/// Verifying a signature costs tens of microseconds (RS256 about 36 µs on
/// the test machine), more than the rest of a proxied request, and clients
/// send the same token on many requests. So a token that passed is
/// remembered by its SHA-256 (under 1 µs) for `VERIFIED_TTL`, never past its
/// `exp`, and only while the provider's key set is the one that verified it
/// (any key refresh makes every token verify again). Tokens that fail are
/// not remembered.
pub struct Validations {
    by_alg: Vec<(Algorithm, Validation)>,
    /// SHA-256 of the token → (valid until, key set version, claims).
    verified: quick_cache::sync::Cache<[u8; 32], (Instant, u64, Arc<Claims>)>,
}

impl std::fmt::Debug for Validations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Validations")
            .field("by_alg", &self.by_alg)
            .field("verified", &self.verified.len())
            .finish()
    }
}

impl Validations {
    fn get(&self, alg: Algorithm) -> Option<&Validation> {
        self.by_alg.iter().find(|(a, _)| *a == alg).map(|(_, v)| v)
    }
}

/// One identity provider, compiled.
#[derive(Debug)]
pub struct Provider {
    pub name: Arc<str>,
    pub issuer: Arc<str>,
    pub algorithms: Vec<Algorithm>,
    pub audiences: Vec<String>,
    pub leeway: Duration,
    /// Required claims beyond the registered ones `jsonwebtoken` checks.
    pub required_claims: Vec<String>,
    pub consumer_claim: String,
    pub refresh_interval: Duration,
    pub min_refresh_interval: Duration,
    pub timeout: Duration,
    /// HS256 secrets.
    pub(super) hmac: KeySet,
    pub(super) keys: Arc<KeyCache>,
    /// For introspection.
    pub(super) client: HttpClient,
    pub introspection: Option<Introspector>,
}

/// Where the keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `{issuer}/.well-known/openid-configuration`, then its `jwks_uri`.
    Discovery(Uri),
    /// A JWKS URL given in the config.
    Jwks(Uri),
}

/// What a key cache fetches; caches with equal settings are shared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetch {
    pub source: Source,
    pub issuer: String,
    pub algorithms: Vec<Algorithm>,
    pub timeout: Duration,
    /// The CA file trusted for https (`None`: the system's roots).
    pub ca_file: Option<std::path::PathBuf>,
}

/// Fetched keys and endpoints.
pub struct KeyCache {
    fetch: Fetch,
    client: HttpClient,
    keys: ArcSwap<KeySet>,
    /// From discovery.
    pub(super) introspection_endpoint: ArcSwapOption<Uri>,
    /// `now_ms()` of the last successful fetch; 0: never.
    fetched: AtomicU64,
    /// `now_ms()` of the last attempt; 0: never.
    attempted: AtomicU64,
    in_flight: AtomicBool,
    /// Signalled after each attempt.
    done: watch::Sender<()>,
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCache")
            .field("fetch", &self.fetch)
            .field("keys", &self.keys.load().len())
            .finish_non_exhaustive()
    }
}

/// Milliseconds on a monotonic clock, never 0.
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let ms = EPOCH.get_or_init(Instant::now).elapsed().as_millis();
    u64::try_from(ms).unwrap_or(u64::MAX).saturating_add(1)
}

impl KeyCache {
    /// The cache for `fetch`: the one already in use if any, else a new one.
    pub fn shared(fetch: Fetch, client: &HttpClient) -> Arc<KeyCache> {
        static REGISTRY: Mutex<Vec<Weak<KeyCache>>> = Mutex::new(Vec::new());
        let mut reg = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
        reg.retain(|w| w.strong_count() > 0);
        if let Some(c) = reg
            .iter()
            .filter_map(Weak::upgrade)
            .find(|c| c.fetch == fetch)
        {
            return c;
        }
        let c = Arc::new(KeyCache {
            fetch,
            client: client.clone(),
            keys: ArcSwap::from_pointee(KeySet::default()),
            introspection_endpoint: ArcSwapOption::empty(),
            fetched: AtomicU64::new(0),
            attempted: AtomicU64::new(0),
            in_flight: AtomicBool::new(false),
            done: watch::Sender::new(()),
        });
        reg.push(Arc::downgrade(&c));
        c
    }

    fn age(&self) -> Option<Duration> {
        match self.fetched.load(Ordering::Relaxed) {
            0 => None,
            t => Some(Duration::from_millis(now_ms().saturating_sub(t))),
        }
    }

    /// Starts a refresh on the current runtime unless one is running or the
    /// last attempt was less than `min_gap` ago. True when a refresh is
    /// running afterwards.
    fn trigger(self: &Arc<Self>, min_gap: Duration) -> bool {
        if self.in_flight.load(Ordering::Acquire) {
            return true;
        }
        let now = now_ms();
        let last = self.attempted.load(Ordering::Relaxed);
        if last != 0 && Duration::from_millis(now.saturating_sub(last)) < min_gap {
            return false;
        }
        if self
            .in_flight
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return true;
        }
        self.attempted.store(now, Ordering::Relaxed);
        let me = self.clone();
        tokio::spawn(async move { me.refresh().await });
        true
    }

    /// Starts a refresh (see `trigger`) and waits for it, at most the fetch
    /// timeout. False when no refresh could run.
    async fn refresh_and_wait(self: &Arc<Self>, min_gap: Duration) -> bool {
        let mut rx = self.done.subscribe();
        if !self.trigger(min_gap) {
            return false;
        }
        // Discovery and JWKS are two calls, each with the timeout.
        let deadline = self
            .fetch
            .timeout
            .saturating_mul(2)
            .saturating_add(Duration::from_millis(100));
        tokio::time::timeout(deadline, rx.changed()).await.is_ok()
    }

    async fn refresh(&self) {
        let result = self.load().await;
        let label = match result {
            Ok((keys, introspection)) => {
                tracing::info!(issuer = %self.fetch.issuer, keys = keys.len(), "identity provider keys loaded");
                self.keys.store(Arc::new(keys));
                if let Some(u) = introspection {
                    self.introspection_endpoint.store(Some(Arc::new(u)));
                }
                self.fetched.store(now_ms(), Ordering::Relaxed);
                "ok"
            }
            Err(e) => {
                tracing::warn!(issuer = %self.fetch.issuer, "cannot load identity provider keys: {e}");
                "failed"
            }
        };
        metrics::counter!("gateway_auth_jwks_refreshes_total", "result" => label).increment(1);
        self.in_flight.store(false, Ordering::Release);
        self.done.send_replace(());
    }

    async fn load(&self) -> Result<(KeySet, Option<Uri>), String> {
        #[derive(serde::Deserialize)]
        struct Discovery {
            issuer: String,
            #[serde(default)]
            jwks_uri: Option<String>,
            #[serde(default)]
            introspection_endpoint: Option<String>,
        }
        let timeout = self.fetch.timeout;
        let (jwks_uri, introspection) = match &self.fetch.source {
            Source::Jwks(u) => (u.clone(), None),
            Source::Discovery(u) => {
                let body = self.client.get(u, timeout).await?;
                let doc: Discovery = serde_json::from_slice(&body)
                    .map_err(|e| format!("{u}: invalid discovery document: {e}"))?;
                // OpenID Connect Discovery 1.0 §4.3.
                if doc.issuer != self.fetch.issuer {
                    return Err(format!(
                        "{u}: discovery names issuer {:?}, expected {:?}",
                        doc.issuer, self.fetch.issuer
                    ));
                }
                let intro = match doc.introspection_endpoint {
                    Some(e) => Some(client::parse_url(&e)?),
                    None => None,
                };
                // Kept at once: opaque tokens can be introspected even when
                // the provider publishes no keys or its JWKS is down.
                if let Some(i) = &intro {
                    self.introspection_endpoint.store(Some(Arc::new(i.clone())));
                }
                let Some(jwks) = doc.jwks_uri else {
                    return Err(format!("{u}: discovery names no jwks_uri"));
                };
                (client::parse_url(&jwks)?, intro)
            }
        };
        let body = self.client.get(&jwks_uri, timeout).await?;
        let keys = KeySet::from_jwks(&body, &self.fetch.algorithms)
            .map_err(|e| format!("{jwks_uri}: {e}"))?;
        Ok((keys, introspection))
    }
}

impl Provider {
    /// Verifies a JWT from this provider.
    pub async fn verify(
        &self,
        token: &str,
        validations: &Validations,
    ) -> Result<Arc<Claims>, JwtError> {
        // Keys older than refresh_interval are refreshed in the background,
        // also while every token is answered from the cache.
        if !self.keys.fetch.algorithms.is_empty()
            && self.keys.age().is_some_and(|a| a > self.refresh_interval)
        {
            self.keys.trigger(self.min_refresh_interval);
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let version = self.keys.fetched.load(Ordering::Relaxed);
        if let Some((until, v, claims)) = validations.verified.get(&digest)
            && v == version
            && Instant::now() < until
        {
            return Ok(claims);
        }
        let claims = Arc::new(self.verify_uncached(token, validations).await?);
        let now = jsonwebtoken::get_current_timestamp();
        let mut ttl = VERIFIED_TTL;
        if let Some(exp) = claims.get("exp").and_then(jwt::numeric_date) {
            ttl = ttl.min(Duration::from_secs(exp.saturating_sub(now)));
        }
        // The version read before verifying: a refresh in between only
        // makes the entry stale sooner.
        validations
            .verified
            .insert(digest, (Instant::now() + ttl, version, claims.clone()));
        Ok(claims)
    }

    async fn verify_uncached(
        &self,
        token: &str,
        validations: &Validations,
    ) -> Result<Claims, JwtError> {
        let header = jwt::header(token, &self.algorithms)?;
        let validation = validations.get(header.alg).ok_or(JwtError::Algorithm)?;
        if header.alg == Algorithm::HS256 {
            return self.hmac.verify(token, &header, validation);
        }
        let cache = &self.keys;
        let mut keys = cache.keys.load_full();
        if !keys.knows(header.kid.as_deref(), header.alg) {
            // First use, or a key we have not seen (rotation): refresh now,
            // rate-limited. A kid that only kid-less keys could match counts
            // as unseen too, so they cannot hide a rotation until the next
            // interval refresh; the kid-less keys are still tried after.
            metrics::counter!("gateway_auth_jwks_unknown_kid_total").increment(1);
            if cache.refresh_and_wait(self.min_refresh_interval).await {
                keys = cache.keys.load_full();
            }
            if cache.age().is_none() {
                // Never loaded: the provider is down or misconfigured.
                return Err(JwtError::KeysUnavailable);
            }
        }
        keys.verify(token, &header, validation)
    }

    /// The introspection endpoint: configured, or from discovery (fetched
    /// now if never fetched).
    pub(super) async fn introspection_endpoint(&self, configured: Option<&Uri>) -> Option<Uri> {
        if let Some(u) = configured {
            return Some(u.clone());
        }
        if let Some(u) = self.keys.introspection_endpoint.load_full() {
            return Some((*u).clone());
        }
        self.keys.refresh_and_wait(self.min_refresh_interval).await;
        self.keys
            .introspection_endpoint
            .load_full()
            .map(|u| (*u).clone())
    }

    /// The claim checks for tokens of this provider with these audiences,
    /// one `Validation` per algorithm (`jsonwebtoken` wants every algorithm
    /// of a `Validation` to fit the key).
    pub fn validations(&self, audiences: &[String]) -> Validations {
        Validations {
            by_alg: self
                .algorithms
                .iter()
                .map(|&alg| (alg, self.validation(alg, audiences)))
                .collect(),
            verified: quick_cache::sync::Cache::new(VERIFIED_CAPACITY),
        }
    }

    fn validation(&self, alg: Algorithm, audiences: &[String]) -> Validation {
        let mut v = Validation::new(alg);
        v.leeway = self.leeway.as_secs();
        v.validate_nbf = true;
        v.validate_aud = true;
        v.set_issuer(&[&*self.issuer]);
        v.set_audience(audiences);
        let mut required = vec!["exp".to_string(), "iss".into(), "aud".into()];
        required.extend(
            self.required_claims
                .iter()
                .filter(|c| matches!(c.as_str(), "nbf" | "sub"))
                .cloned(),
        );
        v.set_required_spec_claims(&required);
        v
    }
}
