//! The `sched` probe: owns the scheduler programs and maps, folds kernel snapshots through the
//! pure aggregator and hands out metric families.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use aya::maps::{MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use aya::programs::BtfTracePoint;
use aya::Ebpf;
use prometheus::proto::MetricFamily;
use stallwatch_common::{
    names, sched::SchedStats, Counter, ProcEvent, EVENT_EXEC, EVENT_EXIT, NUM_COUNTERS,
};

use crate::aggregate::sched::{Identity, SchedAggregator};
use crate::config::Config;
use crate::loader::KernelInfo;
use crate::metrics;
use crate::procfs::{self, CgroupResolver};

pub const NAME: &str = "sched";

/// A tgid that stays unresolvable (no /proc entry, no exit event) this many refreshes is
/// folded into the `_unknown` series and forgotten, so the kernel map cannot fill with ghosts.
const UNRESOLVED_LIMIT: u32 = 3;

/// Which programs attach, chosen from the kernel's tracepoint prototypes.
pub struct Plan {
    pub switch: &'static str,
    /// `None` when sched_process_exit has no `group_dead` argument: exits are then found by
    /// the periodic sweep instead of events.
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
            Ok(3) => Some(names::PROG_EXIT),
            _ => None,
        };
        Ok(Plan { switch, exit })
    }

    fn programs(&self) -> Vec<(&'static str, &'static str)> {
        let mut v = vec![
            (self.switch, "sched_switch"),
            (names::PROG_WAKEUP, "sched_wakeup"),
            (names::PROG_WAKEUP_NEW, "sched_wakeup_new"),
            (names::PROG_EXEC, "sched_process_exec"),
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
    ebpf: &mut Ebpf,
    kernel: &KernelInfo,
    legacy_switch: bool,
) -> anyhow::Result<Vec<&'static str>> {
    let plan = Plan::for_kernel(kernel, legacy_switch)?;
    if plan.exit.is_none() {
        log::warn!(
            "sched_process_exit has no group_dead argument on this kernel; exited processes \
             are retired by the periodic sweep (up to {}s late)",
            SWEEP_INTERVAL.as_secs()
        );
    }
    let mut attached = Vec::new();
    for (prog, tracepoint) in plan.programs() {
        let p: &mut BtfTracePoint = ebpf
            .program_mut(prog)
            .with_context(|| format!("program {prog} missing from the eBPF object"))?
            .try_into()
            .with_context(|| format!("program {prog} is not a tp_btf program"))?;
        p.load(tracepoint, &kernel.btf)
            .with_context(|| format!("loading {prog} for tp_btf/{tracepoint} (verifier)"))?;
        p.attach()
            .with_context(|| format!("attaching {prog} to tp_btf/{tracepoint}"))?;
        attached.push(prog);
    }
    Ok(attached)
}

/// How often tracked processes are checked against /proc for exits we were not told about.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// Userspace-side drops, exported beside the kernel's counters.
#[derive(Default, Debug, Clone, Copy)]
pub struct UserDrops {
    /// A tracked process vanished without an exit event (ring buffer drop, or no exit probe).
    pub exit_missed: u64,
    /// A process left data but neither /proc nor an event told us who it was.
    pub unattributed: u64,
    /// A malformed ring-buffer record.
    pub bad_event: u64,
    /// A kernel map read failed mid-iteration.
    pub map_read_failed: u64,
}

pub struct SchedState {
    procs: PerCpuHashMap<MapData, u32, SchedStats>,
    counters: PerCpuArray<MapData, u64>,
    agg: SchedAggregator,
    cgroups: CgroupResolver,
    proc_root: PathBuf,
    unresolved: HashMap<u32, u32>,
    /// When the last map read started: a scrape that arrived before it reuses it.
    last_refresh: Option<Instant>,
    last_sweep: Instant,
    missing_at_last_sweep: std::collections::HashSet<u32>,
    /// Entries in the per-process map at the last refresh.
    proc_entries: usize,
    max_processes: u32,
    drops: UserDrops,
}

fn fold_cpus(values: &[SchedStats]) -> SchedStats {
    let mut total = SchedStats::ZERO;
    for v in values {
        total.add(v);
    }
    total
}

impl SchedState {
    /// Takes the probe's maps out of `ebpf`; returns the event ring for the event task.
    fn new(
        ebpf: &mut Ebpf,
        per_pid: bool,
        exit_grace: Duration,
        max_processes: u32,
    ) -> anyhow::Result<(Self, RingBuf<MapData>)> {
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} missing from the eBPF object"))
        };
        let procs = PerCpuHashMap::try_from(take(ebpf, names::MAP_PROC_SCHED)?)?;
        let counters = PerCpuArray::try_from(take(ebpf, names::MAP_COUNTERS)?)?;
        let events = RingBuf::try_from(take(ebpf, names::MAP_EVENTS)?)?;
        Ok((
            SchedState {
                procs,
                counters,
                agg: SchedAggregator::new(per_pid, exit_grace),
                cgroups: CgroupResolver::from_system(),
                proc_root: PathBuf::from("/proc"),
                unresolved: HashMap::new(),
                last_refresh: None,
                last_sweep: Instant::now(),
                missing_at_last_sweep: Default::default(),
                proc_entries: 0,
                max_processes,
                drops: UserDrops::default(),
            },
            events,
        ))
    }

    fn read_one(&self, tgid: u32) -> Option<SchedStats> {
        self.procs.get(&tgid, 0).ok().map(|v| fold_cpus(&v))
    }

    /// Reads the final value of a process and removes it from the kernel map.
    fn retire(&mut self, tgid: u32) -> Option<SchedStats> {
        let last = self.read_one(tgid);
        if last.is_some() {
            // ENOENT is fine: another path retired it first.
            let _ = self.procs.remove(&tgid);
        }
        last
    }

    fn identity_from_event(&mut self, ev: &ProcEvent) -> Identity {
        Identity {
            comm: procfs::comm_from_bytes(&ev.comm),
            cgroup: self
                .cgroups
                .resolve(ev.cgroup_id)
                .unwrap_or_else(|| "_unresolved".to_string()),
        }
    }

    pub fn handle_event(&mut self, raw: &[u8], now: Instant) {
        if raw.len() < std::mem::size_of::<ProcEvent>() {
            self.drops.bad_event += 1;
            return;
        }
        // SAFETY: length checked; ProcEvent is plain old data; read_unaligned for alignment.
        let ev: ProcEvent = unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) };
        match ev.kind {
            EVENT_EXIT => {
                let last = self.retire(ev.tgid);
                let id = self.identity_from_event(&ev);
                self.agg.on_exit(ev.tgid, last, id, now);
                self.unresolved.remove(&ev.tgid);
            }
            EVENT_EXEC => {
                if self.agg.is_tracked(ev.tgid) {
                    let current = self.read_one(ev.tgid);
                    let mut id = self.identity_from_event(&ev);
                    if let Some(live) = procfs::identity(&self.proc_root, ev.tgid) {
                        id.cgroup = live.cgroup;
                    }
                    self.agg.on_exec(ev.tgid, current, id, now);
                }
            }
            _ => self.drops.bad_event += 1,
        }
    }

    /// Reads the kernel map and folds it. Scrapes that queued behind a read which started
    /// after they arrived share it, so concurrent scrapes cost one read and none sees data
    /// older than its own arrival.
    pub fn refresh(&mut self, arrived: Instant) {
        if self.last_refresh.is_some_and(|t| t >= arrived) {
            return;
        }
        let now = Instant::now();
        self.last_refresh = Some(now);
        let mut snapshot = Vec::new();
        for item in self.procs.iter() {
            match item {
                Ok((tgid, values)) => snapshot.push((tgid, fold_cpus(&values))),
                // An entry deleted between get_next_key and lookup: skip it.
                Err(_) => self.drops.map_read_failed += 1,
            }
        }
        self.proc_entries = snapshot.len();
        let proc_root = self.proc_root.clone();
        let unresolved = self
            .agg
            .update(&snapshot, |tgid| procfs::identity(&proc_root, tgid));
        let values: HashMap<u32, SchedStats> = snapshot.into_iter().collect();
        let mut still = HashMap::new();
        for tgid in unresolved {
            let misses = self.unresolved.get(&tgid).copied().unwrap_or(0) + 1;
            if misses >= UNRESOLVED_LIMIT {
                // No /proc entry and no exit event after several refreshes: keep the data
                // under an explicit unknown identity rather than losing it.
                let last = self.retire(tgid).or_else(|| values.get(&tgid).copied());
                if last.is_none_or(|v| v == SchedStats::ZERO) {
                    // Nothing to keep: e.g. an entry pre-created at start for a process that
                    // exited before the programs attached.
                    continue;
                }
                let unknown = Identity {
                    comm: "_unknown".into(),
                    cgroup: "_unknown".into(),
                };
                self.agg.on_exit(tgid, last, unknown, now);
                self.drops.unattributed += 1;
            } else {
                still.insert(tgid, misses);
            }
        }
        self.unresolved = still;
        if now.saturating_duration_since(self.last_sweep) >= SWEEP_INTERVAL {
            self.sweep(now);
        }
        self.agg.expire(now);
    }

    /// Retires tracked processes that exited without an exit event reaching us. A process
    /// must be missing from /proc at two sweeps in a row, so an exit event still on its way
    /// is not mistaken for a lost one.
    fn sweep(&mut self, now: Instant) {
        self.last_sweep = now;
        let missing: std::collections::HashSet<u32> = self
            .agg
            .tracked_tgids()
            .filter(|tgid| !procfs::exists(&self.proc_root, *tgid))
            .collect();
        let gone: Vec<u32> = missing
            .intersection(&self.missing_at_last_sweep)
            .copied()
            .collect();
        self.missing_at_last_sweep = missing;
        for tgid in gone {
            let last = self.retire(tgid);
            self.agg.on_exit(
                tgid,
                last,
                Identity {
                    comm: "_unknown".into(),
                    cgroup: "_unknown".into(),
                },
                now,
            );
            self.drops.exit_missed += 1;
        }
    }

    pub fn kernel_counters(&self) -> [u64; NUM_COUNTERS as usize] {
        let mut out = [0u64; NUM_COUNTERS as usize];
        for c in Counter::ALL {
            if let Ok(v) = self.counters.get(&(c as u32), 0) {
                out[c as usize] = v.iter().sum();
            }
        }
        out
    }

    pub fn proc_entries(&self) -> usize {
        self.proc_entries
    }

    pub fn families(&self) -> Vec<MetricFamily> {
        metrics::sched_families(&self.agg.series())
    }

    /// Creates zeroed entries for every process alive now, before the programs attach, so
    /// the first context switches after attach need no allocation in the scheduler path
    /// (the on-demand per-CPU allocator has little cached then). Returns how many.
    fn prepopulate(&mut self) -> anyhow::Result<usize> {
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, e)| e)
            .context("counting possible CPUs")?;
        // BPF_NOEXIST: never overwrite an entry the programs already fill.
        const BPF_NOEXIST: u64 = 1;
        let mut n = 0;
        for entry in std::fs::read_dir(&self.proc_root).context("listing /proc")? {
            let Some(tgid) = entry
                .ok()
                .and_then(|e| e.file_name().to_str()?.parse::<u32>().ok())
            else {
                continue;
            };
            let zero = aya::maps::PerCpuValues::try_from(vec![SchedStats::ZERO; cpus])?;
            if self.procs.insert(tgid, zero, BPF_NOEXIST).is_ok() {
                n += 1;
            } else if n >= self.max_processes as usize {
                break;
            }
        }
        Ok(n)
    }

    /// Tracks the processes alive at start while their /proc entries can still be read.
    fn prime(&mut self) {
        self.refresh(Instant::now());
    }
}

/// The running probe, as the agent sees it.
pub struct SchedProbe {
    state: std::sync::Arc<std::sync::Mutex<SchedState>>,
}

impl SchedProbe {
    fn lock(&self) -> std::sync::MutexGuard<'_, SchedState> {
        self.state.lock().expect("sched state lock poisoned")
    }
}

pub fn start(
    ebpf: &mut Ebpf,
    kernel: &KernelInfo,
    config: &Config,
) -> anyhow::Result<super::Started> {
    let (mut state, ring) = SchedState::new(
        ebpf,
        config.per_pid,
        config.exit_grace,
        config.max_processes,
    )?;
    let existing = state.prepopulate()?;
    log::debug!("pre-created {existing} per-process entries");
    let programs = attach(ebpf, kernel, config.legacy_sched_switch)?;
    state.prime();
    let state = std::sync::Arc::new(std::sync::Mutex::new(state));
    Ok(super::Started {
        probe: Box::new(SchedProbe {
            state: state.clone(),
        }),
        tasks: vec![
            Box::pin(event_loop(ring, state.clone())),
            Box::pin(housekeeping(state)),
        ],
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
        s.families()
    }

    fn drops(&self) -> Vec<(&'static str, u64)> {
        let s = self.lock();
        let k = s.kernel_counters();
        vec![
            (
                "thread_state_failed",
                k[Counter::ThreadStateFailed as usize],
            ),
            ("process_map_full", k[Counter::ProcMapFull as usize]),
            ("process_alloc_failed", k[Counter::ProcAllocFailed as usize]),
            ("event_ring_full", k[Counter::EventRingFull as usize]),
            ("task_read_failed", k[Counter::TaskReadFailed as usize]),
            ("exit_missed", s.drops.exit_missed),
            ("unattributed", s.drops.unattributed),
            ("bad_event", s.drops.bad_event),
            ("map_read_failed", s.drops.map_read_failed),
        ]
    }

    fn maps(&self) -> Vec<super::MapFill> {
        let s = self.lock();
        let k = s.kernel_counters();
        vec![
            super::MapFill {
                map: names::MAP_THREADS,
                entries: k[Counter::ThreadInserted as usize]
                    .saturating_sub(k[Counter::ThreadDeleted as usize]),
                capacity: None,
            },
            super::MapFill {
                map: names::MAP_PROC_SCHED,
                entries: s.proc_entries() as u64,
                capacity: Some(u64::from(s.max_processes)),
            },
        ]
    }

    fn tracked_processes(&self) -> usize {
        self.lock().agg.tracked_processes()
    }
}

/// Folds, sweeps and expires on a timer, so state stays bounded even when nobody scrapes.
pub async fn housekeeping(
    state: std::sync::Arc<std::sync::Mutex<SchedState>>,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let state = state.clone();
        tokio::task::spawn_blocking(move || {
            state
                .lock()
                .expect("sched state lock poisoned")
                .refresh(Instant::now())
        })
        .await
        .context("sched housekeeping")?;
    }
}

/// Reads process events until the ring buffer's fd fails.
pub async fn event_loop(
    ring: RingBuf<MapData>,
    state: std::sync::Arc<std::sync::Mutex<SchedState>>,
) -> anyhow::Result<()> {
    // SAFETY: the ring buffer owns its fd and lives inside the AsyncFd until it is dropped.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
    }
    .map_err(|e| anyhow::anyhow!("registering the event ring buffer with tokio: {e}"))?;
    loop {
        let mut guard = fd.readable_mut().await?;
        {
            let ring = guard.get_inner_mut();
            let mut state = state.lock().expect("sched state lock poisoned");
            let now = Instant::now();
            while let Some(item) = ring.next() {
                state.handle_event(&item, now);
            }
        }
        guard.clear_ready();
    }
}
