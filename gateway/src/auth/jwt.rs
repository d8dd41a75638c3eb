//! JWT verification with `jsonwebtoken`, on keys from a JWKS or configured
//! HS256 secrets.
//!
//! Each key is bound to the one algorithm it may verify: a JWK's own `alg`
//! when it has one, else the one its type implies (RSA → RS256, EC P-256 →
//! ES256, OKP Ed25519 → EdDSA). A token's header must name that algorithm
//! and it must be in the provider's list. `alg: none` is not an algorithm
//! `jsonwebtoken` knows, so such a token fails to parse; HMAC keys come only
//! from configured secrets (never from a fetched JWKS), and an RSA, EC or
//! OKP key is never used as an HMAC secret (`jsonwebtoken` also refuses a key
//! of the wrong family), so a token signed with HS256 and the provider's
//! public key as the secret finds no key.

use std::collections::HashMap;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

/// Claims of a verified token.
pub type Claims = Map<String, Value>;

/// A JWT NumericDate (`exp`, `nbf`) as whole seconds: an integer, or a
/// fraction rounded down (so an expiry never moves later); negative is 0.
/// `None` when the value is not a number.
pub fn numeric_date(v: &Value) -> Option<u64> {
    if let Some(n) = v.as_u64() {
        return Some(n);
    }
    let f = v.as_f64().filter(|f| f.is_finite())?;
    // `as` saturates: a huge value is u64::MAX, a negative one 0.
    Some(f.floor() as u64)
}

/// A verification key and the one algorithm it verifies.
pub struct Key {
    key: DecodingKey,
    alg: Algorithm,
}

/// Keys by `kid`, plus keys without one.
#[derive(Default)]
pub struct KeySet {
    by_kid: HashMap<String, Vec<Key>>,
    anonymous: Vec<Key>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("kids", &self.by_kid.keys().collect::<Vec<_>>())
            .field("anonymous", &self.anonymous.len())
            .finish()
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtError {
    /// Not a JWT, or a header we cannot read (includes `alg: none`).
    Malformed,
    /// The header's algorithm is not accepted here.
    Algorithm,
    /// No key with that `kid` (and algorithm).
    UnknownKey,
    /// Signature or claims rejected.
    Invalid(String),
    /// The provider's keys could not be loaded yet: not the token's fault.
    KeysUnavailable,
}

impl std::fmt::Display for JwtError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JwtError::Malformed => f.write_str("malformed token"),
            JwtError::Algorithm => f.write_str("token algorithm not accepted"),
            JwtError::UnknownKey => f.write_str("no key for this token"),
            JwtError::Invalid(why) => f.write_str(why),
            JwtError::KeysUnavailable => {
                f.write_str("the identity provider's keys are unavailable")
            }
        }
    }
}

impl KeySet {
    /// Parses a JWKS document, keeping the signature keys usable with one of
    /// `allowed`; keys of unknown or unsupported types are skipped.
    pub fn from_jwks(body: &[u8], allowed: &[Algorithm]) -> Result<KeySet, String> {
        #[derive(serde::Deserialize)]
        struct Doc {
            keys: Vec<Value>,
        }
        super::crypto::install();
        let doc: Doc = serde_json::from_slice(body).map_err(|e| format!("invalid JWKS: {e}"))?;
        let mut set = KeySet::default();
        for v in doc.keys {
            let Ok(jwk) = serde_json::from_value::<Jwk>(v) else {
                continue;
            };
            if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
                continue;
            }
            let Some(alg) = jwk_algorithm(&jwk) else {
                continue;
            };
            if !allowed.contains(&alg) {
                continue;
            }
            let Ok(key) = DecodingKey::from_jwk(&jwk) else {
                continue;
            };
            set.insert(jwk.common.key_id.clone(), Key { key, alg });
        }
        Ok(set)
    }

    /// Adds an HS256 shared secret.
    pub fn add_hs256(&mut self, secret: &[u8]) {
        self.insert(
            None,
            Key {
                key: DecodingKey::from_secret(secret),
                alg: Algorithm::HS256,
            },
        );
    }

    fn insert(&mut self, kid: Option<String>, key: Key) {
        match kid {
            Some(kid) => self.by_kid.entry(kid).or_default().push(key),
            None => self.anonymous.push(key),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.by_kid.is_empty() && self.anonymous.is_empty()
    }

    pub fn len(&self) -> usize {
        self.by_kid.values().map(Vec::len).sum::<usize>() + self.anonymous.len()
    }

    /// Whether a key for `kid` (or, without one, any key) verifies `alg`.
    pub fn has(&self, kid: Option<&str>, alg: Algorithm) -> bool {
        self.candidates(kid, alg).next().is_some()
    }

    /// Whether the set names `kid` itself (with a key for `alg`); without a
    /// `kid`, whether any key verifies `alg`. A token whose `kid` only the
    /// kid-less keys could match may be signed by a key published since.
    pub fn knows(&self, kid: Option<&str>, alg: Algorithm) -> bool {
        match kid {
            Some(kid) => self
                .by_kid
                .get(kid)
                .is_some_and(|keys| keys.iter().any(|k| k.alg == alg)),
            None => self.has(None, alg),
        }
    }

    fn candidates<'a>(
        &'a self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Box<dyn Iterator<Item = &'a Key> + 'a> {
        let by_alg = move |k: &&Key| k.alg == alg;
        match kid {
            Some(kid) => match self.by_kid.get(kid) {
                Some(keys) => Box::new(keys.iter().filter(by_alg)),
                // A kid we do not know may still match a configured secret.
                None => Box::new(self.anonymous.iter().filter(by_alg)),
            },
            None => Box::new(
                self.anonymous
                    .iter()
                    .chain(self.by_kid.values().flatten())
                    .filter(by_alg),
            ),
        }
    }

    /// Verifies `token` with the keys for its `kid` and algorithm.
    pub fn verify(
        &self,
        token: &str,
        header: &Header,
        validation: &Validation,
    ) -> Result<Claims, JwtError> {
        super::crypto::install();
        let mut last = JwtError::UnknownKey;
        for k in self.candidates(header.kid.as_deref(), header.alg) {
            match jsonwebtoken::decode::<Claims>(token, &k.key, validation) {
                Ok(data) => return Ok(data.claims),
                Err(e) => last = JwtError::Invalid(describe(e.kind())),
            }
        }
        Err(last)
    }
}

/// What the verifier needs from a token's header.
#[derive(Debug)]
pub struct Header {
    pub alg: Algorithm,
    pub kid: Option<String>,
}

/// Reads a token's header without trusting it, and checks its algorithm
/// against `allowed`.
pub fn header(token: &str, allowed: &[Algorithm]) -> Result<Header, JwtError> {
    if token.len() > 16 * 1024 || token.bytes().filter(|&b| b == b'.').count() != 2 {
        return Err(JwtError::Malformed);
    }
    let h = jsonwebtoken::decode_header(token).map_err(|_| JwtError::Malformed)?;
    if !allowed.contains(&h.alg) {
        return Err(JwtError::Algorithm);
    }
    Ok(Header {
        alg: h.alg,
        kid: h.kid,
    })
}

/// The algorithm a JWK verifies: its own `alg`, or the one its type implies.
fn jwk_algorithm(jwk: &Jwk) -> Option<Algorithm> {
    let implied = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        // Symmetric keys are never taken from a JWKS.
        _ => return None,
    };
    let Some(declared) = jwk.common.key_algorithm else {
        return Some(implied);
    };
    let declared = match declared {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    };
    // The declared algorithm must belong to the key's type.
    (declared.family() == implied.family()).then_some(declared)
}

/// Short reason for a rejected token (goes into the problem detail).
fn describe(kind: &jsonwebtoken::errors::ErrorKind) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match kind {
        K::ExpiredSignature => "token expired".into(),
        K::ImmatureSignature => "token not valid yet".into(),
        K::InvalidIssuer => "wrong issuer".into(),
        K::InvalidAudience => "wrong audience".into(),
        K::InvalidSignature => "bad signature".into(),
        K::InvalidAlgorithm => "token algorithm does not fit the key".into(),
        K::MissingRequiredClaim(c) => format!("token lacks the {c:?} claim"),
        K::InvalidClaimFormat(c) => format!("malformed {c:?} claim"),
        _ => "invalid token".into(),
    }
}

/// Parses an algorithm name from the config.
pub fn parse_algorithm(s: &str) -> Option<Algorithm> {
    match s {
        "RS256" => Some(Algorithm::RS256),
        "RS384" => Some(Algorithm::RS384),
        "RS512" => Some(Algorithm::RS512),
        "PS256" => Some(Algorithm::PS256),
        "PS384" => Some(Algorithm::PS384),
        "PS512" => Some(Algorithm::PS512),
        "ES256" => Some(Algorithm::ES256),
        "ES384" => Some(Algorithm::ES384),
        "EdDSA" => Some(Algorithm::EdDSA),
        "HS256" => Some(Algorithm::HS256),
        _ => None,
    }
}

#[cfg(test)]
#[path = "jwt_tests.rs"]
mod tests;
