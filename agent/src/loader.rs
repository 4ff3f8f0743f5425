//! Loads the embedded eBPF object once, with what the kernel's BTF tells us filled in.

use anyhow::Context;
use aya::{Btf, Ebpf, EbpfLoader};
use stallwatch_common::names;

use crate::btf::KernelBtf;
use crate::config::Config;

/// Kernel facts the probes need to pick program variants.
pub struct KernelInfo {
    /// aya's view of vmlinux BTF, to load tp_btf programs.
    pub btf: Btf,
    /// Our view of vmlinux BTF, for offsets and tracepoint prototypes.
    pub kbtf: KernelBtf,
}

impl KernelInfo {
    pub fn from_sys_fs() -> anyhow::Result<Self> {
        let kbtf = KernelBtf::from_sys_fs().context(
            "reading kernel BTF from /sys/kernel/btf/vmlinux (needs a kernel built with CONFIG_DEBUG_INFO_BTF=y)",
        )?;
        let btf = Btf::from_sys_fs().context("parsing /sys/kernel/btf/vmlinux with aya")?;
        Ok(KernelInfo { btf, kbtf })
    }
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; newer ones use memcg. Raising it
/// can fail without CAP_SYS_RESOURCE, which is fine on those newer kernels.
pub fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid pointer to an initialised struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        log::debug!(
            "could not raise RLIMIT_MEMLOCK ({}); fine on kernels >= 5.11",
            std::io::Error::last_os_error()
        );
    }
}

/// Where the scheduler probe finds, in kernel BTF, what it reads from tasks directly: the run
/// queue's clock (through `task->se.cfs_rq->rq`) and the kernel's run-delay accounting.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SchedOffsets {
    pub task_cfs_rq: u32,
    pub cfs_rq_rq: u32,
    pub rq_clock: u32,
    pub run_delay: u32,
    pub last_arrival: u32,
    pub sum_exec: u32,
    pub start_time: u32,
    pub flags: u32,
}

impl SchedOffsets {
    pub fn find(kbtf: &KernelBtf) -> anyhow::Result<SchedOffsets> {
        // `config`: the kernel option a field depends on; the others exist in every kernel
        // with BTF.
        let field = |ty: &str, member: &str, config: Option<&str>| {
            kbtf.member_offset(ty, member).with_context(|| {
                let needs = config
                    .map(|c| format!(" (it needs {c})"))
                    .unwrap_or_default();
                format!(
                    "the sched probe reads {ty}.{member}, which this kernel's BTF lacks{needs}; \
                     leave `sched` out of --probes on this kernel"
                )
            })
        };
        const FAIR_GROUP: Option<&str> = Some("CONFIG_FAIR_GROUP_SCHED");
        const SCHED_INFO: Option<&str> = Some("CONFIG_SCHED_INFO");
        let cfs_rq = field("sched_entity", "cfs_rq", FAIR_GROUP)?;
        let cfs_rq_rq = field("cfs_rq", "rq", FAIR_GROUP)?;
        let sched_info = field("task_struct", "sched_info", SCHED_INFO)?;
        let run_delay = field("sched_info", "run_delay", SCHED_INFO)?;
        let last_arrival = field("sched_info", "last_arrival", SCHED_INFO)?;
        let se = field("task_struct", "se", None)?;
        Ok(SchedOffsets {
            task_cfs_rq: se + cfs_rq,
            cfs_rq_rq,
            rq_clock: field("rq", "clock", None)?,
            run_delay: sched_info + run_delay,
            last_arrival: sched_info + last_arrival,
            sum_exec: se + field("sched_entity", "sum_exec_runtime", None)?,
            start_time: field("task_struct", "start_time", None)?,
            flags: field("task_struct", "flags", None)?,
        })
    }
}

pub fn load(object: &[u8], config: &Config, kernel: &KernelInfo) -> anyhow::Result<Ebpf> {
    raise_memlock();
    let field = |ty: &str, member: &str| {
        kernel
            .kbtf
            .member_offset(ty, member)
            .with_context(|| format!("finding {ty}.{member} in kernel BTF"))
    };
    let pid_off = field("task_struct", "pid")?;
    let tgid_off = field("task_struct", "tgid")?;
    // `__state` since v5.14, `state` before.
    let state_field = if kernel.kbtf.has_member("task_struct", "__state") {
        "__state"
    } else {
        "state"
    };
    let state_off = field("task_struct", state_field)?;
    let signal_off = field("task_struct", "signal")?;
    let live_off = field("signal_struct", "live")?;
    let sched = if config.probe_enabled(crate::probes::sched::NAME) {
        SchedOffsets::find(&kernel.kbtf)?
    } else {
        SchedOffsets::default()
    };
    // The syscall probe's scope and mode are frozen into the object, so the verifier prunes
    // the branches they rule out. A bad scope fails here, before anything loads.
    let scope = if config.probe_enabled(crate::probes::syscalls::NAME) {
        crate::probes::syscalls::Scope::from_config(config)?
    } else {
        if config.syscall_names
            || !config.syscall_pids.is_empty()
            || !config.syscall_cgroups.is_empty()
        {
            log::warn!(
                "syscall options are set but the syscalls probe is not in --probes; they have no effect"
            );
        }
        Default::default()
    };
    let by_nr = u32::from(config.syscall_names);
    let slow_ns = u64::try_from(config.slow_syscall.as_nanos()).unwrap_or(u64::MAX);
    let self_tgid = std::process::id();
    let sk_protocol = field("sock", "sk_protocol")?;
    let sk_err = field("sock", "sk_err")?;
    let sk_err_soft = field("sock", "sk_err_soft")?;
    let tcp_srtt = field("tcp_sock", "srtt_us")?;
    let rtt_ns = u64::try_from(config.tcp_rtt_interval.as_nanos()).unwrap_or(u64::MAX);
    let mut loader = EbpfLoader::new();
    loader
        .btf(Some(&kernel.btf))
        .override_global(names::GLOBAL_TASK_PID_OFFSET, &pid_off, true)
        .override_global(names::GLOBAL_TASK_TGID_OFFSET, &tgid_off, true)
        .override_global(names::GLOBAL_TASK_STATE_OFFSET, &state_off, true)
        .override_global(names::GLOBAL_TASK_SIGNAL_OFFSET, &signal_off, true)
        .override_global(names::GLOBAL_SIGNAL_LIVE_OFFSET, &live_off, true)
        .override_global(names::GLOBAL_TASK_CFS_RQ_OFFSET, &sched.task_cfs_rq, true)
        .override_global(names::GLOBAL_CFS_RQ_RQ_OFFSET, &sched.cfs_rq_rq, true)
        .override_global(names::GLOBAL_RQ_CLOCK_OFFSET, &sched.rq_clock, true)
        .override_global(names::GLOBAL_TASK_RUN_DELAY_OFFSET, &sched.run_delay, true)
        .override_global(
            names::GLOBAL_TASK_LAST_ARRIVAL_OFFSET,
            &sched.last_arrival,
            true,
        )
        .override_global(names::GLOBAL_TASK_SUM_EXEC_OFFSET, &sched.sum_exec, true)
        .override_global(names::GLOBAL_TASK_START_OFFSET, &sched.start_time, true)
        .override_global(names::GLOBAL_TASK_FLAGS_OFFSET, &sched.flags, true)
        .override_global(names::GLOBAL_SC_FILTER, &scope.filter, true)
        .override_global(names::GLOBAL_SC_CG_LEVELS, &scope.levels, true)
        .override_global(names::GLOBAL_SC_BY_NR, &by_nr, true)
        .override_global(names::GLOBAL_SC_SLOW_NS, &slow_ns, true)
        .override_global(names::GLOBAL_SC_SELF_TGID, &self_tgid, true)
        .override_global(names::GLOBAL_SK_PROTOCOL_OFF, &sk_protocol, true)
        .override_global(names::GLOBAL_SK_ERR_OFF, &sk_err, true)
        .override_global(names::GLOBAL_SK_ERR_SOFT_OFF, &sk_err_soft, true)
        .override_global(names::GLOBAL_TCP_SRTT_OFF, &tcp_srtt, true)
        .override_global(names::GLOBAL_TCP_RTT_INTERVAL_NS, &rtt_ns, true)
        // Task- and socket-local storage (SW_SC_THREADS, SW_SOCKS) have no userspace wrapper
        // in aya; only the kernel programs use them.
        .allow_unsupported_maps()
        .map_max_entries(names::MAP_THREADS, config.max_threads)
        .map_max_entries(names::MAP_DEAD_THREADS, config.max_threads)
        .map_max_entries(names::MAP_EVENTS, config.event_buffer)
        .map_max_entries(names::MAP_PROC_TCP, config.max_processes)
        .map_max_entries(names::MAP_PROC_GC, config.max_processes)
        .map_max_entries(names::MAP_SC_STATS, config.syscall_max_entries)
        .map_max_entries(names::MAP_SC_ERRORS, config.syscall_max_entries)
        .map_max_entries(names::MAP_SC_SLOW, config.event_buffer)
        .map_max_entries(
            names::MAP_SC_PIDS,
            u32::try_from(scope.pids.len()).unwrap_or(u32::MAX).max(1),
        )
        .map_max_entries(
            names::MAP_SC_CGROUPS,
            u32::try_from(scope.cgroups.len())
                .unwrap_or(u32::MAX)
                .max(1),
        );
    if !crate::probes::lifecycle::Lifecycle::uses_legacy_exit(kernel, config.legacy_process_exit) {
        // Only the older kernels' exit program uses it: one entry instead of 4,096 (LRU maps
        // are preallocated).
        loader.map_max_entries(names::MAP_EXITED, 1);
    }
    loader
        .load(object)
        .context("loading the eBPF object (creating maps)")
}
