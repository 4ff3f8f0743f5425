//! The running agent: loads the object, attaches requested probes, and gathers metrics.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::config::{Config, KNOWN_PROBES};
use crate::loader::{self, KernelInfo};
use crate::metrics::{catalogue, Family};
use crate::probes::{self, Probe, Task};
use anyhow::Context;
use aya::Ebpf;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;

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
    running: Vec<Running>,
    /// Owns every program and link: dropping it detaches everything.
    ebpf: Mutex<Ebpf>,
    _bpf_stats: Option<OwnedFd>,
    /// Programs whose info could not be read, already logged.
    info_warned: Mutex<HashSet<String>>,
    /// Whether the Kubernetes pod watch runs (its self-metrics are exported).
    pub kubernetes: bool,
}

/// A running probe and the programs that are its own (the shared lifecycle programs belong
/// to the lifecycle's entry), whose skipped runs are its drops.
struct Running {
    probe: Box<dyn Probe>,
    programs: Vec<&'static str>,
}

fn kubernetes_families() -> Vec<MetricFamily> {
    let idx = crate::attribution::kube::index()
        .read()
        .unwrap_or_else(|e| e.into_inner());
    let mut pods = Family::new(&catalogue::KUBERNETES_PODS);
    let mut synced = Family::new(&catalogue::KUBERNETES_SYNCED);
    let mut errors = Family::new(&catalogue::KUBERNETES_WATCH_ERRORS);
    pods.value(&[], idx.pods() as f64);
    synced.value(&[], if idx.synced() { 1.0 } else { 0.0 });
    errors.value(&[], idx.errors() as f64);
    [pods, synced, errors]
        .into_iter()
        .filter_map(Family::finish)
        .collect()
}

pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

impl App {
    /// Loads and attaches every requested probe. A probe that cannot attach is reported (log,
    /// `stallwatch_probe_attached`) and skipped, unless `strict` is set.
    pub fn start(config: Config) -> anyhow::Result<(App, Vec<Task>)> {
        crate::attribution::init(config.cgroup_root.as_deref())?;
        let object = crate::embedded::object_for(&config)?;
        let kernel = KernelInfo::from_sys_fs()?;
        let mut ebpf = loader::load(&object, &config, &kernel).map_err(crate::check::explain)?;
        let bpf_stats = if config.bpf_stats {
            Some(
                aya::sys::enable_stats(aya::sys::Stats::RunTime)
                    .context("enabling kernel BPF run-time stats (--bpf-stats)")?,
            )
        } else {
            None
        };
        let counters = Arc::new(probes::KernelCounters::take(&mut ebpf)?);
        let mut lifecycle = probes::lifecycle::Lifecycle::new(
            &mut ebpf,
            counters.clone(),
            config.legacy_process_exit,
        )?;
        let mut probes = Vec::new();
        let mut running = Vec::new();
        let mut tasks = Vec::new();
        for name in KNOWN_PROBES
            .iter()
            .copied()
            .filter(|p| config.probe_enabled(p))
        {
            let ctx = probes::StartCtx {
                ebpf: &mut ebpf,
                kernel: &kernel,
                config: &config,
                counters: counters.clone(),
                lifecycle: &mut lifecycle,
            };
            let result = match probes::start(name, ctx) {
                Ok(started) => {
                    running.push(Running {
                        probe: started.probe,
                        programs: started
                            .programs
                            .iter()
                            .copied()
                            .filter(|p| !lifecycle.programs.contains(p))
                            .collect(),
                    });
                    tasks.extend(started.tasks);
                    Ok(started.programs)
                }
                Err(e) => {
                    let e = crate::check::explain(e);
                    if config.strict {
                        return Err(e.context(format!("probe {name} could not attach (--strict)")));
                    }
                    log::error!("probe {name} not attached: {e:#}");
                    Err(format!("{e:#}"))
                }
            };
            probes.push(ProbeStatus { name, result });
        }
        let lifecycle_programs = lifecycle.programs.clone();
        if let Some((task, health)) = lifecycle.start()? {
            tasks.push(task);
            running.push(Running {
                probe: health,
                programs: lifecycle_programs,
            });
        }
        Ok((
            App {
                config,
                kernel_release: kernel_release(),
                probes,
                running,
                ebpf: Mutex::new(ebpf),
                _bpf_stats: bpf_stats,
                info_warned: Mutex::default(),
                kubernetes: false,
            },
            tasks,
        ))
    }

    /// Ready once at least one requested probe is attached.
    pub fn ready(&self) -> bool {
        self.probes.iter().any(|p| p.result.is_ok())
    }

    pub fn gather(&self) -> Vec<MetricFamily> {
        let arrived = Instant::now();
        let mut out = Vec::new();
        let mut dropped = Family::new(&catalogue::EVENTS_DROPPED);
        let mut entries = Family::new(&catalogue::MAP_ENTRIES);
        let mut capacity = Family::new(&catalogue::MAP_CAPACITY);
        let mut tracked = Family::new(&catalogue::TRACKED_PROCESSES);
        let mut overflow = Family::new(&catalogue::SERIES_OVERFLOW);
        let mut tracked_total = 0;
        let skipped = self.recursion_misses();
        for Running { probe, programs } in &self.running {
            out.extend(probe.families(arrived));
            for (reason, v) in probe.drops() {
                dropped.value(&[("probe", probe.name()), ("reason", reason)], v as f64);
            }
            // Only a whole sum: one program left out would make the counter go down. No
            // series where the kernel does not count them.
            let missed: Option<u64> = programs
                .iter()
                .map(|p| skipped.get(*p).copied().flatten())
                .sum();
            if let Some(missed) = missed {
                dropped.value(
                    &[("probe", probe.name()), ("reason", "recursion_miss")],
                    missed as f64,
                );
            }
            for m in probe.maps() {
                entries.value(&[("map", m.map)], m.entries as f64);
                if let Some(c) = m.capacity {
                    capacity.value(&[("map", m.map)], c as f64);
                }
            }
            tracked_total = tracked_total.max(probe.tracked_processes());
            if let Some(n) = probe.series_overflow() {
                overflow.value(&[("probe", probe.name())], n as f64);
            }
        }
        if !self.running.is_empty() {
            tracked.value(&[], tracked_total as f64);
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
            attached.value(
                &[("probe", p.name)],
                if p.result.is_ok() { 1.0 } else { 0.0 },
            );
        }
        out.extend(
            [
                build, attached, dropped, tracked, overflow, entries, capacity,
            ]
            .into_iter()
            .filter_map(Family::finish),
        );
        if self.config.bpf_stats {
            out.extend(self.program_stats());
        }
        if self.kubernetes {
            out.extend(kubernetes_families());
        }
        out
    }

    /// Runs the kernel skipped, by loaded program (see `prog_info::recursion_misses`;
    /// `None`: this kernel does not count them). A program whose info cannot be read is left
    /// out, and logged once.
    fn recursion_misses(&self) -> HashMap<String, Option<u64>> {
        let ebpf = self.ebpf.lock().expect("ebpf lock poisoned");
        let mut out = HashMap::new();
        for (name, prog) in ebpf.programs() {
            // Variants we did not load have no fd.
            let Ok(fd) = prog.fd() else { continue };
            match probes::prog_info::recursion_misses(fd.as_fd()) {
                Ok(n) => {
                    out.insert(name.to_string(), n);
                }
                Err(e) => {
                    let mut warned = self.info_warned.lock().expect("lock poisoned");
                    if warned.insert(name.to_string()) {
                        log::warn!("reading program info of {name}: {e} (its probe's recursion_miss is not exported)");
                    }
                }
            }
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
        [run_time, runs]
            .into_iter()
            .filter_map(Family::finish)
            .collect()
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
            .filter_map(|m| {
                Desc::new(m.name.into(), m.help.into(), vec![], Default::default()).ok()
            })
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
