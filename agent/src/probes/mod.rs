//! One module per probe: it owns its programs and maps, attaches them, and hands out plain
//! snapshots. The registry below starts the probes a config asks for.

pub mod sched;

use std::time::Instant;

use aya::Ebpf;
use prometheus::proto::MetricFamily;

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
}

/// A started probe and the tasks it needs; `programs` names what attached.
pub struct Started {
    pub probe: Box<dyn Probe>,
    pub tasks: Vec<Task>,
    pub programs: Vec<&'static str>,
}

/// Starts probe `name`: takes its maps from `ebpf`, attaches its programs.
pub fn start(
    name: &str,
    ebpf: &mut Ebpf,
    kernel: &KernelInfo,
    config: &Config,
) -> anyhow::Result<Started> {
    match name {
        sched::NAME => sched::start(ebpf, kernel, config),
        other => anyhow::bail!("no probe named {other:?}"),
    }
}
