//! stallwatch's kernel programs. One module per probe; shared maps and helpers in `shared`.
#![no_std]
#![no_main]
// The atomic-add intrinsic (see shared::atomic_add); the eBPF crate is built with nightly.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod gc;
mod lifecycle;
mod local_storage;
mod sched;
mod shared;
mod syscall;
mod tcp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects any path that could get here.
    loop {}
}

/// bpf_probe_read_kernel and the tracing helpers are GPL-only.
#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
