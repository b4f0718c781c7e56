//! Tests of the Prometheus test harness itself, so a failing end-to-end test points at the collector or the
//! dashboards, never at the harness. Needs `/usr/bin/prometheus` (`scripts/setup` installs it).

mod support;

use std::time::Duration;

use support::prometheus::{Prometheus, has_samples, percent_encode, sample_values};

#[test]
fn scrapes_its_target_and_answers_queries() {
    let prometheus = Prometheus::start_self().expect("start prometheus");
    assert_eq!(prometheus.target(), prometheus.addr());

    let data = prometheus
        .wait_for(r#"up{job="vigil"}"#, Duration::from_secs(30), |data| sample_values(data) == [1.0])
        .unwrap_or_else(|e| panic!("{e}\nlog:\n{}", prometheus.log_tail()));
    assert!(has_samples(&data));
    let series = &data["result"][0]["metric"];
    assert_eq!(series["job"], "vigil");
    assert_eq!(series["instance"], prometheus.addr().to_string());

    prometheus.wait_until_up(Duration::from_secs(5)).expect("up already seen");

    // Characters that must be escaped in a query string survive the trip.
    let data = prometheus.query(r#"count(up{job=~"vig.*", instance!="a b&c=+%"}) + 0.5"#).expect("query");
    assert_eq!(sample_values(&data), [1.5]);
    let scalar = prometheus.query("scalar(vector(2)) * 3").expect("scalar query");
    assert_eq!(scalar["resultType"], "scalar");
    assert_eq!(sample_values(&scalar), [6.0]);
}

#[test]
fn malformed_query_reports_the_parse_error() {
    let prometheus = Prometheus::start_self().expect("start prometheus");
    let error = prometheus.query("rate(up{job=\"vigil\"}[5m]").expect_err("unbalanced parenthesis");
    assert!(error.contains("parse error"), "unexpected error: {error}");
    assert!(error.contains("bad_data"), "unexpected error: {error}");

    // wait_for gives up at once on a query that can never succeed.
    let started = std::time::Instant::now();
    let error = prometheus.wait_for("sum(", Duration::from_secs(20), has_samples).expect_err("bad query");
    assert!(error.contains("parse error"), "unexpected error: {error}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn wait_for_times_out_with_the_last_answer() {
    let prometheus = Prometheus::start_self().expect("start prometheus");
    let error = prometheus
        .wait_for("vigil_metric_that_does_not_exist", Duration::from_secs(1), has_samples)
        .expect_err("no such series");
    assert!(error.contains("not satisfied within"), "unexpected error: {error}");
    assert!(error.contains(r#""result":[]"#), "unexpected error: {error}");
}

#[test]
fn drop_stops_the_server_and_removes_its_directory() {
    let prometheus = Prometheus::start_self().expect("start prometheus");
    let addr = prometheus.addr();
    let dir = prometheus.dir().to_path_buf();
    assert!(dir.starts_with(std::env::temp_dir()), "data dir {} outside the temp dir", dir.display());
    assert!(dir.join("data").is_dir(), "no TSDB under {}", dir.display());
    assert!(!prometheus.log_tail().is_empty(), "prometheus wrote no log");
    drop(prometheus);
    assert!(std::net::TcpStream::connect(addr).is_err(), "prometheus still listening on {addr}");
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[test]
fn percent_encoding_keeps_only_unreserved_characters() {
    assert_eq!(percent_encode("abc_XYZ-0.9~"), "abc_XYZ-0.9~");
    assert_eq!(percent_encode(r#"up{a="b c"}[5m]"#), "up%7Ba%3D%22b%20c%22%7D%5B5m%5D");
    assert_eq!(percent_encode("a+b&c=%/é"), "a%2Bb%26c%3D%25%2F%C3%A9");
}
