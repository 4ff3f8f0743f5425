//! Discovery of USDT (SystemTap SDT) probes in ELF64 files, resolved to uprobe file offsets.
//!
//! Every `DTRACE_PROBE`/`STAP_PROBE` site leaves a note of type 3 owned by `"stapsdt"` in
//! `.note.stapsdt`. Its descriptor holds three address-sized words (probe PC, link-time address
//! of `.stapsdt.base`, semaphore address or 0) followed by three NUL-terminated strings
//! (provider, name, argument spec). The kernel wants *file offsets*, both for the uprobe itself
//! and for its `ref_ctr_offset` (the `u16` semaphore it increments while a probe is attached), so
//! each address is translated here, following libbpf's `collect_usdt_targets`:
//!
//! 1. Prelink compensation: if the file has a `.stapsdt.base` section and the note recorded a
//!    non-zero base, the difference `sh_addr(.stapsdt.base) - note.base` is added to the PC and,
//!    as gdb and SystemTap do, to a non-zero semaphore address. (libbpf adjusts only the PC;
//!    the two agree on every file that was not prelinked, where the difference is 0.)
//! 2. Virtual address to file offset through the `PT_LOAD` segment holding the address:
//!    `addr - p_vaddr + p_offset`. The PC must lie in an executable segment and the semaphore in
//!    a writable one (the kernel only updates reference counters in writable mappings).
//!    Program headers rather than section headers are used for the semaphore too (as libbpf
//!    does; bcc uses the `.probes` section header): they are what the kernel maps, so they are
//!    what `ref_ctr_offset` is resolved against, and they also cover a semaphore placed outside
//!    `.probes`. For file-backed sections both methods give the same number.
//!
//! Unlike libbpf, the address must lie in the *file-backed* part of the segment (`p_filesz`,
//! not `p_memsz`): an address in zero-filled memory (`.bss`) has no file offset, and attaching
//! there would silently probe or count at the wrong place.
//!
//! The input is untrusted: all reads are bounds-checked and all arithmetic checked, so a
//! malformed file yields a [`UsdtError`], never a panic.

use object::elf::{PF_W, PF_X, PT_LOAD};
use object::read::elf::{ElfFile64, ProgramHeader, SectionHeader};
use object::{Endian, Object, ObjectSection};

const NOTE_SECTION: &str = ".note.stapsdt";
const BASE_SECTION: &str = ".stapsdt.base";
const NOTE_OWNER: &[u8] = b"stapsdt";
const NT_STAPSDT: u32 = 3;

/// One USDT probe site, resolved to the file offsets a uprobe attachment needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsdtProbe {
    /// Provider, e.g. `python` or `hotspot`.
    pub provider: String,
    /// Probe name, e.g. `gc__start`.
    pub name: String,
    /// File offset of the probe's nop: where the uprobe goes.
    pub offset: u64,
    /// File offset of the semaphore (u16 counter) the kernel must increment while attached; None if the probe has none.
    pub semaphore_offset: Option<u64>,
    /// The raw argument spec, e.g. "-4@%eax 8@%rdx", kept for callers that read arguments.
    pub args: String,
}

/// Why the USDT probes of a file could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum UsdtError {
    /// The ELF structure around the notes is broken (bad section bounds, truncated note header...).
    #[error("malformed ELF: {0}")]
    Elf(#[from] object::read::Error),
    /// A section named `.note.stapsdt` exists but is not `SHT_NOTE`.
    #[error("section {NOTE_SECTION} is not of type SHT_NOTE")]
    NotANoteSection,
    /// A stapsdt note descriptor is truncated or otherwise malformed.
    #[error("malformed stapsdt note: {0}")]
    MalformedNote(&'static str),
    /// Applying the `.stapsdt.base` (prelink) adjustment to an address overflowed.
    #[error("USDT {probe}: {what} address {addr:#x} overflows when adjusted for {BASE_SECTION}")]
    AdjustOverflow {
        /// `provider:name` of the probe.
        probe: String,
        /// `"probe"` or `"semaphore"`.
        what: &'static str,
        /// The address as recorded in the note.
        addr: u64,
    },
    /// No `PT_LOAD` segment maps the address from the file.
    #[error("USDT {probe}: {what} address {addr:#x} is not in the file-backed part of any PT_LOAD segment")]
    Unmapped {
        /// `provider:name` of the probe.
        probe: String,
        /// `"probe"` or `"semaphore"`.
        what: &'static str,
        /// The (adjusted) virtual address.
        addr: u64,
    },
    /// The probe address lies in a segment without `PF_X`.
    #[error("USDT {probe}: probe address {addr:#x} is in a non-executable segment")]
    NotExecutable {
        /// `provider:name` of the probe.
        probe: String,
        /// The (adjusted) virtual address.
        addr: u64,
    },
    /// The semaphore lies in a segment without `PF_W`, so the kernel cannot count in it.
    #[error("USDT {probe}: semaphore address {addr:#x} is in a non-writable segment")]
    SemaphoreNotWritable {
        /// `provider:name` of the probe.
        probe: String,
        /// The (adjusted) virtual address.
        addr: u64,
    },
}

/// Every USDT probe in the file (empty Vec if it has no .note.stapsdt).
///
/// Notes in `.note.stapsdt` with another owner or type are skipped.
///
/// # Errors
///
/// One malformed or unresolvable stapsdt note fails the whole call, as in libbpf: see
/// [`UsdtError`] for the cases.
pub fn probes(elf: &ElfFile64<'_>) -> Result<Vec<UsdtProbe>, UsdtError> {
    let endian = elf.endian();
    let segments: Vec<Segment> = elf
        .elf_program_headers()
        .iter()
        .filter(|ph| ph.p_type(endian) == PT_LOAD)
        .map(|ph| Segment {
            vaddr: ph.p_vaddr(endian),
            filesz: ph.p_filesz(endian),
            offset: ph.p_offset(endian),
            flags: ph.p_flags(endian),
        })
        .collect();
    let base = elf.section_by_name(BASE_SECTION).map(|s| s.address());

    let mut probes = Vec::new();
    for section in elf.sections().filter(|s| s.name() == Ok(NOTE_SECTION)) {
        let notes = section
            .elf_section_header()
            .notes(endian, elf.data())?
            .ok_or(UsdtError::NotANoteSection)?;
        for note in notes {
            let note = note?;
            if note.name() == NOTE_OWNER && note.n_type(endian) == NT_STAPSDT {
                let raw = parse_note_desc(note.desc(), endian)?;
                probes.push(resolve(raw, base, &segments)?);
            }
        }
    }
    Ok(probes)
}

/// A stapsdt note descriptor as recorded at link time, before any address translation.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RawNote {
    pc: u64,
    base: u64,
    semaphore: u64,
    provider: String,
    name: String,
    args: String,
}

/// Decodes an ELF64 stapsdt descriptor: three 8-byte words, then three NUL-terminated strings.
/// Bytes after the argument string's NUL are ignored, as libbpf does.
fn parse_note_desc(desc: &[u8], endian: impl Endian) -> Result<RawNote, UsdtError> {
    const SHORT: UsdtError = UsdtError::MalformedNote("descriptor shorter than three addresses");
    let (pc, rest) = desc.split_first_chunk::<8>().ok_or(SHORT)?;
    let (base, rest) = rest.split_first_chunk::<8>().ok_or(SHORT)?;
    let (semaphore, strings) = rest.split_first_chunk::<8>().ok_or(SHORT)?;

    // splitn(4, NUL) yields a fourth piece (possibly empty) only if all three strings end in NUL.
    let mut pieces = strings.splitn(4, |&b| b == 0).peekable();
    let mut field = |unterminated| match (pieces.next(), pieces.peek()) {
        (Some(s), Some(_)) => String::from_utf8(s.to_vec())
            .map_err(|_| UsdtError::MalformedNote("string is not valid UTF-8")),
        _ => Err(UsdtError::MalformedNote(unterminated)),
    };
    let provider = field("provider is not NUL-terminated")?;
    let name = field("probe name is not NUL-terminated")?;
    let args = field("argument spec is not NUL-terminated")?;
    if provider.is_empty() || name.is_empty() {
        return Err(UsdtError::MalformedNote("empty provider or probe name"));
    }
    Ok(RawNote {
        pc: endian.read_u64_bytes(*pc),
        base: endian.read_u64_bytes(*base),
        semaphore: endian.read_u64_bytes(*semaphore),
        provider,
        name,
        args,
    })
}

/// The part of a `PT_LOAD` segment that is backed by the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    vaddr: u64,
    filesz: u64,
    offset: u64,
    flags: u32,
}

impl Segment {
    /// File offset of `addr` if this segment maps it from the file.
    fn file_offset(&self, addr: u64) -> Option<u64> {
        let delta = addr.checked_sub(self.vaddr)?;
        if delta >= self.filesz {
            return None;
        }
        self.offset.checked_add(delta)
    }
}

/// Moves `addr` by however far `.stapsdt.base` moved from `note_base` (its link-time address
/// recorded in the note) to `section_base`; None if that overflows.
fn prelink_adjust(addr: u64, note_base: u64, section_base: Option<u64>) -> Option<u64> {
    match section_base {
        Some(actual) if actual != 0 && note_base != 0 => {
            if actual >= note_base {
                addr.checked_add(actual - note_base)
            } else {
                addr.checked_sub(note_base - actual)
            }
        }
        _ => Some(addr),
    }
}

/// Applies the prelink adjustment to a note's addresses and translates them to file offsets.
/// `base_section` is the address of `.stapsdt.base`, if the file has one.
fn resolve(
    note: RawNote,
    base_section: Option<u64>,
    segments: &[Segment],
) -> Result<UsdtProbe, UsdtError> {
    let probe = || format!("{}:{}", note.provider, note.name);
    let adjust = |addr: u64, what| {
        prelink_adjust(addr, note.base, base_section).ok_or_else(|| UsdtError::AdjustOverflow {
            probe: probe(),
            what,
            addr,
        })
    };
    let locate = |addr: u64, what| {
        segments
            .iter()
            .find_map(|seg| Some((*seg, seg.file_offset(addr)?)))
            .ok_or_else(|| UsdtError::Unmapped {
                probe: probe(),
                what,
                addr,
            })
    };

    let pc = adjust(note.pc, "probe")?;
    let (seg, offset) = locate(pc, "probe")?;
    if seg.flags & PF_X == 0 {
        return Err(UsdtError::NotExecutable {
            probe: probe(),
            addr: pc,
        });
    }

    let semaphore_offset = match note.semaphore {
        0 => None,
        addr => {
            let addr = adjust(addr, "semaphore")?;
            let (seg, offset) = locate(addr, "semaphore")?;
            if seg.flags & PF_W == 0 {
                return Err(UsdtError::SemaphoreNotWritable {
                    probe: probe(),
                    addr,
                });
            }
            Some(offset)
        }
    };

    Ok(UsdtProbe {
        offset,
        semaphore_offset,
        provider: note.provider,
        name: note.name,
        args: note.args,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use object::{BigEndian, LittleEndian};

    const TEXT_VADDR: u64 = 0x40_1000;
    const TEXT_OFF: u64 = 0x100;
    const DATA_VADDR: u64 = 0x60_2000;
    const DATA_OFF: u64 = 0x200;

    fn desc(pc: u64, base: u64, sema: u64, strings: &[u8]) -> Vec<u8> {
        [pc, base, sema]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .chain(strings.iter().copied())
            .collect()
    }

    fn raw(pc: u64, base: u64, semaphore: u64) -> RawNote {
        RawNote {
            pc,
            base,
            semaphore,
            provider: "prov".into(),
            name: "hit".into(),
            args: "-4@%eax".into(),
        }
    }

    /// Text R-X at TEXT_VADDR (0x100 bytes), data RW- at DATA_VADDR (0x10 in file, 0x40 in memory).
    fn segments() -> Vec<Segment> {
        vec![
            Segment {
                vaddr: TEXT_VADDR,
                filesz: 0x100,
                offset: TEXT_OFF,
                flags: 5,
            },
            Segment {
                vaddr: DATA_VADDR,
                filesz: 0x10,
                offset: DATA_OFF,
                flags: 6,
            },
        ]
    }

    #[test]
    fn parses_note_without_semaphore() {
        let d = desc(0x1234, 0x5678, 0, b"prov\0hit\0-4@%eax 8@%rdx\0");
        let note = parse_note_desc(&d, LittleEndian).expect("valid note");
        assert_eq!((note.pc, note.base, note.semaphore), (0x1234, 0x5678, 0));
        assert_eq!(
            (note.provider.as_str(), note.name.as_str()),
            ("prov", "hit")
        );
        assert_eq!(note.args, "-4@%eax 8@%rdx");
    }

    #[test]
    fn parses_semaphore_empty_args_and_big_endian() {
        let d = desc(1, 2, 0x60_2004, b"p\0n\0\0");
        let note = parse_note_desc(&d, LittleEndian).expect("valid note");
        assert_eq!((note.semaphore, note.args.as_str()), (0x60_2004, ""));

        let mut be: Vec<u8> = [7u64, 8, 9].iter().flat_map(|w| w.to_be_bytes()).collect();
        be.extend_from_slice(b"p\0n\0a\0");
        let note = parse_note_desc(&be, BigEndian).expect("valid note");
        assert_eq!((note.pc, note.base, note.semaphore), (7, 8, 9));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let d = desc(1, 2, 3, b"prov\0hit\0-4@%eax\0");
        for len in 0..d.len() {
            assert!(
                matches!(
                    parse_note_desc(&d[..len], LittleEndian),
                    Err(UsdtError::MalformedNote(_))
                ),
                "prefix of {len} bytes accepted"
            );
        }
    }

    #[test]
    fn rejects_missing_nul_empty_name_and_bad_utf8() {
        for strings in [
            &b"prov"[..],
            b"prov\0hit",
            b"prov\0hit\0args",
            b"prov\0\0a\0",
            b"\0n\0a\0",
            b"pr\xffov\0n\0a\0",
        ] {
            let err =
                parse_note_desc(&desc(1, 2, 3, strings), LittleEndian).expect_err("malformed");
            assert!(
                matches!(err, UsdtError::MalformedNote(_)),
                "{strings:?}: {err}"
            );
        }
    }

    #[test]
    fn translates_addresses_through_segments() {
        let p = resolve(
            raw(TEXT_VADDR + 0x50, 0, DATA_VADDR + 0xe),
            None,
            &segments(),
        )
        .expect("resolves");
        assert_eq!(p.offset, TEXT_OFF + 0x50);
        assert_eq!(p.semaphore_offset, Some(DATA_OFF + 0xe));
        assert_eq!(
            (p.provider.as_str(), p.name.as_str(), p.args.as_str()),
            ("prov", "hit", "-4@%eax")
        );

        let p = resolve(raw(TEXT_VADDR, 0, 0), None, &segments()).expect("resolves");
        assert_eq!((p.offset, p.semaphore_offset), (TEXT_OFF, None));
    }

    #[test]
    fn applies_prelink_base_adjustment() {
        // Linked with .stapsdt.base at 0x1000, which prelink moved by +0x40_0000.
        let note = raw(0x1050, 0x1000, 0x20_200e);
        let p = resolve(note.clone(), Some(0x40_1000), &segments()).expect("resolves");
        assert_eq!(
            (p.offset, p.semaphore_offset),
            (TEXT_OFF + 0x50, Some(DATA_OFF + 0xe))
        );

        // Moved down instead of up.
        let down = raw(
            TEXT_VADDR + 0x1050,
            TEXT_VADDR + 0x1000,
            DATA_VADDR + 0x100e,
        );
        let p = resolve(down, Some(TEXT_VADDR), &segments()).expect("resolves");
        assert_eq!(
            (p.offset, p.semaphore_offset),
            (TEXT_OFF + 0x50, Some(DATA_OFF + 0xe))
        );

        // No adjustment when the note records no base or the section is missing or at 0.
        for (note_base, section) in [(0, Some(0x40_1000)), (0x1000, None), (0x1000, Some(0))] {
            let n = raw(TEXT_VADDR + 8, note_base, 0);
            assert_eq!(
                resolve(n, section, &segments()).expect("resolves").offset,
                TEXT_OFF + 8
            );
        }
    }

    #[test]
    fn reports_bad_addresses_without_panicking() {
        let segs = segments();
        let unmapped = |r| matches!(r, Err(UsdtError::Unmapped { .. }));
        assert!(unmapped(resolve(raw(0x10, 0, 0), None, &segs)));
        assert!(unmapped(resolve(
            raw(TEXT_VADDR + 0x100, 0, 0),
            None,
            &segs
        )));
        // In .bss: mapped in memory, but with no file offset.
        assert!(unmapped(resolve(
            raw(TEXT_VADDR, 0, DATA_VADDR + 0x20),
            None,
            &segs
        )));
        assert!(matches!(
            resolve(raw(DATA_VADDR, 0, 0), None, &segs),
            Err(UsdtError::NotExecutable { .. })
        ));
        assert!(matches!(
            resolve(raw(TEXT_VADDR, 0, TEXT_VADDR + 4), None, &segs),
            Err(UsdtError::SemaphoreNotWritable { .. })
        ));
        assert!(matches!(
            resolve(raw(u64::MAX - 1, 1, 0), Some(u64::MAX), &segs),
            Err(UsdtError::AdjustOverflow { .. })
        ));
        assert!(matches!(
            resolve(raw(1, u64::MAX, 0), Some(1), &segs),
            Err(UsdtError::AdjustOverflow { .. })
        ));
        let huge = [Segment {
            vaddr: 0,
            filesz: u64::MAX,
            offset: u64::MAX,
            flags: 5,
        }];
        assert!(unmapped(resolve(raw(5, 0, 0), None, &huge)));
    }

    /// A note record: header, owner name and descriptor, each padded to 4 bytes.
    fn note(owner: &[u8], n_type: u32, desc: &[u8]) -> Vec<u8> {
        let pad = |v: &mut Vec<u8>| v.resize(v.len().next_multiple_of(4), 0);
        let mut n = Vec::new();
        for word in [owner.len() + 1, desc.len(), n_type as usize] {
            n.extend_from_slice(&u32::try_from(word).expect("small").to_le_bytes());
        }
        n.extend_from_slice(owner);
        n.push(0);
        pad(&mut n);
        n.extend_from_slice(desc);
        pad(&mut n);
        n
    }

    /// A minimal little-endian x86_64 ELF64 executable with the text and data segments of
    /// `segments()`, a `.stapsdt.base` at `TEXT_VADDR + 0xf0` and, if given, `.note.stapsdt`.
    fn tiny_elf(notes: Option<&[u8]>) -> Vec<u8> {
        fn put(buf: &mut Vec<u8>, at: usize, bytes: &[u8]) {
            if buf.len() < at + bytes.len() {
                buf.resize(at + bytes.len(), 0);
            }
            buf[at..at + bytes.len()].copy_from_slice(bytes);
        }
        fn words(fields: &[(u64, usize)]) -> Vec<u8> {
            fields
                .iter()
                .flat_map(|&(v, size)| v.to_le_bytes()[..size].to_vec())
                .collect()
        }
        let shstrtab = b"\0.stapsdt.base\0.note.stapsdt\0.shstrtab\0";
        let notes_off = 0x300u64;
        let strtab_off = notes_off + notes.map_or(0, |n| n.len() as u64);
        let shoff = (strtab_off + shstrtab.len() as u64).next_multiple_of(8);
        let mut sections = vec![
            // name, type, flags, addr, offset, size, addralign
            (0, 0, 0, 0, 0, 0, 0),
            (1, 1, 2, TEXT_VADDR + 0xf0, TEXT_OFF + 0xf0, 1, 1),
            (29, 3, 0, 0, strtab_off, shstrtab.len() as u64, 1),
        ];
        if notes.is_some() {
            sections.push((15, 7, 0, 0, notes_off, strtab_off - notes_off, 4));
        }

        let mut elf = Vec::new();
        put(&mut elf, 0, b"\x7fELF\x02\x01\x01");
        #[rustfmt::skip]
        put(&mut elf, 16, &words(&[
            (2, 2), (62, 2), (1, 4), (TEXT_VADDR, 8), (64, 8), (shoff, 8), (0, 4),
            (64, 2), (56, 2), (2, 2), (64, 2), (sections.len() as u64, 2), (2, 2),
        ]));
        for (i, seg) in segments().iter().enumerate() {
            #[rustfmt::skip]
            put(&mut elf, 64 + 56 * i, &words(&[
                (1, 4), (seg.flags.into(), 4), (seg.offset, 8), (seg.vaddr, 8), (seg.vaddr, 8),
                (seg.filesz, 8), (seg.filesz + 0x30, 8), (0x1000, 8),
            ]));
        }
        put(&mut elf, notes_off as usize, notes.unwrap_or_default());
        put(&mut elf, strtab_off as usize, shstrtab);
        for (i, &(name, ty, flags, addr, off, size, align)) in sections.iter().enumerate() {
            #[rustfmt::skip]
            put(&mut elf, shoff as usize + 64 * i, &words(&[
                (name, 4), (ty, 4), (flags, 8), (addr, 8), (off, 8), (size, 8),
                (0, 4), (0, 4), (align, 8), (0, 8),
            ]));
        }
        elf
    }

    #[test]
    fn reads_probes_from_an_elf_file() {
        let mut notes = note(
            b"stapsdt",
            3,
            &desc(TEXT_VADDR + 0x10, TEXT_VADDR + 0xf0, 0, b"app\0start\0\0"),
        );
        notes.extend(note(b"GNU", 3, b"ignored, other owner"));
        notes.extend(note(b"stapsdt", 4, b"ignored, other type"));
        // Linked with .stapsdt.base 0x1000 lower than where the section is now.
        let prelinked = desc(
            TEXT_VADDR - 0x1000 + 0x20,
            TEXT_VADDR - 0x1000 + 0xf0,
            DATA_VADDR - 0x1000 + 2,
            b"app\0stop\08@%rdi\0",
        );
        notes.extend(note(b"stapsdt", 3, &prelinked));
        let bytes = tiny_elf(Some(&notes));
        let elf = ElfFile64::parse(bytes.as_slice()).expect("valid ELF");

        let found = probes(&elf).expect("probes resolve");
        let expect = |name: &str, offset, semaphore_offset, args: &str| UsdtProbe {
            provider: "app".into(),
            name: name.into(),
            offset,
            semaphore_offset,
            args: args.into(),
        };
        assert_eq!(
            found,
            [
                expect("start", TEXT_OFF + 0x10, None, ""),
                expect("stop", TEXT_OFF + 0x20, Some(DATA_OFF + 2), "8@%rdi"),
            ]
        );
    }

    #[test]
    fn file_without_notes_has_no_probes() {
        let bytes = tiny_elf(None);
        let elf = ElfFile64::parse(bytes.as_slice()).expect("valid ELF");
        assert_eq!(probes(&elf).expect("no error"), []);
    }

    #[test]
    fn malformed_notes_in_a_file_are_errors() {
        let good = note(b"stapsdt", 3, &desc(TEXT_VADDR, 0, 0, b"a\0b\0\0"));
        // Truncating the section anywhere inside the note breaks its header or descriptor.
        for len in 1..good.len() - 3 {
            let bytes = tiny_elf(Some(&good[..len]));
            let elf = ElfFile64::parse(bytes.as_slice()).expect("valid ELF");
            assert!(
                probes(&elf).is_err(),
                "note truncated to {len} bytes accepted"
            );
        }
        let short = note(b"stapsdt", 3, &[0; 20]);
        let bytes = tiny_elf(Some(&short));
        let elf = ElfFile64::parse(bytes.as_slice()).expect("valid ELF");
        assert!(matches!(probes(&elf), Err(UsdtError::MalformedNote(_))));
    }

    /// Cross-checks a real binary when present: offsets must agree with the section headers
    /// (bcc's method for semaphores) and land on a nop.
    #[test]
    fn system_python_if_present() {
        let path = "/usr/bin/python3.11";
        let Ok(data) = std::fs::read(path) else {
            return eprintln!("skipping: {path} not present");
        };
        let Ok(elf) = ElfFile64::parse(data.as_slice()) else {
            return eprintln!("skipping: {path} is not an ELF64 file");
        };
        let found = probes(&elf).expect("python's notes resolve");
        if found.is_empty() {
            return eprintln!("skipping: {path} has no USDT notes");
        }
        let probes_sec = elf
            .section_by_name(".probes")
            .expect("semaphores live in .probes");
        let sec_off = probes_sec.file_range().expect(".probes is in the file").0;
        for p in &found {
            assert_eq!(p.provider, "python");
            let nop = data.get(p.offset as usize).copied();
            if elf.architecture() == object::Architecture::X86_64 {
                assert_eq!(nop, Some(0x90), "{}: no nop at {:#x}", p.name, p.offset);
            }
            let sema = p
                .semaphore_offset
                .expect("python's probes all have semaphores");
            assert!(
                (sec_off..sec_off + probes_sec.size()).contains(&sema),
                "{}: {sema:#x}",
                p.name
            );
        }
    }
}
