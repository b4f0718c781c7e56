//! Alerts in, end to end with the real parts: Debian's Prometheus scrapes `vigil up`'s `/metrics` and
//! evaluates an alerting rule over them, Debian's Alertmanager routes the alert to Vigil's
//! `POST /api/v1/alerts` (with the API's bearer token, as `http_config.authorization`), and a Vigil rule
//! with an `alert:` condition restarts the instance: asserted in the audit log and by its new pid. When
//! the condition ends (the instance is hibernated through the API, so it is no longer `active`),
//! Prometheus resolves the alert, Alertmanager sends the resolution and Vigil forgets the alert.
//! Needs root (cgroups) and the packages scripts/setup installs.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{CgroupParent, Proc, Scratch, Vigil, alertmanager, free_ports, wait_for};

const TOKEN: &str = "e2e-alerting-token";

#[test]
fn prometheus_and_alertmanager_alerts_restart_an_instance_and_resolve() {
    let scratch = Scratch::new("alerting");
    let base = free_ports(5);
    let (api, app, am, prom, grpc) = (base, base + 1, base + 2, base + 3, base + 4);
    let parent = CgroupParent::new("alerting");
    let rules = scratch.write(
        "rules.yaml",
        "rules:\n  - name: restart-on-alert\n    when:\n      - alert: { name: EchoNeedsRestart, labels: { severity: critical } }\n    action: restart\n    cooldown: 10m\n",
    );
    let config = scratch.write(
        "vigil.yaml",
        &format!(
            "data_dir: {data}\nhttp: {{ listen: \"127.0.0.1:{api}\", token: {TOKEN} }}\nrules: [{rules}]\nhealer: {{ cgroup_parent: {parent}, stop_grace: 2s }}\ncollector: {{ watch: {{ managed_root: {parent} }} }}\nbroker: {{ enabled: false }}\ngrpc: {{ listen: \"127.0.0.1:{grpc}\" }}\nservices:\n  - name: echo\n    command: [python3, -m, http.server, --bind, 127.0.0.1, \"{{port}}\"]\n    port: {app}\n    readiness: {{ tcp: true }}\n",
            data = scratch.path("data").display(),
            rules = rules.display(),
        ),
    );
    let mut vigil = Vigil::up(&scratch.0, "vigil", &config, ([127, 0, 0, 1], api).into(), Some(TOKEN));
    let first_pids = vigil.active_pids("echo-0", Duration::from_secs(60));

    let _am = alertmanager(
        &scratch,
        am,
        &format!(
            "route:\n  receiver: vigil\n  group_by: [alertname, instance_id]\n  group_wait: 0s\n  group_interval: 1s\n  repeat_interval: 1h\nreceivers:\n  - name: vigil\n    webhook_configs:\n      - url: http://127.0.0.1:{api}/api/v1/alerts\n        send_resolved: true\n        http_config:\n          authorization: {{ credentials: {TOKEN} }}\n"
        ),
    );
    scratch.write(
        "alert.rules.yaml",
        "groups:\n  - name: e2e\n    interval: 1s\n    rules:\n      - alert: EchoNeedsRestart\n        expr: vigil_instance_state{service=\"echo\",state=\"active\"} == 1\n        labels: { severity: critical }\n        annotations: { summary: \"echo is active\" }\n",
    );
    scratch.write(
        "prometheus.yaml",
        &format!(
            "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nrule_files: [{rules}]\nalerting:\n  alertmanagers:\n    - static_configs: [ {{ targets: [\"127.0.0.1:{am}\"] }} ]\nscrape_configs:\n  - job_name: vigil\n    authorization: {{ credentials: {TOKEN} }}\n    static_configs: [ {{ targets: [\"127.0.0.1:{api}\"] }} ]\n",
            rules = scratch.path("alert.rules.yaml").display()
        ),
    );
    let mut prometheus = Proc::spawn(
        "prometheus",
        &scratch.0,
        "/usr/bin/prometheus",
        &[
            format!("--config.file={}", scratch.path("prometheus.yaml").display()),
            format!("--storage.tsdb.path={}", scratch.path("prom-data").display()),
            format!("--web.listen-address=127.0.0.1:{prom}"),
        ],
    );

    // Prometheus fires, Alertmanager routes, Vigil's rule restarts echo-0.
    let restart = wait_for("the alert's restart in the audit log", Duration::from_secs(90), || {
        vigil.proc.assert_running();
        prometheus.assert_running();
        vigil.decision(|d| d["rule"] == "restart-on-alert" && d["outcome"] != "refused")
    });
    assert_eq!(
        (restart["action"].as_str(), restart["instance_id"].as_str(), restart["outcome"].as_str()),
        (Some("restart"), Some("echo-0"), Some("succeeded")),
        "{restart}"
    );
    let new_pids = vigil.active_pids("echo-0", Duration::from_secs(30));
    assert!(new_pids.iter().all(|p| !first_pids.contains(p)), "new pids {new_pids:?} vs {first_pids:?}");

    let alerts = vigil.get("/api/v1/alerts").expect("alerts");
    let a = alerts["alerts"]
        .as_array()
        .and_then(|l| l.iter().find(|a| a["name"] == "EchoNeedsRestart"))
        .cloned()
        .unwrap_or_else(|| panic!("the alert is listed: {alerts}"));
    assert_eq!(a["scope"], serde_json::json!({ "instance_id": "echo-0" }), "{a}");
    assert_eq!((a["labels"]["severity"].as_str(), a["receiver"].as_str()), (Some("critical"), Some("vigil")));
    assert_eq!(a["annotations"]["summary"], "echo is active");
    // The token rule holds for alerts too.
    let anonymous = vigil_healer::client::Client::new(vigil.api, None);
    assert!(anonymous.call("GET", "/api/v1/alerts").is_err(), "without the token: refused");

    // Still firing after the restart: the cooldown keeps the rule from restarting it again.
    let restarts = |v: &Vigil| {
        v.get("/api/v1/decisions?limit=200").ok().map_or(0, |d: Value| {
            d["decisions"]
                .as_array()
                .map_or(0, |l| l.iter().filter(|d| d["rule"] == "restart-on-alert").count())
        })
    };
    assert_eq!(restarts(&vigil), 1);

    // The condition ends: echo-0 hibernates, Prometheus resolves, Alertmanager tells Vigil.
    vigil.client.call("POST", "/api/v1/instances/echo-0/hibernate?wait=60s").expect("hibernate");
    wait_for("the alert to be resolved", Duration::from_secs(60), || {
        vigil.proc.assert_running();
        let list = vigil.get("/api/v1/alerts").ok()?;
        list["alerts"].as_array()?.is_empty().then_some(())
    });
    assert_eq!(restarts(&vigil), 1, "a cooldown-bound rule restarted once");
    assert!(vigil.proc.stop(), "vigil exits on SIGTERM:\n{}", vigil.proc.log_text());
}
