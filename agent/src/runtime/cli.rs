//! `stallwatch runtime`: what the gc probe would find in a binary or a process, and why not.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use stallwatch_common::gc::Runtime;

use super::{analyse, classify, find_library, open_exe, path_name, ExeClass, Opened, Target};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A running process: its executable, or the runtime library it has mapped.
    #[arg(long, conflicts_with = "path")]
    pub pid: Option<u32>,
    /// Analyse the file as this runtime (go, jvm, python, node), e.g. a libjvm.so.
    #[arg(long = "as", value_parser = parse_runtime)]
    pub as_runtime: Option<Runtime>,
    /// A binary or shared library.
    #[arg(required_unless_present = "pid")]
    pub path: Option<PathBuf>,
}

fn parse_runtime(s: &str) -> Result<Runtime, String> {
    Runtime::ALL
        .into_iter()
        .find(|r| r.label() == s)
        .ok_or_else(|| format!("unknown runtime {s:?} (go, jvm, python, node)"))
}

/// The report printed on success; an error names the reason.
pub fn run(args: &Args) -> anyhow::Result<String> {
    let (opened, runtime) = match (args.pid, &args.path) {
        (Some(pid), _) => {
            let exe = open_exe(Path::new("/proc"), pid)?;
            let name = path_name(&PathBuf::from(format!("/proc/{pid}/exe")));
            match (args.as_runtime, classify(&exe.file, &name)?) {
                (Some(r), _) | (None, ExeClass::Runtime(r)) => (exe, r),
                (None, ExeClass::Linked(r)) => {
                    let lib = find_library(Path::new("/proc"), pid, r)?.with_context(|| {
                        format!(
                            "pid {pid} links the {} runtime but has not mapped it (yet)",
                            r.label()
                        )
                    })?;
                    (lib, r)
                }
                (None, ExeClass::NotRuntime) => bail!("pid {pid}: no runtime the gc probe knows"),
            }
        }
        (None, Some(path)) => {
            let file = Opened::open(path, path.display().to_string())
                .with_context(|| format!("{}", path.display()))?;
            match (args.as_runtime, classify(&file.file, &path_name(path))?) {
                (Some(r), _) | (None, ExeClass::Runtime(r)) => (file, r),
                (None, ExeClass::Linked(r)) => bail!(
                    "{} loads the {} runtime from a library: pass that library with --as {}, or a running process with --pid",
                    path.display(),
                    r.label(),
                    r.label()
                ),
                (None, ExeClass::NotRuntime) => {
                    bail!("{}: no runtime the gc probe knows", path.display())
                }
            }
        }
        (None, None) => bail!("give a path or --pid"),
    };
    let target = analyse(&opened.file, opened.key, runtime)
        .with_context(|| format!("{} as {}", opened.shown, runtime.label()))?;
    Ok(render(&opened.shown, &target))
}

fn render(shown: &str, t: &Target) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "file: {shown}");
    let _ = writeln!(out, "runtime: {}", t.runtime.label());
    let _ = writeln!(out, "detail: {}", t.detail);
    for p in &t.probes {
        let _ = write!(out, "probe {} offset {:#x}", p.prog, p.offset);
        if p.retprobe {
            out.push_str(" return");
        }
        if p.ref_ctr != 0 {
            let _ = write!(out, " semaphore {:#x}", p.ref_ctr);
        }
        out.push('\n');
    }
    out
}
