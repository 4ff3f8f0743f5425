//! `cargo xtask setup`: installs what a fresh Debian machine lacks, skipping what is there.

use std::path::PathBuf;
use std::process::Command;

use anyhow::bail;

use crate::cmd;

/// Needed to build bpf-linker (it links LLVM 22).
const BUILD_PACKAGES: &[&str] = &["llvm-22-dev", "libpolly-22-dev"];
/// Used by tests and benchmarks: promtool, the libbpf-tools peers, bpftool, perf, load
/// generators; iproute2 (ip netns, ss) and iptables for the TCP tests' namespaces.
const TEST_PACKAGES: &[&str] = &[
    "prometheus",
    "iproute2",
    "iptables",
    "libbpf-tools",
    "bpftool",
    "linux-perf",
    "stress-ng",
    "rt-tests",
];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// The release known to build against LLVM 22 with this toolchain.
const BPF_LINKER_VERSION: &str = "0.13.0";

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout == b"install ok installed")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

fn apt(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        eprintln!("ok: Debian packages {}", packages.join(" "));
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {m}; install them as root: apt-get update && \
             DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {m}",
            m = missing.join(" ")
        );
    }
    eprintln!("installing: {}", missing.join(" "));
    cmd::run(Command::new("apt-get").arg("update"))?;
    cmd::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
    )
}

fn cargo_bin(name: &str) -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    home.join("bin").join(name)
}

/// bpf-linker on PATH or in ~/.cargo/bin.
pub fn bpf_linker() -> Option<PathBuf> {
    if cmd::succeeds(Command::new("bpf-linker").arg("--version")) {
        return Some(PathBuf::from("bpf-linker"));
    }
    let p = cargo_bin("bpf-linker");
    cmd::succeeds(Command::new(&p).arg("--version")).then_some(p)
}

pub fn nightly_rust_src() -> bool {
    Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.starts_with("rust-src"))
        })
}

pub fn run(test_tools: bool) -> anyhow::Result<()> {
    let mut packages = BUILD_PACKAGES.to_vec();
    if test_tools {
        packages.extend(TEST_PACKAGES);
    }
    apt(&packages)?;
    if nightly_rust_src() {
        eprintln!("ok: nightly rust-src");
    } else {
        eprintln!("installing: nightly rust-src");
        cmd::run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    if bpf_linker().is_some() {
        eprintln!("ok: bpf-linker");
    } else {
        eprintln!(
            "installing: bpf-linker {BPF_LINKER_VERSION} (builds against LLVM 22; takes minutes)"
        );
        // bpf-linker's build script finds LLVM through LLVM_PREFIX; llvm-sys through
        // LLVM_SYS_221_PREFIX.
        cmd::run(
            Command::new("cargo")
                .env("LLVM_PREFIX", LLVM_PREFIX)
                .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ]),
        )?;
    }
    Ok(())
}
