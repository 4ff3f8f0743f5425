//! What the runtime probes need from an ELF file: symbols, load-segment address translation,
//! and the return instructions of a function.

use object::elf::PT_LOAD;
use object::read::elf::{ElfFile64, ProgramHeader};
use object::{Architecture, Object, ObjectSymbol};

use super::Failure;

/// The file offset holding virtual address `vaddr`, from the PT_LOAD segment that maps it.
pub fn vaddr_to_offset(elf: &ElfFile64<'_>, vaddr: u64) -> Option<u64> {
    let e = elf.endian();
    elf.elf_program_headers().iter().find_map(|ph| {
        let (va, off, filesz) = (ph.p_vaddr(e), ph.p_offset(e), ph.p_filesz(e));
        (ph.p_type(e) == PT_LOAD && vaddr >= va && vaddr - va < filesz).then(|| off + (vaddr - va))
    })
}

/// `len` bytes of the file at virtual address `vaddr`.
pub fn bytes_at<'a>(elf: &ElfFile64<'a>, vaddr: u64, len: u64) -> Result<&'a [u8], Failure> {
    let off = vaddr_to_offset(elf, vaddr).ok_or(Failure::Truncated)?;
    let data = elf.data();
    let end = off.checked_add(len).ok_or(Failure::Truncated)?;
    data.get(off as usize..end as usize)
        .ok_or(Failure::Truncated)
}

/// A defined function symbol's address and size, from .symtab or else .dynsym.
pub fn symbol(elf: &ElfFile64<'_>, name: &str) -> Option<(u64, u64)> {
    elf.symbols()
        .chain(elf.dynamic_symbols())
        .find(|s| s.is_definition() && s.name_bytes().is_ok_and(|n| n == name.as_bytes()))
        .map(|s| (s.address(), s.size()))
}

/// The first defined symbol whose name starts with `prefix` (C++ overloads).
pub fn symbol_with_prefix(elf: &ElfFile64<'_>, prefix: &str) -> Option<(u64, u64)> {
    elf.symbols()
        .chain(elf.dynamic_symbols())
        .find(|s| {
            s.is_definition()
                && s.size() > 0
                && s.name_bytes()
                    .is_ok_and(|n| n.starts_with(prefix.as_bytes()))
        })
        .map(|s| (s.address(), s.size()))
}

/// Virtual addresses of the return instructions in `code`, which starts at `vaddr`.
pub fn returns(arch: Architecture, code: &[u8], vaddr: u64) -> Result<Vec<u64>, Failure> {
    match arch {
        Architecture::X86_64 => {
            use iced_x86::{Decoder, DecoderOptions, Mnemonic};
            let mut d = Decoder::with_ip(64, code, vaddr, DecoderOptions::NONE);
            let mut rets = Vec::new();
            while d.can_decode() {
                let insn = d.decode();
                if insn.is_invalid() {
                    return Err(Failure::Disassembly(insn.ip()));
                }
                if insn.mnemonic() == Mnemonic::Ret {
                    rets.push(insn.ip());
                }
            }
            Ok(rets)
        }
        Architecture::Aarch64 => Ok(code
            .chunks_exact(4)
            .enumerate()
            .filter(|(_, w)| {
                // RET {Xn}: 1101011 0010 11111 000000 nnnnn 00000
                u32::from_le_bytes([w[0], w[1], w[2], w[3]]) & 0xffff_fc1f == 0xd65f_0000
            })
            .map(|(i, _)| vaddr + 4 * i as u64)
            .collect()),
        other => Err(Failure::Architecture(format!("{other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x86_returns_are_found_by_decoding_not_by_byte_value() {
        // mov eax, 0xc3c3c3c3 ; ret ; nop ; ret 8
        let code = [0xb8, 0xc3, 0xc3, 0xc3, 0xc3, 0xc3, 0x90, 0xc2, 0x08, 0x00];
        assert_eq!(
            returns(Architecture::X86_64, &code, 0x1000).unwrap(),
            vec![0x1005, 0x1007]
        );
    }

    #[test]
    fn arm64_returns_include_ret_through_other_registers() {
        let words: [u32; 4] = [
            0xd503201f, /* nop */
            0xd65f03c0, /* ret */
            0xd65f0220, /* ret x17 */
            0xd61f0220, /* br x17 */
        ];
        let code: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(
            returns(Architecture::Aarch64, &code, 0x400000).unwrap(),
            vec![0x400004, 0x400008]
        );
    }

    #[test]
    fn undecodable_x86_is_an_error() {
        // 0x06 (push es) is invalid in 64-bit mode.
        assert!(matches!(
            returns(Architecture::X86_64, &[0x06], 0),
            Err(Failure::Disassembly(0))
        ));
    }
}
