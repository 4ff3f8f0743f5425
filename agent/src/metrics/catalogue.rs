//! Every metric stallwatch exports: name, type, help, labels and where the data comes from.
//! docs/metrics.md is generated from this table (and a test keeps the two equal).
// Labels, sources and the Markdown renderer feed the generated docs, which only tests build.
#![cfg_attr(not(test), allow(dead_code))]

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

#[derive(Debug)]
pub struct MetricDef {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    /// Labels besides the per-process ones (see `per_process`).
    pub labels: &'static [&'static str],
    /// Carries `comm`, `cgroup` (and `pid` under `--per-pid`).
    pub per_process: bool,
    pub source: &'static str,
}

/// Labels a per-process series can have, before `--per-pid` adds `pid`. Only `comm` and
/// `cgroup` are always there; the others appear when the cgroup or the Kubernetes API says.
pub const PROCESS_LABELS: &[&str] = &[
    "comm",
    "cgroup",
    "namespace",
    "pod",
    "container",
    "pod_uid",
    "container_id",
    "unit",
];

pub const RUNQUEUE_LATENCY: MetricDef = MetricDef {
    name: "stallwatch_runqueue_latency_seconds",
    kind: Kind::Histogram,
    help: "Time threads spent runnable but waiting for a CPU: from wakeup, or preemption while runnable, until they ran (the kernel's run_delay accounting).",
    labels: &[],
    per_process: true,
    source: "tp_btf/sched_switch, sched_process_fork, sched_process_exit",
};

pub const OFFCPU_SECONDS: MetricDef = MetricDef {
    name: "stallwatch_offcpu_seconds_total",
    kind: Kind::Counter,
    help: "Time threads spent off-CPU, from switch-out to switch-in, by why they left: voluntary (S sleep), uninterruptible (D: I/O, vfork, some locks), involuntary (preempted).",
    labels: &["reason"],
    per_process: true,
    source: "tp_btf/sched_switch, sched_process_exit",
};

pub const OFFCPU_DURATION: MetricDef = MetricDef {
    name: "stallwatch_offcpu_duration_seconds",
    kind: Kind::Histogram,
    help: "Distribution of single off-CPU intervals, by reason.",
    labels: &["reason"],
    per_process: true,
    source: "tp_btf/sched_switch, sched_process_exit",
};

pub const CONTEXT_SWITCHES: MetricDef = MetricDef {
    name: "stallwatch_context_switches_total",
    kind: Kind::Counter,
    help: "Context switches away from the process's threads, counted as the kernel counts voluntary_ctxt_switches / nonvoluntary_ctxt_switches.",
    labels: &["kind"],
    per_process: true,
    source: "tp_btf/sched_switch",
};

pub const SYSCALL_LATENCY: MetricDef = MetricDef {
    name: "stallwatch_syscall_latency_seconds",
    kind: Kind::Histogram,
    help: "Syscall duration from entry to exit, by class (read, write, poll, lock, sleep, socket, file, memory, process, other); `syscall` label only with --syscall-names. Probe `syscalls` (opt-in).",
    labels: &["class", "syscall"],
    per_process: true,
    source: "tp_btf/sys_enter, sys_exit",
};

pub const SYSCALL_ERRORS: MetricDef = MetricDef {
    name: "stallwatch_syscall_errors_total",
    kind: Kind::Counter,
    help: "Syscalls that returned an error, by class and errno name (ENOENT, EAGAIN, ETIMEDOUT, kernel-internal ERESTARTSYS...); `syscall` label only with --syscall-names.",
    labels: &["class", "syscall", "errno"],
    per_process: true,
    source: "tp_btf/sys_exit",
};

pub const TCP_CONNECT_LATENCY: MetricDef = MetricDef {
    name: "stallwatch_tcp_connect_latency_seconds",
    kind: Kind::Histogram,
    help: "Outbound TCP connect latency, SYN sent to established, for connects that succeeded; attributed to the process that called connect.",
    labels: &[],
    per_process: true,
    source: "tp_btf/inet_sock_set_state",
};

pub const TCP_CONNECTIONS: MetricDef = MetricDef {
    name: "stallwatch_tcp_connections_total",
    kind: Kind::Counter,
    help: "TCP connections by direction and result. Outbound: established, refused (RST), timeout, reset, unreachable (ICMP), abandoned (closed while connecting). Inbound: accepted (the application took it: first read, write or close), closed_before_accept.",
    labels: &["direction", "result"],
    per_process: true,
    source: "tp_btf/inet_sock_set_state, tcp_receive_reset, tcp_rcv_space_adjust, tcp_sendmsg_locked",
};

pub const TCP_ACCEPT_QUEUE: MetricDef = MetricDef {
    name: "stallwatch_tcp_accept_queue_seconds",
    kind: Kind::Histogram,
    help: "Inbound connections: handshake completed until the application first used the connection (read, write or close); no tracepoint marks accept() itself. Attributed to the process that used it.",
    labels: &[],
    per_process: true,
    source: "tp_btf/inet_sock_set_state, tcp_rcv_space_adjust, tcp_sendmsg_locked",
};

pub const TCP_RTT: MetricDef = MetricDef {
    name: "stallwatch_tcp_rtt_seconds",
    kind: Kind::Histogram,
    help: "Smoothed RTT (srtt) of the process's connections, sampled at most once per connection per --tcp-rtt-interval (1s) when a segment arrives.",
    labels: &[],
    per_process: true,
    source: "tp_btf/tcp_probe",
};

pub const TCP_RETRANSMITS: MetricDef = MetricDef {
    name: "stallwatch_tcp_retransmits_total",
    kind: Kind::Counter,
    help: "Retransmitted TCP segments (data, SYN and SYN-ACK) of the process's sockets.",
    labels: &[],
    per_process: true,
    source: "tp_btf/tcp_retransmit_skb, tcp_retransmit_synack",
};

pub const TCP_RESETS: MetricDef = MetricDef {
    name: "stallwatch_tcp_resets_total",
    kind: Kind::Counter,
    help: "TCP resets sent and received on the process's sockets (RSTs answering segments for no socket are not attributed).",
    labels: &["direction"],
    per_process: true,
    source: "tp_btf/tcp_send_reset, tcp_receive_reset",
};

pub const RUNTIME_PAUSE: MetricDef = MetricDef {
    name: "stallwatch_runtime_pause_seconds",
    kind: Kind::Histogram,
    help: "Stop-the-world pauses of a language runtime, by cause: Go (from the runtime's own start-of-stop to restart, as debug.ReadGCStats counts them), JVM safepoints (begin to end), CPython and V8 collections. cause: gc, other (non-GC stops: Go ReadMemStats/GOMAXPROCS, JVM deoptimisation...), unknown (Go 1.19-1.20 give no reason).",
    labels: &["runtime", "cause"],
    per_process: true,
    source: "uprobes: Go runtime.startTheWorldWithSema (entry and each RET) or stopTheWorldWithSema, JVM SafepointSynchronize::begin/end + USDT hotspot:gc__begin, USDT python:gc__start/gc__done, V8 Heap::CollectGarbage",
};

pub const RUNTIME_STOP_LATENCY: MetricDef = MetricDef {
    name: "stallwatch_runtime_stop_latency_seconds",
    kind: Kind::Histogram,
    help: "Time a runtime took to stop the world (part of each pause): Go >=1.22's stopping phase, the JVM's time to reach a safepoint. Absent for runtimes that do not expose it.",
    labels: &["runtime"],
    per_process: true,
    source: "uprobes: Go runtime.startTheWorldWithSema arguments, JVM SafepointSynchronize::begin return",
};

pub const RUNTIME_PROCESSES: MetricDef = MetricDef {
    name: "stallwatch_runtime_processes",
    kind: Kind::Gauge,
    help: "Live processes whose runtime the gc probe is measuring.",
    labels: &["runtime"],
    per_process: false,
    source: "agent (runtime discovery)",
};

pub const RUNTIME_ATTACH_FAILURES: MetricDef = MetricDef {
    name: "stallwatch_runtime_attach_failures_total",
    kind: Kind::Counter,
    help: "Processes with a runtime the gc probe could not measure, by reason (unsupported_version, no_symbol, truncated, not_elf, attach_failed, process_map_full, ...); the agent log says which process and why.",
    labels: &["runtime", "reason"],
    per_process: false,
    source: "agent (runtime discovery)",
};

pub const BUILD_INFO: MetricDef = MetricDef {
    name: "stallwatch_build_info",
    kind: Kind::Gauge,
    help: "Always 1; labels describe the running agent.",
    labels: &["version", "arch", "kernel"],
    per_process: false,
    source: "agent",
};

pub const PROBE_ATTACHED: MetricDef = MetricDef {
    name: "stallwatch_probe_attached",
    kind: Kind::Gauge,
    help: "1 if the probe's programs are loaded and attached, 0 if it was requested but could not attach (see the agent log for why).",
    labels: &["probe"],
    per_process: false,
    source: "agent",
};

pub const EVENTS_DROPPED: MetricDef = MetricDef {
    name: "stallwatch_events_dropped_total",
    kind: Kind::Counter,
    help: "Events the agent could not account for, by probe and reason (map full, ring buffer full, missed exit...).",
    labels: &["probe", "reason"],
    per_process: false,
    source: "SW_COUNTERS per-CPU array, bpf_prog_info.recursion_misses, agent",
};

pub const TRACKED_PROCESSES: MetricDef = MetricDef {
    name: "stallwatch_tracked_processes",
    kind: Kind::Gauge,
    help: "Live processes the agent currently attributes data to.",
    labels: &[],
    per_process: false,
    source: "agent",
};

pub const SERIES_OVERFLOW: MetricDef = MetricDef {
    name: "stallwatch_series_overflow_total",
    kind: Kind::Counter,
    help: "Process series folded into the probe's overflow series (comm=\"_other\") because its metrics reached --max-series; sums over a metric stay exact.",
    labels: &["probe"],
    per_process: false,
    source: "agent (series budget)",
};

pub const KUBERNETES_PODS: MetricDef = MetricDef {
    name: "stallwatch_kubernetes_pods",
    kind: Kind::Gauge,
    help: "Pods on this node known from the Kubernetes API watch (names for the namespace, pod and container labels). Absent when the API is not used.",
    labels: &[],
    per_process: false,
    source: "agent (Kubernetes pod watch, spec.nodeName)",
};

pub const KUBERNETES_SYNCED: MetricDef = MetricDef {
    name: "stallwatch_kubernetes_synced",
    kind: Kind::Gauge,
    help: "1 while the Kubernetes pod watch is connected and has listed this node's pods, 0 while it is failing (names may be stale or missing).",
    labels: &[],
    per_process: false,
    source: "agent (Kubernetes pod watch)",
};

pub const KUBERNETES_WATCH_ERRORS: MetricDef = MetricDef {
    name: "stallwatch_kubernetes_watch_errors_total",
    kind: Kind::Counter,
    help:
        "Failed Kubernetes API list/watch attempts (the agent retries with backoff and logs why).",
    labels: &[],
    per_process: false,
    source: "agent (Kubernetes pod watch)",
};

pub const MAP_ENTRIES: MetricDef = MetricDef {
    name: "stallwatch_bpf_map_entries",
    kind: Kind::Gauge,
    help: "Entries in a bounded kernel map.",
    labels: &["map"],
    per_process: false,
    source: "map iteration, SW_COUNTERS insert/delete counts",
};

pub const MAP_CAPACITY: MetricDef = MetricDef {
    name: "stallwatch_bpf_map_capacity",
    kind: Kind::Gauge,
    help: "max_entries of a bounded kernel map (--max-threads, --max-processes, --syscall-max-entries, --event-buffer). Task- and socket-local storage (SW_SC_THREADS, SW_SOCKS) has no bound of its own: the kernel frees it with the task or socket.",
    labels: &["map"],
    per_process: false,
    source: "agent configuration",
};

pub const PROGRAM_RUN_SECONDS: MetricDef = MetricDef {
    name: "stallwatch_bpf_program_run_seconds_total",
    kind: Kind::Counter,
    help: "Time the kernel spent running each of our BPF programs (only with --bpf-stats).",
    labels: &["program"],
    per_process: false,
    source: "kernel BPF stats (BPF_ENABLE_STATS)",
};

pub const PROGRAM_RUNS: MetricDef = MetricDef {
    name: "stallwatch_bpf_program_runs_total",
    kind: Kind::Counter,
    help: "Times each of our BPF programs ran (only with --bpf-stats).",
    labels: &["program"],
    per_process: false,
    source: "kernel BPF stats (BPF_ENABLE_STATS)",
};

pub const ALL: &[&MetricDef] = &[
    &RUNQUEUE_LATENCY,
    &OFFCPU_SECONDS,
    &OFFCPU_DURATION,
    &CONTEXT_SWITCHES,
    &SYSCALL_LATENCY,
    &SYSCALL_ERRORS,
    &TCP_CONNECT_LATENCY,
    &TCP_CONNECTIONS,
    &TCP_ACCEPT_QUEUE,
    &TCP_RTT,
    &TCP_RETRANSMITS,
    &TCP_RESETS,
    &RUNTIME_PAUSE,
    &RUNTIME_STOP_LATENCY,
    &RUNTIME_PROCESSES,
    &RUNTIME_ATTACH_FAILURES,
    &BUILD_INFO,
    &PROBE_ATTACHED,
    &EVENTS_DROPPED,
    &TRACKED_PROCESSES,
    &SERIES_OVERFLOW,
    &KUBERNETES_PODS,
    &KUBERNETES_SYNCED,
    &KUBERNETES_WATCH_ERRORS,
    &MAP_ENTRIES,
    &MAP_CAPACITY,
    &PROGRAM_RUN_SECONDS,
    &PROGRAM_RUNS,
];

/// The metric catalogue as Markdown (docs/metrics.md).
pub fn markdown() -> String {
    let mut s = String::from(
        "# Metric catalogue\n\n\
         Generated from `agent/src/metrics/catalogue.rs`; `cargo test` fails when this file and the \
         code disagree (regenerate with `STALLWATCH_UPDATE_DOCS=1 cargo test -p stallwatch catalogue`).\n\n\
         Per-process series carry `comm` and `cgroup` (the host's cgroup v2 path); `--per-pid` adds `pid`. \
         Processes with the same comm in the same cgroup share a series. Where the cgroup path names a \
         container, they also carry `pod_uid` and `container_id`, and, once the Kubernetes pod watch \
         knows the pod, `namespace`, `pod` and `container`; host services carry their systemd `unit`. \
         Labels with no value are left out. Past `--max-series` process series per metric, the least \
         active fold into one `comm=\"_other\"` series (one per runtime for the gc probe). Durations are in seconds; \
         histogram buckets are powers of two from 1.024 µs to 68.7 s. The agent also exports the \
         standard `process_*` metrics of its own process (CPU seconds, resident memory, open fds, \
         threads, start time).\n\n\
         | name | type | labels | help | source |\n|---|---|---|---|---|\n",
    );
    for m in ALL {
        let mut labels: Vec<&str> = Vec::new();
        if m.per_process {
            labels.extend(PROCESS_LABELS);
        }
        labels.extend(m.labels);
        let labels = if labels.is_empty() {
            "—".to_string()
        } else {
            labels
                .iter()
                .map(|l| format!("`{l}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        s.push_str(&format!(
            "| `{}` | {} | {} | {} | {} |\n",
            m.name,
            m.kind.as_str(),
            labels,
            m.help,
            m.source
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn catalogue_doc_matches_the_code() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md");
        let want = super::markdown();
        if std::env::var_os("STALLWATCH_UPDATE_DOCS").is_some() {
            std::fs::write(path, &want).unwrap();
        }
        let have = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            have == want,
            "docs/metrics.md is out of date; run STALLWATCH_UPDATE_DOCS=1 cargo test -p stallwatch catalogue"
        );
    }

    #[test]
    fn names_follow_prometheus_conventions() {
        for m in super::ALL {
            assert!(m.name.starts_with("stallwatch_"), "{}", m.name);
            if m.kind == super::Kind::Counter {
                assert!(m.name.ends_with("_total"), "{}", m.name);
            }
        }
    }
}
