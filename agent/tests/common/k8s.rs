//! Kubernetes stand-ins for kernel tests: cgroups named the way kubelet and its container
//! runtimes name them, processes started inside them, and a local stand-in for the API
//! server that serves the recorded PodList (tests/fixtures/k8s) to the agent's real client.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{line_reader, workspace_root};

/// The node the recorded pods run on (their spec.nodeName).
pub const NODE: &str = "test-node";

// Pods of the recorded PodList (podlist.json: web-0, db-0, legacy-0), one the watch adds later
// (watch-added.json: late-0), and one the API does not know.
/// shop/web-0, container `app` (containerd).
pub const UID_WEB: &str = "5a1c2b3d-0e4f-4a6b-8c7d-9e0f1a2b3c4d";
/// payments/db-0, container `postgres` (CRI-O).
pub const UID_DB: &str = "7f3e9d21-64b0-4c55-a1e2-0d9c8b7a6f50";
pub const UID_ORPHAN: &str = "9b8a7c6d-5e4f-4321-8fed-cba987654321";
/// shop/legacy-0, container `app` (Docker).
pub const UID_LEGACY: &str = "c0ffee00-1234-4abc-9def-0123456789ab";
/// batch/late-0, container `worker` (containerd), known from the watch only.
pub const UID_LATE: &str = "e5d4c3b2-a190-4f8e-b7d6-c5b4a3928170";
pub const CID_WEB: &str = "936ce0b666e71159a7076b2e8a791136966abd81a5fecb88ceee618154424017";
pub const CID_DB: &str = "a87e98dcf388be0b754405c6decf8f86372d6307a6c2ba7b661324dbf345f06d";
pub const CID_ORPHAN: &str = "3d42c3372af5858b448b9180962932082d3f408f4efab468ef8827bb05887190";
pub const CID_LEGACY: &str = "0142d639c15e6c52d5daa4e16f11c6a15cf28d201be10413b8a85af5c40c961c";
pub const CID_LATE: &str = "f57d7b6652ddcc415d9a0a12b34390883f1579eb97539cf72d69e60981c52e62";

/// The cgroup (systemd driver) of web-0's `app` container: burstable, containerd.
pub fn web_cgroup() -> String {
    format!(
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CID_WEB}.scope",
        UID_WEB.replace('-', "_")
    )
}

/// The cgroup (systemd driver) of db-0's `postgres` container: besteffort, CRI-O.
pub fn db_cgroup() -> String {
    format!(
        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/crio-{CID_DB}.scope",
        UID_DB.replace('-', "_")
    )
}

/// The cgroup (systemd driver) of late-0's `worker` container: guaranteed, containerd.
pub fn late_cgroup() -> String {
    format!(
        "/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{CID_LATE}.scope",
        UID_LATE.replace('-', "_")
    )
}

pub fn fixture(name: &str) -> PathBuf {
    workspace_root().join("agent/tests/fixtures").join(name)
}

/// Where the host's cgroup v2 hierarchy is mounted (/sys/fs/cgroup/unified on this hybrid
/// host, /sys/fs/cgroup on unified ones).
pub fn cgroup2_root() -> PathBuf {
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
pub fn cgroup1_mount(controller: &str) -> Option<PathBuf> {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    mi.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        (post.starts_with("cgroup ") && post.split(',').any(|o| o == controller))
            .then(|| PathBuf::from(pre.split(' ').nth(4).unwrap()))
    })
}

/// Cgroup directories a test created, removed (deepest first) when dropped.
#[derive(Default)]
pub struct Cgroups(pub Vec<PathBuf>);

impl Cgroups {
    /// Creates `root/rel` and the directories above it; returns its path.
    pub fn make(&mut self, root: &Path, rel: &str) -> PathBuf {
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

/// `program`, to be started inside `cgroup`: a shell writes its own pid to the cgroup's
/// cgroup.procs, then execs `program` with the arguments the caller adds, so the child's pid
/// is the program's and everything it starts stays in the cgroup.
pub fn command_in(cgroup: &Path, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "echo $$ > \"$1/cgroup.procs\" && shift && exec \"$@\"",
        "sh",
    ])
    .arg(cgroup)
    .arg(program);
    cmd
}

/// A shell script run inside `cgroup` (`sh -c script sh args...`), e.g. a loop that repeats a
/// workload; the processes it starts inherit the cgroup.
pub fn script_in(cgroup: &Path, script: &str) -> Command {
    let mut cmd = command_in(cgroup, "sh");
    cmd.args(["-c", script, "sh"]);
    cmd
}

/// A process running inside a cgroup, in a process group of its own: dropping it kills the
/// whole group (a looping shell and its current child too) and reaps it.
pub struct InCgroup {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    pub pid: u32,
}

impl InCgroup {
    /// Spawns `cmd` (from [`command_in`] or [`script_in`]) with its stdin and stdout piped.
    pub fn spawn(mut cmd: Command) -> InCgroup {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stdin = child.stdin.take();
        let lines = line_reader(child.stdout.take().unwrap());
        InCgroup {
            pid: child.id(),
            child,
            stdin,
            lines,
        }
    }

    /// `swload sleep 20 10` started inside `cgroup`: 20 voluntary context switches, then it
    /// blocks until stdin closes. Returns once it has done its sleeps.
    pub fn start(cgroup: &Path) -> InCgroup {
        let mut cmd = command_in(cgroup, env!("CARGO_BIN_EXE_swload"));
        cmd.args(["sleep", "20", "10"]);
        let w = InCgroup::spawn(cmd);
        let line = w
            .next_line(Duration::from_secs(30))
            .unwrap_or_else(|| panic!("swload in {} never finished", cgroup.display()));
        assert!(line.starts_with("done"), "{line}");
        w
    }

    /// The next line the process prints, if one comes within `timeout`.
    pub fn next_line(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Writes one line to the process's stdin.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("write to the process");
        stdin.flush().unwrap();
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for InCgroup {
    fn drop(&mut self) {
        drop(self.stdin.take());
        // SAFETY: signalling the process group this process leads (process_group(0)).
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A stand-in for the API server: answers the pod list with the recorded PodList and each
/// watch with one recorded ADDED event (late-0), then holds the watch open. Records request
/// targets.
pub struct FakeApi {
    pub port: u16,
    requests: Arc<Mutex<Vec<String>>>,
}

impl FakeApi {
    pub fn start() -> FakeApi {
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

    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    /// A kubeconfig pointing at this server (plain HTTP, a bearer token like a real one).
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        kubeconfig_for(dir, self.port)
    }
}

/// Writes `dir/kubeconfig` for an API server on 127.0.0.1:`port`.
pub fn kubeconfig_for(dir: &Path, port: u16) -> PathBuf {
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
