//! Signature verification for `jsonwebtoken` on `ring` (which rustls already
//! brings in), installed as its process-wide `CryptoProvider`.
//!
//! Why: `jsonwebtoken` 11 offers RustCrypto or aws-lc-rs. aws-lc-rs needs
//! cmake and a C toolchain at build time; RustCrypto's `rsa` verifies an
//! RS256 token in about 290 µs on the test machine — ten times what the
//! rest of a proxied request costs — where `ring` takes a small fraction of
//! that (figures in docs/auth.md). Signing (tests only) and the JWK helpers
//! stay RustCrypto's.
//!
//! Each verifier first checks that the key's family fits the algorithm, so a
//! public key is never used as an HMAC secret, whatever the token says.

use std::sync::OnceLock;

use jsonwebtoken::crypto::{CryptoProvider, JwtVerifier};
use jsonwebtoken::errors::{Error, ErrorKind};
use jsonwebtoken::signature::{self, Verifier};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind};
use ring::signature as rs;

/// Installs the provider once; later calls are a load of a flag.
pub fn install() {
    static PROVIDER: OnceLock<CryptoProvider> = OnceLock::new();
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let base = &jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER;
        let provider = PROVIDER.get_or_init(|| CryptoProvider {
            signer_factory: base.signer_factory,
            verifier_factory: new_verifier,
            key_utils: base.key_utils.clone(),
        });
        // Fails only if the library was used before (it then fixes its
        // default): verification still works, on RustCrypto.
        if provider.install_default().is_err() {
            tracing::warn!("jsonwebtoken was used before its ring provider was installed");
        }
    });
}

/// Key material a verifier owns.
enum Material {
    /// RSA modulus and exponent.
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// RSA as PKCS#1 DER.
    RsaDer(Vec<u8>),
    /// An EC point, an Ed25519 key, or an HMAC secret.
    Bytes(Vec<u8>),
}

struct RingVerifier {
    alg: Algorithm,
    key: Material,
}

fn new_verifier(alg: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>, Error> {
    if key.family() != alg.family() {
        return Err(ErrorKind::InvalidAlgorithm.into());
    }
    let key = match (key.kind(), alg.family()) {
        (DecodingKeyKind::RsaModulusExponent { n, e }, _) => Material::Rsa {
            n: n.clone(),
            e: e.clone(),
        },
        (DecodingKeyKind::SecretOrDer(der), jsonwebtoken::AlgorithmFamily::Rsa) => {
            Material::RsaDer(der.clone())
        }
        (DecodingKeyKind::SecretOrDer(b), _) => Material::Bytes(b.clone()),
    };
    Ok(Box::new(RingVerifier { alg: *alg, key }))
}

impl Verifier<Vec<u8>> for RingVerifier {
    fn verify(&self, msg: &[u8], sig: &Vec<u8>) -> Result<(), signature::Error> {
        use Algorithm::*;
        let fail = |_| signature::Error::new();
        let hmac = |a| match &self.key {
            Material::Bytes(secret) => {
                ring::hmac::verify(&ring::hmac::Key::new(a, secret), msg, sig).map_err(fail)
            }
            _ => Err(signature::Error::new()),
        };
        let rsa: &'static rs::RsaParameters = match self.alg {
            HS256 => return hmac(ring::hmac::HMAC_SHA256),
            HS384 => return hmac(ring::hmac::HMAC_SHA384),
            HS512 => return hmac(ring::hmac::HMAC_SHA512),
            ES256 | ES384 | EdDSA => {
                let params: &'static dyn rs::VerificationAlgorithm = match self.alg {
                    ES256 => &rs::ECDSA_P256_SHA256_FIXED,
                    ES384 => &rs::ECDSA_P384_SHA384_FIXED,
                    _ => &rs::ED25519,
                };
                let Material::Bytes(public) = &self.key else {
                    return Err(signature::Error::new());
                };
                return rs::UnparsedPublicKey::new(params, public)
                    .verify(msg, sig)
                    .map_err(fail);
            }
            RS256 => &rs::RSA_PKCS1_2048_8192_SHA256,
            RS384 => &rs::RSA_PKCS1_2048_8192_SHA384,
            RS512 => &rs::RSA_PKCS1_2048_8192_SHA512,
            PS256 => &rs::RSA_PSS_2048_8192_SHA256,
            PS384 => &rs::RSA_PSS_2048_8192_SHA384,
            PS512 => &rs::RSA_PSS_2048_8192_SHA512,
            _ => return Err(signature::Error::new()),
        };
        match &self.key {
            Material::Rsa { n, e } => rs::RsaPublicKeyComponents { n, e }
                .verify(rsa, msg, sig)
                .map_err(fail),
            Material::RsaDer(der) => rs::UnparsedPublicKey::new(rsa, der)
                .verify(msg, sig)
                .map_err(fail),
            Material::Bytes(_) => Err(signature::Error::new()),
        }
    }
}

impl JwtVerifier for RingVerifier {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}
