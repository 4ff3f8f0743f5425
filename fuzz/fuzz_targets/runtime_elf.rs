//! Executables and libraries of any process on the node (a container image can ship any
//! bytes): runtime discovery reads their ELF headers, Go build info and pclntab, USDT notes
//! and machine code, and must answer with a Failure, never a panic.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use object::read::elf::ElfFile64;
use object::Architecture;
use stallwatch::runtime::{self, elf, go, gopclntab, usdt, FileKey};
use stallwatch_common::gc::Runtime;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = ElfFile64::<object::Endianness>::parse(data) {
        let _ = go::version(&file);
        let _ = go::plan(&file);
        let _ = usdt::probes(&file);
        let _ = gopclntab::find_funcs(
            &file,
            &["runtime.stopTheWorldWithSema", "runtime.startTheWorldWithSema"],
        );
    }
    for arch in [Architecture::X86_64, Architecture::Aarch64] {
        let _ = elf::returns(arch, data, 0x401000);
    }
    // The path the agent takes: an open file, classified, then analysed as each runtime.
    let mut f = tempfile();
    f.write_all(data).unwrap();
    let _ = runtime::classify(&f, "python3.11");
    for rt in [Runtime::Go, Runtime::Jvm, Runtime::Python, Runtime::Node] {
        let _ = runtime::analyse(&f, FileKey { dev: 0, ino: 0 }, rt);
    }
});

/// An anonymous in-memory file.
fn tempfile() -> std::fs::File {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create returns a new fd we own (or -1).
    let fd = unsafe { libc_memfd() };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: fd is a fresh, owned descriptor.
    unsafe { std::fs::File::from_raw_fd(fd) }
}

unsafe fn libc_memfd() -> i32 {
    extern "C" {
        fn memfd_create(name: *const std::os::raw::c_char, flags: u32) -> i32;
    }
    memfd_create(c"fuzz".as_ptr(), 1 /* MFD_CLOEXEC */)
}
