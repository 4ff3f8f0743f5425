//! `cargo xtask test-arm64`: the agent on a real arm64 kernel. Debian's arm64 kernel
//! (`linux-image-arm64` from the archive) boots in qemu-system-aarch64 (TCG: no arm64 host
//! needed) with an initramfs of busybox, the static aarch64 agent and the aarch64 build of a
//! kernel test binary. There it runs `stallwatch check`, then the chosen kernel tests (by
//! default the run-queue ground-truth test and the other sched tests that need no host tools)
//! under STALLWATCH_REQUIRE_KERNEL=1, and powers off.
//! The console goes to the terminal and to target/arm64-vm/console.log.
//!
//! The test binary finds the agent and the workload helper at the absolute paths cargo built
//! them at (`CARGO_BIN_EXE_*`), so the initramfs holds them at those same paths.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::build::Arch;
use crate::{cmd, dist, root, setup};

/// The kernel tests run by default: those of the suite that need nothing but the agent and
/// its workload helper (the others call promtool, setpriv or /bin/true, absent in the VM).
/// First the run-queue ground truth (the agent's latency sum against
/// /proc/<pid>/task/*/schedstat), then switch counts against /proc status, off-CPU buckets,
/// the legacy programs older kernels need, and exit handling.
const DEFAULT_TESTS: &[&str] = &[
    "runqueue_latency_matches_schedstat_run_delay",
    "context_switches_match_proc_status",
    "voluntary_sleeps_are_counted_in_the_50ms_bucket",
    "vfork_parent_waits_uninterruptible",
    "legacy_sched_switch_program_matches_the_same_ground_truth",
    "series_of_exited_processes_are_removed_after_exit_grace",
    "legacy_process_exit_program_removes_exited_series_as_fast",
];
/// The integration test binary (agent/tests/<name>.rs) the tests come from.
const DEFAULT_SUITE: &str = "kernel_sched";
/// Printed by the VM's init; the host reads results only from lines starting with it.
const MARK: &str = "SW-ARM64";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Integration test binary (agent/tests/<suite>.rs) to run in the VM.
    #[arg(long, default_value = DEFAULT_SUITE)]
    pub suite: String,
    /// Exact test names to run (repeatable); default: the run-queue ground-truth test and
    /// the other kernel_sched tests that need no host tools. `--all` runs every test of the
    /// suite instead.
    #[arg(long = "test")]
    pub tests: Vec<String>,
    /// Every test of the suite.
    #[arg(long, conflicts_with = "tests")]
    pub all: bool,
    /// Give up on the VM after this many seconds.
    #[arg(long, default_value_t = Args::default().timeout)]
    pub timeout: u64,
    /// vCPUs of the VM.
    #[arg(long, default_value_t = Args::default().cpus)]
    pub cpus: u32,
    /// Memory of the VM, MiB.
    #[arg(long, default_value_t = Args::default().memory)]
    pub memory: u32,
}

impl Default for Args {
    /// What the test command runs; also the flags' defaults.
    fn default() -> Args {
        Args {
            suite: DEFAULT_SUITE.into(),
            tests: Vec::new(),
            all: false,
            timeout: 900,
            cpus: 2,
            memory: 2048,
        }
    }
}

fn vm_dir() -> PathBuf {
    root().join("target/arm64-vm")
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let started = Instant::now();
    setup::arm64_vm_tools()?;
    let dir = vm_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let (kernel, busybox, release) = match debian_packages(&dir) {
        Ok(found) => found,
        Err(e) => {
            // Stale package lists name versions the archive has since dropped.
            eprintln!("{e:#}; refreshing the package lists and trying again");
            cmd::run(Command::new("apt-get").arg("update"))?;
            debian_packages(&dir)?
        }
    };
    let fetched = started.elapsed();

    let built = build(&args.suite)?;
    let build_time = started.elapsed() - fetched;

    let initrd = dir.join("initramfs.cpio.gz");
    write_initramfs(&initrd, &busybox, &built, &init_script(args, &built))?;
    eprintln!(
        "initramfs: {} ({:.1} MiB)",
        initrd.display(),
        std::fs::metadata(&initrd)?.len() as f64 / (1 << 20) as f64
    );

    let vm_started = Instant::now();
    let results = boot(args, &kernel, &initrd, &dir.join("console.log"))?;
    let vm_time = vm_started.elapsed();
    eprintln!(
        "test-arm64: Debian kernel {release}: packages {:.0} s, cross build {:.0} s, VM {:.0} s \
         (boot to init {}, check {}, tests {}), total {:.0} s",
        fetched.as_secs_f64(),
        build_time.as_secs_f64(),
        vm_time.as_secs_f64(),
        results.phase("boot"),
        results.phase("check"),
        results.phase("tests"),
        started.elapsed().as_secs_f64(),
    );
    results.verdict()
}

/// Downloads (once, into `dir`) and unpacks Debian's current arm64 kernel image and
/// busybox-static; returns the kernel Image, the busybox binary and the kernel release.
fn debian_packages(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf, String)> {
    // linux-image-arm64 is the metapackage; it depends on the current versioned image.
    let depends =
        cmd::output(Command::new("apt-cache").args(["depends", "linux-image-arm64:arm64"]))?;
    let image = depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .map(|d| d.trim_end_matches(":arm64"))
        .find(|d| d.starts_with("linux-image-") && d.ends_with("-arm64"))
        .with_context(|| format!("no linux-image-*-arm64 in apt-cache's answer:\n{depends}"))?
        .to_string();
    let release = image.trim_start_matches("linux-image-").to_string();
    for (pkg, unpack) in [(image.as_str(), "kernel"), ("busybox-static", "busybox")] {
        let unpacked = dir.join(unpack);
        let stamp = unpacked.join(".package");
        if std::fs::read_to_string(&stamp).is_ok_and(|s| s == pkg) {
            eprintln!("ok: {pkg}:arm64 in {}", unpacked.display());
            continue;
        }
        let _ = std::fs::remove_dir_all(&unpacked);
        for e in std::fs::read_dir(dir)? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "deb") {
                std::fs::remove_file(&p)?;
            }
        }
        cmd::run(
            Command::new("apt-get")
                .current_dir(dir)
                .args(["download", &format!("{pkg}:arm64")]),
        )?;
        let deb = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .with_context(|| format!("apt-get download {pkg}:arm64 left no .deb"))?;
        cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
        std::fs::remove_file(&deb)?;
        std::fs::write(&stamp, pkg)?;
    }
    let kernel = dir.join("kernel/boot").join(format!("vmlinuz-{release}"));
    let busybox = dir.join("busybox/bin/busybox");
    for p in [&kernel, &busybox] {
        if !p.exists() {
            bail!("{} missing after unpacking", p.display());
        }
    }
    Ok((kernel, busybox, release))
}

/// What goes into the VM: the test binary and the binaries it spawns, by absolute path.
struct Built {
    test: PathBuf,
    bins: Vec<PathBuf>,
}

/// Cross-builds (static, aarch64, release, the aarch64 eBPF object embedded) the suite's
/// test binary and the agent's binaries.
fn build(suite: &str) -> anyhow::Result<Built> {
    let mut cargo = dist::static_cargo(
        Arch::Aarch64,
        &[
            "test",
            "-p",
            "stallwatch",
            "--test",
            suite,
            "--no-run",
            "--message-format=json-render-diagnostics",
        ],
    )?;
    let out = cmd::output(&mut cargo)?;
    let mut test = None;
    let mut bins = Vec::new();
    for line in out.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        let kinds = msg["target"]["kind"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if kinds.iter().any(|k| k == "test") && msg["target"]["name"] == suite {
            test = Some(PathBuf::from(exe));
        } else if kinds.iter().any(|k| k == "bin") {
            bins.push(PathBuf::from(exe));
        }
    }
    let test = test.with_context(|| format!("cargo built no test binary `{suite}`"))?;
    if bins.is_empty() {
        bail!("cargo reported none of the agent's binaries");
    }
    for b in bins.iter().chain([&test]) {
        dist::check_static(b, 183)?;
    }
    Ok(Built { test, bins })
}

/// The VM's /init: mounts, loopback, `stallwatch check`, the tests, each phase's duration
/// and exit status on a marked line, then power off.
fn init_script(args: &Args, built: &Built) -> String {
    let agent = built
        .bins
        .iter()
        .find(|b| b.file_name().is_some_and(|n| n == "stallwatch"))
        .expect("the agent is among the binaries");
    let mut filter = String::new();
    if !args.all {
        let tests: Vec<&str> = if args.tests.is_empty() {
            DEFAULT_TESTS.to_vec()
        } else {
            args.tests.iter().map(String::as_str).collect()
        };
        filter.push_str("--exact");
        for t in tests {
            filter.push(' ');
            filter.push_str(t);
        }
    }
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t cgroup2 cgroup2 /sys/fs/cgroup
ip link set lo up
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/tmp TMPDIR=/tmp
uptime_s() {{ cut -d' ' -f1 /proc/uptime; }}
echo "{MARK} kernel $(uname -r) $(uname -m) cpus $(nproc)"
echo "{MARK} phase boot $(uptime_s)"
t0=$(uptime_s)
{agent} check
echo "{MARK} rc check $?"
t1=$(uptime_s)
echo "{MARK} phase check $(awk "BEGIN {{ print $t1 - $t0 }}")"
STALLWATCH_REQUIRE_KERNEL=1 RUST_BACKTRACE=1 /tests/{suite} {filter} --test-threads=1
echo "{MARK} rc tests $?"
t2=$(uptime_s)
echo "{MARK} phase tests $(awk "BEGIN {{ print $t2 - $t1 }}")"
echo "{MARK} done"
poweroff -f
"#,
        agent = agent.display(),
        suite = args.suite,
    )
}

/// Writes a gzipped newc cpio archive: the init script, busybox and the built binaries.
fn write_initramfs(path: &Path, busybox: &Path, built: &Built, init: &str) -> anyhow::Result<()> {
    let mut cpio = Cpio::default();
    for d in [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run", "tests",
    ] {
        cpio.dir(d);
    }
    cpio.file("init", 0o755, init.as_bytes().to_vec());
    cpio.file("bin/busybox", 0o755, read(busybox)?);
    let suite_name = built
        .test
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.rsplit_once('-').map(|(name, _hash)| name.to_string()))
        .context("test binary name")?;
    cpio.file(&format!("tests/{suite_name}"), 0o755, read(&built.test)?);
    for bin in &built.bins {
        let rel = bin.strip_prefix("/").context("absolute binary path")?;
        let mut parent = PathBuf::new();
        for c in rel.parent().into_iter().flat_map(|p| p.components()) {
            parent.push(c);
            cpio.dir(&parent.to_string_lossy());
        }
        cpio.file(&rel.to_string_lossy(), 0o755, read(bin)?);
    }
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    gz.write_all(&cpio.finish())?;
    gz.finish()?;
    Ok(())
}

fn read(p: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(p).with_context(|| format!("reading {}", p.display()))
}

/// A newc ("070701") cpio archive, the format the kernel unpacks as initramfs.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
    dirs: std::collections::BTreeSet<String>,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            if mode & 0o040000 != 0 { 2 } else { 1 },
            0, // mtime
            data.len() as u32,
            0, // devmajor
            0, // devminor
            0, // rdevmajor
            0, // rdevminor
            name.len() as u32 + 1,
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.out.len() % 4 != 0 {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        if self.dirs.insert(name.to_string()) {
            self.entry(name, 0o040755, &[]);
        }
    }

    fn file(&mut self, name: &str, perm: u32, data: Vec<u8>) {
        self.entry(name, 0o100000 | perm, &data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

/// What the VM's init reported.
#[derive(Default)]
struct Results {
    rcs: Vec<(String, i32)>,
    phases: Vec<(String, f64)>,
    done: bool,
}

impl Results {
    fn parse_line(&mut self, line: &str) {
        let Some(rest) = line.trim_end_matches('\r').strip_prefix(MARK) else {
            return;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        match words.as_slice() {
            ["rc", what, rc] => {
                if let Ok(rc) = rc.parse() {
                    self.rcs.push((what.to_string(), rc));
                }
            }
            ["phase", what, secs] => {
                if let Ok(s) = secs.parse() {
                    self.phases.push((what.to_string(), s));
                }
            }
            ["done"] => self.done = true,
            _ => {}
        }
    }

    fn phase(&self, what: &str) -> String {
        self.phases
            .iter()
            .find(|(w, _)| w == what)
            .map_or("?".into(), |(_, s)| format!("{s:.1} s"))
    }

    fn verdict(&self) -> anyhow::Result<()> {
        if !self.done {
            bail!("the VM stopped before its init finished (see target/arm64-vm/console.log)");
        }
        let failed: Vec<String> = ["check", "tests"]
            .iter()
            .filter_map(|what| match self.rcs.iter().find(|(w, _)| w == what) {
                Some((_, 0)) => None,
                Some((_, rc)) => Some(format!("{what} exited {rc}")),
                None => Some(format!("{what} reported no exit status")),
            })
            .collect();
        if !failed.is_empty() {
            bail!("on the arm64 kernel: {}", failed.join(", "));
        }
        Ok(())
    }
}

/// Boots the VM, streams its console to stderr and `log`, and returns what init reported.
fn boot(args: &Args, kernel: &Path, initrd: &Path, log: &Path) -> anyhow::Result<Results> {
    let mut qemu = Command::new("qemu-system-aarch64");
    qemu.args([
        "-machine",
        "virt",
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
    ])
    .args([
        "-smp",
        &args.cpus.to_string(),
        "-m",
        &args.memory.to_string(),
    ])
    .args(["-nographic", "-no-reboot", "-nic", "none"])
    .arg("-kernel")
    .arg(kernel)
    .arg("-initrd")
    .arg(initrd)
    // panic=-1: a failed init reboots at once, and -no-reboot turns that into an exit.
    .args(["-append", "console=ttyAMA0 panic=-1 quiet rdinit=/init"])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    eprintln!("+ {qemu:?}");
    let mut child = qemu.spawn().context("starting qemu-system-aarch64")?;
    let stdout = child.stdout.take().expect("piped");
    let deadline = Duration::from_secs(args.timeout);
    let pid = child.id();
    // The console is read on this thread; a watchdog kills a VM that outlives the timeout.
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if stop_rx.recv_timeout(deadline).is_err() {
            eprintln!("test-arm64: the VM ran past {deadline:?}; killing it");
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    });
    let mut console =
        std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut results = Results::default();
    for line in BufReader::new(stdout).split(b'\n') {
        let line = String::from_utf8_lossy(&line?).into_owned();
        eprintln!("vm| {line}");
        writeln!(console, "{line}")?;
        results.parse_line(&line);
    }
    let status = child.wait()?;
    let _ = stop_tx.send(());
    let _ = watchdog.join();
    eprintln!("qemu exited: {status} (console: {})", log.display());
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_aligned_and_terminated() {
        let mut c = Cpio::default();
        c.dir("bin");
        c.dir("bin");
        c.file("bin/x", 0o755, b"abcde".to_vec());
        let out = c.finish();
        assert_eq!(out.len() % 4, 0);
        // One directory (deduplicated), one file, the trailer.
        assert_eq!(out.windows(6).filter(|w| w == b"070701").count(), 3);
        let second = out.windows(6).skip(1).position(|w| w == b"070701").unwrap() + 1;
        assert_eq!(second % 4, 0, "each header starts 4-aligned");
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
        // The file's size field (7th, hex) says 5 bytes.
        let hdr = &out[second..second + 110];
        assert_eq!(&hdr[6 + 6 * 8..6 + 7 * 8], b"00000005");
    }

    #[test]
    fn results_need_done_and_zero_exit_statuses() {
        let mut r = Results::default();
        for l in [
            "SW-ARM64 phase boot 4.2\r",
            "SW-ARM64 rc check 0",
            "noise SW-ARM64 rc tests 0",
            "SW-ARM64 rc tests 101",
        ] {
            r.parse_line(l);
        }
        assert_eq!(r.phase("boot"), "4.2 s");
        assert!(r.verdict().is_err(), "not done");
        r.parse_line("SW-ARM64 done");
        let e = r.verdict().unwrap_err().to_string();
        assert!(e.contains("tests exited 101"), "{e}");
        let mut ok = Results::default();
        for l in [
            "SW-ARM64 rc check 0",
            "SW-ARM64 rc tests 0",
            "SW-ARM64 done",
        ] {
            ok.parse_line(l);
        }
        ok.verdict().unwrap();
    }
}
