//! Running external commands: echo them, fail with the command in the message.

use std::process::Command;

use anyhow::{bail, Context};

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs to completion; an error names the command and its exit status.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let what = describe(cmd);
    eprintln!("+ {what}");
    let status = cmd.status().with_context(|| format!("starting `{what}`"))?;
    if !status.success() {
        bail!("`{what}` failed: {status}");
    }
    Ok(())
}

/// Runs and returns stdout (stderr passes through).
pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let what = describe(cmd);
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("starting `{what}`"))?;
    if !out.status.success() {
        bail!("`{what}` failed: {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether a command runs successfully (quietly), for "is it installed" checks.
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Replaces this process with `cmd` (so signals reach it directly).
pub fn exec(cmd: &mut Command) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    eprintln!("+ {}", describe(cmd));
    Err(cmd.exec()).context("exec")
}
