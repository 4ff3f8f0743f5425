//! Embeds the eBPF object built by `cargo xtask build-ebpf` so the agent is one file.
//! Without it the agent still compiles (an empty placeholder) and says at run time which
//! command builds the programs.
use std::{env, fs, path::PathBuf};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("stallwatch.bpf.o");
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap();
    println!("cargo:rerun-if-env-changed=STALLWATCH_EBPF_OBJ");
    let obj = match env::var_os("STALLWATCH_EBPF_OBJ") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap())
            .join("..")
            .join("target/ebpf")
            .join(&arch)
            .join("stallwatch.bpf.o"),
    };
    println!("cargo:rerun-if-changed={}", obj.display());
    if obj.exists() {
        fs::copy(&obj, &out).expect("copy eBPF object");
    } else {
        println!(
            "cargo:warning=eBPF object {} not found; the agent will not load probes. Build it with `cargo xtask build-ebpf --arch {arch}`.",
            obj.display()
        );
        fs::write(&out, []).expect("write placeholder");
    }
}
