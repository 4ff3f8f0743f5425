//! Turns per-process kernel counters (absolute, per tgid) into per-series counters that never go
//! backwards while the series exists, even as its processes exec, exit and are forgotten.
//!
//! A series is `(comm, cgroup[, pid])`. Each tracked process remembers the series it belongs to
//! and a baseline (the kernel value when it joined that series). A series' value is what its
//! departed processes left behind (`retired`) plus, for each live member, `latest - baseline`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use stallwatch_common::sched::SchedStats;

/// Absolute kernel counters of one process: monotonic while its kernel entries live.
pub trait Counters: Clone + PartialEq + std::fmt::Debug {
    fn zero() -> Self;
    fn add(&mut self, other: &Self);
    /// `self - earlier`, or `None` if any counter went backwards (the entry was recreated).
    fn checked_sub(&self, earlier: &Self) -> Option<Self>;
    /// How much happened (events observed): ranks series for the series budget.
    fn activity(&self) -> u64;
    /// Values of different classes are never summed into one overflow series (the gc
    /// probe's runtimes: a series' `runtime` label comes from its value).
    fn fold_class(&self) -> u32 {
        0
    }
}

/// The kernel ABI's per-process aggregates already have `ZERO`, `add` and `checked_sub`;
/// each names what counts as activity, and optionally its overflow class.
macro_rules! counters_from_abi {
    ($($t:ty => $activity:expr $(, class $class:expr)?);* $(;)?) => {$(
        impl Counters for $t {
            fn activity(&self) -> u64 {
                let f: fn(&$t) -> u64 = $activity;
                f(self)
            }
            $(
                fn fold_class(&self) -> u32 {
                    let f: fn(&$t) -> u32 = $class;
                    f(self)
                }
            )?
            fn zero() -> Self {
                Self::ZERO
            }
            fn add(&mut self, other: &Self) {
                Self::add(self, other)
            }
            fn checked_sub(&self, earlier: &Self) -> Option<Self> {
                Self::checked_sub(self, earlier)
            }
        }
    )*};
}

counters_from_abi!(
    SchedStats => |s| s.runq.count() + s.cswch_voluntary + s.cswch_involuntary;
    stallwatch_common::tcp::TcpStats => |s| {
        s.outbound.iter().chain(&s.inbound).sum::<u64>()
            + s.rtt.count()
            + s.retransmits
            + s.resets_sent
            + s.resets_received
    };
    // Pauses of different runtimes never share an overflow series (the label comes from it).
    stallwatch_common::gc::GcStats => |s| s.pause.iter().map(|h| h.count()).sum(),
        class |s| s.runtime;
);

/// What a process's cgroup says it belongs to: a container of a pod, or a systemd unit. Empty
/// strings where the path says nothing. Pod, namespace and container names are looked up from
/// these when series are rendered (the Kubernetes API may learn of a pod after its processes).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner {
    pub pod_uid: String,
    pub container_id: String,
    pub unit: String,
}

/// Who a process is, as far as labels go.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub comm: String,
    pub cgroup: String,
    pub owner: Owner,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesKey {
    pub comm: String,
    pub cgroup: String,
    pub owner: Owner,
    /// Set only with `--per-pid`.
    pub pid: Option<u32>,
}

impl SeriesKey {
    /// The series the series budget folds the least active keys into.
    pub fn overflow() -> SeriesKey {
        SeriesKey {
            comm: OVERFLOW_COMM.into(),
            cgroup: String::new(),
            owner: Owner::default(),
            pid: None,
        }
    }
}

/// `comm` of the overflow series.
pub const OVERFLOW_COMM: &str = "_other";

#[derive(Debug)]
struct Tracked<V> {
    key: SeriesKey,
    baseline: V,
    latest: V,
}

#[derive(Debug)]
struct Series<V> {
    retired: V,
    live: usize,
    /// When the last live member left; the series is removed `exit_grace` later.
    idle_since: Option<Instant>,
}

impl<V: Counters> Series<V> {
    fn new() -> Self {
        Series {
            retired: V::zero(),
            live: 0,
            idle_since: None,
        }
    }
}

/// What happened while folding, for self-metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FoldStats {
    /// A tgid's kernel counters went backwards: its entry was recreated behind our back.
    pub restarted: u64,
}

#[derive(Debug)]
pub struct ProcessAggregator<V> {
    per_pid: bool,
    exit_grace: Duration,
    tracked: HashMap<u32, Tracked<V>>,
    series: HashMap<SeriesKey, Series<V>>,
    pub fold_stats: FoldStats,
}

impl<V: Counters> ProcessAggregator<V> {
    pub fn new(per_pid: bool, exit_grace: Duration) -> Self {
        ProcessAggregator {
            per_pid,
            exit_grace,
            tracked: HashMap::new(),
            series: HashMap::new(),
            fold_stats: FoldStats::default(),
        }
    }

    fn key(&self, tgid: u32, id: Identity) -> SeriesKey {
        SeriesKey {
            comm: id.comm,
            cgroup: id.cgroup,
            owner: id.owner,
            pid: self.per_pid.then_some(tgid),
        }
    }

    fn join(&mut self, key: &SeriesKey) {
        let s = self.series.entry(key.clone()).or_insert_with(Series::new);
        s.live += 1;
        s.idle_since = None;
    }

    /// Moves a member's contribution into its series' retired total and detaches it.
    fn leave(&mut self, key: &SeriesKey, contribution: &V, now: Instant) {
        let s = self.series.entry(key.clone()).or_insert_with(Series::new);
        s.retired.add(contribution);
        s.live = s.live.saturating_sub(1);
        if s.live == 0 {
            s.idle_since = Some(now);
        }
    }

    /// Folds one full read of the kernel map. `resolve` names a tgid not seen before; it returns
    /// `None` when the process is already gone (its exit event will carry its identity).
    /// Returns the tgids that could not be resolved.
    pub fn update(
        &mut self,
        snapshot: &[(u32, V)],
        mut resolve: impl FnMut(u32) -> Option<Identity>,
    ) -> Vec<u32> {
        let mut unresolved = Vec::new();
        for (tgid, stats) in snapshot {
            if let Some(t) = self.tracked.get_mut(tgid) {
                if stats.checked_sub(&t.latest).is_none() {
                    // Went backwards since the last read: the entry was recreated. Keep what
                    // the old one had, start over from zero.
                    let old = t.latest.checked_sub(&t.baseline).unwrap_or(V::zero());
                    let key = t.key.clone();
                    t.baseline = V::zero();
                    t.latest = stats.clone();
                    self.fold_stats.restarted += 1;
                    if let Some(s) = self.series.get_mut(&key) {
                        s.retired.add(&old);
                    }
                    continue;
                }
                t.latest = stats.clone();
                continue;
            }
            match resolve(*tgid) {
                Some(id) => {
                    let key = self.key(*tgid, id);
                    self.join(&key);
                    self.tracked.insert(
                        *tgid,
                        Tracked {
                            key,
                            baseline: V::zero(),
                            latest: stats.clone(),
                        },
                    );
                }
                None => unresolved.push(*tgid),
            }
        }
        unresolved
    }

    /// The process is gone. `last` is its final kernel value (read just before the entry was
    /// deleted), `fallback` its identity from the exit event, used if we never tracked it.
    pub fn on_exit(&mut self, tgid: u32, last: Option<V>, fallback: Identity, now: Instant) {
        match self.tracked.remove(&tgid) {
            Some(t) => {
                let final_stats = last.unwrap_or_else(|| t.latest.clone());
                let contribution = final_stats
                    .checked_sub(&t.baseline)
                    .or_else(|| t.latest.checked_sub(&t.baseline))
                    .unwrap_or(V::zero());
                self.leave(&t.key, &contribution, now);
            }
            None => {
                let Some(last) = last else { return };
                let key = self.key(tgid, fallback);
                self.join(&key);
                self.leave(&key, &last, now);
            }
        }
    }

    /// The process replaced its image: what it did so far stays with the old identity.
    /// `current` is its kernel value at (about) the exec.
    pub fn on_exec(&mut self, tgid: u32, current: Option<V>, new: Identity, now: Instant) {
        let new_key = self.key(tgid, new);
        let Some(t) = self.tracked.get(&tgid) else {
            return; // not tracked yet: the next update resolves it under its new name
        };
        if t.key == new_key {
            return;
        }
        let current = current.unwrap_or_else(|| t.latest.clone());
        let contribution = current.checked_sub(&t.baseline).unwrap_or(V::zero());
        let old_key = t.key.clone();
        self.leave(&old_key, &contribution, now);
        self.join(&new_key);
        let t = self.tracked.get_mut(&tgid).expect("checked above");
        t.key = new_key;
        t.baseline = current.clone();
        t.latest = current;
    }

    pub fn tracked_tgids(&self) -> impl Iterator<Item = u32> + '_ {
        self.tracked.keys().copied()
    }

    pub fn is_tracked(&self, tgid: u32) -> bool {
        self.tracked.contains_key(&tgid)
    }

    /// Drops series whose last process left more than `exit_grace` ago, and gives back the
    /// table space a burst of processes left behind.
    pub fn expire(&mut self, now: Instant) -> usize {
        let grace = self.exit_grace;
        let before = self.series.len();
        self.series.retain(|_, s| match s.idle_since {
            Some(t) => now.saturating_duration_since(t) < grace,
            None => true,
        });
        shrink(&mut self.series);
        shrink(&mut self.tracked);
        before - self.series.len()
    }

    pub fn tracked_processes(&self) -> usize {
        self.tracked.len()
    }

    /// Current value of every series, sorted by key for stable output.
    pub fn series(&self) -> Vec<(SeriesKey, V)> {
        let mut out: HashMap<&SeriesKey, V> = self
            .series
            .iter()
            .map(|(k, s)| (k, s.retired.clone()))
            .collect();
        for t in self.tracked.values() {
            if let (Some(v), Some(delta)) = (out.get_mut(&t.key), t.latest.checked_sub(&t.baseline))
            {
                v.add(&delta);
            }
        }
        let mut v: Vec<_> = out.into_iter().map(|(k, s)| (k.clone(), s)).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// Maps hold their values inline and keep their capacity when emptied: after 10,000
/// short-lived processes, tables sized for them would stay allocated (tens of MiB with
/// histogram values). Shrinks a map that uses less than a quarter of its capacity.
pub fn shrink<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > 64 && map.len() * 4 < map.capacity() {
        map.shrink_to(map.len() * 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    type SchedAggregator = ProcessAggregator<SchedStats>;

    fn stats(vol: u64, runq_ns: u64) -> SchedStats {
        let mut s = SchedStats::ZERO;
        s.cswch_voluntary = vol;
        if runq_ns > 0 {
            s.runq.observe(runq_ns);
        }
        s
    }

    fn id(comm: &str) -> Identity {
        Identity {
            comm: comm.into(),
            cgroup: "/".into(),
            owner: Owner::default(),
        }
    }

    fn only(agg: &SchedAggregator) -> SchedStats {
        let s = agg.series();
        assert_eq!(s.len(), 1, "{s:?}");
        s[0].1
    }

    #[test]
    fn processes_with_one_comm_share_a_series_and_exits_do_not_go_backwards() {
        let t0 = Instant::now();
        let mut agg = SchedAggregator::new(false, Duration::from_secs(300));
        agg.update(&[(10, stats(5, 0)), (11, stats(7, 0))], |_| {
            Some(id("worker"))
        });
        assert_eq!(only(&agg).cswch_voluntary, 12);
        // 10 exits with a final value above its last read; 11 keeps going.
        agg.on_exit(10, Some(stats(6, 0)), id("ignored"), t0);
        agg.update(&[(11, stats(9, 0))], |_| unreachable!());
        assert_eq!(only(&agg).cswch_voluntary, 15);
        assert_eq!(agg.tracked_processes(), 1);
    }

    #[test]
    fn per_pid_splits_series() {
        let mut agg = SchedAggregator::new(true, Duration::from_secs(300));
        agg.update(&[(10, stats(5, 0)), (11, stats(7, 0))], |_| {
            Some(id("worker"))
        });
        let s = agg.series();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].0.pid, Some(10));
        assert_eq!(s[1].1.cswch_voluntary, 7);
    }

    #[test]
    fn short_lived_process_seen_only_at_exit_is_counted_under_its_event_identity() {
        let mut agg = SchedAggregator::new(false, Duration::from_secs(300));
        agg.on_exit(42, Some(stats(3, 2000)), id("short"), Instant::now());
        let s = agg.series();
        assert_eq!(s[0].0.comm, "short");
        assert_eq!(s[0].1.cswch_voluntary, 3);
        assert_eq!(s[0].1.runq.count(), 1);
        // No kernel value at exit (never switched): nothing to add, no empty series.
        agg.on_exit(43, None, id("nothing"), Instant::now());
        assert_eq!(agg.series().len(), 1);
    }

    #[test]
    fn exec_moves_later_activity_to_the_new_identity() {
        let t0 = Instant::now();
        let mut agg = SchedAggregator::new(false, Duration::from_secs(300));
        agg.update(&[(10, stats(4, 0))], |_| Some(id("bash")));
        agg.on_exec(10, Some(stats(5, 0)), id("sleep"), t0);
        agg.update(&[(10, stats(8, 0))], |_| unreachable!());
        let s = agg.series();
        assert_eq!(s.len(), 2);
        let by = |c: &str| {
            s.iter()
                .find(|(k, _)| k.comm == c)
                .unwrap()
                .1
                .cswch_voluntary
        };
        assert_eq!(by("bash"), 5);
        assert_eq!(by("sleep"), 3);
    }

    #[test]
    fn idle_series_expire_after_the_grace_period_only() {
        let t0 = Instant::now();
        let mut agg = SchedAggregator::new(false, Duration::from_secs(300));
        agg.update(&[(10, stats(1, 0)), (11, stats(1, 0))], |p| {
            Some(id(if p == 10 { "a" } else { "b" }))
        });
        agg.on_exit(10, None, id("a"), t0);
        assert_eq!(agg.expire(t0 + Duration::from_secs(299)), 0);
        assert_eq!(agg.expire(t0 + Duration::from_secs(301)), 1);
        let s = agg.series();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].0.comm, "b");
    }

    #[test]
    fn recreated_kernel_entry_keeps_the_series_monotonic() {
        let mut agg = SchedAggregator::new(false, Duration::from_secs(300));
        agg.update(&[(10, stats(100, 0))], |_| Some(id("x")));
        agg.update(&[(10, stats(2, 0))], |_| unreachable!());
        assert_eq!(only(&agg).cswch_voluntary, 102);
        assert_eq!(agg.fold_stats.restarted, 1);
    }

    #[test]
    fn unresolved_tgids_are_reported() {
        let mut agg = SchedAggregator::new(false, Duration::from_secs(300));
        let unresolved = agg.update(&[(10, stats(1, 0)), (11, stats(1, 0))], |p| {
            (p == 10).then(|| id("x"))
        });
        assert_eq!(unresolved, vec![11]);
        assert_eq!(agg.tracked_tgids().collect::<Vec<_>>(), vec![10]);
    }
}
