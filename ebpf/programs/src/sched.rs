//! Scheduler probe: run-queue latency, off-CPU time by reason, context switches, per process.
//!
//! Per-thread state is keyed by the `task_struct` address, which tp_btf hands us for free, so
//! the hot path reads no task fields. Per-process aggregates live in a per-CPU hash: only
//! sched_switch (IRQs off) writes them, so plain increments are race-free.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{btf_map, btf_tracepoint, map},
    maps::PerCpuHashMap,
    programs::BtfTracePointContext,
};
use stallwatch_common::{
    sched::{OffCpuReason, SchedStats, ThreadState, TASK_DEAD, THREAD_EXITING, THREAD_SEEN},
    Counter,
};

use crate::local_storage::TaskStorage;
use crate::shared::{count, get_or_insert, task_pid, task_state, task_tgid};

/// Per-thread state in task-local storage: found through the task, freed with it.
#[btf_map]
static SW_THREADS: TaskStorage<ThreadState> = TaskStorage::new();

/// Sized by the agent (`--max-processes`). Not preallocated: a per-CPU value costs
/// `size_of::<SchedStats>() * possible CPUs`, so only live processes should pay it.
#[map]
static SW_PROC_SCHED: PerCpuHashMap<u32, SchedStats> =
    PerCpuHashMap::with_max_entries(16384, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

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
    //          unsigned int prev_state) — v5.18+.
    let preempt: u64 = ctx.arg(0);
    let prev: *const u8 = ctx.arg(1);
    let next: *const u8 = ctx.arg(2);
    let prev_state: u64 = ctx.arg(3);
    on_switch(preempt & 0xff != 0, prev, prev_state as u32, next);
    0
}

#[btf_tracepoint(function = "sched_switch")]
pub fn sw_switch_v1(ctx: BtfTracePointContext) -> u32 {
    // Older TP_PROTO(bool preempt, prev, next): read prev's state ourselves.
    let preempt: u64 = ctx.arg(0);
    let prev: *const u8 = ctx.arg(1);
    let next: *const u8 = ctx.arg(2);
    let prev_state = task_state(prev).unwrap_or(0);
    on_switch(preempt & 0xff != 0, prev, prev_state, next);
    0
}

#[inline(always)]
fn on_switch(preempt: bool, prev: *const u8, prev_state: u32, next: *const u8) {
    let now = unsafe { bpf_ktime_get_ns() };
    switch_out(preempt, prev, prev_state, now);
    switch_in(next, now);
}

#[inline(always)]
fn switch_out(preempt: bool, prev: *const u8, prev_state: u32, now: u64) {
    if prev_state & TASK_DEAD != 0 {
        // The task's last switch: it will never run again, so forget it now (the kernel
        // would free it with the task anyway; deleting keeps the entry count exact).
        if SW_THREADS.delete(prev) {
            count(Counter::ThreadDeleted);
        }
        return;
    }
    let Some(t) = SW_THREADS.get_or_create(prev) else {
        count(Counter::ThreadStateFailed);
        return;
    };
    let reason = OffCpuReason::classify(preempt, prev_state);
    let tgid = unsafe {
        if (*t).flags & THREAD_SEEN == 0 {
            // A thread's tgid never changes: read it once (every helper call costs).
            (*t).flags |= THREAD_SEEN;
            (*t).tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
            count(Counter::ThreadInserted);
        }
        if (*t).flags & THREAD_EXITING != 0 || (*t).tgid == 0 {
            // Past sched_process_exit (the agent may already have retired this process),
            // or the idle task.
            return;
        }
        (*t).offcpu_since_ns = now;
        (*t).runnable_since_ns = if matches!(reason, OffCpuReason::Involuntary) {
            now
        } else {
            0
        };
        (*t).reason = reason as u8;
        (*t).tgid
    };

    if let Some(stats) = proc_stats(tgid) {
        unsafe {
            if matches!(reason, OffCpuReason::Involuntary) {
                (*stats).cswch_involuntary += 1;
            } else {
                (*stats).cswch_voluntary += 1;
            }
        }
    }
}

#[inline(always)]
fn switch_in(next: *const u8, now: u64) {
    let Some(t) = SW_THREADS.get(next) else {
        return; // idle, or a thread we have not seen leave a CPU yet
    };
    let (offcpu_since, runnable_since, tgid, reason) = unsafe {
        let s = *t;
        (*t).offcpu_since_ns = 0;
        (*t).runnable_since_ns = 0;
        (s.offcpu_since_ns, s.runnable_since_ns, s.tgid, s.reason)
    };
    if unsafe { (*t).flags } & THREAD_EXITING != 0 || (offcpu_since == 0 && runnable_since == 0) {
        return;
    }
    let Some(stats) = proc_stats(tgid) else {
        return;
    };
    unsafe {
        if runnable_since != 0 && now > runnable_since {
            (*stats).runq.observe(now - runnable_since);
        }
        if offcpu_since != 0 && now > offcpu_since {
            // Bounded index: the verifier sees the explicit match.
            let hist = match reason {
                0 => &mut (*stats).offcpu[0],
                1 => &mut (*stats).offcpu[1],
                _ => &mut (*stats).offcpu[2],
            };
            hist.observe(now - offcpu_since);
        }
    }
}

#[btf_tracepoint(function = "sched_wakeup")]
pub fn sw_wakeup(ctx: BtfTracePointContext) -> u32 {
    let task: *const u8 = ctx.arg(0);
    if let Some(t) = SW_THREADS.get(task) {
        unsafe {
            // The first wakeup starts the wait; the kernel enqueues the task once.
            if (*t).runnable_since_ns == 0 && (*t).offcpu_since_ns != 0 {
                (*t).runnable_since_ns = bpf_ktime_get_ns();
            }
        }
    }
    0
}

#[btf_tracepoint(function = "sched_wakeup_new")]
pub fn sw_wakeup_new(ctx: BtfTracePointContext) -> u32 {
    // A new task's first wait for a CPU. Current is the parent, so read the child's tgid.
    let task: *const u8 = ctx.arg(0);
    let Some(tgid) = task_tgid(task) else {
        return 0;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(t) = SW_THREADS.get_or_create(task) else {
        count(Counter::ThreadStateFailed);
        return 0;
    };
    unsafe {
        if (*t).flags & THREAD_SEEN == 0 {
            count(Counter::ThreadInserted);
        }
        *t = ThreadState {
            offcpu_since_ns: 0,
            runnable_since_ns: now,
            tgid,
            reason: OffCpuReason::Involuntary as u8,
            flags: THREAD_SEEN,
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
    // One read, one check, in order: with both reads before one combined check, LLVM tests
    // the first read's result twice, and verifiers before ~6.8 cannot tell the second test
    // is decided by the first (they do not narrow a scalar on `!= 0`), so they walk a path
    // that reads an unset register and reject the program (seen on Debian 12's 6.1).
    let Some(pid) = task_pid(child) else {
        return 0;
    };
    let Some(tgid) = task_tgid(child) else {
        return 0;
    };
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
    match SW_THREADS.get_or_create(task) {
        Some(t) => unsafe {
            if (*t).flags & THREAD_SEEN == 0 {
                count(Counter::ThreadInserted);
            }
            (*t).flags |= THREAD_EXITING | THREAD_SEEN;
        },
        None => count(Counter::ThreadStateFailed),
    }
    0
}
