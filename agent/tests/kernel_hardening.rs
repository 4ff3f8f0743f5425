//! Kernel tests of the agent's life cycle under abuse: signals leave no program behind, a
//! killed agent restarts cleanly, many concurrent scrapes are served, and a probed binary can
//! be replaced, then deleted, while its processes run.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// Names of the loaded BPF programs on the host (bpftool).
fn loaded_programs() -> Vec<String> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .expect("bpftool (cargo xtask setup installs it)");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str().map(String::from))
        .collect()
}

fn ours(names: &[String]) -> Vec<String> {
    names
        .iter()
        .filter(|n| n.starts_with("sw_"))
        .cloned()
        .collect()
}

#[test]
fn sigterm_and_sigint_detach_every_program_and_kill_9_leaves_a_clean_restart() {
    let Some(_g) =
        kernel_or_skip("sigterm_and_sigint_detach_every_program_and_kill_9_leaves_a_clean_restart")
    else {
        return;
    };
    // Other test binaries may be running agents; wait for a quiet host.
    assert!(
        wait_until(Duration::from_secs(30), || ours(&loaded_programs())
            .is_empty()),
        "programs of an earlier agent still loaded: {:?}",
        ours(&loaded_programs())
    );
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let agent = Agent::start(&["--probes", "sched,syscalls,tcp,gc"]);
        assert!(
            !ours(&loaded_programs()).is_empty(),
            "the agent's programs are loaded"
        );
        // The kernel frees unpinned programs on any exit, a crash included: the agent must
        // also have shut down cleanly (status 0, its own detach logged).
        let (status, log) = agent.signal_with_log(signal);
        assert!(
            status.success(),
            "clean exit on signal {signal}, got {status}; log:\n{log}"
        );
        assert!(
            log.contains("detaching probes"),
            "the agent detached its probes on signal {signal}; log:\n{log}"
        );
        assert!(
            wait_until(Duration::from_secs(10), || ours(&loaded_programs())
                .is_empty()),
            "left behind after signal {signal}: {:?}",
            ours(&loaded_programs())
        );
    }
    // kill -9: the kernel frees everything with the last fd; the next start works.
    let agent = Agent::start(&["--probes", "sched,tcp,gc"]);
    unsafe { libc::kill(agent.pid() as i32, libc::SIGKILL) };
    drop(agent);
    assert!(
        wait_until(Duration::from_secs(10), || ours(&loaded_programs())
            .is_empty()),
        "left behind after SIGKILL: {:?}",
        ours(&loaded_programs())
    );
    let again = Agent::start(&["--probes", "sched,tcp,gc"]);
    assert_eq!(again.get("/readyz").0, 200);
    let (status, log) = again.stop_with_log();
    assert!(status.success(), "clean exit, got {status}; log:\n{log}");
}

#[test]
fn a_hundred_concurrent_scrapes_are_all_served() {
    let Some(_g) = kernel_or_skip("a_hundred_concurrent_scrapes_are_all_served") else {
        return;
    };
    let agent = Agent::start(&["--probes", "sched,tcp,gc", "--per-pid"]);
    let addr = agent.addr;
    let handles: Vec<_> = (0..100)
        .map(|_| std::thread::spawn(move || http_get(addr, "/metrics")))
        .collect();
    for h in handles {
        let (code, body) = h.join().expect("scrape thread");
        assert_eq!(code, 200);
        assert!(body.contains("stallwatch_build_info"), "a whole exposition");
    }
    assert_eq!(agent.get("/healthz").0, 200);
    // The runs the kernel skipped are read from every program's info at each scrape: a
    // probe has the series only if all its programs' info was read.
    let m = agent.scrape();
    for probe in ["sched", "tcp", "gc", "lifecycle"] {
        assert!(
            m.has_labels(
                "stallwatch_events_dropped_total",
                &[("probe", probe), ("reason", "recursion_miss")]
            ),
            "{probe}: no recursion_miss series; log:\n{}",
            agent.log()
        );
    }
}

#[test]
fn a_probed_go_binary_replaced_then_deleted_while_its_processes_run() {
    let Some(_g) =
        kernel_or_skip("a_probed_go_binary_replaced_then_deleted_while_its_processes_run")
    else {
        return;
    };
    let Some(go) = go_toolchain("1.27.3") else {
        return;
    };
    let dir = workspace_root().join("target/gc-tests/replace");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("app");
    go_build(&go, &[], HOST_GOARCH, &path);
    // The replacement is built now: the Go toolchain is Go too, and would be measured.
    let tmp = dir.join("app.new");
    go_build(&go, &["-ldflags=-s -w"], HOST_GOARCH, &tmp);
    let agent = Agent::start(&["--probes", "gc", "--per-pid"]);
    let mut old = std::process::Command::new(&path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let old_pid = old.id();
    let registered = |pid: u32| {
        agent.scrape().has_labels(
            "stallwatch_runtime_pause_seconds_count",
            &[("pid", pid.to_string().as_str())],
        )
    };
    assert!(wait_until(Duration::from_secs(30), || registered(old_pid)));
    // Replace the file the way deployments do: a new file renamed over the old path (the
    // running process keeps the old inode, whose uprobes stay).
    std::fs::rename(&tmp, &path).unwrap();
    let mut new = std::process::Command::new(&path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let new_pid = new.id();
    assert!(
        wait_until(Duration::from_secs(30), || registered(new_pid)),
        "{}",
        agent.log()
    );
    // Both still measured: one GC each. Then the file is deleted outright (the new process
    // keeps the unlinked inode, and its uprobes stay): its next GC is measured too.
    use std::io::{BufRead, BufReader, Write};
    let gc_measured = |child: &mut std::process::Child, pid: u32| {
        let before = agent.scrape().sum(
            "stallwatch_runtime_pause_seconds_count",
            &[("pid", pid.to_string().as_str()), ("cause", "gc")],
        );
        let stdin = child.stdin.as_mut().unwrap();
        writeln!(stdin, "gc").unwrap();
        let mut out = BufReader::new(child.stdout.as_mut().unwrap());
        let mut line = String::new();
        while !line.starts_with("gc ") {
            line.clear();
            assert!(
                out.read_line(&mut line).unwrap() > 0,
                "pid {pid} closed its stdout before answering"
            );
        }
        let after = agent.scrape().sum(
            "stallwatch_runtime_pause_seconds_count",
            &[("pid", pid.to_string().as_str()), ("cause", "gc")],
        );
        assert_eq!(
            after - before,
            2.0,
            "pid {pid}: both stops of its GC measured"
        );
    };
    gc_measured(&mut old, old_pid);
    gc_measured(&mut new, new_pid);
    std::fs::remove_file(&path).unwrap();
    gc_measured(&mut new, new_pid);
    for mut child in [old, new] {
        drop(child.stdin.take());
        assert!(child.wait().unwrap().success());
    }
    assert_eq!(agent.get("/healthz").0, 200);
    let log = agent.log();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("go runtime in") && l.contains("/replace/app"))
            .count(),
        2,
        "the old and the new file are two binaries:\n{log}"
    );
    assert_eq!(
        agent.scrape().sum(
            "stallwatch_events_dropped_total",
            &[("probe", "gc"), ("reason", "unmatched_pause_end")]
        ),
        0.0
    );
}

fn dropped(m: &Metrics, probe: &str, reason: &str) -> f64 {
    m.sum(
        "stallwatch_events_dropped_total",
        &[("probe", probe), ("reason", reason)],
    )
}

#[test]
fn tiny_maps_and_a_tiny_ring_count_their_drops_and_the_agent_stays_healthy() {
    let Some(_g) =
        kernel_or_skip("tiny_maps_and_a_tiny_ring_count_their_drops_and_the_agent_stays_healthy")
    else {
        return;
    };
    // Four thread entries and four process entries for a whole host, and one page for each
    // ring: exit/exec events, and slow-syscall events, with every syscall of 1 µs or more
    // made one.
    let agent = Agent::start(&[
        "--probes",
        "sched,tcp,syscalls",
        "--max-threads",
        "4",
        "--max-processes",
        "4",
        "--event-buffer",
        "4096",
        "--slow-syscall",
        "1us",
    ]);
    // A burst of short-lived processes: more processes than entries, and — with the agent
    // stopped (SIGSTOP), so its reader cannot drain the ring while the kernel programs keep
    // running — more exit/exec events than the ring holds.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGSTOP) };
    let burst: Vec<_> = (0..400)
        .map(|_| Command::new("/bin/true").spawn().expect("spawn /bin/true"))
        .collect();
    for mut c in burst {
        let _ = c.wait();
    }
    unsafe { libc::kill(agent.pid() as i32, libc::SIGCONT) };
    assert!(
        wait_until(Duration::from_secs(15), || {
            let m = agent.scrape();
            dropped(&m, "sched", "thread_map_full") > 0.0
        }),
        "a full thread map is counted"
    );
    let m = agent.scrape();
    for map in ["SW_THREADS", "SW_DEAD_THREADS"] {
        assert!(
            m.has_labels("stallwatch_bpf_map_entries", &[("map", map)]),
            "{map}'s fill is exported"
        );
        let n = m.sum("stallwatch_bpf_map_entries", &[("map", map)]);
        assert!(n <= 4.0, "{map} stays within its bound: {n}");
        assert_eq!(
            m.sum("stallwatch_bpf_map_capacity", &[("map", map)]),
            4.0,
            "{map}'s capacity is the flag's"
        );
    }
    // The ring holds 4096 bytes (~85 events of 48): of the 800 events, most were dropped,
    // and every drop is counted.
    let ring = dropped(&m, "lifecycle", "event_ring_full");
    assert!(ring >= 400.0, "event_ring_full = {ring}");
    // The slow-call ring (~73 events of 56) against thousands of syscalls of the burst (a
    // /bin/true makes dozens, most over 1 µs here: exec, mmap, page faults).
    let slow = dropped(&m, "syscalls", "slow_ring_full");
    assert!(slow >= 1000.0, "slow_ring_full = {slow}");
    // With exit events lost, the sweep retires those processes (exit_missed) in time.
    assert_eq!(agent.get("/healthz").0, 200);
    assert_eq!(agent.get("/readyz").0, 200);
    assert!(agent.stop(), "clean exit after the flood");
}

#[test]
fn malformed_flags_and_config_are_clear_errors() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_stallwatch"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = run(&["run", "--probes", "sched,bogus"]);
    assert!(!ok && err.contains("unknown probe \"bogus\""), "{err}");
    let (ok, err) = run(&["run", "--event-buffer", "1000"]);
    assert!(!ok && err.contains("event-buffer"), "{err}");
    let (ok, err) = run(&["run", "--max-processes", "lots"]);
    assert!(!ok && err.contains("invalid value"), "{err}");
    let (ok, err) = run(&["run", "--max-threads", "0"]);
    assert!(
        !ok && err.contains("--max-threads must be at least 1"),
        "{err}"
    );
    let dir = std::env::temp_dir().join(format!("sw-badconf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "probes = sched\n").unwrap();
    let (ok, err) = run(&["run", "--config", bad.to_str().unwrap()]);
    assert!(!ok && err.contains("bad.toml"), "names the file: {err}");
    let unknown = dir.join("unknown.toml");
    std::fs::write(&unknown, "probez = [\"sched\"]\n").unwrap();
    let (ok, err) = run(&["run", "--config", unknown.to_str().unwrap()]);
    assert!(
        !ok && err.contains("probez"),
        "names the unknown key: {err}"
    );
    let (ok, err) = run(&["run", "--config", "/nonexistent/stallwatch.toml"]);
    assert!(!ok && err.contains("/nonexistent/stallwatch.toml"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_signal_right_after_start_still_exits_cleanly() {
    let Some(_g) = kernel_or_skip("a_signal_right_after_start_still_exits_cleanly") else {
        return;
    };
    use std::io::BufRead;
    // The signal handlers must exist by the time the agent says it listens: a SIGTERM sent
    // at that moment once met the default action (exit by signal, probes torn down by the
    // kernel instead of by the agent).
    for i in 0..10 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_stallwatch"))
            .args(["run", "--listen", "127.0.0.1:0", "--probes", "sched"])
            .env("RUST_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        for line in lines.by_ref() {
            if line.unwrap().contains("listening on") {
                break;
            }
        }
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        let status = child.wait().unwrap();
        assert!(
            status.success(),
            "run {i}: {status}; log after listening: {rest:?}"
        );
    }
}

/// Voluntary switches of `comm`'s series with `pid` (`--per-pid`).
fn voluntary(m: &Metrics, comm: &str, pid: u32) -> f64 {
    let pid = pid.to_string();
    m.sum(
        "stallwatch_context_switches_total",
        &[("comm", comm), ("pid", &pid), ("kind", "voluntary")],
    )
}

/// Spawns `exe args` as the next process with pid `want` (via ns_last_pid, as CRIU does);
/// `None` if another process took that pid first.
fn spawn_with_pid(want: u32, exe: &std::path::Path, args: &[&str]) -> Option<std::process::Child> {
    std::fs::write("/proc/sys/kernel/ns_last_pid", (want - 1).to_string())
        .expect("writing /proc/sys/kernel/ns_last_pid");
    let mut c = Command::new(exe)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    if c.id() == want {
        return Some(c);
    }
    let _ = c.kill();
    let _ = c.wait();
    None
}

#[test]
fn ten_thousand_short_lived_processes_and_a_reused_pid_leave_no_stale_state() {
    let Some(_g) =
        kernel_or_skip("ten_thousand_short_lived_processes_and_a_reused_pid_leave_no_stale_state")
    else {
        return;
    };
    let agent = Agent::start(&[
        "--probes",
        "sched,tcp,gc",
        "--per-pid",
        "--exit-grace",
        "5s",
    ]);
    // Give the start-up scan and the first sweep time to settle.
    std::thread::sleep(Duration::from_secs(2));
    let series = |m: &Metrics| {
        m.0.keys()
            .filter(|(n, _)| n == "stallwatch_runqueue_latency_seconds_count")
            .count()
    };
    let rss = || -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", agent.pid()))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    };
    let m0 = agent.scrape();
    let (tracked0, series0, entries0, rss0) = (
        m0.sum("stallwatch_tracked_processes", &[]),
        series(&m0),
        m0.sum("stallwatch_bpf_map_entries", &[("map", "SW_THREADS")]),
        rss(),
    );

    // 10,000 processes that each fork, exec and exit.
    let t0 = std::time::Instant::now();
    let status = Command::new("sh")
        .args([
            "-c",
            "i=0; while [ $i -lt 10000 ]; do /bin/true; i=$((i+1)); done",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    eprintln!("10,000 processes in {:?}", t0.elapsed());
    let m = agent.scrape();
    assert!(
        entries0 > 0.0,
        "SW_THREADS's fill is exported (and holds the host's threads)"
    );
    assert!(
        series(&m) > series0 + 1000,
        "per-pid series of the short-lived processes are exported for --exit-grace"
    );
    // Everything they left is retired: exit events (or the sweep) and the 5 s grace.
    let settled = wait_until(Duration::from_secs(40), || {
        let m = agent.scrape();
        m.sum("stallwatch_tracked_processes", &[]) <= tracked0 + 20.0
            && series(&m) <= series0 + 20
            && m.sum("stallwatch_bpf_map_entries", &[("map", "SW_THREADS")]) <= entries0 + 20.0
    });
    let m = agent.scrape();
    assert!(
        settled,
        "state not back to its start: tracked {} (was {tracked0}), series {} (was {series0}), \
         SW_THREADS {} (was {entries0})",
        m.sum("stallwatch_tracked_processes", &[]),
        series(&m),
        m.sum("stallwatch_bpf_map_entries", &[("map", "SW_THREADS")]),
    );
    assert_eq!(
        m.sum(
            "stallwatch_events_dropped_total",
            &[("reason", "event_ring_full")]
        ),
        0.0,
        "the default ring kept up with 10,000 exec/exit pairs"
    );
    // What the churn and the large scrapes freed goes back to the kernel (trimmed every 10 s).
    let back = wait_until(Duration::from_secs(25), || {
        rss().saturating_sub(rss0) < 16 * 1024
    });
    let grown_kib = rss().saturating_sub(rss0);
    eprintln!("agent RSS {rss0} KiB before, +{grown_kib} KiB after the churn");
    assert!(back, "RSS grew {grown_kib} KiB and stayed");

    // PID reuse: "alpha" exits, "beta" gets its pid at once. Neither series may carry the
    // other's switches.
    let dir = std::env::temp_dir().join(format!("sw-reuse-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let swload = std::path::Path::new(env!("CARGO_BIN_EXE_swload"));
    let (alpha, beta) = (dir.join("alpha"), dir.join("beta"));
    std::os::unix::fs::symlink(swload, &alpha).unwrap();
    std::os::unix::fs::symlink(swload, &beta).unwrap();
    let mut reused = None;
    for _ in 0..20 {
        let mut a = Command::new(&alpha)
            .args(["sleep", "5", "10"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = a.id();
        let lines = line_reader(a.stdout.take().unwrap());
        assert!(lines
            .recv_timeout(Duration::from_secs(10))
            .unwrap()
            .starts_with("done"));
        // Read once it blocks reading stdin: the switch into that read may come after
        // `done` reaches us.
        quiesce(pid);
        let alpha_switches = ctxt_switches(pid).0;
        drop(a.stdin.take()); // ends it
        let _ = a.wait();
        if let Some(mut b) = spawn_with_pid(pid, &beta, &["sleep", "20", "10"]) {
            let lines = line_reader(b.stdout.take().unwrap());
            assert!(lines
                .recv_timeout(Duration::from_secs(10))
                .unwrap()
                .starts_with("done"));
            reused = Some((pid, alpha_switches, b));
            break;
        }
    }
    let (pid, alpha_switches, mut b) = reused.expect("could not get a pid reused in 20 tries");
    quiesce(pid);
    let beta_switches = ctxt_switches(pid).0;
    let ok = wait_until(Duration::from_secs(15), || {
        let m = agent.scrape();
        voluntary(&m, "beta", pid) == beta_switches as f64
            && voluntary(&m, "alpha", pid) == alpha_switches as f64
    });
    let m = agent.scrape();
    assert!(
        ok,
        "pid {pid}: alpha {} (kernel {alpha_switches}), beta {} (kernel {beta_switches})",
        voluntary(&m, "alpha", pid),
        voluntary(&m, "beta", pid)
    );
    drop(b.stdin.take());
    let _ = b.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(agent.stop());
}
