//! Loads `vigil-probes` into the kernel, attaches every program, and reads the per-cgroup maps back.
//!
//! The probes count per CPU (the bpf target has no atomic add here, DESIGN.md §3); [`Probes::read`] sums the
//! CPUs. Entries of cgroups that no longer exist are removed with [`Probes::forget`], so the maps hold only
//! live cgroups.
//!
//! The hardware-error tracepoints live in the same object (one set of maps, one load) but are attached
//! apart, by [`crate::hwtrace`]: each only where the kernel has it, and a failure there is reported, never
//! fatal to the probes above.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use aya::maps::{MapData, MapError, PerCpuArray, PerCpuHashMap};
use aya::programs::{ProgramError, RawTracePoint};
use aya::{Ebpf, EbpfError, EbpfLoader};
use vigil_common::{CpuStats, FaultCounts, MemcgCounts, PROBE_COUNT, maps};

use crate::btf::{self, BtfError, VmEventItems};
use crate::hwtrace::{HwPlan, HwTracepoints};

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("reading the kernel's BTF: {0}")]
    Btf(#[from] BtfError),
    #[error("loading the probe object into the kernel: {0}")]
    Load(#[source] EbpfError),
    #[error("probe object has no program `{0}`")]
    NoProgram(&'static str),
    #[error("probe object has no map `{0}`")]
    NoMap(&'static str),
    #[error("preparing program `{program}`: {source}")]
    Program { program: &'static str, source: ProgramError },
    #[error("attaching `{program}` to {target}: {source}")]
    Attach { program: &'static str, target: String, source: ProgramError },
    #[error("map `{map}`: {source}")]
    Map { map: &'static str, source: MapError },
}

/// Everything the probes counted, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProbeReadout {
    /// By v2 cgroup id.
    pub faults: HashMap<u64, FaultCounts>,
    /// By memory cgroup id.
    pub memcg: HashMap<u64, MemcgCounts>,
    /// By v2 cgroup id.
    pub cpu: HashMap<u64, CpuStats>,
    pub errors: [u64; PROBE_COUNT as usize],
}

/// The loaded, attached probes. Dropping it detaches them.
pub struct Probes {
    // Owns the programs and their links.
    _ebpf: Ebpf,
    faults: PerCpuHashMap<MapData, u64, FaultCounts>,
    memcg: PerCpuHashMap<MapData, u64, MemcgCounts>,
    cpu: PerCpuHashMap<MapData, u64, CpuStats>,
    errors: PerCpuArray<MapData, u64>,
    pub items: VmEventItems,
    hardware: Option<Arc<HwTracepoints>>,
}

fn sum_faults(values: &[FaultCounts]) -> FaultCounts {
    values
        .iter()
        .fold(FaultCounts::default(), |a, v| FaultCounts { all: a.all + v.all, major: a.major + v.major })
}

fn sum_memcg(values: &[MemcgCounts]) -> MemcgCounts {
    values.iter().fold(MemcgCounts::default(), |a, v| MemcgCounts {
        swap_in_pages: a.swap_in_pages + v.swap_in_pages,
        swap_out_pages: a.swap_out_pages + v.swap_out_pages,
        major_faults: a.major_faults + v.major_faults,
    })
}

fn sum_cpu(values: &[CpuStats]) -> CpuStats {
    let mut s = CpuStats::default();
    for v in values {
        s.on_cpu_ns += v.on_cpu_ns;
        s.runq_delay_ns += v.runq_delay_ns;
        s.runq_count += v.runq_count;
        for (a, b) in s.runq_hist.iter_mut().zip(v.runq_hist.iter()) {
            *a += b;
        }
    }
    s
}

impl Probes {
    /// Loads and attaches all probes: memcg events (page faults, swap) and scheduler switches.
    pub fn load() -> Result<Probes, ProbeError> {
        let layout = btf::kernel_layout(Path::new(btf::VMLINUX_BTF))?;
        let items = layout.items;
        let as_i32 = |v: u32| v as i32;
        let (exec_off, delay_off) =
            (as_i32(layout.task_exec_runtime_offset), as_i32(layout.task_run_delay_offset));
        let (pid_off, css_off, cg_off, kn_off, id_off) = (
            as_i32(layout.task_pid_offset),
            as_i32(layout.memcg_css_offset),
            as_i32(layout.css_cgroup_offset),
            as_i32(layout.cgroup_kn_offset),
            as_i32(layout.kn_id_offset),
        );
        // The hardware tracepoints' record offsets are globals of the same object, so they are looked up
        // before it loads.
        let hw_plan = HwPlan::discover();
        let hw_globals = hw_plan.globals();
        let mut loader = EbpfLoader::new();
        for (name, offset) in &hw_globals {
            loader.override_global(name, offset, true);
        }
        let mut ebpf = loader
            .override_global("PSWPIN_ITEM", &items.pswpin, true)
            .override_global("PSWPOUT_ITEM", &items.pswpout, true)
            .override_global("PGMAJFAULT_ITEM", &items.pgmajfault, true)
            .override_global("PGFAULT_ITEM", &items.pgfault, true)
            .override_global("TASK_PID_OFF", &pid_off, true)
            .override_global("TASK_EXEC_RUNTIME_OFF", &exec_off, true)
            .override_global("TASK_RUN_DELAY_OFF", &delay_off, true)
            .override_global("MEMCG_CSS_OFF", &css_off, true)
            .override_global("CSS_CGROUP_OFF", &cg_off, true)
            .override_global("CGROUP_KN_OFF", &kn_off, true)
            .override_global("KN_ID_OFF", &id_off, true)
            .load(crate::PROBES_OBJECT)
            .map_err(ProbeError::Load)?;

        // Raw tracepoints: the program gets the tracepoint's arguments, no trace record is formatted.
        for (program, targets) in
            [("memcg_events", &["count_memcg_events"][..]), ("sched_switch", &["sched_switch"][..])]
        {
            let prog: &mut RawTracePoint = ebpf
                .program_mut(program)
                .ok_or(ProbeError::NoProgram(program))?
                .try_into()
                .map_err(|source| ProbeError::Program { program, source })?;
            prog.load().map_err(|source| ProbeError::Program { program, source })?;
            for name in targets {
                prog.attach(name).map_err(|source| ProbeError::Attach {
                    program,
                    target: (*name).to_string(),
                    source,
                })?;
            }
        }

        fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, ProbeError>
        where
            T: TryFrom<aya::maps::Map, Error = MapError>,
        {
            let map = ebpf.take_map(name).ok_or(ProbeError::NoMap(name))?;
            T::try_from(map).map_err(|source| ProbeError::Map { map: name, source })
        }
        let hardware = match HwTracepoints::attach(&mut ebpf, &hw_plan) {
            Ok(h) => Some(Arc::new(h)),
            Err(e) => {
                tracing::warn!(error = %e, "hardware error tracepoints unavailable; the other probes run");
                None
            }
        };
        Ok(Probes {
            hardware,
            faults: take(&mut ebpf, maps::FAULTS)?,
            memcg: take(&mut ebpf, maps::MEMCG)?,
            cpu: take(&mut ebpf, maps::CPU)?,
            errors: take(&mut ebpf, maps::ERRORS)?,
            _ebpf: ebpf,
            items,
        })
    }

    /// The hardware-error tracepoints (None when the object's counter map could not be opened). They stay
    /// attached while a handle lives, also after these probes are dropped.
    pub fn hardware(&self) -> Option<Arc<HwTracepoints>> {
        self.hardware.clone()
    }

    /// Reads every map, summing CPUs. An entry that vanishes mid-iteration is skipped.
    pub fn read(&self) -> Result<ProbeReadout, ProbeError> {
        let mut out = ProbeReadout::default();
        for entry in self.faults.iter() {
            let (k, v) = entry.map_err(|source| ProbeError::Map { map: maps::FAULTS, source })?;
            out.faults.insert(k, sum_faults(&v));
        }
        for entry in self.memcg.iter() {
            let (k, v) = entry.map_err(|source| ProbeError::Map { map: maps::MEMCG, source })?;
            out.memcg.insert(k, sum_memcg(&v));
        }
        for entry in self.cpu.iter() {
            let (k, v) = entry.map_err(|source| ProbeError::Map { map: maps::CPU, source })?;
            out.cpu.insert(k, sum_cpu(&v));
        }
        for (i, slot) in out.errors.iter_mut().enumerate() {
            let v = self
                .errors
                .get(&(i as u32), 0)
                .map_err(|source| ProbeError::Map { map: maps::ERRORS, source })?;
            *slot = v.iter().sum();
        }
        Ok(out)
    }

    /// Drops the entries of cgroups that are gone (`cgroup_ids` from the v2-keyed maps, `memcg_ids` from the
    /// memcg map). Missing keys are fine: the probe may never have seen that cgroup.
    pub fn forget(&mut self, cgroup_ids: &[u64], memcg_ids: &[u64]) {
        for id in cgroup_ids {
            let _ = self.faults.remove(id);
            let _ = self.cpu.remove(id);
        }
        for id in memcg_ids {
            let _ = self.memcg.remove(id);
        }
    }
}
