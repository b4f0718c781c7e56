//! `vigil-collector`: Vigil's perception layer. It loads the kernel probes (`vigil-probes`), discovers the
//! instances on the host (an instance is a cgroup), joins probe counters with what cgroupfs offers for free
//! (memory, swap, throttling, pressure), and turns them every tick into [`Snapshot`]s: one stream for the
//! healer in-process, Prometheus text on `/metrics`, and OTLP when the standard `OTEL_*` variables ask.
//!
//! Its configuration section, the snapshot model, cgroupfs reading and the bearer-token rule come from the
//! small shared crates (`vigil-core`, `vigil-cgroup`, `vigil-auth`) and are re-exported here under their
//! old names.
//!
//! I/O sits at the edges (`probes`, `cgroupfs`, `discovery`, `http`, `otlp`); the joining and rate maths in
//! `aggregate` are plain functions over data, tested without a kernel.

pub mod aggregate;
pub mod btf;
pub mod collector;
pub mod config;
pub mod discovery;
pub mod export;
pub mod hwtrace;
pub mod metrics;
pub mod otlp;
pub mod privilege;
pub mod probe_sources;
pub mod probes;
pub mod snapshot;

/// The probe object, built by build.rs (from source, or the committed prebuilt object). At the crate's root
/// so that the main probes and the hardware tracepoints load the same object without importing each other.
pub(crate) static PROBES_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vigil-probes"));

pub use vigil_auth as auth;
pub use vigil_cgroup::fs as cgroupfs;

pub use collector::{Collector, CollectorError};
pub use config::{CollectorConfig, Config};
pub use snapshot::{InstanceSnapshot, Snapshot, SnapshotReceiver};
