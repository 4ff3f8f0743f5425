//! Compiling the kernel programs (nightly, build-std, bpf-linker) and the agent.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};

use crate::{cmd, root, setup};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    #[value(name = "x86_64")]
    X86_64,
    #[value(name = "aarch64")]
    Aarch64,
}

impl Arch {
    pub fn host() -> Arch {
        match std::env::consts::ARCH {
            "aarch64" => Arch::Aarch64,
            _ => Arch::X86_64,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }
}

#[derive(Debug, Default, Clone, clap::Args)]
pub struct EbpfArgs {
    /// Target architecture of the kernel programs [default: the host's].
    #[arg(long, value_enum)]
    pub arch: Option<Arch>,
    /// Unoptimised build (the verifier usually rejects it; for debugging the compiler).
    #[arg(long)]
    pub debug: bool,
}

/// Builds ebpf/programs for `arch`; returns the object's path.
pub fn ebpf(args: &EbpfArgs) -> anyhow::Result<PathBuf> {
    let arch = args.arch.unwrap_or_else(Arch::host);
    let Some(linker) = setup::bpf_linker() else {
        bail!("bpf-linker is not installed; run `cargo xtask setup`");
    };
    if !setup::nightly_rust_src() {
        bail!("the nightly toolchain lacks rust-src; run `cargo xtask setup`");
    }
    let root = root();
    // One cache per arch: the cfg differs, and sharing would rebuild on every switch.
    let target_dir = root.join("target/ebpf-build").join(arch.as_str());
    let profile = if args.debug { "debug" } else { "release" };
    // aya-ebpf reads bpf_target_arch for architecture-specific register access (uprobes).
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{}\"", arch.as_str()),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
    ]
    .join("\x1f");
    let mut build = Command::new("cargo");
    build
        .current_dir(root.join("ebpf/programs"))
        .args([
            "+nightly",
            "build",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        // The parent runs under stable cargo; none of its toolchain settings may leak in.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags);
    if let Some(dir) = linker.parent().filter(|d| !d.as_os_str().is_empty()) {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths: Vec<PathBuf> = vec![dir.to_path_buf()];
        paths.extend(std::env::split_paths(&path));
        build.env("PATH", std::env::join_paths(paths)?);
    }
    if !args.debug {
        build.arg("--release");
    }
    cmd::run(&mut build)?;
    let built = target_dir
        .join("bpfel-unknown-none")
        .join(profile)
        .join("stallwatch-ebpf");
    let out_dir = root.join("target/ebpf").join(arch.as_str());
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let out = out_dir.join("stallwatch.bpf.o");
    let fresh = std::fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
    // Rewriting an unchanged object would still bump its mtime, and the agent's build script
    // (rerun-if-changed) would rebuild every crate that embeds it.
    if std::fs::read(&out).ok().as_deref() != Some(fresh.as_slice()) {
        std::fs::write(&out, &fresh).with_context(|| format!("writing {}", out.display()))?;
    }
    eprintln!("eBPF object: {}", out.display());
    Ok(out)
}

/// The host's eBPF object, then every binary of the agent package (stallwatch, and swload
/// for the tests), unoptimised: what the tests spawn.
pub fn test_binaries() -> anyhow::Result<()> {
    ebpf(&EbpfArgs::default())?;
    cmd::run(Command::new("cargo").current_dir(root()).args([
        "build",
        "-p",
        "stallwatch",
        "--bins",
    ]))
}

/// Builds the eBPF object and the agent (which embeds it); returns the agent's path. For
/// another architecture, the agent is the static (musl, release) cross build `dist` ships.
pub fn agent(args: &EbpfArgs, release: bool) -> anyhow::Result<PathBuf> {
    let arch = args.arch.unwrap_or_else(Arch::host);
    if arch != Arch::host() {
        return crate::dist::build_static(arch);
    }
    ebpf(args)?;
    let mut build = Command::new("cargo");
    build
        .current_dir(root())
        .args(["build", "-p", "stallwatch", "--bin", "stallwatch"]);
    let dir = root().join("target");
    if release {
        build.arg("--release");
    }
    cmd::run(&mut build)?;
    Ok(dir
        .join(if release { "release" } else { "debug" })
        .join("stallwatch"))
}
