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
use gateway_tests::idp::{GATEWAY_CLIENT, Idp, basic_auth as basic};
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

    // Every place a key is read from is cleared, not only the one used.
    let r = send(
        &env.base,
        "GET",
        "/keys/x?api_key=key-bob&z=1",
        &[("x-api-key", "key-alice"), ("x_consumer", "mallory")],
    )
    .await;
    let v = r.json();
    assert_eq!(v["headers"]["x-consumer"], "alice");
    assert_eq!(v["query"], "z=1", "the unused query key is stripped too");
    assert!(
        v["headers"].get("x_consumer").is_none(),
        "underscore spelling of the identity header removed: {v}"
    );

    // A `Connection` that names the identity header cannot remove it: hop-by-
    // hop headers go before the gateway sets its own.
    let r = send(
        &env.base,
        "GET",
        "/keys/x",
        &[
            ("x-api-key", "key-alice"),
            ("connection", "keep-alive, x-consumer"),
        ],
    )
    .await;
    assert_eq!(seen(&r)["x-consumer"], "alice");

    // An unauthenticated route is untouched, even with a spoofed header.
    let r = send(&env.base, "GET", "/other", &[("x-consumer", "mallory")]).await;
    assert_eq!(seen(&r)["x-consumer"], "mallory");

    // Counted: three refused, two let through (by a worker's kept handles,
    // on whichever worker served them).
    assert_eq!(
        metric(
            &env.gw,
            "gateway_auth_failures_total",
            "reason=\"unauthenticated\""
        )
        .await,
        3
    );
    assert_eq!(
        metric(&env.gw, "gateway_auth_success_total", "method=\"api_key\"").await,
        4
    );

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

    // Replace carol by dave, as a config manager would (write, rename);
    // dave comes with his own limit of two requests an hour.
    let file = env.consumers_dir.path().join("consumers.toml");
    let tmp = env.consumers_dir.path().join("consumers.toml.tmp");
    let dave = format!(
        "{}[consumers.rate_limit]\nlimits = [{{ requests = 2, per = \"1h\" }}]\n",
        consumers_file("dave", DAVE_KEY)
    );
    std::fs::write(&tmp, dave).expect("write");
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
    let r = send(&env.base, "GET", "/file/x", &[("x-api-key", DAVE_KEY)]).await;
    assert_eq!(r.header("ratelimit-remaining"), Some("0"));
    let r = send(&env.base, "GET", "/file/x", &[("x-api-key", DAVE_KEY)]).await;
    problem(&r, 429);

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
    problem(&r, 429);
    assert!(r.header("retry-after").is_some());
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
issuer = "ftp://idp.example"
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

[[consumers]]
name = "alice"

[[identity_providers]]
name = "idp2"
issuer = "http://idp.example"
min_refresh_interval = "0s"

[[routes]]
name = "f"
respond = { status = 200 }
[routes.auth]
forward = { url = "http://127.0.0.1:1/", timeout = "0s" }
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
            "{p}:12:10: issuer: invalid URL \"ftp://idp.example/.well-known/openid-configuration\": expected http:// or https://"
        ),
        format!("{p}:13:24: unsupported algorithm \"none\""),
        format!("{p}:19:20: unknown identity provider \"nope\""),
        format!("{p}:20:12: invalid method \"G E T\""),
        format!("{p}:25:1: [routes.auth] accepts no credentials"),
        format!("{p}:29:8: duplicate consumer name \"alice\""),
        format!("{p}:32:8: `min_refresh_interval` must be at least 1s"),
        format!("{p}:40:19: forward auth `timeout` must be positive"),
    ] {
        assert!(out.contains(&want), "missing {want:?} in:\n{out}");
    }
}

// ---------------------------------------------------------------------------
// A real OpenID Connect provider.

const API: &str = "https://api.example";
const ES: &str = "https://es.example";
const ED: &str = "https://ed.example";
const OPAQUE: &str = "https://opaque.example";

struct Oidc {
    gw: Gateway,
    base: String,
    idp: Idp,
}

fn start_oidc(backend: &Backend, refresh: &str, min_refresh: &str) -> Oidc {
    let idp = Idp::start();
    let port = free_port();
    let admin = format!("127.0.0.1:{}", free_port());
    let config = format!(
        r#"{common}
# The client's consumer entry: its groups apply to its tokens, its scopes
# do not (a token's scopes are what was delegated).
[[consumers]]
name = "svc"
groups = ["services"]
scopes = ["admin"]

[[identity_providers]]
name = "idp"
issuer = "{issuer}"
audiences = ["{API}", "{ES}", "{ED}", "{OPAQUE}"]
refresh_interval = "{refresh}"
min_refresh_interval = "{min_refresh}"
leeway = "5s"
[identity_providers.introspection]
client_id = "{gw_id}"
client_secret = "{gw_secret}"

# The same issuer, seen through stricter eyes: tokens need an `email`.
[[identity_providers]]
name = "idp-strict"
issuer = "{issuer}"
audiences = ["{API}"]
required_claims = ["email"]

# HS256 tokens with a shared secret, and nothing else.
[[identity_providers]]
name = "idp-hs"
issuer = "{issuer}"
audiences = ["{API}"]
algorithms = ["HS256"]
hs256_secrets = ["{hs_secret}"]

[[routes]]
name = "jwt"
upstream = "one"
[routes.match]
path_prefix = "/jwt/"
[routes.auth]
jwt = {{ provider = "idp" }}
scopes_any = ["read", "write"]
claim_headers = {{ "x-client" = "client_id", "x-scope" = "scope" }}

[[routes]]
name = "jwt-admin"
upstream = "one"
[routes.match]
path_prefix = "/jwt-admin/"
[routes.auth]
jwt = {{ provider = "idp", audiences = ["{API}"] }}
scopes_all = ["admin"]

[[routes]]
name = "jwt-group"
upstream = "one"
[routes.match]
path_prefix = "/jwt-group/"
[routes.auth]
jwt = {{ provider = "idp" }}
groups = ["services"]

[[routes]]
name = "jwt-strict"
upstream = "one"
[routes.match]
path_prefix = "/jwt-strict/"
[routes.auth]
jwt = {{ provider = "idp-strict" }}

[[routes]]
name = "jwt-hs"
upstream = "one"
[routes.match]
path_prefix = "/jwt-hs/"
[routes.auth]
jwt = {{ provider = "idp-hs" }}

[[routes]]
name = "opaque"
upstream = "one"
[routes.match]
path_prefix = "/opaque/"
[routes.auth]
introspection = {{ provider = "idp" }}
[[routes.auth.claims]]
name = "scope"
any_of = ["write"]
"#,
        common = common(&admin, port, backend),
        issuer = idp.issuer,
        gw_id = GATEWAY_CLIENT.0,
        gw_secret = GATEWAY_CLIENT.1,
        hs_secret = gateway_tests::idp::HS256_SECRET,
    );
    let gw = Gateway::start(&config, &admin);
    Oidc {
        gw,
        base: format!("http://127.0.0.1:{port}"),
        idp,
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// A counter's value on the admin `/metrics`, summed over its label sets.
async fn metric(gw: &Gateway, name: &str, label: &str) -> u64 {
    let r = client::get(&format!("http://{}/metrics", gw.admin)).await;
    r.text()
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test]
async fn oidc_tokens_verified_through_discovery_and_jwks() {
    let b = Backend::start("b").await;
    let env = start_oidc(&b, "10m", "10s");
    for resource in [API, ES, ED] {
        let token = env.idp.token(resource, "read").await;
        let r = send(
            &env.base,
            "GET",
            "/jwt/x",
            &[("authorization", &bearer(&token))],
        )
        .await;
        let h = seen(&r);
        assert_eq!(h["x-consumer"], "svc", "{resource}");
        assert_eq!(h["x-client"], "svc");
        assert_eq!(h["x-scope"], "read");
        assert!(h.get("authorization").is_none(), "token stripped: {h}");
    }
    // One discovery + JWKS load served all of them.
    assert_eq!(
        metric(
            &env.gw,
            "gateway_auth_jwks_refreshes_total",
            "result=\"ok\""
        )
        .await,
        1
    );

    // A config reload keeps the keys: a token new to the new generation
    // verifies without another fetch.
    let req = Request::post(format!("http://{}/admin/reload", env.gw.admin))
        .body(Full::<Bytes>::default())
        .expect("request");
    assert_eq!(client::send(&client::http1(), req).await.status, 200);
    let token = env.idp.token(API, "write").await;
    let r = send(
        &env.base,
        "GET",
        "/jwt/x",
        &[("authorization", &bearer(&token))],
    )
    .await;
    assert_eq!(seen(&r)["x-scope"], "write");
    assert_eq!(
        metric(&env.gw, "gateway_auth_jwks_refreshes_total", "").await,
        1
    );

    // Scopes: "read" is not "admin"; the audience list of the route is
    // narrower than the provider's.
    let token = env.idp.token(API, "read").await;
    let r = send(
        &env.base,
        "GET",
        "/jwt-admin/x",
        &[("authorization", &bearer(&token))],
    )
    .await;
    problem(&r, 403);
    assert!(
        r.header("www-authenticate")
            .is_some_and(|v| v.contains("error=\"insufficient_scope\"")),
        "{:?}",
        r.headers
    );
    let token = env.idp.token(API, "read admin").await;
    let r = send(
        &env.base,
        "GET",
        "/jwt-admin/x",
        &[("authorization", &bearer(&token))],
    )
    .await;
    seen(&r);
    // The consumer named by the token's subject lends it its groups.
    let r = send(
        &env.base,
        "GET",
        "/jwt-group/x",
        &[("authorization", &bearer(&token))],
    )
    .await;
    seen(&r);
    let token = env.idp.token(ES, "read admin").await;
    let r = send(
        &env.base,
        "GET",
        "/jwt-admin/x",
        &[("authorization", &bearer(&token))],
    )
    .await;
    let v = problem(&r, 401);
    assert!(
        v["detail"].as_str().unwrap().contains("wrong audience"),
        "{v}"
    );
}

#[tokio::test]
async fn oidc_hostile_tokens_rejected() {
    let b = Backend::start("b").await;
    let env = start_oidc(&b, "10m", "10s");
    // Load the keys with a good token first, so each rejection below is
    // about the token, not about keys not loaded yet.
    let good = env.idp.token(API, "read").await;
    let r = send(
        &env.base,
        "GET",
        "/jwt/x",
        &[("authorization", &bearer(&good))],
    )
    .await;
    seen(&r);
    let before = b.hits();

    for (kind, why) in [
        ("none", "malformed token"),
        ("hs256-confusion", "token algorithm not accepted"),
        ("expired", "token expired"),
        ("not-yet-valid", "token not valid yet"),
        ("wrong-aud", "wrong audience"),
        ("wrong-iss", "wrong issuer"),
        ("unknown-kid", "no key for this token"),
    ] {
        let token = env.idp.forge(kind).await;
        let r = send(
            &env.base,
            "GET",
            "/jwt/x",
            &[("authorization", &bearer(&token))],
        )
        .await;
        let v = problem(&r, 401);
        assert!(v["detail"].as_str().unwrap().contains(why), "{kind}: {v}");
        let challenge = r.header("www-authenticate").unwrap_or_default();
        assert!(
            challenge.starts_with("Bearer realm=\"gateway\", error=\"invalid_token\""),
            "{kind}: {challenge}"
        );
    }
    // A real token with its payload swapped.
    let forged = env.idp.forge("expired").await;
    let mut parts: Vec<&str> = good.split('.').collect();
    let other: Vec<&str> = forged.split('.').collect();
    parts[1] = other[1];
    let r = send(
        &env.base,
        "GET",
        "/jwt/x",
        &[("authorization", &bearer(&parts.join(".")))],
    )
    .await;
    problem(&r, 401);
    let r = send(
        &env.base,
        "GET",
        "/jwt/x",
        &[("authorization", "Bearer not-a-jwt")],
    )
    .await;
    problem(&r, 401);
    // A provider's required claims: the good token has no `email`.
    let r = send(
        &env.base,
        "GET",
        "/jwt-strict/x",
        &[("authorization", &bearer(&good))],
    )
    .await;
    let v = problem(&r, 401);
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("it lacks the \"email\" claim"),
        "{v}"
    );
    // An HS256-only provider refuses RS256 tokens, and the confused token
    // (HS256 keyed with the RSA public key) fails its signature check.
    for token in [good.clone(), env.idp.forge("hs256-confusion").await] {
        let r = send(
            &env.base,
            "GET",
            "/jwt-hs/x",
            &[("authorization", &bearer(&token))],
        )
        .await;
        problem(&r, 401);
    }
    assert_eq!(b.hits(), before, "no hostile token reached the upstream");
    // A token signed with the shared secret passes.
    let token = env.idp.forge("hs256-shared").await;
    let r = send(
        &env.base,
        "GET",
        "/jwt-hs/x",
        &[("authorization", &bearer(&token))],
    )
    .await;
    assert_eq!(seen(&r)["x-consumer"], "svc");
    // A `sub` that is not a name refuses the token: `client_id` does not
    // stand in for a claim that is present.
    let token = env.idp.forge("hs256-numeric-sub").await;
    let r = send(
        &env.base,
        "GET",
        "/jwt-hs/x",
        &[("authorization", &bearer(&token))],
    )
    .await;
    let v = problem(&r, 401);
    assert!(
        v["detail"].as_str().unwrap().contains("names the caller"),
        "{v}"
    );
}

#[tokio::test]
async fn oidc_key_rotation_and_rate_limited_refresh() {
    let b = Backend::start("b").await;
    let env = start_oidc(&b, "10m", "2s");
    let old = env.idp.token(API, "read").await;
    let r = send(
        &env.base,
        "GET",
        "/jwt/x",
        &[("authorization", &bearer(&old))],
    )
    .await;
    seen(&r);

    // Tokens naming unknown keys cause at most one refresh per
    // min_refresh_interval, however many arrive.
    let started = Instant::now();
    for _ in 0..20 {
        let t = env.idp.forge("unknown-kid").await;
        let r = send(
            &env.base,
            "GET",
            "/jwt/x",
            &[("authorization", &bearer(&t))],
        )
        .await;
        problem(&r, 401);
    }
    let attempts = metric(&env.gw, "gateway_auth_jwks_refreshes_total", "").await;
    let allowed = 2 + started.elapsed().as_secs() / 2;
    assert!(
        attempts <= allowed,
        "{attempts} refreshes, at most {allowed} expected"
    );

    // The provider rotates: tokens signed with the new key are accepted
    // once the gateway refreshes (at once, or after the rate limit).
    let kid = env.idp.rotate(false).await;
    assert_eq!(kid, "rsa-2");
    let new = env.idp.token(API, "read").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = send(
            &env.base,
            "GET",
            "/jwt/x",
            &[("authorization", &bearer(&new))],
        )
        .await;
        if r.status == 200 {
            break;
        }
        problem(&r, 401);
        assert!(
            Instant::now() < deadline,
            "new key never picked up: {}",
            env.gw.stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The old key is still published, so its tokens still verify.
    let r = send(
        &env.base,
        "GET",
        "/jwt/x",
        &[("authorization", &bearer(&old))],
    )
    .await;
    seen(&r);

    // The provider withdraws the old keys: once the gateway has the new
    // set, tokens signed with them fail, even those it verified before.
    env.idp.rotate(true).await;
    let newest = env.idp.token(API, "read").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = send(
            &env.base,
            "GET",
            "/jwt/x",
            &[("authorization", &bearer(&newest))],
        )
        .await;
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "newest key never picked up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = send(
        &env.base,
        "GET",
        "/jwt/x",
        &[("authorization", &bearer(&old))],
    )
    .await;
    let v = problem(&r, 401);
    assert!(v["detail"].as_str().unwrap().contains("no key"), "{v}");
}

#[tokio::test]
async fn oidc_keys_refreshed_on_interval_while_tokens_are_cached() {
    let b = Backend::start("b").await;
    let env = start_oidc(&b, "1s", "1s");
    let token = env.idp.token(API, "read").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    // The same token over and over (answered from the verified-token
    // cache) still gets the keys refreshed in the background.
    loop {
        let r = send(
            &env.base,
            "GET",
            "/jwt/x",
            &[("authorization", &bearer(&token))],
        )
        .await;
        seen(&r);
        if metric(
            &env.gw,
            "gateway_auth_jwks_refreshes_total",
            "result=\"ok\"",
        )
        .await
            >= 3
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "keys not refreshed on the interval"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn introspection_of_opaque_tokens_with_cache() {
    let b = Backend::start("b").await;
    let mut env = start_oidc(&b, "10m", "10s");
    let token = env.idp.token(OPAQUE, "read write").await;
    assert_eq!(token.matches('.').count(), 0, "opaque: {token}");
    let r = send(
        &env.base,
        "GET",
        "/opaque/x",
        &[("authorization", &bearer(&token))],
    )
    .await;
    let h = seen(&r);
    assert_eq!(h["x-consumer"], "svc");
    assert!(h.get("authorization").is_none());

    let read_only = env.idp.token(OPAQUE, "read").await;
    let r = send(
        &env.base,
        "GET",
        "/opaque/x",
        &[("authorization", &bearer(&read_only))],
    )
    .await;
    problem(&r, 403);
    let r = send(
        &env.base,
        "GET",
        "/opaque/x",
        &[("authorization", "Bearer made-up-token")],
    )
    .await;
    let v = problem(&r, 401);
    assert!(v["detail"].as_str().unwrap().contains("not active"), "{v}");

    // Answers are cached: with the provider gone the known token still
    // passes, and an unknown one fails closed (502).
    env.idp.stop();
    let r = send(
        &env.base,
        "GET",
        "/opaque/x",
        &[("authorization", &bearer(&token))],
    )
    .await;
    seen(&r);
    let r = send(
        &env.base,
        "GET",
        "/opaque/x",
        &[("authorization", "Bearer another-one")],
    )
    .await;
    problem(&r, 502);
}

/// An authorization server for opaque tokens only: its discovery document
/// names an introspection endpoint and no `jwks_uri`. `token=good` is
/// active (consumer "opaque-user"), anything else is not.
async fn start_opaque_only_idp() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    serve_fn(|addr, head, body| {
        let answer = match head.uri.path() {
            "/.well-known/openid-configuration" => serde_json::json!({
                "issuer": format!("http://{addr}"),
                "introspection_endpoint": format!("http://{addr}/introspect"),
            }),
            "/introspect" if body.split(|b| *b == b'&').any(|p| p == b"token=good") => {
                serde_json::json!({"active": true, "sub": "opaque-user"})
            }
            _ => serde_json::json!({"active": false}),
        };
        http::Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(answer.to_string())))
            .expect("response")
    })
    .await
}

/// Serves `answer` (given the server's address, a request's head and its
/// whole body) on an ephemeral 127.0.0.1 port until the task is aborted.
async fn serve_fn<F>(answer: F) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>)
where
    F: Fn(std::net::SocketAddr, http::request::Parts, Bytes) -> http::Response<Full<Bytes>>
        + Send
        + Sync
        + 'static,
{
    use http_body_util::BodyExt;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let answer = std::sync::Arc::new(answer);
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let answer = answer.clone();
                    async move {
                        let (head, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        Ok::<_, std::convert::Infallible>(answer(addr, head, body))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn introspection_through_discovery_without_jwks() {
    let b = Backend::start("b").await;
    let (idp, task) = start_opaque_only_idp().await;
    let port = free_port();
    let admin = format!("127.0.0.1:{}", free_port());
    let config = format!(
        r#"{common}
[[identity_providers]]
name = "opaque"
issuer = "http://{idp}"
[identity_providers.introspection]
client_id = "gw"
client_secret = "s"

[[routes]]
name = "opaque"
upstream = "one"
[routes.match]
path_prefix = "/"
[routes.auth]
introspection = {{ provider = "opaque" }}
"#,
        common = common(&admin, port, &b),
    );
    let _gw = Gateway::start(&config, &admin);
    let base = format!("http://127.0.0.1:{port}");
    let r = send(&base, "GET", "/x", &[("authorization", "Bearer good")]).await;
    assert_eq!(seen(&r)["x-consumer"], "opaque-user");
    let r = send(&base, "GET", "/x", &[("authorization", "Bearer bad")]).await;
    let v = problem(&r, 401);
    assert!(v["detail"].as_str().unwrap().contains("not active"), "{v}");
    task.abort();
}

// ---------------------------------------------------------------------------
// Forward auth.

/// A forward-auth service: `Bearer good` → 200 naming consumer "zed" with
/// roles; `Bearer bad` → 401 with a challenge; `Bearer nope` → 403;
/// `Bearer login` → 302 to a login page with a cookie and an HTML body;
/// `Bearer lost` → 302 without a `Location`; `Bearer busy` → 429 with
/// `Retry-After` and a JSON body; `Bearer odd` → 400; `Bearer zipped` → 403
/// with a gzip-coded body; anything else → 500.
/// It answers with what it received in `x-seen-*`.
async fn start_verdicts() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    serve_fn(|_, head, _| {
        let h = &head.headers;
        let auth = h.get("authorization").and_then(|v| v.to_str().ok());
        let mut resp = http::Response::builder();
        let mut body = Bytes::new();
        resp = match auth {
            Some("Bearer good") => resp
                .status(200)
                .header("x-auth-user", "zed")
                .header("x-auth-roles", "a,b")
                .header("x-not-copied", "1"),
            Some("Bearer bad") => resp
                .status(401)
                .header("www-authenticate", "Bearer realm=\"fwd\""),
            Some("Bearer nope") => resp.status(403),
            Some("Bearer login") => {
                body = Bytes::from_static(b"<a href=\"http://login.test/start\">log in</a>");
                resp.status(302)
                    .header("content-type", "text/html")
                    .header("location", "http://login.test/start?rd=/fwd/x")
                    .header("set-cookie", "csrf=abc; HttpOnly")
                    .header("x-not-copied", "1")
            }
            Some("Bearer lost") => resp.status(302),
            Some("Bearer busy") => {
                body = Bytes::from_static(br#"{"error":"slow down"}"#);
                resp.status(429)
                    .header("content-type", "application/json")
                    .header("retry-after", "7")
                    .header("x-not-copied", "1")
            }
            Some("Bearer odd") => resp.status(400),
            Some("Bearer zipped") => {
                body = Bytes::from_static(b"\x1f\x8b\x08\x00not really");
                resp.status(403).header("content-encoding", "gzip")
            }
            _ => resp.status(500),
        };
        for name in ["x-forwarded-method", "x-forwarded-uri", "x-forwarded-host"] {
            if let Some(v) = h.get(name) {
                resp = resp.header(format!("x-seen-{}", &name[12..]), v.clone());
            }
        }
        resp.body(Full::new(body)).expect("response")
    })
    .await
}

#[tokio::test]
async fn forward_auth_passes_on_the_verdict() {
    let b = Backend::start("b").await;
    let (verdicts, task) = start_verdicts().await;
    let port = free_port();
    let admin = format!("127.0.0.1:{}", free_port());
    let config = format!(
        r#"{common}
[[consumers]]
name = "alice"
api_keys = ["sha256:{key}"]

[[routes]]
name = "fwd"
upstream = "one"
[routes.match]
path_prefix = "/fwd/"
[routes.auth]
forward = {{ url = "http://{verdicts}/check", response_headers = ["x-auth-roles", "x-auth-extra", "x-seen-uri", "x-seen-method"], consumer_from = "x-auth-user" }}

[[routes]]
name = "fwd-or-key"
upstream = "one"
[routes.match]
path_prefix = "/either/"
[routes.auth]
api_key = {{}}
forward = {{ url = "http://{verdicts}/check", response_headers = ["x-auth-roles"] }}

[[routes]]
name = "fwd-dead"
upstream = "one"
[routes.match]
path_prefix = "/dead/"
[routes.auth]
forward = {{ url = "http://127.0.0.1:{dead}/check", timeout = "1s" }}
"#,
        common = common(&admin, port, &b),
        dead = free_port(),
        key = sha256_hex("key-alice"),
    );
    let _gw = Gateway::start(&config, &admin);
    let base = format!("http://127.0.0.1:{port}");

    let r = send(
        &base,
        "POST",
        "/fwd/x?q=1",
        &[
            ("authorization", "Bearer good"),
            ("x-auth-roles", "spoofed"),
            ("x_auth_roles", "spoofed"),
            ("x-auth-extra", "spoofed"),
        ],
    )
    .await;
    let h = seen(&r);
    assert_eq!(h["x-consumer"], "zed");
    assert_eq!(h["x-auth-roles"], "a,b");
    // Only the service sets its headers: one it did not return is removed,
    // and so is the underscore spelling.
    assert!(h.get("x-auth-extra").is_none(), "{h}");
    assert!(h.get("x_auth_roles").is_none(), "{h}");
    assert_eq!(h["x-seen-uri"], "/fwd/x?q=1");
    assert_eq!(h["x-seen-method"], "POST");
    assert!(h.get("x-not-copied").is_none());
    assert!(h.get("authorization").is_none());

    let r = send(&base, "GET", "/fwd/x", &[("authorization", "Bearer bad")]).await;
    problem(&r, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer realm=\"fwd\""));
    let r = send(&base, "GET", "/fwd/x", &[("authorization", "Bearer nope")]).await;
    problem(&r, 403);
    // A redirect (a login flow) reaches the client with its Location and
    // cookie; one without a Location is a broken answer.
    let r = send(&base, "GET", "/fwd/x", &[("authorization", "Bearer login")]).await;
    assert_eq!(r.status, 302);
    // With the service's own page.
    assert_eq!(r.header("content-type"), Some("text/html"));
    assert_eq!(r.text(), "<a href=\"http://login.test/start\">log in</a>");
    assert_eq!(
        r.header("location"),
        Some("http://login.test/start?rd=/fwd/x")
    );
    assert_eq!(r.header("set-cookie"), Some("csrf=abc; HttpOnly"));
    assert_eq!(r.header("x-not-copied"), None);
    let r = send(&base, "GET", "/fwd/x", &[("authorization", "Bearer lost")]).await;
    problem(&r, 502);
    // Any other 4xx is the service's verdict too, with its Retry-After
    // and its own explanation.
    let r = send(&base, "GET", "/fwd/x", &[("authorization", "Bearer busy")]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.text(), r#"{"error":"slow down"}"#);
    assert_eq!(r.header("retry-after"), Some("7"));
    assert_eq!(r.header("x-not-copied"), None);
    assert!(r.header("x-request-id").is_some());
    // A coded body is not passed on without its coding: problem+json.
    let r = send(
        &base,
        "GET",
        "/fwd/x",
        &[("authorization", "Bearer zipped")],
    )
    .await;
    problem(&r, 403);
    assert_eq!(r.header("content-encoding"), None);
    // A verdict without a body gets the gateway's problem+json.
    let r = send(&base, "GET", "/fwd/x", &[("authorization", "Bearer odd")]).await;
    let v = problem(&r, 400);
    assert_eq!(v["type"], "https://gateway.dev/problems/auth-denied", "{v}");
    assert_eq!(v["title"], "Bad Request", "{v}");
    // A 5xx, or no answer, fails closed.
    let r = send(&base, "GET", "/fwd/x", &[]).await;
    problem(&r, 502);
    let r = send(&base, "GET", "/dead/x", &[("authorization", "Bearer good")]).await;
    problem(&r, 502);
    assert_eq!(b.hits(), 1);

    // Admitted by an API key, the service's headers still cannot be sent
    // by the client.
    let r = send(
        &base,
        "GET",
        "/either/x",
        &[("x-api-key", "key-alice"), ("x-auth-roles", "admin")],
    )
    .await;
    let h = seen(&r);
    assert_eq!(h["x-consumer"], "alice");
    assert!(h.get("x-auth-roles").is_none(), "{h}");
    task.abort();
}

#[tokio::test]
async fn provider_down_fails_closed_with_502() {
    use base64::Engine as _;
    let b = Backend::start("b").await;
    let port = free_port();
    let admin = format!("127.0.0.1:{}", free_port());
    let config = format!(
        r#"{common}
[[identity_providers]]
name = "gone"
issuer = "http://127.0.0.1:{dead}"
audiences = ["{API}"]
timeout = "1s"

[[routes]]
name = "jwt"
upstream = "one"
[routes.match]
path_prefix = "/jwt/"
[routes.auth]
jwt = {{ provider = "gone" }}
"#,
        common = common(&admin, port, &b),
        dead = free_port(),
    );
    let _gw = Gateway::start(&config, &admin);
    let base = format!("http://127.0.0.1:{port}");
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let token = format!(
        "{}.{}.AAAA",
        b64(serde_json::json!({"alg": "RS256", "kid": "k"})),
        b64(serde_json::json!({"sub": "x"}))
    );
    // The keys cannot be loaded: the gateway's side fails, not the token.
    let r = send(
        &base,
        "GET",
        "/jwt/x",
        &[("authorization", &bearer(&token))],
    )
    .await;
    let v = problem(&r, 502);
    assert!(v["detail"].as_str().unwrap().contains("keys"), "{v}");
    assert_eq!(b.hits(), 0);
}

#[tokio::test]
async fn oidc_over_https_trusting_a_ca_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("cert");
    let cert = dir.path().join("idp.pem");
    let key = dir.path().join("idp.key");
    std::fs::write(&cert, ck.cert.pem()).expect("write");
    std::fs::write(&key, ck.signing_key.serialize_pem()).expect("write");
    let idp = Idp::start_tls(&cert, &key);
    assert!(idp.issuer.starts_with("https://"), "{}", idp.issuer);

    let b = Backend::start("b").await;
    let port = free_port();
    let admin = format!("127.0.0.1:{}", free_port());
    let config = format!(
        r#"{common}
[[identity_providers]]
name = "tls"
issuer = "{issuer}"
audiences = ["{API}"]
ca_file = "{cert}"

# The same provider without its CA: the system's roots do not know it.
[[identity_providers]]
name = "untrusted"
issuer = "{issuer}"
audiences = ["{API}"]
timeout = "2s"

[[routes]]
name = "tls"
upstream = "one"
[routes.match]
path_prefix = "/tls/"
[routes.auth]
jwt = {{ provider = "tls" }}

[[routes]]
name = "untrusted"
upstream = "one"
[routes.match]
path_prefix = "/untrusted/"
[routes.auth]
jwt = {{ provider = "untrusted" }}
"#,
        common = common(&admin, port, &b),
        issuer = idp.issuer,
        cert = cert.display(),
    );
    let gw = Gateway::start(&config, &admin);
    let base = format!("http://127.0.0.1:{port}");
    let token = idp.token(API, "read").await;
    let r = send(
        &base,
        "GET",
        "/tls/x",
        &[("authorization", &bearer(&token))],
    )
    .await;
    assert_eq!(seen(&r)["x-consumer"], "svc");
    let r = send(
        &base,
        "GET",
        "/untrusted/x",
        &[("authorization", &bearer(&token))],
    )
    .await;
    problem(&r, 502);
    assert!(
        gw.stderr().contains("cannot load identity provider keys"),
        "{}",
        gw.stderr()
    );
}

#[test]
fn check_lists_every_broken_entry_of_the_consumers_file() {
    let (code, out) = gateway_tests::gateway::check_config(
        "consumers_file = \"c.toml\"\n[[listeners]]\nname = \"main\"\nlisten = \"127.0.0.1:1\"\n",
        &[(
            "c.toml",
            "[[consumers]]\nname = \"a\"\ncolour = \"red\"\n[[consumers]]\nname = 7\n",
        )],
    );
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("c.toml:3:1: unknown field `colour`"), "{out}");
    assert!(out.contains("c.toml:5:8: invalid type"), "{out}");
}
