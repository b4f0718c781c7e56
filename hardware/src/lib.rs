//! `vigil-hardware`: Vigil's perception of hardware health. The kernel log (`/dev/kmsg`, matched against
//! `patterns.yaml`) and sysfs counters with documented formats (EDAC, PCIe AER, carrier changes, thermal
//! throttling, block I/O, NVMe controller state) become one typed stream of [`HardwareEvent`]s: a device,
//! what happened to it, how bad, which counter said so and by how much. A health state per device
//! (healthy, degraded, failed, with the reason) follows from the events of a quiet window. Tracepoint
//! counts from the collector's eBPF programs join through [`TracepointSource`].
//!
//! Layers, bottom up: `event`; `kmsg`, `patterns`, `sysfs`, `health`, `state`, `tracepoint` (pure logic
//! and their readers); `metrics`; `monitor` (the threads that run them: [`Hardware`]); `api` (the REST
//! route and the report). Nothing here blocks an async runtime: the kernel log has its own thread, the
//! sysfs poll another.

pub mod event;
pub mod health;
pub mod kmsg;
pub mod metrics;
pub mod monitor;
pub mod patterns;
pub mod state;
pub mod sysfs;
pub mod tracepoint;

pub use event::{HardwareEvent, Kind, KindError, KmsgOrigin, Severity, Source};
pub use health::{DeviceHealth, HealthTracker, State};
pub use monitor::{Hardware, HardwareError, HardwareHandle, HardwareReport};
pub use tracepoint::{TracepointCount, TracepointSource};
