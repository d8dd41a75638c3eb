//! TLS termination settings: PEM chains and keys loaded at config load, one
//! rustls `ServerConfig` per listener with certificates chosen by SNI
//! (exact names, then `*.example.com` wildcards, then the first certificate),
//! TLS 1.2 and 1.3 only, ALPN `h2`/`http/1.1`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::ring;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use toml::Spanned;

use crate::config::Problem;
use crate::config::file::Tls;

/// Picks a certificate by SNI.
#[derive(Debug)]
struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `(".example.com", key)` for `*.example.com`.
    wildcard: Vec<(String, Arc<CertifiedKey>)>,
    default: Arc<CertifiedKey>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else {
            return Some(self.default.clone());
        };
        let name = name.to_ascii_lowercase();
        if let Some(k) = self.exact.get(&name) {
            return Some(k.clone());
        }
        // A wildcard covers exactly one label.
        if let Some(dot) = name.find('.') {
            let suffix = &name[dot..];
            if let Some((_, k)) = self.wildcard.iter().find(|(s, _)| s == suffix) {
                return Some(k.clone());
            }
        }
        Some(self.default.clone())
    }
}

/// Builds a listener's rustls config, reporting every unreadable or invalid
/// certificate and key.
pub fn server_config(
    base: &Path,
    tls: &Spanned<Tls>,
    http2: bool,
) -> Result<Arc<rustls::ServerConfig>, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut exact = HashMap::new();
    let mut wildcard = Vec::new();
    let mut default = None;
    if tls.get_ref().certificates.is_empty() {
        problems.push(Problem::at(
            tls.span(),
            "tls needs at least one certificate",
        ));
    }
    for c in &tls.get_ref().certificates {
        let Some(key) = load_certified_key(base, &c.cert, &c.key, &mut problems) else {
            continue;
        };
        let key = Arc::new(key);
        for n in &c.server_names {
            let n_l = n.get_ref().to_ascii_lowercase();
            if let Some(suffix) = n_l.strip_prefix("*.") {
                wildcard.push((format!(".{suffix}"), key.clone()));
            } else if n_l.is_empty() || n_l.contains('*') {
                problems.push(Problem::at(
                    n.span(),
                    format!("invalid server name {:?}", n.get_ref()),
                ));
            } else {
                exact.insert(n_l, key.clone());
            }
        }
        default.get_or_insert(key);
    }
    let Some(default) = default else {
        return Err(problems);
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let provider = Arc::new(ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| vec![Problem::at(tls.span(), format!("TLS setup failed: {e}"))])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver {
            exact,
            wildcard,
            default,
        }));
    cfg.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(Arc::new(cfg))
}

pub(crate) fn load_certified_key(
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
