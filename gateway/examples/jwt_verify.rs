//! Micro-benchmark: what verifying a JWT costs per request.
//!
//! `cargo run --release -p gateway --example jwt_verify` (pin it to a core
//! with `taskset -c 1` for steadier figures). Prints, per algorithm, the
//! cost of a full verification (header, signature, claims) of a token like
//! the ones oidc-provider issues, and the cost of a request whose token the
//! route has verified before (the verified-token cache).

use std::time::Instant;

use base64::Engine as _;
use gateway::auth::jwt::{self, KeySet};
use jsonwebtoken::{Algorithm, EncodingKey, Header, Validation, encode};
use serde_json::json;

#[allow(dead_code)] // Not every key is used here.
mod keys {
    include!("../src/auth/test_keys.rs");
}
use keys::*;

/// Best of five rounds of `n` calls, in microseconds per call.
fn best_of(n: u32, mut f: impl FnMut()) -> f64 {
    for _ in 0..n / 10 {
        f();
    }
    (0..5)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..n {
                f();
            }
            t.elapsed().as_secs_f64() * 1e6 / f64::from(n)
        })
        .fold(f64::MAX, f64::min)
}

fn main() {
    let b64 = |s: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .expect("fixture")
    };
    let jwks = json!({"keys": [
        {"kty": "RSA", "kid": "rsa", "alg": "RS256", "use": "sig", "n": RSA_N, "e": "AQAB"},
        {"kty": "EC", "kid": "ec", "crv": "P-256", "x": EC_X, "y": EC_Y},
        {"kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": ED_X},
    ]})
    .to_string();
    let allowed = [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA];
    // Loading the keys installs the gateway's ring verifier.
    let set = KeySet::from_jwks(jwks.as_bytes(), &allowed).expect("jwks");
    let now = jsonwebtoken::get_current_timestamp();
    let iss = "http://127.0.0.1:38713";
    let aud = "https://api.example";
    let claims = json!({
        "jti": "cJia6yaaRN5f1ysUspO2Rqve3ZVeqDYILnKDElA9_fQ", "sub": "svc", "client_id": "svc",
        "iss": iss, "aud": aud, "iat": now, "exp": now + 3600, "scope": "read write",
    });
    for (alg, kid, key) in [
        (
            Algorithm::RS256,
            "rsa",
            EncodingKey::from_rsa_der(&b64(RSA_PKCS1_DER_B64)),
        ),
        (
            Algorithm::ES256,
            "ec",
            EncodingKey::from_ec_der(&b64(EC_PKCS8_DER_B64)),
        ),
        (
            Algorithm::EdDSA,
            "ed",
            EncodingKey::from_ed_der(&b64(ED_PKCS8_DER_B64)),
        ),
    ] {
        let mut h = Header::new(alg);
        h.kid = Some(kid.into());
        h.typ = Some("at+jwt".into());
        let token = encode(&h, &claims, &key).expect("sign");
        let mut v = Validation::new(alg);
        v.leeway = 30;
        v.validate_nbf = true;
        v.set_issuer(&[iss]);
        v.set_audience(&[aud]);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        let us = best_of(5_000, || {
            let hd = jwt::header(&token, &allowed).expect("header");
            std::hint::black_box(set.verify(&token, &hd, &v).expect("verify"));
        });
        println!(
            "{alg:?}: {us:.1} µs per full verification ({} byte token)",
            token.len()
        );
    }

    // A token the route verified before: Provider::verify answers from its
    // cache (SHA-256 of the token, one lookup). HS256 needs no JWKS fetch.
    let text = format!(
        r#"
[[identity_providers]]
name = "p"
issuer = "{iss}"
jwks_uri = "http://127.0.0.1:1/jwks"
audiences = ["{aud}"]
algorithms = ["HS256"]
hs256_secrets = ["0123456789abcdef0123456789abcdef"]
"#
    );
    let config = gateway::config::Config::from_text(std::path::Path::new("bench.toml"), text)
        .expect("config");
    let provider = config.auth.providers[0].clone();
    let validations = provider.validations(&[aud.to_string()]);
    let mut padded = claims.clone();
    padded["pad"] = json!("x".repeat(250)); // as long as the RS256 token
    let token = encode(
        &Header::new(Algorithm::HS256),
        &padded,
        &EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
    )
    .expect("sign");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        provider.verify(&token, &validations).await.expect("verify");
        let t = Instant::now();
        let n = 200_000;
        for _ in 0..n {
            std::hint::black_box(provider.verify(&token, &validations).await.expect("verify"));
        }
        let us = t.elapsed().as_secs_f64() * 1e6 / f64::from(n);
        println!(
            "cached: {us:.2} µs per request with a token verified before ({} byte token)",
            token.len()
        );
    });
}
