//! Map and program names, shared by the kernel object and the agent.
//!
//! The kernel keeps 15 bytes of a name; every name here is shorter, which a test checks.

/// Per-thread state (`HashMap<u64, ThreadState>`).
pub const MAP_THREADS: &str = "SW_THREADS";
/// Per-process scheduler aggregates (`PerCpuHashMap<u32, SchedStats>`).
pub const MAP_PROC_SCHED: &str = "SW_PROC_SCHED";
/// Process exit/exec events (`RingBuf` of `ProcEvent`).
pub const MAP_EVENTS: &str = "SW_EVENTS";
/// Drop and bookkeeping counters (`PerCpuArray<u64>`, indexed by `Counter`).
pub const MAP_COUNTERS: &str = "SW_COUNTERS";

/// Global (`.rodata`) set by the agent from kernel BTF: byte offset of `task_struct.tgid`.
pub const GLOBAL_TASK_TGID_OFFSET: &str = "TASK_TGID_OFF";
/// Global set by the agent from kernel BTF: byte offset of `task_struct.pid`.
pub const GLOBAL_TASK_PID_OFFSET: &str = "TASK_PID_OFF";
/// Global set by the agent: byte offset of `task_struct.__state` (for the 3-argument sched_switch).
pub const GLOBAL_TASK_STATE_OFFSET: &str = "TASK_STATE_OFF";

/// tp_btf/sched_switch for kernels whose tracepoint passes `prev_state` (v5.18+).
pub const PROG_SWITCH: &str = "sw_switch";
/// tp_btf/sched_switch for older kernels: reads `prev->__state` itself.
pub const PROG_SWITCH_V1: &str = "sw_switch_v1";
pub const PROG_WAKEUP: &str = "sw_wakeup";
pub const PROG_WAKEUP_NEW: &str = "sw_wakeup_new";
/// tp_btf/sched_process_exit; needs the tracepoint's `group_dead` argument (checked in BTF).
pub const PROG_EXIT: &str = "sw_exit";
pub const PROG_EXEC: &str = "sw_exec";
/// tp_btf/sched_process_fork: allocates a new process's entry outside the scheduler hot path.
pub const PROG_FORK: &str = "sw_fork";

pub const ALL_MAPS: &[&str] = &[MAP_THREADS, MAP_PROC_SCHED, MAP_EVENTS, MAP_COUNTERS];
pub const ALL_PROGRAMS: &[&str] = &[
    PROG_SWITCH,
    PROG_SWITCH_V1,
    PROG_WAKEUP,
    PROG_WAKEUP_NEW,
    PROG_EXIT,
    PROG_EXEC,
    PROG_FORK,
];

#[cfg(test)]
mod tests {
    #[test]
    fn names_fit_the_kernels_object_name_length() {
        for name in super::ALL_MAPS.iter().chain(super::ALL_PROGRAMS) {
            assert!(
                name.len() <= 15,
                "{name} is longer than BPF_OBJ_NAME_LEN - 1"
            );
        }
    }
}
