//! Dropping capabilities once the probes are attached: the agent keeps only what later work
//! needs (attaching uprobes to runtimes that start later, reading other processes' maps) and
//! loses the rest, including from its bounding set when it may change it.
//!
//! Capabilities belong to threads, not processes, and the tokio workers and the discovery
//! thread already run when the probes are attached. Every thread is therefore asked, by a
//! real-time signal, to set the same capabilities itself (what glibc does for setuid), and
//! each thread's /proc status is checked afterwards.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use caps::{CapSet, Capability};

use crate::config::Config;

/// What the running agent still needs after start, and why.
pub fn keep_set(config: &Config) -> Vec<(Capability, &'static str)> {
    let mut keep = vec![(
        Capability::CAP_BPF,
        "reading BPF maps (kernels before 6.5 gate every bpf() command on it)",
    )];
    if config.probe_enabled("gc") {
        keep.extend([
            (
                Capability::CAP_SYS_ADMIN,
                "gc: creating uprobes for runtimes that start later (the kernel's uprobe PMU \
                 requires CAP_SYS_ADMIN again since the 2025 fix that took it from CAP_PERFMON); \
                 also opens /proc/<pid>/map_files",
            ),
            (
                Capability::CAP_PERFMON,
                "gc: perf_event_open under kernel.perf_event_paranoid",
            ),
            (
                Capability::CAP_SYS_PTRACE,
                "gc: reading other processes' /proc/<pid>/maps and exe",
            ),
            (
                Capability::CAP_DAC_READ_SEARCH,
                "gc: listing /proc/<pid>/map_files of other users' processes",
            ),
        ]);
    }
    keep
}

/// Masks every thread applies (capset(2) v3 layout: low and high 32 bits).
static TARGET: AtomicU64 = AtomicU64::new(0);
/// Capabilities to remove from the bounding set (only when CAP_SETPCAP is held).
static BOUNDING_DROP: AtomicU64 = AtomicU64::new(0);
static CAN_SETPCAP: AtomicBool = AtomicBool::new(false);
static FAILED: AtomicU64 = AtomicU64::new(0);

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Applies the target to the calling thread with raw syscalls only (async-signal-safe).
fn apply_to_this_thread() {
    let target = TARGET.load(Ordering::SeqCst);
    if CAN_SETPCAP.load(Ordering::SeqCst) {
        let drop = BOUNDING_DROP.load(Ordering::SeqCst);
        for cap in 0..64u64 {
            if drop & (1 << cap) != 0 {
                // SAFETY: prctl with integer arguments; EINVAL for caps the kernel lacks.
                unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
            }
        }
    }
    // SAFETY: prctl with integer arguments.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: target as u32,
            permitted: target as u32,
            inheritable: 0,
        },
        CapData {
            effective: (target >> 32) as u32,
            permitted: (target >> 32) as u32,
            inheritable: 0,
        },
    ];
    // SAFETY: header and two data structs as capset(2) v3 expects, valid for the call.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if rc != 0 {
        FAILED.fetch_add(1, Ordering::SeqCst);
    }
}

extern "C" fn on_signal(_: libc::c_int) {
    // The interrupted code may be about to read errno; the syscalls here can change it.
    // SAFETY: errno is thread-local; the pointer is valid for this thread.
    let saved = unsafe { *libc::__errno_location() };
    apply_to_this_thread();
    unsafe { *libc::__errno_location() = saved };
}

fn mask(set: &HashSet<Capability>) -> u64 {
    set.iter().fold(0, |m, c| m | (1u64 << c.index()))
}

/// CapEff and CapPrm of one thread from its /proc status; `None` if it exited.
fn thread_caps(tid: &str) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).ok()?;
    let field = |name| crate::check::parse_cap(&status, name);
    Some((field("CapEff:")?, field("CapPrm:")?))
}

fn thread_ids() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// What `drop_to` did, for the log.
#[derive(Debug)]
pub struct Dropped {
    pub kept: Vec<Capability>,
    pub dropped: Vec<Capability>,
    pub threads: usize,
    pub bounding_set_too: bool,
}

/// Leaves every thread of the process with exactly `keep ∩ permitted` as its effective and
/// permitted sets, no inheritable or ambient capabilities, and (given CAP_SETPCAP) a bounding
/// set without the dropped ones.
pub fn drop_to(keep: &[Capability]) -> anyhow::Result<Dropped> {
    let permitted = caps::read(None, CapSet::Permitted).context("reading own capabilities")?;
    let keep: HashSet<Capability> = keep.iter().copied().collect();
    let target: HashSet<Capability> = permitted.intersection(&keep).copied().collect();
    let mut dropped: Vec<Capability> = permitted.difference(&target).copied().collect();
    dropped.sort_by_key(|c| c.index());
    let can_setpcap = caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP)
        .context("reading own capabilities")?;
    let bounding = caps::read(None, CapSet::Bounding).unwrap_or_default();
    TARGET.store(mask(&target), Ordering::SeqCst);
    BOUNDING_DROP.store(mask(&bounding) & !mask(&target), Ordering::SeqCst);
    CAN_SETPCAP.store(can_setpcap, Ordering::SeqCst);
    FAILED.store(0, Ordering::SeqCst);

    let sig = libc::SIGRTMIN() + 5;
    // SAFETY: installing a handler that only makes raw syscalls and touches atomics.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error()).context("installing the signal handler");
        }
    }
    let want = mask(&target);
    // SAFETY: plain syscalls without pointers.
    let (pid, me) = unsafe { (libc::getpid(), libc::gettid()) };
    let mut done: HashSet<String> = HashSet::new();
    // Threads started meanwhile by a thread not yet done are caught by the next round.
    for _round in 0..10 {
        let pending: Vec<String> = thread_ids()
            .into_iter()
            .filter(|t| !done.contains(t))
            .collect();
        if pending.is_empty() {
            break;
        }
        for tid in &pending {
            let Ok(n) = tid.parse::<libc::pid_t>() else {
                continue;
            };
            if n == me {
                apply_to_this_thread();
            } else {
                // SAFETY: tgkill to a thread of our own process; ESRCH if it just exited.
                unsafe { libc::syscall(libc::SYS_tgkill, pid, n, sig) };
            }
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        for tid in pending {
            loop {
                match thread_caps(&tid) {
                    None => break,
                    Some((eff, prm)) if eff == want && prm == want => break,
                    Some(_) if Instant::now() >= deadline => {
                        let name = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
                            .unwrap_or_default();
                        anyhow::bail!(
                            "capabilities only partly dropped: thread {tid} ({}) did not \
                             (signal blocked?)",
                            name.trim()
                        );
                    }
                    Some(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
            done.insert(tid);
        }
    }
    // Every thread there is now, whoever started it, has exactly the target.
    let stragglers: Vec<String> = thread_ids()
        .into_iter()
        .filter(|t| thread_caps(t).is_some_and(|(eff, prm)| eff != want || prm != want))
        .collect();
    if !stragglers.is_empty() {
        anyhow::bail!(
            "capabilities only partly dropped: threads {} still hold more",
            stragglers.join(", ")
        );
    }
    if FAILED.load(Ordering::SeqCst) > 0 {
        anyhow::bail!(
            "capset failed in {} thread(s)",
            FAILED.load(Ordering::SeqCst)
        );
    }
    let mut kept: Vec<Capability> = target.into_iter().collect();
    kept.sort_by_key(|c| c.index());
    Ok(Dropped {
        kept,
        dropped,
        threads: done.len(),
        bounding_set_too: can_setpcap,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gc_probe_keeps_what_uprobes_on_later_processes_need() {
        let mut c = Config::default();
        let with_gc: Vec<_> = keep_set(&c).into_iter().map(|(c, _)| c).collect();
        assert!(with_gc.contains(&Capability::CAP_PERFMON));
        assert!(with_gc.contains(&Capability::CAP_SYS_ADMIN));
        assert!(!with_gc.contains(&Capability::CAP_NET_ADMIN));
        c.probes = vec!["sched".into(), "tcp".into()];
        let without: Vec<_> = keep_set(&c).into_iter().map(|(c, _)| c).collect();
        assert_eq!(without, vec![Capability::CAP_BPF]);
    }
}
