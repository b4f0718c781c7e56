//! Helpers shared by the collector's integration tests (and, by path, the healer's and the broker's): a real
//! Prometheus server to scrape what the collector exports, the Grafana dashboards' queries to run against
//! it, and the OTLP test receiver. Each test binary includes this
//! module with `mod support;` and uses only part of it, hence `dead_code` is allowed here.
#![allow(dead_code)]

pub mod dashboard;
pub mod faultydisk;
pub mod kmsg;
pub mod otlp;
pub mod prometheus;
pub mod swap;
pub mod workload;
