//! Hardware-error tracepoints: block request errors (`block:block_rq_error`), EDAC memory errors
//! (`ras:mc_event`), PCIe AER (`ras:aer_event`), x86 machine checks (`mce:mce_record`) and memory failures
//! (`ras:memory_failure_event`), counted in the kernel by the `vigil-probes` programs of the same names.
//!
//! Which of these a kernel has depends on its config and hardware (these VMs have block and `ras:mc_event`,
//! but no AER, MCE or memory-failure events), so each is looked up in tracefs at start: [`HwPlan::discover`]
//! reads every event's `format` file, checks that the fields the program reads are there with the sizes it
//! reads, and hands their offsets to the loader as globals. Programs are attached only for the events that
//! passed; every tracepoint is reported as attached or missing with the reason. A hardware tracepoint that
//! fails never stops the collector's main probes.
//!
//! [`HwTracepoints`] owns the links and the counter map, so it keeps counting for as long as anyone holds
//! it, and [`HwTracepoints::read`] turns the raw keys into (device, kind, severity) counts.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aya::Ebpf;
use aya::maps::{MapData, MapError, PerCpuHashMap};
use aya::programs::TracePoint;
use aya::programs::trace_point::TracePointLink;
use vigil_common::{HwErrorKey, HwSource, maps};

/// Where tracefs is mounted, in the order the kernel documentation prefers them.
pub const TRACEFS_ROOTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
/// Block devices by `MAJ:MIN`, each with a `uevent` naming it.
pub const SYS_DEV_BLOCK: &str = "/sys/dev/block";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("line {line}: `{text}` is not `field:DECL; offset:N; size:N; signed:N;`")]
    BadField { line: usize, text: String },
    #[error("line {line}: `{key}` is `{value}`, not a number")]
    BadNumber { line: usize, key: &'static str, value: String },
    #[error("no `name:` line")]
    NoName,
}

/// One field of a trace record, as the event's `format` file describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormatField {
    /// The C declaration without the name, e.g. `dev_t`, `char[10]`, `__data_loc char[]`.
    pub c_type: String,
    pub name: String,
    pub offset: u32,
    pub size: u32,
    pub signed: bool,
}

/// A tracefs `events/GROUP/EVENT/format` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventFormat {
    pub name: String,
    pub id: Option<u32>,
    pub fields: Vec<FormatField>,
}

impl EventFormat {
    pub fn field(&self, name: &str) -> Option<&FormatField> {
        self.fields.iter().find(|f| f.name == name)
    }
}

/// Parses a tracefs `format` file. Lines other than `name:`, `ID:` and `field:` (the `format:` header, the
/// blank line after the common fields, `print fmt:`) carry nothing the probes need and are skipped.
pub fn parse_format(text: &str) -> Result<EventFormat, FormatError> {
    let mut name = None;
    let mut id = None;
    let mut fields = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = raw.trim();
        if let Some(v) = line.strip_prefix("name:") {
            name = Some(v.trim().to_string());
        } else if let Some(v) = line.strip_prefix("ID:") {
            let v = v.trim();
            id = Some(v.parse().map_err(|_| FormatError::BadNumber {
                line: line_no,
                key: "ID",
                value: v.to_string(),
            })?);
        } else if line.starts_with("field:") {
            fields.push(parse_field(line, line_no)?);
        }
    }
    Ok(EventFormat { name: name.ok_or(FormatError::NoName)?, id, fields })
}

fn parse_field(line: &str, line_no: usize) -> Result<FormatField, FormatError> {
    let bad = || FormatError::BadField { line: line_no, text: line.to_string() };
    let (mut decl, mut offset, mut size, mut signed) = (None, None, None, None);
    for part in line.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = part.split_once(':').ok_or_else(bad)?;
        let number = |key: &'static str| {
            value.trim().parse::<u32>().map_err(|_| FormatError::BadNumber {
                line: line_no,
                key,
                value: value.trim().to_string(),
            })
        };
        match key.trim() {
            "field" => decl = Some(value.trim()),
            "offset" => offset = Some(number("offset")?),
            "size" => size = Some(number("size")?),
            "signed" => signed = Some(number("signed")? != 0),
            // Fields the kernel may add later (none today) do not make the line unreadable.
            _ => {}
        }
    }
    let decl = decl.ok_or_else(bad)?;
    // The name is the declaration's last word, less an array suffix: `char rwbs[10]` is `rwbs`, while
    // `__data_loc char[] cmd` puts the brackets on the type.
    let (c_type, last) = decl.rsplit_once(char::is_whitespace).ok_or_else(bad)?;
    let (name, array) = match last.find('[') {
        Some(at) => (&last[..at], &last[at..]),
        None => (last, ""),
    };
    let valid_name = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid_name {
        return Err(bad());
    }
    Ok(FormatField {
        c_type: format!("{}{array}", c_type.trim()),
        name: name.to_string(),
        offset: offset.ok_or_else(bad)?,
        size: size.ok_or_else(bad)?,
        signed: signed.ok_or_else(bad)?,
    })
}

/// A record field a program reads: its name in the format file, the global the loader sets to its offset,
/// and the size the program reads (a field of another size would be misread, so it is refused).
#[derive(Debug)]
struct FieldUse {
    field: &'static str,
    global: &'static str,
    size: u32,
    /// `__data_loc` strings are read through their (offset, length) word, not in place.
    data_loc: bool,
}

const fn field(field: &'static str, global: &'static str, size: u32) -> FieldUse {
    FieldUse { field, global, size, data_loc: false }
}

/// One hardware tracepoint and the program that counts it.
#[derive(Debug)]
struct Spec {
    group: &'static str,
    event: &'static str,
    /// `group:event`, as reported.
    tracepoint: &'static str,
    program: &'static str,
    fields: &'static [FieldUse],
}

const SPECS: [Spec; 5] = [
    Spec {
        group: "block",
        event: "block_rq_error",
        tracepoint: "block:block_rq_error",
        program: "block_rq_error",
        fields: &[field("dev", "BLK_DEV_OFF", 4), field("error", "BLK_ERROR_OFF", 4)],
    },
    Spec {
        group: "ras",
        event: "mc_event",
        tracepoint: "ras:mc_event",
        program: "mc_event",
        fields: &[field("error_type", "MC_ERROR_TYPE_OFF", 4), field("mc_index", "MC_INDEX_OFF", 1)],
    },
    Spec {
        group: "ras",
        event: "aer_event",
        tracepoint: "ras:aer_event",
        program: "aer_event",
        fields: &[
            FieldUse { field: "dev_name", global: "AER_DEV_NAME_OFF", size: 4, data_loc: true },
            field("severity", "AER_SEVERITY_OFF", 1),
        ],
    },
    Spec {
        group: "mce",
        event: "mce_record",
        tracepoint: "mce:mce_record",
        program: "mce_record",
        fields: &[
            field("cpu", "MCE_CPU_OFF", 4),
            field("bank", "MCE_BANK_OFF", 1),
            field("status", "MCE_STATUS_OFF", 8),
        ],
    },
    Spec {
        group: "ras",
        event: "memory_failure_event",
        tracepoint: "ras:memory_failure_event",
        program: "memory_failure_event",
        fields: &[field("type", "MF_TYPE_OFF", 4), field("result", "MF_RESULT_OFF", 4)],
    },
];

/// The tracepoints Vigil knows, as `group:event`.
pub fn known_tracepoints() -> impl Iterator<Item = &'static str> {
    SPECS.iter().map(|s| s.tracepoint)
}

/// What discovery found for one tracepoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Discovered {
    /// The event exists and has the fields the program reads: (global, offset) pairs for the loader.
    Usable(Vec<(&'static str, i32)>),
    /// Why it cannot be used.
    Missing(String),
}

/// Which hardware tracepoints this kernel has, and the record offsets their programs need. Made before the
/// probe object is loaded, because the offsets are globals of the object.
#[derive(Clone, Debug)]
pub struct HwPlan {
    tracefs: Option<PathBuf>,
    entries: Vec<(&'static Spec, Discovered)>,
}

impl HwPlan {
    /// Looks every tracepoint up under the first of [`TRACEFS_ROOTS`] that has an `events` directory.
    pub fn discover() -> HwPlan {
        let tracefs = TRACEFS_ROOTS.iter().map(Path::new).find(|r| r.join("events").is_dir());
        match tracefs {
            Some(root) => HwPlan::discover_in(root),
            None => HwPlan {
                tracefs: None,
                entries: SPECS
                    .iter()
                    .map(|s| {
                        let why = format!("tracefs is not mounted (looked at {})", TRACEFS_ROOTS.join(", "));
                        (s, Discovered::Missing(why))
                    })
                    .collect(),
            },
        }
    }

    /// The same, under a given tracefs root (tests point it at a copy).
    pub fn discover_in(tracefs: &Path) -> HwPlan {
        let entries = SPECS.iter().map(|s| (s, discover_one(tracefs, s))).collect();
        HwPlan { tracefs: Some(tracefs.to_path_buf()), entries }
    }

    pub fn tracefs(&self) -> Option<&Path> {
        self.tracefs.as_deref()
    }

    /// Each tracepoint (`group:event`) with what was found.
    pub fn entries(&self) -> impl Iterator<Item = (&'static str, &Discovered)> {
        self.entries.iter().map(|(s, d)| (s.tracepoint, d))
    }

    /// The (global, offset) pairs of every usable tracepoint, for `EbpfLoader::override_global`.
    pub fn globals(&self) -> Vec<(&'static str, i32)> {
        self.entries
            .iter()
            .filter_map(|(_, d)| match d {
                Discovered::Usable(g) => Some(g.iter().copied()),
                Discovered::Missing(_) => None,
            })
            .flatten()
            .collect()
    }
}

fn discover_one(tracefs: &Path, spec: &Spec) -> Discovered {
    let dir = tracefs.join("events").join(spec.group).join(spec.event);
    if !dir.is_dir() {
        return Discovered::Missing(format!(
            "this kernel has no such event ({} does not exist)",
            dir.display()
        ));
    }
    let path = dir.join("format");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => return Discovered::Missing(format!("cannot read {}: {e}", path.display())),
    };
    let format = match parse_format(&text) {
        Ok(f) => f,
        Err(e) => return Discovered::Missing(format!("{}: {e}", path.display())),
    };
    match offsets_for(spec, &format) {
        Ok(globals) => Discovered::Usable(globals),
        Err(why) => Discovered::Missing(format!("{}: {why}", path.display())),
    }
}

/// The offsets of the fields `spec`'s program reads, or why the record does not fit it.
fn offsets_for(spec: &Spec, format: &EventFormat) -> Result<Vec<(&'static str, i32)>, String> {
    spec.fields
        .iter()
        .map(|u| {
            let f = format.field(u.field).ok_or_else(|| format!("the record has no field `{}`", u.field))?;
            if f.size != u.size {
                return Err(format!("field `{}` is {} bytes; the probe reads {}", u.field, f.size, u.size));
            }
            if u.data_loc != f.c_type.starts_with("__data_loc") {
                return Err(format!("field `{}` is `{}`, which the probe does not read", u.field, f.c_type));
            }
            // Offsets index a record of at most a page; anything beyond i32 is not a real format file.
            let offset =
                i32::try_from(f.offset).map_err(|_| format!("field `{}` offset {}", u.field, f.offset))?;
            Ok((u.global, offset))
        })
        .collect()
}

/// Whether one hardware tracepoint is attached, and if not why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HwTracepointStatus {
    /// `group:event`.
    pub tracepoint: &'static str,
    pub attached: bool,
    /// `attached`, or why not.
    pub detail: String,
}

/// A cumulative count of one kind of hardware error on one device, since the probes were attached.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HwTraceCount {
    /// `group:event`.
    pub tracepoint: &'static str,
    /// `loop3`, `mc0`, `0000:00:1c.0`, `cpu2`, `memory`.
    pub device: String,
    /// `io_error`, `memory_ce`, `memory_ue`, `pcie_correctable`, `pcie_nonfatal`, `pcie_fatal`,
    /// `machine_check`, `memory_failure`.
    pub kind: String,
    /// `warning`, `error` or `critical`.
    pub severity: String,
    /// What the kernel said beyond the kind: the errno and blk_status of a block error (`EIO
    /// BLK_STS_IOERR`), the MCE bank, the memory-failure result. Counts of one device and kind with
    /// different details are separate entries.
    pub detail: String,
    pub total: u64,
}

/// The kernel's `blk_status_to_errno` table read backwards: the errno a failed request's record carries,
/// and the status it came from (block/blk-core.c).
fn block_status(errno: i32) -> (&'static str, &'static str) {
    match -errno {
        5 => ("EIO", "BLK_STS_IOERR"),
        95 => ("EOPNOTSUPP", "BLK_STS_NOTSUPP"),
        110 => ("ETIMEDOUT", "BLK_STS_TIMEOUT"),
        28 => ("ENOSPC", "BLK_STS_NOSPC"),
        67 => ("ENOLINK", "BLK_STS_TRANSPORT"),
        121 => ("EREMOTEIO", "BLK_STS_TARGET"),
        52 => ("EBADE", "BLK_STS_RESV_CONFLICT"),
        61 => ("ENODATA", "BLK_STS_MEDIUM"),
        84 => ("EILSEQ", "BLK_STS_PROTECTION"),
        12 => ("ENOMEM", "BLK_STS_RESOURCE"),
        16 => ("EBUSY", "BLK_STS_DEV_RESOURCE"),
        11 => ("EAGAIN", "BLK_STS_AGAIN"),
        19 => ("ENODEV", "BLK_STS_OFFLINE"),
        62 => ("ETIME", "BLK_STS_DURATION_LIMIT"),
        22 => ("EINVAL", "BLK_STS_INVAL"),
        109 => ("ETOOMANYREFS", "BLK_STS_ZONE_OPEN_RESOURCE"),
        75 => ("EOVERFLOW", "BLK_STS_ZONE_ACTIVE_RESOURCE"),
        _ => ("", ""),
    }
}

/// `major:minor` of a `dev_t` as block tracepoints record it (the kernel's internal 12:20 split, not the
/// user-space encoding).
pub const fn kernel_dev_numbers(dev: u32) -> (u32, u32) {
    (dev >> 20, dev & 0xfffff)
}

/// The disk name of a kernel `dev_t`, from `<sys_dev_block>/MAJ:MIN/uevent` (`DEVNAME=`), else `MAJ:MIN`.
pub fn block_device_name(sys_dev_block: &Path, dev: u32) -> String {
    let (major, minor) = kernel_dev_numbers(dev);
    let numbers = format!("{major}:{minor}");
    std::fs::read_to_string(sys_dev_block.join(&numbers).join("uevent"))
        .ok()
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix("DEVNAME=")).map(str::to_string))
        .filter(|n| !n.is_empty())
        .unwrap_or(numbers)
}

fn tracepoint_of(source: HwSource) -> &'static str {
    match source {
        HwSource::BlockRqError => "block:block_rq_error",
        HwSource::McEvent => "ras:mc_event",
        HwSource::AerEvent => "ras:aer_event",
        HwSource::MceRecord => "mce:mce_record",
        HwSource::MemoryFailure => "ras:memory_failure_event",
    }
}

/// What one raw counter means. `device_name` resolves block `dev_t`s.
/// (tracepoint, device, kind, severity, detail) of one raw counter.
type Described = (&'static str, String, String, &'static str, String);

fn describe(key: &HwErrorKey, device_name: &mut dyn FnMut(u32) -> String) -> Option<Described> {
    let source = HwSource::from_u32(key.source)?;
    let tp = tracepoint_of(source);
    Some(match source {
        HwSource::BlockRqError => {
            let (errno, status) = block_status(key.code);
            let detail =
                if errno.is_empty() { format!("errno {}", key.code) } else { format!("{errno} {status}") };
            (tp, device_name(key.unit), "io_error".into(), "error", detail)
        }
        HwSource::McEvent => {
            // enum hw_event_mc_err_type: corrected, uncorrected, fatal, info.
            let (kind, severity, detail) = match key.code {
                0 => ("memory_ce", "warning", "corrected"),
                1 => ("memory_ue", "critical", "uncorrected"),
                2 => ("memory_ue", "critical", "fatal"),
                3 => ("memory_info", "warning", "info"),
                _ => ("memory_error", "warning", ""),
            };
            let detail = if detail.is_empty() { format!("error_type {}", key.code) } else { detail.into() };
            (tp, format!("mc{}", key.unit), kind.into(), severity, detail)
        }
        HwSource::AerEvent => {
            // AER_NONFATAL 0, AER_FATAL 1, AER_CORRECTABLE 2 (include/linux/aer.h).
            let (kind, severity) = match key.code {
                2 => ("pcie_correctable", "warning"),
                0 => ("pcie_nonfatal", "error"),
                1 => ("pcie_fatal", "critical"),
                _ => ("pcie_error", "error"),
            };
            let name = String::from_utf8_lossy(key.name_bytes()).into_owned();
            let device = if name.is_empty() { "pcie".to_string() } else { name };
            (tp, device, kind.into(), severity, format!("severity {}", key.code))
        }
        HwSource::MceRecord => {
            // A corrected machine check (MCi_STATUS.UC clear) is a warning: the hardware fixed it. An
            // uncorrected one means lost data or a dying part.
            let (severity, what) =
                if key.flags & 1 != 0 { ("critical", "uncorrected") } else { ("warning", "corrected") };
            (
                tp,
                format!("cpu{}", key.unit),
                "machine_check".into(),
                severity,
                format!("bank {} {what}", key.code),
            )
        }
        HwSource::MemoryFailure => {
            // enum mf_result: ignored, failed, delayed, recovered. Only a recovered page is behind us.
            let (severity, result) = match key.code {
                0 => ("critical", "ignored"),
                1 => ("critical", "failed"),
                2 => ("critical", "delayed"),
                3 => ("warning", "recovered"),
                _ => ("critical", "unknown"),
            };
            (
                tp,
                "memory".into(),
                "memory_failure".into(),
                severity,
                format!("page type {} {result}", key.unit),
            )
        }
    })
}

/// Sums per-CPU values and turns raw keys into counts, merging keys that describe the same thing.
fn counts(
    raw: impl IntoIterator<Item = (HwErrorKey, u64)>,
    device_name: &mut dyn FnMut(u32) -> String,
) -> Vec<HwTraceCount> {
    let mut merged: BTreeMap<Described, u64> = BTreeMap::new();
    for (key, total) in raw {
        if let Some(k) = describe(&key, device_name) {
            *merged.entry(k).or_default() += total;
        }
    }
    merged
        .into_iter()
        .map(|((tracepoint, device, kind, severity, detail), total)| HwTraceCount {
            tracepoint,
            device,
            kind,
            severity: severity.to_string(),
            detail,
            total,
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum HwTraceError {
    #[error("probe object has no map `{0}`")]
    NoMap(&'static str),
    #[error("map `{map}`: {source}")]
    Map { map: &'static str, source: MapError },
}

/// The attached hardware tracepoints and their counters. Cheap to poll from any thread; dropping the last
/// handle detaches the programs.
pub struct HwTracepoints {
    statuses: Vec<HwTracepointStatus>,
    counters: PerCpuHashMap<MapData, HwErrorKey, u64>,
    // Owned so that the programs stay attached as long as this handle lives, whatever happens to the rest
    // of the probe object.
    _links: Vec<TracePointLink>,
    /// Block device names by `dev_t`, remembered once seen: a loop device that is detached later keeps the
    /// name its errors were counted under, so a count never moves from `loop3` to `7:3`.
    device_names: Mutex<HashMap<u32, String>>,
    sys_dev_block: PathBuf,
}

impl std::fmt::Debug for HwTracepoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HwTracepoints").field("statuses", &self.statuses).finish_non_exhaustive()
    }
}

impl HwTracepoints {
    /// Loads and attaches the programs of every usable tracepoint in `plan` from `ebpf` (loaded with the
    /// plan's globals). A program that fails to load or attach is reported and skipped.
    pub fn attach(ebpf: &mut Ebpf, plan: &HwPlan) -> Result<HwTracepoints, HwTraceError> {
        let map = ebpf.take_map(maps::HW_ERRORS).ok_or(HwTraceError::NoMap(maps::HW_ERRORS))?;
        let counters = PerCpuHashMap::try_from(map)
            .map_err(|source| HwTraceError::Map { map: maps::HW_ERRORS, source })?;
        let mut statuses = Vec::new();
        let mut links = Vec::new();
        for (spec, found) in &plan.entries {
            let detail = match found {
                Discovered::Missing(why) => Err(why.clone()),
                Discovered::Usable(_) => attach_one(ebpf, spec).map(|link| links.push(link)),
            };
            statuses.push(HwTracepointStatus {
                tracepoint: spec.tracepoint,
                attached: detail.is_ok(),
                detail: detail.err().unwrap_or_else(|| "attached".to_string()),
            });
        }
        Ok(HwTracepoints {
            statuses,
            counters,
            _links: links,
            device_names: Mutex::new(HashMap::new()),
            sys_dev_block: PathBuf::from(SYS_DEV_BLOCK),
        })
    }

    /// Every known tracepoint, attached or not and why.
    pub fn statuses(&self) -> &[HwTracepointStatus] {
        &self.statuses
    }

    /// The same as (`group:event`, attached, detail) triples.
    pub fn report(&self) -> Vec<(String, bool, String)> {
        self.statuses.iter().map(|s| (s.tracepoint.to_string(), s.attached, s.detail.clone())).collect()
    }

    /// Cumulative counts since attach, summed over CPUs, sorted. An entry that vanishes while the map is
    /// walked is skipped; a failed read gives what was read before it (and logs why).
    pub fn read(&self) -> Vec<HwTraceCount> {
        let mut raw = Vec::new();
        for entry in self.counters.iter() {
            match entry {
                Ok((key, per_cpu)) => raw.push((key, per_cpu.iter().sum::<u64>())),
                Err(e) => {
                    tracing::warn!(error = %e, map = maps::HW_ERRORS, "reading hardware error counters failed");
                    break;
                }
            }
        }
        // A poisoned lock only means another reader panicked mid-insert; the names are still valid.
        let mut names = self.device_names.lock().unwrap_or_else(|p| p.into_inner());
        let sys = &self.sys_dev_block;
        counts(raw, &mut |dev| names.entry(dev).or_insert_with(|| block_device_name(sys, dev)).clone())
    }
}

fn attach_one(ebpf: &mut Ebpf, spec: &Spec) -> Result<TracePointLink, String> {
    let prog: &mut TracePoint = ebpf
        .program_mut(spec.program)
        .ok_or_else(|| format!("the probe object has no program `{}`", spec.program))?
        .try_into()
        .map_err(|e| format!("program `{}`: {e}", spec.program))?;
    prog.load().map_err(|e| format!("loading program `{}`: {e}", spec.program))?;
    let id = prog.attach(spec.group, spec.event).map_err(|e| format!("attaching `{}`: {e}", spec.program))?;
    prog.take_link(id).map_err(|e| format!("taking the link of `{}`: {e}", spec.program))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cat /sys/kernel/tracing/events/block/block_rq_error/format` on this machine (6.18).
    const BLOCK_RQ_ERROR: &str = "name: block_rq_error
ID: 2106
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;
\tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned int nr_sector;\toffset:24;\tsize:4;\tsigned:0;
\tfield:int error;\toffset:28;\tsize:4;\tsigned:1;
\tfield:unsigned short ioprio;\toffset:32;\tsize:2;\tsigned:0;
\tfield:char rwbs[10];\toffset:34;\tsize:10;\tsigned:0;
\tfield:__data_loc char[] cmd;\toffset:44;\tsize:4;\tsigned:0;

print fmt: \"%d,%d %s (%s) %llu + %u %s,%u,%u [%d]\", ((unsigned int) ((REC->dev) >> 20)), ((unsigned int) ((REC->dev) & ((1U << 20) - 1))), REC->rwbs, __get_str(cmd), (unsigned long long)REC->sector, REC->nr_sector, __print_symbolic((((REC->ioprio) >> 13) & (8 - 1)), { IOPRIO_CLASS_NONE, \"none\" }, { IOPRIO_CLASS_RT, \"rt\" }, { IOPRIO_CLASS_BE, \"be\" }, { IOPRIO_CLASS_IDLE, \"idle\" }, { IOPRIO_CLASS_INVALID, \"invalid\"}), (((REC->ioprio) >> 3) & ((1 << 10) - 1)), ((REC->ioprio) & ((1 << 3) - 1)), REC->error
";

    /// `ras/mc_event/format` on this machine (6.18).
    const MC_EVENT: &str = "name: mc_event
ID: 2206
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:unsigned int error_type;\toffset:8;\tsize:4;\tsigned:0;
\tfield:__data_loc char[] msg;\toffset:12;\tsize:4;\tsigned:0;
\tfield:__data_loc char[] label;\toffset:16;\tsize:4;\tsigned:0;
\tfield:u16 error_count;\toffset:20;\tsize:2;\tsigned:0;
\tfield:u8 mc_index;\toffset:22;\tsize:1;\tsigned:0;
\tfield:s8 top_layer;\toffset:23;\tsize:1;\tsigned:1;
\tfield:s8 middle_layer;\toffset:24;\tsize:1;\tsigned:1;
\tfield:s8 lower_layer;\toffset:25;\tsize:1;\tsigned:1;
\tfield:long address;\toffset:32;\tsize:8;\tsigned:1;
\tfield:u8 grain_bits;\toffset:40;\tsize:1;\tsigned:0;
\tfield:long syndrome;\toffset:48;\tsize:8;\tsigned:1;
\tfield:__data_loc char[] driver_detail;\toffset:56;\tsize:4;\tsigned:0;

print fmt: \"%d %s error%s:%s%s on %s (mc:%d location:%d:%d:%d address:0x%08lx grain:%d syndrome:0x%08lx%s%s)\", REC->error_count, mc_event_error_type(REC->error_type), REC->error_count > 1 ? \"s\" : \"\", __get_str(msg)[0] ? \" \" : \"\", __get_str(msg), __get_str(label), REC->mc_index, REC->top_layer, REC->middle_layer, REC->lower_layer, REC->address, 1 << REC->grain_bits, REC->syndrome, __get_str(driver_detail)[0] ? \" \" : \"\", __get_str(driver_detail)
";

    /// This kernel has no mce group: the layout of a 6.x x86 kernel's `mce/mce_record/format` (fields of
    /// include/trace/events/mce.h), whitespace as tracefs prints it.
    const MCE_RECORD: &str = "name: mce_record
ID: 105
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:u64 mcgcap;\toffset:8;\tsize:8;\tsigned:0;
\tfield:u64 mcgstatus;\toffset:16;\tsize:8;\tsigned:0;
\tfield:u64 status;\toffset:24;\tsize:8;\tsigned:0;
\tfield:u64 addr;\toffset:32;\tsize:8;\tsigned:0;
\tfield:u64 misc;\toffset:40;\tsize:8;\tsigned:0;
\tfield:u64 synd;\toffset:48;\tsize:8;\tsigned:0;
\tfield:u64 ipid;\toffset:56;\tsize:8;\tsigned:0;
\tfield:u64 ip;\toffset:64;\tsize:8;\tsigned:0;
\tfield:u64 tsc;\toffset:72;\tsize:8;\tsigned:0;
\tfield:u64 ppin;\toffset:80;\tsize:8;\tsigned:0;
\tfield:u64 walltime;\toffset:88;\tsize:8;\tsigned:0;
\tfield:u32 cpu;\toffset:96;\tsize:4;\tsigned:0;
\tfield:u32 cpuid;\toffset:100;\tsize:4;\tsigned:0;
\tfield:u32 apicid;\toffset:104;\tsize:4;\tsigned:0;
\tfield:u32 socketid;\toffset:108;\tsize:4;\tsigned:0;
\tfield:u8 cs;\toffset:112;\tsize:1;\tsigned:0;
\tfield:u8 bank;\toffset:113;\tsize:1;\tsigned:0;
\tfield:u8 cpuvendor;\toffset:114;\tsize:1;\tsigned:0;
\tfield:u32 microcode;\toffset:116;\tsize:4;\tsigned:0;

print fmt: \"CPU: %d, MCGc/s: %llx/%llx, MC%d: %016llx\", REC->cpu, REC->mcgcap, REC->mcgstatus, REC->bank, REC->status
";

    /// Neither exists here: layouts from include/ras/ras_event.h (`aer_event` with its `__string` device
    /// name, `memory_failure_event` with pfn, type, result).
    const AER_EVENT: &str = "name: aer_event
ID: 1500
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:__data_loc char[] dev_name;\toffset:8;\tsize:4;\tsigned:0;
\tfield:u32 status;\toffset:12;\tsize:4;\tsigned:0;
\tfield:u8 severity;\toffset:16;\tsize:1;\tsigned:0;
\tfield:u8 tlp_header_valid;\toffset:17;\tsize:1;\tsigned:0;
\tfield:u32 tlp_header[4];\toffset:20;\tsize:16;\tsigned:0;

print fmt: \"%s PCIe Bus Error: severity=%s\", __get_str(dev_name), REC->severity
";
    const MEMORY_FAILURE_EVENT: &str = "name: memory_failure_event
ID: 1501
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:unsigned long pfn;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int type;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int result;\toffset:20;\tsize:4;\tsigned:1;

print fmt: \"pfn %#lx: recovery action for %s: %s\", REC->pfn, REC->type, REC->result
";

    #[test]
    fn parses_this_machines_block_rq_error() {
        let f = parse_format(BLOCK_RQ_ERROR).unwrap();
        assert_eq!(f.name, "block_rq_error");
        assert_eq!(f.id, Some(2106));
        assert_eq!(f.fields.len(), 11);
        let dev = f.field("dev").unwrap();
        assert_eq!((dev.c_type.as_str(), dev.offset, dev.size, dev.signed), ("dev_t", 8, 4, false));
        let error = f.field("error").unwrap();
        assert_eq!((error.c_type.as_str(), error.offset, error.size, error.signed), ("int", 28, 4, true));
        let rwbs = f.field("rwbs").unwrap();
        assert_eq!((rwbs.c_type.as_str(), rwbs.offset, rwbs.size), ("char[10]", 34, 10));
        let cmd = f.field("cmd").unwrap();
        assert_eq!((cmd.c_type.as_str(), cmd.offset), ("__data_loc char[]", 44));
        assert_eq!(f.field("common_type").unwrap().c_type, "unsigned short");
    }

    #[test]
    fn offsets_for_every_known_layout() {
        type Case = (&'static str, &'static str, &'static [(&'static str, i32)]);
        let cases: [Case; 5] = [
            ("block:block_rq_error", BLOCK_RQ_ERROR, &[("BLK_DEV_OFF", 8), ("BLK_ERROR_OFF", 28)]),
            ("ras:mc_event", MC_EVENT, &[("MC_ERROR_TYPE_OFF", 8), ("MC_INDEX_OFF", 22)]),
            ("ras:aer_event", AER_EVENT, &[("AER_DEV_NAME_OFF", 8), ("AER_SEVERITY_OFF", 16)]),
            (
                "mce:mce_record",
                MCE_RECORD,
                &[("MCE_CPU_OFF", 96), ("MCE_BANK_OFF", 113), ("MCE_STATUS_OFF", 24)],
            ),
            ("ras:memory_failure_event", MEMORY_FAILURE_EVENT, &[("MF_TYPE_OFF", 16), ("MF_RESULT_OFF", 20)]),
        ];
        for (tp, text, want) in cases {
            let spec = SPECS.iter().find(|s| s.tracepoint == tp).unwrap();
            let got = offsets_for(spec, &parse_format(text).unwrap()).unwrap();
            assert_eq!(got, want.to_vec(), "{tp}");
        }
    }

    #[test]
    fn refuses_a_field_of_another_size_or_kind() {
        let spec = &SPECS[0];
        let wide = BLOCK_RQ_ERROR
            .replace("field:dev_t dev;\toffset:8;\tsize:4;", "field:u64 dev;\toffset:8;\tsize:8;");
        let why = offsets_for(spec, &parse_format(&wide).unwrap()).unwrap_err();
        assert_eq!(why, "field `dev` is 8 bytes; the probe reads 4");
        let gone = BLOCK_RQ_ERROR.replace("int error;", "int err;");
        let why = offsets_for(spec, &parse_format(&gone).unwrap()).unwrap_err();
        assert_eq!(why, "the record has no field `error`");
        let inline = AER_EVENT.replace("__data_loc char[] dev_name", "u32 dev_name");
        let why = offsets_for(&SPECS[2], &parse_format(&inline).unwrap()).unwrap_err();
        assert_eq!(why, "field `dev_name` is `u32`, which the probe does not read");
    }

    #[test]
    fn malformed_lines_are_errors() {
        assert_eq!(parse_format("ID: 3\n"), Err(FormatError::NoName));
        let e = parse_format("name: x\n\tfield:int a;\toffset:zero;\tsize:4;\tsigned:1;\n").unwrap_err();
        assert_eq!(e, FormatError::BadNumber { line: 2, key: "offset", value: "zero".into() });
        let e = parse_format("name: x\n\tfield:int a;\toffset:0;\tsigned:1;\n").unwrap_err();
        assert!(matches!(e, FormatError::BadField { line: 2, .. }), "{e:?}");
        let e = parse_format("name: x\n\tfield:a;\toffset:0;\tsize:4;\tsigned:1;\n").unwrap_err();
        assert!(matches!(e, FormatError::BadField { line: 2, .. }), "{e:?}");
    }

    fn fake_tracefs(events: &[(&str, &str, &str)]) -> PathBuf {
        let root =
            std::env::temp_dir().join(format!("vigil-hwtrace-{}-{}", std::process::id(), events.len()));
        let _ = std::fs::remove_dir_all(&root);
        for (group, event, text) in events {
            let dir = root.join("events").join(group).join(event);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("format"), text).unwrap();
        }
        root
    }

    #[test]
    fn discovery_reports_every_tracepoint() {
        let broken =
            MC_EVENT.replace("u8 mc_index;\toffset:22;\tsize:1;", "u16 mc_index;\toffset:22;\tsize:2;");
        let root = fake_tracefs(&[("block", "block_rq_error", BLOCK_RQ_ERROR), ("ras", "mc_event", &broken)]);
        let plan = HwPlan::discover_in(&root);
        let entries: Vec<_> = plan.entries().collect();
        assert_eq!(entries.len(), 5);
        assert_eq!(
            entries[0],
            ("block:block_rq_error", &Discovered::Usable(vec![("BLK_DEV_OFF", 8), ("BLK_ERROR_OFF", 28)]))
        );
        match entries[1].1 {
            Discovered::Missing(why) => {
                assert!(why.ends_with("field `mc_index` is 2 bytes; the probe reads 1"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        for (tp, found) in &entries[2..] {
            match found {
                Discovered::Missing(why) => {
                    assert!(why.contains("this kernel has no such event"), "{tp}: {why}")
                }
                other => panic!("{tp}: {other:?}"),
            }
        }
        assert_eq!(plan.globals(), vec![("BLK_DEV_OFF", 8), ("BLK_ERROR_OFF", 28)]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn discovery_on_this_kernel_matches_its_tracefs() {
        // Whatever the kernel has, every known tracepoint is reported, and usable exactly when its
        // directory exists (on these VMs: block_rq_error and mc_event).
        let plan = HwPlan::discover();
        let Some(root) = plan.tracefs().map(Path::to_path_buf) else {
            assert!(plan.entries().all(|(_, d)| matches!(d, Discovered::Missing(_))));
            return;
        };
        for spec in &SPECS {
            let exists = root.join("events").join(spec.group).join(spec.event).is_dir();
            let (_, found) = plan.entries().find(|(tp, _)| *tp == spec.tracepoint).unwrap();
            assert_eq!(matches!(found, Discovered::Usable(_)), exists, "{}: {found:?}", spec.tracepoint);
        }
    }

    #[test]
    fn kernel_dev_t_and_names() {
        assert_eq!(kernel_dev_numbers((7 << 20) | 3), (7, 3));
        assert_eq!(kernel_dev_numbers((259 << 20) | 0xfffff), (259, 0xfffff));
        let root = std::env::temp_dir().join(format!("vigil-devblock-{}", std::process::id()));
        std::fs::create_dir_all(root.join("7:3")).unwrap();
        std::fs::write(root.join("7:3/uevent"), "MAJOR=7\nMINOR=3\nDEVNAME=loop3\nDEVTYPE=disk\n").unwrap();
        assert_eq!(block_device_name(&root, (7 << 20) | 3), "loop3");
        assert_eq!(block_device_name(&root, (8 << 20) | 16), "8:16");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn counts_name_devices_kinds_and_severities() {
        let mut aer = HwErrorKey::new(HwSource::AerEvent, 0, 2);
        aer.name[..12].copy_from_slice(b"0000:00:1c.0");
        let mut mce_uc = HwErrorKey::new(HwSource::MceRecord, 1, 4);
        mce_uc.flags = 1;
        let raw = vec![
            (HwErrorKey::new(HwSource::BlockRqError, (7 << 20) | 3, -5), 2),
            (HwErrorKey::new(HwSource::BlockRqError, (7 << 20) | 3, -61), 1),
            (HwErrorKey::new(HwSource::McEvent, 0, 0), 5),
            (HwErrorKey::new(HwSource::McEvent, 1, 2), 1),
            (aer, 3),
            (mce_uc, 1),
            (HwErrorKey::new(HwSource::MceRecord, 0, 4), 7),
            (HwErrorKey::new(HwSource::MemoryFailure, 6, 3), 1),
            (HwErrorKey { source: 99, ..HwErrorKey::new(HwSource::McEvent, 0, 0) }, 1),
        ];
        let got = counts(raw, &mut |dev| if dev == (7 << 20) | 3 { "loop3".into() } else { "?".into() });
        let got: Vec<_> = got
            .iter()
            .map(|c| {
                (
                    c.tracepoint,
                    c.device.as_str(),
                    c.kind.as_str(),
                    c.severity.as_str(),
                    c.detail.as_str(),
                    c.total,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("block:block_rq_error", "loop3", "io_error", "error", "EIO BLK_STS_IOERR", 2),
                ("block:block_rq_error", "loop3", "io_error", "error", "ENODATA BLK_STS_MEDIUM", 1),
                ("mce:mce_record", "cpu0", "machine_check", "warning", "bank 4 corrected", 7),
                ("mce:mce_record", "cpu1", "machine_check", "critical", "bank 4 uncorrected", 1),
                ("ras:aer_event", "0000:00:1c.0", "pcie_correctable", "warning", "severity 2", 3),
                ("ras:mc_event", "mc0", "memory_ce", "warning", "corrected", 5),
                ("ras:mc_event", "mc1", "memory_ue", "critical", "fatal", 1),
                (
                    "ras:memory_failure_event",
                    "memory",
                    "memory_failure",
                    "warning",
                    "page type 6 recovered",
                    1
                ),
            ]
        );
    }

    #[test]
    fn handle_is_shareable_across_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<HwTracepoints>();
    }

    /// Every hardware program passes this kernel's verifier, also those whose event this kernel lacks: the
    /// object is loaded with the offsets of each layout above (with offsets left at -1 the verifier would
    /// prune everything after the check and prove nothing). Needs root, as CI has.
    #[test]
    fn every_hardware_program_passes_the_verifier() {
        let layouts = [BLOCK_RQ_ERROR, MC_EVENT, AER_EVENT, MCE_RECORD, MEMORY_FAILURE_EVENT];
        let globals: Vec<(&'static str, i32)> = SPECS
            .iter()
            .zip(layouts)
            .flat_map(|(spec, text)| offsets_for(spec, &parse_format(text).unwrap()).unwrap())
            .collect();
        let mut loader = aya::EbpfLoader::new();
        for (name, offset) in &globals {
            loader.override_global(name, offset, true);
        }
        let mut ebpf = loader.load(crate::PROBES_OBJECT).expect("probe object loads (root)");
        for spec in &SPECS {
            let prog: &mut TracePoint = ebpf.program_mut(spec.program).unwrap().try_into().unwrap();
            prog.load().unwrap_or_else(|e| panic!("verifier refused `{}`: {e:?}", spec.program));
        }
    }

    proptest::proptest! {
        #[test]
        fn parser_never_panics(text in "(name: [a-z_]{0,8}\n|ID: [0-9x]{0,4}\n|\tfield:[a-z_ \\[\\]0-9]{0,20};\toffset:[0-9a]{0,3};\tsize:[0-9]{0,2};\tsigned:[01]?;\n|[ -~]{0,30}\n){0,8}") {
            let _ = parse_format(&text);
        }

        #[test]
        fn parses_any_well_formed_field(name in "[a-z_][a-z0-9_]{0,15}", offset in 0u32..4096, size in 1u32..64, signed: bool, array in proptest::option::of(1u32..32)) {
            let decl = match array { Some(n) => format!("char {name}[{n}]"), None => format!("unsigned int {name}") };
            let text = format!("name: ev\nformat:\n\tfield:{decl};\toffset:{offset};\tsize:{size};\tsigned:{};\n", u8::from(signed));
            let f = parse_format(&text).unwrap();
            proptest::prop_assert_eq!(f.fields.len(), 1);
            let got = &f.fields[0];
            proptest::prop_assert_eq!(&got.name, &name);
            proptest::prop_assert_eq!((got.offset, got.size, got.signed), (offset, size, signed));
        }
    }
}
