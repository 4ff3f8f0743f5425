//! Kernel tests of the syscalls probe: the real programs on the running kernel, gated
//! workloads whose syscalls the test knows exactly, and counters compared as deltas between
//! a scrape after the workload's start-up and one after its work. Every assertion is scoped
//! to the workload's pid.

mod common;

use std::time::Duration;

use common::*;

const LATENCY: &str = "stallwatch_syscall_latency_seconds";
const ERRORS: &str = "stallwatch_syscall_errors_total";

/// `le` label of the log2 bucket whose upper bound is 2^shift ns.
fn le(shift: u32) -> String {
    format!("{}", (1u64 << shift) as f64 / 1e9)
}

/// Runs a gated workload and returns the scrapes before and after its work.
fn before_after(agent: &Agent, args: &[&str], timeout: Duration) -> (Workload, Metrics, Metrics) {
    let mut w = Workload::gated(args);
    // The first scrape also makes the agent track the new process.
    let before = agent.scrape();
    w.go(timeout);
    let after = agent.scrape();
    (w, before, after)
}

fn delta(before: &Metrics, after: &Metrics, name: &str, want: &[(&str, &str)]) -> f64 {
    after.sum(name, want) - before.sum(name, want)
}

fn agent(extra: &[&str]) -> Agent {
    let mut args = vec!["--probes", "syscalls", "--per-pid"];
    args.extend(extra);
    Agent::start(&args)
}

#[test]
fn nanosleeps_are_sleep_class_in_the_10ms_bucket() {
    let Some(_g) = kernel_or_skip("nanosleeps_are_sleep_class_in_the_10ms_bucket") else {
        return;
    };
    let agent = agent(&[]);
    let (w, before, after) = before_after(&agent, &["sleep", "50", "10"], Duration::from_secs(30));
    let pid = w.pid_label();
    let count = delta(
        &before,
        &after,
        &format!("{LATENCY}_count"),
        &[("pid", &pid), ("class", "sleep")],
    );
    assert_eq!(count, 50.0, "sleep-class observations");
    // 10 ms (plus timer slack) lies in (2^23, 2^24] ns.
    let bucket = |shift| {
        delta(
            &before,
            &after,
            &format!("{LATENCY}_bucket"),
            &[("pid", &pid), ("class", "sleep"), ("le", &le(shift))],
        )
    };
    assert_eq!(
        bucket(24) - bucket(23),
        50.0,
        "observations in the 10 ms bucket"
    );
    let sum = delta(
        &before,
        &after,
        &format!("{LATENCY}_sum"),
        &[("pid", &pid), ("class", "sleep")],
    );
    assert!((0.5..0.6).contains(&sum), "50 x 10 ms summed to {sum} s");
    w.finish();
}

#[test]
fn futex_timeouts_are_lock_class_and_count_etimedout() {
    let Some(_g) = kernel_or_skip("futex_timeouts_are_lock_class_and_count_etimedout") else {
        return;
    };
    let agent = agent(&[]);
    let (w, before, after) = before_after(&agent, &["futex", "20", "20"], Duration::from_secs(30));
    let pid = w.pid_label();
    let p = [("pid", pid.as_str()), ("class", "lock")];
    assert_eq!(
        delta(&before, &after, &format!("{LATENCY}_count"), &p),
        20.0
    );
    let timeouts = delta(
        &before,
        &after,
        ERRORS,
        &[("pid", &pid), ("class", "lock"), ("errno", "ETIMEDOUT")],
    );
    assert_eq!(timeouts, 20.0, "ETIMEDOUT errors");
    let sum = delta(&before, &after, &format!("{LATENCY}_sum"), &p);
    assert!(
        (0.4..0.5).contains(&sum),
        "20 x 20 ms timeouts summed to {sum} s"
    );
    w.finish();
}

#[test]
fn blocking_pipe_read_is_one_read_of_at_least_30ms() {
    let Some(_g) = kernel_or_skip("blocking_pipe_read_is_one_read_of_at_least_30ms") else {
        return;
    };
    let agent = agent(&[]);
    let (w, before, after) = before_after(&agent, &["piperead", "30"], Duration::from_secs(30));
    let pid = w.pid_label();
    let p = [("pid", pid.as_str()), ("class", "read")];
    let count = delta(&before, &after, &format!("{LATENCY}_count"), &p);
    // Reads up to 2^24 ns (16.8 ms) are not the blocking one.
    let short = delta(
        &before,
        &after,
        &format!("{LATENCY}_bucket"),
        &[("pid", &pid), ("class", "read"), ("le", &le(24))],
    );
    assert_eq!(count - short, 1.0, "reads longer than 16.8 ms");
    let in_30ms_bucket = delta(
        &before,
        &after,
        &format!("{LATENCY}_bucket"),
        &[("pid", &pid), ("class", "read"), ("le", &le(25))],
    ) - short;
    assert_eq!(
        in_30ms_bucket, 1.0,
        "the blocking read lies in (16.8, 33.6] ms"
    );
    let sum = delta(&before, &after, &format!("{LATENCY}_sum"), &p);
    assert!(
        sum >= 0.030,
        "read time {sum} s is under the writer's 30 ms delay"
    );
    w.finish();
}

#[test]
fn getppid_count_is_exact_with_syscall_names() {
    let Some(_g) = kernel_or_skip("getppid_count_is_exact_with_syscall_names") else {
        return;
    };
    let agent = agent(&["--syscall-names"]);
    let (w, before, after) = before_after(&agent, &["getppid", "100000"], Duration::from_secs(60));
    let pid = w.pid_label();
    let count = delta(
        &before,
        &after,
        &format!("{LATENCY}_count"),
        &[("pid", &pid), ("class", "process"), ("syscall", "getppid")],
    );
    assert_eq!(count, 100_000.0, "getppid observations");
    w.finish();
}

#[test]
fn missing_file_opens_count_enoent() {
    let Some(_g) = kernel_or_skip("missing_file_opens_count_enoent") else {
        return;
    };
    let agent = agent(&[]);
    let (w, before, after) =
        before_after(&agent, &["openmissing", "1000"], Duration::from_secs(30));
    let pid = w.pid_label();
    let enoent = delta(
        &before,
        &after,
        ERRORS,
        &[("pid", &pid), ("errno", "ENOENT")],
    );
    assert_eq!(enoent, 1000.0, "ENOENT errors");
    let in_file = delta(
        &before,
        &after,
        ERRORS,
        &[("pid", &pid), ("class", "file"), ("errno", "ENOENT")],
    );
    assert_eq!(in_file, 1000.0, "ENOENT errors of class file");
    w.finish();
}

/// `key=value` fields of the agent's slow-syscall log lines for `pid`.
fn slow_events(log: &str, pid: u32) -> Vec<std::collections::HashMap<String, String>> {
    log.lines()
        .filter_map(|l| l.split_once("slow syscall: ").map(|(_, r)| r))
        .map(|r| {
            r.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
                .collect::<std::collections::HashMap<_, _>>()
        })
        .filter(|f| f.get("pid").map(String::as_str) == Some(pid.to_string().as_str()))
        .collect()
}

#[test]
fn one_300ms_sleep_is_one_slow_call_event() {
    let Some(_g) = kernel_or_skip("one_300ms_sleep_is_one_slow_call_event") else {
        return;
    };
    let agent = agent(&[]);
    let mut w = Workload::gated(&["sleep", "1", "300"]);
    w.go(Duration::from_secs(10));
    let found = wait_until(Duration::from_secs(5), || {
        slow_events(&agent.log(), w.pid)
            .iter()
            .any(|e| e.get("syscall").map(String::as_str) == Some("nanosleep"))
    });
    assert!(found, "no slow nanosleep event; log:\n{}", agent.log());
    let events: Vec<_> = slow_events(&agent.log(), w.pid)
        .into_iter()
        .filter(|e| e["syscall"] == "nanosleep")
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(e["tid"], w.pid.to_string());
    assert_eq!(e["comm"], "swload");
    assert_eq!(e["class"], "sleep");
    assert_eq!(e["ret"], "0");
    let ns: u64 = e["duration_ns"].parse().unwrap();
    assert!(
        (300_000_000..400_000_000).contains(&ns),
        "300 ms sleep reported as {ns} ns"
    );
    w.finish();
}

/// A cgroup v2 directory for the test, removed on drop.
struct TestCgroup {
    path: std::path::PathBuf,
}

impl TestCgroup {
    fn new(name: &str) -> TestCgroup {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let root = mountinfo
            .lines()
            .find_map(|l| {
                let (pre, post) = l.split_once(" - ")?;
                post.starts_with("cgroup2 ")
                    .then(|| pre.split(' ').nth(4).map(std::path::PathBuf::from))?
            })
            .expect("a cgroup v2 hierarchy is mounted");
        let path = root.join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(path.join("inner")).expect("create test cgroup");
        TestCgroup { path }
    }

    fn add(&self, pid: u32) {
        std::fs::write(self.path.join("inner/cgroup.procs"), pid.to_string())
            .expect("move workload into the test cgroup");
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(self.path.join("inner"));
        let _ = std::fs::remove_dir(&self.path);
    }
}

#[test]
fn cgroup_scope_times_only_processes_inside() {
    let Some(_g) = kernel_or_skip("cgroup_scope_times_only_processes_inside") else {
        return;
    };
    let cg = TestCgroup::new("stallwatch-scope");
    // The parent directory is selected: its descendants are in scope too.
    let agent = agent(&["--syscall-cgroup", cg.path.to_str().unwrap()]);
    let mut inside = Workload::gated(&["sleep", "20", "10"]);
    cg.add(inside.pid);
    let mut outside = Workload::gated(&["sleep", "20", "10"]);
    let before = agent.scrape();
    inside.go(Duration::from_secs(10));
    outside.go(Duration::from_secs(10));
    let after = agent.scrape();
    let count = |pid: &str, class: Option<&str>| {
        let mut want = vec![("pid", pid)];
        want.extend(class.map(|c| ("class", c)));
        delta(&before, &after, &format!("{LATENCY}_count"), &want)
    };
    assert_eq!(count(&inside.pid_label(), Some("sleep")), 20.0);
    assert_eq!(
        after.sum(
            &format!("{LATENCY}_count"),
            &[("pid", &outside.pid_label())]
        ),
        0.0,
        "a process outside the selected cgroup was timed"
    );
    assert_eq!(count(&outside.pid_label(), None), 0.0);
    inside.finish();
    outside.finish();
}

#[test]
fn pid_scope_times_only_the_selected_process() {
    let Some(_g) = kernel_or_skip("pid_scope_times_only_the_selected_process") else {
        return;
    };
    let mut selected = Workload::gated(&["sleep", "20", "10"]);
    let mut other = Workload::gated(&["sleep", "20", "10"]);
    let pid = selected.pid_label();
    let agent = agent(&["--syscall-pid", &pid]);
    let before = agent.scrape();
    selected.go(Duration::from_secs(10));
    other.go(Duration::from_secs(10));
    let after = agent.scrape();
    assert_eq!(
        delta(
            &before,
            &after,
            &format!("{LATENCY}_count"),
            &[("pid", &pid), ("class", "sleep")]
        ),
        20.0
    );
    assert_eq!(
        after.sum(&format!("{LATENCY}_count"), &[("pid", &other.pid_label())]),
        0.0,
        "an unselected process was timed"
    );
    selected.finish();
    other.finish();
}

#[test]
fn a_full_syscall_map_counts_drops_and_the_agent_stays_healthy() {
    let Some(_g) = kernel_or_skip("a_full_syscall_map_counts_drops_and_the_agent_stays_healthy")
    else {
        return;
    };
    // Two entries for the whole node: full at once.
    let agent = agent(&["--syscall-max-entries", "2"]);
    let w = Workload::run(&["openmissing", "100"], Duration::from_secs(10));
    let dropped = |m: &Metrics| {
        m.sum(
            "stallwatch_events_dropped_total",
            &[("probe", "syscalls"), ("reason", "process_map_full")],
        )
    };
    let first = dropped(&agent.scrape());
    assert!(first > 0.0, "no drops counted with a 2-entry map");
    let m = agent.scrape();
    assert!(dropped(&m) >= first, "drop counter went backwards");
    for map in ["SW_SC_STATS", "SW_SC_ERRORS"] {
        assert_eq!(
            m.sum("stallwatch_bpf_map_capacity", &[("map", map)]),
            2.0,
            "{map} capacity"
        );
        let entries = m.sum("stallwatch_bpf_map_entries", &[("map", map)]);
        assert!(entries <= 2.0, "{map} holds {entries} entries");
    }
    assert_eq!(
        m.sum("stallwatch_bpf_map_entries", &[("map", "SW_SC_STATS")]),
        2.0,
        "the latency map is full"
    );
    assert_eq!(agent.get("/healthz").0, 200);
    w.finish();
    assert!(agent.stop(), "agent did not exit cleanly on SIGTERM");
}
