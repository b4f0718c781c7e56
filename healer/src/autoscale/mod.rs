//! The autoscaler: services with a `scale:` block follow their traffic between `min` and `max` instances,
//! through a warm standby tier (hibernated instances, woken in well under a second) before cold starts.
//!
//! - [`signal`]: what is measured (the broker's time-averaged concurrency per service and instance).
//! - [`decide`]: how many instances a service should run, KPA-style stable and panic windows; pure
//!   arithmetic over samples with time passed in, tested without a clock, a broker or an instance.
//! - [`tiers`]: from a desired count to steps on instances (wake standby first, then start; hibernate into
//!   the standby room, then stop).
//! - [`scaler`]: the task that measures, decides and sends the steps through the safety gate.

pub mod decide;
pub mod scaler;
pub mod signal;
pub mod tiers;
