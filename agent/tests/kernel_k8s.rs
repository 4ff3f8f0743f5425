//! Kubernetes attribution, the series budget and the capability drop, on the real kernel:
//! workloads run in cgroups named the way kubelet and its container runtimes name them, pod
//! names come from a recorded PodList served by a local stand-in for the API server (the
//! agent's client is the real one), and the agent runs in a private cgroup namespace as it
//! does in its DaemonSet.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{kernel_or_skip, line_reader, wait_until, workspace_root, Agent, Metrics};

const WAIT: Duration = Duration::from_secs(30);
const NODE: &str = "test-node";

const UID_WEB: &str = "5a1c2b3d-0e4f-4a6b-8c7d-9e0f1a2b3c4d";
const UID_DB: &str = "7f3e9d21-64b0-4c55-a1e2-0d9c8b7a6f50";
const UID_ORPHAN: &str = "9b8a7c6d-5e4f-4321-8fed-cba987654321";
const UID_LEGACY: &str = "c0ffee00-1234-4abc-9def-0123456789ab";
const UID_LATE: &str = "e5d4c3b2-a190-4f8e-b7d6-c5b4a3928170";
const CID_WEB: &str = "936ce0b666e71159a7076b2e8a791136966abd81a5fecb88ceee618154424017";
const CID_DB: &str = "a87e98dcf388be0b754405c6decf8f86372d6307a6c2ba7b661324dbf345f06d";
const CID_ORPHAN: &str = "3d42c3372af5858b448b9180962932082d3f408f4efab468ef8827bb05887190";
const CID_LEGACY: &str = "0142d639c15e6c52d5daa4e16f11c6a15cf28d201be10413b8a85af5c40c961c";
const CID_LATE: &str = "f57d7b6652ddcc415d9a0a12b34390883f1579eb97539cf72d69e60981c52e62";

fn fixture(name: &str) -> PathBuf {
    workspace_root().join("agent/tests/fixtures").join(name)
}

/// Where the host's cgroup v2 hierarchy is mounted (/sys/fs/cgroup/unified on this hybrid
/// host, /sys/fs/cgroup on unified ones).
fn cgroup2_root() -> PathBuf {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    mi.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            post.starts_with("cgroup2 ")
                .then(|| PathBuf::from(pre.split(' ').nth(4).unwrap()))
        })
        .expect("a cgroup2 mount")
}

/// A v1 hierarchy's mount point (hybrid hosts), if there is one.
fn cgroup1_mount(controller: &str) -> Option<PathBuf> {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    mi.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        (post.starts_with("cgroup ") && post.split(',').any(|o| o == controller))
            .then(|| PathBuf::from(pre.split(' ').nth(4).unwrap()))
    })
}

/// Cgroup directories this test created, removed (deepest first) when dropped.
struct Cgroups(Vec<PathBuf>);

impl Cgroups {
    /// Creates `root/rel` and the directories above it; returns its path.
    fn make(&mut self, root: &Path, rel: &str) -> PathBuf {
        let mut p = root.to_path_buf();
        for part in rel.trim_matches('/').split('/') {
            p.push(part);
            if !p.exists() {
                std::fs::create_dir(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
                self.0.push(p.clone());
            }
        }
        p
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            // A cgroup can be removed only once its processes are gone; they were killed.
            for _ in 0..50 {
                if std::fs::remove_dir(p).is_ok() || !p.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// `swload sleep 20 10` started inside `cgroup` (its cgroup.procs written by the shell that
/// then execs it): 20 voluntary context switches, then it blocks until stdin closes.
struct InCgroup {
    child: Child,
    _stdin: ChildStdin,
}

impl InCgroup {
    fn start(cgroup: &Path) -> InCgroup {
        let mut child = Command::new("sh")
            .args([
                "-c",
                "echo $$ > \"$1/cgroup.procs\" && exec \"$2\" sleep 20 10",
                "sh",
            ])
            .arg(cgroup)
            .arg(env!("CARGO_BIN_EXE_swload"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn swload");
        let stdin = child.stdin.take().unwrap();
        let lines = line_reader(child.stdout.take().unwrap());
        let line = lines
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("swload in {} never finished", cgroup.display()));
        assert!(line.starts_with("done"), "{line}");
        InCgroup {
            child,
            _stdin: stdin,
        }
    }
}

impl Drop for InCgroup {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A stand-in for the API server: answers the pod list with the recorded PodList and each
/// watch with one recorded ADDED event, then holds the watch open. Records request targets.
struct FakeApi {
    port: u16,
    requests: Arc<Mutex<Vec<String>>>,
}

impl FakeApi {
    fn start() -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let list = std::fs::read(fixture("k8s/podlist.json")).unwrap();
        let added = std::fs::read(fixture("k8s/watch-added.json")).unwrap();
        let seen = requests.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (list, added, seen) = (list.clone(), added.clone(), seen.clone());
                std::thread::spawn(move || serve(conn, &list, &added, &seen));
            }
        });
        FakeApi { port, requests }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    /// A kubeconfig pointing at this server (plain HTTP, a bearer token like a real one).
    fn kubeconfig(&self, dir: &Path) -> PathBuf {
        kubeconfig_for(dir, self.port)
    }
}

fn kubeconfig_for(dir: &Path, port: u16) -> PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{port}\n\
             users:\n- name: agent\n  user:\n    token: not-a-real-token\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: agent\ncurrent-context: fake\n"
        ),
    )
    .unwrap();
    path
}

fn serve(mut conn: TcpStream, list: &[u8], added: &[u8], seen: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        // Headers up to the blank line; requests here have no body.
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                break;
            }
        }
        let target = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("")
            .to_string();
        seen.lock().unwrap().push(target.clone());
        if !target.starts_with("/api/v1/pods?") {
            let _ = conn.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
            );
            continue;
        }
        if target.contains("watch=true") || target.contains("watch=1") {
            let head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
            let chunk = [
                format!("{:x}\r\n", added.len()).into_bytes(),
                added.to_vec(),
                b"\r\n".to_vec(),
            ]
            .concat();
            if conn.write_all(head).is_err() || conn.write_all(&chunk).is_err() {
                return;
            }
            // Hold the watch open until the client goes away.
            let mut sink = [0u8; 512];
            while reader.get_mut().read(&mut sink).is_ok_and(|n| n > 0) {}
            return;
        }
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            list.len()
        );
        if conn.write_all(head.as_bytes()).is_err() || conn.write_all(list).is_err() {
            return;
        }
    }
}

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
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stallwatch"));
    cmd.args([
        "run",
        "--listen",
        "127.0.0.1:0",
        "--probes",
        "sched",
        "--node-name",
        NODE,
    ])
    .env("KUBECONFIG", &kubeconfig);
    let agent = Agent::spawn(cmd);
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
