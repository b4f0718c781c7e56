//! The autoscaler: services with a `scale:` block follow their traffic between `min` and `max` instances,
//! through a warm standby tier (hibernated instances, woken in well under a second) before cold starts.
//! [`tiers`] turns a desired count into steps on instances.

pub mod tiers;
pub mod signal;
pub mod scaler;
