//! Syscall probe: per-process latency histograms by class (or by syscall), errors by errno,
//! and a stream of slow calls.
//!
//! Every syscall on the node runs these hooks, so the cost of an unselected process is kept
//! to the scope check at entry and one task-storage lookup at exit. The per-CPU aggregates are
//! written from process context, where the program can be preempted on this PREEMPT kernel
//! class, so increments are atomic (uncontended: the slot is this CPU's).

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm,
        bpf_get_current_pid_tgid, bpf_get_current_task_btf, bpf_ktime_get_ns,
    },
    macros::{btf_map, btf_tracepoint, map},
    maps::{Array, HashMap, PerCpuHashMap, RingBuf},
    programs::BtfTracePointContext,
};
use stallwatch_common::{
    hist::Hist,
    syscall::{
        errno_of, SlowSyscall, SyscallErrKey, SyscallKey, SyscallThread, FILTER_CGROUPS,
        FILTER_PIDS, MAX_CGROUP_LEVEL, SLOT_UNKNOWN, SYSCALL_TABLE_SIZE,
    },
    Counter, TASK_COMM_LEN,
};

use crate::local_storage::TaskStorage;
use crate::shared::{atomic_add, count, get_or_insert, observe_atomic, task_tgid};

#[no_mangle]
static SC_FILTER: u32 = 0;
#[no_mangle]
static SC_CG_LEVELS: u32 = 0;
#[no_mangle]
static SC_BY_NR: u32 = 0;
#[no_mangle]
static SC_SLOW_NS: u64 = 100_000_000;
/// The agent's own tgid: its map reads are syscalls too, and timing them would only
/// measure (and tax) the observer.
#[no_mangle]
static SC_SELF_TGID: u32 = 0;

#[btf_map]
static SW_SC_THREADS: TaskStorage<SyscallThread> = TaskStorage::new();

/// Syscall number -> class index, filled by the agent from the architecture's table.
#[map]
static SW_SC_CLASSES: Array<u32> = Array::with_max_entries(SYSCALL_TABLE_SIZE, 0);

/// Sized by the agent (`--syscall-max-entries`); per-CPU values, allocated on first use.
#[map]
static SW_SC_STATS: PerCpuHashMap<SyscallKey, Hist> =
    PerCpuHashMap::with_max_entries(65536, BPF_F_NO_PREALLOC);

#[map]
static SW_SC_ERRORS: PerCpuHashMap<SyscallErrKey, u64> =
    PerCpuHashMap::with_max_entries(65536, BPF_F_NO_PREALLOC);

/// Sized by the agent (`--event-buffer`).
#[map]
static SW_SC_SLOW: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

#[map]
static SW_SC_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(4096, 0);

#[map]
static SW_SC_CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(256, 0);

static ZERO_HIST: Hist = Hist::ZERO;

#[inline(always)]
fn global_u32(g: &'static u32) -> u32 {
    unsafe { core::ptr::read_volatile(g) }
}

/// Whether the current process is in scope. With the globals frozen in .rodata, the verifier
/// drops the branches of scopes that are not configured.
#[inline(always)]
fn selected(tgid: u32) -> bool {
    let filter = global_u32(&SC_FILTER);
    if filter == 0 {
        return true;
    }
    if filter & FILTER_PIDS != 0 && unsafe { SW_SC_PIDS.get(&tgid) }.is_some() {
        return true;
    }
    if filter & FILTER_CGROUPS != 0 {
        let levels = global_u32(&SC_CG_LEVELS);
        let mut level = 0;
        while level <= MAX_CGROUP_LEVEL {
            if levels & (1 << level) != 0 {
                let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
                if id != 0 && unsafe { SW_SC_CGROUPS.get(&id) }.is_some() {
                    return true;
                }
            }
            level += 1;
        }
    }
    false
}

#[btf_tracepoint(function = "sys_enter")]
pub fn sw_sys_enter(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(struct pt_regs *regs, long id)
    let id: i64 = ctx.arg(1);
    // The tgid by a direct load through the task: a helper call (bpf_get_current_pid_tgid)
    // costs more here than everything else the scope check does.
    let task = unsafe { bpf_get_current_task_btf() } as *const u8;
    let tgid = task_tgid(task);
    if tgid == global_u32(&SC_SELF_TGID) || !selected(tgid) {
        return 0;
    }
    let Some(t) = SW_SC_THREADS.get_or_create(task) else {
        count(Counter::SyscallThreadFailed);
        return 0;
    };
    unsafe {
        (*t).nr = id as i32;
        (*t).tgid = tgid;
        (*t).start_ns = bpf_ktime_get_ns();
    }
    0
}

#[inline(always)]
fn slot_of(nr: i32) -> u32 {
    if nr < 0 || nr as u32 >= SYSCALL_TABLE_SIZE {
        return SLOT_UNKNOWN;
    }
    if global_u32(&SC_BY_NR) != 0 {
        return nr as u32;
    }
    match SW_SC_CLASSES.get(nr as u32) {
        Some(class) => *class,
        None => SLOT_UNKNOWN,
    }
}

#[inline(always)]
fn hist_for(key: &SyscallKey) -> Option<*mut Hist> {
    get_or_insert(
        &SW_SC_STATS,
        key,
        &ZERO_HIST,
        Counter::SyscallMapFull,
        Counter::SyscallAllocFailed,
    )
}

#[inline(always)]
fn count_error(key: &SyscallErrKey) {
    // Inserted as 0 and incremented like an existing entry, so no path is special.
    if let Some(p) = get_or_insert(
        &SW_SC_ERRORS,
        key,
        &0,
        Counter::SyscallMapFull,
        Counter::SyscallAllocFailed,
    ) {
        atomic_add(p, 1);
    }
}

#[btf_tracepoint(function = "sys_exit")]
pub fn sw_sys_exit(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(struct pt_regs *regs, long ret)
    let task = unsafe { bpf_get_current_task_btf() } as *const u8;
    // No state: the thread is out of scope (or its first syscall began before we attached).
    let Some(t) = SW_SC_THREADS.get(task) else {
        return 0;
    };
    let (start, nr, tgid) = unsafe { ((*t).start_ns, (*t).nr, (*t).tgid) };
    if start == 0 {
        return 0;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    unsafe { (*t).start_ns = 0 };
    let duration = now.saturating_sub(start);
    let ret: i64 = ctx.arg(1);
    let slot = slot_of(nr);
    if let Some(h) = hist_for(&SyscallKey { tgid, slot }) {
        observe_atomic(unsafe { &mut *h }, duration);
    }
    if let Some(errno) = errno_of(ret) {
        count_error(&SyscallErrKey {
            tgid,
            slot: slot as u16,
            errno,
        });
    }
    if duration >= unsafe { core::ptr::read_volatile(&SC_SLOW_NS) } {
        emit_slow(tgid, nr, ret, duration);
    }
    0
}

#[inline(never)]
fn emit_slow(tgid: u32, nr: i32, ret: i64, duration_ns: u64) {
    let Some(mut entry) = SW_SC_SLOW.reserve::<SlowSyscall>(0) else {
        count(Counter::SlowRingFull);
        return;
    };
    entry.write(SlowSyscall {
        tgid,
        tid: bpf_get_current_pid_tgid() as u32,
        nr,
        _pad: 0,
        ret,
        duration_ns,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        comm: bpf_get_current_comm().unwrap_or([0u8; TASK_COMM_LEN]),
    });
    entry.submit(0);
}
