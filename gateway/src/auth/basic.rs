//! HTTP Basic credentials checked against bcrypt or argon2 hashes.
//!
//! Verifying such a hash costs tens of milliseconds of CPU by design, which
//! must not run on a worker's runtime. Each verification runs on tokio's
//! blocking pool (`spawn_blocking`), at most one per core at a time (a
//! semaphore), so a flood of wrong passwords queues instead of taking every
//! thread. A successful verification is remembered for `VERIFIED_TTL`, keyed
//! by a salted SHA-256 of user and password, so a client that sends the same
//! credentials on every request pays the hash once; the cache belongs to one
//! consumer set and goes with it when the consumers change. An unknown user
//! costs the same hash as a known one (a dummy verification), so response
//! times do not tell which user names exist.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use super::consumers::{Consumer, Consumers};

/// How long a successful verification is reused.
const VERIFIED_TTL: Duration = Duration::from_secs(300);
/// Successful verifications remembered per consumer set.
const VERIFIED_CAPACITY: usize = 10_000;
/// Longest `Authorization: Basic` value looked at.
const MAX_CREDENTIALS: usize = 1024;

/// A stored password hash.
#[derive(Debug, Clone)]
pub enum PasswordHash {
    Bcrypt(Arc<str>),
    Argon2(Arc<str>),
}

impl PasswordHash {
    /// Checks the format of a bcrypt (`$2a$`, `$2b$`, `$2y$`) or argon2
    /// PHC (`$argon2id$...`) hash.
    pub fn parse(s: &str) -> Result<PasswordHash, String> {
        if s.starts_with("$2a$") || s.starts_with("$2b$") || s.starts_with("$2y$") {
            if s.len() == 60 && s.is_ascii() {
                return Ok(PasswordHash::Bcrypt(s.into()));
            }
            return Err("invalid bcrypt hash: expected 60 characters like $2b$12$...".into());
        }
        if s.starts_with("$argon2") {
            return match argon2::PasswordHash::new(s) {
                Ok(_) => Ok(PasswordHash::Argon2(s.into())),
                Err(e) => Err(format!("invalid argon2 hash: {e}")),
            };
        }
        Err("password_hash must be a bcrypt ($2b$...) or argon2 ($argon2id$...) hash".into())
    }

    /// Blocking: costs what the hash's parameters say.
    fn verify(&self, password: &[u8]) -> bool {
        use argon2::PasswordVerifier;
        match self {
            PasswordHash::Bcrypt(h) => bcrypt::verify(password, h).unwrap_or(false),
            PasswordHash::Argon2(h) => argon2::Argon2::default()
                .verify_password(password, h.as_ref())
                .is_ok(),
        }
    }
}

/// Successful verifications: salted digest of the credentials → consumer.
pub(super) struct VerifiedCache(quick_cache::sync::Cache<[u8; 32], (Instant, Arc<Consumer>)>);

impl VerifiedCache {
    pub(super) fn new() -> Self {
        VerifiedCache(quick_cache::sync::Cache::new(VERIFIED_CAPACITY))
    }
}

impl Default for VerifiedCache {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for VerifiedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VerifiedCache({})", self.0.len())
    }
}

/// The credentials of an `Authorization` value after `Basic `: user and
/// password.
pub fn decode(b64: &[u8]) -> Option<(String, Vec<u8>)> {
    if b64.len() > MAX_CREDENTIALS {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim_ascii())
        .ok()?;
    let colon = raw.iter().position(|&b| b == b':')?;
    let user = std::str::from_utf8(&raw[..colon]).ok()?.to_string();
    let password = raw[colon + 1..].to_vec();
    Some((user, password))
}

/// The consumer whose Basic credentials these are, if they verify.
pub async fn verify(
    consumers: &Arc<Consumers>,
    user: &str,
    password: Vec<u8>,
) -> Option<Arc<Consumer>> {
    let key = cache_key(user, &password);
    if let Some((at, consumer)) = consumers.verified.0.get(&key)
        && at.elapsed() < VERIFIED_TTL
    {
        return Some(consumer);
    }
    let (consumer, hash) = match consumers.by_user(user) {
        Some((c, h)) => (Some(c.clone()), h.clone()),
        None => (None, dummy_hash()),
    };
    let ok = run_blocking(move || hash.verify(&password)).await;
    let c = consumer.filter(|_| ok)?;
    consumers
        .verified
        .0
        .insert(key, (Instant::now(), c.clone()));
    Some(c)
}

/// Runs a password verification on the blocking pool, one per core at most.
async fn run_blocking(f: impl FnOnce() -> bool + Send + 'static) -> bool {
    static PERMITS: OnceLock<Arc<Semaphore>> = OnceLock::new();
    let permits = PERMITS.get_or_init(|| {
        Arc::new(Semaphore::new(
            std::thread::available_parallelism().map_or(1, |n| n.get()),
        ))
    });
    let Ok(permit) = permits.clone().acquire_owned().await else {
        return false;
    };
    // The permit goes with the job: a client that gives up on its request
    // (dropping this future) does not free it while the hash still runs.
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        f()
    })
    .await
    .unwrap_or(false)
}

/// SHA-256 of a per-process random salt, the user, a separator and the
/// password: the verified cache never holds plain digests of passwords.
fn cache_key(user: &str, password: &[u8]) -> [u8; 32] {
    static SALT: OnceLock<[u8; 16]> = OnceLock::new();
    let salt = SALT.get_or_init(|| fastrand::u128(..).to_le_bytes());
    let mut h = Sha256::new();
    h.update(salt);
    h.update(user.as_bytes());
    h.update([0]);
    h.update(password);
    h.finalize().into()
}

/// A bcrypt hash nobody knows the password of, verified for unknown users so
/// that they cost as much as known ones.
fn dummy_hash() -> PasswordHash {
    // bcrypt, cost 10, of a random password.
    PasswordHash::Bcrypt("$2b$10$TwXYtQAXYi9BXNPlLNjrs.AsIuVIK7wgc7XmYnDNJcFoXw29fxwEa".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_credentials() {
        // "alice:s3cr:et"
        let (u, p) = decode(b"YWxpY2U6czNjcjpldA==").unwrap();
        assert_eq!(u, "alice");
        assert_eq!(p, b"s3cr:et");
        assert!(decode(b"bm9jb2xvbg==").is_none()); // "nocolon"
        assert!(decode(b"!!!").is_none());
    }

    #[test]
    fn parses_hashes() {
        assert!(matches!(
            PasswordHash::parse(&dummy_hash_str()),
            Ok(PasswordHash::Bcrypt(_))
        ));
        assert!(PasswordHash::parse("$2b$10$short").is_err());
        assert!(PasswordHash::parse("plain").is_err());
        assert!(PasswordHash::parse("$argon2id$v=19$m=19456,t=2,p=1$bad").is_err());
    }

    fn dummy_hash_str() -> String {
        match dummy_hash() {
            PasswordHash::Bcrypt(h) | PasswordHash::Argon2(h) => h.to_string(),
        }
    }

    #[test]
    fn verifies_bcrypt_and_argon2() {
        let b = bcrypt::hash_with_salt("pw", 4, [7; 16])
            .unwrap()
            .to_string();
        let h = PasswordHash::parse(&b).unwrap();
        assert!(h.verify(b"pw"));
        assert!(!h.verify(b"pW"));
        use argon2::PasswordHasher;
        let params = argon2::Params::new(256, 1, 1, None).unwrap();
        let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
            .hash_password_with_salt(b"pw", b"somesaltsomesalt")
            .unwrap()
            .to_string();
        let h = PasswordHash::parse(&a).unwrap();
        assert!(matches!(h, PasswordHash::Argon2(_)));
        assert!(h.verify(b"pw"));
        assert!(!h.verify(b"pW"));
        // The dummy hash is a real bcrypt hash: verifying it costs the same.
        assert_eq!(bcrypt::verify("x", &dummy_hash_str()).ok(), Some(false));
    }
}
