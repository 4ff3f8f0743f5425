//! What every per-process probe does the same way: read its kernel maps into absolute
//! per-process values, name new processes from /proc, retire them on exit (events, or the
//! sweep when events are lost), re-label them on exec, and fold it all through the pure
//! aggregator. A probe supplies only a [`Source`]: how to read and delete its entries.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use stallwatch_common::ProcEvent;

use super::lifecycle::ProcessEvents;
use crate::aggregate::{Budget, Counters, Identity, ProcessAggregator, SeriesKey};
use crate::procfs::{self, CgroupResolver};

/// How often tracked processes are checked against /proc for exits we were not told about.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// A tgid that stays unresolvable (no /proc entry, no exit event) this many refreshes is
/// folded into the `_unknown` series and forgotten, so the kernel map cannot fill with ghosts.
const UNRESOLVED_LIMIT: u32 = 3;

/// Exited processes are remembered this many refreshes, so entries their last moments
/// created after we retired them still land in their series.
const EXITED_MEMORY: u32 = 3;

/// A probe's kernel maps, as absolute per-process values.
pub trait Source: Send + 'static {
    type Value: Counters + Send;
    /// Every process with entries, and its value; `failed` counts entries that vanished
    /// mid-read.
    fn read_all(&mut self, failed: &mut u64) -> Vec<(u32, Self::Value)>;
    /// One process's current value; `None` if it has no entries.
    fn read_one(&mut self, tgid: u32) -> Option<Self::Value>;
    /// Deletes the process's entries (those `read_one` would read).
    fn remove(&mut self, tgid: u32);
    /// Kernel entries at the last `read_all`.
    fn entries(&self) -> usize;
}

/// A per-CPU hash with one entry per process (`SW_PROC_TCP`), summed over CPUs.
pub struct TgidMap<V: aya::Pod> {
    pub procs: aya::maps::PerCpuHashMap<aya::maps::MapData, u32, V>,
    entries: usize,
}

impl<V: aya::Pod> TgidMap<V> {
    pub fn new(procs: aya::maps::PerCpuHashMap<aya::maps::MapData, u32, V>) -> Self {
        TgidMap { procs, entries: 0 }
    }
}

fn fold_cpus<V: Counters>(values: &[V]) -> V {
    let mut total = V::zero();
    for v in values {
        total.add(v);
    }
    total
}

impl<V: aya::Pod + Counters + Send + Sync> Source for TgidMap<V> {
    type Value = V;

    fn read_all(&mut self, failed: &mut u64) -> Vec<(u32, V)> {
        let mut snapshot = Vec::new();
        for item in self.procs.iter() {
            match item {
                Ok((tgid, values)) => snapshot.push((tgid, fold_cpus(&values))),
                // An entry deleted between get_next_key and lookup: skip it.
                Err(_) => *failed += 1,
            }
        }
        self.entries = snapshot.len();
        snapshot
    }

    fn read_one(&mut self, tgid: u32) -> Option<V> {
        self.procs.get(&tgid, 0).ok().map(|v| fold_cpus(&v))
    }

    fn remove(&mut self, tgid: u32) {
        // ENOENT is fine: another path retired it first.
        let _ = self.procs.remove(&tgid);
    }

    fn entries(&self) -> usize {
        self.entries
    }
}

/// Userspace-side drops, exported beside the kernel's counters.
#[derive(Default, Debug, Clone, Copy)]
pub struct UserDrops {
    /// A tracked process vanished without an exit event (a full ring buffer dropped it, or
    /// the exit program could not attach).
    pub exit_missed: u64,
    /// A process left data but neither /proc nor an event told us who it was.
    pub unattributed: u64,
    /// A kernel map read failed mid-iteration.
    pub map_read_failed: u64,
}

impl UserDrops {
    pub fn list(&self) -> [(&'static str, u64); 3] {
        [
            ("exit_missed", self.exit_missed),
            ("unattributed", self.unattributed),
            ("map_read_failed", self.map_read_failed),
        ]
    }
}

fn unknown() -> Identity {
    Identity {
        comm: "_unknown".into(),
        cgroup: "_unknown".into(),
        owner: Default::default(),
    }
}

pub struct ProcessState<S: Source> {
    pub source: S,
    pub agg: ProcessAggregator<S::Value>,
    budget: Budget<S::Value>,
    cgroups: CgroupResolver,
    proc_root: PathBuf,
    unresolved: HashMap<u32, u32>,
    exited: HashMap<u32, (Identity, u32)>,
    /// When the last map read started: a scrape that arrived before it reuses it.
    last_refresh: Option<Instant>,
    last_sweep: Instant,
    missing_at_last_sweep: HashSet<u32>,
    pub drops: UserDrops,
}

impl<S: Source> ProcessState<S> {
    pub fn new(source: S, config: &crate::config::Config) -> Self {
        ProcessState {
            source,
            agg: ProcessAggregator::new(config.per_pid, config.exit_grace),
            budget: Budget::new(config.max_series as usize),
            cgroups: CgroupResolver::from_system(),
            proc_root: PathBuf::from("/proc"),
            unresolved: HashMap::new(),
            exited: HashMap::new(),
            last_refresh: None,
            last_sweep: Instant::now(),
            missing_at_last_sweep: HashSet::new(),
            drops: UserDrops::default(),
        }
    }

    /// Reads the final value of a process and removes it from the kernel maps.
    fn retire(&mut self, tgid: u32) -> Option<S::Value> {
        let last = self.source.read_one(tgid);
        if last.is_some() {
            self.source.remove(tgid);
        }
        last
    }

    fn identity_from_event(&mut self, ev: &ProcEvent) -> Identity {
        let cgroup = self.cgroups.resolve(ev.cgroup_id);
        Identity {
            comm: procfs::comm_from_bytes(&ev.comm),
            owner: cgroup
                .as_deref()
                .map(crate::attribution::owner_of_path)
                .unwrap_or_default(),
            cgroup: cgroup.unwrap_or_else(|| "_unresolved".to_string()),
        }
    }

    /// Reads the kernel maps and folds them. Scrapes that queued behind a read which started
    /// after they arrived share it, so concurrent scrapes cost one read and none sees data
    /// older than its own arrival.
    pub fn refresh(&mut self, arrived: Instant) {
        if self.last_refresh.is_some_and(|t| t >= arrived) {
            return;
        }
        let now = Instant::now();
        self.last_refresh = Some(now);
        let snapshot = self.source.read_all(&mut self.drops.map_read_failed);
        let proc_root = self.proc_root.clone();
        let unresolved = self
            .agg
            .update(&snapshot, |tgid| procfs::identity(&proc_root, tgid));
        let values: HashMap<u32, S::Value> = snapshot.into_iter().collect();
        let mut still = HashMap::new();
        for tgid in unresolved {
            if let Some((id, _)) = self.exited.get(&tgid) {
                // Entries the process created after we retired it (e.g. a first error
                // just before exit): they belong to its series.
                let id = id.clone();
                let last = self.retire(tgid).or_else(|| values.get(&tgid).cloned());
                self.agg.on_exit(tgid, last, id, now);
                continue;
            }
            let misses = self.unresolved.get(&tgid).copied().unwrap_or(0) + 1;
            if misses >= UNRESOLVED_LIMIT {
                // No /proc entry and no exit event after several refreshes: keep the data
                // under an explicit unknown identity rather than losing it.
                let last = self.retire(tgid).or_else(|| values.get(&tgid).cloned());
                if last.as_ref().is_none_or(|v| *v == S::Value::zero()) {
                    // Nothing to keep: e.g. an entry pre-created at start for a process that
                    // exited before the programs attached.
                    continue;
                }
                self.agg.on_exit(tgid, last, unknown(), now);
                self.drops.unattributed += 1;
            } else {
                still.insert(tgid, misses);
            }
        }
        self.unresolved = still;
        self.exited.retain(|_, (_, left)| {
            *left = left.saturating_sub(1);
            *left > 0
        });
        crate::aggregate::process::shrink(&mut self.exited);
        crate::aggregate::process::shrink(&mut self.unresolved);
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
        let missing: HashSet<u32> = self
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
            self.agg.on_exit(tgid, last, unknown(), now);
            self.drops.exit_missed += 1;
        }
    }

    /// Ends a live process's entries (it stopped being of interest, e.g. it exec'd into
    /// another image): what they counted stays in its series.
    pub fn retire_now(&mut self, tgid: u32) {
        let last = self.retire(tgid);
        let id = procfs::identity(&self.proc_root, tgid).unwrap_or_else(unknown);
        self.agg.on_exit(tgid, last, id, Instant::now());
        self.unresolved.remove(&tgid);
    }

    /// Every series, within the series budget.
    pub fn series(&mut self) -> Vec<(SeriesKey, S::Value)> {
        self.budget.apply(self.agg.series())
    }

    /// Process series folded into the overflow series so far.
    pub fn series_overflow(&self) -> u64 {
        self.budget.overflowed
    }

    /// Tracks the processes alive at start while their /proc entries can still be read.
    pub fn prime(&mut self) {
        self.refresh(Instant::now());
    }
}

impl<S: Source> ProcessEvents for ProcessState<S> {
    fn on_exit(&mut self, ev: &ProcEvent, now: Instant) {
        let last = self.retire(ev.tgid);
        let id = self.identity_from_event(ev);
        self.agg.on_exit(ev.tgid, last, id.clone(), now);
        self.unresolved.remove(&ev.tgid);
        self.exited.insert(ev.tgid, (id, EXITED_MEMORY));
    }

    fn on_exec(&mut self, ev: &ProcEvent, now: Instant) {
        // A reused pid is a new process: it must not inherit the old one's leftovers.
        self.exited.remove(&ev.tgid);
        if self.agg.is_tracked(ev.tgid) {
            let current = self.source.read_one(ev.tgid);
            let mut id = self.identity_from_event(ev);
            if let Some(live) = procfs::identity(&self.proc_root, ev.tgid) {
                id.cgroup = live.cgroup;
                id.owner = live.owner;
            }
            self.agg.on_exec(ev.tgid, current, id, now);
        }
    }
}

/// Folds, sweeps and expires on a timer, so state stays bounded even when nobody scrapes.
pub async fn housekeeping<S: Source>(
    state: std::sync::Arc<std::sync::Mutex<ProcessState<S>>>,
    probe: &'static str,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let state = state.clone();
        tokio::task::spawn_blocking(move || {
            state
                .lock()
                .expect("probe state lock poisoned")
                .refresh(Instant::now())
        })
        .await
        .map_err(|e| anyhow::anyhow!("{probe} housekeeping: {e}"))?;
    }
}
