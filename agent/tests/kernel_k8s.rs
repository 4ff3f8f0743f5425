//! Kubernetes attribution, the series budget and the capability drop, on the real kernel:
//! workloads run in cgroups named the way kubelet and its container runtimes name them, pod
//! names come from a recorded PodList served by a local stand-in for the API server (the
//! agent's client is the real one), and the agent runs in a private cgroup namespace as it
//! does in its DaemonSet.

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use common::k8s::*;
use common::{kernel_or_skip, line_reader, wait_until, workspace_root, Agent, Metrics};

const WAIT: Duration = Duration::from_secs(30);

/// The label sets of `metric` series whose labels include every `want` pair.
fn series_with(m: &Metrics, metric: &str, want: &[(&str, &str)]) -> Vec<Vec<(String, String)>> {
    m.0.keys()
        .filter(|(n, labels)| {
            n == metric
                && want
                    .iter()
                    .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, l)| l.clone())
        .collect()
}

fn label<'a>(labels: &'a [(String, String)], key: &str) -> Option<&'a str> {
    labels
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Starts the agent the way its DaemonSet runs it: in a cgroup of its own and a private
/// cgroup namespace rooted there, so /proc/<pid>/cgroup reads relative ("/../..") paths.
fn agent_in_own_cgroup_namespace(
    agent_cgroup: &Path,
    extra: &[&str],
    env: &[(&str, &Path)],
) -> Agent {
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "echo $$ > \"$1/cgroup.procs\" && shift && exec unshare --cgroup \"$@\"",
        "sh",
    ])
    .arg(agent_cgroup)
    .arg(env!("CARGO_BIN_EXE_stallwatch"))
    .args(["run", "--listen", "127.0.0.1:0"])
    .args(extra);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Agent::spawn(cmd)
}

#[test]
fn series_carry_pod_and_container_from_cgroup_paths_and_the_api() {
    let Some(_guard) =
        kernel_or_skip("series_carry_pod_and_container_from_cgroup_paths_and_the_api")
    else {
        return;
    };
    let root = cgroup2_root();
    let mut cgs = Cgroups(Vec::new());
    let u = |uid: &str| uid.replace('-', "_");
    // containerd, systemd driver, burstable; CRI-O, systemd driver, besteffort; cgroupfs
    // driver for a pod the API does not list; a guaranteed pod the watch adds later; a host
    // service.
    let web = format!(
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CID_WEB}.scope",
        u(UID_WEB)
    );
    let db = format!(
        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/crio-{CID_DB}.scope",
        u(UID_DB)
    );
    let orphan = format!("/kubepods/burstable/pod{UID_ORPHAN}/{CID_ORPHAN}");
    let late = format!(
        "/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{CID_LATE}.scope",
        u(UID_LATE)
    );
    let service = "/system.slice/sw-k8s-test.service".to_string();
    let agent_cg = cgs.make(&root, "/sw-k8s-test-agent");
    // Two processes run before the agent starts (found by its /proc scan), the rest after
    // (found from exec events; their context switches are all counted).
    let mut workloads = Vec::new();
    for path in [&orphan, &service] {
        let dir = cgs.make(&root, path);
        workloads.push(InCgroup::start(&dir));
    }

    let api = FakeApi::start();
    let tmp = std::env::temp_dir().join(format!("sw-k8s-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let kubeconfig = api.kubeconfig(&tmp);
    let agent = agent_in_own_cgroup_namespace(
        &agent_cg,
        &[
            "--probes",
            "sched",
            "--node-name",
            NODE,
            "--cgroup-root",
            root.to_str().unwrap(),
        ],
        &[("KUBECONFIG", &kubeconfig)],
    );
    assert!(
        agent
            .log()
            .contains("private cgroup namespace rooted at /sw-k8s-test-agent"),
        "the agent did not see its own namespace; log:\n{}",
        agent.log()
    );
    for path in [&web, &db, &late] {
        let dir = cgs.make(&root, path);
        workloads.push(InCgroup::start(&dir));
    }
    // Hybrid host, container runtime on the v1 hierarchies (cgroupfs driver): the v2 line
    // says nothing, the memory hierarchy names the container.
    let v1 = cgroup1_mount("memory");
    let legacy = format!("/kubepods/besteffort/pod{UID_LEGACY}/{CID_LEGACY}");
    if let Some(mem) = &v1 {
        let dir = cgs.make(mem, &legacy);
        workloads.push(InCgroup::start(&dir));
    } else {
        eprintln!("no v1 memory hierarchy (unified host): the hybrid case is not exercised");
    }
    const RUNQ: &str = "stallwatch_runqueue_latency_seconds_count";
    let synced = wait_until(WAIT, || {
        let m = agent.scrape();
        m.sum("stallwatch_kubernetes_synced", &[]) == 1.0
            && m.has_labels(RUNQ, &[("pod", "late-0")])
    });
    let m = agent.scrape();
    assert!(
        synced,
        "pod watch never synced with the late pod; API requests {:?}; series {:#?}\nlog:\n{}",
        api.requests(),
        series_with(&m, RUNQ, &[("comm", "swload")]),
        agent.log()
    );
    // The watch asked for this node's pods only.
    let reqs = api.requests();
    assert!(
        reqs.iter()
            .all(|r| r.contains("fieldSelector=spec.nodeName%3Dtest-node")),
        "requests without the node's field selector: {reqs:?}"
    );
    assert!(reqs.iter().any(|r| r.contains("watch=true")), "{reqs:?}");
    assert_eq!(m.sum("stallwatch_kubernetes_pods", &[]), 4.0);

    // (cgroup path, pod uid, container id, namespace, pod, container)
    let mut want = vec![
        (
            web.as_str(),
            UID_WEB,
            CID_WEB,
            Some(("shop", "web-0", "app")),
        ),
        (
            db.as_str(),
            UID_DB,
            CID_DB,
            Some(("payments", "db-0", "postgres")),
        ),
        (orphan.as_str(), UID_ORPHAN, CID_ORPHAN, None),
        (
            late.as_str(),
            UID_LATE,
            CID_LATE,
            Some(("batch", "late-0", "worker")),
        ),
    ];
    if v1.is_some() {
        want.push((
            "",
            UID_LEGACY,
            CID_LEGACY,
            Some(("shop", "legacy-0", "app")),
        ));
    }
    for (path, uid, cid, names) in want {
        let found = series_with(&m, RUNQ, &[("comm", "swload"), ("container_id", cid)]);
        assert_eq!(found.len(), 1, "one series for container {cid}: {found:#?}");
        let l = &found[0];
        assert_eq!(label(l, "pod_uid"), Some(uid), "{l:?}");
        if !path.is_empty() {
            // Host-absolute, although the agent read it as ../.. from its namespace.
            assert_eq!(label(l, "cgroup"), Some(path), "{l:?}");
        }
        match names {
            Some((ns, pod, container)) => {
                assert_eq!(label(l, "namespace"), Some(ns), "{l:?}");
                assert_eq!(label(l, "pod"), Some(pod), "{l:?}");
                assert_eq!(label(l, "container"), Some(container), "{l:?}");
            }
            // Not in the API: what the path gives, no names.
            None => {
                assert_eq!(label(l, "pod"), None, "{l:?}");
                assert_eq!(label(l, "namespace"), None, "{l:?}");
            }
        }
        assert_eq!(label(l, "unit"), None, "{l:?}");
        if path == orphan {
            continue; // ran before the agent
        }
        // 20 sleeps: 20 voluntary switches at least (plus start-up).
        let mut sel: Vec<(&str, &str)> = l.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        sel.push(("kind", "voluntary"));
        assert!(
            m.sum("stallwatch_context_switches_total", &sel) >= 20.0,
            "{l:?}"
        );
    }
    let svc = series_with(
        &m,
        RUNQ,
        &[("comm", "swload"), ("cgroup", service.as_str())],
    );
    assert_eq!(svc.len(), 1, "{svc:#?}");
    assert_eq!(label(&svc[0], "unit"), Some("sw-k8s-test.service"));
    assert_eq!(label(&svc[0], "pod_uid"), None);
    drop(workloads);
    drop(agent);
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn without_the_api_series_keep_the_ids_their_cgroup_gives() {
    let Some(_guard) = kernel_or_skip("without_the_api_series_keep_the_ids_their_cgroup_gives")
    else {
        return;
    };
    let root = cgroup2_root();
    let mut cgs = Cgroups(Vec::new());
    let web = format!(
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CID_WEB}.scope",
        UID_WEB.replace('-', "_")
    );
    let dir = cgs.make(&root, &web);
    let w = InCgroup::start(&dir);
    // An API endpoint that refuses connections: a port bound, then closed.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tmp = std::env::temp_dir().join(format!("sw-k8s-down-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let kubeconfig = kubeconfig_for(&tmp, port);
    let agent = Agent::start_with_env(
        &["--probes", "sched", "--node-name", NODE],
        &[("KUBECONFIG", &kubeconfig)],
    );
    const RUNQ: &str = "stallwatch_runqueue_latency_seconds_count";
    assert!(
        wait_until(WAIT, || agent
            .scrape()
            .sum("stallwatch_kubernetes_watch_errors_total", &[])
            >= 1.0),
        "watch errors never counted; log:\n{}",
        agent.log()
    );
    let m = agent.scrape();
    assert_eq!(m.sum("stallwatch_kubernetes_synced", &[]), 0.0);
    let found = series_with(&m, RUNQ, &[("comm", "swload"), ("container_id", CID_WEB)]);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(label(&found[0], "pod_uid"), Some(UID_WEB));
    assert_eq!(label(&found[0], "cgroup"), Some(web.as_str()));
    assert_eq!(label(&found[0], "pod"), None);
    let (code, body) = agent.get("/readyz");
    assert_eq!(code, 200, "the agent stays ready without the API: {body}");
    assert!(agent.log().contains("pod watch failed"), "{}", agent.log());
    drop(w);
    drop(agent);
    let _ = std::fs::remove_dir_all(&tmp);
}

/// `n` CPython processes (Debian's python3.11, USDT gc probes) running tests/fixtures/gc.py,
/// each through a symlink of its own so each has its own comm (`swgc-00`, ...).
struct Pythons {
    procs: Vec<(String, Child, ChildStdin, std::sync::mpsc::Receiver<String>)>,
    dir: PathBuf,
}

impl Pythons {
    fn start(n: usize) -> Pythons {
        let dir = std::env::temp_dir().join(format!("sw-k8s-py-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut procs = Vec::new();
        for i in 0..n {
            let comm = format!("swgc-{i:02}");
            let exe = dir.join(&comm);
            std::os::unix::fs::symlink("/usr/bin/python3.11", &exe).unwrap();
            let mut child = Command::new(&exe)
                .arg(fixture("gc.py"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn python3.11 (cargo xtask setup installs it)");
            let stdin = child.stdin.take().unwrap();
            let lines = line_reader(child.stdout.take().unwrap());
            procs.push((comm, child, stdin, lines));
        }
        let mut p = Pythons { procs, dir };
        for i in 0..n {
            p.expect(i, "ready");
        }
        p
    }

    fn expect(&mut self, i: usize, prefix: &str) -> String {
        let (comm, _, _, lines) = &self.procs[i];
        let line = lines
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("{comm}: no {prefix:?} line"));
        assert!(
            line.starts_with(prefix),
            "{comm}: {line:?}, wanted {prefix:?}"
        );
        line
    }

    /// Collections each process's gc.callbacks saw so far.
    fn counts(&mut self) -> Vec<u64> {
        (0..self.procs.len())
            .map(|i| {
                writeln!(self.procs[i].2, "count").unwrap();
                self.expect(i, "count")
                    .split_whitespace()
                    .nth(1)
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect()
    }

    fn collect(&mut self, i: usize, times: usize) {
        for _ in 0..times {
            writeln!(self.procs[i].2, "gc").unwrap();
            self.expect(i, "done");
        }
    }
}

impl Drop for Pythons {
    fn drop(&mut self) {
        for (_, child, _, _) in &mut self.procs {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const PAUSES: &str = "stallwatch_runtime_pause_seconds_count";

/// Pause counts per comm (the series' `comm` label) of the python runtime.
fn pauses_by_comm(m: &Metrics) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    for ((name, labels), v) in &m.0 {
        if name == PAUSES && label(labels, "runtime") == Some("python") {
            *out.entry(label(labels, "comm").unwrap_or("").to_string())
                .or_insert(0.0) += v;
        }
    }
    out
}

fn sum(m: &std::collections::BTreeMap<String, f64>) -> f64 {
    m.values().sum()
}

fn delta(
    after: &std::collections::BTreeMap<String, f64>,
    before: &std::collections::BTreeMap<String, f64>,
    comm: &str,
) -> f64 {
    after.get(comm).copied().unwrap_or(0.0) - before.get(comm).copied().unwrap_or(0.0)
}

#[test]
fn past_the_series_cap_the_least_active_fold_into_one_series_with_exact_totals() {
    let Some(_guard) = kernel_or_skip(
        "past_the_series_cap_the_least_active_fold_into_one_series_with_exact_totals",
    ) else {
        return;
    };
    const CAP: usize = 5;
    const PROCS: usize = 3 * CAP;
    // The same processes measured by a capped agent and an uncapped one, side by side.
    let capped = Agent::start(&["--probes", "gc", "--max-series", &CAP.to_string()]);
    let uncapped = Agent::start(&["--probes", "gc", "--max-series", "0"]);
    let mut py = Pythons::start(PROCS);
    for a in [&uncapped, &capped] {
        assert!(
            wait_until(WAIT, || a
                .scrape()
                .sum("stallwatch_runtime_processes", &[("runtime", "python")])
                >= PROCS as f64),
            "the agent never measured all {PROCS} pythons; log:\n{}",
            a.log()
        );
    }
    let counts0 = py.counts();
    let (u0, c0) = (
        pauses_by_comm(&uncapped.scrape()),
        pauses_by_comm(&capped.scrape()),
    );

    // Phase A: the last CAP processes collect 40 times, the others 1 to 3 times: the busy
    // ones are more than twice as active as any other (a shown series keeps its place
    // against one less than twice as active), whichever the first scrape happened to show.
    for i in 0..PROCS {
        py.collect(i, if i >= PROCS - CAP { 40 } else { i % 3 + 1 });
    }
    let counts1 = py.counts();
    let truth_a: u64 = counts1.iter().zip(&counts0).map(|(a, b)| a - b).sum();
    let m1 = capped.scrape();
    let (u1, c1) = (pauses_by_comm(&uncapped.scrape()), pauses_by_comm(&m1));
    assert_eq!(
        sum(&u1) - sum(&u0),
        truth_a as f64,
        "uncapped vs gc.callbacks: {u1:?}"
    );
    assert_eq!(
        sum(&c1) - sum(&c0),
        truth_a as f64,
        "capped vs gc.callbacks (totals stay exact): {c1:?}"
    );
    let top: Vec<String> = (PROCS - CAP..PROCS)
        .map(|i| format!("swgc-{i:02}"))
        .collect();
    let mut shown: Vec<String> = c1.keys().filter(|k| *k != "_other").cloned().collect();
    shown.sort();
    assert_eq!(
        shown, top,
        "the {CAP} most active keep their series: {c1:?}"
    );
    assert!(c1.contains_key("_other"), "{c1:?}");
    assert_eq!(
        series_with(&m1, PAUSES, &[("runtime", "python")]).len(),
        CAP + 1
    );
    assert!(
        m1.sum("stallwatch_series_overflow_total", &[("probe", "gc")]) >= (PROCS - CAP) as f64,
        "overflow counted"
    );

    // Phase B: everyone collects twice more. Nobody is twice as active as a shown series, so
    // the same ones stay shown, and each shown series moves exactly as without the cap.
    for i in 0..PROCS {
        py.collect(i, 2);
    }
    let counts2 = py.counts();
    let truth_b: u64 = counts2.iter().zip(&counts1).map(|(a, b)| a - b).sum();
    let m2 = capped.scrape();
    let (u2, c2) = (pauses_by_comm(&uncapped.scrape()), pauses_by_comm(&m2));
    assert_eq!(sum(&c2) - sum(&c1), truth_b as f64, "{c2:?}");
    assert_eq!(sum(&u2) - sum(&u1), truth_b as f64, "{u2:?}");
    for comm in &top {
        assert_eq!(
            delta(&c2, &c1, comm),
            delta(&u2, &u1, comm),
            "{comm}: capped vs uncapped"
        );
    }
    let folded: f64 = (0..PROCS - CAP)
        .map(|i| delta(&u2, &u1, &format!("swgc-{i:02}")))
        .sum();
    assert_eq!(
        delta(&c2, &c1, "_other"),
        folded,
        "_other moves as the folded ones do"
    );
    assert_eq!(c2.len(), CAP + 1, "{c2:?}");
}

/// Capability bits as /proc/<pid>/status prints them.
fn cap_mask(caps: &[u32]) -> u64 {
    caps.iter().fold(0, |m, c| m | 1 << c)
}

fn status_caps(pid: u32, tid: u32) -> (u64, u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    let f = |k: &str| {
        u64::from_str_radix(
            s.lines().find_map(|l| l.strip_prefix(k)).unwrap().trim(),
            16,
        )
        .unwrap()
    };
    (f("CapEff:"), f("CapPrm:"), f("CapInh:"))
}

#[test]
fn after_start_the_agent_keeps_only_the_capabilities_it_needs_and_still_works() {
    let Some(_guard) = kernel_or_skip(
        "after_start_the_agent_keeps_only_the_capabilities_it_needs_and_still_works",
    ) else {
        return;
    };
    // CAP_DAC_READ_SEARCH 2, CAP_SYS_PTRACE 19, CAP_SYS_ADMIN 21 (the uprobe PMU requires
    // it), CAP_PERFMON 38, CAP_BPF 39.
    let with_gc = cap_mask(&[2, 19, 21, 38, 39]);
    let agent = Agent::start(&["--probes", "sched,gc", "--per-pid"]);
    let pid = agent.pid();
    let tids = common::all_tids(pid);
    assert!(tids.len() > 1, "a multi-threaded agent: {tids:?}");
    for tid in &tids {
        assert_eq!(
            status_caps(pid, *tid),
            (with_gc, with_gc, 0),
            "thread {tid}: CapEff/CapPrm/CapInh; log:\n{}",
            agent.log()
        );
    }
    // Still works: a runtime started now is found and its uprobes attached (perf_event_open,
    // /proc/<pid>/map_files) with only those capabilities; its pauses match its own count.
    let mut py = Pythons::start(1);
    let child = py.procs[0].1.id().to_string();
    assert!(
        wait_until(WAIT, || agent
            .scrape()
            .sum("stallwatch_runtime_processes", &[("runtime", "python")])
            >= 1.0),
        "no runtime attached after the drop; log:\n{}",
        agent.log()
    );
    let before = py.counts()[0];
    let n0 = agent.scrape().sum(PAUSES, &[("pid", &child)]);
    py.collect(0, 4);
    let after = py.counts()[0];
    let n1 = agent.scrape().sum(PAUSES, &[("pid", &child)]);
    assert_eq!(n1 - n0, (after - before) as f64, "pauses after the drop");
    // The sched probe's maps are still read: the python process has run-queue samples.
    assert!(
        agent.scrape().sum(
            "stallwatch_runqueue_latency_seconds_count",
            &[("pid", &child)]
        ) > 0.0
    );
    // New threads (tokio's blocking pool grows on scrapes) inherit the reduced sets.
    for tid in common::all_tids(pid) {
        assert_eq!(status_caps(pid, tid).0, with_gc, "thread {tid}");
    }

    // Without the gc probe only CAP_BPF remains; --drop-capabilities=false keeps everything.
    let sched_only = Agent::start(&["--probes", "sched"]);
    let p = sched_only.pid();
    assert_eq!(status_caps(p, p), (cap_mask(&[39]), cap_mask(&[39]), 0));
    let keep_all = Agent::start(&["--probes", "sched", "--drop-capabilities=false"]);
    let p = keep_all.pid();
    let (eff, _, _) = status_caps(p, p);
    assert_eq!(eff, status_caps(std::process::id(), std::process::id()).0);
}

/// The capabilities deploy/'s DaemonSet adds (after dropping ALL).
fn daemonset_capabilities() -> Vec<String> {
    let text =
        std::fs::read_to_string(workspace_root().join("deploy/kustomize/base/daemonset.yaml"))
            .unwrap();
    let mut lines = text.lines().skip_while(|l| l.trim() != "add:").skip(1);
    let mut caps = Vec::new();
    for l in lines.by_ref() {
        let t = l.trim();
        if t.starts_with('#') {
            continue;
        }
        match t.strip_prefix("- ") {
            Some(c) => caps.push(c.trim().to_string()),
            None => break,
        }
    }
    assert!(
        !caps.is_empty(),
        "no capabilities.add list in daemonset.yaml"
    );
    caps
}

/// Starts the agent with only `caps` in its bounding set, as the container runtime would.
fn agent_with_only(caps: &[String], extra: &[&str]) -> Agent {
    let bounding: Vec<String> = caps
        .iter()
        .map(|c| format!("+{}", c.to_lowercase()))
        .collect();
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--bounding-set=-all,{}", bounding.join(",")))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_stallwatch"))
        .args(["run", "--listen", "127.0.0.1:0"])
        .args(extra);
    Agent::spawn(cmd)
}

#[test]
fn the_daemonsets_capabilities_are_enough_and_sys_admin_is_needed_for_runtime_pauses() {
    let Some(_guard) = kernel_or_skip(
        "the_daemonsets_capabilities_are_enough_and_sys_admin_is_needed_for_runtime_pauses",
    ) else {
        return;
    };
    let caps = daemonset_capabilities();
    // Exactly the DaemonSet's set: every default probe attaches, a runtime that starts later
    // gets its uprobes.
    let agent = agent_with_only(&caps, &["--per-pid"]);
    let (code, body) = agent.get("/readyz");
    assert_eq!(code, 200, "{body}");
    for probe in ["sched", "tcp", "gc"] {
        assert!(
            body.contains(&format!("{probe}: attached")),
            "{probe} with {caps:?}: {body}\nlog:\n{}",
            agent.log()
        );
    }
    let mut py = Pythons::start(1);
    let pid = py.procs[0].1.id().to_string();
    assert!(
        wait_until(WAIT, || agent
            .scrape()
            .sum("stallwatch_runtime_processes", &[("runtime", "python")])
            >= 1.0),
        "runtime not attached with {caps:?}; log:\n{}",
        agent.log()
    );
    let n0 = agent.scrape().sum(PAUSES, &[("pid", &pid)]);
    py.collect(0, 3);
    assert!(agent.scrape().sum(PAUSES, &[("pid", &pid)]) >= n0 + 3.0);
    drop(py);
    drop(agent);

    // Without SYS_ADMIN the kernel refuses the uprobe: counted and logged, not silent.
    let without: Vec<String> = caps.into_iter().filter(|c| c != "SYS_ADMIN").collect();
    let agent = agent_with_only(&without, &[]);
    let _py = Pythons::start(1);
    assert!(
        wait_until(WAIT, || agent.scrape().sum(
            "stallwatch_runtime_attach_failures_total",
            &[("runtime", "python"), ("reason", "attach_failed")]
        ) >= 1.0),
        "expected the uprobe to be refused without CAP_SYS_ADMIN; log:\n{}",
        agent.log()
    );
    assert!(
        agent.log().contains("Permission denied"),
        "the log says why: {}",
        agent.log()
    );
}
