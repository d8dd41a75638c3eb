//! Authentication and authorization through the real gateway binary: API
//! keys (header and query), HTTP Basic (bcrypt and argon2), authorization
//! rules (groups, methods, scopes), identity headers and credential
//! stripping, the watched consumers file, config problems; and against a
//! real OpenID Connect provider (oidc-provider on Node.js, see
//! `gateway_tests::idp`): discovery + JWKS for RS256/ES256/EdDSA, key
//! rotation, hostile tokens, introspection; and forward auth.

use std::time::{Duration, Instant};

use bytes::Bytes;
use gateway_tests::backend::Backend;
use gateway_tests::client::{self, Reply};
use gateway_tests::free_port;
use gateway_tests::gateway::{Gateway, run_cli};
use http::Request;
use http_body_util::Full;
use sha2::{Digest, Sha256};

fn sha256_hex(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn bcrypt_hash(pw: &str) -> String {
    // Cost 4: the lowest, to keep the tests quick; production uses 10+.
    bcrypt::hash(pw, 4).expect("bcrypt")
}

fn argon2_hash(pw: &str) -> String {
    use argon2::PasswordHasher;
    let params = argon2::Params::new(1024, 1, 1, None).expect("params");
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password_with_salt(pw.as_bytes(), b"test-salt-16byte")
        .expect("argon2")
        .to_string()
}

fn basic(user: &str, pw: &str) -> String {
    // Base64 by hand keeps the test crate's dependencies small.
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let raw = format!("{user}:{pw}").into_bytes();
    let mut out = String::from("Basic ");
    for chunk in raw.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

async fn send(base: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("{base}{path}"))
        .header("host", "x");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    client::send(
        &client::http1(),
        req.body(Full::<Bytes>::default()).expect("request"),
    )
    .await
}

/// Asserts a problem+json answer with `status` and returns it.
fn problem(r: &Reply, status: u16) -> serde_json::Value {
    assert_eq!(r.status.as_u16(), status, "body: {}", r.text());
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    let v = r.json();
    assert_eq!(v["status"], status);
    v
}

/// The headers the backend received.
fn seen(r: &Reply) -> serde_json::Value {
    assert_eq!(r.status.as_u16(), 200, "body: {}", r.text());
    r.json()["headers"].clone()
}

fn common(admin: &str, port: u16, backend: &Backend) -> String {
    format!(
        r#"
[server]
workers = 2
watch_config = false
[admin]
listen = "{admin}"
[[listeners]]
name = "main"
listen = "127.0.0.1:{port}"
[[upstreams]]
name = "one"
targets = ["{b}"]
"#,
        b = backend.addr
    )
}

struct Local {
    gw: Gateway,
    base: String,
    consumers_dir: tempfile::TempDir,
}

const CAROL_KEY: &str = "key-carol-0123456789";
const DAVE_KEY: &str = "key-dave-0123456789";

fn consumers_file(name: &str, key: &str) -> String {
    format!(
        "[[consumers]]\nname = \"{name}\"\ngroups = [\"file\"]\napi_keys = [\"sha256:{}\"]\n",
        sha256_hex(key)
    )
}

fn start_local(backend: &Backend) -> Local {
    let port = free_port();
    let admin = format!("127.0.0.1:{}", free_port());
    let consumers_dir = tempfile::tempdir().expect("tempdir");
    let file = consumers_dir.path().join("consumers.toml");
    std::fs::write(&file, consumers_file("carol", CAROL_KEY)).expect("write consumers");
    let config = format!(
        r#"consumers_file = "{file}"
{common}
[[consumers]]
name = "alice"
groups = ["admins"]
scopes = ["read", "write"]
api_keys = ["sha256:{alice_key}"]
password_hash = "{alice_pw}"

[[consumers]]
name = "bob"
groups = ["users"]
scopes = ["read"]
api_keys = ["sha256:{bob_key}"]
username = "bobby"
password_hash = "{bob_pw}"

[[routes]]
name = "keys"
upstream = "one"
[routes.match]
path_prefix = "/keys/"
[routes.auth]
api_key = {{ query = "api_key" }}

[[routes]]
name = "basic"
upstream = "one"
[routes.match]
path_prefix = "/basic/"
[routes.auth]
basic = {{}}
realm = "staff"

[[routes]]
name = "admin"
upstream = "one"
[routes.match]
path_prefix = "/admin/"
[routes.auth]
api_key = {{}}
basic = {{}}
groups = ["admins"]
methods = ["GET"]

[[routes]]
name = "scoped"
upstream = "one"
[routes.match]
path_prefix = "/scoped/"
[routes.auth]
api_key = {{}}
scopes_all = ["read", "write"]

[[routes]]
name = "keep"
upstream = "one"
[routes.match]
path_prefix = "/keep/"
[routes.auth]
api_key = {{ header = "x-key" }}
strip_credentials = false
consumer_header = "x-who"

[[routes]]
name = "file"
upstream = "one"
[routes.match]
path_prefix = "/file/"
[routes.auth]
api_key = {{}}
groups = ["file"]

[[routes]]
name = "open"
upstream = "one"
[routes.match]
path_prefix = "/"
"#,
        common = common(&admin, port, backend),
        file = file.display(),
        alice_key = sha256_hex("key-alice"),
        bob_key = sha256_hex("key-bob"),
        alice_pw = bcrypt_hash("alice-pw"),
        bob_pw = argon2_hash("bob-pw"),
    );
    let gw = Gateway::start(&config, &admin);
    Local {
        gw,
        base: format!("http://127.0.0.1:{port}"),
        consumers_dir,
    }
}

#[tokio::test]
async fn api_key_in_header_and_query() {
    let b = Backend::start("b").await;
    let env = start_local(&b);

    let r = send(&env.base, "GET", "/keys/x", &[]).await;
    let v = problem(&r, 401);
    assert!(v["detail"].as_str().unwrap().contains("credentials"));
    assert_eq!(
        r.header("www-authenticate"),
        Some("ApiKey realm=\"gateway\", header=\"x-api-key\"")
    );
    let r = send(&env.base, "GET", "/keys/x", &[("x-api-key", "key-mallory")]).await;
    problem(&r, 401);
    let r = send(&env.base, "GET", "/keys/x?api_key=key-mallory", &[]).await;
    problem(&r, 401);
    assert_eq!(b.hits(), 0, "nothing unauthenticated reaches the upstream");

    // The consumer header is the gateway's: a client-sent one is replaced.
    let r = send(
        &env.base,
        "GET",
        "/keys/x",
        &[("x-api-key", "key-alice"), ("x-consumer", "mallory")],
    )
    .await;
    let h = seen(&r);
    assert_eq!(h["x-consumer"], "alice");
    assert!(h.get("x-api-key").is_none(), "key stripped: {h}");

    let r = send(&env.base, "GET", "/keys/x?a=1&api_key=key-bob&b=2", &[]).await;
    let v = r.json();
    assert_eq!(v["headers"]["x-consumer"], "bob");
    assert_eq!(v["query"], "a=1&b=2", "key stripped from the query");

    // An unauthenticated route is untouched, even with a spoofed header.
    let r = send(&env.base, "GET", "/other", &[("x-consumer", "mallory")]).await;
    assert_eq!(seen(&r)["x-consumer"], "mallory");

    // The access log names the consumer.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !env.gw.stdout().contains("\"user.name\":\"bob\"") {
        assert!(
            Instant::now() < deadline,
            "no user.name in {}",
            env.gw.stdout()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn basic_with_bcrypt_and_argon2() {
    let b = Backend::start("b").await;
    let env = start_local(&b);

    let r = send(&env.base, "GET", "/basic/x", &[]).await;
    problem(&r, 401);
    assert_eq!(
        r.header("www-authenticate"),
        Some("Basic realm=\"staff\", charset=\"UTF-8\"")
    );
    for (user, pw) in [
        ("alice", "wrong"),
        ("nobody", "alice-pw"),
        ("bob", "bob-pw"),
    ] {
        let r = send(
            &env.base,
            "GET",
            "/basic/x",
            &[("authorization", &basic(user, pw))],
        )
        .await;
        problem(&r, 401);
    }
    let r = send(
        &env.base,
        "GET",
        "/basic/x",
        &[("authorization", "Basic !!!")],
    )
    .await;
    problem(&r, 401);

    for (user, pw, name) in [("alice", "alice-pw", "alice"), ("bobby", "bob-pw", "bob")] {
        // Twice: the second is answered from the verified cache.
        for _ in 0..2 {
            let r = send(
                &env.base,
                "GET",
                "/basic/x",
                &[("authorization", &basic(user, pw))],
            )
            .await;
            let h = seen(&r);
            assert_eq!(h["x-consumer"], name);
            assert!(
                h.get("authorization").is_none(),
                "credentials stripped: {h}"
            );
        }
    }
}

#[tokio::test]
async fn authorization_groups_methods_scopes() {
    let b = Backend::start("b").await;
    let env = start_local(&b);

    let r = send(&env.base, "GET", "/admin/x", &[("x-api-key", "key-bob")]).await;
    let v = problem(&r, 403);
    assert!(v["detail"].as_str().unwrap().contains("groups"), "{v}");
    let r = send(
        &env.base,
        "GET",
        "/admin/x",
        &[("authorization", &basic("bobby", "bob-pw"))],
    )
    .await;
    problem(&r, 403);
    let r = send(&env.base, "GET", "/admin/x", &[("x-api-key", "key-alice")]).await;
    assert_eq!(seen(&r)["x-consumer"], "alice");
    let r = send(&env.base, "POST", "/admin/x", &[("x-api-key", "key-alice")]).await;
    problem(&r, 403);
    // Without credentials it is 401, not 403: the route lists both challenges.
    let r = send(&env.base, "GET", "/admin/x", &[]).await;
    problem(&r, 401);
    let challenges: Vec<&str> = r
        .headers
        .get_all("www-authenticate")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    assert_eq!(challenges.len(), 2, "{challenges:?}");

    let r = send(&env.base, "GET", "/scoped/x", &[("x-api-key", "key-bob")]).await;
    let v = problem(&r, 403);
    assert!(v["detail"].as_str().unwrap().contains("write"), "{v}");
    let r = send(&env.base, "GET", "/scoped/x", &[("x-api-key", "key-alice")]).await;
    seen(&r);
}

#[tokio::test]
async fn credentials_kept_when_configured() {
    let b = Backend::start("b").await;
    let env = start_local(&b);
    let r = send(
        &env.base,
        "GET",
        "/keep/x",
        &[("x-key", "key-alice"), ("x-who", "mallory")],
    )
    .await;
    let h = seen(&r);
    assert_eq!(h["x-key"], "key-alice");
    assert_eq!(h["x-who"], "alice");
    assert!(h.get("x-consumer").is_none());
}

#[tokio::test]
async fn consumers_file_is_watched() {
    let b = Backend::start("b").await;
    let env = start_local(&b);
    let r = send(&env.base, "GET", "/file/x", &[("x-api-key", CAROL_KEY)]).await;
    assert_eq!(seen(&r)["x-consumer"], "carol");
    // Config consumers are not in the file's group.
    let r = send(&env.base, "GET", "/file/x", &[("x-api-key", "key-alice")]).await;
    problem(&r, 403);

    // Replace carol by dave, as a config manager would (write, rename).
    let file = env.consumers_dir.path().join("consumers.toml");
    let tmp = env.consumers_dir.path().join("consumers.toml.tmp");
    std::fs::write(&tmp, consumers_file("dave", DAVE_KEY)).expect("write");
    std::fs::rename(&tmp, &file).expect("rename");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = send(&env.base, "GET", "/file/x", &[("x-api-key", DAVE_KEY)]).await;
        if r.status == 200 {
            assert_eq!(seen(&r)["x-consumer"], "dave");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dave never admitted: {}",
            env.gw.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = send(&env.base, "GET", "/file/x", &[("x-api-key", CAROL_KEY)]).await;
    problem(&r, 401);

    // A broken file is rejected and the consumers in force stay.
    std::fs::write(
        &tmp,
        "[[consumers]]\nname = \"eve\"\napi_keys = [\"plain-text\"]\n",
    )
    .expect("write");
    std::fs::rename(&tmp, &file).expect("rename");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !env.gw.stderr().contains("consumers file rejected") {
        assert!(
            Instant::now() < deadline,
            "no rejection logged: {}",
            env.gw.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        env.gw.stderr().contains("consumers.toml:3:13"),
        "{}",
        env.gw.stderr()
    );
    let r = send(&env.base, "GET", "/file/x", &[("x-api-key", DAVE_KEY)]).await;
    assert_eq!(seen(&r)["x-consumer"], "dave");
}

#[test]
fn check_reports_auth_problems_with_locations() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        r#"[[listeners]]
name = "main"
listen = "127.0.0.1:1"

[[consumers]]
name = "alice"
api_keys = ["key-in-plain-text"]
password_hash = "hunter2"

[[identity_providers]]
name = "idp"
issuer = "https://idp.example"
algorithms = ["RS256", "none"]

[[routes]]
name = "r"
respond = { status = 200 }
[routes.auth]
jwt = { provider = "nope" }
methods = ["G E T"]

[[routes]]
name = "s"
respond = { status = 200 }
[routes.auth]
scopes_any = ["read"]
"#,
    )
    .expect("write");
    let (code, out, _) = run_cli(&["check", "-c", path.to_str().expect("path")]);
    assert_eq!(code, 2, "{out}");
    let p = path.display();
    for want in [
        format!("{p}:7:13: an API key is stored as \"sha256:\""),
        format!("{p}:8:17: password_hash must be a bcrypt"),
        format!(
            "{p}:12:10: issuer: \"https://idp.example/.well-known/openid-configuration\": https is not supported"
        ),
        format!("{p}:13:24: unsupported algorithm \"none\""),
        format!("{p}:19:20: unknown identity provider \"nope\""),
        format!("{p}:20:12: invalid method \"G E T\""),
        format!("{p}:25:1: [routes.auth] accepts no credentials"),
    ] {
        assert!(out.contains(&want), "missing {want:?} in:\n{out}");
    }
}
