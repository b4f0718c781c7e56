//! Helpers shared by the collector's integration tests: a real Prometheus server to scrape what the
//! collector exports, and the Grafana dashboards' queries to run against it. Each test binary includes this
//! module with `mod support;` and uses only part of it, hence `dead_code` is allowed here.
#![allow(dead_code)]

pub mod dashboard;
pub mod prometheus;
pub mod swap;
pub mod workload;
