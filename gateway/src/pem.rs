//! PEM files the gateway reads, each reported at its place in the config
//! when it cannot be used: certificate chains with their keys (listeners,
//! upstream client certificates), CA bundles (`client_ca`, upstream and
//! identity-provider `ca_file`), revocation lists (`client_crl`); and the
//! system's root store, loaded once.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::RootCertStore;
use rustls::crypto::ring;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use toml::Spanned;

use crate::config::Problem;

/// A certificate chain and its private key (PKCS#8, PKCS#1 or SEC1),
/// checked to match.
pub fn certified_key(
    base: &Path,
    cert: &Spanned<String>,
    key: &Spanned<String>,
    problems: &mut Vec<Problem>,
) -> Option<CertifiedKey> {
    let cert_path = crate::config::compile_resolve(base, cert.get_ref());
    let key_path = crate::config::compile_resolve(base, key.get_ref());
    let chain: Vec<CertificateDer<'static>> = match CertificateDer::pem_file_iter(&cert_path) {
        Ok(it) => match it.collect::<Result<Vec<_>, _>>() {
            Ok(c) if !c.is_empty() => c,
            Ok(_) => {
                problems.push(Problem::at(
                    cert.span(),
                    format!("no certificate found in {}", cert_path.display()),
                ));
                return None;
            }
            Err(e) => {
                problems.push(Problem::at(
                    cert.span(),
                    format!("invalid certificate {}: {e}", cert_path.display()),
                ));
                return None;
            }
        },
        Err(e) => {
            problems.push(Problem::at(
                cert.span(),
                format!("cannot read certificate {}: {e}", cert_path.display()),
            ));
            return None;
        }
    };
    let der = match PrivateKeyDer::from_pem_file(&key_path) {
        Ok(k) => k,
        Err(e) => {
            problems.push(Problem::at(
                key.span(),
                format!("cannot read private key {}: {e}", key_path.display()),
            ));
            return None;
        }
    };
    let signing = match ring::sign::any_supported_type(&der) {
        Ok(s) => s,
        Err(e) => {
            problems.push(Problem::at(
                key.span(),
                format!("unsupported private key {}: {e}", key_path.display()),
            ));
            return None;
        }
    };
    let ck = CertifiedKey::new(chain, signing);
    if let Err(e) = ck.keys_match() {
        problems.push(Problem::at(
            key.span(),
            format!(
                "private key {} does not match certificate {}: {e}",
                key_path.display(),
                cert_path.display()
            ),
        ));
        return None;
    }
    Some(ck)
}

/// The system's trusted roots, loaded once per process.
pub fn system_roots() -> Arc<RootCertStore> {
    static SYSTEM: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    SYSTEM
        .get_or_init(|| {
            let mut roots = RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!("system CA certificates: {e}");
            }
            roots.add_parsable_certificates(found.certs);
            Arc::new(roots)
        })
        .clone()
}

/// The CA certificates of the PEM file `path`, as a root store.
pub fn ca_roots(path: &Path) -> Result<RootCertStore, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect())
        .map_err(|e| format!("cannot read CA certificates from {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots
            .add(c)
            .map_err(|e| format!("{}: unusable CA certificate: {e}", path.display()))?;
    }
    Ok(roots)
}

/// The certificate revocation lists of the PEM file `crl`.
pub fn crls(
    base: &Path,
    crl: &Spanned<String>,
) -> Result<Vec<CertificateRevocationListDer<'static>>, Problem> {
    let path = crate::config::compile_resolve(base, crl.get_ref());
    let crls: Vec<_> = CertificateRevocationListDer::pem_file_iter(&path)
        .and_then(|it| it.collect())
        .map_err(|e| {
            Problem::at(
                crl.span(),
                format!("cannot read revocation lists from {}: {e}", path.display()),
            )
        })?;
    if crls.is_empty() {
        return Err(Problem::at(
            crl.span(),
            format!("{} holds no revocation list", path.display()),
        ));
    }
    Ok(crls)
}
