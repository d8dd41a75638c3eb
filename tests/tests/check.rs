//! `gateway check` on good and broken configs: exit codes and the exact
//! `FILE:LINE:COL: message` lines.

use gateway_tests::gateway::run_cli;

/// Runs `gateway check` on `text`; returns (exit code, lines with the file
/// path replaced by `F`).
fn check(text: &str) -> (i32, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.toml");
    std::fs::write(&path, text).unwrap();
    let (code, out, err) = run_cli(&["check", "-c", path.to_str().unwrap()]);
    assert!(err.is_empty() || code == 0, "stderr: {err}");
    let p = path.display().to_string();
    (code, out.lines().map(|l| l.replace(&p, "F")).collect())
}

const BASE: &str = r#"[[listeners]]
name = "main"
listen = "127.0.0.1:8080"
[[upstreams]]
name = "be"
targets = ["127.0.0.1:9000"]
[[routes]]
name = "r"
upstream = "be"
"#;

#[test]
fn good_config_prints_summary() {
    let (code, out) = check(BASE);
    assert_eq!(code, 0);
    assert_eq!(out, ["config OK: 1 listeners, 1 routes, 1 upstreams"]);
}

#[test]
fn default_config_is_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let (code, out, _) = run_cli(&[
        "check",
        "-c",
        root.join("conf/gateway.toml").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("config OK:"), "{out}");
}

#[test]
fn unknown_key() {
    let (code, out) = check(&format!("{BASE}colour = \"blue\"\n"));
    assert_eq!(code, 2);
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(
        out[0].starts_with("F:10:1: unknown field `colour`"),
        "{out:?}"
    );
}

#[test]
fn duplicate_key_is_named() {
    let (code, out) = check(&BASE.replace(
        "listen = \"127.0.0.1:8080\"",
        "listen = \"127.0.0.1:8080\"\nlisten = \"127.0.0.1:8081\"",
    ));
    assert_eq!(code, 2);
    assert_eq!(out, ["F:4:1: key `listen` is given more than once"]);
}

#[test]
fn wrong_type() {
    let (code, out) = check(&BASE.replace(
        "listen = \"127.0.0.1:8080\"",
        "listen = \"127.0.0.1:8080\"\nmax_connections = \"many\"",
    ));
    assert_eq!(code, 2);
    assert!(
        out[0].starts_with("F:4:19: invalid type: string \"many\""),
        "{out:?}"
    );
}

#[test]
fn zero_listener_timeouts() {
    let (code, out) = check(&BASE.replace(
        "listen = \"127.0.0.1:8080\"",
        "listen = \"127.0.0.1:8080\"\nsend_timeout = \"0s\"\nidle_timeout = \"0s\"\nrequest_timeout = \"0s\"",
    ));
    assert_eq!(code, 2, "{out:?}");
    assert_eq!(
        out,
        [
            "F:2:8: listener \"main\": idle_timeout must be positive",
            "F:2:8: listener \"main\": send_timeout must be positive",
            "F:2:8: listener \"main\": request_timeout must be positive",
        ]
    );
}

#[test]
fn bad_duration_and_size() {
    let (_, out) = check(&BASE.replace("targets =", "timeout = \"soon\"\ntargets ="));
    assert!(
        out[0].starts_with("F:6:11: invalid duration \"soon\""),
        "{out:?}"
    );
    let (_, out) = check(&BASE.replace(
        "listen = \"127.0.0.1:8080\"",
        "listen = \"127.0.0.1:8080\"\nmax_body_bytes = \"3 parsecs\"",
    ));
    assert!(
        out[0].starts_with("F:4:18: invalid size \"3 parsecs\""),
        "{out:?}"
    );
}

#[test]
fn every_semantic_problem_is_listed_in_file_order() {
    let text = r#"[admin]
listen = "127.0.0.1:9901"
[[listeners]]
name = "main"
listen = "127.0.0.1:8080"
[[listeners]]
name = "other"
listen = "127.0.0.1:8080"
[[listeners]]
name = "adm"
listen = "127.0.0.1:9901"
[[listeners]]
name = "bad"
listen = "localhost"
[[upstreams]]
name = "be"
targets = ["127.0.0.1:9000", "no-port"]
[[routes]]
name = "r"
upstream = "be"
[[routes]]
name = "r"
upstream = "missing"
[[routes]]
name = "both"
upstream = "be"
[routes.respond]
body = "x"
"#;
    let (code, out) = check(text);
    assert_eq!(code, 2);
    assert_eq!(
        out,
        [
            "F:8:10: listener \"other\" port 8080 clashes with listener \"main\"",
            "F:11:10: listener \"adm\" port 9901 clashes with admin listener",
            "F:14:10: invalid listen address \"localhost\": expected IP:PORT",
            "F:17:30: invalid upstream target \"no-port\": expected HOST:PORT",
            "F:22:8: duplicate route name \"r\"",
            "F:23:12: route \"r\" points at unknown upstream \"missing\"",
            "F:25:8: route \"both\" gives more than one of `upstream`, `respond` and `redirect`; give one",
        ]
    );
}

#[test]
fn type_problems_in_different_sections_are_all_listed() {
    // One problem in each of five places serde reads on its own: a section,
    // two `[[listeners]]` entries, an upstream and a route.
    let text = r#"[server]
workers = "four"
[[listeners]]
name = "main"
listen = "127.0.0.1:8080"
colour = "blue"
[[listeners]]
listen = "127.0.0.1:8081"
[[upstreams]]
name = "be"
targets = ["127.0.0.1:9000"]
timeout = "soon"
[[routes]]
name = "r"
upstream = "be"
flavour = 1
"#;
    let (code, out) = check(text);
    assert_eq!(code, 2);
    let want = [
        "F:2:11: invalid type: string \"four\", expected a non-negative integer",
        "F:6:1: unknown field `colour`, expected one of `name`, `listen`,",
        "F:7:1: missing field `name`",
        "F:12:11: invalid duration \"soon\"",
        "F:16:1: unknown field `flavour`, expected one of `name`,",
    ];
    assert_eq!(out.len(), want.len(), "{out:#?}");
    for (line, want) in out.iter().zip(want) {
        assert!(
            line.starts_with(want),
            "{line:?} should start with {want:?}"
        );
    }
}

#[test]
fn a_syntax_error_is_reported_alone() {
    // The parser cannot go on after it, so later problems are not guessed at.
    let (code, out) = check(&format!("{BASE}[routes.match\ncolour = 1\n"));
    assert_eq!(code, 2);
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(out[0].starts_with("F:10:14: "), "{out:?}");
}

#[test]
fn unreadable_file() {
    let (code, out, _) = run_cli(&["check", "-c", "/nonexistent/g.toml"]);
    assert_eq!(code, 2);
    assert!(
        out.starts_with("/nonexistent/g.toml: cannot read config file"),
        "{out}"
    );
}

#[test]
fn unknown_underscore_action() {
    let (code, out) = check(&BASE.replace(
        "listen = \"127.0.0.1:8080\"\n",
        "listen = \"127.0.0.1:8080\"\nheaders_with_underscores = \"strip\"\n",
    ));
    assert_eq!(code, 2);
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(
        out[0].starts_with(
            "F:4:28: unknown variant `strip`, expected one of `allow`, `drop`, `reject`"
        ),
        "{out:?}"
    );
}

#[test]
fn bad_trusted_proxy() {
    let (code, out) = check(&BASE.replace(
        "listen = \"127.0.0.1:8080\"\n",
        "listen = \"127.0.0.1:8080\"\ntrusted_proxies = [\"10.0.0.0/33\"]\n",
    ));
    assert_eq!(code, 2);
    assert_eq!(
        out,
        ["F:4:20: invalid CIDR \"10.0.0.0/33\": expected an address or ADDRESS/PREFIX"]
    );
}

#[test]
fn upstream_http2_settings_are_checked() {
    let (code, out) = check(&BASE.replace(
        "targets = [\"127.0.0.1:9000\"]\n",
        "targets = [\"127.0.0.1:9000\"]\nhttp2_keepalive_interval = \"0s\"\nhttp2_max_concurrent_streams = 0\n",
    ));
    assert_eq!(code, 2);
    assert_eq!(
        out,
        [
            "F:5:8: upstream \"be\": http2_keepalive_interval needs protocol = \"http2\"",
            "F:5:8: upstream \"be\": http2_keepalive_interval must be positive",
            "F:5:8: upstream \"be\": http2_max_concurrent_streams must be positive",
        ]
    );
    let (code, out) = check(&BASE.replace(
        "targets = [\"127.0.0.1:9000\"]\n",
        "targets = [\"127.0.0.1:9000\"]\nprotocol = \"http2\"\nhttp2_keepalive_interval = \"30s\"\nhttp2_keepalive_timeout = \"10s\"\n",
    ));
    assert_eq!(code, 0, "{out:?}");
}

#[test]
fn zero_http2_streams() {
    let (code, out) = check(&BASE.replace(
        "listen = \"127.0.0.1:8080\"\n",
        "listen = \"127.0.0.1:8080\"\nhttp2_max_concurrent_streams = 0\n",
    ));
    assert_eq!(code, 2);
    assert_eq!(
        out,
        ["F:2:8: listener \"main\": http2_max_concurrent_streams must be positive"]
    );
}

#[test]
fn upstream_tls_problems_are_named_at_their_place() {
    let tls = |body: &str| {
        BASE.replace(
            "targets = [\"127.0.0.1:9000\"]\n",
            &format!("targets = [\"127.0.0.1:9000\"]\n[upstreams.tls]\n{body}"),
        )
    };
    // Every problem of the table at once: a CA file that is not there, a
    // client certificate without its key, a server name that is not one.
    let (code, out) = check(&tls(
        "ca_file = \"missing-ca.pem\"\ncert = \"client.pem\"\nsni = \"bad name!\"\n",
    ));
    assert_eq!(code, 2);
    assert_eq!(out.len(), 3, "{out:?}");
    assert!(
        out[0].starts_with("F:8:11: cannot read CA certificates from "),
        "{out:?}"
    );
    assert!(out[0].contains("missing-ca.pem"), "{out:?}");
    assert_eq!(
        out[1],
        "F:9:8: a client certificate needs both cert and key"
    );
    assert!(
        out[2].starts_with("F:10:7: \"bad name!\" is not a valid TLS server name"),
        "{out:?}"
    );

    // Verification off and a CA to verify with contradict each other.
    let (code, out) = check(&tls("verify = false\nca_file = \"ca.pem\"\n"));
    assert_eq!(code, 2);
    assert_eq!(
        out,
        ["F:9:11: ca_file has no effect with verify = false; remove one of them"]
    );

    // Fine as it stands.
    let (code, out) = check(&tls("verify = false\nsni = \"api.internal\"\n"));
    assert_eq!(code, 0, "{out:?}");
}

#[test]
fn source_prefixes_out_of_range() {
    let (code, out) = check(&format!(
        "{BASE}[routes.rate_limit]\nlimits = [{{ requests = 1, per = \"1s\" }}]\nipv6_prefix = 129\n"
    ));
    assert_eq!(code, 2);
    assert_eq!(out, ["F:12:15: ipv6_prefix must be 0..=128"]);
    let (code, out) = check(&BASE.replace(
        "listen = \"127.0.0.1:8080\"\n",
        "listen = \"127.0.0.1:8080\"\n[listeners.auto_ban]\nipv4_prefix = 0\n",
    ));
    assert_eq!(code, 2);
    assert_eq!(out, ["F:5:15: ipv4_prefix must be 1..=32"]);
}

#[test]
fn client_certificate_settings_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["gw.test".to_string()]).unwrap();
    let cert = dir.path().join("gw.pem");
    let key = dir.path().join("gw.key");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let tls = |extra: &str| {
        BASE.replace(
            "listen = \"127.0.0.1:8080\"\n",
            &format!(
                "listen = \"127.0.0.1:8080\"\n[listeners.tls]\n{extra}\n[[listeners.tls.certificates]]\ncert = {cert:?}\nkey = {key:?}\n"
            ),
        )
    };
    let (code, out) = check(&tls("client_auth = \"optional\""));
    assert_eq!(code, 2);
    assert_eq!(
        out,
        ["F:5:15: client_auth needs client_ca (the CA client certificates must chain to)"]
    );
    let (code, out) = check(&tls("client_ca = \"no-such-ca.pem\""));
    assert_eq!(code, 2);
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(
        out[0].starts_with("F:5:13: cannot read CA certificates from ")
            && out[0].contains("no-such-ca.pem"),
        "{out:?}"
    );
    let (code, out) = check(&tls("client_crl = \"revoked.pem\""));
    assert_eq!(code, 2);
    assert_eq!(
        out,
        ["F:5:14: client_crl needs client_ca (the CA client certificates must chain to)"]
    );
    // A file that holds no revocation list (a certificate, say).
    let (code, out) = check(&tls(&format!(
        "client_ca = {cert:?}\nclient_crl = {cert:?}"
    )));
    assert_eq!(code, 2);
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(
        out[0].starts_with("F:6:14: ") && out[0].ends_with("holds no revocation list"),
        "{out:?}"
    );
    let (code, out) = check(&tls(&format!(
        "client_ca = {cert:?}\nclient_auth = \"optional\""
    )));
    assert_eq!(code, 0, "{out:?}");
}

#[test]
fn bad_redirects() {
    let redirect =
        |body: &str| BASE.replace("upstream = \"be\"\n", &format!("[routes.redirect]\n{body}"));
    let (code, out) = check(&redirect(
        "status = 200\nscheme = \"ftp\"\nhost = \"a/b\"\n",
    ));
    assert_eq!(code, 2);
    assert_eq!(
        out,
        [
            "F:10:10: redirect status 200: expected 301, 302, 303, 307 or 308",
            "F:11:10: redirect scheme \"ftp\": expected \"http\" or \"https\"",
            "F:12:8: redirect host \"a/b\" is not a host name",
        ]
    );
    let (code, out) = check(&format!("{BASE}[routes.redirect]\nscheme = \"https\"\n"));
    assert_eq!(code, 2);
    assert_eq!(
        out,
        [
            "F:8:8: route \"r\" gives more than one of `upstream`, `respond` and `redirect`; give one"
        ]
    );
    let (code, out) = check(&redirect("scheme = \"https\"\n"));
    assert_eq!(code, 0, "{out:?}");
}

#[test]
fn client_cert_auth_needs_a_listener_that_verifies_certificates() {
    let (code, out) = check(&format!("{BASE}[routes.auth]\nclient_cert = {{}}\n"));
    assert_eq!(code, 2);
    assert_eq!(
        out,
        [
            "F:10:1: route \"r\" takes client_cert, but none of its listeners verifies client certificates (set tls.client_ca)"
        ]
    );
}
