//! Project chores: toolchain setup, eBPF builds, the test command, benchmarks.

mod bench;
mod build;
mod cmd;
mod setup;

use std::path::PathBuf;

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
    /// The project's test command: setup, eBPF build (x86_64 and aarch64), every test.
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
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
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
        Command::Test { no_setup, args } => {
            if !no_setup {
                setup::run(true)?;
            }
            // The aarch64 object must keep building (and is checked by the same tests'
            // object parser when cross-testing); the host one is embedded and tested.
            build::ebpf(&build::EbpfArgs {
                arch: Some(build::Arch::Aarch64),
                ..Default::default()
            })?;
            build::ebpf(&build::EbpfArgs::default())?;
            cmd::run(
                std::process::Command::new("cargo")
                    .current_dir(root())
                    .args(["build", "--workspace", "--bins"]),
            )?;
            let mut test = std::process::Command::new("cargo");
            test.current_dir(root())
                .args(["test", "--workspace", "--all-targets", "--"])
                .args(args);
            cmd::run(&mut test)
        }
        Command::Bench(args) => bench::run(&args),
    }
}
