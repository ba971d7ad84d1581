//! Just enough of the kernel's BTF (`/sys/kernel/btf/vmlinux`) to find where
//! a struct keeps a member, so the eBPF program can follow `sock -> net ->
//! ns.inum` on this kernel's layout instead of one compiled in.
//!
//! Format: `include/uapi/linux/btf.h`. Only what member lookup needs is
//! decoded; other types are skipped by their size.

use std::collections::HashMap;

use anyhow::{Result, bail};

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

struct Member {
    name: u32,
    ty: u32,
    /// Bit offset (bitfields are never what we look for).
    bit_offset: u32,
}

struct Type {
    name: u32,
    kind: u32,
    /// The referenced type of typedefs and modifiers.
    ty: u32,
    members: Vec<Member>,
}

/// A type's fixed part, and where its kind-specific part starts.
struct Record {
    name: u32,
    info: u32,
    size_or_type: u32,
    extra: usize,
}

impl Record {
    fn kind(&self) -> u32 {
        (self.info >> 24) & 0x1f
    }

    fn vlen(&self) -> usize {
        (self.info & 0xffff) as usize
    }
}

/// BTF data split into its string section and type records.
struct Raw {
    strings: std::ops::Range<usize>,
    records: Vec<Record>,
}

fn u32_at(data: &[u8], o: usize) -> Option<u32> {
    data.get(o..o + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

impl Raw {
    fn walk(data: &[u8]) -> Result<Raw> {
        if data.get(0..2) != Some(&MAGIC.to_le_bytes()[..]) {
            bail!("not little-endian BTF data");
        }
        let field = |o| {
            u32_at(data, o)
                .map(|v| v as usize)
                .ok_or_else(|| anyhow::anyhow!("BTF header cut off"))
        };
        let hdr_len = field(4)?;
        let (type_off, type_len, str_off, str_len) =
            (field(8)?, field(12)?, field(16)?, field(20)?);
        let strings = hdr_len + str_off..hdr_len + str_off + str_len;
        if data.get(strings.clone()).is_none() {
            bail!("BTF string section out of bounds");
        }
        let mut records = Vec::new();
        let (mut o, end) = (hdr_len + type_off, hdr_len + type_off + type_len);
        while o < end {
            let word = |i: usize| {
                u32_at(data, o + 4 * i).ok_or_else(|| anyhow::anyhow!("BTF type cut off"))
            };
            let r = Record {
                name: word(0)?,
                info: word(1)?,
                size_or_type: word(2)?,
                extra: o + 12,
            };
            let vlen = r.vlen();
            o = r.extra
                + match r.kind() {
                    KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                    KIND_ARRAY => 12,
                    KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                    KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                    _ => 0,
                };
            if o > data.len() {
                bail!("BTF type cut off");
            }
            records.push(r);
        }
        Ok(Raw { strings, records })
    }
}

/// Rewrites in place every name in the BTF data `data` that is not a C
/// identifier (`MaybeUninit<u8>`, which bpf-linker leaves in Rust generic
/// names) to one, byte for byte (`MaybeUninit_u8_`). The kernel refuses
/// BTF with such names, and the tp_btf programs cannot load without their
/// object's BTF. Section names (`.rodata`) are left alone. Returns how many
/// names changed.
pub fn sanitize_names(data: &mut [u8]) -> Result<usize> {
    let raw = Raw::walk(data)?;
    let mut names = Vec::new();
    for r in &raw.records {
        if r.kind() != KIND_DATASEC {
            names.push(r.name);
        }
        let (stride, count) = match r.kind() {
            KIND_STRUCT | KIND_UNION | KIND_ENUM64 => (12, r.vlen()),
            KIND_ENUM | KIND_FUNC_PROTO => (8, r.vlen()),
            _ => (0, 0),
        };
        names.extend((0..count).filter_map(|i| u32_at(data, r.extra + stride * i)));
    }
    let strings = &mut data[raw.strings];
    let mut changed = 0;
    for off in names {
        let Some(name) = strings.get_mut(off as usize..) else {
            continue;
        };
        let mut touched = false;
        for b in name.iter_mut().take_while(|b| **b != 0) {
            if !(b.is_ascii_alphanumeric() || *b == b'_') {
                *b = b'_';
                touched = true;
            }
        }
        changed += usize::from(touched);
    }
    Ok(changed)
}

pub struct Btf {
    strings: Vec<u8>,
    /// Index 0 is the void type; ids count from 1.
    types: Vec<Type>,
    by_name: HashMap<Vec<u8>, Vec<u32>>,
}

impl Btf {
    pub fn parse(data: &[u8]) -> Result<Btf> {
        let raw = Raw::walk(data)?;
        let strings = data[raw.strings.clone()].to_vec();
        let mut types = vec![Type {
            name: 0,
            kind: 0,
            ty: 0,
            members: Vec::new(),
        }];
        for r in &raw.records {
            let mut members = Vec::new();
            if matches!(r.kind(), KIND_STRUCT | KIND_UNION) {
                let bitfields = r.info >> 31 == 1;
                for i in 0..r.vlen() {
                    let m = |j: usize| u32_at(data, r.extra + 12 * i + 4 * j).unwrap_or(0);
                    let off = m(2);
                    members.push(Member {
                        name: m(0),
                        ty: m(1),
                        bit_offset: if bitfields { off & 0xff_ffff } else { off },
                    });
                }
            }
            types.push(Type {
                name: r.name,
                kind: r.kind(),
                ty: r.size_or_type,
                members,
            });
        }
        let mut btf = Btf {
            strings,
            types,
            by_name: HashMap::new(),
        };
        for (id, t) in btf.types.iter().enumerate().skip(1) {
            if matches!(t.kind, KIND_STRUCT | KIND_UNION) && t.name != 0 {
                let name = btf.name(t.name).to_vec();
                btf.by_name.entry(name).or_default().push(id as u32);
            }
        }
        Ok(btf)
    }

    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or(&[]);
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    /// Follows typedefs and qualifiers to the type they name.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.types.get(id as usize)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.ty
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// Byte offset of `member` in struct `name`, looking into anonymous
    /// structs and unions the way C does.
    pub fn member_offset(&self, name: &str, member: &str) -> Option<u32> {
        let ids = self.by_name.get(name.as_bytes())?;
        ids.iter().find_map(|&id| {
            let t = self.types.get(id as usize)?;
            self.find(t, member.as_bytes(), 0).map(|bits| bits / 8)
        })
    }

    /// Byte offset of a member path (`["ns", "inum"]`) from struct `name`.
    pub fn path_offset(&self, name: &str, path: &[&str]) -> Option<u32> {
        let mut t = self
            .types
            .get(*self.by_name.get(name.as_bytes())?.first()? as usize)?;
        let mut total = 0;
        for (i, member) in path.iter().enumerate() {
            let (bits, ty) = self.find_typed(t, member.as_bytes(), 0)?;
            total += bits / 8;
            if i + 1 < path.len() {
                t = self.resolve(ty)?;
            }
        }
        Some(total)
    }

    fn find(&self, t: &Type, member: &[u8], base: u32) -> Option<u32> {
        self.find_typed(t, member, base).map(|(bits, _)| bits)
    }

    fn find_typed(&self, t: &Type, member: &[u8], base: u32) -> Option<(u32, u32)> {
        for m in &t.members {
            if m.name != 0 && self.name(m.name) == member {
                return Some((base + m.bit_offset, m.ty));
            }
        }
        // Anonymous struct/union members: C lets their members be named
        // directly.
        t.members.iter().filter(|m| m.name == 0).find_map(|m| {
            let inner = self.resolve(m.ty)?;
            if matches!(inner.kind, KIND_STRUCT | KIND_UNION) {
                self.find_typed(inner, member, base + m.bit_offset)
            } else {
                None
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds BTF with: struct inner { int pad; int inum; };
    /// struct outer { int a; union { int b; struct inner in; }; }.
    fn sample() -> Vec<u8> {
        let strings = b"\0int\0inner\0pad\0inum\0outer\0a\0b\0in\0".to_vec();
        let s = |name: &str| {
            let pos = strings.windows(name.len() + 2).position(|w| {
                w[0] == 0 && &w[1..=name.len()] == name.as_bytes() && w[name.len() + 1] == 0
            });
            pos.map(|p| p as u32 + 1).unwrap()
        };
        let mut t: Vec<u32> = Vec::new();
        // 1: int
        t.extend([s("int"), KIND_INT << 24, 4, 32]);
        // 2: struct inner
        t.extend([s("inner"), KIND_STRUCT << 24 | 2, 8]);
        t.extend([s("pad"), 1, 0, s("inum"), 1, 32]);
        // 3: anonymous union { int b; struct inner in; }
        t.extend([0, KIND_UNION << 24 | 2, 8]);
        t.extend([s("b"), 1, 0, s("in"), 2, 0]);
        // 4: struct outer
        t.extend([s("outer"), KIND_STRUCT << 24 | 2, 12]);
        t.extend([s("a"), 1, 0, 0, 3, 32]);
        let types: Vec<u8> = t.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut data = Vec::new();
        data.extend(MAGIC.to_le_bytes());
        data.extend([1, 0]);
        for w in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            data.extend(w.to_le_bytes());
        }
        data.extend(types);
        data.extend(strings);
        data
    }

    #[test]
    fn finds_members_directly_and_through_anonymous_unions() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.member_offset("inner", "inum"), Some(4));
        assert_eq!(btf.member_offset("outer", "b"), Some(4));
        assert_eq!(btf.path_offset("outer", &["in", "inum"]), Some(8));
        assert_eq!(btf.member_offset("outer", "missing"), None);
        assert_eq!(btf.member_offset("nostruct", "a"), None);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Btf::parse(b"").is_err());
        assert!(Btf::parse(&[0x9f, 0xeb, 1, 0, 24, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]).is_err());
        let mut cut = sample();
        cut.truncate(40);
        assert!(Btf::parse(&cut).is_err());
    }

    #[test]
    fn this_kernel_has_the_members_netns_needs() {
        let data = std::fs::read("/sys/kernel/btf/vmlinux").expect("kernel BTF");
        let btf = Btf::parse(&data).unwrap();
        assert_eq!(btf.member_offset("sock", "__sk_common"), Some(0));
        assert!(
            btf.path_offset("sock_common", &["skc_net", "net"])
                .is_some()
        );
        assert!(btf.path_offset("net", &["ns", "inum"]).is_some());
    }
}
