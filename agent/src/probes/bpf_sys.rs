//! The bpf(2) commands aya does not wrap, through the kernel's own `union bpf_attr` (aya-obj's
//! generated bindings), never a hand-made copy of it.

use std::io;
use std::mem::size_of;

pub use aya_obj::generated::{bpf_attr, bpf_cmd};

/// An all-zero `bpf_attr`: what the kernel expects in every member a command does not use.
pub fn zeroed_attr() -> bpf_attr {
    // SAFETY: bpf_attr is a union of plain-integer structs; all zeroes is a valid value.
    unsafe { std::mem::zeroed() }
}

/// bpf(`cmd`, `attr`). The kernel may write results back into `attr`.
///
/// # Safety
/// Every pointer the command's member of `attr` holds must point at memory that is valid
/// for what the kernel writes there (its size given in the same member).
pub unsafe fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<()> {
    // SAFETY: attr is a whole bpf_attr of the size passed; the caller vouches for the
    // pointers inside it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut bpf_attr,
            size_of::<bpf_attr>() as u32,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
