//! `stallwatch diagnose`: where one process's (or one comm's, or one cgroup's) time goes,
//! sampled for a while from the same probes the exporter runs, as a report or as JSON.
//!
//! The agent runs in-process with per-process series; the syscall probe is scoped in the
//! kernel to the target (its pids, or its cgroup), the others key their maps by process
//! anyway. The report is the difference of the target's series between the start and the end
//! of the window, with on-CPU time from /proc (schedstat) as the one signal the probes do not
//! measure.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use prometheus::proto::{MetricFamily, MetricType};
use serde::Serialize;

use crate::app::App;
use crate::config::Config;

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["pid", "comm", "cgroup"])))]
pub struct Args {
    /// The process to diagnose.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Every process with this command name (as in /proc/<pid>/comm) when sampling starts.
    #[arg(long)]
    pub comm: Option<String>,
    /// Every process in this cgroup v2 directory or below (path under the cgroup mount).
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// How long to sample.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Print the report as JSON (schema in docs/diagnose.schema.json).
    #[arg(long)]
    pub json: bool,
}

/// Version of the JSON layout; bumped on any incompatible change.
pub const SCHEMA_VERSION: u32 = 1;

/// A histogram as per-bucket counts (not cumulative); the last bucket is +Inf.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Hist {
    /// Upper bounds in seconds of the finite buckets.
    pub le: Vec<f64>,
    pub counts: Vec<u64>,
    pub sum_seconds: f64,
}

impl Hist {
    pub fn from_proto(h: &prometheus::proto::Histogram) -> Hist {
        let mut le = Vec::new();
        let mut counts = Vec::new();
        let mut prev = 0u64;
        for b in h.get_bucket() {
            le.push(b.upper_bound());
            counts.push(b.cumulative_count().saturating_sub(prev));
            prev = b.cumulative_count();
        }
        counts.push(h.get_sample_count().saturating_sub(prev));
        Hist {
            le,
            counts,
            sum_seconds: h.get_sample_sum(),
        }
    }

    pub fn add(&mut self, o: &Hist) {
        if self.counts.is_empty() {
            *self = o.clone();
            return;
        }
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.sum_seconds += o.sum_seconds;
    }

    pub fn minus(&self, o: Option<&Hist>) -> Hist {
        let Some(o) = o else { return self.clone() };
        Hist {
            le: self.le.clone(),
            counts: self
                .counts
                .iter()
                .zip(o.counts.iter().chain(std::iter::repeat(&0)))
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
            sum_seconds: (self.sum_seconds - o.sum_seconds).max(0.0),
        }
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Upper bound of the bucket holding quantile `q` (None: empty, or the +Inf bucket).
    pub fn quantile_le(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let want = (q * n as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return self.le.get(i).copied();
            }
        }
        None
    }
}

/// Series key inside a family: the labels other than the process ones.
type Key = (String, Vec<(String, String)>);

/// The target's series at one moment, summed over its processes.
#[derive(Debug, Default)]
struct Snapshot {
    hists: BTreeMap<Key, Hist>,
    values: BTreeMap<Key, f64>,
}

const PROCESS_LABELS: &[&str] = &["pid", "comm", "cgroup"];

/// A per-process sample: a histogram or a counter.
pub enum Sample {
    Hist(Hist),
    Value(f64),
}

/// One per-process series: its process labels, family, other labels and sample.
pub struct Series<'a> {
    pub pid: u32,
    pub comm: &'a str,
    pub cgroup: &'a str,
    pub family: &'a str,
    pub labels: Vec<(String, String)>,
    pub sample: Sample,
}

/// Every per-process (pid-labelled) histogram and counter of a gather; what `diagnose` and
/// `top` read.
pub fn per_process(families: &[MetricFamily]) -> impl Iterator<Item = Series<'_>> {
    families.iter().flat_map(|f| {
        f.get_metric().iter().filter_map(move |m| {
            let labels = m.get_label();
            let get = |k: &str| labels.iter().find(|l| l.name() == k).map(|l| l.value());
            let pid = get("pid")?.parse().ok()?;
            let sample = match f.get_field_type() {
                MetricType::HISTOGRAM => Sample::Hist(Hist::from_proto(m.get_histogram())),
                MetricType::COUNTER => Sample::Value(m.get_counter().get_value()),
                _ => return None,
            };
            Some(Series {
                pid,
                comm: get("comm").unwrap_or_default(),
                cgroup: get("cgroup").unwrap_or_default(),
                family: f.name(),
                labels: labels
                    .iter()
                    .filter(|l| !PROCESS_LABELS.contains(&l.name()))
                    .map(|l| (l.name().to_string(), l.value().to_string()))
                    .collect(),
                sample,
            })
        })
    })
}

fn snapshot(families: &[MetricFamily], pids: &HashSet<u32>) -> Snapshot {
    let mut s = Snapshot::default();
    for series in per_process(families).filter(|x| pids.contains(&x.pid)) {
        let key = (series.family.to_string(), series.labels);
        match series.sample {
            Sample::Hist(h) => s.hists.entry(key).or_default().add(&h),
            Sample::Value(v) => *s.values.entry(key).or_default() += v,
        }
    }
    s
}

fn delta(a: &Snapshot, b: &Snapshot) -> Snapshot {
    Snapshot {
        hists: b
            .hists
            .iter()
            .map(|(k, h)| (k.clone(), h.minus(a.hists.get(k))))
            .collect(),
        values: b
            .values
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    (v - a.values.get(k).copied().unwrap_or(0.0)).max(0.0),
                )
            })
            .collect(),
    }
}

impl Snapshot {
    fn hist(&self, family: &str, want: &[(&str, &str)]) -> Hist {
        let mut out = Hist::default();
        for ((f, labels), h) in &self.hists {
            if f == family && matches(labels, want) {
                out.add(h);
            }
        }
        out
    }

    fn value(&self, family: &str, want: &[(&str, &str)]) -> f64 {
        self.values
            .iter()
            .filter(|((f, labels), _)| f == family && matches(labels, want))
            .map(|(_, v)| v)
            .sum()
    }

    /// Distinct values of `label` among `family`'s series.
    fn label_values(&self, family: &str, label: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .hists
            .keys()
            .chain(self.values.keys())
            .filter(|(f, _)| f == family)
            .filter_map(|(_, l)| l.iter().find(|(k, _)| k == label).map(|(_, v)| v.clone()))
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

fn matches(labels: &[(String, String)], want: &[(&str, &str)]) -> bool {
    want.iter()
        .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
}

/// Where the target's thread time went, in seconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TimeSplit {
    pub on_cpu: f64,
    pub runqueue: f64,
    pub sleeping: f64,
    pub uninterruptible: f64,
}

impl TimeSplit {
    pub fn total(&self) -> f64 {
        self.on_cpu + self.runqueue + self.sleeping + self.uninterruptible
    }
    fn percent(&self, part: f64) -> f64 {
        let t = self.total();
        if t > 0.0 {
            100.0 * part / t
        } else {
            0.0
        }
    }
}

#[derive(Debug, Serialize)]
pub struct SyscallClass {
    pub class: String,
    pub count: u64,
    pub seconds: f64,
    pub p99_le_seconds: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct SlowSyscall {
    pub syscall: String,
    pub class: String,
    pub count: u64,
    /// Upper bound of the bucket of the slowest call (None: beyond the last finite bucket).
    pub max_le_seconds: Option<f64>,
    pub seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct Pause {
    pub runtime: String,
    pub cause: String,
    pub count: u64,
    pub seconds: f64,
    pub max_le_seconds: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Verdict {
    /// cpu_starved, cpu_bound, sleeping, io_blocked, runtime_paused, idle.
    pub kind: &'static str,
    pub text: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub schema: u32,
    pub target: String,
    pub pids: Vec<u32>,
    pub duration_seconds: f64,
    /// False if every target process exited before the window ended.
    pub complete: bool,
    pub note: Option<String>,
    pub time_seconds: TimeSplit,
    pub context_switches: f64,
    pub syscalls: Vec<SyscallClass>,
    /// Syscalls by name, slowest single call first (at most 10).
    pub slowest_syscalls: Vec<SlowSyscall>,
    pub syscall_errors: u64,
    pub tcp_connects: u64,
    pub tcp_failed_connects: u64,
    pub pauses: Vec<Pause>,
    /// Share of the window the world was stopped by runtime pauses (summed over processes).
    pub paused_percent_of_wall: f64,
    pub histograms: BTreeMap<String, Hist>,
    pub verdict: Verdict,
}

const RUNQ: &str = "stallwatch_runqueue_latency_seconds";
const OFFCPU: &str = "stallwatch_offcpu_seconds_total";
const OFFCPU_HIST: &str = "stallwatch_offcpu_duration_seconds";
const CSWCH: &str = "stallwatch_context_switches_total";
const SYSCALL: &str = "stallwatch_syscall_latency_seconds";
const SYSCALL_ERR: &str = "stallwatch_syscall_errors_total";
const CONNECT: &str = "stallwatch_tcp_connect_latency_seconds";
const CONNS: &str = "stallwatch_tcp_connections_total";
const PAUSE: &str = "stallwatch_runtime_pause_seconds";

/// Builds the report from the window's deltas and the target's threads as /proc saw them:
/// (thread time, on-CPU, run-queue wait, polls in S, polls in D).
fn build(
    target: String,
    pids: Vec<u32>,
    window: Duration,
    complete: bool,
    note: Option<String>,
    d: &Snapshot,
    proc: (f64, f64, f64, u32, u32),
) -> Report {
    let (thread_time, on_cpu, run_delay, polls_s, polls_d) = proc;
    let runq = d.hist(RUNQ, &[]);
    let vol = d.value(OFFCPU, &[("reason", "voluntary")]);
    let unint = d.value(OFFCPU, &[("reason", "uninterruptible")]);
    // The kernel's accounting (schedstat) gives on-CPU and run-queue time, and what is left
    // of each thread's time was blocked — including intervals that began before the probes
    // attached. That blocked time is split between S and D by the probes' off-CPU intervals
    // when they saw any, else by the thread states sampled each poll.
    let blocked = (thread_time - on_cpu - run_delay).max(0.0);
    let d_share = if vol + unint > 0.0 {
        unint / (vol + unint)
    } else if polls_s + polls_d > 0 {
        f64::from(polls_d) / f64::from(polls_s + polls_d)
    } else {
        0.0
    };
    let time = TimeSplit {
        on_cpu,
        runqueue: run_delay,
        sleeping: blocked * (1.0 - d_share),
        uninterruptible: blocked * d_share,
    };
    let mut syscalls: Vec<SyscallClass> = d
        .label_values(SYSCALL, "class")
        .into_iter()
        .map(|class| {
            let h = d.hist(SYSCALL, &[("class", &class)]);
            SyscallClass {
                class,
                count: h.count(),
                seconds: h.sum_seconds,
                p99_le_seconds: h.quantile_le(0.99),
            }
        })
        .filter(|s| s.count > 0)
        .collect();
    syscalls.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    let mut slowest: Vec<SlowSyscall> = Vec::new();
    for name in d.label_values(SYSCALL, "syscall") {
        let h = d.hist(SYSCALL, &[("syscall", &name)]);
        let Some(last) = h.counts.iter().rposition(|c| *c > 0) else {
            continue;
        };
        let class = d
            .hists
            .iter()
            .find(|((f, l), _)| f == SYSCALL && matches(l, &[("syscall", &name)]))
            .and_then(|((_, l), _)| l.iter().find(|(k, _)| k == "class").map(|(_, v)| v.clone()))
            .unwrap_or_default();
        slowest.push(SlowSyscall {
            syscall: name,
            class,
            count: h.count(),
            max_le_seconds: h.le.get(last).copied(),
            seconds: h.sum_seconds,
        });
    }
    slowest.sort_by(|a, b| {
        let k = |s: &SlowSyscall| s.max_le_seconds.unwrap_or(f64::INFINITY);
        k(b).total_cmp(&k(a)).then(b.seconds.total_cmp(&a.seconds))
    });
    slowest.truncate(10);
    let mut pauses = Vec::new();
    for runtime in d.label_values(PAUSE, "runtime") {
        for cause in d.label_values(PAUSE, "cause") {
            let h = d.hist(PAUSE, &[("runtime", &runtime), ("cause", &cause)]);
            if h.count() > 0 {
                let max_le = h
                    .counts
                    .iter()
                    .rposition(|c| *c > 0)
                    .and_then(|i| h.le.get(i).copied());
                pauses.push(Pause {
                    runtime: runtime.clone(),
                    cause,
                    count: h.count(),
                    seconds: h.sum_seconds,
                    max_le_seconds: max_le,
                });
            }
        }
    }
    // Pauses stop one process at a time: the share is of the target's processes' wall time.
    let paused: f64 = pauses.iter().map(|p| p.seconds).sum();
    let wall = window.as_secs_f64().max(1e-9) * pids.len().max(1) as f64;
    let paused_percent_of_wall = 100.0 * paused / wall;
    let mut histograms = BTreeMap::new();
    histograms.insert("runqueue".to_string(), runq.clone());
    for reason in ["voluntary", "uninterruptible", "involuntary"] {
        histograms.insert(
            format!("offcpu_{reason}"),
            d.hist(OFFCPU_HIST, &[("reason", reason)]),
        );
    }
    histograms.insert("syscalls".to_string(), d.hist(SYSCALL, &[]));
    histograms.insert("tcp_connect".to_string(), d.hist(CONNECT, &[]));
    histograms.insert("runtime_pauses".to_string(), d.hist(PAUSE, &[]));
    for h in histograms.values_mut() {
        if h.counts.is_empty() {
            h.counts.push(0);
        }
    }
    let verdict = verdict(&time, paused_percent_of_wall, &syscalls);
    Report {
        schema: SCHEMA_VERSION,
        target,
        pids,
        duration_seconds: window.as_secs_f64(),
        complete,
        note,
        context_switches: d.value(CSWCH, &[]),
        syscall_errors: d.value(SYSCALL_ERR, &[]) as u64,
        tcp_connects: d.value(CONNS, &[("direction", "outbound")]) as u64,
        tcp_failed_connects: (d.value(CONNS, &[("direction", "outbound")])
            - d.value(
                CONNS,
                &[("direction", "outbound"), ("result", "established")],
            )) as u64,
        time_seconds: time,
        syscalls,
        slowest_syscalls: slowest,
        pauses,
        paused_percent_of_wall,
        histograms,
        verdict,
    }
}

/// Names the dominant stall.
pub fn verdict(t: &TimeSplit, paused_pct: f64, syscalls: &[SyscallClass]) -> Verdict {
    let pct = |x| t.percent(x);
    if t.total() <= 0.0 {
        return Verdict {
            kind: "idle",
            text: "No activity observed: the target did not run or wake up in the window.".into(),
        };
    }
    let top_class = syscalls
        .first()
        .map(|s| format!(" (mostly in {} syscalls)", s.class))
        .unwrap_or_default();
    let parts = [
        (t.runqueue, "cpu_starved"),
        (t.on_cpu, "cpu_bound"),
        (t.sleeping, "sleeping"),
        (t.uninterruptible, "io_blocked"),
    ];
    let (_, kind) = parts
        .iter()
        .copied()
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .expect("four parts");
    // Waiting for a CPU is the stall to name first once it is a large share, even when the
    // thread is on a CPU for longer.
    let kind = if pct(t.runqueue) >= 25.0 {
        "cpu_starved"
    } else {
        kind
    };
    let mut text = match kind {
        "cpu_starved" => format!(
            "CPU-starved: {:.0} % of thread time waiting in the run queue.",
            pct(t.runqueue)
        ),
        "cpu_bound" => format!("CPU-bound: {:.0} % of thread time on a CPU.", pct(t.on_cpu)),
        "sleeping" => format!(
            "Sleeping: {:.0} % of thread time voluntarily off-CPU (waiting for events, timers, locks){top_class}.",
            pct(t.sleeping)
        ),
        _ => format!(
            "Blocked in uninterruptible sleep (disk or other I/O): {:.0} % of thread time{top_class}.",
            pct(t.uninterruptible)
        ),
    };
    if paused_pct >= 5.0 {
        text.push_str(&format!(
            " Runtime pauses stopped it for {paused_pct:.1} % of the window."
        ));
        if paused_pct >= 20.0 {
            return Verdict {
                kind: "runtime_paused",
                text,
            };
        }
    }
    Verdict { kind, text }
}

/// Processes with this comm, now.
fn pids_by_comm(comm: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut v: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|pid: &u32| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim_end_matches('\n') == comm)
        })
        .collect();
    v.sort();
    v
}

/// Processes in the cgroup directory `dir` or below.
fn pids_in_cgroup(dir: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(procs) = std::fs::read_to_string(d.join("cgroup.procs")) {
            out.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if let Ok(rd) = std::fs::read_dir(&d) {
            stack.extend(
                rd.filter_map(|e| e.ok())
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.path()),
            );
        }
    }
    out.sort();
    out.dedup();
    out
}

/// What /proc says of one thread over the window: the kernel's own accounting, which also
/// covers intervals that began before the probes attached (a thread stuck in D for longer
/// than the window never switches back in, so the probes never see that interval end).
#[derive(Debug, Clone, Copy)]
struct ThreadTrack {
    first_seen: Instant,
    last_seen: Instant,
    /// schedstat at first sight and latest: (on-CPU ns, run-queue wait ns).
    base: (u64, u64),
    last: (u64, u64),
    /// Polls that found it in S, and in D.
    in_s: u32,
    in_d: u32,
}

/// Per-thread (tid) tracks of the target, sampled every poll.
#[derive(Default)]
struct Threads(BTreeMap<(u32, u32), ThreadTrack>);

impl Threads {
    fn poll(&mut self, pids: &HashSet<u32>, now: Instant) {
        for &pid in pids {
            let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for t in dir.flatten() {
                let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                let Some(sched) = std::fs::read_to_string(t.path().join("schedstat"))
                    .ok()
                    .and_then(|s| {
                        let mut f = s.split_whitespace().map(|v| v.parse::<u64>().ok());
                        Some((f.next()??, f.next()??))
                    })
                else {
                    continue;
                };
                // State: the field after the parenthesised comm.
                let state = std::fs::read_to_string(t.path().join("stat"))
                    .ok()
                    .and_then(|s| {
                        s.rsplit_once(')')
                            .and_then(|(_, r)| r.trim_start().chars().next())
                    });
                let e = self.0.entry((pid, tid)).or_insert(ThreadTrack {
                    first_seen: now,
                    last_seen: now,
                    base: sched,
                    last: sched,
                    in_s: 0,
                    in_d: 0,
                });
                e.last_seen = now;
                e.last = sched;
                match state {
                    Some('S') => e.in_s += 1,
                    Some('D') => e.in_d += 1,
                    _ => {}
                }
            }
        }
    }

    /// (thread time, on-CPU, run-queue wait, polls in S, polls in D), seconds and counts.
    fn totals(&self) -> (f64, f64, f64, u32, u32) {
        let mut t = (0.0, 0.0, 0.0, 0, 0);
        for tr in self.0.values() {
            t.0 += tr.last_seen.duration_since(tr.first_seen).as_secs_f64();
            t.1 += tr.last.0.saturating_sub(tr.base.0) as f64 / 1e9;
            t.2 += tr.last.1.saturating_sub(tr.base.1) as f64 / 1e9;
            t.3 += tr.in_s;
            t.4 += tr.in_d;
        }
        t
    }
}

/// The pid's thread group id, from /proc/<pid>/status (a thread id has another).
fn tgid_of(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Runs the diagnosis; returns the text or JSON to print.
pub fn run(args: &Args) -> anyhow::Result<String> {
    if args.duration < Duration::from_millis(100) {
        bail!("--duration must be at least 100ms");
    }
    // The report is the output: the agent's informational log lines (slow syscalls,
    // discovery) are noise here.
    log::set_max_level(log::LevelFilter::Warn);
    let missing = crate::check::missing_caps(crate::check::effective_caps());
    if !missing.is_empty() {
        bail!(
            "diagnose loads BPF programs and needs {} (run it as root)",
            missing.join(" and ")
        );
    }
    let mut config = Config {
        probes: vec!["sched".into(), "syscalls".into(), "tcp".into(), "gc".into()],
        per_pid: true,
        // Scoped to the target, so per-syscall series are few: the slowest syscalls by name.
        syscall_names: true,
        // Every pid keeps its own series: diagnose reads per-pid deltas.
        max_series: 0,
        ..Config::default()
    };
    let (target, pids) = match (&args.pid, &args.comm, &args.cgroup) {
        (Some(pid), _, _) => {
            match tgid_of(*pid) {
                None => bail!("no process with pid {pid}"),
                Some(tgid) if tgid != *pid => {
                    bail!("{pid} is a thread of process {tgid}: use --pid {tgid}")
                }
                Some(_) => {}
            }
            config.syscall_pids = vec![*pid];
            (format!("pid {pid}"), vec![*pid])
        }
        (_, Some(comm), _) => {
            let pids = pids_by_comm(comm);
            if pids.is_empty() {
                bail!("no process named {comm:?} (as in /proc/<pid>/comm)");
            }
            config.syscall_pids = pids.clone();
            (format!("comm {comm}"), pids)
        }
        (_, _, Some(cg)) => {
            let root = crate::procfs::CgroupResolver::from_system()
                .root()
                .map(Path::to_path_buf)
                .context("--cgroup needs the cgroup v2 hierarchy, and none is mounted")?;
            let dir = root.join(cg.strip_prefix("/").unwrap_or(cg));
            if !dir.is_dir() {
                bail!("no cgroup v2 directory {}", dir.display());
            }
            config.syscall_cgroups = vec![cg.clone()];
            let pids = pids_in_cgroup(&dir);
            if pids.is_empty() {
                bail!("no process in cgroup {}", dir.display());
            }
            (format!("cgroup {}", cg.display()), pids)
        }
        _ => bail!("give --pid, --comm or --cgroup"),
    };
    // Runtime discovery for the target only (for a cgroup: its processes at the start).
    config.gc_only_pids = pids.clone();
    // Series of target processes that exit must outlive the window.
    config.exit_grace = args.duration + Duration::from_secs(60);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (app, tasks) = App::start(config)?;
    for p in &app.probes {
        if let Err(e) = &p.result {
            eprintln!(
                "stallwatch: probe {} not attached ({e}); its part of the report is empty",
                p.name
            );
        }
    }
    let _tasks: Vec<_> = tasks.into_iter().map(|t| rt.spawn(t)).collect();
    let mut pid_set: HashSet<u32> = pids.iter().copied().collect();
    let mut threads = Threads::default();
    let start = Instant::now();
    threads.poll(&pid_set, start);
    let s0 = snapshot(&app.gather(), &pid_set);
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut complete = true;
    while start.elapsed() < args.duration {
        std::thread::sleep(
            Duration::from_millis(250).min(args.duration.saturating_sub(start.elapsed())),
        );
        if let Some(cg) = &args.cgroup {
            // Processes that joined the cgroup count from when they are seen.
            let root = crate::procfs::CgroupResolver::from_system()
                .root()
                .map(Path::to_path_buf);
            if let Some(root) = root {
                pid_set.extend(pids_in_cgroup(
                    &root.join(cg.strip_prefix("/").unwrap_or(cg)),
                ));
            }
        }
        threads.poll(&pid_set, Instant::now());
        if pid_set
            .iter()
            .all(|p| !Path::new(&format!("/proc/{p}")).exists())
        {
            complete = false;
            break;
        }
        if tty {
            eprint!(
                "\rsampling {target}: {:>4.1} / {:.1} s",
                start.elapsed().as_secs_f64(),
                args.duration.as_secs_f64()
            );
            let _ = std::io::stderr().flush();
        }
    }
    if tty {
        eprintln!();
    }
    // Exit and switch-in events still in flight land before the last read; the window
    // (and /proc's view) extends to it.
    std::thread::sleep(Duration::from_millis(200));
    threads.poll(&pid_set, Instant::now());
    let s1 = snapshot(&app.gather(), &pid_set);
    let window = start.elapsed();
    let note = (!complete).then(|| {
        format!(
            "every target process exited after {:.1} s: the report covers that part of the window",
            window.as_secs_f64()
        )
    });
    let mut pids: Vec<u32> = pid_set.into_iter().collect();
    pids.sort();
    let report = build(
        target,
        pids,
        window,
        complete,
        note,
        &delta(&s0, &s1),
        threads.totals(),
    );
    drop(app);
    rt.shutdown_background();
    Ok(if args.json {
        serde_json::to_string_pretty(&report)? + "\n"
    } else {
        render(&report)
    })
}

/// bcc-style log2 histogram in microseconds.
fn ascii_hist(out: &mut String, title: &str, h: &Hist) {
    use std::fmt::Write;
    if h.count() == 0 {
        return;
    }
    let _ = writeln!(out, "\n{title}");
    let _ = writeln!(out, "{:>22} : {:<8} distribution", "usecs", "count");
    let max = *h.counts.iter().max().unwrap_or(&1).max(&1);
    let first = h.counts.iter().position(|c| *c > 0).unwrap_or(0);
    let last = h.counts.iter().rposition(|c| *c > 0).unwrap_or(0);
    for i in first..=last {
        let lo = if i == 0 { 0.0 } else { h.le[i - 1] * 1e6 };
        let hi =
            h.le.get(i)
                .map(|v| format!("{:.0}", v * 1e6))
                .unwrap_or_else(|| "inf".into());
        let bar = "*".repeat((40 * h.counts[i]).div_ceil(max) as usize);
        let _ = writeln!(
            out,
            "{:>10.0} -> {:<9} : {:<8} |{:<40}|",
            lo, hi, h.counts[i], bar
        );
    }
}

/// The human report.
pub fn render(r: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let t = &r.time_seconds;
    let _ = writeln!(
        out,
        "stallwatch diagnose: {} (pids {}) over {:.1} s",
        r.target,
        r.pids
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(","),
        r.duration_seconds
    );
    if let Some(n) = &r.note {
        let _ = writeln!(out, "note: {n}");
    }
    let _ = writeln!(out, "\nVERDICT  {}", r.verdict.text);
    let _ = writeln!(
        out,
        "\nwhere thread time went ({:.3} s in total):",
        t.total()
    );
    for (name, v) in [
        ("on CPU", t.on_cpu),
        ("waiting for a CPU", t.runqueue),
        ("sleeping (S)", t.sleeping),
        ("uninterruptible (D)", t.uninterruptible),
    ] {
        let pct = t.percent(v);
        let bar = "#".repeat((pct / 2.5).round() as usize);
        let _ = writeln!(out, "  {name:<20} {v:>9.3} s {pct:>5.1} %  {bar}");
    }
    let _ = writeln!(out, "  context switches     {:>9.0}", r.context_switches);
    if !r.pauses.is_empty() {
        let _ = writeln!(
            out,
            "\nruntime pauses ({:.2} % of the window stopped):",
            r.paused_percent_of_wall
        );
        for p in &r.pauses {
            let _ = writeln!(
                out,
                "  {:<7} {:<8} {:>6} pauses {:>10.6} s  longest <= {}",
                p.runtime,
                p.cause,
                p.count,
                p.seconds,
                p.max_le_seconds
                    .map(|s| format!("{:.0} us", s * 1e6))
                    .unwrap_or_else(|| "inf".into())
            );
        }
    }
    if !r.syscalls.is_empty() {
        let _ = writeln!(
            out,
            "\nsyscalls by class (time in the kernel, by thread; {} errors):",
            r.syscall_errors
        );
        for s in r.syscalls.iter().take(8) {
            let _ = writeln!(
                out,
                "  {:<10} {:>9} calls {:>10.3} s  p99 <= {}",
                s.class,
                s.count,
                s.seconds,
                s.p99_le_seconds
                    .map(|v| format!("{:.0} us", v * 1e6))
                    .unwrap_or_else(|| "inf".into())
            );
        }
    }
    if !r.slowest_syscalls.is_empty() {
        let _ = writeln!(out, "\nslowest syscalls (slowest call's bucket):");
        for s in r.slowest_syscalls.iter().take(5) {
            let _ = writeln!(
                out,
                "  {:<16} {:<9} {:>8} calls  slowest <= {}",
                s.syscall,
                s.class,
                s.count,
                s.max_le_seconds
                    .map(|v| format!("{:.0} us", v * 1e6))
                    .unwrap_or_else(|| "inf".into())
            );
        }
    }
    if r.tcp_connects > 0 {
        let _ = writeln!(
            out,
            "\ntcp: {} connects, {} failed",
            r.tcp_connects, r.tcp_failed_connects
        );
    }
    for (key, title) in [
        ("runqueue", "run-queue latency"),
        ("offcpu_voluntary", "off-CPU intervals, voluntary (S)"),
        (
            "offcpu_uninterruptible",
            "off-CPU intervals, uninterruptible (D)",
        ),
        ("syscalls", "syscall latency"),
        ("tcp_connect", "tcp connect latency"),
        ("runtime_pauses", "runtime pauses"),
    ] {
        if let Some(h) = r.histograms.get(key) {
            ascii_hist(&mut out, title, h);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(on: f64, rq: f64, s: f64, d: f64) -> TimeSplit {
        TimeSplit {
            on_cpu: on,
            runqueue: rq,
            sleeping: s,
            uninterruptible: d,
        }
    }

    #[test]
    fn verdicts_name_the_dominant_stall() {
        assert_eq!(
            verdict(&split(1.0, 2.0, 0.0, 0.0), 0.0, &[]).kind,
            "cpu_starved"
        );
        // A large run-queue share is named even when on-CPU time is larger.
        assert_eq!(
            verdict(&split(6.0, 3.0, 1.0, 0.0), 0.0, &[]).kind,
            "cpu_starved"
        );
        assert_eq!(
            verdict(&split(9.0, 0.5, 0.5, 0.0), 0.0, &[]).kind,
            "cpu_bound"
        );
        assert_eq!(
            verdict(&split(0.1, 0.0, 9.9, 0.0), 0.0, &[]).kind,
            "sleeping"
        );
        assert_eq!(
            verdict(&split(0.1, 0.0, 1.0, 8.0), 0.0, &[]).kind,
            "io_blocked"
        );
        assert_eq!(
            verdict(&split(9.0, 0.0, 1.0, 0.0), 30.0, &[]).kind,
            "runtime_paused"
        );
        assert_eq!(verdict(&TimeSplit::default(), 0.0, &[]).kind, "idle");
    }

    #[test]
    fn histogram_deltas_and_quantiles() {
        let a = Hist {
            le: vec![0.001, 0.002],
            counts: vec![1, 0, 0],
            sum_seconds: 0.0005,
        };
        let b = Hist {
            le: vec![0.001, 0.002],
            counts: vec![3, 4, 1],
            sum_seconds: 0.01,
        };
        let d = b.minus(Some(&a));
        assert_eq!(d.counts, vec![2, 4, 1]);
        assert_eq!(d.quantile_le(0.5), Some(0.002));
        assert_eq!(d.quantile_le(0.99), None);
        assert_eq!(Hist::default().quantile_le(0.5), None);
    }
}
