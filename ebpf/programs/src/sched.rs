//! Scheduler probe: run-queue latency, off-CPU time by reason, context switches, per process.
//!
//! One program per context switch, touching only `prev`: per-thread state in task-local
//! storage (found through the task pointer tp_btf hands us), the kernel's own `sched_info`
//! and run-queue clock read with direct loads, and one per-process lookup. Per-process
//! aggregates live in a per-CPU hash written by sched_switch (IRQs off: plain increments) and
//! by sched_process_exit (atomic increments: on PREEMPT_RT a tracepoint program can be
//! preempted, by a switch that updates the same entry).

use aya_ebpf::{
    macros::{btf_map, btf_tracepoint, map},
    maps::PerCpuHashMap,
    programs::BtfTracePointContext,
};
use stallwatch_common::{
    hist::Hist,
    sched::{
        OffCpuReason, SchedStats, ThreadState, TASK_DEAD, THREAD_EXITING, THREAD_HAS_BASE,
        THREAD_SEEN,
    },
    Counter,
};

use crate::local_storage::TaskStorage;
use crate::shared::{
    btf_load, count, get_or_insert, observe_atomic, task_pid, task_state, task_tgid,
};

/// Byte offsets from kernel BTF, set by the agent before load. Frozen in `.rodata`, so the
/// verifier sees constants and allows direct loads through the tracepoint's task pointers.
/// `task_struct.se.cfs_rq` (CONFIG_FAIR_GROUP_SCHED).
#[no_mangle]
static TASK_CFS_RQ_OFF: u32 = 0;
/// `cfs_rq.rq`.
#[no_mangle]
static CFS_RQ_RQ_OFF: u32 = 0;
/// `rq.clock`.
#[no_mangle]
static RQ_CLOCK_OFF: u32 = 0;
/// `task_struct.sched_info.run_delay` (CONFIG_SCHED_INFO): the task's total run-queue wait.
#[no_mangle]
static TASK_RUN_DELAY_OFF: u32 = 0;
/// `task_struct.sched_info.last_arrival`: when the task's current (or last) run began.
#[no_mangle]
static TASK_LAST_ARRIVAL_OFF: u32 = 0;
/// `task_struct.se.sum_exec_runtime`: the task's run time, which every scheduling class
/// accounts.
#[no_mangle]
static TASK_SUM_EXEC_OFF: u32 = 0;

/// Per-thread state in task-local storage: found through the task, freed with it.
#[btf_map]
static SW_THREADS: TaskStorage<ThreadState> = TaskStorage::new();

/// Sized by the agent (`--max-processes`). Not preallocated: a per-CPU value costs
/// `size_of::<SchedStats>() * possible CPUs`, so only live processes should pay it.
#[map]
static SW_PROC_SCHED: PerCpuHashMap<u32, SchedStats> =
    PerCpuHashMap::with_max_entries(16384, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// The task's scheduler state, created if absent (a failure is counted), and whether it is
/// new: task storage hands out zeroed values, so `THREAD_SEEN` clear means new.
#[inline(always)]
fn thread_state(task: *const u8) -> Option<(*mut ThreadState, bool)> {
    let Some(t) = SW_THREADS.get_or_create(task) else {
        count(Counter::ThreadStateFailed);
        return None;
    };
    let new = unsafe { (*t).flags } & THREAD_SEEN == 0;
    if new {
        count(Counter::ThreadInserted);
    }
    Some((t, new))
}

/// Whether the thread's runs are charged to its process: it has been seen (its tgid is
/// known), is not past sched_process_exit (the agent may already have retired its process;
/// its last run was charged there), and is not the idle task.
#[inline(always)]
fn chargeable(t: *const ThreadState) -> bool {
    let (flags, tgid) = unsafe { ((*t).flags, (*t).tgid) };
    flags & THREAD_SEEN != 0 && flags & THREAD_EXITING == 0 && tgid != 0
}

/// Template for new per-process entries: too large for the 512-byte BPF stack.
static ZERO_STATS: SchedStats = SchedStats::ZERO;

#[inline(always)]
fn proc_stats(tgid: u32) -> Option<*mut SchedStats> {
    get_or_insert(
        &SW_PROC_SCHED,
        &tgid,
        &ZERO_STATS,
        Counter::ProcMapFull,
        Counter::ProcAllocFailed,
    )
}

#[btf_tracepoint(function = "sched_switch")]
pub fn sw_switch(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next,
    //          unsigned int prev_state) — v5.18+. `next` is not needed: everything is charged
    // at a thread's switch-out.
    let preempt: u64 = ctx.arg(0);
    let prev: *const u8 = ctx.arg(1);
    let prev_state: u64 = ctx.arg(3);
    on_switch(preempt & 0xff != 0, prev, prev_state as u32);
    0
}

#[btf_tracepoint(function = "sched_switch")]
pub fn sw_switch_v1(ctx: BtfTracePointContext) -> u32 {
    // Older TP_PROTO(bool preempt, prev, next): read prev's state ourselves.
    let preempt: u64 = ctx.arg(0);
    let prev: *const u8 = ctx.arg(1);
    let prev_state = task_state(prev);
    on_switch(preempt & 0xff != 0, prev, prev_state);
    0
}

#[inline(always)]
fn on_switch(preempt: bool, prev: *const u8, prev_state: u32) {
    if prev_state & TASK_DEAD != 0 {
        // The task's last switch: charge its last run, then forget it (the kernel would free
        // the state with the task anyway; deleting keeps the entry count exact).
        if let Some(t) = SW_THREADS.get(prev) {
            // Unless sw_exit (when attached) charged it already.
            if chargeable(t) {
                let _ = charge_run::<false>(t, prev, rq_clock(prev));
            }
        }
        if SW_THREADS.delete(prev) {
            count(Counter::ThreadDeleted);
        }
        return;
    }
    let Some((t, new)) = thread_state(prev) else {
        return;
    };
    if new {
        // A thread's tgid never changes: read it once.
        unsafe {
            (*t).flags |= THREAD_SEEN;
            (*t).tgid = task_tgid(prev);
        }
    }
    if !chargeable(t) {
        return;
    }
    let reason = OffCpuReason::classify(preempt, prev_state);
    // The scheduler updated this run queue's clock just before picking the next task; the
    // kernel stamps `sched_info` with the same value. Two loads, where bpf_ktime_get_ns
    // would cost an indirect call into the clocksource.
    let now = rq_clock(prev);
    if let Some(stats) = charge_run::<false>(t, prev, now) {
        unsafe {
            if matches!(reason, OffCpuReason::Involuntary) {
                (*stats).cswch_involuntary += 1;
            } else {
                (*stats).cswch_voluntary += 1;
            }
        }
    }
    unsafe {
        (*t).offcpu_since_ns = now;
        (*t).sum_exec_ns = btf_load(prev, &TASK_SUM_EXEC_OFF);
        (*t).reason = reason as u8;
    }
}

/// The clock of the run queue `task` is on (`task->se.cfs_rq->rq->clock`): sched_clock, ns.
#[inline(always)]
fn rq_clock(task: *const u8) -> u64 {
    let cfs_rq: *const u8 = btf_load(task, &TASK_CFS_RQ_OFF);
    let rq: *const u8 = btf_load(cfs_rq, &CFS_RQ_RQ_OFF);
    btf_load(rq, &RQ_CLOCK_OFF)
}

/// Charges the thread's process with what came before the run now ending (the thread is
/// `task`, a BTF pointer, on the CPU or just leaving it; `now` is its run queue's clock): its
/// wait for a CPU and the off-CPU interval before that, both from the kernel's own
/// `sched_info`, stamped when the run began. So a context switch costs one per-process
/// lookup, and nothing happens at switch-in. `ATOMIC` where the caller can be preempted
/// (sched_process_exit) by a switch that updates the same per-CPU entry.
#[inline(always)]
fn charge_run<const ATOMIC: bool>(
    t: *mut ThreadState,
    task: *const u8,
    now: u64,
) -> Option<*mut SchedStats> {
    let s = unsafe { *t };
    // The wait the kernel added at this run's arrival (plus any part a migration while
    // queued added earlier): everything since our last look.
    let run_delay: u64 = btf_load(task, &TASK_RUN_DELAY_OFF);
    let arrival: u64 = btf_load(task, &TASK_LAST_ARRIVAL_OFF);
    unsafe {
        (*t).run_delay_base_ns = run_delay;
        (*t).flags = s.flags | THREAD_HAS_BASE;
    }
    let stats = proc_stats(s.tgid)?;
    if arrival == 0 {
        // A task that has run but was never stamped: this kernel does not maintain
        // sched_info (5.11-5.13 booted with nodelayacct and without CONFIG_SCHEDSTATS), so
        // run_delay is 0 too. Nothing can be measured; say so at every switch.
        if s.flags & THREAD_HAS_BASE != 0 || s.offcpu_since_ns != 0 {
            count(Counter::OffCpuUnmeasured);
        }
        return Some(stats);
    }
    unsafe {
        if s.flags & THREAD_HAS_BASE != 0 {
            observe::<ATOMIC>(
                &mut (*stats).runq,
                run_delay.saturating_sub(s.run_delay_base_ns),
            );
        }
        if s.offcpu_since_ns != 0 {
            match run_start(task, arrival, &s, now) {
                Some(start) => {
                    // Bounded index: the verifier sees the explicit match.
                    let hist = match s.reason {
                        0 => &mut (*stats).offcpu[0],
                        1 => &mut (*stats).offcpu[1],
                        _ => &mut (*stats).offcpu[2],
                    };
                    observe::<ATOMIC>(hist, start - s.offcpu_since_ns);
                }
                None => count(Counter::OffCpuUnmeasured),
            }
        }
    }
    Some(stats)
}

#[inline(always)]
fn observe<const ATOMIC: bool>(h: &mut Hist, ns: u64) {
    if ATOMIC {
        observe_atomic(h, ns);
    } else {
        h.observe(ns);
    }
}

/// When the current run of `task` began, on the run-queue clock: `arrival`
/// (`sched_info.last_arrival`) if the kernel stamped this run, else estimated; at least
/// `since` (the thread's last switch-out, maybe on another CPU's clock), or `None`.
#[inline(always)]
fn run_start(task: *const u8, arrival: u64, s: &ThreadState, now: u64) -> Option<u64> {
    if arrival >= s.offcpu_since_ns {
        return Some(arrival);
    }
    // Since v5.14 the kernel stamps an arrival only after a queued wait it recorded, and a
    // task preempted after it had set a sleeping state is not re-queued for sched_info. Then
    // the run's length dates its start: the task's run time now minus at its last
    // switch-out (every class accounts it before the switch). That run time leaves out IRQ
    // and steal time where the kernel accounts them: the estimate errs late, the interval
    // long.
    let total: u64 = btf_load(task, &TASK_SUM_EXEC_OFF);
    let start = now.checked_sub(total.checked_sub(s.sum_exec_ns)?)?;
    (start >= s.offcpu_since_ns).then_some(start)
}

#[btf_tracepoint(function = "sched_wakeup_new")]
pub fn sw_wakeup_new(ctx: BtfTracePointContext) -> u32 {
    // A new task's first wait for a CPU: its run_delay starts at 0 (sched_fork clears
    // sched_info), so the base is 0. Current is the parent, so read the child's tgid.
    let task: *const u8 = ctx.arg(0);
    let tgid = task_tgid(task);
    let Some((t, _)) = thread_state(task) else {
        return 0;
    };
    unsafe {
        *t = ThreadState {
            offcpu_since_ns: 0,
            sum_exec_ns: 0,
            run_delay_base_ns: 0,
            tgid,
            reason: OffCpuReason::Involuntary as u8,
            flags: THREAD_SEEN | THREAD_HAS_BASE,
            _pad: [0; 2],
        };
    }
    0
}

#[btf_tracepoint(function = "sched_process_fork")]
pub fn sw_fork(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(struct task_struct *parent, struct task_struct *child). A new process gets
    // its entry here, where interrupts are on, rather than in sched_switch: the per-CPU
    // entries are allocated on demand and the allocator refills its cache from irq_work.
    let child: *const u8 = ctx.arg(1);
    // Direct loads: no helper results to check (with bpf_probe_read_kernel, LLVM merged two
    // result checks into one that verifiers before ~6.8 could not follow, seen on 6.1).
    let pid = task_pid(child);
    let tgid = task_tgid(child);
    if pid == tgid {
        let _ = proc_stats(tgid);
    }
    0
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn sw_exit(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(struct task_struct *p[, bool group_dead]); p is current. The process exit
    // event is the lifecycle program's job.
    let task: *const u8 = ctx.arg(0);
    // Create the state if the thread never left a CPU since we attached: any later
    // switch of an exiting thread must be ignored, or it could re-create the entry of a
    // process the agent has already retired.
    let Some((t, _)) = thread_state(task) else {
        return 0;
    };
    unsafe {
        if chargeable(t) {
            // The run ending in exit will not be charged at a switch-out (exiting threads'
            // switches are ignored): charge it now, as the process's exit event goes out.
            // Exiting first, so a switch preempting this program leaves the state alone.
            // The run queue's clock is as of the last tick or switch here: close enough for
            // the fallback in `run_start`, the only use of `now` in this charge.
            (*t).flags |= THREAD_EXITING;
            let _ = charge_run::<true>(t, task, rq_clock(task));
        }
        (*t).flags |= THREAD_EXITING | THREAD_SEEN;
    }
    0
}
