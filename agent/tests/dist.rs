//! What `cargo xtask dist` ships (the test command runs it first): static binaries for amd64
//! and arm64 with their architecture's eBPF object, and the multi-arch OCI image of them.
//! The amd64 binary loads its probes on this kernel; the arm64 one runs under qemu-user and
//! reads an arm64 Go binary exactly as the native agent does.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{go_build, go_toolchain, workspace_root};
use object::{Architecture, Object};

fn dist() -> Option<PathBuf> {
    let dir = workspace_root().join("target/dist");
    if dir.join("stallwatch-linux-arm64").exists() && dir.join("oci/index.json").exists() {
        return Some(dir);
    }
    let what = format!("{} (the test command builds it)", dir.display());
    common::tool_or_skip("dist", &what, "cargo xtask dist", None)
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_binaries_are_static_for_their_architecture_and_match_their_checksums() {
    let Some(dir) = dist() else { return };
    let sums = std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap();
    for (arch, want) in [
        ("amd64", Architecture::X86_64),
        ("arm64", Architecture::Aarch64),
    ] {
        let path = dir.join(format!("stallwatch-linux-{arch}"));
        let data = std::fs::read(&path).unwrap();
        let elf = object::File::parse(&*data).unwrap();
        assert_eq!(elf.architecture(), want, "{}", path.display());
        assert!(
            elf.section_by_name(".interp").is_none(),
            "{} needs a dynamic loader",
            path.display()
        );
        // The eBPF object of its own architecture is embedded (the x86_64 and aarch64
        // objects differ in their register-access code, and both carry BTF).
        let ebpf = std::fs::read(
            workspace_root()
                .join("target/ebpf")
                .join(if arch == "amd64" { "x86_64" } else { "aarch64" })
                .join("stallwatch.bpf.o"),
        )
        .unwrap();
        assert!(
            data.windows(ebpf.len()).any(|w| w == ebpf.as_slice()),
            "{arch}: its eBPF object is not embedded"
        );
        let line = format!("{}  stallwatch-linux-{arch}", sha256(&path));
        assert!(
            sums.lines().any(|l| l == line),
            "{line} not in SHA256SUMS:\n{sums}"
        );
    }
}

#[test]
fn the_static_amd64_binary_loads_every_probe_on_this_kernel() {
    let Some(dir) = dist() else { return };
    if cfg!(not(target_arch = "x86_64")) {
        return;
    }
    let Some(_guard) = common::kernel_or_skip("the_static_amd64_binary_loads_every_probe") else {
        return;
    };
    let text = run(Command::new(dir.join("stallwatch-linux-amd64")).arg("check"));
    for probe in ["sched", "syscalls", "tcp", "gc"] {
        assert!(
            text.contains(&format!("ok   probe {probe}")),
            "{probe}:\n{text}"
        );
    }
}

#[test]
fn the_arm64_binary_runs_and_reads_an_arm64_go_binary_as_the_native_agent_does() {
    let Some(dir) = dist() else { return };
    let Some(go) = go_toolchain("debian") else {
        return;
    };
    let qemu = "/usr/bin/qemu-aarch64-static";
    assert!(
        Path::new(qemu).exists() || cfg!(target_arch = "aarch64"),
        "{qemu} missing: run `cargo xtask setup`"
    );
    let arm64 = |args: &[&Path]| {
        let mut cmd = if cfg!(target_arch = "aarch64") {
            Command::new(dir.join("stallwatch-linux-arm64"))
        } else {
            let mut c = Command::new(qemu);
            c.arg(dir.join("stallwatch-linux-arm64"));
            c
        };
        run(cmd.args(args))
    };
    assert!(arm64(&[Path::new("--version")]).starts_with("stallwatch 0.1.0"));
    let tmp = std::env::temp_dir().join(format!("sw-dist-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let go_arm64 = tmp.join("gcpause-arm64");
    go_build(&go, &[], "arm64", &go_arm64);
    let native = run(Command::new(env!("CARGO_BIN_EXE_stallwatch"))
        .arg("runtime")
        .arg(&go_arm64));
    let emulated = arm64(&[Path::new("runtime"), &go_arm64]);
    assert!(native.contains("go"), "{native}");
    assert_eq!(
        emulated, native,
        "the arm64 agent reads the file as the native one"
    );
    let _ = std::fs::remove_dir_all(&tmp);
}

/// The blob a descriptor names, read from the layout.
fn blob(layout: &Path, desc: &serde_json::Value) -> Vec<u8> {
    let digest = desc["digest"].as_str().unwrap();
    let hex = digest.strip_prefix("sha256:").unwrap();
    let path = layout.join("blobs/sha256").join(hex);
    assert_eq!(
        sha256(&path),
        hex,
        "blob {digest} does not match its digest"
    );
    let data = std::fs::read(&path).unwrap();
    assert_eq!(
        data.len() as u64,
        desc["size"].as_u64().unwrap(),
        "{digest} size"
    );
    data
}

#[test]
fn the_oci_image_holds_each_architectures_binary_and_copies_cleanly() {
    let Some(dir) = dist() else { return };
    let layout = dir.join("oci");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let top = &index["manifests"][0];
    assert_eq!(
        top["annotations"]["org.opencontainers.image.ref.name"],
        env!("CARGO_PKG_VERSION")
    );
    let image_index: serde_json::Value = serde_json::from_slice(&blob(&layout, top)).unwrap();
    let mut arches = Vec::new();
    for m in image_index["manifests"].as_array().unwrap() {
        let arch = m["platform"]["architecture"].as_str().unwrap().to_string();
        let manifest: serde_json::Value = serde_json::from_slice(&blob(&layout, m)).unwrap();
        let config: serde_json::Value =
            serde_json::from_slice(&blob(&layout, &manifest["config"])).unwrap();
        assert_eq!(config["architecture"], arch.as_str());
        assert_eq!(config["config"]["Entrypoint"][0], "/stallwatch");
        assert_eq!(config["config"]["Cmd"][0], "run");
        let layers = manifest["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 1, "one layer: the binary");
        let tgz = blob(&layout, &layers[0]);
        let tmp = std::env::temp_dir().join(format!("sw-oci-{}-{arch}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::write(tmp.join("layer.tgz"), &tgz).unwrap();
        run(Command::new("tar")
            .arg("-xzf")
            .arg(tmp.join("layer.tgz"))
            .arg("-C")
            .arg(&tmp));
        assert_eq!(
            sha256(&tmp.join("stallwatch")),
            sha256(&dir.join(format!("stallwatch-linux-{arch}"))),
            "{arch}: the image's /stallwatch is the dist binary"
        );
        let _ = std::fs::remove_dir_all(&tmp);
        arches.push(arch);
    }
    arches.sort();
    assert_eq!(arches, ["amd64", "arm64"]);
    // An independent reader: skopeo copies every platform, checking each digest.
    let out = std::env::temp_dir().join(format!("sw-oci-copy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--all"])
        .arg(format!(
            "oci:{}:{}",
            layout.display(),
            env!("CARGO_PKG_VERSION")
        ))
        .arg(format!("oci:{}:copy", out.display())));
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn the_aarch64_programs_pass_this_kernels_verifier() {
    let Some(_dir) = dist() else { return };
    let Some(_guard) = common::kernel_or_skip("the_aarch64_programs_pass_this_kernels_verifier")
    else {
        return;
    };
    // BPF bytecode is the same machine on every architecture; what differs is how programs
    // read registers (uprobe arguments, syscall arguments) and struct layouts, which the
    // verifier checks against this kernel: the aarch64 object must load and attach here.
    let object = workspace_root().join("target/ebpf/aarch64/stallwatch.bpf.o");
    for extra in [
        &[][..],
        &[
            "--legacy-sched-switch",
            "--legacy-process-exit",
            "--syscall-names",
        ][..],
    ] {
        let text = run(Command::new(env!("CARGO_BIN_EXE_stallwatch"))
            .arg("check")
            .arg("--ebpf-object")
            .arg(&object)
            .args(extra));
        assert!(text.contains("bytes from"), "{text}");
        for probe in ["sched", "syscalls", "tcp", "gc"] {
            assert!(
                text.contains(&format!("ok   probe {probe}")),
                "aarch64 {probe} {extra:?}:\n{text}"
            );
        }
        // Forced, the older kernels' programs are the ones attached (by default the kernel's
        // prototypes choose, so older hosts get them too).
        if !extra.is_empty() {
            for legacy in ["sw_switch_v1", "sw_proc_exit_v1"] {
                assert!(text.contains(legacy), "{legacy} {extra:?}:\n{text}");
            }
        }
    }
}
