//! The `sched` probe: owns the scheduler programs and maps; the shared per-process machinery
//! (`process`) folds its snapshots.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context};
use aya::maps::PerCpuHashMap;
use prometheus::proto::MetricFamily;
use stallwatch_common::{names, sched::SchedStats, Counter};

use super::process::{housekeeping, ProcessState, Source, TgidMap};
use super::{attach_tp_btf, KernelCounters, StartCtx};
use crate::loader::KernelInfo;
use crate::metrics;

pub const NAME: &str = "sched";

/// Which programs attach, chosen from the kernel's tracepoint prototypes.
pub struct Plan {
    pub switch: &'static str,
    /// `None` when sched_process_exit has a prototype this agent does not know.
    pub exit: Option<&'static str>,
}

impl Plan {
    pub fn for_kernel(kernel: &KernelInfo, legacy_switch: bool) -> anyhow::Result<Plan> {
        // btf_trace_* prototypes start with the `void *` context argument.
        let switch = match kernel
            .kbtf
            .func_proto_param_count("btf_trace_sched_switch")?
        {
            5 if !legacy_switch => names::PROG_SWITCH,
            4 | 5 => names::PROG_SWITCH_V1,
            n => bail!(
                "unsupported sched_switch tracepoint prototype ({} arguments)",
                n.saturating_sub(1)
            ),
        };
        let exit = match kernel
            .kbtf
            .func_proto_param_count("btf_trace_sched_process_exit")
        {
            Ok(2 | 3) => Some(names::PROG_EXIT),
            _ => None,
        };
        Ok(Plan { switch, exit })
    }

    fn programs(&self) -> Vec<(&'static str, &'static str)> {
        let mut v = vec![
            (self.switch, "sched_switch"),
            (names::PROG_WAKEUP_NEW, "sched_wakeup_new"),
            (names::PROG_FORK, "sched_process_fork"),
        ];
        if let Some(exit) = self.exit {
            v.push((exit, "sched_process_exit"));
        }
        v
    }
}

/// Loads and attaches the scheduler programs; they stay attached as long as `ebpf` lives.
pub fn attach(
    ebpf: &mut aya::Ebpf,
    kernel: &KernelInfo,
    legacy_switch: bool,
) -> anyhow::Result<Vec<&'static str>> {
    let plan = Plan::for_kernel(kernel, legacy_switch)?;
    let mut attached = Vec::new();
    for (prog, tracepoint) in plan.programs() {
        attach_tp_btf(ebpf, kernel, prog, tracepoint)?;
        attached.push(prog);
    }
    Ok(attached)
}

/// `SW_PROC_SCHED`: one per-CPU entry per process.
pub type SchedSource = TgidMap<SchedStats>;

/// Creates zeroed entries for every process alive now, before the programs attach, so the
/// first context switches after attach need no allocation in the scheduler path (the
/// on-demand per-CPU allocator has little cached then). Returns how many.
fn prepopulate(source: &mut SchedSource, max_processes: u32) -> anyhow::Result<usize> {
    let cpus = aya::util::nr_cpus()
        .map_err(|(_, e)| e)
        .context("counting possible CPUs")?;
    // BPF_NOEXIST: never overwrite an entry the programs already fill.
    const BPF_NOEXIST: u64 = 1;
    let mut n = 0;
    for entry in std::fs::read_dir("/proc").context("listing /proc")? {
        let Some(tgid) = entry
            .ok()
            .and_then(|e| e.file_name().to_str()?.parse::<u32>().ok())
        else {
            continue;
        };
        let zero = aya::maps::PerCpuValues::try_from(vec![SchedStats::ZERO; cpus])?;
        if source.procs.insert(tgid, zero, BPF_NOEXIST).is_ok() {
            n += 1;
        } else if n >= max_processes as usize {
            break;
        }
    }
    Ok(n)
}

type State = ProcessState<SchedSource>;

/// The running probe, as the agent sees it.
pub struct SchedProbe {
    state: Arc<Mutex<State>>,
    counters: Arc<KernelCounters>,
    max_processes: u32,
}

impl SchedProbe {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("sched state lock poisoned")
    }
}

pub fn start(ctx: StartCtx<'_>) -> anyhow::Result<super::Started> {
    let map = ctx
        .ebpf
        .take_map(names::MAP_PROC_SCHED)
        .with_context(|| format!("map {} missing from the eBPF object", names::MAP_PROC_SCHED))?;
    let mut source = SchedSource::new(PerCpuHashMap::try_from(map)?);
    let existing = prepopulate(&mut source, ctx.config.max_processes)?;
    log::debug!("pre-created {existing} per-process entries");
    let state = Arc::new(Mutex::new(ProcessState::new(source, ctx.config)));
    ctx.lifecycle
        .subscribe(ctx.ebpf, ctx.kernel, state.clone())?;
    let mut programs = attach(ctx.ebpf, ctx.kernel, ctx.config.legacy_sched_switch)?;
    programs.extend(ctx.lifecycle.programs.iter().copied());
    state.lock().expect("sched state lock poisoned").prime();
    Ok(super::Started {
        probe: Box::new(SchedProbe {
            state: state.clone(),
            counters: ctx.counters,
            max_processes: ctx.config.max_processes,
        }),
        tasks: vec![Box::pin(housekeeping(state, NAME))],
        programs,
    })
}

impl super::Probe for SchedProbe {
    fn name(&self) -> &'static str {
        NAME
    }

    fn families(&self, arrived: Instant) -> Vec<MetricFamily> {
        let mut s = self.lock();
        s.refresh(arrived);
        metrics::sched_families(&s.series())
    }

    fn drops(&self) -> Vec<(&'static str, u64)> {
        let s = self.lock();
        let k = |c| self.counters.get(c);
        let mut v = vec![
            ("thread_state_failed", k(Counter::ThreadStateFailed)),
            ("process_map_full", k(Counter::ProcMapFull)),
            ("process_alloc_failed", k(Counter::ProcAllocFailed)),
            ("offcpu_unmeasured", k(Counter::OffCpuUnmeasured)),
        ];
        v.extend(s.drops.list());
        v
    }

    fn maps(&self) -> Vec<super::MapFill> {
        let s = self.lock();
        vec![
            super::MapFill {
                map: names::MAP_THREADS,
                entries: self
                    .counters
                    .get(Counter::ThreadInserted)
                    .saturating_sub(self.counters.get(Counter::ThreadDeleted)),
                capacity: None,
            },
            super::MapFill {
                map: names::MAP_PROC_SCHED,
                entries: s.source.entries() as u64,
                capacity: Some(u64::from(self.max_processes)),
            },
        ]
    }

    fn tracked_processes(&self) -> usize {
        self.lock().agg.tracked_processes()
    }

    fn series_overflow(&self) -> Option<u64> {
        Some(self.lock().series_overflow())
    }
}
