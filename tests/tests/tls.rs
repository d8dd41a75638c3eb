//! TLS termination: certificates chosen by SNI (verified by a rustls
//! client), ALPN to HTTP/2, TLS 1.2 and 1.3.

use std::sync::Arc;

use bytes::Bytes;
use gateway_tests::backend::Backend;
use gateway_tests::free_port;
use gateway_tests::gateway::Gateway;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

struct Certs {
    a: CertificateDer<'static>,
    b: CertificateDer<'static>,
}

/// Writes two self-signed certificates into `dir`: one for a.example.test
/// (and *.a.example.test), one for b.example.test.
fn make_certs(dir: &std::path::Path) -> Certs {
    let mut out = Vec::new();
    for (name, sans) in [
        (
            "a",
            vec!["a.example.test".to_string(), "*.a.example.test".to_string()],
        ),
        ("b", vec!["b.example.test".to_string()]),
    ] {
        let ck = rcgen::generate_simple_self_signed(sans).expect("cert");
        std::fs::write(dir.join(format!("{name}.pem")), ck.cert.pem()).unwrap();
        std::fs::write(
            dir.join(format!("{name}.key")),
            ck.signing_key.serialize_pem(),
        )
        .unwrap();
        out.push(ck.cert.der().clone());
    }
    let b = out.pop().unwrap();
    let a = out.pop().unwrap();
    Certs { a, b }
}

fn client_config(
    certs: &Certs,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certs.a.clone()).unwrap();
    roots.add(certs.b.clone()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

async fn connect(
    addr: &str,
    cfg: Arc<rustls::ClientConfig>,
    sni: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    connect_after(addr, b"", cfg, sni).await
}

/// `connect`, sending `preamble` (a PROXY protocol header) before the
/// handshake.
async fn connect_after(
    addr: &str,
    preamble: &[u8],
    cfg: Arc<rustls::ClientConfig>,
    sni: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    use tokio::io::AsyncWriteExt;
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.write_all(preamble).await?;
    TlsConnector::from(cfg)
        .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await
}

/// A GET for `uri` over HTTP/2 on `tls`.
async fn h2_get(tls: TlsStream<TcpStream>, uri: &str) -> http::Response<hyper::body::Incoming> {
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    send.send_request(Request::get(uri).body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap()
}

fn start(dir: &std::path::Path, backend: &Backend) -> (Gateway, String) {
    start_with(dir, backend, "")
}

/// The TLS listener of `start` with `extra` keys.
fn start_with(dir: &std::path::Path, backend: &Backend, extra: &str) -> (Gateway, String) {
    let port = free_port();
    let admin = format!("127.0.0.1:{}", free_port());
    let config = format!(
        r#"
[server]
workers = 1
watch_config = false
[admin]
listen = "{admin}"
[[listeners]]
name = "tls"
listen = "127.0.0.1:{port}"
{extra}
[[listeners.tls.certificates]]
cert = "{d}/a.pem"
key = "{d}/a.key"
server_names = ["a.example.test", "*.a.example.test"]
[[listeners.tls.certificates]]
cert = "{d}/b.pem"
key = "{d}/b.key"
server_names = ["b.example.test"]
[[upstreams]]
name = "be"
targets = ["{b}"]
[[routes]]
name = "all"
upstream = "be"
"#,
        d = dir.display(),
        b = backend.addr,
    );
    (Gateway::start(&config, &admin), format!("127.0.0.1:{port}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_the_certificate_named_by_sni() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let backend = Backend::start("be").await;
    let (_gw, addr) = start(dir.path(), &backend);
    let v13 = [&rustls::version::TLS13];
    for (sni, want) in [
        ("a.example.test", &certs.a),
        ("b.example.test", &certs.b),
        ("x.a.example.test", &certs.a),
    ] {
        let tls = connect(&addr, client_config(&certs, &[b"http/1.1"], &v13), sni)
            .await
            .unwrap_or_else(|e| panic!("{sni}: {e}"));
        let peer = tls.get_ref().1.peer_certificates().expect("peer certs");
        assert_eq!(&peer[0], want, "certificate served for {sni}");
    }
    // An unknown name gets the first (default) certificate, which the client rejects.
    let err = connect(
        &addr,
        client_config(&certs, &[b"http/1.1"], &v13),
        "c.example.test",
    )
    .await;
    assert!(
        err.is_err(),
        "default certificate does not cover c.example.test"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_http2_over_tls_with_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let backend = Backend::start("be").await;
    let (_gw, addr) = start(dir.path(), &backend);
    for versions in [
        &[&rustls::version::TLS12][..],
        &[&rustls::version::TLS13][..],
    ] {
        // HTTP/1.1.
        let tls = connect(
            &addr,
            client_config(&certs, &[b"http/1.1"], versions),
            "b.example.test",
        )
        .await
        .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let resp = send
            .send_request(
                Request::get("/x")
                    .header("host", "b.example.test")
                    .body(http_body_util::Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["headers"]["x-forwarded-proto"], "https");
        // The same connection again, with a body over many TLS records
        // (once hyper's client has taken in the end of the first answer).
        send.ready().await.expect("the connection stays open");
        let resp = send
            .send_request(
                Request::post("/x")
                    .header("host", "b.example.test")
                    .body(http_body_util::Full::new(Bytes::from(vec![b'z'; 60_000])))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["body_len"], 60_000);

        // HTTP/2 by ALPN.
        let tls = connect(
            &addr,
            client_config(&certs, &[b"h2", b"http/1.1"], versions),
            "a.example.test",
        )
        .await
        .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let resp = h2_get(tls, "https://a.example.test/y").await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), http::Version::HTTP_2);
    }
}

#[test]
fn check_reports_unreadable_and_mismatched_certificates() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let path = dir.path().join("bad.toml");
    let config = format!(
        r#"[[listeners]]
name = "tls"
listen = "127.0.0.1:8443"
[[listeners.tls.certificates]]
cert = "{d}/missing.pem"
key = "{d}/a.key"
[[listeners.tls.certificates]]
cert = "{d}/a.pem"
key = "{d}/b.key"
"#,
        d = dir.path().display()
    );
    std::fs::write(&path, config).unwrap();
    let (code, out, _) = gateway_tests::gateway::run_cli(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    let p = path.display();
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with(&format!("{p}:5:8: cannot read certificate")),
        "{out}"
    );
    assert!(
        lines[1].starts_with(&format!("{p}:9:7: private key"))
            && lines[1].contains("does not match"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_protocol_header_comes_before_the_tls_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let backend = Backend::start("be").await;
    let (_gw, addr) = start_with(dir.path(), &backend, "proxy_protocol = true");
    let tls = connect_after(
        &addr,
        b"PROXY TCP4 203.0.113.7 127.0.0.1 4444 443\r\n",
        client_config(&certs, &[b"h2"], &[&rustls::version::TLS13]),
        "a.example.test",
    )
    .await
    .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let resp = h2_get(tls, "https://a.example.test/x").await;
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["headers"]["x-forwarded-for"], "203.0.113.7");
    assert_eq!(v["headers"]["x-forwarded-proto"], "https");
}

/// `GET path` over HTTP/1.1 on a TLS connection to `addr` made with `cfg`,
/// sending `headers`; the status and the backend's echo, or the error.
async fn mtls_get(
    addr: &str,
    cfg: Arc<rustls::ClientConfig>,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, serde_json::Value), String> {
    let tls = connect(addr, cfg, "gw.test")
        .await
        .map_err(|e| e.to_string())?;
    http1_get(tls, path, headers).await
}

/// `GET path` with `headers` over HTTP/1.1 on `io`: the status and the
/// backend's echo (null when the body is not JSON), or the error.
async fn http1_get<T>(
    io: T,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, serde_json::Value), String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = Request::get(path).header("host", "gw.test");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = send
        .send_request(req.body(Empty::<Bytes>::new()).unwrap())
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    let v = serde_json::from_slice(&body.to_bytes()).unwrap_or(serde_json::Value::Null);
    Ok((status, v))
}

/// A CA for the gateway's certificate, one for clients, the gateway's
/// certificate and a backend.
struct Mtls {
    dir: tempfile::TempDir,
    servers: gateway_tests::pki::Ca,
    clients: gateway_tests::pki::Ca,
    server: gateway_tests::pki::Leaf,
    backend: Backend,
}

impl Mtls {
    async fn new() -> Mtls {
        let dir = tempfile::tempdir().unwrap();
        let servers = gateway_tests::pki::Ca::new(dir.path(), "servers");
        let clients = gateway_tests::pki::Ca::new(dir.path(), "clients");
        let server = servers.server("gw", &["gw.test"]);
        Mtls {
            dir,
            servers,
            clients,
            server,
            backend: Backend::start("be").await,
        }
    }

    /// A gateway with one listener trusting the client CA (`tls` adds to
    /// its `[listeners.tls]`), `top` before it and `route` in its one
    /// route; and the listener's address.
    fn start(&self, top: &str, tls: &str, route: &str) -> (Gateway, String) {
        let port = free_port();
        let admin = format!("127.0.0.1:{}", free_port());
        let config = format!(
            r#"
[server]
workers = 1
[admin]
listen = "{admin}"
{top}
[[listeners]]
name = "mtls"
listen = "127.0.0.1:{port}"
[listeners.tls]
client_ca = "{ca}"
{tls}
[[listeners.tls.certificates]]
cert = "{cert}"
key = "{key}"
[[upstreams]]
name = "be"
targets = ["{b}"]
[[routes]]
name = "all"
upstream = "be"
{route}
"#,
            ca = self.clients.ca_file.display(),
            cert = self.server.cert_file.display(),
            key = self.server.key_file.display(),
            b = self.backend.addr,
        );
        (Gateway::start(&config, &admin), format!("127.0.0.1:{port}"))
    }

    /// `mtls_get` of `/x` presenting `who`'s certificate.
    async fn get(
        &self,
        addr: &str,
        who: &gateway_tests::pki::Leaf,
    ) -> Result<(u16, serde_json::Value), String> {
        mtls_get(addr, who.client_config(&self.servers), "/x", &[]).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_verified_and_described_to_the_upstream() {
    let m = Mtls::new().await;
    let (servers, clients, server, backend) = (&m.servers, &m.clients, &m.server, &m.backend);
    let strangers = gateway_tests::pki::Ca::new(m.dir.path(), "strangers");
    let alice = clients.client("alice");
    let mallory = strangers.client("mallory");
    let (require, optional, forward, plain) = (free_port(), free_port(), free_port(), free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let listener = |name: &str, port: u16, extra: &str, tls: &str| {
        format!(
            r#"
[[listeners]]
name = "{name}"
listen = "127.0.0.1:{port}"
{extra}
{tls}"#
        )
    };
    let tls = |auth: &str| {
        format!(
            r#"[listeners.tls]
client_ca = "{ca}"
{auth}
[[listeners.tls.certificates]]
cert = "{cert}"
key = "{key}""#,
            ca = clients.ca_file.display(),
            cert = server.cert_file.display(),
            key = server.key_file.display(),
        )
    };
    let config = format!(
        r#"
[server]
workers = 1
watch_config = false
[admin]
listen = "{admin}"
{l1}{l2}{l3}{l4}
[[upstreams]]
name = "be"
targets = ["{b}"]
[[routes]]
name = "all"
upstream = "be"
"#,
        l1 = listener("require", require, "", &tls("")),
        l2 = listener("optional", optional, "", &tls("client_auth = \"optional\"")),
        l3 = listener(
            "forward",
            forward,
            "forward_client_cert = \"forward\"",
            &tls("")
        ),
        l4 = listener("plain", plain, "", ""),
        b = backend.addr,
    );
    let gw = Gateway::start(&config, &admin);
    let at = |port: u16| format!("127.0.0.1:{port}");
    let spoof = [("x-forwarded-client-cert", "Hash=00;Subject=\"CN=admin\"")];

    // A certificate from the client CA: the upstream learns which, and a
    // header the client wrote itself is replaced.
    let (status, v) = mtls_get(&at(require), alice.client_config(servers), "/x", &spoof)
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    let xfcc = v["headers"]["x-forwarded-client-cert"].as_str().unwrap();
    assert!(
        xfcc.starts_with(&format!("Hash={};Subject=\"", alice.sha256())),
        "{xfcc}"
    );
    assert!(xfcc.contains("CN=alice"), "{xfcc}");
    // The access log names the certificate too.
    let line = gw.access_log_line(&alice.sha256());
    assert_eq!(line["gateway.listener"], "require", "{line}");
    assert!(
        line["tls.client.subject"]
            .as_str()
            .unwrap()
            .contains("CN=alice"),
        "{line}"
    );

    // Required: no certificate, or one from another CA, gets nothing
    // served (TLS 1.3 reports the refusal at the first read).
    for (who, cfg) in [
        ("none", servers.client_config()),
        ("stranger", mallory.client_config(servers)),
    ] {
        let r = mtls_get(&at(require), cfg, "/x", &[]).await;
        assert!(r.is_err(), "{who}: {r:?}");
    }
    assert_eq!(backend.hits(), 1);

    // Optional: served without a certificate (and without the header);
    // a certificate that does not verify is still refused.
    let (status, v) = mtls_get(&at(optional), servers.client_config(), "/x", &spoof)
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    assert!(v["headers"].get("x-forwarded-client-cert").is_none(), "{v}");
    let (_, v) = mtls_get(&at(optional), alice.client_config(servers), "/x", &[])
        .await
        .unwrap();
    assert!(
        v["headers"]["x-forwarded-client-cert"]
            .as_str()
            .unwrap()
            .contains("CN=alice")
    );
    assert!(
        mtls_get(&at(optional), mallory.client_config(servers), "/x", &[])
            .await
            .is_err()
    );

    // forward_client_cert = "forward": what came in goes on, nothing added.
    let (_, v) = mtls_get(&at(forward), alice.client_config(servers), "/x", &spoof)
        .await
        .unwrap();
    assert_eq!(v["headers"]["x-forwarded-client-cert"], spoof[0].1, "{v}");

    // A plain listener removes a client's claim too.
    let tcp = TcpStream::connect(at(plain)).await.unwrap();
    let (_, c) = http1_get(tcp, "/x", &spoof).await.unwrap();
    assert!(c["headers"].get("x-forwarded-client-cert").is_none(), "{c}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_names_a_consumer() {
    let m = Mtls::new().await;
    let (alice, carol) = (m.clients.client("alice"), m.clients.client("carol"));
    let (gw, addr) = m.start(
        r#"[[consumers]]
name = "alice-svc"
groups = ["ops"]
cert_names = ["spiffe://example.test/alice", "alice"]"#,
        "client_auth = \"optional\"",
        "[routes.auth]\nclient_cert = {}\ngroups = [\"ops\"]",
    );
    let (status, v) = m.get(&addr, &alice).await.unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["headers"]["x-consumer"], "alice-svc", "{v}");
    let line = gw.access_log_line(&alice.sha256());
    assert_eq!(line["user.name"], "alice-svc", "{line}");
    // A certificate from the CA that names no consumer, and none at all.
    let (status, v) = m.get(&addr, &carol).await.unwrap();
    assert_eq!(status, 401, "{v}");
    assert_eq!(
        v["detail"], "the client certificate (CN=carol) names no consumer",
        "{v}"
    );
    let (status, v) = mtls_get(&addr, m.servers.client_config(), "/x", &[])
        .await
        .unwrap();
    assert_eq!(status, 401, "{v}");
    assert_eq!(m.backend.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_client_certificates_are_refused_and_the_list_reloads() {
    let m = Mtls::new().await;
    let (alice, carol) = (m.clients.client("alice"), m.clients.client("carol"));
    // The listener reads `revoked.crl.pem`: carol's certificate first.
    let crl = m.dir.path().join("revoked.crl.pem");
    std::fs::copy(m.clients.crl("carol-revoked", &[&carol]), &crl).unwrap();
    let (gw, addr) = m.start(
        "",
        &format!("client_crl = {:?}", crl.display().to_string()),
        "",
    );
    assert_eq!(m.get(&addr, &alice).await.unwrap().0, 200);
    assert!(m.get(&addr, &carol).await.is_err(), "carol is revoked");

    // A new list (alice revoked instead) takes effect on reload, for new
    // connections.
    std::fs::copy(m.clients.crl("alice-revoked", &[&alice]), &crl).unwrap();
    gw.signal(libc::SIGHUP);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while m.get(&addr, &alice).await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the new list never applied"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(m.get(&addr, &carol).await.unwrap().0, 200);
}
