//! `cargo xtask bench`: what the agent costs, measured side by side with its peers, written to
//! BENCHMARKS.md with the commands that produced the numbers. Needs root.
//!
//! 1. BPF cost per event: kernel BPF stats (run time and count per program, via bpftool)
//!    while `perf bench sched pipe` runs pinned to one CPU, with libbpf-tools `runqlat` and
//!    `offcputime` attached in the same run, and an empty bpftrace program on sched_switch as
//!    the floor any program pays per run. Context switches come from /proc/stat `ctxt`.
//! 2. Slowdown: alternating agent-off / agent-on runs of the same pinned sched-pipe benchmark;
//!    medians of the pairs, with the spread.
//! 3. Syscall probe cost per syscall: the same BPF stats while `perf bench syscall basic`
//!    (getppid in a loop) runs pinned, beside libbpf-tools `syscount -L`; and the same with the
//!    probe scoped to another process (the floor an unselected process pays).
//! 4. Syscall slowdown: alternating off/on `perf bench syscall basic`; ns added per syscall.
//! 5. TCP probe cost: BPF stats under a loopback connection storm (swload), beside the
//!    libbpf-tools peers that can attach here (tcplife; tcpconnlat needs kprobes or fentry,
//!    and where it cannot attach, its measurement runs in bpftrace on the tracepoint).
//! 6. gc probe: time added per Go GC (alternating off/on runs forcing GCs), BPF stats of its
//!    programs, and the agent's own CPU time per exec it inspects (non-runtime and Go).
//! 7. The agent itself: RSS idle and under `perf bench sched messaging` (hackbench), its CPU
//!    time, /metrics latency p50/p99 at about 1k series (keys capped by --max-series) and at
//!    the series counts a --per-pid host gives (about 10k and 20k here), kernel map memory.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::{build, cmd, root};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Agent-off/on pairs for the slowdown measurement.
    #[arg(long, default_value_t = 7)]
    pairs: usize,
    /// Messages per `perf bench sched pipe` run.
    #[arg(long, default_value_t = 200_000)]
    loops: u64,
    /// Loopback connections in the TCP storm.
    #[arg(long, default_value_t = 20_000)]
    connections: u64,
    /// getppid calls per `perf bench syscall basic` run.
    #[arg(long, default_value_t = 2_000_000)]
    syscall_loops: u64,
    /// Forced GCs per Go run in the gc section.
    #[arg(long, default_value_t = 2_000)]
    gc_loops: u64,
    /// Execs per measurement of the gc probe's discovery cost.
    #[arg(long, default_value_t = 1_000)]
    execs: u64,
    /// Where to write the report.
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: String,
}

/// A loaded program: (name, run_time_ns, run_cnt), keyed by program id.
type ProgStats = BTreeMap<u64, (String, u64, u64)>;

fn prog_stats() -> anyhow::Result<ProgStats> {
    let out = cmd::output(Command::new("bpftool").args(["prog", "show", "--json"]))?;
    let progs: serde_json::Value = serde_json::from_str(&out).context("parsing bpftool output")?;
    let mut m = BTreeMap::new();
    for p in progs.as_array().into_iter().flatten() {
        let Some(id) = p["id"].as_u64() else { continue };
        let name = p["name"].as_str().unwrap_or("?").to_string();
        let t = p["run_time_ns"].as_u64().unwrap_or(0);
        let c = p["run_cnt"].as_u64().unwrap_or(0);
        m.insert(id, (name, t, c));
    }
    Ok(m)
}

/// Program ids loaded since `before`: the tool just started owns them. (bpftool's `pids`
/// field is not available everywhere, so ownership is taken from load order.)
fn new_ids(before: &ProgStats) -> anyhow::Result<Vec<u64>> {
    Ok(prog_stats()?
        .into_keys()
        .filter(|id| !before.contains_key(id))
        .collect())
}

fn context_switches() -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    stat.lines()
        .find_map(|l| l.strip_prefix("ctxt "))
        .and_then(|v| v.trim().parse().ok())
        .context("no ctxt line in /proc/stat")
}

const PIPE_CPU: &str = "0";

fn sched_pipe_cmd(loops: u64) -> Vec<String> {
    [
        "taskset", "-c", PIPE_CPU, "perf", "bench", "sched", "pipe", "-l",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([loops.to_string()])
    .collect()
}

fn syscall_basic_cmd(loops: u64) -> Vec<String> {
    [
        "taskset", "-c", PIPE_CPU, "perf", "bench", "syscall", "basic", "-l",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([loops.to_string()])
    .collect()
}

/// Runs the pinned sched-pipe benchmark; returns usecs/op.
fn sched_pipe(loops: u64) -> anyhow::Result<f64> {
    perf_bench(&sched_pipe_cmd(loops))
}

/// Runs a `perf bench` command line; returns its usecs/op.
fn perf_bench(argv: &[String]) -> anyhow::Result<f64> {
    let out = cmd::output(Command::new(&argv[0]).args(&argv[1..]))?;
    out.lines()
        .find_map(|l| l.trim().strip_suffix("usecs/op"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no usecs/op in perf output:\n{out}"))
}

struct Agent(Child, String);

impl Agent {
    fn start_with(bin: &std::path::Path, extra: &[&str]) -> anyhow::Result<Agent> {
        let mut child = Command::new(bin)
            .args(["run", "--listen", "127.0.0.1:0"])
            .args(extra)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .context("starting stallwatch")?;
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening on ").nth(1) {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .context("stallwatch did not start listening within 60 s")?;
        Ok(Agent(child, addr))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// An empty program on sched_switch (bpftrace 0.17 has no raw tracepoints): the floor of BPF
/// cost per program run.
const EMPTY_SWITCH_PROGRAM: &str = "tracepoint:sched:sched_switch { }";

/// The same with one `bpf_ktime_get_ns` (bpftrace's `nsecs`), in a test the compiler cannot
/// drop: minus the empty program, what one clock read through the helper costs.
const CLOCK_SWITCH_PROGRAM: &str = "tracepoint:sched:sched_switch { if (nsecs == 0) { exit(); } }";

/// A libbpf-tools peer (or bpftrace) running in the background until dropped.
struct Peer(Child);

impl Peer {
    fn start(argv: &[&str]) -> anyhow::Result<Peer> {
        let child = Command::new(argv[0])
            .args(&argv[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {} (`cargo xtask setup` installs it)", argv[0]))?;
        Ok(Peer(child))
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let _ = self.0.wait();
    }
}

/// Waits (up to 30 s) until a just-started peer has loaded its programs.
fn wait_ids(before: &ProgStats) -> anyhow::Result<Vec<u64>> {
    let t0 = Instant::now();
    loop {
        let ids = new_ids(before)?;
        if !ids.is_empty() {
            // Give it a moment to finish attaching the rest.
            std::thread::sleep(Duration::from_secs(1));
            return new_ids(before);
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("peer loaded no BPF program within 30 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn vulnerability(name: &str) -> String {
    std::fs::read_to_string(format!("/sys/devices/system/cpu/vulnerabilities/{name}"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

struct StatsGuard(String);

impl StatsGuard {
    fn enable() -> anyhow::Result<StatsGuard> {
        let path = "/proc/sys/kernel/bpf_stats_enabled";
        let old = std::fs::read_to_string(path).context("reading kernel.bpf_stats_enabled")?;
        std::fs::write(path, "1").context("enabling kernel.bpf_stats_enabled (needs root)")?;
        Ok(StatsGuard(old.trim().to_string()))
    }
}

impl Drop for StatsGuard {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", &self.0);
    }
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    if args.pairs < 7 {
        bail!("--pairs must be at least 7: the slowdowns are medians of at least 7 pairs");
    }
    crate::setup::run(true)?;
    let bin = build::agent(&build::EbpfArgs::default(), true)?;
    let mut report = String::new();
    let started = Instant::now();
    let pipe = sched_pipe_cmd(args.loops).join(" ");

    // 1. Cost per event, ours and the peers', in one run.
    let (rows, ctxt, usecs_all, alone) = {
        let _stats = StatsGuard::enable()?;
        let mut owners: Vec<(&str, Vec<u64>)> = Vec::new();
        let base = prog_stats()?;
        let _agent = Agent::start_with(&bin, &["--probes", "sched"])?;
        owners.push(("stallwatch", new_ids(&base)?));
        // First alone: without the peers' programs on the same hook (offcputime walks two
        // stacks per switch) evicting what ours touches. After the agent's start-up (its
        // first map reads, /proc and runtime scans), which would otherwise run on the other
        // CPU during the measurement.
        let alone = {
            std::thread::sleep(Duration::from_secs(3));
            let (rows, ctxt, _) = measured_pipe(&owners, args.loops)?;
            rows.iter().map(|r| r.2).sum::<u64>() as f64 / ctxt.max(1) as f64
        };
        // The peers, then the floor (what any program on this hook pays per run here) and the
        // floor with one clock read. Each keeps running until the measurement is done.
        let mut peers = Vec::new();
        for (tool, argv) in [
            ("runqlat", &["runqlat", "3600"][..]),
            ("offcputime", &["offcputime", "3600"][..]),
            ("empty", &["bpftrace", "-e", EMPTY_SWITCH_PROGRAM][..]),
            ("clock", &["bpftrace", "-e", CLOCK_SWITCH_PROGRAM][..]),
        ] {
            let base = prog_stats()?;
            peers.push(Peer::start(argv)?);
            owners.push((tool, wait_ids(&base)?));
        }
        let (rows, ctxt, usecs) = measured_pipe(&owners, args.loops)?;
        (rows, ctxt, usecs, alone)
    };
    let ours_runs: u64 = rows
        .iter()
        .filter(|r| r.0 == "stallwatch")
        .map(|r| r.3)
        .sum();
    let (ours, runqlat, offcpu, empty, clock) = (
        tool_ns(&rows, "stallwatch"),
        tool_ns(&rows, "runqlat"),
        tool_ns(&rows, "offcputime"),
        tool_ns(&rows, "empty"),
        tool_ns(&rows, "clock"),
    );
    report.push_str(&format!(
        "# Benchmarks\n\nProduced by `cargo xtask bench` (root) on {} with {} CPUs, kernel {}, \
         in {:.0} s. These VMs are noisy: compare numbers from the same run only.\n\n",
        std::env::consts::ARCH,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        0.0, // filled below
    ));
    let srso = vulnerability("spec_rstack_overflow");
    let srso_note = if srso.contains("Safe RET") {
        " (\"Safe RET\" sends every kernel return through a thunk)"
    } else {
        ""
    };
    report.push_str(&format!(
        "CPU vulnerability mitigations in force (they make every call and return in BPF \
         helpers dearer): spectre_v2: {}; retbleed: {}; spec_rstack_overflow (SRSO): \
         {srso}{srso_note}.\n\n",
        vulnerability("spectre_v2"),
        vulnerability("retbleed"),
    ));
    report.push_str(&format!(
        "## BPF cost per event (sched probe vs libbpf-tools, same run)\n\n\
         Workload: `{pipe}` ({ctxt} context switches system-wide, {usecs_all:.3} usecs/op with \
         everything attached). Agent: `stallwatch run` (probes: sched); peers: `runqlat 3600`, \
         `offcputime 3600`, and as the floor an empty program (`bpftrace -e \
         '{EMPTY_SWITCH_PROGRAM}'`, tool `empty`) and the same with one clock read (`bpftrace -e \
         '{CLOCK_SWITCH_PROGRAM}'`, tool `clock`); kernel.bpf_stats_enabled=1; per-program run \
         time and count from `bpftool prog show --json` before and after.\n\n\
         | tool | program | runs | total ns | ns/run |\n|---|---|---:|---:|---:|\n"
    ));
    for (tool, name, dt, dc) in &rows {
        if *dc == 0 {
            continue;
        }
        report.push_str(&format!(
            "| {tool} | `{name}` | {dc} | {dt} | {:.1} |\n",
            *dt as f64 / *dc as f64
        ));
    }
    let per_switch = |ns: u64| ns as f64 / ctxt.max(1) as f64;
    // What one program run and one bpf_ktime_get_ns cost here; the syscall section uses both.
    let floors = (per_switch(empty), per_switch(clock.saturating_sub(empty)));
    report.push_str(&format!(
        "\nPer context switch (total BPF time of the tool / context switches):\n\n\
         | tool | ns per context switch |\n|---|---:|\n\
         | stallwatch sched (all programs), beside the peers | {:.1} |\n\
         | stallwatch sched alone (a run before the peers attached, 3 s after the agent started) | {alone:.1} |\n\
         | libbpf-tools runqlat | {:.1} |\n\
         | libbpf-tools offcputime | {:.1} |\n\
         | an empty program (floor per program run) | {:.1} |\n\
         | one `bpf_ktime_get_ns` (clock − empty) | {:.1} |\n\n\
         stallwatch / runqlat = **{:.2}×**. Targets: stallwatch ≤ 150 ns per context switch \
         beside the peers ({}) and ≤ 0.5× runqlat ({}). Programs are attributed to tools by \
         load order (ids new after each tool started). Kernel BPF stats add their own clock \
         reads to every run; the empty program shows what entering a program and those reads \
         cost here. stallwatch runs {:.2} programs per context switch (`sw_switch` on every \
         one; it hooks no wakeup), so {:.1} ns of its time per switch is that floor.\n\n",
        per_switch(ours),
        per_switch(runqlat),
        per_switch(offcpu),
        floors.0,
        floors.1,
        ours as f64 / runqlat.max(1) as f64,
        verdict(per_switch(ours) <= 150.0),
        verdict(ours as f64 / runqlat.max(1) as f64 <= 0.5),
        ours_runs as f64 / ctxt.max(1) as f64,
        floors.0 * ours_runs as f64 / ctxt.max(1) as f64,
    ));

    // 2. Slowdown, agent off/on alternating.
    let mut off = Vec::new();
    let mut on = Vec::new();
    for _ in 0..args.pairs {
        off.push(sched_pipe(args.loops)?);
        let _agent = Agent::start_with(&bin, &["--probes", "sched"])?;
        on.push(sched_pipe(args.loops)?);
    }
    let (off_min, off_max) = spread(&off);
    let (on_min, on_max) = spread(&on);
    let (off_med, on_med) = (median(&mut off.clone()), median(&mut on.clone()));
    report.push_str(&format!(
        "## Slowdown of `{pipe}`\n\n{} alternating pairs (agent off, then `stallwatch run` with the \
         sched probe on), usecs/op:\n\n| | median | min | max |\n|---|---:|---:|---:|\n\
         | agent off | {off_med:.3} | {off_min:.3} | {off_max:.3} |\n\
         | agent on | {on_med:.3} | {on_min:.3} | {on_max:.3} |\n\n\
         Slowdown of the medians: **{:.1} %** (our own goal, ≤ 8 %, which the issue does not \
         set: {}).\n\nRaw off: {:?}\n\nRaw on: {:?}\n",
        args.pairs,
        (on_med - off_med) / off_med * 100.0,
        verdict((on_med - off_med) / off_med * 100.0 <= 8.0),
        off,
        on
    ));
    report.push_str(&syscall_sections(&bin, args, floors)?);
    report.push_str(&tcp_section(&bin, args)?);
    report.push_str(&gc_section(&bin, args)?);
    report.push_str(&agent_section(&bin)?);
    let report = report.replacen(
        " in 0 s.",
        &format!(" in {:.0} s.", started.elapsed().as_secs_f64()),
        1,
    );
    let out = root().join(&args.out);
    std::fs::write(&out, &report).with_context(|| format!("writing {}", out.display()))?;
    print!("{report}");
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// One `sched_pipe` run: the BPF run time and runs of each program of `owners` over it (see
/// [`deltas`]), the context switches it made system-wide, and its usecs/op.
fn measured_pipe(owners: &[(&str, Vec<u64>)], loops: u64) -> anyhow::Result<(Vec<Row>, u64, f64)> {
    let before = prog_stats()?;
    let ctxt0 = context_switches()?;
    let usecs = sched_pipe(loops)?;
    let ctxt = context_switches()? - ctxt0;
    let after = prog_stats()?;
    Ok((deltas(owners, &before, &after), ctxt, usecs))
}

/// (tool, program, BPF run time ns, runs) of one program over a measurement.
type Row = (String, String, u64, u64);

/// Total BPF run time (ns) of `tool`'s programs in `rows`.
fn tool_ns(rows: &[Row], tool: &str) -> u64 {
    rows.iter().filter(|r| r.0 == tool).map(|r| r.2).sum()
}

/// BPF run time and runs of each program of `owners`, between two stats reads.
fn deltas(owners: &[(&str, Vec<u64>)], before: &ProgStats, after: &ProgStats) -> Vec<Row> {
    let mut rows = Vec::new();
    for (tool, ids) in owners {
        for id in ids {
            let (Some((name, t1, c1)), Some((_, t0, c0))) = (after.get(id), before.get(id)) else {
                continue;
            };
            rows.push((tool.to_string(), name.clone(), t1 - t0, c1 - c0));
        }
    }
    rows
}

/// Sections 3 and 4: the syscall probe.
/// `floors`: what one program run and one `bpf_ktime_get_ns` cost here (section 1), in ns.
fn syscall_sections(
    bin: &std::path::Path,
    args: &Args,
    floors: (f64, f64),
) -> anyhow::Result<String> {
    let basic = syscall_basic_cmd(args.syscall_loops);
    let basic_line = basic.join(" ");
    let mut report = String::new();
    // Kernel BPF stats add two clock reads to every program run: on for section 3 only.
    let stats = StatsGuard::enable()?;

    // 3a. Ours (every process timed) beside syscount -L.
    let (rows, syscalls, usecs) = {
        let mut owners: Vec<(&str, Vec<u64>)> = Vec::new();
        let base = prog_stats()?;
        let _agent = Agent::start_with(bin, &["--probes", "syscalls"])?;
        owners.push(("stallwatch", new_ids(&base)?));
        let base = prog_stats()?;
        let _syscount = Peer::start(&["syscount", "-L", "-i", "3600"])?;
        owners.push(("syscount -L", wait_ids(&base)?));
        let before = prog_stats()?;
        let usecs = perf_bench(&basic)?;
        let after = prog_stats()?;
        let rows = deltas(&owners, &before, &after);
        // Every syscall on the machine runs our sys_exit program once.
        let syscalls = rows
            .iter()
            .find(|r| r.0 == "stallwatch" && r.1 == "sw_sys_exit")
            .map(|r| r.3)
            .context("sw_sys_exit did not run")?;
        (rows, syscalls, usecs)
    };
    // 3b. Scoped to another process: what the benchmark (unselected) pays.
    let (floor_rows, floor_syscalls) = {
        let base = prog_stats()?;
        let _agent = Agent::start_with(bin, &["--probes", "syscalls", "--syscall-pid", "1"])?;
        let owners = vec![("stallwatch scoped", new_ids(&base)?)];
        let before = prog_stats()?;
        perf_bench(&basic)?;
        let after = prog_stats()?;
        let rows = deltas(&owners, &before, &after);
        let n = rows
            .iter()
            .find(|r| r.1 == "sw_sys_exit")
            .map(|r| r.3)
            .context("sw_sys_exit did not run")?;
        (rows, n)
    };
    report.push_str(&format!(
        "\n## BPF cost per syscall (syscalls probe vs libbpf-tools syscount -L, same run)\n\n\
         Workload: `{basic_line}` ({syscalls} syscalls system-wide, {usecs:.3} usecs/op with both \
         attached). Agent: `stallwatch run --probes syscalls` (latency histograms by class, \
         errors, slow-call events; every process timed); peer: `syscount -L -i 3600`. Then \
         `stallwatch run --probes syscalls --syscall-pid 1` alone ({floor_syscalls} syscalls): \
         the cost to a process outside the scope.\n\n\
         | tool | program | runs | total ns | ns/run |\n|---|---|---:|---:|---:|\n"
    ));
    for (tool, name, dt, dc) in rows.iter().chain(&floor_rows) {
        if *dc == 0 {
            continue;
        }
        report.push_str(&format!(
            "| {tool} | `{name}` | {dc} | {dt} | {:.1} |\n",
            *dt as f64 / *dc as f64
        ));
    }
    let ours = tool_ns(&rows, "stallwatch") as f64 / syscalls.max(1) as f64;
    let peer = tool_ns(&rows, "syscount -L") as f64 / syscalls.max(1) as f64;
    let floor = tool_ns(&floor_rows, "stallwatch scoped") as f64 / floor_syscalls.max(1) as f64;
    report.push_str(&format!(
        "\nPer syscall (enter + exit programs / syscalls):\n\n\
         | tool | BPF ns per syscall |\n|---|---:|\n\
         | stallwatch syscalls, process in scope | {ours:.1} |\n\
         | libbpf-tools syscount -L | {peer:.1} |\n\
         | stallwatch syscalls, process out of scope | {floor:.1} |\n\n\
         stallwatch / syscount -L = **{:.2}×**. Target: ≤ 250 ns per syscall, BPF time per \
         event as the sched target is judged ({}). BPF time excludes the tracepoint dispatch \
         itself; section 4 measures the whole added cost against the same bound.\n",
        ours / peer.max(1e-9),
        verdict(ours <= 250.0),
    ));

    drop(stats);

    // 4. Added ns per syscall, off/on alternating.
    let mut off = Vec::new();
    let mut on = Vec::new();
    for _ in 0..args.pairs {
        off.push(perf_bench(&basic)? * 1000.0);
        let _agent = Agent::start_with(bin, &["--probes", "syscalls"])?;
        on.push(perf_bench(&basic)? * 1000.0);
    }
    let (off_med, on_med) = (median(&mut off.clone()), median(&mut on.clone()));
    let ((off_min, off_max), (on_min, on_max)) = (spread(&off), spread(&on));
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    report.push_str(&format!(
        "\n## Added cost per syscall: `{basic_line}`\n\n{} alternating pairs (agent off, then \
         `stallwatch run --probes syscalls`), ns per getppid:\n\n\
         | | median | min | max |\n|---|---:|---:|---:|\n\
         | agent off | {off_med:.1} | {off_min:.1} | {off_max:.1} |\n\
         | agent on | {on_med:.1} | {on_min:.1} | {on_max:.1} |\n\n\
         Added per syscall (difference of the medians): **{:.1} ns** (bound ≤ 250 ns with \
         latency histograms on: {}). Timing a syscall takes two programs (entry, exit) and two \
         clock reads; at this machine's {:.1} ns per program run and {:.1} ns per \
         `bpf_ktime_get_ns` (section 1: an indirect call into the clocksource, a retpoline \
         here) that is {:.1} ns before any work, and enabling the raw syscall tracepoints moves \
         every syscall onto the kernel's slower traced entry path.\n\nRaw off: {}\n\nRaw on: {}\n",
        args.pairs,
        on_med - off_med,
        verdict(on_med - off_med <= 250.0),
        floors.0,
        floors.1,
        2.0 * (floors.0 + floors.1),
        fmt(&off),
        fmt(&on),
    ));
    Ok(report)
}

/// Starts a peer that may not be able to attach on this kernel: its BPF program ids, or
/// why it failed (its stderr).
fn try_peer(argv: &[&str]) -> anyhow::Result<Result<(Peer, Vec<u64>), String>> {
    let base = prog_stats()?;
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {} (libbpf-tools; `cargo xtask setup`)", argv[0]))?;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        if let Some(status) = child.try_wait()? {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                e.read_to_string(&mut err).ok();
            }
            let first = err
                .lines()
                .find(|l| l.contains("failed"))
                .unwrap_or(err.trim());
            return Ok(Err(format!("exited ({status}): {first}")));
        }
        let ids = new_ids(&base)?;
        if !ids.is_empty() {
            std::thread::sleep(Duration::from_secs(1));
            let ids = new_ids(&base)?;
            return Ok(Ok((Peer(child), ids)));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(Err("loaded no BPF program within 10 s".into()))
}

/// tcpconnlat's measurement (SYN sent to established, per socket) on the
/// `sock:inet_sock_set_state` tracepoint, for kernels where tcpconnlat cannot attach.
const TCPCONNLAT_TRACEPOINT_PROGRAM: &str = "tracepoint:sock:inet_sock_set_state \
    /args->protocol == 6/ { if (args->newstate == 2) { @start[args->skaddr] = nsecs; } \
    else if (args->oldstate == 2) { $t = @start[args->skaddr]; \
    if ($t != 0 && args->newstate == 1) { @connect_us = hist((nsecs - $t) / 1000); } \
    delete(@start[args->skaddr]); } }";

/// Section 5: the TCP probe under a loopback connection storm.
fn tcp_section(bin: &std::path::Path, args: &Args) -> anyhow::Result<String> {
    cmd::run(Command::new("cargo").current_dir(root()).args([
        "build",
        "--release",
        "-p",
        "stallwatch",
        "--bin",
        "swload",
    ]))?;
    let swload = bin.with_file_name("swload");
    let addr = "127.0.0.1:18977";
    let n = args.connections.to_string();
    let _stats = StatsGuard::enable()?;
    let mut owners: Vec<(&str, Vec<u64>)> = Vec::new();
    let base = prog_stats()?;
    let _agent = Agent::start_with(bin, &["--probes", "tcp"])?;
    owners.push(("stallwatch", new_ids(&base)?));
    let mut peers = Vec::new();
    let mut failed = Vec::new();
    // tcpconnlat hooks tcp_v4_connect and friends with fentry or kprobes; where neither
    // attaches (no kprobes on this project's VM), its measurement on the tracepoint stands in.
    let stand_in: (&str, &[&str]) = (
        "tcpconnlat (bpftrace)",
        &["bpftrace", "-e", TCPCONNLAT_TRACEPOINT_PROGRAM],
    );
    for (peer, mut fallback) in [
        (("tcplife", &["tcplife"][..]), None),
        (("tcpconnlat", &["tcpconnlat"][..]), Some(stand_in)),
    ] {
        let mut next = Some(peer);
        while let Some((tool, argv)) = next {
            next = match try_peer(argv)? {
                Ok((p, ids)) => {
                    owners.push((tool, ids));
                    peers.push(p);
                    None
                }
                Err(why) => {
                    failed.push(format!("`{tool}` could not attach: {why}"));
                    fallback.take()
                }
            };
        }
    }
    let mut server = Command::new(&swload)
        .args(["tcp-serve", addr, &n, "0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the swload server")?;
    let mut lines = BufReader::new(server.stdout.take().expect("piped")).lines();
    match lines.next() {
        Some(Ok(l)) if l == "listening" => {}
        other => bail!("swload server did not start listening: {other:?}"),
    }
    let before = prog_stats()?;
    let t0 = Instant::now();
    let client = Command::new(&swload)
        .args(["tcp-connect", addr, &n])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the swload client")?;
    // The client prints `done` and then waits for stdin, which is /dev/null: it exits.
    let out = client.wait_with_output()?;
    let storm = t0.elapsed();
    if !out.status.success() {
        bail!("swload client failed");
    }
    let _ = lines.next();
    drop(server.stdin.take());
    let _ = server.wait();
    let after = prog_stats()?;
    let rows = deltas(&owners, &before, &after);
    let conns = args.connections;
    let mut report = format!(
        "\n## BPF cost of the tcp probe (loopback connection storm)\n\n\
         Workload: `swload tcp-serve {addr} {n} 0` and `swload tcp-connect {addr} {n}`: {conns} \
         sequential connections, each sending one byte and reading its echo ({:.2} s with \
         everything attached, {:.1} µs per connection). Agent: `stallwatch run --probes tcp`; \
         peers attached in the same run: {}.\n\n\
         | tool | program | runs | total ns | ns/run |\n|---|---|---:|---:|---:|\n",
        storm.as_secs_f64(),
        storm.as_secs_f64() * 1e6 / conns as f64,
        owners[1..]
            .iter()
            .map(|(t, _)| format!("`{t}`"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (tool, name, dt, dc) in &rows {
        if *dc == 0 {
            continue;
        }
        report.push_str(&format!(
            "| {tool} | `{name}` | {dc} | {dt} | {:.1} |\n",
            *dt as f64 / *dc as f64
        ));
    }
    report.push_str("\nPer connection (both ends; total BPF time of the tool / connections):\n\n| tool | BPF ns per connection |\n|---|---:|\n");
    for (tool, _) in &owners {
        let total = tool_ns(&rows, tool);
        report.push_str(&format!(
            "| {tool} | {:.0} |\n",
            total as f64 / conns as f64
        ));
    }
    for f in failed {
        report.push_str(&format!("\n{f}\n"));
    }
    drop(peers);
    Ok(report)
}

/// Runs the gcpause fixture forcing `loops` GCs; wall time in seconds.
fn go_gc_run(program: &std::path::Path, loops: u64) -> anyhow::Result<f64> {
    use std::io::Write;
    let t0 = Instant::now();
    let mut child = Command::new(program)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .context("starting gcpause")?;
    {
        let mut stdin = child.stdin.take().expect("piped");
        let mut input = "gc\n".repeat(loops as usize);
        input.push_str("exit\n");
        stdin.write_all(input.as_bytes())?;
    }
    if !child.wait()?.success() {
        bail!("gcpause failed");
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// Nanoseconds all of `pid`'s threads have spent on a CPU (/proc/<pid>/task/*/schedstat).
fn cpu_ns(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Ok(stat) = std::fs::read_to_string(task?.path().join("schedstat")) else {
            continue; // a thread that just exited
        };
        total += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .context("parsing schedstat")?;
    }
    Ok(total)
}

/// The C library this process runs with (for a reference uprobe on its getppid).
fn libc_path() -> anyhow::Result<String> {
    std::fs::read_to_string("/proc/self/maps")?
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.contains("/libc.so") || p.contains("/libc-"))
        .map(str::to_string)
        .context("no libc in /proc/self/maps")
}

/// What one bare uprobe hit costs on this machine: `perf bench syscall basic` (libc getppid in
/// a loop) without and with a tracefs uprobe on getppid (`perf probe`). µs per call, off/on.
fn bare_uprobe_cost() -> anyhow::Result<(f64, f64)> {
    let libc = libc_path()?;
    let loops = 100_000;
    let off = perf_bench(&syscall_basic_cmd(loops))?;
    cmd::run(Command::new("perf").args(["probe", "-q", "-x", &libc, "sw_bench=getppid"]))?;
    let enable = "/sys/kernel/tracing/events/probe_libc/sw_bench/enable";
    let on = std::fs::write(enable, "1")
        .context(enable)
        .and_then(|()| perf_bench(&syscall_basic_cmd(loops)));
    let _ = std::fs::write(enable, "0");
    let _ = cmd::run(Command::new("perf").args(["probe", "-q", "-d", "probe_libc:sw_bench"]));
    Ok((off, on?))
}

/// Section 6: the gc probe.
fn gc_section(bin: &std::path::Path, args: &Args) -> anyhow::Result<String> {
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let program = dir.join("gcpause");
    let goarch = if cfg!(target_arch = "aarch64") {
        "arm64"
    } else {
        "amd64"
    };
    crate::setup::build_gcpause(goarch, &program)?;
    let loops = args.gc_loops;
    // Time added per GC: alternating off/on.
    let mut off = Vec::new();
    let mut on = Vec::new();
    for _ in 0..args.pairs {
        off.push(go_gc_run(&program, loops)?);
        let _agent = Agent::start_with(bin, &["--probes", "gc"])?;
        on.push(go_gc_run(&program, loops)?);
    }
    let (off_med, on_med) = (median(&mut off.clone()), median(&mut on.clone()));
    let per_gc_us = |s: f64| s * 1e6 / loops as f64;
    // BPF cost per program, and discovery cost per exec, with one agent.
    let _stats = StatsGuard::enable()?;
    let base = prog_stats()?;
    let agent = Agent::start_with(bin, &["--probes", "gc"])?;
    let ids = new_ids(&base)?;
    let before = prog_stats()?;
    go_gc_run(&program, loops)?;
    let after = prog_stats()?;
    let rows = deltas(&[("stallwatch", ids)], &before, &after);
    let apid = agent.0.id();
    let execs = args.execs;
    let c0 = cpu_ns(apid)?;
    for _ in 0..execs {
        if !Command::new("/bin/true").status()?.success() {
            bail!("/bin/true failed");
        }
    }
    // Let discovery drain its queue before reading its CPU time.
    std::thread::sleep(Duration::from_secs(1));
    let c1 = cpu_ns(apid)?;
    let go_runs = (execs / 10).max(10);
    for _ in 0..go_runs {
        go_gc_run(&program, 0)?;
    }
    std::thread::sleep(Duration::from_secs(1));
    let c2 = cpu_ns(apid)?;
    drop(agent);
    let (bare_off, bare_on) = bare_uprobe_cost()?;
    let go = crate::setup::GO_NEWEST;
    let mut report = format!(
        "\n## gc probe\n\nWorkload: a Go {go} program (`agent/tests/fixtures/gcpause.go`) forcing \
         {loops} `runtime.GC()` calls, each two stop-the-world pauses. {} alternating pairs, agent \
         off then `stallwatch run --probes gc`:\n\n| | median s | µs per GC |\n|---|---:|---:|\n\
         | agent off | {off_med:.3} | {:.1} |\n| agent on | {on_med:.3} | {:.1} |\n\n\
         Added per GC (two stop-the-world pauses, each with two uprobe hits: startTheWorldWithSema's \
         entry and its RET): \
         **{:.2} µs**. Raw off: {off:?}; raw on: {on:?}.\n\nFor scale, one bare uprobe hit on this \
         machine (a tracefs probe on libc getppid, `perf probe -x <libc> getppid`, under \
         `perf bench syscall basic`): {bare_off:.3} → {bare_on:.3} µs per call, **{:.1} µs per \
         hit**. Uprobes trap into the kernel (int3, then a single-step of the displaced \
         instruction); on this VM that trap dominates everything the probe's programs do.\n\nBPF programs in one agent-on run \
         (kernel.bpf_stats_enabled=1; the uprobe trap itself is not in these numbers):\n\n\
         | program | runs | total ns | ns/run |\n|---|---:|---:|---:|\n",
        args.pairs,
        per_gc_us(off_med),
        per_gc_us(on_med),
        per_gc_us(on_med - off_med),
        bare_on - bare_off,
    );
    for (_, name, dt, dc) in &rows {
        if *dc == 0 {
            continue;
        }
        report.push_str(&format!(
            "| `{name}` | {dc} | {dt} | {:.1} |\n",
            *dt as f64 / *dc as f64
        ));
    }
    report.push_str(&format!(
        "\nDiscovery, the agent's own CPU time (/proc/<agent>/schedstat) per process it inspects: \
         {:.1} µs per exec of `/bin/true` ({execs} execs: not a runtime, classified once per \
         file, then a stat), {:.0} µs per start of the Go program ({go_runs} runs, each \
         registered and its probes attached, then detached when it exits).\n",
        (c1 - c0) as f64 / 1e3 / execs as f64,
        (c2 - c1) as f64 / 1e3 / go_runs as f64,
    ));
    Ok(report)
}

/// GET `path` from `addr`; the body.
fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").context("not HTTP")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {head}");
    }
    Ok(body.to_string())
}

/// (min, max) of `v`.
fn spread(v: &[f64]) -> (f64, f64) {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

/// How a number compares with its target, in the report's words.
fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "**missed**"
    }
}

fn status_kb(pid: u32, field: &str) -> anyhow::Result<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))?
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("{field} in /proc/{pid}/status"))
}

/// Section 7: what the agent itself costs.
fn agent_section(bin: &std::path::Path) -> anyhow::Result<String> {
    let swload = bin.with_file_name("swload");
    let mut report = String::from("\n## The agent itself\n\n");
    // Scrape latency by series count: per-pid series of N sleeping processes.
    report.push_str(
        "`/metrics` latency with `stallwatch run` (default probes) and N extra processes each \
         waking every 10 ms (`swload sleep`), 200 sequential scrapes after a 5 s warm-up. \
         Series = exposition sample lines. About 1k series: keys capped by `--max-series 8` \
         (the rest fold into `_other`); about 10k and 20k: `--per-pid`, every process its own \
         series. Last row: one process with 10,000 idle threads (`swload idle-threads`), \
         because the sched probe's kernel map holds an entry per thread, all read at every \
         scrape.\n\n\
         | agent flags | processes | series | p50 ms | p99 ms | max ms | agent RSS MiB |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut p99_at_10k = None;
    const SLEEP: &[&str] = &["sleep", "100000", "10"];
    for (flags, n, workload) in [
        (&["--max-series", "8"][..], 8usize, SLEEP),
        (&["--per-pid"][..], 8, SLEEP),
        (&["--per-pid"][..], 80, SLEEP),
        (&["--per-pid"][..], 1, &["idle-threads", "10000"][..]),
    ] {
        let agent = Agent::start_with(bin, flags)?;
        let mut kids = Vec::new();
        for _ in 0..n {
            let mut kid = Command::new(&swload)
                .args(workload)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .context("starting swload")?;
            if workload != SLEEP {
                // Its threads are all up when it says so.
                let mut line = String::new();
                BufReader::new(kid.stdout.take().expect("piped")).read_line(&mut line)?;
                if !line.starts_with("done") {
                    bail!("swload {}: {line:?}", workload.join(" "));
                }
            }
            kids.push(kid);
        }
        std::thread::sleep(Duration::from_secs(5));
        let body = http_get(&agent.1, "/metrics")?;
        let series = body
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .count();
        let mut ms = Vec::with_capacity(200);
        for _ in 0..200 {
            let t0 = Instant::now();
            http_get(&agent.1, "/metrics")?;
            ms.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        ms.sort_by(f64::total_cmp);
        let rss = status_kb(agent.0.id(), "VmRSS:")? as f64 / 1024.0;
        // The run closest to 10k series is the one the target is judged on (of the runs
        // that vary the series, not the threads).
        let near = |s: usize| s.abs_diff(10_000);
        if workload == SLEEP
            && (5_000..15_000).contains(&series)
            && p99_at_10k.is_none_or(|(s, _)| near(series) < near(s))
        {
            p99_at_10k = Some((series, ms[197]));
        }
        let processes = if workload == SLEEP {
            n.to_string()
        } else {
            format!("{n}, with {} threads", workload[1])
        };
        report.push_str(&format!(
            "| `{}` | {processes} | {series} | {:.2} | {:.2} | {:.2} | {rss:.1} |\n",
            flags.join(" "),
            ms[100],
            ms[197],
            ms[199]
        ));
        for mut k in kids {
            let _ = k.kill();
            let _ = k.wait();
        }
        drop(agent);
    }
    report.push_str(&match p99_at_10k {
        Some((series, p99)) => format!(
            "\nTarget: p99 ≤ 10 ms at 10k series ({series} series: {p99:.2} ms, {}).\n",
            verdict(p99 <= 10.0)
        ),
        None => "\nTarget: p99 ≤ 10 ms at 10k series: not judged, no run had 5k–15k series on \
                 this host.\n"
            .to_string(),
    });
    // RSS and CPU idle, and under hackbench.
    let agent = Agent::start_with(bin, &[])?;
    let pid = agent.0.id();
    std::thread::sleep(Duration::from_secs(5));
    let (rss_idle, c0, t0) = (status_kb(pid, "VmRSS:")?, cpu_ns(pid)?, Instant::now());
    std::thread::sleep(Duration::from_secs(10));
    let idle_cpu = (cpu_ns(pid)? - c0) as f64 / t0.elapsed().as_nanos() as f64 * 100.0;
    let hack = [
        "perf",
        "bench",
        "sched",
        "messaging",
        "-g",
        "10",
        "-l",
        "2000",
    ];
    let (c1, t1) = (cpu_ns(pid)?, Instant::now());
    cmd::output(Command::new(hack[0]).args(&hack[1..]))?;
    let busy_s = t1.elapsed().as_secs_f64();
    let busy_cpu = (cpu_ns(pid)? - c1) as f64 / t1.elapsed().as_nanos() as f64 * 100.0;
    let rss_busy = status_kb(pid, "VmRSS:")?;
    let hwm = status_kb(pid, "VmHWM:")?;
    drop(agent);
    report.push_str(&format!(
        "\nDefault probes (sched, tcp, gc): RSS {:.1} MiB idle, {:.1} MiB after `{}` ({busy_s:.1} s; \
         peak {:.1} MiB). Agent CPU (all threads, /proc/<pid>/task/*/schedstat): {idle_cpu:.2} % \
         of one CPU idle, {busy_cpu:.2} % during hackbench. Target: RSS ≤ 30 MB (28.6 MiB) steady \
         ({}).\n",
        rss_idle as f64 / 1024.0,
        rss_busy as f64 / 1024.0,
        hack.join(" "),
        hwm as f64 / 1024.0,
        verdict(rss_idle.max(rss_busy) * 1024 <= 30_000_000),
    ));
    // Kernel map memory of a running agent (bpftool's memlock per map).
    let before: std::collections::BTreeSet<u64> =
        map_ids()?.into_iter().map(|(id, _, _)| id).collect();
    let agent = Agent::start_with(bin, &["--probes", "sched,syscalls,tcp,gc"])?;
    let maps: Vec<(u64, String, u64)> = map_ids()?
        .into_iter()
        .filter(|(id, _, _)| !before.contains(id))
        .collect();
    drop(agent);
    let total: u64 = maps.iter().map(|m| m.2).sum();
    report.push_str(&format!(
        "\nKernel map memory with every probe (bpftool `bytes_memlock`, default sizes): \
         **{:.1} MiB** in {} maps; largest: {}.\n",
        total as f64 / 1048576.0,
        maps.len(),
        {
            let mut m = maps.clone();
            m.sort_by_key(|x| std::cmp::Reverse(x.2));
            m.iter()
                .take(4)
                .map(|(_, n, b)| format!("`{n}` {:.1} MiB", *b as f64 / 1048576.0))
                .collect::<Vec<_>>()
                .join(", ")
        }
    ));
    Ok(report)
}

/// (id, name, bytes_memlock) of every BPF map on the host.
fn map_ids() -> anyhow::Result<Vec<(u64, String, u64)>> {
    let out = cmd::output(Command::new("bpftool").args(["map", "show", "--json"]))?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| {
            Some((
                m["id"].as_u64()?,
                m["name"].as_str().unwrap_or("?").to_string(),
                m["bytes_memlock"].as_u64().unwrap_or(0),
            ))
        })
        .collect())
}
