//! Project chores: toolchain setup, eBPF builds, the test command, benchmarks.

mod arm64;
mod bench;
mod build;
mod cmd;
mod dist;
mod fuzz;
mod preview;
mod setup;
mod test;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "stallwatch chores")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what a fresh Debian machine lacks (idempotent): LLVM 22 dev libraries,
    /// nightly rust-src, bpf-linker, and the test/bench tools.
    Setup {
        /// Only the build toolchain, not promtool/libbpf-tools/perf/stress-ng.
        #[arg(long)]
        no_test_tools: bool,
    },
    /// Compile the kernel programs into target/ebpf/<arch>/stallwatch.bpf.o.
    BuildEbpf(build::EbpfArgs),
    /// Build the eBPF object, then the agent with it embedded.
    Build {
        #[command(flatten)]
        ebpf: build::EbpfArgs,
        #[arg(long)]
        release: bool,
    },
    /// Set up, build and run `stallwatch` (default arguments: `run`). Needs root.
    Run {
        /// Arguments for stallwatch.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The project's test command: setup, eBPF build (x86_64 and aarch64), every test, and
    /// the arm64 kernel tests in qemu (`test-arm64`).
    /// Kernel tests need root; under STALLWATCH_REQUIRE_KERNEL=1 a skip is a failure.
    Test {
        /// Skip `setup` (tools already installed).
        #[arg(long)]
        no_setup: bool,
        /// Extra arguments for the test binaries (after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Measure overhead and write BENCHMARKS.md.
    Bench(bench::Args),
    /// Static (musl) agent binaries for amd64 and arm64 and a multi-arch OCI image layout of
    /// them, in target/dist (`Containerfile` builds the same image with docker buildx).
    Dist,
    /// Render every dashboard panel to PNG (docs/dashboards) from a real Prometheus fed by
    /// the agent and test workloads (the end-to-end dashboard test). Needs root.
    DashboardsPreview,
    /// Boot Debian's arm64 kernel in qemu-system-aarch64 with an initramfs holding the static
    /// aarch64 agent; run `stallwatch check`, the run-queue ground-truth test and the other
    /// sched, Go pause and syscall tests that need no host tools there. Needs root.
    TestArm64(arm64::Args),
    /// Fuzz the parsers of untrusted input (cgroup paths and /proc bodies, executables,
    /// kernel BTF, config files) with cargo-fuzz for a while each; not part of CI.
    Fuzz(fuzz::Args),
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

fn main() -> ExitCode {
    match dispatch(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The context chain, without anyhow's backtrace (RUST_BACKTRACE may be set).
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Setup { no_test_tools } => setup::run(!no_test_tools),
        Command::BuildEbpf(args) => build::ebpf(&args).map(|_| ()),
        Command::Build { ebpf, release } => build::agent(&ebpf, release).map(|_| ()),
        Command::Run { args } => {
            setup::run(false)?;
            let bin = build::agent(&build::EbpfArgs::default(), true)?;
            let args = if args.is_empty() {
                vec!["run".to_string()]
            } else {
                args
            };
            cmd::exec(std::process::Command::new(bin).args(args))
        }
        Command::Test { no_setup, args } => test::run(no_setup, &args),
        Command::Bench(args) => bench::run(&args),
        Command::Dist => dist::run().map(|_| ()),
        Command::DashboardsPreview => preview::run(),
        Command::TestArm64(args) => arm64::run(&args),
        Command::Fuzz(args) => fuzz::run(&args),
    }
}
