//! The ABI between stallwatch's kernel programs and its agent.
//!
//! Every struct that crosses the kernel/user boundary is defined here once, `#[repr(C)]` with
//! explicit padding and a compile-time size check, so both sides agree byte for byte.
//! Map and program names live here too: the agent looks them up by these constants and a
//! root-free test checks the embedded object against them.
#![no_std]

pub mod gc;
pub mod hist;
pub mod names;
pub mod sched;
pub mod syscall;
pub mod tcp;

pub use hist::{bucket_index, Hist, NUM_BUCKETS};

/// Indexes into the per-CPU `SW_COUNTERS` array: drops and map bookkeeping that the kernel
/// programs count so that nothing is lost silently.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A thread's scheduler entry could not be allocated (the kernel's BPF allocator cache was
    /// empty): its switches are not counted until one is.
    ThreadAllocFailed = 0,
    /// A thread could not be tracked: `SW_THREADS` was full (`--max-threads`).
    ThreadMapFull = 1,
    /// A process exit/exec event was lost: the ring buffer was full.
    EventRingFull = 2,
    /// A switch of a thread whose tid is still held by an ended thread's entry that the agent
    /// has not folded yet (`SW_DEAD_THREADS` was full when it ended): not counted.
    ThreadSlotBusy = 3,
    /// `bpf_probe_read_kernel` of a kernel field failed (a task's `signal`, a socket's fields):
    /// a wrong BTF offset or a racing free. Reported by the lifecycle as `kernel_read_failed`.
    TaskReadFailed = 4,
    /// A thread's syscall timing state could not be created.
    SyscallThreadFailed = 5,
    /// A (process, slot) latency or error entry could not be added: map full.
    SyscallMapFull = 6,
    /// A (process, slot) entry could not be allocated.
    SyscallAllocFailed = 7,
    /// A slow-syscall event was lost: its ring buffer was full.
    SlowRingFull = 8,
    /// A socket's state could not be created in socket-local storage.
    SockStateFailed = 9,
    /// A process could not be tracked by the TCP probe: its per-process map was full.
    TcpProcMapFull = 10,
    /// A TCP per-process entry could not be allocated.
    TcpProcAllocFailed = 11,
    /// A retransmit, reset or connect outcome on a socket without state (opened before the
    /// agent started, or whose state could not be created): not attributed to a process.
    TcpUntracked = 12,
    /// Socket states created / deleted; the difference is the socket map's size.
    SockInserted = 13,
    SockDeleted = 14,
    /// A runtime pause's begin could not be stored in the in-flight map.
    GcInflightFailed = 15,
    /// A pause in a process the agent has not registered (discovery still running, or its
    /// entry could not be added): not attributed.
    GcUntracked = 16,
    /// A pause end without its begin: the agent attached mid-pause, or the begin's state was
    /// evicted from the (LRU) in-flight map.
    GcUnmatched = 17,
    /// An off-CPU interval whose end the kernel did not stamp (a task preempted after setting
    /// a sleeping state) and whose run time could not date it either, or a switch on a kernel
    /// that keeps no `sched_info` at all: not observed.
    OffCpuUnmeasured = 18,
}

pub const NUM_COUNTERS: u32 = 19;

impl Counter {
    pub const ALL: [Counter; NUM_COUNTERS as usize] = [
        Counter::ThreadAllocFailed,
        Counter::ThreadMapFull,
        Counter::EventRingFull,
        Counter::ThreadSlotBusy,
        Counter::TaskReadFailed,
        Counter::SyscallThreadFailed,
        Counter::SyscallMapFull,
        Counter::SyscallAllocFailed,
        Counter::SlowRingFull,
        Counter::SockStateFailed,
        Counter::TcpProcMapFull,
        Counter::TcpProcAllocFailed,
        Counter::TcpUntracked,
        Counter::SockInserted,
        Counter::SockDeleted,
        Counter::GcInflightFailed,
        Counter::GcUntracked,
        Counter::GcUnmatched,
        Counter::OffCpuUnmeasured,
    ];
}

/// Kind of a [`ProcEvent`].
pub const EVENT_EXIT: u32 = 1;
pub const EVENT_EXEC: u32 = 2;

pub const TASK_COMM_LEN: usize = 16;

/// A process lifecycle event, streamed through the `SW_EVENTS` ring buffer.
///
/// `EVENT_EXIT` is sent once per process, when its last thread exits (`group_dead`, or
/// `signal->live` at 0 on older kernels);
/// `EVENT_EXEC` when a process replaces its image (its comm changes).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcEvent {
    pub kind: u32,
    pub tgid: u32,
    /// cgroup v2 id (the cgroup directory's inode number) of the process at the event.
    pub cgroup_id: u64,
    pub comm: [u8; TASK_COMM_LEN],
}

const _: () = assert!(core::mem::size_of::<ProcEvent>() == 32);

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, repr(C), no implicit padding (checked by the size asserts).
    unsafe impl aya::Pod for super::ProcEvent {}
    unsafe impl aya::Pod for super::gc::GcStats {}
    unsafe impl aya::Pod for super::gc::Inflight {}
    unsafe impl aya::Pod for super::sched::SchedStats {}
    unsafe impl aya::Pod for super::sched::ThreadSched {}
    unsafe impl aya::Pod for super::sched::DeadThreadKey {}
    unsafe impl aya::Pod for super::syscall::SyscallKey {}
    unsafe impl aya::Pod for super::syscall::SyscallErrKey {}
    unsafe impl aya::Pod for super::syscall::SlowSyscall {}
    unsafe impl aya::Pod for super::hist::Hist {}
    unsafe impl aya::Pod for super::tcp::TcpStats {}
}
