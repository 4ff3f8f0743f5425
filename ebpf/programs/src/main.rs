//! stallwatch's kernel programs. One module per probe; shared maps and helpers in `shared`.
#![no_std]
#![no_main]

mod sched;
mod shared;
mod task_storage;

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
