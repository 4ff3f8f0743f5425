//! The eBPF object compiled into this binary.

/// ELF object bytes, 8-byte aligned as aya's parser expects.
static OBJECT: &[u8] = {
    #[repr(C, align(8))]
    struct Aligned<T: ?Sized>(T);
    static ALIGNED: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(
        env!("OUT_DIR"),
        "/stallwatch.bpf.o"
    )));
    &ALIGNED.0
};

/// The object `--ebpf-object` names, or the embedded one.
pub fn object_for(
    config: &crate::config::Config,
) -> anyhow::Result<std::borrow::Cow<'static, [u8]>> {
    match &config.ebpf_object {
        // A heap buffer is 16-byte aligned on the platforms we build for.
        Some(path) => std::fs::read(path)
            .map(std::borrow::Cow::Owned)
            .map_err(|e| anyhow::anyhow!("reading --ebpf-object {}: {e}", path.display())),
        None => object().map(std::borrow::Cow::Borrowed),
    }
}

pub fn object() -> anyhow::Result<&'static [u8]> {
    if OBJECT.is_empty() {
        anyhow::bail!(
            "this stallwatch binary was built without its eBPF programs; build them with \
             `cargo xtask build-ebpf` (or `cargo xtask build`) and rebuild the agent"
        );
    }
    Ok(OBJECT)
}

#[cfg(test)]
mod tests {
    use object::{Object, ObjectSection, ObjectSymbol};
    use stallwatch_common::names;

    /// Root-free: the object baked into this binary has every program, map and global the
    /// agent looks up by name, each in the section the loader expects.
    #[test]
    fn embedded_object_has_every_program_map_and_global() {
        let data = super::OBJECT;
        if data.is_empty() {
            assert!(
                std::env::var("STALLWATCH_REQUIRE_KERNEL").as_deref() != Ok("1"),
                "no eBPF object embedded; CI must run `cargo xtask build-ebpf` first"
            );
            eprintln!("SKIP: no eBPF object embedded (run `cargo xtask build-ebpf`)");
            return;
        }
        let obj = object::File::parse(data).expect("embedded object is ELF");
        assert_eq!(obj.architecture(), object::Architecture::Bpf);
        let section_of = |name: &str| {
            let sym = obj
                .symbols()
                .find(|s| s.name() == Ok(name))
                .unwrap_or_else(|| panic!("{name} missing from the embedded object"));
            let idx = sym
                .section_index()
                .unwrap_or_else(|| panic!("{name} has no section"));
            obj.section_by_index(idx)
                .unwrap()
                .name()
                .unwrap()
                .to_string()
        };
        // uretprobes: attached at a function's return (JVM, V8); every other runtime program
        // is a plain uprobe, attached at an offset the agent computes.
        let uretprobes = [
            names::PROG_JVM_REACHED,
            names::PROG_JVM_END,
            names::PROG_RT_END_RET,
        ];
        for p in names::ALL_PROGRAMS.iter().chain(names::GC_PROGRAMS) {
            let sec = section_of(p);
            let want = if uretprobes.contains(p) {
                "uretprobe"
            } else if names::GC_PROGRAMS.contains(p) {
                "uprobe"
            } else {
                "tp_btf/"
            };
            assert!(
                sec.starts_with(want),
                "{p} in section {sec}, expected {want}"
            );
        }
        for m in names::ALL_MAPS {
            // Legacy map definitions, or BTF ones (task storage needs BTF types).
            let sec = section_of(m);
            assert!(sec == "maps" || sec == ".maps", "{m} in section {sec}");
        }
        // Frozen read-only globals: the verifier sees their values as constants, which the
        // direct BTF loads at these offsets need.
        for g in [
            names::GLOBAL_TASK_TGID_OFFSET,
            names::GLOBAL_TASK_PID_OFFSET,
            names::GLOBAL_TASK_STATE_OFFSET,
            names::GLOBAL_TASK_CFS_RQ_OFFSET,
            names::GLOBAL_CFS_RQ_RQ_OFFSET,
            names::GLOBAL_RQ_CLOCK_OFFSET,
            names::GLOBAL_TASK_RUN_DELAY_OFFSET,
            names::GLOBAL_TASK_LAST_ARRIVAL_OFFSET,
            names::GLOBAL_TASK_SUM_EXEC_OFFSET,
            names::GLOBAL_TASK_START_OFFSET,
            names::GLOBAL_TASK_FLAGS_OFFSET,
            names::GLOBAL_SK_PROTOCOL_OFF,
            names::GLOBAL_SK_ERR_OFF,
            names::GLOBAL_SK_ERR_SOFT_OFF,
        ] {
            assert_eq!(section_of(g), ".rodata", "{g}");
        }
        assert!(obj.section_by_name("license").is_some());
    }
}
