//! Just enough of a BTF reader to learn the kernel's enum values at start, so the probes never hard-code
//! numbers that move between kernel versions (`vm_event_item` gains and loses members with config options).
//!
//! BTF layout (include/uapi/linux/btf.h): a header, a type section of variable-length records, a string
//! section. Only enum members are extracted; every other record is skipped by its known size.

use std::path::{Path, PathBuf};

/// The kernel's own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

const BTF_MAGIC: u16 = 0xeb9f;
const TYPE_HEADER_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read BTF from {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("not BTF: magic {magic:#06x}, expected {BTF_MAGIC:#06x}")]
    BadMagic { magic: u16 },
    #[error("BTF is truncated: {what} needs bytes {start}..{end} of {len}")]
    Truncated { what: &'static str, start: usize, end: usize, len: usize },
    #[error("BTF type {index} has unknown kind {kind}")]
    UnknownKind { index: usize, kind: u32 },
    #[error("BTF has no type `{name}`")]
    NoType { name: String },
    #[error("`{type_name}` has no member `{member}`")]
    NoMember { type_name: String, member: String },
}

/// The members of one enum, in declaration order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnumType {
    pub name: String,
    pub members: Vec<(String, i64)>,
}

impl EnumType {
    pub fn value(&self, member: &str) -> Result<i64, BtfError> {
        self.members
            .iter()
            .find(|(n, _)| n == member)
            .map(|(_, v)| *v)
            .ok_or_else(|| BtfError::NoMember { type_name: self.name.clone(), member: member.to_string() })
    }
}

fn u16_at(data: &[u8], at: usize, what: &'static str) -> Result<u16, BtfError> {
    let b =
        data.get(at..at + 2).ok_or(BtfError::Truncated { what, start: at, end: at + 2, len: data.len() })?;
    Ok(u16::from_le_bytes([b[0], b[1]]))
}

fn u32_at(data: &[u8], at: usize, what: &'static str) -> Result<u32, BtfError> {
    let b =
        data.get(at..at + 4).ok_or(BtfError::Truncated { what, start: at, end: at + 4, len: data.len() })?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn string_at(strings: &[u8], off: u32) -> &[u8] {
    let rest = strings.get(off as usize..).unwrap_or(&[]);
    let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
    &rest[..end]
}

/// Finds the enum called `name` in raw little-endian BTF bytes.
pub fn find_enum(data: &[u8], name: &str) -> Result<EnumType, BtfError> {
    let idx = index(data)?;
    let rec = idx
        .records
        .iter()
        .find(|r| (r.kind == 6 || r.kind == 19) && string_at(idx.strings, r.name_off) == name.as_bytes())
        .ok_or_else(|| BtfError::NoType { name: name.to_string() })?;
    let signed = rec.info & (1 << 31) != 0;
    let vlen = (rec.info & 0xffff) as usize;
    let mut members = Vec::with_capacity(vlen);
    for m in 0..vlen {
        let (moff, value) = if rec.kind == 6 {
            let at = rec.body + m * 8;
            let raw = u32_at(idx.types, at + 4, "enum member")?;
            let v = if signed { i64::from(raw as i32) } else { i64::from(raw) };
            (u32_at(idx.types, at, "enum member")?, v)
        } else {
            let at = rec.body + m * 12;
            let lo = u64::from(u32_at(idx.types, at + 4, "enum64 member")?);
            let hi = u64::from(u32_at(idx.types, at + 8, "enum64 member")?);
            (u32_at(idx.types, at, "enum64 member")?, ((hi << 32) | lo) as i64)
        };
        members.push((String::from_utf8_lossy(string_at(idx.strings, moff)).into_owned(), value));
    }
    Ok(EnumType { name: name.to_string(), members })
}

/// The `vm_event_item` numbers the memcg probe filters on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmEventItems {
    pub pswpin: i32,
    pub pswpout: i32,
    pub pgmajfault: i32,
    pub pgfault: i32,
}

/// The items in raw BTF bytes.
pub fn vm_event_items(data: &[u8]) -> Result<VmEventItems, BtfError> {
    let e = find_enum(data, "vm_event_item")?;
    let get = |m: &str| e.value(m).map(|v| v as i32);
    Ok(VmEventItems {
        pswpin: get("PSWPIN")?,
        pswpout: get("PSWPOUT")?,
        pgmajfault: get("PGMAJFAULT")?,
        pgfault: get("PGFAULT")?,
    })
}

/// One record of the type section: kind, name, `info`, and where its body starts in the type section.
#[derive(Clone, Copy, Debug)]
struct TypeRecord {
    kind: u32,
    name_off: u32,
    info: u32,
    body: usize,
}

/// The parsed sections of a BTF blob.
struct Index<'a> {
    types: &'a [u8],
    strings: &'a [u8],
    /// By type id; id 0 (void) has no record.
    records: Vec<TypeRecord>,
}

fn index(data: &[u8]) -> Result<Index<'_>, BtfError> {
    let magic = u16_at(data, 0, "header")?;
    if magic != BTF_MAGIC {
        return Err(BtfError::BadMagic { magic });
    }
    let hdr_len = u32_at(data, 4, "header")? as usize;
    let type_off = u32_at(data, 8, "header")? as usize;
    let type_len = u32_at(data, 12, "header")? as usize;
    let str_off = u32_at(data, 16, "header")? as usize;
    let str_len = u32_at(data, 20, "header")? as usize;
    let section = |off: usize, len: usize, what| {
        let start = hdr_len.saturating_add(off);
        let end = start.saturating_add(len);
        data.get(start..end).ok_or(BtfError::Truncated { what, start, end, len: data.len() })
    };
    let types = section(type_off, type_len, "type section")?;
    let strings = section(str_off, str_len, "string section")?;
    let mut records = Vec::new();
    let mut at = 0;
    while at < types.len() {
        let name_off = u32_at(types, at, "type header")?;
        let info = u32_at(types, at + 4, "type header")?;
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        let body = at + TYPE_HEADER_LEN;
        let body_len = match kind {
            1 | 14 | 17 => 4,          // INT, VAR, DECL_TAG
            2 | 7..=12 | 16 | 18 => 0, // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
            3 => 12,                   // ARRAY
            4 | 5 | 15 => vlen * 12,   // STRUCT, UNION, DATASEC
            6 | 13 => vlen * 8,        // ENUM, FUNC_PROTO
            19 => vlen * 12,           // ENUM64
            _ => return Err(BtfError::UnknownKind { index: records.len() + 1, kind }),
        };
        records.push(TypeRecord { kind, name_off, info, body });
        at = body + body_len;
    }
    Ok(Index { types, strings, records })
}

impl Index<'_> {
    fn record(&self, id: u32) -> Option<&TypeRecord> {
        id.checked_sub(1).and_then(|i| self.records.get(i as usize))
    }

    /// Byte offset of `member` in the struct/union `id`, looking inside anonymous struct/union members.
    fn member_offset(&self, id: u32, member: &str, depth: u32) -> Result<Option<u32>, BtfError> {
        let Some(rec) = self.record(id) else { return Ok(None) };
        if !(rec.kind == 4 || rec.kind == 5) || depth > 8 {
            return Ok(None);
        }
        let bitfields = rec.info & (1 << 31) != 0;
        for m in 0..(rec.info & 0xffff) as usize {
            let at = rec.body + m * 12;
            let name_off = u32_at(self.types, at, "struct member")?;
            let ty = u32_at(self.types, at + 4, "struct member")?;
            let raw = u32_at(self.types, at + 8, "struct member")?;
            let bits = if bitfields { raw & 0xff_ffff } else { raw };
            if name_off == 0 {
                if let Some(inner) = self.member_offset(ty, member, depth + 1)? {
                    return Ok(Some(bits / 8 + inner));
                }
            } else if string_at(self.strings, name_off) == member.as_bytes() {
                return Ok(Some(bits / 8));
            }
        }
        Ok(None)
    }
}

/// Byte offset of `member` in `struct struct_name` (the kernel's layout, for reading it with
/// `bpf_probe_read_kernel` where CO-RE relocations are not available).
pub fn struct_member_offset(data: &[u8], struct_name: &str, member: &str) -> Result<u32, BtfError> {
    let idx = index(data)?;
    for (i, rec) in idx.records.iter().enumerate() {
        if rec.kind == 4 && string_at(idx.strings, rec.name_off) == struct_name.as_bytes() {
            if let Some(off) = idx.member_offset(i as u32 + 1, member, 0)? {
                return Ok(off);
            }
            return Err(BtfError::NoMember {
                type_name: struct_name.to_string(),
                member: member.to_string(),
            });
        }
    }
    Err(BtfError::NoType { name: struct_name.to_string() })
}

/// What the probes need from the kernel's BTF, read in one pass over the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelLayout {
    pub items: VmEventItems,
    /// `offsetof(struct task_struct, pid)`.
    pub task_pid_offset: u32,
    /// `offsetof(struct task_struct, se.sum_exec_runtime)`.
    pub task_exec_runtime_offset: u32,
    /// `offsetof(struct task_struct, sched_info.run_delay)` (needs CONFIG_SCHED_INFO).
    pub task_run_delay_offset: u32,
    /// The chain `memcg->css.cgroup->kn->id`: offsets of `mem_cgroup.css`, `cgroup_subsys_state.cgroup`,
    /// `cgroup.kn`, `kernfs_node.id`.
    pub memcg_css_offset: u32,
    pub css_cgroup_offset: u32,
    pub cgroup_kn_offset: u32,
    pub kn_id_offset: u32,
}

pub fn kernel_layout(path: &Path) -> Result<KernelLayout, BtfError> {
    let data = std::fs::read(path).map_err(|source| BtfError::Read { path: path.to_path_buf(), source })?;
    Ok(KernelLayout {
        items: vm_event_items(&data)?,
        task_pid_offset: struct_member_offset(&data, "task_struct", "pid")?,
        task_exec_runtime_offset: struct_member_offset(&data, "task_struct", "se")?
            + struct_member_offset(&data, "sched_entity", "sum_exec_runtime")?,
        task_run_delay_offset: struct_member_offset(&data, "task_struct", "sched_info")?
            + struct_member_offset(&data, "sched_info", "run_delay")?,
        memcg_css_offset: struct_member_offset(&data, "mem_cgroup", "css")?,
        css_cgroup_offset: struct_member_offset(&data, "cgroup_subsys_state", "cgroup")?,
        cgroup_kn_offset: struct_member_offset(&data, "cgroup", "kn")?,
        kn_id_offset: struct_member_offset(&data, "kernfs_node", "id")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Offset of `s` in a BTF string section.
    fn str_off(s: &str, strings: &[u8]) -> u32 {
        let needle = [s.as_bytes(), b"\0"].concat();
        strings.windows(needle.len()).position(|w| w == needle.as_slice()).unwrap() as u32
    }

    /// A BTF blob: header (version 1, 24 bytes), the type section, then the string section.
    fn blob(types: &[u8], strings: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for v in [24u32, 0, types.len() as u32, types.len() as u32, strings.len() as u32] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(types);
        out.extend_from_slice(strings);
        out
    }

    /// Builds a BTF blob: an INT, a STRUCT with one member, then enum `colour` {RED=0, GREEN=7, BLUE=-1 signed}.
    fn sample() -> Vec<u8> {
        let mut strings = b"\0int\0s\0f\0colour\0RED\0GREEN\0BLUE\0".to_vec();
        let mut types = Vec::new();
        let mut push = |v: u32| types.extend_from_slice(&v.to_le_bytes());
        // INT "int"
        push(str_off("int", &strings));
        push(1 << 24);
        push(4);
        push(32);
        // STRUCT "s" with 1 member
        push(str_off("s", &strings));
        push((4 << 24) | 1);
        push(4);
        push(str_off("f", &strings));
        push(1);
        push(0);
        // ENUM "colour", signed, 3 members
        push(str_off("colour", &strings));
        push((1 << 31) | (6 << 24) | 3);
        push(4);
        push(str_off("RED", &strings));
        push(0);
        push(str_off("GREEN", &strings));
        push(7);
        push(str_off("BLUE", &strings));
        push(u32::MAX);
        strings.push(0);
        blob(&types, &strings)
    }

    #[test]
    fn finds_enum_after_other_kinds() {
        let e = find_enum(&sample(), "colour").unwrap();
        assert_eq!(
            e.members,
            vec![("RED".to_string(), 0), ("GREEN".to_string(), 7), ("BLUE".to_string(), -1)]
        );
        assert_eq!(e.value("GREEN").unwrap(), 7);
        assert!(matches!(e.value("PINK"), Err(BtfError::NoMember { .. })));
    }

    #[test]
    fn missing_enum_and_bad_input_are_errors() {
        assert!(matches!(find_enum(&sample(), "shade"), Err(BtfError::NoType { .. })));
        assert!(matches!(find_enum(b"\x00\x00", "x"), Err(BtfError::BadMagic { .. })));
        let mut cut = sample();
        cut.truncate(40);
        assert!(matches!(find_enum(&cut, "colour"), Err(BtfError::Truncated { .. })));
    }

    #[test]
    fn kernel_vm_event_items_are_distinct() {
        // The running kernel's BTF: the three items exist and differ (their values vary by config).
        let items = kernel_layout(Path::new(VMLINUX_BTF)).expect("kernel BTF readable").items;
        assert_ne!(items.pgfault, items.pgmajfault);
        assert_ne!(items.pswpin, items.pswpout);
        assert_ne!(items.pswpin, items.pgmajfault);
        assert!(items.pswpin >= 0 && items.pswpout >= 0 && items.pgmajfault >= 0);
    }

    #[test]
    fn struct_member_offsets_follow_anonymous_members() {
        // struct outer { int a; struct { int b; int c; }; } with the inner struct anonymous at bit 32.
        let mut strings = b"\0int\0outer\0a\0b\0c\0".to_vec();
        let mut types = Vec::new();
        let mut push = |v: u32| types.extend_from_slice(&v.to_le_bytes());
        // 1: INT
        push(str_off("int", &strings));
        push(1 << 24);
        push(4);
        push(32);
        // 2: anonymous STRUCT { b at 0, c at 32 bits }
        push(0);
        push((4 << 24) | 2);
        push(8);
        push(str_off("b", &strings));
        push(1);
        push(0);
        push(str_off("c", &strings));
        push(1);
        push(32);
        // 3: STRUCT outer { a at 0, <anon> at 32 bits }
        push(str_off("outer", &strings));
        push((4 << 24) | 2);
        push(12);
        push(str_off("a", &strings));
        push(1);
        push(0);
        push(0);
        push(2);
        push(32);
        strings.push(0);
        let blob = blob(&types, &strings);
        assert_eq!(struct_member_offset(&blob, "outer", "a").unwrap(), 0);
        assert_eq!(struct_member_offset(&blob, "outer", "b").unwrap(), 4);
        assert_eq!(struct_member_offset(&blob, "outer", "c").unwrap(), 8);
        assert!(struct_member_offset(&blob, "outer", "d").is_err());
        assert!(struct_member_offset(&blob, "inner", "b").is_err());
    }

    #[test]
    fn kernel_task_pid_offset_is_plausible() {
        let layout = kernel_layout(Path::new(VMLINUX_BTF)).expect("kernel BTF readable");
        // pid sits well inside task_struct, after the scheduler and mm fields, and is 4-byte aligned.
        assert!(layout.task_pid_offset > 512 && layout.task_pid_offset.is_multiple_of(4), "{layout:?}");
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_garbage(data in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = find_enum(&data, "vm_event_item");
        }
        #[test]
        fn member_lookup_never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = struct_member_offset(&data, "task_struct", "pid");
        }
        #[test]
        fn never_panics_with_valid_header(tail in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let mut data = sample();
            data.truncate(24);
            data.extend_from_slice(&tail);
            let _ = find_enum(&data, "colour");
        }
    }
}
