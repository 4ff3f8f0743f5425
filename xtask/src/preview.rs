//! `cargo xtask dashboards-preview`: renders every dashboard panel to PNG from real data.
//! It runs the end-to-end dashboard test (agent + Debian's Prometheus + workloads for every
//! signal) with STALLWATCH_DASHBOARD_PREVIEW set: each panel's range-query results are
//! rendered to docs/dashboards/<dashboard uid>/<panel id>.png.

use std::process::Command;

use crate::build;
use crate::{cmd, root};

pub fn run() -> anyhow::Result<()> {
    build::test_binaries()?;
    let out = root().join("docs/dashboards");
    cmd::run(
        Command::new("cargo")
            .current_dir(root())
            .args([
                "test",
                "-p",
                "stallwatch",
                "--test",
                "kernel_dashboards",
                "--",
                "--nocapture",
            ])
            .env("STALLWATCH_DASHBOARD_PREVIEW", &out),
    )?;
    eprintln!("previews: {}", out.display());
    Ok(())
}
