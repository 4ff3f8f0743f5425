//! Map and program names, shared by the kernel object and the agent.
//!
//! The kernel keeps 15 bytes of a name; every name here is shorter, which a test checks.

/// Scheduler state and aggregates of each live thread (`HashMap<u32 tid, ThreadSched>`).
pub const MAP_THREADS: &str = "SW_THREADS";
/// Ended threads' final `ThreadSched`, until the agent folds them into their process
/// (`HashMap<DeadThreadKey, ThreadSched>`).
pub const MAP_DEAD_THREADS: &str = "SW_DEAD_THREADS";
/// Process exit/exec events (`RingBuf` of `ProcEvent`).
pub const MAP_EVENTS: &str = "SW_EVENTS";
/// The legacy exit program's memory of reported exits: (tgid, `signal_struct` address).
pub const MAP_EXITED: &str = "SW_EXITED";
/// Drop and bookkeeping counters (`PerCpuArray<u64>`, indexed by `Counter`).
pub const MAP_COUNTERS: &str = "SW_COUNTERS";

/// Syscall probe: per-thread timing state (task-local storage of `SyscallThread`).
pub const MAP_SC_THREADS: &str = "SW_SC_THREADS";
/// Syscall number -> class index (`Array<u32>`, `SYSCALL_TABLE_SIZE` entries), filled by the agent.
pub const MAP_SC_CLASSES: &str = "SW_SC_CLASSES";
/// Per-process latency histograms (`PerCpuHashMap<SyscallKey, Hist>`).
pub const MAP_SC_STATS: &str = "SW_SC_STATS";
/// Per-process error counts (`PerCpuHashMap<SyscallErrKey, u64>`).
pub const MAP_SC_ERRORS: &str = "SW_SC_ERRORS";
/// Slow-syscall events (`RingBuf` of `SlowSyscall`).
pub const MAP_SC_SLOW: &str = "SW_SC_SLOW";
/// In-kernel scope: selected tgids (`HashMap<u32, u8>`).
pub const MAP_SC_PIDS: &str = "SW_SC_PIDS";
/// In-kernel scope: selected cgroup v2 ids (`HashMap<u64, u8>`), matched with descendants.
pub const MAP_SC_CGROUPS: &str = "SW_SC_CGROUPS";

/// TCP probe: per-socket state (socket-local storage of `SockState`, cloned to children).
pub const MAP_SOCKS: &str = "SW_SOCKS";
/// Per-process TCP aggregates (`PerCpuHashMap<u32, TcpStats>`).
pub const MAP_PROC_TCP: &str = "SW_PROC_TCP";

/// Pauses in flight (`LruHashMap<u64, gc::Inflight>`).
pub const MAP_GC_INFLIGHT: &str = "SW_GC_INFLIGHT";
/// Per-process pause histograms (`HashMap<u32, gc::GcStats>`). The agent creates a process's
/// entry when it finds a runtime in it; programs only update entries, so this map is also the
/// in-kernel process filter.
pub const MAP_PROC_GC: &str = "SW_PROC_GC";

/// Globals set by the agent from kernel BTF: byte offsets in `struct sock` / `tcp_sock`.
pub const GLOBAL_SK_PROTOCOL_OFF: &str = "SK_PROTOCOL_OFF";
pub const GLOBAL_SK_ERR_OFF: &str = "SK_ERR_OFF";
pub const GLOBAL_SK_ERR_SOFT_OFF: &str = "SK_ERR_SOFT_OFF";
pub const GLOBAL_TCP_SRTT_OFF: &str = "TCP_SRTT_OFF";
/// Global: at most one RTT sample per socket per this many ns.
pub const GLOBAL_TCP_RTT_INTERVAL_NS: &str = "TCP_RTT_NS";

/// Global (`.rodata`): `FILTER_*` bits of the active syscall scopes.
pub const GLOBAL_SC_FILTER: &str = "SC_FILTER";
/// Global: bit mask of the cgroup levels the cgroup scope names.
pub const GLOBAL_SC_CG_LEVELS: &str = "SC_CG_LEVELS";
/// Global: nonzero keys the syscall maps by syscall number instead of class.
pub const GLOBAL_SC_BY_NR: &str = "SC_BY_NR";
/// Global: syscalls at least this long (ns) are streamed as slow-call events.
pub const GLOBAL_SC_SLOW_NS: &str = "SC_SLOW_NS";

/// Global: the agent's tgid, never timed by the syscall probe.
pub const GLOBAL_SC_SELF_TGID: &str = "SC_SELF_TGID";

/// Global (`.rodata`) set by the agent from kernel BTF: byte offset of `task_struct.tgid`.
pub const GLOBAL_TASK_TGID_OFFSET: &str = "TASK_TGID_OFF";
/// Global set by the agent from kernel BTF: byte offset of `task_struct.pid`.
pub const GLOBAL_TASK_PID_OFFSET: &str = "TASK_PID_OFF";
/// Global set by the agent: byte offset of `task_struct.__state` (for the 3-argument sched_switch).
pub const GLOBAL_TASK_STATE_OFFSET: &str = "TASK_STATE_OFF";
/// Global set by the agent from kernel BTF: byte offset of `task_struct.signal`.
pub const GLOBAL_TASK_SIGNAL_OFFSET: &str = "TASK_SIGNAL_OFF";
/// Global set by the agent from kernel BTF: byte offset of `signal_struct.live`.
pub const GLOBAL_SIGNAL_LIVE_OFFSET: &str = "SIGNAL_LIVE_OFF";
/// Globals set by the agent from kernel BTF for the scheduler probe's direct loads:
/// `task_struct.se.cfs_rq`, `cfs_rq.rq`, `rq.clock`, `task_struct.sched_info.run_delay` and
/// `task_struct.sched_info.last_arrival`.
pub const GLOBAL_TASK_CFS_RQ_OFFSET: &str = "TASK_CFS_RQ_OFF";
pub const GLOBAL_CFS_RQ_RQ_OFFSET: &str = "CFS_RQ_RQ_OFF";
pub const GLOBAL_RQ_CLOCK_OFFSET: &str = "RQ_CLOCK_OFF";
pub const GLOBAL_TASK_RUN_DELAY_OFFSET: &str = "TASK_RUN_DELAY_OFF";
pub const GLOBAL_TASK_LAST_ARRIVAL_OFFSET: &str = "TASK_LAST_ARRIVAL_OFF";
/// Global: `task_struct.se.sum_exec_runtime`.
pub const GLOBAL_TASK_SUM_EXEC_OFFSET: &str = "TASK_SUM_EXEC_OFF";
/// Global: `task_struct.start_time`.
pub const GLOBAL_TASK_START_OFFSET: &str = "TASK_START_OFF";
/// Global: `task_struct.flags`.
pub const GLOBAL_TASK_FLAGS_OFFSET: &str = "TASK_FLAGS_OFF";

/// tp_btf/sched_switch for kernels whose tracepoint passes `prev_state` (v5.18+).
pub const PROG_SWITCH: &str = "sw_switch";
/// tp_btf/sched_switch for older kernels: reads `prev->__state` itself.
pub const PROG_SWITCH_V1: &str = "sw_switch_v1";
/// tp_btf/sched_process_exit: marks exiting threads in the scheduler's per-thread state.
pub const PROG_EXIT: &str = "sw_exit";
/// Process lifecycle (shared by every per-process probe): tp_btf/sched_process_exit, sends
/// an exit event when the last thread goes; needs the `group_dead` argument (checked in BTF).
pub const PROG_PROC_EXIT: &str = "sw_proc_exit";
/// tp_btf/sched_process_exit for kernels whose tracepoint has no `group_dead`: a process is
/// gone when its `signal->live` thread count is 0.
pub const PROG_PROC_EXIT_V1: &str = "sw_proc_exit_v1";
/// tp_btf/sched_process_exec: sends an exec event.
pub const PROG_PROC_EXEC: &str = "sw_proc_exec";
/// tp_btf/sys_enter and sys_exit (raw_syscalls).
pub const PROG_SYS_ENTER: &str = "sw_sys_enter";
pub const PROG_SYS_EXIT: &str = "sw_sys_exit";
/// TCP probe programs (tp_btf).
pub const PROG_TCP_STATE: &str = "sw_tcp_state";
/// tcp_retransmit_skb with the `err` argument (6.14+), and without.
pub const PROG_TCP_RETRANS: &str = "sw_tcp_retrans";
pub const PROG_TCP_RETRANS_V1: &str = "sw_tcp_retrans1";
pub const PROG_TCP_SYNACK: &str = "sw_tcp_synack";
pub const PROG_TCP_SEND_RST: &str = "sw_tcp_send_rst";
pub const PROG_TCP_RECV_RST: &str = "sw_tcp_recv_rst";
pub const PROG_TCP_PROBE: &str = "sw_tcp_probe";
pub const PROG_TCP_RECV: &str = "sw_tcp_recv";
pub const PROG_TCP_SEND: &str = "sw_tcp_send";
/// Go ≥1.22: uprobe at `runtime.startTheWorldWithSema` entry (pause start and reason in registers).
pub const PROG_GO_START: &str = "sw_go_start";
/// Go 1.21: uprobe at `runtime.stopTheWorldWithSema` entry, reason in the first register.
pub const PROG_GO_STOP: &str = "sw_go_stop";
/// Go 1.19-1.20: uprobe at `runtime.stopTheWorldWithSema` entry (no reason).
pub const PROG_GO_STOP_NOREASON: &str = "sw_go_stop0";
/// Go ≤1.21: uprobes at `runtime.(*gcCPULimiterState).startGCTransition` and
/// `finishGCTransition` entry, which receive the runtime's own pause start and (mark
/// termination) pause end.
pub const PROG_GO_GC_START: &str = "sw_go_gcstart";
pub const PROG_GO_GC_END: &str = "sw_go_gcend";
/// Go: uprobe at each RET of `runtime.startTheWorldWithSema` (pause end in the return register).
pub const PROG_GO_RET: &str = "sw_go_ret";
/// JVM: uprobe at `SafepointSynchronize::begin`, uretprobe there (safepoint reached), USDT
/// hotspot:gc__begin (a GC runs in this safepoint), uretprobe at `SafepointSynchronize::end`.
pub const PROG_JVM_BEGIN: &str = "sw_jvm_begin";
pub const PROG_JVM_REACHED: &str = "sw_jvm_reached";
pub const PROG_JVM_GC: &str = "sw_jvm_gc";
pub const PROG_JVM_END: &str = "sw_jvm_end";
/// Per-thread collections (CPython USDT gc__start/gc__done, V8 `Heap::CollectGarbage` entry
/// and return): begin, end at a uprobe, end at a uretprobe.
pub const PROG_RT_BEGIN: &str = "sw_rt_begin";
pub const PROG_RT_END: &str = "sw_rt_end";
pub const PROG_RT_END_RET: &str = "sw_rt_end_ret";
/// tp_btf/sched_process_fork: allocates a new process's entry outside the scheduler hot path.
pub const PROG_FORK: &str = "sw_fork";

pub const ALL_MAPS: &[&str] = &[
    MAP_THREADS,
    MAP_DEAD_THREADS,
    MAP_EVENTS,
    MAP_EXITED,
    MAP_COUNTERS,
    MAP_SC_THREADS,
    MAP_SC_CLASSES,
    MAP_SC_STATS,
    MAP_SC_ERRORS,
    MAP_SC_SLOW,
    MAP_SC_PIDS,
    MAP_SC_CGROUPS,
    MAP_SOCKS,
    MAP_PROC_TCP,
    MAP_GC_INFLIGHT,
    MAP_PROC_GC,
];
/// The runtime-pause (`gc`) probe's uprobe programs.
pub const GC_PROGRAMS: &[&str] = &[
    PROG_GO_START,
    PROG_GO_STOP,
    PROG_GO_STOP_NOREASON,
    PROG_GO_RET,
    PROG_GO_GC_START,
    PROG_GO_GC_END,
    PROG_JVM_BEGIN,
    PROG_JVM_REACHED,
    PROG_JVM_GC,
    PROG_JVM_END,
    PROG_RT_BEGIN,
    PROG_RT_END,
    PROG_RT_END_RET,
];
pub const ALL_PROGRAMS: &[&str] = &[
    PROG_SWITCH,
    PROG_SWITCH_V1,
    PROG_EXIT,
    PROG_FORK,
    PROG_PROC_EXIT,
    PROG_PROC_EXIT_V1,
    PROG_PROC_EXEC,
    PROG_SYS_ENTER,
    PROG_SYS_EXIT,
    PROG_TCP_STATE,
    PROG_TCP_RETRANS,
    PROG_TCP_RETRANS_V1,
    PROG_TCP_SYNACK,
    PROG_TCP_SEND_RST,
    PROG_TCP_RECV_RST,
    PROG_TCP_PROBE,
    PROG_TCP_RECV,
    PROG_TCP_SEND,
];

#[cfg(test)]
mod tests {
    #[test]
    fn names_fit_the_kernels_object_name_length() {
        for name in super::ALL_MAPS
            .iter()
            .chain(super::ALL_PROGRAMS)
            .chain(super::GC_PROGRAMS)
        {
            assert!(
                name.len() <= 15,
                "{name} is longer than BPF_OBJ_NAME_LEN - 1"
            );
        }
    }
}
