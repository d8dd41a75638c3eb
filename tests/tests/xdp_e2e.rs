//! The XDP fast path end to end: network namespaces joined by veth pairs,
//! the real gateway with its XDP program on its veth ends, real TCP from
//! the client namespaces. Needs root; skipped (saying why) otherwise.
//! Every namespace, veth and pin directory is removed on drop.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use gateway_tests::gateway::run_cli;
use gateway_tests::netns::{Bed, NsGateway, Outcome, Pins, get, skip_reason};

const PORT: u16 = 8080;
/// A dropped SYN is retried after 1 s; anything shorter than that and
/// well above the veth round trip tells "dropped" from "answered".
const BLOCKED: Duration = Duration::from_millis(150);
const OK: Duration = Duration::from_secs(2);

fn admin() -> SocketAddr {
    "127.0.0.1:9901".parse().unwrap()
}

fn addr(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn gw(ip: &str) -> SocketAddr {
    SocketAddr::new(addr(ip), PORT)
}

/// A gateway answering 200 "ok" on every path, XDP on `gw0..gw{n-1}`.
fn config(pins: &Path, n: usize, xdp: &str) -> String {
    let ifaces: Vec<String> = (0..n).map(|i| format!("\"gw{i}\"")).collect();
    format!(
        r#"
[server]
workers = 1
watch_config = false
shutdown_timeout = "1s"

[admin]
listen = "{admin}"

[access_log]
enabled = false

[[listeners]]
name = "public"
listen = "[::]:{PORT}"

[[routes]]
name = "ok"
[routes.match]
path_prefix = "/"
[routes.respond]
status = 200
body = "ok\n"

[xdp]
interfaces = [{ifaces}]
pin_path = "{pins}"
{xdp}
"#,
        admin = admin(),
        ifaces = ifaces.join(", "),
        pins = pins.display(),
    )
}

macro_rules! require_root {
    () => {
        if let Some(why) = skip_reason() {
            gateway_tests::skip(&why);
            return;
        }
    };
}

fn cli(args: &[&str], pins: &Pins) -> String {
    let mut a = args.to_vec();
    let dir = pins.dir.display().to_string();
    a.extend(["--pin-path", &dir]);
    let (code, out, err) = run_cli(&a);
    assert_eq!(code, 0, "gateway {}: {out}{err}", a.join(" "));
    out
}

/// The value of one series in a Prometheus text exposition.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn denied_source_cannot_connect_allowed_can() {
    require_root!();
    let bed = Bed::new(2);
    bed.add_client_addr(0, "10.199.1.3");
    let pins = Pins::new();
    let g = NsGateway::start(
        &bed.gw,
        &config(
            &pins.dir,
            2,
            r#"deny = ["10.199.1.0/24", "fd00:199:1::/64"]
allow = ["10.199.1.3"]"#,
        ),
        admin(),
        &[],
    );
    assert!(
        g.stderr().contains("XDP fast path attached"),
        "{}",
        g.stderr()
    );
    let denied = bed.clients[0].run(|| {
        (
            get(Some(addr("10.199.1.2")), gw("10.199.1.1"), "/", BLOCKED),
            get(
                Some(addr("fd00:199:1::2")),
                gw("fd00:199:1::1"),
                "/",
                BLOCKED,
            ),
            get(Some(addr("10.199.1.3")), gw("10.199.1.1"), "/", OK),
        )
    });
    assert_eq!(denied.0, Err(Outcome::TimedOut), "denied IPv4 source");
    assert_eq!(denied.1, Err(Outcome::TimedOut), "denied IPv6 source");
    assert_eq!(denied.2, Ok(200), "allowed over denied");
    let other = bed.clients[1].run(|| {
        (
            get(None, gw("10.199.2.1"), "/", OK),
            get(None, gw("fd00:199:2::1"), "/", OK),
        )
    });
    assert_eq!(other, (Ok(200), Ok(200)), "a source on no list");

    let stats = cli(&["xdp", "stats"], &pins);
    assert!(stats.contains("attached: gw0, gw1"), "{stats}");
    assert!(stats.contains("10.199.1.2"), "top dropped sources: {stats}");
    // The counters reach /metrics within a second or so.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (_, body) = g.admin_get("/metrics");
        let drops = metric(
            &body,
            r#"gateway_xdp_packets_total{action="drop",reason="deny_list"}"#,
        );
        let allowed = metric(
            &body,
            r#"gateway_xdp_packets_total{action="pass",reason="allow_list"}"#,
        );
        if drops.is_some_and(|d| d >= 2.0) && allowed.is_some_and(|a| a >= 1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no XDP counters in /metrics:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One connection attempt of a prober: when it started, how it ended.
type Attempt = (Instant, Outcome);

/// Probes `dst` from `src` every `every` until `stop` (at most 10 s).
fn probe(
    bed: &Bed,
    client: usize,
    src: &'static str,
    dst: SocketAddr,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<Attempt>> {
    bed.clients[client].spawn(move || {
        let mut v = Vec::new();
        let end = Instant::now() + Duration::from_secs(10);
        while !stop.load(Ordering::Relaxed) && Instant::now() < end {
            let t = Instant::now();
            // Short: a reset or a SYN-ACK comes back in microseconds.
            let (o, _) =
                gateway_tests::netns::connect(Some(addr(src)), dst, Duration::from_millis(50));
            v.push((t, o));
            std::thread::sleep(every);
        }
        v
    })
}

#[test]
fn cli_deny_blocks_a_live_source_within_10ms() {
    require_root!();
    let bed = Bed::new(1);
    let pins = Pins::new();
    let _g = NsGateway::start(&bed.gw, &config(&pins.dir, 1, ""), admin(), &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let prober = probe(
        &bed,
        0,
        "10.199.1.2",
        gw("10.199.1.1"),
        Duration::from_millis(1),
        stop.clone(),
    );
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let out = cli(&["deny", "add", "10.199.1.2"], &pins);
    let done = Instant::now();
    std::thread::sleep(Duration::from_millis(400));
    stop.store(true, Ordering::Relaxed);
    let attempts = prober.join().unwrap();
    assert!(out.contains("10.199.1.2/32: added"), "{out}");
    let before: Vec<_> = attempts.iter().filter(|a| a.0 < started).collect();
    assert!(
        before.len() >= 20 && before.iter().all(|a| a.1 == Outcome::Connected),
        "the source connected before the rule: {before:?}"
    );
    // Every attempt that began 10 ms after the command returned was dropped.
    let after: Vec<_> = attempts
        .iter()
        .filter(|a| a.0 >= done + Duration::from_millis(10))
        .collect();
    assert!(!after.is_empty(), "no attempt after the rule");
    assert!(
        after.iter().all(|a| a.1 == Outcome::TimedOut),
        "attempts after the rule: {after:?}"
    );
    eprintln!(
        "gateway deny add took {:?}; {} attempts after it, all dropped",
        done - started,
        after.len()
    );

    // And `del` lifts it.
    let out = cli(&["deny", "del", "10.199.1.2"], &pins);
    assert!(out.contains("removed"), "{out}");
    let r = bed.clients[0].run(|| get(None, gw("10.199.1.1"), "/", OK));
    assert_eq!(r, Ok(200));
}

#[test]
fn a_flood_is_cut_to_the_rate_and_others_are_unaffected() {
    require_root!();
    let bed = Bed::new(2);
    let pins = Pins::new();
    let _g = NsGateway::start(
        &bed.gw,
        &config(
            &pins.dir,
            2,
            "[xdp.rate_limit]\nrate = 50\nburst = 10\ncount = \"syn\"",
        ),
        admin(),
        &[],
    );
    // Client 0: 400 new connections as fast as a dropped SYN lets it (a
    // 5 ms wait each), bounded to 3 s.
    let flood = bed.clients[0].spawn(|| {
        let start = Instant::now();
        let mut ok = 0u32;
        for _ in 0..400 {
            if start.elapsed() > Duration::from_secs(3) {
                break;
            }
            let (o, _) =
                gateway_tests::netns::connect(None, gw("10.199.1.1"), Duration::from_millis(5));
            if o == Outcome::Connected {
                ok += 1;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        (ok, start.elapsed())
    });
    // Client 1 meanwhile: 20 requests at 20 per second, all served.
    let calm = bed.clients[1].spawn(|| {
        (0..20)
            .map(|_| {
                let r = get(None, gw("10.199.2.1"), "/", OK);
                std::thread::sleep(Duration::from_millis(50));
                r
            })
            .collect::<Vec<_>>()
    });
    let (ok, took) = flood.join().unwrap();
    let calm = calm.join().unwrap();
    assert!(
        calm.iter().all(|r| *r == Ok(200)),
        "the other source: {calm:?}"
    );
    // Burst plus rate over the time taken, with a tick of clock slack.
    let most = 10.0 + 50.0 * (took.as_secs_f64() + 0.02);
    eprintln!("flood: {ok} of 400 connected in {took:?} (at most {most:.0} allowed)");
    let least = 10.0 + 50.0 * took.as_secs_f64() * 0.5;
    assert!(
        f64::from(ok) >= least,
        "{ok} connected, expected at least {least:.0}"
    );
    assert!(f64::from(ok) <= most, "{ok} connected, limit {most:.0}");
    let stats = cli(&["xdp", "stats"], &pins);
    assert!(stats.contains("rate_limit"), "{stats}");
}

#[test]
fn rules_survive_a_restart_without_a_gap() {
    require_root!();
    let bed = Bed::new(2);
    let pins = Pins::new();
    let mut g = NsGateway::start(
        &bed.gw,
        &config(&pins.dir, 2, "deny = [\"10.199.2.0/24\"]"),
        admin(),
        &[],
    );
    cli(&["deny", "add", "10.199.1.2", "--ttl", "10m"], &pins);
    // The denied sources probe through the restart: with no listener the
    // kernel would answer a passed SYN with a reset, so only time-outs mean
    // the program kept dropping throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let p1 = probe(
        &bed,
        0,
        "10.199.1.2",
        gw("10.199.1.1"),
        Duration::from_millis(2),
        stop.clone(),
    );
    let p2 = probe(
        &bed,
        1,
        "10.199.2.2",
        gw("10.199.2.1"),
        Duration::from_millis(2),
        stop.clone(),
    );
    std::thread::sleep(Duration::from_millis(100));
    g.stop();
    // Nothing runs now; the pinned program still enforces.
    std::thread::sleep(Duration::from_millis(300));
    let listed = cli(&["deny", "list"], &pins);
    g.restart(&bed.gw, &[]);
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    for (name, p) in [("run-time rule", p1), ("config rule", p2)] {
        let attempts = p.join().unwrap();
        assert!(attempts.len() >= 15, "{name}: {} attempts", attempts.len());
        let bad: Vec<_> = attempts
            .iter()
            .filter(|a| a.1 != Outcome::TimedOut)
            .collect();
        assert!(bad.is_empty(), "{name}: not dropped: {bad:?}");
    }
    assert!(listed.contains("10.199.1.2/32"), "{listed}");
    assert!(listed.contains("10.199.2.0/24"), "{listed}");
    assert!(
        g.stderr().matches("XDP fast path attached").count() == 2,
        "{}",
        g.stderr()
    );
    // An allowed source is served by the new gateway.
    bed.add_client_addr(0, "10.199.1.9");
    let r = bed.clients[0].run(|| get(Some(addr("10.199.1.9")), gw("10.199.1.1"), "/", OK));
    assert_eq!(r, Ok(200));

    // `gateway xdp detach` takes everything away.
    g.stop();
    let out = cli(&["xdp", "detach"], &pins);
    assert!(out.contains("detached from gw0, gw1"), "{out}");
    assert!(!pins.dir.exists());
    let r = bed.clients[0].run(|| get(None, gw("10.199.1.1"), "/", BLOCKED));
    assert_eq!(r, Err(Outcome::Refused), "no program, no listener: a reset");
}

#[test]
fn reload_changes_the_lists_in_place() {
    require_root!();
    let bed = Bed::new(2);
    let pins = Pins::new();
    let g = NsGateway::start(
        &bed.gw,
        &config(&pins.dir, 2, "deny = [\"10.199.1.0/24\"]"),
        admin(),
        &[],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let p = probe(
        &bed,
        0,
        "10.199.1.2",
        gw("10.199.1.1"),
        Duration::from_millis(2),
        stop.clone(),
    );
    // Reload twice with the /24 kept and other entries added and removed.
    for extra in ["\"10.199.2.0/24\"", "\"10.199.3.0/24\", \"10.199.1.2\""] {
        std::fs::write(
            &g.config,
            config(
                &pins.dir,
                2,
                &format!("deny = [\"10.199.1.0/24\", {extra}]"),
            ),
        )
        .unwrap();
        let out = g_reload(&g);
        assert!(out.contains("reloaded"), "{out}");
    }
    stop.store(true, Ordering::Relaxed);
    let attempts = p.join().unwrap();
    assert!(
        attempts.iter().all(|a| a.1 == Outcome::TimedOut),
        "{attempts:?}"
    );
    // 10.199.2.0/24 came and went: client 1 is served again.
    let r = bed.clients[1].run(|| get(None, gw("10.199.2.1"), "/", OK));
    assert_eq!(r, Ok(200));
    let listed = cli(&["deny", "list"], &pins);
    assert!(
        !listed.contains("10.199.2.0/24") && listed.contains("10.199.3.0/24"),
        "{listed}"
    );
}

/// `POST /admin/reload` from inside the gateway's namespace.
fn g_reload(g: &NsGateway) -> String {
    let (status, body) = g.admin_post("/admin/reload");
    format!("{status} {body}")
}
