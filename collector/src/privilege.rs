//! The one check before touching the kernel: are we root, or do we hold the capabilities the probes need?
//! A person who runs `vigil` unprivileged gets one sentence naming what is missing, not an errno.

/// Capabilities the collector needs (numbers from linux/capability.h).
const NEEDED: [(u32, &str); 3] = [(21, "CAP_SYS_ADMIN"), (38, "CAP_PERFMON"), (39, "CAP_BPF")];

/// Names of the needed capabilities missing from the effective set in a `/proc/self/status` text.
pub fn missing_capabilities(status: &str) -> Vec<&'static str> {
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    // CAP_SYS_ADMIN alone also allows BPF and perf on kernels that predate CAP_BPF/CAP_PERFMON.
    if eff & (1 << 21) != 0 {
        return Vec::new();
    }
    NEEDED.iter().filter(|(bit, _)| eff & (1u64 << bit) == 0).map(|(_, n)| *n).collect()
}

/// `Err(sentence)` when this process cannot load the probes.
pub fn check() -> Result<(), String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let missing = missing_capabilities(&status);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "vigil needs root (or the capabilities {}) to load its kernel probes and manage cgroups; \
             this process lacks {}. Run it with sudo or grant the capabilities.",
            NEEDED.iter().map(|(_, n)| *n).collect::<Vec<_>>().join(", "),
            missing.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_has_everything() {
        assert!(missing_capabilities("CapEff:\t000001ffffffffff\n").is_empty());
    }

    #[test]
    fn unprivileged_lacks_all() {
        assert_eq!(
            missing_capabilities("Name:\tx\nCapEff:\t0000000000000000\n"),
            vec!["CAP_SYS_ADMIN", "CAP_PERFMON", "CAP_BPF"]
        );
        assert_eq!(missing_capabilities("garbage"), vec!["CAP_SYS_ADMIN", "CAP_PERFMON", "CAP_BPF"]);
    }

    #[test]
    fn bpf_and_perfmon_without_sys_admin() {
        let eff = (1u64 << 38) | (1u64 << 39);
        assert_eq!(missing_capabilities(&format!("CapEff:\t{eff:016x}\n")), vec!["CAP_SYS_ADMIN"]);
    }
}
