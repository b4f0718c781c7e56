//! Autoscaling: how many instances each service should run, from the demand the broker measures. The
//! decision itself ([`decide`]) is pure arithmetic over samples and the ready count, with time passed in,
//! so it is tested without a clock, a broker or an instance; acting on it is the caller's job.

pub mod decide;
