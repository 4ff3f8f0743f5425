//! What the kernel knows about a loaded program that aya's `ProgramInfo` does not expose.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd};

use aya_obj::generated::bpf_prog_info;

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// `union bpf_attr`'s `info` member.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// Runs of the program the kernel skipped because a BPF program was already running on that
/// CPU (`bpf_prog_info.recursion_misses`, v5.12+): e.g. a socket timer in softirq interrupting
/// the same tracepoint program in process context. Counted whether or not run-time stats are
/// enabled. Kernels before v5.12 leave the field out and report 0.
pub fn recursion_misses(prog: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: bpf_prog_info is plain integers; all zeroes is a valid value.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr = InfoAttr {
        bpf_fd: prog.as_raw_fd() as u32,
        info_len: size_of::<bpf_prog_info>() as u32,
        info: &mut info as *mut bpf_prog_info as u64,
    };
    // SAFETY: attr points at an info buffer of info_len bytes that outlives the call; the
    // kernel writes at most info_len bytes.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &mut attr as *mut InfoAttr,
            size_of::<InfoAttr>() as u32,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.recursion_misses)
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
