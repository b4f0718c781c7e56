//! `vigil-cgroup`: cgroups as Vigil sees and makes them. `fs` reads cgroupfs (where the hierarchies are
//! mounted, a process's cgroups, the per-cgroup numbers the kernel keeps) for the collector and the healer
//! alike; `driver` creates, limits, freezes and removes the cgroups of the instances Vigil manages, behind
//! one `CgroupDriver` trait with a pure-v2 and a hybrid implementation.
//!
//! Layers: `driver` on `fs`.

pub mod driver;
pub mod fs;
