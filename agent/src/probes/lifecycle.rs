//! Process exit and exec events, read once and handed to every per-process probe.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use aya::maps::{MapData, RingBuf};
use aya::Ebpf;
use prometheus::proto::MetricFamily;
use stallwatch_common::{names, Counter, ProcEvent, EVENT_EXEC, EVENT_EXIT};

use super::{attach_tp_btf, KernelCounters};
use crate::loader::KernelInfo;

/// A probe that keeps per-process state.
pub trait ProcessEvents: Send {
    fn on_exit(&mut self, ev: &ProcEvent, now: Instant);
    fn on_exec(&mut self, ev: &ProcEvent, now: Instant);
}

pub type Subscriber = Arc<Mutex<dyn ProcessEvents>>;

pub struct Lifecycle {
    ring: Option<RingBuf<MapData>>,
    subscribers: Vec<Subscriber>,
    /// Attach the sched_process_exit program for kernels without `group_dead` even where
    /// the tracepoint has it (`--legacy-process-exit`, for tests).
    legacy_exit: bool,
    pub programs: Vec<&'static str>,
    bad_event: Arc<std::sync::atomic::AtomicU64>,
    counters: Arc<KernelCounters>,
}

impl Lifecycle {
    /// Takes the event ring; attaches nothing until a probe subscribes.
    pub fn new(
        ebpf: &mut Ebpf,
        counters: Arc<KernelCounters>,
        legacy_exit: bool,
    ) -> anyhow::Result<Self> {
        let ring =
            RingBuf::try_from(ebpf.take_map(names::MAP_EVENTS).with_context(|| {
                format!("map {} missing from the eBPF object", names::MAP_EVENTS)
            })?)?;
        Ok(Lifecycle {
            ring: Some(ring),
            subscribers: Vec::new(),
            legacy_exit,
            programs: Vec::new(),
            bad_event: Default::default(),
            counters,
        })
    }

    /// Adds a per-process probe; the first one attaches the lifecycle programs.
    pub fn subscribe(
        &mut self,
        ebpf: &mut Ebpf,
        kernel: &KernelInfo,
        s: Subscriber,
    ) -> anyhow::Result<()> {
        if self.programs.is_empty() {
            self.attach(ebpf, kernel)?;
        }
        self.subscribers.push(s);
        Ok(())
    }

    fn attach(&mut self, ebpf: &mut Ebpf, kernel: &KernelInfo) -> anyhow::Result<()> {
        attach_tp_btf(ebpf, kernel, names::PROG_PROC_EXEC, "sched_process_exec")?;
        self.programs.push(names::PROG_PROC_EXEC);
        let program = if Self::uses_legacy_exit(kernel, self.legacy_exit) {
            log::info!(
                "sched_process_exit: exits detected from signal->live ({})",
                if self.legacy_exit {
                    "--legacy-process-exit"
                } else {
                    "this kernel's tracepoint has no group_dead argument"
                }
            );
            names::PROG_PROC_EXIT_V1
        } else {
            names::PROG_PROC_EXIT
        };
        // Without exit events the probes' /proc sweeps still retire exited processes (late,
        // and counted as exit_missed): worth a warning, not a refusal to run.
        match attach_tp_btf(ebpf, kernel, program, "sched_process_exit") {
            Ok(()) => self.programs.push(program),
            Err(e) => log::warn!(
                "no exit events ({e:#}); exited processes are retired by the periodic sweep \
                 (up to {}s late)",
                super::process::SWEEP_INTERVAL.as_secs() * 2
            ),
        }
        Ok(())
    }

    /// Whether the exit program for kernels without `group_dead` (and its `SW_EXITED` map)
    /// will be used: `attach` chooses by it, and the loader sizes the map by it.
    pub fn uses_legacy_exit(kernel: &KernelInfo, legacy_exit: bool) -> bool {
        legacy_exit || !has_group_dead(kernel)
    }

    pub fn dispatch(&self, raw: &[u8], now: Instant) {
        if raw.len() < std::mem::size_of::<ProcEvent>() {
            self.bad_event
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        // SAFETY: length checked; ProcEvent is plain old data; read_unaligned for alignment.
        let ev: ProcEvent = unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) };
        for s in &self.subscribers {
            let mut s = s.lock().expect("probe state lock poisoned");
            match ev.kind {
                EVENT_EXIT => s.on_exit(&ev, now),
                EVENT_EXEC => s.on_exec(&ev, now),
                _ => {
                    self.bad_event
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return;
                }
            }
        }
    }

    /// The event reader (if any probe subscribed) and the lifecycle's health view.
    pub fn start(mut self) -> anyhow::Result<Option<(super::Task, Box<dyn super::Probe>)>> {
        if self.subscribers.is_empty() {
            return Ok(None);
        }
        let ring = self.ring.take().expect("started once");
        let view = LifecycleHealth {
            bad_event: self.bad_event.clone(),
            counters: self.counters.clone(),
        };
        Ok(Some((Box::pin(event_loop(ring, self)), Box::new(view))))
    }
}

/// Reads process events until the ring buffer's fd fails.
async fn event_loop(ring: RingBuf<MapData>, lifecycle: Lifecycle) -> anyhow::Result<()> {
    // SAFETY: the ring buffer owns its fd and lives inside the AsyncFd until it is dropped.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
    }
    .map_err(|e| anyhow::anyhow!("registering the process event ring buffer with tokio: {e}"))?;
    loop {
        let mut guard = fd.readable_mut().await?;
        {
            let ring = guard.get_inner_mut();
            let now = Instant::now();
            while let Some(item) = ring.next() {
                lifecycle.dispatch(&item, now);
            }
        }
        guard.clear_ready();
    }
}

/// The lifecycle's drops, reported as probe `lifecycle`.
struct LifecycleHealth {
    bad_event: Arc<std::sync::atomic::AtomicU64>,
    counters: Arc<KernelCounters>,
}

impl super::Probe for LifecycleHealth {
    fn name(&self) -> &'static str {
        "lifecycle"
    }
    fn families(&self, _arrived: Instant) -> Vec<MetricFamily> {
        Vec::new()
    }
    fn drops(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("event_ring_full", self.counters.get(Counter::EventRingFull)),
            // bpf_probe_read_kernel in the shared helper (the exit program's task->signal
            // reads, the tcp programs' socket fields); lifecycle attaches with every probe
            // that uses it.
            (
                "kernel_read_failed",
                self.counters.get(Counter::TaskReadFailed),
            ),
            (
                "bad_event",
                self.bad_event.load(std::sync::atomic::Ordering::Relaxed),
            ),
        ]
    }
    fn maps(&self) -> Vec<super::MapFill> {
        Vec::new()
    }
    fn tracked_processes(&self) -> usize {
        0
    }

    fn series_overflow(&self) -> Option<u64> {
        None
    }
}

/// Kernels whose sched_process_exit passes group_dead say when a process's last thread exits;
/// on older ones the program reads p->signal->live instead.
fn has_group_dead(kernel: &KernelInfo) -> bool {
    // btf_trace_* prototypes start with the `void *` context argument.
    kernel
        .kbtf
        .func_proto_param_count("btf_trace_sched_process_exit")
        .is_ok_and(|n| n == 3)
}
