//! Hot reload (file watch, SIGHUP, `gateway reload`) under load, rejected
//! reloads, graceful shutdown, and the admin endpoints.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use gateway_tests::backend::Backend;
use gateway_tests::client;
use gateway_tests::free_port;
use gateway_tests::gateway::{Gateway, run_cli};

fn config(port: u16, admin: &str, backend: &Backend, body: &str, watch: bool) -> String {
    format!(
        r#"
[server]
workers = 2
watch_config = {watch}
shutdown_timeout = "5s"
[admin]
listen = "{admin}"
[access_log]
enabled = false
[[listeners]]
name = "main"
listen = "127.0.0.1:{port}"
[[upstreams]]
name = "be"
targets = ["{b}"]
[[routes]]
name = "version"
[routes.match]
path = "/version"
[routes.respond]
body = "{body}"
[[routes]]
name = "proxied"
upstream = "be"
[routes.match]
path_prefix = "/"
"#,
        b = backend.addr
    )
}

async fn wait_for_body(url: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = client::get(url).await;
        if r.text() == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still {:?}, want {want:?}",
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_without_failed_requests() {
    let backend = Backend::start("be").await;
    let port = free_port();
    let admin = format!("127.0.0.1:{}", free_port());
    let gw = Gateway::start(&config(port, &admin, &backend, "v1", true), &admin);
    let base = format!("http://127.0.0.1:{port}");

    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for i in 0..8 {
        let (ok, failed, stop, base) = (ok.clone(), failed.clone(), stop.clone(), base.clone());
        load.push(tokio::spawn(async move {
            let c = client::http1();
            let deadline = Instant::now() + Duration::from_secs(20);
            // Bounded in count and time.
            for n in 0..20_000 {
                if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                let path = if (n + i) % 2 == 0 {
                    "/version"
                } else {
                    "/delay/5"
                };
                let req = http::Request::get(format!("{base}{path}"))
                    .body(Default::default())
                    .unwrap();
                match tokio::time::timeout(Duration::from_secs(5), c.request(req)).await {
                    Ok(Ok(r)) if r.status() == 200 => {
                        let _ = http_body_util::BodyExt::collect(r.into_body()).await;
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 1. The file changes: the watcher reloads it.
    gw.write_config(&config(port, &admin, &backend, "v2", true));
    wait_for_body(&format!("{base}/version"), "v2").await;
    // 2. SIGHUP.
    std::fs::write(&gw.config, config(port, &admin, &backend, "v3", false)).unwrap();
    gw.signal(libc::SIGHUP);
    wait_for_body(&format!("{base}/version"), "v3").await;
    // 3. `gateway reload` through the admin API.
    std::fs::write(&gw.config, config(port, &admin, &backend, "v4", false)).unwrap();
    let (code, out, err) = run_cli(&["reload", "-c", gw.config.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(client::get(&format!("{base}/version")).await.text(), "v4");
    tokio::time::sleep(Duration::from_millis(300)).await;

    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok > 100, "load ran ({ok} requests)");
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed across reloads",
        ok + failed
    );

    let metrics = client::get(&format!("http://{admin}/metrics")).await.text();
    let reloads = metrics
        .lines()
        .find(|l| l.starts_with("gateway_config_reloads_total{result=\"ok\"}"))
        .unwrap_or_default();
    assert!(
        reloads.ends_with(" 3")
            || reloads
                .split(' ')
                .next_back()
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|n| n >= 3),
        "{reloads}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_reload_keeps_the_old_config() {
    let backend = Backend::start("be").await;
    let port = free_port();
    let admin = format!("127.0.0.1:{}", free_port());
    let gw = Gateway::start(&config(port, &admin, &backend, "good", true), &admin);
    let base = format!("http://127.0.0.1:{port}");

    let broken = config(port, &admin, &backend, "bad", true)
        .replace("upstream = \"be\"", "upstream = \"nope\"");
    gw.write_config(&broken);
    // The watcher picks it up and rejects it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = client::get(&format!("http://{admin}/metrics")).await.text();
        if m.contains("gateway_config_reloads_total{result=\"failed\"}") {
            break;
        }
        assert!(Instant::now() < deadline, "reload failure not counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(client::get(&format!("{base}/version")).await.text(), "good");
    assert_eq!(client::get(&format!("{base}/x")).await.status, 200);
    assert!(
        gw.stderr().contains("unknown upstream \"nope\""),
        "{}",
        gw.stderr()
    );

    // `gateway reload` reports the problem with its location and fails.
    let (code, _, err) = run_cli(&["reload", "-c", gw.config.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!("{}:", gw.config.display()))
            && err.contains("unknown upstream \"nope\""),
        "{err}"
    );
    assert_eq!(client::get(&format!("{base}/version")).await.text(), "good");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests() {
    let backend = Backend::start("be").await;
    let port = free_port();
    let admin = format!("127.0.0.1:{}", free_port());
    let mut gw = Gateway::start(&config(port, &admin, &backend, "v", false), &admin);
    let url = format!("http://127.0.0.1:{port}/delay/800");
    let slow = tokio::spawn(async move { client::get(&url).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    gw.signal(libc::SIGTERM);
    // While the request drains: the admin listener still answers, and says
    // the instance is not ready; the proxy listener takes no new connection.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let ready = client::get(&format!("http://{admin}/readyz")).await;
    assert_eq!(ready.status, 503, "readyz during the drain");
    assert_eq!(ready.text(), "draining\n");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "not accepting during the drain"
    );
    let r = slow.await.unwrap();
    assert_eq!(r.status, 200, "the in-flight request finished");
    let status = gw
        .wait_exit(Duration::from_secs(5))
        .expect("gateway exited");
    assert!(status.success(), "{status}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "no longer accepting"
    );
}

/// A kept-alive connection idle between requests is closed at once on
/// SIGTERM (not left to its idle timeout or the drain limit), and the
/// request before it was answered in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_idle_keep_alive_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = Backend::start("be").await;
    let port = free_port();
    let admin = format!("127.0.0.1:{}", free_port());
    let mut gw = Gateway::start(&config(port, &admin, &backend, "v", false), &admin);
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(b"GET /version HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"\r\n\r\nv") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("response in time")
            .unwrap();
        assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    // Idle now; the shutdown must reach it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let signalled = Instant::now();
    gw.signal(libc::SIGTERM);
    let n = tokio::time::timeout(Duration::from_secs(4), s.read(&mut buf))
        .await
        .expect("the idle connection is closed before the drain limit")
        .unwrap_or(0);
    assert_eq!(n, 0, "nothing more is sent: {:?}", &buf[..n]);
    assert!(
        signalled.elapsed() < Duration::from_secs(2),
        "closed {:?} after SIGTERM",
        signalled.elapsed()
    );
    let status = gw
        .wait_exit(Duration::from_secs(5))
        .expect("gateway exited");
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints() {
    let backend = Backend::start("be").await;
    let port = free_port();
    let admin = format!("127.0.0.1:{}", free_port());
    let _gw = Gateway::start(&config(port, &admin, &backend, "v", false), &admin);
    for _ in 0..3 {
        assert_eq!(
            client::get(&format!("http://127.0.0.1:{port}/x"))
                .await
                .status,
            200
        );
    }
    assert_eq!(
        client::get(&format!("http://127.0.0.1:{port}/version"))
            .await
            .status,
        200
    );
    assert_eq!(
        client::get(&format!("http://{admin}/healthz")).await.status,
        200
    );
    assert_eq!(
        client::get(&format!("http://{admin}/readyz")).await.status,
        200
    );
    let m = client::get(&format!("http://{admin}/metrics")).await.text();
    for want in [
        r#"gateway_http_requests_total{listener="main",route="proxied",method="GET",status="2xx"} 3"#,
        r#"gateway_http_requests_total{listener="main",route="version",method="GET",status="2xx"} 1"#,
        r#"gateway_http_request_duration_seconds_bucket{route="proxied",le="#,
        r#"gateway_upstream_request_duration_seconds_count{upstream="be"} 3"#,
        r#"gateway_active_connections{listener="main"}"#,
        r#"gateway_build_info{version="#,
    ] {
        assert!(m.contains(want), "missing {want} in:\n{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_and_removes_listeners() {
    let backend = Backend::start("be").await;
    let port = free_port();
    let admin = format!("127.0.0.1:{}", free_port());
    let gw = Gateway::start(&config(port, &admin, &backend, "v", false), &admin);

    // Add a second listener.
    let port2 = free_port();
    let two = config(port, &admin, &backend, "v", false)
        + &format!("[[listeners]]\nname = \"second\"\nlisten = \"127.0.0.1:{port2}\"\n");
    std::fs::write(&gw.config, &two).unwrap();
    let (code, out, err) = run_cli(&["reload", "-c", gw.config.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        client::get(&format!("http://127.0.0.1:{port2}/version"))
            .await
            .text(),
        "v"
    );

    // A listener whose port is taken: the reload is rejected as a whole.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let clash = two.clone()
        + &format!("[[listeners]]\nname = \"third\"\nlisten = \"127.0.0.1:{taken_port}\"\n");
    std::fs::write(&gw.config, &clash).unwrap();
    let (code, _, err) = run_cli(&["reload", "-c", gw.config.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{taken_port}")),
        "{err}"
    );
    assert_eq!(
        client::get(&format!("http://127.0.0.1:{port2}/version"))
            .await
            .status,
        200
    );

    // Remove the first listener: it stops accepting, the second keeps serving.
    let only_second = two
        .replacen(
            &format!("listen = \"127.0.0.1:{port}\""),
            &format!("listen = \"127.0.0.1:{}\"", free_port()),
            1,
        )
        .replacen("name = \"main\"", "name = \"renamed\"", 1);
    std::fs::write(&gw.config, &only_second).unwrap();
    let (code, out, err) = run_cli(&["reload", "-c", gw.config.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(Instant::now() < deadline, "old listener still accepting");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        client::get(&format!("http://127.0.0.1:{port2}/version"))
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_names_the_settings_that_need_a_restart() {
    let backend = Backend::start("be").await;
    let port = free_port();
    let admin = format!("127.0.0.1:{}", free_port());
    let gw = Gateway::start(&config(port, &admin, &backend, "one", false), &admin);
    let changed = config(port, &admin, &backend, "two", false)
        .replace("workers = 2", "workers = 1")
        .replace("shutdown_timeout = \"5s\"", "shutdown_timeout = \"7s\"");
    gw.write_config(&changed);
    let (code, _, err) = run_cli(&["reload", "-c", gw.config.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    // The rest of the file applies; the two start-only settings are named.
    wait_for_body(&format!("http://127.0.0.1:{port}/version"), "two").await;
    let log = gw.stderr();
    for key in ["[server] workers", "[server] shutdown_timeout"] {
        assert!(
            log.contains(&format!("{key} changed, but it is read at start only")),
            "{key} not named in:\n{log}"
        );
    }
    assert!(!log.contains("[admin] listen changed"), "{log}");
}
