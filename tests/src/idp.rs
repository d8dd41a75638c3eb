//! A real OpenID Connect provider for the auth tests: `tests/idp/idp.mjs`
//! (the `oidc-provider` package, run with the machine's Node.js; `cargo
//! xtask test` installs it with `npm ci`). It listens on an ephemeral
//! 127.0.0.1 port, issues client_credentials tokens (JWT RS256/ES256/EdDSA
//! or opaque, by resource), serves discovery, JWKS and introspection, and
//! has two test-only endpoints: key rotation and hostile tokens.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::client;

/// The client the tests get tokens for, and its secret.
pub const CLIENT: (&str, &str) = ("svc", "svc-secret");
/// The client the gateway introspects as, and its secret.
pub const GATEWAY_CLIENT: (&str, &str) = ("gateway", "gateway-secret");

/// A running provider; killed when dropped.
pub struct Idp {
    child: Child,
    /// `http://127.0.0.1:PORT`: where the tests ask for tokens.
    pub base: String,
    /// `http://127.0.0.1:PORT`, or with TLS `https://127.0.0.1:TLS_PORT`.
    pub issuer: String,
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("idp")
}

impl Idp {
    /// Starts the provider and waits (up to 30 s) until it listens.
    pub fn start() -> Idp {
        Self::spawn(None)
    }

    /// Starts the provider with TLS too (`cert` and `key` are PEM files);
    /// the issuer is then its `https` address.
    pub fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> Idp {
        Self::spawn(Some((cert, key)))
    }

    fn spawn(tls: Option<(&std::path::Path, &std::path::Path)>) -> Idp {
        let dir = dir();
        assert!(
            dir.join("node_modules/oidc-provider").exists(),
            "{} has no node_modules: run `cargo xtask test` (or `npm ci --prefix tests/idp`)",
            dir.display()
        );
        let mut cmd = Command::new("node");
        if let Some((cert, key)) = tls {
            cmd.env("IDP_TLS_CERT", cert).env("IDP_TLS_KEY", key);
        }
        let mut child = cmd
            .arg("idp.mjs")
            .current_dir(&dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start node (Node.js 20+ is needed for the auth tests)");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(ports) = line.strip_prefix("READY ") {
                    let ports: Vec<Option<u16>> =
                        ports.split_whitespace().map(|p| p.parse().ok()).collect();
                    let _ = tx.send(ports);
                }
            }
        });
        let (port, tls_port) = match rx.recv_timeout(Duration::from_secs(30)).as_deref() {
            Ok([Some(p)]) => (*p, None),
            Ok([Some(p), Some(t)]) => (*p, Some(*t)),
            other => {
                let _ = child.kill();
                panic!("the identity provider did not start: {other:?}");
            }
        };
        let base = format!("http://127.0.0.1:{port}");
        let issuer = match tls_port {
            Some(t) => format!("https://127.0.0.1:{t}"),
            None => base.clone(),
        };
        Idp {
            child,
            base,
            issuer,
        }
    }

    /// A client_credentials access token for `resource` with `scope`.
    pub async fn token(&self, resource: &str, scope: &str) -> String {
        let body = format!(
            "grant_type=client_credentials&scope={}&resource={}",
            scope.replace(' ', "+"),
            resource.replace(':', "%3A").replace('/', "%2F")
        );
        let req = Request::post(format!("{}/token", self.base))
            .header("authorization", basic_auth(CLIENT.0, CLIENT.1))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(body)))
            .expect("request");
        let r = client::send(&client::http1(), req).await;
        assert_eq!(r.status, 200, "token request failed: {}", r.text());
        r.json()["access_token"]
            .as_str()
            .expect("access_token")
            .to_string()
    }

    /// A hostile token: `none`, `hs256-confusion`, `expired`, `wrong-aud`,
    /// `wrong-iss`, `not-yet-valid`, `unknown-kid`; or `hs256-shared`, a
    /// valid token signed with `HS256_SECRET` (`hs256-numeric-sub`: the same
    /// with `sub: 42` and `client_id: "admin"`).
    pub async fn forge(&self, kind: &str) -> String {
        let r = client::get(&format!("{}/__forge?kind={kind}", self.base)).await;
        assert_eq!(r.status, 200, "forge {kind}: {}", r.text());
        r.json()["token"].as_str().expect("token").to_string()
    }

    /// Rotates the RSA signing key (the old one stays published unless
    /// `drop`); returns the new `kid`.
    pub async fn rotate(&self, drop: bool) -> String {
        let q = if drop { "?drop=1" } else { "" };
        let req = Request::post(format!("{}/__rotate{q}", self.base))
            .body(Full::default())
            .expect("request");
        let r = client::send(&client::http1(), req).await;
        assert_eq!(r.status, 200, "rotate: {}", r.text());
        r.json()["kid"].as_str().expect("kid").to_string()
    }

    /// Stops the provider now.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The HS256 secret `forge("hs256-shared")` signs with.
pub const HS256_SECRET: &str = "hs256-shared-secret-for-the-tests-0123";

impl Drop for Idp {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An `Authorization: Basic` value.
pub fn basic_auth(user: &str, password: &str) -> String {
    use base64::Engine as _;
    let creds = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {creds}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn basic_auth() {
        assert_eq!(
            super::basic_auth("svc", "svc-secret"),
            "Basic c3ZjOnN2Yy1zZWNyZXQ="
        );
        assert_eq!(super::basic_auth("a", "b"), "Basic YTpi");
        assert_eq!(super::basic_auth("ab", "c"), "Basic YWI6Yw==");
    }
}
