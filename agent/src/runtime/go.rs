//! Go binaries: the toolchain version (from .go.buildinfo) and where to probe the runtime's
//! stop-the-world functions, with or without a symbol table.

use object::read::elf::ElfFile64;
use object::Object;

use super::elf::{bytes_at, returns, symbol, vaddr_to_offset};
use super::{gopclntab, Failure, ProbeSpec};
use stallwatch_common::names;

const START_THE_WORLD: &str = "runtime.startTheWorldWithSema";
const STOP_THE_WORLD: &str = "runtime.stopTheWorldWithSema";
const GC_TRANSITION_START: &str = "runtime.(*gcCPULimiterState).startGCTransition";
const GC_TRANSITION_END: &str = "runtime.(*gcCPULimiterState).finishGCTransition";
const BUILDINFO_MAGIC: &[u8] = b"\xff Go buildinf:";

/// The Go version string ("go1.22.5") from the .go.buildinfo section (Go ≥1.18 layout: the
/// version inline after the 32-byte header, as a varint-prefixed string).
pub fn version(elf: &ElfFile64<'_>) -> Result<String, Failure> {
    use object::ObjectSection;
    let sec = elf
        .section_by_name(".go.buildinfo")
        .ok_or(Failure::NoBuildInfo)?;
    let data = sec.data().map_err(|_| Failure::Truncated)?;
    parse_buildinfo(data)
}

fn parse_buildinfo(data: &[u8]) -> Result<String, Failure> {
    if data.get(..14) != Some(BUILDINFO_MAGIC) {
        return Err(Failure::NoBuildInfo);
    }
    let flags = *data.get(15).ok_or(Failure::Truncated)?;
    if flags & 2 == 0 {
        // Before Go 1.18 the header held pointers to the strings.
        return Err(Failure::UnsupportedVersion("before go1.18".into()));
    }
    let mut rest = data.get(32..).ok_or(Failure::Truncated)?;
    let (len, n) = uvarint(rest).ok_or(Failure::Truncated)?;
    rest = rest.get(n..).ok_or(Failure::Truncated)?;
    let s = rest.get(..len as usize).ok_or(Failure::Truncated)?;
    String::from_utf8(s.to_vec()).map_err(|_| Failure::NoBuildInfo)
}

fn uvarint(b: &[u8]) -> Option<(u64, usize)> {
    let mut x = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        x |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            return Some((x, i + 1));
        }
    }
    None
}

/// (major, minor) of "go1.22.5", "go1.23rc1" or "devel go1.24-abcdef ..." (devel builds are
/// newer than every release).
pub fn parse_version(v: &str) -> Option<(u32, u32)> {
    if let Some(rest) = v.strip_prefix("devel ") {
        return parse_version(rest.split(['-', ' ']).next()?).map(|(a, b)| (a, b.max(99)));
    }
    let rest = v.strip_prefix("go")?;
    let mut parts = rest.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor: String = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    Some((major, minor.parse().ok()?))
}

/// A function's range: .symtab if present, else the pclntab (stripped binaries).
fn function(elf: &ElfFile64<'_>, name: &str) -> Result<(u64, u64), Failure> {
    if let Some((addr, size)) = symbol(elf, name).filter(|(_, size)| *size > 0) {
        return Ok((addr, addr + size));
    }
    match gopclntab::find_funcs(elf, &[name]) {
        Ok(mut v) => match v.pop().flatten() {
            Some(f) => Ok((f.entry, f.end)),
            None => Err(Failure::NoSymbol(name.to_string())),
        },
        Err(e) => Err(Failure::Pclntab(e.to_string())),
    }
}

/// The uprobes measuring a Go binary's stop-the-world pauses, and its version.
pub fn plan(elf: &ElfFile64<'_>) -> Result<(String, Vec<ProbeSpec>), Failure> {
    let version = version(elf)?;
    let (major, minor) =
        parse_version(&version).ok_or_else(|| Failure::UnsupportedVersion(version.clone()))?;
    if (major, minor) < (1, 19) {
        return Err(Failure::UnsupportedVersion(version));
    }
    let (start, end) = function(elf, START_THE_WORLD)?;
    let code = bytes_at(elf, start, end.saturating_sub(start))?;
    let rets = returns(elf.architecture(), code, start)?;
    if rets.is_empty() {
        return Err(Failure::NoReturn(START_THE_WORLD));
    }
    let offset = |vaddr| vaddr_to_offset(elf, vaddr).ok_or(Failure::Truncated);
    let mut probes = Vec::with_capacity(rets.len() + 1);
    // ≥1.22: the pause start and reason arrive in startTheWorldWithSema's arguments.
    // 1.21: the reason is stopTheWorldWithSema's argument. ≤1.20: no reason at all; GC
    // stops are known by the GC CPU limiter calls they make.
    let (begin_prog, begin_addr) = if minor >= 22 || major > 1 {
        (names::PROG_GO_START, start)
    } else {
        let prog = if minor == 21 {
            names::PROG_GO_STOP
        } else {
            names::PROG_GO_STOP_NOREASON
        };
        (prog, function(elf, STOP_THE_WORLD)?.0)
    };
    probes.push(ProbeSpec::entry(begin_prog, offset(begin_addr)?));
    if begin_prog != names::PROG_GO_START {
        // The runtime's own GC pause timestamps pass through the GC CPU limiter.
        for (prog, name) in [
            (names::PROG_GO_GC_START, GC_TRANSITION_START),
            (names::PROG_GO_GC_END, GC_TRANSITION_END),
        ] {
            probes.push(ProbeSpec::entry(prog, offset(function(elf, name)?.0)?));
        }
    }
    for r in rets {
        probes.push(ProbeSpec::entry(names::PROG_GO_RET, offset(r)?));
    }
    Ok((version, probes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buildinfo(version: &str) -> Vec<u8> {
        let mut b = BUILDINFO_MAGIC.to_vec();
        b.extend([8, 2]);
        b.resize(32, 0);
        b.push(version.len() as u8);
        b.extend(version.as_bytes());
        b.push(0x20);
        b
    }

    #[test]
    fn buildinfo_version_is_read_and_parsed() {
        assert_eq!(parse_buildinfo(&buildinfo("go1.27.3")).unwrap(), "go1.27.3");
        assert_eq!(parse_version("go1.27.3"), Some((1, 27)));
        assert_eq!(parse_version("go1.21.13"), Some((1, 21)));
        assert_eq!(parse_version("go1.23rc1"), Some((1, 23)));
        assert_eq!(parse_version("go1.19"), Some((1, 19)));
        assert_eq!(parse_version("devel go1.28-abc123 Tue"), Some((1, 99)));
        assert_eq!(parse_version("1.22"), None);
    }

    #[test]
    fn bad_buildinfo_is_an_error_not_a_panic() {
        let good = buildinfo("go1.22.0");
        for cut in 0..good.len() - 1 {
            assert!(parse_buildinfo(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut old = good.clone();
        old[15] = 0;
        assert!(matches!(
            parse_buildinfo(&old),
            Err(Failure::UnsupportedVersion(_))
        ));
        assert!(matches!(
            parse_buildinfo(b"not go"),
            Err(Failure::NoBuildInfo)
        ));
    }
}
