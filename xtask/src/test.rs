//! `cargo xtask test`: the project's one test command (README, .ci/run).

use std::process::Command;

use crate::build::{self, Arch, EbpfArgs};
use crate::{cmd, root, setup};

/// Setup (unless `no_setup`), the eBPF objects for aarch64 (kept buildable) and the host
/// (embedded and tested), the agent's binaries the kernel tests spawn, then every test.
/// The environment passes through (CI sets STALLWATCH_REQUIRE_KERNEL=1).
pub fn run(no_setup: bool, extra: &[String]) -> anyhow::Result<()> {
    if !no_setup {
        setup::run(true)?;
    }
    if Arch::host() != Arch::Aarch64 {
        build::ebpf(&EbpfArgs {
            arch: Some(Arch::Aarch64),
            ..Default::default()
        })?;
    }
    build::ebpf(&EbpfArgs::default())?;
    cmd::run(Command::new("cargo").current_dir(root()).args([
        "build",
        "-p",
        "stallwatch",
        "--bins",
    ]))?;
    cmd::run(
        Command::new("cargo")
            .current_dir(root())
            .args(["test", "--workspace", "--all-targets", "--"])
            .args(extra),
    )
}
