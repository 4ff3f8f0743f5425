//! One module per probe: it owns its programs and maps, attaches them, and hands out plain
//! snapshots. The registry below starts the probes a config asks for; `process` and
//! `lifecycle` hold what every per-process probe shares.

pub mod batch;
pub mod bpf_sys;
pub mod gc;
pub mod lifecycle;
pub mod process;
pub mod prog_info;
pub mod sched;
pub mod syscalls;
pub mod tcp;

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use aya::maps::{MapData, PerCpuArray};
use aya::programs::BtfTracePoint;
use aya::Ebpf;
use prometheus::proto::MetricFamily;
use stallwatch_common::{names, Counter};

use crate::config::Config;
use crate::loader::KernelInfo;

/// Long-running work a probe needs driven (e.g. its ring-buffer reader).
pub type Task = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>;

/// Fill of a bounded kernel map.
pub struct MapFill {
    pub map: &'static str,
    pub entries: u64,
    /// `None` for maps the kernel bounds itself (task-local storage).
    pub capacity: Option<u64>,
}

/// What the agent needs from a running probe. Everything is read at scrape time.
pub trait Probe: Send + Sync {
    fn name(&self) -> &'static str;
    /// The probe's own metric families, current as of `arrived` (the scrape's arrival).
    fn families(&self, arrived: Instant) -> Vec<MetricFamily>;
    /// Counted losses, by reason, for `stallwatch_events_dropped_total{probe, reason}`.
    fn drops(&self) -> Vec<(&'static str, u64)>;
    fn maps(&self) -> Vec<MapFill>;
    /// Processes this probe attributes data to.
    fn tracked_processes(&self) -> usize;
    /// Process series folded into the overflow series (the series budget) so far; `None` for
    /// a probe without process series.
    fn series_overflow(&self) -> Option<u64>;
}

/// A started probe and the tasks it needs; `programs` names what attached.
pub struct Started {
    pub probe: Box<dyn Probe>,
    pub tasks: Vec<Task>,
    pub programs: Vec<&'static str>,
}

/// The kernel programs' shared drop and bookkeeping counters (`SW_COUNTERS`).
pub struct KernelCounters(PerCpuArray<MapData, u64>);

impl KernelCounters {
    pub fn take(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        let map = ebpf
            .take_map(names::MAP_COUNTERS)
            .with_context(|| format!("map {} missing from the eBPF object", names::MAP_COUNTERS))?;
        Ok(KernelCounters(PerCpuArray::try_from(map)?))
    }

    /// Summed over CPUs; 0 if the read fails.
    pub fn get(&self, c: Counter) -> u64 {
        self.0
            .get(&(c as u32), 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }
}

/// What a probe gets to start with.
pub struct StartCtx<'a> {
    pub ebpf: &'a mut Ebpf,
    pub kernel: &'a KernelInfo,
    pub config: &'a Config,
    pub counters: Arc<KernelCounters>,
    pub lifecycle: &'a mut lifecycle::Lifecycle,
}

/// Loads `prog` for tp_btf/`tracepoint` and attaches it; it stays attached while `ebpf` lives.
pub fn attach_tp_btf(
    ebpf: &mut Ebpf,
    kernel: &KernelInfo,
    prog: &'static str,
    tracepoint: &str,
) -> anyhow::Result<()> {
    let p: &mut BtfTracePoint = ebpf
        .program_mut(prog)
        .with_context(|| format!("program {prog} missing from the eBPF object"))?
        .try_into()
        .with_context(|| format!("program {prog} is not a tp_btf program"))?;
    p.load(tracepoint, &kernel.btf)
        .with_context(|| format!("loading {prog} for tp_btf/{tracepoint} (verifier)"))?;
    p.attach()
        .with_context(|| format!("attaching {prog} to tp_btf/{tracepoint}"))?;
    Ok(())
}

/// Starts probe `name`: takes its maps, attaches its programs.
pub fn start(name: &str, ctx: StartCtx<'_>) -> anyhow::Result<Started> {
    match name {
        sched::NAME => sched::start(ctx),
        syscalls::NAME => syscalls::start(ctx),
        tcp::NAME => tcp::start(ctx),
        gc::NAME => gc::start(ctx),
        other => anyhow::bail!("no probe named {other:?}"),
    }
}
