//! `stallwatch runtime` on Go binaries of both architectures (x86_64 and arm64, cross-built:
//! no arm64 machine needed to analyse one), every supported toolchain and build mode, checked
//! against the Go toolchain's own view: symbol addresses from the unstripped twin's .symtab
//! and RET instructions from `go tool objdump`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use object::read::elf::{ElfFile64, ProgramHeader};
use object::{Object, ObjectSymbol};

use common::{go_build, go_toolchain, workspace_root};

fn root() -> PathBuf {
    workspace_root()
}

fn build(go: &Path, goarch: &str, flags: &[&str], out: &Path) {
    go_build(go, flags, goarch, out);
}

fn file_offset(elf: &ElfFile64<'_>, vaddr: u64) -> u64 {
    let e = object::Endianness::Little;
    elf.elf_program_headers()
        .iter()
        .find_map(|ph| {
            let (va, off, sz) = (ph.p_vaddr(e), ph.p_offset(e), ph.p_filesz(e));
            (ph.p_type(e) == object::elf::PT_LOAD && vaddr >= va && vaddr < va + sz)
                .then(|| vaddr - va + off)
        })
        .unwrap_or_else(|| panic!("{vaddr:#x} in no PT_LOAD"))
}

/// What the probe lines should say, from the unstripped twin: (program, file offset).
fn expected(go: &Path, twin: &Path, minor: u32) -> Vec<(String, u64)> {
    let data = std::fs::read(twin).unwrap();
    let elf = ElfFile64::<object::Endianness>::parse(&*data).unwrap();
    let sym = |name: &str| {
        let s = elf
            .symbols()
            .find(|s| s.name() == Ok(name))
            .unwrap_or_else(|| panic!("{name} not in {}", twin.display()));
        file_offset(&elf, s.address())
    };
    let mut want = Vec::new();
    if minor >= 22 {
        want.push((
            "sw_go_start".to_string(),
            sym("runtime.startTheWorldWithSema"),
        ));
    } else {
        let stop = if minor == 21 {
            "sw_go_stop"
        } else {
            "sw_go_stop0"
        };
        want.push((stop.into(), sym("runtime.stopTheWorldWithSema")));
        want.push((
            "sw_go_gcstart".into(),
            sym("runtime.(*gcCPULimiterState).startGCTransition"),
        ));
        want.push((
            "sw_go_gcend".into(),
            sym("runtime.(*gcCPULimiterState).finishGCTransition"),
        ));
    }
    let dis = Command::new(go)
        .args(["tool", "objdump", "-s", "^runtime.startTheWorldWithSema$"])
        .arg(twin)
        .output()
        .expect("go tool objdump");
    assert!(dis.status.success());
    let text = String::from_utf8_lossy(&dis.stdout);
    let rets: Vec<u64> = text
        .lines()
        .filter(|l| l.split_whitespace().last() == Some("RET"))
        .map(|l| {
            let addr = l.split_whitespace().nth(1).unwrap();
            u64::from_str_radix(addr.trim_start_matches("0x"), 16).unwrap()
        })
        .collect();
    assert!(!rets.is_empty(), "objdump found no RET:\n{text}");
    for r in rets {
        want.push(("sw_go_ret".into(), file_offset(&elf, r)));
    }
    want
}

fn reported(binary: &Path) -> (String, Vec<(String, u64)>) {
    let out = Command::new(env!("CARGO_BIN_EXE_stallwatch"))
        .arg("runtime")
        .arg(binary)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "stallwatch runtime {}: {}",
        binary.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let detail = text
        .lines()
        .find_map(|l| l.strip_prefix("detail: "))
        .unwrap()
        .to_string();
    let probes = text
        .lines()
        .filter_map(|l| l.strip_prefix("probe "))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let off = u64::from_str_radix(f[2].trim_start_matches("0x"), 16).unwrap();
            (f[0].to_string(), off)
        })
        .collect();
    (detail, probes)
}

#[test]
fn go_probe_points_match_the_toolchain_on_x86_64_and_arm64() {
    let dir = root().join("target/gc-tests/inspect");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut checked = 0;
    for (toolchain, minor) in [("1.27.3", 27), ("1.21.13", 21), ("debian", 19)] {
        let Some(go) = go_toolchain(toolchain) else {
            return;
        };
        for goarch in ["amd64", "arm64"] {
            for (mode, plain, variant) in [
                ("stripped", &[][..], &["-ldflags=-s -w"][..]),
                (
                    "pie",
                    &["-buildmode=pie"][..],
                    &["-buildmode=pie", "-ldflags=-s -w"][..],
                ),
            ] {
                let twin = dir.join(format!("{toolchain}-{goarch}-{mode}-twin"));
                let bin = dir.join(format!("{toolchain}-{goarch}-{mode}"));
                build(&go, goarch, plain, &twin);
                build(&go, goarch, variant, &bin);
                let mut want = expected(&go, &twin, minor);
                want.sort();
                for b in [&twin, &bin] {
                    let (detail, mut got) = reported(b);
                    got.sort();
                    assert!(detail.starts_with("go1."), "{detail}");
                    assert_eq!(got, want, "{}", b.display());
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 24);
}

#[test]
fn non_runtimes_and_bad_files_are_explained_not_fatal() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_stallwatch"))
            .arg("runtime")
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["/bin/sh"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no runtime the gc probe knows"));
    let out = run(&["--as", "go", "/bin/sh"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no .go.buildinfo section"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["/nonexistent/binary"]);
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}
