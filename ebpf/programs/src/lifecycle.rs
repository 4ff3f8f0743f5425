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

/// A process while it exists: its tgid and `signal_struct` address.
#[repr(C)]
struct ExitKey {
    tgid: u32,
    _pad: u32,
    signal: u64,
}

/// Exits `sw_proc_exit_v1` reported. LRU: an entry only matters while the dying process's
/// other threads still pass the tracepoint.
#[map]
static SW_EXITED: LruHashMap<ExitKey, u8> = LruHashMap::with_max_entries(4096, 0);

#[btf_tracepoint(function = "sched_process_exit")]
pub fn sw_proc_exit_v1(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(struct task_struct *p) before group_dead was added; p is current. do_exit()
    // decrements signal->live before this tracepoint, so the last thread to exit sees 0 and a
    // live process is never reported. Threads exiting together may all see 0: only the
    // thread whose insert of (tgid, signal_struct) succeeds (atomic under the bucket lock)
    // reports, so an exit is sent once and a late duplicate cannot retire a new process that
    // reused the pid.
    let p: *const u8 = ctx.arg(0);
    let Some((0, signal)) = task_live_threads(p) else {
        return 0;
    };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let key = ExitKey {
        tgid,
        _pad: 0,
        signal,
    };
    if SW_EXITED.insert(&key, &0, u64::from(BPF_NOEXIST)).is_ok() {
        emit_current(EVENT_EXIT, tgid);
    }
    0
}

#[btf_tracepoint(function = "sched_process_exec")]
pub fn sw_proc_exec(_ctx: BtfTracePointContext) -> u32 {
    emit_current(EVENT_EXEC, (bpf_get_current_pid_tgid() >> 32) as u32);
    0
}
