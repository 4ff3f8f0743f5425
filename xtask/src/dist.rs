//! `cargo xtask dist`: static (musl) binaries of the agent for amd64 and arm64, each with its
//! architecture's eBPF object embedded, and a multi-arch OCI image of them (FROM scratch),
//! written as an OCI image layout without needing a container daemon. `Containerfile` builds
//! the same image with `docker buildx` from these binaries.
//!
//!   target/dist/stallwatch-linux-amd64, stallwatch-linux-arm64, SHA256SUMS
//!   target/dist/oci/   (oci-layout, index.json, blobs/sha256/...; tag = the crate version)

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};

use crate::build::{self, Arch, EbpfArgs};
use crate::{cmd, root, setup};

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Rust's, Debian's and the OCI spec's name of one architecture.
struct Platform {
    arch: Arch,
    triple: &'static str,
    oci: &'static str,
    /// ELF e_machine.
    machine: u16,
    /// The C cross compiler (ring's C and assembly) and linker, when it is not the host's.
    cross_gcc: &'static str,
}

const PLATFORMS: &[Platform] = &[
    Platform {
        arch: Arch::X86_64,
        triple: "x86_64-unknown-linux-musl",
        oci: "amd64",
        machine: 62,
        cross_gcc: "x86_64-linux-gnu-gcc",
    },
    Platform {
        arch: Arch::Aarch64,
        triple: "aarch64-unknown-linux-musl",
        oci: "arm64",
        machine: 183,
        cross_gcc: "aarch64-linux-gnu-gcc",
    },
];

fn platform(arch: Arch) -> &'static Platform {
    PLATFORMS
        .iter()
        .find(|p| p.arch == arch)
        .expect("every Arch has a platform")
}

/// `cargo <args> --release --target <musl triple>`: static artifacts of `arch` with that
/// architecture's eBPF object embedded (built here), cross-compiled when `arch` is not the
/// host's. `dist` and `test-arm64` share these settings, and so their build cache.
pub fn static_cargo(arch: Arch, args: &[&str]) -> anyhow::Result<Command> {
    setup::dist_tools()?;
    let p = platform(arch);
    let object = build::ebpf(&EbpfArgs {
        arch: Some(p.arch),
        ..Default::default()
    })?;
    let mut cargo = Command::new("cargo");
    cargo
        .current_dir(root())
        // This architecture's object, whatever the environment says.
        .env("STALLWATCH_EBPF_OBJ", &object)
        // Symbols stay (profiles, backtraces); DWARF goes: a third of the size.
        .env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo")
        .args(args)
        .args(["--release", "--target", p.triple]);
    if p.arch != Arch::host() {
        let env = p.triple.replace('-', "_");
        cargo
            .env(
                format!("CARGO_TARGET_{}_LINKER", env.to_uppercase()),
                p.cross_gcc,
            )
            .env(format!("CC_{env}"), p.cross_gcc);
    }
    Ok(cargo)
}

pub fn dist_dir() -> PathBuf {
    root().join("target/dist")
}

/// Builds everything into target/dist; returns the binaries' paths by OCI arch.
pub fn run() -> anyhow::Result<Vec<(&'static str, PathBuf)>> {
    let out = dist_dir();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut built = Vec::new();
    for p in PLATFORMS {
        let bin = build_static(p.arch)?;
        let dest = out.join(format!("stallwatch-linux-{}", p.oci));
        std::fs::copy(&bin, &dest)
            .with_context(|| format!("copying {} to {}", bin.display(), dest.display()))?;
        eprintln!("static binary: {}", dest.display());
        built.push((p.oci, dest));
    }
    let mut sums = String::new();
    for (_, path) in &built {
        let data = std::fs::read(path)?;
        let name = path.file_name().unwrap().to_string_lossy();
        sums.push_str(&format!("{}  {name}\n", hex(&Sha256::digest(&data))));
    }
    std::fs::write(out.join("SHA256SUMS"), sums)?;
    let oci = out.join("oci");
    write_oci_layout(&oci, &built)?;
    eprintln!("OCI image layout: {} (tag {VERSION})", oci.display());
    Ok(built)
}

/// Builds the static (musl, release) agent for `arch` with that architecture's eBPF object
/// embedded; returns its path under target/<triple>/release.
pub fn build_static(arch: Arch) -> anyhow::Result<PathBuf> {
    let p = platform(arch);
    cmd::run(&mut static_cargo(
        arch,
        &["build", "-p", "stallwatch", "--bin", "stallwatch"],
    )?)?;
    let bin = root()
        .join("target")
        .join(p.triple)
        .join("release/stallwatch");
    check_static(&bin, p.machine)?;
    Ok(bin)
}

/// Fails unless `path` is an ELF executable for `machine` with no program interpreter (no
/// dynamic loader, so no libc needed from the image).
pub fn check_static(path: &Path, machine: u16) -> anyhow::Result<()> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        data.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    if data.get(..5) != Some(b"\x7fELF\x02") || data.get(5) != Some(&1) {
        bail!("{}: not a little-endian 64-bit ELF file", path.display());
    }
    let got = u16_at(18).unwrap_or(0);
    if got != machine {
        bail!("{}: ELF machine {got}, expected {machine}", path.display());
    }
    let (phoff, phentsize, phnum) = (
        u64_at(32).unwrap_or(0) as usize,
        u16_at(54).unwrap_or(0) as usize,
        u16_at(56).unwrap_or(0) as usize,
    );
    for i in 0..phnum {
        const PT_INTERP: u32 = 3;
        if u32_at(phoff + i * phentsize) == Some(PT_INTERP) {
            bail!(
                "{}: dynamically linked (has a program interpreter)",
                path.display()
            );
        }
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `data` as a content-addressed blob; returns its descriptor fields.
fn blob(layout: &Path, data: &[u8]) -> anyhow::Result<(String, usize)> {
    let digest = format!("sha256:{}", hex(&Sha256::digest(data)));
    let path = layout.join("blobs/sha256").join(&digest[7..]);
    std::fs::write(&path, data).with_context(|| format!("writing {}", path.display()))?;
    Ok((digest, data.len()))
}

/// A reproducible gzipped tar with the one file `/stallwatch` (mode 0755, root, mtime 0).
fn layer(bin: &Path) -> anyhow::Result<(Vec<u8>, String)> {
    let data = std::fs::read(bin)?;
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o755);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    tar.append_data(&mut header, "stallwatch", data.as_slice())?;
    let tar = tar.into_inner()?;
    // The config's diff_id is the digest of the uncompressed layer.
    let diff_id = format!("sha256:{}", hex(&Sha256::digest(&tar)));
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::best());
    gz.write_all(&tar)?;
    Ok((gz.finish()?, diff_id))
}

/// An OCI image layout with one image per platform and an index naming them, tagged with
/// the crate version (`org.opencontainers.image.ref.name`).
fn write_oci_layout(layout: &Path, built: &[(&'static str, PathBuf)]) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(layout);
    std::fs::create_dir_all(layout.join("blobs/sha256"))?;
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let mut manifests = Vec::new();
    for (arch, bin) in built {
        let (layer, diff_id) = layer(bin)?;
        let (layer_digest, layer_size) = blob(layout, &layer)?;
        let config = serde_json::json!({
            "architecture": arch,
            "os": "linux",
            "config": {
                "Entrypoint": ["/stallwatch"],
                "Cmd": ["run"],
                "User": "0",
                "Labels": {
                    "org.opencontainers.image.title": "stallwatch",
                    "org.opencontainers.image.version": VERSION,
                    "org.opencontainers.image.description": "eBPF agent: where a process's time goes when it is not doing useful work"
                }
            },
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created_by": "cargo xtask dist", "comment": "static stallwatch binary"}]
        });
        let (config_digest, config_size) = blob(layout, &serde_json::to_vec(&config)?)?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config_size
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": layer_digest,
                "size": layer_size
            }]
        });
        let (digest, size) = blob(layout, &serde_json::to_vec(&manifest)?)?;
        manifests.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest,
            "size": size,
            "platform": {"architecture": arch, "os": "linux"}
        }));
    }
    let image_index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests
    });
    let (digest, size) = blob(layout, &serde_json::to_vec(&image_index)?)?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": digest,
            "size": size,
            "annotations": {"org.opencontainers.image.ref.name": VERSION}
        }]
    });
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec_pretty(&index)?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_or_foreign_binary_is_refused() {
        // This test binary itself: dynamically linked (glibc), so it has an interpreter.
        let me = std::env::current_exe().unwrap();
        let host = if cfg!(target_arch = "aarch64") {
            183
        } else {
            62
        };
        let e = check_static(&me, host).unwrap_err();
        assert!(e.to_string().contains("dynamically linked"), "{e}");
        let other = if host == 62 { 183 } else { 62 };
        let e = check_static(&me, other).unwrap_err();
        assert!(e.to_string().contains("ELF machine"), "{e}");
        let e = check_static(
            Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")),
            host,
        )
        .unwrap_err();
        assert!(e.to_string().contains("not a little-endian"), "{e}");
    }
}
