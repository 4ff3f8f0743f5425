//! Readers for /proc and cgroupfs. Processes vanish mid-read: every reader returns an error
//! or `None` rather than panicking, and parsers are pure functions tested on fixtures.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::aggregate::Identity;

/// The cgroup v2 path from a /proc/<pid>/cgroup body ("0::/path" line), if there is one.
pub fn parse_cgroup_v2(body: &str) -> Option<&str> {
    body.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::trim_end)
}

/// A comm as the kernel stores it (NUL padded) to a label value.
pub fn comm_from_bytes(raw: &[u8]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// The process's comm, cgroup v2 path (host-absolute) and owner, or `None` if it has exited.
pub fn identity(proc_root: &Path, tgid: u32) -> Option<Identity> {
    let dir = proc_root.join(tgid.to_string());
    let comm = std::fs::read(dir.join("comm")).ok()?;
    let body = std::fs::read_to_string(dir.join("cgroup")).ok()?;
    let comm = comm_from_bytes(comm.strip_suffix(b"\n").unwrap_or(&comm));
    let (cgroup, owner) =
        crate::attribution::from_proc_cgroup(&body, &crate::attribution::host().ns);
    Some(Identity {
        comm,
        cgroup,
        owner,
    })
}

pub fn exists(proc_root: &Path, tgid: u32) -> bool {
    proc_root.join(tgid.to_string()).exists()
}

/// Where the cgroup v2 hierarchy is mounted, from a /proc/self/mountinfo body: /sys/fs/cgroup
/// on unified hosts, /sys/fs/cgroup/unified on hybrid ones.
pub fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        // "... mount_point ... - cgroup2 cgroup2 rw"
        let (pre, post) = l.split_once(" - ")?;
        if !post.starts_with("cgroup2 ") {
            return None;
        }
        pre.split(' ').nth(4).map(PathBuf::from)
    })
}

/// Maps cgroup ids (the inode numbers of cgroup v2 directories, what
/// `bpf_get_current_cgroup_id` returns) to paths. Rebuilt by walking the hierarchy on a miss,
/// at most once per `min_rescan` so a flood of unknown ids cannot turn into a flood of walks.
pub struct CgroupResolver {
    root: Option<PathBuf>,
    by_id: HashMap<u64, String>,
    last_scan: Option<std::time::Instant>,
    min_rescan: std::time::Duration,
}

/// Depth and size bounds for the walk: cgroup trees are shallow; a pathological one must not
/// make the agent unbounded.
const MAX_DEPTH: usize = 16;
const MAX_CGROUPS: usize = 100_000;

impl CgroupResolver {
    pub fn new(root: Option<PathBuf>) -> Self {
        CgroupResolver {
            root,
            by_id: HashMap::new(),
            last_scan: None,
            min_rescan: std::time::Duration::from_secs(1),
        }
    }

    /// Where the cgroup v2 hierarchy is mounted, if it is.
    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    /// The host's hierarchy: `--cgroup-root`, else where /proc/self/mountinfo says.
    pub fn from_system() -> Self {
        Self::new(crate::attribution::host().cgroup_root.clone())
    }

    pub fn resolve(&mut self, id: u64) -> Option<String> {
        if let Some(p) = self.by_id.get(&id) {
            return Some(p.clone());
        }
        let due = self
            .last_scan
            .is_none_or(|t| t.elapsed() >= self.min_rescan);
        if due {
            self.rescan();
        }
        self.by_id.get(&id).cloned()
    }

    fn rescan(&mut self) {
        self.last_scan = Some(std::time::Instant::now());
        let Some(root) = self.root.clone() else {
            return;
        };
        self.by_id.clear();
        let mut stack = vec![(root.clone(), 0usize)];
        while let Some((dir, depth)) = stack.pop() {
            if self.by_id.len() >= MAX_CGROUPS {
                log::warn!("cgroup hierarchy larger than {MAX_CGROUPS} groups; stopped walking it");
                break;
            }
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            let rel = dir.strip_prefix(&root).unwrap_or(Path::new(""));
            self.by_id
                .insert(meta.ino(), format!("/{}", rel.to_string_lossy()));
            if depth >= MAX_DEPTH {
                continue;
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push((e.path(), depth + 1));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_v2_line_is_found_on_hybrid_and_unified_hosts() {
        let hybrid = "9:name=systemd:/\n4:memory:/x\n0::/system.slice/foo.service\n";
        assert_eq!(parse_cgroup_v2(hybrid), Some("/system.slice/foo.service"));
        assert_eq!(parse_cgroup_v2("0::/\n"), Some("/"));
        assert_eq!(parse_cgroup_v2("4:memory:/x\n"), None);
        assert_eq!(parse_cgroup_v2(""), None);
    }

    #[test]
    fn cgroup2_mount_point() {
        let mi =
            "35 25 0:30 / /sys/fs/cgroup/memory rw,relatime shared:14 - cgroup cgroup rw,memory\n\
                  36 25 0:31 / /sys/fs/cgroup/unified rw,relatime shared:15 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(mi),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(parse_cgroup2_mount("garbage\n - \n"), None);
    }

    #[test]
    fn comm_bytes() {
        assert_eq!(comm_from_bytes(b"sleep\0\0\0"), "sleep");
        assert_eq!(comm_from_bytes(b"abc"), "abc");
    }

    #[test]
    fn identity_of_self_and_of_a_missing_process() {
        let me = identity(Path::new("/proc"), std::process::id()).expect("own /proc entry");
        assert!(!me.comm.is_empty());
        assert!(me.cgroup.starts_with('/'));
        assert_eq!(identity(Path::new("/proc"), u32::MAX), None);
    }

    #[test]
    fn resolver_maps_a_directory_inode_to_its_path() {
        let dir = std::env::temp_dir().join(format!("sw-cg-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        let ino = std::fs::metadata(dir.join("a/b")).unwrap().ino();
        let mut r = CgroupResolver::new(Some(dir.clone()));
        assert_eq!(r.resolve(ino).as_deref(), Some("/a/b"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
