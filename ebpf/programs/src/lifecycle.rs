//! Process lifecycle events, shared by every probe that keeps per-process state: the agent
//! retires a process's entries on exit and re-labels them on exec.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_get_current_pid_tgid,
    macros::{btf_tracepoint, map},
    maps::LruHashMap,
    programs::BtfTracePointContext,
};
use stallwatch_common::{EVENT_EXEC, EVENT_EXIT};

use crate::shared::{emit_current, task_live_threads};

#[btf_tracepoint(function = "sched_process_exit")]
pub fn sw_proc_exit(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(struct task_struct *p, bool group_dead); p is current. One event per process,
    // when its last thread exits.
    let group_dead: u64 = ctx.arg(1);
    if group_dead & 0xff != 0 {
        emit_current(EVENT_EXIT, (bpf_get_current_pid_tgid() >> 32) as u32);
    }
    0
}

/// tgid -> `signal_struct` address of exits `sw_proc_exit_v1` reported. LRU: old entries
/// only matter while a dying process's threads still pass the tracepoint.
#[map]
static SW_EXITED: LruHashMap<u32, u64> = LruHashMap::with_max_entries(4096, 0);

#[btf_tracepoint(function = "sched_process_exit")]
pub fn sw_proc_exit_v1(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(struct task_struct *p) before group_dead was added; p is current. do_exit()
    // decrements signal->live before this tracepoint, so the last thread to exit sees 0 and a
    // live process is never reported. Threads exiting together may all see 0: only the
    // first report of a (tgid, signal_struct) pair is sent, so an exit is sent once and a
    // late duplicate cannot retire a new process that reused the pid.
    let p: *const u8 = ctx.arg(0);
    let Some((0, signal)) = task_live_threads(p) else {
        return 0;
    };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if SW_EXITED
        .insert(&tgid, &signal, u64::from(BPF_NOEXIST))
        .is_err()
    {
        // Reported before: by this process (a duplicate), or by an earlier one with this pid.
        match unsafe { SW_EXITED.get(&tgid) } {
            Some(&seen) if seen == signal => return 0,
            _ => {
                let _ = SW_EXITED.insert(&tgid, &signal, 0);
            }
        }
    }
    emit_current(EVENT_EXIT, tgid);
    0
}

#[btf_tracepoint(function = "sched_process_exec")]
pub fn sw_proc_exec(_ctx: BtfTracePointContext) -> u32 {
    emit_current(EVENT_EXEC, (bpf_get_current_pid_tgid() >> 32) as u32);
    0
}
