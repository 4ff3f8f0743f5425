//! Locating Go functions through the Go runtime's own symbol table, the pclntab.
//!
//! Go binaries built with `-ldflags='-s -w'` have no `.symtab`, but the runtime
//! still needs function metadata for stack traces, so the linker always emits
//! the pclntab: `.gopclntab`, or in PIE builds of Go ≤1.21 either
//! `.data.rel.ro.gopclntab` (internal linking) or an unnamed part of
//! `.data.rel.ro` (external linking), found by scanning for its header. This
//! module reads it to map function names to link-time address ranges, for
//! little-endian ELF64 binaries (x86_64, aarch64).
//!
//! Supported layouts (see Go's `debug/gosym/pclntab.go`, `runtime/symtab.go`):
//! Go 1.2–1.15 (magic `0xfffffffb`), 1.16–1.17 (`0xfffffffa`), 1.18–1.19
//! (`0xfffffff0`) and 1.20+ (`0xfffffff1`).
//!
//! Since Go 1.18 function addresses are 32-bit offsets from `runtime.text`.
//! The header's copy of that address is always 0 since Go 1.26, and may be 0
//! in PIE files whose linker left it to a dynamic relocation, so when it reads
//! 0 the address is taken, in order, from the `runtime.text` symbol,
//! `moduledata.text` in the `.go.module` section (Go 1.26+), the header word's
//! `R_*_RELATIVE` dynamic relocation, and finally the start of `.text`. The
//! last guess is wrong by the size of the C start-up code in externally linked
//! (cgo) binaries, which is why it comes last.

use object::read::elf::ElfFile64;
use object::{elf, Architecture, Object, ObjectSection, ObjectSymbol, RelocationFlags};

/// A Go function's link-time virtual address range [entry, end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoFunc {
    /// Fully qualified Go name, e.g. `runtime.stopTheWorld`.
    pub name: String,
    /// Link-time address of the first instruction.
    pub entry: u64,
    /// Link-time address of the next function (may include alignment padding).
    pub end: u64,
}

/// Why the pclntab could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PclntabError {
    /// No pclntab section, nor a pclntab header in `.data.rel.ro`.
    #[error("no .gopclntab section: not a Go binary")]
    NoSection,
    /// The section exists but its contents could not be read.
    #[error("cannot read the pclntab section: {0}")]
    Read(#[source] object::Error),
    /// Unknown magic: a Go version before 1.2, a big-endian binary, or not a pclntab.
    #[error("unsupported pclntab magic {0:#010x}")]
    BadMagic(u32),
    /// The fixed header fields have impossible values.
    #[error("invalid pclntab header: {0}")]
    BadHeader(&'static str),
    /// An offset or count points outside the section.
    #[error("pclntab truncated or corrupt: {0}")]
    Truncated(&'static str),
    /// Absolute addresses (Go <1.18 formats) read as 0: a PIE whose linker
    /// left the pclntab to be filled in by dynamic relocations.
    #[error("pclntab addresses are left to dynamic relocations (PIE built by Go <1.18)")]
    Unrelocated,
}

type Result<T> = std::result::Result<T, PclntabError>;

/// Looks up `names` (e.g. "runtime.startTheWorldWithSema") in the binary's pclntab.
/// Returns one entry per requested name, None if the name is absent.
pub fn find_funcs(elf: &ElfFile64<'_>, names: &[&str]) -> Result<Vec<Option<GoFunc>>> {
    let (table, address) = match elf
        .section_by_name(".gopclntab")
        .or_else(|| elf.section_by_name(".data.rel.ro.gopclntab"))
    {
        Some(section) => (
            Table::parse(section.data().map_err(PclntabError::Read)?)?,
            section.address(),
        ),
        None => scan_data_rel_ro(elf)?.ok_or(PclntabError::NoSection)?,
    };
    let text_start = match table.text_start {
        Some(0) => text_start(elf, address, table.ptr_size),
        Some(addr) => addr,
        None => 0,
    };
    table.find(text_start, names)
}

/// Externally linked PIEs built by Go ≤1.21 have the pclntab merged into
/// `.data.rel.ro`: finds it by its pointer-aligned header. Returns the table
/// and its link-time address.
fn scan_data_rel_ro<'a>(elf: &ElfFile64<'a>) -> Result<Option<(Table<'a>, u64)>> {
    let Some(section) = elf.section_by_name(".data.rel.ro") else {
        return Ok(None);
    };
    let data = section.data().map_err(PclntabError::Read)?;
    // The section is at least pointer-aligned, so its offsets align like addresses.
    for (i, chunk) in data.chunks_exact(8).enumerate() {
        let &[0xf0 | 0xf1 | 0xfa | 0xfb, 0xff, 0xff, 0xff, 0, 0, 1 | 2 | 4, 8] = chunk else {
            continue;
        };
        let Some(off) = i.checked_mul(8) else { break };
        let Some(table) = data.get(off..).and_then(|tail| Table::parse(tail).ok()) else {
            continue;
        };
        // A chance match is unlikely to also have a readable first function name.
        if table.nfunc > 0 && table.name_at(0).is_ok_and(|name| name.contains(&0)) {
            let address = u64::try_from(off)
                .ok()
                .and_then(|off| section.address().checked_add(off));
            if let Some(address) = address {
                return Ok(Some((table, address)));
            }
        }
    }
    Ok(None)
}

/// `runtime.text` for a 1.18+ pclntab at `pclntab_addr` whose header copy reads 0.
fn text_start(elf: &ElfFile64<'_>, pclntab_addr: u64, ptr_size: usize) -> u64 {
    if let Some(sym) = elf.symbol_by_name("runtime.text") {
        return sym.address();
    }
    // Go 1.26+: moduledata { pcHeader *pcHeader; 6 slices; findfunctab, minpc,
    // maxpc uintptr; text uintptr; ... }, so `text` is word 22. Trust it only if
    // word 0 points at the pclntab, i.e. the layout is the expected one.
    if let Some(module) = elf.section_by_name(".go.module") {
        let word = |index: usize| {
            let data = module.data().ok()?;
            let off = index.checked_mul(ptr_size)?;
            let value = read_uint(data, off, ptr_size, "moduledata").ok()?;
            if value != 0 {
                return Some(value);
            }
            relative_reloc(elf, module.address().checked_add(u64::try_from(off).ok()?)?)
        };
        if word(0) == Some(pclntab_addr) {
            if let Some(text) = word(22).filter(|&t| t != 0) {
                return text;
            }
        }
    }
    // Go 1.18–1.25 PIE: the header word (after magic, nfunc and nfiles) is
    // filled by a dynamic relocation that the linker did not apply in the file.
    let header_word = pclntab_addr.checked_add(8 + 2 * ptr_size as u64);
    if let Some(text) = header_word.and_then(|addr| relative_reloc(elf, addr)) {
        return text;
    }
    elf.section_by_name(".text")
        .map_or(0, |text| text.address())
}

/// The link-time value an `R_*_RELATIVE` dynamic relocation stores at `addr`.
fn relative_reloc(elf: &ElfFile64<'_>, addr: u64) -> Option<u64> {
    let relative = match elf.architecture() {
        Architecture::X86_64 => elf::R_X86_64_RELATIVE,
        Architecture::Aarch64 => elf::R_AARCH64_RELATIVE,
        _ => return None,
    };
    elf.dynamic_relocations()?.find_map(|(offset, reloc)| {
        let is_relative =
            matches!(reloc.flags(), RelocationFlags::Elf { r_type } if r_type == relative);
        if offset == addr && is_relative {
            u64::try_from(reloc.addend()).ok()
        } else {
            None
        }
    })
}

/// A parsed pclntab header with its sub-tables.
#[derive(Debug)]
struct Table<'a> {
    /// `nfunc` (entry, funcoff) pairs followed by the end of the last function.
    functab: &'a [u8],
    /// Base of the `_func` structs (funcoff is relative to this).
    funcdata: &'a [u8],
    /// Base of function names (nameOff is relative to this).
    funcnametab: &'a [u8],
    nfunc: usize,
    /// Size of functab fields and of `_func.entry`: 4 (text offsets, Go 1.18+)
    /// or the pointer size (absolute addresses).
    field_size: usize,
    ptr_size: usize,
    /// Go 1.18+: the header's `runtime.text` (may be 0); None for older
    /// formats, whose addresses are absolute.
    text_start: Option<u64>,
}

impl<'a> Table<'a> {
    fn parse(data: &'a [u8]) -> Result<Self> {
        let Some(&[m0, m1, m2, m3, pad1, pad2, quantum, ptr_size]) = data.get(..8) else {
            return Err(PclntabError::Truncated("header"));
        };
        let magic = u32::from_le_bytes([m0, m1, m2, m3]);
        if !matches!(magic, 0xffff_fffb | 0xffff_fffa | 0xffff_fff0 | 0xffff_fff1) {
            return Err(PclntabError::BadMagic(magic));
        }
        if pad1 != 0 || pad2 != 0 {
            return Err(PclntabError::BadHeader("nonzero padding"));
        }
        if !matches!(quantum, 1 | 2 | 4) {
            return Err(PclntabError::BadHeader(
                "instruction size quantum is not 1, 2 or 4",
            ));
        }
        if !matches!(ptr_size, 4 | 8) {
            return Err(PclntabError::BadHeader("pointer size is not 4 or 8"));
        }
        let ptr_size = usize::from(ptr_size);
        let word = |index: usize| read_uint(data, 8 + index * ptr_size, ptr_size, "header");
        let tail = |offset: u64, what| {
            usize::try_from(offset)
                .ok()
                .and_then(|offset| data.get(offset..))
                .ok_or(PclntabError::Truncated(what))
        };
        let nfunc = usize::try_from(word(0)?).map_err(|_| PclntabError::Truncated("nfunc"))?;
        let (functab, funcdata, funcnametab, field_size, text_start) = match magic {
            // Go 1.2–1.15: one table, offsets relative to its start.
            0xffff_fffb => {
                let functab = data
                    .get(8 + ptr_size..)
                    .ok_or(PclntabError::Truncated("functab"))?;
                (functab, data, data, ptr_size, None)
            }
            // Go 1.16–1.17: nfunc, nfiles, funcnameOffset, cuOffset,
            // filetabOffset, pctabOffset, pclnOffset.
            0xffff_fffa => {
                let pcln = tail(word(6)?, "pclnOffset")?;
                (
                    pcln,
                    pcln,
                    tail(word(2)?, "funcnameOffset")?,
                    ptr_size,
                    None,
                )
            }
            // Go 1.18+: nfunc, nfiles, textStart, funcnameOffset, cuOffset,
            // filetabOffset, pctabOffset, pclnOffset.
            _ => {
                let pcln = tail(word(7)?, "pclnOffset")?;
                (
                    pcln,
                    pcln,
                    tail(word(3)?, "funcnameOffset")?,
                    4,
                    Some(word(2)?),
                )
            }
        };
        let functab_len = nfunc
            .checked_mul(2)
            .and_then(|n| n.checked_add(1))
            .and_then(|n| n.checked_mul(field_size))
            .ok_or(PclntabError::Truncated("nfunc"))?;
        let functab = functab
            .get(..functab_len)
            .ok_or(PclntabError::Truncated("functab"))?;
        Ok(Self {
            functab,
            funcdata,
            funcnametab,
            nfunc,
            field_size,
            ptr_size,
            text_start,
        })
    }

    /// Finds `names`, turning Go 1.18+ text offsets into addresses with `text_start`.
    fn find(&self, text_start: u64, names: &[&str]) -> Result<Vec<Option<GoFunc>>> {
        let mut found: Vec<Option<GoFunc>> = vec![None; names.len()];
        let mut missing = names.len();
        for i in 0..self.nfunc {
            if missing == 0 {
                break;
            }
            let name = self.name_at(i)?;
            for (slot, want) in found.iter_mut().zip(names) {
                if slot.is_some() || !is_cstr(name, want.as_bytes()) {
                    continue;
                }
                let entry = self.pc(i, text_start)?;
                let end = self.pc(i + 1, text_start)?;
                if self.text_start.is_none() && entry == 0 {
                    return Err(PclntabError::Unrelocated);
                }
                if end < entry {
                    return Err(PclntabError::Truncated("functab is not sorted"));
                }
                *slot = Some(GoFunc {
                    name: (*want).to_owned(),
                    entry,
                    end,
                });
                missing -= 1;
            }
        }
        Ok(found)
    }

    /// The `index`th functab field.
    fn field(&self, index: usize) -> Result<u64> {
        let off = index
            .checked_mul(self.field_size)
            .ok_or(PclntabError::Truncated("functab"))?;
        read_uint(self.functab, off, self.field_size, "functab")
    }

    /// Address of functab entry `i` (`i == nfunc` is the end of the last function).
    fn pc(&self, i: usize, text_start: u64) -> Result<u64> {
        let value = self.field(i.checked_mul(2).ok_or(PclntabError::Truncated("functab"))?)?;
        match self.text_start {
            Some(_) => text_start
                .checked_add(value)
                .ok_or(PclntabError::Truncated("function address overflows")),
            None => Ok(value),
        }
    }

    /// The name of function `i`: the funcnametab bytes from its `_func.nameOff`
    /// on, NUL-terminated somewhere within.
    fn name_at(&self, i: usize) -> Result<&'a [u8]> {
        let func_off = i
            .checked_mul(2)
            .and_then(|n| n.checked_add(1))
            .ok_or(PclntabError::Truncated("functab"))?;
        let func_off = usize::try_from(self.field(func_off)?)
            .map_err(|_| PclntabError::Truncated("funcoff"))?;
        // `_func` starts with the entry (field_size bytes), then `nameOff int32`.
        let name_field = func_off
            .checked_add(self.field_size)
            .ok_or(PclntabError::Truncated("funcoff"))?;
        let name_off = read_uint(self.funcdata, name_field, 4, "_func")?;
        usize::try_from(name_off)
            .ok()
            .and_then(|off| self.funcnametab.get(off..))
            .ok_or(PclntabError::Truncated("nameOff"))
    }
}

/// Whether `bytes` starts with `want` followed by a NUL.
fn is_cstr(bytes: &[u8], want: &[u8]) -> bool {
    bytes.get(..want.len()) == Some(want) && bytes.get(want.len()) == Some(&0)
}

/// Reads a little-endian unsigned integer of `size` (≤ 8) bytes at `off`.
fn read_uint(data: &[u8], off: usize, size: usize, what: &'static str) -> Result<u64> {
    off.checked_add(size)
        .and_then(|end| data.get(off..end))
        .filter(|bytes| bytes.len() <= 8)
        .map(|bytes| {
            bytes
                .iter()
                .rev()
                .fold(0, |acc, &b| acc << 8 | u64::from(b))
        })
        .ok_or(PclntabError::Truncated(what))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: u64 = 0x40_1000;

    /// Builds a pclntab in the layout of `magic` holding `funcs` as
    /// (name, offset from TEXT), in address order, the last ending at `end`.
    fn synth(magic: u32, header_text: u64, funcs: &[(&str, u32)], end: u32) -> Vec<u8> {
        let relative = magic == 0xffff_fff1 || magic == 0xffff_fff0;
        let field = |out: &mut Vec<u8>, off: u32| {
            if relative {
                out.extend_from_slice(&off.to_le_bytes());
            } else {
                out.extend_from_slice(&(TEXT + u64::from(off)).to_le_bytes());
            }
        };
        let mut names = Vec::new();
        let mut name_offs = Vec::new();
        for (name, _) in funcs {
            name_offs.push(names.len() as u32);
            names.extend_from_slice(name.as_bytes());
            names.push(0);
        }
        let fsize = if relative { 4 } else { 8 };
        let functab_len = (funcs.len() * 2 + 1) * fsize;
        let func_len = fsize + 4 * 9; // entry, nameOff and a few more fields
                                      // funcoff is relative to the pcln table; names are before or after it.
        let (header_len, names_base) = match magic {
            0xffff_fffb => (16, 16 + functab_len + 4 + funcs.len() * func_len),
            0xffff_fffa => (8 + 7 * 8, 8 + 7 * 8),
            _ => (8 + 8 * 8, 8 + 8 * 8),
        };
        let pcln_base = if magic == 0xffff_fffb {
            16
        } else {
            names_base + names.len()
        };
        let mut pcln = Vec::new();
        for (i, (_, off)) in funcs.iter().enumerate() {
            field(&mut pcln, *off);
            let funcoff = functab_len + 4 + i * func_len;
            let funcoff = if magic == 0xffff_fffb {
                funcoff + 16
            } else {
                funcoff
            };
            if relative {
                pcln.extend_from_slice(&(funcoff as u32).to_le_bytes());
            } else {
                pcln.extend_from_slice(&(funcoff as u64).to_le_bytes());
            }
        }
        field(&mut pcln, end);
        pcln.extend_from_slice(&[0; 4]); // file table offset in 1.2, padding otherwise
        for ((_, off), name_off) in funcs.iter().zip(&name_offs) {
            field(&mut pcln, *off);
            let name_off = if magic == 0xffff_fffb {
                *name_off as usize + names_base
            } else {
                *name_off as usize
            };
            pcln.extend_from_slice(&(name_off as u32).to_le_bytes());
            pcln.extend_from_slice(&[0; 4 * 8]);
        }
        let mut out = magic.to_le_bytes().to_vec();
        out.extend_from_slice(&[0, 0, 1, 8]);
        let words: Vec<u64> = match magic {
            0xffff_fffb => vec![funcs.len() as u64],
            0xffff_fffa => vec![
                funcs.len() as u64,
                0,
                names_base as u64,
                0,
                0,
                0,
                pcln_base as u64,
            ],
            _ => vec![
                funcs.len() as u64,
                0,
                header_text,
                names_base as u64,
                0,
                0,
                0,
                pcln_base as u64,
            ],
        };
        for w in words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        assert_eq!(out.len(), header_len);
        if magic == 0xffff_fffb {
            out.extend_from_slice(&pcln);
            out.extend_from_slice(&names);
        } else {
            out.extend_from_slice(&names);
            out.extend_from_slice(&pcln);
        }
        out
    }

    const FUNCS: &[(&str, u32)] = &[
        ("runtime.text", 0),
        ("runtime.stopTheWorld", 0x40),
        ("runtime.stopTheWorldWithSema", 0x80),
        ("main.main", 0x1c0),
    ];

    fn lookup(data: &[u8], fallback: u64, names: &[&str]) -> Result<Vec<Option<GoFunc>>> {
        let table = Table::parse(data)?;
        let text = match table.text_start {
            Some(0) => fallback,
            Some(t) => t,
            None => 0,
        };
        table.find(text, names)
    }

    fn func(name: &str, entry: u64, end: u64) -> Option<GoFunc> {
        Some(GoFunc {
            name: name.to_owned(),
            entry: TEXT + entry,
            end: TEXT + end,
        })
    }

    #[test]
    fn finds_functions_in_all_formats() {
        let names = [
            "main.main",
            "runtime.stopTheWorld",
            "absent",
            "runtime.stopTheWorldWith",
            "main.main",
        ];
        let want = vec![
            func("main.main", 0x1c0, 0x200),
            func("runtime.stopTheWorld", 0x40, 0x80),
            None,
            None,
            func("main.main", 0x1c0, 0x200),
        ];
        for magic in [0xffff_fffb, 0xffff_fffa, 0xffff_fff0, 0xffff_fff1] {
            let data = synth(magic, TEXT, FUNCS, 0x200);
            assert_eq!(lookup(&data, 0, &names).unwrap(), want, "magic {magic:#x}");
        }
    }

    #[test]
    fn zero_header_text_start_uses_fallback() {
        let data = synth(0xffff_fff1, 0, FUNCS, 0x200);
        let got = lookup(&data, TEXT, &["runtime.stopTheWorldWithSema"]).unwrap();
        assert_eq!(got, vec![func("runtime.stopTheWorldWithSema", 0x80, 0x1c0)]);
    }

    #[test]
    fn rejects_bad_headers() {
        let mut data = synth(0xffff_fff1, TEXT, FUNCS, 0x200);
        assert!(matches!(
            Table::parse(&data[..7]),
            Err(PclntabError::Truncated(_))
        ));
        data[7] = 3;
        assert!(matches!(
            Table::parse(&data),
            Err(PclntabError::BadHeader(_))
        ));
        data[0] = 0xfe;
        assert!(matches!(
            Table::parse(&data),
            Err(PclntabError::BadMagic(0xffff_fffe))
        ));
        assert!(matches!(Table::parse(&[]), Err(PclntabError::Truncated(_))));
        // An nfunc that would overflow the functab size computation.
        let mut data = synth(0xffff_fff1, TEXT, FUNCS, 0x200);
        data[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            Table::parse(&data),
            Err(PclntabError::Truncated(_))
        ));
    }

    #[test]
    fn unrelocated_absolute_addresses_are_an_error() {
        let mut data = synth(0xffff_fffa, TEXT, FUNCS, 0x200);
        let pcln = 8 + 7 * 8 + FUNCS.iter().map(|(n, _)| n.len() + 1).sum::<usize>();
        data[pcln..pcln + 8].fill(0);
        assert!(matches!(
            lookup(&data, 0, &["runtime.text"]),
            Err(PclntabError::Unrelocated)
        ));
    }

    #[test]
    fn truncated_or_corrupt_input_never_panics() {
        let names = ["main.main", "runtime.stopTheWorld"];
        for magic in [0xffff_fffb, 0xffff_fffa, 0xffff_fff1] {
            let data = synth(magic, TEXT, FUNCS, 0x200);
            for len in 0..data.len() {
                let _ = lookup(&data[..len], TEXT, &names);
            }
            for pos in 0..data.len() {
                for value in [0x00, 0x7f, 0x80, 0xff] {
                    let mut bad = data.clone();
                    bad[pos] = value;
                    let _ = lookup(&bad, TEXT, &names);
                }
            }
        }
    }

    #[cfg(all(target_os = "linux", target_pointer_width = "64"))]
    #[test]
    fn non_go_elf_has_no_section() {
        let data = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let elf = ElfFile64::<'_>::parse(data.as_slice()).unwrap();
        assert!(matches!(
            find_funcs(&elf, &["main.main"]),
            Err(PclntabError::NoSection)
        ));
    }

    /// Cross-checks a real Go binary named by `SW_GO_FIXTURE` against its
    /// `.symtab` when it has one.
    #[test]
    fn go_fixture_from_env() {
        let Some(path) = std::env::var_os("SW_GO_FIXTURE") else {
            return;
        };
        let data = std::fs::read(path).unwrap();
        let elf = ElfFile64::<'_>::parse(data.as_slice()).unwrap();
        let names = [
            "runtime.main",
            "main.main",
            "runtime.stopTheWorldWithSema",
            "runtime.startTheWorldWithSema",
        ];
        let found = find_funcs(&elf, &names).unwrap();
        for (name, func) in names.iter().zip(&found) {
            let func = func.as_ref().unwrap_or_else(|| panic!("{name} not found"));
            assert!(func.entry < func.end, "{func:?}");
            if let Some(sym) = elf.symbol_by_name(name) {
                assert_eq!(func.entry, sym.address(), "{name}");
                assert!(func.end >= sym.address() + sym.size(), "{name}");
            }
        }
    }
}
