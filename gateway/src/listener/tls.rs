//! TLS termination settings: PEM chains and keys loaded at config load, one
//! rustls `ServerConfig` per listener with certificates chosen by SNI
//! (exact names, then `*.example.com` wildcards, then the first certificate),
//! TLS 1.2 and 1.3 only, ALPN `h2`/`http/1.1`. With `client_ca`, client
//! certificates are verified (and checked against `client_crl`), and a
//! verified one is described once per connection (`ClientCert`: its hash,
//! subject, names, and the `X-Forwarded-Client-Cert` value).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::ring;
use rustls::pki_types::CertificateDer;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use toml::Spanned;

use crate::config::Problem;
use crate::config::file::{ClientAuth, Tls};

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
        let Some(key) = crate::pem::certified_key(base, &c.cert, &c.key, &mut problems) else {
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
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| vec![Problem::at(tls.span(), format!("TLS setup failed: {e}"))])?;
    let t = tls.get_ref();
    let builder = match &t.client_ca {
        None => {
            if let Some(a) = &t.client_auth {
                return Err(vec![Problem::at(
                    a.span(),
                    "client_auth needs client_ca (the CA client certificates must chain to)",
                )]);
            }
            if let Some(c) = &t.client_crl {
                return Err(vec![Problem::at(
                    c.span(),
                    "client_crl needs client_ca (the CA client certificates must chain to)",
                )]);
            }
            builder.with_no_client_auth()
        }
        Some(ca) => {
            let path = crate::config::compile_resolve(base, ca.get_ref());
            let roots = crate::pem::ca_roots(&path).map_err(|e| vec![Problem::at(ca.span(), e)])?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = match t.client_auth.as_ref().map(|a| *a.get_ref()) {
                Some(ClientAuth::Optional) => verifier.allow_unauthenticated(),
                _ => verifier,
            };
            // The client's own certificate is checked against the lists;
            // one whose issuer has none there is refused.
            let verifier = match &t.client_crl {
                None => verifier,
                Some(c) => verifier
                    .with_crls(crate::pem::crls(base, c).map_err(|e| vec![e])?)
                    .only_check_end_entity_revocation(),
            };
            let verifier = verifier.build().map_err(|e| {
                vec![Problem::at(
                    ca.span(),
                    format!("client certificate verification: {e}"),
                )]
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder.with_cert_resolver(Arc::new(SniResolver {
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

/// A client certificate verified in a handshake, as the upstream is told
/// of it.
#[derive(Debug)]
pub struct ClientCert {
    /// SHA-256 of the certificate (DER), hex.
    pub sha256: Box<str>,
    /// The subject's distinguished name (empty when it cannot be read).
    pub subject: Box<str>,
    /// Names a consumer may be known by (`cert_names`): URI and DNS
    /// subject alternative names, then the subject's common names.
    pub names: Box<[Box<str>]>,
    /// `X-Forwarded-Client-Cert` in Envoy's format:
    /// `Hash=...;Subject="...";URI=...;DNS=...`.
    pub xfcc: http::HeaderValue,
}

impl ClientCert {
    /// Describes `der`, a certificate the handshake verified.
    pub fn describe(der: &CertificateDer<'_>) -> ClientCert {
        use sha2::Digest;
        let mut hex = [0u8; 64];
        crate::hex::encode_into(&sha2::Sha256::digest(der.as_ref()), &mut hex);
        let sha256 = String::from_utf8_lossy(&hex).into_owned();
        let mut xfcc = format!("Hash={sha256}");
        let mut subject = String::new();
        let mut names: Vec<Box<str>> = Vec::new();
        if let Ok((_, cert)) = x509_parser::parse_x509_certificate(der.as_ref()) {
            subject = cert.subject().to_string();
            push_xfcc(&mut xfcc, "Subject", &subject);
            if let Ok(Some(san)) = cert.subject_alternative_name() {
                for name in &san.value.general_names {
                    match name {
                        x509_parser::extensions::GeneralName::URI(u) => {
                            push_xfcc(&mut xfcc, "URI", u);
                            names.push((*u).into());
                        }
                        x509_parser::extensions::GeneralName::DNSName(d) => {
                            push_xfcc(&mut xfcc, "DNS", d);
                            names.push((*d).into());
                        }
                        _ => {}
                    }
                }
            }
            names.extend(
                cert.subject()
                    .iter_common_name()
                    .filter_map(|cn| cn.as_str().ok())
                    .map(Box::from),
            );
        }
        ClientCert {
            xfcc: http::HeaderValue::from_str(&xfcc)
                .unwrap_or_else(|_| http::HeaderValue::from_static("")),
            sha256: sha256.into(),
            subject: subject.into(),
            names: names.into(),
        }
    }
}

/// Appends `;KEY=VALUE` to an XFCC element, quoting a value that holds
/// `,`, `;`, `=` or `"` (and escaping `"` and `\\` inside), as Envoy does.
/// Characters a header value cannot hold are dropped.
fn push_xfcc(out: &mut String, key: &str, value: &str) {
    out.push(';');
    out.push_str(key);
    out.push('=');
    let value: String = value
        .chars()
        .filter(|c| *c == '\t' || (' '..='~').contains(c))
        .collect();
    if value.contains([',', ';', '=', '"']) {
        out.push('"');
        for c in value.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    } else {
        out.push_str(&value);
    }
}
