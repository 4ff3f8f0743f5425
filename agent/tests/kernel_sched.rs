//! Kernel tests of the sched probe: the real programs on the running kernel, real workloads,
//! and the kernel's own accounting (/proc schedstat and status) as ground truth. Every
//! assertion is scoped to the workload's pid.

mod common;

use std::time::Duration;

use common::*;

const RUNQ: &str = "stallwatch_runqueue_latency_seconds";
const OFFCPU_TOTAL: &str = "stallwatch_offcpu_seconds_total";
const OFFCPU_HIST: &str = "stallwatch_offcpu_duration_seconds";
const CSWCH: &str = "stallwatch_context_switches_total";

/// Off-CPU intervals of `pid` with `reason` in the log2 bucket (2^(shift-1), 2^shift] ns.
fn offcpu_in_bucket(m: &Metrics, pid: &str, reason: &str, shift: u32) -> f64 {
    // Prometheus `le` label of the bucket whose upper bound is 2^shift ns.
    let le = |shift: u32| format!("{}", (1u64 << shift) as f64 / 1e9);
    let cumulative = |shift| {
        m.sum(
            &format!("{OFFCPU_HIST}_bucket"),
            &[("pid", pid), ("reason", reason), ("le", &le(shift))],
        )
    };
    cumulative(shift) - cumulative(shift - 1)
}

#[test]
fn runqueue_latency_matches_schedstat_run_delay() {
    let Some(_g) = kernel_or_skip("runqueue_latency_matches_schedstat_run_delay") else {
        return;
    };
    let agent = Agent::start(&["--per-pid"]);
    // Three busy threads sharing one CPU for 2 s: each waits about 2/3 of the time.
    let w = Workload::run(&["spin", "3", "2000", "0"], Duration::from_secs(30));
    quiesce(w.pid);
    let truth_ns = run_delay_ns(w.pid, &all_tids(w.pid)) as f64;
    let m = agent.scrape();
    let pid = w.pid_label();
    let got = m.sum(&format!("{RUNQ}_sum"), &[("pid", &pid)]);
    assert!(
        truth_ns > 1e9,
        "workload did not contend: run_delay {truth_ns} ns"
    );
    assert_within("run-queue latency sum (s)", got, truth_ns / 1e9, 0.05);
    // Involuntary off-CPU time of preempted threads is the same wait seen from the other side.
    let invol = m.sum(OFFCPU_TOTAL, &[("pid", &pid), ("reason", "involuntary")]);
    assert!(
        invol > 0.9 * got && invol <= got * 1.01,
        "involuntary {invol} vs runq {got}"
    );
    w.finish();
}

#[test]
fn voluntary_sleeps_are_counted_in_the_50ms_bucket() {
    let Some(_g) = kernel_or_skip("voluntary_sleeps_are_counted_in_the_50ms_bucket") else {
        return;
    };
    let agent = Agent::start(&["--per-pid"]);
    let w = Workload::run(&["sleep", "20", "50"], Duration::from_secs(30));
    quiesce(w.pid);
    let m = agent.scrape();
    let pid = w.pid_label();
    let total = m.sum(OFFCPU_TOTAL, &[("pid", &pid), ("reason", "voluntary")]);
    assert_within("voluntary off-CPU seconds for 20 x 50 ms", total, 1.0, 0.05);
    // 50 ms lies in (2^25, 2^26] ns.
    assert_eq!(
        offcpu_in_bucket(&m, &pid, "voluntary", 26),
        20.0,
        "sleeps in the bucket holding 50 ms"
    );
    w.finish();
}

#[test]
fn vfork_parent_waits_uninterruptible() {
    let Some(_g) = kernel_or_skip("vfork_parent_waits_uninterruptible") else {
        return;
    };
    vfork_d_state(&Agent::start(&["--per-pid"]));
}

fn vfork_d_state(agent: &Agent) {
    let w = Workload::run(&["vfork", "100"], Duration::from_secs(30));
    quiesce(w.pid);
    let m = agent.scrape();
    let pid = w.pid_label();
    let d = m.sum(
        OFFCPU_TOTAL,
        &[("pid", &pid), ("reason", "uninterruptible")],
    );
    // The child sleeps 100 ms before it exits and releases the parent; a little more for
    // the child's exit and any page-cache miss while the parent started.
    assert!(
        (0.1..0.11).contains(&d),
        "uninterruptible off-CPU {d}s, want ~0.1s"
    );
    // 100 ms lies in (2^26, 2^27] ns: exactly one such D wait.
    assert_eq!(offcpu_in_bucket(&m, &pid, "uninterruptible", 27), 1.0);
    w.finish();
}

#[test]
fn context_switches_match_proc_status() {
    let Some(_g) = kernel_or_skip("context_switches_match_proc_status") else {
        return;
    };
    context_switches_match(&Agent::start(&["--per-pid"]));
}

/// Threads that come and go: each one's counts outlive it (folded from `SW_DEAD_THREADS` into
/// its process), against getrusage, whose totals keep ended threads' switches too.
#[test]
fn ended_threads_switches_stay_with_their_process() {
    let Some(_g) = kernel_or_skip("ended_threads_switches_stay_with_their_process") else {
        return;
    };
    let agent = Agent::start(&["--per-pid"]);
    // 20 waves of 10 threads, 5 sleeps of 1 ms each: over 1000 switches, nearly all by
    // threads that ended.
    switches_match_rusage(&agent, &["threads", "20", "10", "5", "1"], 200);
    // A non-leader thread that execs takes over the leader's tid and start time, and the
    // leader ends: before, during and after, every switch stays with the process.
    switches_match_rusage(&agent, &["thread-exec", "400", "1"], 1);
    // The maps were read with the batch commands, not the key-by-key fallback.
    let log = agent.log();
    assert!(!log.contains("key by key"), "{log}");
}

/// Runs a workload that prints its getrusage switch counts, and checks the agent's per-pid
/// counts against them. `ended`: how many of its threads end before it prints them.
fn switches_match_rusage(agent: &Agent, args: &[&str], ended: u32) {
    let mut w = Workload::start(args);
    let line = w.next_line(Duration::from_secs(60));
    let (vol, invol) = line
        .strip_prefix("rusage ")
        .and_then(|r| r.split_once(' '))
        .map(|(v, i)| (v.parse::<f64>().unwrap(), i.parse::<f64>().unwrap()))
        .unwrap_or_else(|| panic!("unexpected workload output {line:?}"));
    w.expect_done(Duration::from_secs(10));
    quiesce(w.pid);
    assert!(vol > 1000.0, "{args:?}: too few switches to compare: {vol}");
    let pid = w.pid_label();
    let mut m = agent.scrape();
    // The main thread's block on stdin, after getrusage, adds one. A thread's switches after
    // sched_process_exit (its teardown: say, waiting for the mm lock as its siblings exit)
    // are not counted by design, while getrusage has them: about 0.1 per ended thread here;
    // allow a quarter. Otherwise 1 %.
    let (low, high) = (vol * 0.99 - f64::from(ended) * 0.25, vol * 1.01 + 2.0);
    let ok = wait_until(Duration::from_secs(5), || {
        m = agent.scrape();
        let got = m.sum(CSWCH, &[("pid", &pid), ("kind", "voluntary")]);
        (low..=high).contains(&got)
    });
    let got_vol = m.sum(CSWCH, &[("pid", &pid), ("kind", "voluntary")]);
    let got_invol = m.sum(CSWCH, &[("pid", &pid), ("kind", "involuntary")]);
    assert!(
        ok,
        "{args:?}: voluntary switches: agent {got_vol}, getrusage {vol}, want {low}..={high} \
         (involuntary: {got_invol}, {invol})"
    );
    assert!(
        got_invol <= invol + 0.02 * vol,
        "{args:?}: involuntary switches: agent {got_invol}, getrusage {invol}"
    );
    // Every ended thread's entry was drained.
    assert!(
        map_entries(&m, "SW_DEAD_THREADS") <= 20.0,
        "{args:?}: ended-thread map not drained: {}",
        map_entries(&m, "SW_DEAD_THREADS")
    );
    assert_eq!(
        m.sum("stallwatch_events_dropped_total", &[("probe", "sched")]),
        0.0,
        "{:?}",
        m.nonzero("stallwatch_events_dropped_total")
    );
    w.finish();
}

/// The pre-5.18 sched_switch program (it reads prev->__state at a BTF offset instead of
/// taking prev_state from the tracepoint) loads here too: hold it to the same ground truth.
#[test]
fn legacy_sched_switch_program_matches_the_same_ground_truth() {
    let Some(_g) = kernel_or_skip("legacy_sched_switch_program_matches_the_same_ground_truth")
    else {
        return;
    };
    let agent = Agent::start(&["--per-pid", "--legacy-sched-switch"]);
    let (_, ready) = agent.get("/readyz");
    assert!(ready.contains("sw_switch_v1"), "{ready}");
    context_switches_match(&agent);
    vfork_d_state(&agent);
}

fn context_switches_match(agent: &Agent) {
    for args in [&["spin", "3", "1000", "0"][..], &["sleep", "200", "1"][..]] {
        let w = Workload::run(args, Duration::from_secs(30));
        quiesce(w.pid);
        // /proc/<pid>/status counts the main thread only; sum every thread's status.
        let (vol, invol) = all_tids(w.pid)
            .iter()
            .map(|t| ctxt_switches_tid(w.pid, *t))
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        let m = agent.scrape();
        let pid = w.pid_label();
        let got_vol = m.sum(CSWCH, &[("pid", &pid), ("kind", "voluntary")]);
        let got_invol = m.sum(CSWCH, &[("pid", &pid), ("kind", "involuntary")]);
        assert!(
            vol + invol > 50,
            "{args:?}: too few switches to compare ({vol}, {invol})"
        );
        assert_within(
            &format!("{args:?} voluntary switches"),
            got_vol,
            vol as f64,
            0.02,
        );
        if invol > 0 {
            assert_within(
                &format!("{args:?} involuntary switches"),
                got_invol,
                invol as f64,
                0.02,
            );
        } else {
            assert!(
                got_invol <= 1.0,
                "{args:?}: kernel counted no involuntary switch, agent {got_invol}"
            );
        }
        w.finish();
    }
}

fn map_entries(m: &Metrics, map: &str) -> f64 {
    m.sum("stallwatch_bpf_map_entries", &[("map", map)])
}

#[test]
fn churn_returns_maps_to_baseline_and_keeps_exited_contributions() {
    let Some(_g) = kernel_or_skip("churn_returns_maps_to_baseline_and_keeps_exited_contributions")
    else {
        return;
    };
    let agent = Agent::start(&[]);
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        .unwrap();
    let before = agent.scrape();
    let threads0 = map_entries(&before, "SW_THREADS");
    const N: usize = 5000;
    for _ in 0..N {
        let st = std::process::Command::new("/bin/true")
            .status()
            .expect("spawn /bin/true");
        assert!(st.success());
    }
    let labels = [("comm", "true"), ("cgroup", cgroup.as_str())];
    let mut after = agent.scrape();
    // Exit events are read asynchronously; give the agent a moment.
    let done = wait_until(Duration::from_secs(20), || {
        after = agent.scrape();
        after.sum(&format!("{RUNQ}_count"), &labels) >= N as f64
            && map_entries(&after, "SW_THREADS") <= threads0 + 20.0
            && map_entries(&after, "SW_DEAD_THREADS") <= 20.0
    });
    let drops = after.sum("stallwatch_events_dropped_total", &[]);
    assert!(
        done,
        "after {N} processes: runq count {} (want {N}), thread map {} (baseline {threads0}), \
         ended-thread map {}, drops {drops}",
        after.sum(&format!("{RUNQ}_count"), &labels),
        map_entries(&after, "SW_THREADS"),
        map_entries(&after, "SW_DEAD_THREADS")
    );
    // Every process waited for a CPU at least once, before its first run.
    let runq_count = after.sum(&format!("{RUNQ}_count"), &labels);
    assert!(
        runq_count >= N as f64,
        "{runq_count} run-queue waits for {N} processes"
    );
    assert_eq!(
        drops,
        0.0,
        "events dropped during churn: {:?}",
        after.nonzero("stallwatch_events_dropped_total")
    );
    // The exited processes' series stays, and does not go backwards.
    std::thread::sleep(Duration::from_secs(1));
    let later = agent.scrape();
    assert_eq!(later.sum(&format!("{RUNQ}_count"), &labels), runq_count);
    assert!(later.sum("stallwatch_tracked_processes", &[]) < 1000.0);
}

#[test]
fn metrics_pass_promtool_and_self_metrics_are_present() {
    let Some(_g) = kernel_or_skip("metrics_pass_promtool_and_self_metrics_are_present") else {
        return;
    };
    // Every probe, the syscall one by name, so promtool sees every family (the gc probe's
    // pause families are checked with live runtimes in kernel_gc).
    let agent = Agent::start(&[
        "--bpf-stats",
        "--probes",
        "sched,syscalls,tcp,gc",
        "--syscall-names",
    ]);
    // Some activity so every family has samples.
    let w = Workload::run(&["sleep", "5", "10"], Duration::from_secs(10));
    let (code, body) = agent.get("/metrics");
    assert_eq!(code, 200);
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .output_with_stdin(body.as_bytes());
    assert!(
        promtool.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&promtool.stdout),
        String::from_utf8_lossy(std::mem::take(&mut promtool.stderr).as_slice())
    );
    let m = Metrics::parse(&body);
    for probe in ["sched", "syscalls", "tcp", "gc"] {
        assert_eq!(
            m.sum("stallwatch_probe_attached", &[("probe", probe)]),
            1.0,
            "{probe}"
        );
    }
    assert_eq!(m.sum("stallwatch_build_info", &[]), 1.0);
    assert!(m.sum("stallwatch_tracked_processes", &[]) > 0.0);
    assert!(
        m.sum(
            "stallwatch_bpf_program_runs_total",
            &[("program", "sw_switch")]
        ) > 0.0
    );
    assert!(m.sum("stallwatch_bpf_program_run_seconds_total", &[]) > 0.0);
    assert!(
        m.sum(
            "stallwatch_bpf_program_runs_total",
            &[("program", "sw_sys_exit")]
        ) > 0.0
    );
    // The test's own HTTP connections to the agent are TCP activity.
    for probe_metric in [
        RUNQ,
        OFFCPU_HIST,
        "stallwatch_syscall_latency_seconds",
        "stallwatch_tcp_connect_latency_seconds",
        "stallwatch_tcp_accept_queue_seconds",
    ] {
        assert!(
            m.has(&format!("{probe_metric}_bucket")),
            "{probe_metric} missing"
        );
    }
    assert_eq!(agent.get("/healthz").0, 200);
    assert_eq!(agent.get("/readyz").0, 200);
    w.finish();
    assert!(agent.stop(), "agent did not exit cleanly on SIGTERM");
}

trait OutputWithStdin {
    fn output_with_stdin(&mut self, input: &[u8]) -> std::process::Output;
}

impl OutputWithStdin for std::process::Command {
    fn output_with_stdin(&mut self, input: &[u8]) -> std::process::Output {
        use std::io::Write;
        let mut child = self
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn promtool (installed by `cargo xtask setup`)");
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    }
}

#[test]
fn check_passes_as_root_and_names_a_missing_capability() {
    let Some(_g) = kernel_or_skip("check_passes_as_root_and_names_a_missing_capability") else {
        return;
    };
    let bin = env!("CARGO_BIN_EXE_stallwatch");
    let out = std::process::Command::new(bin)
        .arg("check")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "check failed as root:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("ok   probe sched"), "{text}");
    // Same binary with CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN removed from the bounding set.
    let out = std::process::Command::new("setpriv")
        .args([
            "--bounding-set",
            "-bpf,-perfmon,-sys_admin",
            "--inh-caps",
            "-all",
            bin,
            "check",
        ])
        .output()
        .expect("setpriv (util-linux)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "check passed without CAP_BPF:\n{text}"
    );
    assert!(
        text.contains("FAIL capabilities") && text.contains("CAP_BPF"),
        "{text}"
    );
    assert!(
        text.contains("warn uprobe caps") && text.contains("CAP_SYS_ADMIN"),
        "the gc probe's need is named too:\n{text}"
    );
}

#[test]
fn series_of_exited_processes_are_removed_after_exit_grace() {
    let Some(_g) = kernel_or_skip("series_of_exited_processes_are_removed_after_exit_grace") else {
        return;
    };
    exited_series_removed(&Agent::start(&["--per-pid", "--exit-grace", "2s"]));
}

/// Kernels whose sched_process_exit has no `group_dead` (Debian 12's 6.1, say) get a program
/// that reads `p->signal->live`: exits must still arrive as events, not by the slow sweep.
#[test]
fn legacy_process_exit_program_removes_exited_series_as_fast() {
    let Some(_g) = kernel_or_skip("legacy_process_exit_program_removes_exited_series_as_fast")
    else {
        return;
    };
    let agent = Agent::start(&["--per-pid", "--exit-grace", "2s", "--legacy-process-exit"]);
    let (_, ready) = agent.get("/readyz");
    assert!(ready.contains("sw_proc_exit_v1"), "{ready}");
    exited_series_removed(&agent);
    // A multi-threaded process: its threads reach the tracepoint one by one (or several see
    // live at 0 together); the series still goes, and no exit is missed or unattributed.
    let w = Workload::run(&["spin", "4", "300", "0"], Duration::from_secs(10));
    let pid = w.pid_label();
    assert!(agent.scrape().sum(CSWCH, &[("pid", &pid)]) > 0.0);
    w.finish();
    exited_series_gone(&agent, &pid);
    let m = agent.scrape();
    for reason in ["exit_missed", "unattributed"] {
        assert_eq!(
            m.sum("stallwatch_events_dropped_total", &[("reason", reason)]),
            0.0,
            "{reason}"
        );
    }
}

fn exited_series_removed(agent: &Agent) {
    let w = Workload::run(&["sleep", "3", "10"], Duration::from_secs(10));
    let pid = w.pid_label();
    let m = agent.scrape();
    let switches = m.sum(CSWCH, &[("pid", &pid)]);
    assert!(switches > 0.0, "no series for the live workload");
    w.finish();
    // Still there (and not lower) right after the exit: the grace period keeps it.
    let m = agent.scrape();
    assert!(m.sum(CSWCH, &[("pid", &pid)]) >= switches);
    exited_series_gone(agent, &pid);
}

/// Within 10 s of the exit, with a 2 s grace: an exit event, not the sweep (up to 20 s).
fn exited_series_gone(agent: &Agent, pid: &str) {
    let gone = wait_until(Duration::from_secs(10), || {
        !agent
            .scrape()
            .0
            .keys()
            .any(|(n, labels)| n == CSWCH && labels.iter().any(|(k, v)| k == "pid" && v == pid))
    });
    assert!(
        gone,
        "series of pid {pid} still exported 10 s after it exited (grace 2 s)"
    );
}
