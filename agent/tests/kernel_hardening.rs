//! Kernel tests of the agent's life cycle under abuse: signals leave no program behind, a
//! killed agent restarts cleanly, many concurrent scrapes are served, and a probed binary can
//! be replaced while its processes run.

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
        let pid = agent.pid();
        unsafe { libc::kill(pid as i32, signal) };
        assert!(
            wait_until(Duration::from_secs(20), || !std::path::Path::new(&format!(
                "/proc/{pid}"
            ))
            .exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z"))),
            "agent did not exit on signal {signal}"
        );
        drop(agent);
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
}

#[test]
fn a_probed_go_binary_replaced_while_its_process_runs() {
    let Some(_g) = kernel_or_skip("a_probed_go_binary_replaced_while_its_process_runs") else {
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
    // Both still measured: one GC each.
    use std::io::{BufRead, BufReader, Write};
    for (child, pid) in [(&mut old, old_pid), (&mut new, new_pid)] {
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
            out.read_line(&mut line).unwrap();
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
    }
    for mut child in [old, new] {
        drop(child.stdin.take());
        assert!(child.wait().unwrap().success());
    }
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
    // Four process entries for a whole host, and one page of exit/exec events.
    let agent = Agent::start(&[
        "--probes",
        "sched,tcp",
        "--max-processes",
        "4",
        "--event-buffer",
        "4096",
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
            dropped(&m, "sched", "process_map_full") > 0.0
        }),
        "a full process map is counted"
    );
    let m = agent.scrape();
    assert!(
        m.sum("stallwatch_bpf_map_entries", &[("map", "SW_PROC_SCHED")]) <= 4.0,
        "the map stays within its bound"
    );
    // The ring holds 4096 bytes (~85 events of 48): of the 800 events, most were dropped,
    // and every drop is counted.
    let ring = dropped(&m, "lifecycle", "event_ring_full");
    assert!(ring >= 400.0, "event_ring_full = {ring}");
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
