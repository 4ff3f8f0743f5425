//! Attaching a loaded uprobe program at a file offset through the kernel's uprobe PMU.
//!
//! aya 0.14 cannot pass a USDT semaphore (`ref_ctr_offset`) to the kernel, so every runtime
//! probe is attached here the way libbpf does it: perf_event_open on the uprobe PMU (pid -1:
//! every process mapping the file), then PERF_EVENT_IOC_SET_BPF. The returned fd owns the
//! attachment; closing it detaches, and the kernel then decrements the semaphore again.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const PMU_DIR: &str = "/sys/bus/event_source/devices/uprobe";
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
// `libc::Ioctl`: c_ulong on glibc, c_int on musl.
const PERF_EVENT_IOC_ENABLE: libc::Ioctl = 0x2400;
const PERF_EVENT_IOC_SET_BPF: libc::Ioctl = 0x4004_2408u32 as libc::Ioctl;

/// `struct perf_event_attr` up to `config2` (PERF_ATTR_SIZE_VER1).
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    type_: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    /// `uprobe_path`: pointer to the NUL-terminated path.
    config1: u64,
    /// `probe_offset`: file offset of the instruction.
    config2: u64,
}

const _: () = assert!(std::mem::size_of::<PerfEventAttr>() == 72);

/// The uprobe PMU's type and the bit that makes a probe a return probe.
#[derive(Clone, Copy, Debug)]
pub struct Pmu {
    type_: u32,
    retprobe_bit: u32,
}

impl Pmu {
    pub fn from_sysfs() -> anyhow::Result<Pmu> {
        let read = |rel: &str| {
            std::fs::read_to_string(Path::new(PMU_DIR).join(rel)).map_err(|e| {
                anyhow::anyhow!(
                    "reading {PMU_DIR}/{rel}: {e} (kernel without CONFIG_UPROBE_EVENTS, or sysfs not mounted)"
                )
            })
        };
        let type_ = read("type")?.trim().parse()?;
        // "config:0"
        let retprobe_bit = read("format/retprobe")?
            .trim()
            .strip_prefix("config:")
            .and_then(|b| b.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("unexpected {PMU_DIR}/format/retprobe"))?;
        Ok(Pmu {
            type_,
            retprobe_bit,
        })
    }

    /// Attaches `prog` at `offset` in `path` for every process. `ref_ctr_offset` is the file
    /// offset of a USDT semaphore the kernel keeps incremented while attached (0: none).
    pub fn attach(
        &self,
        prog: BorrowedFd<'_>,
        path: &Path,
        offset: u64,
        retprobe: bool,
        ref_ctr_offset: u64,
    ) -> io::Result<OwnedFd> {
        let cpath = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))?;
        let mut config = ref_ctr_offset << 32;
        if retprobe {
            config |= 1 << self.retprobe_bit;
        }
        let attr = PerfEventAttr {
            type_: self.type_,
            size: std::mem::size_of::<PerfEventAttr>() as u32,
            config,
            sample_period: 1,
            wakeup_events: 1,
            config1: cpath.as_ptr() as u64,
            config2: offset,
            ..Default::default()
        };
        // SAFETY: `attr` and the path it points to outlive the call.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                &attr as *const PerfEventAttr,
                -1 as libc::pid_t,
                0 as libc::c_int,
                -1 as libc::c_int,
                PERF_FLAG_FD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: ioctls on the fd just opened, with an int argument.
        unsafe {
            if libc::ioctl(fd.as_raw_fd(), PERF_EVENT_IOC_SET_BPF, prog.as_raw_fd()) < 0
                || libc::ioctl(fd.as_raw_fd(), PERF_EVENT_IOC_ENABLE, 0) < 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(fd)
    }
}
