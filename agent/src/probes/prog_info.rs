//! What the kernel knows about a loaded program that aya's `ProgramInfo` does not expose.

use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::{AsRawFd, BorrowedFd};

use aya_obj::generated::bpf_prog_info;

use super::bpf_sys::{bpf_cmd, sys_bpf, zeroed_attr};

/// Runs of the program the kernel skipped instead of nesting them: a tracepoint program
/// (tp_btf, raw tracepoint) whose own run this CPU is already inside, e.g. a TCP timer in
/// softirq interrupting the same program in process context; a kprobe or uprobe program
/// while any such program runs on the CPU. `bpf_prog_info.recursion_misses` (v5.12+; program
/// types gained the count in later kernels). `None` if this kernel's `bpf_prog_info` has no
/// such field: it does not count them, so there is nothing to report.
pub fn recursion_misses(prog: BorrowedFd<'_>) -> io::Result<Option<u64>> {
    // SAFETY: bpf_prog_info is plain integers; all zeroes is a valid value.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr = zeroed_attr();
    attr.info.bpf_fd = prog.as_raw_fd() as u32;
    attr.info.info_len = size_of::<bpf_prog_info>() as u32;
    attr.info.info = &mut info as *mut bpf_prog_info as u64;
    // SAFETY: attr.info points at an info buffer of info_len bytes that outlives the call;
    // the kernel writes at most info_len bytes there.
    unsafe { sys_bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)? };
    // The kernel writes back how much of the struct it knows.
    // SAFETY: the `info` member is the one set above and filled by the kernel.
    let known = unsafe { attr.info.info_len } as usize;
    let end = offset_of!(bpf_prog_info, recursion_misses) + size_of::<u64>();
    Ok((known >= end).then_some(info.recursion_misses))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_non_bpf_fd_is_an_error_not_a_zero() {
        let f = std::fs::File::open("/proc/self/stat").unwrap();
        assert!(recursion_misses(f.as_fd()).is_err());
    }
}
