//! `stallwatch check`: can this host run stallwatch, and if not, exactly what is missing.

use std::path::Path;

use crate::app::{kernel_release, App};
use crate::config::{Config, KNOWN_PROBES};

pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// A capability set (`field`: "CapEff:", "CapPrm:", ...) from a /proc/<pid>/status body.
pub fn parse_cap(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// The effective capability set from a /proc/<pid>/status body.
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    parse_cap(status, "CapEff:")
}

pub fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_cap_eff(&s))
        .unwrap_or(0)
}

pub fn has_cap(caps: u64, cap: u32) -> bool {
    caps & (1u64 << cap) != 0
}

/// Capabilities the loaded probes need that this process lacks, by name. CAP_SYS_ADMIN
/// stands in for CAP_BPF and CAP_PERFMON (kernels before 5.8 only know it).
pub fn missing_caps(caps: u64) -> Vec<&'static str> {
    if has_cap(caps, CAP_SYS_ADMIN) {
        return vec![];
    }
    let mut missing = Vec::new();
    if !has_cap(caps, CAP_BPF) {
        missing.push("CAP_BPF");
    }
    if !has_cap(caps, CAP_PERFMON) {
        missing.push("CAP_PERFMON");
    }
    missing
}

/// Adds what the process is missing to a load/attach error, so "Operation not permitted"
/// names the capability.
pub fn explain(e: anyhow::Error) -> anyhow::Error {
    let missing = missing_caps(effective_caps());
    if missing.is_empty() {
        e
    } else {
        e.context(format!(
            "this process lacks {} (needed to load and attach BPF tracing programs); run as root or grant them",
            missing.join(" and ")
        ))
    }
}

/// tracefs is not needed by tp_btf programs, but classic tracepoints (later probes) and
/// debugging need it: mount it if we can, and say so.
fn tracefs_status() -> (bool, String) {
    let dir = Path::new("/sys/kernel/tracing");
    if dir.join("events").exists() {
        return (true, "mounted at /sys/kernel/tracing".into());
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
        .status();
    match status {
        Ok(s) if s.success() && dir.join("events").exists() => (
            true,
            "was not mounted; mounted it at /sys/kernel/tracing".into(),
        ),
        _ => (
            false,
            "not mounted and could not mount it (`mount -t tracefs nodev /sys/kernel/tracing`)"
                .into(),
        ),
    }
}

/// Runs every check, prints a report, returns whether everything required is present.
pub fn run(mut config: Config) -> bool {
    let ok = std::cell::Cell::new(true);
    let line = |good: bool, required: bool, what: &str, detail: &str| {
        let tag = match (good, required) {
            (true, _) => "ok  ",
            (false, true) => "FAIL",
            (false, false) => "warn",
        };
        println!("{tag} {what:<14} {detail}");
        if !good && required {
            ok.set(false);
        }
    };
    line(true, false, "kernel", &kernel_release());
    let btf = Path::new("/sys/kernel/btf/vmlinux");
    let btf_ok = crate::btf::KernelBtf::from_sys_fs().is_ok();
    line(
        btf_ok,
        true,
        "btf",
        &if btf_ok {
            format!("{} parsed", btf.display())
        } else {
            format!(
                "{} missing or unreadable: the kernel needs CONFIG_DEBUG_INFO_BTF=y",
                btf.display()
            )
        },
    );
    let caps = effective_caps();
    let missing = missing_caps(caps);
    line(
        missing.is_empty(),
        true,
        "capabilities",
        &if missing.is_empty() {
            format!("CapEff={caps:#x} has CAP_BPF+CAP_PERFMON (or CAP_SYS_ADMIN)")
        } else {
            format!(
                "missing {}: run as root, or grant them (e.g. `setcap cap_bpf,cap_perfmon+ep stallwatch`; in Kubernetes, the DaemonSet's securityContext.capabilities)",
                missing.join(", ")
            )
        },
    );
    let (tracefs_ok, detail) = tracefs_status();
    line(
        tracefs_ok,
        false,
        "tracefs",
        &format!("{detail} (not needed by tp_btf probes)"),
    );
    let uprobes = crate::runtime::uprobe::Pmu::from_sysfs();
    line(
        uprobes.is_ok(),
        false,
        "uprobes",
        &match &uprobes {
            Ok(_) => "uprobe PMU present (needed by the gc probe)".to_string(),
            Err(e) => format!("{e}: the gc probe cannot attach"),
        },
    );
    let uprobe_caps = has_cap(caps, CAP_SYS_ADMIN);
    line(
        uprobe_caps,
        false,
        "uprobe caps",
        if uprobe_caps {
            "CAP_SYS_ADMIN held: the gc probe can create uprobes"
        } else {
            "no CAP_SYS_ADMIN: the kernel's uprobe PMU requires it, so the gc probe cannot measure \
             runtime pauses (the other probes are unaffected)"
        },
    );
    let object = crate::embedded::object_for(&config);
    line(
        object.is_ok(),
        true,
        "ebpf object",
        &match (&object, &config.ebpf_object) {
            (Ok(o), None) => format!("{} bytes embedded", o.len()),
            (Ok(o), Some(p)) => format!("{} bytes from {}", o.len(), p.display()),
            (Err(e), _) => format!("{e:#}"),
        },
    );
    if !ok.get() {
        return false;
    }
    // Check every probe this build has, whatever --probes says.
    config.probes = KNOWN_PROBES.iter().map(|p| p.to_string()).collect();
    config.strict = false;
    match App::start(config) {
        Ok((app, _tasks)) => {
            for p in &app.probes {
                match &p.result {
                    Ok(progs) => line(
                        true,
                        true,
                        &format!("probe {}", p.name),
                        &format!("attached {}", progs.join(", ")),
                    ),
                    Err(e) => line(false, true, &format!("probe {}", p.name), e),
                }
            }
        }
        Err(e) => line(false, true, "load", &format!("{e:#}")),
    }
    ok.get()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_named() {
        let status = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        let caps = parse_cap_eff(status).unwrap();
        assert!(missing_caps(caps).is_empty());
        // Only CAP_PERFMON: CAP_BPF is named.
        assert_eq!(missing_caps(1 << CAP_PERFMON), vec!["CAP_BPF"]);
        assert_eq!(missing_caps(0), vec!["CAP_BPF", "CAP_PERFMON"]);
        assert_eq!(parse_cap_eff("garbage"), None);
    }
}
