//! The `sched` probe: owns the scheduler programs and maps; the shared per-process machinery
//! (`process`) folds its snapshots. The kernel keeps one entry per thread (so a context switch
//! costs one lookup); [`ThreadSource`] sums them per process.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context};
use aya::maps::MapData;
use prometheus::proto::MetricFamily;
use stallwatch_common::{
    names,
    sched::{DeadThreadKey, SchedStats, ThreadSched, THREAD_DEAD},
    Counter,
};

use super::process::{housekeeping, ProcessState, Source};
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

/// `SW_THREADS` (live threads by tid) and `SW_DEAD_THREADS` (ended threads' final values,
/// drained at every read), summed per process.
///
/// A thread that ends while the maps are read is in both or in one, never in neither: live
/// entries are read first, and an ended thread's entry is created before its live one is
/// deleted. Where both are seen, the ended (later, larger) values count. So every process's
/// sum only grows, until [`Source::remove`] starts it over.
pub struct ThreadSource {
    live: aya::maps::HashMap<MapData, u32, ThreadSched>,
    dead: aya::maps::HashMap<MapData, DeadThreadKey, ThreadSched>,
    /// `SW_THREADS`' capacity: bounds a walk of it.
    max_threads: usize,
    /// What each process's ended threads accumulated, since it was last removed.
    ended: HashMap<u32, SchedStats>,
    /// Each process's live threads (tid, start) at the last full read.
    threads: HashMap<u32, Vec<(u32, u64)>>,
    /// Threads (tid, start) drained since the last full read: a live entry of theirs seen
    /// after (the programs create the ended entry, then delete the live one) must not count.
    drained: HashSet<(u32, u64)>,
    /// Live entries marked dead (their values could not move to `SW_DEAD_THREADS`) at the
    /// last read. The programs never touch them again, so at the next read they are complete
    /// and are folded and deleted.
    parked: HashSet<u32>,
    /// Threads (tid, start) of removed processes, for a few reads: should their ended entries
    /// still arrive (a thread that ended as it was being removed), their values were already
    /// taken.
    forget: HashMap<(u32, u64), u32>,
    live_entries: usize,
    dead_entries: usize,
    /// Entries that vanished mid-read since the last full read.
    failed: u64,
}

/// Reads a removed process's late ended entries are recognised for.
const FORGET_READS: u32 = 3;

impl ThreadSource {
    pub fn new(
        live: aya::maps::HashMap<MapData, u32, ThreadSched>,
        dead: aya::maps::HashMap<MapData, DeadThreadKey, ThreadSched>,
        max_threads: u32,
    ) -> Self {
        ThreadSource {
            live,
            dead,
            max_threads: max_threads as usize,
            ended: HashMap::new(),
            threads: HashMap::new(),
            drained: HashSet::new(),
            parked: HashSet::new(),
            forget: HashMap::new(),
            live_entries: 0,
            dead_entries: 0,
            failed: 0,
        }
    }

    /// Folds every ended thread into its process and deletes it (recording it in `drained`).
    fn drain(&mut self) {
        let ended = super::batch::hash_entries(
            &mut self.dead,
            names::MAP_DEAD_THREADS,
            true,
            self.dead_entries,
            self.max_threads,
        );
        self.failed += ended.failed;
        self.dead_entries = ended.keys.len();
        for (key, v) in ended.keys.iter().zip(&ended.values) {
            let id = (key.tid, key.start_ns);
            self.drained.insert(id);
            if !self.forget.contains_key(&id) {
                add_to(&mut self.ended, v.state.tgid, &v.stats);
            }
        }
    }

    /// The process's live threads' values, as of the last full read's thread list.
    fn live_of(&self, tgid: u32) -> Vec<((u32, u64), SchedStats)> {
        let mut v = Vec::new();
        for &(tid, start) in self.threads.get(&tgid).into_iter().flatten() {
            if let Ok(t) = self.live.get(&tid, 0) {
                if t.state.tgid == tgid && t.state.start_ns == start {
                    v.push(((tid, start), t.stats));
                }
            }
        }
        v
    }
}

impl Source for ThreadSource {
    type Value = SchedStats;

    fn read_all(&mut self, failed: &mut u64) -> Vec<(u32, SchedStats)> {
        let live = super::batch::hash_entries(
            &mut self.live,
            names::MAP_THREADS,
            false,
            self.live_entries,
            self.max_threads,
        );
        self.failed += live.failed;
        self.drain();
        self.live_entries = live.keys.len();
        let mut totals: HashMap<u32, SchedStats> = HashMap::new();
        let mut threads: HashMap<u32, Vec<(u32, u64)>> = HashMap::new();
        let mut parked = HashSet::new();
        for (&tid, v) in live.keys.iter().zip(&live.values) {
            let tgid = v.state.tgid;
            if self.drained.contains(&(tid, v.state.start_ns)) {
                // It ended after we read it: its final values were folded.
                continue;
            }
            if v.state.flags & THREAD_DEAD != 0 {
                if self.parked.contains(&tid) {
                    add_to(&mut self.ended, tgid, &v.stats);
                    let _ = self.live.remove(&tid);
                    continue;
                }
                parked.insert(tid);
            }
            add_to(&mut totals, tgid, &v.stats);
            threads
                .entry(tgid)
                .or_default()
                .push((tid, v.state.start_ns));
        }
        for (tgid, e) in &self.ended {
            add_to(&mut totals, *tgid, e);
        }
        self.drained.clear();
        self.forget.retain(|_, left| {
            *left -= 1;
            *left > 0
        });
        self.parked = parked;
        self.threads = threads;
        crate::aggregate::process::shrink(&mut self.ended);
        crate::aggregate::process::shrink(&mut self.forget);
        *failed += std::mem::take(&mut self.failed);
        totals.into_iter().collect()
    }

    fn read_one(&mut self, tgid: u32) -> Option<SchedStats> {
        // Live first, as in read_all: a thread ending meanwhile is found in SW_DEAD_THREADS,
        // and then its final values (in `ended`) count instead.
        let live = self.live_of(tgid);
        self.drain();
        let mut total = self.ended.get(&tgid).copied();
        for (id, stats) in &live {
            if !self.drained.contains(id) {
                total.get_or_insert(SchedStats::ZERO).add(stats);
            }
        }
        total
    }

    fn remove(&mut self, tgid: u32) {
        for (tid, start) in self.threads.remove(&tgid).unwrap_or_default() {
            if self
                .live
                .get(&tid, 0)
                .is_ok_and(|v| v.state.tgid == tgid && v.state.start_ns == start)
            {
                // ENOENT is fine: the thread ended meanwhile (and is forgotten below).
                let _ = self.live.remove(&tid);
            }
            self.forget.insert((tid, start), FORGET_READS);
        }
        self.ended.remove(&tgid);
    }

    fn entries(&self) -> usize {
        self.live_entries
    }
}

/// Adds `stats` to process `tgid`'s sum in `sums`.
fn add_to(sums: &mut HashMap<u32, SchedStats>, tgid: u32, stats: &SchedStats) {
    sums.entry(tgid).or_insert(SchedStats::ZERO).add(stats);
}

/// Creates an entry for every thread alive now, before the programs attach, so their first
/// context switches need no allocation in the scheduler path (the on-demand allocator has
/// little cached then). The programs adopt them at first use. Returns how many.
fn prepopulate(source: &mut ThreadSource, max_threads: u32) -> anyhow::Result<usize> {
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
        // A process that exits meanwhile has no task directory any more: skip it.
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{tgid}/task")) else {
            continue;
        };
        for task in tasks {
            let Some(tid) = task
                .ok()
                .and_then(|e| e.file_name().to_str()?.parse::<u32>().ok())
            else {
                continue;
            };
            if n >= max_threads as usize {
                return Ok(n);
            }
            let mut zero = ThreadSched::ZERO;
            zero.state.tgid = tgid;
            if source.live.insert(tid, zero, BPF_NOEXIST).is_ok() {
                n += 1;
            }
        }
    }
    Ok(n)
}

type State = ProcessState<ThreadSource>;

/// The running probe, as the agent sees it.
pub struct SchedProbe {
    state: Arc<Mutex<State>>,
    counters: Arc<KernelCounters>,
    max_threads: u32,
}

impl SchedProbe {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("sched state lock poisoned")
    }
}

pub fn start(ctx: StartCtx<'_>) -> anyhow::Result<super::Started> {
    let mut take = |name: &str| {
        ctx.ebpf
            .take_map(name)
            .with_context(|| format!("map {name} missing from the eBPF object"))
    };
    let live = aya::maps::HashMap::try_from(take(names::MAP_THREADS)?)?;
    let dead = aya::maps::HashMap::try_from(take(names::MAP_DEAD_THREADS)?)?;
    let mut source = ThreadSource::new(live, dead, ctx.config.max_threads);
    let existing = prepopulate(&mut source, ctx.config.max_threads)?;
    log::debug!("pre-created {existing} per-thread entries");
    let state = Arc::new(Mutex::new(ProcessState::new(source, ctx.config)));
    // Programs on one tracepoint run in attach order, and sw_exit must hand an exiting
    // thread's values over before the lifecycle's program sends the exit event that makes
    // us read them: ours attach first (sched is the first probe to start, KNOWN_PROBES).
    debug_assert!(
        ctx.lifecycle.programs.is_empty(),
        "lifecycle attached before sched"
    );
    let mut programs = attach(ctx.ebpf, ctx.kernel, ctx.config.legacy_sched_switch)?;
    ctx.lifecycle
        .subscribe(ctx.ebpf, ctx.kernel, state.clone())?;
    programs.extend(ctx.lifecycle.programs.iter().copied());
    state.lock().expect("sched state lock poisoned").prime();
    Ok(super::Started {
        probe: Box::new(SchedProbe {
            state: state.clone(),
            counters: ctx.counters,
            max_threads: ctx.config.max_threads,
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
            ("thread_map_full", k(Counter::ThreadMapFull)),
            ("thread_alloc_failed", k(Counter::ThreadAllocFailed)),
            ("thread_slot_busy", k(Counter::ThreadSlotBusy)),
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
                entries: s.source.entries() as u64,
                capacity: Some(u64::from(self.max_threads)),
            },
            super::MapFill {
                map: names::MAP_DEAD_THREADS,
                entries: s.source.dead_entries as u64,
                capacity: Some(u64::from(self.max_threads)),
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
