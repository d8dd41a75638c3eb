//! The kernel fast path's userspace side: loading and attaching the embedded
//! XDP program, its pinned maps, and the userspace fallback used when XDP is
//! unavailable. docs/xdp.md describes the whole feature.
//!
//! - `config`: the `[xdp]` section.
//! - `rules`: the allow/deny lists as data and their compiled kernel form.
//! - `kernel`: loading, pinning, attaching, map updates.
//! - `userspace`: the same policy checked at accept.
//! - `cli`: `gateway deny|allow|xdp ...`.

pub mod api;
pub mod bans;
pub mod bench;
pub mod cli;
pub mod config;
pub mod kernel;
pub mod packet;
pub mod rules;
pub mod userspace;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwapOption;
use gateway_common::{DropEvent, stat};

use config::XdpSettings;
use kernel::{Loaded, PinLock};
use rules::{Edit, List, Rules, now_ns};
use userspace::Policy;

/// Enforces the `[xdp]` policy, in the kernel when possible, else at accept.
pub struct Enforcer {
    no_xdp: bool,
    /// Timed bans from auto-ban, enforced at accept (see `bans`) and, when
    /// the kernel enforces, written into the deny map too.
    bans: bans::Bans,
    /// Set while userspace enforces (XDP unavailable or not wanted).
    user: ArcSwapOption<Policy>,
    state: Mutex<State>,
}

impl std::fmt::Debug for Enforcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enforcer")
            .field("no_xdp", &self.no_xdp)
            .field("userspace", &self.user.load().is_some())
            .finish()
    }
}

impl Default for Enforcer {
    fn default() -> Self {
        Enforcer {
            no_xdp: true,
            bans: bans::Bans::default(),
            user: ArcSwapOption::empty(),
            state: Mutex::new(State::default()),
        }
    }
}

#[derive(Default)]
struct State {
    kernel: Option<Running>,
    /// The last reason XDP could not be used (said once).
    failure: Option<String>,
    /// The `[xdp]` section in force.
    settings: XdpSettings,
    /// The lists the userspace fallback enforces: the config file's and
    /// run-time entries added through the admin API.
    rules: Rules,
}

/// An attached program and the thread that reads its counters and events.
struct Running {
    kernel: Arc<Mutex<Kernel>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Running {
    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Enforcer {
    /// Whether a new connection from `peer` may be served (userspace
    /// enforcement; always true when the kernel enforces).
    pub fn admit(&self, peer: IpAddr) -> bool {
        if self.bans.contains(crate::policy::access::canonical(peer)) {
            return false;
        }
        match &*self.user.load() {
            None => true,
            Some(p) => match p.check(peer) {
                Ok(()) => true,
                Err(r) => {
                    metrics::counter!("gateway_xdp_userspace_refused_total", "reason" => r.label())
                        .increment(1);
                    false
                }
            },
        }
    }

    /// Bans `net`, the source `ip` belongs to, for `ttl` (auto-ban),
    /// unless an allow entry covers `ip` (and only `ip` when one lies in
    /// `net`):
    /// into the deny list with that expiry when `[xdp]` is configured (the
    /// kernel map when the XDP program enforces, so the kernel drops the
    /// source's packets), else into a userspace ban table checked at
    /// accept. A `proxied` source (a client a balancer or trusted proxy
    /// named) always goes into that table: its packets come from the
    /// balancer, so no deny-list entry could match them. Rare by nature, so
    /// the map write may run on the caller's thread. Returns whether the
    /// source was banned.
    pub fn ban(&self, ip: IpAddr, net: ipnet::IpNet, ttl: Duration, proxied: bool) -> bool {
        let ip = crate::policy::access::canonical(ip);
        let allow = self.entries(List::Allow).unwrap_or_default();
        if allow.iter().any(|(a, _)| a.contains(&ip)) {
            tracing::info!(%ip, "auto-ban skipped: the source is allow-listed");
            return false;
        }
        // A network holding allow-listed addresses is not banned whole:
        // only the address that earned the ban is.
        let net = if allow.iter().any(|(a, _)| net.contains(a)) {
            ipnet::IpNet::from(ip)
        } else {
            net
        };
        // With an `[xdp]` section the ban joins the deny list (the kernel
        // map, or the userspace lists), so `gateway deny list` shows it and
        // `gateway deny del` lifts it early; otherwise (or if that fails) a
        // table of its own enforces it at accept (`GET /admin/bans`).
        let enabled = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .settings
            .enabled;
        if enabled && !proxied {
            match self.edit(List::Deny, &net, false, Some(ttl)) {
                Ok(_) => return true,
                Err(e) => tracing::warn!(%net, "auto-ban not added to the deny list: {e}"),
            }
        }
        self.bans.insert(net, ttl);
        true
    }

    /// Auto-ban bans held in the userspace ban table (no `[xdp]` section)
    /// and the time each has left; with `[xdp]`, bans are deny-list entries.
    pub fn bans(&self) -> Vec<(ipnet::IpNet, Duration)> {
        self.bans.list()
    }

    /// Starts enforcement for `settings` (in the kernel unless `no_xdp`).
    pub fn start(settings: &XdpSettings, no_xdp: bool) -> Enforcer {
        let e = Enforcer {
            no_xdp,
            ..Enforcer::default()
        };
        if settings.enabled {
            describe_metrics();
        }
        e.apply(settings, true);
        e
    }

    /// Applies a reloaded `[xdp]` section.
    pub fn update(&self, settings: &XdpSettings) {
        self.apply(settings, false);
    }

    /// Stops enforcement owned by this process. Pinned state stays: the
    /// program keeps enforcing the last rules until `gateway xdp detach`
    /// or the next gateway takes over.
    pub fn stop(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut r) = st.kernel.take() {
            r.stop();
        }
    }

    /// Whether the XDP program enforces (rather than userspace).
    pub fn in_kernel(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .kernel
            .is_some()
    }

    /// Applies a run-time change to a list (the admin API): to the pinned
    /// maps when the program enforces, else to the userspace policy. `ttl`
    /// `None` means `[xdp] ban_ttl` for the deny list, no expiry for allow.
    pub fn edit(
        &self,
        list: List,
        net: &ipnet::IpNet,
        del: bool,
        ttl: Option<Duration>,
    ) -> Result<String, String> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = now_ns();
        let ttl = ttl.unwrap_or(match list {
            List::Deny => st.settings.ban_ttl,
            List::Allow => Duration::ZERO,
        });
        let edit = if del {
            Edit::Del
        } else {
            Edit::Add {
                until: rules::expiry(ttl, now),
            }
        };
        if let Some(r) = &st.kernel {
            let mut k = r.kernel.lock().unwrap_or_else(|e| e.into_inner());
            return k.edit(list, net, edit, now);
        }
        if !st.settings.enabled {
            return Err("no [xdp] section in the config: nothing enforces the lists".into());
        }
        let mut rules = st.rules.clone();
        rules.reap(now);
        let (rules, msg) = rules.edit(list, net, edit, now)?;
        let prev = self.user.load_full();
        self.user.store(Some(Arc::new(Policy::new(
            &st.settings,
            &rules,
            prev.as_deref(),
        ))));
        st.rules = rules;
        Ok(msg)
    }

    /// The live entries of `list`.
    pub fn entries(&self, list: List) -> Result<Vec<(ipnet::IpNet, rules::Entry)>, String> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let rules = match &st.kernel {
            Some(r) => {
                let k = r.kernel.lock().unwrap_or_else(|e| e.into_inner());
                k.loaded.maps.read_rules().map_err(|e| format!("{e:#}"))?
            }
            None => st.rules.clone(),
        };
        let now = now_ns();
        Ok(rules
            .list(list)
            .into_iter()
            .filter(|(_, e)| e.live(now))
            .collect())
    }

    fn apply(&self, s: &XdpSettings, at_start: bool) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.settings = s.clone();
        let want_kernel = s.enabled && !self.no_xdp && !s.interfaces.is_empty();
        if let Some(r) = &st.kernel {
            if want_kernel {
                let mut k = r.kernel.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(e) = k.update(s) {
                    tracing::error!("cannot apply the [xdp] section to the kernel: {e:#}");
                }
                self.user.store(None);
                return;
            }
            // No interfaces (or no [xdp]) any more: take the program off.
            let mut r = st.kernel.take().expect("checked above");
            r.stop();
            let k = r.kernel.lock().unwrap_or_else(|e| e.into_inner());
            k.detach_all();
            tracing::info!("XDP detached (no interfaces in [xdp])");
        } else if want_kernel {
            match Kernel::start(s) {
                Ok(k) => {
                    tracing::info!(
                        interfaces = ?s.interfaces,
                        pins = %s.pin_path.display(),
                        "XDP fast path attached: allow/deny and rate limits enforced in the kernel"
                    );
                    st.kernel = Some(spawn(k));
                    st.failure = None;
                    self.user.store(None);
                    return;
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    if st.failure.as_deref() != Some(msg.as_str()) {
                        tracing::warn!(
                            "XDP unavailable ({msg}): enforcing [xdp] allow/deny and rate limits in userspace, at accept"
                        );
                        st.failure = Some(msg);
                    }
                }
            }
        } else if at_start && s.enabled {
            if self.no_xdp {
                tracing::info!(
                    "XDP disabled (--no-xdp): enforcing [xdp] allow/deny and rate limits in userspace, at accept"
                );
            } else {
                tracing::info!(
                    "[xdp] lists no interfaces: enforcing allow/deny and rate limits in userspace, at accept"
                );
            }
        }
        if !s.enabled {
            self.user.store(None);
            return;
        }
        st.rules = st.rules.with_config(&s.allow, &s.deny);
        let prev = self.user.load_full();
        self.user
            .store(Some(Arc::new(Policy::new(s, &st.rules, prev.as_deref()))));
    }
}

/// Starts the thread that, every 100 ms, forwards the program's log and
/// drop events, and every second exports the counters and expires timed
/// entries.
fn spawn(k: Kernel) -> Running {
    let kernel = Arc::new(Mutex::new(k));
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let kernel = kernel.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("xdp".into())
            .spawn(move || {
                let mut tick = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    {
                        let mut k = kernel.lock().unwrap_or_else(|e| e.into_inner());
                        k.tick(tick.is_multiple_of(10));
                    }
                    tick += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
            .ok()
    };
    if thread.is_none() {
        tracing::warn!("cannot start the xdp thread: no XDP metrics or drop log");
    }
    Running {
        kernel,
        stop,
        thread,
    }
}

/// The attached program, owned by this process.
pub struct Kernel {
    dir: PathBuf,
    loaded: Loaded,
    /// The rules as last read or written, and the generation they belong to.
    rules: Rules,
    generation: u64,
    settings: XdpSettings,
    /// Sampled drops since the last log line, by source and reason.
    drops: HashMap<(IpAddr, u8), (u64, u16)>,
}

impl Kernel {
    /// Loads the program on the pinned maps (created if missing), brings
    /// the rules and policy up to `s`, and attaches it to `s.interfaces`
    /// (taking over pinned links without a gap).
    pub fn start(s: &XdpSettings) -> anyhow::Result<Kernel> {
        if !kernel::object_available() {
            anyhow::bail!("this binary was built without the XDP program (AYA_BUILD_SKIP=1)");
        }
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let dir = s.pin_path.clone();
        kernel::prepare_pin_dir(&dir).with_context(|| {
            if root {
                "cannot prepare the pin directory".to_string()
            } else {
                "cannot prepare the pin directory (not running as root)".to_string()
            }
        })?;
        let _lock = PinLock::acquire(&dir)?;
        let mut loaded =
            Loaded::load(Some(&dir), s.max_rules, s.max_sources).with_context(|| {
                if root {
                    "cannot load the XDP program"
                } else {
                    "cannot load the XDP program (needs root, or CAP_BPF and CAP_NET_ADMIN)"
                }
            })?;
        let current = loaded.maps.read_rules()?;
        let desired = current.with_config(&s.allow, &s.deny);
        loaded.maps.apply(&current, &desired, true)?;
        loaded.maps.set_policy(s)?;
        let mut attached: Vec<String> = Vec::new();
        for iface in &s.interfaces {
            if let Err(e) = kernel::attach(&mut loaded, &dir, iface, s.mode) {
                for a in &attached {
                    let _ = kernel::detach(&dir, a);
                }
                return Err(e);
            }
            attached.push(iface.clone());
        }
        for stale in kernel::pinned_links(&dir) {
            if !s.interfaces.contains(&stale) {
                let _ = kernel::detach(&dir, &stale);
                tracing::info!(interface = %stale, "XDP detached (not in [xdp] interfaces)");
            }
        }
        let generation = loaded.maps.meta()?.generation;
        Ok(Kernel {
            dir,
            loaded,
            rules: desired,
            generation,
            settings: s.clone(),
            drops: HashMap::new(),
        })
    }

    /// Reads the rules again if another process changed them.
    fn refresh(&mut self) -> anyhow::Result<()> {
        let g = self.loaded.maps.meta()?.generation;
        if g != self.generation {
            self.rules = self.loaded.maps.read_rules()?;
            self.generation = g;
        }
        Ok(())
    }

    fn change(&mut self, f: impl FnOnce(&Rules) -> Rules) -> anyhow::Result<()> {
        let _lock = PinLock::acquire(&self.dir)?;
        self.refresh()?;
        let new = f(&self.rules);
        self.loaded.maps.apply(&self.rules, &new, false)?;
        self.rules = new;
        self.generation = self.loaded.maps.meta()?.generation;
        Ok(())
    }

    /// Applies a reloaded `[xdp]` section: the config part of the lists
    /// (diffed), the policy, and the interface set.
    pub fn update(&mut self, s: &XdpSettings) -> anyhow::Result<()> {
        if s.pin_path != self.dir {
            tracing::warn!("[xdp] pin_path changes take effect at the next start");
        }
        if (s.max_rules, s.max_sources) != (self.settings.max_rules, self.settings.max_sources) {
            tracing::warn!(
                "[xdp] max_rules and max_sources size pinned maps: they change only after `gateway xdp detach` and a restart"
            );
        }
        self.change(|r| r.with_config(&s.allow, &s.deny))?;
        {
            let _lock = PinLock::acquire(&self.dir)?;
            self.loaded.maps.set_policy(s)?;
        }
        for iface in &s.interfaces {
            if !self.settings.interfaces.contains(iface) {
                kernel::attach(&mut self.loaded, &self.dir, iface, s.mode)?;
                tracing::info!(interface = %iface, "XDP attached");
            }
        }
        for iface in &self.settings.interfaces {
            if !s.interfaces.contains(iface) {
                kernel::detach(&self.dir, iface)?;
                tracing::info!(interface = %iface, "XDP detached");
            }
        }
        if s.mode != self.settings.mode {
            tracing::warn!("[xdp] mode changes apply to interfaces attached from now on");
        }
        self.settings = s.clone();
        Ok(())
    }

    /// A run-time list change in the maps.
    fn edit(
        &mut self,
        list: List,
        net: &ipnet::IpNet,
        edit: Edit,
        now: u64,
    ) -> Result<String, String> {
        let mut out = Err(String::new());
        let r = self.change(|r| match r.edit(list, net, edit, now) {
            Ok((new, msg)) => {
                out = Ok(msg);
                new
            }
            Err(e) => {
                out = Err(e);
                r.clone()
            }
        });
        r.map_err(|e| format!("{e:#}"))?;
        out
    }

    fn detach_all(&self) {
        for iface in kernel::pinned_links(&self.dir) {
            let _ = kernel::detach(&self.dir, &iface);
        }
    }

    fn tick(&mut self, second: bool) {
        self.loaded.flush_log();
        if let Some(ring) = &mut self.loaded.events {
            // At most a ring's worth per tick; the program budgets its output.
            for _ in 0..4096 {
                let Some(item) = ring.next() else { break };
                if item.len() < std::mem::size_of::<DropEvent>() {
                    continue;
                }
                // SAFETY: the program writes whole `DropEvent`s; read unaligned.
                let ev: DropEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                let ip = kernel::addr_of(u32::from(ev.family), &ev.addr);
                let e = self.drops.entry((ip, ev.reason)).or_insert((0, ev.port));
                e.0 += 1;
            }
        }
        if !second {
            return;
        }
        self.export_stats();
        self.log_drops();
        if self.rules.next_expiry().is_some_and(|t| t <= now_ns())
            && let Err(e) = self.change(|r| {
                let mut n = r.clone();
                n.reap(now_ns());
                n
            })
        {
            tracing::warn!("cannot remove expired XDP entries: {e:#}");
        }
    }

    fn export_stats(&self) {
        let Ok(stats) = self.loaded.maps.stats() else {
            return;
        };
        for (c, (action, reason)) in stats.iter().zip(stat::LABELS) {
            metrics::counter!("gateway_xdp_packets_total", "action" => action, "reason" => reason)
                .absolute(c.packets);
            metrics::counter!("gateway_xdp_bytes_total", "action" => action, "reason" => reason)
                .absolute(c.bytes);
        }
    }

    /// One line per source (at most five, then a summary) per second.
    fn log_drops(&mut self) {
        if self.drops.is_empty() {
            return;
        }
        let mut v: Vec<_> = self.drops.drain().collect();
        v.sort_unstable_by_key(|e| std::cmp::Reverse(e.1.0));
        for ((ip, reason), (n, port)) in v.iter().take(5) {
            let reason = stat::LABELS
                .get(usize::from(*reason))
                .map_or("unknown", |l| l.1);
            tracing::info!(source = %ip, port, reason, sampled = n, "XDP dropped packets");
        }
        if v.len() > 5 {
            tracing::info!("XDP dropped packets from {} more sources", v.len() - 5);
        }
    }
}

fn describe_metrics() {
    metrics::describe_counter!(
        "gateway_xdp_packets_total",
        "Packets seen by the XDP program, by action (pass, drop) and reason."
    );
    metrics::describe_counter!(
        "gateway_xdp_bytes_total",
        "Bytes seen by the XDP program, by action and reason."
    );
    metrics::describe_counter!(
        "gateway_xdp_userspace_refused_total",
        "Connections refused at accept by the userspace fallback, by reason."
    );
}
