//! Vigil's broker: the traffic entry of a host. It speaks RSocket 1.0 over TCP with its own codec
//! (`rsocket`), registers service instances that connect to it, routes every request by its routing
//! metadata, balances load across instances, shifts traffic between versions, ejects failing instances and
//! breaks circuits (`balance`), holds requests while a hibernated instance wakes, and reports demand,
//! concurrency and latency to the healer.

pub mod balance;
pub mod rsocket;
