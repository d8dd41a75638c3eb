//! TLS to targets (`[upstreams.tls]`): the rustls client settings compiled
//! at load (trusted roots, client certificate for mutual TLS, ALPN for the
//! pool's protocol, the server name to send and verify) and the handshake
//! on a new connection. TLS 1.2 and 1.3 on ring, like the listeners.
//!
//! The server name is `sni` when set, else the DNS name of a `dns`
//! upstream (its targets are addresses), else the target's own host; an IP
//! address is verified against the certificate's IP entries and sends no
//! SNI. The files are read by `crate::pem`.

use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Arc;

use http::uri::Authority;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::{CryptoProvider, ring};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use toml::Spanned;

use crate::config::Problem;
use crate::config::file::{UpstreamProtocol, UpstreamTls};

/// An upstream's compiled TLS settings.
#[derive(Clone)]
pub struct Tls {
    /// The rustls client settings (ALPN set for the pool's protocol).
    pub config: Arc<rustls::ClientConfig>,
    /// Fixed server name, when one applies to every target.
    pub server_name: Option<ServerName<'static>>,
    /// Whether the targets' certificates are verified.
    pub verify: bool,
    /// Whether a client certificate is offered (mutual TLS).
    pub client_cert: bool,
    /// Digest of the settings and the files' contents: a reload that
    /// changes neither keeps the pool (and its connections).
    digest: u64,
}

impl PartialEq for Tls {
    fn eq(&self, other: &Tls) -> bool {
        self.digest == other.digest
    }
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("server_name", &self.server_name)
            .field("alpn", &self.config.alpn_protocols)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// For `GET /admin/upstreams`.
    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "server_name": self.server_name.as_ref().map(|n| n.to_str().into_owned()),
            "verify": self.verify,
            "client_certificate": self.client_cert,
        })
    }

    /// The name sent to and verified for `target`.
    pub fn server_name(&self, target: &Authority) -> std::io::Result<ServerName<'static>> {
        if let Some(n) = &self.server_name {
            return Ok(n.clone());
        }
        let host = target.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        ServerName::try_from(host.to_string()).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{host:?} is not a valid TLS server name: {e}"),
            )
        })
    }

    /// Runs the TLS handshake on `tcp`, a new connection to `target`.
    pub async fn handshake(
        &self,
        tcp: TcpStream,
        target: &Authority,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let name = self.server_name(target)?;
        tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(name, tcp)
            .await
    }
}

/// Whether `e` (or an error in its source chain) is a TLS failure: a
/// handshake that failed or a certificate that was refused.
pub fn is_tls_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if e.is::<rustls::Error>()
            || matches!(
                e.downcast_ref::<super::conn::ConnectError>(),
                Some(super::conn::ConnectError::Tls(_))
            )
            || e.downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
                .is_some_and(|inner| inner.is::<rustls::Error>())
        {
            return true;
        }
        next = e.source();
    }
    false
}

/// Compiles `[upstreams.tls]`; `dns_name` is the name a `dns` upstream
/// resolves. Reports every unreadable file and conflicting setting.
pub fn compile(
    base: &Path,
    spec: &Spanned<UpstreamTls>,
    protocol: UpstreamProtocol,
    dns_name: Option<&str>,
    problems: &mut Vec<Problem>,
) -> Option<Tls> {
    let t = spec.get_ref();
    let before = problems.len();
    let mut digest = std::collections::hash_map::DefaultHasher::new();
    (t.verify, protocol == UpstreamProtocol::Http2).hash(&mut digest);
    let name = t.sni.as_ref().map(|s| s.get_ref().as_str()).or(dns_name);
    name.hash(&mut digest);
    let server_name = match name {
        None => None,
        Some(n) => match ServerName::try_from(n.to_string()) {
            Ok(n) => Some(n),
            Err(e) => {
                let span = t.sni.as_ref().map_or(spec.span(), Spanned::span);
                problems.push(Problem::at(
                    span,
                    format!("{n:?} is not a valid TLS server name: {e}"),
                ));
                None
            }
        },
    };
    let provider = Arc::new(ring::default_provider());
    let verifier: Option<Arc<dyn ServerCertVerifier>> = match (&t.ca_file, t.verify) {
        (Some(ca), false) => {
            problems.push(Problem::at(
                ca.span(),
                "ca_file has no effect with verify = false; remove one of them",
            ));
            None
        }
        (None, false) => Some(Arc::new(Unverified(provider.clone()))),
        (ca, true) => {
            let roots = match ca {
                None => Ok(crate::pem::system_roots()),
                Some(ca) => {
                    let path = crate::config::compile_resolve(base, ca.get_ref());
                    hash_file(&path, &mut digest);
                    crate::pem::ca_roots(&path)
                        .map(Arc::new)
                        .map_err(|e| (ca.span(), e))
                }
            };
            match roots {
                Ok(roots) if roots.is_empty() => {
                    problems.push(Problem::at(
                        spec.span(),
                        "no trusted CA certificates: the system has none; set ca_file",
                    ));
                    None
                }
                Ok(roots) => {
                    match WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                        .build()
                    {
                        Ok(v) => Some(v),
                        Err(e) => {
                            problems.push(Problem::at(spec.span(), format!("TLS setup: {e}")));
                            None
                        }
                    }
                }
                Err((span, e)) => {
                    problems.push(Problem::at(span, e));
                    None
                }
            }
        }
    };
    let client_cert = match (&t.cert, &t.key) {
        (None, None) => None,
        (Some(cert), Some(key)) => {
            for f in [cert, key] {
                hash_file(
                    &crate::config::compile_resolve(base, f.get_ref()),
                    &mut digest,
                );
            }
            crate::pem::certified_key(base, cert, key, problems).map(Arc::new)
        }
        (Some(only), None) | (None, Some(only)) => {
            problems.push(Problem::at(
                only.span(),
                "a client certificate needs both cert and key",
            ));
            None
        }
    };
    if problems.len() > before {
        return None;
    }
    let verifier = verifier?;
    let builder = match rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    {
        Ok(b) => b.dangerous().with_custom_certificate_verifier(verifier),
        Err(e) => {
            problems.push(Problem::at(spec.span(), format!("TLS setup: {e}")));
            return None;
        }
    };
    let offers_cert = client_cert.is_some();
    let mut config = match client_cert {
        Some(key) => builder.with_client_cert_resolver(Arc::new(ClientCert(key))),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = match protocol {
        UpstreamProtocol::Http1 => vec![b"http/1.1".to_vec()],
        UpstreamProtocol::Http2 => vec![b"h2".to_vec()],
    };
    Some(Tls {
        config: Arc::new(config),
        server_name,
        verify: t.verify,
        client_cert: offers_cert,
        digest: digest.finish(),
    })
}

/// Folds a file's contents into `digest` (a file that cannot be read is
/// reported by whoever loads it).
fn hash_file(path: &Path, digest: &mut impl Hasher) {
    path.hash(digest);
    if let Ok(bytes) = std::fs::read(path) {
        bytes.hash(digest);
    }
}

/// The client certificate, offered whenever a target asks for one.
#[derive(Debug)]
struct ClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for ClientCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// `verify = false`: any certificate is accepted, but the handshake's
/// signatures are still checked (the peer holds the key of what it sent).
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
