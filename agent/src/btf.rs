//! A small reader for the kernel's raw BTF (/sys/kernel/btf/vmlinux).
//!
//! Rust eBPF has no CO-RE, so the agent looks up struct member offsets here and passes them to
//! the programs as globals, and inspects tracepoint prototypes to pick program variants.
//! Input is untrusted: every read is bounds-checked and every type walk is depth-limited.

use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("malformed BTF: {0}")]
    Malformed(String),
    #[error("type {0:?} not found in kernel BTF")]
    TypeNotFound(String),
    #[error("{ty} has no member {member:?} in kernel BTF")]
    MemberNotFound { ty: String, member: String },
    #[error("{ty}.{member} is a bitfield or not byte aligned")]
    Bitfield { ty: String, member: String },
    #[error("{0:?} is not a pointer to a function prototype")]
    NotAFuncProto(String),
}

const MAGIC: u16 = 0xeb9f;
const MAX_DEPTH: usize = 32;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, Clone, Copy)]
struct Member {
    name_off: u32,
    ty: u32,
    /// Bit offset (and bitfield size in the top byte when the struct's kind_flag is set).
    offset: u32,
}

#[derive(Debug, Clone)]
struct Type {
    name_off: u32,
    kind: u32,
    kind_flag: bool,
    /// Referenced type id for PTR/TYPEDEF/modifiers/FUNC.
    ty: u32,
    /// STRUCT/UNION members, or FUNC_PROTO params (offset unused).
    members: Vec<Member>,
}

pub struct KernelBtf {
    /// Index 0 is `void`.
    types: Vec<Type>,
    strings: Vec<u8>,
    by_name: HashMap<String, Vec<u32>>,
}

fn malformed(msg: impl Into<String>) -> BtfError {
    BtfError::Malformed(msg.into())
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn u32(&mut self) -> Result<u32, BtfError> {
        let end = self
            .pos
            .checked_add(4)
            .ok_or_else(|| malformed("offset overflow"))?;
        let b = self
            .data
            .get(self.pos..end)
            .ok_or_else(|| malformed(format!("type section truncated at byte {}", self.pos)))?;
        self.pos = end;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn skip(&mut self, n: usize) -> Result<(), BtfError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or_else(|| malformed("offset overflow"))?;
        if end > self.data.len() {
            return Err(malformed(format!(
                "type section truncated at byte {}",
                self.pos
            )));
        }
        self.pos = end;
        Ok(())
    }
}

fn le_u32(data: &[u8], at: usize) -> Result<u32, BtfError> {
    data.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| malformed("header truncated"))
}

impl KernelBtf {
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::from_file(Path::new("/sys/kernel/btf/vmlinux"))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let magic = data
            .get(0..2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or_else(|| malformed("shorter than its header"))?;
        if magic != MAGIC {
            return Err(malformed(format!(
                "bad magic {magic:#06x} (big-endian BTF is not supported)"
            )));
        }
        let hdr_len = le_u32(data, 4)? as usize;
        let (type_off, type_len) = (le_u32(data, 8)? as usize, le_u32(data, 12)? as usize);
        let (str_off, str_len) = (le_u32(data, 16)? as usize, le_u32(data, 20)? as usize);
        let section = |off: usize, len: usize, what: &str| {
            hdr_len
                .checked_add(off)
                .and_then(|s| Some((s, s.checked_add(len)?)))
                .and_then(|(s, e)| data.get(s..e))
                .ok_or_else(|| malformed(format!("{what} section out of bounds")))
        };
        let type_data = section(type_off, type_len, "type")?;
        let strings = section(str_off, str_len, "string")?.to_vec();

        let mut types = vec![Type {
            name_off: 0,
            kind: 0,
            kind_flag: false,
            ty: 0,
            members: Vec::new(),
        }];
        let mut r = Reader {
            data: type_data,
            pos: 0,
        };
        while r.pos < type_data.len() {
            let name_off = r.u32()?;
            let info = r.u32()?;
            let size_or_type = r.u32()?;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => r.skip(4)?,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => {}
                KIND_ARRAY => r.skip(12)?,
                KIND_STRUCT | KIND_UNION => {
                    for _ in 0..vlen {
                        members.push(Member {
                            name_off: r.u32()?,
                            ty: r.u32()?,
                            offset: r.u32()?,
                        });
                    }
                }
                KIND_ENUM => r.skip(vlen * 8)?,
                KIND_FUNC_PROTO => {
                    for _ in 0..vlen {
                        members.push(Member {
                            name_off: r.u32()?,
                            ty: r.u32()?,
                            offset: 0,
                        });
                    }
                }
                KIND_DATASEC | KIND_ENUM64 => r.skip(vlen * 12)?,
                k => {
                    return Err(malformed(format!(
                        "unknown type kind {k} (type {})",
                        types.len()
                    )))
                }
            }
            types.push(Type {
                name_off,
                kind,
                kind_flag,
                ty: size_or_type,
                members,
            });
        }
        let mut btf = KernelBtf {
            types,
            strings,
            by_name: HashMap::new(),
        };
        let mut by_name: HashMap<String, Vec<u32>> = HashMap::new();
        for (id, t) in btf.types.iter().enumerate().skip(1) {
            if t.name_off != 0 {
                if let Some(name) = btf.str_at(t.name_off) {
                    by_name.entry(name.to_string()).or_default().push(id as u32);
                }
            }
        }
        btf.by_name = by_name;
        Ok(btf)
    }

    fn str_at(&self, off: u32) -> Option<&str> {
        let rest = self.strings.get(off as usize..)?;
        let end = rest.iter().position(|&b| b == 0)?;
        std::str::from_utf8(&rest[..end]).ok()
    }

    fn ty(&self, id: u32) -> Result<&Type, BtfError> {
        self.types
            .get(id as usize)
            .ok_or_else(|| malformed(format!("reference to missing type {id}")))
    }

    fn find(&self, name: &str, pred: impl Fn(&Type) -> bool) -> Result<u32, BtfError> {
        self.by_name
            .get(name)
            .and_then(|ids| ids.iter().copied().find(|&id| self.ty(id).is_ok_and(&pred)))
            .ok_or_else(|| BtfError::TypeNotFound(name.to_string()))
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn skip_mods(&self, mut id: u32) -> Result<u32, BtfError> {
        for _ in 0..MAX_DEPTH {
            let t = self.ty(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.ty
                }
                _ => return Ok(id),
            }
        }
        Err(malformed(format!(
            "type chain from {id} too deep or cyclic"
        )))
    }

    /// Bit offset of `member` in struct/union `id`, through anonymous members.
    fn find_member(
        &self,
        id: u32,
        member: &str,
        depth: usize,
    ) -> Result<Option<(u32, bool)>, BtfError> {
        if depth > MAX_DEPTH {
            return Err(malformed("anonymous member nesting too deep or cyclic"));
        }
        let t = self.ty(id)?;
        for m in &t.members {
            let (bit_off, bitfield) = if t.kind_flag {
                (m.offset & 0x00ff_ffff, m.offset >> 24 != 0)
            } else {
                (m.offset, false)
            };
            if m.name_off == 0 {
                let inner = self.skip_mods(m.ty)?;
                if matches!(self.ty(inner)?.kind, KIND_STRUCT | KIND_UNION) {
                    if let Some((off, bf)) = self.find_member(inner, member, depth + 1)? {
                        return Ok(Some((bit_off + off, bf)));
                    }
                }
            } else if self.str_at(m.name_off) == Some(member) {
                return Ok(Some((bit_off, bitfield)));
            }
        }
        Ok(None)
    }

    /// Byte offset of `member` in `struct struct_name`, searching anonymous structs/unions.
    pub fn member_offset(&self, struct_name: &str, member: &str) -> Result<u32, BtfError> {
        let id = self.find(struct_name, |t| {
            matches!(t.kind, KIND_STRUCT | KIND_UNION) && !t.members.is_empty()
        })?;
        match self.find_member(id, member, 0)? {
            Some((bits, false)) if bits % 8 == 0 => Ok(bits / 8),
            Some(_) => Err(BtfError::Bitfield {
                ty: struct_name.to_string(),
                member: member.to_string(),
            }),
            None => Err(BtfError::MemberNotFound {
                ty: struct_name.to_string(),
                member: member.to_string(),
            }),
        }
    }

    pub fn has_member(&self, struct_name: &str, member: &str) -> bool {
        self.member_offset(struct_name, member).is_ok()
    }

    /// Parameter count of the function prototype behind a typedef such as
    /// `btf_trace_sched_switch` (typedef -> ptr -> func_proto). For `btf_trace_*` the first
    /// parameter is the `void *` context.
    pub fn func_proto_param_count(&self, typedef_name: &str) -> Result<usize, BtfError> {
        let id = self.find(typedef_name, |t| t.kind == KIND_TYPEDEF)?;
        let ptr = self.skip_mods(self.ty(id)?.ty)?;
        let p = self.ty(ptr)?;
        if p.kind != KIND_PTR {
            return Err(BtfError::NotAFuncProto(typedef_name.to_string()));
        }
        let proto = self.skip_mods(p.ty)?;
        let f = self.ty(proto)?;
        if f.kind != KIND_FUNC_PROTO {
            return Err(BtfError::NotAFuncProto(typedef_name.to_string()));
        }
        Ok(f.members.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds raw BTF blobs for tests.
    #[derive(Default)]
    struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
    }

    impl Builder {
        fn new() -> Self {
            Builder {
                types: vec![],
                strings: vec![0],
            }
        }
        fn s(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            off
        }
        fn raw(&mut self, name: &str, kind: u32, vlen: u32, kflag: bool, x: u32, extra: &[u32]) {
            let n = self.s(name);
            let info = (kflag as u32) << 31 | kind << 24 | vlen;
            for v in [n, info, x].iter().chain(extra) {
                self.types.extend_from_slice(&v.to_le_bytes());
            }
        }
        fn int(&mut self, name: &str) {
            self.raw(name, KIND_INT, 0, false, 4, &[32]);
        }
        /// members: (name, type id, bit offset, bitfield size)
        fn strukt(&mut self, name: &str, kind: u32, members: &[(&str, u32, u32, u32)]) {
            let kflag = members.iter().any(|m| m.3 != 0);
            let mut extra = vec![];
            for (n, ty, off, bf) in members {
                extra.push(self.s(n));
                extra.push(*ty);
                extra.push(if kflag { bf << 24 | off } else { *off });
            }
            self.raw(name, kind, members.len() as u32, kflag, 64, &extra);
        }
        fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&MAGIC.to_le_bytes());
            out.extend_from_slice(&[1, 0]);
            for v in [
                24u32,
                0,
                self.types.len() as u32,
                self.types.len() as u32,
                self.strings.len() as u32,
            ] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// 1 int, 2 anon struct {int pid; int tgid}, 3 anon union {anon struct}, 4 struct task
    /// {int state; union; bitfield}, 5 func_proto(void*, task*), 6 ptr->5, 7 typedef->6,
    /// 8 ptr -> 4, 9 typedef cycle a->10, 10 typedef b->9.
    fn sample() -> Vec<u8> {
        let mut b = Builder::new();
        b.int("int");
        b.strukt("", KIND_STRUCT, &[("pid", 1, 0, 0), ("tgid", 1, 32, 0)]);
        b.strukt("", KIND_UNION, &[("", 2, 0, 0)]);
        b.strukt(
            "task",
            KIND_STRUCT,
            &[("state", 1, 0, 0), ("", 3, 64, 0), ("flags", 1, 128, 3)],
        );
        let (p0, p1) = (b.s("ctx"), b.s("p"));
        b.raw("", KIND_FUNC_PROTO, 2, false, 0, &[p0, 0, p1, 8]);
        b.raw("", KIND_PTR, 0, false, 5, &[]);
        b.raw("btf_trace_x", KIND_TYPEDEF, 0, false, 6, &[]);
        b.raw("", KIND_PTR, 0, false, 4, &[]);
        b.raw("cyc_a", KIND_TYPEDEF, 0, false, 10, &[]);
        b.raw("cyc_b", KIND_TYPEDEF, 0, false, 9, &[]);
        b.build()
    }

    #[test]
    fn offsets_through_anonymous_members() {
        let btf = KernelBtf::parse(&sample()).unwrap();
        assert_eq!(btf.member_offset("task", "state").unwrap(), 0);
        assert_eq!(btf.member_offset("task", "pid").unwrap(), 8);
        assert_eq!(btf.member_offset("task", "tgid").unwrap(), 12);
        assert!(btf.has_member("task", "tgid"));
        assert!(matches!(
            btf.member_offset("task", "flags"),
            Err(BtfError::Bitfield { .. })
        ));
        let e = btf.member_offset("task", "nope").unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        assert!(matches!(
            btf.member_offset("nothing", "x"),
            Err(BtfError::TypeNotFound(_))
        ));
    }

    #[test]
    fn func_proto_through_typedef_and_pointer() {
        let btf = KernelBtf::parse(&sample()).unwrap();
        assert_eq!(btf.func_proto_param_count("btf_trace_x").unwrap(), 2);
        assert!(btf.func_proto_param_count("cyc_a").is_err());
        assert!(btf.func_proto_param_count("missing").is_err());
    }

    #[test]
    fn garbage_and_truncation_are_errors_not_panics() {
        let good = sample();
        for len in 0..good.len() {
            let _ = KernelBtf::parse(&good[..len]);
        }
        // Deterministic mutations of every byte.
        for i in 0..good.len() {
            for x in [0x01u8, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[i] ^= x;
                if let Ok(btf) = KernelBtf::parse(&bad) {
                    let _ = btf.member_offset("task", "tgid");
                    let _ = btf.func_proto_param_count("btf_trace_x");
                }
            }
        }
        assert!(KernelBtf::parse(b"\x9f\xeb").is_err());
    }

    #[test]
    fn running_kernel() {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        if !path.exists() {
            eprintln!("SKIP: {} absent", path.display());
            return;
        }
        let btf = KernelBtf::from_sys_fs().unwrap();
        let pid = btf.member_offset("task_struct", "pid").unwrap();
        assert_eq!(btf.member_offset("task_struct", "tgid").unwrap(), pid + 4);
        assert!(btf.has_member("task_struct", "__state") || btf.has_member("task_struct", "state"));
        let switch = btf
            .func_proto_param_count("btf_trace_sched_switch")
            .unwrap();
        assert!(
            switch == 4 || switch == 5,
            "sched_switch has {switch} params"
        );
    }
}
