//! The `syscalls` probe: per-process syscall latency by class (or by syscall with
//! `--syscall-names`), errors by errno, and slow-call events, optionally scoped in the kernel
//! to pids and cgroups.

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuHashMap, RingBuf};
use aya::Ebpf;
use prometheus::proto::MetricFamily;
use stallwatch_common::{
    hist::Hist,
    names,
    syscall::{
        SlowSyscall, SyscallErrKey, SyscallKey, FILTER_CGROUPS, FILTER_PIDS, MAX_CGROUP_LEVEL,
        SLOT_UNKNOWN, SYSCALL_TABLE_SIZE,
    },
    Counter,
};

use super::process::{housekeeping, ProcessState, Source};
use super::{attach_tp_btf, KernelCounters, StartCtx};
use crate::aggregate::syscall::{Class, SyscallStats, Table};
use crate::config::Config;
use crate::metrics;
use crate::procfs::{self, CgroupResolver};

pub const NAME: &str = "syscalls";

/// Where the probe times syscalls, resolved from the config before the object loads (the
/// kernel side reads it from frozen globals).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Scope {
    pub filter: u32,
    /// Bit `n` set: some selected cgroup is at level `n` of the v2 hierarchy.
    pub levels: u32,
    /// cgroup v2 ids (directory inode numbers).
    pub cgroups: Vec<u64>,
    pub pids: Vec<u32>,
}

impl Scope {
    pub fn from_config(config: &Config) -> anyhow::Result<Scope> {
        let mut scope = Scope::default();
        if !config.syscall_pids.is_empty() {
            scope.filter |= FILTER_PIDS;
            scope.pids = config.syscall_pids.clone();
        }
        if !config.syscall_cgroups.is_empty() {
            let root = CgroupResolver::from_system().root().map(Path::to_path_buf);
            let Some(root) = root else {
                bail!("--syscall-cgroup needs the cgroup v2 hierarchy, and none is mounted");
            };
            scope.filter |= FILTER_CGROUPS;
            for path in &config.syscall_cgroups {
                let (id, level) = cgroup_id_and_level(&root, path)?;
                scope.cgroups.push(id);
                scope.levels |= 1 << level;
            }
        }
        Ok(scope)
    }
}

/// A cgroup given as a path under the v2 mount (absolute, or relative to the mount like
/// `/system.slice/x.service`): its id and its level (the root is level 0).
pub fn cgroup_id_and_level(root: &Path, path: &Path) -> anyhow::Result<(u64, u32)> {
    let full: PathBuf = if path.starts_with(root) {
        path.to_path_buf()
    } else {
        root.join(path.strip_prefix("/").unwrap_or(path))
    };
    let meta = std::fs::metadata(&full).with_context(|| {
        format!(
            "--syscall-cgroup {}: no such cgroup v2 directory ({})",
            path.display(),
            full.display()
        )
    })?;
    if !meta.is_dir() {
        bail!("--syscall-cgroup {}: not a directory", full.display());
    }
    let rel = full.strip_prefix(root).expect("built under root");
    let level = rel.components().count() as u32;
    if level > MAX_CGROUP_LEVEL {
        bail!(
            "--syscall-cgroup {}: level {level} is deeper than the supported {MAX_CGROUP_LEVEL}",
            full.display()
        );
    }
    Ok((meta.ino(), level))
}

/// A process's latency slots and (slot, errno) error keys.
type KnownKeys = (BTreeSet<u32>, BTreeSet<(u16, u16)>);

/// `SW_SC_STATS` and `SW_SC_ERRORS`: several entries per process, one per slot (and errno).
pub struct SyscallSource {
    stats: PerCpuHashMap<MapData, SyscallKey, Hist>,
    errors: PerCpuHashMap<MapData, SyscallErrKey, u64>,
    by_nr: bool,
    /// Slots and error keys each process had at the last full read: without a key range
    /// scan in a BPF hash, this is how one process's entries are found.
    known: HashMap<u32, KnownKeys>,
    entries: usize,
    /// Of `entries`, those in the error map.
    error_entries: usize,
}

fn fold_hist(values: &[Hist]) -> Hist {
    let mut total = Hist::ZERO;
    for v in values {
        total.add(v);
    }
    total
}

impl SyscallSource {
    fn slots_of(&self, tgid: u32) -> BTreeSet<u32> {
        let mut slots = self
            .known
            .get(&tgid)
            .map(|k| k.0.clone())
            .unwrap_or_default();
        if !self.by_nr {
            // Classes are few: look every one up, so nothing the process did since the last
            // read is missed.
            slots.extend(Class::ALL.iter().map(|c| *c as u32));
            slots.insert(SLOT_UNKNOWN);
        }
        slots
    }
}

impl Source for SyscallSource {
    type Value = SyscallStats;

    fn read_all(&mut self, failed: &mut u64) -> Vec<(u32, SyscallStats)> {
        let mut by_tgid: HashMap<u32, SyscallStats> = HashMap::new();
        let mut known: HashMap<u32, KnownKeys> = HashMap::new();
        let mut entries = 0;
        let mut error_entries = 0;
        for item in self.stats.iter() {
            match item {
                Ok((k, values)) => {
                    entries += 1;
                    by_tgid
                        .entry(k.tgid)
                        .or_default()
                        .latency
                        .insert(k.slot, fold_hist(&values));
                    known.entry(k.tgid).or_default().0.insert(k.slot);
                }
                Err(_) => *failed += 1,
            }
        }
        for item in self.errors.iter() {
            match item {
                Ok((k, values)) => {
                    entries += 1;
                    error_entries += 1;
                    by_tgid
                        .entry(k.tgid)
                        .or_default()
                        .errors
                        .insert((u32::from(k.slot), k.errno), values.iter().sum());
                    known.entry(k.tgid).or_default().1.insert((k.slot, k.errno));
                }
                Err(_) => *failed += 1,
            }
        }
        self.known = known;
        self.entries = entries;
        self.error_entries = error_entries;
        by_tgid.into_iter().collect()
    }

    fn read_one(&mut self, tgid: u32) -> Option<SyscallStats> {
        let mut out = SyscallStats::default();
        let mut found = false;
        for slot in self.slots_of(tgid) {
            if let Ok(v) = self.stats.get(&SyscallKey { tgid, slot }, 0) {
                out.latency.insert(slot, fold_hist(&v));
                found = true;
            }
        }
        let errs = self
            .known
            .get(&tgid)
            .map(|k| k.1.clone())
            .unwrap_or_default();
        for (slot, errno) in errs {
            if let Ok(v) = self.errors.get(&SyscallErrKey { tgid, slot, errno }, 0) {
                out.errors.insert((u32::from(slot), errno), v.iter().sum());
                found = true;
            }
        }
        found.then_some(out)
    }

    fn remove(&mut self, tgid: u32) {
        // ENOENT is fine: a slot the process never used.
        for slot in self.slots_of(tgid) {
            let _ = self.stats.remove(&SyscallKey { tgid, slot });
        }
        if let Some((_, errs)) = self.known.remove(&tgid) {
            for (slot, errno) in errs {
                let _ = self.errors.remove(&SyscallErrKey { tgid, slot, errno });
            }
        }
    }

    fn entries(&self) -> usize {
        self.entries
    }
}

/// A slow call, decoded for logs and the CLI.
#[derive(Debug, Clone, PartialEq)]
pub struct SlowCall {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub cgroup: String,
    pub syscall: String,
    pub class: Class,
    pub duration: Duration,
    pub ret: i64,
}

/// How slots turn into labels: by class, or by syscall number with its class.
pub struct Labeler {
    table: Table,
    by_nr: bool,
}

impl Labeler {
    pub fn new(table: Table, by_nr: bool) -> Self {
        Labeler { table, by_nr }
    }

    pub fn syscall_name(&self, nr: i64) -> String {
        if nr < 0 || nr >= i64::from(SYSCALL_TABLE_SIZE) {
            return "unknown".into();
        }
        match self.table.name(nr as u32) {
            Some(n) => n.to_string(),
            None => format!("sys_{nr}"),
        }
    }

    /// The class, and the syscall name under `--syscall-names`.
    pub fn labels(&self, slot: u32) -> (Class, Option<String>) {
        if self.by_nr {
            let name = if slot == SLOT_UNKNOWN {
                "unknown".to_string()
            } else {
                self.syscall_name(i64::from(slot))
            };
            (self.class_of_nr(slot), Some(name))
        } else {
            (Class::from_index(slot).unwrap_or(Class::Other), None)
        }
    }

    fn class_of_nr(&self, nr: u32) -> Class {
        self.table.name(nr).map(Class::of).unwrap_or(Class::Other)
    }

    pub fn class_of_call(&self, nr: i64) -> Class {
        u32::try_from(nr)
            .map(|nr| self.class_of_nr(nr))
            .unwrap_or(Class::Other)
    }
}

type State = ProcessState<SyscallSource>;

/// Slow-call log lines per second; beyond it, calls are counted, not logged (a node full of
/// idle event loops would otherwise flood the log).
const SLOW_LOG_PER_SEC: u32 = 100;

/// Counters of the slow-call reader.
#[derive(Default)]
struct SlowStats {
    bad_event: std::sync::atomic::AtomicU64,
    log_suppressed: std::sync::atomic::AtomicU64,
}

pub struct SyscallsProbe {
    state: Arc<Mutex<State>>,
    labeler: Arc<Labeler>,
    counters: Arc<KernelCounters>,
    slow: Arc<SlowStats>,
    capacity: u32,
}

fn take(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<aya::maps::Map> {
    ebpf.take_map(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))
}

pub fn start(ctx: StartCtx<'_>) -> anyhow::Result<super::Started> {
    let config = ctx.config;
    let table = Table::host()?;
    log::debug!("syscall table: {} ({} numbers)", table.arch, table.len());
    let by_nr = config.syscall_names;
    // The class of every syscall number, for the kernel's class-keyed aggregation.
    let mut classes: Array<MapData, u32> = Array::try_from(take(ctx.ebpf, names::MAP_SC_CLASSES)?)?;
    for (nr, class) in table
        .class_indexes(SYSCALL_TABLE_SIZE)
        .into_iter()
        .enumerate()
    {
        classes
            .set(nr as u32, class, 0)
            .with_context(|| format!("filling {}", names::MAP_SC_CLASSES))?;
    }
    let scope = Scope::from_config(config)?;
    let mut pids: BpfHashMap<MapData, u32, u8> =
        BpfHashMap::try_from(take(ctx.ebpf, names::MAP_SC_PIDS)?)?;
    for pid in &scope.pids {
        pids.insert(pid, 1, 0)
            .with_context(|| format!("adding pid {pid} to the syscall scope"))?;
    }
    let mut cgroups: BpfHashMap<MapData, u64, u8> =
        BpfHashMap::try_from(take(ctx.ebpf, names::MAP_SC_CGROUPS)?)?;
    for id in &scope.cgroups {
        cgroups
            .insert(id, 1, 0)
            .with_context(|| format!("adding cgroup id {id} to the syscall scope"))?;
    }
    let source = SyscallSource {
        stats: PerCpuHashMap::try_from(take(ctx.ebpf, names::MAP_SC_STATS)?)?,
        errors: PerCpuHashMap::try_from(take(ctx.ebpf, names::MAP_SC_ERRORS)?)?,
        by_nr,
        known: HashMap::new(),
        entries: 0,
        error_entries: 0,
    };
    let slow = RingBuf::try_from(take(ctx.ebpf, names::MAP_SC_SLOW)?)?;
    let state = Arc::new(Mutex::new(ProcessState::new(source, config)));
    ctx.lifecycle
        .subscribe(ctx.ebpf, ctx.kernel, state.clone())?;
    attach_tp_btf(ctx.ebpf, ctx.kernel, names::PROG_SYS_EXIT, "sys_exit")?;
    attach_tp_btf(ctx.ebpf, ctx.kernel, names::PROG_SYS_ENTER, "sys_enter")?;
    let mut programs = vec![names::PROG_SYS_ENTER, names::PROG_SYS_EXIT];
    programs.extend(ctx.lifecycle.programs.iter().copied());
    state.lock().expect("syscalls state lock poisoned").prime();
    let probe = SyscallsProbe {
        state: state.clone(),
        labeler: Arc::new(Labeler::new(table, by_nr)),
        counters: ctx.counters,
        slow: Default::default(),
        capacity: config.syscall_max_entries,
    };
    let reader = slow_events(slow, probe.labeler.clone(), probe.slow.clone());
    Ok(super::Started {
        probe: Box::new(probe),
        tasks: vec![Box::pin(housekeeping(state, NAME)), Box::pin(reader)],
        programs,
    })
}

impl SyscallsProbe {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("syscalls state lock poisoned")
    }
}

impl super::Probe for SyscallsProbe {
    fn name(&self) -> &'static str {
        NAME
    }

    fn families(&self, arrived: Instant) -> Vec<MetricFamily> {
        let mut s = self.lock();
        s.refresh(arrived);
        metrics::syscall_families(&s.series(), &self.labeler)
    }

    fn drops(&self) -> Vec<(&'static str, u64)> {
        let s = self.lock();
        let k = |c| self.counters.get(c);
        let mut v = vec![
            ("thread_state_failed", k(Counter::SyscallThreadFailed)),
            ("process_map_full", k(Counter::SyscallMapFull)),
            ("process_alloc_failed", k(Counter::SyscallAllocFailed)),
            ("slow_ring_full", k(Counter::SlowRingFull)),
            (
                "bad_event",
                self.slow
                    .bad_event
                    .load(std::sync::atomic::Ordering::Relaxed),
            ),
            (
                "slow_log_rate_limited",
                self.slow
                    .log_suppressed
                    .load(std::sync::atomic::Ordering::Relaxed),
            ),
        ];
        v.extend(s.drops.list());
        v
    }

    fn maps(&self) -> Vec<super::MapFill> {
        let s = self.lock();
        let errors = s.source.error_entries;
        vec![
            super::MapFill {
                map: names::MAP_SC_STATS,
                entries: (s.source.entries() - errors) as u64,
                capacity: Some(u64::from(self.capacity)),
            },
            super::MapFill {
                map: names::MAP_SC_ERRORS,
                entries: errors as u64,
                capacity: Some(u64::from(self.capacity)),
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

/// Decodes one ring-buffer record.
pub fn decode_slow(
    raw: &[u8],
    labeler: &Labeler,
    cgroups: &mut CgroupResolver,
) -> Option<SlowCall> {
    if raw.len() < std::mem::size_of::<SlowSyscall>() {
        return None;
    }
    // SAFETY: length checked; SlowSyscall is plain old data; read_unaligned for alignment.
    let ev: SlowSyscall = unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) };
    Some(SlowCall {
        pid: ev.tgid,
        tid: ev.tid,
        comm: procfs::comm_from_bytes(&ev.comm),
        cgroup: cgroups
            .resolve(ev.cgroup_id)
            .unwrap_or_else(|| "_unresolved".into()),
        syscall: labeler.syscall_name(i64::from(ev.nr)),
        class: labeler.class_of_call(i64::from(ev.nr)),
        duration: Duration::from_nanos(ev.duration_ns),
        ret: ev.ret,
    })
}

/// Logs every slow call, at most `SLOW_LOG_PER_SEC` a second.
async fn slow_events(
    ring: RingBuf<MapData>,
    labeler: Arc<Labeler>,
    stats: Arc<SlowStats>,
) -> anyhow::Result<()> {
    let mut cgroups = CgroupResolver::from_system();
    let mut window = Instant::now();
    let mut logged_in_window = 0u32;
    // SAFETY: the ring buffer owns its fd and lives inside the AsyncFd until it is dropped.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
    }
    .map_err(|e| anyhow::anyhow!("registering the slow-syscall ring buffer with tokio: {e}"))?;
    loop {
        let mut guard = fd.readable_mut().await?;
        {
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                let Some(call) = decode_slow(&item, &labeler, &mut cgroups) else {
                    stats
                        .bad_event
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                };
                if window.elapsed() >= Duration::from_secs(1) {
                    window = Instant::now();
                    logged_in_window = 0;
                }
                logged_in_window += 1;
                if logged_in_window > SLOW_LOG_PER_SEC {
                    stats
                        .log_suppressed
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                } else {
                    log::info!(
                    "slow syscall: pid={} tid={} comm={:?} syscall={} class={} duration_ns={} ret={} cgroup={}",
                    call.pid,
                    call.tid,
                    call.comm,
                    call.syscall,
                    call.class.label(),
                    call.duration.as_nanos(),
                    call.ret,
                    call.cgroup
                    );
                }
            }
        }
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_paths_resolve_to_id_and_level() {
        let root = std::env::temp_dir().join(format!("sw-cg-{}", std::process::id()));
        std::fs::create_dir_all(root.join("kubepods.slice/pod1")).unwrap();
        let (id, level) = cgroup_id_and_level(&root, Path::new("/kubepods.slice/pod1")).unwrap();
        assert_eq!(level, 2);
        assert_eq!(
            id,
            std::fs::metadata(root.join("kubepods.slice/pod1"))
                .unwrap()
                .ino()
        );
        let (_, level) = cgroup_id_and_level(&root, &root.join("kubepods.slice")).unwrap();
        assert_eq!(level, 1);
        assert_eq!(cgroup_id_and_level(&root, &root).unwrap().1, 0);
        let e = cgroup_id_and_level(&root, Path::new("/nope")).unwrap_err();
        assert!(
            format!("{e:#}").contains("no such cgroup v2 directory"),
            "{e:#}"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn slots_label_by_class_or_by_syscall() {
        let by_class = Labeler::new(Table::x86_64(), false);
        assert_eq!(by_class.labels(Class::Lock as u32), (Class::Lock, None));
        assert_eq!(by_class.labels(SLOT_UNKNOWN), (Class::Other, None));
        let by_nr = Labeler::new(Table::x86_64(), true);
        assert_eq!(by_nr.labels(202), (Class::Lock, Some("futex".into())));
        assert_eq!(
            by_nr.labels(SLOT_UNKNOWN),
            (Class::Other, Some("unknown".into()))
        );
        assert_eq!(by_nr.syscall_name(-1), "unknown");
        assert_eq!(by_nr.syscall_name(1000), "sys_1000");
    }
}
