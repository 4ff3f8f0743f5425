//! Scheduler probe: run-queue latency, off-CPU time by reason, context switches, per thread,
//! summed per process by the agent.
//!
//! One program per context switch, touching only `prev`, and one map lookup: the thread's
//! `SW_THREADS` entry (keyed by tid) holds both its state and its aggregates. The rest is the
//! kernel's own `sched_info` and run-queue clock, read with direct loads through the
//! tracepoint's task pointer. Entries are created at fork, where interrupts are on, or at the
//! first switch-out of a thread the agent did not pre-create; an ended thread's entry moves to
//! `SW_DEAD_THREADS` at sched_process_exit (or its last switch), and the agent folds it into
//! its process.
//!
//! Only a thread's own programs write its entry (sw_fork writes the child's before it first
//! runs), so plain increments suffice: sched_switch runs with IRQs off, and a switch that
//! preempts sw_exit (PREEMPT_RT) finds the thread marked exiting first and leaves it alone.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::bpf_ktime_get_ns,
    macros::{btf_tracepoint, map},
    maps::HashMap,
    programs::BtfTracePointContext,
};
use stallwatch_common::{
    sched::{
        DeadThreadKey, OffCpuReason, ThreadSched, ThreadState, TASK_DEAD, THREAD_DEAD,
        THREAD_EXITING, THREAD_HAS_BASE,
    },
    Counter,
};

use crate::shared::{btf_load, count, task_pid, task_state, task_tgid, E2BIG};

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
/// `task_struct.start_time`: with the tid, tells a thread from an earlier one with its tid.
#[no_mangle]
static TASK_START_OFF: u32 = 0;
/// `task_struct.flags`.
#[no_mangle]
static TASK_FLAGS_OFF: u32 = 0;

/// `PF_EXITING` in `task_struct.flags` (include/linux/sched.h; stable): set by do_exit before
/// sched_process_exit.
const PF_EXITING: u32 = 0x4;

/// Live threads, by tid. Sized by the agent (`--max-threads`); allocated on demand, so only
/// live threads cost their 984 bytes.
#[map]
static SW_THREADS: HashMap<u32, ThreadSched> = HashMap::with_max_entries(65536, BPF_F_NO_PREALLOC);

/// Ended threads' final values, until the agent drains them (every refresh). Sized like
/// `SW_THREADS`.
#[map]
static SW_DEAD_THREADS: HashMap<DeadThreadKey, ThreadSched> =
    HashMap::with_max_entries(65536, BPF_F_NO_PREALLOC);

/// Template for new entries: too large for the 512-byte BPF stack.
static ZERO: ThreadSched = ThreadSched::ZERO;

/// A new, zeroed entry for `tid` (replacing any), or `None`, counted.
#[inline(always)]
fn create(tid: u32) -> Option<*mut ThreadSched> {
    if let Err(err) = SW_THREADS.insert(&tid, &ZERO, u64::from(BPF_ANY)) {
        count(if err == -E2BIG {
            Counter::ThreadMapFull
        } else {
            Counter::ThreadAllocFailed
        });
        return None;
    }
    SW_THREADS.get_ptr_mut(&tid)
}

/// Ends a thread's entry: its values move to `SW_DEAD_THREADS` for the agent to fold, and the
/// tid's slot is free. If they cannot move (that map is full: its fill, exported at every
/// read, shows it), the entry stays, marked dead, for the agent to fold in place; then the
/// slot is not free (`false`).
#[inline(always)]
fn retire(t: *mut ThreadSched, tid: u32) -> bool {
    unsafe {
        if (*t).state.flags & THREAD_DEAD != 0 {
            return false;
        }
        // The end time makes the key unique even for two ends of one (tid, start): after an
        // exec by a non-leader thread, which takes over the leader's tid and start time.
        let key = DeadThreadKey {
            start_ns: (*t).state.start_ns,
            ended_ns: bpf_ktime_get_ns(),
            tid,
            _pad: 0,
        };
        if SW_DEAD_THREADS
            .insert(&key, &*t, u64::from(BPF_NOEXIST))
            .is_err()
        {
            (*t).state.flags |= THREAD_DEAD;
            return false;
        }
    }
    let _ = SW_THREADS.remove(&tid);
    true
}

/// Whether `task` is exiting (`PF_EXITING`: past the start of do_exit).
#[inline(always)]
fn exiting(task: *const u8) -> bool {
    btf_load::<u32>(task, &TASK_FLAGS_OFF) & PF_EXITING != 0
}

/// The entry of thread `tid` (`task`, started at `start`), created if absent. An entry the
/// agent created for a thread older than the programs is adopted at its first use; an entry
/// left by an earlier thread with this tid (its end unseen) is retired first. At a switch
/// (`SWITCH`), an exiting thread gets none: sw_exit handed its entry over already.
#[inline(always)]
fn entry<const SWITCH: bool>(task: *const u8, tid: u32, start: u64) -> Option<*mut ThreadSched> {
    if let Some(t) = SW_THREADS.get_ptr_mut(&tid) {
        let (have, flags) = unsafe { ((*t).state.start_ns, (*t).state.flags) };
        if flags & THREAD_DEAD == 0 {
            if have == start {
                // Its own entry (exiting or not: the caller checks).
                return Some(t);
            }
            if have == 0 {
                claim(t, task, start);
                return Some(t);
            }
        }
        if have >= start {
            // Its own entry, parked after its exit (this is one of its last switches); or the
            // one the leader left parked, found by a thread that exec'd and so took over the
            // leader's tid and start time; or a newer thread's, the tid having been reused
            // while this exiting thread makes its last switches.
            if !exiting(task) {
                count(Counter::ThreadSlotBusy);
            }
            return None;
        }
        // An older thread's entry, its end unseen.
        if !retire(t, tid) {
            count(Counter::ThreadSlotBusy);
            return None;
        }
    }
    if SWITCH && exiting(task) {
        return None;
    }
    let t = create(tid)?;
    claim(t, task, start);
    Some(t)
}

/// Makes a new entry, or one the agent created, the entry of `task` (started at `start`).
#[inline(always)]
fn claim(t: *mut ThreadSched, task: *const u8, start: u64) {
    unsafe {
        (*t).state.start_ns = start;
        (*t).state.tgid = task_tgid(task);
    }
}

/// Whether the thread's runs are still charged: not past sched_process_exit (its last run
/// was charged there, and the agent may already have retired its process).
#[inline(always)]
fn chargeable(t: *const ThreadSched) -> bool {
    let flags = unsafe { (*t).state.flags };
    flags & THREAD_EXITING == 0
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
    let tid = task_pid(prev);
    if tid == 0 {
        // An idle task.
        return;
    }
    let start: u64 = btf_load(prev, &TASK_START_OFF);
    if prev_state & TASK_DEAD != 0 {
        // The thread's last switch: where sw_exit did not run (not attached, or its entry
        // could not move), charge its last run and hand its values to the agent.
        if let Some(t) = SW_THREADS.get_ptr_mut(&tid) {
            let have = unsafe { (*t).state.start_ns };
            if have == start || have == 0 {
                if chargeable(t) {
                    charge_run(t, prev, rq_clock(prev));
                }
                let _ = retire(t, tid);
            }
        }
        return;
    }
    let Some(t) = entry::<true>(prev, tid, start) else {
        return;
    };
    if !chargeable(t) {
        return;
    }
    let reason = OffCpuReason::classify(preempt, prev_state);
    // The scheduler updated this run queue's clock just before picking the next task; the
    // kernel stamps `sched_info` with the same value. Two loads, where bpf_ktime_get_ns
    // would cost an indirect call into the clocksource.
    let now = rq_clock(prev);
    charge_run(t, prev, now);
    unsafe {
        if matches!(reason, OffCpuReason::Involuntary) {
            (*t).stats.cswch_involuntary += 1;
        } else {
            (*t).stats.cswch_voluntary += 1;
        }
        (*t).state.offcpu_since_ns = now;
        (*t).state.sum_exec_ns = btf_load(prev, &TASK_SUM_EXEC_OFF);
        (*t).state.reason = reason as u8;
    }
}

/// The clock of the run queue `task` is on (`task->se.cfs_rq->rq->clock`): sched_clock, ns.
#[inline(always)]
fn rq_clock(task: *const u8) -> u64 {
    let cfs_rq: *const u8 = btf_load(task, &TASK_CFS_RQ_OFF);
    let rq: *const u8 = btf_load(cfs_rq, &CFS_RQ_RQ_OFF);
    btf_load(rq, &RQ_CLOCK_OFF)
}

/// Charges the thread with what came before the run now ending (the thread is `task`, a BTF
/// pointer, on the CPU or just leaving it; `now` is its run queue's clock): its wait for a
/// CPU and the off-CPU interval before that, both from the kernel's own `sched_info`,
/// stamped when the run began. So nothing happens at switch-in.
#[inline(always)]
fn charge_run(t: *mut ThreadSched, task: *const u8, now: u64) {
    let s = unsafe { (*t).state };
    // The wait the kernel added at this run's arrival (plus any part a migration while
    // queued added earlier): everything since our last look.
    let run_delay: u64 = btf_load(task, &TASK_RUN_DELAY_OFF);
    let arrival: u64 = btf_load(task, &TASK_LAST_ARRIVAL_OFF);
    unsafe {
        (*t).state.run_delay_base_ns = run_delay;
        (*t).state.flags = s.flags | THREAD_HAS_BASE;
    }
    let stats = unsafe { &mut (*t).stats };
    if arrival == 0 {
        // A task that has run but was never stamped: this kernel does not maintain
        // sched_info (5.11-5.13 booted with nodelayacct and without CONFIG_SCHEDSTATS), so
        // run_delay is 0 too. Nothing can be measured; say so at every switch.
        if s.flags & THREAD_HAS_BASE != 0 || s.offcpu_since_ns != 0 {
            count(Counter::OffCpuUnmeasured);
        }
        return;
    }
    if s.flags & THREAD_HAS_BASE != 0 {
        stats
            .runq
            .observe(run_delay.saturating_sub(s.run_delay_base_ns));
    }
    if s.offcpu_since_ns != 0 {
        match run_start(task, arrival, &s, now) {
            Some(start) => {
                // Bounded index: the verifier sees the explicit match.
                let hist = match s.reason {
                    0 => &mut stats.offcpu[0],
                    1 => &mut stats.offcpu[1],
                    _ => &mut stats.offcpu[2],
                };
                hist.observe(start - s.offcpu_since_ns);
            }
            None => count(Counter::OffCpuUnmeasured),
        }
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

#[btf_tracepoint(function = "sched_process_fork")]
pub fn sw_fork(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(struct task_struct *parent, struct task_struct *child), for every new thread,
    // before it is first woken: its entry is made here, where interrupts are on, rather than
    // at its first switch-out, where the allocator's cache is refilled only from irq_work.
    // Its run_delay starts at 0 (sched_fork clears sched_info): the base of its first wait.
    let child: *const u8 = ctx.arg(1);
    let tid = task_pid(child);
    let start: u64 = btf_load(child, &TASK_START_OFF);
    let Some(t) = entry::<false>(child, tid, start) else {
        return 0;
    };
    unsafe {
        (*t).state.flags |= THREAD_HAS_BASE;
    }
    0
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn sw_exit(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(struct task_struct *p[, bool group_dead]); p is current. The process exit
    // event is the lifecycle program's job.
    let task: *const u8 = ctx.arg(0);
    let tid = task_pid(task);
    let start: u64 = btf_load(task, &TASK_START_OFF);
    // Create the entry if the thread never left a CPU since we attached: its end must be
    // seen, or its tid's next thread would find a stale entry.
    let Some(t) = entry::<false>(task, tid, start) else {
        return 0;
    };
    if chargeable(t) {
        // The run ending in exit is its last charged one: charge it now, as the process's
        // exit event goes out (the lifecycle's program on this tracepoint runs after this
        // one: the agent attaches it later). Exiting first, so a switch preempting this
        // program leaves the entry alone. The run queue's clock is as of the last tick or
        // switch here: close enough for the fallback in `run_start`, the only use of `now`
        // in this charge.
        unsafe {
            (*t).state.flags |= THREAD_EXITING;
        }
        charge_run(t, task, rq_clock(task));
    }
    // Hand the final values over now, so the agent finds them with the exit event; the
    // thread's remaining switches find no entry and, exiting, create none.
    let _ = retire(t, tid);
    0
}
