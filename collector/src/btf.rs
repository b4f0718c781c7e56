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
    #[error("BTF has no enum `{name}`")]
    NoEnum { name: String },
    #[error("enum `{enum_name}` has no member `{member}`")]
    NoMember { enum_name: String, member: String },
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
            .ok_or_else(|| BtfError::NoMember { enum_name: self.name.clone(), member: member.to_string() })
    }
}

/// Reads `path` and returns the enum called `name`.
pub fn read_enum(path: &Path, name: &str) -> Result<EnumType, BtfError> {
    let data = std::fs::read(path).map_err(|source| BtfError::Read { path: path.to_path_buf(), source })?;
    find_enum(&data, name)
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

    let mut at = 0;
    let mut index = 1; // type id 0 is void
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
            _ => return Err(BtfError::UnknownKind { index, kind }),
        };
        if (kind == 6 || kind == 19) && string_at(strings, name_off) == name.as_bytes() {
            let signed = info & (1 << 31) != 0;
            let mut members = Vec::with_capacity(vlen);
            for m in 0..vlen {
                let (moff, value) = if kind == 6 {
                    let rec = body + m * 8;
                    let raw = u32_at(types, rec + 4, "enum member")?;
                    let v = if signed { i64::from(raw as i32) } else { i64::from(raw) };
                    (u32_at(types, rec, "enum member")?, v)
                } else {
                    let rec = body + m * 12;
                    let lo = u64::from(u32_at(types, rec + 4, "enum64 member")?);
                    let hi = u64::from(u32_at(types, rec + 8, "enum64 member")?);
                    (u32_at(types, rec, "enum64 member")?, ((hi << 32) | lo) as i64)
                };
                members.push((String::from_utf8_lossy(string_at(strings, moff)).into_owned(), value));
            }
            return Ok(EnumType { name: name.to_string(), members });
        }
        at = body + body_len;
        index += 1;
    }
    Err(BtfError::NoEnum { name: name.to_string() })
}

/// The `vm_event_item` numbers the memcg probe filters on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmEventItems {
    pub pswpin: i32,
    pub pswpout: i32,
    pub pgmajfault: i32,
}

pub fn vm_event_items(path: &Path) -> Result<VmEventItems, BtfError> {
    let e = read_enum(path, "vm_event_item")?;
    let get = |m: &str| e.value(m).map(|v| v as i32);
    Ok(VmEventItems { pswpin: get("PSWPIN")?, pswpout: get("PSWPOUT")?, pgmajfault: get("PGMAJFAULT")? })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a BTF blob: an INT, a STRUCT with one member, then enum `colour` {RED=0, GREEN=7, BLUE=-1 signed}.
    fn sample() -> Vec<u8> {
        let mut strings = b"\0int\0s\0f\0colour\0RED\0GREEN\0BLUE\0".to_vec();
        let off = |s: &str, strings: &[u8]| {
            let needle = [s.as_bytes(), b"\0"].concat();
            strings.windows(needle.len()).position(|w| w == needle.as_slice()).unwrap() as u32
        };
        let mut types = Vec::new();
        let mut push = |v: u32| types.extend_from_slice(&v.to_le_bytes());
        // INT "int"
        push(off("int", &strings));
        push(1 << 24);
        push(4);
        push(32);
        // STRUCT "s" with 1 member
        push(off("s", &strings));
        push((4 << 24) | 1);
        push(4);
        push(off("f", &strings));
        push(1);
        push(0);
        // ENUM "colour", signed, 3 members
        push(off("colour", &strings));
        push((1 << 31) | (6 << 24) | 3);
        push(4);
        push(off("RED", &strings));
        push(0);
        push(off("GREEN", &strings));
        push(7);
        push(off("BLUE", &strings));
        push(u32::MAX);
        strings.push(0);
        let mut out = Vec::new();
        out.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        out.push(1);
        out.push(0);
        out.extend_from_slice(&24u32.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(types.len() as u32).to_le_bytes());
        out.extend_from_slice(&(types.len() as u32).to_le_bytes());
        out.extend_from_slice(&(strings.len() as u32).to_le_bytes());
        out.extend_from_slice(&types);
        out.extend_from_slice(&strings);
        out
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
        assert!(matches!(find_enum(&sample(), "shade"), Err(BtfError::NoEnum { .. })));
        assert!(matches!(find_enum(b"\x00\x00", "x"), Err(BtfError::BadMagic { .. })));
        let mut cut = sample();
        cut.truncate(40);
        assert!(matches!(find_enum(&cut, "colour"), Err(BtfError::Truncated { .. })));
    }

    #[test]
    fn kernel_vm_event_items_are_distinct() {
        // The running kernel's BTF: the three items exist and differ (their values vary by config).
        let items = vm_event_items(Path::new(VMLINUX_BTF)).expect("kernel BTF readable");
        assert_ne!(items.pswpin, items.pswpout);
        assert_ne!(items.pswpin, items.pgmajfault);
        assert!(items.pswpin >= 0 && items.pswpout >= 0 && items.pgmajfault >= 0);
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_garbage(data in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = find_enum(&data, "vm_event_item");
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
