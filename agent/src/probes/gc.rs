//! The `gc` probe: stop-the-world pauses of Go and the JVM, CPython and V8 collections, per
//! process, with no change to the application.
//!
//! Discovery runs on its own thread: it scans /proc at start, then inspects every process
//! that execs (the lifecycle's exec events). A binary holding a runtime gets its uprobes
//! once, for every process that maps it; each recognised process gets an `SW_PROC_GC` entry,
//! which is also the kernel's process filter. When the last process using a binary exits,
//! its uprobes are detached.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::programs::{ProgramFd, UProbe};
use prometheus::proto::MetricFamily;
use stallwatch_common::gc::{GcStats, Runtime, NUM_RUNTIMES};
use stallwatch_common::{names, Counter, ProcEvent};

use super::lifecycle::ProcessEvents;
use super::process::{ProcessState, Source};
use super::{KernelCounters, StartCtx};
use crate::metrics;
use crate::runtime::{self, uprobe::Pmu, ExeClass, Failure, FileKey, Target};

pub const NAME: &str = "gc";

const PROGRAMS: &[&str] = names::GC_PROGRAMS;

/// Programs that begin a pause; attached after the rest.
const BEGIN_PROGRAMS: &[&str] = &[
    names::PROG_GO_START,
    names::PROG_GO_STOP,
    names::PROG_GO_STOP_NOREASON,
    names::PROG_JVM_BEGIN,
    names::PROG_RT_BEGIN,
];

/// A process linking a runtime library is looked at again after these delays (from its
/// exec), until the library shows up in its maps: the dynamic loader, or the JVM launcher's
/// dlopen, maps it after the exec event.
const RECHECK_AFTER: &[Duration] = &[
    Duration::from_millis(100),
    Duration::from_millis(500),
    Duration::from_secs(2),
    Duration::from_secs(10),
];

/// Executables classified, and binaries analysed: each cache is cleared (of what is not in
/// use) when it reaches this size.
const NEGATIVE_CACHE: usize = 8192;

/// Exec events waiting for discovery, and processes waiting for a recheck; beyond this they
/// are dropped and counted.
const QUEUE: usize = 4096;

/// /proc is rescanned this often for processes no exec event announced: children a runtime
/// forked without exec (gunicorn or multiprocessing workers, say). Their pauses until then
/// are counted as `untracked_process` drops.
const RESCAN: Duration = Duration::from_secs(10);

/// `SW_PROC_GC`: one shared (not per-CPU) entry per process.
pub struct GcSource {
    procs: BpfHashMap<MapData, u32, GcStats>,
    entries: usize,
}

impl Source for GcSource {
    type Value = GcStats;

    fn read_all(&mut self, failed: &mut u64) -> Vec<(u32, GcStats)> {
        let mut out = Vec::new();
        for item in self.procs.iter() {
            match item {
                Ok(kv) => out.push(kv),
                Err(_) => *failed += 1,
            }
        }
        self.entries = out.len();
        out
    }

    fn read_one(&mut self, tgid: u32) -> Option<GcStats> {
        self.procs.get(&tgid, 0).ok()
    }

    fn remove(&mut self, tgid: u32) {
        let _ = self.procs.remove(&tgid);
    }

    fn entries(&self) -> usize {
        self.entries
    }
}

/// A binary's uprobes and the processes using it.
struct Attached {
    target: Arc<Target>,
    /// The file as the first process using it named it, for logs.
    shown: String,
    _links: Vec<OwnedFd>,
    users: HashSet<u32>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct Registered {
    binary: FileKey,
    exe: FileKey,
}

#[derive(Default)]
struct Discovery {
    by_file: HashMap<FileKey, Attached>,
    /// tgid -> the binary its runtime lives in, and its executable when it was registered.
    procs: HashMap<u32, Registered>,
    /// Attach failures by (runtime, reason); `None`: an executable too damaged to tell.
    failures: HashMap<(Option<Runtime>, &'static str), u64>,
    queue_full: u64,
}

struct State {
    ps: ProcessState<GcSource>,
    disc: Discovery,
    queue: SyncSender<u32>,
    /// Executables known to hold no runtime (shared with the worker, which fills it): an
    /// exec of one is dismissed here without waking the worker.
    not_runtime: Arc<Mutex<HashSet<FileKey>>>,
    last_naming: Option<Instant>,
}

impl State {
    /// Ends a registration made for an image the process no longer runs: its pauses so far
    /// stay in its series, its entry goes, its binary loses a user.
    fn forget(&mut self, tgid: u32) {
        if self.disc.procs.contains_key(&tgid) {
            self.ps.retire_now(tgid);
            self.unregister(tgid);
        }
    }

    /// Forgets `tgid` as a user of its binary; detaches the binary's probes if it was the last.
    fn unregister(&mut self, tgid: u32) {
        let Some(Registered { binary: key, .. }) = self.disc.procs.remove(&tgid) else {
            return;
        };
        if let Some(a) = self.disc.by_file.get_mut(&key) {
            a.users.remove(&tgid);
            if a.users.is_empty() {
                let a = self.disc.by_file.remove(&key).expect("present");
                log::info!(
                    "gc: detaching {} probes from {} ({}): no process uses it any more",
                    a.target.runtime.label(),
                    a.shown,
                    a.target.detail
                );
            }
        }
    }
}

impl ProcessEvents for State {
    fn on_exit(&mut self, ev: &ProcEvent, now: Instant) {
        self.ps.on_exit(ev, now);
        self.unregister(ev.tgid);
    }

    fn on_exec(&mut self, ev: &ProcEvent, now: Instant) {
        if let Some(r) = self.disc.procs.get(&ev.tgid) {
            // A rescan that ran between the exec and this event registered the new image
            // already; otherwise the old image's pauses end here and the new one is
            // inspected afresh.
            let exe = PathBuf::from(format!("/proc/{}/exe", ev.tgid));
            if runtime::file_key(&exe).ok() == Some(r.exe) {
                return;
            }
            self.ps.on_exit(ev, now);
            self.unregister(ev.tgid);
        }
        // Gone already (short-lived), or a known non-runtime: nothing to inspect.
        let exe = PathBuf::from(format!("/proc/{}/exe", ev.tgid));
        let Ok(key) = runtime::file_key(&exe) else {
            return;
        };
        if self
            .not_runtime
            .lock()
            .expect("gc cache lock poisoned")
            .contains(&key)
        {
            return;
        }
        if let Err(TrySendError::Full(_)) = self.queue.try_send(ev.tgid) {
            self.disc.queue_full += 1;
        }
    }
}

pub struct GcProbe {
    state: Arc<Mutex<State>>,
    counters: Arc<KernelCounters>,
    max_processes: u32,
}

pub fn start(ctx: StartCtx<'_>) -> anyhow::Result<super::Started> {
    let pmu = Pmu::from_sysfs()?;
    let mut fds = HashMap::new();
    for prog in PROGRAMS {
        let p: &mut UProbe = ctx
            .ebpf
            .program_mut(prog)
            .with_context(|| format!("program {prog} missing from the eBPF object"))?
            .try_into()
            .with_context(|| format!("program {prog} is not a uprobe program"))?;
        p.load()
            .with_context(|| format!("loading {prog} (verifier)"))?;
        let fd: ProgramFd = p.fd()?.try_clone()?;
        fds.insert(*prog, fd);
    }
    let map = ctx
        .ebpf
        .take_map(names::MAP_PROC_GC)
        .with_context(|| format!("map {} missing from the eBPF object", names::MAP_PROC_GC))?;
    let source = GcSource {
        procs: BpfHashMap::try_from(map)?,
        entries: 0,
    };
    let (tx, rx) = sync_channel(QUEUE);
    let not_runtime = Arc::new(Mutex::new(HashSet::new()));
    let state = Arc::new(Mutex::new(State {
        ps: ProcessState::new(source, ctx.config),
        disc: Discovery::default(),
        queue: tx,
        not_runtime: not_runtime.clone(),
        last_naming: None,
    }));
    ctx.lifecycle
        .subscribe(ctx.ebpf, ctx.kernel, state.clone())?;
    let worker = Worker {
        state: state.clone(),
        pmu,
        fds,
        proc_root: PathBuf::from("/proc"),
        exe_cache: HashMap::new(),
        not_runtime,
        targets: HashMap::new(),
        pending: Vec::new(),
        inspected: HashMap::new(),
        only: ctx.config.gc_only_pids.iter().copied().collect(),
        next_scan: Instant::now() + RESCAN,
    };
    // The initial scan runs before start returns, so processes alive now are probed by the
    // time the agent reports ready.
    let mut worker = worker;
    worker.scan();
    std::thread::Builder::new()
        .name("sw-gc-discovery".into())
        .spawn(move || worker.run(rx))
        .context("starting the gc discovery thread")?;
    let mut programs: Vec<&'static str> = PROGRAMS.to_vec();
    programs.extend(ctx.lifecycle.programs.iter().copied());
    Ok(super::Started {
        probe: Box::new(GcProbe {
            state: state.clone(),
            counters: ctx.counters,
            max_processes: ctx.config.max_processes,
        }),
        tasks: vec![Box::pin(housekeeping_gc(state))],
        programs,
    })
}

/// The shared housekeeping, on the inner process state.
async fn housekeeping_gc(state: Arc<Mutex<State>>) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(super::process::SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let state = state.clone();
        tokio::task::spawn_blocking(move || {
            let mut s = state.lock().expect("gc state lock poisoned");
            s.ps.refresh(Instant::now());
            // Processes retired by the sweep (exit events lost) release their binaries.
            let gone: Vec<u32> = s
                .disc
                .procs
                .keys()
                .copied()
                .filter(|t| !crate::procfs::exists(std::path::Path::new("/proc"), *t))
                .collect();
            for t in gone {
                s.unregister(t);
            }
        })
        .await
        .map_err(|e| anyhow::anyhow!("gc housekeeping: {e}"))?;
    }
}

/// Inspects processes and attaches probes; owns the program fds.
struct Worker {
    state: Arc<Mutex<State>>,
    pmu: Pmu,
    fds: HashMap<&'static str, ProgramFd>,
    proc_root: PathBuf,
    /// Executable -> class (negative results bounded by `NEGATIVE_CACHE`).
    exe_cache: HashMap<FileKey, ExeClass>,
    not_runtime: Arc<Mutex<HashSet<FileKey>>>,
    /// Binaries analysed, whether or not attached now (a failed analysis is not retried).
    targets: HashMap<FileKey, Result<Arc<Target>, Failure>>,
    /// (when, tgid, attempt) for processes whose runtime library is not mapped yet.
    pending: Vec<(Instant, u32, usize)>,
    /// Processes inspected, and the executable they had: rescans skip them.
    inspected: HashMap<u32, FileKey>,
    /// Only these processes are looked at (empty: all).
    only: HashSet<u32>,
    next_scan: Instant,
}

impl Worker {
    /// Inspects every process not inspected yet (all of them at start).
    fn scan(&mut self) {
        self.next_scan = Instant::now() + RESCAN;
        let Ok(dir) = std::fs::read_dir(&self.proc_root) else {
            log::warn!("gc: cannot read {}", self.proc_root.display());
            return;
        };
        let me = std::process::id();
        let pids: HashSet<u32> = dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|p| *p != me)
            .collect();
        self.inspected.retain(|pid, _| pids.contains(pid));
        for pid in pids {
            if !self.inspected.contains_key(&pid) {
                // Long-running processes have their libraries mapped: no rechecks needed.
                self.inspect(pid, None);
            }
        }
    }

    fn run(mut self, rx: Receiver<u32>) {
        loop {
            let timeout = self
                .pending
                .iter()
                .map(|(t, _, _)| *t)
                .chain([self.next_scan])
                .min()
                .map_or(RESCAN, |t| t.saturating_duration_since(Instant::now()));
            match rx.recv_timeout(timeout) {
                Ok(tgid) => {
                    // An exec: whatever was inspected under this pid is stale.
                    self.inspected.remove(&tgid);
                    self.inspect(tgid, Some(0));
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            let now = Instant::now();
            let due: Vec<(Instant, u32, usize)> = self
                .pending
                .iter()
                .copied()
                .filter(|(t, _, _)| *t <= now)
                .collect();
            self.pending.retain(|(t, _, _)| *t > now);
            for (_, tgid, attempt) in due {
                self.inspect(tgid, Some(attempt + 1));
            }
            if now >= self.next_scan {
                self.scan();
            }
        }
    }

    fn fail(&self, runtime: Option<Runtime>, pid: u32, what: &str, f: &Failure) {
        if *f == Failure::Gone {
            // Not a failure: the process ended before we got to it.
            log::debug!("gc: pid {pid} exited before it could be inspected");
            return;
        }
        log::warn!(
            "gc: cannot probe {} in pid {pid} ({what}): {f}",
            runtime.map_or("a runtime", |r| r.label())
        );
        let mut s = self.state.lock().expect("gc state lock poisoned");
        *s.disc.failures.entry((runtime, f.reason())).or_default() += 1;
    }

    /// [`Self::inspect_inner`], with a panic (a parser bug on some binary) contained and
    /// counted instead of ending discovery.
    fn inspect(&mut self, pid: u32, recheck: Option<usize>) {
        if !self.only.is_empty() && !self.only.contains(&pid) {
            return;
        }
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.inspect_inner(pid, recheck)
        }));
        if caught.is_err() {
            log::error!(
                "gc: inspecting pid {pid} panicked (a bug: please report it with the binary)"
            );
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            *s.disc.failures.entry((None, "internal_error")).or_default() += 1;
        }
    }

    /// Looks at `pid`; `recheck` is the attempt number for processes that just exec'd
    /// (`None` at the start-up scan).
    fn inspect_inner(&mut self, pid: u32, recheck: Option<usize>) {
        let exe = self.proc_root.join(pid.to_string()).join("exe");
        // Kernel threads have no exe; a vanished process is nothing to report.
        let Ok(key) = runtime::file_key(&exe) else {
            return;
        };
        self.inspected.insert(pid, key);
        let mut opened_exe = None;
        let class = match self.exe_cache.get(&key) {
            Some(c) => *c,
            None => {
                let exe_file = match runtime::open_exe(&self.proc_root, pid) {
                    Ok(o) => o,
                    Err(_) => return, // gone, or a kernel thread
                };
                let c = match runtime::classify(&exe_file.file, &runtime::path_name(&exe)) {
                    Ok(c) => c,
                    Err(Failure::Gone) => return,
                    Err(e) => {
                        // Reported once per file, then treated as no runtime.
                        self.fail(None, pid, &exe_file.shown, &e);
                        ExeClass::NotRuntime
                    }
                };
                if self.exe_cache.len() >= NEGATIVE_CACHE {
                    self.exe_cache.clear();
                    self.not_runtime
                        .lock()
                        .expect("gc cache lock poisoned")
                        .clear();
                }
                self.exe_cache.insert(key, c);
                if c == ExeClass::NotRuntime {
                    self.not_runtime
                        .lock()
                        .expect("gc cache lock poisoned")
                        .insert(key);
                }
                opened_exe = Some(exe_file);
                c
            }
        };
        let (runtime, opened) = match class {
            ExeClass::NotRuntime => {
                // A process registered under an earlier image that no longer holds a runtime.
                self.state
                    .lock()
                    .expect("gc state lock poisoned")
                    .forget(pid);
                return;
            }
            ExeClass::Runtime(r) => {
                match opened_exe.map_or_else(|| runtime::open_exe(&self.proc_root, pid), Ok) {
                    Ok(o) => (r, o),
                    Err(_) => return,
                }
            }
            ExeClass::Linked(r) => match runtime::find_library(&self.proc_root, pid, r) {
                Ok(Some(o)) => (r, o),
                Ok(None) => {
                    // Not mapped yet: rescans look again, and a fresh exec is rechecked soon.
                    self.inspected.remove(&pid);
                    if let Some(attempt) = recheck {
                        if let Some(delay) = RECHECK_AFTER.get(attempt) {
                            if self.pending.len() < QUEUE {
                                self.pending.push((Instant::now() + *delay, pid, attempt));
                            } else {
                                self.state
                                    .lock()
                                    .expect("gc state lock poisoned")
                                    .disc
                                    .queue_full += 1;
                            }
                        }
                    }
                    return;
                }
                Err(Failure::Gone) => return,
                Err(e) => return self.fail(Some(r), pid, "reading its maps", &e),
            },
        };
        let target = match self.targets.get(&opened.key) {
            Some(t) => t.clone(),
            None => {
                let t = runtime::analyse(&opened.file, opened.key, runtime).map(Arc::new);
                match &t {
                    Ok(t) => log::info!(
                        "gc: {} runtime in {} ({}): {} probes",
                        runtime.label(),
                        opened.shown,
                        t.detail,
                        t.probes.len()
                    ),
                    Err(e) => self.fail(Some(runtime), pid, &opened.shown, e),
                }
                // What the file holds is settled; that the process went away or a read
                // failed is not, so those are not remembered.
                if matches!(t, Err(Failure::Gone | Failure::Io(_))) {
                    return;
                }
                if self.targets.len() >= NEGATIVE_CACHE {
                    // Forget analyses of binaries nobody runs now (they are redone if needed).
                    let live: HashSet<FileKey> = {
                        let s = self.state.lock().expect("gc state lock poisoned");
                        s.disc.by_file.keys().copied().collect()
                    };
                    self.targets.retain(|k, _| live.contains(k));
                }
                self.targets.insert(opened.key, t.clone());
                if t.is_err() {
                    return;
                }
                t
            }
        };
        let Ok(target) = target else {
            // Analysed before and failed (logged then): count this process too.
            let e = target.unwrap_err();
            let mut s = self.state.lock().expect("gc state lock poisoned");
            *s.disc
                .failures
                .entry((Some(runtime), e.reason()))
                .or_default() += 1;
            return;
        };
        if let Err(e) = self.register(pid, key, &opened, target) {
            self.fail(Some(runtime), pid, &opened.shown, &e);
        }
    }

    /// Creates the process's entry, then attaches its binary's probes if they are not yet.
    fn register(
        &mut self,
        pid: u32,
        exe: FileKey,
        opened: &runtime::Opened,
        target: Arc<Target>,
    ) -> Result<(), Failure> {
        let mut s = self.state.lock().expect("gc state lock poisoned");
        match s.disc.procs.get(&pid) {
            Some(r) if r.binary == target.key => return Ok(()),
            // Registered under an image it has since replaced.
            Some(_) => s.forget(pid),
            None => {}
        }
        let entry = GcStats {
            runtime: target.runtime as u32,
            ..GcStats::ZERO
        };
        s.ps.source
            .procs
            .insert(pid, entry, 0)
            .map_err(|e| match e {
                aya::maps::MapError::SyscallError(ref se)
                    if se.io_error.raw_os_error() == Some(libc::E2BIG) =>
                {
                    Failure::MapFull
                }
                other => Failure::Attach(format!("creating the process entry: {other}")),
            })?;
        if !s.disc.by_file.contains_key(&target.key) {
            let mut links = Vec::with_capacity(target.probes.len());
            // Ends before begins: a pause beginning while the probes go in must not leave a
            // begin whose end was never seen.
            let (begins, ends): (Vec<_>, Vec<_>) = target
                .probes
                .iter()
                .partition(|p| BEGIN_PROGRAMS.contains(&p.prog));
            for p in ends.into_iter().chain(begins) {
                let fd = self.fds.get(p.prog).expect("every program is loaded");
                match self.pmu.attach(
                    fd.as_fd(),
                    &opened.attach_path(),
                    p.offset,
                    p.retprobe,
                    p.ref_ctr,
                ) {
                    Ok(l) => links.push(l),
                    Err(e) => {
                        s.ps.source.remove(pid);
                        return Err(Failure::Attach(format!(
                            "{} at {:#x}: {e}",
                            p.prog, p.offset
                        )));
                    }
                }
            }
            s.disc.by_file.insert(
                target.key,
                Attached {
                    target: target.clone(),
                    shown: opened.shown.clone(),
                    _links: links,
                    users: HashSet::new(),
                },
            );
        }
        s.disc
            .by_file
            .get_mut(&target.key)
            .expect("inserted above")
            .users
            .insert(pid);
        s.disc.procs.insert(
            pid,
            Registered {
                binary: target.key,
                exe,
            },
        );
        // Name the process from /proc soon (an exit event carries only its last thread's
        // name): a refresh reads every entry, so at most one a second.
        let now = Instant::now();
        if s.last_naming
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            s.last_naming = Some(now);
            s.ps.refresh(now);
        }
        Ok(())
    }
}

impl GcProbe {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("gc state lock poisoned")
    }
}

impl super::Probe for GcProbe {
    fn name(&self) -> &'static str {
        NAME
    }

    fn families(&self, arrived: Instant) -> Vec<MetricFamily> {
        let mut s = self.lock();
        s.ps.refresh(arrived);
        let mut processes = [0u64; NUM_RUNTIMES];
        for r in s.disc.procs.values() {
            if let Some(a) = s.disc.by_file.get(&r.binary) {
                processes[a.target.runtime as usize - 1] += 1;
            }
        }
        let failures: Vec<((Option<Runtime>, &'static str), u64)> =
            s.disc.failures.iter().map(|(k, v)| (*k, *v)).collect();
        metrics::gc_families(&s.ps.series(), &processes, &failures)
    }

    fn drops(&self) -> Vec<(&'static str, u64)> {
        let s = self.lock();
        let k = |c| self.counters.get(c);
        let mut v = vec![
            ("inflight_insert_failed", k(Counter::GcInflightFailed)),
            ("untracked_process", k(Counter::GcUntracked)),
            ("unmatched_pause_end", k(Counter::GcUnmatched)),
            ("discovery_queue_full", s.disc.queue_full),
        ];
        v.extend(s.ps.drops.list());
        v
    }

    fn maps(&self) -> Vec<super::MapFill> {
        let s = self.lock();
        vec![super::MapFill {
            map: names::MAP_PROC_GC,
            entries: s.ps.source.entries() as u64,
            capacity: Some(u64::from(self.max_processes)),
        }]
    }

    fn tracked_processes(&self) -> usize {
        self.lock().disc.procs.len()
    }

    fn series_overflow(&self) -> Option<u64> {
        Some(self.lock().ps.series_overflow())
    }
}
