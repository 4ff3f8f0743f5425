//! `cargo xtask test`: the project's one test command (README, .ci/run).

use std::process::Command;

use crate::build;
use crate::{cmd, root, setup};

/// Setup (unless `no_setup`), the static binaries and image (`dist`, which builds the eBPF
/// objects of both architectures), the host's object (embedded and tested), the agent's
/// binaries the kernel tests spawn, then every test, then the arm64 kernel tests in qemu
/// (`test-arm64`). The environment passes through (CI sets STALLWATCH_REQUIRE_KERNEL=1).
pub fn run(no_setup: bool, extra: &[String]) -> anyhow::Result<()> {
    if !no_setup {
        setup::run(true)?;
    }
    // The static binaries and image (tests/dist.rs checks them); this builds the eBPF objects
    // of both architectures, so the aarch64 one stays buildable.
    crate::dist::run()?;
    build::test_binaries()?;
    cmd::run(
        Command::new("cargo")
            .current_dir(root())
            .args(["test", "--workspace", "--all-targets", "--"])
            .args(extra),
    )?;
    // Like the kernel tests: a developer without root gets a skip, CI a failure.
    if !setup::is_root() && std::env::var("STALLWATCH_REQUIRE_KERNEL").as_deref() != Ok("1") {
        eprintln!("SKIP test-arm64: needs root (run `sudo cargo xtask test-arm64`)");
        return Ok(());
    }
    crate::arm64::run(&crate::arm64::Args::for_test_command())
}
