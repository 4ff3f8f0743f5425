//! /proc/<pid>/cgroup bodies and cgroup paths (any process can name its cgroups, and
//! container runtimes choose the names): attribution and the /proc parsers never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stallwatch::attribution::{self, cgroup, NsRoot};
use stallwatch::procfs;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let owner = cgroup::parse(text);
    if let Some(id) = &owner.container_id {
        assert!(id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()));
    }
    let _ = cgroup::normalize(text);
    let _ = attribution::owner_of_path(text);
    for ns in [NsRoot::default(), NsRoot::new("/kubepods.slice/a/b")] {
        let (path, _) = attribution::from_proc_cgroup(text, &ns);
        assert!(path.starts_with('/'));
    }
    let _ = procfs::parse_cgroup_v2(text);
    let _ = procfs::parse_cgroup2_mount(text);
});
