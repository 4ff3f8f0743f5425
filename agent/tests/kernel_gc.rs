//! Kernel tests of the gc probe: real runtimes (Go 1.19/1.21/newest, plain, stripped and
//! PIE; OpenJDK 17; CPython 3.11; Node) driven through stdin, compared against each
//! runtime's own account of its pauses. The applications are never changed: each must exit
//! normally with the output it prints without the agent.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use common::*;

const PAUSE: &str = "stallwatch_runtime_pause_seconds";
const STOP: &str = "stallwatch_runtime_stop_latency_seconds";
const PROCESSES: &str = "stallwatch_runtime_processes";
const FAILURES: &str = "stallwatch_runtime_attach_failures_total";
const WAIT: Duration = Duration::from_secs(30);

/// A program driven line by line through stdin, its stdout read line by line.
struct Interactive {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    pub pid: u32,
    /// Everything it printed, in order.
    pub transcript: Vec<String>,
}

impl Interactive {
    fn spawn(cmd: &mut Command) -> Interactive {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let lines = line_reader(child.stdout.take().unwrap());
        Interactive {
            pid: child.id(),
            stdin: child.stdin.take(),
            child,
            lines,
            transcript: Vec::new(),
        }
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("write to the program");
        stdin.flush().unwrap();
    }

    /// The next line starting with `prefix` (earlier lines are kept in the transcript).
    fn expect(&mut self, prefix: &str) -> String {
        loop {
            let line = self.lines.recv_timeout(WAIT).unwrap_or_else(|_| {
                panic!(
                    "no line starting with {prefix:?}; got {:?}",
                    self.transcript
                )
            });
            self.transcript.push(line.clone());
            if line.starts_with(prefix) {
                return line;
            }
        }
    }

    /// Closes stdin and waits for a normal exit.
    fn finish(mut self) -> Vec<String> {
        drop(self.stdin.take());
        let status = self.child.wait().expect("wait");
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.transcript.push(line);
        }
        assert!(
            status.success(),
            "exited with {status}; printed {:?}",
            self.transcript
        );
        std::mem::take(&mut self.transcript)
    }
}

impl Drop for Interactive {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `promtool check metrics` accepts the exposition.
fn assert_promtool_accepts(body: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (cargo xtask setup installs prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn root() -> PathBuf {
    workspace_root()
}

fn scratch(name: &str) -> PathBuf {
    let d = root().join("target/gc-tests").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[derive(Clone, Copy, Debug)]
enum Build {
    Plain,
    Stripped,
    Pie,
}

fn go_build(go: &Path, build: Build, out: &Path) {
    let flags: &[&str] = match build {
        Build::Plain => &[],
        Build::Stripped => &["-ldflags=-s -w"],
        Build::Pie => &["-buildmode=pie", "-ldflags=-s -w"],
    };
    common::go_build(go, flags, HOST_GOARCH, out);
}

fn pid_labels(pid: u32, cause: &'static str) -> Vec<(&'static str, String)> {
    vec![("pid", pid.to_string()), ("cause", cause.to_string())]
}

fn pause(m: &Metrics, pid: u32, cause: &'static str, what: &str) -> f64 {
    let l = pid_labels(pid, cause);
    let want: Vec<(&str, &str)> = l.iter().map(|(k, v)| (*k, v.as_str())).collect();
    m.sum(&format!("{PAUSE}_{what}"), &want)
}

fn runtime_processes(agent: &Agent, runtime: &str) -> f64 {
    agent.scrape().sum(PROCESSES, &[("runtime", runtime)])
}

/// Waits until the agent has registered `pid` (its entry shows as a zero series).
fn wait_registered(agent: &Agent, pid: u32) {
    let pid_s = pid.to_string();
    assert!(
        wait_until(WAIT, || agent
            .scrape()
            .has_labels(&format!("{PAUSE}_count"), &[("pid", &pid_s)])),
        "pid {pid} never registered; agent log:\n{}",
        agent.log()
    );
}

/// Pause sum (ns) and count of `pid` over all causes, and the count per cause.
fn pauses(m: &Metrics, pid: u32) -> (f64, f64, [f64; 3]) {
    let by = |c| pause(m, pid, c, "count");
    let sum = ["gc", "other", "unknown"]
        .iter()
        .map(|c| pause(m, pid, c, "sum"))
        .sum::<f64>();
    let counts = [by("gc"), by("other"), by("unknown")];
    (sum * 1e9, counts.iter().sum(), counts)
}

/// Drives one Go build through GCs and ReadMemStats, checking every GC's pauses against the
/// runtime's own PauseNs and the causes against what the version can tell.
fn check_go(agent: &Agent, mut p: Interactive, label: &str, stop_latency: bool, reasons: bool) {
    let tol_ns = 1_000.0;
    let version = p.expect("ready");
    wait_registered(agent, p.pid);
    let mut m = agent.scrape();
    for i in 0..4 {
        p.send("gc");
        let line = p.expect("gc ");
        let f: Vec<&str> = line.split_whitespace().collect();
        let want_ns: f64 = f[2].parse().unwrap();
        let after = agent.scrape();
        let (s0, n0, c0) = pauses(&m, p.pid);
        let (s1, n1, c1) = pauses(&after, p.pid);
        let got_ns = s1 - s0;
        assert_eq!(
            n1 - n0,
            2.0,
            "{label} {version}: GC {i}: a cycle has two stop-the-world pauses"
        );
        // Both stops of a cycle are GC: from the stop reason (≥1.21) or the GC CPU limiter
        // calls inside them (1.19–1.20).
        let want_causes = [2.0, 0.0, 0.0];
        let causes: Vec<f64> = (0..3).map(|k| c1[k] - c0[k]).collect();
        assert_eq!(
            causes, want_causes,
            "{label} {version}: GC {i}: pauses by cause (gc, other, unknown)"
        );
        eprintln!("{label} {version}: GC {i}: agent {got_ns:.0} ns, PauseNs {want_ns} ns");
        assert!(
            (got_ns - want_ns).abs() <= tol_ns,
            "{label} {version}: GC {i}: agent {got_ns:.0} ns vs PauseNs {want_ns} ns (tolerance {tol_ns} ns)"
        );
        m = after;
    }
    let (_, _, c0) = pauses(&m, p.pid);
    for _ in 0..3 {
        p.send("mem");
        p.expect("mem");
    }
    let after = agent.scrape();
    let (_, _, c1) = pauses(&after, p.pid);
    let causes: Vec<f64> = (0..3).map(|k| c1[k] - c0[k]).collect();
    let want = if reasons {
        [0.0, 3.0, 0.0]
    } else {
        [0.0, 0.0, 3.0]
    };
    assert_eq!(
        causes, want,
        "{label} {version}: each ReadMemStats is one non-GC stop"
    );
    if stop_latency {
        let pid = p.pid.to_string();
        let stops = after.sum(&format!("{STOP}_count"), &[("pid", pid.as_str())]);
        assert_eq!(
            stops, 11.0,
            "{label}: Go ≥1.22 reports the stop latency of every pause"
        );
    }
    p.send("exit");
    let bye = p.expect("bye");
    let out = p.finish();
    // Output unchanged: the program's own lines, in order, nothing else.
    let mut want = vec![version.clone()];
    want.extend(
        out.iter()
            .filter(|l| l.starts_with("gc ") || l.starts_with("mem"))
            .cloned(),
    );
    want.push(bye);
    assert_eq!(out, want, "{label}: output changed");
}

/// (toolchain, reports stop latency, gives stop reasons). Every version is measured from the
/// runtime's own timestamps, so the sums must agree to the nanosecond (1 µs allowed): ≥1.22
/// passes them to startTheWorldWithSema, ≤1.21 to the GC CPU limiter inside the stop.
fn go_variants() -> Vec<(&'static str, Build, bool, bool)> {
    let mut v = Vec::new();
    for (toolchain, stop_latency, reasons) in [
        ("1.27.3", true, true),
        ("1.21.13", false, true),
        ("debian", false, false),
    ] {
        for build in [Build::Plain, Build::Stripped, Build::Pie] {
            v.push((toolchain, build, stop_latency, reasons));
        }
    }
    v
}

#[test]
fn go_pauses_match_read_gc_stats_for_every_toolchain_and_build() {
    let Some(_guard) =
        kernel_or_skip("go_pauses_match_read_gc_stats_for_every_toolchain_and_build")
    else {
        return;
    };
    let dir = scratch("go");
    let mut builds = Vec::new();
    for (toolchain, build, stop_latency, reasons) in go_variants() {
        let Some(go) = go_toolchain(toolchain) else {
            return;
        };
        let out = dir.join(format!("gcpause-{toolchain}-{build:?}"));
        go_build(&go, build, &out);
        builds.push((
            out,
            format!("go {toolchain} {build:?}"),
            stop_latency,
            reasons,
        ));
    }
    let debian = Command::new("/usr/bin/go").arg("version").output().unwrap();
    assert!(
        String::from_utf8_lossy(&debian.stdout).contains("go1.19")
            || String::from_utf8_lossy(&debian.stdout).contains("go1.20"),
        "Debian's Go is expected to be ≤1.20 (the no-reason path)"
    );
    // The first build's process starts before the agent (found by the /proc scan), the rest
    // after (found from their exec events).
    let early = Interactive::spawn(&mut Command::new(&builds[0].0));
    let agent = Agent::start(&["--probes", "gc", "--per-pid"]);
    let (path, label, stop_latency, reasons) = &builds[0];
    check_go(
        &agent,
        early,
        &format!("{label} (started before the agent)"),
        *stop_latency,
        *reasons,
    );
    let _ = path;
    for (path, label, stop_latency, reasons) in builds.iter().skip(1) {
        let p = Interactive::spawn(&mut Command::new(path));
        check_go(&agent, p, label, *stop_latency, *reasons);
    }
    let (code, body) = agent.get("/metrics");
    assert_eq!(code, 200);
    assert_promtool_accepts(&body);
    let m = Metrics::parse(&body);
    assert_eq!(
        m.sum(FAILURES, &[]),
        0.0,
        "no failures expected; log:\n{}",
        agent.log()
    );
    assert_eq!(
        m.sum("stallwatch_events_dropped_total", &[("probe", "gc")]),
        0.0,
        "drops"
    );
    // Every binary's probes were detached when its process exited.
    assert!(
        wait_until(WAIT, || runtime_processes(&agent, "go") == 0.0),
        "go processes still registered"
    );
    // (The agent's log reaches us through a pipe: wait for the last lines.)
    // (Other Go programs may come and go meanwhile: promtool is one.)
    let detached = || {
        agent
            .log()
            .lines()
            .filter(|l| l.contains("detaching go probes") && l.contains("gc-tests/go/gcpause-"))
            .count()
    };
    wait_until(WAIT, || detached() >= builds.len());
    let n = detached();
    assert!(
        n == builds.len(),
        "each of the {} binaries detached once, got {n} detaches; log:\n{}",
        builds.len(),
        agent.log()
    );
}

/// One Go program held to the same ground truth on whatever machine runs the test. With
/// STALLWATCH_GO_GCPAUSE it is that prebuilt binary: `cargo xtask test-arm64` builds the fixture
/// for arm64 on the host (the VM has no Go toolchain), and this is where the gc probe's
/// architecture-specific code (Go's register ABI on arm64) meets a real arm64 kernel.
#[test]
fn go_pauses_match_read_gc_stats_on_this_architecture() {
    let Some(_guard) = kernel_or_skip("go_pauses_match_read_gc_stats_on_this_architecture") else {
        return;
    };
    let program = match std::env::var_os("STALLWATCH_GO_GCPAUSE") {
        Some(p) => PathBuf::from(p),
        None => {
            let Some(go) = go_toolchain("1.27.3") else {
                return;
            };
            let out = scratch("go-arch").join("gcpause");
            go_build(&go, Build::Plain, &out);
            out
        }
    };
    let agent = Agent::start(&["--probes", "gc", "--per-pid"]);
    let p = Interactive::spawn(&mut Command::new(&program));
    check_go(
        &agent,
        p,
        &format!("{} on {}", program.display(), std::env::consts::ARCH),
        true,
        true,
    );
    assert_eq!(agent.scrape().sum(FAILURES, &[]), 0.0, "{}", agent.log());
}

fn fixture(name: &str) -> PathBuf {
    root().join("agent/tests/fixtures").join(name)
}

/// Pause count and sum (ns) of `pid` over every cause, and the count per cause.
fn totals(agent: &Agent, pid: u32) -> (f64, f64, [f64; 3]) {
    let (sum, n, by) = pauses(&agent.scrape(), pid);
    (n, sum, by)
}

#[test]
fn jvm_safepoints_match_xlog_safepoint() {
    let Some(_guard) = kernel_or_skip("jvm_safepoints_match_xlog_safepoint") else {
        return;
    };
    let dir = scratch("jvm");
    let log = dir.join("safepoint.log");
    let agent = Agent::start(&["--probes", "gc", "--per-pid"]);
    let mut p = Interactive::spawn(
        Command::new("java")
            .arg(format!("-Xlog:safepoint:file={}", log.display()))
            .arg(fixture("Gc.java")),
    );
    p.expect("ready");
    wait_registered(&agent, p.pid);
    let offset = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0) as usize;
    let (n0, s0, c0) = totals(&agent, p.pid);
    for _ in 0..5 {
        p.send("gc");
        p.expect("done");
    }
    let (n1, s1, c1) = totals(&agent, p.pid);
    // -Xlog writes each safepoint's line as it ends: every one in the window is logged.
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text[offset..]
        .lines()
        .filter(|l| l.contains("Safepoint \""))
        .collect();
    let total_ns: f64 = lines
        .iter()
        .map(|l| {
            l.rsplit("Total: ")
                .next()
                .and_then(|t| t.split_whitespace().next())
                .and_then(|t| t.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("unparsable safepoint line {l}"))
        })
        .sum();
    let collections = lines
        .iter()
        .filter(|l| l.contains("Safepoint \"G1Collect"))
        .count() as f64;
    eprintln!(
        "jvm: {} safepoints, log total {total_ns} ns, agent {} ns",
        lines.len(),
        s1 - s0
    );
    assert_eq!(
        n1 - n0,
        lines.len() as f64,
        "one pause per logged safepoint: {lines:#?}"
    );
    assert!(
        collections >= 5.0,
        "System.gc() x5 logged {collections} collections"
    );
    assert_eq!(
        c1[0] - c0[0],
        collections,
        "safepoints that collected are cause=gc"
    );
    assert_eq!(
        c1[1] - c0[1],
        lines.len() as f64 - collections,
        "the rest are cause=other"
    );
    let tol = 200_000.0 * lines.len() as f64;
    assert!(
        ((s1 - s0) - total_ns).abs() <= tol,
        "agent {} ns vs -Xlog:safepoint total {total_ns} ns (200 µs per pause allowed)",
        s1 - s0
    );
    let pid = p.pid.to_string();
    assert!(
        agent
            .scrape()
            .sum(&format!("{STOP}_count"), &[("pid", pid.as_str())])
            >= n1,
        "time to reach each safepoint is reported"
    );
    p.send("exit");
    p.expect("bye");
    assert_eq!(
        p.finish(),
        ["ready", "done", "done", "done", "done", "done", "bye"]
    );
}

#[test]
fn python_collections_match_gc_callbacks() {
    let Some(_guard) = kernel_or_skip("python_collections_match_gc_callbacks") else {
        return;
    };
    let agent = Agent::start(&["--probes", "gc", "--per-pid"]);
    // Debian's python3.11: built with USDT probes whose semaphores the kernel must raise.
    let mut p = Interactive::spawn(Command::new("/usr/bin/python3.11").arg(fixture("gc.py")));
    p.expect("ready");
    wait_registered(&agent, p.pid);
    let (n0, _, _) = totals(&agent, p.pid);
    p.send("count");
    let seen0: f64 = p
        .expect("count")
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let mut last = String::new();
    for _ in 0..6 {
        p.send("gc");
        last = p.expect("done");
    }
    let seen1: f64 = last.split_whitespace().nth(1).unwrap().parse().unwrap();
    let (n1, s1, c1) = totals(&agent, p.pid);
    assert!(seen1 - seen0 >= 6.0);
    assert_eq!(n1 - n0, seen1 - seen0, "collections: agent vs gc.callbacks");
    assert_eq!(c1[1] + c1[2], 0.0, "CPython collections are cause=gc");
    assert!(s1 > 0.0);
    p.send("exit");
    p.expect("bye");
    let out = p.finish();
    assert_eq!(out.len(), 9, "output: {out:?}");
}

#[test]
fn a_child_forked_without_exec_is_found_by_the_rescan() {
    let Some(_guard) = kernel_or_skip("a_child_forked_without_exec_is_found_by_the_rescan") else {
        return;
    };
    let agent = Agent::start(&["--probes", "gc", "--per-pid"]);
    let mut p = Interactive::spawn(Command::new("/usr/bin/python3.11").arg(fixture("gc.py")));
    p.expect("ready");
    wait_registered(&agent, p.pid);
    p.send("fork");
    let child: u32 = p
        .expect("child")
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    // No exec event announces it: the periodic /proc rescan (10 s) does.
    assert!(
        wait_until(WAIT, || totals(&agent, child).0 > 0.0),
        "the forked child's collections were never measured; log:\n{}",
        agent.log()
    );
    unsafe { libc::kill(child as i32, libc::SIGKILL) };
    p.send("exit");
    p.expect("bye");
    p.finish();
}

/// A JDK whose libjvm.so has no symbol table: a tree of symlinks to the system JDK, with
/// its own launcher (so the JDK home is this tree) and a stripped copy of libjvm.so.
fn jdk_without_symbols(dir: &Path) -> Option<PathBuf> {
    let system = std::fs::canonicalize("/usr/lib/jvm/java-17-openjdk-amd64").ok()?;
    let jdk = dir.join("jdk");
    let ok = Command::new("cp")
        .arg("-rs")
        .arg(&system)
        .arg(&jdk)
        .status()
        .ok()?
        .success();
    assert!(ok, "cp -rs {}", system.display());
    for rel in ["bin/java", "lib/server/libjvm.so"] {
        let real = std::fs::canonicalize(system.join(rel)).unwrap();
        std::fs::remove_file(jdk.join(rel)).unwrap();
        if rel.ends_with(".so") {
            let status = Command::new("objcopy")
                .arg("--strip-all")
                .arg(&real)
                .arg(jdk.join(rel))
                .status()
                .unwrap();
            assert!(status.success());
        } else {
            std::fs::copy(&real, jdk.join(rel)).unwrap();
        }
    }
    Some(jdk.join("bin/java"))
}

#[test]
fn jvm_without_symbols_measures_collections_from_usdt() {
    let Some(_guard) = kernel_or_skip("jvm_without_symbols_measures_collections_from_usdt") else {
        return;
    };
    let dir = scratch("jvm-stripped");
    let java = jdk_without_symbols(&dir).expect("OpenJDK 17 (cargo xtask setup installs it)");
    let log = dir.join("safepoint.log");
    let agent = Agent::start(&["--probes", "gc", "--per-pid"]);
    let mut p = Interactive::spawn(
        Command::new(&java)
            .arg(format!("-Xlog:safepoint:file={}", log.display()))
            .arg(fixture("Gc.java")),
    );
    p.expect("ready");
    wait_registered(&agent, p.pid);
    assert!(
        agent.log().contains("USDT gc__begin/gc__end only"),
        "{}",
        agent.log()
    );
    let offset = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0) as usize;
    let (n0, s0, _) = totals(&agent, p.pid);
    for _ in 0..4 {
        p.send("gc");
        p.expect("done");
    }
    let (n1, s1, c1) = totals(&agent, p.pid);
    let text = std::fs::read_to_string(&log).unwrap();
    let collections: Vec<f64> = text[offset..]
        .lines()
        .filter(|l| l.contains("Safepoint \"G1Collect"))
        .map(|l| {
            l.rsplit("Total: ")
                .next()
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(
        n1 - n0,
        collections.len() as f64,
        "one pause per collection"
    );
    assert_eq!(c1[1] + c1[2], 0.0, "all cause=gc");
    // A collection runs inside its safepoint: shorter than the safepoint, not by much.
    let safepoints: f64 = collections.iter().sum();
    assert!(
        s1 - s0 <= safepoints && s1 - s0 >= 0.5 * safepoints,
        "collections {} ns vs their safepoints {safepoints} ns",
        s1 - s0
    );
    p.send("exit");
    p.expect("bye");
    p.finish();
}

#[test]
fn node_collections_match_trace_gc() {
    let Some(_guard) = kernel_or_skip("node_collections_match_trace_gc") else {
        return;
    };
    let agent = Agent::start(&["--probes", "gc", "--per-pid"]);
    let mut p = Interactive::spawn(
        Command::new("node")
            .args(["--expose-gc", "--trace-gc"])
            .arg(fixture("gc.js")),
    );
    p.expect("ready");
    wait_registered(&agent, p.pid);
    let (n0, _, _) = totals(&agent, p.pid);
    p.send("mark");
    p.expect("mark");
    let from = p.transcript.len();
    for _ in 0..5 {
        p.send("gc");
        p.expect("done");
    }
    let (n1, _, c1) = totals(&agent, p.pid);
    let traced = p.transcript[from..]
        .iter()
        .filter(|l| l.contains(" ms: "))
        .count() as f64;
    assert!(
        traced >= 5.0,
        "--trace-gc printed {traced} lines: {:?}",
        p.transcript
    );
    assert_eq!(
        n1 - n0,
        traced,
        "collections: agent vs --trace-gc; {:?}",
        &p.transcript[from..]
    );
    assert_eq!(c1[1] + c1[2], 0.0, "V8 collections are cause=gc");
    p.send("exit");
    p.expect("bye");
    p.finish();
}

/// Copies `src` to `dst` as an executable.
fn copy_exe(src: &Path, dst: &Path) {
    std::fs::copy(src, dst).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The end of the last PT_LOAD's file contents: cutting there keeps the program runnable
/// and loses the section headers (and .symtab) at the end of the file.
fn loaded_end(path: &Path) -> u64 {
    use object::read::elf::{ElfFile64, ProgramHeader};
    let data = std::fs::read(path).unwrap();
    let elf = ElfFile64::<object::Endianness>::parse(&*data).unwrap();
    let e = object::Endianness::Little;
    elf.elf_program_headers()
        .iter()
        .filter(|ph| ph.p_type(e) == object::elf::PT_LOAD)
        .map(|ph| ph.p_offset(e) + ph.p_filesz(e))
        .max()
        .unwrap()
}

#[test]
fn damaged_foreign_and_deleted_binaries_are_reported_not_fatal() {
    let Some(_guard) =
        kernel_or_skip("damaged_foreign_and_deleted_binaries_are_reported_not_fatal")
    else {
        return;
    };
    let Some(go) = go_toolchain("1.27.3") else {
        return;
    };
    let dir = scratch("bad");
    let good = dir.join("gcpause");
    go_build(&go, Build::Plain, &good);

    // A Go program whose binary is deleted while it runs (before the agent starts).
    let deleted = dir.join("deleted-gcpause");
    copy_exe(&good, &deleted);
    let mut gone = Interactive::spawn(&mut Command::new(&deleted));
    gone.expect("ready");
    std::fs::remove_file(&deleted).unwrap();

    let agent = Agent::start(&["--probes", "gc", "--per-pid"]);

    // A C program that claims to be Go: an empty .go.buildinfo section.
    let fake = dir.join("fake-go");
    let empty = dir.join("empty");
    std::fs::write(&empty, b"").unwrap();
    let status = Command::new("objcopy")
        .arg(format!("--add-section=.go.buildinfo={}", empty.display()))
        .args(["/bin/sleep".as_ref(), fake.as_os_str()])
        .status()
        .expect("objcopy (binutils)");
    assert!(status.success());
    let fake_run = Command::new(&fake).arg("2").status().unwrap();
    assert!(fake_run.success(), "the fake Go binary still runs");

    // A Go program cut after its loaded segments: it runs, its section headers are gone.
    let truncated = dir.join("truncated-gcpause");
    copy_exe(&good, &truncated);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&truncated)
        .unwrap();
    f.set_len(loaded_end(&good)).unwrap();
    drop(f);
    let mut cut = Interactive::spawn(&mut Command::new(&truncated));
    cut.expect("ready");

    // An ordinary binary: not a runtime, not a failure.
    assert!(Command::new("/bin/true").status().unwrap().success());

    let failures = |runtime: &str, reason: &str| {
        agent
            .scrape()
            .sum(FAILURES, &[("runtime", runtime), ("reason", reason)])
    };
    assert!(
        wait_until(WAIT, || failures("go", "unsupported_version") >= 1.0
            && failures("unknown", "truncated") >= 1.0),
        "failures not counted; agent log:\n{}",
        agent.log()
    );
    let log = agent.log();
    assert!(
        log.contains("cannot probe go in pid") && log.contains("no .go.buildinfo section"),
        "a clear log line for the fake Go binary:\n{log}"
    );
    assert!(
        log.contains(&format!("pid {}", cut.pid)) && log.contains("truncated"),
        "a clear log line for the truncated binary:\n{log}"
    );
    let (_, body) = agent.get("/metrics");
    assert_promtool_accepts(&body);
    let m = Metrics::parse(&body);
    assert_eq!(
        m.sum(FAILURES, &[]),
        2.0,
        "only those two: {:?}",
        agent.log()
    );

    // The deleted binary is still measured, through /proc/<pid>/exe.
    wait_registered(&agent, gone.pid);
    assert!(
        log.contains("(deleted)"),
        "the log names the deleted binary:\n{log}"
    );
    let (n0, _, _) = totals(&agent, gone.pid);
    gone.send("gc");
    gone.expect("gc ");
    let (n1, _, _) = totals(&agent, gone.pid);
    assert_eq!(n1 - n0, 2.0, "a deleted binary's pauses are measured");

    // The truncated program is untouched by the failure.
    cut.send("gc");
    cut.expect("gc ");
    for p in [gone, cut] {
        let mut p = p;
        p.send("exit");
        p.expect("bye");
        p.finish();
    }
    assert_eq!(agent.get("/metrics").0, 200, "the agent is still serving");
}

/// An overlayfs mount of `lower` (with its own upper and work dirs under `dir/name`),
/// unmounted on drop.
struct Overlay(PathBuf);

impl Overlay {
    fn mount(dir: &Path, lower: &Path, name: &str) -> Overlay {
        let base = dir.join(name);
        for d in ["upper", "work", "merged"] {
            std::fs::create_dir_all(base.join(d)).unwrap();
        }
        let merged = base.join("merged");
        let status = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!(
                "lowerdir={},upperdir={},workdir={}",
                lower.display(),
                base.join("upper").display(),
                base.join("work").display()
            ))
            .arg(&merged)
            .status()
            .unwrap();
        assert!(status.success(), "mount overlay");
        Overlay(merged)
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn replicas_of_one_image_on_overlayfs_share_one_attachment() {
    let Some(_guard) = kernel_or_skip("replicas_of_one_image_on_overlayfs_share_one_attachment")
    else {
        return;
    };
    let Some(go) = go_toolchain("1.27.3") else {
        return;
    };
    let dir = scratch("overlay");
    let lower = dir.join("lower");
    std::fs::create_dir_all(&lower).unwrap();
    go_build(&go, Build::Plain, &lower.join("gcpause"));
    // Two "containers" of one image: two overlay mounts over the same lower layer. Their
    // files have different (dev, inode) through the mounts, but one real file underneath,
    // which is what the kernel attaches uprobes to.
    let a = Overlay::mount(&dir, &lower, "a");
    let b = Overlay::mount(&dir, &lower, "b");
    let agent = Agent::start(&["--probes", "gc", "--per-pid"]);
    let mut procs = Vec::new();
    for m in [&a, &b] {
        let mut p = Interactive::spawn(&mut Command::new(m.0.join("gcpause")));
        p.expect("ready");
        wait_registered(&agent, p.pid);
        procs.push(p);
    }
    for p in &mut procs {
        let (n0, _, _) = totals(&agent, p.pid);
        p.send("gc");
        p.expect("gc ");
        let (n1, _, _) = totals(&agent, p.pid);
        assert_eq!(n1 - n0, 2.0, "each pause counted once");
    }
    let log = agent.log();
    let attaches = log
        .lines()
        .filter(|l| l.contains("go runtime in") && l.contains("/overlay/"))
        .count();
    assert_eq!(
        attaches, 1,
        "one analysis and attachment for both replicas:\n{log}"
    );
    let m = agent.scrape();
    assert_eq!(
        m.sum(
            "stallwatch_events_dropped_total",
            &[("probe", "gc"), ("reason", "unmatched_pause_end")]
        ),
        0.0,
        "no duplicate consumers firing twice per pause"
    );
    for mut p in procs {
        p.send("exit");
        p.expect("bye");
        p.finish();
    }
}
