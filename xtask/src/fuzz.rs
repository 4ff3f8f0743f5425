//! `cargo xtask fuzz`: runs the fuzz targets in fuzz/ (libFuzzer via cargo-fuzz, nightly) for a
//! while each. Not part of the test command: minutes of fuzzing are not a CI check. Seeds come
//! from fuzz/seeds/<target> and from real inputs on this machine (an executable, this
//! kernel's BTF, the default config); findings land in fuzz/artifacts/<target>.

use std::path::Path;
use std::process::Command;

use anyhow::Context;

use crate::{cmd, root};

pub const TARGETS: &[&str] = &[
    "cgroup_paths",
    "proc_files",
    "runtime_elf",
    "kernel_btf",
    "config_file",
];

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds per target.
    #[arg(long, default_value_t = 120)]
    seconds: u64,
    /// Only these targets [default: all].
    targets: Vec<String>,
}

fn cargo_fuzz_installed() -> bool {
    cmd::succeeds(Command::new("cargo").args(["fuzz", "--version"]))
}

/// Copies real inputs of the kind each target reads into its corpus (first `max` bytes).
fn seed(corpus: &Path, target: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(corpus)?;
    let committed = root().join("fuzz/seeds").join(target);
    for e in std::fs::read_dir(&committed)
        .into_iter()
        .flatten()
        .flatten()
    {
        std::fs::copy(e.path(), corpus.join(e.file_name()))?;
    }
    let take = |src: &str, name: &str, max: usize| -> anyhow::Result<()> {
        if let Ok(data) = std::fs::read(src) {
            std::fs::write(corpus.join(name), &data[..data.len().min(max)])?;
        }
        Ok(())
    };
    match target {
        "runtime_elf" => {
            take("/usr/bin/true", "true", 1 << 20)?;
            take("/usr/bin/python3.11", "python3.11-head", 256 << 10)?;
            // Whole binaries exceed -max_len, and a truncated one loses its section headers
            // (at the end): small ELFs holding just the sections the Go and USDT parsers read,
            // so the fuzzer starts inside those parsers.
            for (src, sections, name) in [
                (
                    "/usr/lib/go-1.19/bin/gofmt",
                    &[".gopclntab", ".go.buildinfo", ".note.go.buildid"][..],
                    "go-sections",
                ),
                (
                    "/usr/bin/python3.11",
                    &[".note.stapsdt", ".stapsdt.base", ".probes"][..],
                    "python3.11-usdt",
                ),
                (
                    "/usr/lib/jvm/java-17-openjdk-amd64/lib/server/libjvm.so",
                    &[".note.stapsdt", ".stapsdt.base"][..],
                    "libjvm-usdt",
                ),
            ] {
                extract_sections(src, sections, &corpus.join(name))?;
            }
        }
        "kernel_btf" => take("/sys/kernel/btf/vmlinux", "vmlinux-head", 256 << 10)?,
        "proc_files" => {
            for f in ["maps", "status", "mountinfo", "comm"] {
                take(&format!("/proc/self/{f}"), f, 1 << 20)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Writes an ELF holding only `sections` of `src` (objcopy), if `src` exists.
fn extract_sections(src: &str, sections: &[&str], out: &Path) -> anyhow::Result<()> {
    if !Path::new(src).exists() {
        return Ok(());
    }
    let mut c = Command::new("objcopy");
    for s in sections {
        c.arg(format!("--only-section={s}"));
    }
    c.arg(src).arg(out);
    cmd::run(&mut c)
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    if !cargo_fuzz_installed() {
        eprintln!("installing: cargo-fuzz");
        cmd::run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let targets: Vec<&str> = if args.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        args.targets.iter().map(String::as_str).collect()
    };
    for t in &targets {
        anyhow::ensure!(
            TARGETS.contains(t),
            "unknown fuzz target {t:?}; known: {}",
            TARGETS.join(", ")
        );
    }
    for t in targets {
        let corpus = root().join("target/fuzz-corpus").join(t);
        seed(&corpus, t).with_context(|| format!("seeding {}", corpus.display()))?;
        cmd::run(
            Command::new("cargo")
                .current_dir(root().join("fuzz"))
                .args(["+nightly", "fuzz", "run", t])
                .arg(&corpus)
                .arg("--")
                .arg(format!("-max_total_time={}", args.seconds))
                .arg("-max_len=1048576")
                .arg("-rss_limit_mb=4096"),
        )?;
    }
    Ok(())
}
