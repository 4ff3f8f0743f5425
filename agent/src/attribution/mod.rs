//! Who a process belongs to: its cgroup path says which container of which pod (by id and
//! uid), or which systemd unit; the Kubernetes API (when there is one) names the pod, its
//! namespace and the container. Paths read in a private cgroup namespace (the agent in a
//! pod) are made host-absolute first, so the same cgroup has one label wherever it was read.

pub mod cgroup;
pub mod kube;

use std::path::Path;

use crate::aggregate::Owner;

/// Where this host's cgroup facts come from; set once at start (`init`), read everywhere.
#[derive(Debug, Clone)]
pub struct Host {
    /// Mount point of the host's cgroup v2 hierarchy, if there is one.
    pub cgroup_root: Option<std::path::PathBuf>,
    pub ns: NsRoot,
}

static HOST: std::sync::OnceLock<Host> = std::sync::OnceLock::new();

/// Settles the cgroup root (`--cgroup-root`, else the mount in /proc/self/mountinfo) and the
/// namespace root. Later calls keep the first answer.
pub fn init(cgroup_root: Option<&Path>) -> anyhow::Result<&'static Host> {
    if let Some(h) = HOST.get() {
        return Ok(h);
    }
    let cgroup_root = cgroup_root.map(Path::to_path_buf).or_else(mounted_cgroup2);
    let ns = NsRoot::detect(Path::new("/proc"), cgroup_root.as_deref())?;
    if ns != NsRoot::default() {
        log::info!("in a private cgroup namespace rooted at {}", ns.as_str());
    }
    Ok(HOST.get_or_init(|| Host { cgroup_root, ns }))
}

/// The settled host facts; before `init`, what the system says (outside a namespace).
pub fn host() -> &'static Host {
    if let Some(h) = HOST.get() {
        return h;
    }
    static FALLBACK: std::sync::OnceLock<Host> = std::sync::OnceLock::new();
    FALLBACK.get_or_init(|| Host {
        cgroup_root: mounted_cgroup2(),
        ns: NsRoot::default(),
    })
}

/// Where /proc/self/mountinfo says the cgroup v2 hierarchy is mounted.
fn mounted_cgroup2() -> Option<std::path::PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|m| crate::procfs::parse_cgroup2_mount(&m))
}

/// The agent's cgroup namespace root as a host path ("/" outside a private namespace).
/// Paths in /proc/<pid>/cgroup are relative to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NsRoot(String);

impl Default for NsRoot {
    fn default() -> Self {
        NsRoot("/".into())
    }
}

impl NsRoot {
    pub fn new(path: &str) -> Self {
        NsRoot(join("/", path))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The host path of a path read from /proc/<pid>/cgroup by this process.
    pub fn absolute(&self, relative: &str) -> String {
        join(&self.0, relative)
    }

    /// Finds the namespace root: outside a private namespace (/proc/1/cgroup, the host's init,
    /// reads as a plain path) it is "/". Inside one, it is the directory of the host hierarchy
    /// (`cgroup_root`) whose cgroup.procs lists this process, minus where /proc/self/cgroup
    /// says the process sits below the namespace root.
    pub fn detect(proc_root: &Path, cgroup_root: Option<&Path>) -> anyhow::Result<NsRoot> {
        let init = std::fs::read_to_string(proc_root.join("1/cgroup")).unwrap_or_default();
        let private = crate::procfs::parse_cgroup_v2(&init).is_some_and(|p| p.starts_with("/.."));
        if !private {
            return Ok(NsRoot::default());
        }
        let Some(root) = cgroup_root else {
            anyhow::bail!(
                "this process is in a private cgroup namespace and no host cgroup v2 hierarchy is \
                 mounted; mount the host's /sys/fs/cgroup read-only and pass --cgroup-root"
            );
        };
        let me = std::process::id().to_string();
        let own = std::fs::read_to_string(proc_root.join("self/cgroup")).unwrap_or_default();
        let below = crate::procfs::parse_cgroup_v2(&own)
            .unwrap_or("/")
            .to_string();
        if below.starts_with("/..") {
            anyhow::bail!(
                "this process sits outside its own cgroup namespace ({below}); cannot tell its \
                 host cgroup path"
            );
        }
        let mut stack = vec![root.to_path_buf()];
        let mut seen = 0usize;
        while let Some(dir) = stack.pop() {
            seen += 1;
            if seen > 100_000 {
                break;
            }
            let listed = std::fs::read_to_string(dir.join("cgroup.procs"))
                .is_ok_and(|procs| procs.lines().any(|l| l == me));
            if listed {
                let rel = dir.strip_prefix(root).unwrap_or(Path::new(""));
                if rel.as_os_str().is_empty() {
                    // The hierarchy's root holds us: it is our own namespace's view (the
                    // container's /sys/fs/cgroup), not the host's.
                    anyhow::bail!(
                        "{} shows this container's own cgroup, not the host's hierarchy: mount \
                         the host's /sys/fs/cgroup read-only and pass --cgroup-root (the \
                         DaemonSet mounts it at /host/sys/fs/cgroup)",
                        root.display()
                    );
                }
                let host = join("/", &rel.to_string_lossy());
                let ns = host
                    .strip_suffix(below.trim_end_matches('/'))
                    .filter(|_| below != "/")
                    .unwrap_or(&host);
                return Ok(NsRoot::new(ns));
            }
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(e.path());
                    }
                }
            }
        }
        anyhow::bail!(
            "this process is in a private cgroup namespace and is not listed in any cgroup.procs \
             under --cgroup-root {}: is that the host's cgroup v2 hierarchy?",
            root.display()
        )
    }
}

/// `base` joined with `rel`, with `.` and `..` resolved (never above "/") and no trailing "/".
fn join(base: &str, rel: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in base.split('/').chain(rel.split('/')) {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

/// The cgroup v2 path (host-absolute) and owner of a process from its /proc/<pid>/cgroup.
/// The v2 line decides; on a hybrid host whose container runtime uses the v1 hierarchies
/// (cgroupfs driver), the container is found in a v1 line instead, and a host service's unit
/// in the name=systemd line.
pub fn from_proc_cgroup(body: &str, ns: &NsRoot) -> (String, Owner) {
    let v2 = crate::procfs::parse_cgroup_v2(body).map(|p| ns.absolute(p));
    let mut owner = v2.as_deref().map(owner_of_path).unwrap_or_default();
    if owner.pod_uid.is_empty() && owner.container_id.is_empty() {
        let v1 = body.lines().filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            (!controllers.is_empty()).then(|| (controllers, ns.absolute(path)))
        });
        let mut unit = String::new();
        for (controllers, path) in v1 {
            let o = owner_of_path(&path);
            if !o.pod_uid.is_empty() || !o.container_id.is_empty() {
                owner = o;
                unit.clear();
                break;
            }
            if controllers == "name=systemd" && owner.unit.is_empty() {
                unit = o.unit;
            }
        }
        if owner.unit.is_empty() {
            owner.unit = unit;
        }
    }
    (v2.unwrap_or_else(|| "/".into()), owner)
}

/// The owner a cgroup v2 path names.
pub fn owner_of_path(path: &str) -> Owner {
    let o = cgroup::parse(path);
    Owner {
        pod_uid: o.pod_uid.unwrap_or_default(),
        container_id: o.container_id.unwrap_or_default(),
        unit: o.unit.unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b4a7b3e-5d2f-4c4e-9a53-5b1f2c3d4e5f";
    const CID: &str = "3f4b8d7a9c2e1f0a5b6c7d8e9f0a1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2";

    #[test]
    fn join_resolves_dots_and_stays_under_root() {
        assert_eq!(join("/", "/"), "/");
        assert_eq!(join("/a/b/c", "/../../x/y"), "/a/x/y");
        assert_eq!(join("/a", "/../../../x"), "/x");
        assert_eq!(join("/a/b", "/"), "/a/b");
        assert_eq!(join("/a/b", "/c/"), "/a/b/c");
    }

    #[test]
    fn paths_read_in_a_private_namespace_become_host_paths() {
        // The agent's own container is the namespace root; a sibling pod reads as ../../..
        let ns = NsRoot::new("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podabc.slice/cri-containerd-1.scope");
        let body = format!(
            "0::/../../../kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CID}.scope\n",
            UID.replace('-', "_")
        );
        let (path, owner) = from_proc_cgroup(&body, &ns);
        assert_eq!(
            path,
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CID}.scope",
                UID.replace('-', "_")
            )
        );
        assert_eq!(owner.pod_uid, UID);
        assert_eq!(owner.container_id, CID);
        let (path, owner) = from_proc_cgroup("0::/../../../../system.slice/ssh.service\n", &ns);
        assert_eq!(path, "/system.slice/ssh.service");
        assert_eq!(owner.unit, "ssh.service");
    }

    #[test]
    fn hybrid_hosts_find_the_container_in_a_v1_hierarchy() {
        let body = format!(
            "12:name=systemd:/system.slice/containerd.service\n\
             4:memory:/kubepods/burstable/pod{UID}/{CID}\n\
             0::/system.slice/containerd.service\n"
        );
        let (path, owner) = from_proc_cgroup(&body, &NsRoot::default());
        assert_eq!(path, "/system.slice/containerd.service");
        assert_eq!(owner.pod_uid, UID);
        assert_eq!(owner.container_id, CID);
        assert_eq!(owner.unit, "");
        // A host service on a hybrid host: the unit, from v2 or name=systemd.
        let (_, owner) = from_proc_cgroup(
            "12:name=systemd:/system.slice/cron.service\n4:memory:/\n0::/\n",
            &NsRoot::default(),
        );
        assert_eq!(owner.unit, "cron.service");
        let (path, owner) = from_proc_cgroup("", &NsRoot::default());
        assert_eq!((path.as_str(), owner), ("/", Owner::default()));
    }

    #[test]
    fn namespace_root_outside_a_private_namespace_is_slash() {
        let dir = std::env::temp_dir().join(format!("sw-ns-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("1")).unwrap();
        std::fs::write(dir.join("1/cgroup"), "0::/init.scope\n").unwrap();
        assert_eq!(NsRoot::detect(&dir, None).unwrap(), NsRoot::default());
        std::fs::write(dir.join("1/cgroup"), "0::/../../init.scope\n").unwrap();
        let e = NsRoot::detect(&dir, None).unwrap_err();
        assert!(e.to_string().contains("--cgroup-root"), "{e}");
        // A hierarchy whose root lists us is our own container's view, not the host's.
        std::fs::create_dir_all(dir.join("self")).unwrap();
        std::fs::write(dir.join("self/cgroup"), "0::/\n").unwrap();
        let cg = dir.join("cg");
        std::fs::create_dir_all(cg.join("pod/ctr")).unwrap();
        std::fs::write(cg.join("cgroup.procs"), format!("{}\n", std::process::id())).unwrap();
        let e = NsRoot::detect(&dir, Some(&cg)).unwrap_err();
        assert!(e.to_string().contains("not the host's hierarchy"), "{e}");
        // The host's hierarchy: we are listed in pod/ctr, which is our namespace root.
        std::fs::write(cg.join("cgroup.procs"), "1\n").unwrap();
        std::fs::write(
            cg.join("pod/ctr/cgroup.procs"),
            format!("{}\n", std::process::id()),
        )
        .unwrap();
        assert_eq!(
            NsRoot::detect(&dir, Some(&cg)).unwrap(),
            NsRoot::new("/pod/ctr")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
