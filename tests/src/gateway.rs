//! Starts the real gateway binary on a config written to a temporary
//! directory, waits until it is ready, and stops it when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Path of the gateway binary: `$GATEWAY_BIN`, else next to the test binary
/// (`target/<profile>/gateway`; `cargo xtask test` builds it first).
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("GATEWAY_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/gateway
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    dir.join("gateway")
}

/// A running gateway.
pub struct Gateway {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    /// Admin address (`127.0.0.1:PORT`).
    pub admin: String,
}

impl Gateway {
    /// Writes `config` (which must contain an `[admin]` listen address equal
    /// to `admin`) and starts the gateway with `--no-xdp` plus `extra` args.
    pub fn start_with(config: &str, admin: &str, extra: &[&str]) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, config).expect("write config");
        let stdout = std::fs::File::create(dir.path().join("stdout.log")).expect("log file");
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).expect("log file");
        let child = Command::new(binary())
            .arg("run")
            .arg("-c")
            .arg(&path)
            .args(extra)
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("start gateway binary (run `cargo xtask test`, which builds it)");
        let mut gw = Gateway {
            child,
            dir,
            config: path,
            admin: admin.to_string(),
        };
        gw.wait_ready();
        gw
    }

    /// Starts without `--no-xdp` as an unprivileged user: as itself when
    /// not root, else as `nobody` (uid and gid 65534, no supplementary
    /// groups, so no capabilities either).
    pub fn start_unprivileged(config: &str, admin: &str) -> Gateway {
        use std::os::unix::fs::PermissionsExt as _;
        use std::os::unix::process::CommandExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        // nobody must read the config.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, config).expect("write config");
        let stdout = std::fs::File::create(dir.path().join("stdout.log")).expect("log file");
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).expect("log file");
        let mut cmd = Command::new(binary());
        cmd.arg("run")
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr));
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::geteuid() == 0
                    && (libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(65534) != 0
                        || libc::setuid(65534) != 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start gateway binary");
        let mut gw = Gateway {
            child,
            dir,
            config: path,
            admin: admin.to_string(),
        };
        gw.wait_ready();
        gw
    }

    /// Starts with `--no-xdp`.
    pub fn start(config: &str, admin: &str) -> Gateway {
        Self::start_with(config, admin, &["--no-xdp"])
    }

    /// Waits (up to 10 s) for `/readyz` to answer 200.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "gateway exited early ({status}); stderr:\n{}",
                    self.stderr()
                );
            }
            if crate::client::raw_status(
                &self.admin,
                "GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            ) == Some(200)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("gateway not ready within 10 s; stderr:\n{}", self.stderr());
    }

    /// What the gateway wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// What the gateway wrote to stdout (the access log) so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout.log")).unwrap_or_default()
    }

    /// The first access log line (stdout) containing `needle`, as JSON,
    /// waiting up to 5 s for it to be written.
    pub fn access_log_line(&self, needle: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(l) = self.stdout().lines().find(|l| l.contains(needle)) {
                return serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            }
            assert!(
                Instant::now() < deadline,
                "no access log line with {needle}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Replaces the config file's contents.
    pub fn write_config(&self, config: &str) {
        // Write then rename, as editors and config managers do.
        let tmp = self.dir.path().join("gateway.toml.tmp");
        std::fs::write(&tmp, config).expect("write config");
        std::fs::rename(&tmp, &self.config).expect("rename config");
    }

    /// Sends a signal to the gateway.
    pub fn signal(&self, sig: i32) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) with a pid we own.
        unsafe {
            libc::kill(pid, sig);
        }
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGTERM);
            if self.wait_exit(Duration::from_secs(5)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// Runs `gateway <args>` to completion: (exit code, stdout, stderr).
/// Runs `gateway check` on `text` written as `g.toml` in a fresh directory
/// (with `files`, named relative to it, beside it): the exit code and what
/// it printed.
pub fn check_config(text: &str, files: &[(&str, &str)]) -> (i32, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("g.toml");
    std::fs::write(&path, text).expect("write config");
    for (name, body) in files {
        std::fs::write(dir.path().join(name), body).expect("write file");
    }
    let (code, out, err) = run_cli(&["check", "-c", path.to_str().expect("path")]);
    (code, format!("{out}{err}"))
}

pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary())
        .args(args)
        .output()
        .expect("run gateway binary");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
