//! Effective configuration: flags, then `STALLWATCH_*` environment variables, then the config
//! file (`--config`, TOML), then defaults. `stallwatch config dump` prints the result.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// Probes this build knows. `syscalls` is opt-in: its hooks run on every syscall on the node.
/// In start order: sched first, so its sched_process_exit program attaches (and runs) before
/// the shared lifecycle's.
pub const KNOWN_PROBES: &[&str] = &["sched", "syscalls", "tcp", "gc"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    pub listen: SocketAddr,
    pub probes: Vec<String>,
    pub per_pid: bool,
    #[serde(with = "humantime_serde_compat")]
    pub exit_grace: Duration,
    pub bpf_stats: bool,
    pub strict: bool,
    pub max_processes: u32,
    /// Threads the sched probe tracks at once (`SW_THREADS`, and ended ones awaiting a fold).
    pub max_threads: u32,
    /// Ring buffer for process lifecycle events, bytes (power of two, >= page size).
    pub event_buffer: u32,
    /// Attach the pre-5.18 sched_switch program even where the tracepoint passes prev_state,
    /// so the older kernels' code path can be tested here.
    pub legacy_sched_switch: bool,
    /// Attach the sched_process_exit program of kernels whose tracepoint has no `group_dead`
    /// (older kernels), which reads `p->signal->live` instead, so that path can be tested here.
    pub legacy_process_exit: bool,
    /// Add a `syscall` label to the syscall probe's series (per-syscall detail).
    pub syscall_names: bool,
    /// Syscalls at least this long are streamed as slow-call events.
    #[serde(with = "humantime_serde_compat")]
    pub slow_syscall: Duration,
    /// Time syscalls only of these processes (tgids) ...
    pub syscall_pids: Vec<u32>,
    /// ... and of these cgroup v2 directories and their descendants. Both empty: everyone.
    pub syscall_cgroups: Vec<PathBuf>,
    /// Entries of the syscall latency map (and of the error map): (process, class) pairs,
    /// or (process, syscall) pairs with `syscall-names`.
    pub syscall_max_entries: u32,
    /// At most one smoothed-RTT sample per TCP connection per this interval.
    #[serde(with = "humantime_serde_compat")]
    pub tcp_rtt_interval: Duration,
    /// Runtime discovery only for these processes (empty: every process). Set by
    /// `diagnose`, so sampling one process puts no uprobes into others' binaries.
    #[serde(skip)]
    pub gc_only_pids: Vec<u32>,
    /// Name pods and containers from the Kubernetes API: `auto` (when an in-cluster service
    /// account or a kubeconfig is present) or `off` (labels from cgroup paths only).
    pub kubernetes: KubernetesMode,
    /// This node's name (the pods watched are those with spec.nodeName equal to it).
    pub node_name: Option<String>,
    /// Where the host's cgroup v2 hierarchy is mounted (default: found in /proc/self/mountinfo).
    pub cgroup_root: Option<PathBuf>,
    /// Per metric, at most this many process series (comm, cgroup, ...); the least active
    /// rest fold into one `comm="_other"` series. 0: no cap.
    pub max_series: u32,
    /// Once the probes are attached, drop every capability later work does not need.
    pub drop_capabilities: bool,
    /// Load this eBPF object instead of the embedded one (tests: the other architecture's).
    #[serde(skip)]
    pub ebpf_object: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum KubernetesMode {
    Auto,
    Off,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:9477".parse().expect("valid default"),
            probes: vec!["sched".into(), "tcp".into(), "gc".into()],
            per_pid: false,
            exit_grace: Duration::from_secs(300),
            bpf_stats: false,
            strict: false,
            max_processes: 16384,
            max_threads: 65536,
            event_buffer: 256 * 1024,
            legacy_sched_switch: false,
            legacy_process_exit: false,
            syscall_names: false,
            slow_syscall: Duration::from_millis(100),
            syscall_pids: Vec::new(),
            syscall_cgroups: Vec::new(),
            syscall_max_entries: 65536,
            tcp_rtt_interval: Duration::from_secs(1),
            gc_only_pids: Vec::new(),
            kubernetes: KubernetesMode::Auto,
            node_name: None,
            cgroup_root: None,
            max_series: 2000,
            drop_capabilities: true,
            ebpf_object: None,
        }
    }
}

/// The file form: every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub probes: Option<Vec<String>>,
    pub per_pid: Option<bool>,
    #[serde(default, with = "humantime_serde_compat::option")]
    pub exit_grace: Option<Duration>,
    pub bpf_stats: Option<bool>,
    pub strict: Option<bool>,
    pub max_processes: Option<u32>,
    pub max_threads: Option<u32>,
    pub event_buffer: Option<u32>,
    pub legacy_sched_switch: Option<bool>,
    pub legacy_process_exit: Option<bool>,
    pub syscall_names: Option<bool>,
    #[serde(default, with = "humantime_serde_compat::option")]
    pub slow_syscall: Option<Duration>,
    pub syscall_pids: Option<Vec<u32>>,
    pub syscall_cgroups: Option<Vec<PathBuf>>,
    pub syscall_max_entries: Option<u32>,
    #[serde(default, with = "humantime_serde_compat::option")]
    pub tcp_rtt_interval: Option<Duration>,
    pub kubernetes: Option<KubernetesMode>,
    pub node_name: Option<String>,
    pub cgroup_root: Option<PathBuf>,
    pub max_series: Option<u32>,
    pub drop_capabilities: Option<bool>,
}

/// Flags of `stallwatch run` (and `check`); each has a STALLWATCH_* variable.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Flags {
    /// Config file (TOML, keys as in `stallwatch config dump`).
    #[arg(long, env = "STALLWATCH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address for /metrics, /healthz, /readyz [default: 127.0.0.1:9477]; port 0 picks one.
    #[arg(long, env = "STALLWATCH_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Comma list of probes to run [default: sched,tcp,gc]. Known: sched, tcp, gc, syscalls (opt-in:
    /// it hooks every syscall on the node; see docs/probes.md for its cost).
    #[arg(long, env = "STALLWATCH_PROBES", value_delimiter = ',')]
    pub probes: Option<Vec<String>>,
    /// Add a `pid` label to per-process series (more series).
    #[arg(long, env = "STALLWATCH_PER_PID", num_args = 0..=1, default_missing_value = "true")]
    pub per_pid: Option<bool>,
    /// Keep series of exited processes this long [default: 5m].
    #[arg(long, env = "STALLWATCH_EXIT_GRACE", value_parser = humantime::parse_duration)]
    pub exit_grace: Option<Duration>,
    /// Enable kernel BPF run-time stats and export per-program cost.
    #[arg(long, env = "STALLWATCH_BPF_STATS", num_args = 0..=1, default_missing_value = "true")]
    pub bpf_stats: Option<bool>,
    /// Exit if any requested probe cannot attach (default: run degraded, report it).
    #[arg(long, env = "STALLWATCH_STRICT", num_args = 0..=1, default_missing_value = "true")]
    pub strict: Option<bool>,
    /// Per-process kernel map size [default: 16384].
    #[arg(long, env = "STALLWATCH_MAX_PROCESSES")]
    pub max_processes: Option<u32>,
    /// Threads the sched probe tracks at once (its per-thread kernel maps) [default: 65536].
    #[arg(long, env = "STALLWATCH_MAX_THREADS")]
    pub max_threads: Option<u32>,
    /// Process-event ring buffer size in bytes [default: 262144].
    #[arg(long, env = "STALLWATCH_EVENT_BUFFER")]
    pub event_buffer: Option<u32>,
    /// Use the pre-5.18 sched_switch program (reads prev->__state); for testing.
    #[arg(long, hide = true, env = "STALLWATCH_LEGACY_SCHED_SWITCH", num_args = 0..=1, default_missing_value = "true")]
    pub legacy_sched_switch: Option<bool>,
    /// Use the sched_process_exit program for kernels without `group_dead` (reads
    /// p->signal->live); for testing.
    #[arg(long, hide = true, env = "STALLWATCH_LEGACY_PROCESS_EXIT", num_args = 0..=1, default_missing_value = "true")]
    pub legacy_process_exit: Option<bool>,
    /// Add a `syscall` label to syscall series (one series per syscall used, not per class).
    #[arg(long, env = "STALLWATCH_SYSCALL_NAMES", num_args = 0..=1, default_missing_value = "true")]
    pub syscall_names: Option<bool>,
    /// Stream syscalls at least this long as slow-call events (logged) [default: 100ms].
    #[arg(long, env = "STALLWATCH_SLOW_SYSCALL", value_parser = humantime::parse_duration)]
    pub slow_syscall: Option<Duration>,
    /// Time syscalls only of these pids (repeat or comma list); with --syscall-cgroup, of either.
    #[arg(
        long = "syscall-pid",
        env = "STALLWATCH_SYSCALL_PIDS",
        value_delimiter = ','
    )]
    pub syscall_pids: Option<Vec<u32>>,
    /// Time syscalls only in these cgroup v2 directories and below (path under the cgroup2
    /// mount, e.g. /kubepods.slice, or absolute).
    #[arg(
        long = "syscall-cgroup",
        env = "STALLWATCH_SYSCALL_CGROUPS",
        value_delimiter = ','
    )]
    pub syscall_cgroups: Option<Vec<PathBuf>>,
    /// Size of the syscall latency and error maps [default: 65536].
    #[arg(long, env = "STALLWATCH_SYSCALL_MAX_ENTRIES")]
    pub syscall_max_entries: Option<u32>,
    /// At most one RTT sample per TCP connection per interval [default: 1s].
    #[arg(long, env = "STALLWATCH_TCP_RTT_INTERVAL", value_parser = humantime::parse_duration)]
    pub tcp_rtt_interval: Option<Duration>,
    /// Name pods and containers from the Kubernetes API [default: auto]: auto uses the
    /// in-cluster service account or $KUBECONFIG when present; off keeps cgroup-path labels only.
    #[arg(long, env = "STALLWATCH_KUBERNETES")]
    pub kubernetes: Option<KubernetesMode>,
    /// This node's name, for watching its pods (in a DaemonSet: the downward API's spec.nodeName).
    #[arg(long, env = "STALLWATCH_NODE_NAME")]
    pub node_name: Option<String>,
    /// Where the host's cgroup v2 hierarchy is mounted [default: from /proc/self/mountinfo]; in a
    /// container, the host's /sys/fs/cgroup mounted read-only.
    #[arg(long, env = "STALLWATCH_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,
    /// At most this many process series per metric [default: 2000]; the least active rest fold
    /// into one comm="_other" series (totals stay exact). 0: no cap.
    #[arg(long, env = "STALLWATCH_MAX_SERIES")]
    pub max_series: Option<u32>,
    /// Load this eBPF object file instead of the embedded one (for testing another
    /// architecture's programs against this kernel's verifier).
    #[arg(long, hide = true, env = "STALLWATCH_EBPF_OBJECT")]
    pub ebpf_object: Option<PathBuf>,
    /// Drop capabilities not needed after the probes attach [default: true].
    #[arg(long, env = "STALLWATCH_DROP_CAPABILITIES", num_args = 0..=1, default_missing_value = "true")]
    pub drop_capabilities: Option<bool>,
}

impl Flags {
    pub fn resolve(&self) -> anyhow::Result<Config> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .with_context(|| format!("parsing config file {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let d = Config::default();
        let c = Config {
            listen: self.listen.or(file.listen).unwrap_or(d.listen),
            probes: self.probes.clone().or(file.probes).unwrap_or(d.probes),
            per_pid: self.per_pid.or(file.per_pid).unwrap_or(d.per_pid),
            exit_grace: self.exit_grace.or(file.exit_grace).unwrap_or(d.exit_grace),
            bpf_stats: self.bpf_stats.or(file.bpf_stats).unwrap_or(d.bpf_stats),
            strict: self.strict.or(file.strict).unwrap_or(d.strict),
            max_processes: self
                .max_processes
                .or(file.max_processes)
                .unwrap_or(d.max_processes),
            max_threads: self
                .max_threads
                .or(file.max_threads)
                .unwrap_or(d.max_threads),
            event_buffer: self
                .event_buffer
                .or(file.event_buffer)
                .unwrap_or(d.event_buffer),
            legacy_sched_switch: self
                .legacy_sched_switch
                .or(file.legacy_sched_switch)
                .unwrap_or(d.legacy_sched_switch),
            legacy_process_exit: self
                .legacy_process_exit
                .or(file.legacy_process_exit)
                .unwrap_or(d.legacy_process_exit),
            syscall_names: self
                .syscall_names
                .or(file.syscall_names)
                .unwrap_or(d.syscall_names),
            slow_syscall: self
                .slow_syscall
                .or(file.slow_syscall)
                .unwrap_or(d.slow_syscall),
            syscall_pids: self
                .syscall_pids
                .clone()
                .or(file.syscall_pids)
                .unwrap_or(d.syscall_pids),
            syscall_cgroups: self
                .syscall_cgroups
                .clone()
                .or(file.syscall_cgroups)
                .unwrap_or(d.syscall_cgroups),
            syscall_max_entries: self
                .syscall_max_entries
                .or(file.syscall_max_entries)
                .unwrap_or(d.syscall_max_entries),
            tcp_rtt_interval: self
                .tcp_rtt_interval
                .or(file.tcp_rtt_interval)
                .unwrap_or(d.tcp_rtt_interval),
            gc_only_pids: Vec::new(),
            kubernetes: self.kubernetes.or(file.kubernetes).unwrap_or(d.kubernetes),
            node_name: self.node_name.clone().or(file.node_name).or(d.node_name),
            cgroup_root: self
                .cgroup_root
                .clone()
                .or(file.cgroup_root)
                .or(d.cgroup_root),
            max_series: self.max_series.or(file.max_series).unwrap_or(d.max_series),
            drop_capabilities: self
                .drop_capabilities
                .or(file.drop_capabilities)
                .unwrap_or(d.drop_capabilities),
            ebpf_object: self.ebpf_object.clone(),
        };
        c.validate()?;
        Ok(c)
    }
}

impl Config {
    pub fn validate(&self) -> anyhow::Result<()> {
        for p in &self.probes {
            if !KNOWN_PROBES.contains(&p.as_str()) {
                bail!(
                    "unknown probe {p:?} in --probes; known probes: {}",
                    KNOWN_PROBES.join(", ")
                );
            }
        }
        if self.probes.is_empty() {
            bail!(
                "--probes is empty; name at least one of: {}",
                KNOWN_PROBES.join(", ")
            );
        }
        if self.max_processes == 0 {
            bail!("--max-processes must be at least 1");
        }
        if self.max_threads == 0 {
            bail!("--max-threads must be at least 1");
        }
        if self.syscall_max_entries == 0 {
            bail!("--syscall-max-entries must be at least 1");
        }
        if self.slow_syscall.is_zero() {
            bail!("--slow-syscall must be longer than 0 (every syscall would be an event)");
        }
        if let Some(p) = self.syscall_pids.iter().find(|p| **p == 0) {
            bail!("--syscall-pid {p} is not a process id");
        }
        if let Some(root) = &self.cgroup_root {
            if !root.join("cgroup.procs").exists() {
                bail!(
                    "--cgroup-root {}: not a cgroup v2 hierarchy (no cgroup.procs in it)",
                    root.display()
                );
            }
        }
        if self
            .node_name
            .as_deref()
            .is_some_and(|n| n.is_empty() || n.contains(['/', ',', '=']))
        {
            bail!(
                "--node-name {:?} is not a Kubernetes node name",
                self.node_name.as_deref().unwrap_or("")
            );
        }
        let page = 4096;
        if self.event_buffer < page || !self.event_buffer.is_power_of_two() {
            bail!(
                "--event-buffer must be a power of two of at least {page} bytes, got {}",
                self.event_buffer
            );
        }
        Ok(())
    }

    pub fn probe_enabled(&self, name: &str) -> bool {
        self.probes.iter().any(|p| p == name)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("config serializes")
    }
}

/// Durations as humantime strings ("5m") in TOML.
mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }

    pub mod option {
        use super::*;
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            super::deserialize(d).map(Some)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_flag_over_file_over_default() {
        let dir = std::env::temp_dir().join(format!("sw-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "per-pid = true\nexit-grace = \"30s\"\nmax-processes = 10\n\
             max-threads = 99\n\
             probes = [\"sched\", \"syscalls\"]\nslow-syscall = \"250ms\"\n\
             syscall-cgroups = [\"/kubepods.slice\"]\n",
        )
        .unwrap();
        let flags = Flags {
            config: Some(file),
            max_processes: Some(20),
            ..Flags::default()
        };
        let c = flags.resolve().unwrap();
        assert!(c.per_pid);
        assert_eq!(c.exit_grace, Duration::from_secs(30));
        assert_eq!(c.max_processes, 20);
        assert_eq!(c.max_threads, 99);
        assert_eq!(c.event_buffer, 256 * 1024);
        assert_eq!(c.slow_syscall, Duration::from_millis(250));
        assert_eq!(c.syscall_cgroups, vec![PathBuf::from("/kubepods.slice")]);
        assert!(c.probe_enabled("syscalls"));
        // The dump round-trips through the file format.
        std::fs::write(dir.join("d.toml"), c.to_toml()).unwrap();
        let again = Flags {
            config: Some(dir.join("d.toml")),
            ..Flags::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(again, c);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        let e = Flags {
            probes: Some(vec!["sched".into(), "bogus".into()]),
            ..Flags::default()
        }
        .resolve()
        .unwrap_err();
        assert!(e.to_string().contains("unknown probe \"bogus\""), "{e}");
        let e = Flags {
            event_buffer: Some(5000),
            ..Flags::default()
        }
        .resolve()
        .unwrap_err();
        assert!(e.to_string().contains("--event-buffer"), "{e}");
        let e = Flags {
            syscall_pids: Some(vec![0]),
            ..Flags::default()
        }
        .resolve()
        .unwrap_err();
        assert!(e.to_string().contains("--syscall-pid 0"), "{e}");
        let e = Flags {
            slow_syscall: Some(Duration::ZERO),
            ..Flags::default()
        }
        .resolve()
        .unwrap_err();
        assert!(e.to_string().contains("--slow-syscall"), "{e}");
        let dir = std::env::temp_dir().join(format!("sw-cfg2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("c.toml"), "no-such-key = 1\n").unwrap();
        let e = Flags {
            config: Some(dir.join("c.toml")),
            ..Flags::default()
        }
        .resolve()
        .unwrap_err();
        assert!(format!("{e:#}").contains("no-such-key"), "{e:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
