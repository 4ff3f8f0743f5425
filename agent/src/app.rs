//! The running agent: loads the object, attaches requested probes, and gathers metrics.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use aya::Ebpf;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use stallwatch_common::{names, Counter};

use crate::config::Config;
use crate::loader::{self, KernelInfo};
use crate::metrics::{catalogue, Family};
use crate::probes::sched::{self, SchedState};

#[derive(Debug, Clone)]
pub struct ProbeStatus {
    pub name: &'static str,
    /// Programs attached, or why the probe could not attach.
    pub result: Result<Vec<&'static str>, String>,
}

pub struct App {
    pub config: Config,
    kernel_release: String,
    pub probes: Vec<ProbeStatus>,
    pub sched: Option<Arc<Mutex<SchedState>>>,
    /// Owns every program and link: dropping it detaches everything.
    ebpf: Mutex<Ebpf>,
    _bpf_stats: Option<OwnedFd>,
}

/// Long-running work the caller must drive (e.g. the ring-buffer reader).
pub type Tasks = Vec<std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>>;

pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

impl App {
    /// Loads and attaches every requested probe. A probe that cannot attach is reported (log,
    /// `stallwatch_probe_attached`) and skipped, unless `strict` is set.
    pub fn start(config: Config) -> anyhow::Result<(App, Tasks)> {
        let object = crate::embedded::object()?;
        let kernel = KernelInfo::from_sys_fs()?;
        let mut ebpf = loader::load(object, &config, &kernel).map_err(crate::check::explain)?;
        let bpf_stats = if config.bpf_stats {
            Some(
                aya::sys::enable_stats(aya::sys::Stats::RunTime)
                    .context("enabling kernel BPF run-time stats (--bpf-stats)")?,
            )
        } else {
            None
        };
        let mut probes = Vec::new();
        let mut tasks: Tasks = Vec::new();
        let mut sched_state = None;
        if config.probe_enabled(sched::NAME) {
            let started = (|| {
                let (mut state, ring) = SchedState::new(
                    &mut ebpf,
                    config.per_pid,
                    config.exit_grace,
                    config.max_processes,
                )?;
                let existing = state.prepopulate()?;
                log::debug!("pre-created {existing} per-process entries");
                let progs = sched::attach(&mut ebpf, &kernel)?;
                state.prime();
                anyhow::Ok((state, ring, progs))
            })();
            let result = match started {
                Ok((state, ring, progs)) => {
                    let state = Arc::new(Mutex::new(state));
                    tasks.push(Box::pin(sched::event_loop(ring, state.clone())));
                    tasks.push(Box::pin(sched::housekeeping(state.clone())));
                    sched_state = Some(state);
                    Ok(progs)
                }
                Err(e) => {
                    let e = crate::check::explain(e);
                    if config.strict {
                        return Err(e.context(format!("probe {} could not attach", sched::NAME)));
                    }
                    log::error!("probe {} not attached: {e:#}", sched::NAME);
                    Err(format!("{e:#}"))
                }
            };
            probes.push(ProbeStatus {
                name: sched::NAME,
                result,
            });
        }
        Ok((
            App {
                config,
                kernel_release: kernel_release(),
                probes,
                sched: sched_state,
                ebpf: Mutex::new(ebpf),
                _bpf_stats: bpf_stats,
            },
            tasks,
        ))
    }

    /// Ready once at least one requested probe is attached.
    pub fn ready(&self) -> bool {
        self.probes.iter().any(|p| p.result.is_ok())
    }

    pub fn gather(&self) -> Vec<MetricFamily> {
        let mut out = Vec::new();
        let mut dropped = Family::new(&catalogue::EVENTS_DROPPED);
        let mut entries = Family::new(&catalogue::MAP_ENTRIES);
        let mut capacity = Family::new(&catalogue::MAP_CAPACITY);
        let mut tracked = Family::new(&catalogue::TRACKED_PROCESSES);
        if let Some(state) = &self.sched {
            let mut s = state.lock().expect("sched state lock poisoned");
            s.refresh(Instant::now());
            out.extend(s.families());
            let k = s.kernel_counters();
            let p = sched::NAME;
            for (reason, v) in [
                ("thread_state_failed", k[Counter::ThreadStateFailed as usize]),
                ("process_map_full", k[Counter::ProcMapFull as usize]),
                ("process_alloc_failed", k[Counter::ProcAllocFailed as usize]),
                ("event_ring_full", k[Counter::EventRingFull as usize]),
                ("task_read_failed", k[Counter::TaskReadFailed as usize]),
                ("exit_missed", s.drops.exit_missed),
                ("unattributed", s.drops.unattributed),
                ("bad_event", s.drops.bad_event),
                ("map_read_failed", s.drops.map_read_failed),
            ] {
                dropped.value(&[("probe", p), ("reason", reason)], v as f64);
            }
            let threads = k[Counter::ThreadInserted as usize]
                .saturating_sub(k[Counter::ThreadDeleted as usize]);
            entries.value(&[("map", names::MAP_THREADS)], threads as f64);
            entries.value(&[("map", names::MAP_PROC_SCHED)], s.proc_entries() as f64);
            capacity.value(&[("map", names::MAP_PROC_SCHED)], f64::from(s.max_processes));
            tracked.value(&[], s.agg.tracked_processes() as f64);
        }
        let mut build = Family::new(&catalogue::BUILD_INFO);
        build.value(
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("arch", std::env::consts::ARCH),
                ("kernel", &self.kernel_release),
            ],
            1.0,
        );
        let mut attached = Family::new(&catalogue::PROBE_ATTACHED);
        for p in &self.probes {
            attached.value(&[("probe", p.name)], if p.result.is_ok() { 1.0 } else { 0.0 });
        }
        out.extend(
            [build, attached, dropped, tracked, entries, capacity]
                .into_iter()
                .filter_map(Family::finish),
        );
        if self.config.bpf_stats {
            out.extend(self.program_stats());
        }
        out
    }

    fn program_stats(&self) -> Vec<MetricFamily> {
        let mut run_time = Family::new(&catalogue::PROGRAM_RUN_SECONDS);
        let mut runs = Family::new(&catalogue::PROGRAM_RUNS);
        let ebpf = self.ebpf.lock().expect("ebpf lock poisoned");
        for (name, prog) in ebpf.programs() {
            // Only loaded programs have info; variants we did not load are skipped.
            let Ok(info) = prog.info() else { continue };
            run_time.value(&[("program", name)], info.run_time().as_secs_f64());
            runs.value(&[("program", name)], info.run_count() as f64);
        }
        [run_time, runs].into_iter().filter_map(Family::finish).collect()
    }
}

/// Exposes the app to a prometheus `Registry`: maps are read at scrape time.
pub struct AppCollector {
    app: Arc<App>,
    descs: Vec<Desc>,
}

impl AppCollector {
    pub fn new(app: Arc<App>) -> Self {
        let descs = catalogue::ALL
            .iter()
            .filter_map(|m| Desc::new(m.name.into(), m.help.into(), vec![], Default::default()).ok())
            .collect();
        AppCollector { app, descs }
    }
}

impl Collector for AppCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.app.gather()
    }
}
