//! Syscall probe ABI: per-thread timing state, per-process aggregates keyed by a slot (the
//! syscall's class, or its number with `--syscall-names`), errors by errno, slow-call events.

use crate::TASK_COMM_LEN;

/// Syscall numbers below this are looked up in the class table; the rest (and negative ones,
/// e.g. -1 for a call skipped by seccomp or ptrace) go to [`SLOT_UNKNOWN`].
pub const SYSCALL_TABLE_SIZE: u32 = 1024;
/// Slot of a syscall number outside the table.
pub const SLOT_UNKNOWN: u32 = 0xffff;

/// `SC_FILTER` bits: which in-kernel scopes are active. With none, every process is timed;
/// with several, a process in any of them is.
pub const FILTER_PIDS: u32 = 1;
pub const FILTER_CGROUPS: u32 = 2;
/// Deepest cgroup v2 level (root is 0) a scope may name; `SC_CG_LEVELS` is a bit mask of
/// the levels in use.
pub const MAX_CGROUP_LEVEL: u32 = 15;

/// Per-thread timing state, in task-local storage.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyscallThread {
    /// `bpf_ktime_get_ns` at sys_enter; 0 when no syscall is being timed.
    pub start_ns: u64,
    /// Syscall number from sys_enter (sys_exit does not carry it).
    pub nr: i32,
    /// The thread's tgid, saved at entry so the exit path needs no helper call for it.
    pub tgid: u32,
}

const _: () = assert!(core::mem::size_of::<SyscallThread>() == 16);

/// Key of the per-process latency histograms (`SW_SC_STATS`, value [`crate::Hist`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SyscallKey {
    pub tgid: u32,
    /// Class index (from the class table) or syscall number, or [`SLOT_UNKNOWN`].
    pub slot: u32,
}

const _: () = assert!(core::mem::size_of::<SyscallKey>() == 8);

/// Key of the per-process error counters (`SW_SC_ERRORS`, value `u64`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SyscallErrKey {
    pub tgid: u32,
    pub slot: u16,
    /// Positive errno (1..=4095), including kernel-internal ones such as ERESTARTSYS.
    pub errno: u16,
}

const _: () = assert!(core::mem::size_of::<SyscallErrKey>() == 8);

/// A syscall that took at least `SC_SLOW_NS`, streamed through `SW_SC_SLOW`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlowSyscall {
    pub tgid: u32,
    pub tid: u32,
    pub nr: i32,
    pub _pad: u32,
    /// Return value: negative errno on failure.
    pub ret: i64,
    pub duration_ns: u64,
    pub cgroup_id: u64,
    pub comm: [u8; TASK_COMM_LEN],
}

const _: () = assert!(core::mem::size_of::<SlowSyscall>() == 56);

/// The errno of a raw syscall return value, if it is an error (-4095..=-1).
#[inline(always)]
pub fn errno_of(ret: i64) -> Option<u16> {
    if (-4095..0).contains(&ret) {
        Some((-ret) as u16)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_range() {
        assert_eq!(errno_of(0), None);
        assert_eq!(errno_of(5), None);
        assert_eq!(errno_of(-2), Some(2));
        assert_eq!(errno_of(-4095), Some(4095));
        assert_eq!(errno_of(-4096), None);
        assert_eq!(errno_of(i64::MIN), None);
    }
}
