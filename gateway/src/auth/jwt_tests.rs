//! Unit tests for JWT verification: every accepted algorithm, and the
//! hostile tokens (alg none, algorithm confusion, bad claims, unknown kid).
//! Keys are fixed test keys generated once with openssl.

use base64::Engine as _;
use jsonwebtoken::{EncodingKey, Header as JwtHeader, encode};
use serde_json::json;

use super::*;

include!("test_keys.rs");

const ISS: &str = "https://idp.test";
const AUD: &str = "https://api.test";
const ALLOWED: &[Algorithm] = &[Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA];

fn b64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

fn b64url(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn jwks() -> Vec<u8> {
    json!({"keys": [
        {"kty": "RSA", "kid": "rsa", "alg": "RS256", "use": "sig", "n": RSA_N, "e": "AQAB"},
        {"kty": "EC", "kid": "ec", "crv": "P-256", "x": EC_X, "y": EC_Y},
        {"kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": ED_X},
        // Never used: symmetric keys from a JWKS, encryption keys, a key
        // whose declared algorithm does not fit its type, unknown types.
        {"kty": "oct", "kid": "oct", "k": b64url(RSA_PUBLIC_PEM.as_bytes())},
        {"kty": "RSA", "kid": "enc", "use": "enc", "n": RSA_N, "e": "AQAB"},
        {"kty": "RSA", "kid": "lying", "alg": "HS256", "n": RSA_N, "e": "AQAB"},
        {"kty": "XYZ", "kid": "weird"},
    ]})
    .to_string()
    .into_bytes()
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn claims() -> serde_json::Value {
    json!({"sub": "svc", "iss": ISS, "aud": AUD, "iat": now(), "exp": now() + 300, "scope": "read"})
}

fn validation() -> Validation {
    let mut v = Validation::new(Algorithm::RS256);
    v.algorithms = ALLOWED.to_vec();
    v.leeway = 30;
    v.validate_nbf = true;
    v.set_issuer(&[ISS]);
    v.set_audience(&[AUD]);
    v.set_required_spec_claims(&["exp", "iss", "aud"]);
    v
}

fn sign(alg: Algorithm, kid: &str, claims: &serde_json::Value) -> String {
    // Before the library's first use, which would fix its default provider.
    super::super::crypto::install();
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_der(&b64(RSA_PKCS1_DER_B64)),
        Algorithm::ES256 => EncodingKey::from_ec_der(&b64(EC_PKCS8_DER_B64)),
        Algorithm::EdDSA => EncodingKey::from_ed_der(&b64(ED_PKCS8_DER_B64)),
        _ => unreachable!(),
    };
    let mut h = JwtHeader::new(alg);
    h.kid = Some(kid.to_string());
    encode(&h, claims, &key).unwrap()
}

fn hs256(secret: &[u8], kid: Option<&str>, claims: &serde_json::Value) -> String {
    super::super::crypto::install();
    let mut h = JwtHeader::new(Algorithm::HS256);
    h.kid = kid.map(str::to_string);
    encode(&h, claims, &EncodingKey::from_secret(secret)).unwrap()
}

fn check(set: &KeySet, token: &str, allowed: &[Algorithm]) -> Result<Claims, JwtError> {
    let h = header(token, allowed)?;
    let mut v = validation();
    v.algorithms = vec![h.alg];
    set.verify(token, &h, &v)
}

#[test]
fn jwks_keeps_only_signature_keys_that_fit_their_type() {
    let set = KeySet::from_jwks(&jwks(), ALLOWED).unwrap();
    assert_eq!(set.len(), 3, "{set:?}");
    assert!(set.has(Some("rsa"), Algorithm::RS256));
    assert!(set.has(Some("ec"), Algorithm::ES256));
    assert!(set.has(Some("ed"), Algorithm::EdDSA));
    assert!(!set.has(Some("rsa"), Algorithm::HS256));
    assert!(!set.has(Some("oct"), Algorithm::HS256));
    // Algorithms outside the allowed list are dropped at load.
    let only_rs = KeySet::from_jwks(&jwks(), &[Algorithm::RS256]).unwrap();
    assert_eq!(only_rs.len(), 1);
    assert!(KeySet::from_jwks(b"{}", ALLOWED).is_err());
}

#[test]
fn a_kid_only_kidless_keys_could_match_is_not_known() {
    let jwks = json!({"keys": [{"kty": "RSA", "n": RSA_N, "e": "AQAB"}]}).to_string();
    let set = KeySet::from_jwks(jwks.as_bytes(), ALLOWED).unwrap();
    // Tried for any kid, but a new kid still asks for a refresh first.
    assert!(set.has(Some("new"), Algorithm::RS256));
    assert!(!set.knows(Some("new"), Algorithm::RS256));
    assert!(set.knows(None, Algorithm::RS256));
    assert!(!set.knows(None, Algorithm::ES256));
    let token = sign(Algorithm::RS256, "new", &claims());
    assert!(check(&set, &token, ALLOWED).is_ok());
}

#[test]
fn accepts_rs256_es256_eddsa() {
    let set = KeySet::from_jwks(&jwks(), ALLOWED).unwrap();
    for (alg, kid) in [
        (Algorithm::RS256, "rsa"),
        (Algorithm::ES256, "ec"),
        (Algorithm::EdDSA, "ed"),
    ] {
        let t = sign(alg, kid, &claims());
        let c = check(&set, &t, ALLOWED).unwrap_or_else(|e| panic!("{alg:?}: {e}"));
        assert_eq!(c["sub"], "svc");
    }
}

#[test]
fn rejects_alg_none() {
    let set = KeySet::from_jwks(&jwks(), ALLOWED).unwrap();
    for alg in ["none", "None", "NONE"] {
        let h = b64url(
            json!({"alg": alg, "typ": "JWT", "kid": "rsa"})
                .to_string()
                .as_bytes(),
        );
        let p = b64url(claims().to_string().as_bytes());
        for sig in ["", "AAAA"] {
            let t = format!("{h}.{p}.{sig}");
            assert_eq!(check(&set, &t, ALLOWED), Err(JwtError::Malformed), "{t}");
        }
    }
}

#[test]
fn rejects_hs256_signed_with_the_rsa_public_key() {
    let set = KeySet::from_jwks(&jwks(), ALLOWED).unwrap();
    let pem = RSA_PUBLIC_PEM.as_bytes();
    let n = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(RSA_N)
        .unwrap();
    for secret in [pem, &n[..]] {
        for kid in [Some("rsa"), Some("oct"), Some("lying"), None] {
            let t = hs256(secret, kid, &claims());
            // HS256 not accepted at all.
            assert_eq!(check(&set, &t, ALLOWED), Err(JwtError::Algorithm));
            // Even where HS256 is accepted, no JWKS key verifies it.
            let mut with_hs = ALLOWED.to_vec();
            with_hs.push(Algorithm::HS256);
            let set = KeySet::from_jwks(&jwks(), &with_hs).unwrap();
            assert_eq!(check(&set, &t, &with_hs), Err(JwtError::UnknownKey));
        }
    }
}

#[test]
fn rs256_token_is_not_verified_by_a_key_of_another_type() {
    let set = KeySet::from_jwks(&jwks(), ALLOWED).unwrap();
    // Signed by the RSA key but claiming the EC key's kid.
    let t = sign(Algorithm::RS256, "ec", &claims());
    assert_eq!(check(&set, &t, ALLOWED), Err(JwtError::UnknownKey));
}

#[test]
fn hs256_with_a_configured_secret() {
    let mut set = KeySet::default();
    set.add_hs256(b"a shared secret of some length!!");
    let allowed = [Algorithm::HS256];
    let good = hs256(b"a shared secret of some length!!", Some("any"), &claims());
    assert!(check(&set, &good, &allowed).is_ok());
    let bad = hs256(b"another secret", None, &claims());
    assert_eq!(
        check(&set, &bad, &allowed),
        Err(JwtError::Invalid("bad signature".into()))
    );
}

#[test]
fn checks_time_issuer_audience_and_unknown_kid() {
    let set = KeySet::from_jwks(&jwks(), ALLOWED).unwrap();
    let cases = [
        (json!({"exp": now() - 120}), "token expired"),
        (json!({"nbf": now() + 120}), "token not valid yet"),
        (json!({"iss": "https://evil.test"}), "wrong issuer"),
        (json!({"aud": "https://other.test"}), "wrong audience"),
        (json!({"aud": null}), "token lacks the \"aud\" claim"),
        (json!({"exp": null}), "token lacks the \"exp\" claim"),
        (json!({"exp": "tomorrow"}), "token lacks the \"exp\" claim"),
    ];
    for (patch, why) in cases {
        let mut c = claims();
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        let t = sign(Algorithm::RS256, "rsa", &c);
        assert_eq!(
            check(&set, &t, ALLOWED),
            Err(JwtError::Invalid(why.into())),
            "{patch}"
        );
    }
    // Within the leeway.
    let mut c = claims();
    c["exp"] = json!(now() - 10);
    c["nbf"] = json!(now() + 10);
    assert!(check(&set, &sign(Algorithm::RS256, "rsa", &c), ALLOWED).is_ok());
    // An audience list containing ours.
    c["aud"] = json!(["x", AUD]);
    assert!(check(&set, &sign(Algorithm::RS256, "rsa", &c), ALLOWED).is_ok());
    let t = sign(Algorithm::RS256, "rotated", &claims());
    assert_eq!(check(&set, &t, ALLOWED), Err(JwtError::UnknownKey));
}

#[test]
fn rejects_garbage() {
    let set = KeySet::from_jwks(&jwks(), ALLOWED).unwrap();
    for t in [
        "",
        "a.b",
        "a.b.c",
        "....",
        "eyJhbGciOiJSUzI1NiJ9.e30",
        "x.y.z.w",
    ] {
        assert_eq!(check(&set, t, ALLOWED), Err(JwtError::Malformed), "{t}");
    }
    let t = sign(Algorithm::RS256, "rsa", &claims());
    let mut parts: Vec<&str> = t.split('.').collect();
    let forged = b64url(
        json!({"sub": "admin", "iss": ISS, "aud": AUD, "exp": now() + 300})
            .to_string()
            .as_bytes(),
    );
    parts[1] = &forged;
    assert_eq!(
        check(&set, &parts.join("."), ALLOWED),
        Err(JwtError::Invalid("bad signature".into()))
    );
}

#[test]
fn a_public_key_is_never_an_hmac_secret() {
    // Below the key set: even handed straight to the library with a
    // validation that asks for HS256, an RSA key verifies nothing.
    let mut v = validation();
    v.algorithms = vec![Algorithm::HS256];
    let pem = RSA_PUBLIC_PEM.as_bytes();
    let token = hs256(pem, Some("rsa"), &claims());
    let by_components = DecodingKey::from_rsa_components(RSA_N, "AQAB").unwrap();
    let by_der = DecodingKey::from_rsa_der(pem);
    for key in [by_components, by_der] {
        let err = jsonwebtoken::decode::<Claims>(&token, &key, &v).unwrap_err();
        assert_eq!(
            *err.kind(),
            jsonwebtoken::errors::ErrorKind::InvalidAlgorithm
        );
    }
}

/// The cost of verifying one RS256 token without the verified-token cache
/// (what a request with a token not seen before pays): signature, header
/// and claims. Printed for `cargo xtask bench jwt`, which runs it in a
/// release build; the bound here only catches a pathological slowdown.
#[test]
fn rs256_verification_cost() {
    let set = KeySet::from_jwks(&jwks(), ALLOWED).unwrap();
    let tokens: Vec<String> = (0..16)
        .map(|i| {
            let mut c = claims();
            c["jti"] = json!(i);
            sign(Algorithm::RS256, "rsa", &c)
        })
        .collect();
    let n = if cfg!(debug_assertions) { 200 } else { 5_000 };
    let start = std::time::Instant::now();
    for i in 0..n {
        let c = check(&set, &tokens[i % tokens.len()], ALLOWED).unwrap();
        std::hint::black_box(c);
    }
    let per = start.elapsed() / u32::try_from(n).unwrap();
    eprintln!(
        "jwt RS256 verify: {:.1} us per token (2048-bit key, uncached)",
        per.as_secs_f64() * 1e6
    );
    assert!(per < std::time::Duration::from_millis(20), "{per:?}");
}

#[test]
fn numeric_dates() {
    use crate::auth::jwt::numeric_date;
    assert_eq!(numeric_date(&json!(1_700_000_000)), Some(1_700_000_000));
    assert_eq!(numeric_date(&json!(1_700_000_000.9)), Some(1_700_000_000));
    assert_eq!(numeric_date(&json!(-3)), Some(0));
    assert_eq!(numeric_date(&json!(1e300)), Some(u64::MAX));
    assert_eq!(numeric_date(&json!("1700000000")), None);
    assert_eq!(numeric_date(&json!(null)), None);
}
