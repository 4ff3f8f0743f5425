//! /proc files of other processes, whose contents those processes shape (a mapped file's
//! path, a comm, a mount point): the maps, status and mountinfo parsers never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stallwatch::{check, procfs, runtime};

fuzz_target!(|data: &[u8]| {
    let _ = procfs::comm_from_bytes(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for (range, inode, path) in runtime::mappings(text) {
        assert!(path.starts_with('/') && inode != "0");
        assert!(!range.contains(' '));
    }
    let _ = check::parse_cap(text, "CapEff:");
    let _ = check::parse_cap_eff(text);
    let _ = procfs::parse_cgroup2_mount(text);
});
