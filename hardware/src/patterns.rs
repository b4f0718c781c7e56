//! Which kernel log records are hardware events: the patterns of `hardware/patterns.yaml` (embedded as the
//! defaults) and of the files the config's `hardware.patterns` names, which replace a default of the same
//! name or add new ones after them. A file is read like a rule file: serde-saphyr for the shape (the first
//! YAML or type error, with its position), then one pass that collects every semantic mistake (a bad regex,
//! an unknown severity, a kind that is not snake_case, a name used twice, a template naming a group the
//! regex lacks) as `file:line:column: key.path: message`.
//!
//! Matching is one pass of a [`RegexSet`] over the message, then the captures of the first pattern that
//! matched, so the cost per record does not grow with the number of patterns.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use regex::{Regex, RegexSet};
use serde::Deserialize;
use serde_saphyr::Spanned;
use vigil_core::yaml::from_yaml;
use vigil_core::{ConfigIssue, render_issues};

use crate::event::{Kind, Severity};

/// The embedded default patterns.
pub const DEFAULT_PATTERNS: &str = include_str!("../patterns.yaml");

/// What the defaults are called in issues.
const DEFAULT_FILE: &str = "hardware/patterns.yaml (embedded)";

/// What is wrong with a pattern file.
#[derive(Debug, thiserror::Error)]
pub enum PatternsError {
    #[error("cannot read pattern file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}", render_issues(issues))]
    Invalid { issues: Vec<ConfigIssue> },
    #[error("the patterns together do not compile: {message}")]
    TooBig { message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    patterns: Vec<RawPattern>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPattern {
    name: Spanned<String>,
    #[serde(rename = "match")]
    matches: Spanned<String>,
    kind: Spanned<String>,
    severity: Spanned<String>,
    device: Option<Spanned<String>>,
}

/// One pattern, checked.
#[derive(Clone, Debug)]
pub struct Pattern {
    pub name: String,
    pub regex: Regex,
    pub kind: Kind,
    pub severity: Severity,
    /// The device when the `device` group is missing or did not match.
    pub device: Option<String>,
    /// The file it came from.
    pub file: String,
}

/// A record that matched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Matched<'p> {
    pub pattern: &'p str,
    pub kind: &'p Kind,
    pub severity: Severity,
    pub device: String,
    /// The `count` group, or 1.
    pub count: u64,
}

/// The patterns in force, in order (the defaults, then new names from the files).
#[derive(Clone, Debug)]
pub struct Patterns {
    list: Vec<Pattern>,
    set: RegexSet,
}

impl Patterns {
    /// The embedded defaults, then each of `files` over them.
    pub fn load(files: &[PathBuf]) -> Result<Patterns, PatternsError> {
        let mut texts = vec![(DEFAULT_FILE.to_string(), DEFAULT_PATTERNS.to_string())];
        for path in files {
            let text = std::fs::read_to_string(path)
                .map_err(|source| PatternsError::Read { path: path.clone(), source })?;
            texts.push((path.display().to_string(), text));
        }
        Self::from_texts(&texts)
    }

    /// `(file name, text)` pairs, later files overriding earlier ones by name. Every file's mistakes are
    /// reported together.
    pub fn from_texts(texts: &[(String, String)]) -> Result<Patterns, PatternsError> {
        let mut list: Vec<Pattern> = Vec::new();
        let mut issues = Vec::new();
        for (file, text) in texts {
            match check_str(text, file) {
                Ok(patterns) => {
                    for p in patterns {
                        match list.iter_mut().find(|q| q.name == p.name) {
                            Some(slot) => *slot = p,
                            None => list.push(p),
                        }
                    }
                }
                Err(mut more) => issues.append(&mut more),
            }
        }
        if !issues.is_empty() {
            return Err(PatternsError::Invalid { issues });
        }
        let set = RegexSet::new(list.iter().map(|p| p.regex.as_str()))
            .map_err(|e| PatternsError::TooBig { message: e.to_string() })?;
        Ok(Patterns { list, set })
    }

    pub fn list(&self) -> &[Pattern] {
        &self.list
    }

    /// The first pattern that matches `message`, with the device and count it names.
    pub fn find(&self, message: &str) -> Option<Matched<'_>> {
        let first = self.set.matches(message).into_iter().next()?;
        let p = &self.list[first];
        let caps = p.regex.captures(message)?;
        let device = match caps.name("device").map(|m| m.as_str()).filter(|d| !d.is_empty()) {
            Some(d) => d.to_string(),
            None => p.device.as_deref().map_or_else(|| "host".to_string(), |t| fill(t, &caps)),
        };
        let count = caps.name("count").and_then(|m| m.as_str().parse().ok()).filter(|&n| n > 0).unwrap_or(1);
        Some(Matched { pattern: &p.name, kind: &p.kind, severity: p.severity, device, count })
    }
}

/// `template` with each `{group}` replaced by that group's text (empty when it did not match).
fn fill(template: &str, caps: &regex::Captures<'_>) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        match rest[open..].find('}') {
            Some(close) => {
                let name = &rest[open + 1..open + close];
                out.push_str(caps.name(name).map_or("", |m| m.as_str()));
                rest = &rest[open + close + 1..];
            }
            None => {
                out.push_str(&rest[open..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// The `{group}` names a template uses; `Err` names a `{` that is never closed.
fn template_groups(template: &str) -> Result<Vec<&str>, String> {
    let mut groups = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            return Err(format!("template {template:?} opens `{{` without closing it"));
        };
        groups.push(&rest[open + 1..open + close]);
        rest = &rest[open + close + 1..];
    }
    Ok(groups)
}

/// Reads and checks one pattern file; every mistake in it at once.
pub fn check_file(path: &Path) -> Result<Vec<Pattern>, PatternsError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| PatternsError::Read { path: path.to_path_buf(), source })?;
    check_str(&text, &path.display().to_string()).map_err(|issues| PatternsError::Invalid { issues })
}

fn issue<T>(file: &str, s: &Spanned<T>, path: String, message: impl Into<String>) -> ConfigIssue {
    ConfigIssue {
        file: file.to_string(),
        line: s.referenced.line(),
        column: s.referenced.column(),
        path,
        message: message.into(),
    }
}

fn check_str(text: &str, file: &str) -> Result<Vec<Pattern>, Vec<ConfigIssue>> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let raw: RawFile = from_yaml(text, file).map_err(|issue| vec![issue])?;
    let mut issues = Vec::new();
    let mut out = Vec::new();
    let mut names = HashSet::new();
    for (i, r) in raw.patterns.iter().enumerate() {
        let p = format!("patterns[{i}]");
        let mut at = |s: &Spanned<String>, field: &str, message: String| {
            issues.push(issue(file, s, format!("{p}.{field}"), message));
        };
        let name = r.name.value.trim();
        let mut ok = true;
        if name.is_empty() || name.contains(char::is_whitespace) {
            at(
                &r.name,
                "name",
                format!("{:?} is not a pattern name: give one word (like block-io-error)", r.name.value),
            );
            ok = false;
        } else if !names.insert(name) {
            at(&r.name, "name", format!("`{name}` is already the name of a pattern in this file"));
            ok = false;
        }
        let regex = match Regex::new(&r.matches.value) {
            Ok(re) => Some(re),
            Err(e) => {
                // The regex crate's message spans lines (it draws the spot); one line is enough here.
                let why =
                    e.to_string().lines().rfind(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string();
                at(&r.matches, "match", format!("{:?} is not a regular expression: {why}", r.matches.value));
                None
            }
        };
        let kind = Kind::new(&r.kind.value).map_err(|e| at(&r.kind, "kind", e.to_string())).ok();
        let severity = Severity::from_name(&r.severity.value);
        if severity.is_none() {
            at(
                &r.severity,
                "severity",
                format!(
                    "unknown severity `{}`; expected one of info, warning, error, critical",
                    r.severity.value
                ),
            );
        }
        if let (Some(template), Some(re)) = (&r.device, &regex) {
            match template_groups(&template.value) {
                Ok(groups) => {
                    let known: Vec<&str> = re.capture_names().flatten().collect();
                    for g in groups {
                        if !known.contains(&g) {
                            ok = false;
                            at(
                                template,
                                "device",
                                format!(
                                    "the template names `{{{g}}}`, a group `match` does not have (it has: {})",
                                    if known.is_empty() { "none".to_string() } else { known.join(", ") }
                                ),
                            );
                        }
                    }
                }
                Err(why) => {
                    ok = false;
                    at(template, "device", why);
                }
            }
            if template.value.trim().is_empty() {
                ok = false;
                at(template, "device", "an empty device name: leave `device` out for `host`".to_string());
            }
        }
        if let (true, Some(regex), Some(kind), Some(severity)) = (ok, regex, kind, severity) {
            out.push(Pattern {
                name: name.to_string(),
                regex,
                kind,
                severity,
                device: r.device.as_ref().map(|d| d.value.clone()),
                file: file.to_string(),
            });
        }
    }
    if issues.is_empty() {
        Ok(out)
    } else {
        issues.sort_by_key(|i| (i.line, i.column));
        Err(issues)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Patterns {
        Patterns::from_texts(&[(DEFAULT_FILE.into(), DEFAULT_PATTERNS.into())])
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// `(line, pattern, kind, severity, device, count)`: real kernel lines, one or more per pattern.
    const LINES: &[(&str, &str, &str, Severity, &str, u64)] = &[
        (
            "I/O error, dev loop7, sector 8 op 0x0:(READ) flags 0x0 phys_seg 1 prio class 2",
            "block-io-error",
            "io_error",
            Severity::Error,
            "loop7",
            1,
        ),
        (
            "blk_update_request: I/O error, dev sda, sector 2048 op 0x1:(WRITE) flags 0x800 phys_seg 1 prio class 0",
            "block-io-error",
            "io_error",
            Severity::Error,
            "sda",
            1,
        ),
        (
            "critical medium error, dev sdb, sector 123456 op 0x0:(READ) flags 0x80700 phys_seg 8 prio class 0",
            "block-device-error",
            "io_error",
            Severity::Error,
            "sdb",
            1,
        ),
        (
            "Buffer I/O error on dev sdb1, logical block 0, async page read",
            "buffer-io-error",
            "io_error",
            Severity::Error,
            "sdb1",
            1,
        ),
        (
            "Buffer I/O error on dev dm-0, logical block 1234, lost async page write",
            "buffer-io-error",
            "io_error",
            Severity::Error,
            "dm-0",
            1,
        ),
        (
            "EDAC MC0: 1 CE memory read error on CPU_SrcID#0_Ha#0_Chan#0_DIMM#0 (channel:0 slot:0 page:0x41d6e7 \
             offset:0x0 grain:32 syndrome:0x0 - area:DRAM err_code:0001:0090 socket:0 ha:0 channel_mask:1 rank:0)",
            "edac-ce",
            "memory_ce",
            Severity::Warning,
            "mc0",
            1,
        ),
        (
            "EDAC MC1: 3 CE on DIMM_A1 (node:0 card:0 module:0 page:0x0 offset:0x0 grain:8 syndrome:0x0)",
            "edac-ce",
            "memory_ce",
            Severity::Warning,
            "mc1",
            3,
        ),
        (
            "EDAC MC0: 1 UE memory read error on CPU_SrcID#0_Ha#0_Chan#1_DIMM#0 (channel:1 slot:0 page:0x1234 \
             offset:0x0 grain:32 - area:DRAM err_code:0001:0091)",
            "edac-ue",
            "memory_ue",
            Severity::Critical,
            "mc0",
            1,
        ),
        (
            "mce: [Hardware Error]: CPU 2: Machine Check Exception: 5 Bank 9: be00000000800400",
            "mce-exception",
            "machine_check",
            Severity::Critical,
            "cpu2",
            1,
        ),
        (
            "mce: [Hardware Error]: CPU 0: Machine Check: 0 Bank 5: bc00000000010135",
            "mce-corrected",
            "machine_check",
            Severity::Warning,
            "cpu0",
            1,
        ),
        (
            "mce: [Hardware Error]: Machine check events logged",
            "mce-events-logged",
            "machine_check",
            Severity::Warning,
            "host",
            1,
        ),
        (
            "nvme nvme0: I/O tag 12 (100c) opcode 0x2 (Read) QID 3 timeout, aborting req_op:READ(0) size:4096",
            "nvme-timeout",
            "nvme_timeout",
            Severity::Error,
            "nvme0",
            1,
        ),
        (
            "nvme nvme1: I/O tag 5 (0005) opcode 0x6 (Admin Cmd) QID 0 timeout, reset controller",
            "nvme-timeout",
            "nvme_timeout",
            Severity::Error,
            "nvme1",
            1,
        ),
        (
            "nvme nvme0: I/O 123 QID 4 timeout, aborting",
            "nvme-timeout",
            "nvme_timeout",
            Severity::Error,
            "nvme0",
            1,
        ),
        (
            "nvme nvme0: controller is down; will reset: CSTS=0xffffffff, PCI_STATUS=0xffff",
            "nvme-controller-down",
            "nvme_reset",
            Severity::Error,
            "nvme0",
            1,
        ),
        (
            "nvme nvme0: Device not ready; aborting reset, CSTS=0x1",
            "nvme-not-ready",
            "device_lost",
            Severity::Critical,
            "nvme0",
            1,
        ),
        (
            "nvme nvme2: Removing after probe failure status: -19",
            "nvme-removed",
            "device_lost",
            Severity::Critical,
            "nvme2",
            1,
        ),
        (
            "NVRM: Xid (PCI:0000:3b:00): 79, pid=2875, name=python3, GPU has fallen off the bus.",
            "fell-off-the-bus",
            "device_lost",
            Severity::Critical,
            "0000:3b:00",
            1,
        ),
        (
            "NVRM: GPU has fallen off the bus.",
            "fell-off-the-bus",
            "device_lost",
            Severity::Critical,
            "host",
            1,
        ),
        (
            "xhci_hcd 0000:00:14.0: xHCI host controller not responding, assume dead",
            "xhci-dead",
            "device_lost",
            Severity::Critical,
            "0000:00:14.0",
            1,
        ),
        (
            "igb 0000:03:00.0 enp3s0: PCIe link lost",
            "pcie-link-lost",
            "device_lost",
            Severity::Critical,
            "0000:03:00.0",
            1,
        ),
        (
            "CPU3: Core temperature is above threshold, cpu clock is throttled (total events = 4511)",
            "thermal-throttle",
            "thermal_throttle",
            Severity::Warning,
            "cpu3",
            1,
        ),
        (
            "mce: CPU0: Package temperature above threshold, cpu clock throttled (total events = 38267)",
            "thermal-throttle",
            "thermal_throttle",
            Severity::Warning,
            "cpu0",
            1,
        ),
        (
            "INFO: task jbd2/sda1-8:312 blocked for more than 120 seconds.",
            "hung-task",
            "hung_task",
            Severity::Error,
            "host",
            1,
        ),
        (
            "Out of memory: Killed process 2592 (stress) total-vm:8426600kB, anon-rss:7893868kB, file-rss:4kB, \
             shmem-rss:0kB, UID:0 pgtables:15472kB oom_score_adj:0",
            "oom-kill",
            "oom_kill",
            Severity::Warning,
            "memory",
            1,
        ),
        (
            "Memory cgroup out of memory: Killed process 1234 (python3) total-vm:1024000kB, anon-rss:524288kB, \
             file-rss:0kB, shmem-rss:0kB, UID:1000 pgtables:1100kB oom_score_adj:0",
            "memcg-oom-kill",
            "oom_kill",
            Severity::Info,
            "memory",
            1,
        ),
    ];

    #[test]
    fn every_default_pattern_matches_real_kernel_lines() {
        let p = defaults();
        for (line, name, kind, severity, device, count) in LINES {
            let m = p.find(line).unwrap_or_else(|| panic!("no pattern matched {line:?}"));
            assert_eq!(
                (m.pattern, m.kind.as_str(), m.severity, m.device.as_str(), m.count),
                (*name, *kind, *severity, *device, *count),
                "{line}"
            );
        }
        for pattern in p.list() {
            assert!(LINES.iter().any(|l| l.1 == pattern.name), "no real line tests {}", pattern.name);
        }
    }

    #[test]
    fn ordinary_lines_match_nothing() {
        let p = defaults();
        for line in [
            "EXT4-fs (sda1): mounted filesystem with ordered data mode. Quota mode: none.",
            "nvme nvme0: 8/0/0 default/read/poll queues",
            "CPU3: Core temperature/speed normal (total events = 4511)",
            "e1000e: eth0 NIC Link is Up 1000 Mbps Full Duplex, Flow Control: Rx/Tx",
            "EDAC MC: Ver: 3.0.0",
            "audit: type=1400 audit(0.0:1): apparmor=\"STATUS\" operation=\"profile_load\"",
        ] {
            assert_eq!(p.find(line), None, "{line}");
        }
    }

    #[test]
    fn a_file_overrides_by_name_and_adds_after() {
        let mine = "\
patterns:
  - name: block-io-error
    match: 'I/O error, dev (?P<device>\\S+?),'
    kind: io_error
    severity: critical
  - name: raid-degraded
    match: 'md/raid\\d+:(?P<md>md\\d+): Disk failure'
    kind: raid_degraded
    severity: error
    device: '{md}'
";
        let p = Patterns::from_texts(&[
            (DEFAULT_FILE.into(), DEFAULT_PATTERNS.into()),
            ("mine.yaml".into(), mine.into()),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.list().len(), defaults().list().len() + 1);
        assert_eq!(p.list()[0].name, "block-io-error", "an override keeps its place");
        assert_eq!(p.list()[0].file, "mine.yaml");
        let m = p.find("I/O error, dev sdc, sector 1").unwrap();
        assert_eq!((m.severity, m.device.as_str()), (Severity::Critical, "sdc"));
        let m = p.find("md/raid1:md0: Disk failure on sdb1, disabling device.").unwrap();
        assert_eq!((m.kind.as_str(), m.device.as_str()), ("raid_degraded", "md0"));
    }

    #[test]
    fn every_mistake_is_located() {
        let text = "\
patterns:
  - name: a
    match: 'ok (?P<x>\\d+)'
    kind: Disk
    severity: loud
    device: 'd{y}'
  - name: a
    match: '(unclosed'
    kind: io_error
    severity: error
  - name: 'two words'
    match: x
    kind: io_error
    severity: info
    device: '{x'
";
        let e = Patterns::from_texts(&[("p.yaml".into(), text.into())]).unwrap_err().to_string();
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(
            lines,
            [
                "p.yaml:4:11: patterns[0].kind: `Disk` is not a kind name: write it in snake_case ([a-z][a-z0-9_]*, \
                 at most 64 characters)",
                "p.yaml:5:15: patterns[0].severity: unknown severity `loud`; expected one of info, warning, error, \
                 critical",
                "p.yaml:6:13: patterns[0].device: the template names `{y}`, a group `match` does not have (it has: x)",
                "p.yaml:7:11: patterns[1].name: `a` is already the name of a pattern in this file",
                "p.yaml:8:12: patterns[1].match: \"(unclosed\" is not a regular expression: error: unclosed group",
                "p.yaml:11:11: patterns[2].name: \"two words\" is not a pattern name: give one word (like \
                 block-io-error)",
                "p.yaml:15:13: patterns[2].device: template \"{x\" opens `{` without closing it",
            ],
            "{e}"
        );
        let e = Patterns::from_texts(&[("p.yaml".into(), "patterns:\n  - name: a\n    mtch: x\n".into())])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("p.yaml:3:5: ") && e.contains("unknown field `mtch`"), "{e}");
    }

    #[test]
    fn files_are_read_or_refused_by_name() {
        let e = Patterns::load(&[PathBuf::from("/nonexistent/mine.yaml")]).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/mine.yaml"), "{e}");
        assert_eq!(Patterns::load(&[]).unwrap().list().len(), defaults().list().len());
    }
}
