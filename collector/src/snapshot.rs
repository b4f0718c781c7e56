//! The per-tick picture of every instance that the collector hands to the healer and the exporters. The
//! model itself lives in `vigil-core` (so the healer and the broker read it without depending on the
//! collector); the stream it travels on is the collector's.

use std::sync::Arc;

pub use vigil_core::snapshot::*;

/// The healer's end of the snapshot stream: always holds the latest snapshot; `changed().await` wakes on
/// the next tick. Cheap to clone.
pub type SnapshotReceiver = tokio::sync::watch::Receiver<Arc<Snapshot>>;
