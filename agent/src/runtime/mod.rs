//! Finding language runtimes in processes, and where to probe them.
//!
//! A process is classified from its executable (section names, exported symbols, the
//! libraries it links); runtimes that live in a shared library (the JVM's libjvm.so, a shared
//! libpython or libnode) are then found in /proc/<pid>/maps once the dynamic loader has
//! mapped them. Files are opened through /proc/<pid>/exe and /proc/<pid>/root, so binaries in
//! other mount namespaces, and binaries deleted since the process started, are still read and
//! probed. Results are cached per file (device, inode), so a binary is analysed once.

pub mod cli;
pub mod elf;
pub mod go;
pub mod gopclntab;
pub mod uprobe;
pub mod usdt;

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use object::read::elf::ElfFile64;
use object::{Object, ObjectSection, ReadCache};
use stallwatch_common::gc::Runtime;
use stallwatch_common::names;

/// Files larger than this are not read (a corrupt or hostile "binary" must not exhaust memory).
const MAX_BINARY_BYTES: u64 = 1 << 30;

/// Why a runtime could not be probed; `reason()` is the metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error("the process exited before it could be read")]
    Gone,
    #[error("I/O error: {0}")]
    Io(String),
    #[error("not an ELF64 file this agent can parse: {0}")]
    NotElf(String),
    #[error("the file is truncated: a section or segment points past its end")]
    Truncated,
    #[error("larger than {} MiB", MAX_BINARY_BYTES >> 20)]
    TooLarge,
    #[error("no .go.buildinfo section holding the Go version")]
    NoBuildInfo,
    #[error("unsupported version {0} (Go 1.19 or newer is needed)")]
    UnsupportedVersion(String),
    #[error("symbol {0} not found")]
    NoSymbol(String),
    #[error("the Go function table (pclntab) is unreadable: {0}")]
    Pclntab(String),
    #[error("no return instruction found in {0}")]
    NoReturn(&'static str),
    #[error("undecodable instruction at {0:#x}")]
    Disassembly(u64),
    #[error("unsupported architecture {0}")]
    Architecture(String),
    #[error("USDT notes: {0}")]
    Usdt(String),
    #[error("USDT probe {0} not found (an interpreter built without --with-dtrace/USDT support)")]
    NoUsdt(&'static str),
    #[error("attaching a uprobe failed: {0}")]
    Attach(String),
    #[error("the per-process map is full (--max-processes)")]
    MapFull,
}

impl Failure {
    pub fn reason(&self) -> &'static str {
        match self {
            Failure::Gone => "process_gone",
            Failure::Io(_) => "io_error",
            Failure::NotElf(_) => "not_elf",
            Failure::Truncated => "truncated",
            Failure::TooLarge => "too_large",
            Failure::NoBuildInfo | Failure::UnsupportedVersion(_) => "unsupported_version",
            Failure::NoSymbol(_) | Failure::Pclntab(_) | Failure::NoUsdt(_) => "no_symbol",
            Failure::NoReturn(_) | Failure::Disassembly(_) => "disassembly",
            Failure::Architecture(_) => "architecture",
            Failure::Usdt(_) => "bad_usdt_notes",
            Failure::Attach(_) => "attach_failed",
            Failure::MapFull => "process_map_full",
        }
    }
}

/// One uprobe: which program, at which file offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    pub prog: &'static str,
    pub offset: u64,
    pub retprobe: bool,
    /// File offset of a USDT semaphore (0: none).
    pub ref_ctr: u64,
}

impl ProbeSpec {
    pub fn entry(prog: &'static str, offset: u64) -> Self {
        ProbeSpec {
            prog,
            offset,
            retprobe: false,
            ref_ctr: 0,
        }
    }
    fn ret(prog: &'static str, offset: u64) -> Self {
        ProbeSpec {
            retprobe: true,
            ..ProbeSpec::entry(prog, offset)
        }
    }
}

/// A file, as the kernel's uprobes see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileKey {
    pub dev: u64,
    pub ino: u64,
}

/// A binary with a runtime in it, and the probes that measure it.
#[derive(Debug)]
pub struct Target {
    pub runtime: Runtime,
    pub key: FileKey,
    /// "go1.22.5", "libjvm.so", ...
    pub detail: String,
    pub probes: Vec<ProbeSpec>,
}

/// What the executable alone says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExeClass {
    NotRuntime,
    /// The runtime is in the executable itself.
    Runtime(Runtime),
    /// Links a runtime library (libjvm via libjli, libpython, libnode): look in the maps.
    Linked(Runtime),
}

/// overlayfs' `f_type`.
const OVERLAYFS_MAGIC: i64 = 0x794c_7630;

/// A file's identity as uprobes see it. On overlayfs every mount has its own device number,
/// yet replicas of one image (one mount per container) share the lower file, which is what the
/// kernel attaches uprobes to (`d_real_inode`); overlayfs shows the real inode number. So an
/// overlay file is keyed by inode, size and modification time instead of device.
fn key_of(m: &std::fs::Metadata, fs_type: Option<i64>) -> FileKey {
    if fs_type == Some(OVERLAYFS_MAGIC) {
        let stamp = (m.mtime() as u64).wrapping_mul(1_000_000_007) ^ m.mtime_nsec() as u64;
        FileKey {
            dev: OVERLAY_DEV ^ stamp.rotate_left(20) ^ m.size(),
            ino: m.ino(),
        }
    } else {
        FileKey {
            dev: m.dev(),
            ino: m.ino(),
        }
    }
}

/// Marks overlay keys apart from real device numbers (which fit in 32 bits).
const OVERLAY_DEV: u64 = 0x8000_0000_0000_0000;

fn fs_type_of_fd(fd: std::os::fd::BorrowedFd<'_>) -> Option<i64> {
    use std::os::fd::AsRawFd;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd and a properly sized out-parameter.
    (unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) } == 0).then_some(st.f_type as i64)
}

/// The file's key, via stat (which follows /proc magic links).
pub fn file_key(path: &Path) -> Result<FileKey, Failure> {
    let m = std::fs::metadata(path).map_err(io_failure)?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))
        .map_err(|_| Failure::Io("path holds a NUL byte".into()))?;
    // SAFETY: a NUL-terminated path and a properly sized out-parameter.
    let fs_type = (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0).then_some(st.f_type as i64);
    Ok(key_of(&m, fs_type))
}

/// A binary opened once: it is classified and analysed from this descriptor and its uprobes
/// attach through it, so a process exec'ing meanwhile cannot swap the file between the
/// analysis and the attach. Opened through `/proc/<pid>/map_files` where possible, which
/// yields the file actually mapped: on overlayfs the real (lower or upper) file, which is also
/// what the kernel attaches uprobes to, so replicas of one image share one attachment.
pub struct Opened {
    pub file: File,
    pub key: FileKey,
    /// For logs: what the process calls the file.
    pub shown: String,
}

impl Opened {
    pub fn open(path: &Path, shown: String) -> Result<Opened, Failure> {
        use std::os::fd::AsFd;
        let file = File::open(path).map_err(io_failure)?;
        let m = file.metadata().map_err(io_failure)?;
        let key = key_of(&m, fs_type_of_fd(file.as_fd()));
        Ok(Opened { file, key, shown })
    }

    /// The path the kernel resolves back to this very file.
    pub fn attach_path(&self) -> PathBuf {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }
}

/// (address range, path) of each file mapping in a /proc/<pid>/maps body.
pub fn mappings(maps: &str) -> impl Iterator<Item = (&str, &str, &str)> {
    maps.lines().filter_map(|line| {
        // start-end perms offset dev inode path (the path may hold spaces)
        let mut f = line.splitn(6, ' ');
        let range = f.next()?;
        let (_, _, _) = (f.next()?, f.next()?, f.next()?);
        let inode = f.next()?;
        let path = f.next()?.trim_start();
        (inode != "0" && path.starts_with('/')).then_some((range, inode, path))
    })
}

/// Opens `pid`'s executable: the mapping of it (see [`Opened`]) or else /proc/<pid>/exe
/// (map_files needs CAP_SYS_ADMIN).
pub fn open_exe(proc_root: &Path, pid: u32) -> Result<Opened, Failure> {
    let dir = proc_root.join(pid.to_string());
    let exe = dir.join("exe");
    let target = std::fs::read_link(&exe).map_err(io_failure)?;
    let shown = format!("{} -> {}", exe.display(), target.display());
    if let Ok(maps) = std::fs::read_to_string(dir.join("maps")) {
        let target = target.to_string_lossy();
        if let Some((range, _, _)) = mappings(&maps).find(|(_, _, p)| *p == target) {
            if let Ok(o) = Opened::open(&dir.join("map_files").join(range), shown.clone()) {
                return Ok(o);
            }
        }
    }
    Opened::open(&exe, shown)
}

pub fn io_failure(e: std::io::Error) -> Failure {
    if e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) {
        Failure::Gone
    } else {
        Failure::Io(e.to_string())
    }
}

const JVM_LIBS: &[&str] = &["libjli.so", "libjvm.so"];
const PYTHON_LIB: &str = "libpython3";
const NODE_LIB: &str = "libnode.so";
const V8_COLLECT_GARBAGE: &str = "_ZN2v88internal4Heap14CollectGarbageE";

/// Classifies an executable from its headers, reading only the parts it needs.
#[cfg(test)]
pub fn classify_exe(path: &Path) -> Result<ExeClass, Failure> {
    let file = File::open(path).map_err(io_failure)?;
    classify(&file, &path_name(path))
}

/// Classifies an open executable named `file_name` (CPython is known by its name).
pub fn classify(file: &File, file_name: &str) -> Result<ExeClass, Failure> {
    let cache = ReadCache::new(file.try_clone().map_err(io_failure)?);
    let elf = match ElfFile64::<object::Endianness, _>::parse(&cache) {
        Ok(e) => e,
        Err(e) => {
            let mut head = [0u8; 5];
            let n = std::os::unix::fs::FileExt::read_at(file, &mut head, 0).map_err(io_failure)?;
            // Scripts and 32-bit binaries are not runtimes we probe; a damaged ELF64 is
            // worth a report.
            if n < 5 || &head[..4] != b"\x7fELF" || head[4] != 2 {
                return Ok(ExeClass::NotRuntime);
            }
            // Only damaged executables get here: reading their headers whole is fine.
            let data = read_binary(file)?;
            return Err(broken_elf(&data, data.len() as u64, &e.to_string()));
        }
    };
    let has = |name: &str| elf.section_by_name(name).is_some();
    if has(".go.buildinfo") || has(".gopclntab") || has(".data.rel.ro.gopclntab") {
        return Ok(ExeClass::Runtime(Runtime::Go));
    }
    if has(".note.stapsdt") && file_name.starts_with("python") {
        return Ok(ExeClass::Runtime(Runtime::Python));
    }
    let dynstr = elf
        .section_by_name(".dynstr")
        .and_then(|s| s.data().ok())
        .unwrap_or_default();
    let links = |lib: &str| memfind(dynstr, lib.as_bytes());
    if JVM_LIBS.iter().any(|l| links(l)) {
        return Ok(ExeClass::Linked(Runtime::Jvm));
    }
    if links(PYTHON_LIB) {
        return Ok(ExeClass::Linked(Runtime::Python));
    }
    if links(NODE_LIB) {
        return Ok(ExeClass::Linked(Runtime::Node));
    }
    if memfind(dynstr, V8_COLLECT_GARBAGE.as_bytes()) {
        return Ok(ExeClass::Runtime(Runtime::Node));
    }
    Ok(ExeClass::NotRuntime)
}

/// The name the process was started as (for /proc/<pid>/exe, the link's target).
pub fn path_name(path: &Path) -> String {
    let target = std::fs::read_link(path).unwrap_or_else(|_| path.to_path_buf());
    target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn memfind(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// The runtime library `runtime` needs, as mapped in /proc/<pid>/maps, opened (see
/// [`Opened`]): through `map_files`, else through the process's root (its mount namespace)
/// if the file there is the one mapped.
pub fn find_library(
    proc_root: &Path,
    pid: u32,
    runtime: Runtime,
) -> Result<Option<Opened>, Failure> {
    let dir = proc_root.join(pid.to_string());
    let maps = std::fs::read_to_string(dir.join("maps")).map_err(io_failure)?;
    let wanted = |name: &str| match runtime {
        Runtime::Jvm => name == "libjvm.so",
        Runtime::Python => name.starts_with(PYTHON_LIB) && name.contains(".so"),
        Runtime::Node => name.starts_with("libnode.so"),
        Runtime::Go => false,
    };
    for (range, inode, path) in mappings(&maps) {
        let name = path.rsplit('/').next().unwrap_or(path);
        if !wanted(name) {
            continue;
        }
        let shown = format!("{} in pid {pid}", path);
        if let Ok(o) = Opened::open(&dir.join("map_files").join(range), shown.clone()) {
            return Ok(Some(o));
        }
        let rooted = dir.join("root").join(path.trim_start_matches('/'));
        if let Ok(o) = Opened::open(&rooted, shown) {
            if o.key.ino.to_string() == inode {
                return Ok(Some(o));
            }
        }
    }
    Ok(None)
}

/// Truncated if the ELF header, or any section with contents in the file, reaches past the
/// end of the file (`data` holds the file's first bytes, `len` its length); else unparseable.
fn broken_elf(data: &[u8], len: u64, err: &str) -> Failure {
    let word = |at: u64, n: usize| -> Option<u64> {
        let b = data.get(usize::try_from(at).ok()?..usize::try_from(at).ok()? + n)?;
        Some(b.iter().rev().fold(0u64, |acc, x| acc << 8 | u64::from(*x)))
    };
    let past_end = (|| {
        let (phoff, shoff) = (word(0x20, 8)?, word(0x28, 8)?);
        let (shentsize, shnum) = (word(0x3a, 2)?, word(0x3c, 2)?);
        if len < 64 || phoff > len || shoff.saturating_add(shentsize * shnum) > len {
            return Some(true);
        }
        // Section headers present: does one point past the end? (SHT_NOBITS has no bytes.)
        let mut any = false;
        for i in 0..shnum {
            let h = shoff + i * shentsize;
            let (kind, off, size) = (word(h + 4, 4)?, word(h + 0x18, 8)?, word(h + 0x20, 8)?);
            any |= kind != 8 && off.saturating_add(size) > len;
        }
        Some(any)
    })()
    .unwrap_or(true);
    if past_end {
        Failure::Truncated
    } else {
        Failure::NotElf(err.to_string())
    }
}

fn read_binary(file: &File) -> Result<Vec<u8>, Failure> {
    let len = file.metadata().map_err(io_failure)?.len();
    if len > MAX_BINARY_BYTES {
        return Err(Failure::TooLarge);
    }
    // Positioned reads: the descriptor's offset is shared with its clones.
    let mut data = vec![0u8; len as usize];
    std::os::unix::fs::FileExt::read_exact_at(file, &mut data, 0).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Failure::Truncated
        } else {
            io_failure(e)
        }
    })?;
    Ok(data)
}

fn parse(data: &[u8]) -> Result<ElfFile64<'_>, Failure> {
    ElfFile64::parse(data).map_err(|e| {
        broken_elf(
            &data[..data.len().min(64)],
            data.len() as u64,
            &e.to_string(),
        )
    })
}

/// Reads the open file and works out the probes for `runtime` in it.
pub fn analyse(file: &File, key: FileKey, runtime: Runtime) -> Result<Target, Failure> {
    let data = read_binary(file)?;
    let elf = parse(&data)?;
    let (detail, probes) = match runtime {
        Runtime::Go => go::plan(&elf)?,
        Runtime::Jvm => jvm_plan(&elf)?,
        Runtime::Python => python_plan(&elf)?,
        Runtime::Node => node_plan(&elf)?,
    };
    Ok(Target {
        runtime,
        key,
        detail,
        probes,
    })
}

fn usdt_probe(
    elf: &ElfFile64<'_>,
    provider: &str,
    name: &'static str,
) -> Result<usdt::UsdtProbe, Failure> {
    usdt::probes(elf)
        .map_err(|e| Failure::Usdt(e.to_string()))?
        .into_iter()
        .find(|p| p.provider == provider && p.name == name)
        .ok_or(Failure::NoUsdt(name))
}

fn offset_of_symbol(elf: &ElfFile64<'_>, name: &str) -> Result<u64, Failure> {
    let (addr, _) = elf::symbol(elf, name).ok_or_else(|| Failure::NoSymbol(name.into()))?;
    elf::vaddr_to_offset(elf, addr).ok_or(Failure::Truncated)
}

const JVM_SAFEPOINT_BEGIN: &str = "_ZN20SafepointSynchronize5beginEv";
const JVM_SAFEPOINT_END: &str = "_ZN20SafepointSynchronize3endEv";

/// HotSpot: every stop-the-world pause is a safepoint, bracketed by
/// `SafepointSynchronize::begin()` and `::end()` (local symbols in libjvm's .symtab); the
/// USDT probe gc__begin, when present, marks the safepoints that collected garbage. A libjvm
/// without symbols falls back to the USDT probes gc__begin/gc__end: the collections only,
/// without the time to reach the safepoint or the non-GC safepoints.
fn jvm_plan(elf: &ElfFile64<'_>) -> Result<(String, Vec<ProbeSpec>), Failure> {
    let usdt_spec = |prog, p: &usdt::UsdtProbe| ProbeSpec {
        ref_ctr: p.semaphore_offset.unwrap_or(0),
        ..ProbeSpec::entry(prog, p.offset)
    };
    let (begin, end) = match (
        offset_of_symbol(elf, JVM_SAFEPOINT_BEGIN),
        offset_of_symbol(elf, JVM_SAFEPOINT_END),
    ) {
        (Ok(b), Ok(e)) => (b, e),
        (Err(missing), _) | (_, Err(missing)) => {
            let (b, e) = match (
                usdt_probe(elf, "hotspot", "gc__begin"),
                usdt_probe(elf, "hotspot", "gc__end"),
            ) {
                (Ok(b), Ok(e)) => (b, e),
                // Neither way works: report the symbol, the better of the two.
                _ => return Err(missing),
            };
            log::warn!(
                "libjvm.so has no SafepointSynchronize symbols: measuring collections only \
                 (USDT hotspot:gc__begin/gc__end)"
            );
            return Ok((
                "libjvm.so (USDT gc__begin/gc__end only)".into(),
                vec![
                    usdt_spec(names::PROG_RT_BEGIN, &b),
                    usdt_spec(names::PROG_RT_END, &e),
                ],
            ));
        }
    };
    let mut probes = vec![
        ProbeSpec::entry(names::PROG_JVM_BEGIN, begin),
        ProbeSpec::ret(names::PROG_JVM_REACHED, begin),
        ProbeSpec::ret(names::PROG_JVM_END, end),
    ];
    let mut detail = "libjvm.so".to_string();
    match usdt_probe(elf, "hotspot", "gc__begin") {
        Ok(p) => probes.push(usdt_spec(names::PROG_JVM_GC, &p)),
        Err(e) => {
            log::warn!("libjvm.so: {e}: JVM pauses will all have cause=\"other\"");
            detail.push_str(" (no gc__begin)");
        }
    }
    Ok((detail, probes))
}

/// CPython: USDT python:gc__start / gc__done (semaphore-gated: the kernel raises the
/// semaphore while attached, so the interpreter only pays for them while we listen).
fn python_plan(elf: &ElfFile64<'_>) -> Result<(String, Vec<ProbeSpec>), Failure> {
    let start = usdt_probe(elf, "python", "gc__start")?;
    let done = usdt_probe(elf, "python", "gc__done")?;
    let spec = |prog, p: &usdt::UsdtProbe| ProbeSpec {
        ref_ctr: p.semaphore_offset.unwrap_or(0),
        ..ProbeSpec::entry(prog, p.offset)
    };
    Ok((
        "python".into(),
        vec![
            spec(names::PROG_RT_BEGIN, &start),
            spec(names::PROG_RT_END, &done),
        ],
    ))
}

/// Node: V8's `Heap::CollectGarbage` entry and return bracket every collection, minor
/// (scavenge) and major (mark-compact).
fn node_plan(elf: &ElfFile64<'_>) -> Result<(String, Vec<ProbeSpec>), Failure> {
    let (addr, _) = elf::symbol_with_prefix(elf, V8_COLLECT_GARBAGE)
        .ok_or_else(|| Failure::NoSymbol(V8_COLLECT_GARBAGE.into()))?;
    let off = elf::vaddr_to_offset(elf, addr).ok_or(Failure::Truncated)?;
    Ok((
        "v8".into(),
        vec![
            ProbeSpec::entry(names::PROG_RT_BEGIN, off),
            ProbeSpec::ret(names::PROG_RT_END_RET, off),
        ],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_script_and_a_missing_file_are_classified_without_panicking() {
        let dir = std::env::temp_dir().join(format!("sw-rt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("script.sh");
        std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
        assert_eq!(classify_exe(&script).unwrap(), ExeClass::NotRuntime);
        assert_eq!(
            classify_exe(&dir.join("missing")).unwrap_err(),
            Failure::Gone
        );
        let truncated = dir.join("truncated");
        std::fs::write(&truncated, b"\x7fELF\x02\x01\x01").unwrap();
        assert!(matches!(
            analyse(
                &File::open(&truncated).unwrap(),
                FileKey { dev: 0, ino: 0 },
                Runtime::Go
            ),
            Err(Failure::Truncated)
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_agent_itself_is_not_a_runtime() {
        let me = std::env::current_exe().unwrap();
        assert_eq!(classify_exe(&me).unwrap(), ExeClass::NotRuntime);
        // A Rust ELF analysed as Go fails with a reason, not a panic.
        let key = file_key(&me).unwrap();
        assert_eq!(
            analyse(&File::open(&me).unwrap(), key, Runtime::Go)
                .unwrap_err()
                .reason(),
            "unsupported_version"
        );
    }
}

#[cfg(test)]
mod maps_tests {
    use super::*;

    #[test]
    fn mappings_keep_paths_with_spaces_and_skip_anonymous_ones() {
        let maps = "\
55d0c0a00000-55d0c0a02000 r--p 00000000 fd:01 1234                       /usr/bin/my app (deleted)
7f0000000000-7f0000001000 rw-p 00000000 00:00 0 
7ffd0000000-7ffd0001000 rw-p 00000000 00:00 0                          [stack]
7f1000000000-7f1000100000 r-xp 00010000 08:02 99 /usr/lib/jvm/lib/server/libjvm.so
";
        let m: Vec<_> = mappings(maps).collect();
        assert_eq!(
            m,
            vec![
                (
                    "55d0c0a00000-55d0c0a02000",
                    "1234",
                    "/usr/bin/my app (deleted)"
                ),
                (
                    "7f1000000000-7f1000100000",
                    "99",
                    "/usr/lib/jvm/lib/server/libjvm.so"
                ),
            ]
        );
    }
}
