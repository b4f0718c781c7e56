//! `vigil-healer`: Vigil's decision and execution layer. It reads the collector's snapshots, evaluates the
//! rule files over windows of them, passes proposed actions through the safety gate, and executes them:
//! today the mechanics of the low-power standby (`standby`) on the cgroups a `CgroupDriver` manages, and
//! the rule language (`rules`). Its API's operations (`api`) are served over REST and gRPC (`grpc`).

pub mod actions;
pub mod alerting;
pub mod alerts;
pub mod api;
pub mod audit;
pub mod autoscale;
pub mod client;
pub mod config;
pub mod engine;
pub mod grpc;
pub mod instance;
pub mod lifecycle;
mod located;
pub mod metrics;
pub mod notify;
pub mod placement;
pub mod rules;
pub mod run;
pub mod service;
pub mod standby;
pub mod supervisor;
pub mod tcp;
pub mod traffic;
pub mod workflow;

/// The cgroup drivers, from `vigil-cgroup`, under the path the healer's modules have always used.
pub use vigil_cgroup::driver as cgroup;

/// The healer's end of the collector's snapshot stream (the same type the collector sends on): always holds
/// the latest snapshot; `changed().await` wakes on the next tick.
pub type SnapshotReceiver = tokio::sync::watch::Receiver<std::sync::Arc<vigil_core::snapshot::Snapshot>>;
