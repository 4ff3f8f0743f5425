//! Process lifecycle events, shared by every probe that keeps per-process state: the agent
//! retires a process's entries on exit and re-labels them on exec.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::btf_tracepoint, programs::BtfTracePointContext,
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

#[btf_tracepoint(function = "sched_process_exit")]
pub fn sw_proc_exit_v1(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(struct task_struct *p) before group_dead was added; p is current. do_exit()
    // decrements signal->live before this tracepoint, so the last thread to exit sees 0.
    // Threads exiting together may all see 0: the agent takes repeated exits of one tgid
    // as one. A live process is never reported (its count is above 0).
    let p: *const u8 = ctx.arg(0);
    if task_live_threads(p) == Some(0) {
        emit_current(EVENT_EXIT, (bpf_get_current_pid_tgid() >> 32) as u32);
    }
    0
}

#[btf_tracepoint(function = "sched_process_exec")]
pub fn sw_proc_exec(_ctx: BtfTracePointContext) -> u32 {
    emit_current(EVENT_EXEC, (bpf_get_current_pid_tgid() >> 32) as u32);
    0
}
