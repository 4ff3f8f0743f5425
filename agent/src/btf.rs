//! A small, dependency-free reader for the kernel's raw BTF (/sys/kernel/btf/vmlinux).
//!
//! aya's eBPF Rust has no CO-RE, so the agent looks struct member offsets up here and passes
//! them to the kernel programs as globals, and inspects tracepoint prototypes to pick program
//! variants. The input is treated as untrusted (this is a fuzz target): every read is
//! bounds-checked, and every walk over type references is depth-limited so that cycles end in
//! an error instead of a hang or a stack overflow.
//!
//! Only little-endian, non-split BTF is supported (vmlinux on the hosts we run on).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading BTF from {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("malformed BTF: {0}")]
    Malformed(String),
    #[error("no {kind} named {name:?} in kernel BTF")]
    TypeNotFound { kind: &'static str, name: String },
    #[error("{ty} has no member {member:?} in kernel BTF (anonymous structs/unions searched too)")]
    MemberNotFound { ty: String, member: String },
    #[error("{ty}.{member} is a bitfield, so it has no byte offset")]
    Bitfield { ty: String, member: String },
    #[error("{ty}.{member} is at bit offset {bit_offset}, which is not byte aligned")]
    Unaligned {
        ty: String,
        member: String,
        bit_offset: u64,
    },
    #[error("typedef {name:?} is not a function pointer type (it resolves to {found})")]
    NotAFuncProto { name: String, found: String },
}

const MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;
/// Longest typedef/modifier chain and deepest anonymous-member nesting we follow. Real
/// kernels need a handful; anything longer is a cycle or hostile input.
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

fn kind_name(kind: u32) -> &'static str {
    match kind {
        0 => "void",
        KIND_INT => "int",
        KIND_PTR => "pointer",
        KIND_ARRAY => "array",
        KIND_STRUCT => "struct",
        KIND_UNION => "union",
        KIND_ENUM => "enum",
        KIND_FWD => "forward declaration",
        KIND_TYPEDEF => "typedef",
        KIND_VOLATILE => "volatile",
        KIND_CONST => "const",
        KIND_RESTRICT => "restrict",
        KIND_FUNC => "function",
        KIND_FUNC_PROTO => "function prototype",
        KIND_VAR => "variable",
        KIND_DATASEC => "data section",
        KIND_FLOAT => "float",
        KIND_DECL_TAG => "decl tag",
        KIND_TYPE_TAG => "type tag",
        KIND_ENUM64 => "enum64",
        _ => "unknown kind",
    }
}

/// A STRUCT/UNION member or a FUNC_PROTO parameter (`offset` is 0 for parameters).
#[derive(Debug, Clone, Copy)]
struct Member {
    name_off: u32,
    ty: u32,
    /// Bit offset; with the struct's kind_flag set, bitfield size in the top byte.
    offset: u32,
}

#[derive(Debug, Clone, Copy)]
struct Type {
    name_off: u32,
    info: u32,
    /// Size for INT/STRUCT/UNION/..., referenced type id for PTR/TYPEDEF/modifiers/FUNC.
    size_or_type: u32,
    /// INT encoding word (bit size, bit offset); 0 for other kinds.
    int_encoding: u32,
    /// Index of the first entry in `KernelBtf::members` (STRUCT/UNION/FUNC_PROTO only).
    first_member: usize,
}

impl Type {
    fn kind(&self) -> u32 {
        (self.info >> 24) & 0x1f
    }
    fn vlen(&self) -> usize {
        (self.info & 0xffff) as usize
    }
    fn kind_flag(&self) -> bool {
        self.info >> 31 == 1
    }
    fn is_composite(&self) -> bool {
        matches!(self.kind(), KIND_STRUCT | KIND_UNION)
    }
}

/// Parsed kernel BTF: all types plus the string section, with a name index.
pub struct KernelBtf {
    /// Indexed by type id; index 0 is `void`.
    types: Vec<Type>,
    /// Members and parameters of all types, flattened to keep parsing allocation-light.
    members: Vec<Member>,
    strings: Vec<u8>,
    /// Name -> lowest type id with that name; further ids chain through `next_same_name`.
    by_name: HashMap<Box<str>, u32>,
    /// Next (higher) type id with the same name, 0 at the end of the chain.
    next_same_name: Vec<u32>,
}

/// A summary; the full type table is too large to be useful in logs.
impl std::fmt::Debug for KernelBtf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelBtf")
            .field("types", &(self.types.len() - 1))
            .field("string_bytes", &self.strings.len())
            .finish_non_exhaustive()
    }
}

fn malformed(msg: impl Into<String>) -> BtfError {
    BtfError::Malformed(msg.into())
}

fn read_u32(data: &[u8], at: usize) -> Option<u32> {
    let b = data.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Sequential bounds-checked reader over the type section.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn u32(&mut self) -> Result<u32, BtfError> {
        let v = read_u32(self.data, self.pos).ok_or_else(|| self.truncated())?;
        self.pos += 4;
        Ok(v)
    }

    fn skip(&mut self, n: usize) -> Result<(), BtfError> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.data.len() => {
                self.pos = end;
                Ok(())
            }
            _ => Err(self.truncated()),
        }
    }

    fn truncated(&self) -> BtfError {
        malformed(format!(
            "type section truncated at byte {} of {}",
            self.pos,
            self.data.len()
        ))
    }
}

/// What an anonymous-member search found.
#[derive(Debug, Clone, Copy)]
struct Hit {
    bit_offset: u64,
    member_ty: u32,
    /// Bitfield size from a kind_flag struct (0 when not a bitfield there).
    kflag_bitfield_size: u32,
}

/// State of one member search: the current path (for cycle detection) and the types already
/// searched in vain (so shared anonymous types are not walked exponentially often).
struct Search<'a> {
    member: &'a str,
    path: Vec<u32>,
    exhausted: HashSet<u32>,
}

impl KernelBtf {
    /// Reads /sys/kernel/btf/vmlinux.
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::from_file(Path::new("/sys/kernel/btf/vmlinux"))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        if data.len() < HEADER_LEN {
            return Err(malformed(format!(
                "{} bytes is shorter than the {HEADER_LEN}-byte BTF header",
                data.len()
            )));
        }
        let magic = u16::from_le_bytes([data[0], data[1]]);
        if magic == MAGIC.swap_bytes() {
            return Err(malformed(
                "byte-swapped magic: BTF of the other endianness is not supported",
            ));
        }
        if magic != MAGIC {
            return Err(malformed(format!(
                "bad magic {magic:#06x}, expected {MAGIC:#06x}"
            )));
        }
        if data[2] != 1 {
            return Err(malformed(format!("unsupported BTF version {}", data[2])));
        }
        let field = |at: usize| read_u32(data, at).ok_or_else(|| malformed("header truncated"));
        let hdr_len = field(4)? as usize;
        if hdr_len < HEADER_LEN || hdr_len > data.len() {
            return Err(malformed(format!(
                "header length {hdr_len} out of range ({HEADER_LEN}..={})",
                data.len()
            )));
        }
        // Section offsets are relative to the end of the header, which may be longer than the
        // fields we know about.
        let section = |off_at: usize, what: &str| -> Result<&[u8], BtfError> {
            let (off, len) = (field(off_at)? as usize, field(off_at + 4)? as usize);
            hdr_len
                .checked_add(off)
                .and_then(|start| Some(start..start.checked_add(len)?))
                .and_then(|range| data.get(range))
                .ok_or_else(|| {
                    malformed(format!(
                        "{what} section (offset {off}, length {len}) runs past the end of {} bytes",
                        data.len()
                    ))
                })
        };
        let type_data = section(8, "type")?;
        let strings = section(16, "string")?;
        // Name lookups rely on every string being NUL-terminated inside the section.
        if strings.last().is_some_and(|&b| b != 0) {
            return Err(malformed("string section is not NUL-terminated"));
        }

        let mut types = Vec::with_capacity(type_data.len() / 16 + 1);
        types.push(Type {
            name_off: 0,
            info: 0,
            size_or_type: 0,
            int_encoding: 0,
            first_member: 0,
        });
        let mut members = Vec::new();
        let mut r = Reader {
            data: type_data,
            pos: 0,
        };
        // Each iteration consumes at least 12 bytes, so this ends.
        while r.pos < type_data.len() {
            let id = types.len();
            let name_off = r.u32()?;
            let info = r.u32()?;
            let size_or_type = r.u32()?;
            if name_off as usize >= strings.len().max(1) {
                return Err(malformed(format!(
                    "type {id}: name offset {name_off} outside the {}-byte string section",
                    strings.len()
                )));
            }
            let mut t = Type {
                name_off,
                info,
                size_or_type,
                int_encoding: 0,
                first_member: members.len(),
            };
            let vlen = t.vlen();
            match t.kind() {
                KIND_INT => t.int_encoding = r.u32()?,
                KIND_VAR | KIND_DECL_TAG => r.skip(4)?,
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
                KIND_FUNC_PROTO => {
                    for _ in 0..vlen {
                        members.push(Member {
                            name_off: r.u32()?,
                            ty: r.u32()?,
                            offset: 0,
                        });
                    }
                }
                KIND_ENUM => r.skip(vlen * 8)?,
                KIND_DATASEC | KIND_ENUM64 => r.skip(vlen * 12)?,
                k => {
                    return Err(malformed(format!(
                        "type {id}: unknown kind {k} at byte {} of the type section",
                        r.pos - 12
                    )))
                }
            }
            types.push(t);
        }

        let mut btf = KernelBtf {
            next_same_name: vec![0; types.len()],
            types,
            members,
            strings: strings.to_vec(),
            by_name: HashMap::new(),
        };
        // Walk ids downwards so each chain ends up in ascending id order (section order).
        let mut by_name: HashMap<Box<str>, u32> = HashMap::new();
        for id in (1..btf.types.len()).rev() {
            let name_off = btf.types[id].name_off;
            let Some(name) = btf.str_at(name_off).filter(|n| !n.is_empty()) else {
                continue;
            };
            let id = id as u32;
            if let Some(head) = by_name.get_mut(name) {
                btf.next_same_name[id as usize] = *head;
                *head = id;
            } else {
                by_name.insert(name.into(), id);
            }
        }
        btf.by_name = by_name;
        Ok(btf)
    }

    /// Byte offset of `member` inside `struct struct_name`, searching recursively into
    /// anonymous struct/union members (task_struct hides fields in anonymous structs when
    /// randomized layout is on), adding their offsets. Errors if the member is a bitfield or
    /// is not byte aligned.
    pub fn member_offset(&self, struct_name: &str, member: &str) -> Result<u32, BtfError> {
        let id = self.find_composite(struct_name)?;
        let Some(hit) = self.search_member(id, member)? else {
            return Err(BtfError::MemberNotFound {
                ty: struct_name.to_string(),
                member: member.to_string(),
            });
        };
        if hit.kflag_bitfield_size != 0 || self.is_int_bitfield(hit.member_ty)? {
            return Err(BtfError::Bitfield {
                ty: struct_name.to_string(),
                member: member.to_string(),
            });
        }
        if hit.bit_offset % 8 != 0 {
            return Err(BtfError::Unaligned {
                ty: struct_name.to_string(),
                member: member.to_string(),
                bit_offset: hit.bit_offset,
            });
        }
        u32::try_from(hit.bit_offset / 8).map_err(|_| {
            malformed(format!(
                "{struct_name}.{member}: offset {} bytes does not fit in u32",
                hit.bit_offset / 8
            ))
        })
    }

    /// Number of parameters of the function prototype behind a typedef such as
    /// "btf_trace_sched_switch" (typedef -> PTR -> FUNC_PROTO, through typedef/const/volatile/
    /// restrict modifiers; a typedef of a bare function type is accepted too). For
    /// btf_trace_* typedefs the first parameter is the `void *` context; this is the raw count
    /// (a trailing `...` would count as one).
    pub fn func_proto_param_count(&self, typedef_name: &str) -> Result<usize, BtfError> {
        let id = self
            .ids_named(typedef_name)
            .find(|&id| self.ty(id).is_ok_and(|t| t.kind() == KIND_TYPEDEF))
            .ok_or_else(|| BtfError::TypeNotFound {
                kind: "typedef",
                name: typedef_name.to_string(),
            })?;
        let target = self.skip_mods(self.ty(id)?.size_or_type)?;
        let t = self.ty(target)?;
        let proto = match t.kind() {
            KIND_PTR => self.ty(self.skip_mods(t.size_or_type)?)?,
            KIND_FUNC_PROTO => t,
            k => {
                return Err(BtfError::NotAFuncProto {
                    name: typedef_name.to_string(),
                    found: kind_name(k).to_string(),
                })
            }
        };
        if proto.kind() != KIND_FUNC_PROTO {
            return Err(BtfError::NotAFuncProto {
                name: typedef_name.to_string(),
                found: format!("pointer to {}", kind_name(proto.kind())),
            });
        }
        Ok(proto.vlen())
    }

    /// Whether a struct has a member (recursively through anonymous members), for version
    /// probing like task_struct.__state vs task_struct.state. Bitfields count as present;
    /// a missing struct or malformed BTF counts as absent.
    pub fn has_member(&self, struct_name: &str, member: &str) -> bool {
        self.find_composite(struct_name)
            .and_then(|id| self.search_member(id, member))
            .is_ok_and(|hit| hit.is_some())
    }

    fn str_at(&self, off: u32) -> Option<&str> {
        let rest = self.strings.get(off as usize..)?;
        let end = rest.iter().position(|&b| b == 0)?;
        std::str::from_utf8(&rest[..end]).ok()
    }

    fn ty(&self, id: u32) -> Result<&Type, BtfError> {
        self.types.get(id as usize).ok_or_else(|| {
            malformed(format!(
                "reference to type id {id}, but there are only {} types",
                self.types.len()
            ))
        })
    }

    fn members_of(&self, t: &Type) -> &[Member] {
        // Ranges were recorded while parsing, so they are in bounds; stay defensive anyway.
        t.first_member
            .checked_add(t.vlen())
            .and_then(|end| self.members.get(t.first_member..end))
            .unwrap_or(&[])
    }

    /// All type ids with this name, in section order.
    fn ids_named<'a>(&'a self, name: &str) -> impl Iterator<Item = u32> + 'a {
        let mut next = self.by_name.get(name).copied().unwrap_or(0);
        // Chains strictly ascend and end in 0, so this terminates.
        std::iter::from_fn(move || {
            let id = next;
            if id == 0 {
                return None;
            }
            next = self.next_same_name.get(id as usize).copied().unwrap_or(0);
            Some(id)
        })
    }

    /// The struct (preferred) or union of that name that has members, skipping forward
    /// declarations and empty definitions.
    fn find_composite(&self, name: &str) -> Result<u32, BtfError> {
        let with_members = |kind: u32| {
            self.ids_named(name)
                .find(|&id| self.ty(id).is_ok_and(|t| t.kind() == kind && t.vlen() > 0))
        };
        with_members(KIND_STRUCT)
            .or_else(|| with_members(KIND_UNION))
            .ok_or_else(|| BtfError::TypeNotFound {
                kind: "struct or union with members",
                name: name.to_string(),
            })
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn skip_mods(&self, start: u32) -> Result<u32, BtfError> {
        let mut id = start;
        for _ in 0..MAX_DEPTH {
            let t = self.ty(id)?;
            match t.kind() {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Ok(id),
            }
        }
        Err(malformed(format!(
            "typedef/modifier chain from type {start} is longer than {MAX_DEPTH} (cycle?)"
        )))
    }

    /// Old-style (kind_flag clear) BTF marks bitfields by an INT member type narrower than
    /// its storage or shifted within it.
    fn is_int_bitfield(&self, ty: u32) -> Result<bool, BtfError> {
        let t = self.ty(self.skip_mods(ty)?)?;
        if t.kind() != KIND_INT {
            return Ok(false);
        }
        let bits = u64::from(t.int_encoding & 0xff);
        let shift = (t.int_encoding >> 16) & 0xff;
        Ok(shift != 0 || bits != u64::from(t.size_or_type) * 8)
    }

    fn search_member(&self, id: u32, member: &str) -> Result<Option<Hit>, BtfError> {
        let mut s = Search {
            member,
            path: Vec::new(),
            exhausted: HashSet::new(),
        };
        self.search_in(id, &mut s)
    }

    fn search_in(&self, id: u32, s: &mut Search) -> Result<Option<Hit>, BtfError> {
        if s.path.contains(&id) {
            return Err(malformed(format!(
                "type {id} contains itself through anonymous members"
            )));
        }
        if s.path.len() >= MAX_DEPTH {
            return Err(malformed(format!(
                "anonymous members nested deeper than {MAX_DEPTH} at type {id}"
            )));
        }
        if s.exhausted.contains(&id) {
            return Ok(None);
        }
        s.path.push(id);
        let found = self.scan_members(id, s);
        s.path.pop();
        if let Ok(None) = found {
            s.exhausted.insert(id);
        }
        found
    }

    fn scan_members(&self, id: u32, s: &mut Search) -> Result<Option<Hit>, BtfError> {
        let t = self.ty(id)?;
        let kind_flag = t.kind_flag();
        for m in self.members_of(t) {
            let (bit_offset, bitfield_size) = if kind_flag {
                (m.offset & 0x00ff_ffff, m.offset >> 24)
            } else {
                (m.offset, 0)
            };
            if m.name_off == 0 {
                let inner = self.skip_mods(m.ty)?;
                if !self.ty(inner)?.is_composite() {
                    continue;
                }
                if let Some(hit) = self.search_in(inner, s)? {
                    // Depth is bounded, so these u64 sums cannot overflow.
                    return Ok(Some(Hit {
                        bit_offset: u64::from(bit_offset) + hit.bit_offset,
                        ..hit
                    }));
                }
            } else if self.str_at(m.name_off) == Some(s.member) {
                return Ok(Some(Hit {
                    bit_offset: u64::from(bit_offset),
                    member_ty: m.ty,
                    kflag_bitfield_size: bitfield_size,
                }));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds raw little-endian BTF blobs; each add returns the new type's id.
    struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
        next_id: u32,
    }

    impl Builder {
        fn new() -> Self {
            Builder {
                types: vec![],
                strings: vec![0],
                next_id: 1,
            }
        }

        fn name(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            off
        }

        fn raw(
            &mut self,
            name: &str,
            kind: u32,
            vlen: usize,
            kflag: bool,
            x: u32,
            extra: &[u32],
        ) -> u32 {
            let n = self.name(name);
            let info = (kflag as u32) << 31 | kind << 24 | vlen as u32;
            for v in [n, info, x].iter().chain(extra) {
                self.types.extend_from_slice(&v.to_le_bytes());
            }
            self.next_id += 1;
            self.next_id - 1
        }

        fn int(&mut self, name: &str, size: u32, bits: u32) -> u32 {
            self.raw(name, KIND_INT, 0, false, size, &[bits])
        }

        fn ptr(&mut self, to: u32) -> u32 {
            self.raw("", KIND_PTR, 0, false, to, &[])
        }

        fn modifier(&mut self, name: &str, kind: u32, to: u32) -> u32 {
            self.raw(name, kind, 0, false, to, &[])
        }

        fn fwd(&mut self, name: &str) -> u32 {
            self.raw(name, KIND_FWD, 0, false, 0, &[])
        }

        /// members: (name, type, raw offset word).
        fn composite(
            &mut self,
            name: &str,
            kind: u32,
            kflag: bool,
            members: &[(&str, u32, u32)],
        ) -> u32 {
            let mut extra = vec![];
            for &(n, ty, off) in members {
                extra.extend([self.name(n), ty, off]);
            }
            self.raw(name, kind, members.len(), kflag, 64, &extra)
        }

        fn strukt(&mut self, name: &str, members: &[(&str, u32, u32)]) -> u32 {
            self.composite(name, KIND_STRUCT, false, members)
        }

        fn proto(&mut self, params: &[(&str, u32)]) -> u32 {
            let mut extra = vec![];
            for &(n, ty) in params {
                extra.extend([self.name(n), ty]);
            }
            self.raw("", KIND_FUNC_PROTO, params.len(), false, 0, &extra)
        }

        fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&MAGIC.to_le_bytes());
            out.extend_from_slice(&[1, 0]);
            let (tl, sl) = (self.types.len() as u32, self.strings.len() as u32);
            for v in [HEADER_LEN as u32, 0, tl, tl, sl] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// A miniature kernel:
    /// ```c
    /// struct task;                       // FWD first, must be skipped
    /// struct task {
    ///     long state;                    // byte 0
    ///     const struct {                 // byte 16, anonymous
    ///         long pad;                  //   +0
    ///         union {                    //   +8, anonymous
    ///             struct { int pid; int tgid; };  // +0, anonymous: pid 24, tgid 28
    ///             long both;
    ///         };
    ///     };
    /// };
    /// struct kbits { int a; int b:3; int c:5; };   // kind_flag bitfields
    /// struct obits { int a; int3 c; };             // old-style INT bitfield
    /// struct odd { char x; int y /* at bit 4 */; };
    /// struct loop { struct loop; };                // anonymous self-containment
    /// typedef void (*const btf_trace_t)(void *, struct task *, struct task *);
    /// typedef btf_trace_t alias_t;
    /// typedef int not_fn; typedef int *ptr_int;
    /// typedef cyc_b cyc_a; typedef cyc_a cyc_b;
    /// ```
    fn sample() -> Vec<u8> {
        let mut b = Builder::new();
        let int = b.int("int", 4, 32);
        let long = b.int("long", 8, 64);
        let char_ = b.int("char", 1, 8);
        let int3 = b.int("int3", 4, 3);
        b.fwd("task");
        let s_ids = b.strukt("", &[("pid", int, 0), ("tgid", int, 32)]);
        let u = b.composite("", KIND_UNION, false, &[("", s_ids, 0), ("both", long, 0)]);
        let a = b.strukt("", &[("pad", long, 0), ("", u, 64)]);
        let const_a = b.modifier("", KIND_CONST, a);
        let task = b.strukt("task", &[("state", long, 0), ("", const_a, 128)]);
        b.composite(
            "kbits",
            KIND_STRUCT,
            true,
            &[
                ("a", int, 0),
                ("b", int, 3 << 24 | 32),
                ("c", int, 5 << 24 | 35),
            ],
        );
        b.strukt("obits", &[("a", int, 0), ("c", int3, 32)]);
        b.strukt("odd", &[("x", char_, 0), ("y", int, 4)]);
        let lp = b.next_id;
        b.strukt("loop", &[("", lp, 0)]);
        let task_ptr = b.ptr(task);
        let void_ptr = b.ptr(0);
        let proto = b.proto(&[("", void_ptr), ("prev", task_ptr), ("next", task_ptr)]);
        let fptr = b.ptr(proto);
        let cfptr = b.modifier("", KIND_CONST, fptr);
        let tt = b.modifier("btf_trace_t", KIND_TYPEDEF, cfptr);
        b.modifier("alias_t", KIND_TYPEDEF, tt);
        b.modifier("not_fn", KIND_TYPEDEF, int);
        let int_ptr = b.ptr(int);
        b.modifier("ptr_int", KIND_TYPEDEF, int_ptr);
        let cyc = b.next_id;
        b.modifier("cyc_a", KIND_TYPEDEF, cyc + 1);
        b.modifier("cyc_b", KIND_TYPEDEF, cyc);
        b.build()
    }

    /// Every public query, to exercise whatever a mutated blob parsed into.
    fn query_all(btf: &KernelBtf) {
        for (s, m) in [
            ("task", "pid"),
            ("task", "tgid"),
            ("kbits", "b"),
            ("loop", "x"),
        ] {
            let _ = btf.member_offset(s, m);
            let _ = btf.has_member(s, m);
        }
        for t in ["btf_trace_t", "alias_t", "cyc_a", "not_fn"] {
            let _ = btf.func_proto_param_count(t);
        }
    }

    #[test]
    fn sched_probe_names_the_field_and_config_a_kernel_lacks() {
        let btf = KernelBtf::parse(&sample()).unwrap();
        let e = crate::loader::SchedOffsets::find(&btf).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("sched_entity.cfs_rq"), "{msg}");
        assert!(msg.contains("CONFIG_FAIR_GROUP_SCHED"), "{msg}");
        assert!(msg.contains("leave `sched` out of --probes"), "{msg}");
    }

    #[test]
    fn plain_and_anonymous_members() {
        let btf = KernelBtf::parse(&sample()).unwrap();
        assert_eq!(btf.member_offset("task", "state").unwrap(), 0);
        assert_eq!(btf.member_offset("task", "pad").unwrap(), 16);
        // 16 (const anon struct) + 8 (anon union) + 0/4 (anon struct).
        assert_eq!(btf.member_offset("task", "pid").unwrap(), 24);
        assert_eq!(btf.member_offset("task", "tgid").unwrap(), 28);
        assert_eq!(btf.member_offset("task", "both").unwrap(), 24);
        assert_eq!(btf.member_offset("kbits", "a").unwrap(), 0);
        assert!(btf.has_member("task", "tgid"));
        assert!(!btf.has_member("task", "__state"));
        assert!(!btf.has_member("nothing", "pid"));
    }

    #[test]
    fn bitfields_and_unaligned_members_are_errors() {
        let btf = KernelBtf::parse(&sample()).unwrap();
        for (s, m) in [("kbits", "b"), ("kbits", "c"), ("obits", "c")] {
            let e = btf.member_offset(s, m).unwrap_err();
            assert!(matches!(e, BtfError::Bitfield { .. }), "{s}.{m}: {e}");
            assert!(e.to_string().contains(&format!("{s}.{m}")), "{e}");
            // A bitfield still exists, which is what version probing asks.
            assert!(btf.has_member(s, m));
        }
        let e = btf.member_offset("odd", "y").unwrap_err();
        assert!(
            matches!(e, BtfError::Unaligned { bit_offset: 4, .. }),
            "{e}"
        );
    }

    #[test]
    fn missing_names_are_named_in_errors() {
        let btf = KernelBtf::parse(&sample()).unwrap();
        let e = btf.member_offset("task", "nope").unwrap_err();
        assert!(matches!(e, BtfError::MemberNotFound { .. }), "{e}");
        assert!(
            e.to_string().contains("task") && e.to_string().contains("nope"),
            "{e}"
        );
        let e = btf.member_offset("no_such_struct", "pid").unwrap_err();
        assert!(matches!(e, BtfError::TypeNotFound { .. }), "{e}");
        assert!(e.to_string().contains("no_such_struct"), "{e}");
        let e = btf.func_proto_param_count("no_such_typedef").unwrap_err();
        assert!(e.to_string().contains("no_such_typedef"), "{e}");
        // A struct name is not a typedef.
        assert!(matches!(
            btf.func_proto_param_count("task"),
            Err(BtfError::TypeNotFound { .. })
        ));
    }

    #[test]
    fn func_proto_through_typedef_const_and_pointer() {
        let btf = KernelBtf::parse(&sample()).unwrap();
        assert_eq!(btf.func_proto_param_count("btf_trace_t").unwrap(), 3);
        assert_eq!(btf.func_proto_param_count("alias_t").unwrap(), 3);
        for name in ["not_fn", "ptr_int"] {
            let e = btf.func_proto_param_count(name).unwrap_err();
            assert!(matches!(e, BtfError::NotAFuncProto { .. }), "{e}");
            assert!(e.to_string().contains(name), "{e}");
        }
    }

    #[test]
    fn cycles_are_errors() {
        let btf = KernelBtf::parse(&sample()).unwrap();
        let e = btf.func_proto_param_count("cyc_a").unwrap_err();
        assert!(matches!(e, BtfError::Malformed(_)), "{e}");
        let e = btf.member_offset("loop", "x").unwrap_err();
        assert!(matches!(e, BtfError::Malformed(_)), "{e}");
        assert!(!btf.has_member("loop", "x"));
    }

    /// Each level holds the next one twice as anonymous members: 2^depth paths, but each
    /// type is searched once, so a miss returns at once.
    #[test]
    fn shared_anonymous_members_are_not_walked_exponentially() {
        let mut b = Builder::new();
        let int = b.int("int", 4, 32);
        let mut inner = b.strukt("", &[("leaf", int, 0)]);
        for _ in 0..(MAX_DEPTH - 2) {
            inner = b.strukt("", &[("", inner, 0), ("", inner, 64)]);
        }
        b.strukt("top", &[("", inner, 0)]);
        let btf = KernelBtf::parse(&b.build()).unwrap();
        let start = std::time::Instant::now();
        assert!(matches!(
            btf.member_offset("top", "missing"),
            Err(BtfError::MemberNotFound { .. })
        ));
        assert_eq!(btf.member_offset("top", "leaf").unwrap(), 0);
        assert!(start.elapsed().as_secs() < 2);
    }

    #[test]
    fn header_problems_are_explained() {
        let good = sample();
        let mut swapped = good.clone();
        swapped.swap(0, 1);
        let e = KernelBtf::parse(&swapped).unwrap_err().to_string();
        assert!(e.contains("endian"), "{e}");
        let mut v2 = good.clone();
        v2[2] = 2;
        assert!(KernelBtf::parse(&v2)
            .unwrap_err()
            .to_string()
            .contains("version"));
        let mut short_hdr = good.clone();
        short_hdr[4] = 8;
        assert!(KernelBtf::parse(&short_hdr).is_err());
        assert!(KernelBtf::parse(b"").is_err());
    }

    #[test]
    fn unknown_kind_is_malformed() {
        let mut b = Builder::new();
        b.int("int", 4, 32);
        b.raw("odd", 20, 0, false, 0, &[]);
        let e = KernelBtf::parse(&b.build()).unwrap_err();
        assert!(e.to_string().contains("unknown kind 20"), "{e}");
    }

    #[test]
    fn every_truncation_is_an_error() {
        let good = sample();
        KernelBtf::parse(&good).unwrap();
        for len in 0..good.len() {
            assert!(
                KernelBtf::parse(&good[..len]).is_err(),
                "prefix of {len} bytes parsed"
            );
        }
    }

    #[test]
    fn mutations_never_panic() {
        let good = sample();
        // Every byte with a few fixed flips.
        for i in 0..good.len() {
            for x in [0x01u8, 0x02, 0x10, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[i] ^= x;
                if let Ok(btf) = KernelBtf::parse(&bad) {
                    query_all(&btf);
                }
            }
        }
        // Random multi-byte mutations from a fixed-seed xorshift.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let mut bad = good.clone();
            for _ in 0..1 + rnd() % 6 {
                let i = (rnd() % bad.len() as u64) as usize;
                bad[i] = rnd() as u8;
            }
            if rnd() % 4 == 0 {
                // Keep the header sane so the type walk itself gets fuzzed.
                bad[..4].copy_from_slice(&good[..4]);
            }
            if let Ok(btf) = KernelBtf::parse(&bad) {
                query_all(&btf);
            }
        }
    }

    /// Kernel release as (major, minor), from the running kernel.
    fn kernel_version() -> Option<(u32, u32)> {
        let rel = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
        let mut parts = rel.trim().split(|c: char| !c.is_ascii_digit());
        Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
    }

    #[test]
    fn running_kernel() {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        if !path.exists() {
            eprintln!(
                "SKIP running_kernel: {} absent (no CONFIG_DEBUG_INFO_BTF)",
                path.display()
            );
            return;
        }
        let start = std::time::Instant::now();
        let btf = KernelBtf::from_sys_fs().unwrap();
        eprintln!(
            "parsed {} types from {} in {:?}",
            btf.types.len() - 1,
            path.display(),
            start.elapsed()
        );
        let pid = btf.member_offset("task_struct", "pid").unwrap();
        let tgid = btf.member_offset("task_struct", "tgid").unwrap();
        assert_eq!(tgid, pid + 4);
        assert!(btf.has_member("task_struct", "__state") || btf.has_member("task_struct", "state"));
        let switch = btf
            .func_proto_param_count("btf_trace_sched_switch")
            .unwrap();
        let exit = btf
            .func_proto_param_count("btf_trace_sched_process_exit")
            .unwrap();
        let state = btf.member_offset("task_struct", "__state");
        eprintln!(
            "task_struct.pid={pid} tgid={tgid} __state={state:?}; \
             btf_trace_sched_switch params={switch} btf_trace_sched_process_exit params={exit}"
        );
        let version = kernel_version();
        // sched_switch gained prev_state in 5.18, task_struct.state became __state in 5.14,
        // and 6.18 (the development kernel) has sched_process_exit(p, group_dead).
        if version >= Some((5, 18)) {
            assert_eq!(switch, 5);
        } else {
            assert!(
                switch == 4 || switch == 5,
                "sched_switch has {switch} params"
            );
        }
        if version >= Some((5, 14)) {
            assert!(state.is_ok(), "{state:?}");
        }
        if version >= Some((6, 18)) {
            assert_eq!(exit, 3);
        } else {
            assert!(
                exit == 2 || exit == 3,
                "sched_process_exit has {exit} params"
            );
        }
        assert!(btf.has_member("task_struct", "comm"));
        assert!(!btf.has_member("task_struct", "no_such_member_xyz"));
    }
}
